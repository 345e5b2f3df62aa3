"""The teacher's results handed to the learner ranks in the object store (``StoredSignal``): each
rank's rows read in place, equal to the joined signal's, on a local Ray instance."""

from __future__ import annotations

import pytest
import torch

from tip_ray.runtime.pools import join_signals
from tip_ray.teacher.layout import padding_logprob
from tip_ray.tip import TeacherSignal

pytestmark = pytest.mark.slow

VOCAB = 11


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _signal(rows: int, width: int, k: int, seed: int, dense: bool = False) -> TeacherSignal:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, width, VOCAB, generator=g)
    signal = TeacherSignal.from_logits(logits, torch.randint(0, VOCAB, (rows, width), generator=g),
                                       VOCAB if dense else k)
    return TeacherSignal(None, signal.topk_logprobs, signal.sampled_logprobs) if dense else signal


def _stored(ray, shards, total, positions):
    """Each shard's signal returned by a task (in the object store, as a teacher actor's result)."""
    from tip_ray.runtime.stored_signal import StoredSignal

    @ray.remote(num_cpus=0)
    def result(signal):
        return signal

    refs = [result.remote(signal) for _, signal in shards]
    return StoredSignal.of_shards([(rows, ref) for (rows, _), ref in zip(shards, refs)], total, positions, VOCAB)


def _same(a: TeacherSignal, b: TeacherSignal) -> None:
    assert (a.topk_ids is None) == (b.topk_ids is None)
    if a.topk_ids is not None:
        assert torch.equal(a.topk_ids, b.topk_ids)
    assert torch.equal(a.topk_logprobs, b.topk_logprobs) and torch.equal(a.sampled_logprobs, b.sampled_logprobs)


@pytest.mark.parametrize("dense", [False, True])
def test_one_teacher_shard_each_rank_reads_its_rows_in_place(ray_local, dense):
    whole = _signal(4, 6, 3, seed=1, dense=dense)
    stored = _stored(ray_local, [([0, 1, 2, 3], whole)], 4, 6)
    for lo, hi, positions in ((0, 2, 6), (2, 4, 4)):  # two ranks, the second cut to its longest row
        part = stored.take(torch.arange(lo, hi), positions).fetch()
        _same(part, whole.take(torch.arange(lo, hi), positions))
        # In place: a view of the result in the object store, which every reader maps read-only.
        assert part.topk_logprobs.untyped_storage().data_ptr() == \
            ray_local.get(stored.parts[0].ref).topk_logprobs.untyped_storage().data_ptr()
    # A micro-batch in another order is a copy of the rows asked for.
    _same(stored.take(torch.tensor([3, 0]), 5).fetch(), whole.take(torch.tensor([3, 0]), 5))


@pytest.mark.parametrize("dense", [False, True])
def test_rows_from_several_shards_of_different_widths_are_joined_as_the_driver_joins_them(ray_local, dense):
    # Three teacher actors' shards, rows balanced across them, each cut to its own longest row.
    shards = [([4, 0], _signal(2, 6, 3, seed=2, dense=dense)), ([1, 3], _signal(2, 3, 3, seed=3, dense=dense)),
              ([2], _signal(1, 5, 3, seed=4, dense=dense))]
    joined = join_signals(shards, 5, 7, VOCAB)
    stored = _stored(ray_local, shards, 5, 6)
    _same(stored.fetch(), joined)
    for index, positions in (([0, 1, 2], 6), ([3, 4], 6), ([2, 3], 4), ([4], 2)):
        _same(stored.take(torch.tensor(index), positions).fetch(), joined.take(torch.tensor(index), positions))
    # Past the narrow shard's width: the padding placeholder, as in the joined signal.
    narrow = stored.take(torch.tensor([1]), 6).fetch()
    assert bool((narrow.topk_logprobs[0, 3:] == padding_logprob(VOCAB)).all())


def test_a_stored_signal_must_hold_every_row_once_and_be_taken_within_its_bounds(ray_local):
    from tip_ray.runtime.stored_signal import StoredSignal

    signal = _signal(2, 4, 3, seed=5)
    ref = ray_local.put(signal)
    with pytest.raises(ValueError, match=r"not each of range\(3\) exactly once"):
        StoredSignal.of_shards([([0, 1], ref)], 3, 4, VOCAB)
    with pytest.raises(ValueError, match=r"not each of range\(2\) exactly once"):
        StoredSignal.of_shards([([0, 1], ref), ([1], ref)], 2, 4, VOCAB)
    stored = StoredSignal.of_shards([([0, 1], ref)], 2, 4, VOCAB)
    with pytest.raises(ValueError, match="not in a stored signal of 2 rows x 4 positions"):
        stored.take(torch.tensor([0, 2]), 4)
    with pytest.raises(ValueError, match="not in a stored signal of 2 rows x 4 positions"):
        stored.take(torch.tensor([0]), 5)
