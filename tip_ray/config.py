"""Typed configuration schemas, one dataclass per component.

Each class is usable as a Hydra structured config: fields are str/int/float/bool, ``X | None`` of
those, or lists/dicts of those, and every field but the mandatory ones has a default.
``__post_init__`` checks values and raises ``ValueError`` naming the field and what is allowed; it
never rewrites a setting. Fields declared with ``identity(...)`` define what a training run is: a
run resumed from its checkpoint must keep their values (``tip_ray.state.resume``). Importing this module
imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, dataclass, field
from typing import Any

_RESUME = "resume"  # the field-metadata key, and its value on an identity field
_IDENTITY = "identity"


def identity(default: Any = MISSING, *, default_factory: Any = MISSING) -> Any:
    """A config field that is part of a training run's identity: a run resumed from its checkpoint
    must have the value the checkpoint was written with (``tip_ray.state.resume.IDENTITY_KEYS``).

    Used like ``field``: ``lr: float = identity(1e-6)``; without arguments for a mandatory field.
    On a field that holds a config dataclass it admits that class's identity fields, under the
    field's name (``learner`` -> ``learner.lr``, ...); a class's marks count only where every
    enclosing field is marked too (``data.seed`` is identity, ``eval_data.seed`` is not).
    """
    return field(default=default, default_factory=default_factory, metadata={_RESUME: _IDENTITY})


def is_identity(f: Field) -> bool:
    """Whether the dataclass field ``f`` was declared with ``identity``."""
    return f.metadata.get(_RESUME) == _IDENTITY


def _raise_first_failure(checks: tuple[tuple[bool, str], ...]) -> None:
    """Raise ValueError with the message of the first (condition, message) whose condition is False."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


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
        for name in ("answer_field", "id_field"):
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


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (``base_eval``; ``data/base_data``)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="base_eval", node=EvalConfig)
    store.store(group="data", name="base_data", node=DataConfig)
    store.store(name="base_train", node=TrainConfig)


SELECTION_SCOPES = ("global", "rank", "micro_batch", "sequence")
ZERO_STAGES = (1, 2, 3)
LEARNER_DTYPES = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class SelectionConfig:
    """Which tokens the learner trains on (TIP_SPEC section 4).

    ``rule``/``ratio`` (None: the rule's default)/``direction`` as in ``tip_ray.tip.select_tokens``;
    ``params`` are the rule's parameters. ``scope``: ``global`` selects over the whole step's
    batch across every learner rank (the budget B is global), ``rank`` over each rank's share,
    ``micro_batch`` over each micro-batch, ``sequence`` within each sequence. ``rock_file``
    (rule ``rock_freeze`` only): a rock set written by ``tip-ray rocks``, whose ids the learner
    loads as the rule's ``rock_ids``.
    """

    rule: str = identity("soft_or")
    ratio: float | None = identity(None)
    direction: str = identity("top")
    scope: str = identity("global")
    params: dict[str, Any] = identity(default_factory=dict)
    seed: int = identity(0)
    rock_file: str | None = identity(None)

    def __post_init__(self) -> None:
        from tip_ray.tip.select import get_rule

        rule = get_rule(self.rule)  # raises, listing the known rules
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"selection.ratio must be in (0, 1] or null (the rule's default), got {self.ratio}")
        if self.direction not in ("top", "bottom"):
            raise ValueError(f"selection.direction must be 'top' or 'bottom', got {self.direction!r}")
        if self.direction == "bottom" and rule.kind != "ranked":
            raise ValueError(f"selection.direction=bottom needs a ranked rule; {self.rule!r} is {rule.kind}")
        if self.scope not in SELECTION_SCOPES:
            raise ValueError(f"selection.scope must be one of {SELECTION_SCOPES}, got {self.scope!r}")
        unknown = sorted(set(self.params) - set(rule.defaults) - {"min_per_sequence"})
        if unknown:
            raise ValueError(f"selection.params {unknown} are not parameters of {self.rule!r}; "
                             f"allowed: {sorted(rule.defaults)}")
        if self.rock_file is not None:
            if self.rule != "rock_freeze":
                raise ValueError(f"selection.rock_file needs selection.rule=rock_freeze, got {self.rule!r}")
            if not self.rock_file:
                raise ValueError("selection.rock_file must be a path to a rock file or null; got an empty string")
            if "rock_ids" in self.params:
                raise ValueError("selection.rock_file and selection.params.rock_ids both give the rocks; set one")


