"""Ray placement of the three pools: each pool is one placement group (one bundle per actor, with
its own resources and strategy), checked against the cluster's resources before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tip_ray.config import PoolPlacement


@dataclass(frozen=True)
class PoolResources:
    """What each actor of a pool needs, and how the pool's bundles are placed."""

    name: str
    num_actors: int
    cpus: float = 1.0
    gpus: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)
    strategy: str = "PACK"

    @classmethod
    def of(cls, name: str, num_actors: int, placement: PoolPlacement) -> PoolResources:
        """The pool ``name`` of ``num_actors`` actors, each placed as ``placement`` (cluster config) says."""
        return cls(name, num_actors, placement.cpus, placement.gpus, dict(placement.resources), placement.strategy)

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


def check_distinct_gpus(placements: list[tuple[str, list[str]]]) -> None:
    """Raise ``ResourceError`` when two learner ranks were given the same GPU of one node
    (``placements[rank]`` = (node address, assigned GPU ids)): NCCL refuses two ranks of one
    group on one device, which fractional ``cluster.learner.gpus`` lets Ray do."""
    owner: dict[tuple[str, str], int] = {}
    for rank, (node, gpus) in enumerate(placements):
        for gpu in gpus:
            if (node, gpu) in owner:
                raise ResourceError(f"learner ranks {owner[(node, gpu)]} and {rank} share GPU {gpu} of node {node}; "
                                    "NCCL needs one GPU per rank: set cluster.learner.gpus to 1")
            owner[(node, gpu)] = rank
