"""One-call GPU check (issue 13): the CUDA test suite and the learner's peak memory on one GPU.

On a GPU machine with Python 3.12, torch + CUDA and transformers (no Ray, no vLLM, no DeepSpeed),
in four timed phases:

1. setup: install the wheels carried in ``.gpu_wheels/`` (DeepSpeed and the packages it imports
   that the machine lacks; ``make gpu-wheels`` fills the folder) into a target folder put on the
   path. A wheel whose distribution is already installed at its version or newer is skipped, so a
   second run on a warm machine installs nothing. Then report the versions and whether DeepSpeed
   imports.
2. checkpoints: a tiny random Qwen3-shaped student at vocabulary 151,936 in bf16
   (``tests/gpu/tiny_qwen3.py``).
3. suite: ``pytest tests/gpu`` in a child process; one PASS/FAIL/SKIP line per test (from its
   JUnit XML).
4. memory: the real ``LearnerWorker`` in a child process (DeepSpeed ZeRO-2, bf16, world size 1,
   NCCL, gradient checkpointing when the learner has that setting), one training step on 8
   sequences x 1024 tokens at selection ratios 1.0 / 0.5 / 0.1 (rule ``soft_or``), with
   ``torch.cuda.max_memory_allocated`` reset before each.

It then prints the memory table (peaks and their ratios to ratio 1.0), writes everything as JSON
and exits 1 if any check failed. Without a CUDA device it exits 2 and says so: it never falls back
to the CPU. The whole run is budgeted to finish within 8 minutes on one H200 (``--budget-s``).

The device command (the session's ``run`` tool), after ``make gpu-wheels`` on the development
machine::

    command:   PYTHONUNBUFFERED=1 python3 bench/gpu_check.py
    carry:     [".gpu_wheels"]
    timeout_s: 540

It writes ``$OUT/gpu_check.json`` and, beside it, ``gpu_check_pytest.log``,
``gpu_check_junit.xml`` and ``gpu_check_memory.log``; without ``OUT`` they go to ``bench/results/``.

The logic runs anywhere in the CPU smoke mode (no install, gloo, vocabulary 512, a small batch;
the suite's tests skip themselves without CUDA)::

    .venv/bin/python bench/gpu_check.py --cpu-smoke --out /tmp/gpu_check.json

``--check-wheels DIR`` checks a wheel folder for the GPU machine (Python 3.12, x86-64 manylinux,
one version per package, size) and is what ``make gpu-wheels`` ends with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tip_ray.config import LearnerConfig
    from tip_ray.types import TrainBatch

# Only the standard library is imported at module level: the carried wheels (typing-extensions
# among them) must be on sys.path before anything imports torch.

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".gpu_wheels"
SITE = Path(tempfile.gettempdir()) / "tip_ray_gpu_site"
RATIOS = (1.0, 0.5, 0.1)
RULE = "soft_or"
# The device tool carries at most 64 MiB, the git working tree included (about 10 MB).
WHEEL_LIMIT_BYTES = 32 * 2**20
MIB = 2**20


@dataclass(frozen=True)
class Plan:
    """Model and batch sizes of one mode."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str  # the learner's dtype ("bf16" or "fp32"); checkpoints are saved in bf16 either way
    sequences: int
    seq_len: int
    prompt_len: int
    micro_batch: int
    teacher_k: int
    zero_stage: int = 2


# The lm_head (151,936 x 256) dwarfs the 2-layer backbone: the figures are the selection's effect.
GPU_PLAN = Plan(vocab=151_936, hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, dtype="bf16", sequences=8,
                seq_len=1024, prompt_len=128, micro_batch=8, teacher_k=32)
# DeepSpeed's CPU accelerator has no bf16 optimizer path; the smoke mode checks logic, not numbers.
SMOKE_PLAN = Plan(vocab=512, hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32, dtype="fp32", sequences=4,
                  seq_len=64, prompt_len=8, micro_batch=2, teacher_k=8)


