"""Teachers with different top-K in one signal: rows scored with K_i < K are padded by absent
slots (``TeacherSignal.padded_to``), and every consumer must read such a row exactly as its own
K_i signal: statistics, the selection's inputs, every loss and its gradient, on the plain and the
lean path, and the slow reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import ref_batch_stats

from tip_ray.driver.routing import join_by_rows
from tip_ray.tip import (
    LOSS_KINDS,
    TeacherSignal,
    compute_token_stats,
    distill_loss_from_logits,
    kept_token_losses,
    policy_gradient_loss_from_logits,
    token_stats_from_hidden,
)
from tip_ray.tip.stats import STAT_NAMES

VOCAB, HIDDEN, LENGTH = 23, 5, 7
ROW_K = (4, 8, 4, 8)  # the top-K of each row's teacher; joined to 8
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def _mixed(seed: int = 0, vocab: int = VOCAB):
    """Hidden states [B, T, H] and lm_head [V, H] (float64), response ids, mask, each row's own
    signal [1, T, K_i] and the signal joined to max K_i by ``join_by_rows``."""
    g = torch.Generator().manual_seed(seed)
    batch = len(ROW_K)
    h = torch.randn(batch, LENGTH, HIDDEN, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, HIDDEN, generator=g, dtype=torch.float64) * 0.8
    logits = h @ w.T
    ids = torch.multinomial(torch.softmax(logits.reshape(-1, vocab), -1), 1, generator=g).reshape(batch, LENGTH)
    teacher = logits + torch.randn(batch, LENGTH, vocab, generator=g, dtype=torch.float64) * 1.5
    mask = torch.ones(batch, LENGTH, dtype=torch.bool)
    mask[:, :2] = False
    mask[1, -2:] = False
    own = [TeacherSignal.from_logits(teacher[i : i + 1], ids[i : i + 1], k) for i, k in enumerate(ROW_K)]
    joined = join_by_rows([(f"t{i}", [i], s) for i, s in enumerate(own)], batch)
    return h, w, ids.masked_fill(~mask, -100), mask, own, joined


def test_the_join_pads_smaller_top_k_with_absent_slots():
    _, _, _, _, own, joined = _mixed()
    assert joined.k == 8
    small = joined.topk_ids[0]
    assert torch.equal(small[:, :4], own[0].topk_ids[0]) and torch.equal(joined.topk_ids[1], own[1].topk_ids[0])
    assert torch.equal(small[:, 4:], small[:, :1].expand(-1, 4))  # absent slots repeat the first id
    assert bool(torch.isneginf(joined.topk_logprobs[0, :, 4:]).all())
    assert bool(torch.isfinite(joined.topk_logprobs[1]).all())
    assert joined.absent_slots().sum(-1)[:, 0].tolist() == [4, 0, 4, 0]
    assert joined.finite_at(torch.ones(4, LENGTH, dtype=torch.bool))
    for i, s in enumerate(own):  # the teacher-entropy metric reads each row as its own signal
        torch.testing.assert_close(joined.bucket_entropy()[i : i + 1], s.bucket_entropy(), **TIGHT)
    assert joined.padded_to(8) is joined
    with pytest.raises(ValueError, match="cannot pad"):
        joined.padded_to(3)


@pytest.mark.parametrize("ta_k", [3, 6, 16])  # below, between and above the two top-Ks
def test_statistics_of_each_row_equal_its_own_signal_and_the_reference(ta_k):
    h, w, ids, mask, own, joined = _mixed()
    logits = h @ w.T
    paths = {
        "plain": compute_token_stats(logits, ids, joined, mask, ta_k=ta_k),
        "lean": token_stats_from_hidden(h, w, joined, ids, mask, ta_k=ta_k),
        "streamed": token_stats_from_hidden(h, w, joined, ids, mask, ta_k=ta_k, vocab_chunk=5, chunk_rows=3),
    }
    for i in range(len(ROW_K)):
        alone = compute_token_stats(logits[i : i + 1], ids[i : i + 1], own[i], mask[i : i + 1], ta_k=ta_k)
        s = own[i]
        ref = ref_batch_stats(logits[i : i + 1].numpy(), ids[i : i + 1].clamp(min=0).numpy(), s.topk_ids.numpy(),
                              s.topk_logprobs.numpy(), s.sampled_logprobs.numpy(), mask[i : i + 1].numpy(),
                              ta_k=ta_k)
        for name in STAT_NAMES:
            for path, stats in paths.items():
                got = getattr(stats, name)[i : i + 1]
                torch.testing.assert_close(got, getattr(alone, name), **TIGHT, msg=f"{path} {name} row {i}")
                np.testing.assert_allclose(got.numpy(), ref[name], rtol=1e-9, atol=1e-11, err_msg=f"{path} {name}")


def _row_grads(loss: torch.Tensor, *leaves: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("kind, vocab", [*((kind, VOCAB) for kind in LOSS_KINDS), ("rkl", 9), ("jsd", 9)])
def test_every_loss_and_its_gradient_per_row_equal_its_own_signal(kind, vocab):
    # vocab 9 < K + 2: the lean loss takes its autograd path over the whole vocabulary.
    h0, w0, ids, mask, own, joined = _mixed(1, vocab)
    beta = 0.3
    for i in range(len(ROW_K)):
        weights = torch.zeros(len(ROW_K), LENGTH, dtype=torch.float64)
        weights[i] = mask[i].double() * torch.linspace(0.5, 1.5, LENGTH, dtype=torch.float64)
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        plain = distill_loss_from_logits(h @ w.T, ids, joined, mask, weights, kind=kind, beta=beta, denominator=1.0)
        lean = kept_token_losses(h, w, joined, ids, weights, mask, kind=kind, beta=beta, denominator=1.0,
                                 chunk_rows=2).loss
        hi, wi = h0[i : i + 1].clone().requires_grad_(True), w0.clone().requires_grad_(True)
        alone = distill_loss_from_logits(hi @ wi.T, ids[i : i + 1], own[i], mask[i : i + 1], weights[i : i + 1],
                                         kind=kind, beta=beta, denominator=1.0)
        g_alone = _row_grads(alone, hi, wi)
        for name, value in (("plain", plain), ("lean", lean)):
            torch.testing.assert_close(value, alone, **TIGHT, msg=f"{name} {kind} row {i}")
            g_h, g_w = _row_grads(value, h, w)
            torch.testing.assert_close(g_h[i : i + 1], g_alone[0], **TIGHT, msg=f"{name} {kind} row {i} hidden")
            assert not bool(g_h[torch.arange(len(ROW_K)) != i].any())
            torch.testing.assert_close(g_w, g_alone[1], **TIGHT, msg=f"{name} {kind} row {i} lm_head")


def test_the_task_reward_term_per_row_equals_its_own_signal():
    h0, w0, ids, mask, own, joined = _mixed(2)
    for i in range(len(ROW_K)):
        weights = torch.zeros(len(ROW_K), LENGTH, dtype=torch.float64)
        weights[i] = mask[i].double()
        advantages = torch.zeros(len(ROW_K), dtype=torch.float64)
        advantages[i] = -0.7
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        lean = kept_token_losses(h, w, joined, ids, weights, mask, denominator=1.0, advantages=advantages,
                                 reward_coef=0.4, reward_denominator=1.0, chunk_rows=3)
        hi, wi = h0[i : i + 1].clone().requires_grad_(True), w0.clone().requires_grad_(True)
        logits = hi @ wi.T
        alone = (distill_loss_from_logits(logits, ids[i : i + 1], own[i], mask[i : i + 1], weights[i : i + 1],
                                          denominator=1.0)
                 + 0.4 * policy_gradient_loss_from_logits(logits, ids[i : i + 1], advantages[i : i + 1],
                                                          mask[i : i + 1], denominator=1.0))
        torch.testing.assert_close(lean.loss, alone, **TIGHT)
        g_h, g_w = _row_grads(lean.loss, h, w)
        a_h, a_w = _row_grads(alone, hi, wi)
        torch.testing.assert_close(g_h[i : i + 1], a_h, **TIGHT)
        torch.testing.assert_close(g_w, a_w, **TIGHT)


def test_absent_slots_are_refused_where_they_cannot_be_read():
    _, _, ids, mask, _, joined = _mixed()
    ids_ok = ids.clamp(min=0)
    bad = TeacherSignal(joined.topk_ids.clone(), joined.topk_logprobs.clone(), joined.sampled_logprobs)
    bad.topk_ids[0, 3, 5] = 11  # -inf at an id that is not the row's first: not an absent slot
    assert not bad.finite_at(mask)
    with pytest.raises(ValueError, match="NaN or inf"):
        bad.validate(4, LENGTH, VOCAB, mask)
    first = TeacherSignal(joined.topk_ids, joined.topk_logprobs.clone(), joined.sampled_logprobs)
    first.topk_logprobs[1, 3, 0] = float("-inf")  # slot 0 is never absent
    with pytest.raises(ValueError, match="NaN or inf"):
        first.validate(4, LENGTH, VOCAB, mask)
    full = TeacherSignal.from_logits(torch.randn(1, 3, 6, dtype=torch.float64), ids_ok[:1, :3] % 6, 2).padded_to(6)
    with pytest.raises(ValueError, match="full-distribution"):
        full.validate(1, 3, 6)
