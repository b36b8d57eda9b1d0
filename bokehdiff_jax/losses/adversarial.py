"""The adversarial loss of the released code, functional: a frozen backbone, a per-position spectrally
normalised MLP head, and the "multilevel sigmoid" loss.

- Backbone (frozen, gradients flow only to the images): ``"vgg16"`` (default) uses LPIPS's VGG16 (the
  same verified weights as the LPIPS loss, so it works offline) and its ``relu5_3`` features (512
  channels, stride 16); ``"convnext"`` is the released choice, timm's ImageNet-22k ConvNeXt-base
  ``forward_features`` (1024 channels, stride 32), from a user-supplied timm file (``convnext``).
- Head, at every feature position: ``Linear(C, 256) -> LeakyReLU(0.2) -> Linear(256, 1)``, both linear
  layers spectrally normalised. Logits ``[B, h, w]``.
- Loss: binary cross-entropy on logits, averaged over positions and batch (the released code sums over
  the batch instead: it equals ours times the batch size); targets 0.8 for real images and for the
  generator, 0 for fakes (one-sided label smoothing). Discriminator loss = real + fake.

Spectral norm (Miyato et al. 2018, as ``torch.nn.utils.spectral_norm``): ``W / sigma`` with ``sigma =
u^T W v`` from power-iteration vectors ``u, v`` that are carried explicitly (``spectral``, a pytree the
trainer keeps next to the head's params) and held constant in the gradient. The discriminator step
runs ``sn_iterations`` power iterations and returns the new vectors; the generator loss uses the
stored ones without iterating (the released code's ``eval()``).

Images are NHWC in **[-1, 1]**; each backbone maps them to its own input convention.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from bokehdiff_jax.losses.config import AdversarialConfig
from bokehdiff_jax.losses.convnext import ConvNeXt, imagenet_normalize
from bokehdiff_jax.losses.lpips import vgg16_taps
from bokehdiff_jax.losses.lpips_weights import LPIPS_TAPS, TAP_CHANNELS

Params = dict[str, Any]
_NORM_EPS = 1e-12  # torch's spectral_norm eps


def backbone_channels(config: AdversarialConfig) -> int:
    """Feature channels the head receives: 512 for VGG16 ``relu5_3`` (or the chosen tap), 1024 for
    ConvNeXt-base (the last stage's width of ``config.convnext``)."""
    if config.backbone == "vgg16":
        return TAP_CHANNELS[config.vgg_tap]
    return config.convnext.out_channels


def backbone_features(backbone_params: Any, images_bhwc: jax.Array, config: AdversarialConfig) -> jax.Array:
    """Frozen backbone features ``[B, h, w, C]`` of images in [-1, 1].

    ``backbone_params``: for ``"vgg16"`` the LPIPS params (``lpips_params()``; its ``"vgg"`` subtree is
    used); for ``"convnext"`` the output of ``convnext_from_timm``. The params get no gradient.
    ``config.remat``: the backward pass keeps only the images and recomputes the activations (VGG16
    block by block).
    """
    features = functools.partial(_backbone_features, config=config)
    frozen = jax.lax.stop_gradient(backbone_params)
    return (jax.checkpoint(features) if config.remat else features)(frozen, images_bhwc)


def _backbone_features(frozen: Any, images_bhwc: jax.Array, config: AdversarialConfig) -> jax.Array:
    if config.backbone == "vgg16":
        taps = vgg16_taps(frozen["vgg"], images_bhwc, remat=config.remat)
        return taps[LPIPS_TAPS.index(config.vgg_tap)]
    if config.convnext_input == "imagenet":
        x = imagenet_normalize(images_bhwc)
    else:  # the released code feeds [0, 1] images to ConvNeXt without ImageNet normalisation
        x = images_bhwc * 0.5 + 0.5
    return ConvNeXt(config.convnext).apply({"params": frozen}, x)


# ------------------------------------------------------------------------------------- spectral norm
def _l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x), _NORM_EPS)


def power_iteration(
    kernel_io: jax.Array, u: jax.Array, v: jax.Array, iterations: int
) -> tuple[jax.Array, jax.Array]:
    """``iterations`` steps of ``v <- normalize(W^T u)``, ``u <- normalize(W v)`` with ``W = kernel^T``
    (``[out, in]``, torch's layout). Returns ``(u, v)``, without gradient."""
    w = jax.lax.stop_gradient(kernel_io).T

    def step(_, uv: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        v = _l2_normalize(w.T @ uv[0])
        return _l2_normalize(w @ v), v

    if iterations > 0:
        u, v = jax.lax.fori_loop(0, iterations, step, (u, v))
    return jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)


