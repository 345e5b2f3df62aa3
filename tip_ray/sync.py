"""Weight sync from the learner group to the rollout pool.

Ordering contract: the driver calls ``sync_weights`` only between learner steps (after
``optim_step`` returned on every rank) and never while a rollout actor is generating for the
version it replaces; a rollout actor serves version v only after its update to v returned.
Versions strictly increase; an actor refuses an update that is not newer.

Transport here: the Ray object store. Learner rank 0 puts the full weights once (every rank
joins the ZeRO-3 gather); each rollout actor reads the same object. A NCCL broadcast transport
for GPU clusters plugs in behind the same function.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray


@dataclass(frozen=True)
class SyncReport:
    """One sync: the version now served, seconds taken, bytes moved per rollout actor."""

    version: int
    seconds: float
    bytes_per_actor: int


def sync_weights(learner_group, rollout_actors: list, version: int) -> SyncReport:
    """Send the learner's current weights to every rollout actor as ``version``; wait for all."""
    start = time.perf_counter()
    weights_ref = learner_group.export_weights_ref()
    served = ray.get([actor.update_weights.remote(weights_ref, version) for actor in rollout_actors])
    if any(v != version for v in served):
        raise RuntimeError(f"rollout actors serve versions {served} after a sync to {version}")
    size = sum(t.numel() * t.element_size() for t in ray.get(weights_ref).values())
    return SyncReport(version, time.perf_counter() - start, size)
