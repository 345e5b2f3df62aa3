"""The sweep's numbers: finished runs read from their directories, and arms averaged over seeds.

A run directory (``<root>/<arm>/seed<k>/``) holds ``config.json``, ``metrics.jsonl``,
``summary.json`` and, from ``tip-ray sweep``, ``sweep_run.json``.

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

import json
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
    "final held-out accuracy (%)", "below its starting accuracy",
    recovered_column="gain recovered vs all",
    recovered_text="Gain recovered = (acc - acc_before) / (acc_all - acc_before) with mean accuracies.",
    recovered_claim="recovers >= {:.0%} of its gain", recovered_detail="recovers {:.2f} of the gain")
RKL = Metric(
    "rkl", "eval/rkl", "held-out KL", False, False,
    "reverse KL per token to the teacher on the student's greedy samples", "final held-out KL (mean ± std)",
    "Held-out reverse KL per token, KL(student‖teacher) on the student's greedy samples, during training "
    "(mean over seeds; lower is better):", "held-out reverse KL per token (student‖teacher)",
    "final held-out reverse KL per token", "above its starting held-out KL",
    recovered_column="KL gap closed vs all",
    recovered_text="KL gap closed = (kl_before - kl_arm) / (kl_before - kl_all) with mean held-out KLs.",
    recovered_claim="closes >= {:.0%} of its KL gap", recovered_detail="closes {:.2f} of the KL gap")
AGREEMENT = Metric(
    "agreement", "eval/teacher_agreement", "agreement", True, True, "greedy agreement with the teacher's argmax",
    "final agreement % (mean ± std)",
    "Held-out greedy agreement with the teacher's argmax during training (%, mean over seeds):",
    "held-out greedy agreement with the teacher (%)", "final held-out agreement with the teacher (%)",
    "below its starting agreement")
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
    ``tip-ray sweep`` ran (empty for a run not started by the sweep) and the machine it recorded.
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
    machine: dict[str, Any] = field(default_factory=dict)


# Per-step metrics that describe the student at the end of training (see ``RunRecord.end_state``).
DIAGNOSTICS = ("rkl_mean", "entropy_mean", "response_length", "truncated")


class ReportError(ValueError):
    """A run directory that cannot be read as a finished run."""


def _read_json(path: Path) -> Any:
    """The JSON in ``path``; ``ReportError`` names the file when it is missing or unreadable."""
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
        machine=dict(sweep_run.get("machine") or {}),
        end_state={k: mean([float(r[k]) for r in steps[-max(1, len(steps) // 10):]])
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


def mean(xs: Sequence[float]) -> float:
    """Arithmetic mean of a non-empty sequence."""
    return sum(xs) / len(xs)


def sample_std(xs: Sequence[float]) -> float | None:
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


def arm_order(name: str) -> tuple[int, str]:
    """Sort key of an arm: the sweep's order of ``DEFAULT_ARMS``, unknown arms after by name."""
    known = [a.name for a in DEFAULT_ARMS]
    return (known.index(name), name) if name in known else (len(known), name)


def _arm_score(runs: Sequence[RunRecord], name: str, before: float, baseline: float | None) -> ArmScore:
    """Metric ``name`` of one arm's ``runs``; ``before``: its mean before training over every run,
    ``baseline``: the ``all`` arm's mean final value (None without one)."""
    scores = [r.scores[name] for r in runs]
    final = mean([s.after for s in scores])
    gain = None if baseline is None else baseline - before
    common = set.intersection(*(set(dict(s.curve)) for s in scores))
    curve = tuple((step, mean(vals), sample_std(vals))
                  for step in sorted(common) for vals in [[dict(s.curve)[step] for s in scores]])
    return ArmScore(final=final, std=sample_std([s.after for s in scores]), before=mean([s.before for s in scores]),
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
    before = {n: mean([r.scores[n].before for r in records]) for n in names}
    final_all = {n: None if baseline is None else mean([r.scores[n].after for r in baseline]) for n in names}
    out = []
    for arm in sorted(by_arm, key=arm_order):
        rs = sorted(by_arm[arm], key=lambda r: r.seed)
        walls = [r.wall_seconds for r in rs if r.wall_seconds is not None]
        out.append(ArmSummary(
            arm=arm, rule=rs[0].rule, ratio=rs[0].ratio, direction=rs[0].direction,
            seeds=tuple(r.seed for r in rs),
            kept_tokens=mean([r.kept_tokens for r in rs]), kept_fraction=mean([r.kept_fraction for r in rs]),
            peak_memory_mb=mean([r.peak_memory_mb for r in rs]),
            wall_seconds=mean(walls) if walls else None,
            end_state={k: mean([r.end_state[k] for r in rs]) for k in DIAGNOSTICS
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

