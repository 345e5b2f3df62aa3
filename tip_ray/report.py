"""``tip-ray report``: the sweep's results as a markdown page with plots.

Reads every finished run under a sweep root (``<root>/<arm>/seed<k>/`` with ``config.json``,
``metrics.jsonl``, ``summary.json`` and, from ``tip-ray sweep``, ``sweep_run.json``), averages
each arm over its seeds, and writes a table, two figures and a comparison with the papers'
claims. Accuracy gain recovered is (acc - acc_before) / (acc_all - acc_before), with the arm's
mean final accuracy, the mean accuracy before training over every run, and the mean final
accuracy of the ``all`` arm.
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

from tip_ray.sweep import DEFAULT_ARMS


@dataclass(frozen=True)
class RunRecord:
    """One finished training run: its arm and seed, selection settings, accuracies, the eval
    curve ``[(step, accuracy)]``, tokens kept and valid over all steps, the mean kept fraction,
    the learner's peak memory (max over steps), the wall time, the resolved config and the
    training command ``tip-ray sweep`` ran (empty for a run not started by the sweep).
    ``end_state``: the means of ``DIAGNOSTICS`` over the last tenth of the steps."""

    arm: str
    seed: int
    rule: str
    ratio: float | None
    direction: str
    accuracy_before: float
    accuracy_after: float
    curve: tuple[tuple[int, float], ...]
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


# Per-step metrics that describe the student at the end of training (see ``RunRecord.end_state``).
DIAGNOSTICS = ("rkl_mean", "entropy_mean", "response_length", "truncated")


class ReportError(ValueError):
    """A run directory that cannot be read as a finished run."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from None


def load_run(run_dir: str | Path) -> RunRecord:
    """Read one finished run directory (``<arm>/seed<k>``); ``ReportError`` names a missing or
    unreadable file."""
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
    if summary.get("accuracy_before") is None or summary.get("accuracy_after") is None:
        raise ReportError(f"{run_dir / 'summary.json'} has no accuracy (was the run given eval data?)")
    curve = {}
    for r in rows:  # the final evaluation is logged after the last step's metrics, at the same step
        if r.get("eval/accuracy") is not None:
            curve[int(r["step"])] = float(r["eval/accuracy"])
    seed_name = run_dir.name
    selection = config.get("selection", {})
    return RunRecord(
        arm=run_dir.parent.name,
        seed=int(seed_name[4:]) if seed_name.startswith("seed") and seed_name[4:].isdigit() else -1,
        rule=selection.get("rule", "?"),
        ratio=selection.get("ratio"),
        direction=selection.get("direction", "top"),
        accuracy_before=float(summary["accuracy_before"]),
        accuracy_after=float(summary["accuracy_after"]),
        curve=tuple(sorted(curve.items())),
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
    )


def collect_runs(root: str | Path) -> list[RunRecord]:
    """Every finished run (a ``summary.json`` present) under ``root/<arm>/seed<k>/``."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"sweep root {root} is not a directory")
    return [load_run(p.parent) for p in sorted(root.glob("*/seed*/summary.json"))]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: Sequence[float]) -> float | None:
    """Sample standard deviation (n - 1); None for a single value."""
    return statistics.stdev(xs) if len(xs) > 1 else None


@dataclass(frozen=True)
class ArmSummary:
    """An arm averaged over its seeds: final accuracy mean and sample std, tokens trained,
    kept fraction, accuracy before, gain recovered relative to ``all`` (None without an ``all``
    arm or without a gain), peak memory, wall time, and the mean eval curve
    ``[(step, mean, std)]`` over the steps every seed evaluated."""

    arm: str
    rule: str
    ratio: float | None
    direction: str
    seeds: tuple[int, ...]
    accuracy: float
    accuracy_std: float | None
    accuracy_before: float
    kept_tokens: float
    kept_fraction: float
    recovered: float | None
    peak_memory_mb: float
    wall_seconds: float | None
    curve: tuple[tuple[int, float, float | None], ...]
    end_state: dict[str, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of seeds."""
        return len(self.seeds)


def _arm_order(name: str) -> tuple[int, str]:
    known = [a.name for a in DEFAULT_ARMS]
    return (known.index(name), name) if name in known else (len(known), name)


