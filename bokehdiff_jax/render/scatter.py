"""The classical scatter renderer: lens blur from one image and its disparity map (issue 4, section 1).

Algorithm (layered scatter, in linear light):

1. The image goes to linear light (``srgb ** gamma``); an optional highlight boost multiplies bright
   pixels (sRGB max channel above a threshold) by up to ``1 + boost``, as clipped highlights carry
   more energy than their stored value in real photos.
2. Disparity is sliced into ``num_layers`` depth layers spaced evenly over the scene's range
   ``[min d, max d]``; the grid is shifted so that one layer sits exactly on the focus disparity
   (an in-focus plane is never blurred). Each pixel belongs to its nearest layer, wholly: splitting a
   pixel between two layers makes both semi-transparent, so surfaces would not cover what lies behind
   them and the final normalisation would inflate the energy of what lies in front. Within a layer the
   CoC radius thus varies by at most ``K * span / (num_layers - 2)`` pixels around the layer's radius
   (about 1.5 px for K = 32 over the full [0, 1] range with 24 layers).
3. Each layer has one CoC radius ``r = min(K |mean d of its pixels - d_f|, max_radius)`` (the grid
   level for an empty layer): exact for a flat surface or a point light, continuous in the focus and
   the disparity (so both have gradients), and zero for a plane in focus. Its pixels *spread* their
   energy over that aperture shape (disc, or N-blade polygon), a kernel with a one-pixel soft edge
   normalised to sum 1, so energy is conserved. The spreading is an FFT convolution of the layer's
   premultiplied colour and its membership (alpha), on an edge-padded canvas so borders do not darken.
4. Layers are composited back to front with their blurred alpha (partial occlusion: a blurred
   foreground spreads over, and lets through, what lies behind it). Before a layer goes on, the holes
   it leaves in the composite behind it (the unknown background behind its pixels) are filled with
   that composite blurred at the layer's own radius (``fill_holes``), so a blurred foreground shows
   the background continued behind it instead of amplifying itself.
5. The result is normalised by the accumulated alpha, then back to sRGB.

``focus``, ``strength`` and every non-static field of :class:`ScatterConfig` (aperture blades and
rotation, highlight boost and threshold, gamma) are traced: changing them does not recompile.
``max_radius`` and ``num_layers`` are static and bound memory and time. The whole renderer is
differentiable in the image, strength, focus and disparity (the last two through the layer radii; the
assignment of pixels to layers is piecewise constant).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.physics.optics import coc_radius, linear_to_srgb, srgb_to_linear


@dataclasses.dataclass(frozen=True)
class ScatterConfig:
    """Settings of :func:`render_scatter`.

    Static (part of the compiled program): ``max_radius`` (pixels; CoC radii are clipped to it and it
    sets the padding, hence memory), ``num_layers`` (depth slices, >= 3), ``fill_holes``.
    Traced (change freely without recompiling): ``blades`` (aperture blades; < 3 means a circle),
    ``rotation`` (degrees, of the polygon), ``highlight_boost`` (extra gain of the brightest pixels;
    0 = off), ``highlight_threshold`` (sRGB level where the boost starts), ``gamma`` (sRGB <-> linear).
    """

    max_radius: int = 32
    num_layers: int = 24
    fill_holes: bool = True
    blades: float = 0.0
    rotation: float = 0.0
    highlight_boost: float = 0.0
    highlight_threshold: float = 0.9
    gamma: float = 2.2

    def __post_init__(self):
        # Only the static fields are checked: the traced ones may be tracers when JAX rebuilds the node.
        if not isinstance(self.max_radius, int) or self.max_radius < 1:
            raise InputError(f"max_radius must be an int >= 1, got {self.max_radius!r}")
        if not isinstance(self.num_layers, int) or self.num_layers < 3:
            raise InputError(f"num_layers must be an int >= 3, got {self.num_layers!r}")


_TRACED = ("blades", "rotation", "highlight_boost", "highlight_threshold", "gamma")
jax.tree_util.register_dataclass(
    ScatterConfig, data_fields=list(_TRACED), meta_fields=["max_radius", "num_layers", "fill_holes"]
)


def _as_traced(config: ScatterConfig) -> ScatterConfig:
    """float32 leaves, so ints vs floats or Python vs NumPy scalars never trigger a recompile."""
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), config)


def fft_size(n: int) -> int:
    """The smallest size >= n whose prime factors are 2, 3, 5 or 7 (fast FFT lengths)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5, 7):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def aperture_shape(
    dy: jnp.ndarray, dx: jnp.ndarray, blades: jnp.ndarray, rotation_deg: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The aperture as ``(apothem, projection)``: offset ``(dx, dy)`` (pixels) lies at signed distance
    ``radius * apothem - projection`` inside a disc (``blades < 3``: apothem 1, projection = |offset|)
    or a regular ``blades``-gon of circumradius ``radius`` with a vertex at ``rotation_deg`` (from +x
    towards +y, i.e. clockwise on screen). Neither depends on the radius, so they are computed once.
    """
    rho = jnp.sqrt(dx * dx + dy * dy)
    n = jnp.maximum(blades, 3.0)
    sector = 2.0 * jnp.pi / n
    phi = jnp.mod(jnp.arctan2(dy, dx) - jnp.deg2rad(rotation_deg), sector)
    # Project the offset onto the normal of its sector's edge; the edge lies at the apothem.
    is_poly = blades >= 3.0
    projection = jnp.where(is_poly, rho * jnp.cos(phi - jnp.pi / n), rho)
    apothem = jnp.where(is_poly, jnp.cos(jnp.pi / n), 1.0)
    return apothem, projection


def aperture_coverage(
    dy: jnp.ndarray, dx: jnp.ndarray, radius: jnp.ndarray, blades: jnp.ndarray, rotation_deg: jnp.ndarray
) -> jnp.ndarray:
    """Unnormalised soft aperture kernel: pixel coverage of offset ``(dx, dy)`` by the aperture of
    circumradius ``radius`` (see :func:`aperture_shape`). The edge is one pixel soft: coverage =
    clip(signed distance to the edge + 0.5, 0, 1), so a zero radius gives a single pixel."""
    apothem, projection = aperture_shape(dy, dx, blades, rotation_deg)
    return jnp.clip(radius * apothem - projection + 0.5, 0.0, 1.0)


def _kernel_grid(hp: int, wp: int, support: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Circular offsets of an ``hp x wp`` FFT canvas (index 0 = offset 0) and the ``|offset| <= support``
    mask that keeps kernels inside the padding (so the circular convolution never wraps)."""
    iy = jnp.arange(hp)
    ix = jnp.arange(wp)
    dy = jnp.where(iy < hp // 2 + 1, iy, iy - hp).astype(jnp.float32)[:, None]
    dx = jnp.where(ix < wp // 2 + 1, ix, ix - wp).astype(jnp.float32)[None, :]
    mask = (jnp.abs(dy) <= support) & (jnp.abs(dx) <= support)
    return dy, dx, mask


def layer_levels(
    disparity_hw: jnp.ndarray, focus: jnp.ndarray, num_layers: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Disparities of the depth layers (ascending = far to near) and each pixel's fractional layer index.

    The ``num_layers`` levels are spaced ``span / (num_layers - 2)`` apart and cover ``[min d, max d]``,
    with one level exactly on the focus disparity (clipped into the range). Returns ``(levels_l,
    position_hw)``: a pixel belongs to layer ``round(position)``.
    """
    dmin = jnp.min(disparity_hw)
    dmax = jnp.max(disparity_hw)
    delta = jnp.maximum(dmax - dmin, 1e-6) / (num_layers - 2)
    anchor = jnp.clip(focus, dmin, dmax)
    k = jnp.clip(jnp.ceil((anchor - dmin) / delta - 1e-4), 0, num_layers - 2)
    d0 = anchor - k * delta
    levels = d0 + jnp.arange(num_layers, dtype=jnp.float32) * delta
    position = jnp.clip((disparity_hw - d0) / delta, 0.0, num_layers - 1.0)
    return levels, position


def layer_mean_disparity(
    disparity_hw: jnp.ndarray, position_hw: jnp.ndarray, levels_l: jnp.ndarray
) -> jnp.ndarray:
    """Mean disparity of the pixels of each layer (``[L]``), or the layer's level where it is empty."""
    index = jnp.round(position_hw).astype(jnp.int32).reshape(-1)
    n = levels_l.shape[0]
    total = jax.ops.segment_sum(disparity_hw.reshape(-1).astype(jnp.float32), index, num_segments=n)
    count = jax.ops.segment_sum(jnp.ones_like(index, jnp.float32), index, num_segments=n)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), levels_l)


def _highlight_gain(image_hwc: jnp.ndarray, boost: jnp.ndarray, threshold: jnp.ndarray) -> jnp.ndarray:
    level = jnp.max(image_hwc, axis=-1, keepdims=True)
    ramp = jnp.clip((level - threshold) / jnp.maximum(1.0 - threshold, 1e-3), 0.0, 1.0)
    return 1.0 + boost * ramp


def scatter_linear(
    linear_hwc: jnp.ndarray,
    disparity_hw: jnp.ndarray,
    focus: jnp.ndarray,
    strength: jnp.ndarray,
    config: ScatterConfig,
) -> jnp.ndarray:
    """The scatter core on one image already in linear light: ``[H, W, 3] -> [H, W, 3]`` linear.

    Not jitted by itself (callers jit); ``config``'s traced fields may be arrays. See module docstring.
    """
    h, w = disparity_hw.shape
    nl = config.num_layers
    support = config.max_radius + 1  # soft edge reaches radius + 0.5
    pad = support
    hp, wp = fft_size(h + 2 * pad), fft_size(w + 2 * pad)
    pads = ((pad, hp - h - pad), (pad, wp - w - pad))

    levels, position = layer_levels(disparity_hw.astype(jnp.float32), focus, nl)
    layer_d = layer_mean_disparity(disparity_hw, position, levels)
    radii = jnp.clip(coc_radius(layer_d, focus, strength, spatial_dims=1), 0.0, float(config.max_radius))

    lin = jnp.moveaxis(linear_hwc.astype(jnp.float32), -1, 0)  # [3, H, W]; FFT axes last
    lin_p = jnp.pad(lin, ((0, 0),) + pads, mode="edge")
    layer_p = jnp.pad(jnp.round(position), pads, mode="edge")
    dy, dx, mask = _kernel_grid(hp, wp, support)
    apothem, projection = aperture_shape(dy, dx, config.blades, config.rotation)

    def layer_step(carry, inputs):
        c_acc, a_acc = carry  # premultiplied colour [3, hp, wp], coverage [hp, wp]
        index, radius = inputs
        kernel = jnp.clip(radius * apothem - projection + 0.5, 0.0, 1.0) * mask
        kernel_f = jnp.fft.rfft2(kernel / jnp.sum(kernel))
        weight = (layer_p == index).astype(jnp.float32)  # membership = this layer's alpha
        chans = [lin_p[0] * weight, lin_p[1] * weight, lin_p[2] * weight, weight]
        if config.fill_holes:
            chans += [c_acc[0], c_acc[1], c_acc[2], a_acc]
        # One 2-D FFT per channel: on XLA:CPU this runs about twice as fast as one batched FFT.
        blurred = jnp.stack([jnp.fft.irfft2(jnp.fft.rfft2(ch) * kernel_f, s=(hp, wp)) for ch in chans])
        c_layer, a_layer = blurred[:3], blurred[3]
        if config.fill_holes:
            # Pixels of this layer and nearer ones hide what is behind them. Where the composite behind
            # is empty there, assume the background continues: fill with the composite blurred at this
            # layer's radius, in proportion to how much of it was found nearby.
            nearer = (layer_p >= index).astype(jnp.float32)
            gap = nearer * (1.0 - a_acc)
            c_acc = c_acc + gap * blurred[4:7]
            a_acc = a_acc + gap * blurred[7]
        a_layer = jnp.clip(a_layer, 0.0, 1.0)  # FFT round-off
        c_acc = c_acc * (1.0 - a_layer) + c_layer
        a_acc = a_acc * (1.0 - a_layer) + a_layer
        return (c_acc, a_acc), None

    init = (jnp.zeros((3, hp, wp), jnp.float32), jnp.zeros((hp, wp), jnp.float32))
    (c_acc, a_acc), _ = jax.lax.scan(layer_step, init, (jnp.arange(nl, dtype=jnp.float32), radii))
    out = c_acc / jnp.maximum(a_acc, 1e-6)
    out = jnp.maximum(out[:, pad : pad + h, pad : pad + w], 0.0)
    return jnp.moveaxis(out, 0, -1)


def _to_linear(image_hwc: jnp.ndarray, config: ScatterConfig) -> jnp.ndarray:
    lin = srgb_to_linear(image_hwc.astype(jnp.float32), config.gamma)
    return lin * _highlight_gain(image_hwc, config.highlight_boost, config.highlight_threshold)


def _render_one(image_hwc, disparity_hw, focus, strength, config):
    lin = scatter_linear(_to_linear(image_hwc, config), disparity_hw, focus, strength, config)
    return jnp.clip(linear_to_srgb(lin, config.gamma), 0.0, 1.0)


@jax.jit
def _render_scatter_jit(image, disparity, focus, strength, config):
    batch = image.shape[:-3]
    if not batch:
        return _render_one(image, disparity, focus, strength, config)
    n = math.prod(batch)
    flat = lambda x, tail: jnp.broadcast_to(x, batch + tail).reshape((n,) + tail)
    out = jax.vmap(_render_one, in_axes=(0, 0, 0, 0, None))(
        flat(image, image.shape[-3:]),
        flat(disparity, disparity.shape[-2:]),
        flat(focus, ()),
        flat(strength, ()),
        config,
    )
    return out.reshape(batch + out.shape[1:])


def _check_shapes(image, disparity) -> None:
    if image.ndim < 3 or image.shape[-1] != 3:
        raise InputError(f"image must be [..., H, W, 3], got {image.shape}")
    if disparity.shape[-2:] != image.shape[-3:-1]:
        raise InputError(f"disparity {disparity.shape} does not match image {image.shape} (H, W)")


def render_scatter(
    image_hwc: jnp.ndarray,
    disparity_hw: jnp.ndarray,
    focus: float | jnp.ndarray,
    strength: float | jnp.ndarray,
    *,
    config: ScatterConfig = ScatterConfig(),
) -> jnp.ndarray:
    """Classical lens blur. ``image_hwc``: sRGB ``[..., H, W, 3]`` in [0, 1]; ``disparity_hw``:
    ``[..., H, W]`` in [0, 1] (1 = near), finite (``io.images.read_disparity`` fills NaN/inf); ``focus``:
    disparity in focus; ``strength``: ``K`` in pixels
    (CoC radius ``K |d - d_f|``, clipped to ``config.max_radius``). Leading batch dims are vmapped
    (memory grows with the batch); ``focus``/``strength`` may be scalars or per batch element.
    Returns sRGB ``[..., H, W, 3]`` in [0, 1]. Jitted; traced settings never recompile.
    """
    image_hwc = jnp.asarray(image_hwc, jnp.float32)
    disparity_hw = jnp.asarray(disparity_hw, jnp.float32)
    _check_shapes(image_hwc, disparity_hw)
    return _render_scatter_jit(
        image_hwc,
        disparity_hw,
        jnp.asarray(focus, jnp.float32),
        jnp.asarray(strength, jnp.float32),
        _as_traced(config),
    )
