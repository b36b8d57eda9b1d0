"""What one training step optimises, built from the config in one place: the one-step model
(``models.bokehdiff``), its trainable/frozen split (``models.partition``) and the losses (``losses``).

The trees the step sees::

    params = {"model": <partition.split's trainable tree>,       trained
              "discriminator": <head params>}
    carry  = {"spectral": <the head's power-iteration vectors>}  carried, not trained
    frozen = {"model": <partition.split's frozen tree>,
              "lpips": <LPIPS-VGG params>,        with the LPIPS term or the VGG16 discriminator
              "disc_backbone": <ConvNeXt params>} for the ConvNeXt discriminator

``"discriminator"`` / ``"spectral"`` exist only with a non-zero adversarial weight. The differentiated
objective is the generator's loss plus the discriminator's: ``losses.generator_loss`` holds the head
constant and ``losses.discriminator_loss`` detaches the images, so each group gets its own gradient
from one backward pass (and one optimiser update, ``train.optim``).

Batches hold the loader's arrays: ``aif``/``bokeh`` ``[B, H, W, 3]`` sRGB in [0, 1], ``disparity``
``[B, H, W]``, ``focus``/``strength`` ``[B]``; the model and the losses see images in [-1, 1].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from bokehdiff_jax.losses import AdversarialConfig, Discriminator, LossConfig, discriminator_loss, total_loss
from bokehdiff_jax.models.attention import AttentionRouting
from bokehdiff_jax.models.bokehdiff import BokehDiff
from bokehdiff_jax.models.configs import UNetConfig, VAEConfig
from bokehdiff_jax.models.options import LoRAConfig
from bokehdiff_jax.models.partition import PartitionConfig, merge
from bokehdiff_jax.pisa.config import PisaConfig

# The batch entries the step uses (the loader's other entries stay on the host).
BATCH_KEYS = ("aif", "bokeh", "disparity", "focus", "strength")


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
    return jnp.bfloat16 if config.precision == "bf16" else jnp.float32


def pisa_config(config: ml_collections.ConfigDict) -> PisaConfig:
    """``PisaConfig`` from the config's ``pisa`` group (every field of it, by name)."""
    return PisaConfig(**config.pisa.to_dict())


def partition_config(config: ml_collections.ConfigDict) -> PartitionConfig:
    lora = LoRAConfig(
        rank=config.lora.rank, alpha=float(config.lora.alpha), targets=tuple(config.lora.targets)
    )
    return PartitionConfig(trainable=config.trainable, lora=lora, vae_parts=tuple(config.vae_parts))


def loss_config(config: ml_collections.ConfigDict) -> LossConfig:
    lc = config.losses
    adv = AdversarialConfig(
        backbone=lc.discriminator.backbone,
        convnext_input=lc.discriminator.convnext_input,
        hidden=lc.discriminator.hidden,
        start_step=lc.adversarial_start,
        disc_lr_factor=float(config.optimizer.lr_scale.discriminator),
        remat=config.model.remat,
    )
    return LossConfig(
        mse_weight=lc.mse,
        lpips_weight=lc.lpips,
        edge_weight=lc.edge,
        adv_weight=lc.adversarial,
        edge_variant=lc.edge_variant,
        remat=config.model.remat,
        adversarial=adv,
    )


def build_model(
    config: ml_collections.ConfigDict, unet_config: UNetConfig, vae_config: VAEConfig
) -> BokehDiff:
    """The one-step model of this config: PISA placement and switches, LoRA (in ``"lora"`` mode), remat
    and compute dtype. Frozen base weights are stored in the compute dtype (bf16 halves them)."""
    dtype = compute_dtype(config)
    return BokehDiff.create(
        unet_config,
        vae_config,
        routing=AttentionRouting(pisa_paths=tuple(config.pisa_paths), pisa=pisa_config(config)),
        lora=partition_config(config).unet_lora,
        remat=config.model.remat,
        dtype=dtype,
        param_dtype=dtype,
        timestep=config.model.timestep,
    )


def needs_lpips_params(losses: LossConfig) -> bool:
    return losses.lpips_weight > 0 or (losses.adv_weight > 0 and losses.adversarial.backbone == "vgg16")


@dataclasses.dataclass(frozen=True)
class Objective:
    """The loss and the inference rendering of one config (static: closes over no arrays)."""

    model: BokehDiff
    losses: LossConfig

    @property
    def adversarial(self) -> bool:
        return self.losses.adv_weight > 0

    def _backbone(self, frozen: dict) -> Any:
        return frozen["lpips"] if self.losses.adversarial.backbone == "vgg16" else frozen["disc_backbone"]

    def render(
        self, params: dict, frozen: dict, batch: dict, *, step=None, key=None, train=False
    ) -> jax.Array:
        """The model's output ``[B, H, W, 3]`` in about [-1, 1] for a batch (``step=None``: inference)."""
        variables = merge(params["model"], frozen["model"])
        return self.model.apply(
            variables,
            batch["aif"] * 2.0 - 1.0,
            batch["disparity"],
            batch["focus"],
            batch["strength"],
            step=step,
            key=key,
            train=train,
        )

    def loss(
        self, params: dict, carry: dict, frozen: dict, batch: dict, key: jax.Array, step: jax.Array
    ) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict]]:
        """``(objective, (terms, new carry))``. ``terms``: ``loss`` (the generator's weighted total, what
        logs show), each unweighted term (``mse``, ``edge``, ``lpips``, ``adv``) and, with the
        adversarial term, ``d_loss``, ``d_real``, ``d_fake``."""
        pred = self.render(params, frozen, batch, step=step, key=key, train=True)
        target = batch["bokeh"] * 2.0 - 1.0
        aif = batch["aif"] * 2.0 - 1.0
        disc = None
        if self.adversarial:
            disc = Discriminator(params["discriminator"], carry["spectral"], self._backbone(frozen))
        g_loss, terms = total_loss(
            pred,
            target,
            aif,
            self.losses,
            lpips_params=frozen.get("lpips"),
            discriminator=disc,
            step=step,
        )
        terms = {k: v for k, v in terms.items() if k != "total"}
        terms["loss"] = g_loss
        if not self.adversarial:
            return g_loss, (terms, carry)
        fake = jnp.clip(pred, -1.0, 1.0) if self.losses.clamp_prediction else pred
        d_loss, (spectral, d_terms) = discriminator_loss(
            params["discriminator"], carry["spectral"], disc.backbone, target, fake, self.losses.adversarial
        )
        terms.update(d_terms, d_loss=d_loss)
        return g_loss + d_loss, (terms, {**carry, "spectral": spectral})

    def predict(self, params: dict, frozen: dict, batch: dict) -> jax.Array:
        """Inference output in [0, 1] (for image grids)."""
        return jnp.clip(self.render(params, frozen, batch) * 0.5 + 0.5, 0.0, 1.0)
