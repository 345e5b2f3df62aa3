"""A teacher whose embedding has more rows than the student's sends ids the student has only.

Qwen2.5-14B has 152,064 vocabulary rows and Qwen2.5-1.5B 151,936: the teacher's top-K must be
taken over the student's ids (``teacher.student_vocab_size``), its log-probs unchanged. Here a
tiny teacher has 32 rows beyond the 128 of the character vocabulary, made likely on purpose.
"""

from __future__ import annotations

import pytest
import torch

from tip_ray.config import TeacherConfig
from tip_ray.teacher.vllm import VLLMScorer, keep_scored
from tip_ray.teacher.worker import TeacherWorker

STUDENT_VOCAB, EXTRA = 128, 32


def save_padded_teacher(path) -> str:
    """A tiny Qwen3 with ``STUDENT_VOCAB + EXTRA`` rows whose extra rows score high (lm_head rows
    that are 4x copies of real ones), saved at ``path``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=STUDENT_VOCAB + EXTRA, hidden_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=128, head_dim=32,
                         max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        source = torch.randint(0, STUDENT_VOCAB, (EXTRA,), generator=torch.Generator().manual_seed(1))
        model.lm_head.weight[STUDENT_VOCAB:] = 4 * model.lm_head.weight[source]
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return save_padded_teacher(tmp_path_factory.mktemp("padded_teacher"))


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    lengths = [12, 5, 9]
    input_ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = torch.randint(2, STUDENT_VOCAB, (n,), generator=generator)
        attention[row, :n] = 1
    return input_ids, attention


def reference_logp(path, input_ids, attention):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float(), -1)


def test_the_top_k_is_taken_over_the_students_ids_with_the_teachers_log_probs(teacher_path, batch):
    input_ids, attention = batch
    k = 8
    scored = attention[:, 1:].bool()
    unmasked = TeacherWorker(TeacherConfig(model=teacher_path, top_k=k, micro_batch_size=2)).score(input_ids, attention)
    assert bool((unmasked.topk_ids[scored] >= STUDENT_VOCAB).any())  # the extra rows do come up

    worker = TeacherWorker(TeacherConfig(model=teacher_path, top_k=k, micro_batch_size=2,
                                         student_vocab_size=STUDENT_VOCAB))
    assert (worker.vocab_size, worker.scored_vocab, worker.k) == (STUDENT_VOCAB + EXTRA, STUDENT_VOCAB, k)
    signal = worker.score(input_ids, attention)
    assert int(signal.topk_ids.max()) < STUDENT_VOCAB
    logp = reference_logp(teacher_path, input_ids, attention)
    best = logp[..., :STUDENT_VOCAB].topk(k, dim=-1)
    torch.testing.assert_close(signal.topk_logprobs[scored], best.values[scored], atol=1e-5, rtol=0)
    assert torch.equal(signal.topk_ids[scored].long().sort(-1).values, best.indices[scored].sort(-1).values)
    # Normalised over every row: the mass on the extra rows is what the top-K and the tail lack.
    torch.testing.assert_close(signal.sampled_logprobs[scored], unmasked.sampled_logprobs[scored])
    assert bool((signal.topk_logprobs[scored].exp().sum(-1) < unmasked.topk_logprobs[scored].exp().sum(-1)).any())
    # Positions without a target keep the placeholder, uniform over the ids scored.
    assert torch.allclose(signal.topk_logprobs[~scored], torch.tensor(-torch.log(torch.tensor(128.0)).item()))


def test_top_k_null_sends_every_student_id(teacher_path, batch):
    input_ids, attention = batch
    worker = TeacherWorker(TeacherConfig(model=teacher_path, top_k=None, student_vocab_size=STUDENT_VOCAB))
    signal = worker.score(input_ids, attention)
    # Dense: every student id, in id order (the column is the id).
    assert worker.k == STUDENT_VOCAB and signal.dense and signal.k == STUDENT_VOCAB
    scored = attention[:, 1:].bool()
    signal.validate(*scored.shape, STUDENT_VOCAB, scored)
    # The same log-probs as the top-K path's with ids, put into id order.
    listed = TeacherWorker(TeacherConfig(model=teacher_path, top_k=STUDENT_VOCAB,
                                         student_vocab_size=STUDENT_VOCAB)).score(input_ids, attention)
    by_id = torch.full_like(listed.topk_logprobs[scored], float("nan")).scatter_(
        -1, listed.topk_ids[scored].long(), listed.topk_logprobs[scored])
    torch.testing.assert_close(signal.topk_logprobs[scored], by_id)
    torch.testing.assert_close(signal.sampled_logprobs, listed.sampled_logprobs)


def test_a_teacher_with_fewer_rows_than_the_student_sends_its_ids(teacher_path, batch):
    input_ids, attention = batch
    worker = TeacherWorker(TeacherConfig(model=teacher_path, top_k=None, student_vocab_size=200))
    signal = worker.score(input_ids, attention)
    # Its 160 ids are a top-160 of the student's 200: not the student's whole vocabulary.
    assert not signal.dense and signal.k == 160 and not signal.is_full(200)
    signal.validate(*attention[:, 1:].shape, 200, attention[:, 1:].bool())


def test_a_top_k_beyond_either_vocabulary_is_refused(teacher_path):
    with pytest.raises(ValueError, match=r"teacher.top_k \(140\) exceeds the student's vocabulary"):
        TeacherConfig(model=teacher_path, top_k=140, student_vocab_size=STUDENT_VOCAB)
    # A student with more rows than the teacher: the teacher's own rows bound the top-K.
    assert TeacherWorker(TeacherConfig(model=teacher_path, top_k=8, student_vocab_size=200)).scored_vocab == 160
    for student in (None, 200):
        with pytest.raises(ValueError, match=r"teacher.top_k = 170 exceeds the teacher's vocabulary \(160 ids\)"):
            TeacherWorker(TeacherConfig(model=teacher_path, top_k=170, student_vocab_size=student))


def test_vllm_asks_for_the_extra_rows_and_keeps_the_best_scored_ids():
    ids = torch.tensor([[130, 5, 129, 7, 9, 3], [1, 2, 3, 4, 5, 6]])
    logprobs = -torch.arange(6.0).expand(2, -1)
    top_ids, top_lp = keep_scored(ids, logprobs, 4, 128)
    assert top_ids.tolist() == [[5, 7, 9, 3], [1, 2, 3, 4]]
    assert top_lp.tolist() == [[-1.0, -3.0, -4.0, -5.0], [-0.0, -1.0, -2.0, -3.0]]
    with pytest.raises(RuntimeError, match="fewer than 5 of the 6 ranked ids are below 128"):
        keep_scored(ids, logprobs, 5, 128)
    # The engine would need top_k plus the 128 rows Qwen2.5-14B has beyond 1.5B's: refused before it starts.
    cfg = TeacherConfig(model="qwen-14b", backend="vllm", top_k=32, max_logprobs=64, student_vocab_size=151_936)
    with pytest.raises(ValueError, match=r"teacher.top_k = 32 log-probs per position plus 128 for the teacher's rows "
                                         r"beyond the student's 151936 .*160 in all, but teacher.max_logprobs is 64"):
        VLLMScorer(cfg, 152_064, 151_936)