@dataclass
class Check:
    """One line of the verdict."""

    name: str
    outcome: str  # PASS, FAIL or SKIP
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Report:
    """Everything the run found; printed as it goes and written as JSON at the end."""

    mode: str
    started: float = field(default_factory=time.perf_counter)
    checks: list[Check] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    error: str = ""

    def add(self, check: Check) -> None:
        """Record ``check`` and print its line."""
        self.checks.append(check)
        first = check.detail.strip().splitlines()[0][:160] if check.detail.strip() else ""
        suffix = f"  ({check.seconds:.1f} s)" if check.seconds >= 0.05 else ""
        print(f"{check.outcome:<4}  {check.name}{suffix}" + (f"  -- {first}" if first and check.outcome != "PASS" else ""),
              flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.checks) and all(c.outcome != "FAIL" for c in self.checks)

    def to_json(self, plan: Plan) -> dict[str, Any]:
        counts = {k: sum(c.outcome == k for c in self.checks) for k in ("PASS", "FAIL", "SKIP")}
        return {"mode": self.mode, "ok": self.ok, "error": self.error, "elapsed_s": round(self.elapsed(), 1),
                "phases_s": {k: round(v, 1) for k, v in self.phases.items()}, "counts": counts,
                "environment": self.environment, "plan": asdict(plan), "checks": [asdict(c) for c in self.checks],
                "memory": self.memory, "files": self.files}


class Phase:
    """Times a phase into ``report.phases`` and prints its elapsed time."""

    def __init__(self, report: Report, name: str) -> None:
        self.report, self.name = report, name

    def __enter__(self) -> Phase:
        print(f"== {self.name} (at {self.report.elapsed():.0f} s)", flush=True)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        seconds = time.perf_counter() - self.start
        self.report.phases[self.name] = seconds
        print(f"== {self.name}: {seconds:.1f} s (total {self.report.elapsed():.0f} s)", flush=True)


# ---------------------------------------------------------------------------------------------
# Wheels


@dataclass(frozen=True)
class Wheel:
    """A wheel file's name parsed (PEP 427): distribution, version and tags."""

    path: Path
    dist: str
    version: str
    python: str
    abi: str
    platform: str

    @classmethod
    def parse(cls, path: Path) -> Wheel:
        parts = path.name[: -len(".whl")].split("-")
        if len(parts) not in (5, 6):
            raise ValueError(f"{path.name} is not a wheel file name")
        return cls(path, parts[0], parts[1], *parts[-3:])

    @property
    def key(self) -> str:
        """The distribution's normalized name (PEP 503)."""
        return re.sub(r"[-_.]+", "-", self.dist).lower()

    @property
    def binary(self) -> bool:
        return self.platform != "any"

    def problem(self) -> str:
        """Why the GPU machine (CPython 3.12, x86-64 Linux) cannot install it, or ''."""
        pythons, abis, platforms = (set(t.split(".")) for t in (self.python, self.abi, self.platform))
        if not pythons & {"cp312", "py3", "py312"}:
            return f"{self.path.name}: python tag {self.python} is not for CPython 3.12"
        if not abis & {"cp312", "abi3", "none"}:
            return f"{self.path.name}: ABI tag {self.abi} is not CPython 3.12's"
        if platforms != {"any"} and not any(p.startswith("manylinux") and p.endswith("x86_64") for p in platforms):
            return f"{self.path.name}: platform {self.platform} is not x86-64 manylinux"
        return ""


