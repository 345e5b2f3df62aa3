"""Rock sets (TIP_SPEC section 4, R7): scores on hand cases, ties, masking, the file, the rule."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import make_batch
from tests.unit.test_import_boundaries import FORBIDDEN_IN_TIP, modules_after
from tip_ray.tip import compute_token_stats, select_flat
from tip_ray.tip.rocks import (
    RockFileError,
    build_rock_set,
    load_rock_ids,
    load_rock_set,
    save_rock_set,
    token_divergence_table,
)


def hand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows: id 1 x6 (rkl 0.1), id 2 x3 (1.0), id 3 x2 (2.0), id 4 x1 (5.0), id 5 x2 (0.0);
    the masked-out positions hold id 9 with a huge rkl that must not count."""
    ids = torch.tensor([[1, 1, 1, 2, 2, 3, 4, 9, 9],
                        [1, 1, 1, 2, 3, 5, 5, 9, 9]])
    rkl = torch.tensor([[0.1, 0.1, 0.1, 1.0, 1.0, 2.0, 5.0, 99.0, 99.0],
                        [0.1, 0.1, 0.1, 1.0, 2.0, 0.0, 0.0, 99.0, 99.0]])
    mask = ids != 9
    return ids, rkl, mask


def test_scores_are_frequency_times_mean_rkl_after_dropping_the_most_frequent():
    ids, rkl, mask = hand_case()
    rocks = build_rock_set(ids, rkl, mask, num_rocks=3, drop_most_frequent=1)
    total = 14
    assert rocks.num_tokens == total
    assert rocks.dropped_ids == (1,)
    assert rocks.token_ids == (4, 3, 2)  # R = 5/14, 4/14, 3/14; id 5 (R = 0) is fourth
    assert rocks.scores == pytest.approx((5 / total, 4 / total, 3 / total))
    assert rocks.frequency == pytest.approx((1 / total, 2 / total, 3 / total))
    assert rocks.mean_rkl == pytest.approx((5.0, 2.0, 1.0))
    assert rocks.count == (1, 2, 3)
    assert rocks.params == {"num_rocks": 3, "drop_most_frequent": 1}


def test_without_dropping_the_frequent_id_competes_and_fewer_candidates_than_asked_come_back():
    ids, rkl, mask = hand_case()
    rocks = build_rock_set(ids, rkl, mask, num_rocks=100, drop_most_frequent=0)
    # R: 4 -> 5/14, 3 -> 4/14, 2 -> 3/14, 1 -> 0.6/14, 5 -> 0: every seen id, nothing unseen (no 9, no 0).
    assert rocks.token_ids == (4, 3, 2, 1, 5)
    assert rocks.dropped_ids == ()


def test_ties_go_to_the_lower_id_both_when_dropping_and_when_ranking():
    ids = torch.tensor([7, 7, 3, 3, 8, 6])
    rkl = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    rocks = build_rock_set(ids, rkl, num_rocks=2, drop_most_frequent=1)
    assert rocks.dropped_ids == (3,)  # 3 and 7 both appear twice
    assert rocks.token_ids == (6, 8)  # equal R


def test_table_matches_a_loop_over_real_token_statistics():
    b = make_batch(batch=4, length=9, vocab=11, k=None, seed=3)
    stats = compute_token_stats(b.student_logits, b.response_ids, b.teacher, b.mask)
    counts, sums = token_divergence_table(stats.token_ids, stats.rkl, stats.mask, vocab_size=11)
    expected_counts, expected_sums = [0] * 11, [0.0] * 11
    for v, r, m in zip(stats.token_ids.flatten().tolist(), stats.rkl.flatten().tolist(), stats.mask.flatten().tolist()):
        if m:
            expected_counts[v] += 1
            expected_sums[v] += r
    assert counts.tolist() == expected_counts
    assert sums.tolist() == pytest.approx(expected_sums, rel=1e-6, abs=1e-9)
    rocks = build_rock_set(stats.token_ids, stats.rkl, stats.mask, num_rocks=3, drop_most_frequent=2, vocab_size=11)
    total = sum(expected_counts)
    best = sorted((v for v in range(11) if expected_counts[v] and v not in rocks.dropped_ids),
                  key=lambda v: (-expected_sums[v] / total, v))[:3]
    assert list(rocks.token_ids) == best


