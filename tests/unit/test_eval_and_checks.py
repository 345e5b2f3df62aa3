"""The evaluator on a tiny model, start-up checks on checkpoints, and `tip-ray eval` config errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tip_ray.config import DataConfig, EvalConfig
from tip_ray.data.prompts import load_prompt_dataset
from tip_ray.data.tasks import make_splits, write_jsonl
from tip_ray.data.tokenizer import build_char_tokenizer
from tip_ray.eval.evaluator import evaluate, write_samples
from tip_ray.state.preflight import (
    CheckpointError,
    check_model_fits_tokenizer,
    check_same_vocabulary,
    require_checkpoint,
)
from tip_ray.types import Generation, SamplingSettings


class ScriptedEngine:
    """Answers from a script: the real evaluator code path without a model."""

    def __init__(self, tokenizer, answers):
        self.tokenizer, self.answers = tokenizer, answers

    def generate(self, prompts, sampling):
        out = []
        for i, _ in enumerate(prompts):
            for s in range(sampling.n):
                text = self.answers[i][s]
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                out.append(Generation(i, ids, [-0.1] * len(ids), "stop" if s % 2 == 0 else "length"))
        return out


@pytest.fixture
def test_set(tmp_path):
    _, test = make_splits(0, 10, 4)
    write_jsonl(test, tmp_path / "test.jsonl")
    tok = build_char_tokenizer()
    data = load_prompt_dataset(DataConfig(path=str(tmp_path / "test.jsonl"), id_field="id", shuffle=False), tok)
    return tok, data, test


def test_evaluator_grades_counts_and_writes_every_sample(test_set, tmp_path):
    tok, data, problems = test_set
    right = [f"x\nAnswer: {p.answer}" for p in problems]
    answers = [[right[0], right[0]], [right[1], "Answer: 0"], ["Answer: 0", "Answer: 0"], ["Answer: 0", right[3]]]
    report = evaluate(ScriptedEngine(tok, answers), tok, data, "exact", SamplingSettings(n=2), name="t")
    assert report.accuracy == pytest.approx(4 / 8)
    assert report.pass_at_1 == pytest.approx(0.5) and report.pass_at_n == pytest.approx(0.75)
    assert report.ci_low < 0.5 < report.ci_high and report.truncated == 4
    path = write_samples(report, tmp_path / "out" / "t.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 8 and sum(r["correct"] for r in rows) == 4 and rows[0]["uid"] == problems[0].uid


def test_missing_checkpoint_and_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="student checkpoint .* does not exist"):
        require_checkpoint(str(tmp_path / "nope"), "student")
    with pytest.raises(CheckpointError, match="has no config.json"):
        require_checkpoint(str(tmp_path), "teacher")
    assert require_checkpoint("Qwen/Qwen3-4B", "teacher") == "Qwen/Qwen3-4B"  # a hub name is left to the loader


def test_tokenizers_that_differ_are_named():
    student = build_char_tokenizer()
    check_same_vocabulary(student, build_char_tokenizer(), "a", "b")
    teacher = build_char_tokenizer()
    teacher.add_tokens(["<extra>"])
    with pytest.raises(CheckpointError, match=r"student tokenizer \(s/path\) and teacher tokenizer \(t/path\) differ"):
        check_same_vocabulary(student, teacher, "s/path", "t/path")


def test_tokenizer_larger_than_the_model_vocabulary():
    from transformers import Qwen3Config

    with pytest.raises(CheckpointError, match="has vocab_size 50"):
        check_model_fits_tokenizer(Qwen3Config(vocab_size=50), build_char_tokenizer(), "student", "ckpt")


def test_eval_config_validation():
    data = DataConfig(path="x.jsonl")
    with pytest.raises(ValueError, match="eval.grader must be one of"):
        EvalConfig(model="m", data=data, grader="regex")
    with pytest.raises(ValueError, match="nothing to do"):
        EvalConfig(model="m", data=data, greedy=False)
    with pytest.raises(ValueError, match="eval.max_new_tokens"):
        EvalConfig(model="m", data=data, max_new_tokens=0)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tip_ray.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["modle=x"], "bad configuration"),
        (["max_new_tokens=many"], "bad configuration"),
        (["grader=regex"], "eval.grader must be one of"),
        (["data=nonexistent"], "bad configuration"),
        (["model=/definitely/missing"], "model checkpoint '/definitely/missing' does not exist"),
    ],
)
def test_eval_command_reports_bad_input_clearly(overrides, message, tmp_path):
    _, test = make_splits(0, 5, 3)
    write_jsonl(test, tmp_path / "t.jsonl")
    result = run_cli("eval", f"data.path={tmp_path / 't.jsonl'}", *overrides)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_grader_failures_are_counted_wrong_and_reported(test_set):
    from tip_ray.eval.evaluator import generate_and_grade
    from tip_ray.eval.held_out import HeldOutEval

    tok, data, problems = test_set
    # The third response makes math-verify time out (a tower of powers): wrong, and counted.
    answers = [[f"\\boxed{{{problems[0].answer}}}"], ["\\boxed{0}"], ["\\boxed{10^{10^{10^{10}}}}"], ["no answer"]]
    graded = generate_and_grade(ScriptedEngine(tok, answers), tok, data, "math", SamplingSettings(n=1))
    assert graded.correct == (True, False, False, False) and graded.grader_errors == 1
    assert graded.grader_error_reasons == {"timeout": 1}
    held_out = HeldOutEval(graded.generations, graded.correct, grader_errors=graded.grader_errors)
    assert held_out.metrics()["eval/grader_errors"] == 1 and held_out.metrics()["eval/accuracy"] == pytest.approx(0.25)
    report = evaluate(ScriptedEngine(tok, answers[:2] + [["\\boxed{0}"]] + answers[3:]), tok, data, "math",
                      SamplingSettings(n=1))
    assert report.grader_errors == 0 and report.summary()["grader_errors"] == 0