def check_wheels(folder: Path, limit_bytes: int = WHEEL_LIMIT_BYTES) -> tuple[list[Wheel], list[str]]:
    """The wheels in ``folder`` and the reasons they would not install on the GPU machine."""
    if not folder.is_dir():
        return [], [f"{folder} does not exist: run `make gpu-wheels`"]
    wheels, problems = [], []
    for path in sorted(folder.glob("*.whl")):
        try:
            wheels.append(Wheel.parse(path))
        except ValueError as exc:
            problems.append(str(exc))
    problems += [p for p in (w.problem() for w in wheels) if p]
    seen: dict[str, str] = {}
    for w in wheels:
        if w.key in seen and seen[w.key] != w.version:
            problems.append(f"{w.key}: two versions ({seen[w.key]}, {w.version}); pip refuses the install")
        seen[w.key] = w.version
    total = sum(w.path.stat().st_size for w in wheels)
    if total > limit_bytes:
        problems.append(f"the wheels take {total / MIB:.1f} MiB, over the {limit_bytes / MIB:.0f} MiB kept for them")
    if not wheels:
        problems.append(f"no wheels in {folder}")
    return wheels, problems


def _installed_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _at_least(installed: str, wanted: str) -> bool:
    try:
        from packaging.version import Version

        return Version(installed) >= Version(wanted)
    except Exception:  # no packaging, or a version it cannot parse: only an exact match counts
        return installed == wanted


def install_wheels(folder: Path, target: Path) -> Check:
    """Install what ``folder`` holds and the interpreter lacks into ``target`` (put first on
    sys.path; child processes get it through PYTHONPATH, see ``child_env``)."""
    start = time.perf_counter()
    target.mkdir(parents=True, exist_ok=True)
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    wheels, problems = check_wheels(folder)
    if problems:
        return Check("setup: carried wheels", "FAIL", time.perf_counter() - start, "; ".join(problems))
    needed = [w for w in wheels if not _at_least(_installed_version(w.dist) or "0", w.version)]
    if not needed:
        return Check("setup: carried wheels", "PASS", time.perf_counter() - start,
                     f"all {len(wheels)} already installed")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(target), *(str(w.path) for w in needed)]
    result = subprocess.run(command, capture_output=True, text=True)
    import importlib

    importlib.invalidate_caches()
    names = ", ".join(f"{w.dist} {w.version}" for w in needed)
    if result.returncode != 0:
        return Check("setup: carried wheels", "FAIL", time.perf_counter() - start,
                     f"pip install failed ({names}): {(result.stdout + result.stderr)[-1500:]}")
    return Check("setup: carried wheels", "PASS", time.perf_counter() - start, f"installed {names}")


# ---------------------------------------------------------------------------------------------
# Child processes


def child_env(site: Path | None, smoke: bool) -> dict[str, str]:
    """The environment of every child: the repository and the installed wheels on the path; the
    smoke mode hides any GPU so the learner takes gloo on the CPU."""
    env = dict(os.environ)
    paths = [str(ROOT)] + ([str(site)] if site else []) + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_logged(command: list[str], env: dict[str, str], timeout_s: float, log: Path) -> tuple[int | None, str]:
    """Run ``command`` in its own process group with stdout+stderr to ``log``; kill the whole group
    at ``timeout_s`` (returns None then). Returns the exit code and the log's last 4000 characters."""
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code: int | None = process.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the group is this child's alone
            process.wait()
            code = None
    return code, log.read_text(errors="replace")[-4000:]


