"""Chat conversations: checking a row's messages (tool calls, tool results, tools), rendering them
with a tokenizer's chat template, and the exact tokens a follow-up adds after a student turn.

A follow-up's tokens are a text delta: the conversation so far with the student's turn, rendered
with the follow-up messages and the generation prompt, less the text the student saw and wrote
(``followup_delta``). That is exact only when the template renders a conversation as a prefix of
the same conversation with more messages (the prefix property); ``followup_delta`` checks it on
every turn and raises ``TemplateMismatch`` where it fails (templates that rewrite earlier turns,
such as those that strip earlier reasoning, or that trim the student's text).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tip_ray.data.sources import DataError

Message = dict[str, Any]

# The roles a follow-up may hold: the student writes every assistant turn itself.
FOLLOWUP_ROLES = ("user", "tool")
_TOOL_CALL_KEYS = ("id", "type", "function", "name", "arguments")


class TemplateMismatch(DataError):
    """The chat template renders a conversation so that a later turn is not an exact text suffix
    of the earlier ones (the prefix property fails): a follow-up's tokens cannot be a delta."""


# ---------------------------------------------------------------------------------------------
# Checking rows


def check_messages(raw: Sequence[Any], where: str, *, followup: bool = False) -> list[Message]:
    """The messages of ``raw`` (a row's list of chat messages) as plain dicts, checked.

    A message is ``{"role": str, "content": str}``; an assistant message may carry ``tool_calls``
    (each ``{"type": "function", "id"?, "function": {"name": str, "arguments": dict | str}}`` or the
    flat ``{"name", "arguments"}``), its content then null, empty or missing (passed on as "");
    a ``tool`` message may carry ``tool_call_id`` and ``name`` (strings), and when it has a
    ``tool_call_id`` it must answer a call of the assistant turn it follows. Other keys are dropped.
    ``followup``: the messages come after a student turn: only ``user``/``tool`` roles, and tool
    results are not matched against calls (the student's turn is not known in advance).
    Raises ``DataError`` naming ``where`` (the source and row) and the message's position.
    """
    messages: list[Message] = []
    open_calls: set[str] | None = None if not followup else set()  # ids the tool results may answer
    for position, message in enumerate(raw):
        at = f"{where}: message {position}"
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise DataError(f"{at} is not a {{'role': str, 'content': str}} record: {message!r:.200}")
        role, content = message["role"], message.get("content")
        calls = message.get("tool_calls")
        if followup and role not in FOLLOWUP_ROLES:
            raise DataError(f"{at}: a follow-up message has role {role!r}; follow-ups hold {FOLLOWUP_ROLES} "
                            "messages only (the student writes the assistant turns)")
        out: Message = {"role": role}
        if calls is not None:
            if role != "assistant":
                raise DataError(f"{at}: only assistant messages carry tool_calls, not a {role!r} message")
            out["tool_calls"] = _tool_calls(calls, at)
            if content is not None and not isinstance(content, str):
                raise DataError(f"{at}: content is a {type(content).__name__}; expected a string or null")
            out["content"] = content or ""
        elif not isinstance(content, str):
            raise DataError(f"{at} is not a {{'role': str, 'content': str}} record (content is "
                            f"{type(content).__name__}; only an assistant message with tool_calls may have null "
                            f"content): {message!r:.200}")
        else:
            out["content"] = content
        if role == "tool":
            for key in ("tool_call_id", "name"):
                value = message.get(key)
                if value is not None and not isinstance(value, str):
                    raise DataError(f"{at}: {key} is a {type(value).__name__}, expected a string")
                if value is not None:
                    out[key] = value
            if not followup:
                if open_calls is None:
                    raise DataError(f"{at}: a tool result that follows no assistant message with tool_calls")
                call_id = out.get("tool_call_id")
                if call_id is not None and open_calls and call_id not in open_calls:
                    raise DataError(f"{at}: tool_call_id {call_id!r} answers none of the calls of the assistant turn "
                                    f"before it ({sorted(open_calls)})")
        elif not followup:
            open_calls = {c["id"] for c in out["tool_calls"] if "id" in c} if "tool_calls" in out else None
        messages.append(out)
    return messages


