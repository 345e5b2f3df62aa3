"""When the loop syncs, evaluates, checkpoints and exports: one rule per event, from the config."""

from __future__ import annotations

from dataclasses import dataclass

from tip_ray.config import TrainConfig


@dataclass(frozen=True)
class Cadence:
    """The steps at which things happen in a run of ``steps`` steps (every ``0`` means never;
    the last step is handled by the end of the run, so periodic events skip it)."""

    steps: int
    sync_every: int
    eval_every: int
    checkpoint_every: int
    hf_every: int

    @classmethod
    def of(cls, cfg: TrainConfig) -> Cadence:
        """The cadence ``trainer.*`` and ``checkpoint.*`` set."""
        return cls(cfg.trainer.steps, cfg.trainer.sync_every, cfg.trainer.eval_every, cfg.checkpoint.every,
                   cfg.checkpoint.hf_every)

    @staticmethod
    def _every(period: int, step: int) -> bool:
        return bool(period) and step % period == 0

    def sync_due(self, step: int) -> bool:
        """Whether the weights are served to the rollout pool after ``step`` (when it updated them)."""
        return self._every(self.sync_every, step)

    def eval_due(self, step: int) -> bool:
        """Whether the student is evaluated after ``step`` (the final evaluation is the run's own)."""
        return self._every(self.eval_every, step) and step != self.steps

    def checkpoint_due(self, step: int) -> bool:
        """Whether a checkpoint is written after ``step`` (the last one is written at the end)."""
        return self._every(self.checkpoint_every, step) and step != self.steps

    def hf_due(self, step: int) -> bool:
        """Whether a Hugging Face export is written after ``step`` (the last one at the end)."""
        return self._every(self.hf_every, step) and step != self.steps