def probe_cuda(env: dict[str, str]) -> tuple[bool, str]:
    """Whether torch sees a CUDA device, asked in a child (this process must not import torch
    before the wheels are installed)."""
    code = ("import torch; print('CUDA' if torch.cuda.is_available() else 'NOCUDA', torch.__version__, "
            "torch.version.cuda)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    line = (result.stdout.strip().splitlines() or [""])[-1]
    if result.returncode != 0:
        return False, f"torch does not import: {result.stderr[-800:]}"
    return line.startswith("CUDA "), line


_ENV_PROBE = r"""
import json, os, shutil, sys
info = {"python": sys.version.split()[0], "executable": sys.executable}
import torch, transformers
info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
            device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            transformers=transformers.__version__, nvcc=shutil.which("nvcc"), cuda_home=os.environ.get("CUDA_HOME"))
try:
    import deepspeed, pydantic
    info.update(deepspeed=deepspeed.__version__, deepspeed_path=os.path.dirname(deepspeed.__file__),
                pydantic=pydantic.VERSION)
except Exception as exc:
    info["deepspeed_error"] = f"{type(exc).__name__}: {exc}"
print("GPU_CHECK_ENV " + json.dumps(info))
"""


def probe_environment(env: dict[str, str]) -> tuple[dict[str, Any], Check]:
    """Versions, the device, and whether DeepSpeed imports (a child process, as the tests see it)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _ENV_PROBE], capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("GPU_CHECK_ENV ")]
    if result.returncode != 0 or not lines:
        return {}, Check("setup: torch, transformers and deepspeed import", "FAIL", time.perf_counter() - start,
                         (result.stdout + result.stderr)[-1500:])
    info = json.loads(lines[-1].split(" ", 1)[1])
    error = info.get("deepspeed_error", "")
    return info, Check("setup: torch, transformers and deepspeed import", "FAIL" if error else "PASS",
                       time.perf_counter() - start, error or f"deepspeed {info['deepspeed']} on {info['device']}")


# ---------------------------------------------------------------------------------------------
# The suite


def parse_junit(path: Path, prefix: str = "suite: ") -> list[Check]:
    """One check per test case of a pytest JUnit XML file; a case's worst outcome wins (a test
    that passed but whose teardown failed is a FAIL)."""
    rank = {"PASS": 0, "SKIP": 1, "FAIL": 2}
    found: dict[str, Check] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = "::".join(p for p in (case.get("classname", ""), case.get("name", "")) if p)
        outcome, detail = "PASS", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "FAIL"
                detail = f"{child.get('message', '')}\n{(child.text or '')[-1500:]}".strip()
            elif child.tag == "skipped" and outcome == "PASS":
                outcome, detail = "SKIP", child.get("message", "")
        check = Check(prefix + name, outcome, float(case.get("time", 0) or 0), detail)
        if name not in found or rank[outcome] > rank[found[name].outcome]:
            found[name] = check
    return list(found.values())


_VERBOSE_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.MULTILINE)


def parse_verbose(text: str, prefix: str = "suite: ") -> list[Check]:
    """The per-test lines of ``pytest -v`` output: what is left when pytest was killed before it
    wrote its XML."""
    outcome = {"PASSED": "PASS", "XFAIL": "PASS", "XPASS": "PASS", "SKIPPED": "SKIP", "FAILED": "FAIL", "ERROR": "FAIL"}
    return [Check(prefix + name, outcome[word]) for name, word in _VERBOSE_LINE.findall(text)]


def _has_pytest_timeout(env: dict[str, str]) -> bool:
    result = subprocess.run([sys.executable, "-c", "import pytest_timeout"], capture_output=True, env=env, cwd=ROOT)
    return result.returncode == 0


def run_suite(paths: list[str], env: dict[str, str], timeout_s: float, out_dir: Path, smoke: bool,
              per_test_timeout_s: float = 240.0) -> list[Check]:
    """``pytest`` on ``paths`` in a child process; one check per test, plus one for pytest itself
    when it crashed, ran out of time or found no tests."""
    start = time.perf_counter()
    junit, log = out_dir / "gpu_check_junit.xml", out_dir / "gpu_check_pytest.log"
    junit.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", *paths, "-v", "-rfEs", "--tb=short", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
    if _has_pytest_timeout(env):
        command.append(f"--timeout={int(per_test_timeout_s)}")
    code, tail = run_logged(command, env, timeout_s, log)
    seconds = time.perf_counter() - start
    checks = parse_junit(junit) if junit.is_file() else parse_verbose(log.read_text(errors="replace"))
    if code is None:
        checks.append(Check("suite: pytest finished in time", "FAIL", seconds,
                            f"killed after {timeout_s:.0f} s; the tests listed ran before that\n{tail}"))
    elif code == 5 or (code == 0 and not checks):
        # pytest's exit code 5: no tests collected.
        checks.append(Check("suite: tests collected", "SKIP" if smoke else "FAIL", seconds,
                            f"pytest collected no tests under {' '.join(paths)}"))
    elif code not in (0, 1):
        checks.append(Check("suite: pytest ran", "FAIL", seconds, f"pytest exited with {code}\n{tail}"))
    elif code == 1 and not any(c.outcome == "FAIL" for c in checks):
        checks.append(Check("suite: pytest ran", "FAIL", seconds, f"pytest reported failures\n{tail}"))
    return checks


# ---------------------------------------------------------------------------------------------
# The learner's peak memory (runs in a child: `--memory-child RESULT`)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_batch(plan: Plan, seed: int = 0) -> TrainBatch:
    """A CPU ``TrainBatch`` as the rollout and teacher pools hand it to a learner rank: every row
    full length (random students never stop early), a prompt of ``plan.prompt_len`` tokens, and a
    top-K teacher signal with distinct ids per position."""
    import torch

    from tip_ray.tip import TeacherSignal
    from tip_ray.types import TrainBatch

    g = torch.Generator().manual_seed(seed)
    b, length, vocab, k = plan.sequences, plan.seq_len, plan.vocab, plan.teacher_k
    ids = torch.randint(0, vocab, (b, length), generator=g)
    attention = torch.ones(b, length, dtype=torch.long)
    loss_mask = torch.zeros(b, length - 1, dtype=torch.bool)
    loss_mask[:, plan.prompt_len - 1 :] = True
    base = torch.randint(0, vocab, (b, length - 1, 1), generator=g)
    topk_ids = ((base + torch.arange(k) * (vocab // k)) % vocab).to(torch.int32)
    # 90% of the mass in the top K, sorted as a teacher sends it.
    topk_logprobs = torch.log_softmax(torch.randn(b, length - 1, k, generator=g) * 2, -1).sort(-1, descending=True)[0]
    topk_logprobs = topk_logprobs + math.log(0.9)
    sampled = -8 * torch.rand(b, length - 1, generator=g) - 0.01
    return TrainBatch(ids, attention, loss_mask, TeacherSignal(topk_ids, topk_logprobs, sampled))


def learner_config(plan: Plan, model: str) -> LearnerConfig:
    """The learner's settings: ZeRO-2, AdamW, one rank; gradient checkpointing on wherever the
    ``LearnerConfig`` has that setting (it is being added, issue 13 finding 5)."""
    from tip_ray.config import LearnerConfig

    names = {f.name for f in dataclasses.fields(LearnerConfig)}
    extra = {"gradient_checkpointing": True} if "gradient_checkpointing" in names else {}
    return LearnerConfig(model=model, world_size=1, zero_stage=plan.zero_stage, dtype=plan.dtype, optimizer="adamw",
                         lr=1e-5, grad_clip=1.0, global_batch_size=plan.sequences, micro_batch_size=plan.micro_batch,
                         **extra)


def memory_child(plan: Plan, model: str, result_path: Path, smoke: bool) -> int:
    """One LearnerWorker; a warm-up step (the optimizer's state is created at the first step),
    then one measured step per ratio. The worker is kept across the cases, only its selection
    changes, so every case starts from the same weights-gradients-optimizer footprint. Writes the
    result after every case so a crash keeps the cases before it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    import gc

    import torch

    from tip_ray.config import LossConfig, SelectionConfig
    from tip_ray.learner.worker import LearnerWorker
    from tip_ray.tip import budget_for

    cuda = torch.cuda.is_available()
    if not cuda and not smoke:
        raise RuntimeError("the memory measurement needs CUDA outside the smoke mode")
    cfg = learner_config(plan, model)
    doc: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "metric": "torch.cuda.max_memory_allocated over one train_step (forward_backward + optim_step)" if cuda
        else "the learner's peak RSS (a process peak: not comparable between cases)",
        "rule": RULE, "learner": asdict(cfg), "gradient_checkpointing": getattr(cfg, "gradient_checkpointing", None),
        "cases": [],
    }

    def write() -> None:
        result_path.write_text(json.dumps(doc, indent=2, default=str))

    start = time.perf_counter()
    worker = LearnerWorker(cfg, SelectionConfig(rule=RULE, ratio=1.0), LossConfig())
    batch = make_batch(plan)
    doc["init_s"] = time.perf_counter() - start
    start = time.perf_counter()
    worker.train_step(batch)
    doc["warmup_s"] = time.perf_counter() - start
    write()
    for ratio in RATIOS:
        worker.selection = dataclasses.replace(worker.selection, ratio=ratio)
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        start = time.perf_counter()
        metrics, optim = worker.train_step(batch)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if cuda else metrics.peak_memory_bytes
        doc["cases"].append({
            "ratio": ratio, "peak_bytes": int(peak), "at_rest_bytes": int(base), "step_bytes": int(peak - base),
            "worker_peak_bytes": int(metrics.peak_memory_bytes), "loss": metrics.loss, "skipped": metrics.skipped,
            "kept_tokens": metrics.kept_tokens, "valid_tokens": metrics.valid_tokens,
            "budget": budget_for(ratio, metrics.valid_tokens), "grad_norm": (optim or {}).get("grad_norm"),
            "weights_finite": bool((optim or {}).get("weights_finite", 0.0)), "seconds": seconds,
            # statistics / selection / gradient / optimizer: the statistics pass is the lm_head over
            # every response row (upcast to float32 from a bf16 head), the gradient pass the kept rows'
            "phase_seconds": dict(metrics.phase_seconds),
        })
        write()
    worker.close()
    return 0


