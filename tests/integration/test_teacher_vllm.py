"""The vLLM teacher backend gives the transformers backend's signal on a tiny teacher.

The vLLM engine runs in a TeacherActor (its own process, as in training): the CPU build sizes
its KV cache from the whole process's memory, which earlier in-process engines would use up.
"""

from __future__ import annotations

import pytest
import torch
from tiny import save_tiny_model

from tip_ray.config import TeacherConfig
from tip_ray.teacher.worker import TeacherWorker

# The optional vLLM teacher backend (no preset uses it): about a minute, under heavy.
pytestmark = [pytest.mark.slow, pytest.mark.heavy]

LENGTHS = [13, 6, 2, 9, 1]  # right-padded rows of unequal length; the last has nothing to score


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("teacher_vllm") / "teacher", seed=3)


def padded_batch(lengths: list[int], vocab: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = torch.randint(5, vocab, (n,), generator=generator)
        attention[row, :n] = 1
    return input_ids, attention


def test_vllm_signal_equals_the_hf_signal(cluster, teacher_checkpoint):
    from transformers import AutoModelForCausalLM

    from tip_ray.runtime.actors import TeacherActor

    k = 16
    common = dict(model=teacher_checkpoint, top_k=k, values_dtype="fp32", dtype="float32")
    vllm = cluster.remote(TeacherActor).options(num_cpus=1).remote(
        TeacherConfig(backend="vllm", max_model_len=32, **common))
    hf = TeacherWorker(TeacherConfig(backend="hf", micro_batch_size=2, **common))
    input_ids, attention = padded_batch(LENGTHS)
    got, expected = cluster.get(vllm.score.remote(input_ids, attention)), hf.score(input_ids, attention)

    assert got.topk_ids.shape == expected.topk_ids.shape == (len(LENGTHS), max(LENGTHS) - 1, k)
    assert got.topk_ids.dtype == torch.int32 and got.topk_logprobs.dtype == torch.float32
    torch.testing.assert_close(got.topk_logprobs, expected.topk_logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.sampled_logprobs, expected.sampled_logprobs, atol=1e-4, rtol=0)

    # Ids agree exactly wherever the order is not decided by a near-tie (among the top k + 1).
    model = AutoModelForCausalLM.from_pretrained(teacher_checkpoint)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float(), -1)
    top = logp.sort(dim=-1, descending=True).values[..., : k + 1]
    clear = (top[..., :-1] - top[..., 1:]).min(dim=-1).values > 1e-4
    scored = attention[:, 1:].bool()
    assert bool((clear | ~scored).float().mean() > 0.9)
    assert torch.equal(got.topk_ids[clear], expected.topk_ids[clear])

    # The sampled token is often outside the top k: its own log-prob is still exact.
    outside = ~(expected.topk_ids == input_ids[:, 1:, None]).any(-1) & scored
    assert bool(outside.any())
    reference = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got.sampled_logprobs[scored], reference[scored], atol=1e-4, rtol=0)

    # Padding positions hold the same placeholder on both backends.
    padding = ~scored
    assert torch.equal(got.topk_ids[padding], expected.topk_ids[padding])
    assert torch.equal(got.topk_logprobs[padding], expected.topk_logprobs[padding])

    with pytest.raises(ValueError, match="max_model_len"):
        cluster.get(vllm.score.remote(*padded_batch([40])))


def test_full_distribution_beyond_max_logprobs_is_refused_before_the_engine_starts(teacher_checkpoint):
    with pytest.raises(ValueError, match="full distribution.*128.*max_logprobs is 64"):
        TeacherWorker(TeacherConfig(model=teacher_checkpoint, backend="vllm", top_k=None, max_logprobs=64))


def test_a_teacher_with_more_rows_than_the_student_sends_the_same_ids_on_both_backends(cluster, tmp_path):
    # 32 teacher rows beyond the student's 128, made likely: vLLM ranks them too, so it is asked
    # for k + 32 log-probs and drops them, which leaves exactly the hf backend's top-k.
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tip_ray.runtime.actors import TeacherActor

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=160, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=128, head_dim=32, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[128:] = 4 * model.lm_head.weight[torch.randint(0, 128, (32,))]
    model.save_pretrained(str(tmp_path / "padded"))
    k = 8
    common = dict(model=str(tmp_path / "padded"), top_k=k, values_dtype="fp32", dtype="float32", student_vocab_size=128)
    vllm = cluster.remote(TeacherActor).options(num_cpus=1).remote(
        TeacherConfig(backend="vllm", max_model_len=32, max_logprobs=64, **common))
    hf = TeacherWorker(TeacherConfig(backend="hf", micro_batch_size=2, **common))
    unmasked = TeacherWorker(TeacherConfig(backend="hf", **{**common, "student_vocab_size": None}))
    input_ids, attention = padded_batch(LENGTHS)
    got, expected = cluster.get(vllm.score.remote(input_ids, attention)), hf.score(input_ids, attention)
    scored = attention[:, 1:].bool()
    assert bool((unmasked.score(input_ids, attention).topk_ids[scored] >= 128).any())
    assert int(got.topk_ids.max()) < 128 and int(expected.topk_ids.max()) < 128
    torch.testing.assert_close(got.topk_logprobs, expected.topk_logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.sampled_logprobs, expected.sampled_logprobs, atol=1e-4, rtol=0)
    top = expected.topk_logprobs[..., :]
    clear = torch.cat([top[..., :-1] - top[..., 1:], torch.ones_like(top[..., :1])], -1).min(-1).values > 1e-4
    assert torch.equal(got.topk_ids[clear], expected.topk_ids[clear])
