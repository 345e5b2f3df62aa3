"""The driver's per-step metrics that read the teacher's signal."""

from __future__ import annotations

import math

import pytest
import torch

from tip_ray.driver import metrics
from tip_ray.tip.signal import TeacherSignal


def _signals():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 40, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(0, 40, (3, 9), generator=g)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 4:] = mask[1, 2:7] = mask[2, 8] = True
    return mask, TeacherSignal.from_logits(logits, ids, None), TeacherSignal.from_logits(logits, ids, 6)


@pytest.mark.parametrize("block_bytes", [1, 8 * 40 * 3, 2**30])
def test_teacher_entropy_reads_the_response_rows_in_blocks(monkeypatch, block_bytes):
    """Whatever the block of rows, the mean over the response positions of each position's top-K +
    tail entropy: exact for the full distribution, a lower bound for top-K."""
    monkeypatch.setattr(metrics, "_ENTROPY_BLOCK_BYTES", block_bytes)
    mask, dense, top = _signals()
    for signal in (dense, top):
        want = float(signal.bucket_entropy()[mask].mean())
        assert metrics.teacher_entropy(signal, mask) == pytest.approx(want, rel=1e-12)
    p = dense.topk_logprobs.exp()
    exact = float(-(p * dense.topk_logprobs).sum(-1)[mask].mean())
    assert metrics.teacher_entropy(dense, mask) == pytest.approx(exact, rel=1e-12)
    assert metrics.teacher_entropy(top, mask) <= exact + 1e-12
    assert math.isnan(metrics.teacher_entropy(dense, torch.zeros_like(mask)))
