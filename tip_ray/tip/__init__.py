"""The science of tip_ray: token statistics, selection rules and losses (torch only).

Nothing in this package imports Ray, DeepSpeed, vLLM or Hydra; a test enforces it.
"""

from tip_ray.tip.advantages import sequence_advantages
from tip_ray.tip.lean import (
    KeptTokenLosses,
    LeanLossOutput,
    kept_token_loss,
    kept_token_losses,
    lean_distill_loss,
    token_stats_from_hidden,
)
from tip_ray.tip.losses import (
    LOSS_KINDS,
    NORMALIZATIONS,
    distill_loss_from_logits,
    policy_gradient_loss_from_logits,
    reduce_token_loss,
    token_losses_for_rows,
)
from tip_ray.tip.select import (
    RULES,
    Quadrants,
    Rule,
    budget_for,
    get_rule,
    quadrants,
    register_rule,
    rule_names,
    select_flat,
    select_tokens,
    token_weights,
)
from tip_ray.tip.signal import TeacherSignal
from tip_ray.tip.stats import STAT_NAMES, TokenStats, compute_token_stats, stats_for_rows

__all__ = [
    "LOSS_KINDS",
    "NORMALIZATIONS",
    "RULES",
    "STAT_NAMES",
    "KeptTokenLosses",
    "LeanLossOutput",
    "Quadrants",
    "Rule",
    "TeacherSignal",
    "TokenStats",
    "budget_for",
    "compute_token_stats",
    "distill_loss_from_logits",
    "get_rule",
    "kept_token_loss",
    "kept_token_losses",
    "lean_distill_loss",
    "policy_gradient_loss_from_logits",
    "quadrants",
    "reduce_token_loss",
    "register_rule",
    "rule_names",
    "select_flat",
    "select_tokens",
    "sequence_advantages",
    "stats_for_rows",
    "token_losses_for_rows",
    "token_stats_from_hidden",
    "token_weights",
]
