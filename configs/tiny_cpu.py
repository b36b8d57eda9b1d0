"""A tiny SDXL-shaped BokehDiff trained from a seeded random init on 2 CPU cores: the smoke run, whose
loss visibly falls within about three minutes (compilation included).

  bokehdiff-jax train --config configs/tiny_cpu.py --workdir /tmp/bokehdiff_tiny
  tensorboard --logdir /tmp/bokehdiff_tiny/tensorboard

Override any key on the command line (``--config.steps=50 --config.pisa.occlusion=False``), apply the
paper's ablations by name (``--config configs/tiny_cpu.py:no_occlusion``; the list is
``bokehdiff_jax.train.config.VARIANTS``), or start from a converted checkpoint with
``--config.base=path/to/checkpoint`` (its own architecture is then used; ``--config.trainable=lora``).

Every key, with its meaning, is declared in ``bokehdiff_jax.train.config.default_config``; this file
changes values only. Data: on-the-fly synthesis (SPEC section 4) from the embedded sample images
(scikit-image's horse, logo and photos, plus procedural hair/fur foregrounds), 64 px canvases.
"""

import ml_collections

from bokehdiff_jax.train.config import apply_variants, default_config, set_architecture

# SDXL's U-Net layout (text_time conditioning, linear projections, per-level heads and depths) at toy
# width; diffusers' config.json keys, read by UNetConfig.from_diffusers.
TINY_UNET = {
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "transformer_layers_per_block": (1, 1, 1),
    "attention_head_dim": (1, 2, 4),  # diffusers' name for the head count
    "cross_attention_dim": 24,
    "norm_num_groups": 8,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 16,
    "sample_size": 16,
}
TINY_VAE = {
    "block_out_channels": (16, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "sample_size": 64,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The tiny CPU run; ``arg``: comma-separated variants (ablations, PISA placements)."""
    c = default_config()
    set_architecture(c, unet=TINY_UNET, vae=TINY_VAE)
    c.base = "random"
    c.trainable = "all"  # a random init: train every weight
    c.precision = "fp32"
    c.model.remat = False
    c.steps = 400
    c.batch_size = 4
    c.resolution = 64
    c.seed = 0
    c.log_every = 10
    c.checkpoint_every = 100
    c.image_every = 100

    # PISA at the 4x4 token grid of down_blocks.1 (16x16 latents of 64 px images): fewer ray samples.
    c.pisa.segments = 3
    c.pisa.supersample = 2
    c.pisa.block_q = 64
    c.pisa.block_k = 64

    # MSE and edge loss only: LPIPS-VGG and the VGG16 discriminator would dominate a CPU step.
    c.losses.lpips = 0.0
    c.losses.adversarial = 0.0
    c.optimizer.lr = 1e-3  # from scratch, not a fine-tune
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.0

    c.data.synth_size = 64
    c.data.base_strength = 4.0  # K = 1..32 px at 64 px (times = 2**U(-2, 3))
    c.data.rays_max = 64
    c.data.length = 4096
    c.data.workers = 1  # one grain worker synthesizes while the main process trains
    c.checkpoint.keep = 2
    c.checkpoint.keep_every = 0
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    c.lock()
    return apply_variants(c, arg)
