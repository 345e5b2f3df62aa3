"""Token-selection rules of TIP_SPEC section 4, as a registry of small functions.

A rule sees the statistics of every valid token of its scope as 1-D tensors [m] and returns one
of: scores (``ranked`` rules: the top-B are kept), sampling weights (``sampled`` rules: B drawn
without replacement) or per-token loss weights (``weighted`` rules, no budget). B is
``budget_for(ratio, m)`` = ceil(ratio * m). Adding a rule is one decorated function.

``select_flat`` works on flat per-token values so that a learner can gather the statistics of
every rank and select over the global batch; ``select_tokens``/``token_weights`` wrap it for
[B, T] statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

from tip_ray.tip.stats import STAT_NAMES, TokenStats

RuleKind = Literal["all", "ranked", "sampled", "weighted"]
Direction = Literal["top", "bottom"]
Scope = Literal["batch", "sequence"]


@dataclass(frozen=True)
class Rule:
    """A registered selection rule: its kind, default retention ratio and parameters."""

    name: str
    kind: RuleKind
    fn: Callable[..., torch.Tensor] | None
    default_ratio: float | None
    defaults: dict[str, object] = field(default_factory=dict)


RULES: dict[str, Rule] = {}


def register_rule(
    name: str, kind: RuleKind, default_ratio: float | None = None, **defaults: object
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator registering ``fn(values: dict[str, Tensor[m]], token_ids: Tensor[m], **params)``.

    ``values`` holds every statistic of ``STAT_NAMES`` at the scope's valid tokens. The
    function returns a float tensor [m]: scores, sampling weights or loss weights by ``kind``.
    """

    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in RULES:
            raise ValueError(f"selection rule {name!r} is already registered")
        RULES[name] = Rule(name, kind, fn, default_ratio, dict(defaults))
        return fn

    return wrap


RULES["all"] = Rule("all", "all", None, 1.0, {})


def rule_names() -> list[str]:
    """Names of every registered rule."""
    return sorted(RULES)


def get_rule(name: str) -> Rule:
    """The registered rule ``name``; ValueError listing the known names otherwise."""
    if name not in RULES:
        raise ValueError(f"unknown selection rule {name!r}; known rules: {', '.join(rule_names())}")
    return RULES[name]


# ---------------------------------------------------------------------------------------------
# Normalisations shared by the rules (all over the scope's valid tokens).


def minmax(x: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min) over a 1-D tensor; 0 everywhere when max == min."""
    if x.numel() == 0:
        return x
    lo, hi = x.min(), x.max()
    span = hi - lo
    if float(span) <= 0.0:
        return torch.zeros_like(x)
    return (x - lo) / span


def capped(x: torch.Tensor, quantile: float) -> torch.Tensor:
    """min(x, q_quantile(x)): the entropy cap h' of the TIP rules."""
    return torch.minimum(x, torch.quantile(x, quantile))


