#!/usr/bin/env bash
# Build bench/.venv-trl: the TRL side of bench/trl_comparison.py, isolated from the project's .venv.
# torch is pinned to the CPU build the project uses (an unpinned torch would pull the CUDA wheels);
# transformers/tokenizers/datasets match requirements/lock-cpu.txt so both sides load the same
# checkpoints with the same code. Idempotent: a complete venv is left as it is.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/bench/.venv-trl"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
PINS=(
  "torch==2.13.0"
  "trl==1.16.0"
  "transformers==5.19.0"
  "tokenizers==0.23.3"
  "accelerate==1.15.0"
  "datasets==5.2.0"
  "rich"
)

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import trl, torch, transformers" 2>/dev/null; then
  echo "bench/.venv-trl is ready: $("$VENV/bin/python" -c 'import trl, torch, transformers; print("trl", trl.__version__, "torch", torch.__version__, "transformers", transformers.__version__)')"
  exit 0
fi

"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "${PINS[@]}"
"$VENV/bin/python" -c 'import trl, torch, transformers; print("trl", trl.__version__, "torch", torch.__version__, "transformers", transformers.__version__)'
