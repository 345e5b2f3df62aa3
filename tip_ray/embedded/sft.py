"""Supervised warm-up of the embedded teacher and student on scratchpad solutions.

Plain torch: the models are a few million parameters and train on the CPU. The teacher trains
until it is accurate; the student trains only until it is clearly weaker, so that on-policy
distillation has room to work.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tip_ray.data.tasks import Problem, TaskSpec, sample_problems

IGNORE = -100


@dataclass(frozen=True)
class SFTPlan:
    """How long and how fast to train, and when to stop.

    Training stops at the first evaluation whose accuracy is >= ``stop_at_accuracy``; if
    ``max_accuracy`` is set and that evaluation overshoots it, the previous evaluated weights
    are kept instead (the student must stay weak).
    """

    max_steps: int
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    eval_every: int = 100
    stop_at_accuracy: float = 1.0
    max_accuracy: float | None = None


@dataclass(frozen=True)
class SFTResult:
    """Steps trained and the evaluation history [(step, accuracy)]."""

    steps: int
    history: list[tuple[int, float]]


def encode(tokenizer, problem: Problem) -> tuple[list[int], list[int]]:
    """Token ids of chat prompt + solution + end of turn, and labels (-100 on the prompt)."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": problem.prompt}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(problem.solution(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids


def collate(tokenizer, examples: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels [B, L]."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def train_sft(
    model,
    tokenizer,
    spec: TaskSpec,
    plan: SFTPlan,
    seed: int,
    exclude: set[str],
    evaluate: Callable[[object], float],
    log: Callable[[str], None] = print,
) -> SFTResult:
    """Train ``model`` in place on fresh problems (none in ``exclude``); returns the history.

    ``evaluate(model) -> accuracy`` runs every ``plan.eval_every`` steps and at the end.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < plan.warmup_steps:
            return (step + 1) / plan.warmup_steps
        progress = (step - plan.warmup_steps) / max(1, plan.max_steps - plan.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    history: list[tuple[int, float]] = []
    previous = (0, copy.deepcopy(model.state_dict()))
    model.train()
    step = 0
    for step in range(1, plan.max_steps + 1):
        batch = collate(tokenizer, [encode(tokenizer, p) for p in sample_problems(rng, plan.batch_size, spec, exclude)])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % plan.eval_every == 0 or step == plan.max_steps:
            accuracy = evaluate(model)
            history.append((step, accuracy))
            log(f"step {step:5d}  loss {loss.item():.4f}  accuracy {accuracy:.3f}")
            if accuracy >= plan.stop_at_accuracy:
                if plan.max_accuracy is not None and accuracy > plan.max_accuracy:
                    log(f"accuracy {accuracy:.3f} overshoots {plan.max_accuracy}; keeping the weights of step {previous[0]}")
                    model.load_state_dict(previous[1])
                    return SFTResult(previous[0], history)
                break
            previous = (step, copy.deepcopy(model.state_dict()))
    model.eval()
    return SFTResult(step, history)
