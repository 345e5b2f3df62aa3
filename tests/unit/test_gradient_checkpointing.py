"""``learner.gradient_checkpointing``: the student as DeepSpeed receives it recomputes each decoder
layer in the backward and gives the gradients it gives without checkpointing."""

from __future__ import annotations

import pytest
import torch

from tip_ray.config import LearnerConfig
from tip_ray.learner.student import build_student
from tip_ray.tip import TeacherSignal
from tip_ray.tip.lean import kept_token_loss


def step_gradients(model_path: str, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of one lean-loss backward through the student, and how often layer 0 ran."""
    student = build_student(LearnerConfig(model=model_path, gradient_checkpointing=checkpointing))
    calls = []
    # A pre-hook: the recompute stops early once the saved tensors are rebuilt, so post-hooks
    # of the layer need not run again (ZeRO-3 gathers in pre-hooks).
    student.lm.get_decoder().layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (2, 12), generator=g)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[:, 3:] = True
    teacher = TeacherSignal.from_logits(torch.randn(2, 11, 128, generator=g), ids[:, 1:], k=8)
    hidden = student(ids, torch.ones_like(ids))[:, :-1]
    head = student.lm.get_output_embeddings()
    loss = kept_token_loss(hidden, head.weight, teacher, ids[:, 1:], mask.float(), mask, chunk_rows=5)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return grads, len(calls)


def test_checkpointing_recomputes_layers_and_keeps_the_gradients(tiny_student):
    plain, plain_calls = step_gradients(tiny_student, checkpointing=False)
    checkpointed, recomputed_calls = step_gradients(tiny_student, checkpointing=True)
    assert plain_calls == 1 and recomputed_calls == 2, "the layer was not recomputed in the backward"
    assert set(checkpointed) == set(plain) and len(plain) > 0
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_student_trains_with_checkpointing_on_every_layer(tiny_student):
    student = build_student(LearnerConfig(model=tiny_student, gradient_checkpointing=True))
    assert student.training and all(m.training for m in student.modules())
    assert student.lm.is_gradient_checkpointing


def test_without_checkpointing_the_student_stays_in_evaluation_mode(tiny_student):
    student = build_student(LearnerConfig(model=tiny_student))
    assert not student.lm.training and not student.lm.is_gradient_checkpointing


def test_checkpointing_refuses_a_student_with_dropout(tiny_student, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    model.config.attention_dropout = 0.1
    model.save_pretrained(str(tmp_path / "dropout"))
    with pytest.raises(ValueError, match=r"gradient_checkpointing needs a student without dropout.*attention_dropout"):
        build_student(LearnerConfig(model=str(tmp_path / "dropout"), gradient_checkpointing=True))
