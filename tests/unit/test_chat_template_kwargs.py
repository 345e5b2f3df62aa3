"""Chat-template arguments (``data.chat_template_kwargs``): passed to ``apply_chat_template`` for
training and held-out prompts alike, checked against the variables the template reads, on a
Qwen3-style template (``enable_thinking``) over the character tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tip_ray.config import RESERVED_CHAT_TEMPLATE_KWARGS, DataConfig
from tip_ray.data.prompts import DataError, chat_template_variables, check_chat_template_kwargs, load_prompt_dataset
from tip_ray.data.tokenizer import build_char_tokenizer

# Modelled on Qwen3's template: tools in the system turn, a namespace and loop variables the
# template only assigns, and an empty think block when enable_thinking is false.
QWEN3_STYLE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_user=0) %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
ROWS = [{"prompt": "What is 2+3?", "answer": "5"}, {"prompt": "Name a colour.", "answer": None}]


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_char_tokenizer()
    tok.chat_template = QWEN3_STYLE
    return tok


@pytest.fixture
def rows(tmp_path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def load(tokenizer, path: Path, **overrides):
    return load_prompt_dataset(DataConfig(path=str(path), answer_field=None, **overrides), tokenizer)


def test_the_template_variables_are_what_it_reads_from_its_context():
    assert chat_template_variables(QWEN3_STYLE) == {"tools", "messages", "add_generation_prompt", "enable_thinking"}
    named = {"default": QWEN3_STYLE, "tool_use": "{{ messages }}{{ builtin_tools }}"}
    assert "builtin_tools" in chat_template_variables(named)


def test_enable_thinking_changes_the_rendered_prompt_ids(tokenizer, rows):
    plain = load(tokenizer, rows)
    thinking = load(tokenizer, rows, chat_template_kwargs={"enable_thinking": True})
    direct = load(tokenizer, rows, chat_template_kwargs={"enable_thinking": False})
    assert [e.prompt_ids for e in thinking] == [e.prompt_ids for e in plain]
    for on, off in zip(thinking, direct):
        assert on.prompt_text.endswith("<|im_start|>assistant\n")
        assert off.prompt_text == on.prompt_text + "<think>\n\n</think>\n\n"
        assert off.prompt_ids != on.prompt_ids and off.prompt_ids[: len(on.prompt_ids)] == on.prompt_ids
        # The ids are those of the rendered text, tokenized without special tokens added again.
        assert off.prompt_ids == tokenizer(off.prompt_text, add_special_tokens=False)["input_ids"]


def test_system_prompt_works_alongside_the_kwargs(tokenizer, rows):
    ds = load(tokenizer, rows, system_prompt="Be brief.", chat_template_kwargs={"enable_thinking": False})
    assert ds[0].prompt_text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
                                 "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_tools_reach_a_template_that_reads_them(tokenizer, rows):
    tool = {"type": "function", "function": {"name": "add", "parameters": {}}}
    ds = load(tokenizer, rows, chat_template_kwargs={"tools": [tool]})
    assert "# Tools\n<tools>\n" in ds[0].prompt_text and '"name": "add"' in ds[0].prompt_text


def test_a_typo_is_refused_naming_the_key_and_what_the_template_reads(tokenizer, rows):
    with pytest.raises(DataError) as err:
        load(tokenizer, rows, chat_template_kwargs={"enable_thinkng": False})
    message = str(err.value)
    assert "never reads 'enable_thinkng'" in message and "did you mean 'enable_thinking'" in message
    assert "['enable_thinking', 'tools']" in message


def test_a_key_the_template_never_reads_is_refused(rows):
    # The embedded ChatML template reads no argument at all: enable_thinking would be ignored.
    with pytest.raises(DataError, match="never reads 'enable_thinking'.*none besides the messages"):
        load(build_char_tokenizer(), rows, chat_template_kwargs={"enable_thinking": False})


def test_special_token_names_are_refused(tokenizer):
    with pytest.raises(DataError, match="special tokens"):
        check_chat_template_kwargs({"eos_token": "</s>"}, tokenizer)


def test_an_invalid_template_is_a_data_error():
    tok = build_char_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m.content }}"
    with pytest.raises(DataError, match="not valid Jinja"):
        check_chat_template_kwargs({"enable_thinking": False}, tok)


@pytest.mark.parametrize("key", ["add_generation_prompt", "tokenize", "conversation", "messages", "chat_template"])
def test_keys_tip_ray_passes_itself_are_refused_by_the_config(key):
    assert key in RESERVED_CHAT_TEMPLATE_KWARGS
    with pytest.raises(ValueError, match=f"data.chat_template_kwargs: '{key}' is set by tip_ray itself"):
        DataConfig(path="x.jsonl", chat_template_kwargs={key: True})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({1: True}, "key 1 is not a template variable name"),
    ({"enable-thinking": True}, "not a template variable name"),
    ([("enable_thinking", True)], "must be a mapping"),
])
def test_malformed_kwargs_are_refused_by_the_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(path="x.jsonl", chat_template_kwargs=kwargs)


def test_kwargs_need_the_chat_template():
    with pytest.raises(ValueError, match="need data.apply_chat_template=true"):
        DataConfig(path="x.jsonl", apply_chat_template=False, chat_template_kwargs={"enable_thinking": False})


def test_training_and_held_out_prompts_get_the_same_kwargs(tokenizer, rows):
    from tip_ray.cli import compose

    cfg = compose("train", ["+data.chat_template_kwargs.enable_thinking=false", f"data.path={rows}",
                            f"eval_data.path={rows}", "data.answer_field=null", "eval_data.answer_field=null",
                            "data.id_field=null", "eval_data.id_field=null"])
    assert cfg.data.chat_template_kwargs == cfg.eval_data.chat_template_kwargs == {"enable_thinking": False}
    train, held_out = load_prompt_dataset(cfg.data, tokenizer), load_prompt_dataset(cfg.eval_data, tokenizer)
    assert all(e.prompt_text.endswith("<think>\n\n</think>\n\n") for e in [*train, *held_out])
    # The held-out set follows the training set unless it is set on its own.
    own = compose("train", ["+data.chat_template_kwargs.enable_thinking=false", "eval_data.chat_template_kwargs={}"])
    assert own.eval_data.chat_template_kwargs == {}


def test_the_command_line_reports_a_reserved_key_before_anything_starts():
    from tip_ray.cli import compose

    with pytest.raises(SystemExit, match="'add_generation_prompt' is set by tip_ray itself"):
        compose("train", ["+data.chat_template_kwargs.add_generation_prompt=false"])
