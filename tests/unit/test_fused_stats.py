"""The statistics taken from the kept-token loss's own chunk logits (``with_stats``: the rule
``all``, where every valid row runs through the loss anyway).

They must equal the statistics pass (``token_stats_from_hidden`` on the same rows, chunking and
vocabulary blocks) and the float64 statistics of the same logits, leave the loss and its
gradients exactly as they are without them, and add no [rows, V] temporary to the chunk's own
logits.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.head_inputs import head_inputs
from tests.unit.test_lean_streaming import _LargestOutput, assert_stats_close, inputs
from tip_ray.tip import TeacherSignal
from tip_ray.tip.lean import fused_stats_exact, kept_token_losses, stats_from_logit_rows
from tip_ray.tip.lean_stats import token_stats_from_hidden
from tip_ray.tip.stats import STAT_NAMES, compute_token_stats, stats_for_rows

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _losses(hidden, weight, bias, teacher, ids, mask, *, with_stats, advantages=None, **kw):
    h, w = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    out = kept_token_losses(h, w, teacher, ids, mask.to(hidden.dtype), mask, lm_head_bias=b, with_stats=with_stats,
                            advantages=advantages, **kw)
    out.loss.backward()
    return out, (h.grad, w.grad, None if b is None else b.grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("vocab", "k", "vocab_chunk", "chunk_rows"), [
    (97, 8, 10, 5),      # V not a multiple of the block, several row chunks
    (300, 32, 64, 7),    # the teacher's default top-K width
    (97, None, 13, 4),   # full mode (K = V): exact divergences, the autograd gradient path
    (40, 1, 300, 64),    # one vocabulary block, one row chunk; K = 1 < ta_k
])
def test_the_losss_statistics_equal_the_statistics_pass(vocab, k, vocab_chunk, chunk_rows, dtype):
    hidden, weight, bias, teacher, ids, mask = inputs(vocab, k, dtype, seed=vocab + (k or 0))
    fused, fused_grads = _losses(hidden, weight, bias, teacher, ids, mask, with_stats=True, chunk_rows=chunk_rows,
                                 vocab_chunk=vocab_chunk, kind="rkl")
    plain, plain_grads = _losses(hidden, weight, bias, teacher, ids, mask, with_stats=False, chunk_rows=chunk_rows,
                                 kind="rkl")
    assert plain.stats is None
    separate = token_stats_from_hidden(hidden, weight, teacher, ids, mask, lm_head_bias=bias, chunk_rows=chunk_rows,
                                       vocab_chunk=vocab_chunk)
    assert_stats_close(fused.stats, separate, TOL[dtype])
    for name in STAT_NAMES:
        assert getattr(fused.stats, name).dtype == getattr(separate, name).dtype, name
        assert bool((getattr(fused.stats, name)[~mask] == 0).all()), name
    assert torch.equal(fused.stats.mask, mask) and torch.equal(fused.stats.token_ids, separate.token_ids)
    logits = torch.nn.functional.linear(hidden.double(), weight.double(), bias.double())
    assert_stats_close(fused.stats, compute_token_stats(logits, ids, teacher, mask), TOL[dtype])
    # The statistics read copies of the logits: the loss and every gradient are bit for bit those
    # of the loss alone.
    assert torch.equal(fused.loss, plain.loss) and torch.equal(fused.distill, plain.distill)
    for got, want in zip(fused_grads, plain_grads):
        assert torch.equal(got, want)


def test_with_the_reward_term_the_statistics_and_gradients_are_unchanged():
    h, w, bias, ids, signal, mask, _ = head_inputs(vocab=53, k=6, batch=4, length=11)
    advantages = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64)
    kw = dict(chunk_rows=6, vocab_chunk=16, advantages=advantages, reward_coef=0.3, kind="jsd")
    fused, fused_grads = _losses(h, w, bias, signal, ids, mask, with_stats=True, **kw)
    plain, plain_grads = _losses(h, w, bias, signal, ids, mask, with_stats=False, **kw)
    separate = token_stats_from_hidden(h.detach(), w.detach(), signal, ids, mask, lm_head_bias=bias.detach(),
                                       chunk_rows=6, vocab_chunk=16)
    assert_stats_close(fused.stats, separate, TOL[torch.float64])
    assert torch.equal(fused.loss, plain.loss) and torch.equal(fused.reward, plain.reward)
    for got, want in zip(fused_grads, plain_grads):
        assert torch.equal(got, want)


def test_statistics_from_made_logits_equal_the_whole_row_kernel_and_leave_them_unchanged():
    g = torch.Generator().manual_seed(3)
    n, vocab, k = 9, 70, 5
    logits = torch.randn(n, vocab, generator=g) * 3
    ids = torch.randint(0, vocab, (n,), generator=g)
    teacher = TeacherSignal.from_logits(torch.randn(1, n, vocab, generator=g, dtype=torch.float64), ids[None], k)
    before = logits.clone()
    got = stats_from_logit_rows(logits, ids, teacher.topk_ids[0], teacher.topk_logprobs[0],
                                teacher.sampled_logprobs[0], vocab_chunk=16)
    want = stats_for_rows(logits, ids, teacher.topk_ids[0], teacher.topk_logprobs[0], teacher.sampled_logprobs[0])
    assert torch.equal(logits, before)
    for name in STAT_NAMES:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


def test_the_statistics_add_only_vocabulary_blocks_to_the_logits():
    vocab, vocab_chunk, n, k = 8192, 256, 32, 8
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, vocab, generator=g)
    ids = torch.randint(0, vocab, (n,), generator=g)
    teacher = TeacherSignal.from_logits(torch.randn(1, n, vocab, generator=g, dtype=torch.float64), ids[None], k)
    with _LargestOutput() as probe:
        stats_from_logit_rows(logits, ids, teacher.topk_ids[0], teacher.topk_logprobs[0], teacher.sampled_logprobs[0],
                              vocab_chunk=vocab_chunk)
    assert probe.largest <= 2 * n * vocab_chunk, probe.largest


def test_nan_logits_are_refused():
    hidden, weight, _, teacher, ids, mask = inputs(50, 4, torch.float32, bias=False)
    weight[45, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        kept_token_losses(hidden, weight, teacher, ids, mask.float(), mask, with_stats=True, vocab_chunk=8)


def test_with_stats_is_refused_where_it_would_differ_from_the_statistics_pass():
    hidden, weight, _, teacher, ids, mask = inputs(30, 4, torch.float32, bias=False)
    some = mask.float()
    some[mask.nonzero()[0].tolist()] = 0.0  # one valid position not kept
    with pytest.raises(ValueError, match="every valid position"):
        kept_token_losses(hidden, weight, teacher, ids, some, mask, with_stats=True)
    with pytest.raises(ValueError, match="float32 or float64"):
        kept_token_losses(hidden.bfloat16(), weight.bfloat16(), teacher, ids, mask.float(), mask, with_stats=True)
    with pytest.raises(ValueError, match="every valid position"):
        kept_token_losses(hidden, weight, teacher, ids, mask.float(), mask, with_stats=True, denominator=0.0)
    with pytest.raises(ValueError, match="vocab_chunk"):
        kept_token_losses(hidden, weight, teacher, ids, mask.float(), mask, with_stats=True, vocab_chunk=0)
    assert fused_stats_exact(torch.float32, torch.float32, torch.float32)
    assert not fused_stats_exact(torch.float32, torch.bfloat16)
    assert not fused_stats_exact(torch.bfloat16, torch.bfloat16)
    assert not fused_stats_exact(torch.float32, torch.float32, torch.bfloat16)


def test_no_valid_position_gives_empty_statistics():
    hidden, weight, _, teacher, ids, mask = inputs(30, 4, torch.float32, bias=False)
    none = torch.zeros_like(mask)
    out = kept_token_losses(hidden, weight, teacher, ids.masked_fill(~none, -100), none.float(), none,
                            with_stats=True)
    assert float(out.loss) == 0.0
    assert out.stats.num_valid == 0
    assert all(bool((getattr(out.stats, n) == 0).all()) for n in STAT_NAMES)
