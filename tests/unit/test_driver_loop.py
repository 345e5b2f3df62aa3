"""The driver loop in-process over fake pools (tests/unit/driver_fakes.py): recovery, bad steps,
signals, staleness, the sync cadence, the vocabulary guard, and checkpoints that resume."""

from __future__ import annotations

import json
import math
import signal

import pytest
from driver_fakes import events, make_trainer, metric_lines, train_config, write_data

from tip_ray.driver.state import DriverState, TooManyBadSteps


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("driver-data"))


def fit(tmp_path, data, *overrides, script=None, teacher_rows=None):
    run_dir = tmp_path / "run"
    trainer, runtime = make_trainer(train_config(run_dir, data, *overrides), script, teacher_rows)
    try:
        return trainer, runtime, trainer.fit()
    finally:
        trainer.close()


def test_a_clean_run_syncs_every_update_and_checkpoints_the_last_step(tmp_path, data):
    trainer, runtime, summary = fit(tmp_path, data, "trainer.eval_every=2")
    lines = metric_lines(tmp_path / "run")
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and [r["weight_version"] for r in lines] == [1, 2, 3, 4]
    assert [r["staleness"] for r in lines] == [0] * 4 and runtime.rollout.launches == [0, 1, 2, 3]
    assert runtime.learner.batches == [8] * 4  # the whole step's batch reaches the learner group
    assert "eval/rkl" in lines[1] and "eval/accuracy" in lines[1] and "eval/rkl" not in lines[0]
    assert summary.steps == summary.steps_run == 4 and summary.skipped_steps == 0
    assert summary.teacher_accuracy is not None and summary.hf_export is not None and runtime.closed
    saved = json.loads((trainer.store.latest().path / "driver.json").read_text())
    assert {"step", "version", "updates", "cursor", "wandb_run_id", "bad_steps", "accuracy_before",
            "teacher_accuracy", "eval_before", "config", "tip_ray_version"} <= set(saved)
    assert (saved["step"], saved["version"], saved["updates"]) == (4, 4, 4)


def test_non_finite_weights_roll_back_to_the_last_checkpoint_and_replay(tmp_path, data):
    trainer, runtime, summary = fit(tmp_path, data, "checkpoint.every=2", script=["ok", "ok", "poison"])
    assert any("non-finite weights" in e and "reloading the learner's state" in e for e in events(tmp_path / "run"))
    assert runtime.restarts == 0  # poisoned weights reload the state; the group itself is fine
    # Steps 3 and 4 ran again after the rollback from step 2's checkpoint: 2 + 2 updates survive.
    assert runtime.learner.updates == 4 and summary.steps == 4
    # The restored weights are served as a new version: live actors never take an old version again.
    assert [v for v, _ in runtime.syncs] == [1, 2, 3, 4, 5] and runtime.syncs[2] == (3, 2)
    assert [r["step"] for r in metric_lines(tmp_path / "run")][-2:] == [3, 4]


def test_a_dead_learner_rank_rebuilds_the_group_until_the_recovery_limit(tmp_path, data):
    trainer, runtime, _ = fit(tmp_path, data, "checkpoint.every=1", "faults.max_learner_recoveries=1",
                              script=["ok", "die"])
    assert runtime.restarts == 1 and runtime.learner.updates == 4
    assert any("a learner rank died during step 2" in e and "restarting the learner group" in e
               for e in events(tmp_path / "run"))
    with pytest.raises(RuntimeError, match=r"faults.max_learner_recoveries=1 recoveries already\). Resume with"):
        fit(tmp_path / "again", data, "checkpoint.every=1", "faults.max_learner_recoveries=1",
            script=["ok", "die", "die"])


def test_a_dead_learner_rank_without_a_checkpoint_stops_with_the_resume_command(tmp_path, data):
    with pytest.raises(RuntimeError, match="there is no checkpoint to restart from"):
        fit(tmp_path, data, script=["die"])


def test_max_bad_steps_in_a_row_stop_the_run_and_an_update_resets_the_count(tmp_path, data):
    _, _, summary = fit(tmp_path, data, "faults.max_bad_steps=2", script=["skip", "ok", "skip", "ok"])
    lines = metric_lines(tmp_path / "run")
    assert [r["skipped"] for r in lines] == [1, 0, 1, 0] and summary.skipped_steps == 2
    assert math.isnan(lines[0]["lr"]) and lines[0]["weight_version"] == 0  # nothing new to serve
    with pytest.raises(TooManyBadSteps, match="2 steps in a row had NaN/inf.*faults.max_bad_steps=2"):
        fit(tmp_path / "again", data, "faults.max_bad_steps=2", script=["ok", "skip", "skip"])
    assert any("step 3 skipped" in e and "2 in a row, limit 2" in e for e in events(tmp_path / "again" / "run"))


