"""What the learner does: token selection (``SelectionConfig``), the loss (``LossConfig``) and the
DeepSpeed learner group (``LearnerConfig``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tip_ray.config.fields import identity, raise_first_failure
from tip_ray.config.reward import RewardConfig

SELECTION_SCOPES = ("global", "rank", "micro_batch", "sequence")
ZERO_STAGES = (0, 1, 2, 3)
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
    """The distillation objective on the kept tokens (TIP_SPEC section 5), and the task-reward
    term added to it (``reward``, off by default: ``tip_ray.config.reward``)."""

    kind: str = identity("rkl")
    beta: float = identity(0.5)
    normalization: str = identity("kept")
    reward: RewardConfig = identity(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        from tip_ray.tip.losses import check_loss_options

        try:
            check_loss_options(self.kind, self.beta, self.normalization)
        except ValueError as exc:
            raise ValueError(f"loss: {exc}") from None


LORA_ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    """LoRA adapters on the student (peft): the learner trains only the adapters, the base stays frozen.

    ``r``/``alpha`` are the adapters' rank and scale (update ``alpha / r * B @ A``); ``dropout``
    is peft's dropout on the adapters' input, refused above 0 while LoRA is on (``LearnerConfig``:
    the student runs without dropout, and two passes would draw two masks); ``target_modules`` is ``all-linear`` (every linear
    layer of the decoder, the lm_head excluded) or a list of module names (``q_proj``, or a
    dotted suffix of a module's full name), each of which must match a linear layer of the
    decoder (checked against the student at start-up). The rollout engines are served the
    merged weights ``W0 + alpha / r * B @ A`` under the base model's names; checkpoints hold the
    adapters (and their optimizer state), not the frozen base. ``export_merged``: the Hugging
    Face export writes the merged full model (loadable by ``AutoModelForCausalLM`` and vLLM, as
    without LoRA) beside the adapter in ``adapter/``; false writes the adapter only.
    """

    enabled: bool = identity(False)
    r: int = identity(16)
    alpha: float = identity(32.0)
    dropout: float = identity(0.0)
    target_modules: Any = identity(LORA_ALL_LINEAR)
    export_merged: bool = True

    def __post_init__(self) -> None:
        targets = self.target_modules
        targets_ok = targets == LORA_ALL_LINEAR or (
            isinstance(targets, (list, tuple)) and len(targets) > 0
            and all(isinstance(t, str) and t and t != LORA_ALL_LINEAR for t in targets))
        checks = (
            (isinstance(self.r, int) and self.r >= 1, f"learner.lora.r must be an integer >= 1, got {self.r!r}"),
            (self.alpha > 0, f"learner.lora.alpha must be > 0, got {self.alpha}"),
            (0 <= self.dropout < 1, f"learner.lora.dropout must be in [0, 1), got {self.dropout}"),
            (targets_ok, f"learner.lora.target_modules must be {LORA_ALL_LINEAR!r} or a non-empty list of module "
                         f"names (e.g. [q_proj, v_proj]), got {targets!r}"),
        )
        raise_first_failure(checks)

    @property
    def scale(self) -> float:
        """The factor of the adapter's product in the merged weight: ``alpha / r``."""
        return self.alpha / self.r


@dataclass
class LearnerConfig:
    """The DeepSpeed ZeRO learner group.

    ``global_batch_size`` sequences make one optimizer step, split evenly over ``world_size``
    ranks and into micro-batches of ``micro_batch_size`` (gradient accumulation in between).

    ``zero_stage``: 1, 2 and 3 shard the optimizer state, then the gradients, then the parameters
    over the ranks; 0 shards nothing (DeepSpeed's plain data parallelism: every rank holds the
    whole optimizer state and the gradients are all-reduced once a step), the cheapest step for a
    student whose optimizer state fits every rank (docs/benchmarks.md section 8); fp32 only.

    ``single_forward``: true runs the student backbone once per micro-batch and keeps every
    micro-batch's graph until the global selection is made: one backbone forward fewer per
    micro-batch (about 18% of a small student's step), for the activations of all of a rank's
    micro-batches held at once, while the statistics are computed. False (the default) runs a
    no-gradient statistics pass first and the gradient pass after it, holding one micro-batch's
    graph at a time. ZeRO-3 cannot run one pass (its parameter partitioning gives wrong gradients
    with several graphs held at once): true with ``zero_stage=3`` is an error, and null (auto)
    runs one pass under ZeRO-0/1/2 and two under ZeRO-3 (``uses_single_forward``).

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
    lora: LoraConfig = identity(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        lora = self.lora
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
            (not (self.zero_stage == 0 and self.dtype == "bf16"),
             "learner.zero_stage=0 cannot train in learner.dtype=bf16: DeepSpeed's stage 0 accumulates and "
             "all-reduces bf16 gradients in bf16, where small late contributions are lost; use learner.zero_stage=2 "
             "or 3 (the learner's DeepSpeed config has them accumulate in fp32) or learner.dtype=fp32"),
            (not (self.zero_stage == 1 and self.dtype == "bf16"),
             "learner.zero_stage=1 cannot train in learner.dtype=bf16: DeepSpeed accumulates a stage-1 bf16 "
             "student's gradients in fp32 only through its BF16_Optimizer, which divides the step's gradient by "
             "the micro-batch count although the learner's loss is already the global mean; use "
             "learner.zero_stage=2 (the same sharded optimizer state, and sharded gradients) or 3, or "
             "learner.dtype=fp32"),
            (not (self.single_forward is True and self.zero_stage == 3),
             "learner.single_forward=true cannot run under learner.zero_stage=3 (ZeRO-3's parameter partitioning "
             "gives wrong gradients with several micro-batch graphs held at once); set learner.single_forward=false, "
             "or null (auto: one pass under ZeRO-0/1/2, two under ZeRO-3)"),
            (not (lora.enabled and lora.dropout > 0),
             f"learner.lora.dropout={lora.dropout} cannot be used: the student runs in evaluation mode (no dropout "
             "at all) unless learner.gradient_checkpointing puts it in training mode, and there the statistics pass "
             "and the gradient pass draw different dropout masks (tokens selected on one forward, trained on "
             "another) and held-out evaluation is noisy; set learner.lora.dropout=0"),
        )
        raise_first_failure(checks)

    @property
    def grad_accumulation_steps(self) -> int:
        """Micro-batches per rank per optimizer step."""
        return self.global_batch_size // (self.world_size * self.micro_batch_size)

    @property
    def uses_single_forward(self) -> bool:
        """Whether a step runs the backbone once per micro-batch: ``single_forward``, with null
        (auto) resolved to true under ZeRO-0/1/2 and false under ZeRO-3."""
        if self.single_forward is None:
            return self.zero_stage != 3
        return self.single_forward
