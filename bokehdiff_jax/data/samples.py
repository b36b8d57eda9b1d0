"""The embedded sample data: scikit-image's packaged files (installed with the ``data`` extra; nothing is
downloaded), in the project's conventions. The demo, the benchmarks, the notebooks and the tests all
load them here, so every one of them sees the same scene.

- :func:`motorcycle`: the Middlebury motorcycle (left view, ``motorcycle_left.png``) and its ground-truth
  disparity (``motorcycle_disp.npz``, pixels, ``inf`` where unknown). Unknown values are filled by
  :func:`bokehdiff_jax.io.images.fill_invalid` (nearest valid values, averaged), then min-max normalised to
  [0, 1]; stereo disparity grows with nearness, so near = 1 already.
- :func:`horse_rgba`, :func:`logo_rgba`: foregrounds with an alpha matte (the files are opaque RGBA, so
  the mattes are derived from their white surroundings).
- :func:`photo_paths`: the photos used as backgrounds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.images import fill_invalid, read_image, read_rgba
from bokehdiff_jax.physics.optics import area_resize

# Photos of scikit-image used as synthesis backgrounds (all-in-focus, no alpha).
BACKGROUNDS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")


def sample_path(name: str) -> Path:
    """The path of one of scikit-image's packaged data files (``InputError`` if it is not installed)."""
    import skimage.data

    path = Path(skimage.data.data_dir) / name
    if not path.is_file():
        raise InputError(f"sample file {name} not found in {path.parent} (install the 'data' extra)")
    return path


class Motorcycle(NamedTuple):
    image: np.ndarray  # [H, W, 3] float32 sRGB in [0, 1]
    disparity: np.ndarray  # [H, W] float32 in [0, 1], 1 = near
    n_filled: int  # unknown disparity pixels filled (counted at full resolution)
    n_pixels: int  # pixels at full resolution


def fit_longer_side(shape: tuple[int, int], longer_side: int, min_side: int = 8) -> tuple[int, int]:
    """``(h, w)`` of ``shape`` downscaled (never upscaled) so its longer side is ``longer_side`` px;
    each side at least ``min_side``."""
    h, w = shape
    s = min(1.0, longer_side / max(h, w))
    return max(min_side, round(h * s)), max(min_side, round(w * s))


def motorcycle(size: tuple[int, int] | None = None) -> Motorcycle:
    """The motorcycle scene, area-resampled to ``size = (H, W)`` (``None``: as stored, 500 x 741).

    Any size works (the aspect ratio is not kept: pass :func:`fit_longer_side` of the stored shape to
    keep it). Returns float32 arrays in the project's conventions, clipped to [0, 1].
    """
    image = read_image(sample_path("motorcycle_left.png"))
    with np.load(sample_path("motorcycle_disp.npz")) as z:
        raw = np.asarray(z["arr_0"], np.float32)
    disp, n_filled = fill_invalid(raw)
    lo, hi = float(disp.min()), float(disp.max())
    disp = (disp - lo) / max(hi - lo, 1e-6)
    if size is not None and tuple(size) != disp.shape:
        if min(size) < 1:
            raise InputError(f"sample size must be positive, got {size}")
        image = np.moveaxis(np.asarray(area_resize(np.moveaxis(image, -1, 0), tuple(size))), 0, -1)
        disp = np.asarray(area_resize(disp, tuple(size)))
    return Motorcycle(
        np.clip(image, 0.0, 1.0).astype(np.float32),
        np.clip(disp, 0.0, 1.0).astype(np.float32),
        n_filled,
        math.prod(raw.shape),
    )


def motorcycle_shape() -> tuple[int, int]:
    """``(H, W)`` of the stored motorcycle scene."""
    with np.load(sample_path("motorcycle_disp.npz")) as z:
        return tuple(z["arr_0"].shape)


def horse_rgba() -> np.ndarray:
    """scikit-image's horse as a brown silhouette with a hard matte: float32 ``[H, W, 4]``, straight alpha.
    The stored image is a black silhouette on white; alpha = 1 on the silhouette."""
    rgba = read_rgba(sample_path("horse.png"))
    alpha = (rgba[..., :3].max(-1) < 0.5).astype(np.float32)
    rgb = np.broadcast_to(np.array([0.36, 0.22, 0.12], np.float32), alpha.shape + (3,))
    return np.concatenate([rgb, alpha[..., None]], -1)


def logo_rgba() -> np.ndarray:
    """scikit-image's logo with a soft matte from each pixel's distance to white: float32 ``[H, W, 4]``."""
    rgb = read_rgba(sample_path("logo.png"))[..., :3]
    alpha = np.clip((1.0 - rgb.min(-1)) * 4.0, 0.0, 1.0)
    return np.concatenate([rgb, alpha[..., None]], -1)


def photo_paths(names: tuple[str, ...] = BACKGROUNDS) -> list[Path]:
    """Paths of the packaged photos (synthesis backgrounds), in the order of ``names``."""
    return [sample_path(n) for n in names]
