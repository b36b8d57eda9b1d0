"""Loss configuration as data: the weights of Eq. 12 and the adversarial settings (frozen dataclasses)."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.losses.convnext import ConvNeXtConfig
from bokehdiff_jax.losses.lpips_weights import LPIPS_TAPS
from bokehdiff_jax.losses.pixel import EDGE_VARIANTS


@dataclasses.dataclass(frozen=True)
class AdversarialConfig:
    """The discriminator (see ``losses.adversarial``).

    - ``backbone``: ``"vgg16"`` (default: LPIPS's VGG16, verified weights available offline) or
      ``"convnext"`` (the released code's timm ImageNet-22k ConvNeXt-base; user-supplied weights).
    - ``vgg_tap``: which VGG16 feature map the head reads (``relu5_3``: 512 channels, stride 16).
    - ``convnext``: the ConvNeXt architecture (ConvNeXt-base; smaller ones for tests).
    - ``convnext_input``: ``"imagenet"`` normalises as the timm weights expect; ``"released"`` feeds
      [0, 1] images unnormalised, as the released code does.
    - ``real_target`` / ``fake_target``: BCE targets (0.8 for real and for the generator, 0 for fakes).
    - ``start_step``: the generator's adversarial term is on from this step (released ``--gan_step``
      1000; it uses ``step > gan_step``).
    - ``disc_lr_factor``: the discriminator's learning rate over the generator's (2 in the released code).
    - ``sn_iterations``: power iterations per discriminator step; ``sn_init_iterations`` at init.
    - ``remat``: the generator term's backward pass keeps only the images and recomputes the backbone's
      activations (``backbone_features``): same values and gradients, less memory.
    """

    backbone: Literal["vgg16", "convnext"] = "vgg16"
    vgg_tap: str = "relu5_3"
    convnext: ConvNeXtConfig = ConvNeXtConfig.base()
    convnext_input: Literal["imagenet", "released"] = "imagenet"
    hidden: int = 256
    negative_slope: float = 0.2
    real_target: float = 0.8
    fake_target: float = 0.0
    start_step: int = 1000
    disc_lr_factor: float = 2.0
    sn_iterations: int = 1
    sn_init_iterations: int = 15
    remat: bool = False

    def __post_init__(self) -> None:
        if self.backbone not in ("vgg16", "convnext"):
            raise InputError(f"adversarial backbone {self.backbone!r}: expected 'vgg16' or 'convnext'")
        if self.vgg_tap not in LPIPS_TAPS:
            raise InputError(f"adversarial vgg_tap {self.vgg_tap!r}: expected one of {LPIPS_TAPS}")
        if self.convnext_input not in ("imagenet", "released"):
            raise InputError(f"convnext_input {self.convnext_input!r}: expected 'imagenet' or 'released'")
        if self.hidden < 1 or self.start_step < 0 or self.sn_iterations < 0 or self.sn_init_iterations < 0:
            raise InputError("adversarial hidden must be >= 1 and start_step, sn_iterations >= 0")
        if not (self.disc_lr_factor > 0 and math.isfinite(self.disc_lr_factor)):
            raise InputError(f"disc_lr_factor {self.disc_lr_factor}: expected a positive number")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Eq. 12: ``mse_weight * MSE + lpips_weight * LPIPS + edge_weight * edge + adv_weight * adversarial``.

    Defaults are the paper's (1 / 5 / 1 / 0.5). The released training script's defaults differ:
    ``--lambda_lpips 0.1``, ``--lambda_gan 0.1``, edge weight 1 with its own variant
    (``LossConfig.released_script()``). ``clamp_prediction``: the released code takes the MSE of the raw
    prediction and every other term of the prediction clipped to [-1, 1] (kept as the default).
    A zero weight skips its term entirely (no computation, no weights needed). ``remat``: the LPIPS
    term's backward pass recomputes its VGG activations (``lpips_distance``) instead of keeping them.
    """

    mse_weight: float = 1.0
    lpips_weight: float = 5.0
    edge_weight: float = 1.0
    adv_weight: float = 0.5
    edge_variant: str = "paper"
    edge_scales: int = 3
    clamp_prediction: bool = True
    remat: bool = False
    adversarial: AdversarialConfig = AdversarialConfig()

    def __post_init__(self) -> None:
        for name in ("mse_weight", "lpips_weight", "edge_weight", "adv_weight"):
            w = getattr(self, name)
            if not (isinstance(w, int | float) and math.isfinite(w) and w >= 0):
                raise InputError(f"loss {name} {w!r}: expected a finite number >= 0")
        if self.edge_variant not in EDGE_VARIANTS:
            raise InputError(f"edge_variant {self.edge_variant!r}: expected one of {EDGE_VARIANTS}")
        if self.edge_scales < 1:
            raise InputError(f"edge_scales {self.edge_scales}: expected >= 1")

    @classmethod
    def released_script(cls) -> LossConfig:
        """The released ``train_lora_otf.py`` defaults: LPIPS 0.1, GAN 0.1 after 1000 steps on ConvNeXt-base
        fed unnormalised [0, 1] images, the released edge variant."""
        adv = AdversarialConfig(backbone="convnext", convnext_input="released", start_step=1000)
        return cls(lpips_weight=0.1, adv_weight=0.1, edge_variant="released", adversarial=adv)
