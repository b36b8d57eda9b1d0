"""``OneStep``: inference with a trained BokehDiff model (issue 13 section 1).

::

    render = OneStep.from_checkpoint("runs/tiny")          # a workdir, checkpoint, trained or export folder
    out = render(image_bhwc, disparity_bhw, focus_b, strength_b)   # [-1, 1] in, [-1, 1] out, [B, H, W, 3]
    focus_n, stack = render.focal_stack(image_hwc, disparity_hw, strength=12.0, n=7)   # [0, 1] images

- Deterministic: PISA at inference (no dropout, fixed stratified occlusion offsets, the inference
  hardness of the model's ``PisaConfig``); no key is taken. The same inputs give the same output.
- One compilation per input shape: focus and strength are ``[B]`` float32 arrays (scalars are broadcast
  on the host before the call), so new values, and every frame of a focal stack, reuse the program.
  The compiled programs are shared by every ``OneStep`` of an equal model structure (a trained model and
  its untrained start, or a model loaded twice, compile once per shape); ``traces`` counts how often that
  structure was traced (= compiled) in this process; tests check it.
- Large images: the VAE runs as the exact tiled VAE (``models.vae_tiling``) once its whole-map
  mid-block attention would need more than ``VAE_ATTENTION_BUDGET`` bytes; the U-Net still sees the whole
  latent in one pass (sparse PISA keeps its memory at O(N * block)), so there are no seams: the result is
  the untiled model's up to rounding.
- PISA's implementation is chosen per backend and size (``PisaConfig(impl="auto")``) unless asked.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.attention import AttentionRouting, PisaInputs
from bokehdiff_jax.models.bokehdiff import BokehDiff, Variables, pad_to_multiple, sdxl_time_ids
from bokehdiff_jax.physics.focus import stack_focus

# The untiled VAE's mid-block attention holds (H W / f^2)^2 fp32 logits: above this many bytes, tile.
# 2 GiB: 1024 x 1024 images (1 GiB) run whole, 2048 x 2048 (16 GiB) tiled.
VAE_ATTENTION_BUDGET = 2 * 2**30
VAE_TILE = 512  # output tile side of the tiled VAE, pixels (a multiple of 8)


def vae_needs_tiling(vae_config: Any, height: int, width: int) -> bool:
    """Whether the untiled VAE's mid-block attention over an ``height x width`` image would hold more than
    ``VAE_ATTENTION_BUDGET`` bytes of fp32 logits (SDXL: above about 1200 x 1200 px)."""
    f = vae_config.downsample_factor
    tokens = -(-height // f) * -(-width // f)
    return bool(vae_config.mid_block_add_attention) and tokens * tokens * 4 > VAE_ATTENTION_BUDGET


def inference_model(model: BokehDiff, pisa_impl: str | None = "auto") -> BokehDiff:
    """``model`` for inference: no remat, and PISA's implementation set to ``pisa_impl`` (None: keep the
    trained config's). Dropout and jitter need no change: they act only with ``train=True``."""
    routing = model.unet.routing
    pisa = routing.pisa if pisa_impl is None else dataclasses.replace(routing.pisa, impl=pisa_impl)
    unet = model.unet.clone(routing=AttentionRouting(routing.pisa_paths, pisa), remat=False)
    return dataclasses.replace(model, unet=unet, vae=model.vae.clone(remat=False))


def latent_step(model: BokehDiff, variables: Variables, z, time_ids, disparity, focus, strength) -> jax.Array:
    """The U-Net pass on whole latents, ``z -> z0`` (``[B, h, w, C]`` scaled latents; PISA reads the
    ``[B, H, W]`` disparity at the padded image size, ``time_ids`` are the real size)."""
    pisa = PisaInputs(disparity=disparity, focus=focus, strength=strength)
    return model.denoise(z, model.predict_noise(variables, z, time_ids, pisa))


# Traces per model structure (a BokehDiff is a hashable frozen dataclass: equal structures share programs).
_TRACES: collections.Counter = collections.Counter()


@functools.partial(jax.jit, static_argnums=0)
def _whole(model: BokehDiff, variables, image, disparity, focus, strength):
    _TRACES[model] += 1  # runs only while tracing
    return model.apply(variables, image, disparity, focus, strength)


@functools.partial(jax.jit, static_argnums=0)
def _latent(model: BokehDiff, variables, z, time_ids, disparity, focus, strength):
    _TRACES[model] += 1
    return latent_step(model, variables, z, time_ids, disparity, focus, strength)


