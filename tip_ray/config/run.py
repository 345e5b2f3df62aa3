"""A training run: placement on the cluster, the trainer's loop, checkpoints, logging, faults, the
weight sync, and ``TrainConfig`` composing every component; their registration with Hydra."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tip_ray.config.data import DataConfig, EvalConfig
from tip_ray.config.engines import RolloutConfig, TeacherConfig
from tip_ray.config.fields import identity, raise_first_failure
from tip_ray.config.learning import LearnerConfig, LossConfig, SelectionConfig
from tip_ray.config.routing import RoutingConfig, check_teachers, teacher_placement, typed_entries

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
        raise_first_failure(checks)

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
    and placement strategy; ``teachers.<name>`` places the pool of extra teacher ``<name>``
    (keys it leaves out are ``teacher``'s; no entry: as ``teacher``); ``placement_timeout_s``
    bounds the wait for a pool to be placed.
    ``object_store_memory`` (bytes) sizes a local instance's object store; null leaves it to Ray
    (30% of the machine's memory, capped by the size of /dev/shm: a machine detail).
    ``keep_heap`` starts every actor with glibc malloc set to keep its heap (no ``mmap`` for large
    blocks, no trimming, one arena for every thread: ``tip_ray.runtime.heap.MALLOC_ENV``), and sets
    the driver's own so (``mallopt``): a step's large CPU tensors reuse memory instead of being
    page-faulted in again each step (faster), at the price of a resident set that holds the largest
    step's memory, fragmented (a higher CPU peak). Any of these variables set in the driver's
    environment is left as it is, there and in the actors.
    """

    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    object_store_memory: int | None = None
    dashboard: bool = False
    dashboard_host: str = "127.0.0.1"
    placement_timeout_s: float = 300.0
    keep_heap: bool = True
    rollout: PoolPlacement = field(default_factory=PoolPlacement)
    teacher: PoolPlacement = field(default_factory=PoolPlacement)
    learner: PoolPlacement = field(default_factory=PoolPlacement)
    teachers: dict[str, Any] = field(default_factory=dict)  # name -> PoolPlacement of an extra teacher

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
        raise_first_failure(checks)
        for pool in ("rollout", "teacher", "learner"):
            getattr(self, pool).check(pool)
        self.teachers = typed_entries(self.teachers, self.teacher, "cluster.teachers", "cluster.teacher")
        for name, placement in self.teachers.items():
            placement.check(f"teachers.{name}")


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
        raise_first_failure(checks)


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
        raise_first_failure(checks)


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
        raise_first_failure(checks)


def with_student_vocab(cfg: TrainConfig, student_vocab: int) -> TrainConfig:
    """``cfg`` with ``teacher.student_vocab_size`` set to ``student_vocab``, the student's vocabulary
    rows (its config's ``vocab_size``, read by the caller), so that the teacher scores over the
    student's ids only. ``ValueError`` when the setting already holds another number (it must
    describe this student)."""
    from dataclasses import replace

    for key, teacher in (("teacher", cfg.teacher), *((f"teachers.{n}", t) for n, t in cfg.teachers.items())):
        given = teacher.student_vocab_size
        if given is not None and given != student_vocab:
            raise ValueError(f"{key}.student_vocab_size = {given}, but the student ({cfg.student}) has {student_vocab} "
                             "vocabulary rows; leave it null (tip-ray train sets it from the student)")
    return replace(cfg, teacher=replace(cfg.teacher, student_vocab_size=student_vocab),
                   teachers={n: replace(t, student_vocab_size=student_vocab) for n, t in cfg.teachers.items()})


