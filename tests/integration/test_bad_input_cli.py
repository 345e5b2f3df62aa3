"""Bad input to `tip-ray train` fails fast with an error naming the key, and leaves no Ray process behind."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tip_ray.data.tasks import make_splits, write_jsonl

pytestmark = pytest.mark.slow
ASSETS = Path(__file__).resolve().parents[2] / "tip_ray" / "embedded" / "assets"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    train, _ = make_splits(0, 16, 4)
    write_jsonl(train, root / "train.jsonl")
    (root / "no_rows.jsonl").write_text('{"question": "1+1", "solution": "2"}\n')  # no `prompt` field
    other = root / "other_teacher"
    shutil.copytree(ASSETS / "teacher", other)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(other))
    tokenizer.add_tokens(["<not-in-the-student>"])
    tokenizer.save_pretrained(str(other))
    return root


def run(root: Path, *overrides: str) -> tuple[int, str, int]:
    """Exit code, stderr and pid (= session id) of `tip-ray train` with ``overrides``."""
    args = [f"student={ASSETS / 'student'}", f"teacher.model={ASSETS / 'teacher'}",
            f"data.path={root / 'train.jsonl'}", "eval_data=null", "trainer.prompts_per_step=8",
            "learner.global_batch_size=8", "learner.micro_batch_size=2", "logger.wandb=false",
            f"trainer.output_dir={root / 'run'}", *overrides]
    process = subprocess.Popen([sys.executable, "-m", "tip_ray.cli", "train", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr, process.pid


def left_behind(sid: int) -> list[str]:
    """Processes still alive in session ``sid`` (everything the command started)."""
    out = subprocess.run(["ps", "-eo", "sid=,args="], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if line.split(None, 1)[0] == str(sid)]


CASES = {
    "ratio": (["selection.ratio=1.5"], "selection.ratio must be in (0, 1]"),
    "negative size": (["rollout.max_new_tokens=-4"], "rollout.max_new_tokens must be >= 1"),
    "top-k above the vocabulary": (["teacher.top_k=4096"], "teacher.top_k = 4096 exceeds the teacher's vocabulary"),
    "vocabularies differ": (["teacher.model={root}/other_teacher"], "differ"),
    "pool larger than the cluster": (["rollout.num_workers=64", "cluster.num_cpus=4"],
                                     "the pools do not fit the cluster"),
    "data without usable rows": (["data.path={root}/no_rows.jsonl"], "prompt"),
    "typo in a key": (["learner.zero_stag=3"], "zero_stag"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_a_clear_error_before_any_worker(case, setup):
    overrides, message = CASES[case]
    code, stderr, sid = run(setup, *[o.format(root=setup) for o in overrides])
    assert code != 0
    assert message in stderr, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert not (setup / "run" / "checkpoints").exists()
    assert left_behind(sid) == [], "processes of the failed command outlived it"
