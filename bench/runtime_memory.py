"""Learner peak memory vs retention ratio through the full runtime (`tip-ray train`).

A student/teacher pair with a realistic vocabulary (random Qwen3 models, 151936 rows by default,
the Qwen vocabulary size; the character tokenizer's 128 ids are a subset of it, as hub
checkpoints pad their vocabularies) is trained for a few steps by the real runtime: vLLM rollout
actor, teacher actor (top-32), 2-rank DeepSpeed ZeRO-2 learner. One run per case, each its own
`tip-ray train` process: rule `all`, then `soft_or` at ratios 1.0 / 0.5 / 0.2 / 0.1. The metric is
``learner_peak_memory_mb`` from metrics.jsonl (the learner's peak RSS on CPU, the maximum over
ranks and, being a process peak, over the run so far: the last step's value is the run's peak).
Random models never emit the end token, so every response is exactly ``max_new_tokens`` long and
every case trains on the same number of valid tokens.

Usage:
    python bench/runtime_memory.py                   # preset "cpu": V=151936
    python bench/runtime_memory.py --preset small    # V=32768, quicker
    python bench/runtime_memory.py --chunk-rows 128 --ratios 0.1   # the chunk size, not the ratio
    python bench/runtime_memory.py --no-all --ratios 1.0 0.5 0.1 --vocab-chunks 0 16384
        # the statistics pass unstreamed (learner.vocab_chunk = V) and streamed, side by side
Prints a table and writes bench/results/runtime_memory-<preset>[-chunk<N>][-vc<N>...].json (models and run
directories under bench/results/runtime_memory/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORKDIR = RESULTS / "runtime_memory"


@dataclass(frozen=True)
class Shape:
    """A Qwen3 shape (head dim 32: the CPU vLLM build needs >= 32)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class Preset:
    """Models and step size of one bench configuration."""

    vocab: int
    student: Shape
    teacher: Shape
    prompts_per_step: int
    micro_batch_size: int
    max_new_tokens: int
    steps: int
    chunk_rows: int
    teacher_top_k: int
    vocab_chunk: int | None = None  # learner.vocab_chunk; None: the config's default; 0: V (unstreamed)


STUDENT = Shape(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=384)
TEACHER = Shape(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                intermediate_size=576)
PRESETS = {
    "cpu": Preset(vocab=151936, student=STUDENT, teacher=TEACHER, prompts_per_step=16, micro_batch_size=8,
                  max_new_tokens=96, steps=3, chunk_rows=512, teacher_top_k=32),
    "small": Preset(vocab=32768, student=STUDENT, teacher=TEACHER, prompts_per_step=16, micro_batch_size=8,
                    max_new_tokens=96, steps=3, chunk_rows=512, teacher_top_k=32),
}
CASES: tuple[tuple[str, float], ...] = (("all", 1.0), ("soft_or", 1.0), ("soft_or", 0.5), ("soft_or", 0.2),
                                        ("soft_or", 0.1))


