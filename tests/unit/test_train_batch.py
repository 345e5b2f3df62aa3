"""TrainBatch.take/rows: the chosen sequences, cut to the longest of them, teacher kept aligned."""

from __future__ import annotations

import torch

from tip_ray.tip import TeacherSignal
from tip_ray.types import TrainBatch


def ragged_batch() -> TrainBatch:
    lengths = [5, 3, 4]
    width = 6
    ids = torch.zeros(3, width, dtype=torch.long)
    attention = torch.zeros(3, width, dtype=torch.long)
    loss_mask = torch.zeros(3, width - 1, dtype=torch.bool)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.arange(10 * row + 1, 10 * row + 1 + n)
        attention[row, :n] = 1
        loss_mask[row, 1 : n - 1] = True
    k = 4
    topk_ids = torch.arange(3 * (width - 1) * k, dtype=torch.int32).view(3, width - 1, k)
    teacher = TeacherSignal(topk_ids, -topk_ids.float(), -torch.arange(3 * (width - 1)).float().view(3, width - 1))
    return TrainBatch(ids, attention, loss_mask, teacher, policy_version=7)


def test_take_reorders_rows_and_cuts_padding_columns():
    batch = ragged_batch()
    part = batch.take(torch.tensor([2, 1]))
    assert part.input_ids.shape == (2, 4) and part.loss_mask.shape == (2, 3)
    assert part.teacher.topk_ids.shape == (2, 3, 4) and part.teacher.sampled_logprobs.shape == (2, 3)
    assert torch.equal(part.input_ids, batch.input_ids[[2, 1], :4])
    assert torch.equal(part.teacher.topk_ids, batch.teacher.topk_ids[[2, 1], :3])
    assert torch.equal(part.targets, batch.targets[[2, 1], :3])
    assert part.policy_version == 7 and part.lengths.tolist() == [4, 3]
    # Nothing on the loss mask is lost by the cut.
    assert int(part.loss_mask.sum()) == int(batch.loss_mask[[2, 1]].sum())


def test_rows_is_take_of_a_range():
    batch = ragged_batch()
    head = batch.rows(0, 2)
    assert head.input_ids.shape == (2, 5) and torch.equal(head.input_ids, batch.input_ids[:2, :5])
    assert batch.rows(1, 10).size == 2  # a stop past the end is clipped, as slicing does


def test_a_run_of_consecutive_rows_is_a_view_of_the_teacher_others_a_copy():
    batch = ragged_batch()
    signal = batch.teacher
    head = batch.rows(1, 3).teacher  # a learner rank's share: rows 1..2, cut to 3 positions
    assert head.topk_logprobs.untyped_storage().data_ptr() == signal.topk_logprobs.untyped_storage().data_ptr()
    assert head.topk_ids.untyped_storage().data_ptr() == signal.topk_ids.untyped_storage().data_ptr()
    assert torch.equal(head.topk_logprobs, signal.topk_logprobs[1:3, :3])
    assert torch.equal(head.sampled_logprobs, signal.sampled_logprobs[1:3, :3])
    for index in ([2, 1], [0, 2]):  # out of order, or not consecutive
        part = signal.take(torch.tensor(index), 4)
        assert part.topk_logprobs.untyped_storage().data_ptr() != signal.topk_logprobs.untyped_storage().data_ptr()
        assert torch.equal(part.topk_ids, signal.topk_ids[index, :4])
        assert torch.equal(part.sampled_logprobs, signal.sampled_logprobs[index, :4])
    dense = TeacherSignal(None, signal.topk_logprobs, signal.sampled_logprobs)
    assert dense.take(torch.tensor([1]), 2).topk_ids is None
    assert dense.take(torch.tensor([], dtype=torch.long), 2).topk_logprobs.shape == (0, 2, 4)
