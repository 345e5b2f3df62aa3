"""The pools' pure parts: per-prompt seeds, length balancing, and re-assembly in the original order."""

from __future__ import annotations

import random

import pytest
import torch

from tip_ray.runtime.pools import balance, join_rollouts, join_signals, sample_seeds, sequence_lengths, take_rows
from tip_ray.types import Generation, RolloutBatch


def loads(shards: list[list[int]], costs: list[float]) -> list[float]:
    return [sum(costs[i] for i in s) for s in shards]


@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_balance_places_every_item_once_within_one_item_of_even(parts):
    rng = random.Random(parts)
    for _ in range(50):
        costs = [rng.randint(1, 400) for _ in range(rng.randint(0, 40))]
        shards = balance(costs, parts)
        assert len(shards) == parts
        assert sorted(i for s in shards for i in s) == list(range(len(costs)))
        assert all(s == sorted(s) for s in shards)
        if costs:
            per_shard = loads(shards, costs)
            assert max(per_shard) - min(per_shard) <= max(costs)


def test_balance_beats_contiguous_slices_on_skewed_lengths():
    # Long prompts first: contiguous halves put all of them on one actor.
    costs = [300, 290, 280, 270, 20, 15, 12, 10]
    shards = balance(costs, 2)
    assert loads(shards, costs) == [600, 597]
    assert loads([[0, 1, 2, 3], [4, 5, 6, 7]], costs) == [1140, 57]
    assert balance(costs, 2) == shards  # deterministic


def test_balance_with_more_parts_than_items_leaves_shards_empty():
    assert balance([5, 7], 4) == [[1], [0], [], []]
    assert balance([], 2) == [[], []]


def test_balance_rejects_bad_input():
    with pytest.raises(ValueError, match="parts must be >= 1"):
        balance([1, 2], 0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        balance([1, -2], 2)
    with pytest.raises(ValueError, match="finite and >= 0"):
        balance([1, float("nan")], 2)


def test_seeds_follow_the_prompts_place_in_the_stream_only():
    whole = sample_seeds(7, epoch=2, start=16, count=8)
    assert sample_seeds(7, 2, 20, 4) == whole[4:]  # the same prompt, however the batch is cut
    assert len(set(whole)) == 8 and all(0 <= s < 2**31 for s in whole)
    assert sample_seeds(7, 3, 16, 8) != whole and sample_seeds(8, 2, 16, 8) != whole


def test_sequence_lengths_end_at_the_last_attended_position():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]])
    assert sequence_lengths(mask) == [3, 5, 4, 0]
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        sequence_lengths(torch.ones(3))


def rollout_batch(prompts: list[tuple[int, ...]], n: int, version: int, seed: int) -> RolloutBatch:
    rng = random.Random(seed)
    generations = []
    for index in range(len(prompts)):
        for _ in range(n):
            ids = [rng.randint(5, 50) for _ in range(rng.randint(1, 6))]
            generations.append(Generation(index, ids, [-rng.random() for _ in ids], rng.choice(["stop", "length"])))
    return RolloutBatch(tuple(prompts), tuple(generations), version)


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_rollout_shards_join_back_in_the_original_order(parts):
    rng = random.Random(0)
    prompts = [tuple(rng.randint(5, 50) for _ in range(rng.randint(2, 30))) for _ in range(11)]
    whole = rollout_batch(prompts, n=2, version=3, seed=1)
    shards = balance([len(p) for p in prompts], parts)
    pieces = []
    for j, rows in enumerate(s for s in shards if s):
        # What an actor returns for its rows: its prompts in shard order, local prompt indices.
        local = {row: k for k, row in enumerate(rows)}
        gens = tuple(Generation(local[g.prompt_index], g.token_ids, g.logprobs, g.finish_reason)
                     for row in rows for g in whole.generations if g.prompt_index == row)
        pieces.append((rows, RolloutBatch(tuple(prompts[r] for r in rows), gens, 3 + j)))
    joined = join_rollouts(pieces, len(prompts))
    assert joined.prompt_ids == whole.prompt_ids and joined.generations == whole.generations
    assert joined.policy_version == 3  # the oldest shard's


def test_joining_rollouts_that_miss_or_repeat_a_prompt_is_an_error():
    batch = rollout_batch([(1, 2), (3, 4)], n=1, version=0, seed=0)
    one = RolloutBatch(batch.prompt_ids[:1], batch.generations[:1], 0)
    with pytest.raises(ValueError, match="exactly once"):
        join_rollouts([([0], one)], 2)
    with pytest.raises(ValueError, match="exactly once"):
        join_rollouts([([0], one), ([0], one)], 2)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from tip_ray.config import TeacherConfig
    from tip_ray.data.tokenizer import build_char_tokenizer
    from tip_ray.embedded.models import ModelShape, build_model
    from tip_ray.teacher.worker import TeacherWorker

    path = tmp_path_factory.mktemp("pools-teacher")
    tokenizer = build_char_tokenizer()
    shape = ModelShape(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       intermediate_size=64)
    build_model(shape, tokenizer, seed=3).save_pretrained(str(path))
    return TeacherWorker(TeacherConfig(model=str(path), top_k=8, micro_batch_size=4))


