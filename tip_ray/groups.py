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
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tip_ray.config import LearnerConfig, LossConfig, PoolPlacement, RolloutConfig, SelectionConfig, TeacherConfig


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


# ---------------------------------------------------------------------------------------------
# Actor shells.


class LearnerActor:
    """One learner rank; ``join`` sets up the process group and DeepSpeed."""

    def __init__(self, learner: LearnerConfig, selection: SelectionConfig, loss: LossConfig) -> None:
        from tip_ray.devices import hide_unassigned_gpus

        hide_unassigned_gpus()
        self.configs = (learner, selection, loss)
        self.worker = None

    def gpu_placement(self) -> tuple[str, list[str]]:
        """This rank's node address and the ids of the GPUs Ray assigned to it (none on CPU)."""
        return ray.util.get_node_ip_address(), sorted(str(i) for i in ray.get_gpu_ids())

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port, for rank 0 to host the process group."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, master_addr: str, master_port: int, rank: int, world_size: int) -> None:
        """Join the torch.distributed group and build the DeepSpeed engine.

        ``LOCAL_RANK`` (the CUDA device DeepSpeed binds this rank to) is the index of the GPU Ray
        assigned to this actor among the visible ones: 0 when Ray sets ``CUDA_VISIBLE_DEVICES``
        to it, its place among all of the node's GPUs under
        ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1`` (``tip_ray.devices``).
        """
        from tip_ray.devices import local_gpu_index
        from tip_ray.learner.worker import LearnerWorker

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_gpu_index()))
        self.worker = LearnerWorker(*self.configs)

    def train_step(self, batch):
        return self.worker.train_step(batch)

    def export_weights(self):
        return self.worker.export_weights()

    def evaluate_tokens(self, batch):
        return self.worker.evaluate_tokens(batch)

    def save_state(self, directory: str) -> None:
        self.worker.save_state(directory)

    def load_state(self, directory: str) -> int:
        return self.worker.load_state(directory)

    def export_hf(self, directory: str) -> None:
        self.worker.export_hf(directory)

    def close(self) -> None:
        self.worker.close()

    def weight_metadata(self):
        return self.worker.weight_metadata()

    def host_weight_group(self, backend: str, timeout_s: float) -> tuple[str, int, str]:
        """Host the weight group's store on this node: (address, port, resolved backend)."""
        host = ray.util.get_node_ip_address()
        port, backend = self.worker.host_weight_group(host, backend, timeout_s)
        return host, port, backend

    def join_weight_group(self, plan: tuple, world_size: int, backend: str, timeout_s: float) -> None:
        self.worker.join_weight_group(plan, world_size, backend, timeout_s)

    def broadcast_weights(self) -> int:
        return self.worker.broadcast_weights()

    def close_weight_group(self) -> None:
        self.worker.close_weight_group()


class RolloutActor:
    """One rollout engine."""

    def __init__(self, cfg: RolloutConfig, model: str, index: int) -> None:
        from tip_ray.devices import hide_unassigned_gpus
        from tip_ray.rollout.worker import RolloutWorker

        hide_unassigned_gpus()
        self.worker = RolloutWorker(cfg, model, index)

    def generate(self, prompt_ids: list[list[int]], seeds: list[int] | None = None, sampling=None):
        return self.worker.generate(prompt_ids, seeds, sampling)

    def update_weights(self, named_tensors, version: int) -> int:
        self.worker.update_weights(named_tensors, version)
        return self.worker.weight_version

    def weight_version(self) -> int:
        return self.worker.weight_version

    def weight_receivers(self) -> int:
        return self.worker.weight_receivers()

    def join_weight_group(
        self, plan: tuple, host: str, port: int, first_rank: int, world_size: int, backend: str, timeout_s: float
    ) -> list[int]:
        return self.worker.join_weight_group(plan, host, port, first_rank, world_size, backend, timeout_s)

    def receive_weights(self, version: int) -> int:
        self.worker.receive_weights(version)
        return self.worker.weight_version

    def close_weight_group(self) -> None:
        self.worker.close_weight_group()


class TeacherActor:
    """One teacher scorer."""

    def __init__(self, cfg: TeacherConfig) -> None:
        from tip_ray.devices import hide_unassigned_gpus
        from tip_ray.teacher.worker import TeacherWorker

        hide_unassigned_gpus()
        self.worker = TeacherWorker(cfg)

    def score(self, input_ids, attention_mask, first_position=None):
        return self.worker.score(input_ids, attention_mask, first_position)

    def generate(self, prompt_ids: list[list[int]], sampling):
        return self.worker.generate(prompt_ids, sampling)