def _per_image(x: Any, batch: int, name: str) -> np.ndarray:
    a = np.asarray(x, np.float32)
    if a.shape not in ((), (batch,)):
        raise InputError(f"{name} shape {a.shape}: expected [batch={batch}] (or a scalar for all images)")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name} must be finite, got {a}")
    return np.broadcast_to(a, (batch,)).copy()


class OneStep:
    """A loaded one-step model as a callable ``(image, disparity, focus, strength) -> image``.

    Attributes:
      model: the inference model (``inference_model``).
      variables: the full variables tree, on the default device.
      source: what it was loaded from.
      traces: how many times this model structure was traced in this process (one per compilation).
    """

    def __init__(
        self,
        model: BokehDiff,
        variables: Variables,
        *,
        source: str = "",
        pisa_impl: str | None = "auto",
        tiled: bool | None = None,
        vae_tile: int = VAE_TILE,
    ) -> None:
        """``tiled``: run the VAE tiled (True), whole (False) or when the image needs it (None).
        ``vae_tile``: the tiled VAE's output tile side in pixels."""
        if vae_tile < model.vae_factor or vae_tile % model.vae_factor:
            raise InputError(f"vae_tile={vae_tile}: expected a positive multiple of {model.vae_factor}")
        self.model = inference_model(model, pisa_impl)
        self.variables = jax.device_put(variables)
        self.source = source
        self.tiled, self.vae_tile = tiled, vae_tile

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        base: str | os.PathLike | None = None,
        step: int | None = None,
        dtype: Any = None,
        initial: bool = False,
        pisa_impl: str | None = "auto",
        tiled: bool | None = None,
        vae_tile: int = VAE_TILE,
    ) -> OneStep:
        """The model at ``path``: a training workdir (latest checkpoint, or ``step``; ``initial``: its
        untrained starting point) or a ``checkpoints/<step>`` folder, a trained-model folder, or an export
        folder, on the base weights it names (``base`` overrides them). See ``pipeline.load.load_model``."""
        from bokehdiff_jax.pipeline.load import load_model

        loaded = load_model(path, base=base, step=step, dtype=dtype, initial=initial)
        return cls(
            loaded.model,
            loaded.variables,
            source=loaded.source,
            pisa_impl=pisa_impl,
            tiled=tiled,
            vae_tile=vae_tile,
        )

    # ------------------------------------------------------------------------------ traced functions
    @property
    def traces(self) -> int:
        return _TRACES[self.model]

    # --------------------------------------------------------------------------------------- calls
    def needs_tiling(self, height: int, width: int) -> bool:
        """Whether an ``height x width`` image runs the tiled VAE (``tiled``, else by memory)."""
        if self.tiled is not None:
            return self.tiled
        return vae_needs_tiling(self.model.vae.config, height, width)

    def _inputs(self, image, disparity, focus, strength):
        image = jnp.asarray(image, jnp.float32)
        disparity = jnp.asarray(disparity, jnp.float32)
        if image.ndim != 4 or image.shape[-1] != 3:
            raise InputError(f"image shape {image.shape}: expected [batch, H, W, 3] in [-1, 1]")
        b, h, w, _ = image.shape
        if disparity.shape != (b, h, w):
            raise InputError(f"disparity shape {disparity.shape}: expected [batch, H, W] = {(b, h, w)}")
        f = jnp.asarray(_per_image(focus, b, "focus"))
        s = jnp.asarray(_per_image(strength, b, "strength"))
        return image, disparity, f, s

    def __call__(self, image_bhwc, disparity_bhw, focus_b, strength_b) -> jax.Array:
        """The bokeh rendering, ``[B, H, W, 3]`` float32 in about [-1, 1] (not clipped).

        Args:
          image_bhwc: ``[B, H, W, 3]`` all-in-focus images in [-1, 1], any ``H, W >= 1``.
          disparity_bhw: ``[B, H, W]`` in [0, 1], 1 nearest.
          focus_b: ``[B]`` focus disparities (or one for all).
          strength_b: ``[B]`` blur strengths ``K``, CoC radius in pixels per unit disparity (or one).
        """
        image, disparity, focus, strength = self._inputs(image_bhwc, disparity_bhw, focus_b, strength_b)
        b, h, w, _ = image.shape
        if not self.needs_tiling(h, w):
            return _whole(self.model, self.variables, image, disparity, focus, strength)
        m, f = self.model, self.model.vae_factor
        x = pad_to_multiple(image, f, m.pad_mode)
        d = pad_to_multiple(disparity, f, m.pad_mode)
        z = m.encode(self.variables, x, tile=self.vae_tile)
        z0 = _latent(self.model, self.variables, z, sdxl_time_ids(h, w, b), d, focus, strength)
        return m.decode(self.variables, z0, tile=self.vae_tile // f)[:, :h, :w]

    def render(
        self, image_hwc: np.ndarray, disparity_hw: np.ndarray, focus: float, strength: float
    ) -> np.ndarray:
        """One image: ``[H, W, 3]`` sRGB in [0, 1] -> ``[H, W, 3]`` float32 in [0, 1] (clipped)."""
        out = self(np.asarray(image_hwc, np.float32)[None] * 2.0 - 1.0, np.asarray(disparity_hw)[None],
                   focus, strength)  # fmt: skip
        return np.clip((np.asarray(out[0], np.float32) + 1.0) / 2.0, 0.0, 1.0)

    def focal_stack(
        self, image_hwc: np.ndarray, disparity_hw: np.ndarray, strength: float, n: int, *, batch: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` renders of one image focused from its farthest to its nearest disparity
        (``physics.focus.stack_focus``, as the classical ``render.focal_stack``), ``batch`` frames per
        call (the last call is padded to ``batch``: one compilation for the whole stack). Returns
        ``(focus [n], images [n, H, W, 3] in [0, 1])``."""
        if batch < 1:
            raise InputError(f"focal stack batch={batch}: expected >= 1")
        image = np.asarray(image_hwc, np.float32)
        disparity = np.asarray(disparity_hw, np.float32)
        if image.ndim != 3 or disparity.shape != image.shape[:2]:
            raise InputError(f"focal stack: image {image.shape} and disparity {disparity.shape} must be "
                             "[H, W, 3] and [H, W]")  # fmt: skip
        focus_n = stack_focus(disparity, n)
        x = np.broadcast_to(image * 2.0 - 1.0, (batch, *image.shape))
        d = np.broadcast_to(disparity, (batch, *disparity.shape))
        frames = []
        for start in range(0, n, batch):
            chunk = focus_n[start : start + batch]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk))])
            out = np.asarray(self(x, d, padded, strength), np.float32)[: len(chunk)]
            frames.append(np.clip((out + 1.0) / 2.0, 0.0, 1.0))
        return focus_n, np.concatenate(frames)

    # ------------------------------------------------------------------------------------- analysis
    def lower(self, height: int, width: int, batch: int = 1) -> jax.stages.Lowered:
        """The whole one-step render (untiled) lowered for ``[batch, height, width]`` inputs (for
        ``cost_analysis`` / ``memory_analysis`` after ``.compile()``)."""
        return lower_render(self.model, self.variables, height, width, batch)


def _abstract_inputs(height: int, width: int, batch: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    f32 = jnp.float32
    return (
        jax.ShapeDtypeStruct((batch, height, width, 3), f32),
        jax.ShapeDtypeStruct((batch, height, width), f32),
        jax.ShapeDtypeStruct((batch,), f32),
        jax.ShapeDtypeStruct((batch,), f32),
    )


def lower_render(
    model: BokehDiff, variables: Any, height: int, width: int, batch: int = 1
) -> jax.stages.Lowered:
    """``model.apply`` (the untiled one-step render, as ``OneStep`` runs it) lowered for
    ``[batch, height, width]`` images; ``variables`` may be arrays or ``jax.ShapeDtypeStruct``s (no
    weights needed)."""
    return jax.jit(model.apply).lower(variables, *_abstract_inputs(height, width, batch))


def lower_latent_step(
    model: BokehDiff, variables: Any, height: int, width: int, batch: int = 1
) -> jax.stages.Lowered:
    """The U-Net pass of a tiled render (whole latents ``z -> z0``, PISA included) lowered for
    ``[batch, height, width]`` images (sides multiples of the VAE factor); abstract ``variables`` work."""
    f = model.vae_factor
    if height % f or width % f:
        raise InputError(f"lower_latent_step: {height}x{width} is not a multiple of {f}")
    f32 = jnp.float32
    c = model.vae.config.latent_channels

    step = lambda *a: latent_step(model, *a)  # noqa: E731
    args = (
        jax.ShapeDtypeStruct((batch, height // f, width // f, c), f32),
        jax.ShapeDtypeStruct((batch, 6), f32),
        *_abstract_inputs(height, width, batch)[1:],
    )
    return jax.jit(step).lower(variables, *args)