def test_one_shard_of_the_whole_batch_is_the_joined_signal_without_a_copy():
    """One teacher actor: its signal covers every row in order at the full width and is returned as
    it is (no [B, L-1, K] copy); out of order or narrower, it is joined as before."""
    from tip_ray.tip.signal import TeacherSignal

    lps = torch.log_softmax(torch.randn(3, 5, 11), -1)
    whole = TeacherSignal(None, lps, lps[..., 0].clone())
    assert join_signals([([0, 1, 2], whole)], 3, 6, 11) is whole
    reordered = join_signals([([2, 0, 1], whole)], 3, 6, 11)
    assert torch.equal(reordered.topk_logprobs[[2, 0, 1]], lps)
    wider = join_signals([([0, 1, 2], whole)], 3, 8, 11)
    assert wider.topk_logprobs.shape == (3, 7, 11) and torch.equal(wider.topk_logprobs[:, :5], lps)
    with pytest.raises(ValueError, match="does not fit"):
        join_signals([([0, 1, 2], whole)], 3, 5, 11)


@pytest.mark.parametrize("parts", [2, 3])
def test_teacher_shards_cut_to_their_length_join_to_the_whole_batch_signal(teacher, parts):
    g = torch.Generator().manual_seed(parts)
    lengths = [12, 3, 30, 7, 29, 18, 2, 25, 9]
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = torch.randint(5, 100, (n,), generator=g)
        mask[row, :n] = 1
    whole = teacher.score(input_ids, mask)
    pieces = []
    for rows in balance(sequence_lengths(mask), parts):
        ids, part_mask = take_rows(input_ids, mask, rows)
        assert ids.shape[1] == max(lengths[r] for r in rows)
        pieces.append((rows, teacher.score(ids, part_mask)))
    assert min(p[1].topk_ids.shape[1] for p in pieces) < width - 1  # some shard was cut
    joined = join_signals(pieces, len(lengths), width, teacher.vocab_size)
    assert joined.topk_ids.shape == whole.topk_ids.shape and joined.topk_logprobs.dtype == whole.topk_logprobs.dtype
    valid = torch.zeros(len(lengths), width - 1, dtype=torch.bool)
    for row, n in enumerate(lengths):
        valid[row, : n - 1] = True  # positions that predict a real token
    torch.testing.assert_close(joined.topk_logprobs[valid], whole.topk_logprobs[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(joined.sampled_logprobs[valid], whole.sampled_logprobs[valid], atol=1e-5, rtol=1e-5)
    assert torch.equal(joined.topk_ids[valid], whole.topk_ids[valid])
    # The cut-off padding holds a valid distribution, so even an unmasked check passes.
    joined.validate(len(lengths), width - 1, vocab_size=128)
    # One padding rule: positions cut off by the join hold what the teacher puts at its own padding.
    assert torch.equal(joined.topk_logprobs[~valid], whole.topk_logprobs[~valid])
    assert torch.equal(joined.sampled_logprobs[~valid], whole.sampled_logprobs[~valid])
    assert torch.equal(joined.topk_ids[~valid], whole.topk_ids[~valid])


def test_teacher_skips_the_prompt_positions_it_is_told_the_loss_never_reads(teacher):
    from tip_ray.teacher.layout import first_scored_positions

    g = torch.Generator().manual_seed(7)
    prompts, lengths = [5, 9, 3, 9], [20, 14, 3, 30]  # the third row has no response
    input_ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    loss_mask = torch.zeros(len(lengths), max(lengths) - 1, dtype=torch.bool)
    for row, (p, n) in enumerate(zip(prompts, lengths)):
        input_ids[row, :n] = torch.randint(5, 100, (n,), generator=g)
        mask[row, :n] = 1
        loss_mask[row, p - 1 : n - 1] = True
    first = first_scored_positions(loss_mask)
    assert first.tolist() == [4, 8, max(lengths) - 1, 8]
    assert teacher.backend.keeps_logits  # the lm_head then runs from position 4 of this batch only
    whole, skipped = teacher.score(input_ids, mask), teacher.score(input_ids, mask, first)
    torch.testing.assert_close(skipped.topk_logprobs[loss_mask], whole.topk_logprobs[loss_mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(skipped.sampled_logprobs[loss_mask], whole.sampled_logprobs[loss_mask],
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(skipped.topk_ids[loss_mask], whole.topk_ids[loss_mask])
    before = torch.arange(loss_mask.shape[1]) < first.unsqueeze(-1)  # the prompt: the padding placeholder
    assert torch.equal(skipped.topk_ids[before], torch.arange(teacher.k).expand(int(before.sum()), -1).int())
    skipped.validate(len(lengths), max(lengths) - 1, vocab_size=128)
    with pytest.raises(ValueError, match="first_position must be"):
        teacher.score(input_ids, mask, first[:2])


def test_joining_teacher_shards_checks_their_shapes(teacher):
    ids = torch.randint(5, 100, (2, 6))
    mask = torch.ones_like(ids)
    signal = teacher.score(ids, mask)
    with pytest.raises(ValueError, match="exactly once"):
        join_signals([([0, 1], signal), ([1], signal)], 2, 6, teacher.vocab_size)
    with pytest.raises(ValueError, match="does not fit"):
        join_signals([([0, 1], signal)], 2, 4, teacher.vocab_size)


@pytest.mark.parametrize("key, value, message", [
    ("max_actor_restarts", -1, "faults.max_actor_restarts must be >= 0"),
    ("max_step_retries", -1, "faults.max_step_retries must be >= 0"),
    ("actor_timeout_s", 0.0, "faults.actor_timeout_s must be > 0"),
    ("restart_timeout_s", -1.0, "faults.restart_timeout_s must be > 0"),
    ("on_learner_failure", "retry", "faults.on_learner_failure must be one of"),
    ("max_bad_steps", 0, "faults.max_bad_steps must be >= 1"),
])
def test_fault_config_names_the_bad_key(key, value, message):
    from tip_ray.config import FaultConfig

    with pytest.raises(ValueError, match=message):
        FaultConfig(**{key: value})
    assert FaultConfig().max_step_retries == 2 and FaultConfig().on_learner_failure == "restart"