def _tool_calls(calls: Any, at: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{at}: tool_calls must be a non-empty list of calls, got {calls!r:.200}")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise DataError(f"{at}: tool call {j} has no function name (expected {{'type': 'function', 'function': "
                            f"{{'name': str, 'arguments': dict}}}}): {call!r:.200}")
        arguments = function.get("arguments", {})
        if not isinstance(arguments, (Mapping, str)):
            raise DataError(f"{at}: tool call {j} ({function['name']!r}): arguments must be a mapping or a JSON "
                            f"string, got a {type(arguments).__name__}")
        if "id" in call and not isinstance(call["id"], str):
            raise DataError(f"{at}: tool call {j} ({function['name']!r}): id must be a string")
        out.append({k: call[k] for k in _TOOL_CALL_KEYS if k in call})
    return out


def check_tools(tools: Any, where: str) -> list[dict[str, Any]] | None:
    """A row's tool schemas (``data.tools_field``): null (no tools) or a list of mappings that each
    name a function (``{"type": "function", "function": {"name": ...}}`` or ``{"name": ...}``)."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise DataError(f"{where}: tools must be a list of tool schemas or null, got a {type(tools).__name__}")
    for j, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise DataError(f"{where}: tool {j} names no function (expected {{'type': 'function', 'function': "
                            f"{{'name': str, 'parameters': ...}}}}): {tool!r:.200}")
    return [dict(t) for t in tools]


def check_followups(raw: Any, where: str) -> tuple[list[Message], ...]:
    """A row's follow-ups (``data.followups_field``): null or a list whose k-th entry is the non-empty
    list of ``user``/``tool`` messages appended after the student's (k+1)-th turn."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise DataError(f"{where}: follow-ups must be a list of message lists (one per later turn), got a "
                        f"{type(raw).__name__}")
    out = []
    for k, messages in enumerate(raw):
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: follow-up {k} must be a non-empty list of messages, got {messages!r:.200}")
        out.append(check_messages(messages, f"{where}: follow-up {k}", followup=True))
    return tuple(out)


def check_renders_tools(tokenizer: Any, text: str, messages: Sequence[Message], tools: Sequence[Any] | None,
                        template_variables: frozenset[str], where: str) -> None:
    """Refuse a row whose tools or tool calls the chat template would drop: ``tools`` needs a
    template that reads ``tools``; every tool call's function name must appear in ``text``, the
    rendered conversation."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if tools and "tools" not in template_variables:
        raise DataError(f"{where}: the row has tools, and the chat template of tokenizer {name!r} never reads "
                        "'tools'; use a tokenizer whose template renders tools, or set data.tools_field=null")
    for position, message in enumerate(messages):
        for call in message.get("tool_calls", ()):
            function = call.get("function", call)
            if function["name"] not in text:
                raise DataError(f"{where}: message {position}: the chat template of tokenizer {name!r} does not render "
                                f"tool calls (the call of {function['name']!r} is not in the rendered text); use a "
                                "tokenizer whose template renders tool_calls")


# ---------------------------------------------------------------------------------------------
# Rendering and deltas


def render(tokenizer: Any, messages: Sequence[Message], tools: Sequence[Any] | None, kwargs: Mapping[str, Any],
           add_generation_prompt: bool) -> str:
    """``messages`` as text through the tokenizer's chat template (``tools`` passed as the
    template's ``tools`` when given, ``kwargs`` as its other variables)."""
    extra = dict(kwargs)
    if tools is not None:
        extra["tools"] = list(tools)
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **extra)
    if not isinstance(text, str):
        raise DataError(f"apply_chat_template returned a {type(text).__name__}, expected text (tokenize=False)")
    return text


@dataclass(frozen=True)
class TurnDelta:
    """What follows a student turn: ``ids``, the tokens after the student's stop token (the rest of
    the template's end of turn, the follow-up messages, the next generation prompt); ``text``, the
    whole conversation rendered up to the next generation prompt; ``messages``, that conversation."""

    ids: list[int]
    text: str
    messages: list[Message]


class TurnNotClosed(Exception):
    """The student's turn did not end with the text the template ends an assistant turn with
    (it stopped on another stop token): no follow-up can be appended to it."""


def _first_difference(a: str, b: str) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at character {i}: expected {a[i:i + 40]!r}, the template rendered {b[i:i + 40]!r}"


def followup_delta(tokenizer: Any, messages: Sequence[Message], prompt_text: str, content: str, stop_text: str,
                   followups: Sequence[Message], tools: Sequence[Any] | None, kwargs: Mapping[str, Any],
                   where: str) -> TurnDelta:
    """The tokens that follow a student turn, and the conversation after it.

    ``messages`` rendered with the generation prompt is ``prompt_text``, the text the student saw;
    it wrote ``content`` and stopped with a token whose text is ``stop_text``. The conversation
    with the student's turn is rendered closed (``closed``) and with ``followups`` and the
    generation prompt (``full``); ``closed`` must start with ``prompt_text + content`` (else
    ``TemplateMismatch``: the template renders earlier turns or the student's text differently)
    and continue with ``stop_text`` (else ``TurnNotClosed``), and ``full`` must start with
    ``closed`` (the prefix property; else ``TemplateMismatch``). The delta is ``full`` after
    ``prompt_text + content + stop_text``, tokenized without special tokens added.
    """
    turn = [*messages, {"role": "assistant", "content": content}]
    closed = render(tokenizer, turn, tools, kwargs, add_generation_prompt=False)
    seen = prompt_text + content
    if not closed.startswith(seen):
        raise TemplateMismatch(
            f"{where}: the chat template does not render the conversation with the student's turn as the text the "
            f"student saw and wrote ({_first_difference(seen, closed)}): it re-renders earlier turns or the student's "
            "text differently (e.g. strips earlier reasoning or trims), so multi-turn samples cannot be built from "
            "token deltas with this template")
    if not closed[len(seen):].startswith(stop_text):
        raise TurnNotClosed(f"{where}: the template ends the assistant turn with {closed[len(seen):][:20]!r}, not the "
                            f"student's stop token {stop_text!r}")
    full = render(tokenizer, [*turn, *followups], tools, kwargs, add_generation_prompt=True)
    if not full.startswith(closed):
        raise TemplateMismatch(
            f"{where}: the prefix property fails: the conversation rendered with the follow-up does not start with "
            f"the conversation rendered without it ({_first_difference(closed, full)}); the template re-renders "
            "earlier turns once later messages exist")
    delta = full[len(seen) + len(stop_text):]
    ids = list(tokenizer([delta], add_special_tokens=False)["input_ids"][0]) if delta else []
    return TurnDelta(ids, full, [*turn, *followups])
