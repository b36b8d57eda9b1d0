"""Shared by the export/import/PyTorch-pipeline tests: a tiny random SDXL-shaped diffusers base on disk and
trained models on it (LoRA with non-zero B, modified VAE parts), made without tracing the JAX model."""

from __future__ import annotations

import pathlib

import numpy as np
import tiny_configs
import torch

from bokehdiff_jax.convert.peft_files import lora_shapes
from bokehdiff_jax.convert.trained import ModelSpec, Trained, base_configs, flatten, unet_shapes, unflatten
from bokehdiff_jax.io.safetensors_io import SafetensorsFile
from bokehdiff_jax.models.attention import AttentionRouting
from bokehdiff_jax.models.bokehdiff import random_prompt_embeds
from bokehdiff_jax.models.options import LoRAConfig
from bokehdiff_jax.models.partition import SPEC_VAE_TRAINABLE
from bokehdiff_jax.pisa.config import PisaConfig


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def write_base(root: pathlib.Path, name: str = "sdxl", seed: int = 0, **unet_overrides) -> pathlib.Path:
    """A diffusers folder ``root/unet``, ``root/vae`` with random weights of the tiny ``name`` configs."""
    import diffusers

    perturbed(
        diffusers.UNet2DConditionModel(**{**tiny_configs.UNETS[name], **unet_overrides}), seed
    ).save_pretrained(root / "unet")
    perturbed(diffusers.AutoencoderKL(**tiny_configs.VAES[name]), seed + 1).save_pretrained(root / "vae")
    return root


def base_vae_parts(base: pathlib.Path, parts=SPEC_VAE_TRAINABLE) -> dict:
    """The base's VAE-parts tree (Flax layout, float32), read through diffusers' names."""
    from bokehdiff_jax.convert import mapping
    from bokehdiff_jax.convert.trained import abstract_vae_parts

    _, vae_config = base_configs(base)
    abstract = abstract_vae_parts(vae_config, parts)
    with SafetensorsFile(base / "vae" / "diffusion_pytorch_model.safetensors") as f:
        return mapping.diffusers_to_flax(f, abstract, dtype=np.float32)


def random_trained(
    base: pathlib.Path,
    *,
    rank: int = 4,
    alpha: float = 4.0,
    pisa: bool = True,
    seed: int = 0,
    targets=None,
) -> Trained:
    """A trained model on ``base``: LoRA A and B random (B non-zero), VAE parts = base + noise, random
    prompt embeddings, SPEC's PISA placement (dense) or none."""
    unet_config, vae_config = base_configs(base)
    lora = LoRAConfig(rank=rank, alpha=alpha) if targets is None else LoRAConfig(rank, alpha, tuple(targets))
    rng = np.random.default_rng(seed)
    shapes = flatten(lora_shapes(unet_shapes(base), lora))
    tree = unflatten({k: (0.3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in shapes.items()})
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
