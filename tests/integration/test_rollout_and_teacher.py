"""Rollout engines (vLLM CPU build and transformers) and teacher scoring on tiny models."""

from __future__ import annotations

import pytest
import torch
from tiny import reference_logprobs, save_tiny_model

from tip_ray.config import RolloutConfig, TeacherConfig
from tip_ray.rollout.worker import RolloutWorker
from tip_ray.teacher.worker import TeacherWorker
from tip_ray.types import TrainBatch

pytestmark = pytest.mark.slow

PROMPTS = [[3, 10, 20, 30, 40], [3, 11, 12]]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("rollout") / "student")


@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_rollout_logprobs_match_the_weights_before_and_after_a_sync(engine, tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    cfg = RolloutConfig(engine=engine, n=2, max_new_tokens=6, max_model_len=64, dtype="float32", logprobs=True)
    worker = RolloutWorker(cfg, tiny_checkpoint)
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)

    first = worker.generate(PROMPTS)
    assert first.policy_version == 0 and [g.prompt_index for g in first.generations] == [0, 0, 1, 1]
    for g, expected in zip(first.generations, reference_logprobs(reference, first)):
        assert g.finish_reason in ("stop", "length") and len(g.token_ids) <= 6
        assert g.logprobs == pytest.approx(expected, abs=1e-4)

    torch.manual_seed(1)
    updated = {k: v + 0.05 * torch.randn_like(v) for k, v in reference.state_dict().items()}
    worker.update_weights(updated, version=1)
    reference.load_state_dict(updated)
    second = worker.generate(PROMPTS)
    assert worker.weight_version == 1 and second.policy_version == 1
    for g, expected in zip(second.generations, reference_logprobs(reference, second)):
        assert g.logprobs == pytest.approx(expected, abs=1e-4)

    with pytest.raises(ValueError, match="not newer"):
        worker.update_weights(updated, version=1)

    # A load that fails part-way (a tensor in the middle does not fit) leaves the weights torn: the
    # worker refuses to sample with them, and the next complete load serves cleanly.
    torch.manual_seed(2)
    newer = {k: v + 0.05 * torch.randn_like(v) for k, v in updated.items()}
    names = list(newer)
    broken = dict(newer)
    broken[names[len(names) // 2]] = broken[names[len(names) // 2]].flatten()[:-1]
    with pytest.raises(Exception):  # noqa: B017 - the engine's own error for a tensor of the wrong shape
        worker.update_weights(broken, version=2)
    assert worker.weight_version == 1
    with pytest.raises(RuntimeError, match="failed part-way"):
        worker.generate(PROMPTS)
    worker.update_weights(newer, version=2)
    reference.load_state_dict(newer)
    third = worker.generate(PROMPTS)
    assert third.policy_version == 2
    for g, expected in zip(third.generations, reference_logprobs(reference, third)):
        assert g.logprobs == pytest.approx(expected, abs=1e-4)


def test_hf_rollouts_do_not_depend_on_how_the_prompts_are_sharded(tiny_checkpoint):
    # Two actors with two prompts each sample what one actor samples for all four (per-prompt seeds).
    prompts = PROMPTS + PROMPTS[::-1]
    seeds = [101, 202, 303, 404]
    cfg = RolloutConfig(engine="hf", n=2, max_new_tokens=6, max_model_len=64, dtype="float32")
    whole = RolloutWorker(cfg, tiny_checkpoint).generate(prompts, seeds)
    left = RolloutWorker(cfg, tiny_checkpoint, worker_index=0).generate(prompts[:2], seeds[:2])
    right = RolloutWorker(cfg, tiny_checkpoint, worker_index=1).generate(prompts[2:], seeds[2:])
    assert [g.token_ids for g in whole.generations] == [g.token_ids for g in left.generations + right.generations]
    # The same prompt under two seeds samples two ways: the seed, not the prompt, decides.
    assert [g.token_ids for g in whole.generations[:2]] != [g.token_ids for g in whole.generations[6:]]


def test_generation_that_hits_the_length_limit_is_marked(tiny_checkpoint):
    worker = RolloutWorker(RolloutConfig(engine="hf", max_new_tokens=2, max_model_len=64), tiny_checkpoint)
    rollouts = worker.generate(PROMPTS)
    for g in rollouts.generations:
        assert (g.finish_reason == "length") == (len(g.token_ids) == 2 and g.token_ids[-1] != 4)


@pytest.mark.parametrize("top_k, values_dtype", [(8, "fp16"), (None, "fp32")])
def test_teacher_scores_are_its_log_probs_at_temperature_one(top_k, values_dtype, tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    teacher = TeacherWorker(TeacherConfig(model=tiny_checkpoint, top_k=top_k, values_dtype=values_dtype,
                                          micro_batch_size=1))
    rollouts = RolloutWorker(RolloutConfig(engine="hf", n=2, max_new_tokens=5, max_model_len=64), tiny_checkpoint
                             ).generate(PROMPTS)
    input_ids, attention, loss_mask = rollouts.to_sequences(pad_id=0)
    signal = teacher.score(input_ids, attention)
    k = top_k or 128
    assert signal.topk_logprobs.shape == (4, input_ids.shape[1] - 1, k)
    # The whole distribution comes dense (the column is the id), a top-K with int32 ids.
    assert signal.dense if top_k is None else signal.topk_ids.dtype == torch.int32
    assert signal.topk_logprobs.dtype == (torch.float16 if values_dtype == "fp16" else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float(), -1)
    expected = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    tol = 2e-2 if values_dtype == "fp16" else 1e-5
    torch.testing.assert_close(signal.sampled_logprobs.float()[loss_mask], expected[loss_mask], atol=tol, rtol=tol)
    expected_values = logp if top_k is None else torch.topk(logp, k, dim=-1).values
    torch.testing.assert_close(signal.topk_logprobs.float()[loss_mask], expected_values[loss_mask], atol=tol,
                               rtol=tol)
    batch = TrainBatch(input_ids, attention, loss_mask, signal, rollouts.policy_version)
    assert int(batch.loss_mask.sum()) == sum(len(g.token_ids) for g in rollouts.generations)


def test_teacher_top_k_beyond_the_vocabulary(tiny_checkpoint):
    with pytest.raises(ValueError, match="exceeds the teacher's vocabulary"):
        TeacherWorker(TeacherConfig(model=tiny_checkpoint, top_k=500))
