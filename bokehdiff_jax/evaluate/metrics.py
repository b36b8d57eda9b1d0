"""Full-reference image metrics of the paper's tables: PSNR, SSIM, LPIPS (VGG, v0.1) and DISTS.

Images are sRGB float ``[H, W, 3]`` in [0, 1] (8-bit files are read as ``value / 255``). PSNR and SSIM
are NumPy (float64) and equal scikit-image's ``peak_signal_noise_ratio(data_range=1)`` and
``structural_similarity(channel_axis=-1, data_range=1, ...)`` (tests compare them on the same images);
LPIPS and DISTS run the VGG16 networks in JAX (``losses.lpips``, ``evaluate.dists``).

Which SSIM. Papers rarely say; the default here is Wang et al. 2004's (11 x 11 Gaussian window,
sigma 1.5, population covariance; scikit-image with ``gaussian_weights=True, sigma=1.5,
use_sample_covariance=False``), mean over the three channels. ``SSIMConfig(gaussian=False)`` gives
scikit-image's default instead (7 x 7 uniform window, sample covariance). Both crop the window's radius
at the borders before averaging, as scikit-image does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from bokehdiff_jax.errors import InputError

METRICS = ("psnr", "ssim", "lpips", "dists")
# True where a larger value is better (used to rank the worst cases of a report).
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "dists": False}
PSNR_CAP = 100.0  # dB reported for identical images (MSE 0), so means stay finite


def _check_pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if a.shape != b.shape or a.ndim != 3 or a.shape[-1] != 3:
        raise InputError(f"metrics need two [H, W, 3] images of one size, got {a.shape} and {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise InputError("metrics: an image holds NaN or inf values")
    return a, b


def psnr(pred: np.ndarray, target: np.ndarray) -> float:
    """``10 log10(1 / MSE)`` in dB over all pixels and channels (data range 1); ``PSNR_CAP`` when equal."""
    a, b = _check_pair(pred, target)
    mse = float(np.mean(np.square(a - b)))
    return PSNR_CAP if mse <= 10.0 ** (-PSNR_CAP / 10.0) else 10.0 * math.log10(1.0 / mse)


@dataclasses.dataclass(frozen=True)
class SSIMConfig:
    """SSIM's window: ``gaussian`` (Wang et al.: sigma ``sigma``, taps out to ``truncate`` sigma,
    population covariance) or uniform ``win_size`` x ``win_size`` with sample covariance (scikit-image's
    default). ``k1``, ``k2``: the stabilising constants (times the data range, 1)."""

    gaussian: bool = True
    sigma: float = 1.5
    truncate: float = 3.5
    win_size: int = 7
    k1: float = 0.01
    k2: float = 0.03

    def taps(self) -> np.ndarray:
        """The 1-D window (separable), normalised to sum 1."""
        if self.gaussian:
            r = int(self.truncate * self.sigma + 0.5)
            x = np.arange(-r, r + 1, dtype=np.float64)
            w = np.exp(-0.5 * (x / self.sigma) ** 2)
        else:
            w = np.ones(self.win_size, np.float64)
        return w / w.sum()


def _filter(x_hw: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable correlation with half-sample symmetric borders (SciPy's ``mode="reflect"``)."""
    r = len(taps) // 2
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        xp = np.pad(x_hw, pad, mode="symmetric")
        n = x_hw.shape[axis]
        out = np.zeros_like(x_hw)
        for i, t in enumerate(taps):
            sl = [slice(None), slice(None)]
            sl[axis] = slice(i, i + n)
            out += t * xp[tuple(sl)]
        x_hw = out
    return x_hw


def ssim(pred: np.ndarray, target: np.ndarray, config: SSIMConfig = SSIMConfig()) -> float:
    """Mean SSIM over the three channels (data range 1); see the module doc for the window."""
    a, b = _check_pair(pred, target)
    taps = config.taps()
    n = len(taps)
    if min(a.shape[:2]) < n:
        raise InputError(f"SSIM needs images of at least {n} x {n} pixels, got {a.shape[1]}x{a.shape[0]}")
    cov_norm = 1.0 if config.gaussian else n * n / (n * n - 1.0)
    c1, c2 = config.k1**2, config.k2**2
    r = (n - 1) // 2
    values = []
    for ch in range(3):
        x, y = a[..., ch], b[..., ch]
        ux, uy = _filter(x, taps), _filter(y, taps)
        vx = cov_norm * (_filter(x * x, taps) - ux * ux)
        vy = cov_norm * (_filter(y * y, taps) - uy * uy)
        vxy = cov_norm * (_filter(x * y, taps) - ux * uy)
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        values.append(s[r : s.shape[0] - r, r : s.shape[1] - r].mean())
    return float(np.mean(values))


class Scorer:
    """Computes a chosen set of metrics for (prediction, target) pairs.

    The networks' weights are loaded once, when a metric first needs them (``InputError`` with the
    fetch command when a cache is missing); the jitted LPIPS/DISTS compile once per image shape.
    """

    def __init__(
        self,
        metrics: Sequence[str] = METRICS,
        *,
        ssim_config: SSIMConfig = SSIMConfig(),
        lpips_path: str | None = None,
        dists_path: str | None = None,
    ) -> None:
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics or len(set(metrics)) != len(metrics):
            raise InputError(f"metrics must be distinct names from {', '.join(METRICS)}; got {list(metrics)}")
        self.metrics = tuple(metrics)
        self.ssim_config = ssim_config
        self._lpips_path, self._dists_path = lpips_path, dists_path
        self._nets: dict[str, Any] = {}

    def _net(self, name: str):
        if name not in self._nets:
            import jax

            if name == "lpips":
                from bokehdiff_jax.losses import lpips_distance, lpips_params

                params = jax.tree.map(jax.numpy.asarray, lpips_params(self._lpips_path))
                # LPIPS's images are in [-1, 1].
                fn = jax.jit(lambda p, x, y: lpips_distance(p, 2.0 * x - 1.0, 2.0 * y - 1.0))
            else:
                from bokehdiff_jax.evaluate.dists import dists_distance, dists_params

                params = jax.tree.map(jax.numpy.asarray, dists_params(self._lpips_path, self._dists_path))
                fn = jax.jit(dists_distance)
            self._nets[name] = (fn, params)
        return self._nets[name]

    def load(self) -> None:
        """Loads (and verifies) every network weight the chosen metrics need, now: call before long work
        so a missing cache fails fast."""
        for m in self.metrics:
            if m in ("lpips", "dists"):
                self._net(m)

    def __call__(self, pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
        """``{metric: value}`` for one pair of ``[H, W, 3]`` images in [0, 1]."""
        a, b = _check_pair(pred, target)
        out: dict[str, float] = {}
        for m in self.metrics:
            if m == "psnr":
                out[m] = psnr(a, b)
            elif m == "ssim":
                out[m] = ssim(a, b, self.ssim_config)
            else:
                if min(a.shape[:2]) < 16:
                    raise InputError(
                        f"{m} needs images of at least 16 x 16 pixels, got {a.shape[1]}x{a.shape[0]}"
                    )
                fn, params = self._net(m)
                x = np.asarray(a, np.float32)[None]
                y = np.asarray(b, np.float32)[None]
                out[m] = float(np.asarray(fn(params, x, y))[0])
        return out