def spectral_normalized(kernel_io: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
    """``kernel / sigma`` with ``sigma = u^T W v``; differentiable in the kernel, ``u, v`` constant."""
    sigma = u @ (kernel_io.T @ v)
    return kernel_io / sigma


# ------------------------------------------------------------------------------------------- the head
def init_discriminator(key: jax.Array, in_features: int, config: AdversarialConfig) -> tuple[Params, Params]:
    """Head params and spectral-norm state for ``in_features`` input channels (``backbone_channels``).

    Params (trainable): ``{"fc1": {"kernel": [C, hidden], "bias": [hidden]}, "fc2": {"kernel":
    [hidden, 1], "bias": [1]}}``, initialised like ``torch.nn.Linear`` (uniform in +-1/sqrt(fan_in)).
    Spectral state (not trained, carried): ``{"fc1": {"u": [hidden], "v": [C]}, "fc2": {"u": [1],
    "v": [hidden]}}``, random unit vectors refined by ``config.sn_init_iterations`` power iterations.
    The same key gives the same result.
    """
    # Pure JAX (traceable: trainers build abstract states with jax.eval_shape), two random draws.
    dims = ((in_features, config.hidden), (config.hidden, 1))
    k_uniform, k_normal = jax.random.split(key)
    uniform = jax.random.uniform(k_uniform, (sum(i * o + o for i, o in dims),), jnp.float32, -1.0, 1.0)
    normal = jax.random.normal(k_normal, (sum(i + o for i, o in dims),), jnp.float32)
    params: Params = {}
    spectral: Params = {}
    for name, (fan_in, fan_out) in zip(("fc1", "fc2"), dims, strict=True):
        bound = 1.0 / math.sqrt(fan_in)
        kernel, uniform = (
            uniform[: fan_in * fan_out].reshape(fan_in, fan_out) * bound,
            uniform[fan_in * fan_out :],
        )
        bias, uniform = uniform[:fan_out] * bound, uniform[fan_out:]
        u, v, normal = normal[:fan_out], normal[fan_out : fan_out + fan_in], normal[fan_out + fan_in :]
        u, v = power_iteration(kernel, _l2_normalize(u), _l2_normalize(v), config.sn_init_iterations)
        params[name] = {"kernel": kernel, "bias": bias}
        spectral[name] = {"u": u, "v": v}
    return params, spectral


def head_logits(
    params: Params, spectral: Params, features_bhwc: jax.Array, config: AdversarialConfig, *, update: bool
) -> tuple[jax.Array, Params]:
    """Per-position logits ``[B, h, w]`` and the (updated, if ``update``) spectral state."""
    new_spectral: Params = {}
    x = features_bhwc.astype(jnp.float32)
    for name in ("fc1", "fc2"):
        kernel, s = params[name]["kernel"], spectral[name]
        u, v = power_iteration(kernel, s["u"], s["v"], config.sn_iterations if update else 0)
        new_spectral[name] = {"u": u, "v": v}
        x = x @ spectral_normalized(kernel, u, v) + params[name]["bias"]
        if name == "fc1":
            x = jax.nn.leaky_relu(x, config.negative_slope)
    return x[..., 0], new_spectral


def _bce(logits: jax.Array, target: float) -> jax.Array:
    """Mean binary cross-entropy on logits against a constant target (stable for any logit)."""
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)))


# ------------------------------------------------------------------------------------------- the loss
def discriminator_loss(
    params: Params,
    spectral: Params,
    backbone_params: Any,
    real_bhwc: jax.Array,
    fake_bhwc: jax.Array,
    config: AdversarialConfig,
) -> tuple[jax.Array, tuple[Params, dict[str, jax.Array]]]:
    """The discriminator's loss (differentiate w.r.t. ``params``): ``BCE(D(real), 0.8) + BCE(D(fake), 0)``.

    ``real``: ground-truth bokeh, ``fake``: the model's output, ``[B, H, W, 3]`` in [-1, 1]; both are
    detached here (the discriminator step never trains the generator). One backbone pass on both.
    Returns ``(loss, (new_spectral, {"d_real", "d_fake"}))``: use with ``jax.value_and_grad(...,
    has_aux=True)`` and carry ``new_spectral`` to the next step.
    """
    b = real_bhwc.shape[0]
    images = jax.lax.stop_gradient(jnp.concatenate([real_bhwc, fake_bhwc], axis=0))
    logits, new_spectral = head_logits(
        params, spectral, backbone_features(backbone_params, images, config), config, update=True
    )
    d_real = _bce(logits[:b], config.real_target)
    d_fake = _bce(logits[b:], config.fake_target)
    return d_real + d_fake, (new_spectral, {"d_real": d_real, "d_fake": d_fake})


def generator_loss(
    params: Params, spectral: Params, backbone_params: Any, fake_bhwc: jax.Array, config: AdversarialConfig
) -> jax.Array:
    """The generator's adversarial loss ``BCE(D(fake), 0.8)``, a scalar; differentiable in ``fake`` only
    (the head's params and state are constants here, the spectral vectors are not iterated)."""
    params = jax.lax.stop_gradient(params)
    logits, _ = head_logits(
        params, spectral, backbone_features(backbone_params, fake_bhwc, config), config, update=False
    )
    return _bce(logits, config.real_target)


def adversarial_active(step: jax.Array | int, config: AdversarialConfig) -> jax.Array:
    """Whether the generator's adversarial term is on at ``step`` (a pure function of the step):
    ``step >= config.start_step``. The discriminator itself trains from step 0, as in the released code."""
    return jnp.asarray(step) >= config.start_step
