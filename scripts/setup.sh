#!/usr/bin/env bash
# Create .venv and install dpok with its dependencies. Torch is pinned to 2.13.0 and installed
# first, so that no other package pulls a different (e.g. CUDA) torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c "import torch, diffusers, dpok; print(f'dpok {dpok.__version__} ready: torch {torch.__version__}, diffusers {diffusers.__version__}')"
