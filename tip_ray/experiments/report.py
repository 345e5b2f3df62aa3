"""``tip-ray report``: the sweep's results as a markdown page with plots.

Reads every finished run under a sweep root (``<root>/<arm>/seed<k>/`` with ``config.json``,
``metrics.jsonl``, ``summary.json`` and, from ``tip-ray sweep``, ``sweep_run.json``), averages
each arm over its seeds, and writes tables, figures and a comparison with the papers' claims.

The held-out metrics (``METRICS``) are those every run logged at each evaluation: greedy accuracy
(``eval/accuracy``), the student's per-token reverse KL to the teacher on its own greedy samples
(``eval/rkl``, lower is better) and its greedy agreement with the teacher's argmax
(``eval/teacher_agreement``). A run needs accuracy or reverse KL. The primary metric (``--metric``;
default: accuracy when every run has it, else reverse KL) is the one the claims are judged on.
Per metric, an arm's share of the ``all`` arm's improvement is (x - x_before) / (x_all - x_before),
with the arm's mean final value, the mean value before training over every run, and the mean final
value of the ``all`` arm: the accuracy gain recovered, or the KL gap closed
(kl_before - kl) / (kl_before - kl_all).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tip_ray.experiments.sweep import DEFAULT_ARMS, run_finished


@dataclass(frozen=True)
class Metric:
    """A held-out metric: its key in ``metrics.jsonl`` and in ``summary.json``'s
    ``eval_before``/``eval_after``, its direction, and how the page names and shows it
    (``percent``: x100 with one decimal, differences in pp; else three decimals)."""

    name: str
    key: str
    short: str
    higher_is_better: bool
    percent: bool
    setup: str  # what the evaluation measures, in the setup section
    column: str  # results-table header of the final value
    caption: str  # above the table of values at every evaluated step
    axis: str  # y label of the value-vs-step figure
    final_axis: str  # y label of the final-value-vs-budget figure
    worse: str  # how an arm that ends worse than it started is described
    noise_hint: str
    recovered_column: str | None = None
    recovered_text: str = ""  # the definition under the results table
    recovered_claim: str = ""  # the "nearly matches" claim's threshold, formatted with NEARLY_MATCHES
    recovered_detail: str = ""  # formatted with the arm's share

    def better(self, diff: float) -> float:
        """``diff`` (a - b) signed so that positive means a is better."""
        return diff if self.higher_is_better else -diff

    def show(self, x: float | None, std: float | None = None) -> str:
        """A value (and its std) as the tables show it; ``-`` for None."""
        if x is None:
            return "-"
        return self._number(x) + ("" if std is None else f" ± {self._number(std)}")

    def show_unit(self, x: float) -> str:
        """A value in running text: ``26.0%`` or ``0.412``."""
        return self._number(x) + ("%" if self.percent else "")

    def show_delta(self, d: float, signed: bool = False) -> str:
        """A difference or standard error: ``+2.0 pp`` or ``+0.014``."""
        scale, digits = (100, 1) if self.percent else (1, 3)
        return f"{scale * d:{'+' if signed else ''}.{digits}f}" + (" pp" if self.percent else "")

    def _number(self, x: float) -> str:
        return f"{100 * x:.1f}" if self.percent else f"{x:.3f}"


ACCURACY = Metric(
    "accuracy", "eval/accuracy", "accuracy", True, True, "greedy accuracy", "final accuracy % (mean ± std)",
    "Held-out accuracy during training (%, mean over seeds):", "held-out greedy accuracy (%)",
    "final held-out accuracy (%)", "below its starting accuracy", "differences of a few points are within noise",
    recovered_column="gain recovered vs all",
    recovered_text="Gain recovered = (acc - acc_before) / (acc_all - acc_before) with mean accuracies.",
    recovered_claim="recovers >= {:.0%} of its gain", recovered_detail="recovers {:.2f} of the gain")
RKL = Metric(
    "rkl", "eval/rkl", "held-out KL", False, False,
    "reverse KL per token to the teacher on the student's greedy samples", "final held-out KL (mean ± std)",
    "Held-out reverse KL per token, KL(student‖teacher) on the student's greedy samples, during training "
    "(mean over seeds; lower is better):", "held-out reverse KL per token (student‖teacher)",
    "final held-out reverse KL per token", "above its starting held-out KL",
    "differences smaller than the spread between seeds are within noise",
    recovered_column="KL gap closed vs all",
    recovered_text="KL gap closed = (kl_before - kl_arm) / (kl_before - kl_all) with mean held-out KLs.",
    recovered_claim="closes >= {:.0%} of its KL gap", recovered_detail="closes {:.2f} of the KL gap")
AGREEMENT = Metric(
    "agreement", "eval/teacher_agreement", "agreement", True, True, "greedy agreement with the teacher's argmax",
    "final agreement % (mean ± std)",
    "Held-out greedy agreement with the teacher's argmax during training (%, mean over seeds):",
    "held-out greedy agreement with the teacher (%)", "final held-out agreement with the teacher (%)",
    "below its starting agreement", "differences of a few points are within noise")
# In the order the page shows them after the primary one.
METRICS: dict[str, Metric] = {m.name: m for m in (RKL, AGREEMENT, ACCURACY)}
# The metrics a run must have one of, and that --metric chooses from, in the default's preference.
PRIMARY = ("accuracy", "rkl")


@dataclass(frozen=True)
class RunScore:
    """One held-out metric of one run: before training, after the last step, and its eval curve
    ``[(step, value)]``."""

    before: float
    after: float
    curve: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class RunRecord:
    """One finished training run: its arm and seed, selection settings, its held-out ``scores``
    per metric name, tokens kept and valid over all steps, the mean kept fraction, the learner's
    peak memory (max over steps), the wall time, the resolved config and the training command
    ``tip-ray sweep`` ran (empty for a run not started by the sweep).
    ``end_state``: the means of ``DIAGNOSTICS`` over the last tenth of the steps."""

    arm: str
    seed: int
    rule: str
    ratio: float | None
    direction: str
    kept_tokens: int
    valid_tokens: int
    kept_fraction: float
    peak_memory_mb: float
    wall_seconds: float | None
    steps: int
    config: dict[str, Any]
    run_dir: Path
    command: tuple[str, ...] = ()
    end_state: dict[str, float] = field(default_factory=dict)
    scores: dict[str, RunScore] = field(default_factory=dict)

    @property
    def accuracy_before(self) -> float | None:
        """Accuracy before training (None: not logged)."""
        return self.scores["accuracy"].before if "accuracy" in self.scores else None

    @property
    def accuracy_after(self) -> float | None:
        """Accuracy after the last step (None: not logged)."""
        return self.scores["accuracy"].after if "accuracy" in self.scores else None

    @property
    def curve(self) -> tuple[tuple[int, float], ...]:
        """The accuracy curve ``[(step, accuracy)]`` (empty: not logged)."""
        return self.scores["accuracy"].curve if "accuracy" in self.scores else ()


# Per-step metrics that describe the student at the end of training (see ``RunRecord.end_state``).
DIAGNOSTICS = ("rkl_mean", "entropy_mean", "response_length", "truncated")


class ReportError(ValueError):
    """A run directory that cannot be read as a finished run."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from None


