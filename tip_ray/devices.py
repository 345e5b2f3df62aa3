"""Which device an actor computes on, and the one helper that moves inputs there (``to_device``).

DeepSpeed's engine and transformers models do not move their inputs: a batch left on the host
fails at the first embedding on a GPU, so every input goes through ``to_device``.

Under Ray (2.60, ``ray/_private/accelerators/nvidia_gpu.py`` and ``ray/_private/utils.py``):

- an actor given ``num_gpus > 0`` gets ``CUDA_VISIBLE_DEVICES`` set to its assigned GPU ids,
  so its GPU is ``cuda:0`` (the first visible device);
- with ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1`` Ray leaves ``CUDA_VISIBLE_DEVICES``
  alone: every GPU of the node stays visible and the assigned one is found by its id
  (``ray.get_gpu_ids()``) among the visible ones;
- an actor given no GPU keeps the node's ``CUDA_VISIBLE_DEVICES`` (Ray no longer blanks it,
  ray-project/ray#54868), so it would see, and use, GPUs that belong to other actors.
  ``hide_unassigned_gpus`` blanks it for such an actor before CUDA starts.

Outside Ray (the in-process tests, ``tip-ray eval``) the current CUDA device is used when
there is one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TypeVar

import torch

NOSET_ENV = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
T = TypeVar("T")


def visible_index(assigned: Sequence[int | str], visible: str | None) -> int:
    """Index among the visible CUDA devices of the first of the ``assigned`` GPU ids.

    ``assigned`` are Ray's GPU ids for this actor (``ray.get_gpu_ids()``: node-level ids, or
    entries of the ``CUDA_VISIBLE_DEVICES`` the worker started with); ``visible`` is the
    process's ``CUDA_VISIBLE_DEVICES`` (None: every device of the node, in id order). With Ray
    setting ``CUDA_VISIBLE_DEVICES`` to the assigned ids this is 0. ``ValueError`` when no id
    is assigned or an assigned id is not visible.
    """
    if not assigned:
        raise ValueError("no GPU is assigned to this actor")
    if visible is None:
        return min(int(i) for i in assigned)
    names, wanted = _device_names(visible), _device_names(assigned)
    if any(i not in names for i in wanted):
        raise ValueError(f"the GPUs Ray assigned to this actor ({list(assigned)}) are not all visible: "
                         f"CUDA_VISIBLE_DEVICES={visible!r}")
    return min(names.index(i) for i in wanted)


def _device_names(devices: str | Sequence[int | str]) -> list[str]:
    """Device ids as strings without blanks: from a ``CUDA_VISIBLE_DEVICES`` value, or from Ray's
    ids (Ray splits that variable on commas without stripping, so ``"4, 6"`` gives it ``" 6"``)."""
    items = devices.split(",") if isinstance(devices, str) else devices
    return [str(d).strip() for d in items if str(d).strip()]


def _ray_gpu_ids() -> list[int | str] | None:
    """This Ray worker's assigned GPU ids, or None outside a Ray worker (driver or no Ray)."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    if ray.get_runtime_context().worker.mode != ray._private.worker.WORKER_MODE:
        return None
    return list(ray.get_gpu_ids())


def hide_unassigned_gpus() -> None:
    """In a Ray actor given no GPU, make CUDA show none (``CUDA_VISIBLE_DEVICES=""``), so that
    nothing below (torch, DeepSpeed, vLLM) picks up another actor's GPU. Call it before CUDA is
    initialised; a no-op outside Ray and for actors with GPUs."""
    ids = _ray_gpu_ids()
    if ids is not None and not ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def assigned_visible(assigned: Sequence[int | str], visible: str | None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value that shows only the ``assigned`` GPUs (Ray's ids, as
    ``visible_index`` takes them) out of ``visible`` (None: every device of the node), in their
    visible order. ``ValueError`` as ``visible_index``."""
    visible_index(assigned, visible)  # the same checks: something assigned, all of it visible
    if visible is None:
        return ",".join(str(i) for i in sorted(int(i) for i in assigned))
    wanted = set(_device_names(assigned))
    return ",".join(name for name in _device_names(visible) if name in wanted)


def show_only_assigned_gpus() -> None:
    """In a Ray actor, make CUDA show exactly the GPUs Ray assigned to it: none for an actor
    given no GPU (``hide_unassigned_gpus``), and under ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1``
    only its own for one given GPUs. For the rollout and teacher actors: vLLM binds a
    tensor-parallel engine's ranks to the visible devices 0 .. tp - 1 whatever Ray assigned, so
    with every GPU of the node visible every engine on it would open GPU 0. Call it before CUDA
    is initialised; a no-op outside Ray, and where Ray sets ``CUDA_VISIBLE_DEVICES`` itself."""
    hide_unassigned_gpus()
    ids = _ray_gpu_ids()
    if ids and os.environ.get(NOSET_ENV, "").lower() in ("1", "true"):  # as Ray reads it (its env_bool)
        os.environ["CUDA_VISIBLE_DEVICES"] = assigned_visible(ids, os.environ.get("CUDA_VISIBLE_DEVICES"))


def local_gpu_index() -> int:
    """The CUDA device index (among the visible ones) this process computes on: the first GPU
    Ray assigned to this actor, or the current CUDA device outside Ray; 0 without CUDA (the
    value ``LOCAL_RANK`` takes on CPU)."""
    if not torch.cuda.is_available():
        return 0
    ids = _ray_gpu_ids()
    if ids:
        return visible_index(ids, os.environ.get("CUDA_VISIBLE_DEVICES"))
    return torch.cuda.current_device()


def compute_device() -> torch.device:
    """``cuda:<local_gpu_index()>`` when CUDA is visible to this process, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_gpu_index())


def to_device(value: T, device: torch.device | str, *, float_dtype: torch.dtype | None = None) -> T:
    """``value`` with every tensor in it on ``device``: the one way inputs reach a model.

    ``value`` is a tensor, a tuple of them, or a dataclass of tensors, nested dataclasses and
    plain values (a ``TrainBatch`` with its ``TeacherSignal``): dataclasses are rebuilt field by
    field, so a tensor field added later is moved too. Integer and bool tensors keep their dtype;
    floating tensors are cast to ``float_dtype`` when given (e.g. float32 for selection weights),
    else keep theirs. Tensors already in place are returned as they are (no copy).
    """
    if isinstance(value, torch.Tensor):
        dtype = float_dtype if float_dtype is not None and value.dtype.is_floating_point else None
        return value.to(device=device, dtype=dtype)  # type: ignore[return-value]
    if isinstance(value, tuple):
        return tuple(to_device(v, device, float_dtype=float_dtype) for v in value)  # type: ignore[return-value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        moved = {f.name: to_device(getattr(value, f.name), device, float_dtype=float_dtype)
                 for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **moved)  # type: ignore[return-value]
    return value


def tensors_of(value: object) -> dict[str, torch.Tensor]:
    """Every tensor inside ``value`` (a tensor or nested dataclasses of them), by dotted field path."""
    if isinstance(value, torch.Tensor):
        return {"": value}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            for path, tensor in tensors_of(getattr(value, f.name)).items():
                out[f"{f.name}.{path}" if path else f.name] = tensor
        return out
    return {}
