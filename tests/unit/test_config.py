"""Config schemas reject bad values with the key's name, and compose under Hydra."""

from __future__ import annotations

import pytest

from tip_ray.config import LearnerConfig, LossConfig, SelectionConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"zero_stage": 4}, "learner.zero_stage must be one of"),
        ({"zero_stage": 0, "dtype": "bf16"}, "learner.zero_stage=0 cannot train in learner.dtype=bf16"),
        ({"zero_stage": 1, "dtype": "bf16"}, "learner.zero_stage=1 cannot train in learner.dtype=bf16: .*BF16_Optimizer"),
        ({"dtype": "fp16"}, "learner.dtype must be one of"),
        ({"lr": 0}, "learner.lr must be > 0"),
        ({"global_batch_size": 6, "world_size": 2, "micro_batch_size": 2}, "must be a positive multiple"),
        ({"betas": [0.9]}, "learner.betas"),
        ({"warmup_steps": 5, "total_steps": 2}, "learner.warmup_steps"),
        ({"lr_schedule": "linear"}, "learner.lr_schedule"),
    ],
)
def test_learner_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LearnerConfig(model="m", **kwargs)


def test_learner_accumulation_steps():
    assert LearnerConfig(model="m", world_size=2, global_batch_size=16, micro_batch_size=2).grad_accumulation_steps == 4


@pytest.mark.parametrize(
    "kwargs, single",
    [
        ({}, False),
        ({"single_forward": True}, True),
        ({"single_forward": False, "zero_stage": 3}, False),
        ({"single_forward": None}, True),  # auto: one pass where the stage allows it
        ({"single_forward": None, "zero_stage": 1}, True),
        ({"single_forward": None, "zero_stage": 3}, False),  # ZeRO-3 runs two passes
    ],
)
def test_single_forward_resolution(kwargs, single):
    assert LearnerConfig(model="m", world_size=2, **kwargs).uses_single_forward is single


def test_single_forward_true_under_zero3_is_refused_not_dropped():
    with pytest.raises(ValueError, match="learner.single_forward=true cannot run under learner.zero_stage=3"):
        LearnerConfig(model="m", world_size=2, single_forward=True, zero_stage=3)


def test_trainer_seed_is_gone_and_an_override_of_it_fails():
    # Nothing read trainer.seed; a command that still sets it must fail, not run with it ignored.
    from tip_ray.cli import compose

    with pytest.raises(SystemExit, match="Could not override 'trainer.seed'"):
        compose("train", ["trainer.seed=3"])
    assert compose("train", ["data.seed=3"]).data.seed == 3


def test_teacher_student_vocab_bounds_top_k_and_is_filled_from_the_student():
    from tip_ray.config import DataConfig, TeacherConfig, TrainConfig, with_student_vocab

    with pytest.raises(ValueError, match=r"teacher.top_k \(64\) exceeds the student's vocabulary"):
        TeacherConfig(model="t", top_k=64, student_vocab_size=32)
    with pytest.raises(ValueError, match="teacher.student_vocab_size must be >= 1"):
        TeacherConfig(model="t", student_vocab_size=0)
    cfg = TrainConfig(student="s", teacher=TeacherConfig(model="t", top_k=8), data=DataConfig(path="d.jsonl"),
                      learner=LearnerConfig(model="s"))
    assert cfg.teacher.student_vocab_size is None
    filled = with_student_vocab(cfg, 151_936)
    assert filled.teacher.student_vocab_size == 151_936 and filled.teacher.top_k == 8
    assert with_student_vocab(filled, 151_936) == filled
    with pytest.raises(ValueError, match="teacher.student_vocab_size = 151936, but the student"):
        with_student_vocab(filled, 152_064)
    with pytest.raises(ValueError, match="exceeds the student's vocabulary"):
        with_student_vocab(cfg, 4)  # top_k 8 over 4 ids


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rule": "sofort"}, "unknown selection rule 'sofort'"),
        ({"ratio": 1.5}, r"selection.ratio must be in \(0, 1\]"),
        ({"scope": "node"}, "selection.scope must be one of"),
        ({"rule": "random", "direction": "bottom"}, "needs a ranked rule"),
        ({"params": {"alpha": 2.0}}, r"selection.params \['alpha'\] are not parameters of 'soft_or'"),
    ],
)
def test_selection_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SelectionConfig(**kwargs)


def test_loss_config_errors():
    with pytest.raises(ValueError, match="loss: unknown loss 'kl'"):
        LossConfig(kind="kl")
    with pytest.raises(ValueError, match="loss: normalization"):
        LossConfig(normalization="tokens")


def test_structured_configs_round_trip_through_omegaconf():
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(SelectionConfig(rule="entropy_sample", params={"alpha": 2.0}))
    assert OmegaConf.to_object(cfg) == SelectionConfig(rule="entropy_sample", params={"alpha": 2.0})
    learner = OmegaConf.to_object(OmegaConf.structured(LearnerConfig(model="m")))
    assert isinstance(learner, LearnerConfig) and learner.betas == [0.9, 0.999]


def test_trainer_staleness_bound_must_allow_the_mode():
    from tip_ray.config import TrainerConfig

    TrainerConfig(mode="overlap", max_staleness=1)
    with pytest.raises(ValueError, match="trainer.max_staleness=0 is below"):
        TrainerConfig(mode="overlap", max_staleness=0)
    with pytest.raises(ValueError, match="trainer.mode must be"):
        TrainerConfig(mode="async")
