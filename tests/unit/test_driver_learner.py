"""The driver loop over fake pools and one real in-process learner rank (DeepSpeed on gloo): the
learning-rate schedule it logs, and selection per micro-batch."""

from __future__ import annotations

import math
import socket

import pytest
from driver_fakes import ASSETS, make_trainer, metric_lines, train_config, write_data

from tip_ray.tip.select import budget_for

pytestmark = pytest.mark.slow  # builds a DeepSpeed engine in this process


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("driver-learner-data"))


BASE, WARMUP, TOTAL, FLOOR = 1e-3, 3, 8, 0.1


@pytest.fixture(scope="module")
def lines(data, tmp_path_factory):
    """The metrics lines of one 8-step run (DeepSpeed keeps process-wide state: one engine per
    process): a cosine schedule with warm-up, selection per micro-batch, and two teachers routed
    by the problem's family (the per-teacher statistics), each with its own top-K (8 and 4)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = pytest.MonkeyPatch()
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        env.setenv(key, value)
    run_dir = tmp_path_factory.mktemp("driver-learner") / "run"
    cfg = train_config(run_dir, data, "learner.world_size=1", "trainer.eval_divergence=false",
                       "trainer.eval_teacher=false", "learner.zero_stage=1", f"trainer.steps={TOTAL}",
                       f"learner.lr={BASE}", f"learner.warmup_steps={WARMUP}", f"learner.total_steps={TOTAL}",
                       "learner.lr_schedule=cosine", f"learner.min_lr_ratio={FLOOR}", "selection.rule=soft_or",
                       "selection.ratio=0.3", "selection.scope=micro_batch",
                       f"+teachers.weak.model={ASSETS / 'student'}", "+teachers.weak.top_k=4", "routing.field=family",
                       "+routing.map.add=default", "+routing.map.mul=weak")
    trainer, _ = make_trainer(cfg, real_learner=True)
    try:
        trainer.fit()
    finally:
        trainer.close()
        env.undo()
    return metric_lines(run_dir)


def test_learning_rate_warms_up_linearly_then_follows_the_cosine(lines):
    def factor(s: int) -> float:
        if s < WARMUP:
            return (s + 1) / WARMUP
        return FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * (s - WARMUP) / (TOTAL - WARMUP)))

    # Step s logs the rate its update used: the schedule's value at s - 1 updates done.
    assert [r["lr"] for r in lines] == pytest.approx([BASE * factor(s - 1) for s in range(1, TOTAL + 1)], rel=1e-6)
    assert lines[0]["lr"] == pytest.approx(BASE / WARMUP)  # the first update is warm-up's first rate
    assert lines[0]["lr"] < lines[1]["lr"] < lines[2]["lr"] == pytest.approx(BASE)  # warm-up, then the peak
    assert BASE * FLOOR < lines[-1]["lr"] < lines[-2]["lr"]  # the cosine falls towards min_lr_ratio


def test_micro_batch_scope_keeps_the_ratio_of_each_micro_batch(lines):
    # 8 sequences x 4 response tokens in micro-batches of 2: ceil(0.3 * 8) = 3 kept in each of 4,
    # where one budget over the whole step would keep ceil(0.3 * 32) = 10.
    for line in lines:
        assert line["valid_tokens"] == 32
        assert line["kept_tokens"] == 4 * budget_for(0.3, 8) == 12 != budget_for(0.3, 32)


def test_per_teacher_statistics_split_the_steps_statistics_exactly(lines):
    names = ("default", "weak")
    assert sum(line["teacher/weak/sequences"] for line in lines) > 0
    for line in lines:
        assert line["skipped"] == 0  # the weak teacher's absent slots (top-K 4 in a K = 8 signal) are no NaN/inf
        routed = [n for n in names if line[f"teacher/{n}/sequences"]]
        assert sum(line[f"teacher/{n}/sequences"] for n in names) == 8
        assert sum(line[f"teacher/{n}/valid_tokens"] for n in routed) == line["valid_tokens"]
        assert sum(line[f"teacher/{n}/kept_tokens"] for n in routed) == line["kept_tokens"]
        for n in routed:
            kept, valid = line[f"teacher/{n}/kept_tokens"], line[f"teacher/{n}/valid_tokens"]
            assert line[f"teacher/{n}/kept_fraction"] == kept / valid
        for key, count in (("rkl_mean", "valid_tokens"), ("rkl_kept_mean", "kept_tokens"),
                           *((f"quadrant/Q{q}", "valid_tokens") for q in range(1, 5))):
            split = sum(line[f"teacher/{n}/{key}"] * line[f"teacher/{n}/{count}"] for n in routed)
            assert split / line[count] == pytest.approx(line[key], rel=1e-5)  # the step's own number
