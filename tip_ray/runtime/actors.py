"""The thin Ray actor shells around the plain workers.

The actor classes only delegate, with explicit typed methods; the work is in the plain classes
they wrap (``LearnerWorker``, ``RolloutWorker``, ``TeacherWorker``), which the tests and the GPU
checks also run in-process.
"""

from __future__ import annotations

import dataclasses
import os
import socket

import ray

from tip_ray.config import LearnerConfig, LossConfig, RolloutConfig, SelectionConfig, TeacherConfig


def _with_teacher_read(batch):
    """``batch`` with its teacher signal itself: a ``StoredSignal`` (the driver's handle to the
    teacher's results in the object store) is read here, in place; a signal is left as it is."""
    from tip_ray.runtime.stored_signal import StoredSignal

    if isinstance(batch.teacher, StoredSignal):
        return dataclasses.replace(batch, teacher=batch.teacher.fetch())
    return batch


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
        return self.worker.train_step(_with_teacher_read(batch))

    def export_weights(self):
        return self.worker.export_weights()

    def evaluate_tokens(self, batch):
        return self.worker.evaluate_tokens(_with_teacher_read(batch))

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
        from tip_ray.devices import show_only_assigned_gpus
        from tip_ray.rollout.worker import RolloutWorker

        show_only_assigned_gpus()
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
        from tip_ray.devices import show_only_assigned_gpus
        from tip_ray.teacher.worker import TeacherWorker

        show_only_assigned_gpus()
        self.worker = TeacherWorker(cfg)

    def score(self, input_ids, attention_mask, first_position=None):
        return self.worker.score(input_ids, attention_mask, first_position)

    def generate(self, prompt_ids: list[list[int]], sampling):
        return self.worker.generate(prompt_ids, sampling)
