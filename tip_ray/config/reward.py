"""Task rewards mixed with distillation (``RewardConfig``, the ``loss.reward`` key).

Where training prompts carry answers, each sampled response is graded (``grader``) and its reward
(1 correct, 0 not) becomes a per-sequence advantage; the learner adds the on-policy policy
gradient -A_i log p(y_t) at every response token of sequence i, ``coef`` times its token-level
mean over the global batch, to the distillation loss on the selected tokens
(``tip_ray.tip.advantages``, ``tip_ray.tip.lean.kept_token_losses``). Off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

from tip_ray.config.fields import identity, raise_first_failure


@dataclass
class RewardConfig:
    """The reward term of the loss.

    ``enabled``: grade every sample and add the term. ``coef``: its weight next to the
    distillation loss (> 0). ``baseline``: what is subtracted from a sample's reward to make its
    advantage: ``group`` the mean reward of its prompt's ``rollout.n`` samples (GRPO; needs
    ``rollout.n`` > 1, where a group of one would give every sample advantage 0), ``batch`` the
    mean over the step's graded samples, ``none`` nothing (plain REINFORCE). ``std_normalize``:
    also divide by the standard deviation of the same set plus ``eps`` (GRPO's scaling; needs a
    baseline). Prompts without an answer (``data.null_answer=ungraded``) get advantage 0 and are
    left out of every mean.
    """

    enabled: bool = identity(False)
    coef: float = identity(1.0)
    baseline: str = identity("group")
    std_normalize: bool = identity(False)
    eps: float = identity(1e-6)

    def __post_init__(self) -> None:
        from tip_ray.tip.advantages import BASELINES

        checks = (
            (self.coef > 0, f"loss.reward.coef must be > 0, got {self.coef} (turn the term off with "
                            "loss.reward.enabled=false)"),
            (self.baseline in BASELINES, f"loss.reward.baseline must be one of {BASELINES}, got {self.baseline!r}"),
            (self.eps > 0, f"loss.reward.eps must be > 0, got {self.eps}"),
            (not (self.std_normalize and self.baseline == "none"),
             "loss.reward.std_normalize=true needs a baseline to centre the rewards first; set "
             "loss.reward.baseline=group or batch, or std_normalize=false"),
        )
        raise_first_failure(checks)

    def check_run(self, answer_field: str | None, n: int) -> None:
        """Refuse an enabled reward the run cannot feed: training data without answers
        (``data.answer_field`` null) or a group baseline over groups of one (``rollout.n`` 1)."""
        if not self.enabled:
            return
        checks = (
            (answer_field is not None,
             "loss.reward.enabled=true needs answers to grade: data.answer_field is null; set data.answer_field "
             "to the field holding each prompt's answer, or loss.reward.enabled=false"),
            (self.baseline != "group" or n > 1,
             f"loss.reward.baseline=group needs rollout.n > 1 (got rollout.n={n}): a prompt's only sample is its "
             "own group mean, so every advantage would be 0; set rollout.n > 1 (and learner.global_batch_size "
             "to match) or loss.reward.baseline=batch"),
        )
        raise_first_failure(checks)