def build_models(preset: Preset, directory: Path) -> tuple[Path, Path]:
    """Random student and teacher checkpoints of ``preset`` with the character tokenizer saved beside each
    (reused when already built for the same shapes)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tip_ray.data.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    paths = []
    for role, shape, seed in (("student", preset.student, 1), ("teacher", preset.teacher, 2)):
        path = directory / f"{role}-v{preset.vocab}"
        marker = path / "bench_shape.json"
        spec = json.dumps({"vocab": preset.vocab, **asdict(shape), "seed": seed}, sort_keys=True)
        if not (marker.is_file() and marker.read_text() == spec):
            shutil.rmtree(path, ignore_errors=True)
            config = Qwen3Config(vocab_size=preset.vocab, head_dim=32, max_position_embeddings=256,
                                 rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **asdict(shape))
            torch.manual_seed(seed)
            Qwen3ForCausalLM(config).save_pretrained(str(path))
            tokenizer.save_pretrained(str(path))
            marker.write_text(spec)
        paths.append(path)
    return paths[0], paths[1]


def overrides(preset: Preset, student: Path, teacher: Path, rule: str, ratio: float, out: Path,
              single_forward: bool = False) -> list[str]:
    """Hydra overrides of one run (``learner.single_forward`` pinned: the pair group's default is
    for the embedded student)."""
    return [
        f"student={student}", f"teacher.model={teacher}", f"teacher.top_k={preset.teacher_top_k}",
        "teacher.micro_batch_size=4", f"trainer.steps={preset.steps}", f"trainer.prompts_per_step={preset.prompts_per_step}",
        f"learner.global_batch_size={preset.prompts_per_step}", f"learner.micro_batch_size={preset.micro_batch_size}",
        "learner.world_size=2", "learner.zero_stage=2", f"learner.chunk_rows={preset.chunk_rows}",
        *([f"learner.vocab_chunk={preset.vocab_chunk or preset.vocab}"] if preset.vocab_chunk is not None else []),
        f"rollout.max_new_tokens={preset.max_new_tokens}", "rollout.max_model_len=256",
        f"selection.rule={rule}", f"selection.ratio={ratio}", "trainer.eval_every=0", "eval_data=null",
        "logger.wandb=false", f"trainer.output_dir={out}", f"learner.single_forward={str(single_forward).lower()}",
    ]


def run_case(preset: Preset, student: Path, teacher: Path, rule: str, ratio: float, single_forward: bool = False) -> dict:
    """One `tip-ray train` process; the learner peak and step facts from its metrics.jsonl."""
    name = f"v{preset.vocab}-chunk{preset.chunk_rows}-{rule}-{ratio:g}" + ("-single" if single_forward else "") + \
        (f"-vc{preset.vocab_chunk}" if preset.vocab_chunk is not None else "")
    out = WORKDIR / "runs" / name
    shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl is appended to: start clean
    out.parent.mkdir(parents=True, exist_ok=True)
    log = WORKDIR / "runs" / f"{name}.log"
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run([sys.executable, "-m", "tip_ray.cli", "train",
                               *overrides(preset, student, teacher, rule, ratio, out, single_forward)],
                              cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise RuntimeError(f"case {name} exited with {code}; last lines of {log}:\n{tail}")
    steps = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    return {
        "rule": rule, "ratio": ratio, "vocab_chunk": preset.vocab_chunk, "steps": len(steps),
        "learner_peak_memory_mb": max(m["learner_peak_memory_mb"] for m in steps),
        "peak_by_step_mb": [m["learner_peak_memory_mb"] for m in steps],
        "valid_tokens_per_step": sum(m["valid_tokens"] for m in steps) / len(steps),
        "kept_fraction": sum(m["kept_fraction"] for m in steps) / len(steps),
        "learner_seconds_per_step": sum(m["time/learner"] for m in steps) / len(steps),
        "wall_seconds": time.perf_counter() - start,
    }


def report(preset_name: str, preset: Preset, results: list[dict]) -> dict:
    """Print the table (rich) and return the JSON document with ratios to the `all` run of the same
    ``vocab_chunk`` (or, without one, to its first run: the highest ratio)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"learner peak RSS through `tip-ray train` ({preset_name}: V={preset.vocab}, "
                        f"{preset.prompts_per_step} x {preset.max_new_tokens} response tokens/step, 2 ranks ZeRO-2, "
                        f"micro-batch {preset.micro_batch_size}, chunk_rows {preset.chunk_rows}, {preset.steps} steps)")
    for col in ("vocab_chunk", "rule", "ratio", "kept", "valid tok/step", "peak MiB", "peak / base",
                "learner s/step"):
        table.add_column(col, justify="right")
    for r in results:
        group = [x for x in results if x["vocab_chunk"] == r["vocab_chunk"]]
        base = next((x for x in group if x["rule"] == "all"), group[0])
        r["peak_vs_base"] = r["learner_peak_memory_mb"] / base["learner_peak_memory_mb"]
        chunk = "default" if r["vocab_chunk"] is None else (f"{r['vocab_chunk']}" if r["vocab_chunk"] else "V (off)")
        table.add_row(chunk, r["rule"], f"{r['ratio']:.2f}", f"{100 * r['kept_fraction']:.1f}%",
                      f"{r['valid_tokens_per_step']:.0f}", f"{r['learner_peak_memory_mb']:.0f}",
                      f"{r['peak_vs_base']:.3f}", f"{r['learner_seconds_per_step']:.2f}")
    Console(width=None if sys.stdout.isatty() else 150).print(table)
    return {"preset": preset_name, "config": asdict(preset), "results": results}


def main() -> int:
    """Build the models, run every case, print, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--chunk-rows", type=int, help="override the preset's learner.chunk_rows")
    parser.add_argument("--ratios", type=float, nargs="+", help="soft_or ratios to run after `all` "
                        "(default: 1.0 0.5 0.2 0.1)")
    parser.add_argument("--single-forward", action="store_true",
                        help="learner.single_forward=true (one backbone pass, graph held during the statistics)")
    parser.add_argument("--vocab-chunks", type=int, nargs="+",
                        help="learner.vocab_chunk values, every case run with each (0: the vocabulary size, i.e. "
                             "the statistics pass unstreamed); default: the config's")
    parser.add_argument("--no-all", action="store_true", help="leave out the rule `all` run (soft_or 1.0 is the same "
                        "set of tokens); ratios are then relative to each setting's first run")
    parser.add_argument("--steps", type=int, help="override the preset's trainer.steps (>= 2 to include the "
                        "optimizer states, made in step 1)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if args.chunk_rows:
        preset = replace(preset, chunk_rows=args.chunk_rows)
    if args.steps:
        preset = replace(preset, steps=args.steps)
    cases = CASES if not args.ratios else (("all", 1.0), *(("soft_or", r) for r in args.ratios))
    if args.no_all:
        cases = tuple(c for c in cases if c[0] != "all")
    name = (args.preset if not args.chunk_rows else f"{args.preset}-chunk{args.chunk_rows}") + \
        ("-single" if args.single_forward else "") + \
        ("".join(f"-vc{v}" for v in args.vocab_chunks) if args.vocab_chunks else "")
    WORKDIR.mkdir(parents=True, exist_ok=True)
    student, teacher = build_models(preset, WORKDIR / "models")
    results = []
    for vocab_chunk in args.vocab_chunks or [None]:
        for rule, ratio in cases:
            results.append(run_case(replace(preset, vocab_chunk=vocab_chunk), student, teacher, rule, ratio,
                                    args.single_forward))
            r = results[-1]
            print(f"  vocab_chunk {vocab_chunk} {rule:<8} ratio {ratio:<4}: learner peak "
                  f"{r['learner_peak_memory_mb']:8.0f} MiB ({r['wall_seconds']:.0f} s wall)", file=sys.stderr, flush=True)
    doc = report(name, preset, results)
    out = RESULTS / f"runtime_memory-{name}.json"
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
