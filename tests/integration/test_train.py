"""`tip-ray train` end to end on the shipped embedded pair: vLLM rollouts, transformers teacher,
a 2-rank DeepSpeed learner, weight sync, JSONL and W&B (offline) tracking."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tip_ray.data.tasks import make_splits, write_jsonl

pytestmark = pytest.mark.slow
ASSETS = Path(__file__).resolve().parents[2] / "tip_ray" / "embedded" / "assets"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    train, test = make_splits(0, 64, 16)
    write_jsonl(train, root / "train.jsonl")
    write_jsonl(test, root / "test.jsonl")
    return root


def train(tmp_path, data, *overrides):
    args = [f"student={ASSETS / 'student'}", f"teacher.model={ASSETS / 'teacher'}",
            f"data.path={data / 'train.jsonl'}", f"eval_data.path={data / 'test.jsonl'}", "eval_data.limit=16",
            "trainer.steps=2", "trainer.prompts_per_step=8", "learner.global_batch_size=8",
            "learner.micro_batch_size=2", f"trainer.output_dir={tmp_path / 'run'}", *overrides]
    env_python = [sys.executable, "-m", "tip_ray.cli", "train", *args]
    return subprocess.run(env_python, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "WANDB_MODE": "offline", "WANDB_API_KEY": ""})


def test_train_runs_the_pools_and_records_every_step(tmp_path, data):
    result = train(tmp_path, data, "selection.rule=soft_or", "selection.ratio=0.5", "learner.zero_stage=3")
    assert result.returncode == 0, result.stderr[-4000:]
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert abs(r["kept_fraction"] - 0.5) < 0.01 and r["kept_tokens"] == -(-r["valid_tokens"] // 2)
        assert r["time/rollout"] > 0 and r["time/teacher"] > 0 and r["time/learner"] > 0
        assert r["time/step"] >= sum(r[f"time/{k}"] for k in ("rollout", "teacher", "learner", "sync"))
        assert r["learner_peak_memory_mb"] > 0
        assert abs(sum(r[f"quadrant/Q{i}"] for i in range(1, 5)) - 1) < 1e-6
        assert 0 <= r["teacher_entropy_topk_mean"] < math.log(128)  # the embedded vocabulary
        phases = {k.split("/")[1]: v for k, v in r.items() if k.startswith("learner_time/")}
        assert set(phases) == {"statistics", "selection", "gradient", "optimizer"}
        assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= r["time/learner"]
    assert steps[-1]["weight_version"] == 2 and steps[-1]["staleness"] == 0
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["accuracy_before"] is not None
    config = json.loads((run / "config.json").read_text())
    assert config["learner"]["model"] == str(ASSETS / "student")  # interpolation resolved
    assert list((run / "wandb").glob("offline-run-*")), "no W&B offline run"
    assert "student accuracy after" in result.stdout


@pytest.mark.heavy  # test_bad_input_cli's `pool larger than the cluster` case runs the same check in `make test`
def test_pools_larger_than_the_cluster_fail_before_any_actor_starts(tmp_path, data):
    result = train(tmp_path, data, "learner.world_size=8", "learner.global_batch_size=16",
                   "trainer.prompts_per_step=16", "cluster.num_cpus=4")
    assert result.returncode != 0
    assert "the pools do not fit the cluster: short of" in result.stderr and "learner: 8 x" in result.stderr
    assert "Traceback" not in result.stderr


def test_inconsistent_batch_sizes_are_a_config_error(tmp_path, data):
    result = train(tmp_path, data, "learner.global_batch_size=16")
    assert result.returncode != 0 and "make them equal" in result.stderr


@pytest.mark.heavy  # about a minute; test_train_runs_the_pools_and_records_every_step covers sync mode
def test_one_step_overlap_trains_on_samples_one_update_old(tmp_path, data):
    result = train(tmp_path, data, "trainer.mode=overlap", "trainer.steps=3", "logger.wandb=false",
                   "selection.rule=all")
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["staleness"] for r in steps] == [0, 1, 1]
    assert [r["weight_version"] for r in steps] == [1, 2, 3]
    assert all(r["kept_fraction"] == 1.0 for r in steps)