def memory_checks(doc: dict[str, Any]) -> list[Check]:
    """One check per ratio: the step ran, its loss and weights are finite and it kept the budget."""
    checks = []
    cases = {c["ratio"]: c for c in doc.get("cases", [])}
    for ratio in RATIOS:
        name = f"memory: learner step at ratio {ratio:g}"
        case = cases.get(ratio)
        if case is None:
            checks.append(Check(name, "FAIL", 0.0, "the step did not run (see gpu_check_memory.log)"))
            continue
        problems = [p for ok, p in (
            (not case["skipped"], "the learner skipped the step (NaN/inf)"),
            (math.isfinite(case["loss"]), f"loss {case['loss']}"),
            (case["weights_finite"], "non-finite weights after the step"),
            (case["kept_tokens"] == case["budget"], f"kept {case['kept_tokens']} tokens, budget {case['budget']}"),
        ) if not ok]
        checks.append(Check(name, "FAIL" if problems else "PASS", case["seconds"], "; ".join(problems)))
    return checks


def with_ratios(doc: dict[str, Any]) -> dict[str, Any]:
    """Add each case's peak and step memory relative to ratio 1.0's."""
    reference = next((c for c in doc.get("cases", []) if c["ratio"] == 1.0), None)
    for case in doc.get("cases", []):
        if reference:
            case["peak_vs_ratio_1"] = case["peak_bytes"] / max(1, reference["peak_bytes"])
            case["step_vs_ratio_1"] = case["step_bytes"] / max(1, reference["step_bytes"])
    return doc