@dataclass
class LossConfig:
    """The distillation objective on the kept tokens (TIP_SPEC section 5)."""

    kind: str = identity("rkl")
    beta: float = identity(0.5)
    normalization: str = identity("kept")

    def __post_init__(self) -> None:
        from tip_ray.tip.losses import check_loss_options

        try:
            check_loss_options(self.kind, self.beta, self.normalization)
        except ValueError as exc:
            raise ValueError(f"loss: {exc}") from None


@dataclass
class LearnerConfig:
    """The DeepSpeed ZeRO learner group.

    ``global_batch_size`` sequences make one optimizer step, split evenly over ``world_size``
    ranks and into micro-batches of ``micro_batch_size`` (gradient accumulation in between).

    ``single_forward``: true runs the student backbone once per micro-batch and keeps every
    micro-batch's graph until the global selection is made: one backbone forward fewer per
    micro-batch (about 18% of a small student's step), for the activations of all of a rank's
    micro-batches held at once, while the statistics are computed. False (the default) runs a
    no-gradient statistics pass first and the gradient pass after it, holding one micro-batch's
    graph at a time. ZeRO-3 cannot run one pass (its parameter partitioning gives wrong gradients
    with several graphs held at once): true with ``zero_stage=3`` is an error, and null (auto)
    runs one pass under ZeRO-1/2 and two under ZeRO-3 (``uses_single_forward``).

    ``gradient_checkpointing``: true keeps only each decoder layer's input during the forward and
    recomputes the layer in the backward (transformers' non-reentrant checkpointing): activation
    memory falls from every layer's intermediates to one layer's, for about one more backbone
    forward per gradient pass. The same gradients either way; on in the GPU experiment presets.

    ``chunk_rows`` tokens at a time go through the lm_head in both passes; the statistics pass
    also walks the vocabulary ``vocab_chunk`` ids at a time (an online log-sum-exp), so it never
    holds [chunk_rows, V] logits and the kept-token gradient pass sets the peak.
    """

    model: str
    world_size: int = identity(1)
    zero_stage: int = identity(2)
    dtype: str = identity("fp32")
    optimizer: str = identity("adamw")
    lr: float = identity(1e-6)
    weight_decay: float = identity(0.0)
    betas: list[float] = identity(default_factory=lambda: [0.9, 0.999])
    lr_schedule: str = identity("constant")
    warmup_steps: int = identity(0)
    total_steps: int = identity(1000)
    min_lr_ratio: float = identity(0.0)
    grad_clip: float = identity(1.0)
    global_batch_size: int = identity(8)
    micro_batch_size: int = identity(4)
    chunk_rows: int = 512
    vocab_chunk: int = 16384
    ta_k: int = identity(16)
    seed: int = identity(0)
    single_forward: bool | None = False
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        checks = (
            (self.zero_stage in ZERO_STAGES, f"learner.zero_stage must be one of {ZERO_STAGES}, got {self.zero_stage}"),
            (self.dtype in LEARNER_DTYPES, f"learner.dtype must be one of {LEARNER_DTYPES}, got {self.dtype!r}"),
            (self.optimizer in OPTIMIZERS, f"learner.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (self.lr_schedule in LR_SCHEDULES,
             f"learner.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"),
            (self.lr > 0, f"learner.lr must be > 0, got {self.lr}"),
            (self.world_size >= 1, f"learner.world_size must be >= 1, got {self.world_size}"),
            (self.micro_batch_size >= 1, f"learner.micro_batch_size must be >= 1, got {self.micro_batch_size}"),
            (self.global_batch_size % (self.world_size * self.micro_batch_size) == 0 and self.global_batch_size > 0,
             f"learner.global_batch_size ({self.global_batch_size}) must be a positive multiple of "
             f"learner.world_size * learner.micro_batch_size ({self.world_size} * {self.micro_batch_size})"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"learner.betas must be two numbers in [0, 1), got {self.betas}"),
            (self.grad_clip >= 0, f"learner.grad_clip must be >= 0 (0 = off), got {self.grad_clip}"),
            (0 <= self.warmup_steps <= self.total_steps,
             f"learner.warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}"),
            (0 <= self.min_lr_ratio <= 1, f"learner.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.chunk_rows >= 1, f"learner.chunk_rows must be >= 1, got {self.chunk_rows}"),
            (self.vocab_chunk >= 1, f"learner.vocab_chunk must be >= 1, got {self.vocab_chunk}"),
            (not (self.single_forward is True and self.zero_stage == 3),
             "learner.single_forward=true cannot run under learner.zero_stage=3 (ZeRO-3's parameter partitioning "
             "gives wrong gradients with several micro-batch graphs held at once); set learner.single_forward=false, "
             "or null (auto: one pass under ZeRO-1/2, two under ZeRO-3)"),
        )
        _raise_first_failure(checks)

    @property
    def grad_accumulation_steps(self) -> int:
        """Micro-batches per rank per optimizer step."""
        return self.global_batch_size // (self.world_size * self.micro_batch_size)

    @property
    def uses_single_forward(self) -> bool:
        """Whether a step runs the backbone once per micro-batch: ``single_forward``, with null
        (auto) resolved to true under ZeRO-1/2 and false under ZeRO-3."""
        if self.single_forward is None:
            return self.zero_stage != 3
        return self.single_forward


TEACHER_BACKENDS = ("hf", "vllm")
VALUE_DTYPES = ("fp32", "fp16", "bf16")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class TeacherConfig:
    """The teacher scoring pool: one forward pass per (prompt, response), top-K log-probs out.

    ``top_k`` is the number of teacher tokens sent per position (the vocabulary size, or null,
    for the exact full distribution); ``values_dtype`` is how the log-probs travel. Scoring
    always uses temperature 1, whatever the rollout temperature. ``backend`` ``hf`` runs a
    transformers forward pass (``micro_batch_size`` sequences at a time); ``vllm`` an
    in-process vLLM engine returning prompt log-probs, sized by ``max_model_len`` (longest
    sequence + 1), ``gpu_memory_utilization``, ``tensor_parallel_size`` and ``max_logprobs`` (the
    most log-probs per position it may return: ``top_k`` must not exceed it, and ``top_k`` null
    needs a vocabulary no larger). ``dtype`` is the model's compute dtype on either backend.
    The vllm backend's KV cache: on GPU a ``gpu_memory_utilization`` share of the device; on CPU
    sized from the run (``tip_ray.rollout.vllm_args``: ``max_num_seqs`` sequences, null = the
    step's sequences per teacher actor, of ``max_model_len`` tokens) unless
    ``kv_cache_memory_bytes`` is set. ``max_num_batched_tokens`` bounds the tokens scored per
    engine step: prompt log-probs materialise [tokens, vocabulary] fp32 logits outside vLLM's
    memory profile, so size it for the vocabulary on GPUs (null: vLLM's default).

    ``student_vocab_size``: the student's vocabulary rows. The teacher's top-K (and its whole
    distribution with ``top_k`` null) is taken over the ids below it only, so an id the student
    has no row for is never sent: a teacher whose embedding is padded further than the student's
    (Qwen2.5-14B's 152,064 rows against 1.5B's 151,936) gives the same signal as one that is not.
    The log-probs stay the teacher's own, normalised over its whole vocabulary: what it puts on
    rows the student lacks joins the tail bucket. The vllm backend asks for ``top_k`` plus the
    number of such rows (at most ``max_logprobs``). ``tip-ray train`` sets it from the student's
    config (``with_student_vocab``); null scores over the teacher's whole vocabulary.
    """

    model: str = identity()
    backend: str = identity("hf")
    top_k: int | None = identity(32)
    values_dtype: str = identity("fp32")
    micro_batch_size: int = 8
    num_workers: int = 1
    dtype: str = identity("auto")
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    max_logprobs: int = 256
    max_num_seqs: int | None = None
    kv_cache_memory_bytes: int | None = None
    max_num_batched_tokens: int | None = None
    student_vocab_size: int | None = None

    def __post_init__(self) -> None:
        checks = (
            (self.backend in TEACHER_BACKENDS,
             f"teacher.backend must be one of {TEACHER_BACKENDS}, got {self.backend!r}"),
            (self.top_k is None or self.top_k >= 1,
             f"teacher.top_k must be >= 1 or null (full distribution), got {self.top_k}"),
            (self.values_dtype in VALUE_DTYPES,
             f"teacher.values_dtype must be one of {VALUE_DTYPES}, got {self.values_dtype!r}"),
            (self.micro_batch_size >= 1 and self.num_workers >= 1,
             "teacher.micro_batch_size and teacher.num_workers must be >= 1"),
            (self.dtype in MODEL_DTYPES, f"teacher.dtype must be one of {MODEL_DTYPES}, got {self.dtype!r}"),
            (self.max_model_len >= 2, f"teacher.max_model_len must be >= 2, got {self.max_model_len}"),
            (0 < self.gpu_memory_utilization <= 1,
             f"teacher.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"),
            (self.tensor_parallel_size >= 1,
             f"teacher.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}"),
            (self.max_logprobs >= 1, f"teacher.max_logprobs must be >= 1, got {self.max_logprobs}"),
            *_engine_size_checks("teacher", self),
            (self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
             f"teacher.max_num_batched_tokens must be >= 1 or null, got {self.max_num_batched_tokens}"),
            (self.backend != "vllm" or self.top_k is None or self.top_k <= self.max_logprobs,
             f"teacher.top_k ({self.top_k}) exceeds teacher.max_logprobs ({self.max_logprobs}), the most "
             "log-probs per position the vllm backend returns; raise max_logprobs or lower top_k"),
            (self.student_vocab_size is None or self.student_vocab_size >= 1,
             f"teacher.student_vocab_size must be >= 1 or null, got {self.student_vocab_size}"),
            (self.student_vocab_size is None or self.top_k is None or self.top_k <= self.student_vocab_size,
             f"teacher.top_k ({self.top_k}) exceeds the student's vocabulary (teacher.student_vocab_size = "
             f"{self.student_vocab_size}), which the top-K is taken over; lower top_k or set it null (every id)"),
        )
        _raise_first_failure(checks)


def _engine_size_checks(pool: str, cfg: RolloutConfig | TeacherConfig) -> tuple[tuple[bool, str], ...]:
    """The checks of a vLLM engine's explicit sizes (``max_num_seqs``, ``kv_cache_memory_bytes``)."""
    return (
        (cfg.max_num_seqs is None or cfg.max_num_seqs >= 1,
         f"{pool}.max_num_seqs must be >= 1 or null (sized from the run), got {cfg.max_num_seqs}"),
        (cfg.kv_cache_memory_bytes is None or cfg.kv_cache_memory_bytes >= 2**20,
         f"{pool}.kv_cache_memory_bytes is in bytes and must be at least 1 MiB (1048576) or null (sized from the "
         f"run on CPU, from gpu_memory_utilization on GPU), got {cfg.kv_cache_memory_bytes}"),
    )


ROLLOUT_ENGINES = ("vllm", "hf")


@dataclass
class RolloutConfig:
    """The rollout pool: student samples for each prompt.

    ``engine`` ``vllm`` (production; the CPU build here) or ``hf`` (transformers ``generate``).
    ``n`` samples per prompt at ``temperature``/``top_p``, at most ``max_new_tokens`` each.
    ``logprobs``: also return each sampled token's log-prob under the rollout engine (for
    diagnostics; training does not read them, and vLLM pays for them at every decode step).
    The vllm engine's KV cache: on GPU a ``gpu_memory_utilization`` share of the device; on CPU
    sized from the run (``tip_ray.rollout.vllm_args``: ``max_num_seqs`` sequences, null = the
    step's sequences per rollout actor, of ``max_model_len`` tokens) unless
    ``kv_cache_memory_bytes`` is set. ``enforce_eager`` null: eager on CPU, CUDA graphs on GPU
    (in-place weight reloads keep the captured graphs valid).
    """

    engine: str = identity("vllm")
    num_workers: int = 1
    n: int = identity(1)
    temperature: float = identity(1.0)
    top_p: float = identity(1.0)
    max_new_tokens: int = identity(256)
    max_model_len: int = 2048
    dtype: str = identity("auto")
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    seed: int = identity(0)
    logprobs: bool = False
    max_num_seqs: int | None = None
    kv_cache_memory_bytes: int | None = None
    enforce_eager: bool | None = None

    def __post_init__(self) -> None:
        checks = (
            (self.engine in ROLLOUT_ENGINES, f"rollout.engine must be one of {ROLLOUT_ENGINES}, got {self.engine!r}"),
            (self.num_workers >= 1, f"rollout.num_workers must be >= 1, got {self.num_workers}"),
            (self.n >= 1, f"rollout.n must be >= 1, got {self.n}"),
            (self.temperature > 0, f"rollout.temperature must be > 0 (on-policy sampling), got {self.temperature}"),
            (0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}"),
            (self.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.max_model_len > self.max_new_tokens,
             f"rollout.max_model_len ({self.max_model_len}) must exceed rollout.max_new_tokens ({self.max_new_tokens})"),
            (self.tensor_parallel_size >= 1, f"rollout.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}"),
            (0 < self.gpu_memory_utilization <= 1,
             f"rollout.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"),
            *_engine_size_checks("rollout", self),
        )
        _raise_first_failure(checks)


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class PoolPlacement:
    """What each actor of one pool asks Ray for, and how the pool's bundles are placed.

    ``resources`` are custom Ray resources per actor (e.g. ``{"teacher_node": 1}`` to pin the
    pool to nodes started with ``--resources '{"teacher_node": 8}'``); ``strategy`` is the
    placement group strategy of the pool (one bundle per actor).
    """

    cpus: float = 1.0
    gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    strategy: str = "PACK"

    def check(self, pool: str) -> None:
        """Raise ValueError naming ``cluster.<pool>.<key>`` for a value out of range."""
        checks = (
            (self.cpus >= 0, f"cluster.{pool}.cpus must be >= 0, got {self.cpus}"),
            (self.gpus >= 0, f"cluster.{pool}.gpus must be >= 0, got {self.gpus}"),
            (self.cpus > 0 or self.gpus > 0 or bool(self.resources),
             f"cluster.{pool} asks for no resources at all (cpus, gpus and resources are all empty)"),
            (all(v > 0 for v in self.resources.values()),
             f"cluster.{pool}.resources values must be > 0, got {self.resources}"),
            (self.strategy in PLACEMENT_STRATEGIES,
             f"cluster.{pool}.strategy must be one of {PLACEMENT_STRATEGIES}, got {self.strategy!r}"),
            (pool != "learner" or self.gpus <= 1,
             f"cluster.learner.gpus must be at most 1, got {self.gpus}: each learner rank drives one GPU "
             "(add ranks with learner.world_size instead)"),
        )
        _raise_first_failure(checks)

    @property
    def owns_whole_gpus(self) -> bool:
        """Whether each actor gets whole GPUs of its own (``gpus`` a positive whole number): with a
        fraction, Ray may put two actors on one GPU, which NCCL refuses within one group."""
        return self.gpus >= 1 and float(self.gpus).is_integer()


@dataclass
class ClusterConfig:
    """Where the pools run and what each actor asks for.

    ``address`` null starts a local Ray instance with ``num_cpus``/``num_gpus`` (null: all the
    machine has); ``auto`` or ``ray://host:port`` joins a running cluster. ``dashboard`` starts
    Ray's dashboard on ``dashboard_host`` (localhost unless configured otherwise) for a local
    instance. Each pool (``rollout``, ``teacher``, ``learner``) has its own per-actor resources
    and placement strategy; ``placement_timeout_s`` bounds the wait for a pool to be placed.
    ``object_store_memory`` (bytes) sizes a local instance's object store; null leaves it to Ray
    (30% of the machine's memory, capped by the size of /dev/shm: a machine detail).
    """

    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    object_store_memory: int | None = None
    dashboard: bool = False
    dashboard_host: str = "127.0.0.1"
    placement_timeout_s: float = 300.0
    rollout: PoolPlacement = field(default_factory=PoolPlacement)
    teacher: PoolPlacement = field(default_factory=PoolPlacement)
    learner: PoolPlacement = field(default_factory=PoolPlacement)

    def __post_init__(self) -> None:
        checks = (
            (self.num_cpus is None or self.num_cpus >= 1, f"cluster.num_cpus must be >= 1 or null, got {self.num_cpus}"),
            (self.num_gpus is None or self.num_gpus >= 0, f"cluster.num_gpus must be >= 0 or null, got {self.num_gpus}"),
            (self.placement_timeout_s > 0,
             f"cluster.placement_timeout_s must be > 0, got {self.placement_timeout_s}"),
            (self.address is None or (self.num_cpus is None and self.num_gpus is None),
             "cluster.num_cpus/num_gpus size a local Ray instance; with cluster.address set the cluster's own "
             "resources apply: leave them null"),
            (self.object_store_memory is None or self.object_store_memory >= 100 * 2**20,
             f"cluster.object_store_memory is in bytes and must be at least 100 MiB (104857600) or null, got "
             f"{self.object_store_memory}"),
            (self.address is None or self.object_store_memory is None,
             "cluster.object_store_memory sizes a local Ray instance; a running cluster's nodes set their own "
             "(ray start --object-store-memory): leave it null with cluster.address"),
        )
        _raise_first_failure(checks)
        for pool in ("rollout", "teacher", "learner"):
            getattr(self, pool).check(pool)


@dataclass
class TrainerConfig:
    """The loop: how many steps, how many prompts per step, when to sync and evaluate.

    Evaluation (greedy, on ``eval_data``) runs before training, every ``eval_every`` steps and at
    the end; ``eval_teacher`` also scores the teacher once at the start, for reference. It reports
    the accuracy over the prompts that have an answer and, with ``eval_divergence``, the student's
    per-token reverse KL to the teacher on its own greedy samples and its greedy agreement with the
    teacher's argmax (one more teacher call and one learner statistics pass per evaluation).

    The loop itself draws nothing at random: the seeds are the components' (``data.seed``: prompt
    order; ``rollout.seed``: sampling; ``selection.seed``: sampled rules; ``learner.seed``:
    initialisation).
    """

    steps: int = 100
    prompts_per_step: int = identity(8)
    sync_every: int = identity(1)
    eval_every: int = 0
    eval_max_new_tokens: int = 256
    eval_teacher: bool = True
    eval_divergence: bool = True
    output_dir: str = "runs/train"
    mode: str = identity("sync")
    max_staleness: int = 1

    def __post_init__(self) -> None:
        if self.mode not in ("sync", "overlap"):
            raise ValueError(f"trainer.mode must be 'sync' or 'overlap', got {self.mode!r}")
        needed = self.sync_every - 1 + (1 if self.mode == "overlap" else 0)
        if self.max_staleness < needed:
            raise ValueError(f"trainer.max_staleness={self.max_staleness} is below the staleness that "
                             f"trainer.mode={self.mode} with sync_every={self.sync_every} produces ({needed})")
        for name in ("steps", "prompts_per_step", "sync_every", "eval_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"trainer.eval_every must be >= 0 (0 = only before and after), got {self.eval_every}")
        if self.eval_divergence and self.eval_every % self.sync_every:
            raise ValueError(f"trainer.eval_every={self.eval_every} must be a multiple of trainer.sync_every="
                             f"{self.sync_every} with trainer.eval_divergence=true: the student's samples come from "
                             "the served weights and its log-probs from the learner's, which differ between syncs; "
                             "change eval_every or set trainer.eval_divergence=false")


@dataclass
class CheckpointConfig:
    """Checkpoints of a training run, and resuming from them.

    Every ``every`` steps (0: only at the end and on a clean stop) the learner's DeepSpeed state
    (ZeRO shards, optimizer, schedule) and the driver's state (step, weight version, data cursor,
    W&B run id) are written atomically under ``<dir>/step_<N>`` (``dir`` null:
    ``<trainer.output_dir>/checkpoints``); the newest ``keep_last`` are kept. A Hugging Face
    export of the student (safetensors) goes to ``<dir>/hf/step_<N>`` every ``hf_every`` steps
    and at the end (0: only at the end). ``resume``: ``auto`` continues from the newest complete
    checkpoint of the run directory (or starts fresh if there is none), ``never`` starts fresh
    and refuses a run directory that already holds checkpoints, or a checkpoint directory path.
    """

    every: int = 0
    keep_last: int = 2
    hf_every: int = 0
    dir: str | None = None
    resume: str = "auto"

    def __post_init__(self) -> None:
        checks = (
            (self.every >= 0, f"checkpoint.every must be >= 0 (0 = only at the end), got {self.every}"),
            (self.hf_every >= 0, f"checkpoint.hf_every must be >= 0 (0 = only at the end), got {self.hf_every}"),
            (self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}"),
            (bool(self.resume), "checkpoint.resume must be auto, never or a checkpoint directory; got an empty string"),
        )
        _raise_first_failure(checks)


@dataclass
class LoggerConfig:
    """Tracking: a JSONL of every step's metrics always; W&B when ``wandb`` (offline without a key)."""

    wandb: bool = True
    project: str = "tip_ray"
    run_name: str | None = None
    mode: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "offline", "online", "disabled"):
            raise ValueError(f"logger.mode must be auto, offline, online or disabled, got {self.mode!r}")


ON_LEARNER_FAILURE = ("restart", "stop")


@dataclass
class FaultConfig:
    """How the run survives failing actors.

    Rollout and teacher actors are restarted by Ray up to ``max_actor_restarts`` times each; a
    call that fails (the actor died) or does not answer within ``actor_timeout_s`` seconds (the
    actor is then killed and restarted) is retried by the driver, at most ``max_step_retries``
    times per pool call of a step, before the run stops. ``restart_timeout_s`` bounds the wait for
    an actor to be up (built at the start, or restarted), model loading included; a restarted
    actor that is not back in time is retired and its work moves to the other actors.
    ``on_learner_failure``: ``restart`` the learner group from the last checkpoint (at most
    ``max_learner_recoveries`` times in one run: a failure that replays deterministically must
    not loop) or ``stop``. ``max_bad_steps``: consecutive steps skipped for NaN/inf in the
    teacher's log-probs or the student's statistics before the run stops (an update that leaves
    non-finite weights is rolled back to the last checkpoint, counted as a learner recovery).
    """

    max_actor_restarts: int = 3
    max_step_retries: int = 2
    actor_timeout_s: float = 600.0
    restart_timeout_s: float = 1800.0
    on_learner_failure: str = "restart"
    max_learner_recoveries: int = 3
    max_bad_steps: int = 3

    def __post_init__(self) -> None:
        checks = (
            (self.max_actor_restarts >= 0, f"faults.max_actor_restarts must be >= 0, got {self.max_actor_restarts}"),
            (self.max_step_retries >= 0, f"faults.max_step_retries must be >= 0, got {self.max_step_retries}"),
            (self.actor_timeout_s > 0, f"faults.actor_timeout_s must be > 0 seconds, got {self.actor_timeout_s}"),
            (self.restart_timeout_s > 0,
             f"faults.restart_timeout_s must be > 0 seconds, got {self.restart_timeout_s}"),
            (self.on_learner_failure in ON_LEARNER_FAILURE,
             f"faults.on_learner_failure must be one of {ON_LEARNER_FAILURE}, got {self.on_learner_failure!r}"),
            (self.max_bad_steps >= 1, f"faults.max_bad_steps must be >= 1, got {self.max_bad_steps}"),
            (self.max_learner_recoveries >= 0,
             f"faults.max_learner_recoveries must be >= 0, got {self.max_learner_recoveries}"),
        )
        _raise_first_failure(checks)


SYNC_TRANSPORTS = ("object_store", "collective")
SYNC_BACKENDS = ("auto", "nccl", "gloo")


@dataclass
class SyncConfig:
    """How weights travel from the learner to the rollout engines (``tip_ray.sync.transports``).

    ``transport`` ``object_store`` (the full weights through Ray's object store) or
    ``collective`` (bucketed broadcasts over a process group of learner rank 0 and every vLLM
    worker; needs ``rollout.engine=vllm``). ``backend`` of that group: ``nccl`` (GPU), ``gloo``
    (CPU), ``auto`` (nccl when the learner has CUDA). ``bucket_mb``: megabytes per broadcast
    (the learner's rank 0 holds two bucket buffers while sending); ``timeout_s``: how long a
    member waits for the others before its broadcast fails (with gloo and NCCL alike the failure
    raises; the group is formed again on the next sync). The object store is the default (any
    engine, CPU runs); the GPU cluster presets use the collective transport over NCCL.
    """

    transport: str = "object_store"
    backend: str = "auto"
    bucket_mb: float = 256.0
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        checks = (
            (self.transport in SYNC_TRANSPORTS,
             f"sync.transport must be one of {SYNC_TRANSPORTS}, got {self.transport!r}"),
            (self.backend in SYNC_BACKENDS, f"sync.backend must be one of {SYNC_BACKENDS}, got {self.backend!r}"),
            (self.bucket_mb > 0, f"sync.bucket_mb must be > 0, got {self.bucket_mb}"),
            (self.timeout_s > 0, f"sync.timeout_s must be > 0, got {self.timeout_s}"),
        )
        _raise_first_failure(checks)


def with_student_vocab(cfg: TrainConfig, student_vocab: int) -> TrainConfig:
    """``cfg`` with ``teacher.student_vocab_size`` set to ``student_vocab``, the student's vocabulary
    rows (its config's ``vocab_size``, read by the caller), so that the teacher scores over the
    student's ids only. ``ValueError`` when the setting already holds another number (it must
    describe this student)."""
    from dataclasses import replace

    given = cfg.teacher.student_vocab_size
    if given is not None and given != student_vocab:
        raise ValueError(f"teacher.student_vocab_size = {given}, but the student ({cfg.student}) has {student_vocab} "
                         "vocabulary rows; leave it null (tip-ray train sets it from the student)")
    return replace(cfg, teacher=replace(cfg.teacher, student_vocab_size=student_vocab))


@dataclass
class TrainConfig:
    """``tip-ray train``: every component's config, validated together before anything starts."""

    student: str = identity()
    teacher: TeacherConfig = identity()
    data: DataConfig = identity()
    eval_data: DataConfig | None = None
    grader: str = "exact"
    rollout: RolloutConfig = identity(default_factory=RolloutConfig)
    learner: LearnerConfig = identity(default_factory=lambda: LearnerConfig(model="${student}"))
    selection: SelectionConfig = identity(default_factory=SelectionConfig)
    loss: LossConfig = identity(default_factory=LossConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trainer: TrainerConfig = identity(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self) -> None:
        from tip_ray.data.grading import GRADERS

        if self.grader not in GRADERS:
            raise ValueError(f"grader must be one of {sorted(GRADERS)}, got {self.grader!r}")
        if self.learner.model != self.student:
            raise ValueError(f"learner.model ({self.learner.model}) must be the student ({self.student})")
        if self.checkpoint.every % self.trainer.sync_every:
            raise ValueError(
                f"checkpoint.every ({self.checkpoint.every}) must be a multiple of trainer.sync_every "
                f"({self.trainer.sync_every}), so that a checkpoint's weights are the ones the rollout actors serve"
            )
        samples = self.trainer.prompts_per_step * self.rollout.n
        if samples != self.learner.global_batch_size:
            raise ValueError(
                f"trainer.prompts_per_step * rollout.n = {samples} sequences per step, but "
                f"learner.global_batch_size = {self.learner.global_batch_size}; make them equal"
            )
        if self.sync.transport == "collective" and self.rollout.engine != "vllm":
            raise ValueError(f"sync.transport=collective needs rollout.engine=vllm (every vLLM worker joins the "
                             f"weight group); with rollout.engine={self.rollout.engine} set sync.transport=object_store")
        self._check_gpu_layout()

    @property
    def sync_uses_nccl(self) -> bool:
        """Whether the weight sync runs over NCCL: the collective transport with ``sync.backend``
        nccl, or auto with a learner on GPU (``tip_ray.sync.process_group.resolve_backend``)."""
        on_gpu = self.cluster.learner.gpus > 0
        return self.sync.transport == "collective" and (
            self.sync.backend == "nccl" or (self.sync.backend == "auto" and on_gpu))

    def _check_gpu_layout(self) -> None:
        """Refuse layouts NCCL cannot run: two ranks of one group on one GPU (Ray places actors with
        fractional GPUs on a shared device), or an NCCL weight sync with a member off the GPU."""
        learner, rollout = self.cluster.learner, self.cluster.rollout
        nccl_sync = self.sync_uses_nccl
        if 0 < learner.gpus < 1 and (self.learner.world_size > 1 or nccl_sync):
            group = (f"its {self.learner.world_size} ranks' NCCL group" if self.learner.world_size > 1
                     else "the NCCL weight sync (sync.transport=collective)")
            raise ValueError(f"cluster.learner.gpus = {learner.gpus} lets Ray put two members of {group} on one GPU, "
                             "which NCCL refuses: set cluster.learner.gpus to 1")
        if not nccl_sync:
            return
        if learner.gpus <= 0:
            raise ValueError("sync.backend=nccl needs the learner on GPUs: set cluster.learner.gpus to 1, or "
                             "sync.backend to gloo")
        if not rollout.owns_whole_gpus:
            raise ValueError(f"cluster.rollout.gpus = {rollout.gpus}: the NCCL weight sync (sync.transport=collective, "
                             f"sync.backend={self.sync.backend} with the learner on GPU) needs every rollout engine "
                             "on whole GPUs of its own (a fraction lets Ray put two engines, or an engine and the "
                             "learner, on one GPU, which NCCL refuses; no GPU: no NCCL). Set cluster.rollout.gpus "
                             "to rollout.tensor_parallel_size, or sync.backend=gloo / sync.transport=object_store")
