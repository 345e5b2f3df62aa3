"""Weight sync from the learner group to the rollout pool.

Ordering contract: the driver calls ``sync_weights`` only between learner steps (after
``optim_step`` returned on every rank) and never while a rollout actor is generating for the
version it replaces; a rollout actor serves version v only after its update to v returned.
Versions strictly increase; an actor refuses an update that is not newer.

Transports (``sync.transport``), behind the one entry point ``sync_weights``:

``object_store``
    Learner rank 0 puts the full weights once (every rank joins the ZeRO-3 gather); each
    rollout actor reads the same object and reloads it.
``collective``
    A process group formed once, at set-up, between learner rank 0 and every vLLM worker of
    every rollout actor (NCCL on GPU, gloo on CPU; ``tip_ray.sync.process_group``). The bucket plan
    (names, shapes, dtypes per bucket; ``tip_ray.sync.buckets``) goes through Ray once, at
    set-up (and again if the members change: a restarted rollout actor or learner group). Each
    sync broadcasts the weights bucket by bucket; each vLLM worker loads a bucket's
    tensors as it lands and the engine resets its prefix cache at the end. The driver first
    waits until every rollout actor is idle (its calls run in order), so the sender never waits
    on a busy receiver; an actor that refuses the version still drains the broadcast, so the
    group stays in step. A member that dies mid-broadcast makes the others' broadcasts raise
    within ``sync.timeout_s`` (gloo and NCCL alike: the NCCL group is built so that its
    watchdog does not end the process, ``tip_ray.sync.process_group``); the send then re-raises the
    failure, every live member leaves the broken group, and the next send forms a new one.
    (The trainer stops the run on that failure, with gloo as with NCCL; the same command resumes
    it from the newest checkpoint.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray

from tip_ray.config import SyncConfig


@dataclass(frozen=True)
class SyncReport:
    """One sync: the version now served, seconds taken, bytes moved per rollout actor, transport."""

    version: int
    seconds: float
    bytes_per_actor: int
    transport: str = "object_store"
    weights_ref: object | None = None  # the object-store copy of the weights sent, when there is one


class ObjectStoreTransport:
    """The full weights through the Ray object store, put once and read by every rollout actor."""

    name = "object_store"

    def __init__(self) -> None:
        self._bytes: int | None = None

    def send(self, learner_group, rollout_actors: list, version: int) -> SyncReport:
        """Send the learner's current weights to ``rollout_actors`` as ``version``; wait for all."""
        start = time.perf_counter()
        weights_ref = learner_group.export_weights_ref()
        served = ray.get([actor.update_weights.remote(weights_ref, version) for actor in rollout_actors])
        if any(v != version for v in served):
            raise RuntimeError(f"rollout actors serve versions {served} after a sync to {version}")
        seconds = time.perf_counter() - start
        if self._bytes is None:  # from rank 0's metadata: the weights themselves never enter the driver
            self._bytes = sum(meta.nbytes for meta in learner_group.weight_metadata())
        return SyncReport(version, seconds, self._bytes, self.name, weights_ref)

    def close(self) -> None:
        """Nothing to release."""


