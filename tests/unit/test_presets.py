"""The Hydra config groups and the papers' experiment presets compose and validate.

Composing reads YAML only: the presets name hub checkpoints and dataset files that do not exist
here, so a passing test also shows that composing never loads a model or a dataset.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tip_ray.cli import CONF_DIR, compose
from tip_ray.config import TrainConfig

GROUPS = ("pair", "selection", "loss", "rollout", "teacher", "learner", "cluster", "logger")
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
# The GPU layouts and the GPUs each offers (nodes x 8); local_cpu has none.
LAYOUT_GPUS = {"1node_8gpu": 8, "4node_8gpu": 32}
LAYOUTS = ("local_cpu", *LAYOUT_GPUS)
GPUS_PER_NODE = 8


def options(group: str) -> list[str]:
    """The option names of a config group (its YAML files)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def leaves(node, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value for every leaf of a plain (unresolved) YAML mapping."""
    out: dict[str, object] = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(leaves(value, f"{path}."))
        else:
            out[path] = value
    return out


def group_file_values(group: str, option: str) -> dict[str, object]:
    """The keys an option file sets, as full dotted paths in the train config (its package applied)."""
    path = CONF_DIR / group / f"{option}.yaml"
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    raw.pop("defaults", None)
    is_global = path.read_text().startswith("# @package _global_")
    return leaves(raw, "" if is_global else f"{group}.")


def as_container(cfg: TrainConfig) -> OmegaConf:
    """The composed, validated config as an OmegaConf node (to look keys up by dotted path)."""
    return OmegaConf.structured(cfg)


# ---------------------------------------------------------------------------------------------
# The embedded default.


def test_no_overrides_is_the_embedded_default():
    cfg = compose("train", [])
    assert isinstance(cfg, TrainConfig)
    assert (cfg.student, cfg.teacher.model) == ("runs/embedded/student", "runs/embedded/teacher")
    assert (cfg.teacher.backend, cfg.teacher.top_k, cfg.teacher.micro_batch_size, cfg.teacher.num_workers) == \
        ("hf", None, 32, 1)
    assert cfg.grader == "exact"
    assert cfg.data.path == "runs/embedded/data/train.jsonl" and cfg.data.shuffle and cfg.data.max_prompt_tokens == 64
    assert cfg.eval_data.path == "runs/embedded/data/test.jsonl" and cfg.eval_data.limit == 200
    r = cfg.rollout
    assert (r.engine, r.num_workers, r.n, r.temperature, r.max_new_tokens, r.max_model_len, r.dtype, r.max_num_seqs,
            r.kv_cache_memory_bytes) == ("vllm", 1, 1, 1.0, 96, 256, "float32", None, None)
    ln = cfg.learner
    assert (ln.model, ln.world_size, ln.zero_stage, ln.dtype, ln.lr, ln.lr_schedule, ln.global_batch_size,
            ln.micro_batch_size, ln.chunk_rows, ln.uses_single_forward) == \
        ("runs/embedded/student", 2, 2, "fp32", 3.0e-4, "constant", 32, 8, 512, True)
    s = cfg.selection
    assert (s.rule, s.ratio, s.direction, s.scope, s.params, s.rock_file) == ("soft_or", 0.5, "top", "global", {}, None)
    assert (cfg.loss.kind, cfg.loss.normalization) == ("rkl", "kept")
    c = cfg.cluster
    assert (c.address, c.num_cpus, c.num_gpus) == (None, 6, None)
    for pool, cpus in ((c.rollout, 2.0), (c.teacher, 2.0), (c.learner, 1.0)):
        assert (pool.cpus, pool.gpus, pool.resources, pool.strategy) == (cpus, 0.0, {}, "PACK")
    t = cfg.trainer
    assert (t.steps, t.prompts_per_step, t.sync_every, t.eval_every, t.eval_max_new_tokens, t.output_dir, t.mode) == \
        (100, 32, 1, 25, 96, "runs/train", "sync")
    assert (cfg.logger.wandb, cfg.logger.mode) == (True, "auto")


def test_naming_the_default_options_changes_nothing():
    defaults = ["pair=embedded", "selection=soft_or", "loss=rkl", "rollout=vllm", "teacher=hf", "learner=zero2",
                "cluster=local_cpu", "logger=wandb", "data=embedded_train", "data@eval_data=embedded_test"]
    assert compose("train", defaults) == compose("train", [])


# ---------------------------------------------------------------------------------------------
# Every option of every group.


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_sets_its_keys(group, option):
    # 16 learner ranks (cluster=4node_8gpu) need a batch of the embedded default that divides by 16.
    extra = ["learner.micro_batch_size=1"] if group == "cluster" else []
    cfg = as_container(compose("train", [f"{group}={option}", *extra]))
    values = group_file_values(group, option)
    assert values, f"{group}/{option}.yaml sets nothing"
    for key, value in values.items():
        if isinstance(value, str) and "${" in value:
            value = OmegaConf.select(cfg, value.strip("${}"))  # a plain interpolation of another key
        got = OmegaConf.select(cfg, key)
        assert got == value, f"{group}={option}: {key} is {got!r}, the file sets {value!r}"


@pytest.mark.parametrize("option", options("data"))
@pytest.mark.parametrize("target", ["data", "eval_data"])
def test_every_prompt_set_composes_as_train_or_eval_data(option, target):
    # The training set's group keeps its default package (`data=...`); the eval set is `data@eval_data=...`.
    cfg = compose("train", [f"data={option}" if target == "data" else f"data@eval_data={option}"])
    assert getattr(cfg, target).path == OmegaConf.load(CONF_DIR / "data" / f"{option}.yaml").path


@pytest.mark.parametrize("option", options("selection"))
def test_selection_files_carry_the_paper_ratio_of_their_rule(option):
    from tip_ray.tip.select import get_rule

    s = compose("train", [f"selection={option}"]).selection
    rule = get_rule(s.rule)
    expected = 1.0 if s.rule == "all" else rule.default_ratio
    assert s.ratio == expected, (option, s.ratio, expected)


def test_a_group_choice_and_a_key_of_the_same_name_both_apply():
    cfg = compose("train", ["selection=entropy_topk", "selection.ratio=0.3", "learner=zero3", "learner.lr=1e-4",
                            "rollout=hf", "rollout.n=2", "trainer.prompts_per_step=16"])
    assert (cfg.selection.rule, cfg.selection.ratio) == ("entropy_topk", 0.3)
    assert (cfg.learner.zero_stage, cfg.learner.lr) == (3, 1e-4)
    assert (cfg.rollout.engine, cfg.rollout.n) == ("hf", 2)


@pytest.mark.parametrize("pair", ["embedded", "smollm2"])
def test_the_pairs_single_forward_is_auto_and_follows_the_zero_stage(pair):
    # The pairs ask for one backbone pass where it is allowed; with learner=zero3 the same preset
    # runs two passes instead of failing (true under ZeRO-3 is an error, not a silent drop).
    base = compose("train", [f"pair={pair}"]).learner
    zero3 = compose("train", [f"pair={pair}", "learner=zero3"]).learner
    assert (base.single_forward, base.uses_single_forward) == (None, True)
    assert (zero3.zero_stage, zero3.single_forward, zero3.uses_single_forward) == (3, None, False)
    with pytest.raises(SystemExit, match="learner.single_forward=true cannot run under learner.zero_stage=3"):
        compose("train", [f"pair={pair}", "learner=zero3", "learner.single_forward=true"])


def test_a_dict_knob_is_added_with_a_plus():
    cfg = compose("train", ["+cluster.learner.resources.learner_node=1"])
    assert cfg.cluster.learner.resources == {"learner_node": 1.0}


def test_a_bad_group_option_is_a_config_error():
    with pytest.raises(SystemExit, match="bad configuration.*soft_orr"):
        compose("train", ["selection=soft_orr"])


# ---------------------------------------------------------------------------------------------
# The papers' presets.


def test_the_presets_are_there():
    assert {"qwen3_8b_to_4b_math", "llama3_70b_to_8b_math", "qwen2_5_14b_to_1_5b_math",
            "qwen3_8b_to_4b_long_horizon"} <= set(EXPERIMENTS)


def _pools(cfg: TrainConfig):
    from tip_ray.runtime.placement import PoolResources

    c = cfg.cluster
    return [PoolResources.of("rollout", cfg.rollout.num_workers, c.rollout),
            PoolResources.of("teacher", cfg.teacher.num_workers, c.teacher),
            PoolResources.of("learner", cfg.learner.world_size, c.learner)]


@pytest.mark.parametrize("layout", [None, *LAYOUTS])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_preset_composes_on_every_layout(experiment, layout):
    from tip_ray.runtime.placement import check_fits

    cfg = compose("train", [f"experiment={experiment}", *([f"cluster={layout}"] if layout else [])])
    assert isinstance(cfg, TrainConfig)
    # The hyper-parameters the papers share.
    assert (cfg.selection.rule, cfg.selection.ratio, cfg.loss.kind) == ("soft_or", 0.5, "rkl")
    assert (cfg.learner.optimizer, cfg.learner.lr_schedule, cfg.learner.dtype) == ("adamw", "cosine", "bf16")
    assert cfg.learner.lr == (3e-7 if cfg.student.startswith("meta-llama/") else 1e-6)
    assert cfg.learner.total_steps == cfg.trainer.steps
    assert cfg.rollout.temperature == 1.0 and cfg.rollout.max_new_tokens >= 8192
    assert cfg.teacher.top_k == 32 and "/" in cfg.student and "/" in cfg.teacher.model
    # Batches: one step's sequences split evenly over the ranks and micro-batches.
    assert cfg.trainer.prompts_per_step * cfg.rollout.n == cfg.learner.global_batch_size
    assert cfg.learner.global_batch_size % (cfg.learner.world_size * cfg.learner.micro_batch_size) == 0
    # Lengths: the longest prompt plus the longest response fit both engines.
    assert cfg.rollout.max_model_len >= cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    assert cfg.teacher.max_model_len >= cfg.rollout.max_model_len + 1
    if cfg.eval_data is not None:
        assert cfg.grader == "math" and cfg.eval_data.limit is None
    # Resources: each actor asks for as many GPUs as its tensor-parallel size, one actor's GPUs
    # fit one node, and the pools fit the layout's GPUs.
    chosen = layout or ("4node_8gpu" if "llama" in experiment else "1node_8gpu")
    if chosen in LAYOUT_GPUS:
        assert cfg.cluster.rollout.gpus == cfg.rollout.tensor_parallel_size
        assert cfg.cluster.teacher.gpus == cfg.teacher.tensor_parallel_size
        assert all(0 < p.gpus <= GPUS_PER_NODE for p in _pools(cfg))
        check_fits(_pools(cfg), {"GPU": float(LAYOUT_GPUS[chosen]), "CPU": math.inf})
        # Weights travel over NCCL, from learner rank 0 to engines on whole GPUs of their own.
        assert cfg.sync.transport == "collective" and cfg.sync_uses_nccl and cfg.rollout.engine == "vllm"
        assert cfg.cluster.learner.gpus == 1 and cfg.cluster.rollout.owns_whole_gpus
    else:
        assert all(p.gpus == 0 for p in _pools(cfg)) and cfg.cluster.num_cpus == 6
        assert cfg.sync.transport == "object_store" and not cfg.sync_uses_nccl


def test_the_70b_teacher_is_tensor_parallel_on_both_gpu_layouts():
    for layout, (teachers, rollouts, ranks) in {"4node_8gpu": (4, 8, 8), "1node_8gpu": (1, 2, 2)}.items():
        cfg = compose("train", ["experiment=llama3_70b_to_8b_math", f"cluster={layout}"])
        assert cfg.teacher.backend == "vllm" and cfg.teacher.tensor_parallel_size == 4
        assert (cfg.teacher.num_workers, cfg.rollout.num_workers, cfg.learner.world_size) == (teachers, rollouts, ranks)
        assert sum(p.gpus * p.num_actors for p in _pools(cfg)) == LAYOUT_GPUS[layout]


def test_the_command_line_beats_the_preset():
    cfg = compose("train", ["experiment=qwen3_8b_to_4b_math", "selection=entropy_topk", "learner=zero2",
                            "teacher=hf", "learner.lr=5e-7", "data.path=/datasets/dapo.parquet",
                            "data@eval_data=aime2024", "student=/ckpt/Qwen3-4B"])
    assert (cfg.selection.rule, cfg.learner.zero_stage, cfg.teacher.backend) == ("entropy_topk", 2, "hf")
    assert cfg.learner.lr == 5e-7 and cfg.data.path == "/datasets/dapo.parquet"
    assert cfg.eval_data.prompt_field == "Problem" and cfg.learner.model == "/ckpt/Qwen3-4B"


def test_the_long_horizon_preset_has_long_responses_and_small_steps():
    cfg = compose("train", ["experiment=qwen3_8b_to_4b_long_horizon"])
    assert cfg.rollout.max_new_tokens >= 16384 and cfg.rollout.max_model_len <= 32768
    assert cfg.learner.global_batch_size <= 16 and cfg.eval_data is None
    assert cfg.faults.actor_timeout_s >= 3600


def test_presets_are_documented():
    for name in EXPERIMENTS:
        text = (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_\n#"), f"{name}: needs the _global_ header and a comment"
    assert Path(CONF_DIR / "train.yaml").read_text().count("experiment: null") == 1


def test_no_group_shadows_a_key_of_tip_ray_eval():
    # A config group named like a key of the eval config would turn `tip-ray eval model=...` into a
    # group override; hence the student/teacher group is `pair`.
    from dataclasses import fields

    from tip_ray.config import EvalConfig

    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()} - {"data"}
    assert not groups & {f.name for f in fields(EvalConfig)}
    assert compose("eval", ["model=runs/embedded/teacher", "sampled_n=4"]).model == "runs/embedded/teacher"
