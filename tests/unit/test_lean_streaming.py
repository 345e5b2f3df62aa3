"""The statistics pass streamed over vocabulary blocks (``vocab_chunk`` < V).

Every statistic must equal the unstreamed pass (``vocab_chunk`` >= V, which hands whole rows of
logits to ``stats_for_rows``) and the float64 statistics of the full logits; and no operation of
the streamed pass may produce a [chunk_rows, V] tensor.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tip_ray.config import LearnerConfig
from tip_ray.tip import TeacherSignal
from tip_ray.tip.lean_stats import token_stats_from_hidden
from tip_ray.tip.stats import STAT_NAMES, compute_token_stats

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=1e-5, atol=1e-5)}


def inputs(vocab: int, k: int | None, dtype: torch.dtype, seed: int = 0, batch: int = 3, length: int = 13,
           hidden_size: int = 8, bias: bool = True, scale: float = 1.0):
    """Hidden states [B, T, H], head [V, H], bias [V], sampled ids, a teacher (top-k, or full for
    k None) and a mask with some rows off; the float64 values are rounded to ``dtype`` first."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, hidden_size, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64) * scale).to(dtype)
    b = (torch.randn(vocab, generator=g, dtype=torch.float64) * 0.1).to(dtype) if bias else None
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    teacher = TeacherSignal.from_logits(torch.randn(batch, length, vocab, generator=g, dtype=torch.float64) * 2,
                                        ids, k)
    mask = torch.rand(batch, length, generator=g) < 0.8
    mask[0] = False  # a whole masked-out sequence
    ids = ids.masked_fill(~mask, -100)  # padding ids at masked positions are never read
    return hidden, weight, b, teacher, ids, mask


def assert_stats_close(got, want, tol) -> None:
    for name in STAT_NAMES:
        torch.testing.assert_close(getattr(got, name).double(), getattr(want, name).double(), **tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("vocab", "k", "vocab_chunk"), [
    (97, 8, 10),     # V not a multiple of the block; K spread over several blocks
    (97, 32, 1),     # one vocabulary id per block
    (300, 32, 64),   # the default top-K width of the teacher
    (97, None, 13),  # full mode, K = V: exact divergences
    (40, 1, 3),      # K = 1 < ta_k
    (12, 4, 5),      # ta_k (16) > V: the top-k is the whole vocabulary
])
def test_streamed_statistics_equal_the_unstreamed_pass(vocab, k, vocab_chunk, dtype):
    hidden, weight, bias, teacher, ids, mask = inputs(vocab, k, dtype, seed=vocab + (k or 0))
    streamed = token_stats_from_hidden(hidden, weight, teacher, ids, mask, lm_head_bias=bias, chunk_rows=5,
                                       vocab_chunk=vocab_chunk)
    whole = token_stats_from_hidden(hidden, weight, teacher, ids, mask, lm_head_bias=bias, chunk_rows=5,
                                    vocab_chunk=vocab)
    assert_stats_close(streamed, whole, TOL[dtype])
    for name in STAT_NAMES:
        assert getattr(streamed, name).dtype == getattr(whole, name).dtype, name
        assert bool((getattr(streamed, name)[~mask] == 0).all()), name
    # And the float64 statistics of the same (rounded) logits, as the reference tests take them.
    logits = torch.nn.functional.linear(hidden.double(), weight.double(), bias.double())
    assert_stats_close(streamed, compute_token_stats(logits, ids, teacher, mask), TOL[dtype])


@pytest.mark.parametrize("k", [6, None])
def test_peaked_students_and_teachers_keep_their_small_tails(k):
    # Large logits: the tail bucket and the entropy are tiny differences, where an online sum
    # rescaled without care would cancel.
    hidden, weight, bias, teacher, ids, mask = inputs(211, k, torch.float32, seed=5, scale=6.0)
    streamed = token_stats_from_hidden(hidden, weight, teacher, ids, mask, lm_head_bias=bias, vocab_chunk=16)
    logits = torch.nn.functional.linear(hidden.double(), weight.double(), bias.double())
    assert_stats_close(streamed, compute_token_stats(logits, ids, teacher, mask), dict(rtol=1e-4, atol=1e-5))


def test_tied_logits_pick_the_lower_ids_for_the_student_top_k():
    # A head with duplicated rows: many exactly tied logits, across block boundaries.
    vocab, k = 60, 8
    hidden, weight, _, teacher, ids, mask = inputs(vocab, k, torch.float32, seed=7, bias=False)
    weight = weight[torch.arange(vocab) % 7].contiguous()
    streamed = token_stats_from_hidden(hidden, weight, teacher, ids, mask, vocab_chunk=9)
    whole = token_stats_from_hidden(hidden, weight, teacher, ids, mask, vocab_chunk=vocab)
    assert_stats_close(streamed, whole, TOL[torch.float32])


def test_nan_logits_are_refused_in_any_block():
    hidden, weight, _, teacher, ids, mask = inputs(50, 4, torch.float32, bias=False)
    weight[45, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        token_stats_from_hidden(hidden, weight, teacher, ids, mask, vocab_chunk=8)


def test_vocab_chunk_is_validated():
    hidden, weight, _, teacher, ids, mask = inputs(20, 4, torch.float32, bias=False)
    with pytest.raises(ValueError, match="vocab_chunk"):
        token_stats_from_hidden(hidden, weight, teacher, ids, mask, vocab_chunk=0)
    with pytest.raises(ValueError, match="learner.vocab_chunk"):
        LearnerConfig(model="m", vocab_chunk=0)
    assert LearnerConfig(model="m").vocab_chunk >= 1


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_operation_makes_a_rows_by_vocabulary_tensor(dtype):
    # V >> vocab_chunk; the teacher top-K, hidden size and row count are small beside both.
    vocab, vocab_chunk, chunk_rows, k = 8192, 256, 32, 8
    hidden, weight, bias, teacher, ids, mask = inputs(vocab, k, dtype, batch=4, length=24, hidden_size=4)
    with _LargestOutput() as streamed:
        token_stats_from_hidden(hidden, weight, teacher, ids, mask, lm_head_bias=bias, chunk_rows=chunk_rows,
                                vocab_chunk=vocab_chunk)
    assert streamed.largest <= 2 * chunk_rows * vocab_chunk, streamed.largest
    assert streamed.largest < chunk_rows * vocab // 8
    # The probe sees the [chunk_rows, V] logits of the unstreamed pass.
    with _LargestOutput() as whole:
        token_stats_from_hidden(hidden, weight, teacher, ids, mask, lm_head_bias=bias, chunk_rows=chunk_rows,
                                vocab_chunk=vocab)
    assert whole.largest >= chunk_rows * vocab


def test_a_full_precision_head_is_read_in_place_block_by_block(monkeypatch):
    from tip_ray.tip import lean as lean_module

    hidden, weight, _, teacher, ids, mask = inputs(100, 8, torch.float32, bias=False)
    storages = []
    original = lean_module.F.linear

    def recording_linear(x, w, b=None):
        storages.append((w.untyped_storage().data_ptr(), w.shape[0]))
        return original(x, w, b)

    monkeypatch.setattr(lean_module.F, "linear", recording_linear)
    token_stats_from_hidden(hidden, weight, teacher, ids, mask, vocab_chunk=30)
    assert storages and all(ptr == weight.untyped_storage().data_ptr() for ptr, _ in storages), "the head was copied"
    assert max(rows for _, rows in storages) == 30
