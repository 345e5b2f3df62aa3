"""The process group that carries weights from learner rank 0 to every rollout engine worker.

It is independent of any default torch.distributed group in the same process (the learner's
DeepSpeed group, vLLM's own): learner rank 0 hosts a ``TCPStore`` and every member builds a
backend object (``ProcessGroupGloo`` or ``ProcessGroupNCCL``) directly on it, so nothing global
is touched and the same code serves gloo on CPU and NCCL on GPU. Rank 0 sends; every other rank
receives the same bucket sequence, one broadcast per bucket. Every broadcast is waited for with
the group's timeout, so a dead or stalled member makes the others raise ``WeightGroupError``
(on NCCL too: the group is built so that its watchdog does not end the process).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from tip_ray.sync.buckets import Bucket, pack_into, unpack

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


def _holders(tensor: torch.Tensor) -> tuple[int, int] | None:
    """Who holds ``tensor``'s storage: (tensors sharing it, views included; Python references to
    its storage object, which a consumer keeping ``untyped_storage()`` adds to), each plus a
    constant of the probe; None where this torch build does not say (then no receive buffer is
    reused)."""
    probe = getattr(torch._C, "_storage_Use_Count", None)
    if probe is None:
        return None
    storage = tensor.untyped_storage()  # the storage's one Python object, when something keeps it
    return int(probe(storage._cdata)), sys.getrefcount(storage)


class WeightGroupError(RuntimeError):
    """A broadcast of the weight group failed or did not finish within the group's timeout (a
    member died or stalled). This process lives on; the group is unusable: form it again."""


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _nccl_group(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta) -> dist.ProcessGroup:
    """A ``ProcessGroupNCCL`` whose failures raise in the caller instead of ending the process.

    ProcessGroupNCCL reads ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` once, in its constructor (torch
    ``ProcessGroupNCCL.cpp``: ``asyncErrorHandling_ = getCvarInt(TORCH_NCCL_ASYNC_ERROR_HANDLING,
    3 /*SkipCleanUp*/)``). With the default, its watchdog rethrows a timed-out or failed
    collective on its own thread, which ends the process: a rollout actor dying mid-broadcast
    would take learner rank 0 down with it. ``2`` (CleanUpOnly) makes the watchdog abort the
    group's communicators and leave the process alone, so the bounded ``wait`` of the caller
    raises instead. Set for this constructor only: the learner's DeepSpeed group keeps its own.
    """
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    with _environment("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2"):
        return dist.ProcessGroupNCCL(store, rank, world_size, options)


class WeightGroup:
    """One member of the weight-broadcast group (rank 0 sends, the others receive).

    ``plan`` is the bucket plan every member shares. Built with ``store`` (rank 0 passes the
    store it hosts) or by connecting to ``host:port``; construction blocks until all
    ``world_size`` members have joined.

    Every broadcast is waited for with the group's timeout: a member that dies or stalls makes
    the others raise ``WeightGroupError`` within ``timeout_s`` (with gloo and NCCL alike; the
    sender raises it from the send of the plan's last bucket); the group is then unusable and
    must be formed again.

    The sender packs bucket i+1 into one of two reusable buffers while bucket i is on the wire,
    and reuses a buffer only once its broadcast has completed: it holds at most two bucket
    buffers at a time (``peak_buffer_bytes`` records the most it held), and the send of the
    plan's last bucket returns only when every broadcast has completed, so the driver's sync
    time covers the transfer, not its enqueueing.
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
        self.timeout = timeout
        self._store = store
        self._broken: str | None = None
        # Sender state: two buffer slots, the broadcast in flight from each, the next bucket's index.
        self._slots: list[torch.Tensor | None] = [None, None]
        self._works: list[tuple[int, Any] | None] = [None, None]
        self._next = 0
        self.peak_buffer_bytes = 0
        # Receiver state (CPU): two buffer slots, each (buffer, the view of it last handed out, the
        # storage's holders while only those two hold it), reused while no consumer holds a view.
        # The handed-out view counts once however many hold it: the receive loop does, and so may
        # gloo's finished work for a moment after wait() returned (measured: at up to 37% of sync
        # starts), which must not keep the buffer from being reused.
        self._received: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]] | None] = [None, None]
        prefixed = dist.PrefixStore(_PREFIX, store)
        if backend == "gloo":
            self._group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        else:
            self._group = _nccl_group(prefixed, rank, world_size, timeout)

    def _start_broadcast(self, buffer: torch.Tensor) -> Any:
        """Queue the broadcast of ``buffer`` from rank 0; its work handle (None for an empty buffer)."""
        if buffer.numel() == 0:
            return None
        options = dist.BroadcastOptions()
        options.rootRank = 0
        try:
            return self._group.broadcast([buffer], options)
        except Exception as exc:
            raise self._failed(f"starting a broadcast failed: {exc}") from exc

    def _wait(self, work: Any, index: int) -> None:
        """Block until the broadcast of bucket ``index`` completed (on CUDA, the current stream
        also waits for it); ``WeightGroupError`` when it failed or took longer than the timeout."""
        if work is None:
            return
        try:
            work.wait(self.timeout)
        except Exception as exc:
            raise self._failed(f"the broadcast of bucket {index}/{len(self.plan)} failed or did not finish "
                               f"within {self.timeout.total_seconds():g} s (sync.timeout_s): {exc}") from exc

    def _failed(self, why: str) -> WeightGroupError:
        """Record the group as broken (its buffers and works dropped); the error to raise."""
        if self._broken is None:
            self._broken = why
        self._works = [None, None]
        self._slots = [None, None]
        return WeightGroupError(f"weight group rank {self.rank}/{self.world_size} ({self.backend}): "
                                f"{self._broken}; the group must be formed again")

    def _check_open(self) -> None:
        if self._group is None:
            raise WeightGroupError(f"weight group rank {self.rank} is closed")

    def _slot_buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        """A uint8 [nbytes] view of buffer ``slot`` (grown when too small); its last broadcast has completed."""
        held = self._slots[slot]
        if held is None or held.numel() < nbytes:
            self._slots[slot] = None  # free the smaller one before allocating its successor
            held = self._slots[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.peak_buffer_bytes = max(self.peak_buffer_bytes,
                                     sum(t.numel() for t in self._slots if t is not None))
        return held[:nbytes]

    def send_bucket(self, bucket: Bucket, tensors: Mapping[str, torch.Tensor]) -> int:
        """Rank 0: broadcast the next bucket of the plan, filled from ``tensors`` (any device);
        returns its bytes.

        Buckets must come in plan order (``ValueError`` otherwise). The call returns once the
        bucket is packed and its broadcast queued (after waiting for the broadcast that last
        used its buffer); the call for the plan's last bucket returns once every broadcast has
        completed, and raises ``WeightGroupError`` if any failed or timed out. After a failure
        the remaining buckets are not sent but their calls still return: a ZeRO-3 learner
        gathers each bucket on every rank around this call, and those gathers must stay in
        step on all ranks until the end of the plan.
        """
        if self.rank != 0:
            raise RuntimeError("only rank 0 of the weight group sends")
        self._check_open()
        index = self._next
        if bucket != self.plan[index]:
            raise ValueError(f"bucket {index} of the plan ({self.plan[index].names[:3]}...) must be sent next, "
                             f"got one holding {bucket.names[:3]}...")
        if self._broken is None:
            try:
                slot = index % 2
                if self._works[slot] is not None:
                    self._wait(self._works[slot][1], self._works[slot][0])
                    self._works[slot] = None
                buffer = pack_into(bucket, tensors, self._slot_buffer(slot, bucket.nbytes))
                self._works[slot] = (index, self._start_broadcast(buffer))
            except WeightGroupError:
                pass  # recorded; raised by the plan's last bucket
        self._next = index + 1
        if self._next == len(self.plan):
            self.finish()
        return bucket.nbytes

    def finish(self) -> None:
        """Rank 0: wait for every broadcast in flight (oldest first) and free the buffers; ``WeightGroupError`` if this sync (or an earlier one) failed. Called by
        the send of the plan's last bucket."""
        try:
            if self._broken is None:
                for index, work in sorted((w for w in self._works if w is not None), key=lambda w: w[0]):
                    self._wait(work, index)
        except WeightGroupError:
            pass
        self._works, self._slots, self._next = [None, None], [None, None], 0
        if self._broken is not None:
            raise self._failed(self._broken)

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Ranks > 0: the plan's ``(name, tensor)`` pairs (views on ``self.device``) as their
        buckets arrive.

        Each bucket lands in a buffer no consumer holds a view of (a consumer may hold views of
        an earlier bucket until a layer is complete, or keep them): on the CPU, one of two
        buffers reused while nothing else holds them (``_receive_buffer``), else a fresh one. The
        whole iterator must be consumed, or the sender stalls;
        ``WeightGroupError`` when a broadcast failed or timed out.
        """
        if self.rank == 0:
            raise RuntimeError("rank 0 of the weight group sends; it does not receive")
        self._check_open()
        if self._broken is not None:
            raise self._failed(self._broken)
        for index, bucket in enumerate(self.plan):
            buffer = self._receive_buffer(index % 2, bucket.nbytes)
            self._wait(self._start_broadcast(buffer), index)
            yield from unpack(bucket, buffer)

    def _receive_buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        """A uint8 [nbytes] buffer to receive a bucket into: on the CPU, receive ``slot``'s buffer
        of an earlier bucket when it is large enough and no consumer holds a view of it any more
        (the consumer copied what it kept), else a fresh one. Memory that was touched before
        takes a bucket at the wire's speed; a fresh 256 MB buffer's pages, faulted in during the
        transfer, made a sync 1.2-2.9 s instead of 0.1 s on a 2-core VM (docs/benchmarks.md
        section 8, session 15). On CUDA a fresh buffer comes from the caching allocator's blocks."""
        held = self._received[slot]
        if held is not None and held[0].numel() >= nbytes and _holders(held[0]) == held[2]:
            buffer = held[0][:nbytes]
            self._received[slot] = (held[0], buffer, held[2])
            return buffer
        self._received[slot] = None  # a consumer's views keep the old buffer alive, not this group
        base = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        buffer = base[:nbytes]
        holders = _holders(base) if self.device.type == "cpu" else None
        if holders is not None:
            self._received[slot] = (base, buffer, holders)
        return buffer

    def close(self) -> None:
        """Leave the group (this member only); the object is unusable after. A group that failed
        is aborted (its communicators may be mid-collective), a healthy one shut down."""
        group, self._group = getattr(self, "_group", None), None
        self._works, self._slots, self._received = [None, None], [None, None], [None, None]
        if group is not None:
            if self._broken is not None and self.backend == "nccl":
                group.abort()
            elif hasattr(group, "shutdown"):
                group.shutdown()
        self._store = None
