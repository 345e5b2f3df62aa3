"""The transformers teacher runs its lm_head, log-softmax and top-K on the scored positions only
(``HFScorer``: a forward pre-hook hands the head those rows' hidden states).

Its signal must equal the plain path's (every position of each micro-batch from its earliest
first position through the head) at the scored positions, for models that transform their logits
after the head (Gemma 2's softcapping), and a model whose forward does not feed the head [B, W, H]
states is scored the plain way.
"""

from __future__ import annotations

import pytest
import torch

from tip_ray.config import TeacherConfig
from tip_ray.teacher.layout import first_scored_positions, needed_mask
from tip_ray.teacher.worker import TeacherWorker


def _save(tmp_path, name: str, config) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    path = tmp_path / name
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    return str(path)


def _qwen3(tmp_path) -> str:
    from transformers import Qwen3Config

    return _save(tmp_path, "qwen3", Qwen3Config(vocab_size=211, hidden_size=32, intermediate_size=48,
                                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                 head_dim=16, max_position_embeddings=128))


def _gemma2(tmp_path) -> str:
    from transformers import Gemma2Config

    # A small softcap: the logits after it differ a lot from the head's output.
    return _save(tmp_path, "gemma2", Gemma2Config(vocab_size=211, hidden_size=32, intermediate_size=48,
                                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                   head_dim=16, max_position_embeddings=128,
                                                   final_logit_softcapping=2.0))


def _batch(seed: int = 0):
    """Right-padded rows with ragged prompts and responses (one row without a response) and the
    loss mask over their responses."""
    g = torch.Generator().manual_seed(seed)
    prompts, lengths = [5, 12, 3, 9, 2, 7, 11], [20, 14, 3, 30, 9, 25, 12]
    input_ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    loss_mask = torch.zeros(len(lengths), max(lengths) - 1, dtype=torch.bool)
    for row, (p, n) in enumerate(zip(prompts, lengths)):
        input_ids[row, :n] = torch.randint(0, 211, (n,), generator=g)
        mask[row, :n] = 1
        loss_mask[row, p - 1 : n - 1] = True
    return input_ids, mask, loss_mask


@pytest.mark.parametrize("model", [_qwen3, _gemma2])
@pytest.mark.parametrize("with_first", [True, False])
def test_the_row_gather_gives_the_plain_paths_signal(model, with_first, tmp_path):
    teacher = TeacherWorker(TeacherConfig(model=model(tmp_path), top_k=8, micro_batch_size=3, dtype="float32"))
    input_ids, mask, loss_mask = _batch()
    first = first_scored_positions(loss_mask) if with_first else None
    assert teacher.backend.gathers_rows
    calls = []
    teacher.backend.head.register_forward_hook(lambda _m, _args, out: calls.append(tuple(out.shape)))
    gathered = teacher.score(input_ids, mask, first)
    assert teacher.backend.gathers_rows
    # One head call per micro-batch, on the scored positions alone.
    scored = needed_mask(mask, first)
    assert len(calls) == 3 and sum(shape[1] for shape in calls) == int(scored.sum())
    assert all(shape[0] == 1 for shape in calls)
    teacher.backend.gathers_rows = False
    plain = teacher.score(input_ids, mask, first)
    torch.testing.assert_close(gathered.topk_logprobs[scored], plain.topk_logprobs[scored], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gathered.sampled_logprobs[scored], plain.sampled_logprobs[scored], atol=1e-5,
                               rtol=1e-5)
    assert torch.equal(gathered.topk_ids[scored], plain.topk_ids[scored])
    # Everything else is the padding placeholder either way.
    assert torch.equal(gathered.topk_ids[~scored], plain.topk_ids[~scored])
    assert torch.equal(gathered.topk_logprobs[~scored], plain.topk_logprobs[~scored])


def test_the_softcapped_logits_are_the_ones_scored(tmp_path):
    from transformers import AutoModelForCausalLM

    path = _gemma2(tmp_path)
    teacher = TeacherWorker(TeacherConfig(model=path, top_k=8, micro_batch_size=8, dtype="float32"))
    input_ids, mask, _ = _batch(1)
    signal = teacher.score(input_ids, mask)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    row, n = 3, int(mask[3].sum())
    with torch.no_grad():
        logp = torch.log_softmax(reference(input_ids[row : row + 1, :n]).logits[0, :-1].float(), -1)
    assert float(logp.exp().max()) < 0.2  # softcapped at 2.0 over 211 ids: no id is likely
    top = signal.topk_logprobs[row, : n - 1].float()
    torch.testing.assert_close(top[:, 0], logp.max(-1).values, atol=1e-5, rtol=1e-5)


def test_a_model_that_does_not_feed_its_head_batch_states_is_scored_the_plain_way(tmp_path):
    teacher = TeacherWorker(TeacherConfig(model=_qwen3(tmp_path), top_k=8, micro_batch_size=4, dtype="float32"))
    input_ids, mask, loss_mask = _batch(2)
    first = first_scored_positions(loss_mask)
    teacher.backend.gathers_rows = False
    plain = teacher.score(input_ids, mask, first)
    teacher.backend.gathers_rows = True
    # A head that sees its states flattened, [1, b * W, H] (the logits come back [b, W, V]): the
    # gather does not apply, and the scorer says so and scores the plain way.
    shapes = []

    def flatten(_module, args):
        shapes.append(tuple(args[0].shape[:-1]))
        return (args[0].reshape(1, -1, args[0].shape[-1]),)

    head = teacher.backend.head
    head.register_forward_pre_hook(flatten)
    head.register_forward_hook(lambda _module, _args, out: out.reshape(*shapes.pop(), -1))
    fallback = teacher.score(input_ids, mask, first)
    assert not teacher.backend.gathers_rows
    scored = needed_mask(mask, first)
    torch.testing.assert_close(fallback.topk_logprobs[scored], plain.topk_logprobs[scored], atol=1e-5, rtol=1e-5)
    assert torch.equal(fallback.topk_ids[scored], plain.topk_ids[scored])


def test_a_model_that_reshapes_the_heads_output_is_scored_the_plain_way(tmp_path):
    teacher = TeacherWorker(TeacherConfig(model=_qwen3(tmp_path), top_k=8, micro_batch_size=4, dtype="float32"))
    input_ids, mask, loss_mask = _batch(3)
    first = first_scored_positions(loss_mask)
    teacher.backend.gathers_rows = False
    plain = teacher.score(input_ids, mask, first)
    teacher.backend.gathers_rows = True
    # A forward that views the head's output as [b, W, V] (as some remote-code models do): the
    # gathered [1, n, V] fails there, and the micro-batch is scored again the plain way. This
    # pre-hook runs before the scorer's, so it records the states' own [b, W].
    recorded = []
    head = teacher.backend.head
    head.register_forward_pre_hook(lambda _module, args: recorded.append(tuple(args[0].shape[:2])))
    head.register_forward_hook(lambda _module, _args, out: out.view(*recorded[-1], -1))
    fallback = teacher.score(input_ids, mask, first)
    assert not teacher.backend.gathers_rows
    scored = needed_mask(mask, first)
    torch.testing.assert_close(fallback.topk_logprobs[scored], plain.topk_logprobs[scored], atol=1e-5, rtol=1e-5)
    assert torch.equal(fallback.topk_ids[scored], plain.topk_ids[scored])
