"""The bucket planner of the collective weight sync, its byte layout, and the gloo group itself."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from tip_ray.sync.buckets import ALIGN, TensorMeta, dtype_name, pack, plan_buckets, unpack
from tip_ray.sync.process_group import WeightGroup, host_store, resolve_backend

METAS = [
    TensorMeta("embed.weight", (16, 8), "float32"),      # 512 bytes
    TensorMeta("layer.0.norm", (8,), "bfloat16"),       # 16
    TensorMeta("layer.0.proj", (8, 8), "float16"),      # 128
    TensorMeta("layer.0.step", (), "int64"),            # 8
    TensorMeta("layer.0.empty", (0, 3), "float32"),     # 0
    TensorMeta("head.weight", (40, 8), "float32"),      # 1280: larger than a bucket
    TensorMeta("head.bias", (3,), "float32"),           # 12
]


def tensors_for(metas: list[TensorMeta], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the planned shapes and dtypes (integers for integer dtypes)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for m in metas:
        dtype = getattr(torch, m.dtype)
        if dtype.is_floating_point:
            out[m.name] = torch.randn(m.shape, generator=generator).to(dtype)
        else:
            out[m.name] = torch.randint(-1000, 1000, m.shape, generator=generator, dtype=dtype)
    return out


def test_plan_keeps_order_and_puts_every_tensor_in_exactly_one_bucket():
    plan = plan_buckets(METAS, bucket_bytes=600)
    assert [n for b in plan for n in b.names] == [m.name for m in METAS]
    assert len(plan) == 4
    for bucket in plan:
        assert bucket.nbytes <= 600 or len(bucket.slots) == 1  # only a lone oversized tensor exceeds the size
        spans = sorted((s.offset, s.offset + s.meta.nbytes) for s in bucket.slots)
        assert all(s.offset % ALIGN == 0 for s in bucket.slots)
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), "tensors overlap"
        assert bucket.nbytes == max(end for _, end in spans)
    assert [b.names for b in plan][2] == ["head.weight"]


def test_one_bucket_when_everything_fits_and_one_per_tensor_when_nothing_does():
    assert len(plan_buckets(METAS, bucket_bytes=1 << 20)) == 1
    assert [len(b.slots) for b in plan_buckets(METAS[:3], bucket_bytes=1)] == [1, 1, 1]


@pytest.mark.parametrize("bucket_bytes", [1, 200, 600, 1 << 20])
def test_pack_then_unpack_gives_back_every_tensor_bit_for_bit(bucket_bytes):
    tensors = tensors_for(METAS)
    received = {}
    for bucket in plan_buckets(METAS, bucket_bytes):
        buffer = pack(bucket, tensors)
        assert buffer.dtype == torch.uint8 and buffer.numel() == bucket.nbytes
        received.update(unpack(bucket, buffer))
    assert list(received) == list(tensors)
    for name, tensor in tensors.items():
        assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor)


def test_pack_accepts_non_contiguous_tensors():
    meta = TensorMeta("t", (3, 4), "float32")
    source = torch.arange(12.0).reshape(4, 3).t()
    (bucket,) = plan_buckets([meta], 1024)
    assert torch.equal(dict(unpack(bucket, pack(bucket, {"t": source})))["t"], source)


def test_bad_plans_and_payloads_are_refused():
    with pytest.raises(ValueError, match="bucket_bytes must be > 0"):
        plan_buckets(METAS, 0)
    with pytest.raises(ValueError, match="unique"):
        plan_buckets([METAS[0], METAS[0]], 1024)
    with pytest.raises(ValueError, match="not a torch dtype"):
        plan_buckets([TensorMeta("x", (2,), "float33")], 1024)
    (bucket,) = plan_buckets(METAS[:2], 1 << 20)
    with pytest.raises(ValueError, match="'layer.0.norm' of the bucket plan is missing"):
        pack(bucket, {"embed.weight": torch.zeros(16, 8)})
    with pytest.raises(ValueError, match=r"'embed.weight' is \(16, 8\) float64"):
        pack(bucket, {"embed.weight": torch.zeros(16, 8, dtype=torch.float64), "layer.0.norm": torch.zeros(8)})
    with pytest.raises(ValueError, match="must be uint8"):
        unpack(bucket, torch.zeros(bucket.nbytes, dtype=torch.float32))


def test_backend_resolution():
    assert resolve_backend("auto", cuda_available=False) == "gloo"
    assert resolve_backend("auto", cuda_available=True) == "nccl"
    assert resolve_backend("gloo", cuda_available=True) == "gloo"
    with pytest.raises(ValueError, match="nccl needs CUDA"):
        resolve_backend("nccl", cuda_available=False)
    with pytest.raises(ValueError, match="auto, gloo or nccl"):
        resolve_backend("mpi", cuda_available=False)


def _receiver(plan, port: int, rank: int, world: int, results) -> None:
    group = WeightGroup(plan, rank, world, "gloo", timeout_s=60, host="127.0.0.1", port=port)
    expected = tensors_for(METAS)
    got = list(group.receive())
    exact = [n for n, t in got if t.dtype == expected[n].dtype and torch.equal(t, expected[n])]
    group.close()
    results.put((rank, [n for n, _ in got], exact))


@pytest.mark.slow
def test_a_gloo_group_broadcasts_a_plan_to_every_receiver():
    plan = plan_buckets(METAS, bucket_bytes=600)
    store, port = host_store("127.0.0.1", timeout_s=60)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    receivers = [context.Process(target=_receiver, args=(plan, port, rank, 3, results)) for rank in (1, 2)]
    for process in receivers:
        process.start()
    sender = WeightGroup(plan, 0, 3, "gloo", timeout_s=60, store=store)
    tensors = tensors_for(METAS)
    sent = sum(sender.send_bucket(bucket, tensors) for bucket in plan)
    outcomes = sorted(results.get(timeout=60) for _ in receivers)
    for process in receivers:
        process.join(timeout=30)
    sender.close()
    assert sent == sum(b.nbytes for b in plan)
    names = [m.name for m in METAS]
    assert outcomes == [(1, names, names), (2, names, names)]


def test_dtype_names_round_trip():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8):
        assert getattr(torch, dtype_name(dtype)) is dtype
