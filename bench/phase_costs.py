"""What each phase of an on-policy distillation step costs in-process, without Ray: where
``bench/trl_comparison.py``'s per-phase times come from, and how much of them is compute.

On one batch of real student rollouts (the prompts ``tip-ray train`` visits first):

- rollout: the vLLM engine (``RolloutWorker``) generating the batch, with and without the
  sampled tokens' log-probs, on 1 and on 2 threads;
- teacher: ``TeacherWorker.score`` of the batch, on 1 and on 2 threads;
- learner: ``LearnerWorker.train_step`` (statistics, selection, loss, backward, AdamW) of the
  whole batch, as 1 rank on 2 threads and as 2 gloo ranks on 1 thread each (the runtime's
  layout on this machine), ``learner.single_forward`` on and off.

Medians over ``--repeats`` calls after 2 warm-up calls. Each case runs in its own process, so
thread settings do not leak between cases.

Usage:
    python bench/phase_costs.py                                     # the embedded pair
    python bench/phase_costs.py --student runs/bench_pair/m/student --teacher runs/bench_pair/m/teacher --tag m
Prints a table and writes bench/results/phase_costs[-TAG].json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))


def compose_config(args: argparse.Namespace):
    """The training config of the measured pair: the embedded task's batch, full teacher distribution."""
    from tip_ray.cli import compose

    return compose("train", [f"student={args.student}", f"teacher.model={args.teacher}", "teacher.top_k=null",
                             f"trainer.prompts_per_step={args.prompts}", f"learner.global_batch_size={args.prompts}",
                             f"rollout.max_new_tokens={args.max_new_tokens}", "selection.rule=all"])


def _median_seconds(call, repeats: int) -> float:
    for _ in range(2):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def case_rollout(args: argparse.Namespace, threads: int, logprobs: bool) -> dict:
    """vLLM generation of the batch; writes the batch (token ids) for the other cases."""
    import dataclasses

    import torch

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    torch.set_num_threads(threads)
    from tip_ray.data.prompts import PromptStream, load_prompt_dataset
    from tip_ray.rollout.worker import RolloutWorker
    from tip_ray.state.preflight import load_tokenizer

    cfg = compose_config(args)
    tokenizer = load_tokenizer(cfg.student, "student")
    prompts = next(PromptStream(load_prompt_dataset(cfg.data, tokenizer), args.prompts, seed=cfg.data.seed,
                                shuffle=cfg.data.shuffle)).prompt_ids
    worker = RolloutWorker(dataclasses.replace(cfg.rollout, logprobs=logprobs), cfg.student)
    seeds = list(range(len(prompts)))
    seconds = _median_seconds(lambda: worker.generate(prompts, seeds=seeds), args.repeats)
    batch = worker.generate(prompts, seeds=seeds)
    input_ids, attention, loss_mask = batch.to_sequences(tokenizer.pad_token_id)
    torch.save({"input_ids": input_ids, "attention": attention, "loss_mask": loss_mask}, args.batch_file)
    return {"seconds": seconds, "response_tokens": int(loss_mask.sum())}


def case_teacher(args: argparse.Namespace, threads: int) -> dict:
    """The teacher's scoring of the batch; writes the signal for the learner cases."""
    import torch

    torch.set_num_threads(threads)
    from tip_ray.teacher.worker import TeacherWorker

    cfg = compose_config(args)
    data = torch.load(args.batch_file)
    worker = TeacherWorker(cfg.teacher)
    seconds = _median_seconds(lambda: worker.score(data["input_ids"], data["attention"]), args.repeats)
    signal = worker.score(data["input_ids"], data["attention"])
    torch.save({**data, "topk_ids": signal.topk_ids, "topk_logprobs": signal.topk_logprobs,
                "sampled_logprobs": signal.sampled_logprobs}, args.batch_file)
    return {"seconds": seconds}


