"""Held-out evaluation: generate, grade, report accuracy with its interval, keep every sample.

Usable alone (``tip-ray eval``) and from the training loop: it needs only an engine with
``generate(prompt_ids, SamplingSettings) -> list[Generation]`` (the transformers engine here,
the vLLM rollout engine in a run), a tokenizer, a prompt dataset and a grader name.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tip_ray.data.grading import accuracy_with_ci, get_grader, pass_at_k
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

    def summary(self) -> dict[str, float | int | str]:
        """The scalar metrics, for logs and trackers."""
        return {
            "name": self.name, "accuracy": self.accuracy, "ci_low": self.ci_low, "ci_high": self.ci_high,
            "pass_at_1": self.pass_at_1, "pass_at_n": self.pass_at_n, "num_prompts": self.num_prompts,
            "samples_per_prompt": self.samples_per_prompt, "truncated": self.truncated,
            "mean_response_tokens": self.mean_response_tokens,
        }


def evaluate(
    engine: Engine,
    tokenizer,
    dataset: PromptDataset,
    grader: str,
    sampling: SamplingSettings,
    name: str = "eval",
) -> EvalReport:
    """Generate ``sampling.n`` responses per prompt of ``dataset``, grade them, and report."""
    grade = get_grader(grader)
    examples = [dataset[i] for i in range(len(dataset))]
    if any(ex.answer is None for ex in examples):
        raise ValueError("tip-ray eval grades every prompt, so every prompt needs an answer: set data.answer_field "
                         "and keep data.null_answer=error (training evaluation accepts ungraded prompts)")
    generations = engine.generate([ex.prompt_ids for ex in examples], sampling)
    per_prompt: list[list[bool]] = [[] for _ in examples]
    samples = []
    for gen in generations:
        ex = examples[gen.prompt_index]
        text = tokenizer.decode(gen.token_ids, skip_special_tokens=True)
        correct = bool(grade(text, ex.answer))
        per_prompt[gen.prompt_index].append(correct)
        samples.append(SampleResult(ex.uid, len(per_prompt[gen.prompt_index]) - 1, ex.prompt_text, text, ex.answer,
                                    correct, gen.finish_reason, len(gen.token_ids)))
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