def _summary_value(summary: dict[str, Any], metric: Metric, when: str) -> float | None:
    """The metric ``before``/``after`` training from ``summary.json``: ``eval_<when>[key]``, or
    the top-level ``<name>_<when>`` of older summaries (accuracy only)."""
    value = (summary.get(f"eval_{when}") or {}).get(metric.key)
    return summary.get(f"{metric.name}_{when}") if value is None else value


def _curve(rows: Sequence[dict[str, Any]], key: str) -> tuple[tuple[int, float], ...]:
    """``[(step, value)]`` of ``key``; the final evaluation is logged after the last step's
    metrics, at the same step, and wins."""
    curve = {int(r["step"]): float(r[key]) for r in rows if r.get(key) is not None}
    return tuple(sorted(curve.items()))


def _scores(summary: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, RunScore]:
    """Every metric of ``METRICS`` the run has a value of before and after training for."""
    scores = {}
    for m in METRICS.values():
        before, after = _summary_value(summary, m, "before"), _summary_value(summary, m, "after")
        if before is not None and after is not None:
            scores[m.name] = RunScore(float(before), float(after), _curve(rows, m.key))
    return scores


def load_run(run_dir: str | Path) -> RunRecord:
    """Read one finished run directory (``<arm>/seed<k>``); ``ReportError`` names a missing or
    unreadable file, or a run with neither held-out accuracy nor held-out reverse KL."""
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json")
    summary = _read_json(run_dir / "summary.json")
    rows = []
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"cannot read {run_dir / 'metrics.jsonl'}: {exc}") from None
    sweep_path = run_dir / "sweep_run.json"
    sweep_run = _read_json(sweep_path) if sweep_path.is_file() else {}
    wall = sweep_run.get("wall_seconds")
    steps = [r for r in rows if "kept_tokens" in r]
    if not steps:
        raise ReportError(f"{run_dir / 'metrics.jsonl'} has no training step")
    scores = _scores(summary, rows)
    if not scores.keys() & set(PRIMARY):
        raise ReportError(f"{run_dir / 'summary.json'} has neither held-out accuracy nor held-out reverse KL "
                          "(eval/accuracy, eval/rkl before and after training; was the run given eval data?)")
    seed_name = run_dir.name
    selection = config.get("selection", {})
    return RunRecord(
        arm=run_dir.parent.name,
        seed=int(seed_name[4:]) if seed_name.startswith("seed") and seed_name[4:].isdigit() else -1,
        rule=selection.get("rule", "?"),
        ratio=selection.get("ratio"),
        direction=selection.get("direction", "top"),
        kept_tokens=int(sum(r["kept_tokens"] for r in steps)),
        valid_tokens=int(sum(r["valid_tokens"] for r in steps)),
        kept_fraction=sum(float(r["kept_fraction"]) for r in steps) / len(steps),
        peak_memory_mb=max(float(r.get("learner_peak_memory_mb", 0.0)) for r in steps),
        wall_seconds=None if wall is None else float(wall),
        steps=len(steps),
        config=config,
        run_dir=run_dir,
        command=tuple(sweep_run.get("command", ())),
        end_state={k: _mean([float(r[k]) for r in steps[-max(1, len(steps) // 10):]])
                   for k in DIAGNOSTICS if all(k in r for r in steps)},
        scores=scores,
    )


def collect_runs(root: str | Path) -> list[RunRecord]:
    """Every finished run under ``root/<arm>/seed<k>/``: a ``summary.json`` written at the run's
    last step (``tip_ray.experiments.sweep.run_finished``; a run stopped early is left out until resumed)."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"sweep root {root} is not a directory")
    return [load_run(p.parent) for p in sorted(root.glob("*/seed*/summary.json")) if run_finished(p.parent)]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: Sequence[float]) -> float | None:
    """Sample standard deviation (n - 1); None for a single value."""
    return statistics.stdev(xs) if len(xs) > 1 else None


@dataclass(frozen=True)
class ArmScore:
    """One held-out metric of an arm over its seeds: final mean and sample std, the mean before
    training, the share of the ``all`` arm's improvement (None without an ``all`` arm or without
    an improvement), and the mean eval curve ``[(step, mean, std)]`` over the steps every seed
    evaluated."""

    final: float
    std: float | None
    before: float
    recovered: float | None
    curve: tuple[tuple[int, float, float | None], ...]


@dataclass(frozen=True)
class ArmSummary:
    """An arm averaged over its seeds: tokens trained, kept fraction, peak memory, wall time,
    end state and, per metric name, its held-out ``scores``."""

    arm: str
    rule: str
    ratio: float | None
    direction: str
    seeds: tuple[int, ...]
    kept_tokens: float
    kept_fraction: float
    peak_memory_mb: float
    wall_seconds: float | None
    end_state: dict[str, float] = field(default_factory=dict)
    scores: dict[str, ArmScore] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of seeds."""
        return len(self.seeds)

    def _accuracy(self, attr: str) -> Any:
        score = self.scores.get("accuracy")
        return None if score is None else getattr(score, attr)

    @property
    def accuracy(self) -> float | None:
        """Final accuracy, mean over seeds (None: not logged)."""
        return self._accuracy("final")

    @property
    def accuracy_std(self) -> float | None:
        """Final accuracy's sample std over seeds (None: one seed or not logged)."""
        return self._accuracy("std")

    @property
    def accuracy_before(self) -> float | None:
        """Accuracy before training, mean over seeds (None: not logged)."""
        return self._accuracy("before")

    @property
    def recovered(self) -> float | None:
        """Accuracy gain recovered relative to ``all`` (None: unknown or not logged)."""
        return self._accuracy("recovered")

    @property
    def curve(self) -> tuple[tuple[int, float, float | None], ...]:
        """The mean accuracy curve (empty: not logged)."""
        return self._accuracy("curve") or ()


def _arm_order(name: str) -> tuple[int, str]:
    known = [a.name for a in DEFAULT_ARMS]
    return (known.index(name), name) if name in known else (len(known), name)


def _arm_score(runs: Sequence[RunRecord], name: str, before: float, baseline: float | None) -> ArmScore:
    """Metric ``name`` of one arm's ``runs``; ``before``: its mean before training over every run,
    ``baseline``: the ``all`` arm's mean final value (None without one)."""
    scores = [r.scores[name] for r in runs]
    final = _mean([s.after for s in scores])
    gain = None if baseline is None else baseline - before
    common = set.intersection(*(set(dict(s.curve)) for s in scores))
    curve = tuple((step, _mean(vals), _std(vals))
                  for step in sorted(common) for vals in [[dict(s.curve)[step] for s in scores]])
    return ArmScore(final=final, std=_std([s.after for s in scores]), before=_mean([s.before for s in scores]),
                    recovered=None if gain is None or abs(gain) < 1e-12 else (final - before) / gain, curve=curve)


def summarize(records: Sequence[RunRecord]) -> list[ArmSummary]:
    """Per-arm means over seeds of every metric all runs logged, in the sweep's arm order
    (unknown arms after, by name)."""
    if not records:
        raise ReportError("no finished runs to report")
    names = [n for n in METRICS if all(n in r.scores for r in records)]
    if not set(names) & set(PRIMARY):
        raise ReportError("the runs share no held-out metric: some logged only accuracy, others only reverse KL")
    by_arm: dict[str, list[RunRecord]] = {}
    for r in records:
        by_arm.setdefault(r.arm, []).append(r)
    baseline = next((rs for rs in by_arm.values() if rs[0].rule == "all"), None)
    before = {n: _mean([r.scores[n].before for r in records]) for n in names}
    final_all = {n: None if baseline is None else _mean([r.scores[n].after for r in baseline]) for n in names}
    out = []
    for arm in sorted(by_arm, key=_arm_order):
        rs = sorted(by_arm[arm], key=lambda r: r.seed)
        walls = [r.wall_seconds for r in rs if r.wall_seconds is not None]
        out.append(ArmSummary(
            arm=arm, rule=rs[0].rule, ratio=rs[0].ratio, direction=rs[0].direction,
            seeds=tuple(r.seed for r in rs),
            kept_tokens=_mean([r.kept_tokens for r in rs]), kept_fraction=_mean([r.kept_fraction for r in rs]),
            peak_memory_mb=_mean([r.peak_memory_mb for r in rs]),
            wall_seconds=_mean(walls) if walls else None,
            end_state={k: _mean([r.end_state[k] for r in rs]) for k in DIAGNOSTICS
                       if all(k in r.end_state for r in rs)},
            scores={n: _arm_score(rs, n, before[n], final_all[n]) for n in names},
        ))
    return out


def choose_metric(summaries: Sequence[ArmSummary], requested: str | None = None) -> str:
    """The primary metric: ``requested`` (``ReportError`` if some arm lacks it), else accuracy
    when every arm has it, else reverse KL."""
    present = [n for n in PRIMARY if all(n in s.scores for s in summaries)]
    if requested is None and present:
        return present[0]
    if requested not in present:
        key = METRICS[requested].key if requested in METRICS else requested
        raise ReportError(f"--metric {requested}: not every run logged {key}")
    return requested


def shown_metrics(summaries: Sequence[ArmSummary], metric: str | None = None) -> list[Metric]:
    """The metrics every arm has: the primary one (``choose_metric``) first, then in ``METRICS`` order."""
    primary = choose_metric(summaries, metric)
    names = [n for n in METRICS if n != primary and all(n in s.scores for s in summaries)]
    return [METRICS[primary], *(METRICS[n] for n in names)]


def results_table(summaries: Sequence[ArmSummary], metric: str | None = None) -> str:
    """The markdown results table, one row per arm, with the final value (and share of ``all``'s
    improvement) of every metric, the primary ``metric`` first."""
    metrics = shown_metrics(summaries, metric)
    columns = [c for m in metrics for c in (m.column, m.recovered_column) if c]
    head = ("| arm | rule | ratio | seeds | tokens trained (kept) | kept | " + " | ".join(columns)
            + " | peak learner memory MB | wall time s |")
    lines = [head, "|" + "---|" * (len(columns) + 8)]
    for s in summaries:
        ratio = "-" if s.ratio is None else f"{s.ratio:g}" + (" bottom" if s.direction == "bottom" else "")
        cells = []
        for m in metrics:
            score = s.scores[m.name]
            cells.append(m.show(score.final, score.std))
            if m.recovered_column:
                cells.append("-" if score.recovered is None else f"{score.recovered:.2f}")
        lines.append(
            f"| {s.arm} | `{s.rule}` | {ratio} | {s.n} | {s.kept_tokens:,.0f} | {100 * s.kept_fraction:.1f}% "
            f"| {' | '.join(cells)} "
            f"| {s.peak_memory_mb:.0f} | {'-' if s.wall_seconds is None else f'{s.wall_seconds:.0f}'} |"
        )
    return "\n".join(lines)


def end_state_table(summaries: Sequence[ArmSummary]) -> str:
    """The student at the end of training: reverse KL to the teacher and entropy over all
    response tokens, response length, truncated responses per step (last tenth of the steps)."""
    lines = ["| arm | KL(student‖teacher) per token | student entropy | response length | truncated per step |",
             "|---|---|---|---|---|"]
    for s in summaries:
        e = s.end_state
        cells = [f"{e[k]:.3f}" if k in e else "-" for k in ("rkl_mean", "entropy_mean")]
        cells += [f"{e[k]:.1f}" if k in e else "-" for k in ("response_length", "truncated")]
        lines.append(f"| {s.arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(summaries: Sequence[ArmSummary], metric: str = "accuracy") -> str:
    """Held-out ``metric`` (mean over seeds) at every evaluated step, one row per arm."""
    m = METRICS[metric]
    steps = sorted({c[0] for s in summaries for c in s.scores[metric].curve})
    lines = ["| arm | " + " | ".join(f"step {k}" for k in steps) + " |", "|---|" + "---|" * len(steps)]
    for s in summaries:
        at = {c[0]: c[1] for c in s.scores[metric].curve}
        lines.append(f"| {s.arm} | " + " | ".join(m.show(at.get(k)) for k in steps) + " |")
    return "\n".join(lines)


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


def _arm_colors(summaries: Sequence[ArmSummary]) -> list:
    """One distinct colour per arm (tab10, then black and greys)."""
    import matplotlib.pyplot as plt

    palette = [*plt.get_cmap("tab10").colors, "black", "0.45", "0.7"]
    return [palette[i % len(palette)] for i in range(len(summaries))]


def _is_control(s: ArmSummary) -> bool:
    return s.rule == "random" or s.direction == "bottom"


def _zoom_pad(values: Sequence[float], metric: Metric) -> float:
    """Margin around the zoomed panel's values: 3 points for a percentage, else a tenth of their span."""
    return 3.0 if metric.percent else max(0.1 * (max(values) - min(values)), 0.01)


def plot_curves(summaries: Sequence[ArmSummary], path: str | Path, metric: str = "accuracy") -> Path:
    """Held-out ``metric`` vs rollout step, mean over seeds with a ±1 std band, one line per arm;
    left every arm, right zoomed on the arms that end better than they started."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = METRICS[metric]
    scale = 100 if m.percent else 1
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    colors = _arm_colors(summaries)
    curves = {s.arm: s.scores[metric].curve for s in summaries}
    improved = [s for s in summaries
                if curves[s.arm] and m.better(s.scores[metric].final - s.scores[metric].before) > 0]
    for ax, shown in zip(axes, (summaries, improved)):
        for s in shown:
            curve = curves[s.arm]
            if not curve:
                continue
            color = colors[list(summaries).index(s)]
            steps = [c[0] for c in curve]
            ax.plot(steps, [scale * c[1] for c in curve], "--" if _is_control(s) else "-", marker="o", ms=3,
                    color=color, label=f"{s.arm} (n={s.n})")
            if all(c[2] is not None for c in curve):
                ax.fill_between(steps, [scale * (c[1] - c[2]) for c in curve],
                                [scale * (c[1] + c[2]) for c in curve], color=color, alpha=0.12)
        ax.set_xlabel("rollout step")
        ax.set_ylabel(m.axis)
        ax.grid(alpha=0.3)
    axes[0].set_title("every arm (mean over seeds, band: ±1 std)")
    axes[1].set_title("arms that improved on the start, zoomed")
    tail = [scale * c[1] for s in improved for c in curves[s.arm]
            if c[0] >= max(c2[0] for c2 in curves[s.arm]) / 2]
    if tail:
        pad = _zoom_pad(tail, m)
        axes[1].set_ylim(min(tail) - pad, max(tail) + pad)
    later = [c[0] for s in improved for c in curves[s.arm] if c[0] > 0]
    if later:
        axes[1].set_xlim(min(later) - 3, max(later) + 3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    return _save(fig, path, layout=False)


def plot_budget(summaries: Sequence[ArmSummary], path: str | Path, metric: str = "accuracy") -> Path:
    """Final held-out ``metric`` (mean ± std over seeds) vs the fraction of tokens kept, one point
    per arm (arms at the same budget are spread a little along x so their bars stay apart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = METRICS[metric]
    scale = 100 if m.percent else 1
    fig, ax = plt.subplots(figsize=(10, 5.5))
    colors = _arm_colors(summaries)
    budgets: dict[int, int] = {}
    for s, color in zip(summaries, colors):
        score = s.scores[metric]
        slot = budgets[round(100 * s.kept_fraction)] = budgets.get(round(100 * s.kept_fraction), -1) + 1
        x = 100 * s.kept_fraction + 1.2 * slot
        ax.errorbar(x, scale * score.final, yerr=None if score.std is None else scale * score.std,
                    fmt="x" if _is_control(s) else "o", color=color, capsize=3, label=f"{s.arm} (n={s.n})")
    before = _mean([s.scores[metric].before for s in summaries])
    ax.axhline(scale * before, color="grey", ls=":", label=f"before training ({m.show_unit(before)})")
    ax.set_xlabel("tokens kept (% of valid response tokens; arms at one budget offset by 1.2 each)")
    ax.set_ylabel(m.final_axis)
    ax.set_title(f"Final {m.short} vs token budget (mean ± std over seeds; x: random or bottom control)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def _save(fig, path: str | Path, layout: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _join(parts: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _model_path(records: Sequence[RunRecord], path: str) -> Path:
    """A model path of the config, relative paths taken from the sweep's directory (else here)."""
    return Path(path) if Path(path).is_absolute() else (_sweep_cwd(records) or Path.cwd()) / path


def _student_json(records: Sequence[RunRecord], name: str, beside: bool = False) -> dict[str, Any]:
    """The JSON file ``name`` inside the student's checkpoint directory, or ``beside`` it (in its
    parent); {} if there is none or it is unreadable."""
    student = records[0].config.get("student")
    if not student:
        return {}
    folder = _model_path(records, student)
    try:
        return json.loads(((folder.parent if beside else folder) / name).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _manifest(records: Sequence[RunRecord]) -> dict[str, Any]:
    """The ``manifest.json`` that ``prepare-demo``/``prepare-pair`` wrote beside the student ({} if none)."""
    return _student_json(records, "manifest.json", beside=True)


def _pair_name(records: Sequence[RunRecord]) -> str | None:
    """``embedded`` for the embedded default student, else the sweep's ``pair=`` override, else the
    manifest's pair (None if none of these)."""
    if records[0].config.get("student") == "runs/embedded/student":
        return "embedded"
    run = next((r for r in records if r.command), None)
    pair = next((o.split("=", 1)[1] for o in run.command[4:] if o.startswith("pair=")), None) if run else None
    return pair or _manifest(records).get("pair")


def _title(records: Sequence[RunRecord]) -> str:
    pair = _pair_name(records)
    if pair == "embedded":
        return "the embedded default"
    return f"the {pair} pair" if pair else f"`{records[0].config.get('student')}`"


def _parameters(n: int) -> str:
    """``0.43M`` below ten million, ``135M`` above."""
    millions = n / 1e6
    return f"{millions:.2f}M" if millions < 10 else f"{millions:.0f}M"


def _pair_text(manifest: dict[str, Any]) -> str | None:
    """The pair's models from a ``prepare-pair`` manifest (None for another manifest)."""
    if not manifest.get("pair"):
        return None
    t, s = manifest.get("teacher", {}), manifest.get("student", {})

    def size(model: dict[str, Any]) -> str:
        params = model.get("parameters")
        return f"{model.get('num_hidden_layers')} layers" + (f", {_parameters(params)} parameters" if params else "")

    kept = s.get("kept_layers")
    text = f"- Pair `{manifest['pair']}` (`tip-ray prepare-pair {manifest['pair']}`): teacher {size(t)}; student {size(s)}"
    text += f", the teacher's layers {', '.join(map(str, kept))}" if kept else ""
    vocab = s.get("vocab_size")
    return text + (f"; a shared vocabulary of {vocab:,}" if vocab else "") + f"; {s.get('dtype', t.get('dtype'))}."


def _setup_text(records: Sequence[RunRecord], rock_file: str | None, metrics: Sequence[Metric]) -> list[str]:
    cfg = records[0].config
    trainer, rollout, learner = cfg.get("trainer", {}), cfg.get("rollout", {}), cfg.get("learner", {})
    eval_data = cfg.get("eval_data", {})
    limit = eval_data.get("limit")
    seeds = sorted({r.seed for r in records})
    pair = _pair_text(_manifest(records))
    lines = [
        f"- Student `{cfg.get('student')}`, teacher `{cfg.get('teacher', {}).get('model')}`; "
        f"{trainer.get('steps')} steps x {trainer.get('prompts_per_step')} prompts x {rollout.get('n')} rollout(s) "
        f"per run (temperature {rollout.get('temperature')}, at most {rollout.get('max_new_tokens')} new tokens), "
        f"learner: {learner.get('world_size')} ranks, ZeRO-{learner.get('zero_stage')}, lr {learner.get('lr')}, "
        f"loss `{cfg.get('loss', {}).get('kind')}` normalised over kept tokens.",
        *([pair] if pair else []),
        f"- Held-out: {_join([m.setup for m in metrics])} on {'all the' if limit is None else limit} problems of "
        f"`{eval_data.get('path')}`, before training, every {trainer.get('eval_every')} steps and "
        "after the last step.",
        f"- Seeds {seeds}: seed k sets data.seed, rollout.seed, selection.seed, learner.seed and trainer.seed to k "
        "(prompt order, rollout sampling, sampled selection rules, learner initialisation).",
        f"- {len(records)} finished runs in {len({r.arm for r in records})} arms.",
    ]
    if rock_file:
        lines.append(_rock_text(rock_file, _shown_path(rock_file, _sweep_cwd(records))))
    return lines


NEGLIGIBLE = 0.01  # logits under this share of the learner's peak are called negligible


def _memory_text(records: Sequence[RunRecord], summaries: Sequence[ArmSummary]) -> str:
    """What the peak-memory column measures, and how big the logits are next to it (from the
    student's vocabulary, the learner's micro-batch and the longest sequence)."""
    cfg = records[0].config
    on_gpu = bool(cfg.get("cluster", {}).get("learner", {}).get("gpus"))
    text = ("Peak learner memory is the peak CUDA memory allocated on a learner rank" if on_gpu
            else "Peak learner memory on CPU is the learner process's peak resident set")
    vocab = _student_json(records, "config.json").get("vocab_size")
    rows = cfg.get("learner", {}).get("micro_batch_size")
    length = (cfg.get("data", {}).get("max_prompt_tokens") or 0) + (cfg.get("rollout", {}).get("max_new_tokens") or 0)
    if not vocab or not rows or not length:
        return text + "."
    logits_mb = rows * length * vocab * 4 / 2**20
    if logits_mb < NEGLIGIBLE * min(s.peak_memory_mb for s in summaries):
        return text + (f" (the vocabulary here is {vocab:,}, so the logits that selection saves are a negligible part "
                       "of it; the saving shows on GPUs with large vocabularies, see `make bench`).")
    return text + (f" (the vocabulary here is {vocab:,}: the fp32 logits of one micro-batch of {rows} x {length} "
                   f"tokens take {logits_mb:.0f} MB; see `make bench` for how selection changes the peak).")


def _scale_caveat(records: Sequence[RunRecord], summaries: Sequence[ArmSummary]) -> str:
    """How far the sweep's models, task and response lengths are from the papers'."""
    cfg, manifest = records[0].config, _manifest(records)

    def model(role: str, path: Any) -> str:
        params = manifest.get(role, {}).get("parameters")
        return f"a {_parameters(params)}-parameter {role}" if params else f"the {role} `{path}`"

    task = ("column arithmetic" if _pair_name(records) == "embedded"
            else f"to answer the prompts of `{cfg.get('data', {}).get('path')}`")
    base = next((s for s in summaries if s.rule == "all"), summaries[0])
    length = base.end_state.get("response_length")
    about = "" if length is None else f" with about {max(10, round(length, -1)):.0f}-token responses"
    return ("Scale caveat: the papers distil Qwen3 8B/4B -> 4B/1.7B on competition math with thousands of response "
            f"tokens; here {model('student', cfg.get('student'))} learns {task} from "
            f"{model('teacher', cfg.get('teacher', {}).get('model'))}{about}, so agreement is in kind, not in size.")


def _sweep_cwd(records: Sequence[RunRecord]) -> Path | None:
    """The directory the sweep ran in, from a run's relative ``trainer.output_dir`` (None if unknown)."""
    run = next((r for r in records if r.command), None)
    if run is None:
        return None
    out_dir = next((o.split("=", 1)[1] for o in run.command if o.startswith("trainer.output_dir=")), None)
    if out_dir is None or Path(out_dir).is_absolute():
        return None
    return run.run_dir.resolve().parents[len(Path(out_dir).parts) - 1]


def _shown_path(path: str, cwd: Path | None) -> str:
    """``path`` relative to the sweep's directory when it lies inside it."""
    if cwd is not None and Path(path).is_absolute() and Path(path).is_relative_to(cwd):
        return str(Path(path).relative_to(cwd))
    return path


def _rock_text(rock_file: str, shown: str) -> str:
    from tip_ray.tip.rocks import RockFileError, load_rock_set

    try:
        rocks = load_rock_set(rock_file)
    except RockFileError as exc:
        return f"- rock_freeze: {exc}"
    p = rocks.provenance
    return (f"- rock_freeze: `{shown}` holds {len(rocks.token_ids)} rocks (λ = 0: frozen), built by "
            f"`tip-ray rocks` from {p.get('num_rollouts')} student rollouts ({rocks.num_tokens} tokens, "
            f"{p.get('distinct_ids_seen')} distinct ids of the vocabulary of {p.get('vocab_size')}) after dropping the "
            f"{len(rocks.dropped_ids)} most frequent ids; the paper's 100 rocks / 5 dropped would be most of this "
            f"vocabulary. The rocks are {100 * sum(rocks.frequency):.1f}% of the sampled tokens.")


def _prepare_command(records: Sequence[RunRecord]) -> str | None:
    """The command that builds the sweep's models: ``prepare-demo`` or ``prepare-pair <pair>``."""
    from tip_ray.pairs.prepare import PAIRS

    pair = _pair_name(records)
    if pair == "embedded":
        return "tip-ray prepare-demo"
    return f"tip-ray prepare-pair {pair}" if pair in PAIRS else None


def reproduce_commands(records: Sequence[RunRecord], notes: str | None = None, out: str = "docs/results.md",
                       metric: str | None = None) -> list[str]:
    """The commands that rebuild the sweep from a checkout, as they were run (paths relative to
    the directory the sweep ran in): the models, the rock set if an arm used one, the sweep with
    its shared overrides, seeds and arms, and this report into ``out`` (with its ``notes`` file
    and ``--metric``, if any). Empty if no run records its command."""
    from tip_ray.experiments.sweep import is_per_run

    run = next((r for r in records if r.command), None)
    if run is None:
        return []
    overrides = list(run.command[4:])  # after: python -m tip_ray.cli train
    out_dir = Path(next((o.split("=", 1)[1] for o in overrides if o.startswith("trainer.output_dir=")), "."))
    root = out_dir.parent.parent
    prepare = _prepare_command(records)
    lines = [prepare] if prepare else []
    rock_file = next((r.config["selection"]["rock_file"] for r in records
                      if r.config.get("selection", {}).get("rock_file")), None)
    sweep = ["tip-ray", "sweep", "--root", str(root), "--seeds", *map(str, sorted({r.seed for r in records}))]
    arms = sorted({r.arm for r in records}, key=_arm_order)
    if set(arms) != {a.name for a in DEFAULT_ARMS}:
        sweep += ["--arms", ",".join(arms)]
    if rock_file:
        shown = _shown_path(rock_file, _sweep_cwd(records))
        from tip_ray.tip.rocks import RockFileError, load_rock_set

        try:
            rocks = load_rock_set(rock_file)
            lines.append(shlex.join(["tip-ray", "rocks", "--out", shown, "--rollouts",
                                     str(rocks.provenance.get("num_rollouts")), "--num-rocks",
                                     str(rocks.params.get("num_rocks")), "--drop-most-frequent",
                                     str(rocks.params.get("drop_most_frequent"))]))
        except RockFileError:
            pass
        sweep += ["--rock-file", shown]
    lines.append(shlex.join(sweep + [o for o in overrides if not is_per_run(o)]))
    report = ["tip-ray", "report", "--root", str(root), "--out", out]
    lines.append(shlex.join(report + (["--notes", notes] if notes else []) + (["--metric", metric] if metric else [])))
    return lines


_COUNTS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _noise_text(summaries: Sequence[ArmSummary], metric: Metric) -> str:
    """How a difference is judged against the seed noise, and on which metric."""
    n = max(s.n for s in summaries)
    text = ("A difference counts as beyond seed noise when it exceeds twice its standard error "
            "(sqrt(std_a²/n_a + std_b²/n_b) over seeds); "
            + (f"with {_COUNTS[n] if n < len(_COUNTS) else n} seeds, {metric.noise_hint}." if n > 1
               else "with one seed per arm there is no spread to judge by."))
    if metric is not ACCURACY:
        text += (" The papers' numbers are accuracies; here every claim is judged on the final "
                 f"{metric.short} ({'higher' if metric.higher_is_better else 'lower'} is better).")
    return text


def _metric_section(summaries: Sequence[ArmSummary], metric: Metric, figures: dict[str, str]) -> list[str]:
    """One metric's table at every evaluated step and its two figures."""
    return [metric.caption, "", curve_table(summaries, metric.name), "",
            f"![{metric.short} vs step]({figures['curves']})", "",
            f"![{metric.short} vs budget]({figures['budget']})", ""]


def render(summaries: Sequence[ArmSummary], records: Sequence[RunRecord], figures: dict[str, dict[str, str]],
           command: str, notes: tuple[str, str] | None = None, metric: str | None = None,
           out: str = "docs/results.md") -> str:
    """The markdown page; ``figures``: per metric name, the ``curves`` and ``budget`` figures'
    paths; ``notes`` (path, markdown text): hand-written analysis placed after the generated
    findings, under its own heading; ``metric``: the primary metric (default ``choose_metric``);
    ``out``: the page's path in the commands that regenerate it."""
    rock_file = next((r.config.get("selection", {}).get("rock_file") for r in records
                      if r.config.get("selection", {}).get("rock_file")), None)
    metrics = shown_metrics(summaries, metric)
    primary = metrics[0]
    explicit = None if primary.name == choose_metric(summaries) else primary.name
    claims = check_claims(summaries, primary.name)
    groups = (("Agrees, beyond seed noise", [c for c in claims if c.verdict == "agrees" and c.clear]),
              ("Agrees in direction, within seed noise (or one seed)",
               [c for c in claims if c.verdict == "agrees" and not c.clear]),
              ("Does not agree", [c for c in claims if c.verdict != "agrees"]))
    out_lines = [
        f"# Selection-rule sweep on {_title(records)}",
        "",
        f"Generated by `{command}` from the runs of `tip-ray sweep`; do not edit by hand. "
        "The whole experiment, from the repository root:",
        "",
        "```bash",
        *(reproduce_commands(records, notes[0] if notes else None, out, explicit) or [command]),
        "```",
        "",
        "## Setup",
        "",
        *_setup_text(records, rock_file, metrics),
        "",
        "## Results",
        "",
        results_table(summaries, primary.name),
        "",
        "Tokens trained: kept tokens summed over all steps (mean over seeds); kept: mean kept fraction. "
        + "".join(f"{m.recovered_text} " for m in metrics if m.recovered_text)
        + _memory_text(records, summaries)
        + " Wall time: the whole `tip-ray train` process, evaluations and start-up included, on a "
        "shared 2-core machine.",
        "",
        *(line for m in metrics for line in _metric_section(summaries, m, figures[m.name])),
        "The student at the end of training (mean over the last tenth of the steps and over seeds; every "
        "statistic over all sampled response tokens, kept or not):",
        "",
        end_state_table(summaries),
        "",
        "## Against the papers",
        "",
        _noise_text(summaries, primary),
        "",
        claims_table(claims, _pair_name(records) or "sweep"),
        "",
        *(f"- {title} ({len(cs)}): " + ("; ".join(c.statement for c in cs) or "none") + "." for title, cs in groups),
        "",
        *collapse_notes(summaries, primary.name),
        *([f"## Analysis (hand-written, from `{notes[0]}`)", "", notes[1].strip(), ""] if notes else []),
        _scale_caveat(records, summaries),
        "",
    ]
    return "\n".join(out_lines)


def collapse_notes(summaries: Sequence[ArmSummary], metric: str = "accuracy") -> list[str]:
    """One paragraph per arm whose final ``metric`` is worse than where it started, with its end
    state next to the ``all`` arm's (empty list if there is none)."""
    m = METRICS[metric]
    base = next((s for s in summaries if s.rule == "all"), None)
    notes = []
    for s in summaries:
        score = s.scores[metric]
        if m.better(score.final - score.before) >= 0 or not s.end_state:
            continue
        e = s.end_state
        text = (f"{s.arm} ends {m.worse} ({m.show_unit(score.final)} vs {m.show_unit(score.before)}). "
                f"At the end its KL(student‖teacher) per token is {e.get('rkl_mean', float('nan')):.3f}, its "
                f"responses average {e.get('response_length', float('nan')):.1f} tokens and "
                f"{e.get('truncated', float('nan')):.1f} per step hit the length limit")
        if base is not None and base.end_state:
            b = base.end_state
            text += (f" ({base.arm}: {b.get('rkl_mean', float('nan')):.3f}, "
                     f"{b.get('response_length', float('nan')):.1f} tokens, {b.get('truncated', float('nan')):.1f})")
        notes += [text + ".", ""]
    return notes


DEFAULT_COMMAND = "tip-ray report --root runs/sweep --out docs/results.md"


def figure_prefix(out: str | Path) -> str:
    """The prefix of the page's figure files: ``sweep`` for ``results.md`` (the names
    docs/results.md has always used), else the page's stem (``results_real.md``: ``results_real``)."""
    stem = Path(out).stem
    return "sweep" if stem == "results" else stem


def _shown_out(out: Path) -> str:
    """The page's path in the commands that regenerate it: as given when relative, else
    ``docs/<name>``."""
    return f"docs/{out.name}" if out.is_absolute() else str(out)


def write_report(root: str | Path, out: str | Path, command: str = DEFAULT_COMMAND,
                 notes: str | Path | None = None, metric: str | None = None) -> Path:
    """Read the sweep under ``root`` and write ``out`` (markdown) plus ``figures/`` beside it
    (``<prefix>_<metric>_vs_step.png`` and ``..._vs_budget.png`` per metric, ``figure_prefix``),
    with the markdown file ``notes`` (hand-written analysis) included if given; ``metric``: the
    primary metric, ``accuracy`` or ``rkl`` (default: ``choose_metric``)."""
    note = None
    if notes is not None:
        if not Path(notes).is_file():
            raise ReportError(f"--notes {notes}: no such file")
        note = (str(notes), Path(notes).read_text())
    records = collect_runs(root)
    summaries = summarize(records)
    out = Path(out)
    figures_dir, prefix = out.parent / "figures", figure_prefix(out)
    figures = {}
    for m in shown_metrics(summaries, metric):
        curves = plot_curves(summaries, figures_dir / f"{prefix}_{m.name}_vs_step.png", m.name)
        budget = plot_budget(summaries, figures_dir / f"{prefix}_{m.name}_vs_budget.png", m.name)
        figures[m.name] = {"curves": str(curves.relative_to(out.parent)),
                           "budget": str(budget.relative_to(out.parent))}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(summaries, records, figures, command, note, metric, _shown_out(out)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tip_ray.experiments.report --root runs/sweep --out docs/results.md``."""
    parser = argparse.ArgumentParser(prog="tip-ray report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The report's options (shared by ``tip-ray report`` and ``python -m tip_ray.experiments.report``)."""
    parser.add_argument("--root", default="runs/sweep", help="sweep root (default: runs/sweep)")
    parser.add_argument("--out", default="docs/results.md",
                        help="markdown file; figures go to its figures/ folder, named sweep_* for results.md and "
                             "<stem>_* otherwise")
    parser.add_argument("--notes", help="a markdown file of hand-written analysis to include (kept across reruns)")
    parser.add_argument("--metric", choices=PRIMARY, default=None,
                        help="the primary held-out metric, first in the tables and the one the claims are judged "
                             "on: accuracy, or rkl (reverse KL per token to the teacher on the student's greedy "
                             "samples, lower is better); default: accuracy when every run logged it, else rkl")


def run(args: argparse.Namespace) -> int:
    """Write the report and print the table."""
    try:
        command = (f"tip-ray report --root {args.root} --out {args.out}" + (f" --notes {args.notes}" if args.notes else "")
                   + (f" --metric {args.metric}" if args.metric else ""))
        path = write_report(args.root, args.out, command, args.notes, args.metric)
        table = results_table(summarize(collect_runs(args.root)), args.metric)
    except ReportError as exc:
        raise SystemExit(f"tip-ray report: {exc}") from None
    print(table)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
