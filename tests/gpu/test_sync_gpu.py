"""The collective weight sync's sender on NCCL, in-process.

NCCL refuses two ranks of one communicator on one device, so a real receiver needs a second
GPU: on a one-GPU machine the sender runs in a group of one (every broadcast completes at once)
and the checks are its memory (two bucket buffers at most, none left after a sync) and its
layout; with two GPUs or more, a receiver process on ``cuda:1`` gets every tensor bit for bit,
and a receiver that dies mid-sync makes the sender raise instead of ending its process.
"""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from tip_ray.sync.buckets import TensorMeta, pack, plan_buckets, unpack
from tip_ray.sync.process_group import WeightGroup, WeightGroupError, host_store

MB = 2**20
# 12 bf16 tensors of 2-8 MB, in buckets of 10 MB: several buckets, some holding one tensor.
METAS = [TensorMeta(f"model.layers.{i}.weight", (512 * (1 + i % 4), 2048), "bfloat16") for i in range(12)]
BUCKET_BYTES = 10 * MB

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a receiver needs a second GPU (NCCL: one rank "
                                                                    "per device)")


def weights(seed: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {m.name: torch.randn(m.shape, generator=generator).to(torch.bfloat16).to(device) for m in METAS}


def two_largest(plan) -> int:
    return sum(sorted((b.nbytes for b in plan), reverse=True)[:2])


def test_the_nccl_sender_holds_at_most_two_bucket_buffers():
    plan = plan_buckets(METAS, BUCKET_BYTES)
    assert len(plan) >= 4
    before = os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    store, _ = host_store("127.0.0.1", timeout_s=60)
    group = WeightGroup(plan, 0, 1, "nccl", timeout_s=60, store=store)
    assert os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") == before  # set for the group's constructor only
    assert group.device.type == "cuda"
    tensors = weights(0, "cuda")
    try:
        for _ in range(2):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            sent = sum(group.send_bucket(bucket, tensors) for bucket in plan)
            assert sent == sum(b.nbytes for b in plan)
            # The caching allocator's view: the send never held more than two bucket buffers
            # (NCCL's own buffers are not the allocator's), and freed them at the end.
            assert torch.cuda.max_memory_allocated() - base <= two_largest(plan) < sent
            assert group.peak_buffer_bytes <= two_largest(plan)
            assert torch.cuda.memory_allocated() == base
    finally:
        group.close()


def test_buckets_packed_on_the_gpu_unpack_bit_for_bit():
    plan = plan_buckets(METAS, BUCKET_BYTES)
    tensors = weights(1, "cuda")
    for bucket in plan:
        for name, view in unpack(bucket, pack(bucket, tensors, "cuda")):
            assert view.device.type == "cuda" and torch.equal(view, tensors[name])


def _receiver(plan, port: int, seed: int, results, die_after: int | None = None) -> None:
    """Rank 1 on ``cuda:1``: put the names of the tensors received bit for bit on ``results``, or
    exit without leaving the group once the first ``die_after`` buckets arrived."""
    torch.cuda.set_device(1)
    group = WeightGroup(plan, 1, 2, "nccl", timeout_s=60, host="127.0.0.1", port=port)
    expected = weights(seed, "cpu")
    exact = []
    for name, tensor in group.receive():
        if torch.equal(tensor.cpu(), expected[name]):
            exact.append(name)
        if die_after is not None and name == plan[die_after - 1].names[-1]:
            os._exit(0)  # took part in the first buckets' broadcasts, then gone mid-sync
    group.close()
    results.put(exact)


@two_gpus
def test_a_receiver_on_another_gpu_gets_every_tensor_bit_for_bit():
    plan = plan_buckets(METAS, BUCKET_BYTES)
    store, port = host_store("127.0.0.1", timeout_s=60)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    receiver = context.Process(target=_receiver, args=(plan, port, 2, results))
    receiver.start()
    sender = WeightGroup(plan, 0, 2, "nccl", timeout_s=60, store=store)
    try:
        for bucket in plan:
            sender.send_bucket(bucket, weights(2, "cuda"))
        exact = results.get(timeout=120)
    finally:
        receiver.join(timeout=60)
        sender.close()
    assert exact == [m.name for m in METAS]


@two_gpus
def test_a_receiver_dying_mid_sync_makes_the_sender_raise_and_it_lives_on():
    plan = plan_buckets(METAS, BUCKET_BYTES)
    context = multiprocessing.get_context("spawn")
    store, port = host_store("127.0.0.1", timeout_s=60)
    dying = context.Process(target=_receiver, args=(plan, port, 3, context.Queue(), 1))
    dying.start()
    sender = WeightGroup(plan, 0, 2, "nccl", timeout_s=20, store=store)
    tensors = weights(3, "cuda")
    for bucket in plan[:-1]:
        sender.send_bucket(bucket, tensors)  # a failure is raised by the last bucket's send
    with pytest.raises(WeightGroupError, match="must be formed again"):
        sender.send_bucket(plan[-1], tensors)
    dying.join(timeout=60)
    sender.close()
    assert float(torch.ones(4, device="cuda").sum()) == 4.0  # this process and its GPU still work

    store, port = host_store("127.0.0.1", timeout_s=60)
    results = context.Queue()
    receiver = context.Process(target=_receiver, args=(plan, port, 3, results))
    receiver.start()
    sender = WeightGroup(plan, 0, 2, "nccl", timeout_s=60, store=store)
    try:
        for bucket in plan:
            sender.send_bucket(bucket, tensors)
        exact = results.get(timeout=120)
    finally:
        receiver.join(timeout=60)
        sender.close()
    assert exact == [m.name for m in METAS]
