"""Task rewards in the driver: grade a step's samples and turn the grades into the learner's
per-sequence advantages (``loss.reward``).

Every sample is decoded (special tokens skipped, as in evaluation; a multi-turn sample's last
student turn only) and graded against its prompt's answer with ``cfg.grader``
(``tip_ray.data.grading``: a grader failure counts as incorrect); reward 1 for a correct sample, 0 otherwise, none for a prompt without an answer.
``tip_ray.tip.advantages.sequence_advantages`` makes the advantages (baseline and
normalisation from ``loss.reward``). Grading runs in the driver's main thread, where
math-verify's timeouts work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tip_ray.config.reward import RewardConfig
from tip_ray.data.grading import grade_all
from tip_ray.tip.advantages import sequence_advantages
from tip_ray.types import Generation, RolloutBatch


@dataclass(frozen=True)
class StepRewards:
    """One step's grades: ``rewards`` float64 [N] (NaN where not graded), ``advantages`` float32 [N]
    (0 where not graded), in the order of the rollout batch's generations; ``grader_errors``:
    graded samples the grader failed on (counted incorrect)."""

    rewards: torch.Tensor
    advantages: torch.Tensor
    grader_errors: int = 0

    def metrics(self) -> dict[str, float]:
        """``reward/*``: the mean reward, advantage mean and std over the graded samples (NaN when
        none was graded), the graded fraction and the grader's failures."""
        graded = ~torch.isnan(self.rewards)
        count = int(graded.sum())
        adv = self.advantages[graded].double()
        nan = float("nan")
        return {
            "reward/mean": float(self.rewards[graded].mean()) if count else nan,
            "reward/advantage_mean": float(adv.mean()) if count else nan,
            "reward/advantage_std": float(adv.std(unbiased=False)) if count else nan,
            "reward/graded_fraction": count / max(1, len(self.rewards)),
            "reward/grader_errors": self.grader_errors,
        }


def final_turn(generation: Generation) -> list[int]:
    """The token ids of ``generation``'s last student turn: the whole response, or with multi-turn
    samples (``Generation.trainable``) the student's tokens after the last follow-up, so that a
    follow-up's text (a tool result, a user's question) is never graded as the student's answer."""
    if generation.trainable is None or all(generation.trainable):
        return list(generation.token_ids)
    last_foreign = max(i for i, own in enumerate(generation.trainable) if not own)
    return list(generation.token_ids[last_foreign + 1 :])


def grade_rollouts(rollouts: RolloutBatch, answers: Sequence[str | None], tokenizer, grader: str,
                   cfg: RewardConfig) -> StepRewards:
    """Grade every generation of ``rollouts`` against ``answers[g.prompt_index]`` (None: not
    graded) and make the advantages; samples of one prompt form its group."""
    texts = [tokenizer.decode(final_turn(g), skip_special_tokens=True) for g in rollouts.generations]
    grades = grade_all(texts, [answers[g.prompt_index] for g in rollouts.generations], grader)
    rewards = torch.tensor([math.nan if c is None else float(c) for c in grades.correct], dtype=torch.float64)
    groups = torch.tensor([g.prompt_index for g in rollouts.generations], dtype=torch.long)
    advantages = sequence_advantages(rewards, groups, cfg.baseline, cfg.std_normalize, cfg.eps)
    return StepRewards(rewards, advantages, grades.errors)
