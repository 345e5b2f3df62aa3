"""A learner step's time and peak memory at each retention ratio, in-process, side by side.

The learner group alone, as the runtime lays it out on this machine: ``--world`` gloo ranks of
``LearnerWorker`` (DeepSpeed, ``--threads`` torch threads each), one process per rank, on a pair
preset's student with its learner settings (``pair=NAME``: micro-batch, chunk sizes, dtype,
``single_forward``). Every rank trains its share of ``learner.global_batch_size`` sequences of
``--prompt-tokens`` prompt + ``rollout.max_new_tokens`` response tokens, the same batch every
step, under a synthetic teacher signal of the pair's ``teacher.top_k`` (distinct random ids per
position, log-softmaxed random log-probs, seeded; ``teacher.top_k=null``: the log-softmax of
random logits over the whole vocabulary, as ``TeacherSignal.from_logits`` sends it): the selection rules read the student's real
statistics on it, and the learner's arithmetic does not depend on the signal's values. No Ray,
rollout or teacher: the phases around the learner cannot add noise to it. The ranks start with the
environment the runtime gives its actors (``worker_env``: with ``cluster.keep_heap``, the default,
glibc keeps its heap; ``--set cluster.keep_heap=false`` measures glibc's own behaviour).

Cases: rule ``all`` (ratio 1.0) and ``soft_or`` at each ``--ratios`` value, for each
``--zero-stages`` value (``soft_or`` at 1.0 keeps ``all``'s tokens at the same weight, after a
statistics pass that ``all`` does without: their difference is what that pass costs), one case after the other, each its own set of processes. Reported per
case: the median over steps after ``--warmup`` steps of the step's wall time and of its split
(``learner_time/*``: statistics, gradient, optimizer), and the rank's peak RSS over the whole case
(``ru_maxrss``, the largest rank); every ratio against ratio 1.0 of the same ZeRO stage.

Usage:
    python bench/learner_ratio.py                                  # pair=smollm2, ZeRO-1 and ZeRO-2
    python bench/learner_ratio.py --ratios 0.5 --zero-stages 1 --steps 4
    # the random V = 151,936 student of bench/runtime_memory.py (run that first), its learner sizes:
    python bench/learner_ratio.py --pair embedded --tag v151936 --set \
        student=bench/results/runtime_memory/models/student-v151936 teacher.top_k=32 \
        learner.global_batch_size=16 learner.micro_batch_size=8 learner.chunk_rows=512 \
        learner.single_forward=false rollout.max_new_tokens=96
``--set`` overrides apply to every case (before the case's ZeRO stage and rule). Prints a table and
writes bench/results/learner_ratio-<tag, default the pair>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))


def _overrides(args: argparse.Namespace, rule: str, ratio: float, zero_stage: int) -> list[str]:
    rule = ["selection=all"] if rule == "all" else ["selection.rule=soft_or", f"selection.ratio={ratio}"]
    return [f"pair={args.pair}", *args.set, f"learner=zero{zero_stage}", f"learner.world_size={args.world}", *rule]


def synthetic_batch(cfg, rank: int, args: argparse.Namespace):
    """Rank ``rank``'s TrainBatch (CPU): random prompt + response ids below the student's
    vocabulary, right-padded to one length, loss on the response, a random top-K signal (the whole
    distribution with ``teacher.top_k=null``)."""
    import torch

    from tip_ray.tip.signal import TeacherSignal
    from tip_ray.types import TrainBatch

    vocab = _student_vocab(cfg.student)
    sequences = cfg.learner.global_batch_size // args.world
    prompt, response, k = args.prompt_tokens, cfg.rollout.max_new_tokens, cfg.teacher.top_k
    length = prompt + response
    g = torch.Generator().manual_seed(1000 + rank)
    input_ids = torch.randint(0, vocab, (sequences, length), generator=g)
    loss_mask = torch.zeros(sequences, length - 1, dtype=torch.bool)
    loss_mask[:, prompt - 1:] = True
    if k is None:  # teacher.top_k=null: the whole distribution, as the teacher would send it
        logits = 2.0 * torch.randn(sequences, length - 1, vocab, generator=g)
        signal = TeacherSignal.from_logits(logits, input_ids[:, 1:], None)
        return TrainBatch(input_ids, torch.ones(sequences, length, dtype=torch.long), loss_mask, signal)
    positions = sequences * (length - 1)
    # distinct ids per position: the top-k of uniform noise, 128 positions at a time
    ids = torch.cat([torch.rand(min(128, positions - i), vocab, generator=g).topk(k, dim=-1).indices
                     for i in range(0, positions, 128)]).view(sequences, length - 1, k)
    logp = torch.log_softmax(2.0 * torch.randn(sequences, length - 1, k + 1, generator=g), dim=-1)
    values, _ = logp[..., :k].sort(dim=-1, descending=True)
    signal = TeacherSignal(ids, values.contiguous(), logp[..., k].contiguous())
    return TrainBatch(input_ids, torch.ones(sequences, length, dtype=torch.long), loss_mask, signal)


def _student_vocab(path: str) -> int:
    return int(json.loads((ROOT / path / "config.json").read_text())["vocab_size"])


def _rank(rank: int, port: int, args: argparse.Namespace, rule: str, ratio: float, zero_stage: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(args.world), LOCAL_RANK=str(rank))
    import torch

    torch.set_num_threads(args.threads)
    from tip_ray.cli import compose
    from tip_ray.learner.worker import LearnerWorker

    cfg = compose("train", _overrides(args, rule, ratio, zero_stage))
    batch = synthetic_batch(cfg, rank, args)
    worker = LearnerWorker(dataclasses.replace(cfg.learner, world_size=args.world), cfg.selection, cfg.loss)
    steps = []
    for _ in range(args.steps):
        start = time.perf_counter()
        metrics, _ = worker.train_step(batch)
        steps.append({"seconds": time.perf_counter() - start, **metrics.phase_seconds,
                      "kept_fraction": metrics.kept_fraction})
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(f"{out}.rank{rank}").write_text(json.dumps({"steps": steps, "peak_mib": peak_mib}))
    worker.close()


def run_case(args: argparse.Namespace, rule: str, ratio: float, zero_stage: int) -> dict:
    """One case in ``--world`` fresh processes: medians over the measured steps, the largest
    rank's peak RSS."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(RESULTS / f"learner_ratio-{args.tag}.case")
    mp.start_processes(_rank, args=(port, args, rule, ratio, zero_stage, out), nprocs=args.world, join=True,
                       start_method="spawn")
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(args.world)]
    for r in range(args.world):
        Path(f"{out}.rank{r}").unlink()
    measured = ranks[0]["steps"][args.warmup:]

    def median(key: str) -> float:
        return statistics.median(step.get(key, 0.0) for step in measured)

    return {"ratio": ratio, "zero_stage": zero_stage, "rule": rule,
            "kept_fraction": median("kept_fraction"), "seconds": median("seconds"),
            "statistics": median("statistics"), "gradient": median("gradient"), "optimizer": median("optimizer"),
            "peak_mib": max(r["peak_mib"] for r in ranks), "steps": [r["steps"] for r in ranks]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", default="smollm2", help="a pair preset (tip_ray/conf/pair/NAME.yaml), prepared")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.2, 0.1],
                        help="soft_or ratios in (0, 1] (rule `all` always runs; soft_or 1.0 keeps the same tokens "
                             "after a statistics pass)")
    parser.add_argument("--zero-stages", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("--world", type=int, default=2, help="learner ranks")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--prompt-tokens", type=int, default=50)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="Hydra overrides for every case, e.g. student=PATH teacher.top_k=32")
    parser.add_argument("--tag", help="suffix of the result file; default: the pair's name")
    args = parser.parse_args()
    args.tag = args.tag or args.pair
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    if any(not 0.0 < r <= 1.0 for r in args.ratios):
        raise SystemExit(f"--ratios must lie in (0, 1], got {args.ratios}")
    from tip_ray.cli import compose

    cfg = compose("train", [f"pair={args.pair}", *args.set])
    if not (ROOT / cfg.student / "config.json").is_file():
        raise SystemExit(f"{cfg.student} is missing: prepare it first (`tip-ray prepare-pair {args.pair}`, or "
                         "bench/runtime_memory.py for its random students)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    from tip_ray.runtime.ray_runtime import worker_env

    os.environ.update(worker_env(cfg.cluster.keep_heap))  # the spawned ranks start with it, as actors do
    cases = []
    for stage in args.zero_stages:
        for rule, ratio in [("all", 1.0), *(("soft_or", r) for r in args.ratios)]:
            print(f"  ZeRO-{stage}, {rule} {ratio} ...", file=sys.stderr, flush=True)
            cases.append(run_case(args, rule, ratio, stage))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"learner step at each ratio, {args.tag}: {args.world} ranks x {args.threads} thread(s), "
                        f"{cfg.learner.global_batch_size} x ({args.prompt_tokens} + {cfg.rollout.max_new_tokens}) "
                        f"tokens, top-{cfg.teacher.top_k}, keep_heap={cfg.cluster.keep_heap}, median of steps "
                        f"{args.warmup + 1}-{args.steps}")
    for column in ("ZeRO", "rule", "ratio", "kept", "learner s", "x ratio 1", "statistics", "gradient", "optimizer",
                   "peak MiB", "x ratio 1 "):
        table.add_column(column, justify="right")
    for case in cases:
        base = next(c for c in cases if c["zero_stage"] == case["zero_stage"] and c["rule"] == "all")
        table.add_row(str(case["zero_stage"]), case["rule"], f"{case['ratio']:.2f}", f"{case['kept_fraction']:.1%}",
                      f"{case['seconds']:.2f}", f"{case['seconds'] / base['seconds']:.2f}",
                      f"{case['statistics']:.2f}", f"{case['gradient']:.2f}", f"{case['optimizer']:.2f}",
                      f"{case['peak_mib']:.0f}", f"{case['peak_mib'] / base['peak_mib']:.2f}")
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    out = RESULTS / f"learner_ratio-{args.tag}.json"
    out.write_text(json.dumps({"pair": args.pair, "overrides": args.set, "student": cfg.student,
                               "vocab": _student_vocab(cfg.student), "world": args.world, "threads": args.threads,
                               "prompt_tokens": args.prompt_tokens, "steps": args.steps, "warmup": args.warmup,
                               "keep_heap": cfg.cluster.keep_heap,
                               "load_average": os.getloadavg(), "cases": cases}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
