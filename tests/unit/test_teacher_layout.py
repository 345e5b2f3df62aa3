"""The signal layout both teacher backends share, and the sync/teacher config checks."""

from __future__ import annotations

import math

import pytest
import torch

from tip_ray.config import SyncConfig, TeacherConfig
from tip_ray.teacher.layout import fill_padding, order_by_logprob, target_mask


def test_entries_sort_by_descending_log_prob_with_ties_to_the_lower_id():
    ids = torch.tensor([[7, 2, 9, 4, 5]])
    logprobs = torch.tensor([[-1.0, -2.0, -1.0, -0.5, -2.0]])
    sorted_ids, sorted_lp = order_by_logprob(ids, logprobs)
    assert sorted_ids.tolist() == [[4, 7, 9, 2, 5]]
    assert sorted_lp.tolist() == [[-0.5, -1.0, -1.0, -2.0, -2.0]]


def test_order_does_not_depend_on_the_input_order():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randperm(50, generator=generator)[:12].reshape(2, 6)
    logprobs = torch.randint(-3, 0, (2, 6), generator=generator).float()  # many ties
    permutation = torch.randperm(6, generator=generator)
    first = order_by_logprob(ids, logprobs)
    second = order_by_logprob(ids[:, permutation], logprobs[:, permutation])
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    by_id = ids.argsort(dim=-1)  # entries already in id order skip the sort into it
    third = order_by_logprob(ids.gather(-1, by_id), logprobs.gather(-1, by_id))
    assert torch.equal(first[0], third[0]) and torch.equal(first[1], third[1])


def test_a_full_distribution_in_id_order_sorts_ties_to_the_lower_id():
    logprobs = torch.tensor([[-2.0, -1.0, -2.0, -1.0, -0.5], [-1.0, -1.0, -1.0, -3.0, -1.0]])
    ids, values = order_by_logprob(torch.arange(5).expand(2, 5).clone(), logprobs)
    assert ids.tolist() == [[4, 1, 3, 0, 2], [0, 1, 2, 4, 3]]
    assert values.tolist() == [[-0.5, -1.0, -1.0, -2.0, -2.0], [-1.0, -1.0, -1.0, -1.0, -3.0]]


def test_padding_positions_get_a_uniform_placeholder():
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    scored = target_mask(attention)
    assert scored.tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    ids = torch.full((3, 3, 2), 9)
    logprobs = torch.full((3, 3, 2), -0.1)
    sampled = torch.full((3, 3), -0.2)
    fill_padding(ids, logprobs, sampled, scored, vocab_size=10)
    assert ids[~scored].tolist() == [[0, 1]] * 5 and bool((ids[scored] == 9).all())
    assert torch.allclose(logprobs[~scored], torch.full((5, 2), -math.log(10)))
    assert torch.allclose(sampled[~scored], torch.full((5,), -math.log(10)))
    assert bool((logprobs[scored] == -0.1).all()) and bool((sampled[scored] == -0.2).all())


def test_left_padding_is_refused():
    with pytest.raises(ValueError, match="right-padded"):
        target_mask(torch.tensor([[0, 1, 1]]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(transport="nccl"), "sync.transport must be one of"),
    (dict(backend="mpi"), "sync.backend must be one of"),
    (dict(bucket_mb=0), "sync.bucket_mb must be > 0"),
    (dict(timeout_s=-1), "sync.timeout_s must be > 0"),
])
def test_sync_config_names_the_bad_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyncConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="trt"), "teacher.backend must be one of"),
    (dict(dtype="fp8"), "teacher.dtype must be one of"),
    (dict(max_model_len=1), "teacher.max_model_len must be >= 2"),
    (dict(gpu_memory_utilization=0.0), r"teacher.gpu_memory_utilization must be in \(0, 1\]"),
    (dict(tensor_parallel_size=0), "teacher.tensor_parallel_size must be >= 1"),
    (dict(max_logprobs=0), "teacher.max_logprobs must be >= 1"),
    (dict(backend="vllm", top_k=300), r"teacher.top_k \(300\) exceeds teacher.max_logprobs \(256\)"),
])
def test_teacher_config_names_the_bad_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TeacherConfig(model="m", **kwargs)


def test_top_k_above_max_logprobs_is_fine_on_the_hf_backend():
    assert TeacherConfig(model="m", backend="hf", top_k=300).top_k == 300


@pytest.mark.parametrize("k", [1, 3, 7, 20])
def test_stable_topk_ids_breaks_ties_at_the_boundary_on_the_tied_rows_only(k):
    # the hf teacher takes its top-K with stable_topk_ids: rows with a tie at the k-th place take
    # the exact tie-break, the others topk's ids, and both agree with the exact path on every row
    from tip_ray.tip.support import _tie_broken_topk_ids, stable_topk_ids

    generator = torch.Generator().manual_seed(k)
    values = torch.randint(-4, 0, (3, 5, 20), generator=generator).float()  # ties everywhere
    values[0] = torch.randn(5, 20, generator=generator)  # and rows without any
    exact = _tie_broken_topk_ids(values.reshape(-1, 20), k).reshape(3, 5, k)
    assert torch.equal(stable_topk_ids(values, k), exact)
