"""What a step reports: the metrics line (one dict per step, the keys ``metrics.jsonl`` and W&B
have always had), the run's running totals for its summary, and the console progress bar."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from tip_ray.tip.signal import TeacherSignal
from tip_ray.types import RolloutBatch

PHASES = ("rollout", "teacher", "learner", "sync")
# The teacher's entropy metric reads the signal's response rows this many bytes at a time: its
# temporaries stay in glibc's heap, below its mmap threshold (32 MiB), instead of being fresh
# mappings of [response positions, K] each step (a full distribution: hundreds of MB).
_ENTROPY_BLOCK_BYTES = 16 * 2**20


def learner_metrics(m: Any, stepped: dict[str, float] | None) -> dict[str, float]:
    """The learner's part of a step's line: its ``StepMetrics`` ``m`` (rank 0's, global over ranks)
    and the optimizer report ``stepped`` (None for a skipped step: lr and grad norm are NaN)."""
    return {
        "loss": m.loss, "kept_fraction": m.kept_fraction, "kept_tokens": m.kept_tokens,
        "valid_tokens": m.valid_tokens, "entropy_mean": m.entropy_mean, "entropy_kept_mean": m.entropy_kept_mean,
        "rkl_mean": m.rkl_mean, "rkl_kept_mean": m.rkl_kept_mean,
        "learner_peak_memory_mb": m.peak_memory_bytes / 2**20,
        **{f"quadrant/{k}": v for k, v in m.quadrant_shares.items()},
        **{f"learner_time/{k}": v for k, v in m.phase_seconds.items()},
        "lr": stepped["lr"] if stepped else float("nan"),
        "grad_norm": stepped["grad_norm"] if stepped else float("nan"),
        "skipped": int(stepped is None),
    }


def reward_metrics(rewards: Any, m: Any, coef: float) -> dict[str, float]:
    """The task-reward part (``loss.reward`` on): the driver's grades (``StepRewards.metrics``:
    ``reward/mean``, advantage mean/std, graded fraction, grader errors), the learner's reward term
    before its coefficient (``reward/pg_loss``; ``loss`` stays the distillation loss) and the
    objective trained, ``reward/total_loss`` = loss + coef * pg_loss (NaN for a skipped step)."""
    pg = m.reward_loss if m.reward_loss is not None else float("nan")
    return {**rewards.metrics(), "reward/pg_loss": pg, "reward/total_loss": m.loss + coef * pg}


def sample_metrics(rollouts: RolloutBatch, signal: TeacherSignal, loss_mask: torch.Tensor) -> dict[str, float]:
    """The samples' part: mean response length, truncated samples, and the teacher's top-K + tail
    entropy averaged over the response positions ``loss_mask`` [B, L-1] of ``signal`` [B, L-1, K]."""
    lengths = [len(g.token_ids) for g in rollouts.generations]
    return {"teacher_entropy_topk_mean": teacher_entropy(signal, loss_mask),
            "response_length": sum(lengths) / len(lengths),
            "truncated": sum(g.finish_reason == "length" for g in rollouts.generations)}


def teacher_entropy(signal: TeacherSignal, loss_mask: torch.Tensor) -> float:
    """The teacher's top-K + tail entropy (``TeacherSignal.bucket_entropy``, exact for a full
    distribution) averaged over the response positions ``loss_mask`` [B, L-1] of ``signal``
    [B, L-1, K], on the CPU; NaN without any. Read in blocks of rows (``_ENTROPY_BLOCK_BYTES``):
    the prompt positions are never read, and no [positions, K] copy of the signal is made."""
    where = loss_mask.nonzero()
    if where.shape[0] == 0:
        return float("nan")
    per_block = max(1, _ENTROPY_BLOCK_BYTES // (signal.k * signal.topk_logprobs.element_size()))
    total = 0.0
    for block in where.split(per_block):
        rows = TeacherSignal(*signal.rows((block[:, 0], block[:, 1])))
        total += float(rows.bucket_entropy().double().sum())
    return total / where.shape[0]


def timing_metrics(times: dict[str, float], sync_seconds: float, response_tokens: int) -> dict[str, float]:
    """The clock's part: seconds per phase (``times``, keyed by ``PHASES``), the sync's own seconds,
    and response tokens per second of the whole step."""
    return {"tokens_per_second": response_tokens / sum(times.values()),
            **{f"time/{k}": v for k, v in times.items()}, "sync_seconds": sync_seconds}


class PhaseClock:
    """Wall seconds per phase of a step: ``with clock.phase("teacher"): ...``; ``times`` by phase."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` (added to what it already has)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


@dataclass
class RunTotals:
    """What the run's summary averages over the steps this process trained."""

    kept: list[float] = field(default_factory=list)
    tokens: int = 0
    phases: dict[str, float] = field(default_factory=dict)

    def add(self, metrics: dict[str, float]) -> None:
        """Count one step's line."""
        self.kept.append(metrics["kept_fraction"])
        self.tokens += metrics["valid_tokens"]
        for k in PHASES:
            self.phases[k] = self.phases.get(k, 0.0) + metrics[f"time/{k}"]

    @property
    def steps(self) -> int:
        """Steps counted."""
        return len(self.kept)

    def kept_fraction(self) -> float:
        """Mean kept fraction per step (0 before any step)."""
        return sum(self.kept) / max(1, self.steps)

    def tokens_per_second(self) -> float:
        """Valid response tokens over the seconds of every phase."""
        return self.tokens / max(sum(self.phases.values()), 1e-9)

    def phase_means(self) -> dict[str, float]:
        """Mean seconds per step of each phase."""
        return {k: v / max(1, self.steps) for k, v in self.phases.items()}


def progress_bar(total: int, done: int):
    """The console progress bar of the loop (stderr; sparse updates when not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="tip_ray", unit="step", dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)


def progress_fields(metrics: dict[str, float]) -> dict[str, str]:
    """The few numbers the progress bar shows of a step's line."""
    fields = {"loss": f"{metrics['loss']:.4f}", "kept": f"{metrics['kept_fraction']:.2f}",
              "tok/s": f"{metrics['tokens_per_second']:.0f}", "v": str(metrics["weight_version"])}
    if metrics.get("reward/mean") is not None:
        fields["reward"] = f"{metrics['reward/mean']:.2f}"
    if metrics.get("eval/accuracy") is not None:
        fields["acc"] = f"{metrics['eval/accuracy']:.3f}"
    return fields
