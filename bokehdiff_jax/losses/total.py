"""The training objective (Eq. 12) as one pure function: weighted sum and the individual terms."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.losses.adversarial import adversarial_active, generator_loss
from bokehdiff_jax.losses.config import LossConfig
from bokehdiff_jax.losses.lpips import lpips_loss
from bokehdiff_jax.losses.pixel import edge_loss, mse


class Discriminator(NamedTuple):
    """What the generator's adversarial term needs: head params and spectral state
    (``init_discriminator``) and the frozen backbone params (LPIPS params for ``"vgg16"``)."""

    params: Any
    spectral: Any
    backbone: Any


def total_loss(
    pred_bhwc: jax.Array,
    target_bhwc: jax.Array,
    aif_bhwc: jax.Array,
    config: LossConfig,
    *,
    lpips_params: Any = None,
    discriminator: Discriminator | None = None,
    step: jax.Array | int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(loss, terms)`` for one batch; all images ``[B, H, W, 3]`` in [-1, 1].

    ``pred``: the model's output; ``target``: ground-truth bokeh ``I_b``; ``aif``: the all-in-focus input
    ``I_f`` (for the edge weights). ``terms`` holds each unweighted term (``mse``, ``edge``, ``lpips``,
    ``adv``, for those with a non-zero weight) and ``total``. The adversarial term counts from
    ``config.adversarial.start_step`` (``step`` may be traced); before that it is 0 and not computed.
    Jittable; differentiate w.r.t. whatever produced ``pred``.
    """
    if pred_bhwc.shape != target_bhwc.shape or pred_bhwc.shape != aif_bhwc.shape:
        raise InputError(
            f"total_loss: pred {pred_bhwc.shape}, target {target_bhwc.shape} and aif {aif_bhwc.shape} "
            "must have one shape"
        )
    if config.lpips_weight > 0 and lpips_params is None:
        raise InputError("total_loss: lpips_weight > 0 needs lpips_params (losses.lpips_params())")
    if config.adv_weight > 0 and discriminator is None:
        raise InputError(
            "total_loss: adv_weight > 0 needs the discriminator (params, spectral state, backbone)"
        )
    clipped = jnp.clip(pred_bhwc, -1.0, 1.0) if config.clamp_prediction else pred_bhwc
    terms: dict[str, jax.Array] = {}
    total = jnp.zeros((), jnp.float32)
    if config.mse_weight > 0:
        terms["mse"] = mse(pred_bhwc, target_bhwc)
        total = total + config.mse_weight * terms["mse"]
    if config.edge_weight > 0:
        terms["edge"] = edge_loss(
            clipped, target_bhwc, aif_bhwc, variant=config.edge_variant, scales=config.edge_scales
        )
        total = total + config.edge_weight * terms["edge"]
    if config.lpips_weight > 0:
        terms["lpips"] = lpips_loss(lpips_params, clipped, target_bhwc, remat=config.remat)
        total = total + config.lpips_weight * terms["lpips"]
    if config.adv_weight > 0:
        d = discriminator
        terms["adv"] = jax.lax.cond(
            adversarial_active(step, config.adversarial),
            lambda x: generator_loss(d.params, d.spectral, d.backbone, x, config.adversarial),
            lambda x: jnp.zeros((), jnp.float32),
            clipped,
        )
        total = total + config.adv_weight * terms["adv"]
    terms["total"] = total
    return total, terms
