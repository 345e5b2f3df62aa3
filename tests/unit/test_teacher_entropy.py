"""The teacher's bucketed entropy (TeacherSignal.bucket_entropy): exact with the whole
distribution, a lower bound from the top-K plus one tail bucket."""

from __future__ import annotations

import math

import torch

from tip_ray.tip.signal import TeacherSignal


def test_full_distribution_gives_the_exact_entropy_and_top_k_a_lower_bound():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 40, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(0, 40, (2, 5), generator=g)
    logp = torch.log_softmax(logits, -1)
    exact = -(logp.exp() * logp).sum(-1)
    full = TeacherSignal.from_logits(logits, ids).bucket_entropy()
    torch.testing.assert_close(full, exact)
    top = TeacherSignal.from_logits(logits, ids, k=4)
    bound = top.bucket_entropy()
    assert bound.dtype == torch.float64 and bool((bound <= exact + 1e-12).all()) and bool((bound > 0).all())
    p = top.topk_logprobs.exp()
    tail = 1 - p.sum(-1)
    torch.testing.assert_close(bound, -(p * p.log()).sum(-1) - tail * tail.log())


def test_a_certain_teacher_and_the_uniform_placeholder():
    k = 8
    certain = TeacherSignal(torch.arange(k).expand(1, 1, k).int(),
                            torch.tensor([[[0.0] + [-math.inf] * (k - 1)]]), torch.zeros(1, 1))
    assert float(certain.bucket_entropy()) == 0.0  # one token has all the mass: no NaN from 0 log 0
    uniform = TeacherSignal(torch.arange(k).expand(1, 1, k).int(), torch.full((1, 1, k), -math.log(k)),
                            torch.full((1, 1), -math.log(k)))
    assert math.isclose(float(uniform.bucket_entropy()), math.log(k), rel_tol=1e-6)
    assert uniform.bucket_entropy().dtype == torch.float32