class LearnerGroup:
    """``learner.world_size`` LearnerActors forming one torch.distributed group."""

    def __init__(self, pool: PoolResources, learner: LearnerConfig, selection: SelectionConfig, loss: LossConfig,
                 placement_timeout_s: float = 60.0):
        self.group = reserve(pool, placement_timeout_s)
        remote = ray.remote(LearnerActor)
        self.actors = [
            remote.options(num_cpus=pool.cpus, num_gpus=pool.gpus, resources=pool.custom or None,
                           scheduling_strategy=on_bundle(self.group, i)).remote(learner, selection, loss)
            for i in range(pool.num_actors)
        ]
        try:
            check_distinct_gpus(ray.get([a.gpu_placement.remote() for a in self.actors]))
        except ResourceError:
            self.kill()
            raise
        addr, port = ray.get(self.actors[0].rendezvous_address.remote())
        ray.get([a.join.remote(addr, port, rank, pool.num_actors) for rank, a in enumerate(self.actors)])

    def train_step(self, shards: list) -> tuple[list, dict[str, float] | None]:
        """Forward/backward on one shard per rank (object refs or values), then one optimizer step.

        Returns every rank's metrics and rank 0's optimizer report, or None when the ranks skipped
        the step together (non-finite statistics: no backward was run, no update is applied).
        """
        results = ray.get([a.train_step.remote(s) for a, s in zip(self.actors, shards)])
        return [metrics for metrics, _ in results], results[0][1]

    def evaluate_tokens(self, batch) -> torch.Tensor:
        """The student's per-token reverse KL to the teacher at every response position of
        ``batch`` (a ``TrainBatch`` of any size): float64 [m] on the CPU, in row-major order over
        its loss mask. The rows are split into one contiguous shard per rank (sizes differing by at
        most one, a rank may get none); no gradient, no step (``LearnerWorker.evaluate_tokens``)."""
        world = len(self.actors)
        bounds = [batch.size * r // world for r in range(world + 1)]
        parts = ray.get([a.evaluate_tokens.remote(batch.rows(bounds[r], bounds[r + 1]))
                         for r, a in enumerate(self.actors)])
        return torch.cat(parts)

    def save_state(self, directory: str) -> None:
        """Every rank writes its part of the training state under ``directory``."""
        ray.get([a.save_state.remote(directory) for a in self.actors])

    def load_state(self, directory: str) -> int:
        """Every rank restores its part from ``directory``; returns the learner's step count."""
        return ray.get([a.load_state.remote(directory) for a in self.actors])[0]

    def export_hf(self, directory: str) -> None:
        """Rank 0 writes the student as a Hugging Face checkpoint (every rank joins the gather)."""
        ray.get([a.export_hf.remote(directory) for a in self.actors])

    def close(self, timeout_s: float = 60.0) -> None:
        """Tear the process group down on every rank (given ``timeout_s``: a broken group may not
        answer), then stop the ranks and release the placement group."""
        try:
            ray.get([a.close.remote() for a in self.actors], timeout=timeout_s)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            pass  # a dead or hung rank: killing the group below is all that is left to do
        self.kill()

    def kill(self) -> None:
        """Stop every rank now (after a rank died, the group cannot continue) and free its resources."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.group)

    def export_weights_ref(self):
        """An object ref to the full weights, put once by rank 0 (every rank joins the gather)."""
        refs = [a.export_weights.remote() for a in self.actors]
        ray.get(refs[1:])
        return refs[0]

    def weight_metadata(self) -> list:
        """Rank 0's parameter metadata (``TensorMeta`` list, in broadcast order)."""
        return ray.get(self.actors[0].weight_metadata.remote())

    def host_weight_group(self, backend: str, timeout_s: float) -> tuple[str, int, str]:
        """Rank 0 hosts the weight group's store: (address, port, resolved backend)."""
        return ray.get(self.actors[0].host_weight_group.remote(backend, timeout_s))

    def join_weight_group_refs(self, plan: tuple, world_size: int, backend: str, timeout_s: float) -> list:
        """Start every rank's join (rank 0 as the sender); refs to wait on together with the receivers'."""
        return [a.join_weight_group.remote(plan, world_size, backend, timeout_s) for a in self.actors]

    def broadcast_weights_refs(self) -> list:
        """Start one broadcast of the weights (every rank joins the gathers); refs to each rank's bytes sent."""
        return [a.broadcast_weights.remote() for a in self.actors]

    def close_weight_group(self) -> None:
        """Rank 0 leaves the weight group."""
        ray.get([a.close_weight_group.remote() for a in self.actors])
