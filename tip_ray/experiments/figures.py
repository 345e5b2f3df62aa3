"""The report's figures (matplotlib, Agg): a held-out metric against the rollout step and
against the token budget, one colour per arm."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tip_ray.experiments.scores import METRICS, ArmSummary, Metric, mean


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
    before = mean([s.scores[metric].before for s in summaries])
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