def _learner_rank(rank: int, world: int, port: int, args: argparse.Namespace, threads: int, single_forward: bool,
                  out: str) -> None:
    import dataclasses

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch

    torch.set_num_threads(threads)
    from tip_ray.learner.worker import LearnerWorker
    from tip_ray.tip.signal import TeacherSignal
    from tip_ray.types import TrainBatch

    cfg = compose_config(args)
    learner = dataclasses.replace(cfg.learner, world_size=world, single_forward=single_forward)
    worker = LearnerWorker(learner, cfg.selection, cfg.loss)
    data = torch.load(args.batch_file)
    signal = TeacherSignal(data["topk_ids"], data["topk_logprobs"], data["sampled_logprobs"])
    full = TrainBatch(data["input_ids"], data["attention"], data["loss_mask"], signal)
    per_rank = full.size // world
    batch = full.rows(rank * per_rank, (rank + 1) * per_rank)
    seconds = _median_seconds(lambda: worker.train_step(batch), args.repeats)
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": seconds}))
    worker.close()


def case_learner(args: argparse.Namespace, world: int, threads: int, single_forward: bool) -> dict:
    """One learner step on the whole batch: ``world`` gloo ranks with ``threads`` threads each."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"{args.batch_file}.learner.json"
    mp.start_processes(_learner_rank, args=(world, port, args, threads, single_forward, out), nprocs=world,
                       join=True, start_method="spawn")
    return json.loads(Path(out).read_text())


CASES = {
    "rollout, 1 thread": ("rollout", {"threads": 1, "logprobs": False}),
    "rollout, 1 thread, with log-probs": ("rollout", {"threads": 1, "logprobs": True}),
    "rollout, 2 threads": ("rollout", {"threads": 2, "logprobs": False}),
    "teacher, 1 thread": ("teacher", {"threads": 1}),
    "teacher, 2 threads": ("teacher", {"threads": 2}),
    "learner, 1 rank x 2 threads, single forward": ("learner", {"world": 1, "threads": 2, "single_forward": True}),
    "learner, 2 ranks x 1 thread, single forward": ("learner", {"world": 2, "threads": 1, "single_forward": True}),
    "learner, 2 ranks x 1 thread, two passes": ("learner", {"world": 2, "threads": 1, "single_forward": False}),
}


def main() -> int:
    """Run every case in its own process (the batch file passes the rollouts and the signal along)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="runs/embedded/student")
    parser.add_argument("--teacher", default="runs/embedded/teacher")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--tag", default="")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--batch-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        kind, params = CASES[args.case]
        result = {"rollout": case_rollout, "teacher": case_teacher, "learner": case_learner}[kind](args, **params)
        print("RESULT " + json.dumps(result))
        return 0
    for path in (args.student, args.teacher):
        if not (ROOT / path / "config.json").is_file():
            raise SystemExit(f"{path} is missing: run `tip-ray prepare-demo` (or bench/scaled_pair.py) first")
    name = "phase_costs" + (f"-{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    batch_file = RESULTS / f"{name}.batch.pt"
    results = {}
    for case in CASES:
        print(f"  {case} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--case", case, "--batch-file", str(batch_file), "--student", args.student,
               "--teacher", args.teacher, "--prompts", str(args.prompts), "--max-new-tokens",
               str(args.max_new_tokens), "--repeats", str(args.repeats)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:
            raise SystemExit(f"case {case!r} failed:\n" + "\n".join(done.stderr.splitlines()[-30:]))
        results[case] = json.loads(line[len("RESULT "):])
    tokens = results["rollout, 1 thread"]["response_tokens"]

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"phase costs in-process, {args.student} <- {args.teacher}: {args.prompts} prompts, "
                        f"{tokens} response tokens, median of {args.repeats}")
    for column in ("case", "seconds", "ms per response token"):
        table.add_column(column, justify="right")
    for case, result in results.items():
        table.add_row(case, f"{result['seconds']:.3f}", f"{1000 * result['seconds'] / tokens:.3f}")
    Console(width=None if sys.stdout.isatty() else 140).print(table)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps({"student": args.student, "teacher": args.teacher, "prompts": args.prompts,
                               "response_tokens": tokens, "repeats": args.repeats,
                               "load_average": os.getloadavg()[0], "cases": results}, indent=2))
    batch_file.unlink(missing_ok=True)
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
