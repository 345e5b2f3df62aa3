"""The environment every actor starts with: the malloc settings, unless the user set their own."""

from __future__ import annotations

from tip_ray.runtime.ray_runtime import MALLOC_ENV, worker_env


def test_actors_keep_their_heap_unless_the_user_says_otherwise(monkeypatch):
    for key in MALLOC_ENV:
        monkeypatch.delenv(key, raising=False)
    env = worker_env()
    assert env["MALLOC_MMAP_MAX_"] == "0" and int(env["MALLOC_TRIM_THRESHOLD_"]) >= 1 << 30
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    # A setting of the user's own reaches the actors through the inherited environment, unchanged.
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    assert "MALLOC_MMAP_MAX_" not in worker_env() and "MALLOC_TRIM_THRESHOLD_" in worker_env()
    # cluster.keep_heap=false: glibc's own behaviour.
    assert worker_env(keep_heap=False) == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def test_keep_heap_is_a_cluster_key():
    from tip_ray.cli import compose

    assert compose("train", []).cluster.keep_heap is True
    assert compose("train", ["cluster.keep_heap=false"]).cluster.keep_heap is False