def summarize(records: Sequence[RunRecord]) -> list[ArmSummary]:
    """Per-arm means over seeds, in the sweep's arm order (unknown arms after, by name)."""
    if not records:
        raise ReportError("no finished runs to report")
    before = _mean([r.accuracy_before for r in records])
    by_arm: dict[str, list[RunRecord]] = {}
    for r in records:
        by_arm.setdefault(r.arm, []).append(r)
    baseline = next((rs for rs in by_arm.values() if rs[0].rule == "all"), None)
    acc_all = _mean([r.accuracy_after for r in baseline]) if baseline else None
    out = []
    for arm in sorted(by_arm, key=_arm_order):
        rs = sorted(by_arm[arm], key=lambda r: r.seed)
        acc = _mean([r.accuracy_after for r in rs])
        gain = None if acc_all is None else acc_all - before
        common = set.intersection(*(set(dict(r.curve)) for r in rs))
        curve = tuple((step, _mean(vals), _std(vals))
                      for step in sorted(common) for vals in [[dict(r.curve)[step] for r in rs]])
        walls = [r.wall_seconds for r in rs if r.wall_seconds is not None]
        out.append(ArmSummary(
            arm=arm, rule=rs[0].rule, ratio=rs[0].ratio, direction=rs[0].direction,
            seeds=tuple(r.seed for r in rs), accuracy=acc, accuracy_std=_std([r.accuracy_after for r in rs]),
            accuracy_before=_mean([r.accuracy_before for r in rs]),
            kept_tokens=_mean([r.kept_tokens for r in rs]), kept_fraction=_mean([r.kept_fraction for r in rs]),
            recovered=None if gain is None or abs(gain) < 1e-12 else (acc - before) / gain,
            peak_memory_mb=_mean([r.peak_memory_mb for r in rs]),
            wall_seconds=_mean(walls) if walls else None, curve=curve,
            end_state={k: _mean([r.end_state[k] for r in rs]) for k in DIAGNOSTICS
                       if all(k in r.end_state for r in rs)},
        ))
    return out


