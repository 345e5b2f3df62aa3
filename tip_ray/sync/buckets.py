"""Bucket plans for the collective weight sync: which tensors travel together, and where.

A plan is computed once, at set-up, from the learner's parameter metadata, and shared by the
sender and every receiver, so a sync moves only tensor bytes. A bucket is one flat byte
buffer holding its tensors back to back (each at an aligned offset), so one broadcast carries
many tensors of mixed dtypes; a tensor larger than the bucket size travels in a bucket of its
own. Tensors keep the learner's order (layer by layer), which lets the receiving engine finish
each layer's load as soon as its last tensor arrives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# Byte alignment of every tensor in a bucket: a multiple of every element size, and of the
# 64-byte lines that keep copies in and out of the buffer fast.
ALIGN = 64


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the form a plan carries)."""
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``; ``ValueError`` for a name that is not a torch dtype."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype name")
    return dtype


@dataclass(frozen=True)
class TensorMeta:
    """A named tensor's full shape and dtype name (``"float32"``, ``"bfloat16"``...)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return math.prod(self.shape) * dtype_of(self.dtype).itemsize


@dataclass(frozen=True)
class Slot:
    """One tensor's place in its bucket: bytes ``[offset, offset + meta.nbytes)``."""

    meta: TensorMeta
    offset: int


@dataclass(frozen=True)
class Bucket:
    """Tensors sent together as one buffer of ``nbytes`` bytes (alignment padding included)."""

    slots: tuple[Slot, ...]
    nbytes: int

    @property
    def names(self) -> list[str]:
        """The tensors' names, in buffer order."""
        return [s.meta.name for s in self.slots]


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def plan_buckets(metas: Sequence[TensorMeta], bucket_bytes: int) -> tuple[Bucket, ...]:
    """Split ``metas`` (in order) into consecutive buckets of at most ``bucket_bytes`` bytes each.

    A tensor that alone exceeds ``bucket_bytes`` gets a bucket of its own. Raises ``ValueError``
    for a non-positive bucket size, an empty or duplicated name, or a negative dimension.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    seen: set[str] = set()
    for meta in metas:
        if not meta.name or meta.name in seen:
            raise ValueError(f"tensor names must be unique and non-empty; {meta.name!r} is not")
        if any(d < 0 for d in meta.shape):
            raise ValueError(f"tensor {meta.name!r} has a negative dimension: {meta.shape}")
        dtype_of(meta.dtype)
        seen.add(meta.name)

    buckets: list[Bucket] = []
    slots: list[Slot] = []
    end = 0
    for meta in metas:
        offset = _aligned(end)
        if slots and offset + meta.nbytes > bucket_bytes:
            buckets.append(Bucket(tuple(slots), end))
            slots, offset = [], 0
        slots.append(Slot(meta, offset))
        end = offset + meta.nbytes
    if slots:
        buckets.append(Bucket(tuple(slots), end))
    return tuple(buckets)


def _view(buffer: torch.Tensor, slot: Slot) -> torch.Tensor:
    meta = slot.meta
    raw = buffer[slot.offset : slot.offset + meta.nbytes]
    return raw.view(dtype_of(meta.dtype)).view(meta.shape)


def pack(bucket: Bucket, tensors: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """A new uint8 buffer [bucket.nbytes] on ``device`` holding ``tensors`` as the bucket lays out.

    ``tensors`` maps every name of the bucket to a tensor of the planned shape and dtype (any
    device, any layout); ``ValueError`` names a missing or mismatched tensor.
    """
    return pack_into(bucket, tensors, torch.empty(bucket.nbytes, dtype=torch.uint8, device=device))


def pack_into(bucket: Bucket, tensors: Mapping[str, torch.Tensor], buffer: torch.Tensor) -> torch.Tensor:
    """Fill the uint8 ``buffer`` [bucket.nbytes] (any device) with ``tensors`` as ``pack`` does; returns it.

    The copies are queued on the buffer's device (on CUDA, on the current stream).
    """
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() != bucket.nbytes:
        raise ValueError(f"a bucket buffer must be uint8 [{bucket.nbytes}], got {buffer.dtype} {tuple(buffer.shape)}")
    for slot in bucket.slots:
        meta = slot.meta
        tensor = tensors.get(meta.name)
        if tensor is None:
            raise ValueError(f"tensor {meta.name!r} of the bucket plan is missing")
        if tuple(tensor.shape) != meta.shape or dtype_name(tensor.dtype) != meta.dtype:
            raise ValueError(f"tensor {meta.name!r} is {tuple(tensor.shape)} {dtype_name(tensor.dtype)}, "
                             f"the plan says {meta.shape} {meta.dtype}")
        _view(buffer, slot).copy_(tensor)
    return buffer


def unpack(bucket: Bucket, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` views into a uint8 ``buffer`` [bucket.nbytes] laid out as ``bucket``."""
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() != bucket.nbytes:
        raise ValueError(f"a bucket buffer must be uint8 [{bucket.nbytes}], got {buffer.dtype} {tuple(buffer.shape)}")
    return [(slot.meta.name, _view(buffer, slot)) for slot in bucket.slots]
