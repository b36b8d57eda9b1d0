"""Shared by the export/import/PyTorch-pipeline tests: a tiny random SDXL-shaped diffusers base on disk and
trained models on it (LoRA with non-zero B, modified VAE parts), made without tracing the JAX model."""

from __future__ import annotations

import pathlib

import numpy as np
import tiny_configs
import torch

from bokehdiff_jax.convert.peft_files import lora_shapes
from bokehdiff_jax.convert.trained import ModelSpec, Trained, base_configs, flatten, unet_shapes, unflatten
from bokehdiff_jax.models.attention import AttentionRouting
from bokehdiff_jax.models.bokehdiff import random_prompt_embeds
from bokehdiff_jax.models.options import LoRAConfig
from bokehdiff_jax.models.partition import SPEC_VAE_TRAINABLE
from bokehdiff_jax.pisa.config import PisaConfig

# The smallest SDXL-shaped pair (text_time conditioning, linear projections, SPEC's PISA layer
# down_blocks.1.attentions.0 present): two levels, one layer each; compiles fastest in JAX.
MINI_UNET = {
    **tiny_configs.UNETS["sdxl"],
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "transformer_layers_per_block": [1, 1],
    "attention_head_dim": [1, 2],
}
MINI_VAE = {
    **tiny_configs.VAES["sdxl"],
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
}


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def write_base(root: pathlib.Path, name: str = "sdxl", seed: int = 0, **unet_overrides) -> pathlib.Path:
    """A diffusers folder ``root/unet``, ``root/vae`` with random weights of the tiny ``name`` configs
    (``tiny_configs`` names, or ``"mini"``)."""
    import diffusers

    unet_cfg = MINI_UNET if name == "mini" else tiny_configs.UNETS[name]
    vae_cfg = MINI_VAE if name == "mini" else tiny_configs.VAES[name]
    torch.manual_seed(seed)  # the init itself is random: seed it too, so the base is the same every run
    unet = diffusers.UNet2DConditionModel(**{**unet_cfg, **unet_overrides})
    perturbed(unet, seed).save_pretrained(root / "unet")
    torch.manual_seed(seed + 1)
    perturbed(diffusers.AutoencoderKL(**vae_cfg), seed + 1).save_pretrained(root / "vae")
    return root


def base_vae_parts(base: pathlib.Path, parts=SPEC_VAE_TRAINABLE) -> dict:
    """The base's VAE-parts tree (Flax layout, float32)."""
    from bokehdiff_jax.convert.importers import base_vae_parts as read
    from bokehdiff_jax.convert.trained import abstract_vae_parts

    return read(base, abstract_vae_parts(base_configs(base)[1], parts))


def random_trained(
    base: pathlib.Path,
    *,
    rank: int = 4,
    alpha: float = 4.0,
    pisa: bool = True,
    seed: int = 0,
    targets=None,
    lora_std: float = 0.3,
) -> Trained:
    """A trained model on ``base``: LoRA A and B random (B non-zero), VAE parts = base + noise, random
    prompt embeddings, SPEC's PISA placement (dense) or none."""
    unet_config, vae_config = base_configs(base)
    lora = LoRAConfig(rank=rank, alpha=alpha) if targets is None else LoRAConfig(rank, alpha, tuple(targets))
    rng = np.random.default_rng(seed)
    shapes = flatten(lora_shapes(unet_shapes(base), lora))
    tree = unflatten(
        {k: (lora_std * rng.standard_normal(v.shape)).astype(np.float32) for k, v in shapes.items()}
    )
    vae = unflatten(
        {
            k: v + (0.02 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in flatten(base_vae_parts(base)).items()
        }
    )
    routing = AttentionRouting(pisa=PisaConfig(impl="dense")) if pisa else AttentionRouting(pisa_paths=())
    spec = ModelSpec(
        unet_config, vae_config, lora, SPEC_VAE_TRAINABLE, routing, 499, "a test prompt",
        {"path": str(base.resolve()), "fingerprint": None},
    )  # fmt: skip
    cond = random_prompt_embeds(unet_config, seed)
    return Trained({"unet": {"lora": tree}, "vae": {"params": vae}}, cond, spec, "test")


def assert_trees_equal(a, b) -> None:
    fa, fb = flatten(a), flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert np.array_equal(x, y), k
