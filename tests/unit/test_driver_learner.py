"""The driver loop over fake pools and one real in-process learner rank (DeepSpeed on gloo): the
learning-rate schedule it logs, and selection per micro-batch."""

from __future__ import annotations

import math
import socket

import pytest
from driver_fakes import make_trainer, metric_lines, train_config, write_data

from tip_ray.tip.select import budget_for

pytestmark = pytest.mark.slow  # builds a DeepSpeed engine in this process


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("driver-learner-data"))


@pytest.fixture
def one_rank(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)


def run(tmp_path, data, *overrides):
    cfg = train_config(tmp_path / "run", data, "learner.world_size=1", "trainer.eval_divergence=false",
                       "trainer.eval_teacher=false", "learner.zero_stage=1", *overrides)
    trainer, runtime = make_trainer(cfg, real_learner=True)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return metric_lines(tmp_path / "run")


def test_learning_rate_warms_up_linearly_then_follows_the_cosine(tmp_path, data, one_rank):
    base, warmup, total, floor = 1e-3, 3, 8, 0.1
    lines = run(tmp_path, data, "trainer.steps=8", f"learner.lr={base}", f"learner.warmup_steps={warmup}",
                f"learner.total_steps={total}", "learner.lr_schedule=cosine", f"learner.min_lr_ratio={floor}")

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))

    # The optimizer report follows the scheduler's step: after update s it gives the rate of the next one.
    assert [r["lr"] for r in lines] == pytest.approx([base * factor(s) for s in range(1, total + 1)], rel=1e-6)
    assert lines[0]["lr"] < lines[1]["lr"] == pytest.approx(base)  # warm-up, then the peak
    assert lines[-1]["lr"] == pytest.approx(base * floor)  # the cosine ends at min_lr_ratio


def test_micro_batch_scope_keeps_the_ratio_of_each_micro_batch(tmp_path, data, one_rank):
    lines = run(tmp_path, data, "trainer.steps=1", "selection.rule=soft_or", "selection.ratio=0.3",
                "selection.scope=micro_batch")
    # 8 sequences x 4 response tokens in micro-batches of 2: ceil(0.3 * 8) = 3 kept in each of 4,
    # where one budget over the whole step would keep ceil(0.3 * 32) = 10.
    assert lines[0]["valid_tokens"] == 32
    assert lines[0]["kept_tokens"] == 4 * budget_for(0.3, 8) == 12 != budget_for(0.3, 32)
