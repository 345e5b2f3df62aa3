#!/usr/bin/env bash
# Submit `tip-ray train` to a running Ray cluster as a Ray job (the `ray job submit` API).
#
# Usage:
#   launch/submit.sh [HYDRA_OVERRIDE ...]
#
# Examples (see docs/cluster.md):
#   launch/submit.sh experiment=qwen3_8b_to_4b_math cluster=4node_8gpu trainer.output_dir=/shared/runs/qwen3_math
#   launch/submit.sh experiment=qwen3_8b_to_4b_math cluster=4node_8gpu rollout.num_workers=6 \
#     teacher.num_workers=10 trainer.output_dir=/shared/runs/more_teachers
#   DRY_RUN=1 launch/submit.sh selection.rule=entropy_topk   # print the job; submit nothing
#
# The job runs `tip-ray train cluster.address=auto cluster.num_cpus=null cluster.num_gpus=null cluster.object_store_memory=null <your overrides>`
# on the head node: the driver joins the
# cluster it runs in (num_cpus/num_gpus/object_store_memory only size a local Ray instance). Later overrides win. Give trainer.output_dir as a path on
# storage every node sees: a relative one lands in the job's temporary working directory.
#
# Environment (all optional; defaults in brackets):
#   RAY_ADDRESS     the cluster's job server (the dashboard port) [http://127.0.0.1:8265], e.g.
#                   reached through `ray dashboard launch/ray-cluster.yaml` or `kubectl port-forward`;
#                   RAY_API_SERVER_ADDRESS, when set, takes precedence as it does for `ray job`
#   RUNTIME_ENV     runtime environment YAML [launch/runtime_env.yaml]
#   WORKING_DIR     directory uploaded as the job's working_dir [the checkout holding this script]
#   PASS_ENV        names of variables copied from this shell into the job, when set (for
#                   secrets: the values never touch a file and DRY_RUN masks them)
#                   [WANDB_API_KEY WANDB_ENTITY WANDB_PROJECT WANDB_MODE WANDB_BASE_URL HF_TOKEN]
#   JOB_ENV_<NAME>  sets <NAME> in the job, e.g. JOB_ENV_HF_HOME=/shared/hf (a path every node sees)
#   SUBMISSION_ID   the job's id [tip-ray-<UTC date-time>]
#   NO_WAIT         1: return once submitted (follow with `ray job logs --follow <id>`) [0]
#   DRY_RUN         1: print address, entrypoint and runtime env, submit nothing [0]
#   PYTHON          an interpreter with ray installed [the checkout's .venv/bin/python, else python3]
#   RAY_AUTH_MODE   token authentication of the job client: token or disabled [token]
#   RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token
#                   where the cluster's token is read from, in Ray's order of precedence; the
#                   token is sent as an HTTP header and never printed
#
# Exit status: 0 when the job succeeded (or was submitted, with NO_WAIT=1), 1 when it failed or
# was stopped, 2 on a usage or authentication problem before submitting.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNTIME_ENV="${RUNTIME_ENV:-$ROOT/launch/runtime_env.yaml}"
WORKING_DIR="${WORKING_DIR:-$ROOT}"
PASS_ENV="${PASS_ENV:-WANDB_API_KEY WANDB_ENTITY WANDB_PROJECT WANDB_MODE WANDB_BASE_URL HF_TOKEN}"
SUBMISSION_ID="${SUBMISSION_ID:-tip-ray-$(date -u +%Y%m%d-%H%M%S)}"
NO_WAIT="${NO_WAIT:-0}"
DRY_RUN="${DRY_RUN:-0}"
JOB_ADDRESS="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

die() { echo "submit.sh: $*" >&2; exit 2; }

[[ -f "$RUNTIME_ENV" ]] || die "RUNTIME_ENV=$RUNTIME_ENV is not a file"
[[ -d "$WORKING_DIR" ]] || die "WORKING_DIR=$WORKING_DIR is not a directory"
WORKING_DIR="$(cd "$WORKING_DIR" && pwd)"

