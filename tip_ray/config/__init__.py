"""Typed configuration schemas, one dataclass per component.

Each class is usable as a Hydra structured config: fields are str/int/float/bool, ``X | None`` of
those, or lists/dicts of those, and every field but the mandatory ones has a default.
``__post_init__`` checks values and raises ``ValueError`` naming the field and what is allowed; it
never rewrites a setting. Fields declared with ``identity(...)`` define what a training run is: a
run resumed from its checkpoint must keep their values (``tip_ray.state.resume``). The schemas
live in one module per part (``data``: prompts and evaluation; ``learning``: selection, loss,
learner; ``engines``: teacher and rollout; ``run``: cluster, trainer, checkpoints, logging, faults,
sync and ``TrainConfig``; ``fields``: the identity metadata), all importable from here. Importing
this package imports nothing heavy.
"""

from __future__ import annotations

from tip_ray.config.data import (
    DATA_FORMATS,
    NULL_ANSWERS,
    ON_OVERLONG,
    RESERVED_CHAT_TEMPLATE_KWARGS,
    DataConfig,
    EvalConfig,
)
from tip_ray.config.engines import (
    MODEL_DTYPES,
    ROLLOUT_ENGINES,
    TEACHER_BACKENDS,
    VALUE_DTYPES,
    RolloutConfig,
    TeacherConfig,
)
from tip_ray.config.fields import (
    identity,
    is_identity,
    raise_first_failure,
)
from tip_ray.config.learning import (
    LEARNER_DTYPES,
    LR_SCHEDULES,
    OPTIMIZERS,
    SELECTION_SCOPES,
    ZERO_STAGES,
    LearnerConfig,
    LoraConfig,
    LossConfig,
    SelectionConfig,
)
from tip_ray.config.reward import RewardConfig
from tip_ray.config.routing import (
    DEFAULT_TEACHER,
    ROUTING_UNMAPPED,
    RoutingConfig,
    teacher_configs,
    teacher_placement,
)
from tip_ray.config.run import (
    ON_LEARNER_FAILURE,
    PLACEMENT_STRATEGIES,
    SYNC_BACKENDS,
    SYNC_TRANSPORTS,
    CheckpointConfig,
    ClusterConfig,
    FaultConfig,
    LoggerConfig,
    PoolPlacement,
    SyncConfig,
    TrainConfig,
    TrainerConfig,
    register_configs,
    with_student_vocab,
)

__all__ = [
    "identity",
    "is_identity",
    "raise_first_failure",
    "DATA_FORMATS",
    "ON_OVERLONG",
    "NULL_ANSWERS",
    "RESERVED_CHAT_TEMPLATE_KWARGS",
    "DataConfig",
    "EvalConfig",
    "SELECTION_SCOPES",
    "ZERO_STAGES",
    "LEARNER_DTYPES",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "SelectionConfig",
    "LossConfig",
    "LearnerConfig",
    "RewardConfig",
    "LoraConfig",
    "TEACHER_BACKENDS",
    "VALUE_DTYPES",
    "MODEL_DTYPES",
    "TeacherConfig",
    "ROLLOUT_ENGINES",
    "RolloutConfig",
    "PLACEMENT_STRATEGIES",
    "PoolPlacement",
    "ClusterConfig",
    "TrainerConfig",
    "CheckpointConfig",
    "LoggerConfig",
    "ON_LEARNER_FAILURE",
    "FaultConfig",
    "SYNC_TRANSPORTS",
    "SYNC_BACKENDS",
    "SyncConfig",
    "with_student_vocab",
    "DEFAULT_TEACHER",
    "ROUTING_UNMAPPED",
    "RoutingConfig",
    "teacher_configs",
    "teacher_placement",
    "TrainConfig",
    "register_configs",
]