def _pct(x: float | None, std: float | None = None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")


def results_table(summaries: Sequence[ArmSummary]) -> str:
    """The markdown results table, one row per arm."""
    head = ("| arm | rule | ratio | seeds | tokens trained (kept) | kept | final accuracy % (mean ± std) "
            "| gain recovered vs all | peak learner memory MB | wall time s |")
    lines = [head, "|" + "---|" * 10]
    for s in summaries:
        ratio = "-" if s.ratio is None else f"{s.ratio:g}" + (" bottom" if s.direction == "bottom" else "")
        lines.append(
            f"| {s.arm} | `{s.rule}` | {ratio} | {s.n} | {s.kept_tokens:,.0f} | {100 * s.kept_fraction:.1f}% "
            f"| {_pct(s.accuracy, s.accuracy_std)} | {'-' if s.recovered is None else f'{s.recovered:.2f}'} "
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


def curve_table(summaries: Sequence[ArmSummary]) -> str:
    """Held-out accuracy (mean over seeds, %) at every evaluated step, one row per arm."""
    steps = sorted({c[0] for s in summaries for c in s.curve})
    lines = ["| arm | " + " | ".join(f"step {k}" for k in steps) + " |", "|---|" + "---|" * len(steps)]
    for s in summaries:
        at = {c[0]: c[1] for c in s.curve}
        lines.append(f"| {s.arm} | " + " | ".join(_pct(at.get(k)) for k in steps) + " |")
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


def _diff(a: ArmSummary, b: ArmSummary) -> tuple[float, float | None]:
    """Mean difference a - b and its standard error from the per-seed spreads (None if unknown)."""
    if a.accuracy_std is None or b.accuracy_std is None:
        return a.accuracy - b.accuracy, None
    return a.accuracy - b.accuracy, math.sqrt(a.accuracy_std**2 / a.n + b.accuracy_std**2 / b.n)


def _compare(a: ArmSummary, b: ArmSummary, relation: str, statement: str, source: str) -> Claim:
    diff, se = _diff(a, b)
    holds = diff >= 0 if relation == ">=" else diff < 0
    clear = None if se is None else abs(diff) > 2 * se
    se_text = "unknown (one seed)" if se is None else f"{100 * se:.1f} pp"
    detail = (f"{a.arm} {_pct(a.accuracy)} vs {b.arm} {_pct(b.accuracy)}: difference {100 * diff:+.1f} pp, "
              f"standard error {se_text}")
    return Claim(statement, source, "agrees" if holds else "does not agree", clear, detail)


NEARLY_MATCHES = 0.9  # gain recovered at or above which an arm "nearly matches" all


def check_claims(summaries: Sequence[ArmSummary]) -> list[Claim]:
    """The papers' claims (TIP_SPEC section 7) that the arms present can test."""
    arms = {s.arm: s for s in summaries}
    claims = []
    pairs = (
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
    for a, b, relation, statement, source in pairs:
        if a in arms and b in arms:
            claims.append(_compare(arms[a], arms[b], relation, statement, source))
    if "overconfident_10" in arms and "all_100" in arms and arms["overconfident_10"].recovered is not None:
        over = arms["overconfident_10"]
        diff, se = _diff(over, arms["all_100"])
        holds = over.recovered >= NEARLY_MATCHES
        clear = True if holds else (None if se is None else abs(diff) > 2 * se)
        claims.append(Claim(
            f"overconfident (Q3) at 10% nearly matches all tokens (recovers >= {NEARLY_MATCHES:.0%} of its gain)",
            "TIP: 76.1 at under 10% vs 76.7", "agrees" if holds else "does not agree", clear,
            f"recovers {over.recovered:.2f} of the gain; {_pct(over.accuracy)} vs {_pct(arms['all_100'].accuracy)}"))
    return claims


def claims_table(claims: Sequence[Claim]) -> str:
    """The claims as a markdown table."""
    lines = ["| claim | papers | embedded result | beyond seed noise? |", "|---|---|---|---|"]
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


def plot_curves(summaries: Sequence[ArmSummary], path: str | Path) -> Path:
    """Held-out accuracy vs rollout step, mean over seeds with a ±1 std band, one line per arm;
    left every arm, right zoomed on the arms that end above the starting accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    colors = _arm_colors(summaries)
    improved = [s for s in summaries if s.curve and s.accuracy > s.accuracy_before]
    for ax, shown in zip(axes, (summaries, improved)):
        for s in shown:
            if not s.curve:
                continue
            color = colors[list(summaries).index(s)]
            steps = [c[0] for c in s.curve]
            ax.plot(steps, [100 * c[1] for c in s.curve], "--" if _is_control(s) else "-", marker="o", ms=3,
                    color=color, label=f"{s.arm} (n={s.n})")
            if all(c[2] is not None for c in s.curve):
                ax.fill_between(steps, [100 * (c[1] - c[2]) for c in s.curve],
                                [100 * (c[1] + c[2]) for c in s.curve], color=color, alpha=0.12)
        ax.set_xlabel("rollout step")
        ax.set_ylabel("held-out greedy accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title("every arm (mean over seeds, band: ±1 std)")
    axes[1].set_title("arms that improved on the start, zoomed")
    tail = [100 * c[1] for s in improved for c in s.curve if c[0] >= max(c2[0] for c2 in s.curve) / 2]
    if tail:
        axes[1].set_ylim(min(tail) - 3, max(tail) + 3)
    later = [c[0] for s in improved for c in s.curve if c[0] > 0]
    if later:
        axes[1].set_xlim(min(later) - 3, max(later) + 3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    return _save(fig, path, layout=False)


def plot_budget(summaries: Sequence[ArmSummary], path: str | Path) -> Path:
    """Final accuracy (mean ± std over seeds) vs the fraction of tokens kept, one point per arm
    (arms at the same budget are spread a little along x so their bars stay apart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    colors = _arm_colors(summaries)
    budgets: dict[int, int] = {}
    for s, color in zip(summaries, colors):
        slot = budgets[round(100 * s.kept_fraction)] = budgets.get(round(100 * s.kept_fraction), -1) + 1
        x = 100 * s.kept_fraction + 1.2 * slot
        ax.errorbar(x, 100 * s.accuracy, yerr=None if s.accuracy_std is None else 100 * s.accuracy_std,
                    fmt="x" if _is_control(s) else "o", color=color, capsize=3, label=f"{s.arm} (n={s.n})")
    before = _mean([s.accuracy_before for s in summaries])
    ax.axhline(100 * before, color="grey", ls=":", label=f"before training ({100 * before:.1f}%)")
    ax.set_xlabel("tokens kept (% of valid response tokens; arms at one budget offset by 1.2 each)")
    ax.set_ylabel("final held-out accuracy (%)")
    ax.set_title("Final accuracy vs token budget (mean ± std over seeds; x: random or bottom control)")
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


def _setup_text(records: Sequence[RunRecord], rock_file: str | None) -> list[str]:
    cfg = records[0].config
    trainer, rollout, learner = cfg.get("trainer", {}), cfg.get("rollout", {}), cfg.get("learner", {})
    seeds = sorted({r.seed for r in records})
    lines = [
        f"- Student `{cfg.get('student')}`, teacher `{cfg.get('teacher', {}).get('model')}`; "
        f"{trainer.get('steps')} steps x {trainer.get('prompts_per_step')} prompts x {rollout.get('n')} rollout(s) "
        f"per run (temperature {rollout.get('temperature')}, at most {rollout.get('max_new_tokens')} new tokens), "
        f"learner: {learner.get('world_size')} ranks, ZeRO-{learner.get('zero_stage')}, lr {learner.get('lr')}, "
        f"loss `{cfg.get('loss', {}).get('kind')}` normalised over kept tokens.",
        f"- Held-out: greedy accuracy on {cfg.get('eval_data', {}).get('limit')} problems of "
        f"`{cfg.get('eval_data', {}).get('path')}`, before training, every {trainer.get('eval_every')} steps and "
        "after the last step.",
        f"- Seeds {seeds}: seed k sets data.seed, rollout.seed, selection.seed, learner.seed and trainer.seed to k "
        "(prompt order, rollout sampling, sampled selection rules, learner initialisation).",
        f"- {len(records)} finished runs in {len({r.arm for r in records})} arms.",
    ]
    if rock_file:
        lines.append(_rock_text(rock_file, _shown_path(rock_file, _sweep_cwd(records))))
    return lines


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


def reproduce_commands(records: Sequence[RunRecord], notes: str | None = None) -> list[str]:
    """The commands that rebuild the sweep from a checkout, as they were run (paths relative to
    the directory the sweep ran in): the rock set if an arm used one, the sweep with its shared
    overrides, seeds and arms, and this report (with its ``notes`` file, if any). Empty if no run
    records its command."""
    from tip_ray.sweep import is_per_run

    run = next((r for r in records if r.command), None)
    if run is None:
        return []
    overrides = list(run.command[4:])  # after: python -m tip_ray.cli train
    out_dir = Path(next((o.split("=", 1)[1] for o in overrides if o.startswith("trainer.output_dir=")), "."))
    root = out_dir.parent.parent
    lines = []
    if run.config.get("student") == "runs/embedded/student":
        lines.append("tip-ray prepare-demo")
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
    report = f"tip-ray report --root {shlex.quote(str(root))} --out docs/results.md"
    lines.append(report + (f" --notes {shlex.quote(notes)}" if notes else ""))
    return lines


def render(summaries: Sequence[ArmSummary], records: Sequence[RunRecord], figures: dict[str, str],
           command: str, notes: tuple[str, str] | None = None) -> str:
    """The markdown page; ``notes`` (path, markdown text): hand-written analysis placed after the
    generated findings, under its own heading."""
    rock_file = next((r.config.get("selection", {}).get("rock_file") for r in records
                      if r.config.get("selection", {}).get("rock_file")), None)
    claims = check_claims(summaries)
    groups = (("Agrees, beyond seed noise", [c for c in claims if c.verdict == "agrees" and c.clear]),
              ("Agrees in direction, within seed noise (or one seed)",
               [c for c in claims if c.verdict == "agrees" and not c.clear]),
              ("Does not agree", [c for c in claims if c.verdict != "agrees"]))
    out = [
        "# Selection-rule sweep on the embedded default",
        "",
        f"Generated by `{command}` from the runs of `tip-ray sweep`; do not edit by hand. "
        "The whole experiment, from the repository root:",
        "",
        "```bash",
        *(reproduce_commands(records, notes[0] if notes else None) or [command]),
        "```",
        "",
        "## Setup",
        "",
        *_setup_text(records, rock_file),
        "",
        "## Results",
        "",
        results_table(summaries),
        "",
        "Tokens trained: kept tokens summed over all steps (mean over seeds); kept: mean kept fraction. "
        "Gain recovered = (acc - acc_before) / (acc_all - acc_before) with mean accuracies. Peak learner "
        "memory on CPU is the learner process's peak resident set (the vocabulary here is 128, so the logits "
        "that selection saves are a negligible part of it; the saving shows on GPUs with large vocabularies, "
        "see `make bench`). Wall time: the whole `tip-ray train` process, evaluations and start-up included, on a "
        "shared 2-core machine.",
        "",
        "Held-out accuracy during training (%, mean over seeds):",
        "",
        curve_table(summaries),
        "",
        f"![accuracy vs step]({figures['curves']})",
        "",
        f"![accuracy vs budget]({figures['budget']})",
        "",
        "The student at the end of training (mean over the last tenth of the steps and over seeds; every "
        "statistic over all sampled response tokens, kept or not):",
        "",
        end_state_table(summaries),
        "",
        "## Against the papers",
        "",
        "A difference counts as beyond seed noise when it exceeds twice its standard error "
        "(sqrt(std_a²/n_a + std_b²/n_b) over seeds); with three seeds, differences of a few points are within noise.",
        "",
        claims_table(claims),
        "",
        *(f"- {title} ({len(cs)}): " + ("; ".join(c.statement for c in cs) or "none") + "." for title, cs in groups),
        "",
        *collapse_notes(summaries),
        *([f"## Analysis (hand-written, from `{notes[0]}`)", "", notes[1].strip(), ""] if notes else []),
        "Scale caveat: the papers distil Qwen3 8B/4B -> 4B/1.7B on competition math with thousands of response "
        "tokens; here a 0.43M-parameter student learns column arithmetic from a 1.77M-parameter teacher with "
        "about 50-token responses, so agreement is in kind, not in size.",
        "",
    ]
    return "\n".join(out)


def collapse_notes(summaries: Sequence[ArmSummary]) -> list[str]:
    """One paragraph per arm that ends below the accuracy it started from, with its end state
    next to the ``all`` arm's (empty list if there is none)."""
    base = next((s for s in summaries if s.rule == "all"), None)
    notes = []
    for s in summaries:
        if s.accuracy >= s.accuracy_before or not s.end_state:
            continue
        e = s.end_state
        text = (f"{s.arm} ends below its starting accuracy ({_pct(s.accuracy)}% vs {_pct(s.accuracy_before)}%). "
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


def write_report(root: str | Path, out: str | Path, command: str = DEFAULT_COMMAND,
                 notes: str | Path | None = None) -> Path:
    """Read the sweep under ``root`` and write ``out`` (markdown) plus ``figures/`` beside it,
    with the markdown file ``notes`` (hand-written analysis) included if given."""
    note = None
    if notes is not None:
        if not Path(notes).is_file():
            raise ReportError(f"--notes {notes}: no such file")
        note = (str(notes), Path(notes).read_text())
    records = collect_runs(root)
    summaries = summarize(records)
    out = Path(out)
    figures_dir = out.parent / "figures"
    curves = plot_curves(summaries, figures_dir / "sweep_accuracy_vs_step.png")
    budget = plot_budget(summaries, figures_dir / "sweep_accuracy_vs_budget.png")
    figures = {"curves": str(curves.relative_to(out.parent)), "budget": str(budget.relative_to(out.parent))}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(summaries, records, figures, command, note))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tip_ray.report --root runs/sweep --out docs/results.md``."""
    parser = argparse.ArgumentParser(prog="tip-ray report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The report's options (shared by ``tip-ray report`` and ``python -m tip_ray.report``)."""
    parser.add_argument("--root", default="runs/sweep", help="sweep root (default: runs/sweep)")
    parser.add_argument("--out", default="docs/results.md", help="markdown file; figures go to its figures/ folder")
    parser.add_argument("--notes", help="a markdown file of hand-written analysis to include (kept across reruns)")


def run(args: argparse.Namespace) -> int:
    """Write the report and print the table."""
    try:
        command = f"tip-ray report --root {args.root} --out {args.out}" + (f" --notes {args.notes}" if args.notes else "")
        path = write_report(args.root, args.out, command, args.notes)
    except ReportError as exc:
        raise SystemExit(f"tip-ray report: {exc}") from None
    print(results_table(summarize(collect_runs(args.root))))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
