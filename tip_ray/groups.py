"""Ray placement of the three pools, and the thin actor shells around the plain workers.

Each pool is one placement group (one bundle per actor, with its own resources and strategy),
checked against the cluster's resources before anything starts. The actor classes only
delegate, with explicit typed methods; the work is in the plain classes they wrap, which the
tests also run in-process.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tip_ray.config import LearnerConfig, LossConfig, RolloutConfig, SelectionConfig, TeacherConfig


@dataclass(frozen=True)
class PoolResources:
    """What each actor of a pool needs, and how the pool's bundles are placed."""

    name: str
    num_actors: int
    cpus: float = 1.0
    gpus: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)
    strategy: str = "PACK"

    def bundle(self) -> dict[str, float]:
        """One actor's bundle."""
        out = {"CPU": self.cpus, **self.custom}
        if self.gpus:
            out["GPU"] = self.gpus
        return out

    def total(self) -> dict[str, float]:
        """The pool's total demand per resource."""
        return {k: v * self.num_actors for k, v in self.bundle().items()}


class ResourceError(RuntimeError):
    """The pools do not fit the cluster."""


def check_fits(pools: list[PoolResources], available: dict[str, float]) -> None:
    """Raise ``ResourceError`` naming each pool and the shortfall if the pools cannot all fit."""
    demand: dict[str, float] = {}
    for pool in pools:
        for key, value in pool.total().items():
            demand[key] = demand.get(key, 0.0) + value
    short = {k: v - available.get(k, 0.0) for k, v in demand.items() if v > available.get(k, 0.0) + 1e-9}
    if short:
        lines = [f"{p.name}: {p.num_actors} x {p.bundle()}" for p in pools]
        raise ResourceError(
            "the pools do not fit the cluster: short of "
            + ", ".join(f"{v:g} {k}" for k, v in sorted(short.items()))
            + f" (cluster has {({k: available.get(k, 0.0) for k in demand})}; pools: {'; '.join(lines)})"
        )


def reserve(pool: PoolResources, timeout_s: float = 60.0) -> PlacementGroup:
    """A ready placement group for ``pool``; ``ResourceError`` if it cannot be placed in time."""
    group = placement_group([pool.bundle()] * pool.num_actors, strategy=pool.strategy, name=f"tip_ray.{pool.name}")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise ResourceError(f"pool {pool.name!r} could not be placed within {timeout_s:g} s "
                            f"({pool.num_actors} x {pool.bundle()}, strategy {pool.strategy})") from None
    return group


def on_bundle(group: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    """Scheduling strategy that pins an actor to bundle ``index`` of ``group``."""
    return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index)


# ---------------------------------------------------------------------------------------------
# Actor shells.


class LearnerActor:
    """One learner rank; ``join`` sets up the process group and DeepSpeed."""

    def __init__(self, learner: LearnerConfig, selection: SelectionConfig, loss: LossConfig) -> None:
        self.configs = (learner, selection, loss)
        self.worker = None

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port, for rank 0 to host the process group."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, master_addr: str, master_port: int, rank: int, world_size: int) -> None:
        """Join the torch.distributed group and build the DeepSpeed engine."""
        from tip_ray.learner.worker import LearnerWorker

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        self.worker = LearnerWorker(*self.configs)

    def forward_backward(self, batch):
        return self.worker.forward_backward(batch)

    def optim_step(self) -> dict[str, float]:
        return self.worker.optim_step()

    def export_weights(self):
        return self.worker.export_weights()

    def close(self) -> None:
        self.worker.close()


class RolloutActor:
    """One rollout engine."""

    def __init__(self, cfg: RolloutConfig, model: str, index: int) -> None:
        from tip_ray.rollout.worker import RolloutWorker

        self.worker = RolloutWorker(cfg, model, index)

    def generate(self, prompt_ids: list[list[int]]):
        return self.worker.generate(prompt_ids)

    def generate_with(self, prompt_ids: list[list[int]], sampling):
        return self.worker.engine.generate(prompt_ids, sampling)

    def update_weights(self, named_tensors, version: int) -> int:
        self.worker.update_weights(named_tensors, version)
        return self.worker.weight_version

    def weight_version(self) -> int:
        return self.worker.weight_version


class TeacherActor:
    """One teacher scorer."""

    def __init__(self, cfg: TeacherConfig) -> None:
        from tip_ray.teacher.worker import TeacherWorker

        self.worker = TeacherWorker(cfg)

    def score(self, input_ids, attention_mask):
        return self.worker.score(input_ids, attention_mask)


class LearnerGroup:
    """``learner.world_size`` LearnerActors forming one torch.distributed group."""

    def __init__(self, pool: PoolResources, learner: LearnerConfig, selection: SelectionConfig, loss: LossConfig):
        self.group = reserve(pool)
        remote = ray.remote(LearnerActor)
        self.actors = [
            remote.options(num_cpus=pool.cpus, num_gpus=pool.gpus, resources=pool.custom or None,
                           scheduling_strategy=on_bundle(self.group, i)).remote(learner, selection, loss)
            for i in range(pool.num_actors)
        ]
        addr, port = ray.get(self.actors[0].rendezvous_address.remote())
        ray.get([a.join.remote(addr, port, rank, pool.num_actors) for rank, a in enumerate(self.actors)])

    def train_step(self, shards: list) -> tuple[list, dict[str, float]]:
        """Forward/backward on one shard per rank (object refs or values), then one optimizer step."""
        metrics = ray.get([a.forward_backward.remote(s) for a, s in zip(self.actors, shards)])
        stepped = ray.get([a.optim_step.remote() for a in self.actors])
        return metrics, stepped[0]

    def close(self) -> None:
        """Tear the process group down on every rank."""
        ray.get([a.close.remote() for a in self.actors])

    def export_weights_ref(self):
        """An object ref to the full weights, put once by rank 0 (every rank joins the gather)."""
        refs = [a.export_weights.remote() for a in self.actors]
        ray.get(refs[1:])
        return refs[0]
