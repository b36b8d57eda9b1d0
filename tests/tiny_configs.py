"""Small diffusers configs (``config.json`` dicts) shared by the model and converter tests.

Three U-Net shapes cover what ``UNetConfig`` must handle: SDXL's (text_time, linear projection,
per-block head counts, a transformer depth above 1), SD 1.5's (1x1 conv projection, one int head
count, four blocks ending in a DownBlock2D) and an odd one (group count 4, channels 12/24, upcast
attention, int transformer depth). Each has a VAE beside it. All run in well under a second on CPU.
"""

from __future__ import annotations

UNETS: dict[str, dict] = {
    "sdxl": {
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 1, 2],
        "attention_head_dim": [1, 2, 4],  # diffusers' name for the head *count*
        "cross_attention_dim": 24,
        "norm_num_groups": 8,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 16,
        "sample_size": 16,
    },
    "sd15": {
        "block_out_channels": [16, 16, 32, 32],
        "down_block_types": [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "attention_head_dim": 2,
        "cross_attention_dim": 16,
        "norm_num_groups": 8,
        "use_linear_projection": False,
        "sample_size": 16,
    },
    "odd": {
        "block_out_channels": [12, 24],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "transformer_layers_per_block": 2,
        "attention_head_dim": [3, 6],
        "cross_attention_dim": 8,
        "norm_num_groups": 4,
        "norm_eps": 1e-6,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "use_linear_projection": True,
        "upcast_attention": True,
        "sample_size": 8,
    },
}

VAES: dict[str, dict] = {
    "sdxl": {
        "block_out_channels": [16, 32, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "latent_channels": 4,
        "scaling_factor": 0.13025,
        "sample_size": 32,
    },
    "sd15": {
        "block_out_channels": [8, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 2,
        "norm_num_groups": 8,
        "latent_channels": 4,
        "sample_size": 16,
    },
    "odd": {
        "block_out_channels": [12, 24],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "latent_channels": 3,
        "use_quant_conv": False,
        "sample_size": 16,
    },
}


def convert_cases() -> dict[str, tuple[dict, dict]]:
    """name -> (U-Net config, VAE config), for the converter's end-to-end tests."""
    return {name: (dict(UNETS[name]), dict(VAES[name])) for name in UNETS}
