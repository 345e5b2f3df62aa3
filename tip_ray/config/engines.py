"""The teacher scorers (``TeacherConfig``) and the rollout engines (``RolloutConfig``)."""

from __future__ import annotations

from dataclasses import dataclass

from tip_ray.config.fields import identity, raise_first_failure

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
        raise_first_failure(checks)


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
    ``max_turns``: student turns per training sample (1: one response per prompt); above 1 the
    driver replays each row's recorded follow-ups (``data.followups_field``) between turns and
    trains on the student's own tokens only (``tip_ray.driver.multiturn``).
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
    max_turns: int = identity(1)

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
            (self.max_turns >= 1, f"rollout.max_turns must be >= 1 (student turns per sample), got {self.max_turns}"),
        )
        raise_first_failure(checks)
