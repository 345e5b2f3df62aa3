"""vLLM engine arguments: the CPU KV cache is sized from the run, never from the machine."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tip_ray.cli import compose
from tip_ray.config import RolloutConfig, TeacherConfig
from tip_ray.rollout import vllm_args
from tip_ray.rollout.vllm_args import (
    KV_BLOCK_TOKENS,
    GiB,
    engine_kwargs,
    engine_sequences,
    kv_bytes_per_token,
    plan_kv_cache,
    weight_bytes,
    with_engine_sizes,
)


@pytest.fixture(scope="module")
def embedded_pair(tmp_path_factory) -> dict[str, str]:
    """Checkpoints of the embedded default's shapes (fp32, vocabulary 128), built in-process."""
    from tip_ray.data.tokenizer import build_char_tokenizer
    from tip_ray.embedded.models import STUDENT_SHAPE, TEACHER_SHAPE, build_model

    root = tmp_path_factory.mktemp("embedded")
    tokenizer = build_char_tokenizer()
    paths = {}
    for name, shape in (("student", STUDENT_SHAPE), ("teacher", TEACHER_SHAPE)):
        build_model(shape, tokenizer, seed=0).save_pretrained(str(root / name))
        tokenizer.save_pretrained(str(root / name))
        paths[name] = str(root / name)
    return paths


def _node(available_gib: float, total_gib: float):
    return lambda: (0, int(available_gib * GiB), int(total_gib * GiB))


def test_bytes_per_token_follow_the_model_shape(embedded_pair):
    from tip_ray.embedded.models import STUDENT_SHAPE as s

    expected = s.num_hidden_layers * 2 * s.num_key_value_heads * s.head_dim
    assert kv_bytes_per_token(embedded_pair["student"], "float32") == expected * 4
    assert kv_bytes_per_token(embedded_pair["student"], "bfloat16") == expected * 2
    assert kv_bytes_per_token(embedded_pair["student"], "auto") == expected * 4  # the checkpoint is fp32


def test_weight_bytes_count_the_parameters_in_the_engine_dtype(embedded_pair):
    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(embedded_pair["student"]).parameters())
    assert weight_bytes(embedded_pair["student"], "float32") == 4 * params
    assert weight_bytes(embedded_pair["student"], "bfloat16") == 2 * params


def test_the_plan_holds_every_sequence_at_full_length(embedded_pair):
    plan = plan_kv_cache(embedded_pair["student"], "float32", max_model_len=200, sequences=32)
    assert plan.tokens_per_sequence == 2 * KV_BLOCK_TOKENS  # 200 tokens take two whole blocks
    assert plan.bytes >= plan.bytes_per_token * 200 * 32
    assert plan.bytes <= plan.bytes_per_token * plan.tokens_per_sequence * 32 * 1.2


def test_embedded_default_engine_arguments_do_not_depend_on_the_machine(embedded_pair, monkeypatch):
    cfg = with_engine_sizes(compose("train", [f"student={embedded_pair['student']}",
                                              f"teacher.model={embedded_pair['teacher']}", "teacher.backend=vllm"]))
    seen = []
    for available, total in ((0.9, 3.7), (5.9, 10.2), (180.0, 500.0)):  # nodes seen on machines of one kind, and a big one
        monkeypatch.setattr(vllm_args, "node_memory", _node(available, total))
        seen.append((engine_kwargs(cfg.rollout, cfg.student, "rollout", on_cpu=True),
                     engine_kwargs(cfg.teacher, cfg.teacher.model, "teacher", on_cpu=True)))
    assert seen[0] == seen[1] == seen[2]
    rollout, teacher = seen[0]
    assert rollout["max_num_seqs"] == 32 and teacher["max_num_seqs"] == 32  # 32 prompts x n=1, one actor each
    assert 0 < rollout["kv_cache_memory_bytes"] < 64 * 2**20  # a few MiB for the embedded student
    assert "distributed_executor_backend" not in rollout


def test_a_node_too_small_for_the_run_is_refused_with_the_figures_and_the_keys(embedded_pair, monkeypatch):
    monkeypatch.setattr(vllm_args, "node_memory", _node(0.001, 3.7))
    cfg = RolloutConfig(max_model_len=2048, max_num_seqs=64, dtype="float32")
    with pytest.raises(ValueError) as error:
        engine_kwargs(cfg, embedded_pair["teacher"], "rollout", on_cpu=True)
    message = str(error.value)
    for part in ("rollout engine needs", "NUMA node 0 reports 0.00 GiB available of 3.70 GiB", "64 sequences x 2048",
                 "rollout.max_num_seqs", "rollout.max_model_len", "rollout.kv_cache_memory_bytes"):
        assert part in message


