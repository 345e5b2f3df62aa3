"""The interfaces the driver loop drives. ``tip_ray.runtime.ray_runtime.RayRuntime`` implements
them on Ray (pools of actors, a learner group, a weight-sync transport); the driver's tests
implement them with plain in-process objects. Shapes and records as in ``tip_ray.types``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from tip_ray.tip.signal import TeacherSignal
from tip_ray.types import Generation, RolloutBatch, SamplingSettings, SignalHandle, TrainBatch


class Rollouts(Protocol):
    """Samples the student: ``launch`` starts a batch without waiting (``sampling`` None: the
    rollout config's), ``collect`` waits for it."""

    def launch(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int],
               sampling: SamplingSettings | None = None) -> Any: ...

    def collect(self, launch: Any) -> RolloutBatch: ...

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSettings) -> list[Generation]: ...


class Teacher(Protocol):
    """Scores sequences [B, L] into a signal [B, L-1, K] (``score``, or ``launch_score`` without
    waiting and ``collect_score``: several teachers score at once; ``score_stored`` with the
    learner's handle to it); generates for its own evaluation."""

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              first_position: torch.Tensor | None = None) -> TeacherSignal: ...

    def launch_score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     first_position: torch.Tensor | None = None) -> Any: ...

    def collect_score(self, launch: Any) -> TeacherSignal: ...

    def score_stored(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     first_position: torch.Tensor | None = None) -> tuple[TeacherSignal, TeacherSignal | SignalHandle]:
        """``score``, and the form the learner should receive the signal in: a handle to it where
        it already is (Ray's object store), or the signal itself."""
        ...

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSettings) -> list[Generation]: ...


class Learner(Protocol):
    """The learner group: one step on the whole batch (it shards by rank), evaluation, state."""

    def train_step(self, batch: TrainBatch) -> tuple[list, dict[str, float] | None]: ...

    def evaluate_tokens(self, batch: TrainBatch) -> torch.Tensor: ...

    def save_state(self, directory: str) -> None: ...

    def load_state(self, directory: str) -> int: ...

    def export_hf(self, directory: str) -> None: ...

    def export_weights_ref(self) -> Any: ...


class SyncResult(Protocol):
    """What a weight sync reports (``tip_ray.sync.transports.SyncReport``)."""

    seconds: float
    weights_ref: Any


class Runtime(Protocol):
    """The pools of one run and the weight sync between them. ``teachers``: every teacher pool by
    name (``default`` first: ``teacher``, the one pool of a run without routing)."""

    rollout: Rollouts
    teacher: Teacher
    teachers: Mapping[str, Teacher]
    learner: Learner

    def sync_weights(self, version: int) -> SyncResult:
        """Serve the learner's current weights to every rollout actor as ``version``."""
        ...

    def restart_learner(self) -> None:
        """Replace the learner group by a fresh one (initial weights: load a checkpoint next)."""
        ...

    def learner_lost(self, exc: BaseException) -> bool:
        """Whether ``exc`` means a learner rank died."""
        ...

    def close(self) -> None:
        """Stop everything the runtime started."""
        ...
