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

want() {  # want TAG: run the sections tagged TAG (all when ONLY is unset; e.g. ONLY="train" or "render")
  [[ -z "${ONLY:-}" || " $ONLY " == *" $1 "* ]]
}

"$PY" -c "import jax; print(jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# Training (issue 9): the sdxl_gpu1 dry run (the full step compiled for this GPU: XLA's memory per device and
# FLOPs per step), then 20 real steps of the same config on random full-size SDXL weights (bf16 + remat,
# 512 px, batch 2, LoRA + VAE parts, LPIPS-VGG + adversarial losses; pairs synthesized on the fly at one
# blur strength so the CPU-side ray tracer keeps up), then its step time, peak device memory and MFU
# (the dry run's FLOPs over the measured step time, against the chip's dense bf16 peak, PEAK_TFLOPS).
if want train; then
  W=${W:-/tmp/bokehdiff_gpu_check}
  rm -rf "$W"
  gpu1=(--config configs/sdxl_gpu1.py --workdir "$W/gpu1" --config.base=random
        --config.data.log2_times="(0.0, 0.0)" --config.data.synth_size=512)
  section "train: sdxl_gpu1 dry run (bf16 + remat, 512 px, batch 2)" 420 "$BDJ" train "${gpu1[@]}" --dry-run
  section "train: sdxl_gpu1, 20 steps on random SDXL weights" 420 "$BDJ" train "${gpu1[@]}" --no-progress \
    --config.steps=20 --config.log_every=1 --config.checkpoint_every=20 --config.image_every=10
  section "train: step time, peak memory, MFU" 60 \
    "$BDJ" bench train --summarize "$W/gpu1" --peak-tflops "${PEAK_TFLOPS:-989}"
fi

# Inference (issue 13): the full SDXL one-step render (U-Net + VAE + LoRA, bf16; VAE fp32 as its config's
# force_upcast says) on random weights. 1024 x 1024 whole (goal on an H200: <= 0.10 s/image; the released
# code: about 0.8 s), then 2048 x 2048 in one pass (exact tiled VAE around a one-pass U-Net with sparse PISA;
# goal: peak device memory within 24 GiB), and at 1024 the PISA implementations against each other and
# against vanilla attention (is impl="auto"'s choice, dense at 1024, the fastest?).
if want render; then
section "one-step render, full SDXL bf16: 1024 and 2048" 420 \
  "$BDJ" bench onestep --part device --device-sizes 1024 2048 --device-impls auto --repeats 5
section "one-step render, 1024: PISA sparse / none (auto = dense above)" 240 \
  "$BDJ" bench onestep --part device --device-sizes 1024 --device-impls sparse vanilla --repeats 5
fi

exit $failed
