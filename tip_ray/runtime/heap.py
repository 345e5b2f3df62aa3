"""glibc malloc set to keep a process's heap (``cluster.keep_heap``): never ``mmap`` a block,
never trim the heap, one arena for every thread.

A step's large CPU tensors (logits, a full teacher distribution, its rows in the driver's
metrics: 100s of MB) are otherwise fresh mappings each time, page-faulted in and zeroed by the
kernel on every step; kept in the heap they are reused. Actors get it from their environment
(``MALLOC_ENV``, read by glibc when the process starts: ``tip_ray.runtime.ray_runtime.worker_env``);
the driver, already running when it reads its config, through ``mallopt`` (``keep_process_heap``).
Measured: a learner rank's full-distribution loss 2.28 -> 1.34 s (docs/benchmarks.md, session 13);
the driver's teacher-entropy metric 0.23-2.2 -> 0.07-0.2 s a step (session 15).

One arena: a thread other than the main one (the collectives' threads: gloo's, DeepSpeed's)
allocates from an arena of its own, whose heaps hold at most 64 MiB; glibc maps a larger block
there afresh whatever ``M_MMAP_MAX`` says, and unmaps it at its free. With one arena every thread
allocates from the main heap, which keeps it. Measured: DeepSpeed ZeRO-1's all-gather in a
learner rank's gloo thread (a 39M-parameter student, V = 151,936) page-faulted 150 MB in and took
1.1-2.7 s of every step; with one arena no fault and 0.13 s (session 16).

Imports no Ray.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(16 << 30), "MALLOC_ARENA_MAX": "1"}
# The mallopt parameter of each variable (glibc's malloc.h: M_TRIM_THRESHOLD -1, M_MMAP_MAX -4,
# M_ARENA_MAX -8).
_MALLOPT_PARAM = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_MAX_": -4, "MALLOC_ARENA_MAX": -8}


def malloc_env(keep_heap: bool = True) -> dict[str, str]:
    """``MALLOC_ENV`` less the variables this process's environment sets already (the user's own
    setting wins), for a child process's environment; empty without ``keep_heap``."""
    return {key: value for key, value in MALLOC_ENV.items() if keep_heap and key not in os.environ}


def keep_process_heap() -> list[str]:
    """Apply ``malloc_env()`` to this running process through glibc's ``mallopt`` (allocations
    from now on; the arena limit binds the threads that have no arena yet: those that already
    allocated keep theirs, so the ``Trainer`` calls it before Ray starts); returns the variables
    applied, in ``MALLOC_ENV`` order. Empty where the C library is not glibc (nothing to set) or
    the user set every variable."""
    wanted = malloc_env()
    if not wanted:
        return []
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt, a different allocator
        return []
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = []
    for key, value in wanted.items():
        # mallopt takes an int: 16 GiB does not fit, so the trim threshold is INT_MAX (2 GiB - 1)
        # here, which keeps any heap top smaller than that.
        if mallopt(_MALLOPT_PARAM[key], min(int(value), 2**31 - 1)) == 1:
            applied.append(key)
    return applied
