"""Rendering methods under evaluation, each a :data:`Renderer`:
``(image_hwc sRGB [0, 1], disparity_hw [0, 1], focus, strength) -> image_hwc sRGB [0, 1]`` (NumPy, float32).

- ``identity``: the input unchanged (the floor every method must beat);
- ``classical``: the scatter renderer (``render.render_scatter``), the same optics as ``render``;
- ``model:PATH``: the one-step diffusion model of a checkpoint, through ``bokehdiff_jax.pipeline``;
  ``model:PATH@N``: a training workdir's checkpoint of step N, ``@0`` its untrained starting point (to
  compare trained against untrained).

:func:`make_renderer` is the one integration point: every evaluation, robustness run and report gets its
renderers here. A method may carry a label, ``LABEL=SPEC`` (``trained=model:runs/tiny``), used as its
name in tables, plots and folder names.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bokehdiff_jax.errors import InputError

Renderer = Callable[[np.ndarray, np.ndarray, float, float], np.ndarray]
METHOD_KINDS = ("identity", "classical", "model:PATH[@STEP]")
_STEP = re.compile(r"(.+)@(\d{1,9})")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclasses.dataclass(frozen=True)
class Method:
    """A parsed ``--method``: ``label`` (names it in outputs), ``kind`` and ``arg`` (``model``'s path)."""

    label: str
    kind: str
    arg: str = ""

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind


def parse_method(text: str) -> Method:
    """``[LABEL=]identity | classical | model:PATH[@STEP]`` -> :class:`Method` (default label: the kind,
    or ``model_<checkpoint folder name>``)."""
    label, sep, spec = text.partition("=")
    if not sep:
        label, spec = "", text
    kind, _, arg = spec.partition(":")
    if kind in ("identity", "classical") and not arg:
        default = kind
    elif kind == "model" and arg:
        default = "model_" + re.sub(r"[^A-Za-z0-9_.-]", "_", Path(arg).name or "checkpoint")[:56]
    else:
        raise InputError(f"--method {text!r}: expected [LABEL=]{' | '.join(METHOD_KINDS)}")
    label = label or default
    if not _LABEL.fullmatch(label):
        raise InputError(f"--method {text!r}: a label is 1-64 letters, digits, '_', '.', '-'")
    return Method(label, kind, arg)


def _radius_bucket(needed: int, cap: int) -> int:
    """A static radius to compile for: the next power of two >= ``needed`` (few distinct compilations
    over a data set), at most ``cap``."""
    return max(1, min(cap, 1 << max(0, math.ceil(math.log2(max(needed, 1))))))


def classical_renderer(max_radius: int = 64, num_layers: int = 24) -> Renderer:
    """The scatter renderer with ``render``'s defaults; CoC radii above ``max_radius`` px are clipped
    (it bounds memory and time). One compilation per image shape and radius bucket."""
    from bokehdiff_jax.physics.focus import needed_radius
    from bokehdiff_jax.render.scatter import ScatterConfig, render_scatter

    def render(image: np.ndarray, disparity: np.ndarray, focus: float, strength: float) -> np.ndarray:
        r = _radius_bucket(needed_radius(disparity, focus, strength), max_radius)
        config = ScatterConfig(max_radius=r, num_layers=num_layers)
        return np.asarray(render_scatter(image, disparity, focus, strength, config=config), np.float32)

    return render


def identity_renderer() -> Renderer:
    return lambda image, disparity, focus, strength: np.asarray(image, np.float32)


def model_path_step(arg: str) -> tuple[str, int | None]:
    """``PATH@N`` -> ``(PATH, N)``; anything else -> ``(arg, None)`` (a path may hold an ``@``)."""
    m = _STEP.fullmatch(arg)
    return (m.group(1), int(m.group(2))) if m else (arg, None)


def model_renderer(path: str) -> Renderer:
    """The one-step model of the checkpoint at ``path`` (``PATH@N``: a workdir's step N, ``@0`` the run's
    initial weights), from ``bokehdiff_jax.pipeline``.

    Contract (the inference issue): ``OneStep.from_checkpoint(path)`` returns a jitted callable
    ``(image [B, H, W, 3] in [-1, 1], disparity [B, H, W], focus [B], strength [B]) -> image [B, H, W, 3]
    in [-1, 1]``, deterministic, compiled once per shape. This adapter maps [0, 1] <-> [-1, 1] and runs
    one image at a time.
    """
    import jax.numpy as jnp

    from bokehdiff_jax.pipeline import OneStep

    path, step = model_path_step(path)
    if step == 0:
        model = OneStep.from_checkpoint(path, initial=True)
    else:
        model = OneStep.from_checkpoint(path, step=step)

    def render(image: np.ndarray, disparity: np.ndarray, focus: float, strength: float) -> np.ndarray:
        x = jnp.asarray(image, jnp.float32)[None] * 2.0 - 1.0
        out = model(
            x,
            jnp.asarray(disparity, jnp.float32)[None],
            jnp.asarray([focus], jnp.float32),
            jnp.asarray([strength], jnp.float32),
        )
        return np.clip((np.asarray(out[0], np.float32) + 1.0) / 2.0, 0.0, 1.0)

    return render


def make_renderer(method: Method | str, *, max_radius: int = 64) -> Renderer:
    """The renderer of a method (a :class:`Method` or its ``--method`` text). ``max_radius``: the
    classical renderer's cap on CoC radii, px."""
    m = parse_method(method) if isinstance(method, str) else method
    if m.kind == "identity":
        return identity_renderer()
    if m.kind == "classical":
        return classical_renderer(max_radius)
    return model_renderer(m.arg)
