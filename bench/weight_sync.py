"""Seconds per weight sync vs model size: the object_store and collective (gloo) transports.

For each random Qwen3 model (built from a config, 0.4M to ~100M parameters, fp32) the script
starts a learner group (``--learner-ranks`` ranks, ZeRO-2) and ``--rollout-actors`` vLLM rollout
actors on a local Ray cluster, forms the collective group once (``tip_ray.sync.transports``), then runs
``--repeats`` syncs through each transport, alternating, after one warm-up sync each, and keeps
the median. Every sync is real: the actors reload the weights and serve the new version.

Usage:
    python bench/weight_sync.py                        # every size, 2 rollout actors
    python bench/weight_sync.py --sizes 0.4M 10M --repeats 5 --bucket-mb 32
Prints a table and writes bench/results/weight_sync-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Size:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int


SIZES = {
    "0.4M": Size(128, 2, 4, 2, 384, 32),
    "2M": Size(192, 4, 6, 2, 576, 32),
    "10M": Size(384, 6, 6, 2, 1152, 64),
    "38M": Size(640, 8, 10, 2, 1920, 64),
    "97M": Size(1024, 8, 16, 4, 3072, 64),
}


def build_checkpoint(size: Size, path: Path) -> tuple[str, int, int]:
    """A random Qwen3 student of ``size`` over the character tokenizer at ``path``: (path, params, bytes)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tip_ray.data.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = Qwen3Config(vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         **asdict(size))
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    params = sum(p.numel() for p in model.parameters())
    return str(path), params, sum(p.numel() * p.element_size() for p in model.parameters())


def measure_size(name: str, size: Size, tmp: Path, args) -> dict:
    """Median seconds per sync of both transports for one model size."""
    import ray

    from tip_ray.config import LearnerConfig, LossConfig, RolloutConfig, SelectionConfig, SyncConfig
    from tip_ray.runtime.actors import RolloutActor
    from tip_ray.runtime.learner_group import LearnerGroup
    from tip_ray.runtime.placement import PoolResources
    from tip_ray.sync.transports import ObjectStoreTransport, make_transport, sync_weights

    path, params, model_bytes = build_checkpoint(size, tmp / name)
    # The CPU build's KV cache is sized from these lengths (tip_ray.rollout.vllm_args), not from the machine.
    rollout = RolloutConfig(engine="vllm", max_new_tokens=8, max_model_len=64, dtype="float32", max_num_seqs=4)
    actors = [ray.remote(RolloutActor).options(num_cpus=1).remote(rollout, path, i)
              for i in range(args.rollout_actors)]
    learner = LearnerGroup(PoolResources("learner", args.learner_ranks, cpus=1),
                           LearnerConfig(model=path, world_size=args.learner_ranks, zero_stage=2, optimizer="sgd",
                                         global_batch_size=args.learner_ranks, micro_batch_size=1),
                           SelectionConfig(), LossConfig())
    ray.get([a.weight_version.remote() for a in actors])
    collective = make_transport(SyncConfig(transport="collective", backend="gloo", bucket_mb=args.bucket_mb),
                                learner, actors)
    transports = {"object_store": ObjectStoreTransport(), "collective": collective}
    seconds: dict[str, list[float]] = {k: [] for k in transports}
    version = 0
    try:
        for repeat in range(args.repeats + 1):
            for kind, transport in transports.items():
                version += 1
                report = sync_weights(learner, actors, version, transport)
                if repeat:  # the first round warms up (allocations, connections)
                    seconds[kind].append(report.seconds)
        served = ray.get([a.weight_version.remote() for a in actors])
        assert served == [version] * len(actors), served
    finally:
        collective.close()
        learner.close()
        for actor in actors:
            ray.kill(actor)
    row = {"size": name, "params": params, "bytes": model_bytes, "buckets": len(collective.plan),
           "rollout_actors": args.rollout_actors, "learner_ranks": args.learner_ranks, "bucket_mb": args.bucket_mb}
    for kind, values in seconds.items():
        row[f"{kind}_s"] = statistics.median(values)
        row[f"{kind}_s_all"] = values
    print(f"  {name}: object_store {row['object_store_s']:.3f} s, collective {row['collective_s']:.3f} s",
          file=sys.stderr, flush=True)
    return row


def report(rows: list[dict]) -> None:
    """Print the table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="seconds per weight sync (median), learner rank 0 -> every vLLM rollout actor, CPU")
    for col in ("model", "params", "MB", "buckets", "actors", "object_store s", "collective s", "collective MB/s",
                "object_store / collective"):
        table.add_column(col, justify="right")
    for r in rows:
        mb = r["bytes"] / 2**20
        table.add_row(r["size"], f"{r['params'] / 1e6:.2f}M", f"{mb:.1f}", str(r["buckets"]), str(r["rollout_actors"]),
                      f"{r['object_store_s']:.3f}", f"{r['collective_s']:.3f}", f"{mb / r['collective_s']:.0f}",
                      f"{r['object_store_s'] / r['collective_s']:.2f}")
    Console(width=None if sys.stdout.isatty() else 150).print(table)


def main() -> int:
    """Measure every size, print, write the JSON."""
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    parser.add_argument("--rollout-actors", type=int, default=2)
    parser.add_argument("--learner-ranks", type=int, default=1)
    args = parser.parse_args()

    ray.init(num_cpus=args.rollout_actors + args.learner_ranks, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}})
    try:
        with tempfile.TemporaryDirectory(prefix="tip-sync-") as tmp:
            rows = [measure_size(name, SIZES[name], Path(tmp), args) for name in args.sizes]
    finally:
        ray.shutdown()
    report(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "weight_sync-cpu.json"
    out.write_text(json.dumps({"repeats": args.repeats, "results": rows}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
