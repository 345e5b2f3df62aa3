"""``tip-ray sweep``: the selection-rule sweep, one ``tip-ray train`` subprocess per (arm, seed).

Each run gets the same overrides (the same steps, prompts per step and rollouts), its arm's
selection settings, its seed on every seeded component, and its own output directory
``<root>/<arm>/seed<k>/``. Runs go seed by seed (every arm for seed 0, then seed 1, ...) so that a
partial sweep already compares every arm.

Running the sweep again continues it. A run is finished once its ``summary.json`` reports its
last step (``tip-ray train`` also writes one when a signal stops it early): it is skipped. An
unfinished run whose directory holds a complete checkpoint (``<run>/checkpoints``, the default
``checkpoint.dir``; written every ``checkpoint.every`` steps and when the run is stopped) is run
again with the same command, and ``tip-ray train`` resumes it
from its newest checkpoint (the default ``checkpoint.resume=auto``); the trainer
cuts ``metrics.jsonl`` back to that step, so the steps after it are not logged twice, and refuses
to resume if an override changed the run's identity (``tip_ray.state.resume``). An unfinished run
without a checkpoint starts again in an empty directory: its old one is moved aside to
``<root>/<arm>/stale-seed<k>-<time>`` (removed only if empty; a name that ``tip-ray report``'s
``<arm>/seed*`` never reads), never deleted with the user's files.

Stopping a run (``--timeout``, or a Ctrl-C or SIGTERM of the sweep) sends the trainer one SIGTERM:
it finishes the step in flight, writes a checkpoint and a summary, and exits. The sweep waits up
to ``grace`` seconds for that, then kills the trainer's process group. The trainer runs in a
session of its own, so a Ctrl-C in the terminal reaches only the sweep (a second signal to the
trainer would make it stop at once, without its checkpoint); a second Ctrl-C of the sweep kills at
once. A stopped sweep does not go on to the next run.

Next to each run's files, ``sweep_run.json`` records the command, its exit status, the number of
attempts and their total wall time (a resumed run redoes the steps after its checkpoint) and the
machine's CPU count; ``train.log`` holds the output of every attempt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tip_ray.state.checkpoint_store import RUN_CHECKPOINTS, CheckpointStore

# Every seed the training run reads: the prompt order, the rollout sampling, the sampled
# selection rules and the learner's initialisation (torch.manual_seed).
SEED_KEYS = ("data.seed", "rollout.seed", "selection.seed", "learner.seed")
DEFAULT_ROCK_FILE = "runs/embedded/rocks.json"
# Seconds a stopped trainer gets to finish its step in flight (an evaluation may follow it) and
# write its checkpoint before it is killed.
DEFAULT_GRACE = 120.0


def run_finished(run_dir: str | Path) -> bool:
    """Whether the training run in ``run_dir`` wrote its ``summary.json`` at its last step
    (``trainer.steps`` of its ``config.json``): a run stopped early by a signal also writes one."""
    run_dir = Path(run_dir)
    summary = _read_json(run_dir / "summary.json")
    if summary is None:
        return False
    planned = (_read_json(run_dir / "config.json") or {}).get("trainer", {}).get("steps")
    reached = summary.get("steps")
    return planned is None or reached is None or reached >= planned


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
                 "trainer.output_dir", *SEED_KEYS,
                 "trainer.seed")  # older sweeps set it too (the training loop draws nothing at random)


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
        """Whether the run reached its last step (``run_finished``)."""
        return run_finished(self.run_dir)

    @property
    def checkpoint_step(self) -> int | None:
        """The step of the newest complete checkpoint in the run's directory, which ``tip-ray
        train`` resumes from, or None."""
        point = CheckpointStore(self.run_dir / RUN_CHECKPOINTS).latest()
        return None if point is None else point.step


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if it is missing or unreadable."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


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
    """How a run of the sweep ended: ``finished``, ``skipped`` (already finished) or ``failed``
    (including a run that was stopped: ``stopped`` says why, ``timeout`` or ``signal``)."""

    run: PlannedRun
    status: str
    seconds: float
    resumed_from: int | None = None  # the checkpoint step the run continued from
    stopped: str | None = None


class SweepStopped(Exception):
    """A Ctrl-C or SIGTERM of the sweep stopped the run in flight (``outcome``)."""

    def __init__(self, outcome: RunOutcome):
        super().__init__(f"{outcome.run.arm.name}/seed{outcome.run.seed} stopped by a signal")
        self.outcome = outcome


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, a SIGTERM or SIGINT of this process raises KeyboardInterrupt, so both
    stop the run in flight the same way. SIGINT is handled explicitly too: a process started in
    the background of a non-interactive shell inherits SIGINT ignored, and Python then installs
    no Ctrl-C handler of its own. Signal handlers can only be set in the main thread: elsewhere
    this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def train_command(run: PlannedRun, python: str = sys.executable) -> list[str]:
    """The ``tip-ray train`` command line of ``run`` (``python -m tip_ray.cli train ...``)."""
    return [python, "-m", "tip_ray.cli", "train", *run.overrides]


def set_aside(run_dir: Path) -> Path | None:
    """Move the directory ``run_dir`` to a free ``stale-<its name>-<time>`` beside it and return
    that path; an empty directory is removed instead, and a missing one left alone (None both times)."""
    if not run_dir.is_dir():
        return None
    if not any(run_dir.iterdir()):
        run_dir.rmdir()
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"stale-{run_dir.name}-{stamp}")
    attempt = 1
    while target.exists():
        attempt += 1
        target = run_dir.with_name(f"stale-{run_dir.name}-{stamp}-{attempt}")
    run_dir.rename(target)
    return target


def _write_record(run: PlannedRun, command: list[str], code: int, seconds: float,
                  resumed_from: int | None) -> None:
    """Write ``sweep_run.json``: this attempt's command and exit status, and the attempts and wall
    time of the run so far (those of the attempts before it count when it resumed)."""
    path = run.run_dir / "sweep_run.json"
    earlier = (_read_json(path) or {}) if resumed_from is not None else {}
    record = {"command": command, "returncode": code,
              "wall_seconds": round(float(earlier.get("wall_seconds", 0.0)) + seconds, 2),
              "attempts": int(earlier.get("attempts", 1 if earlier else 0)) + 1, "resumed_from_step": resumed_from,
              "arm": run.arm.name, "seed": run.seed, "machine": {"cpus": os.cpu_count()}}
    path.write_text(json.dumps(record, indent=2) + "\n")


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group ``proc`` leads (its own session: the trainer and what it started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def stop_process(proc: subprocess.Popen, grace: float, note: Callable[[str], None]) -> int:
    """Send ``proc`` one SIGTERM and wait up to ``grace`` seconds for it to exit (the trainer
    finishes its step and writes a checkpoint), then kill its process group; a Ctrl-C while
    waiting kills at once. Returns its exit status."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        note(f"still running {grace:g} s after SIGTERM: killed")
    except KeyboardInterrupt:
        note("interrupted again: killed")
    _kill_group(proc)
    return proc.wait()


