"""The synth item format: one folder per example, written atomically, read back as float32 arrays.

Layout of a ``synth`` output folder::

    synth.json              the run: format "bokehdiff_jax.synth", config, seed, n, inputs (resume
                            refuses a different run; synth writes only into a folder holding it or empty)
    report.txt              skipped and converted inputs, with reasons
    items/000000/           one folder per example, written atomically (whole or absent)
        aif.png bokeh.png   8-bit sRGB
        disparity.png       16-bit grayscale, value / 65535 = disparity in [0, 1] (1 near)
        meta.json           focus, strength (K, px), layers with their planes and sources, rays, padding

``write_item`` / ``read_record`` / ``decode_record`` / ``read_item`` / ``list_items`` are the only code
that knows this layout and its encoding: the ``synth`` command, the Grain loader and the TFDS builder
all go through them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.atomic import atomic_path
from bokehdiff_jax.io.images import to_uint8, to_uint16
from bokehdiff_jax.physics.optics import coc_radius

ITEM_FILES = ("aif.png", "bokeh.png", "disparity.png", "meta.json")


def item_dir(out: Path, index: int) -> Path:
    return out / "items" / f"{index:06d}"


def write_item(dst: Path, sample: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Writes one example folder atomically (a temporary folder renamed onto ``dst``)."""
    from PIL import Image

    with atomic_path(dst, is_dir=True) as tmp:
        Image.fromarray(to_uint8(sample["aif"], "aif")).save(tmp / "aif.png")
        Image.fromarray(to_uint8(sample["bokeh"], "bokeh")).save(tmp / "bokeh.png")
        Image.fromarray(to_uint16(sample["disparity"])).save(tmp / "disparity.png")
        meta = dict(
            meta,
            focus=float(sample["focus"]),
            strength=float(sample["strength"]),
            disparity_encoding="uint16 PNG, disparity = value / 65535 (1 = near)",
        )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def read_record(folder: str | Path) -> dict[str, Any]:
    """An example folder as stored, not yet decoded: ``aif``, ``bokeh`` uint8 ``[H, W, 3]``,
    ``disparity`` uint16 ``[H, W]`` (value / 65535), ``focus``, ``strength`` float32, ``index`` int64
    and ``meta`` (the parsed meta.json). The TFDS builder stores exactly these arrays."""
    from PIL import Image

    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    with Image.open(folder / "aif.png") as im:
        aif = np.asarray(im.convert("RGB"))
    with Image.open(folder / "bokeh.png") as im:
        bokeh = np.asarray(im.convert("RGB"))
    with Image.open(folder / "disparity.png") as im:
        disp = np.asarray(im).astype(np.uint16)  # Pillow may expose 16-bit PNGs as int32 ("I")
    return {
        "aif": aif,
        "bokeh": bokeh,
        "disparity": disp,
        "focus": np.float32(meta["focus"]),
        "strength": np.float32(meta["strength"]),
        "index": np.int64(meta["index"]),
        "meta": meta,
    }


def decode_record(record: dict[str, Any]) -> dict[str, np.ndarray]:
    """A stored record (:func:`read_record`, or a raw ``synbokeh`` TFDS record) -> the float32 example:
    the keys of ``synthesize`` (``aif``, ``bokeh`` ``[H, W, 3]`` in [0, 1], ``disparity`` ``[H, W]``,
    ``focus``, ``strength``, ``coc`` ``[H, W]`` pixels) plus ``index``. Other keys are ignored."""
    disp = np.asarray(record["disparity"], np.float32) / 65535.0
    focus, strength = np.float32(record["focus"]), np.float32(record["strength"])
    return {
        "aif": np.asarray(record["aif"], np.float32) / 255.0,
        "bokeh": np.asarray(record["bokeh"], np.float32) / 255.0,
        "disparity": disp,
        "focus": focus,
        "strength": strength,
        "coc": coc_radius(disp, focus, strength).astype(np.float32),
        "index": np.int64(record["index"]),
    }


def read_item(folder: str | Path) -> dict[str, np.ndarray]:
    """Reads an example folder back: the same keys as ``synthesize`` (plus ``index``), float32."""
    return decode_record(read_record(folder))


def item_complete(folder: Path) -> bool:
    """Whether an example folder is finished: every one of ``ITEM_FILES`` present. The one test both
    ``list_items`` and ``synth``'s resume use, so an item missing a file is redone, never counted."""
    return (
        folder.is_dir()
        and not folder.name.startswith(".")
        and all((folder / f).is_file() for f in ITEM_FILES)
    )


def list_items(out: str | Path) -> list[Path]:
    """The finished example folders of a ``synth`` output, sorted by index."""
    items = Path(out) / "items"
    if not items.is_dir():
        raise InputError(f"{out} is not a synth output folder (no items/ inside)")
    return sorted(p for p in items.iterdir() if item_complete(p))
