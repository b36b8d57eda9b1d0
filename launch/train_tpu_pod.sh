#!/usr/bin/env bash
# The paper's model on a Cloud TPU pod slice (configs/tpu_pod.py): run the same command on every host;
# jax.distributed initialises from the TPU environment, each host reads its rows of every global batch,
# frozen weights are FSDP-sharded. WORKDIR and SDXL_CHECKPOINT must be paths every host sees (a shared
# disk or a gs:// bucket mounted with gcsfuse).
#
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=all --command \
#     "cd bokehdiff_jax && bash launch/train_tpu_pod.sh /mnt/shared/sdxl_jax /mnt/shared/runs/pod"
#
# On other clusters set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID per
# process (or run under SLURM / Open MPI, which JAX detects). Preemption: SIGTERM saves a checkpoint and
# exits 0; the same command resumes. Dry run from one CPU machine with 8 fake devices:
#   XLA_FLAGS=--xla_force_host_platform_device_count=8 bash launch/train_tpu_pod.sh sdxl_jax /tmp/pod --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 SDXL_CHECKPOINT WORKDIR [--config.KEY=VALUE ...] [--dry-run]" >&2; exit 2; }
base=$1 workdir=$2
shift 2
config=configs/tpu_pod.py${VARIANTS:+:$VARIANTS}
exec "${BDJ:-.venv/bin/bokehdiff-jax}" train --config "$config" --workdir "$workdir" --config.base="$base" "$@"
