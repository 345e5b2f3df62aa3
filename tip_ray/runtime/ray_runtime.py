"""The run's runtime on Ray: the cluster connection, the rollout and teacher pools, the learner
group and the weight-sync transport between them, built in one place so that the driver loop
(``tip_ray.trainer``) only drives them (``tip_ray.driver.ports.Runtime``).

A weight sync is retried as a pool call is: a rollout actor that dies during it is waited for
(Ray restarts it, up to ``faults.max_actor_restarts``) or retired, the transport is formed again
with the live actors, and the sync is sent again to the actors that do not yet serve the version,
at most ``faults.max_step_retries`` times. A learner rank that dies is the driver's to handle
(``learner_lost``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import ray

from tip_ray.config import DEFAULT_TEACHER, TrainConfig, teacher_configs, teacher_placement
from tip_ray.runtime.heap import malloc_env
from tip_ray.runtime.learner_group import LearnerGroup
from tip_ray.runtime.placement import PoolResources, check_fits
from tip_ray.runtime.pools import ACTOR_FAILURES, PoolError, RolloutPool, TeacherPool
from tip_ray.sync.transports import SyncReport, make_transport, sync_weights


@dataclass(frozen=True)
class RuntimeHooks:
    """What the pools ask the driver: ``on_event`` records a run event; ``served_weights`` gives
    ``(weights_ref, version)`` served (None before the first sync), ``served_version`` the version
    alone (cheap)."""

    on_event: Callable[[str], None]
    served_weights: Callable[[], tuple[Any, int] | None]
    served_version: Callable[[], int]


def worker_env(keep_heap: bool = True) -> dict[str, str]:
    """The environment variables every actor of the run starts with (Ray's job runtime_env);
    ``keep_heap``: with glibc malloc set to keep its heap (``tip_ray.runtime.heap.MALLOC_ENV``),
    less what the driver's environment sets already (Ray also refuses a job whose runtime env and
    ray.init set the same one)."""
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **malloc_env(keep_heap)}


def pool_resources(cfg: TrainConfig) -> dict[str, PoolResources]:
    """The pools' actors and resources per actor (``cluster.*``): rollout, teacher, learner, and
    ``teacher.<name>`` for each extra teacher (``teachers.<name>``, placed by ``cluster.teachers.<name>``)."""
    c = cfg.cluster
    return {"rollout": PoolResources.of("rollout", cfg.rollout.num_workers, c.rollout),
            "teacher": PoolResources.of("teacher", cfg.teacher.num_workers, c.teacher),
            "learner": PoolResources.of("learner", cfg.learner.world_size, c.learner),
            **{f"teacher.{name}": PoolResources.of(f"teacher.{name}", t.num_workers, teacher_placement(cfg, name))
               for name, t in cfg.teachers.items()}}


def connect(cfg: TrainConfig) -> None:
    """Join ``cluster.address`` or start a local Ray instance of our own (unless Ray is up in
    this process already), and check that the pools fit it before any actor starts."""
    c = cfg.cluster
    if not ray.is_initialized():
        # "local": a fresh instance of our own, never a cluster someone else started on this host.
        ray.init(address=c.address or "local", num_cpus=c.num_cpus, num_gpus=c.num_gpus,
                 object_store_memory=c.object_store_memory,
                 include_dashboard=c.dashboard, dashboard_host=c.dashboard_host, log_to_driver=False,
                 runtime_env={"env_vars": worker_env(c.keep_heap)})
    check_fits(list(pool_resources(cfg).values()), ray.cluster_resources())


class RayRuntime:
    """The pools of a run on Ray (see the module docstring). ``teacher_vocab``: the rows the
    teacher scores (its vocabulary, cut to the student's; the padding placeholder of its signal,
    ``tip_ray.teacher.layout``, is -log of it), by teacher name when there are several
    (``teachers``: one pool each, ``teacher`` the default one's)."""

    def __init__(self, cfg: TrainConfig, hooks: RuntimeHooks, teacher_vocab: int | Mapping[str, int]) -> None:
        connect(cfg)
        self.cfg, self.hooks = cfg, hooks
        pools = pool_resources(cfg)
        timeout = cfg.cluster.placement_timeout_s
        self.rollout = RolloutPool(pools["rollout"], cfg.rollout, cfg.student, cfg.faults, hooks.served_weights,
                                   hooks.on_event, timeout, served_version=hooks.served_version)
        vocabs = teacher_vocab if isinstance(teacher_vocab, Mapping) else {DEFAULT_TEACHER: teacher_vocab}
        self.teachers = {name: TeacherPool(pools["teacher" if name == DEFAULT_TEACHER else f"teacher.{name}"], tcfg,
                                           cfg.faults, vocabs[name], hooks.on_event, timeout)
                         for name, tcfg in teacher_configs(cfg).items()}
        self.teacher = self.teachers[DEFAULT_TEACHER]
        self._learner_pool = pools["learner"]
        self.learner = self._new_learner()
        self.transport = make_transport(cfg.sync, self.learner, self.rollout.live_actors)
        self._members = (self.learner, tuple(self.rollout.live_actors))
        self._restarts_seen = self.rollout.restarts

    def _new_learner(self) -> LearnerGroup:
        cfg = self.cfg
        return LearnerGroup(self._learner_pool, cfg.learner, cfg.selection, cfg.loss, cfg.cluster.placement_timeout_s)

    def _form(self, actors: list) -> None:
        """Form the transport anew when its members changed (a restarted rollout actor is a new
        process outside any weight group; a new learner group likewise)."""
        if self._members == (self.learner, tuple(actors)) and self._restarts_seen == self.rollout.restarts:
            return
        try:
            self.transport.close()
        except ray.exceptions.RayError:
            pass  # a member that died (a retired actor, a killed learner group) has no group left to leave
        self.transport = make_transport(self.cfg.sync, self.learner, actors)
        self._members, self._restarts_seen = (self.learner, tuple(actors)), self.rollout.restarts

    def sync_weights(self, version: int) -> SyncReport:
        """Serve the learner's current weights to every live rollout actor as ``version``; waits.
        A rollout actor that dies during it is waited for or retired and the sync retried on the
        actors still behind (at most ``faults.max_step_retries`` times; ``PoolError`` past that)."""
        bound, retries = self.cfg.faults.max_step_retries, 0
        actors = self.rollout.live_actors
        while True:
            self._form(actors)
            try:
                return sync_weights(self.learner, actors, version, self.transport)
            except ACTOR_FAILURES as exc:
                if self.learner_lost(exc):
                    raise
                retries += 1
                problem = f"failed during the weight sync to version {version} ({type(exc).__name__})"
                if retries > bound:
                    raise PoolError(f"rollout pool: an actor {problem}; the sync's retries are used up "
                                    f"(faults.max_step_retries={bound})") from exc
                self.rollout.revive(problem)
                served = ray.get([a.weight_version.remote() for a in self.rollout.live_actors])
                actors = [a for a, v in zip(self.rollout.live_actors, served) if v < version]
                self.hooks.on_event(f"rollout pool: an actor {problem}; resending to {len(actors)} actor(s), "
                                    f"retry {retries}/{bound}")
                if not actors:
                    return SyncReport(version, 0.0, 0, self.transport.name)

    def restart_learner(self) -> None:
        """Kill the learner group and start a fresh one on a new placement group."""
        self.learner.kill()
        self.learner = self._new_learner()

    def learner_lost(self, exc: BaseException) -> bool:
        """Whether the Ray error ``exc`` is about a learner rank, or any rank's process is gone
        (a rank that dies mid-collective often surfaces first as its peers' connection errors)."""
        if not isinstance(exc, ray.exceptions.RayError):
            return False
        dead = getattr(exc, "actor_id", None)
        if dead is not None and any(a._actor_id.hex() == dead for a in self.learner.actors):
            return True
        return self._learner_rank_dead()

    def _learner_rank_dead(self, timeout_s: float = 30.0) -> bool:
        for actor in self.learner.actors:
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=timeout_s)
            except ray.exceptions.RayActorError:
                return True
            except ray.exceptions.GetTimeoutError:
                continue  # alive but busy
        return False

    def close(self) -> list[tuple[str, Exception]]:
        """Stop the transport, the learner group and the pools, then Ray; returns what failed to
        close (every part is tried: the cluster must go down whatever broke)."""
        failures = []
        teachers = [(f"teacher {name}", pool) for name, pool in self.teachers.items()]
        for name, part in (("sync", self.transport), ("learner", self.learner), ("rollout", self.rollout),
                           *teachers):
            try:
                part.close()
            except Exception as exc:
                failures.append((name, exc))
        ray.shutdown()
        return failures
