#!/usr/bin/env bash
# Create (or update) the project's virtual environment and install everything the suite needs.
#   VENV=path   where to put it (default .venv)
#   FRESH=1     delete it first (CI does this)
# torch is pinned to 2.13.* and installed first: on CPU-only machines with a local CPU wheel that
# keeps pip from pulling the multi-GB CUDA build; on GPU machines it installs the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [[ "${FRESH:-0}" == 1 ]]; then rm -rf "$VENV"; fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.*"
"$VENV/bin/python" -m pip install -q -e ".[dev,rl,loggers,examples]"
"$VENV/bin/python" -c "import torch, pisa, pisa_bench; print('pisa-bench ready: torch', torch.__version__)"
