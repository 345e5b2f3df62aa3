"""Durability end to end: a run whose driver is SIGKILLed mid-run resumes with `checkpoint.resume=auto`
and ends with the same weights as an uninterrupted run; damaged checkpoints are skipped; no
secret reaches the run directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tip_ray.data.tasks import make_splits, write_jsonl
from tip_ray.state.checkpoint_store import step_name

pytestmark = pytest.mark.slow
ASSETS = Path(__file__).resolve().parents[2] / "tip_ray" / "embedded" / "assets"
SECRET = "tip-ray-test-secret-7f3a9c"
STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-data")
    train, test = make_splits(0, 96, 8)
    write_jsonl(train, root / "train.jsonl")
    write_jsonl(test, root / "test.jsonl")
    return root


def command(run_dir: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "tip_ray.cli", "train", f"student={ASSETS / 'student'}",
            f"teacher.model={ASSETS / 'teacher'}", f"data.path={data / 'train.jsonl'}",
            f"eval_data.path={data / 'test.jsonl'}", "eval_data.limit=8", f"trainer.steps={STEPS}",
            "trainer.prompts_per_step=8", "learner.global_batch_size=8", "learner.micro_batch_size=2",
            "rollout.max_new_tokens=48", "checkpoint.every=2", "checkpoint.keep_last=3", "logger.mode=offline",
            f"trainer.output_dir={run_dir}"]


def environment() -> dict[str, str]:
    return {**os.environ, "WANDB_API_KEY": SECRET, "WANDB_MODE": "offline"}


def session_processes(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the driver and everything it started)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True).stdout.split("\n")
    return [int(p) for p, s, stat in (line.split() for line in out if line.strip()) if int(s) == sid
            and not stat.startswith("Z")]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    export = run_dir / "checkpoints" / "hf" / step_name(STEPS)
    assert (export / "manifest.json").exists(), f"no complete Hugging Face export in {export}"
    return load_file(str(export / "model.safetensors"))


def step_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.mark.heavy  # three training runs, about 3 minutes on 2 cores
def test_a_killed_driver_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, data):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    result = subprocess.run(command(straight, data), capture_output=True, text=True, timeout=900, env=environment())
    assert result.returncode == 0, result.stderr[-4000:]

    driver = subprocess.Popen(command(interrupted, data), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env=environment(), start_new_session=True)
    marker = interrupted / "checkpoints" / step_name(4) / "manifest.json"
    deadline = time.time() + 600
    while not marker.exists():
        assert driver.poll() is None, f"the run ended before its step-4 checkpoint: {driver.stderr.read()[-4000:]}"
        assert time.time() < deadline, "no step-4 checkpoint within 10 minutes"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    # The node went down with its driver (what a pre-emption does): nothing of the run survives.
    for pid in session_processes(driver.pid):
        os.kill(pid, signal.SIGKILL)
    # A save that a crash cut short (no manifest) must be skipped by the resume.
    (interrupted / "checkpoints" / step_name(5) / "learner").mkdir(parents=True)

    resumed = subprocess.run(command(interrupted, data), capture_output=True, text=True, timeout=900,
                             env=environment())
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {interrupted / 'checkpoints' / step_name(4)}" in resumed.stdout

    a, b = step_rows(straight), step_rows(interrupted)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1)), "steps repeated or skipped across the resume"
    # Same prompts and samples on every step: the data cursor and the sampling seeds continued exactly.
    assert [r["valid_tokens"] for r in a] == [r["valid_tokens"] for r in b]
    assert [r["weight_version"] for r in b] == list(range(1, STEPS + 1))
    wa, wb = final_weights(straight), final_weights(interrupted)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, msg=name)

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(interrupted / "checkpoints" / "hf" / step_name(STEPS)))
    wandb_runs = {p.name.rsplit("-", 1)[-1] for p in (interrupted / "wandb").glob("offline-run-*")}
    assert len(wandb_runs) == 1, f"the resumed run did not continue the same W&B run: {wandb_runs}"
    for path in interrupted.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert SECRET.encode() not in path.read_bytes(), f"the W&B key leaked into {path}"


def test_a_dead_learner_rank_is_rebuilt_from_the_last_checkpoint(tmp_path, data):
    import threading

    import ray

    from tip_ray.cli import compose
    from tip_ray.trainer import Trainer

    run_dir = tmp_path / "run"
    overrides = command(run_dir, data)[4:] + ["trainer.steps=4", "logger.wandb=false"]
    trainer = Trainer(compose("train", overrides))
    marker = run_dir / "checkpoints" / step_name(2) / "manifest.json"
    victim = trainer.learner.actors[1]

    def kill_a_rank_after_the_first_checkpoint():
        while not marker.exists():
            time.sleep(0.05)
        ray.kill(victim, no_restart=True)

    killer = threading.Thread(target=kill_a_rank_after_the_first_checkpoint, daemon=True)
    killer.start()
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    killer.join(timeout=1)
    assert summary.steps == 4 and summary.accuracy_after is not None
    events = [json.loads(line)["event"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert any("a learner rank died" in e and "restarting the learner group" in e for e in events), events
    rows = step_rows(run_dir)
    assert sorted({r["step"] for r in rows}) == [1, 2, 3, 4]
    versions = [r["weight_version"] for r in rows]
    assert versions == sorted(versions), "weight versions went backwards after the restart"
    assert (run_dir / "checkpoints" / "hf" / step_name(4) / "manifest.json").exists()
