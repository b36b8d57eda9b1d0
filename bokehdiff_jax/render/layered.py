"""The layered thin-lens ray tracer: ground truth for paired-data synthesis (SPEC section 4).

A scene is ``L`` RGBA layers on one ``H x W`` canvas, back to front, each on a tilted plane whose
disparity at image point ``(x, y)`` (pixel-centre convention, ``x`` in ``[0, W]``) is
``d0 + gx (x / W - 0.5) + gy (y / H - 0.5)`` (disparity linear in ``x, y`` <=> depth
``z = c / (1 - a x - b y)``).

For sensor pixel ``p`` and an aperture sample ``u`` in the unit disc, the ray meets layer ``l`` at the
image point ``x`` solving ``x = p + K u (disp_l(x) - d_f)``. With ``disp_l(x) - d_f = c0 + a x + b y``
this is linear, and ``D = c0 + a p_x + b p_y`` over ``1 - K (a u_x + b u_y)`` gives the closed form
``x = p + K u D``. There the layer's premultiplied linear RGBA is looked up bilinearly; layers are
composited front to back (nearest first) per ray; rays are averaged; the mean colour is divided by the
mean coverage (accumulated alpha), then converted back to sRGB. A fronto-parallel layer thus renders
as its image convolved with a uniform disc of radius ``K |d - d_f|``, the same CoC as the scatter renderer.

Memory is bounded by tracing ``row_chunk`` image rows at a time (``lax.map``) and ``ray_chunk`` rays at a
time (``lax.scan``): peak ~ ``L * ray_chunk * row_chunk * W * 4`` floats per lookup.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from bokehdiff_jax.physics.optics import bilinear_sample, linear_to_srgb, srgb_to_linear


@dataclasses.dataclass(frozen=True)
class LayeredConfig:
    """Settings of :func:`render_layers`. Static: ``num_rays`` (aperture samples per pixel),
    ``row_chunk`` and ``ray_chunk`` (memory bounds). Traced: ``gamma``."""

    num_rays: int = 64
    row_chunk: int = 32
    ray_chunk: int = 16
    gamma: float = 2.2

    def __post_init__(self):
        for name in ("num_rays", "row_chunk", "ray_chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")


jax.tree_util.register_dataclass(
    LayeredConfig, data_fields=["gamma"], meta_fields=["num_rays", "row_chunk", "ray_chunk"]
)


def aperture_samples(n: int) -> np.ndarray:
    """``n`` deterministic, evenly spread points in the unit disc (Vogel's golden-angle spiral,
    equal-area rings): ``[n, 2]`` as ``(u_x, u_y)``. One sample is the centre (a pinhole)."""
    if n == 1:
        return np.zeros((1, 2), np.float32)
    k = np.arange(n, dtype=np.float64)
    r = np.sqrt((k + 0.5) / n)
    theta = k * math.pi * (3.0 - math.sqrt(5.0))
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=-1).astype(np.float32)


def _prepare(rgba_lhwc, gamma):
    """sRGB + alpha -> premultiplied linear RGBA (bilinear lookups of premultiplied values do not
    bleed the colour of transparent pixels)."""
    alpha = jnp.clip(rgba_lhwc[..., 3:4], 0.0, 1.0)
    return jnp.concatenate([srgb_to_linear(rgba_lhwc[..., :3], gamma) * alpha, alpha], axis=-1)


def _plane_terms(planes_l3, focus, h, w):
    """``disp_l(x, y) - focus = c0 + a x + b y`` per layer."""
    d0, gx, gy = planes_l3[:, 0], planes_l3[:, 1], planes_l3[:, 2]
    a, b = gx / w, gy / h
    c0 = d0 - focus - 0.5 * gx - 0.5 * gy
    return c0, a, b


def _composite_front_to_back(prem_l4):
    """``prem_l4``: ``[L, ..., 4]`` premultiplied RGBA, index 0 = back. Front-to-back over-compositing:
    returns colour ``[..., 3]`` and coverage ``[...]``."""
    alpha = prem_l4[..., 3]
    # Transmittance in front of layer l: product of (1 - alpha) over the layers nearer than l.
    transmit = jnp.cumprod(jnp.flip(1.0 - alpha, 0), axis=0)
    in_front = jnp.flip(jnp.concatenate([jnp.ones_like(transmit[:1]), transmit[:-1]], 0), 0)
    colour = jnp.sum(in_front[..., None] * prem_l4[..., :3], axis=0)
    return colour, 1.0 - transmit[-1]


def _trace(rgba, planes, focus, strength, config):
    """One scene: ``rgba [L, H, W, 4]`` sRGB, ``planes [L, 3]`` -> sRGB ``[H, W, 3]``."""
    n_layers, h, w, _ = rgba.shape
    prem = _prepare(rgba.astype(jnp.float32), config.gamma)
    c0, a, b = _plane_terms(planes.astype(jnp.float32), focus, h, w)

    n_chunks = -(-config.num_rays // config.ray_chunk)
    n_pad = n_chunks * config.ray_chunk
    u = np.zeros((n_pad, 2), np.float32)
    u[: config.num_rays] = aperture_samples(config.num_rays)
    valid = (np.arange(n_pad) < config.num_rays).astype(np.float32)
    u_chunks = jnp.asarray(u.reshape(n_chunks, config.ray_chunk, 2))
    v_chunks = jnp.asarray(valid.reshape(n_chunks, config.ray_chunk))

    rows = config.row_chunk
    n_row_chunks = -(-h // rows)
    px = jnp.arange(w, dtype=jnp.float32) + 0.5

    def trace_rows(row0):
        py = row0.astype(jnp.float32) + jnp.arange(rows, dtype=jnp.float32) + 0.5  # [R]
        num = c0[:, None, None] + a[:, None, None] * px[None, None, :] + b[:, None, None] * py[None, :, None]

        def ray_step(acc, chunk):
            uc, vc = chunk  # [n, 2], [n]
            ux, uy = uc[:, 0], uc[:, 1]
            den = 1.0 - strength * (a[:, None] * ux[None] + b[:, None] * uy[None])  # [L, n]
            # A plane tilted so steeply that the ray runs parallel to it has no hit; clamp (physically
            # plausible scenes keep den near 1).
            den = jnp.maximum(den, 1e-3)
            dist = num[:, None] / den[:, :, None, None]  # [L, n, R, W]
            x = px + strength * ux[None, :, None, None] * dist
            y = py[:, None] + strength * uy[None, :, None, None] * dist
            looked = jax.vmap(bilinear_sample)(prem, x, y)  # [L, n, R, W, 4]
            colour, cover = _composite_front_to_back(looked)
            c_sum, a_sum = acc
            c_sum = c_sum + jnp.einsum("n,nrwc->rwc", vc, colour)
            return (c_sum, a_sum + jnp.einsum("n,nrw->rw", vc, cover)), None

        init = (jnp.zeros((rows, w, 3), jnp.float32), jnp.zeros((rows, w), jnp.float32))
        (c_sum, a_sum), _ = jax.lax.scan(ray_step, init, (u_chunks, v_chunks))
        return c_sum / jnp.maximum(a_sum, 1e-6)[..., None]

    starts = jnp.arange(n_row_chunks, dtype=jnp.int32) * rows
    out = jax.lax.map(trace_rows, starts).reshape(n_row_chunks * rows, w, 3)[:h]
    return jnp.clip(linear_to_srgb(out, config.gamma), 0.0, 1.0)


@jax.jit
def _render_layers_jit(rgba, planes, focus, strength, config):
    batch = rgba.shape[:-4]
    if not batch:
        return _trace(rgba, planes, focus, strength, config)
    n = math.prod(batch)
    flat = lambda x, tail: jnp.broadcast_to(x, batch + tail).reshape((n,) + tail)
    # lax.map, not vmap: scenes one after another keep the memory bound of one scene.
    out = jax.lax.map(
        lambda args: _trace(*args, config),
        (flat(rgba, rgba.shape[-4:]), flat(planes, planes.shape[-2:]), flat(focus, ()), flat(strength, ())),
    )
    return out.reshape(batch + out.shape[1:])


def _check(rgba, planes):
    if rgba.ndim < 4 or rgba.shape[-1] != 4:
        raise ValueError(f"layers must be [..., L, H, W, 4] RGBA, got {rgba.shape}")
    if planes.shape[-2:] != (rgba.shape[-4], 3):
        raise ValueError(f"planes must be [..., L, 3] with L = {rgba.shape[-4]}, got {planes.shape}")


def render_layers(
    rgba_lhwc: jnp.ndarray,
    planes_l3: jnp.ndarray,
    focus: float | jnp.ndarray,
    strength: float | jnp.ndarray,
    *,
    config: LayeredConfig = LayeredConfig(),
) -> jnp.ndarray:
    """Ray-traced lens blur of a layered scene. ``rgba_lhwc``: ``[..., L, H, W, 4]`` sRGB + alpha in
    [0, 1], index 0 = farthest layer; ``planes_l3``: ``[..., L, 3]`` rows ``(d0, gx, gy)`` (see module
    docstring); ``focus``: disparity in focus; ``strength``: ``K`` in pixels. Leading batch dims are
    rendered one scene at a time. Returns sRGB ``[..., H, W, 3]``; pixels no ray sees anything are 0.
    """
    rgba_lhwc = jnp.asarray(rgba_lhwc, jnp.float32)
    planes_l3 = jnp.asarray(planes_l3, jnp.float32)
    _check(rgba_lhwc, planes_l3)
    config = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), config)
    return _render_layers_jit(
        rgba_lhwc, planes_l3, jnp.asarray(focus, jnp.float32), jnp.asarray(strength, jnp.float32), config
    )


def layer_disparity(planes_l3: jnp.ndarray, h: int, w: int) -> jnp.ndarray:
    """Per-layer disparity maps ``[L, H, W]`` at pixel centres."""
    x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w - 0.5
    y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h - 0.5
    d0, gx, gy = (planes_l3[:, i, None, None] for i in range(3))
    return d0 + gx * x[None, None, :] + gy * y[None, :, None]


@functools.partial(jax.jit, static_argnames="gamma")
def _composite_jit(rgba, planes, gamma):
    h, w = rgba.shape[1:3]
    prem = _prepare(rgba, gamma)
    colour, cover = _composite_front_to_back(prem)
    aif = linear_to_srgb(colour / jnp.maximum(cover, 1e-6)[..., None], gamma)
    disp_l = layer_disparity(planes, h, w)
    disparity = disp_l[0]
    for layer in range(1, rgba.shape[0]):  # back to front: a nearer, mostly opaque layer wins
        disparity = jnp.where(rgba[layer, ..., 3] >= 0.5, disp_l[layer], disparity)
    return jnp.clip(aif, 0.0, 1.0), disparity


def composite_layers(
    rgba_lhwc: jnp.ndarray, planes_l3: jnp.ndarray, *, gamma: float = 2.2
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Pinhole (all-in-focus) view of a layered scene and its disparity map.

    ``rgba_lhwc``: ``[L, H, W, 4]`` sRGB + alpha, back to front; ``planes_l3``: ``[L, 3]``. The image is
    the front-to-back over-composite in linear light, normalised by coverage (equal to
    :func:`render_layers` at ``strength = 0``), as sRGB ``[H, W, 3]``. The disparity ``[H, W]`` is that
    of the nearest layer whose alpha is >= 0.5 at the pixel, else of the back layer (whatever its alpha):
    the surface that dominates the pixel's colour.
    """
    rgba_lhwc = jnp.asarray(rgba_lhwc, jnp.float32)
    planes_l3 = jnp.asarray(planes_l3, jnp.float32)
    _check(rgba_lhwc, planes_l3)
    if rgba_lhwc.ndim != 4:
        raise ValueError(f"composite_layers takes one scene [L, H, W, 4], got {rgba_lhwc.shape}")
    return _composite_jit(rgba_lhwc, planes_l3, float(gamma))
