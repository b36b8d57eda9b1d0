"""The paper's model on a TPU pod slice (or any multi-host cluster): the ``sdxl_gpu1`` setup on a
``(data, fsdp)`` mesh over every device of every host, at 1024 x 1024 with a global batch of 16 (2 per
chip on 8 chips, as two accumulated micro-batches of one image each, so that the step fits a 16 GiB
TPU v5e chip; scale ``batch_size`` with the data axis; chips with more memory can take
``--config.optimizer.grad_accum=1``).

Frozen U-Net/VAE weights are FSDP-sharded over the ``fsdp`` axis (the largest axis each divides;
``bokehdiff_jax.sharding.PARAM_RULES``), LoRA factors replicated, the batch split over both axes; PISA runs
with its sharded implementation under the mesh. Each host reads its own rows of every global batch.

On every host of a Cloud TPU slice (``jax.distributed`` initialises from the TPU environment):

  gcloud compute tpus tpu-vm ssh NAME --worker=all --command \\
    "cd bokehdiff_jax && .venv/bin/bokehdiff-jax train --config configs/tpu_pod.py \\
       --workdir /mnt/shared/runs/pod --config.base=/mnt/shared/sdxl_jax"

Dry run on one CPU machine with 8 fake devices (no weights, no data):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    bokehdiff-jax train --config configs/tpu_pod.py --workdir /tmp/pod_dry --dry-run

Variants as in ``sdxl_gpu1`` (``configs/tpu_pod.py:no_occlusion``...).
"""

from pathlib import Path

import ml_collections

from bokehdiff_jax.train.config import apply_variants, load_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = load_config(str(Path(__file__).with_name("sdxl_gpu1.py")))  # the base setup; hardware below
    c.resolution = 1024
    c.batch_size = 16  # global: 2 per chip on 8 chips
    c.optimizer.grad_accum = 2  # one image per chip per micro-batch: fits a v5e's 16 GiB
    c.data.synth_size = 1024
    c.data.workers = 8
    c.checkpoint_every = 500  # preemptible slices: lose little
    # FSDP groups of 8 neighbouring chips (frozen weights split 8 ways), data parallel across groups.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 8})
    return apply_variants(c, arg)