def _wait(proc: subprocess.Popen, timeout: float | None, grace: float,
          note: Callable[[str], None]) -> tuple[int, str | None]:
    """Wait for the trainer ``proc``; at the ``timeout`` or a Ctrl-C, stop it (``stop_process``).
    Returns its exit status and why it was stopped (None, ``timeout`` or ``signal``)."""
    try:
        return proc.wait(timeout=timeout), None
    except subprocess.TimeoutExpired:
        why, text = "timeout", f"timeout after {timeout:g} s"
    except KeyboardInterrupt:
        why, text = "signal", "the sweep was interrupted"
    note(f"{text}: SIGTERM sent, waiting up to {grace:g} s for the trainer's stop-time checkpoint")
    return stop_process(proc, grace, note), why


def execute(run: PlannedRun, python: str = sys.executable, timeout: float | None = None,
            grace: float = DEFAULT_GRACE) -> RunOutcome:
    """Run one training subprocess (output appended to ``<run_dir>/train.log``) unless the run has
    finished: from its newest checkpoint if its directory holds one (the trainer resumes it), else
    from scratch in a fresh directory (an old one is moved aside by ``set_aside``).

    At the ``timeout`` the trainer is stopped with a SIGTERM and ``grace`` seconds to write its
    checkpoint (``stop_process``); a Ctrl-C does the same and then raises ``SweepStopped``."""
    if run.finished:
        return RunOutcome(run, "skipped", 0.0)
    resumed_from = run.checkpoint_step
    if resumed_from is None:
        set_aside(run.run_dir)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    command = train_command(run, python)
    started = time.perf_counter()
    with (run.run_dir / "train.log").open("a") as log:

        def note(text: str) -> None:
            log.write(f"\n[tip-ray sweep] {text}\n")
            log.flush()

        if resumed_from is not None:
            note(f"resuming from the checkpoint of step {resumed_from}")
        # A session of its own: a terminal's Ctrl-C reaches the sweep only, which sends one SIGTERM.
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        code, stopped = _wait(proc, timeout, grace, note)
    seconds = time.perf_counter() - started
    _write_record(run, command, code, seconds, resumed_from)
    outcome = RunOutcome(run, "finished" if code == 0 and run.finished else "failed", seconds, resumed_from, stopped)
    if stopped == "signal":
        raise SweepStopped(outcome)
    return outcome


def _accuracy_line(run: PlannedRun) -> str:
    summary = _read_json(run.run_dir / "summary.json")
    if summary is None:
        return ""
    before, after = summary.get("accuracy_before"), summary.get("accuracy_after")
    if before is None or after is None:
        return ""
    return f"accuracy {100 * before:.1f}% -> {100 * after:.1f}%"


def _progress_line(outcome: RunOutcome) -> str:
    """What became of an executed run: its accuracy, or why it stopped and where it resumes."""
    run = outcome.run
    if outcome.status == "finished":
        return _accuracy_line(run)
    if outcome.stopped is None:
        return f"FAILED, see {run.run_dir / 'train.log'}"
    why = "at the timeout" if outcome.stopped == "timeout" else "by a signal"
    step = run.checkpoint_step
    where = "no checkpoint: it starts again" if step is None else f"resumes from the checkpoint of step {step}"
    return f"stopped {why} ({where} when the sweep runs again)"


def run_sweep(runs: Sequence[PlannedRun], python: str = sys.executable, timeout: float | None = None,
              echo: Callable[[str], None] | None = None, grace: float = DEFAULT_GRACE) -> list[RunOutcome]:
    """Execute ``runs`` in order, printing one progress line per run (with an estimate of the
    time left from the runs executed so far); returns every outcome. A Ctrl-C or SIGTERM stops
    the run in flight (``execute``) and ends the sweep there."""
    echo = echo or (lambda line: print(line, flush=True))
    outcomes: list[RunOutcome] = []
    executed: list[float] = []
    with sigterm_interrupts():
        for i, run in enumerate(runs, 1):
            label = f"[{i}/{len(runs)}] {run.arm.name}/seed{run.seed}"
            if not run.finished:
                step = run.checkpoint_step
                doing = "running" if step is None else f"resuming from the checkpoint of step {step}"
                echo(f"{label} {doing} ... (log: {run.run_dir / 'train.log'})")
            try:
                outcome = execute(run, python, timeout, grace)
            except SweepStopped as stop:
                outcomes.append(stop.outcome)
                echo(f"{label} {_progress_line(stop.outcome)}; the sweep stops here")
                break
            outcomes.append(outcome)
            if outcome.status == "skipped":
                echo(f"{label} already finished, skipped")
                continue
            executed.append(outcome.seconds)
            left = sum(1 for r in runs[i:] if not r.finished)
            eta = left * sum(executed) / len(executed)
            echo(f"{label} {outcome.status} in {outcome.seconds:.0f} s {_progress_line(outcome)}; {left} left, "
                 f"about {eta / 60:.0f} min")
    return outcomes
