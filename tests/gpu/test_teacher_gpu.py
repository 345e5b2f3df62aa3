"""The transformers paths on CUDA: the HF teacher against a reference forward, and the HF
rollout engine, at Qwen3's vocabulary (151,936) in bf16."""

from __future__ import annotations

import math

import pytest
import torch

from tip_ray.config import RolloutConfig, TeacherConfig

K = 32
# bf16 logits of one row differ by an ulp or two between batch shapes (different kernels): about
# 0.06 each at the peaked teacher's largest logits (~15). Its top-32 log-probs span ~3 nats.
ATOL = 0.25


@pytest.fixture(scope="module")
def peaked_teacher(qwen3_teacher, tmp_path_factory) -> str:
    """``qwen3_teacher`` with its lm_head scaled up: a random model's next-token distribution is
    nearly flat over 151,936 ids, which would let wrong ids pass a log-prob comparison."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(qwen3_teacher, dtype="auto")
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # logits' std ~0.4 -> ~3
    path = tmp_path_factory.mktemp("qwen3") / "peaked_teacher"
    model.save_pretrained(str(path))
    AutoTokenizer.from_pretrained(qwen3_teacher).save_pretrained(str(path))
    return str(path)


def right_padded(lengths: list[int], width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (below 128, the character tokenizer's) [B, width], right-padded to ``lengths``."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = 0
    return ids, mask


def test_the_hf_teacher_scores_on_the_gpu_like_a_reference_forward(peaked_teacher):
    from transformers import AutoModelForCausalLM

    from tip_ray.teacher.worker import TeacherWorker

    worker = TeacherWorker(TeacherConfig(model=peaked_teacher, top_k=K, micro_batch_size=2))
    model = worker.backend.model
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16  # dtype auto: the checkpoint's
    assert worker.vocab_size == 151_936

    lengths = [37, 64, 5, 20, 51]
    input_ids, attention = right_padded(lengths, 64)
    signal = worker.score(input_ids, attention)
    assert signal.topk_ids.device.type == "cpu" and signal.topk_ids.dtype == torch.int32
    assert signal.topk_ids.shape == signal.topk_logprobs.shape == (5, 63, K)

    reference = AutoModelForCausalLM.from_pretrained(peaked_teacher, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        logits = reference(input_ids=input_ids.cuda(), attention_mask=attention.cuda()).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
    for row, n in enumerate(lengths):
        for t in range(n - 1):  # scored positions: the target t+1 is a real token
            ids = signal.topk_ids[row, t].long()
            values = signal.topk_logprobs[row, t]
            ref_values = torch.topk(logp[row, t], K).values
            # The worker's log-probs are the reference's at the ids it chose, in descending order...
            assert torch.allclose(values, logp[row, t, ids], atol=ATOL)
            assert bool((values[:-1] >= values[1:]).all())
            # ... and those ids are a top K of the reference, up to the tolerance.
            assert float(values.min()) >= float(ref_values.min()) - ATOL
            assert float(values.max()) == pytest.approx(float(ref_values.max()), abs=ATOL)
            assert math.isclose(float(signal.sampled_logprobs[row, t]), float(logp[row, t, input_ids[row, t + 1]]),
                                abs_tol=ATOL)
        # Positions whose target is padding hold the placeholder.
        if n - 1 < 63:
            assert torch.equal(signal.topk_ids[row, n - 1].long(), torch.arange(K))
            assert float(signal.topk_logprobs[row, n - 1, 0]) == pytest.approx(-math.log(151_936), rel=1e-6)


def test_the_hf_rollout_engine_generates_on_the_gpu_and_takes_cpu_weights(qwen3_student):
    from transformers import AutoModelForCausalLM

    from tip_ray.rollout.worker import RolloutWorker

    worker = RolloutWorker(RolloutConfig(engine="hf", n=2, max_new_tokens=6, max_model_len=64), qwen3_student)
    model = worker.engine.model
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16

    prompts = [[5, 9, 30, 31], [7, 8]]
    batch = worker.generate(prompts, seeds=[1, 2])
    assert len(batch.generations) == 4
    assert all(1 <= len(g.token_ids) <= 6 and all(0 <= t < 151_936 for t in g.token_ids) for g in batch.generations)

    # Weights from the learner arrive on the CPU (possibly fp32): copied into the GPU bf16 model.
    weights = AutoModelForCausalLM.from_pretrained(qwen3_student, dtype=torch.float32).state_dict()
    weights = {name: torch.zeros_like(t) if name == "lm_head.weight" else t for name, t in weights.items()}
    worker.update_weights(weights, version=1)
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    assert float(model.lm_head.weight.detach().abs().max()) == 0.0
    greedy = worker.generate(prompts, sampling=None, seeds=[3, 4])
    assert greedy.policy_version == 1 and len(greedy.generations) == 4
