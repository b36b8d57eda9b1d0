#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, as one short script: run it whenever one is at hand and copy its
# output into BENCHMARKS.md. Each section is independent and time-boxed; a failing section does not stop
# the others (the script exits non-zero at the end if any failed).
#
#   bash launch/gpu_check.sh            # after launch/setup.sh plus a CUDA jax: pip install "jax[cuda12]"
#
# Shared by the training issue (training-step checks) and the inference issue (one-step render timing).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BDJ=${BDJ:-.venv/bin/bokehdiff-jax}
failed=0
section() {  # section NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit} s) ==="
  local t0=$SECONDS
  timeout "$limit" "$@" || { echo "!!! $name failed (status $?)"; failed=1; }
  echo "=== $name: $((SECONDS - t0)) s ==="
}

"$PY" -c "import jax; print(jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# Inference (issue 13): the full SDXL one-step render (U-Net + VAE + LoRA, bf16; VAE fp32 as its config's
# force_upcast says) on random weights. 1024 x 1024 whole (goal on an H200: <= 0.10 s/image; the released
# code: about 0.8 s), then 2048 x 2048 in one pass (exact tiled VAE around a one-pass U-Net with sparse PISA;
# goal: peak device memory within 24 GiB), and at 1024 the PISA implementations against each other and
# against vanilla attention (is impl="auto"'s choice, dense at 1024, the fastest?).
section "one-step render, full SDXL bf16: 1024 and 2048" 420 \
  "$BDJ" bench onestep --part device --device-sizes 1024 2048 --device-impls auto --repeats 5
section "one-step render, 1024: PISA sparse / none (auto = dense above)" 240 \
  "$BDJ" bench onestep --part device --device-sizes 1024 --device-impls sparse vanilla --repeats 5

exit $failed
