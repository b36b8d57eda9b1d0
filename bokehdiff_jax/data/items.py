"""The synth item format: one folder per example, written atomically, read back as float32 arrays.

Layout of a ``synth`` output folder::

    synth.json              the run: config, seed, n, inputs (resume refuses a different run)
    report.txt              skipped and converted inputs, with reasons
    items/000000/           one folder per example, written atomically (whole or absent)
        aif.png bokeh.png   8-bit sRGB
        disparity.png       16-bit grayscale, value / 65535 = disparity in [0, 1] (1 near)
        meta.json           focus, strength (K, px), layers with their planes and sources, rays, padding

``write_item`` / ``read_item`` / ``list_items`` are the only code that knows this layout: the ``synth``
command, the Grain loader and the TFDS builder all go through them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.atomic import atomic_path

ITEM_FILES = ("aif.png", "bokeh.png", "disparity.png", "meta.json")


def item_dir(out: Path, index: int) -> Path:
    return out / "items" / f"{index:06d}"


def write_item(dst: Path, sample: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Writes one example folder atomically (a temporary folder renamed onto ``dst``)."""
    from PIL import Image

    def u8(x: np.ndarray) -> np.ndarray:
        return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    with atomic_path(dst, is_dir=True) as tmp:
        Image.fromarray(u8(sample["aif"])).save(tmp / "aif.png")
        Image.fromarray(u8(sample["bokeh"])).save(tmp / "bokeh.png")
        d16 = (np.clip(sample["disparity"], 0.0, 1.0) * 65535.0 + 0.5).astype(np.uint16)
        Image.fromarray(d16).save(tmp / "disparity.png")
        meta = dict(
            meta,
            focus=float(sample["focus"]),
            strength=float(sample["strength"]),
            disparity_encoding="uint16 PNG, disparity = value / 65535 (1 = near)",
        )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def read_item(folder: str | Path) -> dict[str, np.ndarray]:
    """Reads an example folder back: the same keys as ``synthesize`` (plus ``index``), float32."""
    from PIL import Image

    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    with Image.open(folder / "aif.png") as im:
        aif = np.asarray(im.convert("RGB"), np.float32) / 255.0
    with Image.open(folder / "bokeh.png") as im:
        bokeh = np.asarray(im.convert("RGB"), np.float32) / 255.0
    with Image.open(folder / "disparity.png") as im:
        disp = np.asarray(im, np.float32) / 65535.0
    focus, strength = np.float32(meta["focus"]), np.float32(meta["strength"])
    return {
        "aif": aif,
        "bokeh": bokeh,
        "disparity": disp,
        "focus": focus,
        "strength": strength,
        "coc": (strength * np.abs(disp - focus)).astype(np.float32),
        "index": np.int64(meta["index"]),
    }


def list_items(out: str | Path) -> list[Path]:
    """The finished example folders of a ``synth`` output, sorted by index."""
    items = Path(out) / "items"
    if not items.is_dir():
        raise InputError(f"{out} is not a synth output folder (no items/ inside)")
    return sorted(
        p
        for p in items.iterdir()
        if p.is_dir() and not p.name.startswith(".") and all((p / f).is_file() for f in ITEM_FILES)
    )
