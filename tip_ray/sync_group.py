"""The process group that carries weights from learner rank 0 to every rollout engine worker.

It is independent of any default torch.distributed group in the same process (the learner's
DeepSpeed group, vLLM's own): learner rank 0 hosts a ``TCPStore`` and every member builds a
backend object (``ProcessGroupGloo`` or ``ProcessGroupNCCL``) directly on it, so nothing global
is touched and the same code serves gloo on CPU and NCCL on GPU. Rank 0 sends; every other rank
receives the same bucket sequence, one broadcast per bucket.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from tip_ray.sync_buckets import Bucket, pack, unpack

BACKENDS = ("gloo", "nccl")
_PREFIX = "tip_ray/weights"


def resolve_backend(requested: str, cuda_available: bool) -> str:
    """``auto`` -> ``nccl`` with CUDA, else ``gloo``; ``gloo``/``nccl`` pass (``nccl`` needs CUDA)."""
    if requested == "auto":
        return "nccl" if cuda_available else "gloo"
    if requested not in BACKENDS:
        raise ValueError(f"sync.backend must be auto, gloo or nccl, got {requested!r}")
    if requested == "nccl" and not cuda_available:
        raise ValueError("sync.backend=nccl needs CUDA on the learner; use gloo (or auto) on CPU")
    return requested


def host_store(host: str, timeout_s: float) -> tuple[dist.TCPStore, int]:
    """A master ``TCPStore`` on a free port of this node, reachable at ``host``: (store, port).

    The caller keeps the store alive for the group's lifetime.
    """
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    return store, store.port


def buffer_device(backend: str) -> torch.device:
    """Where bucket buffers live: the current CUDA device for NCCL, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


class WeightGroup:
    """One member of the weight-broadcast group (rank 0 sends, the others receive).

    ``plan`` is the bucket plan every member shares. Built with ``store`` (rank 0 passes the
    store it hosts) or by connecting to ``host:port``; construction blocks until all
    ``world_size`` members have joined.
    """

    def __init__(
        self,
        plan: Sequence[Bucket],
        rank: int,
        world_size: int,
        backend: str,
        timeout_s: float,
        host: str = "",
        port: int = 0,
        store: dist.Store | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"weight group backend must be one of {BACKENDS}, got {backend!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"weight group rank {rank} is outside [0, {world_size})")
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        self.plan, self.rank, self.world_size, self.backend = tuple(plan), rank, world_size, backend
        self.device = buffer_device(backend)
        self._store = store
        prefixed = dist.PrefixStore(_PREFIX, store)
        if backend == "gloo":
            self._group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self._group = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)

    def _broadcast(self, buffer: torch.Tensor) -> None:
        if buffer.numel() == 0:
            return
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self._group.broadcast([buffer], options).wait()

    def send_bucket(self, bucket: Bucket, tensors: Mapping[str, torch.Tensor]) -> int:
        """Rank 0: broadcast one bucket of the plan filled from ``tensors``; returns its bytes."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 of the weight group sends")
        buffer = pack(bucket, tensors, self.device)
        self._broadcast(buffer)
        return buffer.numel()

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Ranks > 0: the plan's ``(name, tensor)`` pairs as their buckets arrive.

        Each bucket lands in a fresh buffer (a consumer may hold views of an earlier bucket
        until a layer is complete). The whole iterator must be consumed, or the sender stalls.
        """
        if self.rank == 0:
            raise RuntimeError("rank 0 of the weight group sends; it does not receive")
        for bucket in self.plan:
            buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.device)
            self._broadcast(buffer)
            yield from unpack(bucket, buffer)

    def close(self) -> None:
        """Leave the group (this member only); the object is unusable after."""
        group, self._group = getattr(self, "_group", None), None
        if group is not None and hasattr(group, "shutdown"):
            group.shutdown()
        self._store = None
