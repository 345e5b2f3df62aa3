"""The held-out metrics of the training loop: accuracy over graded rows only, the count of graded
rows, greedy agreement with the teacher's argmax, and the config that turns the divergence off."""

from __future__ import annotations

import math

import pytest
import torch

from tip_ray.config import DataConfig, TrainerConfig
from tip_ray.eval.held_out import HeldOutEval, grade_samples, teacher_agreement
from tip_ray.tip.signal import TeacherSignal
from tip_ray.types import Generation


def gen(index: int, tokens: list[int]) -> Generation:
    return Generation(index, tokens, [0.0] * len(tokens), "stop")


def test_accuracy_is_over_graded_rows_and_ungraded_rows_are_counted_out():
    correct = grade_samples(["Answer: 5", "Answer: 4", "anything", "Answer: 7"], ["5", "5", None, "7"], "exact")
    assert correct == (True, False, None, True)
    generations = tuple(gen(i, [1, 2]) for i in range(4))
    rkl = torch.tensor([0.5, 0.1, 0.2, 0.2, 0.0, 0.4, 0.3, 0.3], dtype=torch.float64)
    agree = torch.tensor([1, 0, 1, 1, 1, 1, 0, 1], dtype=torch.bool)
    result = HeldOutEval(generations, correct, rkl, agree)
    metrics = result.metrics()
    assert metrics["eval/graded"] == 3 and math.isclose(metrics["eval/accuracy"], 2 / 3)
    assert math.isclose(metrics["eval/rkl"], 0.25) and math.isclose(metrics["eval/teacher_agreement"], 0.75)
    assert metrics["eval/response_length"] == 2.0


def test_no_graded_row_reports_no_accuracy_and_no_divergence_when_not_measured():
    result = HeldOutEval((gen(0, [3]), gen(1, [4, 5])), (None, None))
    assert result.accuracy is None and result.metrics() == {"eval/graded": 0, "eval/response_length": 1.5}


def test_per_token_values_must_cover_every_response_token():
    with pytest.raises(ValueError, match=r"one value per response token, \[3\]"):
        HeldOutEval((gen(0, [3]), gen(1, [4, 5])), (None, None), torch.zeros(2, dtype=torch.float64))


def test_agreement_compares_the_sampled_token_with_the_teachers_argmax():
    # Two rows, prompt of 2 tokens; row 1 is one token shorter (padding at the end).
    input_ids = torch.tensor([[9, 9, 4, 7, 2], [9, 9, 5, 3, 0]])
    loss_mask = torch.tensor([[False, True, True, True], [False, True, True, False]])
    # The top-K comes unsorted (a vLLM teacher need not sort): the argmax is by value.
    ids = torch.tensor([[[0, 1, 2]] * 4, [[0, 1, 2]] * 4], dtype=torch.int32)
    ids[0, 1] = torch.tensor([4, 8, 1])  # argmax 4 = sampled 4
    ids[0, 2] = torch.tensor([6, 7, 1])  # argmax 7 (second slot) = sampled 7
    ids[0, 3] = torch.tensor([1, 2, 3])  # argmax 2 (second slot) = sampled 2
    ids[1, 1] = torch.tensor([6, 5, 1])  # argmax 5 (second slot) = sampled 5
    ids[1, 2] = torch.tensor([3, 4, 1])  # argmax 4 (second slot) != sampled 3
    lp = torch.log(torch.tensor([0.2, 0.5, 0.1])).expand(2, 4, 3).clone()
    lp[0, 1] = torch.log(torch.tensor([0.6, 0.2, 0.1]))
    signal = TeacherSignal(ids, lp, torch.zeros(2, 4))
    assert teacher_agreement(signal, input_ids, loss_mask).tolist() == [True, True, True, True, False]


def test_divergence_needs_evaluations_right_after_a_sync():
    with pytest.raises(ValueError, match="trainer.eval_every=3 must be a multiple of trainer.sync_every=2"):
        TrainerConfig(eval_every=3, sync_every=2)
    TrainerConfig(eval_every=3, sync_every=2, eval_divergence=False)
    TrainerConfig(eval_every=4, sync_every=2)


def test_null_answers_are_an_error_or_ungraded_rows(tmp_path):
    from tip_ray.data.prompts import DataError, load_prompt_dataset
    from tip_ray.data.tokenizer import build_char_tokenizer

    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "Say hi.", "answer": null}\n')
    with pytest.raises(DataError, match="row 1: answer 'answer' is null.*data.null_answer=ungraded"):
        load_prompt_dataset(DataConfig(path=str(path)), build_char_tokenizer())
    rows = load_prompt_dataset(DataConfig(path=str(path), null_answer="ungraded"), build_char_tokenizer())
    assert [r.answer for r in rows] == ["2", None]
    with pytest.raises(ValueError, match="data.null_answer must be one of"):
        DataConfig(path="x", null_answer="skip")
