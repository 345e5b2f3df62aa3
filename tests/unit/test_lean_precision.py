"""bf16 numerics of the lean path against float64 references of the same bf16 values.

The lm_head gradient sums one contribution per chunk: summed in bf16 over a thousand chunks it
drifts by several percent (the tolerance below fails with that accumulation); summed in float32
and rounded once it is as close as one bf16 rounding. The statistics' logits are float32
products of the bf16 head, computed without a float32 copy of the whole head.
"""

from __future__ import annotations

import pytest
import torch

from tip_ray.tip import TeacherSignal
from tip_ray.tip import lean as lean_module
from tip_ray.tip import lean_stats as lean_stats_module
from tip_ray.tip.lean import kept_token_loss, token_stats_from_hidden
from tip_ray.tip.stats import STAT_NAMES, compute_token_stats

B, T, H, V = 4, 256, 32, 96
BF16_EPS = 2.0**-8


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).bfloat16()
    weight = (torch.randn(V, H, generator=g) * 0.3).bfloat16()
    ids = torch.randint(0, V, (B, T), generator=g)
    teacher = TeacherSignal.from_logits(torch.randn(B, T, V, generator=g) * 2, ids, k=16)
    mask = torch.rand(B, T, generator=g) < 0.9
    weights = torch.where(mask, torch.rand(B, T, generator=g) + 0.1, torch.zeros(B, T))  # soft, not bf16-exact
    return hidden, weight, ids, teacher, mask, weights


def loss_and_grads(hidden, weight, ids, teacher, mask, weights, dtype, chunk_rows):
    h = hidden.to(dtype).detach().clone().requires_grad_(True)
    w = weight.to(dtype).detach().clone().requires_grad_(True)
    loss = kept_token_loss(h, w, teacher, ids, weights, mask, kind="rkl", chunk_rows=chunk_rows)
    loss.backward()
    return loss.detach().double(), h.grad.double(), w.grad.double()


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


def test_bf16_lean_loss_and_gradients_match_float64_with_one_row_per_chunk():
    args = inputs()
    ref_loss, ref_h, ref_w = loss_and_grads(*args, torch.float64, chunk_rows=4096)
    loss, grad_h, grad_w = loss_and_grads(*args, torch.bfloat16, chunk_rows=1)
    # The loss: bf16 logits, float32 losses and sum.
    assert abs(float(loss - ref_loss)) <= 4 * BF16_EPS * abs(float(ref_loss))
    # Each hidden row's gradient is made once, from bf16 logits (as the model's own head makes them).
    assert relative_error(grad_h, ref_h) < 4 * BF16_EPS
    # ~920 chunk contributions summed: a bf16 running sum is off by 2.4% here (three times the
    # bound), the float32 sum by 0.66%, as much as the bf16 logits make.
    assert relative_error(grad_w, ref_w) < 2 * BF16_EPS


def test_bf16_gradients_are_handed_over_in_the_parameters_dtype():
    hidden, weight, ids, teacher, mask, weights = inputs(1)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    kept_token_loss(h, w, teacher, ids, weights, mask, chunk_rows=7).backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16


def test_bf16_statistics_are_float32_products_of_the_bf16_head(monkeypatch):
    hidden, weight, ids, teacher, mask, _ = inputs(2)
    monkeypatch.setattr(lean_stats_module, "HEAD_BLOCK_ROWS", 10)  # several blocks, a ragged last one
    stats = token_stats_from_hidden(hidden, weight, teacher, ids, mask, chunk_rows=33)
    reference = compute_token_stats(hidden.double() @ weight.double().T, ids, teacher, mask)
    for name in STAT_NAMES:
        value = getattr(stats, name)
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value.double(), getattr(reference, name), rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_heads_are_not_copied(dtype, monkeypatch):
    hidden, weight, ids, teacher, mask, _ = inputs(3)
    calls = []
    original = lean_module.F.linear

    def counting_linear(x, w, b=None):
        calls.append(w.data_ptr())
        return original(x, w, b)

    weight = weight.to(dtype)
    monkeypatch.setattr(lean_module.F, "linear", counting_linear)
    token_stats_from_hidden(hidden.to(dtype), weight, teacher, ids, mask, chunk_rows=64)
    assert calls and all(ptr == weight.data_ptr() for ptr in calls), "a full-precision head was copied"
