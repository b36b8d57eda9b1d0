"""The smallest SDXL-shaped training run, for the training tests (not a test module).

``configs/tiny_cpu.py`` shrunk until a step compiles in seconds: a two-level U-Net (one ResNet and one
transformer per level, PISA in ``down_blocks.1``), a two-level VAE without mid-block attention, 16 px
images synthesized on the fly from the embedded samples at one blur strength (one ray-tracer shape),
batch 2, every step logged. ``arg`` passes variants through to ``tiny_cpu``.
"""

from pathlib import Path

import ml_collections

from bokehdiff_jax.train.config import load_config, set_architecture

MICRO_UNET = {
    "block_out_channels": (8, 16),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "transformer_layers_per_block": 1,
    "attention_head_dim": (1, 2),
    "cross_attention_dim": 8,
    "norm_num_groups": 4,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": 6 * 4 + 8,
    "sample_size": 8,
}
MICRO_VAE = {
    "block_out_channels": (8, 8),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": 4,
    "mid_block_add_attention": False,
    "sample_size": 16,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.py"
    c = load_config(f"{tiny}:{arg}" if arg else str(tiny))
    set_architecture(c, unet=MICRO_UNET, vae=MICRO_VAE)
    c.steps = 8
    c.batch_size = 2
    c.resolution = 16
    c.log_every = 1
    c.checkpoint_every = 2
    c.image_every = 4
    c.data.synth_size = 16
    c.data.base_strength = 2.0
    c.data.log2_times = (0.0, 0.0)
    c.data.rays_max = 8
    c.data.procedural = 1
    c.data.length = 64
    c.data.workers = 0
    c.optimizer.warmup_steps = 2
    c.checkpoint.keep = 2
    c.checkpoint.async_save = True
    return c
