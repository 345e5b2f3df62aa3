"""Every collective of the learner group, placed on the device its process group runs on.

NCCL takes CUDA tensors only ("No backend type associated with device type cpu", even at
world size 1); gloo takes CPU tensors. Callers hand in tensors wherever they live and get the
result back on the device they name: the placement happens here, once, so no collective in
``tip_ray.learner`` can be fed a tensor on the wrong device (a unit test scans the package for
``torch.distributed`` collectives called anywhere else).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device whose tensors ``group`` (default: the world group) can reduce: the CPU when
    the group has a CPU backend (gloo), else the current CUDA device (NCCL)."""
    config = dist.get_backend_config(group)  # e.g. "cpu:gloo,cuda:gloo" or "cuda:nccl"
    devices = {entry.split(":")[0] for entry in config.split(",")}
    if "cpu" in devices:
        return torch.device("cpu")
    if "cuda" in devices:
        return torch.device("cuda", torch.cuda.current_device())
    raise RuntimeError(f"the learner's process group has backend {config!r}: no CPU or CUDA device to place "
                       "collectives on")


def all_reduce(values: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, *,
               out_device: torch.device | str | None = None,
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``values`` (any shape, any device) reduced with ``op`` over the ranks of ``group``; a new
    tensor on ``out_device`` (default: the device of ``values``). ``values`` is not modified."""
    work = values.to(group_device(group), copy=True)
    dist.all_reduce(work, op=op, group=group)
    return work.to(values.device if out_device is None else out_device)


def all_gather_rows(values: torch.Tensor, *, out_device: torch.device | str | None = None,
                    group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, int]:
    """All-gather rows ``values`` [n_r, D] whose count n_r differs between ranks.

    Returns the concatenation [sum n_r, D] in rank order, on ``out_device`` (default: the device
    of ``values``), and this rank's row offset in it.
    """
    device = group_device(group)
    world = dist.get_world_size(group)
    count = torch.tensor([values.shape[0]], dtype=torch.long, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    padded = torch.zeros(max(sizes), *values.shape[1:], dtype=values.dtype, device=device)
    padded[: values.shape[0]] = values.to(device)
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    rank = dist.get_rank(group)
    joined = torch.cat([g[:n] for g, n in zip(gathered, sizes)])
    return joined.to(values.device if out_device is None else out_device), sum(sizes[:rank])


def all_ranks_agree(ok: bool, group: dist.ProcessGroup | None = None) -> bool:
    """True only if ``ok`` holds on every rank (a collective: every rank must call it)."""
    flag = torch.tensor([1.0 if ok else 0.0], dtype=torch.float64)
    return bool(all_reduce(flag, dist.ReduceOp.MIN, group=group).item() == 1.0)


def max_over_ranks(value: float, group: dist.ProcessGroup | None = None) -> float:
    """The largest ``value`` over the ranks (a collective)."""
    return float(all_reduce(torch.tensor([value], dtype=torch.float64), dist.ReduceOp.MAX, group=group).item())


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank; under NCCL on this rank's current CUDA device (not a guessed one)."""
    device = group_device(group)
    if device.type == "cuda":
        dist.barrier(group=group, device_ids=[device.index])
    else:
        dist.barrier(group=group)
