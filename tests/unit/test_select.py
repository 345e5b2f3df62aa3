"""Selection rules: budgets, determinism, ties, masks, directions, scopes (TIP_SPEC section 4)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import make_batch
from tip_ray.tip import (
    RULES,
    TokenStats,
    budget_for,
    compute_token_stats,
    get_rule,
    quadrants,
    register_rule,
    select_flat,
    select_tokens,
    token_weights,
)
from tip_ray.tip.stats import STAT_NAMES

BUDGETED = [name for name, rule in RULES.items() if rule.kind in ("ranked", "sampled")]


def stats_of(**kw) -> TokenStats:
    b = make_batch(**kw)
    return compute_token_stats(b.student_logits, b.response_ids, b.teacher, b.mask)


def handmade_stats(values: dict[str, list[float]], mask_row: list[bool] | None = None) -> TokenStats:
    """One sequence with the given statistics (others zero) at every position."""
    n = len(next(iter(values.values())))
    mask = torch.tensor([mask_row if mask_row is not None else [True] * n])
    fields = {name: torch.zeros(1, n) for name in STAT_NAMES}
    for name, vals in values.items():
        fields[name] = torch.tensor([vals], dtype=torch.float32) * mask
    return TokenStats(**fields, token_ids=torch.arange(n).unsqueeze(0), mask=mask, vocab_size=50)


@pytest.mark.parametrize("ratio, m, expected", [(0.5, 10, 5), (0.5, 11, 6), (0.1, 10, 1), (0.7, 10, 7), (0.3, 10, 3),
                                                 (0.1, 3, 1), (1.0, 9, 9), (0.01, 5, 1), (0.2, 0, 0)])
def test_budget_is_ceil_of_ratio_times_count(ratio, m, expected):
    assert budget_for(ratio, m) == expected


@pytest.mark.parametrize("rule", BUDGETED)
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.2, 0.1, 0.03])
def test_budgeted_rules_keep_exactly_the_budget_inside_the_mask(rule, ratio):
    stats = stats_of(batch=4, length=9, vocab=40, k=8, seed=3)
    keep = select_tokens(stats, rule, ratio, generator=torch.Generator().manual_seed(0))
    assert keep.dtype == torch.bool and keep.shape == stats.mask.shape
    assert int(keep.sum()) == math.ceil(round(ratio * stats.num_valid, 9))
    assert not bool((keep & ~stats.mask).any()), "selected a prompt or padding position"


def test_all_keeps_every_valid_token():
    stats = stats_of()
    assert torch.equal(select_tokens(stats, "all"), stats.mask)


@pytest.mark.parametrize("rule", BUDGETED)
def test_seeded_selection_is_deterministic(rule):
    stats = stats_of(batch=3, length=10, vocab=30, seed=5)
    a = select_tokens(stats, rule, 0.3, generator=torch.Generator().manual_seed(7))
    b = select_tokens(stats, rule, 0.3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_sampled_rules_depend_on_the_seed():
    stats = stats_of(batch=4, length=20, vocab=30, seed=5)
    draws = {tuple(select_tokens(stats, "random", 0.5, generator=torch.Generator().manual_seed(s)).flatten().tolist())
             for s in range(5)}
    assert len(draws) > 1


def test_entropy_topk_takes_the_highest_entropy_and_ties_go_to_earlier_positions():
    stats = handmade_stats({"entropy_norm": [0.2, 0.9, 0.5, 0.9, 0.9, 0.1]})
    keep = select_tokens(stats, "entropy_topk", 0.34)  # ceil(0.34 * 6) = 3
    assert keep[0].tolist() == [False, True, False, True, True, False]
    keep = select_tokens(stats, "entropy_topk", 0.3)  # 2 of the three tied 0.9s: the earlier two
    assert keep[0].tolist() == [False, True, False, True, False, False]
    bottom = select_tokens(stats, "entropy_topk", 0.3, direction="bottom")
    assert bottom[0].tolist() == [True, False, False, False, False, True]


def test_bottom_direction_is_the_complement_for_half_budgets():
    stats = stats_of(batch=2, length=12, vocab=30, seed=1, prompt_len=2)  # ragged: 10 + 9 valid
    m = stats.num_valid
    top = select_tokens(stats, "soft_or", 0.5)
    bottom_count = m - int(top.sum())
    bottom = select_tokens(stats, "soft_or", bottom_count / m, direction="bottom")
    assert torch.equal(top | bottom, stats.mask) and not bool((top & bottom).any())


def test_soft_or_score_matches_its_formula():
    h = [0.1, 0.5, 0.9, 0.3, 0.7]
    rkl = [2.0, 0.0, 1.0, 4.0, 0.5]
    stats = handmade_stats({"entropy_norm": h, "rkl": rkl})
    th = torch.tensor(h)
    hp = torch.minimum(th, torch.quantile(th, 0.98))
    a = (hp - hp.min()) / (hp.max() - hp.min())
    r = torch.tensor(rkl)
    b = (r - r.min()) / (r.max() - r.min())
    score = a + b - a * b
    expected = torch.zeros(5, dtype=torch.bool)
    expected[torch.sort(score, descending=True, stable=True).indices[:3]] = True
    assert select_tokens(stats, "soft_or", 0.6)[0].tolist() == expected.tolist()


def test_overconfident_prefers_confident_tokens_with_high_divergence():
    # Position 2: lowest entropy and highest forward KL -> first choice; position 0 has high
    # divergence but maximal entropy, so its weight is 0.
    stats = handmade_stats({"entropy_norm": [0.9, 0.5, 0.05, 0.3], "fkl": [5.0, 1.0, 4.0, 0.1]})
    assert select_tokens(stats, "overconfident", 0.25)[0].tolist() == [False, False, True, False]


def test_teachable_keeps_at_least_one_token_per_sequence():
    stats = stats_of(batch=4, length=20, vocab=40, k=8, seed=2)
    assert budget_for(0.1, stats.num_valid) >= 4
    keep = select_tokens(stats, "teachable", 0.1)
    assert int(keep.sum()) == budget_for(0.1, stats.num_valid)
    assert bool(keep.any(dim=1).all()), "a sequence got no token"


def test_teachable_with_fewer_budget_than_sequences_keeps_the_budget():
    stats = stats_of(batch=6, length=4, vocab=40, k=8, seed=2, prompt_len=1)
    keep = select_tokens(stats, "teachable", 0.05)
    assert int(keep.sum()) == budget_for(0.05, stats.num_valid) == 1


def test_sequence_scope_budgets_each_sequence():
    stats = stats_of(batch=4, length=11, vocab=30, seed=4)
    keep = select_tokens(stats, "soft_or", 0.3, scope="sequence")
    for row in range(4):
        m = int(stats.mask[row].sum())
        assert int(keep[row].sum()) == budget_for(0.3, m)


def test_rock_freeze_weights_rock_tokens_with_lambda():
    stats = handmade_stats({"entropy_norm": [0.1] * 6})  # token ids 0..5
    w = token_weights(stats, "rock_freeze", rock_ids=[1, 4], lam=0.25)
    assert w[0].tolist() == [1.0, 0.25, 1.0, 1.0, 0.25, 1.0]
    keep = select_tokens(stats, "rock_freeze", rock_ids=torch.tensor([1, 4]))
    assert keep[0].tolist() == [True, False, True, True, False, True]


def test_entropy_sample_never_picks_zero_weight_tokens_while_positive_ones_remain():
    stats = handmade_stats({"entropy_norm": [0.0, 0.5, 0.0, 0.2, 0.0, 0.9], "jsd": [0.3] * 6})
    for seed in range(10):
        keep = select_tokens(stats, "entropy_sample", 0.5, generator=torch.Generator().manual_seed(seed))
        assert keep[0].tolist() == [False, True, False, True, False, True]
    keep = select_tokens(stats, "entropy_sample", 0.67, generator=torch.Generator().manual_seed(0))
    assert int(keep.sum()) == 5 and keep[0, [1, 3, 5]].all()


def test_entropy_sample_frequency_follows_the_weights():
    stats = handmade_stats({"entropy_norm": [0.1, 0.2, 0.3, 0.4], "jsd": [1.0] * 4})
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts += select_tokens(stats, "entropy_sample", 0.25, generator=g)[0].float()
    freq = counts / counts.sum()
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.03)


def test_random_rule_is_uniform():
    stats = handmade_stats({"entropy_norm": [0.9, 0.0, 0.5, 0.1, 0.3]})
    g = torch.Generator().manual_seed(1)
    counts = sum(select_tokens(stats, "random", 0.2, generator=g)[0].float() for _ in range(5000))
    assert torch.allclose(counts / 5000, torch.full((5,), 0.2), atol=0.03)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_all_masked_batch_selects_nothing_and_never_nans(rule):
    b = make_batch()
    mask = torch.zeros_like(b.mask)
    stats = compute_token_stats(b.student_logits, b.response_ids, b.teacher, mask)
    kwargs = {"rock_ids": [1]} if rule == "rock_freeze" else {}
    w = token_weights(stats, rule, **kwargs)
    assert not bool(w.any()) and bool(torch.isfinite(w).all())
    assert quadrants(stats).shares == {"Q1": 0.0, "Q2": 0.0, "Q3": 0.0, "Q4": 0.0}


def test_constant_statistics_do_not_nan():
    stats = handmade_stats({"entropy_norm": [0.5] * 5, "rkl": [1.0] * 5, "fkl": [1.0] * 5})
    for rule in ("soft_or", "overconfident", "teachable", "teachable_soft_or", "entropy_topk"):
        keep = select_tokens(stats, rule, 0.4)
        assert int(keep.sum()) == 2


def test_quadrants_partition_the_valid_tokens():
    stats = stats_of(batch=4, length=16, vocab=50, seed=9)
    q = quadrants(stats)
    assert abs(sum(q.shares.values()) - 1.0) < 1e-6
    assert bool((q.labels[stats.mask] >= 1).all()) and bool((q.labels[~stats.mask] == 0).all())
    # Q1/Q2 are the high-entropy half: about half of the tokens, by construction of the median split.
    assert 0.3 < q.shares["Q1"] + q.shares["Q2"] <= 0.5


def test_quadrant_labels_follow_entropy_and_divergence():
    stats = handmade_stats({"entropy_norm": [0.9, 0.9, 0.1, 0.1, 0.5], "rkl": [3.0, 0.1, 3.0, 0.1, 1.0]})
    assert quadrants(stats).labels[0].tolist() == [1, 2, 3, 4, 4]


def test_registering_a_rule_is_one_function():
    @register_rule("test_longest_prefix", "ranked", default_ratio=0.5)
    def _prefix(values, token_ids):
        return -torch.arange(token_ids.numel(), dtype=torch.float32)

    try:
        stats = handmade_stats({"entropy_norm": [0.1] * 4})
        assert select_tokens(stats, "test_longest_prefix")[0].tolist() == [True, True, False, False]
    finally:
        del RULES["test_longest_prefix"]


def test_select_flat_over_concatenated_shards_equals_selection_over_the_whole_batch():
    """The learner's global selection: statistics gathered from ranks, then one selection."""
    stats = stats_of(batch=4, length=9, vocab=30, seed=11)
    whole = select_tokens(stats, "soft_or", 0.3)
    values = {name: getattr(stats, name)[stats.mask] for name in STAT_NAMES}
    seq = torch.arange(4).unsqueeze(1).expand(4, 9)[stats.mask]
    flat = select_flat(values, stats.token_ids[stats.mask], seq, "soft_or", 0.3)
    assert torch.equal(flat > 0, whole[stats.mask])


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 4),
    length=st.integers(3, 12),
    ratio=st.floats(0.01, 1.0),
    rule=st.sampled_from(BUDGETED),
    seed=st.integers(0, 10_000),
)
def test_property_budget_and_mask(batch, length, ratio, rule, seed):
    stats = stats_of(batch=batch, length=length, vocab=17, k=5, seed=seed, prompt_len=1)
    keep = select_tokens(stats, rule, ratio, generator=torch.Generator().manual_seed(seed))
    assert int(keep.sum()) == budget_for(ratio, stats.num_valid)
    assert not bool((keep & ~stats.mask).any())


@pytest.mark.parametrize("rule", sorted(RULES))
def test_default_ratios_follow_the_spec(rule):
    expected = {"all": 1.0, "entropy_topk": 0.5, "entropy_sample": 0.5, "soft_or": 0.5, "overconfident": 0.1,
                "teachable": 0.1, "teachable_soft_or": 0.1, "random": 0.5, "rock_freeze": None}
    assert get_rule(rule).default_ratio == expected[rule]
