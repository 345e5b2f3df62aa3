"""A built wheel installs and composes `tip-ray train` away from the checkout.

The Hydra config groups are package data (``tip_ray/conf``): a wheel install, as the Docker
images do, must hold every one of them. The wheel is built from a copy of what the images copy
(pyproject.toml, README.md, tip_ray/), installed with ``--no-deps`` into a throwaway virtualenv
whose other packages are the locked set already installed for the tests (reached through a
``.pth`` line: the same files, without copying several GB), and run from a directory outside the
checkout, so that nothing of the checkout is importable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtualenv holding the tip_ray wheel; returns its bin/ directory."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "tip_ray", src / "tip_ray", ignore=shutil.ignore_patterns("__pycache__"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist",
                  src], cwd=tmp)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("tip_ray-*.whl")

    with zipfile.ZipFile(wheel) as archive:
        shipped = {n for n in archive.namelist() if n.startswith("tip_ray/conf/")}
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tip_ray" / "conf").rglob("*.yaml")}
    assert expected and expected == shipped

    venv = tmp / "venv"
    made = _run([sys.executable, "-m", "venv", venv], cwd=tmp)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp)
                .stdout.strip())
    (site / "locked_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp)
    assert install.returncode == 0, install.stderr
    return venv / "bin"


def test_the_installed_wheel_composes_train_outside_the_checkout(installed, tmp_path):
    where = _run([installed / "python", "-c", "import tip_ray.cli as c; print(c.__file__); print(c.CONF_DIR)"],
                 cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    module, conf = where.stdout.split()
    assert Path(module).is_relative_to(installed.parent) and Path(conf).is_dir()
    assert not Path(module).is_relative_to(ROOT)

    job = _run([installed / "tip-ray", "train", "--cfg", "job", "experiment=qwen3_8b_to_4b_math",
                "cluster=1node_8gpu", "trainer.steps=70"], cwd=tmp_path)
    assert job.returncode == 0, job.stderr
    assert "steps: 70" in job.stdout and "tensor_parallel_size" in job.stdout

    bad = _run([installed / "tip-ray", "train", "--cfg", "job", "selection=nope"], cwd=tmp_path)
    assert bad.returncode != 0 and "selection" in bad.stderr
