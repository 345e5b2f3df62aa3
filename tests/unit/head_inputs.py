"""Random inputs of the losses through an lm_head, shared by the lean-loss tests."""

from __future__ import annotations

import torch

from tip_ray.tip import TeacherSignal


def head_inputs(vocab: int = 37, k: int = 5, batch: int = 3, length: int = 9, hidden: int = 6,
                dtype: torch.dtype = torch.float64, seed: int = 0):
    """Random inputs of a loss through an lm_head: hidden states [B, T, H], head weight [V, H] and
    bias [V] (all requiring grad), the student's sampled ids [B, T], a teacher's top-``k`` signal of
    logits near the student's, the response mask [B, T] and the generator, to draw weights from."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, generator=g, dtype=dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g, dtype=dtype) * 0.8).requires_grad_(True)
    bias = (torch.randn(vocab, generator=g, dtype=dtype) * 0.2).requires_grad_(True)
    with torch.no_grad():
        student = torch.nn.functional.linear(h, w, bias)
        ids = torch.multinomial(torch.softmax(student.double().reshape(-1, vocab), -1), 1,
                                generator=g).reshape(batch, length)
        teacher = student.double() + torch.randn(batch, length, vocab, generator=g, dtype=torch.float64)
    signal = TeacherSignal.from_logits(teacher, ids, k)
    mask = torch.rand(batch, length, generator=g) < 0.85
    return h, w, bias, ids, signal, mask, g
