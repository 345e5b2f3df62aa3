"""``tip-ray sweep``: the selection-rule sweep, one ``tip-ray train`` subprocess per (arm, seed).

Each run gets the same overrides (the same steps, prompts per step and rollouts), its arm's
selection settings, its seed on every seeded component, and its own output directory
``<root>/<arm>/seed<k>/``. A run whose ``summary.json`` exists is finished and skipped, so an
interrupted sweep resumes where it stopped; a run directory without one is cleared and run
again (the metrics file is appended to, so a half-written one would mix two attempts).
Runs go seed by seed (every arm for seed 0, then seed 1, ...) so that a partial sweep already
compares every arm. Next to each run's files, ``sweep_run.json`` records the command, its exit
status and wall time; ``train.log`` holds its output.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Every seed the training run reads: the prompt order, the rollout sampling, the sampled
# selection rules, the learner's initialisation (torch.manual_seed) and the trainer's own.
SEED_KEYS = ("data.seed", "rollout.seed", "selection.seed", "learner.seed", "trainer.seed")
DEFAULT_ROCK_FILE = "runs/embedded/rocks.json"


@dataclass(frozen=True)
class Arm:
    """One configuration of the sweep: a rule at a retention ratio (None for ``rock_freeze``,
    which weights tokens instead of keeping a budget), optionally the bottom-scored ablation."""

    name: str
    rule: str
    ratio: float | None
    direction: str = "top"

    @property
    def needs_rocks(self) -> bool:
        """Whether the arm reads a rock file."""
        return self.rule == "rock_freeze"

    def overrides(self, rock_file: str | None) -> list[str]:
        """The Hydra overrides of the arm's selection settings."""
        ratio = "null" if self.ratio is None else repr(self.ratio)
        out = [f"selection.rule={self.rule}", f"selection.ratio={ratio}", f"selection.direction={self.direction}"]
        if self.needs_rocks:
            if not rock_file:
                raise ValueError(f"sweep arm {self.name!r} needs a rock file: build one with `tip-ray rocks` and "
                                 "pass --rock-file, or leave the arm out with --arms")
            out.append(f"selection.rock_file={rock_file}")
        return out


DEFAULT_ARMS: tuple[Arm, ...] = (
    Arm("all_100", "all", 1.0),
    Arm("entropy_topk_50", "entropy_topk", 0.5),
    Arm("entropy_sample_50", "entropy_sample", 0.5),
    Arm("soft_or_50", "soft_or", 0.5),
    Arm("soft_or_20", "soft_or", 0.2),
    Arm("soft_or_bottom_50", "soft_or", 0.5, "bottom"),
    Arm("overconfident_10", "overconfident", 0.1),
    Arm("teachable_10", "teachable", 0.1),
    Arm("random_50", "random", 0.5),
    Arm("random_10", "random", 0.1),
    Arm("rock_freeze", "rock_freeze", None),
)


