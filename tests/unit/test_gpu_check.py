"""bench/gpu_check.py's own logic, on the CPU: wheel checks, the suite's verdict, the refusal to
run without CUDA, and the smoke mode end to end (its JSON)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up by name
_spec.loader.exec_module(gpu_check)


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")


def test_wheel_check_accepts_cpython312_x86_64_and_pure_wheels(tmp_path):
    _touch(tmp_path, "pydantic_core-2.50.4-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
           "deepspeed-0.19.8-py3-none-any.whl")
    wheels, problems = gpu_check.check_wheels(tmp_path)
    assert problems == []
    assert [w.binary for w in wheels] == [False, True]


@pytest.mark.parametrize("name", [
    "pydantic_core-2.50.4-cp311-cp311-manylinux_2_17_x86_64.whl",
    "pydantic_core-2.50.4-cp312-cp312-manylinux_2_17_aarch64.whl",
    "pydantic_core-2.50.4-cp312-cp312-win_amd64.whl",
    "pydantic_core-2.50.4-cp312-cp312-macosx_11_0_x86_64.whl",
])
def test_wheel_check_rejects_other_pythons_and_platforms(tmp_path, name):
    _touch(tmp_path, name)
    _, problems = gpu_check.check_wheels(tmp_path)
    assert len(problems) == 1 and name in problems[0]


def test_wheel_check_rejects_two_versions_a_missing_folder_and_too_many_bytes(tmp_path):
    _touch(tmp_path, "hjson-3.1.0-py3-none-any.whl", "hjson-3.0.0-py3-none-any.whl")
    assert any("two versions" in p for p in gpu_check.check_wheels(tmp_path)[1])
    assert any("make gpu-wheels" in p for p in gpu_check.check_wheels(tmp_path / "absent")[1])
    _, problems = gpu_check.check_wheels(tmp_path, limit_bytes=1)
    assert any("MiB" in p for p in problems)


SUITE = '''
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")

def test_passes():
    assert True

def test_fails():
    assert 1 == 2, "one is not two"

def test_skips():
    pytest.skip("not here")

def test_errors(broken):
    pass
'''


def test_suite_verdict_has_one_line_per_test(tmp_path):
    (tmp_path / "test_fake.py").write_text(textwrap.dedent(SUITE))
    env = gpu_check.child_env(None, smoke=True)
    checks = gpu_check.run_suite([str(tmp_path / "test_fake.py")], env, 120, tmp_path, smoke=True)
    outcomes = {c.name.rsplit("::", 1)[-1]: c.outcome for c in checks}
    assert outcomes == {"test_passes": "PASS", "test_fails": "FAIL", "test_skips": "SKIP", "test_errors": "FAIL"}
    failed = next(c for c in checks if c.name.endswith("test_fails"))
    assert "one is not two" in failed.detail
    assert (tmp_path / "gpu_check_junit.xml").is_file() and (tmp_path / "gpu_check_pytest.log").is_file()


def test_suite_without_tests_fails_on_the_gpu_and_skips_in_the_smoke_mode(tmp_path):
    (tmp_path / "empty").mkdir()
    env = gpu_check.child_env(None, smoke=True)
    for smoke, outcome in ((False, "FAIL"), (True, "SKIP")):
        checks = gpu_check.run_suite([str(tmp_path / "empty")], env, 120, tmp_path, smoke=smoke)
        assert [(c.name, c.outcome) for c in checks] == [("suite: tests collected", outcome)]


def test_verbose_output_is_parsed_when_pytest_left_no_xml():
    text = "tests/gpu/test_a.py::test_x PASSED [ 50%]\ntests/gpu/test_a.py::test_y[2] FAILED [100%]\n"
    assert [(c.name, c.outcome) for c in gpu_check.parse_verbose(text)] == [
        ("suite: tests/gpu/test_a.py::test_x", "PASS"), ("suite: tests/gpu/test_a.py::test_y[2]", "FAIL")]


def _case(ratio: float, kept: int, budget: int, peak: int, **over) -> dict:
    case = {"ratio": ratio, "peak_bytes": peak, "at_rest_bytes": 100, "step_bytes": peak - 100, "loss": 1.0,
            "skipped": False, "kept_tokens": kept, "valid_tokens": 10, "budget": budget, "weights_finite": True,
            "seconds": 0.1}
    return {**case, **over}


def test_memory_checks_and_ratios_to_ratio_one():
    doc = gpu_check.with_ratios({"cases": [_case(1.0, 10, 10, 500), _case(0.5, 4, 5, 300),
                                           _case(0.1, 1, 1, 200, loss=float("nan"))]})
    verdict = {c.name: (c.outcome, c.detail) for c in gpu_check.memory_checks(doc)}
    assert verdict["memory: learner step at ratio 1"] == ("PASS", "")
    assert verdict["memory: learner step at ratio 0.5"][0] == "FAIL" and "budget 5" in verdict[
        "memory: learner step at ratio 0.5"][1]
    assert verdict["memory: learner step at ratio 0.1"][0] == "FAIL"
    assert doc["cases"][1]["peak_vs_ratio_1"] == pytest.approx(0.6)
    assert doc["cases"][2]["step_vs_ratio_1"] == pytest.approx(0.25)
    assert "ratio" in gpu_check.memory_table(doc)
    missing = gpu_check.memory_checks({"cases": []})
    assert [c.outcome for c in missing] == ["FAIL"] * 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_mode_refuses_to_run_without_cuda(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--out", str(out), "--wheels", str(tmp_path / "wheels"), "--site", str(tmp_path / "site")])
    assert code == 2
    assert "no CUDA device" in capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["mode"] == "gpu" and not doc["ok"] and doc["exit_code"] == 2 and "--cpu-smoke" in doc["error"]
    assert not (tmp_path / "site").exists(), "nothing is installed before CUDA is found"


@pytest.mark.slow
def test_cpu_smoke_mode_writes_the_report(tmp_path):
    out = tmp_path / "report" / "gpu_check.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-smoke", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["mode"] == "cpu-smoke" and doc["ok"] and doc["exit_code"] == 0 and doc["finished"]
    assert set(doc["phases_s"]) == {"setup", "checkpoints", "suite", "memory"}
    assert doc["plan"]["vocab"] == gpu_check.SMOKE_PLAN.vocab
    assert doc["environment"]["deepspeed"]
    assert doc["counts"]["FAIL"] == 0
    # Without CUDA the gpu suite skips itself: every test in it is a SKIP, none a PASS.
    assert all(c["outcome"] == "SKIP" for c in doc["checks"] if c["name"].startswith("suite: "))
    cases = doc["memory"]["cases"]
    assert [c["ratio"] for c in cases] == list(gpu_check.RATIOS)
    for case in cases:
        assert case["kept_tokens"] == case["budget"] and case["weights_finite"] and not case["skipped"]
        assert case["peak_bytes"] > 0 and "peak_vs_ratio_1" in case
    assert {"gpu_check_pytest.log", "gpu_check_memory.log"} <= set(doc["files"])
    for ratio in ("1", "0.5", "0.1"):
        assert f"PASS  memory: learner step at ratio {ratio}" in result.stdout


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel of one empty package."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for arcname, text in files.items():
            z.writestr(arcname, text)
    return path


def test_install_skips_what_is_already_installed_at_that_version_or_newer(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # install_wheels puts its target first
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    _wheel(wheels, "gpu_check_fake", "1.0")
    _wheel(wheels, "pytest", "0.0.1")  # older than the pytest running this
    first = gpu_check.install_wheels(wheels, site)
    assert first.outcome == "PASS" and first.detail == "installed gpu_check_fake 1.0", first.detail
    assert (site / "gpu_check_fake" / "__init__.py").is_file() and not (site / "pytest").exists()
    second = gpu_check.install_wheels(wheels, site)
    assert (second.outcome, second.detail) == ("PASS", "all 2 already installed")
