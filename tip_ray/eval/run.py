"""``tip-ray eval``: load a checkpoint and a prompt set, evaluate, print and save the results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tip_ray.config import EvalConfig
from tip_ray.eval.evaluator import EvalReport, evaluate, write_samples


def run_eval(cfg: EvalConfig) -> list[EvalReport]:
    """Greedy and/or sampled evaluation of ``cfg.model`` on ``cfg.data``; writes ``cfg.output_dir``.

    The model generates on the current CUDA device when there is one, in the checkpoint's dtype.

    Writes ``<name>.jsonl`` (one line per sample) and ``summary.json`` for each evaluation run.
    """
    from transformers import AutoModelForCausalLM

    from tip_ray.data.prompts import load_prompt_dataset
    from tip_ray.devices import compute_device
    from tip_ray.rollout.hf import HFGenerator
    from tip_ray.state.preflight import check_model_fits_tokenizer, load_tokenizer, require_checkpoint
    from tip_ray.types import SamplingSettings

    model_path = require_checkpoint(cfg.model, "model")
    tokenizer_path = require_checkpoint(cfg.tokenizer, "tokenizer") if cfg.tokenizer else model_path
    tokenizer = load_tokenizer(tokenizer_path, "model")
    dataset = load_prompt_dataset(cfg.data, tokenizer)
    # The checkpoint's own dtype, on the GPU when one is visible (the CPU otherwise).
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto").to(compute_device())
    check_model_fits_tokenizer(model.config, tokenizer, "model", model_path)
    engine = HFGenerator(model, tokenizer, batch_size=cfg.batch_size)

    runs = []
    if cfg.greedy:
        runs.append(("greedy", SamplingSettings(max_new_tokens=cfg.max_new_tokens, temperature=0.0, seed=cfg.seed)))
    if cfg.sampled_n:
        runs.append((f"sampled_t{cfg.temperature:g}_n{cfg.sampled_n}", SamplingSettings(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, n=cfg.sampled_n,
            seed=cfg.seed)))
    reports = [evaluate(engine, tokenizer, dataset, cfg.grader, sampling, name=name) for name, sampling in runs]

    out = Path(cfg.output_dir)
    for report in reports:
        write_samples(report, out / f"{report.name}.jsonl")
    summary = {"model": cfg.model, "data": cfg.data.path, "prompts": len(dataset),
               "dataset_stats": dataset.stats.__dict__, "results": [r.summary() for r in reports]}
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "summary.json")
    print_reports(reports, cfg.model, out)
    return reports


def print_reports(reports: list[EvalReport], model: str, out: Path) -> None:
    """A rich table of the evaluation runs."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"evaluation of {model}")
    for col in ("run", "prompts", "samples", "accuracy", "95% CI", "pass@1", "pass@n", "truncated", "mean tokens",
                "grader errors"):
        table.add_column(col, justify="right")
    for r in reports:
        table.add_row(r.name, str(r.num_prompts), str(r.samples_per_prompt), f"{r.accuracy:.3f}",
                      f"[{r.ci_low:.3f}, {r.ci_high:.3f}]", f"{r.pass_at_1:.3f}", f"{r.pass_at_n:.3f}",
                      str(r.truncated), f"{r.mean_response_tokens:.1f}", str(r.grader_errors))
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(table)
    console.print(f"per-sample results and summary.json in {out}")
