"""The embedded task family and the offline character tokenizer."""

from __future__ import annotations

import re
import string

import pytest

from tip_ray.data.tasks import ANSWER_PREFIX, Problem, TaskSpec, make_splits, sample_problems, write_jsonl
from tip_ray.data.tokenizer import IM_END, build_char_tokenizer, save_char_tokenizer


def test_splits_are_deterministic_and_disjoint():
    train_a, test_a = make_splits(7, 500, 100)
    train_b, test_b = make_splits(7, 500, 100)
    assert train_a == train_b and test_a == test_b
    assert len({p.uid for p in train_a}) == 500 and len({p.uid for p in test_a}) == 100
    assert not {p.uid for p in train_a} & {p.uid for p in test_a}
    assert make_splits(8, 500, 100)[1] != test_a


@pytest.mark.parametrize("seed", range(5))
def test_scratchpad_steps_are_correct_and_end_in_the_answer(seed):
    import random

    for problem in sample_problems(random.Random(seed), 200, TaskSpec(), exclude=set()):
        lines = problem.solution().split("\n")
        assert lines[-1] == ANSWER_PREFIX + problem.answer
        carry = 0
        for line in lines[:-1]:
            x, y, c, total = map(int, re.fullmatch(r"(\d)[+*](\d)\+(\d)=(\d+)", line).groups())
            assert c == carry
            assert total == (x + y + c if problem.family == "add" else x * y + c)
            carry = total // 10
        expected = problem.a + problem.b if problem.family == "add" else problem.a * problem.b
        assert int(problem.answer) == expected


def test_hand_written_solutions():
    assert Problem("add", 4821, 3976).solution() == "1+6+0=7\n2+7+0=9\n8+9+0=17\n4+3+1=8\nAnswer: 8797"
    assert Problem("add", 95, 7).solution() == "5+7+0=12\n9+0+1=10\nAnswer: 102"
    assert Problem("mul", 48, 7).solution() == "8*7+0=56\n4*7+5=33\nAnswer: 336"


def test_task_spec_validation():
    with pytest.raises(ValueError, match="task families"):
        TaskSpec(families=("div",))
    with pytest.raises(ValueError, match="min_digits"):
        TaskSpec(min_digits=3, max_digits=2)


def test_jsonl_rows(tmp_path):
    import json

    train, _ = make_splits(0, 3, 2)
    write_jsonl(train, tmp_path / "d" / "train.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "d" / "train.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p.prompt for p in train]
    assert set(rows[0]) == {"id", "prompt", "answer", "family"}


def test_tokenizer_round_trips_every_character_and_loads_like_a_hub_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    save_char_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", "")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.eos_token == IM_END and tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.decode(tok("é", add_special_tokens=False)["input_ids"]) == "<|unk|>"


def test_chat_template_is_chatml():
    tok = build_char_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "12+3="}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n12+3=<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and len(ids) == len("user\n12+3=") + 1 + 1 + 1 + len("assistant\n") + 1
