"""The kept-token loss's gradient by bucket masses (``_bucketed_chunk_grad``, top-K signals).

It must equal autograd through the full-vocabulary loss (the plain path) in every case the
bucket algebra has to get right: the sampled id inside or outside the teacher's top-K, a teacher
id listed twice, heads with a bias and in bf16, every loss kind; and a chunk must hold one
[chunk_rows, V] float32 tensor at a time (the autograd path holds several).
"""

from __future__ import annotations

import weakref

import pytest
import torch
from head_inputs import head_inputs
from torch.utils._python_dispatch import TorchDispatchMode

from tip_ray.tip import LOSS_KINDS, TeacherSignal, distill_loss_from_logits, kept_token_loss


def _inputs(vocab=37, k=5, batch=3, length=9, hidden=6, dtype=torch.float64, seed=0):
    h, w, bias, ids, signal, mask, g = head_inputs(vocab, k, batch, length, hidden, dtype, seed)
    weights = torch.where(mask, torch.rand(batch, length, generator=g, dtype=torch.float64) + 0.5, 0.0)
    return h, w, bias, signal, ids.masked_fill(~mask, -100), mask, weights


def _lean_and_plain(h, w, bias, signal, ids, mask, weights, kind, chunk_rows=4):
    lean = kept_token_loss(h, w, signal, ids, weights.to(h.dtype), mask, lm_head_bias=bias, kind=kind, beta=0.3,
                           chunk_rows=chunk_rows)
    got = torch.autograd.grad(lean, (h, w, bias))
    plain = distill_loss_from_logits(torch.nn.functional.linear(h, w, bias), ids, signal, mask,
                                     weights.to(h.dtype), kind=kind, beta=0.3)
    want = torch.autograd.grad(plain, (h, w, bias))
    return (lean, got), (plain, want)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_bucketed_gradient_equals_autograd_through_the_full_vocabulary(kind):
    h, w, bias, signal, ids, mask, weights = _inputs()
    in_top_k = (signal.topk_ids == ids.clamp(min=0).unsqueeze(-1)).any(-1)[mask]
    assert bool(in_top_k.any()) and bool((~in_top_k).any())  # both cases of the sampled bucket occur
    (lean, got), (plain, want) = _lean_and_plain(h, w, bias, signal, ids, mask, weights, kind)
    torch.testing.assert_close(lean, plain)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_a_teacher_id_listed_twice_gets_both_slots_gradients():
    h, w, bias, signal, ids, mask, weights = _inputs(k=4)
    topk_ids = signal.topk_ids.clone()
    topk_ids[..., 1] = topk_ids[..., 0]
    twice = TeacherSignal(topk_ids, signal.topk_logprobs - 0.7, signal.sampled_logprobs)
    (lean, got), (plain, want) = _lean_and_plain(h, w, bias, twice, ids, mask, weights, "rkl")
    torch.testing.assert_close(lean, plain)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_a_support_covering_the_vocabulary_takes_the_autograd_path():
    # K + 1 = V: no id may be left for the tail once the sampled id is outside the top-K.
    h, w, bias, signal, ids, mask, weights = _inputs(vocab=6, k=5)
    (lean, got), (plain, want) = _lean_and_plain(h, w, bias, signal, ids, mask, weights, "fkl")
    torch.testing.assert_close(lean, plain)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_bf16_head_gradients_are_close_to_float64():
    h, w, bias, signal, ids, mask, weights = _inputs(vocab=301, k=8, hidden=16)
    ref = kept_token_loss(h, w, signal, ids, weights, mask, lm_head_bias=bias, chunk_rows=5)
    ref_grads = torch.autograd.grad(ref, (h, w))
    hb, wb = (t.detach().bfloat16().requires_grad_(True) for t in (h, w))
    out = kept_token_loss(hb, wb, signal, ids, weights.float(), mask, lm_head_bias=bias.detach().bfloat16(),
                          chunk_rows=5)
    grads = torch.autograd.grad(out, (hb, wb))
    assert abs(out.item() - ref.item()) < 0.02 * abs(ref.item())
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        assert float((got.double() - want).norm() / want.norm()) < 0.05


class _LiveLargeBuffers(TorchDispatchMode):
    """The most distinct storages of at least ``threshold`` elements alive at once among the
    tensors the operations returned (views of one storage count once)."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold
        self.live: list[weakref.ref] = []
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.threshold:
                self.live.append(weakref.ref(t))
        alive = [r() for r in self.live]
        self.live = [r for r, t in zip(self.live, alive) if t is not None]
        storages = {t.untyped_storage().data_ptr() for t in alive if t is not None}
        self.most = max(self.most, len(storages))
        return out


@pytest.mark.parametrize(("k", "dtype", "most"), [(8, torch.float32, 1), (8, torch.bfloat16, 2), (None, torch.float32, 3)])
def test_a_chunk_holds_one_float32_rows_by_vocabulary_tensor(k, dtype, most):
    # V >> hidden size, so the [V, H] head gradient stays under the threshold of a chunk's logits.
    chunk_rows, vocab = 16, 4096
    h, w, bias, signal, ids, mask, weights = _inputs(vocab=vocab, k=k or vocab, batch=4, length=12, hidden=4)
    h, w = (t.detach().to(dtype).requires_grad_(True) for t in (h, w))
    with _LiveLargeBuffers(chunk_rows * vocab) as probe:
        loss = kept_token_loss(h, w, signal, ids, weights.float(), mask, chunk_rows=chunk_rows)
        loss.backward()
    if k is None:
        # Full mode keeps autograd through the whole row (the probe sees its temporaries).
        assert probe.most >= most, probe.most
    else:
        # The logits (bf16: and their float32 copy, or the gradient's bf16 copy) and nothing else.
        assert probe.most <= most, probe.most