# Token authentication: the job client sends the token only when RAY_AUTH_MODE=token. A cluster
# with authentication disabled ignores the header, so token is the safe default.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ "$RAY_AUTH_MODE" == token && "$DRY_RUN" != 1 ]]; then
  if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
    :
  elif [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    [[ -s "$RAY_AUTH_TOKEN_PATH" ]] || die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty"
  elif [[ ! -s "$HOME/.ray/auth_token" ]]; then
    die "no Ray auth token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put the cluster's token in" \
        "$HOME/.ray/auth_token (see docs/cluster.md, 'Token authentication'); RAY_AUTH_MODE=disabled for a" \
        "cluster started without authentication"
  fi
fi

export TIP_JOB_ADDRESS="$JOB_ADDRESS" TIP_RUNTIME_ENV="$RUNTIME_ENV" TIP_WORKING_DIR="$WORKING_DIR" \
  TIP_PASS_ENV="$PASS_ENV" TIP_SUBMISSION_ID="$SUBMISSION_ID" TIP_NO_WAIT="$NO_WAIT" TIP_DRY_RUN="$DRY_RUN"

exec "$PYTHON" - "$@" <<'PY'
import asyncio
import json
import os
import shlex
import sys
import time
from pathlib import Path

import yaml

overrides = sys.argv[1:]
address = os.environ["TIP_JOB_ADDRESS"]
submission_id = os.environ["TIP_SUBMISSION_ID"]
runtime_env = yaml.safe_load(Path(os.environ["TIP_RUNTIME_ENV"]).read_text()) or {}
runtime_env["working_dir"] = os.environ["TIP_WORKING_DIR"]
env_vars = {str(k): str(v) for k, v in (runtime_env.get("env_vars") or {}).items()}
for name, value in os.environ.items():
    if name.startswith("JOB_ENV_") and len(name) > len("JOB_ENV_"):
        env_vars[name[len("JOB_ENV_"):]] = value
passed = [name for name in os.environ["TIP_PASS_ENV"].split() if os.environ.get(name)]
for name in passed:
    env_vars[name] = os.environ[name]
runtime_env["env_vars"] = env_vars
join = ["cluster.address=auto", "cluster.num_cpus=null", "cluster.num_gpus=null", "cluster.object_store_memory=null"]
entrypoint = shlex.join(["tip-ray", "train", *join, *overrides])
if not any(o.lstrip("+~").startswith("trainer.output_dir=") for o in overrides):
    print("submit.sh: warning: no trainer.output_dir=<shared path> given; a relative run directory ends up in "
          "the job's temporary working directory on the head node", file=sys.stderr)

if os.environ["TIP_DRY_RUN"] == "1":
    shown = {k: ("<set from the submitting shell>" if k in passed else v) for k, v in env_vars.items()}
    print(json.dumps({"address": address, "submission_id": submission_id, "entrypoint": entrypoint,
                      "runtime_env": {**runtime_env, "env_vars": shown}}, indent=2))
    sys.exit(0)

from ray.job_submission import JobStatus, JobSubmissionClient  # noqa: E402

client = JobSubmissionClient(address)
job_id = client.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env)
print(f"submit.sh: submitted {job_id} to {address}", file=sys.stderr)
print(f"submit.sh: logs: ray job logs --follow --address {address} {job_id}; "
      f"stop: ray job stop --address {address} {job_id}", file=sys.stderr)
if os.environ["TIP_NO_WAIT"] == "1":
    sys.exit(0)


async def follow() -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


try:
    asyncio.run(follow())
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while (status := client.get_job_status(job_id)) not in terminal:
        time.sleep(2)
except KeyboardInterrupt:
    print(f"\nsubmit.sh: stopped following; the job keeps running (ray job stop --address {address} {job_id})",
          file=sys.stderr)
    sys.exit(130)
message = client.get_job_info(job_id).message if status != JobStatus.SUCCEEDED else ""
print(f"submit.sh: job {job_id} {status.value}" + (f": {message}" if message else ""), file=sys.stderr)
sys.exit(0 if status == JobStatus.SUCCEEDED else 1)
PY
