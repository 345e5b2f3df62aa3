"""Shared fixtures: small random student/teacher batches built in-process (no hub access)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tip_ray.tip import TeacherSignal


@dataclass
class Batch:
    """A student/teacher batch: logits [B, T, V], sampled ids [B, T], mask [B, T], signal."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor
    teacher: TeacherSignal


def make_batch(
    batch: int = 3,
    length: int = 7,
    vocab: int = 13,
    k: int | None = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    prompt_len: int = 2,
    temperature: float = 1.0,
) -> Batch:
    """Random logits with the first ``prompt_len`` positions of each row and a ragged tail
    masked out (prompt and padding); padding ids are -100 to catch unmasked reads."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, vocab, generator=g, dtype=dtype) * 2.0 / temperature
    teacher = student + torch.randn(batch, length, vocab, generator=g, dtype=dtype) * 1.5
    ids = torch.multinomial(torch.softmax(student.double().reshape(-1, vocab), -1), 1, generator=g).reshape(batch, length)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, :prompt_len] = False
    for row in range(batch):
        pad = row % 3
        if pad:
            mask[row, length - pad :] = False
    signal = TeacherSignal.from_logits(teacher, ids, k)
    ids = ids.masked_fill(~mask, -100)
    return Batch(student, teacher, ids, mask, signal)


@pytest.fixture
def batch() -> Batch:
    return make_batch()
