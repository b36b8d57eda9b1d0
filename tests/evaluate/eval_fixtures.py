"""Tiny EBB! and BLB folders written in their public on-disk layouts (see ``evaluate.sources``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from bokehdiff_jax.io.images import to_uint8, to_uint16


def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    base = 0.5 + 0.3 * np.sin(xx[..., None] / 3.0 + yy[..., None] / 5.0 + np.arange(3))
    return np.clip(base + 0.05 * rng.standard_normal((h, w, 3)), 0, 1)


def write_ebb(root: Path, ids=("0", "1", "2"), hw=(24, 32), params: bool = True) -> dict:
    """``root/{original,bokeh,disparity}/<id>`` (JPEG, JPEG, 16-bit PNG) and ``root/params.json``.
    Returns ``{id: (focus, strength)}``."""
    rng = np.random.default_rng(0)
    for sub in ("original", "bokeh", "disparity"):
        (root / sub).mkdir(parents=True)
    table = {}
    for i in ids:
        Image.fromarray(to_uint8(_image(rng, *hw))).save(root / "original" / f"{i}.jpg", quality=95)
        Image.fromarray(to_uint8(0.8 * _image(rng, *hw))).save(root / "bokeh" / f"{i}.jpg", quality=95)
        disp = np.tile(np.linspace(0.1, 0.9, hw[1], dtype=np.float32), (hw[0], 1))
        Image.fromarray(to_uint16(disp)).save(root / "disparity" / f"{i}.png")
        table[i] = (round(float(rng.uniform(0.2, 0.8)), 3), round(float(rng.uniform(2, 8)), 2))
    if params:
        params_json = {i: {"focus": f, "strength": k} for i, (f, k) in table.items()}
        (root / "params.json").write_text(json.dumps(params_json))
    return table


def write_exr(path: Path, channels: dict[str, np.ndarray]) -> None:
    import OpenEXR

    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    with OpenEXR.File(header, {k: np.asarray(v, np.float32) for k, v in channels.items()}) as f:
        f.write(str(path))


def write_blb(root: Path, scenes=("277", "280"), hw=(20, 28), n_focus: int = 2) -> dict:
    """BLB scenes: ``image.exr`` (linear RGB), ``depth.exr`` (R = G = B = depth, so ``1 / depth`` spans
    [0.25, 2]: outside [0, 1] on purpose), ``bokeh_<kk>_<ff>.exr`` for every level and focus, ``info.json``.
    Returns ``{scene: info}``."""
    rng = np.random.default_rng(1)
    infos = {}
    for s in scenes:
        d = root / s
        d.mkdir(parents=True)
        rgb = lambda: {c: rng.uniform(0.0, 1.2, hw) for c in "RGB"}  # linear light, highlights above 1
        write_exr(d / "image.exr", rgb())
        depth = np.tile(np.linspace(0.5, 4.0, hw[1]), (hw[0], 1))
        write_exr(d / "depth.exr", {"R": depth, "G": depth, "B": depth})
        for level in range(5):
            for j in range(n_focus):
                write_exr(d / f"bokeh_{level:02d}_{j:02d}.exr", rgb())
        info = {
            "blur_parameters": [5.0, 10.0, 15.0, 20.0, 25.0],
            "disp_focus": [round(float(f), 3) for f in rng.uniform(0.3, 1.8, n_focus)],
        }
        (d / "info.json").write_text(json.dumps(info))
        infos[s] = info
    return infos
