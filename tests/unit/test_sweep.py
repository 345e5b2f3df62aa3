"""The sweep's plan: arms, seeds on every seeded key, directories, resumption, bad input."""

from __future__ import annotations

import pytest

from tip_ray.cli import compose
from tip_ray.sweep import DEFAULT_ARMS, SEED_KEYS, arms_by_name, execute, plan, train_command


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
