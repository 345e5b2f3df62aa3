"""Losses (TIP_SPEC section 5) and the memory-lean path (section 6) against the plain path."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import make_batch
from tip_ray.tip import (
    LOSS_KINDS,
    TeacherSignal,
    compute_token_stats,
    distill_loss_from_logits,
    kept_token_loss,
    lean_distill_loss,
    reduce_token_loss,
    token_losses_for_rows,
    token_stats_from_hidden,
    token_weights,
)
from tip_ray.tip.stats import STAT_NAMES


def hidden_batch(k: int | None, dtype=torch.float64, seed=0, batch=3, length=8, vocab=29, hidden=6, bias=False):
    """Hidden states, an lm_head and a teacher signal; logits = hidden @ W.T (+ b)."""
    g = torch.Generator().manual_seed(seed)
    b = make_batch(batch=batch, length=length, vocab=vocab, k=k, seed=seed, dtype=dtype)
    h = torch.randn(batch, length, hidden, generator=g, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g, dtype=dtype) * 0.7).requires_grad_(True)
    bb = (torch.randn(vocab, generator=g, dtype=dtype) * 0.1).requires_grad_(True) if bias else None
    # Teacher scores the student's own samples: draw ids from the student defined by h and W.
    with torch.no_grad():
        logits = torch.nn.functional.linear(h, w, bb)
        ids = torch.multinomial(torch.softmax(logits.reshape(-1, vocab), -1), 1, generator=g).reshape(batch, length)
        signal = TeacherSignal.from_logits(logits + b.teacher_logits - b.student_logits, ids, k)
    return h, w, bb, signal, ids.masked_fill(~b.mask, -100), b.mask


# ---------------------------------------------------------------------------------------------
# Per-token objectives.


def test_full_mode_losses_equal_the_textbook_formulas():
    torch.manual_seed(0)
    s = torch.randn(5, 7, dtype=torch.float64)
    t = torch.randn(5, 7, dtype=torch.float64)
    ids = torch.randint(0, 7, (5,))
    sig = TeacherSignal.from_logits(t.unsqueeze(0), ids.unsqueeze(0), None)
    args = (s, ids, *sig.rows(0))
    ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
    ls, lt = ps.log(), pt.log()
    torch.testing.assert_close(token_losses_for_rows(*args, kind="rkl"), (ps * (ls - lt)).sum(-1))
    torch.testing.assert_close(token_losses_for_rows(*args, kind="fkl"), (pt * (lt - ls)).sum(-1))
    beta = 0.3
    m = beta * pt + (1 - beta) * ps
    jsd = beta * (pt * (lt - m.log())).sum(-1) + (1 - beta) * (ps * (ls - m.log())).sum(-1)
    torch.testing.assert_close(token_losses_for_rows(*args, kind="jsd", beta=beta), jsd)
    torch.testing.assert_close(token_losses_for_rows(*args, kind="jsd", beta=0.0), (pt * (lt - ls)).sum(-1))
    torch.testing.assert_close(token_losses_for_rows(*args, kind="jsd", beta=1.0), (ps * (ls - lt)).sum(-1))
    log_ratio = lt.gather(-1, ids[:, None])[:, 0] - ls.gather(-1, ids[:, None])[:, 0]
    torch.testing.assert_close(token_losses_for_rows(*args, kind="k1"), -log_ratio)
    torch.testing.assert_close(token_losses_for_rows(*args, kind="k3"), log_ratio.exp() - log_ratio - 1)


def test_k1_gradient_is_the_policy_gradient_of_reverse_kl():
    s = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 9, dtype=torch.float64)
    ids = torch.tensor([0, 3, 8, 3])
    sig = TeacherSignal.from_logits(t.unsqueeze(0), ids.unsqueeze(0), 2)
    loss = token_losses_for_rows(s, ids, sig.topk_ids[0], sig.topk_logprobs[0], sig.sampled_logprobs[0], "k1").sum()
    (grad,) = torch.autograd.grad(loss, s)
    ls = torch.log_softmax(s.detach(), -1)
    advantage = ls.gather(-1, ids[:, None])[:, 0] - torch.log_softmax(t, -1).gather(-1, ids[:, None])[:, 0]
    onehot = torch.nn.functional.one_hot(ids, 9).double()
    expected = advantage[:, None] * (onehot - ls.exp())  # A * d log p(y) / d logits
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("kind", ["rkl", "fkl"])
@pytest.mark.parametrize("k", [None, 4])
def test_divergence_losses_equal_the_statistics(kind, k):
    b = make_batch(vocab=31, k=k, dtype=torch.float64)
    stats = compute_token_stats(b.student_logits, b.response_ids, b.teacher, b.mask)
    per = token_losses_for_rows(
        b.student_logits[b.mask], b.response_ids[b.mask], *b.teacher.rows(b.mask), kind,
    )
    torch.testing.assert_close(per, getattr(stats, kind)[b.mask])


def test_reduction_normalises_by_kept_or_valid_tokens():
    per = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    weights = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    assert reduce_token_loss(per, weights, mask, "kept").item() == pytest.approx(2.0)
    assert reduce_token_loss(per, weights, mask, "valid").item() == pytest.approx(4.0 / 3.0)
    assert reduce_token_loss(per, weights, mask, "kept", denominator=8).item() == pytest.approx(0.5)
    zero = reduce_token_loss(per, torch.zeros_like(weights), mask, "kept")
    assert zero.item() == 0.0 and not math.isnan(zero.item())


def test_data_parallel_shards_with_the_global_denominator_sum_to_the_global_mean():
    h, w, _, sig, ids, mask = hidden_batch(k=5, batch=4)
    stats = token_stats_from_hidden(h, w, sig, ids, mask)
    weights = token_weights(stats, "soft_or", 0.5).double()
    whole = kept_token_loss(h, w, sig, ids, weights, mask)
    den = weights.sum()
    shards = []
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):
        part = TeacherSignal(sig.topk_ids[rows], sig.topk_logprobs[rows], sig.sampled_logprobs[rows])
        shards.append(kept_token_loss(h[rows], w, part, ids[rows], weights[rows], mask[rows], denominator=den))
    torch.testing.assert_close(sum(shards), whole)


# ---------------------------------------------------------------------------------------------
# The lean path equals the plain path, values and gradients.


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("k", [None, 5])
@pytest.mark.parametrize("chunk_rows", [1, 4, 10_000])
def test_lean_loss_and_gradients_equal_the_full_logits_path(kind, k, chunk_rows):
    h, w, bias, sig, ids, mask = hidden_batch(k=k, bias=True)
    out = lean_distill_loss(h, w, sig, ids, mask, rule="soft_or", ratio=0.4, loss=kind, beta=0.3,
                            lm_head_bias=bias, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(out.loss, (h, w, bias))
    logits = torch.nn.functional.linear(h, w, bias)
    plain = distill_loss_from_logits(logits, ids, sig, mask, out.weights.double(), kind=kind, beta=0.3)
    expected = torch.autograd.grad(plain, (h, w, bias))
    torch.testing.assert_close(out.loss, plain)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    assert out.num_kept == math.ceil(0.4 * mask.sum().item())


def test_lean_gradients_in_float32_match_to_float32_tolerance():
    h, w, _, sig, ids, mask = hidden_batch(k=8, dtype=torch.float32, vocab=200, hidden=16, batch=4, length=16)
    out = lean_distill_loss(h, w, sig, ids, mask, rule="entropy_topk", ratio=0.5, chunk_rows=7)
    grads = torch.autograd.grad(out.loss, (h, w))
    plain = distill_loss_from_logits(h @ w.T, ids, sig, mask, out.weights)
    expected = torch.autograd.grad(plain, (h, w))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_unkept_positions_get_no_gradient():
    h, w, _, sig, ids, mask = hidden_batch(k=4)
    out = lean_distill_loss(h, w, sig, ids, mask, rule="entropy_topk", ratio=0.3)
    (grad_h,) = torch.autograd.grad(out.loss, h)
    dropped = out.weights == 0
    assert bool((grad_h[dropped] == 0).all()) and bool((grad_h[~dropped].abs().sum(-1) > 0).all())


def test_rock_freeze_weights_scale_the_loss_terms():
    h, w, _, sig, ids, mask = hidden_batch(k=4)
    rocks = ids[mask][:3].tolist()
    out = lean_distill_loss(h, w, sig, ids, mask, rule="rock_freeze", rock_ids=rocks, lam=0.5)
    plain = distill_loss_from_logits(h @ w.T, ids, sig, mask, out.weights.double())
    torch.testing.assert_close(out.loss, plain)
    assert set(out.weights[mask].unique().tolist()) == {0.5, 1.0}


def test_lean_statistics_equal_statistics_from_full_logits():
    h, w, bias, sig, ids, mask = hidden_batch(k=6, bias=True)
    lean = token_stats_from_hidden(h, w, sig, ids, mask, lm_head_bias=bias, chunk_rows=3)
    full = compute_token_stats(torch.nn.functional.linear(h, w, bias).detach(), ids, sig, mask)
    for name in STAT_NAMES:
        torch.testing.assert_close(getattr(lean, name), getattr(full, name))


def test_nothing_kept_gives_a_zero_loss_that_still_backpropagates():
    h, w, _, sig, ids, mask = hidden_batch(k=4)
    loss = kept_token_loss(h, w, sig, ids, torch.zeros(mask.shape, dtype=h.dtype), mask)
    loss.backward()
    assert loss.item() == 0.0 and bool((h.grad == 0).all())


def test_bfloat16_backbone_runs_and_is_close_to_float32():
    h, w, _, sig, ids, mask = hidden_batch(k=6, dtype=torch.float32, vocab=64, hidden=16)
    ref = lean_distill_loss(h, w, sig, ids, mask, rule="all").loss
    hb = h.detach().bfloat16().requires_grad_(True)
    wb = w.detach().bfloat16().requires_grad_(True)
    out = lean_distill_loss(hb, wb, sig, ids, mask, rule="all")
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16
    assert abs(out.loss.item() - ref.item()) < 0.05 * abs(ref.item()) + 1e-3
    assert bool(torch.isfinite(hb.grad).all()) and bool(torch.isfinite(wb.grad).all())


def test_lean_loss_refuses_a_second_backward():
    h, w, _, sig, ids, mask = hidden_batch(k=4)
    out = lean_distill_loss(h, w, sig, ids, mask, rule="all")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        out.loss.backward()
