"""A tiny SDXL-shaped BokehDiff, trained from a seeded random init on 2 CPU cores (the smoke run).

Launch (the ``train`` command comes with the training issue):

  bokehdiff-jax train --config configs/tiny_cpu.py --workdir /tmp/bokehdiff_tiny

Override any key on the command line, e.g. ``--config.steps=50 --config.pisa.occlusion=False``.

Keys every run config has (the training issue's contract): ``base`` (``"random"``: a seeded random init
of ``model.unet`` / ``model.vae``; or the path of a converted checkpoint, whose own architecture is then
used), ``trainable`` (``"lora"``: LoRA plus the VAE parts, as the paper; ``"all"``: every weight),
``steps``, ``batch_size``, ``resolution`` (image side, pixels), ``seed``, ``log_every``,
``checkpoint_every``; ``mesh`` (``bokehdiff_jax.sharding.make_mesh``: axis -> size, -1 = the devices
left); ``model`` (architecture as diffusers ``config.json`` dicts, LoRA size, remat, precision);
``pisa_paths`` and ``pisa`` (``AttentionRouting(pisa_paths, PisaConfig(**pisa))``).
"""

import dataclasses

import ml_collections

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.attention import SPEC_PISA_PATHS
from bokehdiff_jax.pisa import PisaConfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The locked config. ``arg``: no variants yet (``None`` only)."""
    if arg:
        raise InputError(f"configs/tiny_cpu.py:{arg}: this config has no variants (expected no argument)")
    config = ml_collections.ConfigDict()
    config.base = "random"
    config.trainable = "all"  # a random init: train every weight
    config.steps = 300
    config.batch_size = 2
    config.resolution = 64
    config.seed = 0
    config.log_every = 10
    config.checkpoint_every = 100
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})

    config.model = ml_collections.ConfigDict()
    # SDXL's U-Net layout (text_time conditioning, linear projections, per-level heads and depths) at
    # toy width; diffusers' config.json keys, read by UNetConfig.from_diffusers.
    config.model.unet = ml_collections.ConfigDict(
        {
            "block_out_channels": (32, 64, 64),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "layers_per_block": 2,
            "transformer_layers_per_block": (1, 1, 2),
            "attention_head_dim": (1, 2, 4),  # diffusers' name for the head count
            "cross_attention_dim": 24,
            "norm_num_groups": 8,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 16,
            "sample_size": 16,
        }
    )
    config.model.vae = ml_collections.ConfigDict(
        {
            "block_out_channels": (16, 32, 32),
            "down_block_types": ("DownEncoderBlock2D",) * 3,
            "up_block_types": ("UpDecoderBlock2D",) * 3,
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "latent_channels": 4,
            "sample_size": 64,
        }
    )
    config.model.lora_rank = 8
    config.model.lora_alpha = 8.0
    config.model.remat = False
    config.model.precision = "fp32"

    config.pisa_paths = SPEC_PISA_PATHS
    # Every PisaConfig field, from its own defaults; small ray sampling for CPU, the released dropout.
    config.pisa = ml_collections.ConfigDict(
        dataclasses.asdict(PisaConfig(segments=3, supersample=2, dropout=0.1, block_q=64, block_k=64))
    )
    config.lock()
    return config
