"""The task-reward term of the lean loss (``kept_token_losses`` with ``advantages``) against a
float64 reference: autograd through the full vocabulary of distill_loss + coef * pg_loss."""

from __future__ import annotations

import pytest
import torch
from head_inputs import head_inputs

from tip_ray.tip import (
    TeacherSignal,
    distill_loss_from_logits,
    kept_token_loss,
    kept_token_losses,
    policy_gradient_loss_from_logits,
)


def _inputs(vocab=37, k=5, batch=4, length=9, hidden=6, dtype=torch.float64, seed=0):
    h, w, bias, ids, signal, mask, g = head_inputs(vocab, k, batch, length, hidden, dtype, seed)
    # About half the valid tokens carry the distillation term; the reward term covers them all.
    weights = torch.where(mask & (torch.rand(batch, length, generator=g) < 0.5),
                          torch.rand(batch, length, generator=g, dtype=torch.float64) + 0.5, 0.0)
    return h, w, bias, signal, ids.masked_fill(~mask, -100), mask, weights


def _check(h, w, bias, signal, ids, mask, weights, advantages, kind="rkl", coef=0.7, den=None, reward_den=None):
    lean = kept_token_losses(h, w, signal, ids, weights.to(h.dtype), mask, lm_head_bias=bias, kind=kind, beta=0.3,
                             chunk_rows=3, advantages=advantages, reward_coef=coef, denominator=den,
                             reward_denominator=reward_den)
    got = torch.autograd.grad(lean.loss, (h, w, bias))
    logits = torch.nn.functional.linear(h, w, bias)
    distill = distill_loss_from_logits(logits, ids, signal, mask, weights.to(h.dtype), kind=kind, beta=0.3,
                                       denominator=den)
    pg = policy_gradient_loss_from_logits(logits, ids, advantages, mask, reward_den)
    want = torch.autograd.grad(distill + coef * pg, (h, w, bias))
    torch.testing.assert_close(lean.loss, distill + coef * pg)
    torch.testing.assert_close(lean.distill, distill.detach())
    torch.testing.assert_close(lean.reward, pg.detach())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    return lean


ADVANTAGES = torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=torch.float64)


@pytest.mark.parametrize("kind", ["rkl", "fkl", "k1"])
@pytest.mark.parametrize("k", [5, None])
def test_the_reward_term_equals_autograd_through_the_full_vocabulary(kind, k):
    h, w, bias, signal, ids, mask, weights = _inputs(k=k or 37)
    in_top_k = (signal.topk_ids == ids.clamp(min=0).unsqueeze(-1)).any(-1)[mask]
    assert k is None or (bool(in_top_k.any()) and bool((~in_top_k).any()))  # both places of the sampled id
    _check(h, w, bias, signal, ids, mask, weights, ADVANTAGES, kind)
    # A data-parallel shard: global denominators for both terms.
    _check(h, w, bias, signal, ids, mask, weights, ADVANTAGES, kind, den=11.0, reward_den=50.0)


def test_the_reward_term_alone_when_nothing_is_selected():
    h, w, bias, signal, ids, mask, weights = _inputs()
    lean = _check(h, w, bias, signal, ids, mask, torch.zeros_like(weights), ADVANTAGES)
    assert float(lean.distill) == 0.0 and float(lean.reward) != 0.0


def test_a_teacher_id_listed_twice_counts_once_in_the_log_probability():
    h, w, bias, signal, ids, mask, weights = _inputs(k=4)
    topk_ids = signal.topk_ids.clone()
    topk_ids[..., 1] = topk_ids[..., 0]
    twice = TeacherSignal(topk_ids, signal.topk_logprobs - 0.7, signal.sampled_logprobs)
    _check(h, w, bias, twice, ids, mask, weights, ADVANTAGES)


def test_zero_advantages_leave_the_distillation_loss_as_it_was():
    h, w, bias, signal, ids, mask, weights = _inputs()
    plain = kept_token_loss(h, w, signal, ids, weights, mask, lm_head_bias=bias, chunk_rows=3)
    zero = kept_token_losses(h, w, signal, ids, weights, mask, lm_head_bias=bias, chunk_rows=3,
                             advantages=torch.zeros(4, dtype=torch.float64))
    assert torch.equal(plain, zero.loss) and float(zero.reward) == 0.0
    with pytest.raises(ValueError, match=r"advantages must be float \[B\] = \[4\]"):
        kept_token_losses(h, w, signal, ids, weights, mask, advantages=torch.zeros(3))
    with pytest.raises(ValueError, match="NaN or inf"):
        kept_token_losses(h, w, signal, ids, weights, mask, advantages=torch.tensor([0.0, float("nan"), 0.0, 1.0]))


def test_with_the_reward_term_a_chunk_still_holds_one_float32_rows_by_vocabulary_tensor():
    from test_lean_loss_memory import _LiveLargeBuffers

    chunk_rows, vocab = 16, 4096
    h, w, _, signal, ids, mask, weights = _inputs(vocab=vocab, k=8, batch=4, length=12, hidden=4, dtype=torch.float32)
    with _LiveLargeBuffers(chunk_rows * vocab) as probe:
        out = kept_token_losses(h, w, signal, ids, weights.float(), mask, chunk_rows=chunk_rows,
                                advantages=ADVANTAGES.float())
        out.loss.backward()
    assert probe.most <= 1, probe.most


def test_a_bf16_head_with_the_reward_term_is_close_to_float64():
    h, w, bias, signal, ids, mask, weights = _inputs(vocab=301, k=8, hidden=16)
    ref = kept_token_losses(h, w, signal, ids, weights, mask, lm_head_bias=bias, chunk_rows=5, advantages=ADVANTAGES)
    ref_grads = torch.autograd.grad(ref.loss, (h, w))
    hb, wb = (t.detach().bfloat16().requires_grad_(True) for t in (h, w))
    out = kept_token_losses(hb, wb, signal, ids, weights.float(), mask, lm_head_bias=bias.detach().bfloat16(),
                            chunk_rows=5, advantages=ADVANTAGES.float())
    grads = torch.autograd.grad(out.loss, (hb, wb))
    assert abs(out.reward.item() - ref.reward.item()) < 0.02 * abs(ref.reward.item())
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16 and float((got.double() - want).norm() / want.norm()) < 0.05
