"""`tip-ray rocks`, `tip-ray sweep` and `tip-ray report` end to end on the shipped embedded pair, tiny."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tip_ray.data.tasks import make_splits, write_jsonl
from tip_ray.experiments.sweep import arms_by_name, plan
from tip_ray.state.checkpoint_store import RUN_CHECKPOINTS, CheckpointStore
from tip_ray.tip.rocks import load_rock_set

pytestmark = [pytest.mark.slow, pytest.mark.heavy]  # each test several training runs: 1-2 minutes
ASSETS = Path(__file__).resolve().parents[2] / "tip_ray" / "embedded" / "assets"
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_API_KEY": ""}


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tip_ray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    train, test = make_splits(0, 64, 16)
    write_jsonl(train, root / "train.jsonl")
    write_jsonl(test, root / "test.jsonl")
    overrides = [f"student={ASSETS / 'student'}", f"teacher.model={ASSETS / 'teacher'}",
                 f"data.path={root / 'train.jsonl'}", f"eval_data.path={root / 'test.jsonl'}", "eval_data.limit=16",
                 "trainer.prompts_per_step=8", "learner.global_batch_size=8", "learner.micro_batch_size=2"]
    return root, overrides


def test_rocks_then_a_resumable_rock_freeze_sweep_then_the_report(setup):
    root, overrides = setup
    rock_file = root / "rocks.json"
    result = cli("rocks", "--out", str(rock_file), "--rollouts", "24", "--num-rocks", "3",
                 "--drop-most-frequent", "2", *overrides)
    assert result.returncode == 0, result.stderr[-4000:]
    rocks = load_rock_set(rock_file)
    assert len(rocks.token_ids) == 3 and len(rocks.dropped_ids) == 2
    assert rocks.provenance["num_rollouts"] == 24 and rocks.provenance["student"] == str(ASSETS / "student")
    assert rocks.num_tokens > 24 and list(rocks.scores) == sorted(rocks.scores, reverse=True)
    assert "3 rocks" in result.stdout

    sweep = ["sweep", "--root", str(root / "runs"), "--arms", "rock_freeze", "--seeds", "0", "--rock-file",
             str(rock_file), *overrides, "trainer.steps=2", "trainer.eval_every=1", "logger.wandb=false"]
    result = cli(*sweep)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    run = root / "runs" / "rock_freeze" / "seed0"
    assert "[1/1] rock_freeze/seed0 finished" in result.stdout
    config = json.loads((run / "config.json").read_text())
    assert config["selection"]["rock_file"] == str(rock_file) and config["learner"]["seed"] == 0
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "kept_tokens" in r]
    assert len(steps) == 2 and all(0 < r["kept_fraction"] < 1 for r in steps)  # the rocks are frozen
    assert json.loads((run / "sweep_run.json").read_text())["returncode"] == 0

    again = cli(*sweep, timeout=60)
    assert again.returncode == 0 and "already finished, skipped" in again.stdout

    report = cli("report", "--root", str(root / "runs"), "--out", str(root / "docs" / "results.md"))
    assert report.returncode == 0, report.stderr[-2000:]
    text = (root / "docs" / "results.md").read_text()
    assert "| rock_freeze | `rock_freeze` | - | 1 |" in text and "holds 3 rocks" in text


def test_a_ctrl_c_of_the_sweep_lets_the_trainer_finish_its_step_and_checkpoint(setup):
    root, overrides = setup
    common = [*overrides, "trainer.steps=40", "trainer.eval_every=0", "logger.wandb=false"]
    sweep = subprocess.Popen([sys.executable, "-m", "tip_ray.cli", "sweep", "--root", str(root / "stopped"), "--seeds",
                              "0", "--arms", "all_100", *common], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=ENV)
    run = root / "stopped" / "all_100" / "seed0"
    deadline = time.monotonic() + 240
    while sweep.poll() is None and time.monotonic() < deadline and '"kept_tokens"' not in _read(run / "metrics.jsonl"):
        time.sleep(0.2)  # a training step is logged: the trainer's fit() handles SIGTERM by now
    sweep.send_signal(signal.SIGINT)  # what a Ctrl-C in the terminal sends the sweep (the trainer has its own)
    out, err = sweep.communicate(timeout=300)
    summary = json.loads((run / "summary.json").read_text())
    assert 1 <= summary["steps"] < 40, out[-2000:] + err[-2000:]
    assert CheckpointStore(run / RUN_CHECKPOINTS).latest().step == summary["steps"]  # the stop-time checkpoint
    assert f"stopped by a signal (resumes from the checkpoint of step {summary['steps']}" in out
    assert "the sweep was interrupted: SIGTERM sent" in (run / "train.log").read_text()
    (planned,) = plan(arms_by_name(["all_100"]), [0], root / "stopped", common)
    assert not planned.finished and planned.checkpoint_step == summary["steps"]  # the next sweep resumes there


def _read(path: Path) -> str:
    """The text of ``path``, empty while it does not exist."""
    try:
        return path.read_text()
    except OSError:
        return ""
