#!/usr/bin/env bash
# Create .venv (if needed) and install vlswift with its test extras.
# torch is installed first on its own: any torch requirement resolved before torch is present
# pulls the multi-GB CUDA build. With torch already there, nothing replaces it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==${VLSWIFT_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
