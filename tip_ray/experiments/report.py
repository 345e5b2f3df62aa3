"""``tip-ray report``: the sweep's results as a markdown page with plots.

Reads every finished run under a sweep root (``scores``), averages each arm over its seeds, and
writes the tables, the figures (``figures``), the setup and the commands that rebuild the sweep
(``provenance``) and a comparison with the papers' claims (``claims``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from tip_ray.experiments.claims import check_claims, claims_table, noise_text
from tip_ray.experiments.figures import plot_budget, plot_curves
from tip_ray.experiments.provenance import (
    memory_text,
    pair_name,
    reproduce_commands,
    scale_caveat,
    setup_text,
    title,
    wall_time_text,
)
from tip_ray.experiments.scores import (
    METRICS,
    PRIMARY,
    ArmSummary,
    Metric,
    ReportError,
    RunRecord,
    choose_metric,
    collect_runs,
    shown_metrics,
    summarize,
)


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


def _metric_section(summaries: Sequence[ArmSummary], metric: Metric, figures: dict[str, str]) -> list[str]:
    """One metric's table at every evaluated step and its two figures."""
    return [metric.caption, "", curve_table(summaries, metric.name), "",
            f"![{metric.short} vs step]({figures['curves']})", "",
            f"![{metric.short} vs budget]({figures['budget']})", ""]


def _results_section(summaries: Sequence[ArmSummary], records: Sequence[RunRecord], metrics: Sequence[Metric],
                     figures: dict[str, dict[str, str]]) -> list[str]:
    """The results table with its definitions, each metric's curves and figures, and the end state."""
    return [
        "## Results",
        "",
        results_table(summaries, metrics[0].name),
        "",
        "Tokens trained: kept tokens summed over all steps (mean over seeds); kept: mean kept fraction. "
        + "".join(f"{m.recovered_text} " for m in metrics if m.recovered_text)
        + memory_text(records, summaries) + " " + wall_time_text(records),
        "",
        *(line for m in metrics for line in _metric_section(summaries, m, figures[m.name])),
        "The student at the end of training (mean over the last tenth of the steps and over seeds; every "
        "statistic over all sampled response tokens, kept or not):",
        "",
        end_state_table(summaries),
        "",
    ]


def _claims_section(summaries: Sequence[ArmSummary], records: Sequence[RunRecord], primary: Metric) -> list[str]:
    """The papers' claims judged on the ``primary`` metric: the noise rule, the table, and the
    claims grouped by verdict."""
    claims = check_claims(summaries, primary.name)
    groups = (("Agrees, beyond seed noise", [c for c in claims if c.verdict == "agrees" and c.clear]),
              ("Agrees in direction, within seed noise (or one seed)",
               [c for c in claims if c.verdict == "agrees" and not c.clear]),
              ("Does not agree", [c for c in claims if c.verdict != "agrees"]))
    return [
        "## Against the papers",
        "",
        noise_text(summaries, primary),
        "",
        claims_table(claims, pair_name(records) or "sweep"),
        "",
        *(f"- {heading} ({len(cs)}): " + ("; ".join(c.statement for c in cs) or "none") + "." for heading, cs in groups),
        "",
    ]


def render(summaries: Sequence[ArmSummary], records: Sequence[RunRecord], figures: dict[str, dict[str, str]],
           command: str, notes: tuple[str, str] | None = None, metric: str | None = None,
           out: str = "docs/results.md") -> str:
    """The markdown page; ``figures``: per metric name, the ``curves`` and ``budget`` figures'
    paths; ``notes`` (path, markdown text): hand-written analysis placed after the generated
    findings, under its own heading; ``metric``: the primary metric (default ``choose_metric``);
    ``out``: the page's path in the commands that regenerate it."""
    metrics = shown_metrics(summaries, metric)
    primary = metrics[0]
    explicit = None if primary.name == choose_metric(summaries) else primary.name
    out_lines = [
        f"# Selection-rule sweep on {title(records)}",
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
        *setup_text(records, metrics),
        "",
        *_results_section(summaries, records, metrics, figures),
        *_claims_section(summaries, records, primary),
        *collapse_notes(summaries, primary.name),
        *([f"## Analysis (hand-written, from `{notes[0]}`)", "", notes[1].strip(), ""] if notes else []),
        scale_caveat(records, summaries),
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
    """Write the report and print the table (``tip-ray report``)."""
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
