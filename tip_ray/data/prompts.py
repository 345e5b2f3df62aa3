"""Prompt datasets: read rows, build chat prompts, tokenize, filter, and stream them in batches.

``load_prompt_dataset(cfg, tokenizer)`` turns a ``DataConfig`` into a ``PromptDataset`` of
``PromptExample`` records (token ids ready for the rollout engine, the answer for grading).
``PromptStream`` walks a dataset in batches, epoch after epoch, in a seeded order that depends only
on ``(seed, epoch)``, and can be saved and resumed exactly.

Sources (``DataConfig.format``, ``auto`` decides by what ``path`` is) are read by
``tip_ray.data.sources``: JSON lines, JSON, parquet, saved or hub datasets.

Bad input raises ``DataError`` naming the source and the problem; empty prompts and prompts over
``max_prompt_tokens`` (with ``on_overlong=drop``) are skipped and counted in ``PromptDataset.stats``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tip_ray.config import RESERVED_CHAT_TEMPLATE_KWARGS, DataConfig
from tip_ray.data.conversation import (
    Message,
    TurnNotClosed,
    check_followups,
    check_messages,
    check_renders_tools,
    check_tools,
    followup_delta,
)
from tip_ray.data.sources import DataError, Row, get_field, read_rows

__all__ = ["DataError", "DatasetStats", "PromptBatch", "PromptDataset", "PromptExample", "PromptStream",
           "chat_template_variables", "check_chat_template_kwargs", "get_field", "load_prompt_dataset", "read_rows"]

_TOKENIZE_CHUNK = 1024


class PromptTokenizer(Protocol):
    """What the loader needs from a tokenizer (any Hugging Face tokenizer has it)."""

    chat_template: str | dict[str, str] | None

    def apply_chat_template(
        self, conversation: list[Message], *, tokenize: bool, add_generation_prompt: bool, **kwargs: Any
    ) -> Any:
        """Render messages to text (``tokenize=False``); ``kwargs`` become template variables."""
        ...

    def __call__(self, text: list[str], *, add_special_tokens: bool) -> Mapping[str, list[list[int]]]:
        """Tokenize a list of texts; ``["input_ids"]`` holds one id list per text."""
        ...


@dataclass(frozen=True)
class PromptExample:
    """One prompt, ready for generation.

    ``prompt_ids``: token ids of ``prompt_text`` (the text after the prompt template and chat
    template, generation prompt included). ``answer``: the reference answer as a string, or None
    when no ``answer_field`` is configured or the row's answer is null (``null_answer=ungraded``).
    ``index``: row index in the source (after ``limit``,
    before filtering). ``uid``: the ``id_field`` value as a string, else ``str(index)``.
    With a chat template, ``messages`` are the rendered conversation (system prompt included) and
    ``tools`` the row's tool schemas; ``followups`` the row's follow-ups (``data.followups_field``),
    the k-th appended after the student's (k+1)-th turn (``tip_ray.driver.multiturn``).
    ``route``: the name of the teacher that scores it (``tip_ray.data.routing``; ``default``
    without routing).
    """

    uid: str
    prompt_ids: list[int]
    prompt_text: str
    answer: str | None
    index: int
    messages: tuple[Message, ...] | None = None
    tools: tuple[dict[str, Any], ...] | None = None
    followups: tuple[list[Message], ...] = ()
    route: str = "default"


@dataclass(frozen=True)
class DatasetStats:
    """How many rows were read from the source, skipped (empty prompt, over the token limit), kept."""

    rows_read: int
    dropped_empty: int
    dropped_overlong: int
    kept: int


class PromptDataset(Sequence[PromptExample]):
    """The kept prompts of one source, in source order; ``stats`` says what was dropped."""

    def __init__(self, examples: Sequence[PromptExample], stats: DatasetStats, source: str) -> None:
        self._examples = tuple(examples)
        self.stats = stats
        self.source = source

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> PromptExample:  # type: ignore[override]
        return self._examples[index]

    def __repr__(self) -> str:
        return f"PromptDataset(source={self.source!r}, {self.stats})"



# ---------------------------------------------------------------------------------------------
# Chat-template arguments

# Names a Hugging Face chat template gets without being asked: functions of the renderer's
# environment, and what tip_ray always passes.
_TEMPLATE_GIVENS = frozenset({"raise_exception", "strftime_now", "messages", "add_generation_prompt"})


def chat_template_variables(template: str | Mapping[str, str]) -> frozenset[str]:
    """The variables a Jinja chat template reads from its context (over every named template when
    ``template`` maps names to templates), as ``jinja2.meta.find_undeclared_variables`` finds them:
    names the template only assigns (``{% set %}``, loop variables) are not among them.

    Parsed with the extensions transformers renders chat templates with (``loopcontrols`` and the
    ``{% generation %}`` block). Raises ``DataError`` when the template is not valid Jinja.
    """
    import jinja2
    from jinja2 import meta, nodes
    from jinja2.ext import Extension, loopcontrols

    class _Generation(Extension):
        # transformers' AssistantTracker tag: parsed as a plain block, its body kept.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    env = jinja2.Environment(extensions=[loopcontrols, _Generation])
    sources = dict(template) if isinstance(template, Mapping) else {"default": template}
    found: set[str] = set()
    for name, source in sources.items():
        try:
            found |= meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateSyntaxError as err:
            raise DataError(f"the tokenizer's chat template {name!r} is not valid Jinja (line {err.lineno}: "
                            f"{err.message})") from err
    return frozenset(found)


def check_chat_template_kwargs(kwargs: Mapping[str, Any], tokenizer: PromptTokenizer) -> None:
    """Refuse ``data.chat_template_kwargs`` the tokenizer's chat template would not read.

    A key passes when the template reads a variable of that name (``enable_thinking`` for a
    Qwen3 template); a typo, or an argument of another model's template, raises ``DataError``
    naming the key and the variables the template does read. Keys that are the tokenizer's
    special-token names (``bos_token``, ...) are refused too: transformers fills those in from the
    tokenizer. ``DataConfig`` has already refused keys tip_ray passes itself.
    """
    if not kwargs:
        return
    reserved = sorted(set(kwargs) & set(RESERVED_CHAT_TEMPLATE_KWARGS))
    if reserved:
        raise DataError(f"data.chat_template_kwargs: {reserved} are set by tip_ray itself, not chat-template arguments")
    template = getattr(tokenizer, "chat_template", None)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if template is None:
        raise DataError(f"data.chat_template_kwargs {sorted(kwargs)} need a chat template, and tokenizer {name!r} "
                        "has none")
    special_tokens = set(getattr(tokenizer, "special_tokens_map", None) or {})
    special = sorted(set(kwargs) & special_tokens)
    if special:
        raise DataError(f"data.chat_template_kwargs: {special} are the tokenizer's special tokens, which "
                        "transformers passes to the template itself; set them on the tokenizer instead")
    readable = sorted(chat_template_variables(template) - _TEMPLATE_GIVENS - special_tokens)
    for key in sorted(kwargs):
        if key in readable:
            continue
        close = difflib.get_close_matches(key, sorted(readable), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(
            f"data.chat_template_kwargs: the chat template of tokenizer {name!r} never reads {key!r}{hint}; the "
            f"variables it reads are {sorted(readable) or 'none besides the messages'}"
        )


# ---------------------------------------------------------------------------------------------
# Rows -> prompts


def load_prompt_dataset(cfg: DataConfig, tokenizer: PromptTokenizer,
                        router: Callable[[Row, int, str, str], str] | None = None) -> PromptDataset:
    """Read ``cfg.path`` and build one ``PromptExample`` per usable row.

    A string prompt is formatted with ``cfg.prompt_template``; a list-of-messages prompt is used as
    it is. With ``cfg.apply_chat_template``, messages ``[system?] + [user]`` are rendered by
    ``tokenizer.apply_chat_template(..., tokenize=False, add_generation_prompt=True,
    **cfg.chat_template_kwargs)`` (the kwargs checked against the template's variables first,
    ``check_chat_template_kwargs``) and tokenized
    without adding special tokens again; without it, the formatted string is tokenized with the
    tokenizer's usual special tokens (e.g. BOS). Rows whose prompt is empty are skipped; rows over
    ``cfg.max_prompt_tokens`` tokens are skipped (``on_overlong=drop``) or raise (``error``).
    ``router(row, index, uid, source)`` names each prompt's teacher (``tip_ray.data.routing.Router``;
    None: ``default``).
    Raises ``DataError`` on a missing field, a malformed prompt, duplicate ids, or no usable row.
    """
    source = cfg.path
    if cfg.apply_chat_template and getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"tokenizer {name!r} has no chat template; set data.apply_chat_template=false to use the prompt "
            "text as it is, or use a tokenizer with a chat template"
        )
    check_chat_template_kwargs(cfg.chat_template_kwargs, tokenizer)
    rows = read_rows(cfg)

    texts: list[str] = []
    kept_rows: list[tuple[int, str, str | None, _Conversation, str]] = []
    seen_uids: dict[str, int] = {}
    dropped_empty = 0
    for index, row in enumerate(rows):
        prompt = _required(row, cfg.prompt_field, index, source, "data.prompt_field")
        answer = _answer(row, cfg, index, source)
        uid = _uid(row, cfg.id_field, index, source, seen_uids)
        where = f"{source}: row {index}"
        tools = (check_tools(_required(row, cfg.tools_field, index, source, "data.tools_field"), where)
                 if cfg.tools_field else None)
        followups = (check_followups(_required(row, cfg.followups_field, index, source, "data.followups_field"), where)
                     if cfg.followups_field else ())
        rendered = _render(prompt, cfg, tokenizer, index, source, tools)
        if rendered is None:
            dropped_empty += 1
            continue
        text, messages = rendered
        if followups:
            _check_followups_render(tokenizer, cfg, text, messages, tools, followups, where)
        texts.append(text)
        kept_rows.append((index, uid, answer, _Conversation(messages, tools, followups),
                          router(row, index, uid, source) if router else "default"))

    all_ids = _tokenize(tokenizer, texts, add_special_tokens=not cfg.apply_chat_template)
    examples: list[PromptExample] = []
    dropped_overlong = 0
    for (index, uid, answer, conversation, route), text, ids in zip(kept_rows, texts, all_ids):
        if len(ids) > cfg.max_prompt_tokens:
            if cfg.on_overlong == "error":
                raise DataError(
                    f"{source}: row {index} has {len(ids)} prompt tokens > data.max_prompt_tokens="
                    f"{cfg.max_prompt_tokens} (set data.on_overlong=drop to skip such rows)"
                )
            dropped_overlong += 1
            continue
        examples.append(PromptExample(uid=uid, prompt_ids=list(ids), prompt_text=text, answer=answer, index=index,
                                      route=route, **conversation.fields()))

    stats = DatasetStats(len(rows), dropped_empty, dropped_overlong, len(examples))
    if not examples:
        raise DataError(
            f"{source}: no usable rows: read {stats.rows_read}, dropped {dropped_empty} with an empty prompt "
            f"and {dropped_overlong} over data.max_prompt_tokens={cfg.max_prompt_tokens}"
        )
    return PromptDataset(examples, stats, source)


def _required(row: Row, field: str, index: int, source: str, option: str) -> Any:
    try:
        return get_field(row, field)
    except KeyError as err:
        raise DataError(
            f"{source}: row {index} has no {option}={field!r} ({err.args[0]}); fields in the row: {sorted(row)}"
        ) from err


def _answer(row: Row, cfg: DataConfig, index: int, source: str) -> str | None:
    field = cfg.answer_field
    if field is None:
        return None
    value = _required(row, field, index, source, "data.answer_field")
    if value is None:
        if cfg.null_answer == "ungraded":
            return None
        raise DataError(f"{source}: row {index}: answer {field!r} is null (set data.null_answer=ungraded to keep "
                        "such rows as prompts that are not graded)")
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(
        f"{source}: row {index}: answer {field!r} is a {type(value).__name__}, expected a string or a number "
        "(set data.answer_field=null if the rows carry no answer)"
    )


def _uid(row: Row, field: str | None, index: int, source: str, seen: dict[str, int]) -> str:
    if field is None:
        return str(index)
    value = _required(row, field, index, source, "data.id_field")
    if value is None:
        raise DataError(f"{source}: row {index}: id {field!r} is null")
    uid = str(value)
    if uid in seen:
        raise DataError(f"{source}: rows {seen[uid]} and {index} share the id {uid!r} (data.id_field={field!r})")
    seen[uid] = index
    return uid


def _render(prompt: Any, cfg: DataConfig, tokenizer: PromptTokenizer, index: int, source: str,
            tools: list[dict[str, Any]] | None = None) -> tuple[str, list[Message] | None] | None:
    """The prompt text to tokenize and the messages it renders (None without a chat template), or
    None when the prompt is empty."""
    where = f"{source}: row {index}"
    if prompt is None or isinstance(prompt, str):
        if prompt is None or not prompt.strip():
            return None
        user_text = cfg.prompt_template.replace("{prompt}", prompt)
        if not cfg.apply_chat_template:
            return user_text, None
        messages = [{"role": "user", "content": user_text}]
    elif isinstance(prompt, list):
        messages = check_messages(prompt, where)
        if not any(m["content"].strip() or m.get("tool_calls") for m in messages):
            return None
        if not cfg.apply_chat_template:
            raise DataError(
                f"{source}: row {index}: the prompt is a list of chat messages, which needs "
                "data.apply_chat_template=true"
            )
        if messages[-1]["role"] == "assistant":
            raise DataError(f"{where}: the conversation ends with an assistant message; the student writes the "
                            "next assistant turn, so a prompt ends with a user, tool or system message")
    else:
        raise DataError(
            f"{source}: row {index}: prompt {cfg.prompt_field!r} is a {type(prompt).__name__}, "
            "expected a string or a list of {role, content} messages"
        )
    if cfg.system_prompt is not None:
        if messages and messages[0]["role"] == "system":
            raise DataError(
                f"{source}: row {index} already starts with a system message; set data.system_prompt=null to keep it"
            )
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    kwargs = dict(cfg.chat_template_kwargs)
    if tools is not None:
        kwargs["tools"] = tools
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    if not isinstance(text, str):
        raise DataError(f"apply_chat_template returned a {type(text).__name__}, expected text (tokenize=False)")
    if tools or any("tool_calls" in m for m in messages):
        check_renders_tools(tokenizer, text, messages, tools, chat_template_variables(tokenizer.chat_template), where)
    return text, messages


@dataclass(frozen=True)
class _Conversation:
    messages: list[Message] | None
    tools: list[dict[str, Any]] | None
    followups: tuple[list[Message], ...]

    def fields(self) -> dict[str, Any]:
        return {"messages": tuple(self.messages) if self.messages is not None else None,
                "tools": tuple(self.tools) if self.tools is not None else None, "followups": self.followups}


def _check_followups_render(tokenizer: PromptTokenizer, cfg: DataConfig, text: str, messages: list[Message] | None,
                            tools: list[dict[str, Any]] | None, followups: tuple[list[Message], ...],
                            where: str) -> None:
    """Every follow-up of the row appends to the rendered conversation as an exact text delta after a
    student turn (a placeholder turn that stops with the tokenizer's eos token): the template's
    prefix property, checked before any worker starts (``followup_delta`` checks it again on the
    student's real turns)."""
    eos = getattr(tokenizer, "eos_token", None)
    if messages is None or not eos:
        raise DataError(f"{where}: data.followups_field needs a chat template and a tokenizer with an eos token (the "
                        "student ends its turns with it)")
    for k, followup in enumerate(followups):
        try:
            delta = followup_delta(tokenizer, messages, text, "ok", eos, followup, tools, cfg.chat_template_kwargs,
                                   f"{where}: follow-up {k}")
        except TurnNotClosed as err:
            raise DataError(f"{err}; multi-turn samples need a template that ends an assistant turn with the eos "
                            "token the student stops on") from err
        text, messages = delta.text, delta.messages


def _tokenize(tokenizer: PromptTokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        chunk = texts[start : start + _TOKENIZE_CHUNK]
        ids.extend(list(row) for row in tokenizer(chunk, add_special_tokens=add_special_tokens)["input_ids"])
    return ids


# ---------------------------------------------------------------------------------------------
# Streaming batches


@dataclass(frozen=True)
class PromptBatch:
    """A batch of prompts from a ``PromptStream``: the examples, the epoch they come from, and
    ``start``, the position of the first one in that epoch's order."""

    examples: tuple[PromptExample, ...]
    epoch: int
    start: int

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[PromptExample]:
        return iter(self.examples)

    @property
    def prompt_ids(self) -> list[list[int]]:
        """Token ids per prompt, ``[batch][prompt_len_i]`` (ragged)."""
        return [example.prompt_ids for example in self.examples]

    @property
    def answers(self) -> list[str | None]:
        """Reference answer per prompt, ``[batch]``."""
        return [example.answer for example in self.examples]

    @property
    def uids(self) -> list[str]:
        """Prompt uid per prompt, ``[batch]``."""
        return [example.uid for example in self.examples]


class PromptStream:
    """An endless, resumable iterator of ``PromptBatch`` over a dataset.

    Epoch ``e`` visits the examples in the order ``numpy.random.default_rng((seed, e)).permutation(n)``
    when ``shuffle`` (identity order otherwise), in consecutive batches of ``batch_size``; with
    ``drop_last`` the final short batch of an epoch is skipped, otherwise it is yielded short.
    Batches never span two epochs; epochs continue forever.

    The cursor is ``{"epoch", "position"}``: the next batch starts at ``position`` in epoch
    ``epoch``'s order. ``state_dict()`` after k batches, loaded into a new stream over the same
    dataset with the same settings, makes it yield exactly the batches the first stream would have
    yielded next (the order depends only on ``(seed, epoch)``; exact across runs with the same
    numpy version, whose ``Generator`` streams numpy keeps stable in practice but does not promise).
    """

    def __init__(
        self,
        dataset: Sequence[PromptExample],
        batch_size: int,
        seed: int,
        shuffle: bool,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if len(dataset) == 0:
            raise ValueError("cannot stream an empty dataset")
        if drop_last and batch_size > len(dataset):
            raise ValueError(
                f"batch_size={batch_size} > {len(dataset)} examples with drop_last=True would yield no batch; "
                "lower the batch size or use drop_last=False"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._epoch = 0
        self._position = 0
        self._order_cache: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        """The dataset indices in the order epoch ``epoch`` visits them, ``[n]``."""
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        if self._order_cache is None or self._order_cache[0] != epoch:
            permutation = np.random.default_rng((self.seed, epoch)).permutation(n)
            self._order_cache = (epoch, permutation.tolist())
        return self._order_cache[1]

    def __iter__(self) -> PromptStream:
        return self

    def __next__(self) -> PromptBatch:
        self._roll_epoch()
        order = self.order(self._epoch)
        indices = order[self._position : self._position + self.batch_size]
        batch = PromptBatch(tuple(self.dataset[i] for i in indices), self._epoch, self._position)
        self._position += len(indices)
        self._roll_epoch()
        return batch

    def _roll_epoch(self) -> None:
        remaining = len(self.dataset) - self._position
        if remaining <= 0 or (self.drop_last and remaining < self.batch_size):
            self._epoch += 1
            self._position = 0

    def state_dict(self) -> dict[str, int]:
        """The cursor: ``{"epoch": int, "position": int}`` of the next batch."""
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a cursor saved by ``state_dict`` (same dataset, batch size, seed, shuffle)."""
        if set(state) != {"epoch", "position"}:
            raise ValueError(f"a PromptStream state has exactly the keys epoch and position, got {sorted(state)}")
        epoch, position = state["epoch"], state["position"]
        for name, value in (("epoch", epoch), ("position", position)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"PromptStream state {name} must be an int >= 0, got {value!r}")
        if position > len(self.dataset):
            raise ValueError(f"PromptStream state position {position} is past the dataset's {len(self.dataset)} rows")
        self._epoch, self._position = int(epoch), int(position)
        self._roll_epoch()