def test_sigterm_finishes_the_step_checkpoints_and_the_same_command_resumes(tmp_path, data):
    before = signal.getsignal(signal.SIGTERM)
    trainer, runtime, summary = fit(tmp_path, data, "trainer.sync_every=2", "trainer.max_staleness=1",
                                    "trainer.eval_divergence=false", script=["ok", "ok", "signal"])
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back
    assert summary.steps == summary.steps_run == 3 and summary.hf_export is None
    assert any("stopped by signal 15 after step 3" in e for e in events(tmp_path / "run"))
    # Step 3 stopped between syncs: its update is served before the checkpoint, so a resumed run
    # serves exactly the checkpoint's weights as that version.
    assert runtime.syncs == [(1, 2), (2, 3)]
    saved = json.loads((trainer.store.latest().path / "driver.json").read_text())
    assert (saved["step"], saved["version"], saved["updates"]) == (3, 2, 3)

    resumed, runtime2 = make_trainer(train_config(tmp_path / "run", data, "trainer.sync_every=2",
                                                  "trainer.max_staleness=1", "trainer.eval_divergence=false"))
    try:
        assert runtime2.syncs == [(2, 3)]  # the fresh pool serves the checkpoint's weights as version 2
        summary2 = resumed.fit()
    finally:
        resumed.close()
    assert summary2.steps == 4 and summary2.steps_run == 1 and runtime2.learner.updates == 4


def test_sync_every_two_trains_on_samples_one_update_old_and_syncs_at_the_end(tmp_path, data):
    _, runtime, _ = fit(tmp_path, data, "trainer.steps=5", "trainer.sync_every=2", "trainer.max_staleness=1",
                        "trainer.eval_divergence=false")
    lines = metric_lines(tmp_path / "run")
    assert [r["staleness"] for r in lines] == [0, 1, 0, 1, 0]
    assert [r["weight_version"] for r in lines] == [0, 1, 1, 2, 2]
    assert runtime.syncs == [(1, 2), (2, 4), (3, 5)]  # the last, odd step is served before the final checkpoint


def test_staleness_beyond_the_bound_stops_the_step(tmp_path, data):
    trainer, runtime = make_trainer(train_config(tmp_path / "run", data, "trainer.eval_divergence=false"))
    try:
        first = trainer._launch_next()
        runtime.learner.updates = trainer.state.updates = 2  # two updates the pool does not serve
        with pytest.raises(RuntimeError, match="2 updates old, above trainer.max_staleness=1"):
            trainer.step(1, first)
    finally:
        trainer.close()


def test_teacher_ids_beyond_the_students_rows_are_refused(tmp_path, data):
    with pytest.raises(ValueError, match=r"step 1: the teacher sent token id 135, beyond the student's 128"):
        fit(tmp_path, data, "trainer.eval_teacher=false", "trainer.eval_divergence=false", teacher_rows=136)


def test_overlap_mode_launches_the_next_batch_before_the_sync(tmp_path, data):
    _, runtime, _ = fit(tmp_path, data, "trainer.mode=overlap", "trainer.eval_divergence=false")
    assert runtime.rollout.launches == [0, 0, 1, 2]
    assert [r["staleness"] for r in metric_lines(tmp_path / "run")] == [0, 1, 1, 1]


def test_driver_state_reads_what_the_driver_wrote_before_it_was_typed():
    old = {"step": 6, "version": 3, "updates": 5, "cursor": {"epoch": 0, "position": 24}, "wandb_run_id": None,
           "bad_steps": {"consecutive": 1, "total": 2}, "accuracy_before": 0.25, "config": {}, "tip_ray_version": "0"}
    state = DriverState.from_dict(old)
    assert (state.step, state.version, state.updates, state.bad_steps.total) == (6, 3, 5, 2)
    assert state.eval_before == {} and state.teacher_accuracy is None and state.staleness(3) == 0
    again = state.to_dict({}, "0")
    assert {k: again[k] for k in old} == old
    with pytest.raises(KeyError, match=r"lacks \['cursor'\]"):
        DriverState.from_dict({k: v for k, v in old.items() if k != "cursor"})


def test_each_prompt_is_scored_and_evaluated_by_its_own_teacher(tmp_path, data):
    from driver_fakes import ASSETS

    # the embedded rows' family: add to the default teacher, mul to a second one (the scripted
    # learner reports no per-teacher statistics: tests/unit/test_driver_learner.py has them)
    trainer, runtime, _ = fit(tmp_path, data, f"+teachers.weak.model={ASSETS / 'student'}", "routing.field=family",
                              "+routing.map.add=default", "+routing.map.mul=weak", "trainer.eval_every=2")
    examples = [*trainer.train_data, *trainer.eval_data]
    assert {ex.route for ex in trainer.train_data} == {"default", "weak"}

    def route_of(row: list[int]) -> str:
        (route,) = {ex.route for ex in examples if row[: len(ex.prompt_ids)] == ex.prompt_ids}
        return route

    for name, teacher in runtime.teachers.items():  # training and evaluation sequences alike
        assert teacher.seen and all(route_of(row.tolist()) == name for batch in teacher.seen for row in batch)
        # the teacher's accuracy: each held-out prompt generated by its own teacher (none: no call)
        own = [ex.prompt_ids for ex in trainer.eval_data if ex.route == name]
        assert teacher.prompted == ([own] if own else [])
    lines = metric_lines(tmp_path / "run")
    assert all(r["teacher/default/sequences"] + r["teacher/weak/sequences"] == 8 for r in lines)
    assert sum(r["teacher/weak/sequences"] for r in lines) > 0 and "teacher/weak/kept_fraction" not in lines[0]
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])  # step 0's evaluation
    routed = {ex.route for ex in trainer.eval_data}
    assert sum(first[f"eval/teacher/{n}/graded"] for n in routed) == first["eval/graded"]
    assert {f"eval/teacher/{n}/{key}" for n in routed for key in ("teacher_accuracy", "rkl")} <= set(first)