def test_an_explicit_kv_cache_is_passed_as_set_and_still_checked(embedded_pair, monkeypatch):
    monkeypatch.setattr(vllm_args, "node_memory", _node(2.0, 3.7))
    cfg = TeacherConfig(model=embedded_pair["teacher"], kv_cache_memory_bytes=GiB)
    assert engine_kwargs(cfg, cfg.model, "teacher", on_cpu=True)["kv_cache_memory_bytes"] == GiB
    with pytest.raises(ValueError) as error:
        engine_kwargs(replace(cfg, kv_cache_memory_bytes=3 * GiB), cfg.model, "teacher", on_cpu=True)
    assert "(teacher.kv_cache_memory_bytes)" in str(error.value) and "Lower teacher.kv_cache_memory_bytes" in str(
        error.value) and "max_num_seqs" not in str(error.value)  # the sizes it would not read go unmentioned


def test_the_cpu_builds_own_kv_variable_is_refused_rather_than_left_to_override(embedded_pair, monkeypatch):
    monkeypatch.setattr(vllm_args, "node_memory", _node(2.0, 3.7))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    with pytest.raises(ValueError, match=r"VLLM_CPU_KVCACHE_SPACE is set.*rollout\.kv_cache_memory_bytes"):
        engine_kwargs(RolloutConfig(), embedded_pair["student"], "rollout", on_cpu=True)


def test_on_gpus_the_memory_fraction_sizes_the_cache_and_tensor_parallel_uses_processes(embedded_pair, monkeypatch):
    def no_node():
        raise AssertionError("the NUMA node is a CPU-build matter")

    monkeypatch.setattr(vllm_args, "node_memory", no_node)
    cfg = RolloutConfig(gpu_memory_utilization=0.85, tensor_parallel_size=4)
    kwargs = engine_kwargs(cfg, embedded_pair["student"], "rollout", on_cpu=False)
    assert kwargs["gpu_memory_utilization"] == 0.85 and kwargs["distributed_executor_backend"] == "mp"
    assert "kv_cache_memory_bytes" not in kwargs and "max_num_seqs" not in kwargs
    kwargs = engine_kwargs(replace(cfg, kv_cache_memory_bytes=8 * GiB, max_num_seqs=128), embedded_pair["student"],
                           "rollout", on_cpu=False)
    assert (kwargs["kv_cache_memory_bytes"], kwargs["max_num_seqs"]) == (8 * GiB, 128)


def test_engine_sizes_come_from_the_step_and_keep_what_the_user_set(embedded_pair):
    cfg = compose("train", [f"student={embedded_pair['student']}", f"teacher.model={embedded_pair['teacher']}",
                            "trainer.prompts_per_step=10", "rollout.n=3", "learner.global_batch_size=30",
                            "learner.micro_batch_size=5", "rollout.num_workers=4", "teacher.num_workers=2"])
    assert engine_sequences(cfg) == (8, 15)
    sized = with_engine_sizes(cfg)
    assert (sized.rollout.max_num_seqs, sized.teacher.max_num_seqs) == (8, 15)
    kept = with_engine_sizes(replace(cfg, rollout=replace(cfg.rollout, max_num_seqs=2)))
    assert kept.rollout.max_num_seqs == 2


def test_on_gpus_the_run_leaves_engine_concurrency_to_vllm(embedded_pair, monkeypatch):
    monkeypatch.setattr(vllm_args, "on_cpu_build", lambda: False)
    cfg = compose("train", [f"student={embedded_pair['student']}", f"teacher.model={embedded_pair['teacher']}"])
    assert with_engine_sizes(cfg) == cfg


@pytest.mark.parametrize("key, value, message", [
    ("rollout.max_num_seqs", 0, r"rollout\.max_num_seqs must be >= 1"),
    ("rollout.kv_cache_memory_bytes", 512, r"rollout\.kv_cache_memory_bytes is in bytes"),
    ("teacher.kv_cache_memory_bytes", 10, r"teacher\.kv_cache_memory_bytes is in bytes"),
    ("teacher.max_num_batched_tokens", 0, r"teacher\.max_num_batched_tokens must be >= 1"),
])
def test_bad_engine_sizes_are_refused_at_start_up(key, value, message):
    with pytest.raises(SystemExit, match=message):
        compose("train", [f"{key}={value}"])
