"""Throughput of the embedded default as the rollout and teacher pools grow (issue: independent pool scaling).

Runs `tip-ray train` on the embedded pair for a few steps in each pool configuration, one process
per case, in one bench run: 1 or 2 rollout actors x 1 or 2 teacher actors, nothing else changed
(the driver shards every batch over however many actors there are). Reports response tokens per
second (median over the steps after the first, which includes start-up effects) and seconds per
step by phase, and each case's throughput as a ratio to the 1 x 1 case.

Usage:
    python bench/pool_scaling.py                 # 12 steps per case
    python bench/pool_scaling.py --steps 30 --prompts 64
Needs `tip-ray prepare-demo` (run first if runs/embedded is missing). Prints a table and writes
bench/results/pool_scaling.json (run directories under bench/results/pool_scaling/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORKDIR = RESULTS / "pool_scaling"
CASES = ((1, 1), (2, 1), (1, 2), (2, 2))
PHASES = ("rollout", "teacher", "learner", "sync")


def run_case(rollout: int, teacher: int, steps: int, prompts: int) -> dict:
    """One `tip-ray train` run with ``rollout`` rollout and ``teacher`` teacher actors; its per-step numbers."""
    run_dir = WORKDIR / f"rollout{rollout}-teacher{teacher}"
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "tip_ray.cli", "train", f"rollout.num_workers={rollout}",
               f"teacher.num_workers={teacher}", f"trainer.steps={steps}", f"trainer.prompts_per_step={prompts}",
               f"learner.global_batch_size={prompts}", "eval_data=null", "trainer.eval_teacher=false",
               "logger.wandb=false", f"cluster.num_cpus={2 + rollout + teacher}", f"trainer.output_dir={run_dir}",
               "checkpoint.resume=never"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"case rollout={rollout} teacher={teacher} failed:\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if "loss" in r][1:]
    return {
        "rollout_actors": rollout, "teacher_actors": teacher, "steps": steps, "prompts_per_step": prompts,
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in steady),
        **{f"{p}_s": statistics.median(r[f"time/{p}"] for r in steady) for p in PHASES},
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    """Run every case, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=32, help="prompts per step (= learner global batch)")
    args = parser.parse_args()
    if not (ROOT / "runs" / "embedded" / "student").exists():
        subprocess.run([sys.executable, "-m", "tip_ray.cli", "prepare-demo"], cwd=ROOT, check=True)
    WORKDIR.mkdir(parents=True, exist_ok=True)
    cases = [run_case(r, t, args.steps, args.prompts) for r, t in CASES]
    base = cases[0]["tokens_per_second"]

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pool scaling, embedded default ({args.prompts} prompts/step, median of steps 2..{args.steps})")
    for column in ("rollout x teacher", "tokens/s", "vs 1x1", *(f"{p} s" for p in PHASES)):
        table.add_column(column, justify="right")
    for c in cases:
        table.add_row(f"{c['rollout_actors']} x {c['teacher_actors']}", f"{c['tokens_per_second']:.0f}",
                      f"{c['tokens_per_second'] / base:.2f}", *(f"{c[f'{p}_s']:.3f}" for p in PHASES))
    Console().print(table)
    out = RESULTS / "pool_scaling.json"
    out.write_text(json.dumps({"cases": cases, "machine_cpus": __import__("os").cpu_count()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
