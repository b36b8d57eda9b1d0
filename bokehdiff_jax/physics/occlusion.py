"""Self-occlusion of a light source seen from a sensor pixel (paper Eq. 7-9, SPEC section 2). Pure jnp.

A light source at image position ``P_s`` with disparity ``d_s`` reaches the sensor pixel ``P_q`` along a ray
whose point at disparity ``t`` (``d_s < t < 1``) projects to

    P(t) = ((1 - t) d_s / ((1 - d_s) t)) (P_s - P_q) + P_q            (Eq. 7)

so ``P(d_s) = P_s`` and ``P(1) = P_q``. The ray is blocked when the scene there is nearer than the ray,
``disp(P(t)) > t``, for some sampled ``t``; visibility is the mean over super-samples of the source
position of the product over the ``T`` segment samples of ``[disp(P(t)) <= t]`` (Eq. 8-9).

All positions are in input-image pixels, ``(x, y)`` = (column, row), pixel ``(i, j)`` centred at
``(j + 0.5, i + 0.5)``. The scene disparity ``disp`` is read bilinearly (edge-clamped) from a map
``fine[Hf, Wf]`` covering the same image, i.e. at fine coordinates ``(x Wf / W, y Hf / H)``.
"""

from __future__ import annotations

import jax.numpy as jnp

from bokehdiff_jax.physics.optics import bilinear_sample

# Disparity 1 (a point on the lens) makes Eq. 7 divide by zero; the released code crashes there.
DISPARITY_EPS = 1e-4


def segment_fractions(segments: int) -> jnp.ndarray:
    """``c`` of SPEC section 2: ``linspace(0.1, 0.9, T)``; ``t = c d + (1 - c)`` lies between ``d`` and 1.

    The sample sets nest when ``(T - 1)`` divides ``(T' - 1)`` (2 ⊂ 3 ⊂ 5 ⊂ 9 ...), so more segments
    only add tests: a blocked pair stays blocked.
    """
    return jnp.linspace(0.1, 0.9, segments, dtype=jnp.float32)


def ray_point(
    p_q: jnp.ndarray, p_s: jnp.ndarray, d_s: jnp.ndarray, t: jnp.ndarray, eps: float = DISPARITY_EPS
) -> jnp.ndarray:
    """Eq. 7: image position ``[..., 2]`` of the ray point at disparity ``t``. ``p_q``, ``p_s``: ``[..., 2]``
    pixels; ``d_s``, ``t``: ``[...]``, broadcasting. ``d_s`` is clamped to ``<= 1 - eps``."""
    d_s = jnp.minimum(d_s, 1.0 - eps)
    factor = (1.0 - t) * d_s / ((1.0 - d_s) * t)
    return p_q + factor[..., None] * (p_s - p_q)


def visibility(
    fine: jnp.ndarray,
    image_size: tuple[int, int],
    p_q: jnp.ndarray,
    p_k: jnp.ndarray,
    d_k: jnp.ndarray,
    offsets_k: jnp.ndarray,
    segments: int,
    d_q: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Visibility ``Vis[nq, nk]`` in [0, 1] of each key (light source) from each query (sensor pixel).

    Args:
      fine: ``[Hf, Wf]`` scene disparity over the whole image (PISA uses the map area-resampled to 3x the
        token grid).
      image_size: ``(H, W)`` of the input image in pixels; positions below are in its pixels.
      p_q: ``[nq, 2]`` query positions ``(x, y)``.
      p_k: ``[nk, 2]`` key positions ``(x, y)``.
      d_k: ``[nk]`` key disparities (the source's ``d_s``).
      offsets_k: ``[nk, S, 2]`` super-sample offsets of the source position, in pixels.
      segments: ``T``, the number of ray samples.
      d_q: ``[nq]`` query disparities: if given, ``t`` is sampled between the *query's* disparity and 1
        (the released code's convention) instead of the key's.

    Returns ``[nq, nk]`` float32: the fraction of super-samples whose ray is unblocked at every ``t``.
    """
    big_h, big_w = image_size
    f_h, f_w = fine.shape
    c = segment_fractions(segments)  # [T]
    d_ref = d_k[None, :] if d_q is None else d_q[:, None]  # [1 or nq, nk or 1]
    t = c * d_ref[..., None] + (1.0 - c)  # [., ., T]
    p_s = p_k[:, None, :] + offsets_k  # [nk, S, 2]
    # Broadcast to [nq, nk, S, T, 2].
    pq = p_q[:, None, None, None, :]
    ps = p_s[None, :, :, None, :]
    tt = t[:, :, None, :]  # [., ., 1, T]
    pts = ray_point(pq, ps, d_k[None, :, None, None], tt)
    scene = bilinear_sample(fine, pts[..., 0] * (f_w / big_w), pts[..., 1] * (f_h / big_h))
    unblocked = jnp.all(scene <= tt, axis=-1)  # [nq, nk, S]
    return jnp.mean(unblocked.astype(jnp.float32), axis=-1)
