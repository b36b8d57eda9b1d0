"""The paper's single-GPU setup (SPEC section 3): SDXL, LoRA rank 8 on the 14 target kinds plus the VAE
encoder's conv_in / mid_block / conv_out, 512 x 512 crops, batch 2, one step at T = 499, PISA in
down_blocks.1.attentions.0, and the released script's optimiser (AdamW 5e-5, cosine, 20 warm-up steps,
120k steps) and loss weights (MSE 1, LPIPS-VGG 0.1, edge 1 in its own variant, adversarial 0.1 from
step 30k). bf16 compute with remat by default (fits a 16 GB chip); ``--config.precision=fp32`` is the
released script's full precision (remat stays on unless ``--config.model.remat=False``).

  bokehdiff-jax convert from-diffusers stable-diffusion-xl-base-1.0/ sdxl_jax/ --dtype bf16
  bokehdiff-jax train --config configs/sdxl_gpu1.py --workdir runs/sdxl --config.base=sdxl_jax/
  bokehdiff-jax train --config configs/sdxl_gpu1.py --workdir /tmp/dry --dry-run     # no weights needed

Variants (``configs/sdxl_gpu1.py:NAME[,NAME]``): ``paper`` (the paper's weights 1 / 5 / 1 / 0.5, its
edge loss and lr 1e-4), the ablations ``no_occlusion``, ``no_coc``, ``no_softmax_q``,
``vanilla_attention``, ``no_adversarial``, ``no_edge``, ``no_lpips``, and PISA placements ``pisa_down``,
``pisa_mid``, ``pisa_up``, ``pisa_all`` (``bokehdiff_jax.train.config.VARIANTS``).
Data: on-the-fly synthesis from ``--config.data.fg=FOLDER --config.data.bg=FOLDER`` (default: the
embedded samples) or a precomputed ``bokehdiff-jax synth`` folder, ``--config.data.source=FOLDER``.
"""

import ml_collections

from bokehdiff_jax.train.config import apply_variants, default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = default_config()
    c.base = "sdxl_jax"  # a converted SDXL checkpoint folder (`bokehdiff-jax convert from-diffusers`)
    c.trainable = "lora"
    c.precision = "bf16"
    c.model.remat = True
    c.steps = 120_000
    c.batch_size = 2
    c.resolution = 512
    c.seed = 0
    c.log_every = 50
    c.checkpoint_every = 1000
    c.image_every = 1000

    # The released training script's loss weights (the paper's are the `paper` variant).
    c.losses.mse = 1.0
    c.losses.lpips = 0.1
    c.losses.edge = 1.0
    c.losses.edge_variant = "released"
    c.losses.adversarial = 0.1
    c.losses.adversarial_start = 30_000
    c.optimizer.lr = 5e-5
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 20

    c.data.synth_size = 768  # the released canvas; 512 crops
    c.data.workers = 4
    c.checkpoint.keep = 3
    c.checkpoint.keep_every = 10_000
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    c.lock()
    return apply_variants(c, arg)
