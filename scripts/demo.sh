#!/usr/bin/env bash
# Quick start: install into .venv, then run the offline demo (tiny random model, drawn image).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
.venv/bin/vlswift demo "$@"
