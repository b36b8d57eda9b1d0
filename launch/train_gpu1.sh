#!/usr/bin/env bash
# The paper's setup on one GPU (configs/sdxl_gpu1.py): SDXL + LoRA, 512 x 512, batch 2, bf16 + remat.
#
#   bash launch/train_gpu1.sh SDXL_CHECKPOINT WORKDIR [--config.KEY=VALUE ...] [--dry-run]
#   bash launch/train_gpu1.sh sdxl_jax runs/sdxl                          # train (resumes if WORKDIR has checkpoints)
#   bash launch/train_gpu1.sh sdxl_jax runs/abl --config.precision=fp32   # the released script's precision
#   VARIANTS=no_occlusion bash launch/train_gpu1.sh sdxl_jax runs/no_occ  # an ablation
#
# SDXL_CHECKPOINT: `bokehdiff-jax convert from-diffusers stable-diffusion-xl-base-1.0/ sdxl_jax/ --dtype bf16`.
# Needs a CUDA build of jax (pip install "jax[cuda12]") in .venv. Watch: tensorboard --logdir WORKDIR/tensorboard
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 SDXL_CHECKPOINT WORKDIR [--config.KEY=VALUE ...] [--dry-run]" >&2; exit 2; }
base=$1 workdir=$2
shift 2
config=configs/sdxl_gpu1.py${VARIANTS:+:$VARIANTS}
# XLA may take all GPU memory up front otherwise; the step's own need is printed before step 1.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
exec "${BDJ:-.venv/bin/bokehdiff-jax}" train --config "$config" --workdir "$workdir" --config.base="$base" "$@"
