"""Evaluation outputs: per-image CSV, summary JSON and an HTML page showing the worst cases side by side.

Every writer here writes into a folder the caller made (the evaluation writes its whole output folder
atomically, so these plain writes inside it are safe).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bokehdiff_jax.evaluate.metrics import HIGHER_IS_BETTER

FORMAT = "bokehdiff_jax.evaluate/1"  # summary.json's "format": marks a folder this command wrote
THUMB = 320  # longer side of the report's thumbnails, px


def aggregate(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    """``{"metrics": {m: mean}, "median": {m: median}, "count": N}`` over per-image rows."""
    out: dict[str, Any] = {"metrics": {}, "median": {}, "count": len(rows)}
    for m in metrics:
        v = np.asarray([r[m] for r in rows], np.float64)
        out["metrics"][m] = float(v.mean()) if len(v) else math.nan
        out["median"][m] = float(np.median(v)) if len(v) else math.nan
    return out


def rank_metric(metrics: Sequence[str]) -> str:
    """The metric that orders worst cases: LPIPS when computed (it tracks blur quality best), else
    PSNR, else the first."""
    for m in ("lpips", "psnr"):
        if m in metrics:
            return m
    return metrics[0]


def worst_names(rows: Sequence[dict[str, Any]], metric: str, k: int) -> list[str]:
    """The ``k`` image names with the worst ``metric`` (lowest if higher is better, else highest)."""
    key = (lambda r: r[metric]) if HIGHER_IS_BETTER[metric] else (lambda r: -r[metric])
    return [r["name"] for r in sorted(rows, key=key)[:k]]


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")


def error_map(pred: np.ndarray, target: np.ndarray, gain: float = 4.0) -> np.ndarray:
    """``gain * |pred - target|`` averaged over channels, clipped to [0, 1]: ``[H, W]`` grey."""
    return np.clip(gain * np.mean(np.abs(np.asarray(pred) - np.asarray(target)), axis=-1), 0.0, 1.0)


def save_thumb(path: Path, image: np.ndarray) -> str:
    """An image (``[H, W]`` or ``[H, W, 3]`` in [0, 1]) downscaled to at most ``THUMB`` px, as JPEG."""
    from PIL import Image

    from bokehdiff_jax.io.images import to_uint8

    im = Image.fromarray(to_uint8(np.asarray(image)))
    im.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    im.convert("RGB").save(path, quality=92)
    return path.name


_STYLE = (
    "body{font-family:sans-serif;margin:1.5em;max-width:1600px}table{border-collapse:collapse;margin:8px 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}"
    ".row{display:flex;flex-wrap:wrap;gap:6px;margin-bottom:12px}figure{margin:0}"
    f"img{{max-width:{THUMB}px;min-width:160px;display:block}}figcaption{{font-size:12px;color:#444;max-width:{THUMB}px}}"
    "pre{font-size:12px;background:#f4f4f4;padding:6px}"
)


def metric_table(per_method: dict[str, dict[str, Any]], metrics: Sequence[str]) -> str:
    """An HTML table: one row per method, the mean (and median) of each metric."""
    arrows = {m: "↑" if HIGHER_IS_BETTER[m] else "↓" for m in metrics}
    head = "".join(f"<th>{m.upper()} {arrows[m]}<br><small>mean (median)</small></th>" for m in metrics)
    body = ""
    for label, s in per_method.items():
        cells = "".join(f"<td>{s['metrics'][m]:.4f} ({s['median'][m]:.4f})</td>" for m in metrics)
        body += f"<tr><th>{html.escape(label)}</th><td>{s['count']}</td>{cells}</tr>"
    return f"<table><tr><th>method</th><th>images</th>{head}</tr>{body}</table>"


def figure(src: str, caption: str) -> str:
    img = f'<img src="{html.escape(src)}" loading="lazy">'
    return f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>"


def write_page(path: Path, title: str, sections: Sequence[tuple[str, str]]) -> None:
    """``sections``: (heading, HTML body) pairs."""
    body = "".join(f"<h2>{html.escape(h)}</h2>{content}" for h, content in sections)
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )
