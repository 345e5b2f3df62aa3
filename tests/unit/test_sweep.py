"""The sweep's plan: arms, seeds on every seeded key, directories, resumption, bad input."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tip_ray.cli import compose
from tip_ray.experiments.sweep import (
    DEFAULT_ARMS,
    SEED_KEYS,
    PlannedRun,
    arms_by_name,
    execute,
    plan,
    run_sweep,
    set_aside,
    train_command,
)
from tip_ray.state.checkpoint_store import RUN_CHECKPOINTS, CheckpointStore


def test_the_default_arms_are_the_issue_list():
    got = {(a.rule, a.ratio, a.direction) for a in DEFAULT_ARMS}
    assert got == {("all", 1.0, "top"), ("entropy_topk", 0.5, "top"), ("entropy_sample", 0.5, "top"),
                   ("soft_or", 0.5, "top"), ("soft_or", 0.2, "top"), ("soft_or", 0.5, "bottom"),
                   ("overconfident", 0.1, "top"), ("teachable", 0.1, "top"), ("random", 0.5, "top"),
                   ("random", 0.1, "top"), ("rock_freeze", None, "top")}
    assert len({a.name for a in DEFAULT_ARMS}) == len(DEFAULT_ARMS)


def test_plan_is_seed_major_with_every_seed_key_and_its_own_directory(tmp_path):
    rocks = tmp_path / "rocks.json"
    rocks.write_text("{}")
    runs = plan(DEFAULT_ARMS, [0, 1, 2], tmp_path / "sweep", ["trainer.steps=7"], str(rocks))
    assert len(runs) == 33
    assert [r.seed for r in runs[:11]] == [0] * 11 and runs[11].seed == 1
    assert len({r.run_dir for r in runs}) == 33
    run = next(r for r in runs if r.arm.name == "soft_or_bottom_50" and r.seed == 2)
    assert run.run_dir == tmp_path / "sweep" / "soft_or_bottom_50" / "seed2"
    assert run.overrides[0] == "trainer.steps=7"
    for key in SEED_KEYS:
        assert f"{key}=2" in run.overrides
    assert {"selection.rule=soft_or", "selection.ratio=0.5", "selection.direction=bottom",
            f"trainer.output_dir={run.run_dir}"} <= set(run.overrides)
    rock = next(r for r in runs if r.arm.name == "rock_freeze")
    assert f"selection.rock_file={rocks.resolve()}" in rock.overrides and "selection.ratio=null" in rock.overrides
    assert train_command(run, "py")[:4] == ["py", "-m", "tip_ray.cli", "train"]


def test_every_planned_run_composes_into_a_valid_training_config(tmp_path):
    rocks = tmp_path / "rocks.json"
    rocks.write_text("{}")
    for run in plan(DEFAULT_ARMS, [3], tmp_path, ["trainer.steps=7"], str(rocks)):
        cfg = compose("train", list(run.overrides))
        assert cfg.selection.rule == run.arm.rule and cfg.selection.ratio == run.arm.ratio
        assert cfg.selection.direction == run.arm.direction
        assert (cfg.data.seed, cfg.rollout.seed, cfg.selection.seed, cfg.learner.seed) == (3,) * 4
        assert cfg.trainer.output_dir == str(run.run_dir) and cfg.trainer.steps == 7


def test_a_finished_run_is_skipped_without_running(tmp_path):
    (run,) = plan(arms_by_name(["all_100"]), [0], tmp_path)
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "summary.json").write_text("{}")
    assert run.finished
    outcome = execute(run, python="/nonexistent/python")  # would fail if it tried to run
    assert outcome.status == "skipped" and not (run.run_dir / "train.log").exists()


def test_bad_sweeps_are_rejected_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="unknown sweep arm.*nope.*known: all_100"):
        arms_by_name(["all_100", "nope"])
    with pytest.raises(ValueError, match="sets selection.rule=all itself"):
        plan(arms_by_name(["all_100"]), [0], tmp_path, ["selection.rule=all"])
    with pytest.raises(ValueError, match="sets learner.seed=4 itself"):
        plan(arms_by_name(["all_100"]), [0], tmp_path, ["learner.seed=4"])
    with pytest.raises(ValueError, match="distinct non-negative"):
        plan(arms_by_name(["all_100"]), [1, 1], tmp_path)
    with pytest.raises(ValueError, match="needs a rock file"):
        plan(arms_by_name(["rock_freeze"]), [0], tmp_path)
    with pytest.raises(ValueError, match="rock file .*missing.json does not exist: build it with `tip-ray rocks"):
        plan(arms_by_name(["rock_freeze"]), [0], tmp_path, rock_file=str(tmp_path / "missing.json"))


def one_run(root: Path) -> PlannedRun:
    """The sweep's single run of ``all_100`` at seed 0 under ``root``, its directory holding the
    config.json of a 4-step run (as ``tip-ray train`` writes it first)."""
    (run,) = plan(arms_by_name(["all_100"]), [0], root)
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.json").write_text(json.dumps({"trainer": {"steps": 4}}))
    return run


def checkpoint(run: PlannedRun, step: int) -> None:
    """A complete checkpoint of ``step`` where ``tip-ray train`` keeps the run's checkpoints."""
    store = CheckpointStore(run.run_dir / RUN_CHECKPOINTS)
    tmp = store.begin(step)
    (tmp / "learner").mkdir()
    (tmp / "learner" / "shard.pt").write_bytes(b"weights")
    store.finish(tmp, step, {"step": step})