def memory_table(doc: dict[str, Any]) -> str:
    """The memory figures as a plain-text table."""
    lines = [f"learner peak memory, one step ({doc.get('device', '?')}; {doc.get('metric', '')}; "
             f"gradient checkpointing {doc.get('gradient_checkpointing')})",
             f"{'ratio':>6} {'kept/valid':>13} {'peak MiB':>10} {'at rest MiB':>12} {'step MiB':>9} "
             f"{'peak/r1':>8} {'step/r1':>8} {'loss':>9} {'s':>6} {'stats s':>8} {'grad s':>7}"]
    for c in doc.get("cases", []):
        lines.append(f"{c['ratio']:>6g} {c['kept_tokens']:>6}/{c['valid_tokens']:<6} {c['peak_bytes'] / MIB:>10.1f} "
                     f"{c['at_rest_bytes'] / MIB:>12.1f} {c['step_bytes'] / MIB:>9.1f} "
                     f"{c.get('peak_vs_ratio_1', float('nan')):>8.3f} {c.get('step_vs_ratio_1', float('nan')):>8.3f} "
                     f"{c['loss']:>9.4f} {c['seconds']:>6.2f} "
                     f"{c.get('phase_seconds', {}).get('statistics', float('nan')):>8.2f} "
                     f"{c.get('phase_seconds', {}).get('gradient', float('nan')):>7.2f}")
    return "\n".join(lines)