@dataclass
class TrainConfig:
    """``tip-ray train``: every component's config, validated together before anything starts.

    ``teachers``: named extra teachers (``name -> TeacherConfig`` fields; keys left out are
    ``teacher``'s) and ``routing``: which prompt goes to which teacher (``tip_ray.config.routing``).
    """

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
    teachers: dict[str, Any] = identity(default_factory=dict)  # name -> TeacherConfig of an extra teacher
    routing: RoutingConfig = identity(default_factory=RoutingConfig)

    def __post_init__(self) -> None:
        from tip_ray.data.grading import GRADERS

        self.teachers = typed_entries(self.teachers, self.teacher, "teachers", "teacher", required=("model",))
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
        self.loss.reward.check_run(self.data.answer_field, self.rollout.n)
        if self.sync.transport == "collective" and self.rollout.engine != "vllm":
            raise ValueError(f"sync.transport=collective needs rollout.engine=vllm (every vLLM worker joins the "
                             f"weight group); with rollout.engine={self.rollout.engine} set sync.transport=object_store")
        if self.rollout.max_turns > 1 and self.data.followups_field is None:
            raise ValueError(f"rollout.max_turns={self.rollout.max_turns} needs data.followups_field: the follow-up "
                             "messages replayed between the student's turns (tip_ray does not run an agent loop)")
        if self.rollout.max_turns == 1 and self.data.followups_field is not None:
            raise ValueError(f"data.followups_field={self.data.followups_field!r} is never read with rollout.max_turns=1 "
                             "(one student turn per sample); set rollout.max_turns to the turns a sample may take")
        self._check_gpu_layout()
        check_teachers(self)

    @property
    def sync_uses_nccl(self) -> bool:
        """Whether the weight sync runs over NCCL: the collective transport with ``sync.backend``
        nccl, or auto with a learner on GPU (``tip_ray.sync.process_group.resolve_backend``)."""
        on_gpu = self.cluster.learner.gpus > 0
        return self.sync.transport == "collective" and (
            self.sync.backend == "nccl" or (self.sync.backend == "auto" and on_gpu))

    def _check_vllm_gpus(self) -> None:
        """Refuse a vLLM engine on GPU given other than its ``tensor_parallel_size`` GPUs: vLLM
        starts one worker per tensor-parallel rank on the visible devices 0 .. tp - 1, so with
        fewer GPUs from Ray it fails inside the actor on a device it cannot open, and more sit
        idle. A fraction of a GPU is allowed at tensor-parallel size 1 (engines sharing a device)."""
        pools = [("rollout", self.rollout.engine, self.rollout.tensor_parallel_size, self.cluster.rollout, "rollout"),
                 ("teacher", self.teacher.backend, self.teacher.tensor_parallel_size, self.cluster.teacher, "teacher")]
        pools += [(f"teachers.{name}", t.backend, t.tensor_parallel_size, teacher_placement(self, name),
                   f"teachers.{name}" if name in self.cluster.teachers else "teacher")
                  for name, t in self.teachers.items()]
        for key, engine, tp, placement, cluster_key in pools:
            shares_a_gpu = tp == 1 and placement.gpus < 1
            if engine == "vllm" and placement.gpus > 0 and placement.gpus != tp and not shares_a_gpu:
                fix = (f"set cluster.{key}.gpus to {tp}" if cluster_key == key else
                       f"give it cluster.{key} with gpus {tp} (it takes cluster.{cluster_key}'s placement now)")
                raise ValueError(f"cluster.{cluster_key}.gpus = {placement.gpus} but {key}.tensor_parallel_size = "
                                 f"{tp}: a vLLM engine runs one worker per tensor-parallel rank, each on a GPU of its "
                                 f"own; {fix}")

    def _check_gpu_layout(self) -> None:
        """Refuse layouts NCCL cannot run: two ranks of one group on one GPU (Ray places actors with
        fractional GPUs on a shared device), or an NCCL weight sync with a member off the GPU."""
        learner, rollout = self.cluster.learner, self.cluster.rollout
        self._check_vllm_gpus()
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


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (``base_eval``; ``data/base_data``)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="base_eval", node=EvalConfig)
    store.store(group="data", name="base_data", node=DataConfig)
    store.store(name="base_train", node=TrainConfig)
