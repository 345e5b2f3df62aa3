"""What the training loop reports on its held-out prompts: accuracy where an answer can be graded,
and how far the student is from the teacher on its own greedy samples.

- ``eval/accuracy``: the fraction of graded samples that are correct; a prompt without an answer
  is not graded (it still counts for the divergence metrics). ``eval/graded``: how many were.
- ``eval/rkl``: the mean over response tokens of KL(P_S || P_T) at the student's own greedy
  samples (TIP_SPEC section 2: exact with the teacher's full distribution, the top-K + tail
  estimate otherwise), computed by the learner from its current weights.
- ``eval/response_length``: mean tokens per greedy sample (a collapse to short answers shows
  here before it shows in the per-token divergence).
- ``eval/teacher_agreement``: the fraction of response positions where the student's greedy
  token equals the teacher's argmax at the same prefix (exact for any K: the argmax is in the
  teacher's top-K).

Samples come through ``tip_ray.eval.evaluator.generate_and_grade``, the path ``tip-ray eval``
takes too, with the rollout pool (or the teacher pool) as the engine; the driver
(``tip_ray.trainer.Trainer.held_out``) hands in the pools.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tip_ray.data.prompts import PromptDataset
from tip_ray.eval.evaluator import Engine, generate_and_grade, grade_samples
from tip_ray.tip.signal import TeacherSignal
from tip_ray.types import Generation, RolloutBatch, SamplingSettings, TrainBatch

__all__ = ["HeldOutEval", "grade_samples", "held_out_samples", "teacher_agreement", "with_divergence"]


@dataclass(frozen=True)
class HeldOutEval:
    """One evaluation of the student on the held-out prompts.

    ``generations``: the greedy samples, one per prompt, in prompt order. ``correct``: per
    sample, whether it is right, or None when its prompt has no answer. ``grader_errors``: graded
    samples the grader failed on (counted wrong). ``rkl`` float64 [m] and
    ``agreement`` bool [m]: per response token of the samples, in sample order then position
    order (m = total response tokens); None when the divergence was not measured.
    """

    generations: tuple[Generation, ...]
    correct: tuple[bool | None, ...]
    rkl: torch.Tensor | None = None
    agreement: torch.Tensor | None = None
    grader_errors: int = 0

    def __post_init__(self) -> None:
        if len(self.correct) != len(self.generations):
            raise ValueError(f"{len(self.correct)} grades for {len(self.generations)} samples")
        tokens = sum(len(g.token_ids) for g in self.generations)
        for name in ("rkl", "agreement"):
            values = getattr(self, name)
            if values is not None and tuple(values.shape) != (tokens,):
                raise ValueError(f"{name} must hold one value per response token, [{tokens}], got "
                                 f"{tuple(values.shape)}")

    @property
    def graded(self) -> int:
        """Samples whose prompt has an answer."""
        return sum(c is not None for c in self.correct)

    @property
    def accuracy(self) -> float | None:
        """Correct / graded samples, or None when none could be graded."""
        graded = [c for c in self.correct if c is not None]
        return sum(graded) / len(graded) if graded else None

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """``accuracy`` and ``grader_errors`` (when any sample was graded), ``graded``,
        ``response_length`` (mean tokens per greedy sample), and ``rkl``/``teacher_agreement`` (when measured, over at least one response
        token), each under ``prefix``."""
        out: dict[str, float] = {f"{prefix}graded": self.graded}
        if self.generations:
            # Per-token divergences average over whatever the student wrote: a student collapsing
            # to short or repetitive answers can look close to its teacher; the length tells.
            out[f"{prefix}response_length"] = sum(len(g.token_ids) for g in self.generations) / len(self.generations)
        if self.accuracy is not None:
            out[f"{prefix}accuracy"] = self.accuracy
            out[f"{prefix}grader_errors"] = self.grader_errors
        if self.rkl is not None and self.rkl.numel():
            out[f"{prefix}rkl"] = float(self.rkl.double().mean())
        if self.agreement is not None and self.agreement.numel():
            out[f"{prefix}teacher_agreement"] = float(self.agreement.double().mean())
        return out


def held_out_samples(engine: Engine, tokenizer, dataset: PromptDataset, grader: str,
                     max_new_tokens: int) -> HeldOutEval:
    """Greedy samples (one per prompt, at most ``max_new_tokens`` tokens) of ``engine`` (the
    rollout pool for the student, the teacher pool for the teacher) on ``dataset``, graded where
    the prompt has an answer (``tip_ray.eval.evaluator.generate_and_grade``: the one path)."""
    greedy = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    graded = generate_and_grade(engine, tokenizer, dataset, grader, greedy)
    return HeldOutEval(graded.generations, graded.correct, grader_errors=graded.grader_errors)


def with_divergence(samples: HeldOutEval, dataset: PromptDataset, policy_version: int, pad_id: int,
                    score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], TeacherSignal],
                    evaluate_tokens: Callable[[TrainBatch], torch.Tensor]) -> HeldOutEval:
    """``samples`` (the student's greedy samples of ``dataset`` from ``policy_version``) with their
    divergence: ``score(input_ids [B, L], attention [B, L], loss_mask [B, L-1])`` gives the
    teacher's signal on them, ``evaluate_tokens`` the student's per-token reverse KL to it (the
    learner with the weights that sampled them), and the teacher's argmax gives the agreement."""
    prompts = tuple(tuple(dataset[i].prompt_ids) for i in range(len(dataset)))
    batch = RolloutBatch(prompts, samples.generations, policy_version)
    input_ids, attention, loss_mask = batch.to_sequences(pad_id)
    signal = score(input_ids, attention, loss_mask)
    rkl = evaluate_tokens(TrainBatch(input_ids, attention, loss_mask, signal, policy_version))
    return dataclasses.replace(samples, rkl=rkl, agreement=teacher_agreement(signal, input_ids, loss_mask))


def teacher_agreement(signal: TeacherSignal, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Whether the teacher's argmax equals the sampled token, per response position: bool [m], in
    row-major order over ``loss_mask`` [B, L-1] (``signal`` [B, L-1, K], ``input_ids`` [B, L]; on
    one device, the result on it). Position t predicts ``input_ids[:, t + 1]``."""
    best = signal.topk_logprobs.argmax(-1, keepdim=True)
    teacher_top = (best if signal.topk_ids is None else signal.topk_ids.gather(-1, best)).squeeze(-1).long()
    return (teacher_top == input_ids[:, 1:].long())[loss_mask]
