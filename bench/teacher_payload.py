"""Teacher payload bytes per response token: top-K vs the full distribution, fp32 vs bf16 values.

For each vocabulary size a random Qwen3 teacher with that vocabulary is built and saved; the
real ``tip_ray.teacher.worker.TeacherWorker`` scores the same batch of sequences with
``teacher.top_k`` in (8, 32, 128, null = full) and ``teacher.values_dtype`` in (fp32, bf16). Three
sizes are measured on the ``TeacherSignal`` it returns:

- ``raw``: the bytes of its three tensors (ids int32, top-K log-probs, sampled-token log-probs),
- ``pickle``: ``pickle.dumps(signal, protocol=5)``,
- ``ray``: the object's size in Ray's object store after ``ray.put(signal)`` (what a teacher actor
  hands the driver), from ``ray.experimental.get_object_locations``.

The signal covers every next-token position of each sequence (prompt positions too; the learner
masks them), so bytes per response token = bytes / response tokens in the batch, and the
per-position cost is reported next to it with the formula ``K * (4 + b) + b`` (b = value bytes;
``V * b + b`` for the full distribution, which travels dense: no ids).

Usage:
    python bench/teacher_payload.py                  # vocab 128 / 32768 / 151936
    python bench/teacher_payload.py --vocab 128 32768 --sequences 4
Prints a table and writes bench/results/teacher_payload.json.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
KS: tuple[int | None, ...] = (8, 32, 128, None)
VALUE_DTYPES = ("fp32", "bf16")
VALUE_BYTES = {"fp32": 4, "bf16": 2}


def build_teacher(vocab: int, directory: Path) -> str:
    """Save a small random Qwen3 causal LM with ``vocab`` rows to ``directory``; returns the path."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, intermediate_size=128, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(vocab)
    Qwen3ForCausalLM(config).save_pretrained(str(directory))
    return str(directory)


def ray_object_bytes(obj) -> int:
    """Size of ``obj`` in Ray's object store (data + metadata), as ``ray.put`` serializes it."""
    import ray
    from ray.experimental import get_object_locations

    ref = ray.put(obj)
    size = get_object_locations([ref])[ref]["object_size"]
    del ref
    return int(size)


def measure(vocabs: list[int], sequences: int, prompt_len: int, response_len: int) -> list[dict]:
    """Every (vocab, K, dtype) case on one batch per vocabulary."""
    import ray
    import torch

    from tip_ray.config import TeacherConfig
    from tip_ray.teacher.worker import TeacherWorker

    length = prompt_len + response_len
    positions = sequences * (length - 1)
    response_tokens = sequences * response_len
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="tip-payload-") as tmp:
            for vocab in vocabs:
                path = build_teacher(vocab, Path(tmp) / f"teacher-{vocab}")
                generator = torch.Generator().manual_seed(0)
                input_ids = torch.randint(0, vocab, (sequences, length), generator=generator)
                attention = torch.ones_like(input_ids)
                mask = torch.zeros(sequences, length - 1, dtype=torch.bool)
                mask[:, prompt_len - 1:] = True  # positions that predict a response token
                for k in KS:
                    if k is not None and k >= vocab:
                        continue  # K >= V is the full distribution, measured as `full`
                    for dtype in VALUE_DTYPES:
                        worker = TeacherWorker(TeacherConfig(model=path, top_k=k, values_dtype=dtype,
                                                             micro_batch_size=sequences))
                        signal = worker.score(input_ids, attention)
                        signal.validate(sequences, length - 1, vocab, mask)
                        raw = sum(t.numel() * t.element_size()
                                  for t in (signal.topk_ids, signal.topk_logprobs, signal.sampled_logprobs)
                                  if t is not None)
                        b = VALUE_BYTES[dtype]
                        rows.append({
                            "vocab": vocab, "k": signal.k, "mode": "full" if k is None else f"top-{k}",
                            "values_dtype": dtype, "positions": positions, "response_tokens": response_tokens,
                            "raw_bytes": raw, "pickle_bytes": len(pickle.dumps(signal, protocol=5)),
                            "ray_bytes": ray_object_bytes(signal),
                            # a dense full distribution carries no ids: V values + the sampled one
                            "formula_bytes_per_position": signal.k * (b if signal.dense else 4 + b) + b,
                        })
                        del signal, worker
                        r = rows[-1]
                        print(f"  V={vocab:<6} {r['mode']:<7} {dtype}: {r['ray_bytes'] / response_tokens:12.1f} "
                              "B/response token", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    return rows


def report(rows: list[dict], sequences: int, prompt_len: int, response_len: int) -> dict:
    """Print the table (rich) and return the JSON document with ratios to the full distribution."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"teacher payload per response token (TeacherWorker, {sequences} sequences x "
                        f"{prompt_len} prompt + {response_len} response tokens)")
    for col in ("vocab", "mode", "values", "raw B/pos", "formula B/pos", "raw B/resp tok", "pickle B/resp tok",
                "ray B/resp tok", "ray / full fp32"):
        table.add_column(col, justify="right")
    for r in rows:
        full = next(x for x in rows if x["vocab"] == r["vocab"] and x["mode"] == "full" and x["values_dtype"] == "fp32")
        r["raw_bytes_per_position"] = r["raw_bytes"] / r["positions"]
        for kind in ("raw", "pickle", "ray"):
            r[f"{kind}_bytes_per_response_token"] = r[f"{kind}_bytes"] / r["response_tokens"]
        r["ray_vs_full_fp32"] = r["ray_bytes"] / full["ray_bytes"]
        table.add_row(str(r["vocab"]), r["mode"], r["values_dtype"], f"{r['raw_bytes_per_position']:.0f}",
                      str(r["formula_bytes_per_position"]), _size(r["raw_bytes_per_response_token"]),
                      _size(r["pickle_bytes_per_response_token"]), _size(r["ray_bytes_per_response_token"]),
                      f"{r['ray_vs_full_fp32']:.5f}")
    Console(width=None if sys.stdout.isatty() else 150).print(table)
    return {"sequences": sequences, "prompt_len": prompt_len, "response_len": response_len, "results": rows}


def _size(n: float) -> str:
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def main() -> int:
    """Measure, print, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[128, 32768, 151936])
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=96)
    args = parser.parse_args()
    rows = measure(args.vocab, args.sequences, args.prompt_len, args.response_len)
    doc = report(rows, args.sequences, args.prompt_len, args.response_len)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "teacher_payload.json"
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
