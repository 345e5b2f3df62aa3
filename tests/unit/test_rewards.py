"""Task rewards mixed with distillation (``loss.reward``): the advantage math, the start-up checks,
and the driver loop over fake pools grading every sample and handing the advantages to the learner."""

from __future__ import annotations

import json
import math

import pytest
import torch
from driver_fakes import make_trainer, metric_lines, train_config

from tip_ray.config import RewardConfig
from tip_ray.tip.advantages import sequence_advantages
from tip_ray.types import TeacherSignal, TrainBatch

NAN = math.nan


def _adv(rewards, groups, *args):
    return sequence_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups), *args)


def test_group_baseline_subtracts_each_prompts_mean():
    got = _adv([1.0, 0.0, 0.0, 0.0, 1.0, 1.0], [0, 0, 0, 1, 1, 1], "group")
    torch.testing.assert_close(got, torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]))
    assert got.dtype == torch.float32
    # A group that is all right (or all wrong) teaches nothing.
    assert _adv([1.0, 1.0, 0.0, 0.0], [0, 0, 1, 1], "group").abs().sum() == 0


def test_std_normalisation_divides_by_the_groups_std():
    got = _adv([1.0, 0.0, 0.0, 0.0], [0, 0, 0, 0], "group", True, 0.0)
    r = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(got, ((r - r.mean()) / r.std()).float())  # Bessel-corrected, as GRPO
    assert _adv([1.0, 1.0], [0, 0], "group", True).abs().sum() == 0  # std 0: eps keeps it finite


