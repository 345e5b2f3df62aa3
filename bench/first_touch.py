"""What a first touch of fresh memory costs on this machine: seconds per GiB of anonymous pages.

A process that grows (a learner rank's heap reaching a new high-water mark, a buffer mapped
afresh each step) pays one page fault per 4 KiB page it touches first: a few microseconds where
the kernel holds the page already. On a virtual machine whose host takes freed guest memory back
(virtio-balloon free page reporting: feature bit 5 of the balloon device, which the machines of
this project have), a page the host has reclaimed faults on the host as well, and a first touch
can cost ten times as much: this is why a step that grows a process's memory is slower than the
steady steps after it, and why ``cluster.keep_heap`` pays (docs/benchmarks.md section 8,
sessions 16-17).

Each case maps ``size`` MiB of anonymous memory, writes one byte per page, and unmaps it again,
``--repeats`` times in a row (a region unmapped is handed straight back to the next mapping while
the guest still holds its pages, so a repeat measures recycled pages), with ``--pause`` seconds
between repeats (time for the guest to report the freed pages to the host).

Usage:
    python bench/first_touch.py                          # 256 MiB, 1 GiB and 4 GiB, 3 repeats each
    python bench/first_touch.py --sizes 1024 --repeats 4 --pause 0 5
Prints a table and writes bench/results/first_touch.json.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PAGE = mmap.PAGESIZE


def touch_seconds(size_mib: int) -> float:
    """Seconds to write the first byte of every page of a fresh anonymous mapping of ``size_mib`` MiB."""
    size = size_mib << 20
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        start = time.perf_counter()
        for offset in range(0, size, PAGE):
            region[offset] = 1
        return time.perf_counter() - start
    finally:
        region.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096], help="MiB per mapping")
    parser.add_argument("--repeats", type=int, default=3, help="mappings of each size, one after the other")
    parser.add_argument("--pause", type=float, nargs="+", default=[0.0],
                        help="seconds slept before each repeat (each value a case of its own)")
    parser.add_argument("--out", type=Path, default=RESULTS / "first_touch.json")
    args = parser.parse_args()
    for name, values in (("--sizes", args.sizes), ("--repeats", [args.repeats])):
        if min(values) < 1:
            raise SystemExit(f"{name} must be >= 1, got {values}")
    if min(args.pause) < 0:
        raise SystemExit(f"--pause must be >= 0, got {args.pause}")

    from rich.console import Console
    from rich.table import Table

    rows = []
    for size in args.sizes:
        for pause in args.pause:
            for repeat in range(1, args.repeats + 1):
                time.sleep(pause)
                seconds = touch_seconds(size)
                pages = (size << 20) // PAGE
                rows.append({"size_mib": size, "pause_s": pause, "repeat": repeat, "seconds": seconds,
                             "seconds_per_gib": seconds * 1024 / size, "us_per_page": seconds / pages * 1e6})
    table = Table(title=f"first touch of anonymous memory, {PAGE // 1024} KiB pages, {os.cpu_count()} CPUs")
    for col in ("MiB", "pause s", "repeat", "seconds", "s per GiB", "us per page"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["size_mib"]), f"{r['pause_s']:g}", str(r["repeat"]), f"{r['seconds']:.2f}",
                      f"{r['seconds_per_gib']:.2f}", f"{r['us_per_page']:.1f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.machine(), "kernel": platform.release(),
                                    "page_bytes": PAGE, "cases": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
