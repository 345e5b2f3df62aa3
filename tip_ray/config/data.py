"""Prompt data (``DataConfig``) and ``tip-ray eval`` (``EvalConfig``) schemas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tip_ray.config.fields import identity

DATA_FORMATS = ("auto", "jsonl", "json", "parquet", "hf")
ON_OVERLONG = ("drop", "error")
NULL_ANSWERS = ("error", "ungraded")
# Arguments of ``apply_chat_template`` that tip_ray sets itself (the row's messages, text out, the
# generation prompt) or that change what it returns: never a chat-template argument of the data.
RESERVED_CHAT_TEMPLATE_KWARGS = (
    "conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message", "chat_template",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "padding", "truncation", "max_length",
    "tokenizer_kwargs",
)


@dataclass
class DataConfig:
    """Where the training or evaluation prompts come from and how they become token ids.

    ``path`` is a local ``.jsonl``/``.json``/``.parquet`` file, a local directory (written by
    ``datasets.save_to_disk`` or holding data files), or a hub dataset name (``owner/name``) the
    machine can reach. ``split`` selects a split of a ``datasets`` source; a single file is one
    split and ignores it.

    ``prompt_field`` holds either a string or a list of chat messages (``{"role", "content"}``
    dicts, as verl/DAPO parquet files store them). ``prompt_field``, ``answer_field`` and
    ``id_field`` may be dotted paths into nested records (``reward_model.ground_truth``). A row
    whose answer is null is an error (``null_answer=error``) or a prompt that is not graded
    (``ungraded``: open instructions next to checkable questions; evaluation reports accuracy
    over the graded rows).
    ``prompt_template`` formats a string prompt (``{prompt}`` is replaced) before the chat template;
    message-list prompts are used as they are. ``system_prompt`` is prepended as a system message
    and needs ``apply_chat_template``. ``chat_template_kwargs`` are passed to the chat template as
    variables (Qwen3's ``enable_thinking``, ``tools``, ...); every key must be a variable the
    tokenizer's template reads (checked when the prompts are loaded). ``limit`` keeps the first N rows of the source (before
    filtering and before any shuffling), for quick runs. ``shuffle``/``seed`` drive the order in
    which a ``PromptStream`` visits the prompts.

    Conversations (``docs/multiturn.md``): a message list may hold earlier assistant turns with
    ``tool_calls`` (content null or empty) and ``tool`` results (``tool_call_id``/``name``);
    ``tools_field`` names a per-row list of tool schemas passed to the chat template as ``tools``.
    ``followups_field`` names a per-row list of follow-ups, each a list of ``user``/``tool``
    messages appended after the student's next turn (training data only: ``rollout.max_turns``
    student turns per sample at most). Both need ``apply_chat_template``.
    """

    path: str = identity()
    split: str = identity("train")
    format: str = identity("auto")
    prompt_field: str = identity("prompt")
    answer_field: str | None = identity("answer")
    null_answer: str = identity("error")
    id_field: str | None = None
    system_prompt: str | None = identity(None)
    prompt_template: str = identity("{prompt}")
    apply_chat_template: bool = identity(True)
    chat_template_kwargs: dict[str, Any] = identity(default_factory=dict)
    max_prompt_tokens: int = identity(1024)
    on_overlong: str = identity("drop")
    shuffle: bool = identity(True)
    seed: int = identity(0)
    limit: int | None = identity(None)
    tools_field: str | None = identity(None)
    followups_field: str | None = identity(None)

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("data.path must name a file, a directory or a hub dataset; got an empty string")
        if self.format not in DATA_FORMATS:
            raise ValueError(f"data.format must be one of {DATA_FORMATS}, got {self.format!r}")
        if self.on_overlong not in ON_OVERLONG:
            raise ValueError(f"data.on_overlong must be one of {ON_OVERLONG}, got {self.on_overlong!r}")
        if self.null_answer not in NULL_ANSWERS:
            raise ValueError(f"data.null_answer must be one of {NULL_ANSWERS}, got {self.null_answer!r}")
        if not self.prompt_field:
            raise ValueError("data.prompt_field must be a non-empty field name or dotted path")
        for name in ("answer_field", "id_field", "tools_field", "followups_field"):
            if getattr(self, name) == "":
                raise ValueError(f"data.{name} must be a field name, a dotted path, or null; got an empty string")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"data.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data.limit must be >= 1 or null (no limit), got {self.limit}")
        if self.seed < 0:
            raise ValueError(f"data.seed must be >= 0, got {self.seed}")
        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"data.prompt_template must contain '{{prompt}}', got {self.prompt_template!r}")
        if self.system_prompt is not None and not self.apply_chat_template:
            raise ValueError(
                "data.system_prompt needs data.apply_chat_template=true (a system message only exists in a chat "
                "template); set data.system_prompt=null or enable the chat template"
            )
        for name in ("tools_field", "followups_field"):
            if getattr(self, name) is not None and not self.apply_chat_template:
                raise ValueError(f"data.{name} needs data.apply_chat_template=true (tools and follow-up messages are "
                                 f"rendered by the chat template); set data.{name}=null or enable the chat template")
        self._check_chat_template_kwargs()

    def _check_chat_template_kwargs(self) -> None:
        kwargs = self.chat_template_kwargs
        if not isinstance(kwargs, dict):
            raise ValueError(f"data.chat_template_kwargs must be a mapping of variable names to values, got a "
                             f"{type(kwargs).__name__}")
        if kwargs and not self.apply_chat_template:
            raise ValueError(f"data.chat_template_kwargs {sorted(map(str, kwargs))} need data.apply_chat_template=true "
                             "(they are arguments of the chat template); set data.chat_template_kwargs={} or enable "
                             "the chat template")
        for key in kwargs:
            if not isinstance(key, str) or not key.isidentifier():
                raise ValueError(f"data.chat_template_kwargs: key {key!r} is not a template variable name "
                                 "(a string such as enable_thinking)")
            if key in RESERVED_CHAT_TEMPLATE_KWARGS:
                raise ValueError(f"data.chat_template_kwargs: {key!r} is set by tip_ray itself (it renders each row's "
                                 "messages to text with the generation prompt); it cannot be a chat-template argument "
                                 f"(reserved: {', '.join(RESERVED_CHAT_TEMPLATE_KWARGS)})")


@dataclass
class EvalConfig:
    """``tip-ray eval``: score a checkpoint on a held-out prompt set.

    ``model`` is a local Hugging Face checkpoint directory (or a hub name the machine can
    reach); ``tokenizer`` defaults to the model's. ``greedy`` runs one greedy sample per
    prompt; ``sampled_n`` > 0 adds ``sampled_n`` samples per prompt at ``temperature``/``top_p``
    (mean@n and pass@n). Per-sample results and the summary go to ``output_dir``.
    """

    model: str
    data: DataConfig
    tokenizer: str | None = None
    grader: str = "exact"
    greedy: bool = True
    sampled_n: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 64
    seed: int = 0
    output_dir: str = "runs/eval"

    def __post_init__(self) -> None:
        from tip_ray.data.grading import GRADERS

        if not self.model:
            raise ValueError("eval.model must name a checkpoint directory; got an empty string")
        if self.grader not in GRADERS:
            raise ValueError(f"eval.grader must be one of {sorted(GRADERS)}, got {self.grader!r}")
        if not self.greedy and self.sampled_n == 0:
            raise ValueError("eval has nothing to do: set eval.greedy=true or eval.sampled_n > 0")
        if self.sampled_n < 0:
            raise ValueError(f"eval.sampled_n must be >= 0, got {self.sampled_n}")
        if self.temperature <= 0:
            raise ValueError(f"eval.temperature must be > 0 for sampled evaluation (greedy is eval.greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"eval.top_p must be in (0, 1], got {self.top_p}")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
