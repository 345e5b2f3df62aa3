"""The dense full-distribution signal (``topk_ids`` None: the column is the id) against the same
distribution sent with its ids: every statistic, loss and gradient equal on the plain and the
lean path; the closed-form full-vocabulary gradient and divergences against the masked kernels
and autograd; its checks and its joins."""

from __future__ import annotations

import math

import pytest
import torch

from tip_ray.driver.routing import join_by_rows
from tip_ray.runtime.pools import join_signals
from tip_ray.teacher.layout import padding_logprob
from tip_ray.tip import (
    LOSS_KINDS,
    TeacherSignal,
    compute_token_stats,
    distill_loss_from_logits,
    kept_token_losses,
    token_stats_from_hidden,
)
from tip_ray.tip.lean import _autograd_chunk_grad, _full_chunk_grad
from tip_ray.tip.lean_stats import full_stats_from_log_probs
from tip_ray.tip.stats import STAT_NAMES, stats_for_rows
from tip_ray.tip.support import full_divergences, full_teacher_log, generalized_jsd_over, kl_over

VOCAB, HIDDEN, BATCH, LENGTH = 29, 6, 3, 8
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def _pair(seed: int = 0):
    """float64 hidden [B, T, H], lm_head [V, H], response ids, mask, and the teacher's distribution
    twice: dense and listed with its ids (K = V, descending log-prob)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(BATCH, LENGTH, HIDDEN, generator=g, dtype=torch.float64)
    w = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64) * 0.8
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)
    teacher = h @ w.T + torch.randn(BATCH, LENGTH, VOCAB, generator=g, dtype=torch.float64) * 1.5
    mask = torch.ones(BATCH, LENGTH, dtype=torch.bool)
    mask[:, :2] = False
    mask[2, -3:] = False
    dense = TeacherSignal.from_logits(teacher, ids, None)
    listed = TeacherSignal.from_logits(teacher, ids, VOCAB)
    return h, w, ids, mask, dense, listed


def test_from_logits_sends_the_whole_distribution_dense():
    _, _, _, mask, dense, listed = _pair()
    assert dense.dense and not listed.dense and dense.k == listed.k == VOCAB and dense.is_full(VOCAB)
    by_id = torch.empty_like(listed.topk_logprobs).scatter_(-1, listed.topk_ids.long(), listed.topk_logprobs)
    torch.testing.assert_close(dense.topk_logprobs, by_id, rtol=0, atol=0)
    with_ids = dense.with_ids()
    assert with_ids.topk_ids.dtype == torch.int32 and torch.equal(
        with_ids.topk_ids, torch.arange(VOCAB, dtype=torch.int32).expand(BATCH, LENGTH, VOCAB))
    assert with_ids.with_ids() is with_ids and not bool(dense.absent_slots().any())
    ids, lps, sampled = dense.rows(mask)
    assert ids is None and lps.shape == (int(mask.sum()), VOCAB) and sampled.shape == (int(mask.sum()),)
    assert dense.padded_to(VOCAB) is dense


@pytest.mark.parametrize("vocab_chunk", [7, 1024], ids=["streamed", "whole-row"])
def test_dense_and_listed_give_the_same_statistics(vocab_chunk):
    h, w, ids, mask, dense, listed = _pair(1)
    logits = h @ w.T
    plain = compute_token_stats(logits, ids, listed, mask)
    for signal in (dense, listed):
        for stats in (compute_token_stats(logits, ids, signal, mask),
                      token_stats_from_hidden(h, w, signal, ids, mask, vocab_chunk=vocab_chunk, chunk_rows=5)):
            for name in STAT_NAMES:
                torch.testing.assert_close(getattr(stats, name)[mask], getattr(plain, name)[mask], **TIGHT,
                                           msg=name)


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("with_advantages", [False, True], ids=["distill", "reward"])
def test_dense_and_listed_give_the_same_losses_and_gradients(kind, with_advantages):
    h, w, ids, mask, dense, listed = _pair(2)
    weights = mask * torch.rand(BATCH, LENGTH, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    advantages = torch.tensor([0.7, -1.2, 0.0], dtype=torch.float64) if with_advantages else None
    reference = distill_loss_from_logits(h @ w.T, ids, listed, mask, weights, kind=kind)
    results = []
    for signal in (dense, listed):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = kept_token_losses(hh, ww, signal, ids, weights, mask, kind=kind, chunk_rows=4,
                                advantages=advantages)
        out.loss.backward()
        results.append((out.loss.detach(), out.distill, hh.grad, ww.grad))
        torch.testing.assert_close(out.distill, reference.detach(), **TIGHT)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("kind", ["rkl", "fkl"])
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "listed"])
@pytest.mark.parametrize("policy_gradient", [False, True], ids=["distill", "reward"])
def test_the_closed_form_gradient_equals_autograd(kind, dense, policy_gradient):
    g = torch.Generator().manual_seed(4)
    n, vocab = 9, 41
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    teacher = torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3, -1)
    if kind == "fkl":  # an id the teacher gives no mass: no forward-KL term (reverse KL would be inf)
        teacher[0, 3] = float("-inf")
        teacher[0] -= torch.logsumexp(teacher[0], -1)
    ids, values = None, teacher
    if not dense:
        values, ids = teacher.sort(dim=-1, descending=True)
    response = torch.randint(0, vocab, (n,), generator=g)
    sampled = teacher.gather(-1, response[:, None])[:, 0]
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    coefs = torch.randn(n, generator=g, dtype=torch.float64) if policy_gradient else None
    args = (response, ids, values, sampled, weights, kind, 0.5, coefs)
    expected = _autograd_chunk_grad(logits.clone(), *args)
    got = _full_chunk_grad(logits.clone(), *args)
    for a, b in zip(expected, got):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a, **TIGHT)


def test_full_divergences_equal_the_masked_kernels():
    g = torch.Generator().manual_seed(5)
    student = torch.log_softmax(torch.randn(6, 33, generator=g, dtype=torch.float64) * 4, -1)
    teacher = torch.log_softmax(torch.randn(6, 33, generator=g, dtype=torch.float64) * 4, -1)
    teacher[1, :5] = float("-inf")  # ids the teacher gives no mass
    valid = torch.ones_like(student, dtype=torch.bool)
    rkl, fkl, jsd = full_divergences(student, teacher)
    torch.testing.assert_close(rkl, kl_over(student, teacher, valid), **TIGHT)
    torch.testing.assert_close(fkl, kl_over(teacher, student, valid), **TIGHT)
    torch.testing.assert_close(jsd, generalized_jsd_over(student, teacher, valid, 0.5), **TIGHT)
    assert math.isinf(rkl[1].item()) and bool(torch.isfinite(torch.cat([rkl[:1], rkl[2:], fkl, jsd])).all())
    # Summed over vocabulary blocks, as the streamed statistics do.
    parts = [full_divergences(student[:, i : i + 10], teacher[:, i : i + 10]) for i in range(0, 33, 10)]
    torch.testing.assert_close(sum(p[2] for p in parts), jsd, **TIGHT)


def test_a_dense_signal_is_checked_like_any_other():
    _, _, _, mask, dense, _ = _pair(6)
    with pytest.raises(ValueError, match="a dense teacher signal holds every id of the vocabulary"):
        dense.validate(BATCH, LENGTH, VOCAB + 1, mask)
    nan = dense.topk_logprobs.clone()
    nan[0, 4, 2] = float("nan")
    broken = TeacherSignal(None, nan, dense.sampled_logprobs)
    assert not broken.finite_at(mask) and dense.finite_at(mask)
    with pytest.raises(ValueError, match="teacher.topk_logprobs holds NaN or inf"):
        broken.validate(BATCH, LENGTH, VOCAB, mask)
    heavy = TeacherSignal(None, dense.topk_logprobs + 0.05, dense.sampled_logprobs)
    with pytest.raises(ValueError, match="probability mass of"):
        heavy.validate(BATCH, LENGTH, VOCAB, mask)
    with pytest.raises(ValueError, match="must be \\[B, T, K\\]"):
        TeacherSignal(None, dense.topk_logprobs[0], dense.sampled_logprobs).validate(BATCH, LENGTH, VOCAB)
    with pytest.raises(ValueError, match="cannot be padded"):
        dense.padded_to(VOCAB + 3)


def test_dense_shards_join_dense_and_beside_a_top_k_teacher_with_their_ids():
    h, w, ids, mask, dense, _ = _pair(7)
    # The teacher pool's shards: rows cut to their own width, joined back; padding uniform.
    parts = [([0, 2], TeacherSignal(None, dense.topk_logprobs[[0, 2], :5], dense.sampled_logprobs[[0, 2], :5])),
             ([1], TeacherSignal(None, dense.topk_logprobs[[1]], dense.sampled_logprobs[[1]]))]
    joined = join_signals(parts, BATCH, LENGTH + 1, VOCAB)
    assert joined.dense and joined.topk_logprobs.shape == (BATCH, LENGTH, VOCAB)
    torch.testing.assert_close(joined.topk_logprobs[1], dense.topk_logprobs[1], rtol=0, atol=0)
    torch.testing.assert_close(joined.topk_logprobs[[0, 2], :5], dense.topk_logprobs[[0, 2], :5], rtol=0, atol=0)
    assert bool((joined.topk_logprobs[[0, 2], 5:] == padding_logprob(VOCAB)).all())
    with pytest.raises(ValueError, match="mix dense and top-K"):
        listed = TeacherSignal(*dense.with_ids().rows([1]))
        join_signals([parts[0], ([1], listed)], BATCH, LENGTH + 1, VOCAB)
    # Routed teachers: all dense stays dense; beside a top-K teacher the dense rows get their ids
    # and read as the same distribution.
    rows = [TeacherSignal(None, dense.topk_logprobs[[i]], dense.sampled_logprobs[[i]]) for i in range(BATCH)]
    assert join_by_rows([(f"t{i}", [i], s) for i, s in enumerate(rows)], BATCH).dense
    top = TeacherSignal.from_logits(torch.randn(1, LENGTH, VOCAB, dtype=torch.float64), ids[[1]], 4)
    mixed = join_by_rows([("a", [0], rows[0]), ("b", [1], top), ("c", [2], rows[2])], BATCH)
    assert not mixed.dense and mixed.k == VOCAB
    logits = h @ w.T
    for i, own in ((0, rows[0]), (2, rows[2])):
        a = compute_token_stats(logits[[i]], ids[[i]], own, mask[[i]])
        b = compute_token_stats(logits[[i]], ids[[i]], TeacherSignal(*mixed.rows([i])), mask[[i]])
        for name in STAT_NAMES:
            torch.testing.assert_close(getattr(a, name), getattr(b, name), **TIGHT, msg=name)


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "listed"])
def test_a_signal_pickles_its_tensors_out_of_band(dense):
    import pickle

    _, _, _, _, signal, listed = _pair(8)
    signal = signal if dense else listed
    signal = TeacherSignal(signal.topk_ids, signal.topk_logprobs.to(torch.bfloat16), signal.sampled_logprobs)
    buffers = []
    blob = pickle.dumps(signal, protocol=5, buffer_callback=buffers.append)
    # The tensors travel as out-of-band buffers (Ray's object store reads them in place), not in the stream.
    assert len(buffers) == (2 if dense else 3) and len(blob) < 1024
    back = pickle.loads(blob, buffers=buffers)
    assert back.dense == dense
    for a, b in zip((back.topk_ids, back.topk_logprobs, back.sampled_logprobs),
                    (signal.topk_ids, signal.topk_logprobs, signal.sampled_logprobs)):
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))
    # In-band (plain pickle, torch.save): the same signal; a strided view is made contiguous first.
    view = TeacherSignal(None, signal.topk_logprobs[:, 2:5].to(torch.float32), signal.sampled_logprobs[:, 2:5])
    again = pickle.loads(pickle.dumps(view))
    assert torch.equal(again.topk_logprobs, view.topk_logprobs) and again.topk_logprobs.shape == (BATCH, 3, VOCAB)


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [("logprobs", float("inf"), "teacher.topk_logprobs holds NaN or inf"),
     ("logprobs", float("-inf"), "teacher.topk_logprobs holds NaN or inf"),
     ("logprobs", 0.5, "teacher.topk_logprobs holds values > 0 \\(max 0.5\\)"),
     ("sampled", float("nan"), "teacher.sampled_logprobs holds NaN or inf"),
     ("sampled", 0.25, "teacher.sampled_logprobs holds values > 0 \\(max 0.25\\)")],
)
def test_dense_rows_are_checked_from_their_row_reductions(where, value, message):
    """The dense checks read each row's max and min instead of [N, V] boolean tensors: every bad
    value is still caught, at a checked position only, with the message of the listed form."""
    _, _, ids, mask, dense, listed = _pair(8)
    lps, samp = dense.topk_logprobs.clone(), dense.sampled_logprobs.clone()
    if where == "logprobs":
        lps[1, 5, 7] = value
    else:
        samp[1, 5] = value
    broken = TeacherSignal(None, lps, samp)
    with pytest.raises(ValueError, match=message):
        broken.validate(BATCH, LENGTH, VOCAB, mask)
    if where == "logprobs" and not math.isfinite(value):
        assert not broken.finite_at(mask)
    # The same value where the loss never reads (a prompt position) is no error.
    elsewhere = mask.clone()
    elsewhere[1, 5] = False
    broken.validate(BATCH, LENGTH, VOCAB, elsewhere)
    assert broken.finite_at(elsewhere)


def test_checked_rows_are_the_rows_it_checked():
    _, _, _, mask, dense, listed = _pair(9)
    for signal in (dense, listed):
        checked = signal.checked_rows(BATCH, LENGTH, VOCAB, mask)
        for got, want in zip(checked, signal.rows(mask)):
            assert (got is None and want is None) or torch.equal(got, want)
    empty = torch.zeros_like(mask)
    assert dense.checked_rows(BATCH, LENGTH, VOCAB, empty)[1].shape == (0, VOCAB)
    with pytest.raises(ValueError, match="teacher signal covers"):
        dense.checked_rows(BATCH, LENGTH + 1, VOCAB, torch.ones(BATCH, LENGTH + 1, dtype=torch.bool))


@pytest.mark.parametrize("vocab_chunk", [7, 29, 64])
def test_full_statistics_from_log_probs_equal_the_row_kernel(vocab_chunk):
    """The statistics the closed-form gradient reports (rule `all`) from its own log-probs equal
    ``stats_for_rows`` on the logits, whatever the vocabulary blocks of the divergences."""
    h, w, ids, mask, dense, listed = _pair(10)
    logits = h[mask] @ w.T
    for signal in (dense, listed):
        t_ids, t_lp, t_samp = signal.rows(mask)
        want = stats_for_rows(logits, ids[mask], t_ids, t_lp, t_samp, 5)
        s = torch.log_softmax(logits, -1)
        got = full_stats_from_log_probs(s, s.exp(), full_teacher_log(t_ids, t_lp, VOCAB, s.dtype), ids[mask], t_samp,
                                        ta_k=5, vocab_chunk=vocab_chunk)
        for name in STAT_NAMES:
            torch.testing.assert_close(got[name], want[name], **TIGHT, msg=name)


def test_the_closed_form_reports_the_statistics_and_refuses_bad_logits():
    h, w, ids, mask, dense, _ = _pair(11)
    logits = h[mask] @ w.T
    rows = (ids[mask], *dense.rows(mask))
    weights = torch.ones(logits.shape[0], dtype=torch.float64)

    class Sink:
        ta_k, vocab_chunk, chunks = 5, 16, []

    loss, _, grad = _full_chunk_grad(logits.clone(), *rows, weights, "rkl", 0.5, None, sink=Sink)
    plain_loss, _, plain_grad = _full_chunk_grad(logits.clone(), *rows, weights, "rkl", 0.5)
    torch.testing.assert_close(loss, plain_loss, **TIGHT)
    torch.testing.assert_close(grad, plain_grad, **TIGHT)
    want = stats_for_rows(logits, *rows, 5)
    for name in STAT_NAMES:
        torch.testing.assert_close(Sink.chunks[0][name], want[name], **TIGHT, msg=name)
    torch.testing.assert_close((Sink.chunks[0]["rkl"] * weights).sum(), loss, **TIGHT)
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = logits.clone()
        broken[3, 4] = bad
        with pytest.raises(ValueError, match="student logits hold NaN or inf"):
            _full_chunk_grad(broken, *rows, weights, "rkl", 0.5, None, sink=Sink)
