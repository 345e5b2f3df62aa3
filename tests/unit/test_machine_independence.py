"""The local preset names every size it needs; nothing is read from the machine it runs on."""

from __future__ import annotations

import pytest

from tip_ray.cli import compose


def test_local_cpu_sizes_ray_and_the_pools_explicitly():
    cfg = compose("train", [])
    c = cfg.cluster
    assert (c.address, c.num_cpus, c.object_store_memory) == (None, 6, 2 * 2**30)
    # Ray gives each actor as many torch threads as the CPUs its pool asks for.
    assert (c.rollout.cpus, c.teacher.cpus, c.learner.cpus) == (2, 2, 1)
    # The vLLM engines' KV caches follow the run (tip_ray.rollout.vllm_args), not a memory fraction.
    assert (cfg.rollout.max_num_seqs, cfg.rollout.kv_cache_memory_bytes) == (None, None)


@pytest.mark.parametrize("overrides, message", [
    (["cluster.object_store_memory=1000"], r"cluster\.object_store_memory is in bytes"),
    (["cluster.address=auto", "cluster.num_cpus=null"], r"cluster\.object_store_memory sizes a local Ray instance"),
])
def test_bad_object_store_sizes_are_refused(overrides, message):
    with pytest.raises(SystemExit, match=message):
        compose("train", overrides)
