"""Folder mode: render every image of a folder with its disparity map, resumably.

``render_folder(images_dir, disparity_dir, out_dir, ...)`` pairs ``IMAGE_DIR/<stem>.<image ext>`` with
``DISPARITY_DIR/<stem>.<npy|npz|pfm|png|tif|tiff>`` (every image needs one), and writes
``OUT/<stem>.png`` (or, for focal stacks, the folder ``OUT/<stem>/``), each atomically, with a progress
bar. ``OUT/render_folder.json`` marks the folder as ours and records the settings: a rerun with the same
settings skips every output already written (so an interrupted run resumes where it stopped, and a
finished one does nothing); a rerun with other settings, or an ``OUT`` holding anything else, is refused
before any work. Any renderer works (the classical one, ``OneStep``): the caller passes the callables.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bokehdiff_jax.errors import InputError

FOLDER_MARKER, FOLDER_FORMAT = "render_folder.json", "bokehdiff_jax.render_folder"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
DISPARITY_EXTS = (".npy", ".npz", ".pfm", ".png", ".tif", ".tiff")

Render = Callable[[np.ndarray, np.ndarray, float, float], np.ndarray]
Stack = Callable[[np.ndarray, np.ndarray, float, int], tuple[np.ndarray, np.ndarray]]


def _by_stem(folder: Path, exts: tuple[str, ...], flag: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(f"{flag} {folder}: not a folder")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."):
            if p.stem in out:
                raise InputError(
                    f"{flag} {folder}: two files named {p.stem!r} ({out[p.stem].name}, {p.name})"
                )
            out[p.stem] = p
    return out


def pair_files(
    images_dir: str | os.PathLike, disparity_dir: str | os.PathLike
) -> list[tuple[str, Path, Path]]:
    """``[(stem, image, disparity)]`` in name order; ``InputError`` if the folder has no image, or an
    image has no disparity map of the same stem."""
    images = _by_stem(Path(images_dir), IMAGE_EXTS, "IMAGE")
    disps = _by_stem(Path(disparity_dir), DISPARITY_EXTS, "--disparity-dir")
    if not images:
        raise InputError(f"{images_dir}: no image ({', '.join(IMAGE_EXTS)}) in this folder")
    missing = [s for s in images if s not in disps]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise InputError(
            f"--disparity-dir {disparity_dir}: no disparity map for {len(missing)} image(s): {shown}"
        )
    return [(s, images[s], disps[s]) for s in images]


def check_out_folder(
    out: str | os.PathLike, settings: dict[str, Any], inputs: list, names: list[str]
) -> None:
    """Refuses (before any work) an ``out`` that is an input or holds one, that holds anything but our
    marker and the output ``names`` of this job, or that an earlier run filled with other ``settings``."""
    from bokehdiff_jax.io.atomic import check_apart, check_replaceable, check_writable, read_marker

    out = Path(out)
    check_apart(out, inputs)
    check_replaceable(out, marker=FOLDER_MARKER, format=FOLDER_FORMAT, names="|".join(map(re.escape, names)),
                      what="render folder")  # fmt: skip
    check_writable(out)
    earlier = read_marker(out, FOLDER_MARKER)
    if earlier is not None and earlier.get("settings") != settings:
        diff = sorted(k for k in set(settings) | set(earlier.get("settings") or {})
                      if settings.get(k) != (earlier.get("settings") or {}).get(k))  # fmt: skip
        raise InputError(
            f"--out {out} was rendered with other settings ({', '.join(diff)}); resume with the same ones "
            "or choose a new folder"
        )


def _done(path: Path, stack: bool) -> bool:
    """An output is done when it is there (atomic writes: present means complete) and is ours."""
    if stack:
        from bokehdiff_jax.io.atomic import read_marker

        return path.is_dir() and read_marker(path, "focal_stack.json") is not None
    from bokehdiff_jax.io.images import written_by_us

    return path.is_file() and written_by_us(path)


def render_folder(
    images_dir: str | os.PathLike,
    disparity_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    render: Render,
    focus_of: Callable[[np.ndarray], float],
    strength: float,
    settings: dict[str, Any],
    stack: Stack | None = None,
    stack_n: int | None = None,
    write_stack: Callable[[Path, np.ndarray, np.ndarray, dict[str, Any]], None] | None = None,
    normalize: bool = False,
    flip: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> dict[str, int]:
    """Renders every (image, disparity) pair of the two folders into ``out`` (module doc).

    Args:
      render: ``(image_hwc [0, 1], disparity_hw, focus, strength) -> image_hwc [0, 1]``.
      focus_of: the focus disparity of one image from its disparity map (``--focus``/``--focus-at``/...).
      settings: what the outputs depend on (method, model, strength, focus, ...): recorded in the marker,
        compared on resume.
      stack, stack_n, write_stack: focal stacks instead of single renders: ``stack(image, disparity,
        strength, n) -> (focus [n], images [n, H, W, 3])`` and the writer of one stack folder
        ``write_stack(tmp_folder, focus, images, info)``.
      normalize, flip: disparity reading options (``io.images.read_disparity``).

    Returns ``{"rendered": n, "skipped": m}`` (skipped: already done by an earlier run).
    """
    from bokehdiff_jax.io.atomic import atomic_path, recover, sweep_stale
    from bokehdiff_jax.io.images import read_disparity, read_image, write_image

    out = Path(out)
    pairs = pair_files(images_dir, disparity_dir)
    is_stack = stack is not None
    for note in recover(out) + sweep_stale(out.absolute().parent) + sweep_stale(out):
        echo(f"note: {note}")
    targets = [(s, i, d, out / (s if is_stack else f"{s}.png")) for s, i, d in pairs]
    check_out_folder(out, settings, [images_dir, disparity_dir], [t[3].name for t in targets])
    out.mkdir(parents=True, exist_ok=True)
    marker = {"format": FOLDER_FORMAT, "settings": settings}
    with atomic_path(out / FOLDER_MARKER) as tmp:
        tmp.write_text(json.dumps(marker, indent=1) + "\n")

    todo = [t for t in targets if not _done(t[3], is_stack)]
    skipped = len(targets) - len(todo)
    if skipped:
        echo(f"note: {skipped} of {len(targets)} outputs already in {out}: resuming")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(targets), initial=skipped, unit="image", file=sys.stderr, dynamic_ncols=True)
    try:
        for stem, image_path, disp_path, target in todo:
            image = read_image(image_path)
            disparity, notes = read_disparity(disp_path, normalize=normalize, flip=flip)
            for note in notes:
                echo(f"{stem}: " + (note if note.startswith("warning:") else f"note: {note}"))
            if disparity.shape != image.shape[:2]:
                raise InputError(
                    f"{disp_path} is {disparity.shape[1]}x{disparity.shape[0]} but {image_path} is "
                    f"{image.shape[1]}x{image.shape[0]}; they must match"
                )
            if is_stack:
                focus_n, images = stack(image, disparity, strength, stack_n)
                info = {"image": str(image_path.resolve()), "disparity": str(disp_path.resolve())}
                with atomic_path(target, is_dir=True) as tmp:
                    write_stack(tmp, np.asarray(focus_n), np.asarray(images), info)
            else:
                write_image(target, render(image, disparity, focus_of(disparity), strength))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return {"rendered": len(todo), "skipped": skipped}
