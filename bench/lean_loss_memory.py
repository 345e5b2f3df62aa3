"""Peak memory and time of the memory-lean TIP loss vs the plain full-logits loss.

The plain path computes logits [B, T, V] with gradient, takes statistics, selects, and masks
the loss: it saves nothing by selecting. The lean path (tip_ray.tip.lean) computes statistics
chunk by chunk without gradient and runs the lm_head and the loss with gradient on the kept
hidden states only. Each case runs in a fresh subprocess so its peak is its own: on CPU the
peak resident set size above the inputs, on CUDA ``torch.cuda.max_memory_allocated`` above the
inputs.

Usage:
    python bench/lean_loss_memory.py                 # preset "cpu" (vocab 151936, 2048 tokens)
    python bench/lean_loss_memory.py --preset demo   # small, for `make demo`
    python bench/lean_loss_memory.py --preset cuda --device cuda
Prints a table and writes bench/results/lean_loss_memory-<preset>-<device>.json.
Targets (ratios to the plain path at ratio 1.0): lean peak <= 0.6x at ratio 1.0, <= 0.5x at
0.5, <= 0.25x at 0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Preset:
    vocab: int
    batch: int
    length: int
    hidden: int
    k: int
    chunk_rows: int
    dtype: str


PRESETS = {
    "demo": Preset(vocab=32768, batch=2, length=1024, hidden=512, k=32, chunk_rows=256, dtype="float32"),
    "cpu": Preset(vocab=151936, batch=2, length=1024, hidden=1024, k=32, chunk_rows=256, dtype="float32"),
    "cuda": Preset(vocab=151936, batch=4, length=2048, hidden=4096, k=32, chunk_rows=1024, dtype="bfloat16"),
}
RATIOS = (1.0, 0.5, 0.2, 0.1)
TARGETS = {1.0: 0.6, 0.5: 0.5, 0.1: 0.25}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(preset: Preset, path: str, ratio: float, device: str, repeats: int) -> dict:
    """One measurement in this process: peak bytes above the inputs, and step seconds."""
    import torch

    from tip_ray.tip import (
        TeacherSignal,
        distill_loss_from_logits,
        kept_token_loss,
        token_stats_from_hidden,
        token_weights,
    )
    from tip_ray.tip.stats import compute_token_stats

    torch.manual_seed(0)
    dtype = getattr(torch, preset.dtype)
    n = preset.batch * preset.length
    dev = torch.device(device)
    hidden = torch.randn(preset.batch, preset.length, preset.hidden, device=dev, dtype=dtype, requires_grad=True)
    weight = (torch.randn(preset.vocab, preset.hidden, device=dev, dtype=dtype) * 0.02).requires_grad_(True)
    # A top-K teacher signal with distinct ids (7919 is prime and does not divide the vocab).
    base = torch.randint(0, preset.vocab, (n, 1), device=dev)
    topk_ids = ((base + torch.arange(preset.k, device=dev) * 7919) % preset.vocab).to(torch.int32)
    topk_lp = torch.log(0.9 * torch.softmax(torch.randn(n, preset.k, device=dev) * 2, -1)).sort(-1, descending=True).values
    pick = torch.randint(0, preset.k, (n, 1), device=dev)
    ids = topk_ids.long().gather(-1, pick).reshape(preset.batch, preset.length)
    teacher = TeacherSignal(
        topk_ids.reshape(preset.batch, preset.length, preset.k),
        topk_lp.reshape(preset.batch, preset.length, preset.k),
        topk_lp.gather(-1, pick).reshape(preset.batch, preset.length),
    )
    mask = torch.ones(preset.batch, preset.length, dtype=torch.bool, device=dev)
    mask[:, : preset.length // 8] = False  # a prompt

    def step() -> int:
        hidden.grad = None
        weight.grad = None
        if path == "plain":
            logits = torch.nn.functional.linear(hidden, weight)
            stats = compute_token_stats(logits.detach(), ids, teacher, mask, chunk_rows=preset.chunk_rows)
            weights = token_weights(stats, "soft_or", ratio)
            loss = distill_loss_from_logits(logits, ids, teacher, mask, weights.to(logits.dtype))
        else:
            stats = token_stats_from_hidden(hidden, weight, teacher, ids, mask, chunk_rows=preset.chunk_rows)
            weights = token_weights(stats, "soft_or", ratio)
            loss = kept_token_loss(hidden, weight, teacher, ids, weights.to(dtype), mask, chunk_rows=preset.chunk_rows)
        loss.backward()
        return int((weights > 0).sum())

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_bytes = torch.cuda.memory_allocated()
    else:
        base_bytes = _rss_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        kept = step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_bytes
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_bytes
    return {
        "path": path,
        "ratio": ratio,
        "kept": kept,
        "valid": int(mask.sum()),
        "peak_bytes": int(peak),
        "step_seconds": statistics.median(times),
    }


def measure(preset_name: str, device: str, repeats: int) -> list[dict]:
    """Run every case in its own subprocess and collect the results."""
    cases = [("plain", 1.0), ("plain", 0.5)] + [("lean", r) for r in RATIOS]
    results = []
    for path, ratio in cases:
        cmd = [sys.executable, __file__, "--preset", preset_name, "--device", device, "--repeats", str(repeats),
               "--case", path, "--ratio", str(ratio)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(f"case {path} ratio {ratio} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  measured {path:<5} ratio {ratio:<4}: {results[-1]['peak_bytes'] / 2**20:9.1f} MiB"
              f"  {results[-1]['step_seconds']:.2f} s", file=sys.stderr, flush=True)
    return results


def report(preset_name: str, preset: Preset, device: str, results: list[dict]) -> dict:
    """Print the table (rich) and return the JSON document with ratios and target verdicts."""
    from rich.console import Console
    from rich.table import Table

    baseline = next(r for r in results if r["path"] == "plain" and r["ratio"] == 1.0)
    table = Table(title=f"lean vs plain TIP loss: {preset_name} preset on {device} "
                        f"(V={preset.vocab}, tokens={preset.batch * preset.length}, H={preset.hidden}, "
                        f"K={preset.k}, {preset.dtype})")
    for col in ("path", "ratio", "kept", "peak MiB", "peak / plain@1.0", "target", "step s", "time / plain@1.0"):
        table.add_column(col, justify="right")
    for r in results:
        r["peak_vs_plain_all"] = r["peak_bytes"] / baseline["peak_bytes"]
        r["time_vs_plain_all"] = r["step_seconds"] / baseline["step_seconds"]
        target = TARGETS.get(r["ratio"]) if r["path"] == "lean" else None
        r["target"] = target
        r["meets_target"] = None if target is None else r["peak_vs_plain_all"] <= target
        verdict = "" if target is None else (f"<= {target} " + ("ok" if r["meets_target"] else "MISSED"))
        table.add_row(r["path"], f"{r['ratio']:.2f}", str(r["kept"]), f"{r['peak_bytes'] / 2**20:.1f}",
                      f"{r['peak_vs_plain_all']:.3f}", verdict, f"{r['step_seconds']:.2f}",
                      f"{r['time_vs_plain_all']:.2f}")
    Console(width=None if sys.stdout.isatty() else 140).print(table)
    return {"preset": preset_name, "device": device, "config": asdict(preset), "results": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--case", choices=("plain", "lean"), help=argparse.SUPPRESS)
    parser.add_argument("--ratio", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if args.case:
        print(json.dumps(run_case(preset, args.case, args.ratio, args.device, args.repeats)))
        return 0
    doc = report(args.preset, preset, args.device, measure(args.preset, args.device, args.repeats))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"lean_loss_memory-{args.preset}-{args.device}.json"
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    missed = [r for r in doc["results"] if r["meets_target"] is False]
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
