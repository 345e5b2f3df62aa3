"""The environment every actor starts with: the malloc settings, unless the user set their own."""

from __future__ import annotations

import pytest

from tip_ray.runtime.heap import MALLOC_ENV
from tip_ray.runtime.ray_runtime import worker_env


def test_actors_keep_their_heap_unless_the_user_says_otherwise(monkeypatch):
    for key in MALLOC_ENV:
        monkeypatch.delenv(key, raising=False)
    env = worker_env()
    assert env["MALLOC_MMAP_MAX_"] == "0" and int(env["MALLOC_TRIM_THRESHOLD_"]) >= 1 << 30
    assert env["MALLOC_ARENA_MAX"] == "1"
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


# Run in a child process: mallopt changes the allocator of the whole process, and the pytest
# process should keep glibc's own behaviour. It reports the variables applied, the bytes a 64 MiB
# allocation took as a fresh mapping (glibc's mallinfo2), the heap's size after its free, and the
# bytes mapped while a second thread (as a collective's) holds a 100 MiB block.
_HEAP_PROBE = """
import ctypes, json, sys, threading
from tip_ray.runtime.heap import keep_process_heap
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
applied = keep_process_heap() if sys.argv[1] == "keep" else []
before = libc.mallinfo2().hblkhd
block = libc.malloc(64 << 20)
mapped = libc.mallinfo2().hblkhd - before
libc.free(block)
heap_after_free = libc.mallinfo2().arena
thread_mapped = []
def in_a_thread():
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(100 << 20)
    thread_mapped.append(libc.mallinfo2().hblkhd - before)
    libc.free(block)
thread = threading.Thread(target=in_a_thread)
thread.start()
thread.join()
print(json.dumps({"applied": applied, "mapped": mapped, "heap_after_free": heap_after_free,
                  "thread_mapped": thread_mapped[0]}))
"""


def _probe(mode: str, **env: str) -> dict:
    import ctypes
    import json
    import os
    import subprocess
    import sys

    try:
        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018 (glibc >= 2.33)
    except (OSError, AttributeError):
        pytest.skip("needs glibc's mallinfo2")
    child_env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV} | env
    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], env=child_env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_the_driver_keeps_its_heap_through_mallopt():
    kept, default = _probe("keep"), _probe("none")
    assert kept["applied"] == list(MALLOC_ENV)
    # glibc's own: a 64 MiB block is a fresh mapping, unmapped by its free.
    assert default["mapped"] >= 64 << 20 and default["heap_after_free"] < 64 << 20
    # Kept: the block comes from the heap, which keeps it after the free for the next step.
    assert kept["mapped"] == 0 and kept["heap_after_free"] >= 64 << 20


def test_the_drivers_own_malloc_setting_wins():
    probe = _probe("keep", MALLOC_MMAP_MAX_="65536")
    assert probe["applied"] == ["MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX"]
    assert probe["mapped"] >= 64 << 20  # mmap left on, as the user set it


def test_a_threads_large_block_comes_from_the_kept_heap():
    # glibc's own: a thread other than the main one has an arena of its own, and maps a block
    # larger than that arena's heaps afresh (and unmaps it at its free) whatever M_MMAP_MAX says.
    assert _probe("none")["thread_mapped"] >= 100 << 20
    assert _probe("none", MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(16 << 30))["thread_mapped"] >= 100 << 20
    # One arena: the thread's block comes from the main heap, set by mallopt (the driver) or by the
    # environment the process starts with (the actors, worker_env).
    assert _probe("keep")["thread_mapped"] == 0
    assert _probe("none", **MALLOC_ENV)["thread_mapped"] == 0


def test_the_trainer_applies_keep_heap(monkeypatch):
    import tip_ray.runtime.heap as heap

    calls = []
    monkeypatch.setattr(heap, "keep_process_heap", lambda: calls.append(1) or [])
    from tip_ray.cli import compose
    from tip_ray.trainer import Trainer

    for setting, expected in (("true", 1), ("false", 0)):
        calls.clear()
        cfg = compose("train", [f"cluster.keep_heap={setting}", "student=/nonexistent/student"])
        with pytest.raises((FileNotFoundError, ValueError)):
            Trainer(cfg)
        assert len(calls) == expected
