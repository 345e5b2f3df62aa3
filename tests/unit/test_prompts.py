"""Prompt datasets: DataConfig checks, every source format, bad input, presets, the resumable stream."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tip_ray.config import DataConfig
from tip_ray.data.prompts import (
    DataError,
    DatasetStats,
    PromptDataset,
    PromptExample,
    PromptStream,
    get_field,
    load_prompt_dataset,
    read_rows,
)

CONF_DATA = Path(__file__).resolve().parents[2] / "tip_ray" / "conf" / "data"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BOXED = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}."


def byte_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per UTF-8 byte, chat markers as single tokens), built in-process."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=chat_template,
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


def chatml(*messages: tuple[str, str]) -> str:
    return (
        "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages) + "<|im_start|>assistant\n"
    )


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def load(tokenizer: PreTrainedTokenizerFast, path: Path | str, **overrides: Any) -> PromptDataset:
    return load_prompt_dataset(DataConfig(path=str(path), **overrides), tokenizer)


SIMPLE = [{"prompt": "What is 1+1?", "answer": "2"}, {"prompt": "What is 2+3?", "answer": "5"}]


# --- DataConfig -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"format": "csv"}, "data.format"),
        ({"on_overlong": "truncate"}, "data.on_overlong"),
        ({"max_prompt_tokens": 0}, "data.max_prompt_tokens"),
        ({"limit": 0}, "data.limit"),
        ({"prompt_field": ""}, "data.prompt_field"),
        ({"answer_field": ""}, "data.answer_field"),
        ({"seed": -1}, "data.seed"),
        ({"prompt_template": "Solve: {problem}"}, "data.prompt_template"),
        ({"system_prompt": "Be brief.", "apply_chat_template": False}, "data.system_prompt"),
        ({"path": ""}, "data.path"),
    ],
)
def test_data_config_rejects_bad_values_naming_the_field(overrides, field):
    kwargs = {"path": "x.jsonl", **overrides}
    with pytest.raises(ValueError, match=field):
        DataConfig(**kwargs)


def test_data_config_format_error_lists_allowed_values():
    with pytest.raises(ValueError, match="auto.*jsonl.*json.*parquet.*hf"):
        DataConfig(path="x", format="csv")


def test_data_config_is_a_hydra_structured_config():
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    schema = OmegaConf.structured(DataConfig)
    with pytest.raises(MissingMandatoryValue):
        OmegaConf.to_object(schema)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, {"path": "p.jsonl", "answer_field": None, "limit": 3}))
    assert cfg == DataConfig(path="p.jsonl", answer_field=None, limit=3)
    with pytest.raises(ValueError, match="data.on_overlong"):
        OmegaConf.to_object(OmegaConf.merge(schema, {"path": "p", "on_overlong": "cut"}))


# --- loading ----------------------------------------------------------------------------------


def test_jsonl_string_prompts_get_template_and_chat_template(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", SIMPLE)
    ds = load(tokenizer, path, prompt_template=BOXED)
    assert len(ds) == 2 and ds.stats == DatasetStats(rows_read=2, dropped_empty=0, dropped_overlong=0, kept=2)
    first = ds[0]
    user = "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert first.prompt_text == chatml(("user", user))
    assert first.prompt_ids == tokenizer(first.prompt_text, add_special_tokens=False)["input_ids"]
    assert (first.uid, first.answer, first.index) == ("0", "2", 0)
    assert [example.answer for example in ds] == ["2", "5"]


def test_system_prompt_is_prepended(tmp_path, tokenizer):
    ds = load(tokenizer, write_jsonl(tmp_path / "p.jsonl", SIMPLE[:1]), system_prompt="Be brief.")
    assert ds[0].prompt_text == chatml(("system", "Be brief."), ("user", "What is 1+1?"))


def test_message_list_prompts_are_used_as_they_are(tmp_path, tokenizer):
    rows = [
        {
            "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}],
            "answer": "4",
        }
    ]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    ds = load(tokenizer, path, prompt_template=BOXED)  # the template applies to string prompts only
    assert ds[0].prompt_text == chatml(("system", "S"), ("user", "Q?"))
    with pytest.raises(DataError, match="row 0 already starts with a system message"):
        load(tokenizer, path, system_prompt="Other")
    with pytest.raises(DataError, match="apply_chat_template=true"):
        load(tokenizer, path, apply_chat_template=False)


def test_malformed_messages_are_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": [{"role": "user"}], "answer": "1"}])
    with pytest.raises(DataError, match="row 0: message 0"):
        load(tokenizer, path)
    path = write_jsonl(tmp_path / "n.jsonl", [{"prompt": 7, "answer": "1"}])
    with pytest.raises(DataError, match="row 0.*is a int"):
        load(tokenizer, path)


def test_without_chat_template_the_formatted_prompt_is_the_text(tmp_path):
    plain = byte_tokenizer(chat_template=None)
    path = write_jsonl(tmp_path / "p.jsonl", SIMPLE)
    ds = load(plain, path, apply_chat_template=False, prompt_template="Q: {prompt}\nA:")
    assert ds[1].prompt_text == "Q: What is 2+3?\nA:"
    assert ds[1].prompt_ids == plain("Q: What is 2+3?\nA:")["input_ids"]
    with pytest.raises(DataError, match="has no chat template.*data.apply_chat_template=false"):
        load(plain, path)


def test_json_array_and_json_lines_in_a_json_file(tmp_path, tokenizer):
    array = tmp_path / "a.json"
    array.write_text(json.dumps(SIMPLE))
    lines = write_jsonl(tmp_path / "l.json", SIMPLE)
    for path in (array, lines):
        assert [e.answer for e in load(tokenizer, path)] == ["2", "5"]
    obj = tmp_path / "o.json"
    obj.write_text(json.dumps({"rows": SIMPLE}))
    with pytest.raises(DataError, match="o.json: holds a JSON dict"):
        load(tokenizer, obj)


def test_parquet_with_nested_fields_and_dotted_paths(tmp_path, tokenizer):
    rows = [
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": "Find x."}],
            "reward_model": {"ground_truth": "34", "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": "a-1"},
        }
    ]
    path = write_parquet(tmp_path / "d.parquet", rows)
    ds = load(tokenizer, path, answer_field="reward_model.ground_truth", id_field="extra_info.index")
    assert (ds[0].answer, ds[0].uid) == ("34", "a-1")
    assert ds[0].prompt_text == chatml(("user", "Find x."))


def test_get_field_prefers_an_exact_key_and_names_what_is_missing():
    row = {"a.b": 1, "a": {"b": 2, "c": {"d": 3}}}
    assert get_field(row, "a.b") == 1
    assert get_field(row, "a.c.d") == 3
    with pytest.raises(KeyError, match=r"no 'x'.*available: \['b', 'c'\]"):
        get_field(row, "a.x")


def test_numeric_answers_become_strings(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "answer": 204}, {"prompt": "r", "answer": 0.5}])
    assert [e.answer for e in load(tokenizer, path)] == ["204", "0.5"]
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "answer": [1, 2]}])
    with pytest.raises(DataError, match="row 0: answer 'answer' is a list"):
        load(tokenizer, bad)
    null = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "q", "answer": None}])
    with pytest.raises(DataError, match="row 0: answer 'answer' is null"):
        load(tokenizer, null)


def test_no_answer_field(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q"}])
    assert load(tokenizer, path, answer_field=None)[0].answer is None


def test_id_field_and_duplicate_ids(tmp_path, tokenizer):
    rows = [{"prompt": "a", "answer": "1", "id": 10}, {"prompt": "b", "answer": "2", "id": 11}]
    assert [e.uid for e in load(tokenizer, write_jsonl(tmp_path / "p.jsonl", rows), id_field="id")] == ["10", "11"]
    rows[1]["id"] = 10
    with pytest.raises(DataError, match="rows 0 and 1 share the id '10'"):
        load(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows), id_field="id")


def test_limit_takes_the_first_rows_before_filtering(tmp_path, tokenizer):
    rows = [{"prompt": "", "answer": "0"}] + [{"prompt": f"q{i}", "answer": str(i)} for i in range(1, 6)]
    for writer, name in ((write_jsonl, "p.jsonl"), (write_parquet, "p.parquet")):
        ds = load(tokenizer, writer(tmp_path / name, rows), limit=3)
        assert ds.stats == DatasetStats(rows_read=3, dropped_empty=1, dropped_overlong=0, kept=2)
        assert [e.index for e in ds] == [1, 2]


# --- datasets sources -------------------------------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return datasets


def test_save_to_disk_directory(tmp_path, tokenizer, hf_cache):
    single = tmp_path / "single"
    hf_cache.Dataset.from_list(SIMPLE).save_to_disk(str(single))
    assert [e.answer for e in load(tokenizer, single)] == ["2", "5"]

    splits = tmp_path / "splits"
    hf_cache.DatasetDict(
        {"train": hf_cache.Dataset.from_list(SIMPLE), "test": hf_cache.Dataset.from_list(SIMPLE[:1])}
    ).save_to_disk(str(splits))
    assert len(load(tokenizer, splits, split="test")) == 1
    assert len(load(tokenizer, splits, format="hf", limit=1)) == 1
    with pytest.raises(DataError, match=r"no split 'validation' \(available: \['test', 'train'\]\)"):
        load(tokenizer, splits, split="validation")


def test_directory_of_data_files(tmp_path, tokenizer, hf_cache):
    folder = tmp_path / "files"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", SIMPLE)
    write_jsonl(folder / "test.jsonl", SIMPLE[:1])
    assert [e.answer for e in load(tokenizer, folder)] == ["2", "5"]
    assert len(load(tokenizer, folder, split="test")) == 1


def test_hub_names_go_to_load_dataset(tokenizer, hf_cache, monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return hf_cache.Dataset.from_list(SIMPLE)

    monkeypatch.setattr(hf_cache, "load_dataset", fake_load_dataset)
    ds = load(tokenizer, "HuggingFaceH4/MATH-500", split="test")
    assert calls == [("HuggingFaceH4/MATH-500", "test")] and len(ds) == 2

    def failing(name, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(hf_cache, "load_dataset", failing)
    with pytest.raises(DataError, match="owner/name: cannot load with datasets.*ConnectionError: offline"):
        load(tokenizer, "owner/name")


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["auto", "jsonl", "parquet"])
def test_missing_file_names_the_path(tmp_path, tokenizer, fmt):
    missing = tmp_path / "nope" / "data.parquet"
    with pytest.raises(DataError, match=re.escape(f"{missing}: no such file")):
        load(tokenizer, missing, format=fmt)


def test_unknown_extension_with_auto(tmp_path, tokenizer):
    path = tmp_path / "data.csv"
    path.write_text("prompt,answer\nq,1\n")
    with pytest.raises(DataError, match=r"data.csv: unknown extension '.csv'.*data.format"):
        load(tokenizer, path)


def test_file_format_on_a_directory_and_hf_on_a_file(tmp_path, tokenizer):
    with pytest.raises(DataError, match="is a directory"):
        load(tokenizer, tmp_path, format="jsonl")
    path = write_jsonl(tmp_path / "p.jsonl", SIMPLE)
    with pytest.raises(DataError, match="is a file; data.format=hf"):
        load(tokenizer, path, format="hf")


def test_row_without_prompt_field_names_row_and_fields(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [SIMPLE[0], {"question": "q", "answer": "1"}])
    with pytest.raises(DataError, match=r"p.jsonl: row 1 has no data.prompt_field='prompt'.*\['answer', 'question'\]"):
        load(tokenizer, path)


def test_row_without_answer_field_names_row_and_field(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [SIMPLE[0], {"prompt": "q"}])
    with pytest.raises(DataError, match="row 1 has no data.answer_field='answer'"):
        load(tokenizer, path)


def test_empty_prompts_are_counted_skips(tmp_path, tokenizer):
    rows = [{"prompt": "  \n", "answer": "1"}, SIMPLE[0], {"prompt": None, "answer": "1"}]
    rows.append({"prompt": [{"role": "user", "content": " "}], "answer": "1"})
    ds = load(tokenizer, write_jsonl(tmp_path / "p.jsonl", rows))
    assert ds.stats == DatasetStats(rows_read=4, dropped_empty=3, dropped_overlong=0, kept=1)
    assert ds[0].index == 1


def test_overlong_prompts_dropped_and_counted_or_an_error(tmp_path, tokenizer):
    rows = [{"prompt": "short", "answer": "1"}, {"prompt": "x" * 200, "answer": "2"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    limit = len(load(tokenizer, path)[0].prompt_ids)
    ds = load(tokenizer, path, max_prompt_tokens=limit)
    assert ds.stats == DatasetStats(rows_read=2, dropped_empty=0, dropped_overlong=1, kept=1)
    assert all(len(e.prompt_ids) <= limit for e in ds)
    with pytest.raises(DataError, match=f"row 1 has {limit + 195} prompt tokens > data.max_prompt_tokens={limit}"):
        load(tokenizer, path, max_prompt_tokens=limit, on_overlong="error")


def test_no_usable_rows_says_how_many_were_dropped_and_why(tmp_path, tokenizer):
    rows = [{"prompt": "", "answer": "1"}, {"prompt": "x" * 100, "answer": "2"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match="no usable rows: read 2, dropped 1 with an empty prompt and 1 over"):
        load(tokenizer, path, max_prompt_tokens=10)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no usable rows: read 0"):
        load(tokenizer, empty)


def test_bad_json_line_names_the_line(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(SIMPLE[0]) + "\n{not json\n")
    with pytest.raises(DataError, match="p.jsonl: line 2 is not valid JSON"):
        load(tokenizer, path)
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match="line 1 is a JSON list, expected an object"):
        load(tokenizer, path)


def test_corrupt_parquet_is_a_data_error(tmp_path, tokenizer):
    path = tmp_path / "p.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="p.parquet: cannot read as parquet"):
        load(tokenizer, path)


def test_read_rows_returns_raw_records(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", SIMPLE)
    assert read_rows(DataConfig(path=str(path))) == SIMPLE


# --- presets ----------------------------------------------------------------------------------

PRESET_FILES = {
    "dapo17k": (
        write_parquet,
        "parquet",
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": "Solve: PROBLEM"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": "ANSWER", "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"},
        },
    ),
    "math500": (
        write_parquet,
        "parquet",
        {
            "problem": "PROBLEM",
            "solution": "S",
            "answer": "ANSWER",
            "subject": "Algebra",
            "level": 2,
            "unique_id": "test/algebra/1.json",
        },
    ),
    "aime2024": (write_jsonl, "jsonl", {"ID": "2024-I-1", "Problem": "PROBLEM", "Solution": "S", "Answer": "ANSWER"}),
    "aime2025": (write_jsonl, "jsonl", {"problem": "PROBLEM", "answer": "ANSWER", "id": "0"}),
    "jsonl": (write_jsonl, "jsonl", {"prompt": "PROBLEM", "answer": "ANSWER"}),
    "embedded_train": (write_jsonl, "jsonl", {"id": "add:1:2", "prompt": "PROBLEM", "answer": "ANSWER", "family": "add"}),
    "embedded_test": (write_jsonl, "jsonl", {"id": "mul:3:4", "prompt": "PROBLEM", "answer": "ANSWER", "family": "mul"}),
    "smollm2_train": (write_jsonl, "jsonl", {"id": "arith-0", "prompt": "PROBLEM", "answer": "ANSWER", "family": "arith"}),
    "smollm2_test": (write_jsonl, "jsonl", {"id": "count-3", "prompt": "PROBLEM", "answer": "ANSWER", "family": "count"}),
    "smollm2_test_open": (write_jsonl, "jsonl", {"id": "instr-5", "prompt": "PROBLEM", "family": "instruction"}),
}


def test_every_preset_has_a_schema_test():
    assert {path.stem for path in CONF_DATA.glob("*.yaml")} == set(PRESET_FILES)


@pytest.mark.parametrize("name", sorted(PRESET_FILES))
def test_preset_loads_a_file_of_its_schema(name, tmp_path, tokenizer):
    from omegaconf import OmegaConf

    preset = yaml.safe_load((CONF_DATA / f"{name}.yaml").read_text())
    assert DataConfig(**preset).path  # the preset as written is a valid config
    merged = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONF_DATA / f"{name}.yaml"))
    )
    assert asdict(merged) == asdict(DataConfig(**preset))  # Hydra reads it the same way

    writer, ext, row = PRESET_FILES[name]
    rows = [row, {**row, **_renumber(row)}]
    path = writer(tmp_path / f"{name}.{ext}", rows)
    ds = load_prompt_dataset(DataConfig(**{**preset, "path": str(path)}), tokenizer)
    assert len(ds) == 2 and ds[0].answer == ("ANSWER" if preset.get("answer_field", "answer") else None)
    assert "PROBLEM" in ds[0].prompt_text and ds[0].prompt_text.endswith("<|im_start|>assistant\n")
    if preset.get("prompt_template", "{prompt}") != "{prompt}":
        assert "put your final answer within \\boxed{}." in ds[0].prompt_text


def _renumber(row: dict[str, Any]) -> dict[str, Any]:
    """A second row of the same schema with distinct ids (presets with an id_field need them unique)."""
    out: dict[str, Any] = {}
    for key in ("ID", "unique_id", "id"):
        if key in row:
            out[key] = row[key] + "-2"
    return out


# --- PromptStream -----------------------------------------------------------------------------


def make_examples(n: int) -> list[PromptExample]:
    return [PromptExample(uid=str(i), prompt_ids=[i], prompt_text=str(i), answer=None, index=i) for i in range(n)]


def uids(batch) -> list[str]:
    return [example.uid for example in batch.examples]


def take(stream: PromptStream, count: int) -> list[tuple[int, int, list[str]]]:
    return [(batch.epoch, batch.start, uids(batch)) for batch in (next(stream) for _ in range(count))]


def test_stream_order_is_the_documented_numpy_permutation():
    data = make_examples(10)
    stream = PromptStream(data, batch_size=5, seed=3, shuffle=True)
    expected = np.random.default_rng((3, 0)).permutation(10).tolist()
    assert take(stream, 2) == [(0, 0, [str(i) for i in expected[:5]]), (0, 5, [str(i) for i in expected[5:]])]
    assert next(stream).epoch == 1
    assert stream.order(1) == np.random.default_rng((3, 1)).permutation(10).tolist() != expected


def test_stream_visits_every_example_once_per_epoch_and_epochs_differ():
    stream = PromptStream(make_examples(12), batch_size=4, seed=0, shuffle=True)
    epochs: dict[int, list[str]] = {}
    for epoch, _, ids in take(stream, 9):
        epochs.setdefault(epoch, []).extend(ids)
    assert sorted(epochs) == [0, 1, 2]
    assert all(sorted(ids, key=int) == [str(i) for i in range(12)] for ids in epochs.values())
    assert epochs[0] != epochs[1]


def test_stream_without_shuffle_is_source_order():
    stream = PromptStream(make_examples(5), batch_size=2, seed=0, shuffle=False, drop_last=False)
    assert take(stream, 4) == [(0, 0, ["0", "1"]), (0, 2, ["2", "3"]), (0, 4, ["4"]), (1, 0, ["0", "1"])]


def test_drop_last_skips_the_short_batch():
    stream = PromptStream(make_examples(5), batch_size=2, seed=0, shuffle=False)
    assert take(stream, 3) == [(0, 0, ["0", "1"]), (0, 2, ["2", "3"]), (1, 0, ["0", "1"])]


@pytest.mark.parametrize(("n", "batch_size", "drop_last"), [(10, 3, True), (10, 3, False), (8, 4, True), (7, 7, True)])
def test_resumed_stream_yields_the_same_batches_across_epoch_boundaries(n, batch_size, drop_last):
    data = make_examples(n)
    reference = take(PromptStream(data, batch_size, seed=11, shuffle=True, drop_last=drop_last), 12)
    for k in range(12):
        first = PromptStream(data, batch_size, seed=11, shuffle=True, drop_last=drop_last)
        assert take(first, k) == reference[:k]
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
        resumed = PromptStream(data, batch_size, seed=11, shuffle=True, drop_last=drop_last)
        resumed.load_state_dict(state)
        assert take(resumed, 12 - k) == reference[k:]
    assert len({epoch for epoch, _, _ in reference}) > 1


def test_state_dict_reads_the_next_batch_position():
    stream = PromptStream(make_examples(6), batch_size=3, seed=0, shuffle=True)
    assert stream.state_dict() == {"epoch": 0, "position": 0}
    next(stream)
    assert stream.state_dict() == {"epoch": 0, "position": 3}
    next(stream)
    assert stream.state_dict() == {"epoch": 1, "position": 0}


def test_batches_expose_ids_answers_and_uids(tmp_path, tokenizer):
    ds = load(tokenizer, write_jsonl(tmp_path / "p.jsonl", SIMPLE))
    batch = next(PromptStream(ds, batch_size=2, seed=0, shuffle=False))
    assert batch.prompt_ids == [ds[0].prompt_ids, ds[1].prompt_ids]
    assert batch.answers == ["2", "5"] and batch.uids == ["0", "1"] and len(batch) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 5}, "drop_last"),
        ({"seed": -1}, "seed"),
    ],
)
def test_stream_rejects_bad_settings(kwargs, message):
    settings = {"batch_size": 2, "seed": 0, "shuffle": True, **kwargs}
    with pytest.raises(ValueError, match=message):
        PromptStream(make_examples(4), **settings)
    with pytest.raises(ValueError, match="empty"):
        PromptStream([], batch_size=1, seed=0, shuffle=True)


@pytest.mark.parametrize(
    "state",
    [{"epoch": 0}, {"epoch": 0, "position": 1, "extra": 2}, {"epoch": -1, "position": 0}, {"epoch": 0, "position": 9}],
)
def test_load_state_dict_rejects_bad_states(state):
    stream = PromptStream(make_examples(4), batch_size=2, seed=0, shuffle=True)
    with pytest.raises(ValueError):
        stream.load_state_dict(state)
