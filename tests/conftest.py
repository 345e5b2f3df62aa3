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


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory) -> str:
    """A tiny Qwen3-shaped student (2 layers, hidden 32) over the embedded character vocabulary,
    saved as a Hugging Face checkpoint; returns its directory."""
    from tip_ray.data.tokenizer import build_char_tokenizer
    from tip_ray.embedded.models import ModelShape, build_model

    path = tmp_path_factory.mktemp("tiny") / "student"
    shape = ModelShape(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                       intermediate_size=64)
    build_model(shape, build_char_tokenizer(), seed=0).save_pretrained(str(path))
    return str(path)
