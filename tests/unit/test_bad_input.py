"""Bad input gets a clear error naming the argument, never a silent wrong result."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_batch
from tip_ray.tip import (
    TeacherSignal,
    compute_token_stats,
    distill_loss_from_logits,
    kept_token_loss,
    lean_distill_loss,
    select_tokens,
    token_weights,
)


def stats():
    b = make_batch()
    return compute_token_stats(b.student_logits, b.response_ids, b.teacher, b.mask)


def with_teacher(b, **changes):
    fields = {"topk_ids": b.teacher.topk_ids, "topk_logprobs": b.teacher.topk_logprobs,
              "sampled_logprobs": b.teacher.sampled_logprobs}
    fields.update(changes)
    return TeacherSignal(**fields)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda b: {"topk_ids": b.teacher.topk_ids[:, :-1]}, "topk_logprobs shape"),
        (lambda b: {"topk_ids": b.teacher.topk_ids[:-1], "topk_logprobs": b.teacher.topk_logprobs[:-1]}, "covers"),
        (lambda b: {"sampled_logprobs": b.teacher.sampled_logprobs[:, :-1]}, "sampled_logprobs must be"),
        (lambda b: {"topk_ids": b.teacher.topk_ids.float()}, "integer"),
        (lambda b: {"topk_ids": b.teacher.topk_ids + 100}, "outside the vocabulary"),
        (lambda b: {"topk_ids": b.teacher.topk_ids - 100}, "outside the vocabulary"),
        (lambda b: {"topk_logprobs": torch.full_like(b.teacher.topk_logprobs, float("nan"))}, "NaN or inf"),
        (lambda b: {"sampled_logprobs": torch.full_like(b.teacher.sampled_logprobs, float("-inf"))}, "NaN or inf"),
        (lambda b: {"topk_logprobs": b.teacher.topk_logprobs + 5.0}, "not log-probabilities"),
        (lambda b: {"topk_logprobs": torch.full_like(b.teacher.topk_logprobs, -0.01)}, "probability mass"),
    ],
)
def test_bad_teacher_signal(change, match):
    b = make_batch()
    bad = with_teacher(b, **change(b))
    with pytest.raises(ValueError, match=match):
        compute_token_stats(b.student_logits, b.response_ids, bad, b.mask)
    with pytest.raises(ValueError, match=match):
        distill_loss_from_logits(b.student_logits, b.response_ids, bad, b.mask)


def test_k_larger_than_vocab():
    b = make_batch(vocab=13, k=13)
    wide = TeacherSignal(
        torch.cat([b.teacher.topk_ids, b.teacher.topk_ids[..., :2]], -1),
        torch.cat([b.teacher.topk_logprobs, b.teacher.topk_logprobs[..., :2]], -1),
        b.teacher.sampled_logprobs,
    )
    with pytest.raises(ValueError, match="top-K = 15 must be in"):
        compute_token_stats(b.student_logits, b.response_ids, wide, b.mask)
    with pytest.raises(ValueError, match="k must be in"):
        TeacherSignal.from_logits(b.teacher_logits, b.response_ids, k=14)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_student_logits(bad):
    b = make_batch()
    logits = b.student_logits.clone()
    logits[0, 3, 1] = bad
    with pytest.raises(ValueError, match="student logits hold NaN or inf"):
        compute_token_stats(logits, b.response_ids, b.teacher, b.mask)


def test_non_finite_values_off_the_mask_are_ignored():
    b = make_batch()
    logits = b.student_logits.clone()
    logits[0, 0] = float("nan")  # a prompt position
    stats = compute_token_stats(logits, b.response_ids, b.teacher, b.mask)
    assert bool(torch.isfinite(stats.rkl).all())


def test_non_finite_hidden_states_in_the_lean_path():
    b = make_batch(vocab=13)
    h = torch.randn(*b.mask.shape, 4)
    h[1, 4, 0] = float("nan")
    with pytest.raises(ValueError, match="hidden states hold NaN or inf"):
        lean_distill_loss(h, torch.randn(13, 4), b.teacher, b.response_ids, b.mask)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"response_ids": torch.zeros(2, 2, dtype=torch.long)}, "response_ids must be"),
        ({"mask": torch.ones(3, 7)}, "mask must be a bool tensor"),
        ({"mask": torch.ones(2, 7, dtype=torch.bool)}, "mask must be"),
        ({"student_logits": torch.randn(3, 7)}, "student_logits must be"),
    ],
)
def test_shapes_that_disagree(kwargs, match):
    b = make_batch()
    args = {"student_logits": b.student_logits, "response_ids": b.response_ids, "teacher": b.teacher, "mask": b.mask}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        compute_token_stats(**args)


def test_response_id_out_of_range_at_a_valid_position():
    b = make_batch(vocab=13)
    ids = b.response_ids.clone()
    ids[0, 4] = 13
    with pytest.raises(ValueError, match="response_ids holds id 13"):
        compute_token_stats(b.student_logits, ids, b.teacher, b.mask)


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.01, float("nan"), "half", True])
def test_ratio_outside_the_unit_interval(ratio):
    with pytest.raises(ValueError, match="ratio must be a number in"):
        select_tokens(stats(), "soft_or", ratio)


def test_unknown_rule_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown selection rule 'soft-or'; known rules: .*soft_or"):
        select_tokens(stats(), "soft-or", 0.5)


def test_unknown_rule_parameter():
    with pytest.raises(ValueError, match="takes no parameter qauntile; allowed: quantile"):
        select_tokens(stats(), "soft_or", 0.5, qauntile=0.9)


def test_bottom_direction_needs_a_ranked_rule():
    with pytest.raises(ValueError, match="direction='bottom' needs a ranked rule"):
        select_tokens(stats(), "random", 0.5, direction="bottom")


def test_bad_direction_scope_and_mask():
    s = stats()
    with pytest.raises(ValueError, match="direction must be"):
        select_tokens(s, "soft_or", 0.5, direction="up")
    with pytest.raises(ValueError, match="scope must be"):
        select_tokens(s, "soft_or", 0.5, scope="rank")
    with pytest.raises(ValueError, match="do not cover"):
        token_weights(s, "soft_or", 0.5, mask=torch.ones_like(s.mask))


def test_unknown_loss_and_normalisation():
    b = make_batch()
    with pytest.raises(ValueError, match="unknown loss 'kl'"):
        distill_loss_from_logits(b.student_logits, b.response_ids, b.teacher, b.mask, kind="kl")
    with pytest.raises(ValueError, match="normalization must be one of"):
        distill_loss_from_logits(b.student_logits, b.response_ids, b.teacher, b.mask, normalization="tokens")
    with pytest.raises(ValueError, match="jsd beta"):
        distill_loss_from_logits(b.student_logits, b.response_ids, b.teacher, b.mask, kind="jsd", beta=1.5)


def test_lean_path_shape_checks():
    b = make_batch(vocab=13)
    h = torch.randn(*b.mask.shape, 4)
    with pytest.raises(ValueError, match="lm_head_weight must be"):
        lean_distill_loss(h, torch.randn(13, 5), b.teacher, b.response_ids, b.mask)
    with pytest.raises(ValueError, match="lm_head_bias must be"):
        lean_distill_loss(h, torch.randn(13, 4), b.teacher, b.response_ids, b.mask, lm_head_bias=torch.zeros(12))
    with pytest.raises(ValueError, match="chunk_rows"):
        lean_distill_loss(h, torch.randn(13, 4), b.teacher, b.response_ids, b.mask, chunk_rows=0)
    weights = b.mask.float()
    weights[0, 0] = 1.0  # a prompt position
    with pytest.raises(ValueError, match="outside the mask"):
        kept_token_loss(h, torch.randn(13, 4), b.teacher, b.response_ids, weights, b.mask)
