#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with everything the package,
# its tests, benchmarks and demo need. Idempotent. PyTorch goes in first, pinned to the CPU wheel,
# so that nothing later pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -c <(echo "torch==2.13.0") -e ".[dev]"
