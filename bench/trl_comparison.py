"""End-to-end on-policy distillation throughput: tip_ray (rule `all`, and `soft_or` 0.5) vs TRL.

Same teacher and student (the embedded pair, `tip-ray prepare-demo`, or with ``--pair NAME`` a pair
preset's, e.g. ``--pair smollm2`` after `tip-ray prepare-pair smollm2`), same prompts in the same
order (the first ``steps x prompts_per_step`` prompts of tip_ray's ``PromptStream``, handed to
TRL as text and checked to tokenize to the same ids), same prompts per optimizer step, same
``max_new_tokens``, temperature 1, same optimizer (AdamW, constant lr, clip 1.0), same number of
optimizer steps, reverse KL against the teacher's full distribution (tip_ray ``loss.kind=rkl`` with
``teacher.top_k=null``; TRL ``beta=1.0``), no evaluation, minimal logging, no checkpoint on the TRL
side (tip_ray writes its final checkpoint after the last step, outside the timed steps, and this
script deletes it once the run's metrics are read).

The teacher signal: TRL 1.16's ``DistillationTrainer`` has no sparse (top-k) teacher signal: its loss
(the chunked generalized JSD, ``_chunked_divergence_loss``) projects the teacher's last hidden states
through the teacher's ``lm_head`` onto the whole vocabulary, and its ``top_k`` is a sampling setting
of the generation only. So every like-for-like tip_ray case runs ``teacher.top_k=null`` (the exact
full-vocabulary reverse KL, the loss TRL computes). With ``--pair``, one more case,
``tip_ray-all-top<k>``, runs the pair preset's own teacher signal (top-k plus the sampled token and
the tail; top-32 on smollm2): what tip_ray would run on that pair, not what TRL can run. Both sides
load the pair in float32 (TRL ``dtype=float32``; tip_ray's pair presets pin float32 for rollout,
teacher and learner). The phases are not split alike: TRL's ``teacher`` is the teacher backbone
forward only (the teacher's ``lm_head`` projection happens inside the chunked loss, so in TRL's
``learner``); tip_ray's ``teacher`` is the teacher actor's whole forward and the transfer of its
signal. Compare the step totals.

With ``--pair NAME`` the student, teacher, prompts and sizes come from ``tip_ray/conf/pair/NAME.yaml``:
tip_ray's config is composed with ``pair=NAME`` (its data preset, chat template, prompts per step,
micro-batch, ``max_new_tokens``, lr), and the cases are TRL (torch's default threads),
tip_ray `all` and `soft_or` 0.5 (sync, ``teacher.top_k=null``: like for like) and tip_ray `all` and
`soft_or` 0.5 at the pair's own teacher top-k (what the pair preset runs).
Any of ``--prompts-per-step``/``--micro-batch-size``/``--max-new-tokens``/``--lr``/``--student``/
``--teacher`` still overrides the pair's value.

Memory (``--ratios R ...``): the learner's peak memory per rank (``learner_peak_memory_mb`` of
metrics.jsonl: the peak RSS of the largest learner rank, a running maximum over the run) at
`soft_or` ratio R, against TRL's process peak RSS (``ru_maxrss`` of the worker, which holds student,
teacher, optimizer states and generation in one process; tip_ray's learner rank holds its student
copy, gradients and its ZeRO share of the optimizer states, while the rollout engine and the
teacher live in other processes, so this is not the whole of tip_ray's memory). Ratio 1.0 is the
`all` case; a ratio that is already a case reuses that run; each other ratio is one more
``tip-ray train`` run of ``--ratio-steps`` steps (the same first prompts; with ``--pair`` at the
pair's top-k, the ``-topK`` cases, else ``teacher.top_k=null``). Since a process peak only grows,
every run is compared at the same step, the last step of the shortest run (``--ratio-steps``); the
peak over each whole run is reported too. The same table gives the learner's time per step at each
ratio (``time/learner`` and its ``learner_time/*`` split, mean over steps 2 .. ``--ratio-steps`` of
every run: the same prompts), against ratio 1.0's.

- tip_ray: ``tip-ray train`` (vLLM rollout actor, teacher actor, 2-rank DeepSpeed learner on
  Ray: ZeRO-2 by default, the pair preset's stage with ``--pair`` (ZeRO-0 and the collective
  weight sync on smollm2), weight sync every step), read from its ``metrics.jsonl``; `all` and `soft_or`
  0.5, each in ``trainer.mode=sync`` and ``trainer.mode=overlap`` (step t+1's rollouts generated
  while the learner trains on step t: one update stale, so not strictly on-policy; with ``--pair``
  overlap only with ``--overlap``).
- TRL: ``DistillationTrainer`` (on-policy: the student samples every completion with
  ``transformers`` ``generate``; teacher and student in one process), run by
  ``bench/trl_worker.py`` inside ``bench/.venv-trl`` (``bench/setup_trl_env.sh`` makes it), once
  with torch's default threads (one per core) and once with one thread; the faster run is the
  baseline of the ratios.

Each run is its own process, one after the other (TRL and tip_ray alternating), on the same
machine; the 1-minute load average before and after each run is recorded. The first
``--warmup-steps`` steps of each run are left out of the steady-state figures (first-call costs:
vLLM's first batch, allocator growth); start-up (Ray, actors, vLLM engine, model loading) is
reported separately as the process wall time outside the steps. Per run: the mean step (total
tokens / total seconds), the median step and the best (fastest) step; on a shared machine a
busy neighbour only ever adds time, so the best step approximates an idle machine and the gap
between mean and best shows how much interference a run took.

Usage:
    bash bench/setup_trl_env.sh                      # once: the TRL virtualenv
    python bench/trl_comparison.py                   # 12 optimizer steps per side
    python bench/trl_comparison.py --steps 20 --warmup-steps 3
    python bench/trl_comparison.py --startup-profile # plus one tip_ray run with its start-up timed
    python bench/trl_comparison.py --repeats 3       # every case 3 times, interleaved, steps pooled
    python bench/trl_comparison.py --pair smollm2 --steps 8 --ratios 1.0 0.5 0.2 0.1
        # the SmolLM2 pair (`tip-ray prepare-pair smollm2`), with the learner peak at 4 ratios
    python bench/trl_comparison.py --pair smollm2 --steps 8 --overlap --skip tip_ray-all
        # the pair at its top-k, sync and overlap mode, without the full-distribution case
    python bench/scaled_pair.py --out runs/bench_pair/m && python bench/trl_comparison.py \
        --student runs/bench_pair/m/student --teacher runs/bench_pair/m/teacher --tag m   # a bigger pair
Prints a table (and with ``--ratios`` a memory table) and writes bench/results/trl_comparison[-TAG].json
(run directories under bench/results/trl_comparison[-TAG]/; TAG defaults to the pair's name).
Target: tip_ray with `all` >= 1.5x TRL's response tokens/s on the embedded pair, >= 1.3x on a real
pair (``--pair``, issue #15).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TRL_PYTHON = ROOT / "bench" / ".venv-trl" / "bin" / "python"
# tip_ray `all` over TRL, response tokens/s: the embedded pair's target, and a real pair's (issue #15).
TARGET_RATIO = {"embedded": 1.5, "pair": 1.3}
# The sizes of the embedded pair (the defaults without --pair).
EMBEDDED = {"prompts_per_step": 32, "micro_batch_size": 8, "max_new_tokens": 96, "lr": 3e-4,
            "student": "runs/embedded/student", "teacher": "runs/embedded/teacher"}


@dataclass(frozen=True)
class Setup:
    """What both sides share."""

    steps: int
    warmup_steps: int
    prompts_per_step: int
    micro_batch_size: int
    max_new_tokens: int
    lr: float
    student: str
    teacher: str
    pair: str | None = None  # the tip_ray pair preset composed under the overrides (None: the default, embedded)


@dataclass(frozen=True)
class TipCase:
    """One tip_ray case: selection, trainer mode, teacher signal (None: the full distribution) and, for a
    memory-only ratio run, its own number of steps (None: the setup's)."""

    rule: str
    ratio: float
    mode: str = "sync"
    top_k: int | None = None
    steps: int | None = None

    @property
    def name(self) -> str:
        return ("tip_ray-" + ("all" if self.rule == "all" else f"{self.rule}-{self.ratio:g}")
                + ("" if self.top_k is None else f"-top{self.top_k}") + ("" if self.mode == "sync" else f"-{self.mode}"))


def pair_defaults(pair: str) -> dict:
    """The student, teacher, sizes and teacher top-k of tip_ray's pair preset ``pair``."""
    from tip_ray.cli import compose

    cfg = compose("train", [f"pair={pair}"])
    return {"prompts_per_step": cfg.trainer.prompts_per_step, "micro_batch_size": cfg.learner.micro_batch_size,
            "max_new_tokens": cfg.rollout.max_new_tokens, "lr": cfg.learner.lr, "student": cfg.student,
            "teacher": cfg.teacher.model, "top_k": cfg.teacher.top_k}


def tip_overrides(setup: Setup, rule: str, ratio: float, output_dir: Path, mode: str = "sync",
                  top_k: int | None = None) -> list[str]:
    """Hydra overrides for one tip_ray run of ``setup`` (the embedded default otherwise)."""
    return [
        *([f"pair={setup.pair}"] if setup.pair else []),
        f"trainer.mode={mode}", f"student={setup.student}", f"teacher.model={setup.teacher}",
        f"teacher.top_k={'null' if top_k is None else top_k}",
        f"trainer.steps={setup.steps}", f"trainer.prompts_per_step={setup.prompts_per_step}",
        f"learner.global_batch_size={setup.prompts_per_step}", f"learner.micro_batch_size={setup.micro_batch_size}",
        f"learner.lr={setup.lr}", "learner.lr_schedule=constant", "learner.warmup_steps=0", "learner.grad_clip=1.0",
        f"rollout.max_new_tokens={setup.max_new_tokens}", "rollout.temperature=1.0", "rollout.top_p=1.0",
        "rollout.n=1", "loss.kind=rkl", f"selection.rule={rule}", f"selection.ratio={ratio}",
        "trainer.eval_every=0", "eval_data=null", "logger.wandb=false", f"trainer.output_dir={output_dir}",
        # local_cpu gives the rollout engine and the teacher 2 threads for the sync mode's
        # turn-taking; in overlap mode they run side by side and 2 threads each oversubscribe the 2 cores.
        *(["cluster.rollout.cpus=1", "cluster.teacher.cpus=1"] if mode == "overlap" else []),
    ]


def write_prompts(setup: Setup, path: Path) -> int:
    """Write the prompts tip_ray's stream visits first (text with special tokens, and ids), in order."""
    from tip_ray.cli import compose
    from tip_ray.data.prompts import PromptStream, load_prompt_dataset
    from tip_ray.state.preflight import load_tokenizer

    cfg = compose("train", tip_overrides(setup, "all", 1.0, RESULTS / "unused"))
    tokenizer = load_tokenizer(cfg.student, "student")
    stream = PromptStream(load_prompt_dataset(cfg.data, tokenizer), cfg.trainer.prompts_per_step,
                          seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    rows = []
    for _ in range(setup.steps):
        for example in next(stream).examples:
            rows.append({"text": tokenizer.decode(example.prompt_ids, skip_special_tokens=False),
                         "ids": list(example.prompt_ids)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


LOAD: dict[str, tuple[float, float]] = {}


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run ``cmd`` from the repository root with output to ``log``; its wall seconds (raises on failure).

    The 1-minute load average before and after is kept in ``LOAD[log.stem]``: the machine may be
    shared, and a busy neighbour slows either side.
    """
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, **env} if env else None).returncode
    seconds = time.perf_counter() - start
    LOAD[log.stem] = (load_before, os.getloadavg()[0])
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {code}; last lines of {log}:\n{tail}")
    return seconds


def run_tip(setup: Setup, case: TipCase, workdir: Path) -> dict:
    """One ``tip-ray train`` run; per-step records from its metrics.jsonl."""
    name = case.name
    out = workdir / name
    shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl is appended to: start clean
    if case.steps is not None:
        setup = replace(setup, steps=case.steps)
    wall = _run([sys.executable, "-m", "tip_ray.cli", "train",
                 *tip_overrides(setup, case.rule, case.ratio, out, case.mode, case.top_k)],
                workdir / f"{name}.log")
    steps = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "loss" not in m:  # the evaluation rows (eval_data=null: empty)
            continue
        phases = {k: m[f"time/{k}"] for k in ("rollout", "teacher", "learner", "sync")}
        # The step's wall clock (the phases and the driver's work around them), as TRL's step is
        # timed from its start to its end; the sum of the phases where a run predates it.
        step_seconds = m.get("time/step", sum(phases.values()))
        steps.append({"step": m["step"], "seconds": step_seconds, **{f"time/{k}": v for k, v in phases.items()},
                      "response_tokens": m["valid_tokens"], "trained_tokens": m["kept_tokens"],
                      "truncated": m["truncated"], "loss": m["loss"],
                      "learner_peak_memory_mb": m["learner_peak_memory_mb"],
                      **{k: v for k, v in m.items() if k.startswith("learner_time/")}})
    # The final checkpoint (DeepSpeed state and HF export, about 1.5 GB a SmolLM2 run) is not a
    # result: only the metrics, config and logs stay.
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {"name": name, "wall_seconds": wall, "load_average": LOAD[name], "steps": steps}


def run_trl(setup: Setup, prompts: Path, workdir: Path, threads: int | None) -> dict:
    """One TRL ``DistillationTrainer`` run in bench/.venv-trl with ``threads`` torch threads (None: torch's
    default, one per core)."""
    name = "trl" if threads is None else f"trl-{threads}thread"
    out = workdir / f"{name}.json"
    wall = _run([str(TRL_PYTHON), str(ROOT / "bench" / "trl_worker.py"), "--student", setup.student,
                 "--teacher", setup.teacher, "--prompts", str(prompts), "--steps", str(setup.steps),
                 "--batch", str(setup.prompts_per_step), "--micro-batch", str(setup.micro_batch_size),
                 "--max-new-tokens", str(setup.max_new_tokens), "--lr", str(setup.lr), "--out", str(out),
                 *(["--threads", str(threads)] if threads else [])],
                workdir / f"{name}.log", {"OMP_NUM_THREADS": str(threads)} if threads else None)
    doc = json.loads(out.read_text())
    for s in doc["steps"]:
        s["trained_tokens"] = s["response_tokens"]  # TRL trains on every response token
    return {"name": name, "wall_seconds": wall, "load_average": LOAD[name], **doc}


def tip_startup_profile(overrides: list[str]) -> dict:
    """In this process: the seconds of each part of a tip_ray run outside its steps.

    The same calls as ``tip-ray train`` (compose, ``Trainer``, ``fit``, ``close``), each timed.
    ``Trainer(cfg)`` starts Ray, reserves the pools and builds the learner group (DeepSpeed); the
    rollout and teacher actors construct in the background and the first step waits for them.
    """
    start = time.perf_counter()
    from tip_ray.cli import compose
    from tip_ray.trainer import Trainer

    marks = {"imports": time.perf_counter() - start}
    t = time.perf_counter()
    cfg = compose("train", overrides)
    trainer = Trainer(cfg)
    marks["trainer_init"] = time.perf_counter() - t
    t = time.perf_counter()
    try:
        trainer.fit()
        marks["fit"] = time.perf_counter() - t
    finally:
        t = time.perf_counter()
        trainer.close()
        marks["close"] = time.perf_counter() - t
    return marks


def run_startup_profile(setup: Setup, workdir: Path) -> dict:
    """One extra tip_ray (`all`) run, in its own process, with its start-up split into parts."""
    out = workdir / "tip_ray-startup-profile"
    shutil.rmtree(out, ignore_errors=True)
    log = workdir / "tip_ray-startup-profile.log"
    wall = _run([sys.executable, __file__, "--startup-profile-case", json.dumps(tip_overrides(setup, "all", 1.0, out))],
                log)
    marks = json.loads(log.read_text().strip().splitlines()[-1])
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    seconds = [sum(m[f"time/{k}"] for k in ("rollout", "teacher", "learner", "sync")) for m in steps if "loss" in m]
    steady = sum(seconds[setup.warmup_steps:]) / len(seconds[setup.warmup_steps:])
    return {**marks, "process_wall": wall, "interpreter_and_rest": wall - sum(marks.values()),
            "first_step": seconds[0], "steady_step": steady, "first_step_excess": seconds[0] - steady,
            "fit_outside_steps": marks["fit"] - sum(seconds)}


def summarize(run: dict, warmup: int, sequences_per_step: int) -> dict:
    """Steady-state throughput and per-phase seconds per step over the steps after ``warmup``."""
    steady = [s for s in run["steps"] if s["step"] > warmup]
    seconds = sum(s["seconds"] for s in steady)
    median = statistics.median(s["seconds"] for s in steady)
    tokens = sum(s["response_tokens"] for s in steady) / len(steady)
    phases = sorted({k for s in steady for k in s if k.startswith("time/")})
    return {
        "name": run["name"],
        "steps_measured": len(steady),
        "seconds_per_step": seconds / len(steady),
        "median_seconds_per_step": median,
        "response_tokens_per_step": tokens,
        "median_step_response_tokens_per_second": tokens / median,
        "best_seconds_per_step": min(s["seconds"] for s in steady),
        "best_step_response_tokens_per_second": max(s["response_tokens"] / s["seconds"] for s in steady),
        "response_tokens_per_second": sum(s["response_tokens"] for s in steady) / seconds,
        "trained_tokens_per_second": sum(s["trained_tokens"] for s in steady) / seconds,
        "peak_memory_mb": peak_memory_mb(run),
        "phase_seconds_per_step": {k[5:]: sum(s[k] for s in steady) / len(steady) for k in phases},
        "learner_phase_seconds_per_step": {k[len("learner_time/"):]: sum(s.get(k, 0.0) for s in steady) / len(steady)
                                           for k in sorted({k for s in steady for k in s
                                                            if k.startswith("learner_time/")})},
        "truncated_share": sum(s["truncated"] for s in steady) / (len(steady) * sequences_per_step),
        "wall_seconds": run["wall_seconds"],
        "repeats": run.get("repeats", 1),
        "load_average_before_after": run["load_average"],
        "outside_steps_seconds": run["wall_seconds"] - sum(s["seconds"] for s in run["steps"]) / run.get("repeats", 1),
    }


def _peak_mb(step: dict) -> float:
    """A step record's running peak, MiB: tip_ray's learner peak per rank, TRL's process peak RSS."""
    return step["learner_peak_memory_mb"] if "learner_peak_memory_mb" in step else step.get("peak_rss_mb", float("nan"))


def peak_memory_mb(run: dict, at_step: int | None = None) -> float:
    """The peak of ``run`` over its whole run(s), or as it stood after step ``at_step`` (the largest over
    repeats)."""
    return max(_peak_mb(s) for s in run["steps"] if at_step is None or s["step"] == at_step)


def merge_repeats(runs: list[dict]) -> dict:
    """One record for repeated runs of a case: every run's steps pooled (each run's warm-up steps
    are still left out by ``summarize``), the mean wall time, the lowest load before and the
    highest after."""
    if len(runs) == 1:
        return runs[0]
    return {"name": runs[0]["name"], "repeats": len(runs), "wall_seconds": statistics.mean(r["wall_seconds"] for r in runs),
            "load_average": (min(r["load_average"][0] for r in runs), max(r["load_average"][1] for r in runs)),
            "steps": [step for r in runs for step in r["steps"]]}


def report(setup: Setup, summaries: list[dict]) -> dict:
    """Print the table and return the JSON document (ratios to the faster TRL run, target verdict)."""
    from rich.console import Console
    from rich.table import Table

    trl = max((s for s in summaries if s["name"].startswith("trl")), key=lambda s: s["response_tokens_per_second"])
    for s in summaries:
        s["throughput_vs_trl"] = s["response_tokens_per_second"] / trl["response_tokens_per_second"]
        for kind in ("median", "best"):
            s[f"{kind}_throughput_vs_trl"] = (s[f"{kind}_step_response_tokens_per_second"]
                                              / trl[f"{kind}_step_response_tokens_per_second"])
        s["step_time_vs_trl"] = s["seconds_per_step"] / trl["seconds_per_step"]
    table = Table(title=f"on-policy distillation, {setup.student} <- {setup.teacher}: {setup.prompts_per_step} "
                        f"prompts/step, max_new_tokens {setup.max_new_tokens}, steps {setup.warmup_steps + 1}-"
                        f"{setup.steps} of each run measured")
    table.add_column("run", justify="right", no_wrap=True)  # the other columns give way, the names stay whole
    for col in ("s/step", "median", "best", "rollout", "teacher", "learner", "sync", "resp tok/step",
                "resp tok/s", "trained tok/s", "x TRL", "x TRL median", "x TRL best", "startup+teardown s", "load 1m"):
        table.add_column(col, justify="right")
    for s in summaries:
        p = s["phase_seconds_per_step"]
        table.add_row(s["name"], f"{s['seconds_per_step']:.2f}", f"{s['median_seconds_per_step']:.2f}",
                      f"{s['best_seconds_per_step']:.2f}",
                      *(f"{p.get(k, 0.0):.2f}" for k in ("rollout", "teacher", "learner", "sync")),
                      f"{s['response_tokens_per_step']:.0f}", f"{s['response_tokens_per_second']:.0f}",
                      f"{s['trained_tokens_per_second']:.0f}", f"{s['throughput_vs_trl']:.2f}",
                      f"{s['median_throughput_vs_trl']:.2f}", f"{s['best_throughput_vs_trl']:.2f}",
                      f"{s['outside_steps_seconds']:.0f}",
                      "{:.1f}/{:.1f}".format(*s["load_average_before_after"]))
    Console(width=None if sys.stdout.isatty() else 190).print(table)
    # Like for like when it ran; else (``--skip tip_ray-all``) the pair's own `all` at its top-k.
    tip_all = next((s for s in summaries if s["name"] == "tip_ray-all"), None) or next(
        s for s in summaries if s["name"].startswith("tip_ray-all"))
    target = TARGET_RATIO["pair" if setup.pair else "embedded"]
    verdict = tip_all["throughput_vs_trl"] >= target
    print(f"{tip_all['name']} / TRL ({trl['name']}, the faster TRL run) response tokens/s = "
          f"{tip_all['throughput_vs_trl']:.2f} (median steps: {tip_all['median_throughput_vs_trl']:.2f}, "
          f"best steps: {tip_all['best_throughput_vs_trl']:.2f}) "
          f"(target >= {target}: {'ok' if verdict else 'MISSED'})")
    return {"setup": asdict(setup), "target_ratio": target, "meets_target": verdict, "trl_baseline": trl["name"],
            "results": summaries}


def learner_seconds(run: dict, last_step: int) -> dict[str, float]:
    """Mean learner seconds per step of a tip_ray ``run`` over steps 2 .. ``last_step`` (step 1 is
    warm-up; the same steps, hence the same prompts, for every run): ``learner`` (``time/learner``)
    and its ``learner_time/*`` phases."""
    steps = [s for s in run["steps"] if 2 <= s["step"] <= last_step] or [s for s in run["steps"] if s["step"] <= last_step]
    keys = ["time/learner", *sorted({k for s in steps for k in s if k.startswith("learner_time/")})]
    return {k.split("/", 1)[1]: sum(s.get(k, 0.0) for s in steps) / len(steps) for k in keys}


def memory_report(trl: dict, ratio_runs: list[tuple[float, dict]], at_step: int) -> dict:
    """Print the memory table (the learner peak per rank at each ratio against TRL's process peak) and
    return its JSON section."""
    from rich.console import Console
    from rich.table import Table

    trl_at, trl_peak = peak_memory_mb(trl, at_step), peak_memory_mb(trl)
    base_learner = next((learner_seconds(run, at_step)["learner"] for r, run in ratio_runs if r == 1.0), None)
    rows = [{"name": trl["name"], "what": "process peak RSS (student, teacher, optimizer, generation)",
             "steps": max(s["step"] for s in trl["steps"]), f"peak_at_step_{at_step}_mb": trl_at, "peak_mb": trl_peak}]
    for ratio, run in ratio_runs:
        at, peak = peak_memory_mb(run, at_step), peak_memory_mb(run)
        rows.append({"name": run["name"], "what": "learner peak RSS per rank (largest rank)", "ratio": ratio,
                     "rule": "all" if ratio == 1.0 else "soft_or",
                     "steps": max(s["step"] for s in run["steps"]), f"peak_at_step_{at_step}_mb": at, "peak_mb": peak,
                     f"peak_at_step_{at_step}_vs_trl": at / trl_at, "peak_vs_trl_peak": peak / trl_peak,
                     "learner_seconds": learner_seconds(run, at_step)})
        if base_learner:
            rows[-1]["learner_vs_ratio_1"] = rows[-1]["learner_seconds"]["learner"] / base_learner
    table = Table(title=f"peak memory: tip_ray's learner per rank at each ratio vs {trl['name']}'s process peak "
                        f"(step {at_step} of every run; and over each whole run)")
    for col in ("run", "ratio", "steps", f"peak @ step {at_step} MiB", "x TRL", "run peak MiB", "x TRL peak",
                "learner s", "x ratio 1", "statistics", "gradient", "optimizer"):
        table.add_column(col, justify="right")
    for r in rows:
        split = r.get("learner_seconds", {})
        table.add_row(r["name"], f"{r['ratio']:.2f} ({r['rule']})" if "ratio" in r else "-", str(r["steps"]),
                      f"{r[f'peak_at_step_{at_step}_mb']:.0f}",
                      f"{r[f'peak_at_step_{at_step}_vs_trl']:.2f}" if "ratio" in r else "1.00",
                      f"{r['peak_mb']:.0f}", f"{r['peak_vs_trl_peak']:.2f}" if "ratio" in r else "1.00",
                      f"{split['learner']:.2f}" if split else "-",
                      f"{r['learner_vs_ratio_1']:.2f}" if "learner_vs_ratio_1" in r else "-",
                      *(f"{split[k]:.2f}" if k in split else "-" for k in ("statistics", "gradient", "optimizer")))
    Console(width=None if sys.stdout.isatty() else 150).print(table)
    return {"at_step": at_step, "trl_baseline": trl["name"], "results": rows}


def main() -> int:
    """Run the cases (TRL and tip_ray alternating), print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", help="a tip_ray pair preset (tip_ray/conf/pair/PAIR.yaml, e.g. smollm2): its "
                        "student, teacher, prompts and sizes; default: the embedded pair")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the averages")
    parser.add_argument("--prompts-per-step", type=int, help="default: 32, or the pair's")
    parser.add_argument("--micro-batch-size", type=int, help="default: 8, or the pair's")
    parser.add_argument("--max-new-tokens", type=int, help="default: 96, or the pair's")
    parser.add_argument("--lr", type=float, help="default: 3e-4, or the pair's")
    parser.add_argument("--student", help=f"default: {EMBEDDED['student']}, or the pair's")
    parser.add_argument("--teacher", help=f"default: {EMBEDDED['teacher']}, or the pair's")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of every case (interleaved); each case's steps are pooled over its rounds")
    parser.add_argument("--ratios", type=float, nargs="+",
                        help="also the learner's peak memory per rank at these soft_or ratios (1.0: the `all` case) "
                             "against TRL's process peak, e.g. 1.0 0.5 0.2 0.1")
    parser.add_argument("--ratio-steps", type=int, default=3,
                        help="steps of each extra ratio run, and the step at which every run's peak is compared "
                             "(>= 2: the optimizer states are made in step 1)")
    parser.add_argument("--skip", nargs="+", default=[], metavar="CASE",
                        help="leave these cases out, e.g. tip_ray-all (the full-distribution case, the slowest); "
                             "TRL and at least one tip_ray `all` case must remain")
    parser.add_argument("--tag", default=None, help="suffix of the result file and run folder (another pair, say); "
                        "default: the pair's name")
    parser.add_argument("--overlap", action="store_true",
                        help="with --pair: also the pair's top-k cases in trainer.mode=overlap (the embedded pair "
                             "always runs both modes)")
    parser.add_argument("--startup-profile", action="store_true",
                        help="also run tip_ray once more with its start-up split into parts")
    parser.add_argument("--startup-profile-case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.startup_profile_case:
        print(json.dumps(tip_startup_profile(json.loads(args.startup_profile_case))))
        return 0
    if args.warmup_steps >= args.steps:
        parser.error("--warmup-steps must be below --steps")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.ratios and not 1 <= args.ratio_steps <= args.steps:
        parser.error("--ratio-steps must be between 1 and --steps")
    if args.ratios and not all(0 < r <= 1 for r in args.ratios):
        parser.error("--ratios must be in (0, 1]")
    base = pair_defaults(args.pair) if args.pair else {**EMBEDDED, "top_k": None}
    sizes = {k: base[k] if getattr(args, k) is None else getattr(args, k) for k in EMBEDDED}
    for path in (sizes["student"], sizes["teacher"]):
        if not (ROOT / path / "config.json").is_file():
            raise SystemExit(f"{path} is missing: run `tip-ray "
                             f"{f'prepare-pair {args.pair}' if args.pair else 'prepare-demo'}` first")
    if not TRL_PYTHON.is_file():
        raise SystemExit("bench/.venv-trl is missing: run `bash bench/setup_trl_env.sh` first")
    setup = Setup(args.steps, args.warmup_steps, sizes["prompts_per_step"], sizes["micro_batch_size"],
                  sizes["max_new_tokens"], sizes["lr"], sizes["student"], sizes["teacher"], args.pair)

    tag = args.pair if args.tag is None else args.tag
    name = "trl_comparison" + (f"-{tag}" if tag else "")
    workdir = RESULTS / name
    workdir.mkdir(parents=True, exist_ok=True)
    prompts = workdir / "prompts.jsonl"
    print(f"wrote {write_prompts(setup, prompts)} prompts to {prompts.relative_to(ROOT)}", file=sys.stderr)
    if setup.pair:
        # A real pair: TRL with torch's default threads only (one thread only pays off on a tiny model),
        # tip_ray like for like (full distribution: `all` and `soft_or` 0.5), then at the pair's own
        # teacher top-k: `all` and `soft_or` 0.5, which the ratio runs reuse.
        own = [] if base["top_k"] is None else [TipCase("all", 1.0, top_k=base["top_k"]),
                                                TipCase("soft_or", 0.5, top_k=base["top_k"])]
        if args.overlap:  # the same two in overlap mode (one update stale)
            own += [replace(c, mode="overlap") for c in own]
        tip_cases = [TipCase("all", 1.0), TipCase("soft_or", 0.5), *own]
        cases = [("trl", lambda: run_trl(setup, prompts, workdir, None)),
                 *((c.name, lambda c=c: run_tip(setup, c, workdir)) for c in tip_cases)]
    else:
        # TRL twice: torch's default threads (one per core) and one thread, which on a small model
        # can be faster (no cross-thread synchronisation per tiny kernel); the faster is the baseline.
        tip_cases = [TipCase("all", 1.0), TipCase("soft_or", 0.5), TipCase("all", 1.0, "overlap"),
                     TipCase("soft_or", 0.5, "overlap")]
        cases = [("trl", lambda: run_trl(setup, prompts, workdir, None)),
                 (tip_cases[0].name, lambda: run_tip(setup, tip_cases[0], workdir)),
                 ("trl-1thread", lambda: run_trl(setup, prompts, workdir, 1)),
                 *((c.name, lambda c=c: run_tip(setup, c, workdir)) for c in tip_cases[1:])]
    known = [case for case, _ in cases]
    unknown = [c for c in args.skip if c not in known]
    if unknown or "trl" in args.skip or not [c for c in known if c.startswith("tip_ray-all") and c not in args.skip]:
        parser.error(f"--skip: cases are {', '.join(known)}; TRL and one tip_ray `all` case must remain "
                     f"(got {' '.join(args.skip)})")
    cases = [(case, runner) for case, runner in cases if case not in args.skip]
    tip_cases = [c for c in tip_cases if c.name not in args.skip]
    # The memory ratios: a case already run reuses it; any other ratio is one short run more.
    ratio_top_k = base["top_k"] if setup.pair else None  # a pair's ratio runs use its own teacher signal
    ratio_cases = [(r, TipCase("all", 1.0, top_k=ratio_top_k) if r == 1.0 else TipCase("soft_or", r, top_k=ratio_top_k))
                   for r in dict.fromkeys(args.ratios or [])]
    extra = [replace(c, steps=args.ratio_steps) for _, c in ratio_cases if c not in tip_cases]
    cases += [(c.name, lambda c=c: run_tip(setup, c, workdir)) for c in extra]
    rounds: dict[str, list[dict]] = {case: [] for case, _ in cases}
    for round_index in range(args.repeats):
        for case, runner in cases:
            print(f"  running {case} (round {round_index + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
            rounds[case].append(runner())
            print(f"  {case}: {rounds[case][-1]['wall_seconds']:.0f} s wall", file=sys.stderr, flush=True)
    runs = {case: merge_repeats(r) for case, r in rounds.items()}
    extra_names = {c.name for c in extra}
    doc = report(setup, [summarize(r, setup.warmup_steps, setup.prompts_per_step)
                         for case, r in runs.items() if case not in extra_names])
    if ratio_cases:
        doc["memory"] = memory_report(runs[doc["trl_baseline"]], [(r, runs[c.name]) for r, c in ratio_cases],
                                      args.ratio_steps)
    if args.startup_profile:
        print("  running the tip_ray start-up profile ...", file=sys.stderr, flush=True)
        doc["tip_ray_startup_profile"] = profile = run_startup_profile(setup, workdir)
        print("tip_ray start-up (s): " + ", ".join(f"{k} {v:.1f}" for k, v in profile.items()))
    doc["raw"] = {case: r for case, r in rounds.items()}
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0 if doc["meets_target"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
