"""The training losses (paper Eq. 10-12), as pure jittable JAX functions on NHWC images in [-1, 1].

- ``pixel``: ``mse``, ``edge_loss`` (multi-scale, paper or released variant).
- ``lpips``: LPIPS-VGG v0.1 in Flax; ``lpips_weights``: fetching/verifying its weights offline.
- ``adversarial``: frozen backbone (LPIPS VGG16 by default, or ConvNeXt-base from timm weights via
  ``convnext``), spectrally normalised per-position MLP head, multilevel-sigmoid losses.
- ``config``: ``LossConfig`` / ``AdversarialConfig``; ``total``: ``total_loss`` (Eq. 12).
"""

from bokehdiff_jax.losses.adversarial import (
    adversarial_active,
    backbone_channels,
    backbone_features,
    discriminator_loss,
    generator_loss,
    init_discriminator,
)
from bokehdiff_jax.losses.config import AdversarialConfig, LossConfig
from bokehdiff_jax.losses.convnext import ConvNeXt, ConvNeXtConfig, convnext_from_timm
from bokehdiff_jax.losses.lpips import lpips_distance, lpips_loss
from bokehdiff_jax.losses.lpips_weights import fetch_lpips_weights, load_lpips_weights, lpips_params
from bokehdiff_jax.losses.pixel import edge_loss, mse
from bokehdiff_jax.losses.total import Discriminator, total_loss

__all__ = [
    "AdversarialConfig",
    "ConvNeXt",
    "ConvNeXtConfig",
    "Discriminator",
    "LossConfig",
    "adversarial_active",
    "backbone_channels",
    "backbone_features",
    "convnext_from_timm",
    "discriminator_loss",
    "edge_loss",
    "fetch_lpips_weights",
    "generator_loss",
    "init_discriminator",
    "load_lpips_weights",
    "lpips_distance",
    "lpips_loss",
    "lpips_params",
    "mse",
    "total_loss",
]
