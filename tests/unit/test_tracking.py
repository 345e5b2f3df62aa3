"""Tracking after a run goes back to an earlier step: the metrics JSONL and the W&B run (offline).

W&B refuses a step below the last one a run logged, and a plain resume keeps the abandoned steps
beside the new ones; going back to step k must rewind the W&B run to k (``resume_from``).
"""

from __future__ import annotations

import json
import logging

import pytest

from tip_ray.config import LoggerConfig
from tip_ray.tracking import Tracker, last_step, truncate_after

OFFLINE = LoggerConfig(wandb=True, project="tip_ray_test", mode="offline")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def steps_in(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def first_run(tmp_path, last: int) -> str:
    tracker = Tracker(OFFLINE, tmp_path, {"lr": 1.0})
    for step in range(1, last + 1):
        tracker.log(step, {"loss": float(step)})
    tracker.close()
    return tracker.run_id


def test_jsonl_helpers_skip_a_line_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 3, "a": 2}\n{"step": 2, "a"')
    assert last_step(path) == 3 and last_step(tmp_path / "none.jsonl") is None
    assert truncate_after(path, 2) == 2 and steps_in(path) == [1]


def test_resuming_before_the_last_logged_step_rewinds_the_wandb_run(tmp_path):
    run_id = first_run(tmp_path, 5)
    tracker = Tracker(OFFLINE, tmp_path, {"lr": 1.0}, resume_step=3, run_id=run_id)
    try:
        run = tracker.wandb_run
        assert tracker.run_id == run.id == run_id  # the same W&B run, not a new one
        assert run.settings.resume_from is not None and run.settings.resume_from.value == 3
        assert run.settings.resume is None  # resume, resume_from and fork_from exclude each other
        assert run.starting_step == 4  # history kept up to step 3; 4 and 5 are logged again
        assert steps_in(tracker.path) == [1, 2, 3]
        tracker.log(4, {"loss": 0.5})
        assert steps_in(tracker.path) == [1, 2, 3, 4]
    finally:
        tracker.close()


def test_resuming_at_the_last_logged_step_continues_the_run(tmp_path):
    run_id = first_run(tmp_path, 3)
    tracker = Tracker(OFFLINE, tmp_path, {"lr": 1.0}, resume_step=3, run_id=run_id)
    try:
        assert tracker.run_id == run_id and tracker.wandb_run.settings.resume == "allow"
        assert tracker.wandb_run.settings.resume_from is None
    finally:
        tracker.close()


def test_going_back_in_process_rewinds_both_logs(tmp_path):
    tracker = Tracker(OFFLINE, tmp_path, {"lr": 1.0})
    try:
        run_id = tracker.run_id
        for step in range(1, 6):
            tracker.log(step, {"loss": float(step)})
        tracker.rewind(2)  # the learner group was rebuilt from the checkpoint of step 2
        assert steps_in(tracker.path) == [1, 2]
        assert tracker.run_id == tracker.wandb_run.id == run_id
        assert tracker.wandb_run.settings.resume_from.value == 2 and tracker.wandb_run.starting_step == 3
        tracker.log(3, {"loss": 0.1})
        previous = tracker.wandb_run
        tracker.rewind(3)  # nothing after step 3 was logged: the run goes on as it is
        assert tracker.wandb_run is previous
    finally:
        tracker.close()


def test_a_server_without_rewinding_continues_in_a_new_run_that_names_the_old_one(tmp_path, monkeypatch, caplog):
    import wandb

    run_id = first_run(tmp_path, 5)
    real_init = wandb.init

    def no_rewind(*args, **kwargs):
        if kwargs.get("resume_from"):
            raise wandb.errors.CommError("failed to rewind run: run not found")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", no_rewind)
    with caplog.at_level(logging.WARNING, logger="tip_ray.tracking"):
        tracker = Tracker(OFFLINE, tmp_path, {"lr": 1.0}, resume_step=3, run_id=run_id)
    try:
        assert tracker.run_id == tracker.wandb_run.id != run_id
        assert tracker.wandb_run.config["resumed_from"] == {"wandb_run_id": run_id, "step": 3}
        assert f"could not rewind run {run_id} to step 3" in caplog.text
        tracker.log(4, {"loss": 0.5})
    finally:
        tracker.close()