def arms_by_name(names: Sequence[str] | None) -> list[Arm]:
    """The arms called ``names`` (all of ``DEFAULT_ARMS`` for None), in the order given."""
    if names is None:
        return list(DEFAULT_ARMS)
    known = {arm.name: arm for arm in DEFAULT_ARMS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown sweep arm(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[n] for n in names]


_PER_RUN_KEYS = ("selection.rule", "selection.ratio", "selection.direction", "selection.rock_file",
                 "trainer.output_dir", *SEED_KEYS)


def is_per_run(override: str) -> bool:
    """Whether a Hydra override sets a key the sweep sets per arm and seed."""
    return override.lstrip("+~").split("=", 1)[0] in _PER_RUN_KEYS


@dataclass(frozen=True)
class PlannedRun:
    """One training run of the sweep: its arm, seed, directory and full override list."""

    arm: Arm
    seed: int
    run_dir: Path
    overrides: tuple[str, ...]

    @property
    def finished(self) -> bool:
        """A finished run has written its ``summary.json``."""
        return (self.run_dir / "summary.json").is_file()


def plan(arms: Sequence[Arm], seeds: Sequence[int], root: str | Path, common: Sequence[str] = (),
         rock_file: str | None = None) -> list[PlannedRun]:
    """Every (arm, seed) run, seed-major, each with ``common`` overrides first, then its arm's
    selection, its seeds and its output directory (so those cannot be overridden by accident)."""
    if not arms or not seeds:
        raise ValueError("a sweep needs at least one arm and one seed")
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be distinct non-negative integers, got {list(seeds)}")
    clash = [o for o in common if is_per_run(o)]
    if clash:
        raise ValueError(f"the sweep sets {', '.join(clash)} itself (per arm and seed); drop them from the overrides")
    if any(arm.needs_rocks for arm in arms) and rock_file:
        if not Path(rock_file).is_file():
            raise ValueError(f"rock file {rock_file} does not exist: build it with `tip-ray rocks --out {rock_file}`, "
                             "or leave rock_freeze out with --arms")
        rock_file = str(Path(rock_file).resolve())  # the learner actors read it
    root = Path(root)
    runs = []
    for seed in seeds:
        for arm in arms:
            run_dir = root / arm.name / f"seed{seed}"
            overrides = (*common, *arm.overrides(rock_file), *(f"{k}={seed}" for k in SEED_KEYS),
                         f"trainer.output_dir={run_dir}")
            runs.append(PlannedRun(arm, seed, run_dir, overrides))
    return runs


@dataclass(frozen=True)
class RunOutcome:
    """How a run of the sweep ended: ``finished``, ``skipped`` (already finished) or ``failed``."""

    run: PlannedRun
    status: str
    seconds: float


def train_command(run: PlannedRun, python: str = sys.executable) -> list[str]:
    """The ``tip-ray train`` command line of ``run`` (``python -m tip_ray.cli train ...``)."""
    return [python, "-m", "tip_ray.cli", "train", *run.overrides]


def execute(run: PlannedRun, python: str = sys.executable, timeout: float | None = None) -> RunOutcome:
    """Run one training subprocess (output to ``<run_dir>/train.log``) unless it has finished."""
    if run.finished:
        return RunOutcome(run, "skipped", 0.0)
    if run.run_dir.exists():
        shutil.rmtree(run.run_dir)
    run.run_dir.mkdir(parents=True)
    command = train_command(run, python)
    started = time.perf_counter()
    with (run.run_dir / "train.log").open("w") as log:
        try:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = -1
    seconds = time.perf_counter() - started
    record = {"command": command, "returncode": code, "wall_seconds": round(seconds, 2), "arm": run.arm.name,
              "seed": run.seed}
    (run.run_dir / "sweep_run.json").write_text(json.dumps(record, indent=2) + "\n")
    return RunOutcome(run, "finished" if code == 0 and run.finished else "failed", seconds)


def _accuracy_line(run: PlannedRun) -> str:
    try:
        summary = json.loads((run.run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return ""
    before, after = summary.get("accuracy_before"), summary.get("accuracy_after")
    if before is None or after is None:
        return ""
    return f"accuracy {100 * before:.1f}% -> {100 * after:.1f}%"


def run_sweep(runs: Sequence[PlannedRun], python: str = sys.executable, timeout: float | None = None,
              echo=None) -> list[RunOutcome]:
    """Execute ``runs`` in order, printing one progress line per run (with an estimate of the
    time left from the runs executed so far); returns every outcome."""
    echo = echo or (lambda line: print(line, flush=True))
    outcomes: list[RunOutcome] = []
    executed: list[float] = []
    for i, run in enumerate(runs, 1):
        label = f"[{i}/{len(runs)}] {run.arm.name}/seed{run.seed}"
        if not run.finished:
            echo(f"{label} running ... (log: {run.run_dir / 'train.log'})")
        outcome = execute(run, python, timeout)
        outcomes.append(outcome)
        if outcome.status == "skipped":
            echo(f"{label} already finished, skipped")
            continue
        executed.append(outcome.seconds)
        left = sum(1 for r in runs[i:] if not r.finished)
        eta = left * sum(executed) / len(executed)
        detail = _accuracy_line(run) if outcome.status == "finished" else f"FAILED, see {run.run_dir / 'train.log'}"
        echo(f"{label} {outcome.status} in {outcome.seconds:.0f} s {detail}; {left} left, about {eta / 60:.0f} min")
    return outcomes
