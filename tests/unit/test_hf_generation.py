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


# ---------------------------------------------------------------------------------------------
# Per-sample seeds: a prompt's samples do not depend on the call or batch it is in.


def test_a_prompts_samples_do_not_depend_on_the_other_prompts_or_the_batching(engine):
    gen, tok, model = engine
    ps = prompts(tok, ["12+3=", "4*5=", "999+1=", "7-2="])
    seeds = [11, 22, 33, 44]
    sampling = SamplingSettings(max_new_tokens=8, temperature=1.0, n=2, logprobs=True)
    together = gen.generate(ps, sampling, seeds)  # batch_size 3: prompt 1's second sample shares a batch with 2
    by_prompt = {i: [g.token_ids for g in together if g.prompt_index == i] for i in range(4)}
    alone = HFGenerator(model, tok, batch_size=1)
    for i in (3, 1):  # another order, other batch neighbours, one sequence per batch
        assert [g.token_ids for g in alone.generate([ps[i]], sampling, [seeds[i]])] == by_prompt[i]
    shuffled = gen.generate([ps[2], ps[0]], sampling, [seeds[2], seeds[0]])
    assert [g.token_ids for g in shuffled] == by_prompt[2] + by_prompt[0]
    # The seed, not the place, decides: the same prompt under another seed samples otherwise,
    # and a prompt's n samples are not copies of each other.
    other = gen.generate([ps[0]], SamplingSettings(max_new_tokens=8, temperature=1.0, n=2), [12])
    assert [g.token_ids for g in other] != by_prompt[0]
    assert len({tuple(t) for i in range(4) for t in by_prompt[i]}) > 4


def test_without_seeds_each_place_of_the_call_gets_its_own_seed(engine):
    from tip_ray.rollout.hf import call_seeds

    gen, tok, _ = engine
    p = prompts(tok, ["12+3="])[0]
    sampling = SamplingSettings(max_new_tokens=8, temperature=1.0, seed=5)
    twice = gen.generate([p, p], sampling)
    # Reproducible from the call seed, and the same prompt twice is two draws, not one copied.
    assert [g.token_ids for g in twice] == [g.token_ids for g in gen.generate([p, p], sampling, call_seeds(5, 2))]
    assert [g.token_ids for g in twice] == [g.token_ids for g in gen.generate([p, p], sampling)]
    assert twice[0].token_ids != twice[1].token_ids
    assert len(set(call_seeds(5, 1000))) == 1000 and call_seeds(5, 3) != call_seeds(6, 3)
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        gen.generate([p], sampling, [1, 2])


def test_seeded_sampling_draws_from_the_tempered_top_p_distribution(engine):
    # One token from one prompt under 3000 seeds: the frequencies match transformers' own warped
    # distribution (temperature, then top-p), and the returned log-probs are its log-probs.
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    gen, tok, model = engine
    p = prompts(tok, ["12+"])[0]
    temperature, top_p, draws = 1.7, 0.9, 3000
    with torch.no_grad():
        logits = model(torch.tensor([p])).logits[:, -1].float()
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits))
    expected = torch.softmax(warped, -1)[0]
    wide = HFGenerator(model, tok, batch_size=1000)
    outs = wide.generate([p] * draws, SamplingSettings(max_new_tokens=1, temperature=temperature, top_p=top_p,
                                                       logprobs=True), list(range(draws)))
    counts = torch.bincount(torch.tensor([g.token_ids[0] for g in outs]), minlength=expected.numel()).double()
    assert counts[expected == 0].sum() == 0  # nothing outside the nucleus
    # Total variation, against three times its expectation under exact sampling (sum of the
    # binomial mean absolute deviations, about sqrt(2 p (1 - p) / (pi N)) each).
    q = expected.double()
    tolerance = 3 * 0.5 * torch.sqrt(2 * q * (1 - q) / (torch.pi * draws)).sum()
    assert 0.5 * (counts / draws - q).abs().sum() < tolerance
    assert (expected > 0).sum() > 3  # the check is not about a near-deterministic token
    for g in outs[:20]:
        assert g.logprobs == pytest.approx([torch.log(expected[g.token_ids[0]]).item()], abs=1e-5)
