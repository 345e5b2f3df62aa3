"""The weight group's sender on gloo: two reusable bucket buffers, plan order, and a bounded,
recoverable failure when a receiver dies (what the NCCL group is set up to do as well)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os

import pytest
import torch

from tip_ray.sync.buckets import TensorMeta, plan_buckets
from tip_ray.sync.process_group import WeightGroup, WeightGroupError, host_store

# Twelve tensors of mixed sizes and dtypes: six buckets or more at 1.5 KB per bucket.
METAS = [TensorMeta(f"layer.{i}.weight", (8 + 16 * (i % 4), 8), ("float32", "bfloat16", "float16")[i % 3])
         for i in range(12)]
BUCKET_BYTES = 1500


def tensors_for(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {m.name: torch.randn(m.shape, generator=generator).to(getattr(torch, m.dtype)) for m in METAS}


def _receiver(plan, port: int, seed: int, results) -> None:
    group = WeightGroup(plan, 1, 2, "gloo", timeout_s=60, host="127.0.0.1", port=port)
    expected = tensors_for(seed)
    got = [(n, t.clone()) for n, t in group.receive()]
    group.close()
    results.put(([n for n, _ in got], [n for n, t in got if torch.equal(t, expected[n])]))


def _dying_receiver(plan, port: int) -> None:
    WeightGroup(plan, 1, 2, "gloo", timeout_s=60, host="127.0.0.1", port=port)
    os._exit(0)  # joined the group, gone before the broadcast


@contextlib.contextmanager
def _sender_and_receiver(plan, target, *args):
    """Rank 0 of a new group here and rank 1 in a spawned process running ``target(plan, port,
    *args, results)``; yields (sender, results queue), then joins the receiver and closes the sender."""
    store, port = host_store("127.0.0.1", timeout_s=60)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    receiver = context.Process(target=target, args=(plan, port, *args, results))
    receiver.start()
    sender = WeightGroup(plan, 0, 2, "gloo", timeout_s=60, store=store)
    try:
        yield sender, results
    finally:
        receiver.join(timeout=30)
        sender.close()


def _two_largest(plan) -> int:
    sizes = sorted((b.nbytes for b in plan), reverse=True)
    return sum(sizes[:2])


def test_the_sender_reuses_two_buffers_and_checks_plan_order():
    plan = plan_buckets(METAS, BUCKET_BYTES)
    assert len(plan) >= 6
    store, _ = host_store("127.0.0.1", timeout_s=30)
    group = WeightGroup(plan, 0, 1, "gloo", timeout_s=30, store=store)  # a group of one: nothing to wait for
    tensors = tensors_for()
    try:
        with pytest.raises(ValueError, match="bucket 0 of the plan"):
            group.send_bucket(plan[1], tensors)
        for _ in range(2):  # two syncs: the buffers are freed after each and allocated again
            sent = sum(group.send_bucket(bucket, tensors) for bucket in plan)
            assert sent == sum(b.nbytes for b in plan)
            assert 0 < group.peak_buffer_bytes <= _two_largest(plan) < sent
            assert group._slots == [None, None] and group._works == [None, None]
    finally:
        group.close()


def test_a_receive_buffer_is_reused_however_long_its_handed_out_view_is_held_but_not_under_a_consumers_hold():
    plan = plan_buckets(METAS, BUCKET_BYTES)
    store, _ = host_store("127.0.0.1", timeout_s=30)
    group = WeightGroup(plan, 0, 1, "gloo", timeout_s=30, store=store)
    address = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    try:
        wire = group._receive_buffer(0, 64)
        first = address(wire)
        # What the call handed out is still held (by the receive loop, and by gloo's finished work
        # for a moment after wait() returned): the buffer is reused all the same.
        for nbytes in (48, 56):  # handed out fresh, then handed out as a reused one
            wire = group._receive_buffer(0, nbytes)
            assert address(wire) == first and wire.numel() == nbytes
        # A consumer keeps a view of what landed: a fresh buffer, and the view keeps its bytes.
        wire.fill_(7)
        kept = wire[8:16].view(torch.float32)
        fresh = group._receive_buffer(0, 64)
        fresh.fill_(0)
        assert address(fresh) != first and bool((kept.view(torch.uint8) == 7).all())
        # A consumer keeps the storage itself, not a view (vLLM's loaders look at storages): the
        # same. Its Python object is the one the probe gets, so it is counted by its references.
        second = address(fresh)
        del kept, fresh
        wire = group._receive_buffer(0, 64)
        assert address(wire) == second  # the consumer let go: reused
        storage = wire[8:16].untyped_storage()
        third = address(group._receive_buffer(0, 64))
        assert third != second and storage.data_ptr() == second
        # Each slot has its own buffer; slot 1's first is fresh too.
        assert address(group._receive_buffer(1, 64)) not in (second, third)
    finally:
        group.close()


@pytest.mark.slow
def test_a_receiver_gets_every_bucket_bit_for_bit_through_two_buffers():
    plan = plan_buckets(METAS, BUCKET_BYTES)
    with _sender_and_receiver(plan, _receiver, 3) as (sender, results):
        sent = sum(sender.send_bucket(bucket, tensors_for(3)) for bucket in plan)
        names, exact = results.get(timeout=60)
    assert sent == sum(b.nbytes for b in plan)
    assert names == exact == [m.name for m in METAS]
    assert sender.peak_buffer_bytes <= _two_largest(plan)


@pytest.mark.slow
def test_a_receiver_dying_mid_sync_raises_on_the_sender_which_forms_a_new_group():
    plan = plan_buckets(METAS, BUCKET_BYTES)
    context = multiprocessing.get_context("spawn")
    store, port = host_store("127.0.0.1", timeout_s=60)
    dying = context.Process(target=_dying_receiver, args=(plan, port))
    dying.start()
    sender = WeightGroup(plan, 0, 2, "gloo", timeout_s=20, store=store)
    dying.join(timeout=60)
    tensors = tensors_for(5)
    for _ in range(2):  # the failed sync, then one more on the broken group
        # Every bucket but the last returns (a ZeRO-3 learner's gathers stay in step on all
        # ranks); the last raises.
        for bucket in plan[:-1]:
            sender.send_bucket(bucket, tensors)
        with pytest.raises(WeightGroupError, match="must be formed again"):
            sender.send_bucket(plan[-1], tensors)
    sender.close()

    # This process lives on: a new group with a new receiver carries the weights.
    with _sender_and_receiver(plan, _receiver, 5) as (sender, results):
        for bucket in plan:
            sender.send_bucket(bucket, tensors)
        names, exact = results.get(timeout=60)
    assert names == exact == [m.name for m in METAS]


def _reusing_receiver(plan, port: int, results) -> None:
    """Three syncs: the first and the last copied out (``clone``), the second's views kept."""
    group = WeightGroup(plan, 1, 2, "gloo", timeout_s=60, host="127.0.0.1", port=port)
    storage = [[], [], []]
    copied, kept = [], []
    for sync in range(3):
        for name, tensor in group.receive():
            storage[sync].append(tensor.untyped_storage().data_ptr())
            (kept.append((name, tensor)) if sync == 1 else copied.append((sync, name, tensor.clone())))
        del tensor  # the loop's last view, which would keep its buffer from being reused
    group.close()
    exact = [all(torch.equal(t, tensors_for(s + 1)[n]) for s, n, t in copied),
             all(torch.equal(t, tensors_for(2)[n]) for n, t in kept)]  # the kept views, after sync 3
    results.put((storage, exact, len(copied), len(kept)))


@pytest.mark.slow
def test_a_receiver_reuses_its_buffers_unless_a_consumer_kept_views_of_them():
    plan = plan_buckets(METAS, BUCKET_BYTES)
    with _sender_and_receiver(plan, _reusing_receiver) as (sender, results):
        for seed in (1, 2, 3):
            for bucket in plan:
                sender.send_bucket(bucket, tensors_for(seed))
        storage, exact, copied, kept = results.get(timeout=60)
    assert exact == [True, True] and copied == kept * 2 == 2 * len(METAS)
    first, second, third = (set(s) for s in storage)
    bucket_starts = [sum(len(b.slots) for b in plan[:i]) for i in range(len(plan))]
    # Copied out: the buckets land in a few buffers, reused from bucket to bucket and into the next
    # sync (by its first or, should something still hold that one a moment, its second bucket).
    assert len(first) < len(plan) and {storage[1][i] for i in bucket_starts[:2]} & first
    # Views kept: the next bucket of their slot, and the next sync, get fresh buffers, and the
    # kept views still hold the second sync's weights (checked above).
    assert len(second) > len(first) and not third & second
