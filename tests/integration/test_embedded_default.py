"""The embedded default as a user gets it: prepare-demo, then `tip-ray eval` on its output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tip_ray.embedded.prepare import prepare_demo

    return prepare_demo(tmp_path_factory.mktemp("embedded"), log=lambda s: None)


def test_teacher_is_accurate_and_student_clearly_weaker(assets):
    assert assets.teacher_accuracy >= 0.90
    assert 0.15 <= assets.student_accuracy <= 0.50
    manifest = json.loads((assets.root / "manifest.json").read_text())
    assert manifest["teacher"]["heldout_accuracy"] == assets.teacher_accuracy


def test_checkpoints_are_safetensors_and_share_the_tokenizer(assets):
    from transformers import AutoTokenizer

    from tip_ray.state.preflight import check_same_vocabulary

    for role in ("teacher", "student"):
        files = {p.name for p in (assets.root / role).iterdir()}
        assert "model.safetensors" in files and "pytorch_model.bin" not in files
    check_same_vocabulary(AutoTokenizer.from_pretrained(str(assets.student)),
                          AutoTokenizer.from_pretrained(str(assets.teacher)), "student", "teacher")


def test_eval_command_on_the_prepared_student(assets, tmp_path):
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "tip_ray.cli", "eval", f"model={assets.student}", f"data.path={assets.test_data}",
         "data.limit=60", "sampled_n=2", f"output_dir={out}"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    names = [r["name"] for r in summary["results"]]
    assert names == ["greedy", "sampled_t1_n2"] and summary["prompts"] == 60
    assert len((out / "greedy.jsonl").read_text().splitlines()) == 60
    assert len((out / "sampled_t1_n2.jsonl").read_text().splitlines()) == 120
    assert 0.0 < summary["results"][0]["accuracy"] < 0.7
