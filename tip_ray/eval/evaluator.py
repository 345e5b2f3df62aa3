"""Held-out evaluation: generate, grade, report accuracy with its interval, keep every sample.

Usable alone (``tip-ray eval``) and from the training loop: it needs only an engine with
``generate(prompt_ids, SamplingSettings) -> list[Generation]`` (the transformers engine here;
in a run the rollout pool for the student and the teacher pool for the teacher, each with its
deadlines and retries), a tokenizer, a prompt dataset and a grader name. ``generate_and_grade``
is the one path both take; the run's held-out metrics (``tip_ray.eval.held_out``) build on it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tip_ray.data.grading import accuracy_with_ci, grade_all, pass_at_k
from tip_ray.data.prompts import PromptDataset
from tip_ray.types import Generation, SamplingSettings


class Engine(Protocol):
    """Anything that turns prompt ids into generations."""

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[Generation]: ...


@dataclass(frozen=True)
class SampleResult:
    """One graded sample."""

    uid: str
    sample: int
    prompt: str
    response: str
    answer: str
    correct: bool
    finish_reason: str
    response_tokens: int


@dataclass(frozen=True)
class EvalReport:
    """Accuracy over every sample (mean@n), its Wilson interval, pass@1 and pass@n."""

    name: str
    accuracy: float
    ci_low: float
    ci_high: float
    pass_at_1: float
    pass_at_n: float
    num_prompts: int
    samples_per_prompt: int
    truncated: int
    mean_response_tokens: float
    samples: tuple[SampleResult, ...]
    grader_errors: int = 0

    def summary(self) -> dict[str, float | int | str]:
        """The scalar metrics, for logs and trackers."""
        return {
            "name": self.name, "accuracy": self.accuracy, "ci_low": self.ci_low, "ci_high": self.ci_high,
            "pass_at_1": self.pass_at_1, "pass_at_n": self.pass_at_n, "num_prompts": self.num_prompts,
            "samples_per_prompt": self.samples_per_prompt, "truncated": self.truncated,
            "mean_response_tokens": self.mean_response_tokens, "grader_errors": self.grader_errors,
        }


def grade_samples(texts: Sequence[str], answers: Sequence[str | None], grader: str) -> tuple[bool | None, ...]:
    """Per sample, whether ``texts[i]`` states ``answers[i]`` (grader ``grader``), None where the
    answer is None (the prompt is not graded); a sample the grader failed on counts as wrong
    (``grade_all`` counts those failures)."""
    return grade_all(texts, answers, grader).correct


@dataclass(frozen=True)
class GradedSamples:
    """An engine's samples of a prompt set, decoded and graded: per generation (``prompt_index``
    into the prompts), its text and whether it is correct (None where the prompt has no answer);
    ``grader_errors``: graded samples the grader failed on (timeout, unparsable answer: counted
    wrong), and ``grader_error_reasons`` how many for each reason."""

    generations: tuple[Generation, ...]
    texts: tuple[str, ...]
    correct: tuple[bool | None, ...]
    grader_errors: int = 0
    grader_error_reasons: dict[str, int] = field(default_factory=dict)


def generate_and_grade(engine: Engine, tokenizer, dataset: PromptDataset, grader: str,
                       sampling: SamplingSettings) -> GradedSamples:
    """The one evaluation path: ``engine`` samples every prompt of ``dataset`` with ``sampling``
    (a model here, the rollout or teacher pool in a run: they bring their own deadlines and
    retries), the samples are decoded with ``tokenizer`` and graded with ``grader`` where the
    prompt has an answer."""
    examples = [dataset[i] for i in range(len(dataset))]
    generations = tuple(engine.generate([ex.prompt_ids for ex in examples], sampling))
    texts = tuple(tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in generations)
    grades = grade_all(texts, [examples[g.prompt_index].answer for g in generations], grader)
    return GradedSamples(generations, texts, grades.correct, grades.errors, grades.reasons)


def evaluate(
    engine: Engine,
    tokenizer,
    dataset: PromptDataset,
    grader: str,
    sampling: SamplingSettings,
    name: str = "eval",
) -> EvalReport:
    """Generate ``sampling.n`` responses per prompt of ``dataset``, grade them, and report."""
    examples = [dataset[i] for i in range(len(dataset))]
    if any(ex.answer is None for ex in examples):
        raise ValueError("tip-ray eval grades every prompt, so every prompt needs an answer: set data.answer_field "
                         "and keep data.null_answer=error (training evaluation accepts ungraded prompts)")
    graded = generate_and_grade(engine, tokenizer, dataset, grader, sampling)
    per_prompt: list[list[bool]] = [[] for _ in examples]
    samples = []
    for gen, text, correct in zip(graded.generations, graded.texts, graded.correct):
        ex = examples[gen.prompt_index]
        per_prompt[gen.prompt_index].append(bool(correct))
        samples.append(SampleResult(ex.uid, len(per_prompt[gen.prompt_index]) - 1, ex.prompt_text, text, ex.answer,
                                    bool(correct), gen.finish_reason, len(gen.token_ids)))
    flat = [c for row in per_prompt for c in row]
    mean, low, high = accuracy_with_ci(flat)
    n = sampling.n
    return EvalReport(
        name=name,
        accuracy=mean,
        ci_low=low,
        ci_high=high,
        pass_at_1=sum(pass_at_k(len(r), sum(r), 1) for r in per_prompt) / len(per_prompt),
        pass_at_n=sum(pass_at_k(len(r), sum(r), n) for r in per_prompt) / len(per_prompt),
        num_prompts=len(examples),
        samples_per_prompt=n,
        truncated=Counter(s.finish_reason for s in samples)["length"],
        mean_response_tokens=sum(s.response_tokens for s in samples) / max(1, len(samples)),
        samples=tuple(samples),
        grader_errors=graded.grader_errors,
    )


def write_samples(report: EvalReport, path: str | Path) -> Path:
    """Write one JSON line per sample (atomically: a temporary file renamed when complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for s in report.samples:
            f.write(json.dumps({"eval": report.name, **s.__dict__}) + "\n")
    tmp.replace(path)
    return path