def fake_python(path: Path, body: str) -> str:
    """An executable standing in for ``python`` in ``python -m tip_ray.cli train <overrides>``: it
    runs ``body`` with ``out`` (the run directory, from trainer.output_dir) and ``argv`` set."""
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent("""\
        import json, signal, sys, time
        from pathlib import Path
        argv = sys.argv
        out = Path(next(a for a in argv if a.startswith("trainer.output_dir=")).split("=", 1)[1])
        """) + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def trainer(tmp_path):
    """A stand-in ``tip-ray train`` (a real process): records its command and what the run
    directory held when it started in ``seen.json``, then finishes the run (its summary at the
    last step)."""
    return fake_python(tmp_path / "finishing-python", """\
        seen = {"command": argv, "files": sorted(p.name for p in out.iterdir())}
        (out / "seen.json").write_text(json.dumps(seen))
        (out / "summary.json").write_text(json.dumps({"steps": 4}))
        """)


def seen(run: PlannedRun) -> tuple[list[str], set[str]]:
    """The command the stand-in trainer got and the files of the run directory when it started."""
    record = json.loads((run.run_dir / "seen.json").read_text())
    return record["command"], set(record["files"])


def test_an_unfinished_run_with_a_checkpoint_resumes_with_the_same_command(tmp_path, trainer):
    run = one_run(tmp_path)
    (run.run_dir / "summary.json").write_text(json.dumps({"steps": 2}))  # a signal stopped it after step 2
    (run.run_dir / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    (run.run_dir / "train.log").write_text("first attempt\n")
    (run.run_dir / "sweep_run.json").write_text(json.dumps({"returncode": -9, "wall_seconds": 10.0}))
    checkpoint(run, 2)
    assert not run.finished and run.checkpoint_step == 2
    lines: list[str] = []
    (outcome,) = run_sweep([run], python=trainer, echo=lines.append)
    assert outcome.status == "finished" and outcome.resumed_from == 2
    assert "resuming from the checkpoint of step 2" in lines[0]
    command, files = seen(run)
    assert command == train_command(run, trainer)  # the trainer resumes on its own (checkpoint.resume=auto)
    assert {RUN_CHECKPOINTS, "metrics.jsonl", "config.json"} <= files  # nothing of the run was cleared
    log = (run.run_dir / "train.log").read_text()
    assert log.startswith("first attempt\n") and "resuming from the checkpoint of step 2" in log
    record = json.loads((run.run_dir / "sweep_run.json").read_text())
    assert record["attempts"] == 2 and record["resumed_from_step"] == 2 and record["wall_seconds"] >= 10.0
    assert run.finished and execute(run, python="/nonexistent/python").status == "skipped"


def test_an_unfinished_run_without_a_checkpoint_is_moved_aside_and_run_again(tmp_path, trainer):
    run = one_run(tmp_path)
    (run.run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run.run_dir / RUN_CHECKPOINTS / ".tmp-step_00000002-1").mkdir(parents=True)  # a save cut short
    assert run.checkpoint_step is None
    outcome = execute(run, python=trainer)
    assert outcome.status == "finished" and outcome.resumed_from is None
    assert seen(run)[1] == {"train.log"}  # a fresh directory
    (stale,) = run.run_dir.parent.glob("stale-seed0-*")
    assert (stale / "metrics.jsonl").read_text() == '{"step": 1}\n' and (stale / RUN_CHECKPOINTS).is_dir()
    assert json.loads((run.run_dir / "sweep_run.json").read_text())["attempts"] == 1


def test_set_aside_keeps_every_stale_directory_and_removes_only_empty_ones(tmp_path):
    run_dir = tmp_path / "seed0"
    assert set_aside(run_dir) is None  # nothing there
    run_dir.mkdir()
    assert set_aside(run_dir) is None and not run_dir.exists()  # empty: removed
    moved = []
    for attempt in range(2):  # twice within the same second: two names
        run_dir.mkdir()
        (run_dir / "train.log").write_text(f"attempt {attempt}")
        moved.append(set_aside(run_dir))
    assert len(set(moved)) == 2 and not run_dir.exists()
    assert sorted(p.read_text() for p in tmp_path.glob("stale-seed0-*/train.log")) == ["attempt 0", "attempt 1"]


# A stand-in trainer that handles SIGTERM/SIGINT as `tip-ray train` does: it records each signal,
# then (``{after}``) finishes its step, checkpoints and exits, or ignores the signal.
SIGNALLED = """\
    import os
    got = []

    def on_signal(signum, _frame):
        got.append(signum)
        (out / "signals.json").write_text(json.dumps(got))

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    (out / "config.json").write_text(json.dumps({{"trainer": {{"steps": 4}}}}))  # as the trainer writes it first
    (out / "started.json").write_text(json.dumps({{"pid": os.getpid(), "own_group": os.getpgrp() == os.getpid()}}))
    deadline = time.monotonic() + 60
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    {after}
    """
CHECKPOINT_AND_EXIT = """time.sleep(0.3)  # the step in flight
    from tip_ray.state.checkpoint_store import CheckpointStore
    store = CheckpointStore(out / "checkpoints")
    tmp = store.begin(2)
    (tmp / "learner").mkdir()
    store.finish(tmp, 2, {"step": 2})
    (out / "summary.json").write_text(json.dumps({"steps": 2}))"""
IGNORE = """import subprocess
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (out / "child.json").write_text(json.dumps(child.pid))
    while True:
        time.sleep(0.02)"""


def signals(run: PlannedRun) -> list[int]:
    """The signals the stand-in trainer received, in order."""
    return json.loads((run.run_dir / "signals.json").read_text())


def test_a_timeout_sends_one_sigterm_and_waits_for_the_stop_time_checkpoint(tmp_path, trainer):
    run = one_run(tmp_path)
    python = fake_python(tmp_path / "stopping-python", SIGNALLED.format(after=CHECKPOINT_AND_EXIT))
    outcome = execute(run, python=python, timeout=2.0, grace=60.0)
    assert outcome.status == "failed" and outcome.stopped == "timeout"
    assert signals(run) == [signal.SIGTERM]
    assert outcome.seconds < 30  # the trainer exited well within the grace: no wait for all of it
    assert run.checkpoint_step == 2 and not run.finished
    assert json.loads((run.run_dir / "sweep_run.json").read_text())["returncode"] == 0
    assert "timeout after 2 s: SIGTERM sent, waiting up to 60 s" in (run.run_dir / "train.log").read_text()
    lines: list[str] = []
    (again,) = run_sweep([run], python=trainer, echo=lines.append)  # the next sweep resumes it
    assert again.status == "finished" and again.resumed_from == 2 and "checkpoint of step 2" in lines[0]


def test_a_trainer_that_outlives_the_grace_is_killed_with_its_process_group(tmp_path):
    run = one_run(tmp_path)
    python = fake_python(tmp_path / "stubborn-python", SIGNALLED.format(after=IGNORE))
    started = time.perf_counter()
    outcome = execute(run, python=python, timeout=2.0, grace=1.0)
    assert 3.0 <= time.perf_counter() - started < 30
    assert outcome.status == "failed" and outcome.stopped == "timeout" and signals(run) == [signal.SIGTERM]
    assert json.loads((run.run_dir / "sweep_run.json").read_text())["returncode"] == -signal.SIGKILL
    assert "still running 1 s after SIGTERM: killed" in (run.run_dir / "train.log").read_text()
    grandchild = json.loads((run.run_dir / "child.json").read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)  # the kill reached what the trainer started, too


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_ctrl_c_or_sigterm_of_the_sweep_forwards_one_sigterm_and_ends_the_sweep(tmp_path, signum):
    runs = plan(arms_by_name(["all_100", "random_50"]), [0], tmp_path)
    for run in runs:
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "config.json").write_text(json.dumps({"trainer": {"steps": 4}}))
    python = fake_python(tmp_path / "stopping-python", SIGNALLED.format(after=CHECKPOINT_AND_EXIT))
    handler = signal.getsignal(signal.SIGTERM)

    def interrupt_once_started() -> None:
        deadline = time.monotonic() + 60
        while not (runs[0].run_dir / "started.json").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signum)

    threading.Thread(target=interrupt_once_started, daemon=True).start()
    lines: list[str] = []
    outcomes = run_sweep(runs, python=python, echo=lines.append, grace=60.0)
    assert [(o.run.arm.name, o.status, o.stopped) for o in outcomes] == [("all_100", "failed", "signal")]
    # The trainer leads its own process group, so a terminal's Ctrl-C does not reach it directly.
    assert json.loads((runs[0].run_dir / "started.json").read_text())["own_group"]
    assert signals(runs[0]) == [signal.SIGTERM] and runs[0].checkpoint_step == 2
    assert lines[-1].endswith("stopped by a signal (resumes from the checkpoint of step 2 when the sweep runs "
                              "again); the sweep stops here")
    assert not (runs[1].run_dir / "train.log").exists()  # the next run was not started
    assert signal.getsignal(signal.SIGTERM) is handler  # the sweep's SIGTERM handler is gone again
