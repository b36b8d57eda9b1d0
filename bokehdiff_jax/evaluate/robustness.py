"""Robustness to disparity errors (the paper's Fig. 7, after BokehMe): every method renders with a
disparity map eroded or dilated by ``k`` pixels at its depth edges, and is scored against the reference
rendered with the true map.

``k > 0`` dilates the near side (grey dilation: each pixel takes the largest disparity within ``k`` px,
so near objects grow into the background, as a depth estimate that bleeds over a silhouette), ``k < 0``
erodes it (the smallest: near objects shrink), ``k = 0`` is the true map. Only pixels within ``|k|`` px of
a depth edge change (an edge: 4-neighbours whose disparities differ by more than ``edge_threshold``), so
smooth slopes keep their values. The neighbourhood is a disc of radius ``|k|``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bokehdiff_jax.errors import InputError

DEFAULT_KS = (-8, -6, -4, -2, 0, 2, 4, 6, 8)
EDGE_THRESHOLD = 0.05  # disparity step between 4-neighbours that counts as a depth edge


def _disc(radius: int) -> list[tuple[int, int]]:
    r = int(radius)
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= r * r]


def _disc_filter(x: np.ndarray, radius: int, reduce: Callable) -> np.ndarray:
    """``reduce`` (np.maximum / np.minimum) of ``x [H, W]`` over a disc of ``radius`` px, edges replicated."""
    h, w = x.shape
    xp = np.pad(x, radius, mode="edge")
    out = x.copy()
    for dy, dx in _disc(radius):
        out = reduce(out, xp[radius + dy : radius + dy + h, radius + dx : radius + dx + w])
    return out


def depth_edges(disparity_hw: np.ndarray, threshold: float = EDGE_THRESHOLD) -> np.ndarray:
    """Boolean ``[H, W]``: pixels with a 4-neighbour whose disparity differs by more than ``threshold``."""
    d = np.asarray(disparity_hw, np.float32)
    e = np.zeros(d.shape, bool)
    dy = np.abs(np.diff(d, axis=0)) > threshold
    dx = np.abs(np.diff(d, axis=1)) > threshold
    e[:-1] |= dy
    e[1:] |= dy
    e[:, :-1] |= dx
    e[:, 1:] |= dx
    return e


def perturb_disparity(
    disparity_hw: np.ndarray, k: int, *, edge_threshold: float = EDGE_THRESHOLD
) -> np.ndarray:
    """The disparity map dilated (``k > 0``) or eroded (``k < 0``) by ``|k|`` px at its depth edges."""
    d = np.asarray(disparity_hw, np.float32)
    if k == 0:
        return d.copy()
    r = abs(int(k))
    morphed = _disc_filter(d, r, np.maximum if k > 0 else np.minimum)
    near_edge = _disc_filter(depth_edges(d, edge_threshold).astype(np.uint8), r, np.maximum).astype(bool)
    return np.where(near_edge, morphed, d).astype(np.float32)


def parse_ks(text: str) -> tuple[int, ...]:
    """``"-8,-4,0,4,8"`` or ``"-8:8:2"`` (start:stop:step, both ends included) -> distinct sorted ints."""
    try:
        if ":" in text:
            a, b, *s = (int(p) for p in text.split(":"))
            step = s[0] if s else 1
            if step <= 0 or len(s) > 1:
                raise ValueError
            ks = tuple(range(a, b + 1, step))
        else:
            ks = tuple(int(p) for p in text.split(","))
    except ValueError:
        ks = ()
    if not ks or len(set(ks)) != len(ks) or any(abs(k) > 64 for k in ks):
        raise InputError(
            f"--robustness-ks {text!r}: expected distinct integers in [-64, 64], e.g. -8:8:2 or -4,0,4"
        )
    return tuple(sorted(ks))


def summarize(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Per-image rows (``method``, ``k``, metric values) -> per (method, k, metric): count, mean, median,
    first and third quartiles."""
    out = []
    keys = sorted({(r["method"], r["k"]) for r in rows}, key=lambda t: (str(t[0]), t[1]))
    for method, k in keys:
        sel = [r for r in rows if r["method"] == method and r["k"] == k]
        for m in metrics:
            v = np.asarray([r[m] for r in sel], np.float64)
            q1, med, q3 = np.percentile(v, [25, 50, 75])
            out.append(
                {
                    "method": method,
                    "k": k,
                    "metric": m,
                    "count": len(v),
                    "mean": float(v.mean()),
                    "median": float(med),
                    "q1": float(q1),
                    "q3": float(q3),
                }
            )
    return out


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """Rows of dicts (one header: the first row's keys) as CSV; floats with 6 significant digits."""
    if not rows:
        raise InputError(f"{path}: nothing to write")
    fields = list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(path: str | os.PathLike, summary: Sequence[dict[str, Any]], metrics: Sequence[str]) -> None:
    """One panel per metric: the median over images against ``k`` for each method, the band between the
    quartiles shaded (as the paper's Fig. 7). Needs matplotlib (the ``eval`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("the robustness plot needs matplotlib (pip install 'bokehdiff_jax[eval]')") from None
    labels = {"psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓", "dists": "DISTS ↓"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for method in dict.fromkeys(r["method"] for r in summary):
            rs = sorted(
                (r for r in summary if r["method"] == method and r["metric"] == m), key=lambda r: r["k"]
            )
            k = [r["k"] for r in rs]
            (line,) = ax.plot(k, [r["median"] for r in rs], marker="o", ms=3, label=method)
            ax.fill_between(
                k, [r["q1"] for r in rs], [r["q3"] for r in rs], color=line.get_color(), alpha=0.2
            )
        ax.set_xlabel("k: erosion (< 0) / dilation (> 0) of the disparity, px")
        ax.set_ylabel(labels.get(m, m))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