def run_memory(plan: Plan, model: str, env: dict[str, str], timeout_s: float, out_dir: Path,
               smoke: bool) -> tuple[dict[str, Any], list[Check]]:
    """The memory measurement in a child process; its document and checks."""
    start = time.perf_counter()
    result = out_dir / "gpu_check_memory.json.part"
    result.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(result), "--model", model]
    if smoke:
        command.append("--cpu-smoke")
    code, tail = run_logged(command, env, timeout_s, out_dir / "gpu_check_memory.log")
    doc = json.loads(result.read_text()) if result.is_file() else {}
    result.unlink(missing_ok=True)
    checks = memory_checks(doc)
    if code != 0:
        why = f"killed after {timeout_s:.0f} s" if code is None else f"exited with {code}"
        checks.insert(0, Check("memory: learner process", "FAIL", time.perf_counter() - start, f"{why}\n{tail}"))
    return with_ratios(doc), checks


# ---------------------------------------------------------------------------------------------


def default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check.json" if out else ROOT / "bench" / "results" / "gpu_check.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the logic on the CPU: no install, gloo, vocabulary 512, a small batch")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON report (default $OUT/gpu_check.json, else bench/results/gpu_check.json)")
    parser.add_argument("--wheels", type=Path, default=WHEELS, help="the carried wheel folder")
    parser.add_argument("--site", type=Path, default=SITE, help="where the wheels are installed")
    parser.add_argument("--suite", nargs="+", default=["tests/gpu"], help="pytest paths (default tests/gpu)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget of the whole run (default 450 on a GPU, 900 in the smoke mode)")
    parser.add_argument("--memory-reserve-s", type=float, default=None,
                        help="seconds kept for the memory phase when the suite's time limit is set (default 150)")
    parser.add_argument("--skip-suite", action="store_true", help="leave the pytest suite out")
    parser.add_argument("--skip-memory", action="store_true", help="leave the memory measurement out")
    parser.add_argument("--strict-skips", action="store_true", help="count a skipped test as a failure")
    parser.add_argument("--check-wheels", type=Path, metavar="DIR", help="only check a wheel folder, then exit")
    parser.add_argument("--memory-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def check_wheels_main(folder: Path) -> int:
    """Print the folder's wheels (binary or pure Python) and any problem; 1 if there is one."""
    wheels, problems = check_wheels(folder)
    for w in wheels:
        print(f"{'binary' if w.binary else 'pure  '}  {w.path.stat().st_size / MIB:6.2f} MiB  {w.path.name}")
    total = sum(w.path.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {total / MIB:.2f} MiB in {folder}")
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


def write_report(report: Report, plan: Plan, out: Path, code: int | None) -> None:
    """Write the JSON report; also after the early phases with ``code`` None (exit_code null,
    finished false), so a run killed from outside still leaves what it found."""
    logs = (out.parent / n for n in ("gpu_check_pytest.log", "gpu_check_junit.xml", "gpu_check_memory.log"))
    report.files = {p.name: str(p) for p in (out, *(p for p in logs if p.is_file()))}
    doc = report.to_json(plan)
    doc.update(exit_code=code, finished=code is not None)
    out.write_text(json.dumps(doc, indent=2, default=str))


def run_phases(args: argparse.Namespace, report: Report, plan: Plan, out: Path) -> int:
    """setup, checkpoints, suite, memory; the exit code."""
    budget = args.budget_s or (900.0 if args.cpu_smoke else 450.0)
    reserve = 0.0 if args.skip_memory else (args.memory_reserve_s or 150.0)
    site = None if args.cpu_smoke else args.site.resolve()
    env = child_env(site, args.cpu_smoke)
    with Phase(report, "setup"):
        if not args.cpu_smoke:
            has_cuda, line = probe_cuda(child_env(None, False))
            if not has_cuda:
                report.error = (f"no CUDA device visible to torch ({line}): the GPU check does not fall back to "
                                "the CPU; run it on a GPU machine, or pass --cpu-smoke to test its logic")
                print(f"gpu_check: {report.error}", file=sys.stderr, flush=True)
                return 2
            report.add(install_wheels(args.wheels, site))
        report.environment, check = probe_environment(env)
        report.add(check)
    write_report(report, plan, out, None)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "gpu")]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        with Phase(report, "checkpoints"):
            from tiny_qwen3 import save_qwen3

            start = time.perf_counter()
            model = save_qwen3(Path(work) / "student", vocab_size=plan.vocab, hidden=plan.hidden, layers=plan.layers,
                               heads=plan.heads, kv_heads=plan.kv_heads, head_dim=plan.head_dim, seed=0)
            report.add(Check(f"checkpoints: random Qwen3 student, vocabulary {plan.vocab}, bf16", "PASS",
                             time.perf_counter() - start))
        if not args.skip_suite:
            with Phase(report, "suite"):
                limit = max(60.0, budget - report.elapsed() - reserve)
                for check in run_suite(args.suite, env, limit, out.parent, args.cpu_smoke):
                    if check.outcome == "SKIP" and args.strict_skips:
                        check.outcome = "FAIL"
                    report.add(check)
            write_report(report, plan, out, None)
        if not args.skip_memory:
            with Phase(report, "memory"):
                limit = max(60.0, budget - report.elapsed())
                report.memory, checks = run_memory(plan, model, env, limit, out.parent, args.cpu_smoke)
                for check in checks:
                    report.add(check)
            if report.memory.get("cases"):
                print(memory_table(report.memory), flush=True)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Run the phases, print the verdict and the table, write the JSON; the exit code."""
    args = parse_args(argv)
    if args.check_wheels:
        return check_wheels_main(args.check_wheels)
    plan = SMOKE_PLAN if args.cpu_smoke else GPU_PLAN
    if args.memory_child:
        sys.path.insert(0, str(ROOT))
        return memory_child(plan, args.model, args.memory_child, smoke=args.cpu_smoke)
    report = Report("cpu-smoke" if args.cpu_smoke else "gpu")
    out = (args.out or default_out()).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    code = 1
    try:
        code = run_phases(args, report, plan, out)
        return code
    except Exception as exc:  # a bug of this script: the report still says what was found
        report.error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        write_report(report, plan, out, code)
        counts = {k: sum(c.outcome == k for c in report.checks) for k in ("PASS", "FAIL", "SKIP")}
        print(f"gpu_check ({report.mode}): {'ALL PASS' if code == 0 else 'FAILED'} -- {counts['PASS']} pass, "
              f"{counts['FAIL']} fail, {counts['SKIP']} skip in {report.elapsed():.0f} s; wrote {out}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
