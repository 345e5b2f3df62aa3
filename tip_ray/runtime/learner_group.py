"""The learner group: ``learner.world_size`` learner ranks on one placement group, forming one
torch.distributed group, driven together (train step, evaluation, state, weight export and sync).
"""

from __future__ import annotations

import ray
import torch
from ray.util.placement_group import remove_placement_group

from tip_ray.config import LearnerConfig, LossConfig, SelectionConfig
from tip_ray.runtime.actors import LearnerActor
from tip_ray.runtime.placement import PoolResources, ResourceError, check_distinct_gpus, on_bundle, reserve
from tip_ray.types import TrainBatch


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

    def train_step(self, batch: TrainBatch) -> tuple[list, dict[str, float] | None]:
        """One optimizer step on the step's whole ``batch`` (``learner.global_batch_size`` rows):
        rank r trains on the contiguous rows ``[r * B / world, (r + 1) * B / world)``.

        Returns every rank's metrics and rank 0's optimizer report, or None when the ranks skipped
        the step together (non-finite statistics: no backward was run, no update is applied).
        """
        world = len(self.actors)
        if batch.size % world:
            raise ValueError(f"a step's {batch.size} sequences do not split evenly over learner.world_size={world} "
                             "ranks; make learner.global_batch_size a multiple of it")
        per_rank = batch.size // world
        results = ray.get([a.train_step.remote(batch.rows(r * per_rank, (r + 1) * per_rank))
                           for r, a in enumerate(self.actors)])
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
