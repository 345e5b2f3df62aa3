"""The science package stays pure torch; the top-level package stays import-light."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN_IN_TIP = ("ray", "deepspeed", "vllm", "hydra", "omegaconf", "wandb", "transformers")


def modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_tip_imports_no_runtime_framework():
    loaded = modules_after("import tip_ray.tip")
    assert not loaded & set(FORBIDDEN_IN_TIP), sorted(loaded & set(FORBIDDEN_IN_TIP))


def test_importing_tip_ray_imports_no_torch():
    loaded = modules_after("import tip_ray")
    assert not loaded & {"torch", "ray", "vllm", "deepspeed"}
