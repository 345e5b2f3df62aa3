"""Real vLLM engines (CPU build) start on a NUMA node that reports little memory.

The CPU build reads the memory of the NUMA node its first CPU sits on. Machines of one kind
report 3.7 to 10 GiB there although they have 24 GiB; a KV cache sized as a fraction of that
figure came out negative on some of them. Here vLLM is made to see a small node (what it reads
is patched), as on those machines: the engines, whose KV cache is sized from the run, start and
work; a run that really does not fit is refused before the engine loads, naming the keys.
"""

from __future__ import annotations

import pytest
import torch
from tiny import save_tiny_model

from tip_ray.config import RolloutConfig, TeacherConfig
from tip_ray.rollout.worker import RolloutWorker
from tip_ray.teacher.worker import TeacherWorker
from tip_ray.types import SamplingSettings

pytestmark = pytest.mark.slow

GiB = 2**30


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("vllm_memory") / "model")


@pytest.fixture
def small_node(monkeypatch):
    """Every NUMA node reports 4 GiB, 2 GiB of it available (5% of it is less than the engine
    process's own resident memory, which made the old fraction-based KV budget negative)."""
    import vllm.utils.cpu_resource_utils as resources
    import vllm.v1.worker.cpu_worker as cpu_worker

    report = resources.MemoryNodeInfo(total_memory=4 * GiB, available_memory=2 * GiB)
    for module in (resources, cpu_worker):
        monkeypatch.setattr(module, "get_memory_node_info", lambda node_id=0: report)
    return report


def test_rollout_and_teacher_engines_start_and_work_on_a_small_node(small_node, checkpoint):
    rollout = RolloutWorker(RolloutConfig(engine="vllm", max_new_tokens=4, max_model_len=64, dtype="float32",
                                          max_num_seqs=4), checkpoint)
    cache = rollout.engine.llm.llm_engine.vllm_config.cache_config
    assert cache.kv_cache_memory_bytes is not None and cache.kv_cache_memory_bytes < 16 * 2**20
    batch = rollout.generate([[3, 10, 20], [3, 11]], sampling=SamplingSettings(max_new_tokens=4, temperature=0.0))
    assert len(batch.generations) == 2 and all(1 <= len(g.token_ids) <= 4 for g in batch.generations)
    del rollout

    teacher = TeacherWorker(TeacherConfig(model=checkpoint, backend="vllm", top_k=4, max_model_len=32, max_num_seqs=2))
    input_ids = torch.tensor([[3, 10, 20, 30], [3, 11, 12, 0]])
    signal = teacher.score(input_ids, (input_ids > 0).long())
    assert signal.topk_ids.shape == (2, 3, 4) and torch.isfinite(signal.topk_logprobs.float()).all()


def test_a_run_that_does_not_fit_the_node_stops_before_the_engine_loads(small_node, checkpoint):
    cfg = RolloutConfig(engine="vllm", max_new_tokens=4, max_model_len=64, kv_cache_memory_bytes=3 * GiB)
    with pytest.raises(ValueError, match=r"rollout engine needs 3\.00 GiB: a 3\.00 GiB KV cache .* NUMA node \d+ "
                                         r"reports 2\.00 GiB available of 4\.00 GiB.*rollout\.kv_cache_memory_bytes"):
        RolloutWorker(cfg, checkpoint)
