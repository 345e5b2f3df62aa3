"""The driver's state: what a checkpoint's ``driver.json`` holds, typed, and the failures the loop
recovers from.

The JSON keys are those the driver has always written (``step``, ``version``, ``updates``,
``cursor``, ``wandb_run_id``, ``bad_steps`` {consecutive, total}, ``accuracy_before``,
``teacher_accuracy``, ``eval_before``, ``config``, ``tip_ray_version``), so any checkpoint written
before this class existed resumes; keys added later (``teacher_accuracy``, ``eval_before``) are
optional on read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class LearnerFailure(RuntimeError):
    """A learner rank died: the step in flight is lost, the group must be rebuilt."""


class PoisonedWeights(RuntimeError):
    """An update produced non-finite weights: they must be neither served nor saved."""


class TooManyBadSteps(RuntimeError):
    """``faults.max_bad_steps`` steps in a row were skipped for NaN/inf: the run stops."""


@dataclass
class BadSteps:
    """Steps skipped for NaN/inf: in a row now, and in the whole run."""

    consecutive: int = 0
    total: int = 0

    def skip(self, step: int, why: str, limit: int) -> str:
        """Count step ``step`` as skipped for ``why``; returns the event line (``limit``:
        ``faults.max_bad_steps``, named in it; ``check`` enforces it)."""
        self.consecutive += 1
        self.total += 1
        return f"step {step} skipped: {why} ({self.consecutive} in a row, limit {limit})"

    def check(self, why: str, limit: int) -> None:
        """``TooManyBadSteps`` once ``limit`` steps in a row were skipped (the last for ``why``)."""
        if self.consecutive >= limit:
            raise TooManyBadSteps(f"stopping: {self.consecutive} steps in a row had NaN/inf ({why}); "
                                  f"faults.max_bad_steps={limit}. The last checkpoint holds finite weights.")

    def applied(self) -> None:
        """An update was applied: the run of skipped steps ends."""
        self.consecutive = 0


@dataclass
class DriverState:
    """Where the driver is. ``step``: the last step done; ``version``: the weight version the
    rollout pool serves; ``updates``: optimizer updates applied (skipped steps apply none);
    ``cursor``: the prompt stream's state at the first batch not yet trained on; the evaluation
    before training (``eval_before``, its ``accuracy_before``) and the teacher's accuracy.
    ``updates_at_version`` (not saved): the updates each served version contains, for staleness."""

    step: int = 0
    version: int = 0
    updates: int = 0
    cursor: dict[str, Any] = field(default_factory=dict)
    bad_steps: BadSteps = field(default_factory=BadSteps)
    accuracy_before: float | None = None
    teacher_accuracy: float | None = None
    eval_before: dict[str, float] = field(default_factory=dict)
    wandb_run_id: str | None = None
    updates_at_version: dict[int, int] = field(default_factory=lambda: {0: 0})

    def staleness(self, policy_version: int) -> int:
        """Learner updates that samples from ``policy_version`` did not see."""
        return self.updates - self.updates_at_version[policy_version]

    @property
    def unserved_updates(self) -> int:
        """Updates the learner holds that the served version does not contain."""
        return self.staleness(self.version)

    def served(self, version: int) -> None:
        """The rollout pool now serves ``version``, holding every update applied so far."""
        self.version = version
        self.updates_at_version[version] = self.updates

    def to_dict(self, config: dict[str, Any], tip_ray_version: str) -> dict[str, Any]:
        """The ``driver.json`` record, with the run's resolved ``config`` and the code's version."""
        return {"step": self.step, "version": self.version, "updates": self.updates, "cursor": self.cursor,
                "wandb_run_id": self.wandb_run_id,
                "bad_steps": {"consecutive": self.bad_steps.consecutive, "total": self.bad_steps.total},
                "accuracy_before": self.accuracy_before, "teacher_accuracy": self.teacher_accuracy,
                "eval_before": dict(self.eval_before), "config": config, "tip_ray_version": tip_ray_version}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> DriverState:
        """The state a ``driver.json`` record holds (``to_dict``'s, or an older one without
        ``teacher_accuracy``/``eval_before``); ``KeyError`` names a required key that is missing."""
        missing = [k for k in ("step", "version", "updates", "cursor", "bad_steps") if k not in saved]
        if missing:
            raise KeyError(f"the checkpoint's driver state lacks {missing}: it was not written by tip_ray's driver")
        bad = saved["bad_steps"]
        return cls(step=int(saved["step"]), version=int(saved["version"]), updates=int(saved["updates"]),
                   cursor=saved["cursor"], bad_steps=BadSteps(int(bad["consecutive"]), int(bad["total"])),
                   accuracy_before=saved.get("accuracy_before"), teacher_accuracy=saved.get("teacher_accuracy"),
                   eval_before=dict(saved.get("eval_before") or {}), wandb_run_id=saved.get("wandb_run_id"),
                   updates_at_version={int(saved["version"]): int(saved["updates"])})