class CollectiveTransport:
    """Bucketed broadcasts from learner rank 0 to every vLLM worker (see the module docstring).

    Building it forms the group: learner rank 0 hosts the store, the bucket plan is made from
    its parameter metadata, and every member joins (blocks until all have). A sync to other
    members (a restarted rollout actor or learner group) forms the group anew first.
    """

    name = "collective"

    def __init__(self, cfg: SyncConfig, learner_group, rollout_actors: list) -> None:
        self.cfg = cfg
        self.formations = 0
        self._form(learner_group, rollout_actors)

    def _form(self, learner_group, rollout_actors: list) -> None:
        from tip_ray.sync.buckets import plan_buckets

        if not rollout_actors:
            raise ValueError("the collective weight sync needs at least one rollout actor")
        cfg = self.cfg
        self.learner, self.actors = learner_group, list(rollout_actors)
        self.plan = plan_buckets(learner_group.weight_metadata(), max(1, int(cfg.bucket_mb * 2**20)))
        self.bytes = sum(bucket.nbytes for bucket in self.plan)  # per sync, alignment padding included
        receivers = ray.get([a.weight_receivers.remote() for a in self.actors])
        self.world_size = 1 + sum(receivers)
        host, port, self.backend = learner_group.host_weight_group(cfg.backend, cfg.timeout_s)
        first_ranks = [1 + sum(receivers[:i]) for i in range(len(receivers))]
        ray.get(learner_group.join_weight_group_refs(self.plan, self.world_size, self.backend, cfg.timeout_s)
                + [a.join_weight_group.remote(self.plan, host, port, first, self.world_size, self.backend,
                                              cfg.timeout_s)
                   for a, first in zip(self.actors, first_ranks)])
        self.formations += 1

    def send(self, learner_group, rollout_actors: list, version: int) -> SyncReport:
        """Broadcast the learner's current weights to ``rollout_actors`` as ``version``; wait for
        all. ``ValueError`` before any transfer if an actor already serves ``version`` or later."""
        start = time.perf_counter()
        if learner_group is not self.learner or list(rollout_actors) != self.actors:
            self._form(learner_group, rollout_actors)
        refs: list = []
        try:
            served = ray.get([a.weight_version.remote() for a in self.actors])  # also waits for in-flight generation
            if any(v >= version for v in served):
                raise ValueError(f"weight version {version} is not newer than the versions the rollout actors "
                                 f"serve ({served}); the update is refused")
            learner_refs = learner_group.broadcast_weights_refs()
            refs = learner_refs + [a.receive_weights.remote(version) for a in self.actors]
            results = ray.get(refs)
        except ray.exceptions.RayError:  # a member died, or a broadcast failed: the group is broken
            self._after_failure(refs)
            raise
        sent, now = results[0], results[len(learner_refs):]
        if any(v != version for v in now):
            raise RuntimeError(f"rollout actors serve versions {now} after a sync to {version}")
        return SyncReport(version, time.perf_counter() - start, sent, self.name)

    def _after_failure(self, refs: list) -> None:
        """After a broadcast failed (a member died, or a broadcast raised ``WeightGroupError``
        within ``sync.timeout_s``; see ``tip_ray.sync.process_group``): let every member's call end (each
        is bounded by the timeout), make every live member leave the broken group, and form a
        new group on the next send. Members that are gone are skipped; nothing here raises."""
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=self.cfg.timeout_s + 60)
        closing = [a.close_weight_group.remote() for a in self.actors]
        closing += [a.close_weight_group.remote() for a in self.learner.actors]
        done, _ = ray.wait(closing, num_returns=len(closing), timeout=60)
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                pass  # a dead member has nothing left to close
        self.learner, self.actors = None, []

    def close(self) -> None:
        """Every member leaves the group (nothing to do after a failed send: it already left)."""
        if self.learner is None:
            return
        ray.get([a.close_weight_group.remote() for a in self.actors])
        self.learner.close_weight_group()


def make_transport(cfg: SyncConfig, learner_group, rollout_actors: list) -> ObjectStoreTransport | CollectiveTransport:
    """The transport ``cfg.transport`` names, set up between ``learner_group`` and ``rollout_actors``
    (a list of ``RolloutActor`` handles)."""
    if cfg.transport == "collective":
        return CollectiveTransport(cfg, learner_group, rollout_actors)
    return ObjectStoreTransport()


def sync_weights(
    learner_group, rollout_actors: list, version: int, transport: ObjectStoreTransport | CollectiveTransport | None = None
) -> SyncReport:
    """Send the learner's current weights to every rollout actor as ``version``; wait for all.

    ``transport`` comes from ``make_transport`` (default: the object store).
    """
    return (transport or ObjectStoreTransport()).send(learner_group, rollout_actors, version)
