"""The papers' claims (TIP_SPEC section 7) judged against a sweep's arms, with the seed noise."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tip_ray.experiments.scores import ACCURACY, METRICS, ArmSummary, Metric


@dataclass(frozen=True)
class Claim:
    """A published claim checked against the sweep: ``verdict`` is ``agrees``/``does not agree``,
    ``clear`` whether the difference exceeds twice its standard error over seeds (None: unknown,
    an arm has a single seed)."""

    statement: str
    source: str
    verdict: str
    clear: bool | None
    detail: str


def _diff(a: ArmSummary, b: ArmSummary, metric: str = "accuracy") -> tuple[float, float | None]:
    """Mean difference a - b of ``metric`` and its standard error from the per-seed spreads
    (None if unknown)."""
    x, y = a.scores[metric], b.scores[metric]
    if x.std is None or y.std is None:
        return x.final - y.final, None
    return x.final - y.final, math.sqrt(x.std**2 / a.n + y.std**2 / b.n)


def _compare(a: ArmSummary, b: ArmSummary, relation: str, statement: str, source: str,
             metric: str = "accuracy") -> Claim:
    """``relation`` ``>=``: a is at least as good as b; ``<``: a is worse (by ``metric``'s direction)."""
    m = METRICS[metric]
    diff, se = _diff(a, b, metric)
    holds = m.better(diff) >= 0 if relation == ">=" else m.better(diff) < 0
    clear = None if se is None else abs(diff) > 2 * se
    se_text = "unknown (one seed)" if se is None else m.show_delta(se)
    detail = (f"{a.arm} {m.show(a.scores[metric].final)} vs {b.arm} {m.show(b.scores[metric].final)}: "
              f"difference {m.show_delta(diff, signed=True)}, standard error {se_text}")
    return Claim(statement, source, "agrees" if holds else "does not agree", clear, detail)


NEARLY_MATCHES = 0.9  # share of all's improvement at or above which an arm "nearly matches" all

# (arm a, arm b, relation, statement, the papers' numbers): "a >= b" at least as good, "a < b" worse.
CLAIMS = (
    ("entropy_topk_50", "all_100", ">=", "entropy top-50% is at least as good as all tokens",
     "TIP / entropy OPD: 78.6 vs 76.7 on MATH-500"),
    ("soft_or_50", "entropy_topk_50", ">=", "soft_or 50% is at least as good as entropy top-50%",
     "TIP: 79.1 vs 78.6"),
    ("soft_or_50", "all_100", ">=", "soft_or 50% is at least as good as all tokens", "TIP: 79.1 vs 76.7"),
    ("soft_or_bottom_50", "soft_or_50", "<", "keeping the bottom half of soft_or is worse than the top half",
     "TIP: 72.3 vs 79.1"),
    ("soft_or_bottom_50", "all_100", "<", "keeping the bottom half of soft_or is worse than all tokens",
     "TIP: 72.3 vs 76.7"),
    ("random_50", "soft_or_50", "<", "random 50% is worse than soft_or 50% (same budget)", "the control"),
    ("random_50", "entropy_topk_50", "<", "random 50% is worse than entropy top-50% (same budget)",
     "the control"),
    ("random_10", "overconfident_10", "<", "random 10% is worse than overconfident 10% (same budget)",
     "the control"),
    ("random_10", "teachable_10", "<", "random 10% is worse than teachable 10% (same budget)", "the control"),
    ("teachable_10", "all_100", ">=", "teachable 10% is at least as good as all tokens",
     "TA-OPD: 44.89 at about 5% vs 42.37"),
    ("rock_freeze", "all_100", "<", "rock-freeze is worse than all tokens", "reported 44.3 vs 48.1"),
)


def check_claims(summaries: Sequence[ArmSummary], metric: str = "accuracy") -> list[Claim]:
    """The papers' claims (TIP_SPEC section 7) that the arms present can test, judged on the
    final held-out ``metric``."""
    m = METRICS[metric]
    arms = {s.arm: s for s in summaries}
    claims = [_compare(arms[a], arms[b], relation, statement, source, metric)
              for a, b, relation, statement, source in CLAIMS if a in arms and b in arms]
    over, base = arms.get("overconfident_10"), arms.get("all_100")
    if over is not None and base is not None and over.scores[metric].recovered is not None:
        share = over.scores[metric].recovered
        diff, se = _diff(over, base, metric)
        holds = share >= NEARLY_MATCHES
        clear = True if holds else (None if se is None else abs(diff) > 2 * se)
        claims.append(Claim(
            f"overconfident (Q3) at 10% nearly matches all tokens ({m.recovered_claim.format(NEARLY_MATCHES)})",
            "TIP: 76.1 at under 10% vs 76.7", "agrees" if holds else "does not agree", clear,
            f"{m.recovered_detail.format(share)}; {m.show(over.scores[metric].final)} vs "
            f"{m.show(base.scores[metric].final)}"))
    return claims


def claims_table(claims: Sequence[Claim], label: str = "embedded") -> str:
    """The claims as a markdown table; ``label`` names the sweep in the results column."""
    lines = [f"| claim | papers | {label} result | beyond seed noise? |", "|---|---|---|---|"]
    for c in claims:
        noise = "unknown (one seed)" if c.clear is None else ("yes" if c.clear else "no")
        lines.append(f"| {c.statement} | {c.source} | **{c.verdict}**: {c.detail} | {noise} |")
    return "\n".join(lines)


_COUNTS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _noise_floor(summaries: Sequence[ArmSummary], metric: Metric) -> str | None:
    """Twice the standard error of a difference between two arms with a spread, over the pairs
    of such arms: the smallest and largest (None with fewer than two such arms)."""
    spread = [s for s in summaries if s.scores[metric.name].std is not None]
    floors = [2 * _diff(a, b, metric.name)[1] for i, a in enumerate(spread) for b in spread[i + 1:]]
    if not floors:
        return None
    low, high = metric.show_delta(min(floors)), metric.show_delta(max(floors))
    return low if low == high else f"{low} to {high}"


def noise_text(summaries: Sequence[ArmSummary], metric: Metric) -> str:
    """How a difference is judged against the seed noise, how large that noise is here, and on
    which metric."""
    n = max(s.n for s in summaries)
    floor = _noise_floor(summaries, metric)
    if n == 1:
        noise = "with one seed per arm there is no spread to judge by."
    else:
        noise = f"with {_COUNTS[n] if n < len(_COUNTS) else n} seeds, " + (
            f"twice that standard error is {floor} here (over the pairs of arms)." if floor
            else "fewer than two arms have a spread to judge by.")
    text = ("A difference counts as beyond seed noise when it exceeds twice its standard error "
            "(sqrt(std_a²/n_a + std_b²/n_b) over seeds); " + noise)
    if metric is not ACCURACY:
        text += (" The papers' numbers are accuracies; here every claim is judged on the final "
                 f"{metric.short} ({'higher' if metric.higher_is_better else 'lower'} is better).")
    return text
