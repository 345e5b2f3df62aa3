"""The sweep's plan: arms, seeds on every seeded key, directories, resumption, bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tip_ray.cli import compose
from tip_ray.experiments.sweep import (
    CHECKPOINTS,
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
from tip_ray.state.checkpoint_store import CheckpointStore


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
        assert (cfg.data.seed, cfg.rollout.seed, cfg.selection.seed, cfg.learner.seed, cfg.trainer.seed) == (3,) * 5
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
    store = CheckpointStore(run.run_dir / CHECKPOINTS)
    tmp = store.begin(step)
    (tmp / "learner").mkdir()
    (tmp / "learner" / "shard.pt").write_bytes(b"weights")
    store.finish(tmp, step, {"step": step})


@pytest.fixture
def trainer(monkeypatch):
    """A fake ``tip-ray train``: records each command and what the run directory held when it
    started, then finishes the run (its summary at the last step)."""
    calls: list[tuple[list[str], set[str]]] = []

    def run(command, stdout, stderr, timeout):
        out = Path(next(a for a in command if a.startswith("trainer.output_dir=")).split("=", 1)[1])
        calls.append((command, {p.name for p in out.iterdir()}))
        (out / "summary.json").write_text(json.dumps({"steps": 4}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_an_unfinished_run_with_a_checkpoint_resumes_with_the_same_command(tmp_path, trainer):
    run = one_run(tmp_path)
    (run.run_dir / "summary.json").write_text(json.dumps({"steps": 2}))  # a signal stopped it after step 2
    (run.run_dir / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    (run.run_dir / "train.log").write_text("first attempt\n")
    (run.run_dir / "sweep_run.json").write_text(json.dumps({"returncode": -9, "wall_seconds": 10.0}))
    checkpoint(run, 2)
    assert not run.finished and run.checkpoint_step == 2
    lines: list[str] = []
    (outcome,) = run_sweep([run], python="py", echo=lines.append)
    assert outcome.status == "finished" and outcome.resumed_from == 2
    assert "resuming from the checkpoint of step 2" in lines[0]
    ((command, seen),) = trainer
    assert command == train_command(run, "py")  # the trainer resumes on its own (checkpoint.resume=auto)
    assert {CHECKPOINTS, "metrics.jsonl", "config.json"} <= seen  # nothing of the run was cleared
    log = (run.run_dir / "train.log").read_text()
    assert log.startswith("first attempt\n") and "resuming from the checkpoint of step 2" in log
    record = json.loads((run.run_dir / "sweep_run.json").read_text())
    assert record["attempts"] == 2 and record["resumed_from_step"] == 2 and record["wall_seconds"] >= 10.0
    assert run.finished and execute(run, python="/nonexistent/python").status == "skipped"


def test_an_unfinished_run_without_a_checkpoint_is_moved_aside_and_run_again(tmp_path, trainer):
    run = one_run(tmp_path)
    (run.run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run.run_dir / CHECKPOINTS / ".tmp-step_00000002-1").mkdir(parents=True)  # a save cut short
    assert run.checkpoint_step is None
    outcome = execute(run, python="py")
    assert outcome.status == "finished" and outcome.resumed_from is None
    assert trainer[0][1] == {"train.log"}  # a fresh directory
    (stale,) = run.run_dir.parent.glob("stale-seed0-*")
    assert (stale / "metrics.jsonl").read_text() == '{"step": 1}\n' and (stale / CHECKPOINTS).is_dir()
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
