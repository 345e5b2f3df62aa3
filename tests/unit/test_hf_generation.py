"""The transformers generation engine on a tiny random Qwen3 model built from a config."""

from __future__ import annotations

import pytest
import torch

from tip_ray.data.tasks import Problem
from tip_ray.data.tokenizer import build_char_tokenizer
from tip_ray.embedded.models import ModelShape, build_model
from tip_ray.embedded.sft import IGNORE, collate, encode
from tip_ray.rollout.hf import HFGenerator
from tip_ray.types import SamplingSettings

TINY = ModelShape(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=128)


@pytest.fixture(scope="module")
def engine():
    tok = build_char_tokenizer()
    model = build_model(TINY, tok, seed=0).eval()
    return HFGenerator(model, tok, batch_size=3), tok, model


def prompts(tok, texts):
    return [tok(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"] for t in texts]


def test_greedy_is_deterministic_and_marks_truncation(engine):
    gen, tok, _ = engine
    ps = prompts(tok, ["12+3=", "4*5=", "999+1="])
    a = gen.generate(ps, SamplingSettings(max_new_tokens=5, temperature=0.0, logprobs=True))
    b = gen.generate(ps, SamplingSettings(max_new_tokens=5, temperature=0.0))  # log-probs off: same tokens
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.prompt_index for g in a] == [0, 1, 2]
    for g in a:
        assert len(g.token_ids) <= 5 and len(g.logprobs) == len(g.token_ids)
        assert g.finish_reason == ("stop" if g.token_ids[-1] == tok.eos_token_id else "length")
    assert all(g.logprobs == [] for g in b)


def test_sampled_logprobs_match_a_teacher_forced_forward_pass(engine):
    gen, tok, model = engine
    ps = prompts(tok, ["12+3=", "77*2="])
    outs = gen.generate(ps, SamplingSettings(max_new_tokens=6, temperature=1.0, n=2, seed=3, logprobs=True))
    assert [g.prompt_index for g in outs] == [0, 0, 1, 1]
    for g in outs:
        ids = torch.tensor([ps[g.prompt_index] + g.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        start = len(ps[g.prompt_index])
        expected = [logp[start - 1 + i, t].item() for i, t in enumerate(g.token_ids)]
        assert g.logprobs == pytest.approx(expected, abs=1e-4)


def test_sampling_settings_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingSettings(temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=0)


def test_sft_labels_cover_the_response_and_the_end_of_turn_only():
    tok = build_char_tokenizer()
    ids, labels = encode(tok, Problem("add", 12, 34))
    response = tok("2+4+0=6\n1+3+0=4\nAnswer: 46", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert labels[-len(response):] == response and all(x == IGNORE for x in labels[: -len(response)])
    batch = collate(tok, [(ids, labels), (ids[:5], labels[:5])])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(ids))
    assert int(batch["attention_mask"][1].sum()) == 5