def test_ungraded_samples_get_zero_and_stay_out_of_every_mean():
    got = _adv([1.0, 0.0, NAN, NAN, 1.0, NAN], [0, 0, 1, 1, 2, 2], "batch")
    mean = 2 / 3
    torch.testing.assert_close(got, torch.tensor([1 - mean, -mean, 0.0, 0.0, 1 - mean, 0.0]))
    assert torch.equal(_adv([1.0, NAN, 0.0], [0, 1, 2], "none"), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(_adv([NAN, NAN], [0, 0], "group", True), torch.zeros(2))


def test_a_group_of_one_gets_advantage_zero():
    # rollout.n = 1 with a group baseline: what loss.reward.check_run refuses, for this reason.
    assert torch.equal(_adv([1.0, 0.0], [0, 1], "group"), torch.zeros(2))
    torch.testing.assert_close(_adv([1.0, 0.0], [0, 1], "batch"), torch.tensor([0.5, -0.5]))


def test_config_errors_name_the_keys():
    with pytest.raises(ValueError, match="loss.reward.coef must be > 0"):
        RewardConfig(enabled=True, coef=0.0)
    with pytest.raises(ValueError, match=r"loss.reward.baseline must be one of \('group', 'batch', 'none'\)"):
        RewardConfig(baseline="mean")
    with pytest.raises(ValueError, match="loss.reward.std_normalize=true needs a baseline"):
        RewardConfig(baseline="none", std_normalize=True)
    with pytest.raises(ValueError, match="data.answer_field is null"):
        RewardConfig(enabled=True).check_run(None, 4)
    with pytest.raises(ValueError, match=r"loss.reward.baseline=group needs rollout.n > 1 \(got rollout.n=1\)"):
        RewardConfig(enabled=True).check_run("answer", 1)
    RewardConfig(enabled=True, baseline="batch").check_run("answer", 1)
    RewardConfig().check_run(None, 1)  # off: nothing to check


def test_the_training_config_refuses_rewards_it_cannot_feed(tmp_path):
    base = ["loss.reward.enabled=true"]
    with pytest.raises(SystemExit, match="data.answer_field is null"):
        train_config(tmp_path, tmp_path, *base, "data.answer_field=null")
    with pytest.raises(SystemExit, match="loss.reward.baseline=group needs rollout.n > 1"):
        train_config(tmp_path, tmp_path, *base, "rollout.n=1", "learner.global_batch_size=4")
    cfg = train_config(tmp_path, tmp_path, *base, "loss.reward.coef=0.5")
    assert cfg.loss.reward.enabled and cfg.loss.reward.coef == 0.5 and cfg.loss.reward.baseline == "group"
    assert not train_config(tmp_path, tmp_path).loss.reward.enabled  # off by default


def test_train_batch_keeps_the_advantages_through_rows_and_take():
    ids = torch.arange(12).reshape(3, 4)
    signal = TeacherSignal(torch.zeros(3, 3, 1, dtype=torch.long), torch.zeros(3, 3, 1), torch.zeros(3, 3))
    batch = TrainBatch(ids, torch.ones_like(ids), torch.ones(3, 3, dtype=torch.bool), signal,
                       advantages=torch.tensor([0.5, -1.0, 2.0]))
    assert torch.equal(batch.rows(1, 3).advantages, torch.tensor([-1.0, 2.0]))
    assert torch.equal(batch.take(torch.tensor([2, 0])).advantages, torch.tensor([2.0, 0.5]))
    assert batch.rows(0, 2).teacher is not None and TrainBatch(ids, torch.ones_like(ids), batch.loss_mask,
                                                                signal).take(torch.tensor([0])).advantages is None
    with pytest.raises(ValueError, match=r"advantages must be float \[B\] = \[3\]"):
        TrainBatch(ids, torch.ones_like(ids), batch.loss_mask, signal, advantages=torch.zeros(2))


def _reward_data(root):
    """8 prompts whose answer is 7, every third one without an answer (ungraded)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"p{i}", "prompt": f"{i}+{7 - i}=", "answer": None if i % 3 == 2 else "7"} for i in range(8)]
    for name in ("train.jsonl", "test.jsonl"):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_the_driver_grades_every_sample_and_the_learner_gets_its_advantages(tmp_path):
    data = _reward_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    cfg = train_config(run_dir, data, "loss.reward.enabled=true", "loss.reward.coef=0.5", "data.null_answer=ungraded",
                       "eval_data.null_answer=ungraded", "data.shuffle=false", "trainer.steps=2",
                       "trainer.eval_divergence=false", "trainer.eval_teacher=false")
    trainer, runtime = make_trainer(cfg)
    encode = trainer.tokenizer.encode
    # A prompt's first sample answers right, its second wrong.
    runtime.rollout.respond = lambda s: encode("Answer: 7" if s == 0 else "Answer: 3", add_special_tokens=False)
    try:
        trainer.fit()
    finally:
        trainer.close()
    graded = [i % 3 != 2 for i in range(8)]
    for step, advantages in enumerate(runtime.learner.advantages):
        prompts = graded[4 * step : 4 * step + 4]
        want = [v for g in prompts for v in ((0.5, -0.5) if g else (0.0, 0.0))]
        assert advantages.dtype == torch.float32 and advantages.tolist() == want
    lines = metric_lines(run_dir)
    assert [line["reward/graded_fraction"] for line in lines] == [0.75, 0.75]
    for line in lines:
        assert line["reward/mean"] == 0.5 and line["reward/advantage_mean"] == 0.0
        assert line["reward/advantage_std"] == 0.5 and line["reward/grader_errors"] == 0
        assert line["reward/pg_loss"] == 0.25 and line["reward/total_loss"] == line["loss"] + 0.5 * 0.25
        assert "time/reward" in line


def test_a_multi_turn_sample_is_graded_on_the_students_last_turn():
    from tip_ray.driver.rewards import final_turn
    from tip_ray.types import Generation

    single = Generation(0, [5, 6, 7], [], "stop")
    assert final_turn(single) == [5, 6, 7]
    # student turn, a follow-up (not the student's), then the student's last turn
    turns = Generation(0, [5, 6, 2, 40, 41, 42, 8, 9, 2], [], "stop",
                       (True, True, True, False, False, False, True, True, True))
    assert final_turn(turns) == [8, 9, 2]
    # a sample that ended on a follow-up has no last turn of its own to grade
    cut = Generation(0, [5, 6, 40], [], "length", (True, True, False))
    assert final_turn(cut) == []