def clip_scaled(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Clip to the [q_low, q_high] quantiles and scale to [0, 1] (TA-OPD); 0 if they coincide."""
    q = torch.quantile(x, torch.tensor([low, high], dtype=x.dtype, device=x.device))
    span = q[1] - q[0]
    if float(span) <= 0.0:
        return torch.zeros_like(x)
    return (x.clamp(q[0], q[1]) - q[0]) / span


def soft_or(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Probabilistic OR of two scores in [0, 1]: a + b - a*b."""
    return a + b - a * b


# ---------------------------------------------------------------------------------------------
# The rules (TIP_SPEC section 4).


@register_rule("entropy_topk", "ranked", default_ratio=0.5)
def _entropy_topk(values: dict[str, torch.Tensor], token_ids: torch.Tensor) -> torch.Tensor:
    return values["entropy_norm"]


@register_rule("entropy_sample", "sampled", default_ratio=0.5, alpha=1.0, gamma=0.0)
def _entropy_sample(values: dict[str, torch.Tensor], token_ids: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    return values["entropy_norm"].clamp(min=0).pow(alpha) * values["jsd"].clamp(min=0).pow(gamma)


@register_rule("soft_or", "ranked", default_ratio=0.5, quantile=0.98)
def _soft_or(values: dict[str, torch.Tensor], token_ids: torch.Tensor, quantile: float) -> torch.Tensor:
    return soft_or(minmax(capped(values["entropy_norm"], quantile)), minmax(values["rkl"]))


@register_rule("overconfident", "ranked", default_ratio=0.1, quantile=0.98)
def _overconfident(values: dict[str, torch.Tensor], token_ids: torch.Tensor, quantile: float) -> torch.Tensor:
    return values["fkl"] * (1.0 - minmax(capped(values["entropy_norm"], quantile)))


@register_rule("teachable", "ranked", default_ratio=0.1, clip_low=0.05, clip_high=0.95, min_per_sequence=1)
def _teachable(values: dict[str, torch.Tensor], token_ids: torch.Tensor, clip_low: float, clip_high: float) -> torch.Tensor:
    divergence = clip_scaled(values["ta_fkl"], clip_low, clip_high)
    coverage = clip_scaled(values["teacher_mass_on_student_topk"], clip_low, clip_high)
    return divergence * coverage


@register_rule("teachable_soft_or", "ranked", default_ratio=0.1, clip_low=0.05, clip_high=0.95, min_per_sequence=1)
def _teachable_soft_or(
    values: dict[str, torch.Tensor], token_ids: torch.Tensor, clip_low: float, clip_high: float
) -> torch.Tensor:
    teachability = clip_scaled(values["ta_fkl"] * values["teacher_mass_on_student_topk"], clip_low, clip_high)
    return soft_or(clip_scaled(values["ta_entropy"], clip_low, clip_high), teachability)


@register_rule("rock_freeze", "weighted", rock_ids=(), lam=0.0)
def _rock_freeze(
    values: dict[str, torch.Tensor], token_ids: torch.Tensor, rock_ids: Iterable[int] | torch.Tensor, lam: float
) -> torch.Tensor:
    rocks = torch.as_tensor(list(rock_ids) if not isinstance(rock_ids, torch.Tensor) else rock_ids, dtype=torch.long)
    is_rock = torch.isin(token_ids.long(), rocks.to(token_ids.device))
    ones = torch.ones(token_ids.shape, dtype=values["entropy"].dtype, device=token_ids.device)
    return torch.where(is_rock, torch.full_like(ones, float(lam)), ones)


@register_rule("random", "sampled", default_ratio=0.5)
def _random(values: dict[str, torch.Tensor], token_ids: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(values["entropy"])


# ---------------------------------------------------------------------------------------------
# Budgets and the selection machinery.


def budget_for(ratio: float, num_valid: int) -> int:
    """B = ceil(ratio * m), exact for ratios written in decimal (0.7 * 10 keeps 7, not 8)."""
    if num_valid <= 0:
        return 0
    return min(num_valid, max(1, math.ceil(round(ratio * num_valid, 9))))


def _check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")


def _resolve_params(rule: Rule, params: dict[str, object]) -> dict[str, object]:
    unknown = sorted(set(params) - set(rule.defaults))
    if unknown:
        allowed = ", ".join(sorted(rule.defaults)) or "none"
        raise ValueError(f"selection rule {rule.name!r} takes no parameter {', '.join(unknown)}; allowed: {allowed}")
    return {**rule.defaults, **params}


def _ranked_keep(scores: torch.Tensor, seq_index: torch.Tensor, budget: int, bottom: bool, min_per_sequence: int) -> torch.Tensor:
    """Indices [B] of the top (or bottom) ``budget`` scores; ties go to earlier positions."""
    order = torch.sort(scores, descending=not bottom, stable=True).indices
    if min_per_sequence <= 0:
        return order[:budget]
    # Each sequence's best token first (in rank order, so the best of them if they exceed B),
    # then the rest of the budget by global rank.
    ranked_seq = seq_index[order]
    grouped = torch.sort(ranked_seq, stable=True).indices  # by sequence, rank order within
    counts = torch.bincount(ranked_seq)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_seq = torch.empty_like(order)
    rank_in_seq[grouped] = torch.arange(order.numel(), device=order.device) - starts[ranked_seq[grouped]]
    first_of_seq = rank_in_seq < min_per_sequence
    guaranteed = order[first_of_seq][:budget]
    rest = order[~first_of_seq][: budget - guaranteed.numel()]
    return torch.cat([guaranteed, rest])


def _sampled_keep(weights: torch.Tensor, budget: int, generator: torch.Generator | None) -> torch.Tensor:
    """Indices [B] drawn without replacement with probability proportional to ``weights``."""
    w = weights.detach().double().cpu().clamp(min=0)
    positive = torch.nonzero(w > 0).squeeze(-1)
    if positive.numel() >= budget:
        return torch.multinomial(w, budget, replacement=False, generator=generator).to(weights.device)
    # Fewer positive weights than the budget: all of them, the rest uniformly among the others.
    zeros = torch.nonzero(w <= 0).squeeze(-1)
    extra = zeros[torch.randperm(zeros.numel(), generator=generator)[: budget - positive.numel()]]
    return torch.cat([positive, extra]).to(weights.device)


def select_flat(
    values: dict[str, torch.Tensor],
    token_ids: torch.Tensor,
    seq_index: torch.Tensor,
    rule: str,
    ratio: float | None = None,
    generator: torch.Generator | None = None,
    *,
    direction: Direction = "top",
    scope: Scope = "batch",
    **params: object,
) -> torch.Tensor:
    """Loss weights [m] for m valid tokens given as flat statistics.

    ``values``: statistic name -> [m]; ``token_ids`` [m]; ``seq_index`` [m] the sequence each
    token belongs to (row-major order, tokens of a sequence in position order). Budgeted rules
    return 1.0 on exactly ``budget_for(ratio, m)`` tokens (per sequence under
    ``scope="sequence"``) and 0.0 elsewhere. ``ratio=None`` takes the rule's default.
    ``generator`` is a CPU ``torch.Generator`` for the sampled rules.
    """
    spec = get_rule(rule)
    if direction not in ("top", "bottom"):
        raise ValueError(f"direction must be 'top' or 'bottom', got {direction!r}")
    if scope not in ("batch", "sequence"):
        raise ValueError(f"scope must be 'batch' or 'sequence', got {scope!r}")
    if ratio is None:
        ratio = spec.default_ratio if spec.default_ratio is not None else 1.0
    _check_ratio(ratio)
    if direction == "bottom" and spec.kind != "ranked":
        raise ValueError(f"direction='bottom' needs a ranked rule; {rule!r} is {spec.kind}")
    resolved = _resolve_params(spec, params)
    min_per_sequence = int(resolved.pop("min_per_sequence", 0))

    m = token_ids.numel()
    dtype = values["entropy"].dtype if "entropy" in values else torch.float32
    weights = torch.zeros(m, dtype=dtype, device=token_ids.device)
    if m == 0:
        return weights
    if spec.kind == "all":
        return weights.fill_(1.0)
    if spec.kind == "weighted":
        return spec.fn(values, token_ids, **resolved).to(dtype)

    if scope == "sequence":
        groups = [torch.nonzero(seq_index == s).squeeze(-1) for s in torch.unique(seq_index)]
    else:
        groups = [torch.arange(m, device=token_ids.device)]
    for members in groups:
        sub = {name: v[members] for name, v in values.items()}
        budget = budget_for(ratio, members.numel())
        scores = spec.fn(sub, token_ids[members], **resolved)
        if spec.kind == "ranked":
            kept = _ranked_keep(scores, seq_index[members], budget, direction == "bottom", min_per_sequence)
        else:
            kept = _sampled_keep(scores, budget, generator)
        weights[members[kept]] = 1.0
    return weights


def token_weights(
    stats: TokenStats,
    rule: str,
    ratio: float | None = None,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    direction: Direction = "top",
    scope: Scope = "batch",
    **params: object,
) -> torch.Tensor:
    """Loss weights [B, T] of a rule: 1/0 for budgeted rules, lambda/1 for ``rock_freeze``.

    ``mask`` [B, T] restricts the scope (default ``stats.mask``); it may not include positions
    that ``stats`` does not cover. See ``select_flat`` for the other arguments.
    """
    valid = _scope_mask(stats, mask)
    seq_index = torch.arange(valid.shape[0], device=valid.device).unsqueeze(-1).expand_as(valid)[valid]
    values = {name: getattr(stats, name)[valid] for name in STAT_NAMES}
    flat = select_flat(
        values, stats.token_ids[valid], seq_index, rule, ratio, generator, direction=direction, scope=scope, **params
    )
    out = torch.zeros(valid.shape, dtype=flat.dtype, device=valid.device)
    out[valid] = flat
    return out


def select_tokens(
    stats: TokenStats,
    rule: str,
    ratio: float | None = None,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    direction: Direction = "top",
    scope: Scope = "batch",
    **params: object,
) -> torch.Tensor:
    """Kept positions bool [B, T]: the tokens a rule gives a non-zero loss weight.

    Exactly ceil(ratio * m) tokens for budgeted rules (m valid tokens in the scope); every
    valid token for ``all``; the non-frozen tokens for ``rock_freeze`` with lambda 0.
    """
    return token_weights(
        stats, rule, ratio, mask, generator, direction=direction, scope=scope, **params
    ) > 0


def _scope_mask(stats: TokenStats, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return stats.mask
    if tuple(mask.shape) != tuple(stats.mask.shape) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(stats.mask.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    if bool((mask & ~stats.mask).any()):
        raise ValueError("mask selects positions that the statistics do not cover (outside stats.mask)")
    return mask


# ---------------------------------------------------------------------------------------------
# Diagnostics.


@dataclass(frozen=True)
class Quadrants:
    """Quadrant label per position ([B, T] int8: 1..4, 0 off the mask) and each one's share."""

    labels: torch.Tensor
    shares: dict[str, float]


def quadrants(stats: TokenStats, mask: torch.Tensor | None = None, *, quantile: float = 0.98) -> Quadrants:
    """Q1-Q4 split at the scope medians of minmax(h') and minmax(rkl) (TIP_SPEC section 4).

    Q1 high entropy / high rkl, Q2 high / low, Q3 low / high ("overconfident"), Q4 low / low
    ("resolved"). "High" means strictly above the median.
    """
    valid = _scope_mask(stats, mask)
    labels = torch.zeros(valid.shape, dtype=torch.int8, device=valid.device)
    names = ("Q1", "Q2", "Q3", "Q4")
    if not bool(valid.any()):
        return Quadrants(labels, {name: 0.0 for name in names})
    h = minmax(capped(stats.entropy_norm[valid], quantile))
    d = minmax(stats.rkl[valid])
    high_h = h > torch.quantile(h, 0.5)
    high_d = d > torch.quantile(d, 0.5)
    flat = torch.where(high_h, torch.where(high_d, 1, 2), torch.where(high_d, 3, 4)).to(torch.int8)
    labels[valid] = flat
    return Quadrants(labels, {name: float((flat == i + 1).float().mean()) for i, name in enumerate(names)})