def test_file_round_trip_keeps_ids_statistics_and_provenance(tmp_path):
    ids, rkl, mask = hand_case()
    rocks = build_rock_set(ids, rkl, mask, num_rocks=2, drop_most_frequent=1,
                           provenance={"student": "s", "teacher": "t", "num_rollouts": 2})
    path = save_rock_set(rocks, tmp_path / "deep" / "rocks.json")
    assert load_rock_set(path) == rocks
    assert load_rock_ids(path) == [4, 3]
    assert json.loads(path.read_text())["provenance"]["num_rollouts"] == 2


def test_the_rule_freezes_exactly_the_loaded_rocks(tmp_path):
    ids, rkl, mask = hand_case()
    path = save_rock_set(build_rock_set(ids, rkl, mask, num_rocks=2, drop_most_frequent=1), tmp_path / "r.json")
    flat_ids = ids[mask]
    values = {"entropy": torch.rand(flat_ids.numel())}
    weights = select_flat(values, flat_ids, torch.zeros_like(flat_ids), "rock_freeze",
                          rock_ids=load_rock_ids(path), lam=0.25)
    expected = torch.where(torch.isin(flat_ids, torch.tensor([4, 3])), 0.25, 1.0)
    assert torch.equal(weights, expected)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("{not json", "is not valid JSON"),
        (json.dumps({"rock_ids": [1]}), "is not a rock set"),
        (json.dumps({"format": "tip_ray.rocks/1", "rock_ids": [1]}), "has no 'scores'"),
        (json.dumps({"format": "tip_ray.rocks/1", "rock_ids": [-1], "scores": [0], "frequency": [0], "mean_rkl": [0],
                     "count": [1], "dropped_ids": [], "num_tokens": 1}), "non-negative integers"),
        (json.dumps({"format": "tip_ray.rocks/1", "rock_ids": [1, 2], "scores": [0], "frequency": [0, 0],
                     "mean_rkl": [0, 0], "count": [1, 1], "dropped_ids": [], "num_tokens": 1}), "'scores' must be"),
    ],
)
def test_a_bad_rock_file_names_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "rocks.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(RockFileError, match=message) as info:
        load_rock_set(path)
    assert str(path) in str(info.value)


def test_bad_tensors_and_parameters_are_rejected():
    ids, rkl, mask = hand_case()
    with pytest.raises(ValueError, match="same shape"):
        build_rock_set(ids, rkl[:, :3], mask)
    with pytest.raises(ValueError, match="num_rocks must be >= 1"):
        build_rock_set(ids, rkl, mask, num_rocks=0)
    with pytest.raises(ValueError, match="drop_most_frequent must be >= 0"):
        build_rock_set(ids, rkl, mask, drop_most_frequent=-1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_rock_set(ids, rkl, mask, vocab_size=4)
    with pytest.raises(ValueError, match="no valid tokens"):
        build_rock_set(ids, rkl, torch.zeros_like(mask))


def test_the_selection_config_takes_a_rock_file_only_for_rock_freeze():
    from tip_ray.config import SelectionConfig

    assert SelectionConfig(rule="rock_freeze", rock_file="rocks.json").rock_file == "rocks.json"
    with pytest.raises(ValueError, match="selection.rock_file needs selection.rule=rock_freeze, got 'soft_or'"):
        SelectionConfig(rule="soft_or", rock_file="rocks.json")
    with pytest.raises(ValueError, match="selection.rock_file must be a path"):
        SelectionConfig(rule="rock_freeze", rock_file="")
    with pytest.raises(ValueError, match="both give the rocks"):
        SelectionConfig(rule="rock_freeze", rock_file="rocks.json", params={"rock_ids": [1]})


def test_the_rock_module_is_pure_torch():
    loaded = modules_after("import tip_ray.tip.rocks")
    assert "torch" in loaded and not loaded & set(FORBIDDEN_IN_TIP), sorted(loaded & set(FORBIDDEN_IN_TIP))
