"""Evaluation data: (all-in-focus image, disparity, focus, strength, reference bokeh) examples.

Sources, named on the command line as ``--data SPEC``:

- ``heldout``: a held-out synthetic test set made by the synthesis code (SPEC section 4) from packaged
  data only, so evaluation works with no download. Fixed seed (``HELDOUT_SEED``); its backgrounds are
  scikit-image photos that training's embedded set (``data.samples.BACKGROUNDS``) does not use, and its
  foregrounds are procedural hair/fur/whisker mattes drawn with seeds training's do not use (training
  draws ``seed * 1000 + i``). Shared with training: the generators, not the instances.
- ``synth:DIR``: a ``bokehdiff-jax synth`` output folder (``data.items``).
- ``ebb:DIR``: EBB! pairs (:class:`EbbSource`), e.g. its Val294 subset, with user-supplied disparity.
- ``blb:DIR``: the BLB release of BokehMe (:class:`BlbSource`).
- ``tfds:NAME``: a built TFDS dataset (``ebb_val294``, ``blb/level5``, ...): ``tfds_builders.TfdsSource``.

``evaluate.datasets.open_source`` turns a spec into a source.

Every example is an :class:`Example` in the project's conventions (SPEC section 1). Sources are
sequences: ``len(source)``, ``source[i]``, loading lazily (one example in memory at a time).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bokehdiff_jax.errors import InputError

HELDOUT_SEED = 1_000_003
HELDOUT_BACKGROUNDS = ("hubble_deep_field.jpg", "ihc.png", "retina.jpg", "motorcycle_right.png")
HELDOUT_FOREGROUNDS = ("mixed", "hair", "fur", "whiskers")  # procedural kinds, one matte each
DISPARITY_SUFFIXES = (".png", ".npy", ".npz", ".pfm", ".tif", ".tiff")
IMAGE_SUFFIXES = (".exr", ".png", ".jpg", ".jpeg")


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One evaluation example. ``image``, ``target``: ``[H, W, 3]`` float32 sRGB in [0, 1] (all-in-focus
    input, reference bokeh); ``disparity``: ``[H, W]`` float32 in [0, 1], 1 near; ``focus``: the disparity
    in focus; ``strength``: ``K``, the CoC radius in pixels per unit disparity; ``name``: unique in its
    source."""

    name: str
    image: np.ndarray
    disparity: np.ndarray
    focus: float
    strength: float
    target: np.ndarray

    def __post_init__(self) -> None:
        h, w = self.disparity.shape
        if self.image.shape != (h, w, 3) or self.target.shape != (h, w, 3):
            raise InputError(
                f"{self.name}: image {self.image.shape}, target {self.target.shape} and disparity "
                f"{self.disparity.shape} must share one H x W"
            )
        if not (0.0 <= self.focus <= 1.0 and 0.0 <= self.strength < math.inf):
            raise InputError(
                f"{self.name}: focus {self.focus} must be in [0, 1] and strength {self.strength} >= 0"
            )


class Source(Protocol):
    description: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


def _f32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, np.float32))


# --------------------------------------------------------------------------------- held-out synthetic
class HeldoutSynthetic:
    """``count`` scenes of ``size`` x ``size`` pixels from ``data.synthesis`` with held-out inputs (module
    doc), seed ``seed``; example ``i`` is scene ``i`` of that stream: the same on every machine and run.

    ``base_strength``: the largest CoC radius at ``times = 1`` (``None``: ``12 size / 768``, the released
    range scaled to the canvas); ``rays_max``: the tracer's cap on rays per pixel.
    """

    def __init__(
        self,
        count: int = 8,
        size: int = 128,
        seed: int = HELDOUT_SEED,
        *,
        base_strength: float | None = None,
        rays_max: int = 256,
    ) -> None:
        from bokehdiff_jax.data.synthesis import SynthConfig

        if count < 1 or size < 16:
            raise InputError(f"held-out set: need count >= 1 and size >= 16, got {count} and {size}")
        try:
            self.config = SynthConfig(
                size=size,
                base_strength=12.0 * size / 768 if base_strength is None else float(base_strength),
                rays_max=rays_max,
                min_bg_side=min(64, size),
                min_fg_side=min(8, size),
            )
        except ValueError as e:  # SynthConfig's own checks
            raise InputError(f"held-out set: {e}") from None
        self.count, self.seed = count, seed
        self.description = f"held-out synthetic set: {count} scenes, {size} px, seed {seed}"
        self._inputs: tuple[list, list] | None = None

    def inputs(self) -> tuple[list, list]:
        """The foreground mattes (RGBA arrays) and background photo paths of the held-out set."""
        if self._inputs is None:
            from bokehdiff_jax.data.procedural import procedural_foreground
            from bokehdiff_jax.data.samples import sample_path

            fg = [
                procedural_foreground((320, 320), self.seed + i, kind=kind)
                for i, kind in enumerate(HELDOUT_FOREGROUNDS)
            ]
            self._inputs = (fg, [str(sample_path(n)) for n in HELDOUT_BACKGROUNDS])
        return self._inputs

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Example:
        from bokehdiff_jax.data.synthesis import synthesize

        if not 0 <= index < self.count:
            raise IndexError(index)
        fg, bg = self.inputs()
        s = synthesize(self.config, fg, bg, self.seed, index)
        return Example(
            f"heldout_{index:04d}",
            _f32(s["aif"]),
            _f32(s["disparity"]),
            float(s["focus"]),
            float(s["strength"]),
            _f32(s["bokeh"]),
        )


class SynthFolder:
    """A ``bokehdiff-jax synth`` output folder (``data.items`` layout), one example per finished item."""

    def __init__(self, folder: str | os.PathLike) -> None:
        from bokehdiff_jax.data.items import list_items

        self.items = list_items(folder)
        if not self.items:
            raise InputError(f"{folder} holds no finished synth items")
        self.description = f"synth folder {folder} ({len(self.items)} items)"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Example:
        from bokehdiff_jax.data.items import read_item

        s = read_item(self.items[index])
        return Example(
            f"synth_{int(s['index']):06d}",
            _f32(s["aif"]),
            _f32(s["disparity"]),
            float(s["focus"]),
            float(s["strength"]),
            _f32(s["bokeh"]),
        )


# ------------------------------------------------------------------------------------------- EBB!
def exposure_align(image: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The paper's "exposure-aligned" EBB! protocol (Sec. 4): the input image's global mean is matched to
    the reference's. Our reading: one gain ``mean(target) / mean(image)`` on the sRGB values, clipped to
    [0, 1] (the paper gives no more detail)."""
    m = float(np.mean(image))
    return np.clip(image * (float(np.mean(target)) / m), 0.0, 1.0).astype(np.float32) if m > 0 else image


def _natural_key(s: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))


def _one_file(folder: Path, stem: str, suffixes: Sequence[str], what: str) -> Path:
    found = [folder / f"{stem}{s}" for s in suffixes if (folder / f"{stem}{s}").is_file()]
    if len(found) != 1:
        have = "none" if not found else ", ".join(p.name for p in found)
        raise InputError(f"{folder}: expected one {what} {stem}{{{','.join(suffixes)}}}, found {have}")
    return found[0]


def read_ids(path: str | os.PathLike) -> list[str]:
    """An id list: one id per line (blank lines and ``#`` comments ignored), or a JSON list of ids."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(f"{path}: cannot read the id list ({e.strerror or e})") from None
    if text.lstrip().startswith("["):
        try:
            ids = [str(x) for x in json.loads(text)]
        except ValueError as e:
            raise InputError(f"{path}: not a JSON list of ids ({e})") from None
    else:
        ids = [ln.split("#")[0].strip() for ln in text.splitlines()]
        ids = [i for i in ids if i]
    if not ids or len(set(ids)) != len(ids):
        raise InputError(f"{path}: the id list is empty or repeats an id")
    return ids


def read_params(path: str | os.PathLike) -> dict[str, tuple[float, float]]:
    """Per-image focus and strength: JSON ``{"<id>": {"focus": d_f, "strength": K}, ...}``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        return {str(k): (float(v["focus"]), float(v["strength"])) for k, v in raw.items()}
    except OSError as e:
        raise InputError(f"{path}: cannot read the parameters ({e.strerror or e})") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise InputError(
            f'{path}: expected JSON {{"<id>": {{"focus": d_f, "strength": K}}, ...}} '
            f"({type(e).__name__}: {e})"
        ) from None


class EbbSource:
    """EBB! ("Everything is Better with Bokeh!", Ignatov, Patel & Timofte, CVPRW 2020) pairs from a folder.

    On-disk layout, as released and as the authors' loader reads it (github.com/aiff22/PyNET-Bokeh,
    ``load_dataset.py``: ``<split>/original/<i>.jpg``, ``<split>/bokeh/<i>.jpg``): ``root`` is a split
    folder holding ``original/<id>.jpg`` (the wide depth-of-field input, f/16) and ``bokeh/<id>.jpg`` (the
    Canon 7D + 50 mm f/1.8 reference), aligned and of equal size. The release carries no usable disparity
    and no focus or blur strength, so the user supplies them:

    - ``disparity_dir``: ``<id>.{png,npy,npz,pfm,tif}`` per image (default ``root/disparity``), read by
      ``io.images.read_disparity`` (``normalize``/``flip`` as ``render``'s flags);
    - ``params``: a JSON file ``{"<id>": {"focus": d_f, "strength": K}}``, or one ``focus`` and ``strength``
      for every image;
    - ``ids``: an id list (:func:`read_ids`) selecting a subset. EBB! Val294 (the 294 pairs of the paper's
      Table 1) is such a list; its ids are not shipped with the images, so pass them here. Default: every
      pair in the folder.

    ``exposure_align`` (default on, as the paper's headline numbers): :func:`exposure_align`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        disparity_dir: str | os.PathLike | None = None,
        ids: str | os.PathLike | None = None,
        params: str | os.PathLike | None = None,
        focus: float | None = None,
        strength: float | None = None,
        exposure_align: bool = True,
        normalize: bool = False,
        flip: bool = False,
    ) -> None:
        self.root = Path(root)
        orig, bokeh = self.root / "original", self.root / "bokeh"
        if not (orig.is_dir() and bokeh.is_dir()):
            raise InputError(f"{root}: not an EBB! split folder (expected original/ and bokeh/ inside)")
        self.disparity_dir = Path(disparity_dir) if disparity_dir is not None else self.root / "disparity"
        if not self.disparity_dir.is_dir():
            raise InputError(
                f"{self.disparity_dir}: no disparity folder; EBB! ships none, give one (--disparity-dir) "
                "with <id>.png/.npy per image"
            )
        found = sorted(
            (p.stem for p in orig.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")),
            key=_natural_key,
        )
        self.ids = read_ids(ids) if ids is not None else found
        missing = sorted(set(self.ids) - set(found), key=_natural_key)
        if missing:
            raise InputError(f"{orig}: ids without an image: {', '.join(missing[:5])}")
        if not self.ids:
            raise InputError(f"{orig}: no images")
        if params is not None:
            self.params = read_params(params)
            lacking = [i for i in self.ids if i not in self.params]
            if lacking:
                raise InputError(f"{params}: no focus/strength for ids {', '.join(lacking[:5])}")
        elif focus is None or strength is None:
            raise InputError(
                "EBB! records no focus or blur strength: give a parameter file (--params) "
                "or both --focus and --strength"
            )
        else:
            self.params = {i: (float(focus), float(strength)) for i in self.ids}
        self.exposure_align, self.normalize, self.flip = exposure_align, normalize, flip
        self.description = (
            f"EBB! {root} ({len(self.ids)} pairs{', exposure-aligned' if exposure_align else ''})"
        )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Example:
        from bokehdiff_jax.io.images import read_disparity, read_image

        i = self.ids[index]
        image = read_image(_one_file(self.root / "original", i, (".jpg", ".jpeg", ".png"), "image"))
        target = read_image(_one_file(self.root / "bokeh", i, (".jpg", ".jpeg", ".png"), "image"))
        disp, _ = read_disparity(
            _one_file(self.disparity_dir, i, DISPARITY_SUFFIXES, "disparity map"),
            normalize=self.normalize,
            flip=self.flip,
        )
        if image.shape != target.shape or disp.shape != image.shape[:2]:
            raise InputError(
                f"EBB! {i}: original {image.shape[1]}x{image.shape[0]}, bokeh "
                f"{target.shape[1]}x{target.shape[0]} and disparity {disp.shape[1]}x{disp.shape[0]} "
                "must be one size"
            )
        if self.exposure_align:
            image = exposure_align(image, target)
        focus, strength = self.params[i]
        return Example(f"ebb_{i}", _f32(image), _f32(disp), focus, strength, _f32(target))


# -------------------------------------------------------------------------------------------- BLB
def read_exr(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The channels of an OpenEXR file as float32 ``[H, W]`` arrays (needs the ``openexr`` package)."""
    try:
        import OpenEXR
    except ImportError:
        raise InputError(f"{path}: reading EXR needs the openexr package (pip install openexr)") from None
    try:
        with OpenEXR.File(str(path), separate_channels=True) as f:
            return {k: np.asarray(v.pixels, np.float32) for k, v in f.channels().items()}
    except Exception as e:  # the binding raises plain RuntimeErrors for unreadable files
        raise InputError(f"{path}: not a readable EXR file ({e})") from None


def _preferred_file(folder: Path, stem: str) -> Path:
    """``stem`` with the first suffix of ``IMAGE_SUFFIXES`` present: the release's EXR over previews."""
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise InputError(f"{folder}: no {stem}{{{','.join(IMAGE_SUFFIXES)}}}")


def _blb_image(path: Path) -> np.ndarray:
    """A BLB image as sRGB in [0, 1]: an EXR is linear light, encoded with gamma 2.2 (BokehMe's
    instructions) and clipped to [0, 1] (as its evaluation clips highlights above 1)."""
    if path.suffix.lower() != ".exr":
        from bokehdiff_jax.io.images import read_image

        return read_image(path)
    ch = read_exr(path)
    if not {"R", "G", "B"} <= set(ch):
        raise InputError(f"{path}: expected R, G, B channels, found {sorted(ch)}")
    rgb = np.stack([ch["R"], ch["G"], ch["B"]], -1)
    return np.clip(np.maximum(rgb, 0.0) ** (1 / 2.2), 0.0, 1.0).astype(np.float32)


def _blb_disparity(scene: Path) -> np.ndarray:
    """Raw BLB disparity (not normalised): ``1 / depth`` from ``depth.exr`` (its B channel, as BokehMe's
    instructions read the BGR array's channel 0; the only channel of a one-channel file), or a
    ``disparity.npy`` holding those values. Non-finite values are filled from their neighbours."""
    from bokehdiff_jax.io.images import fill_invalid

    if (scene / "depth.exr").is_file():
        ch = read_exr(scene / "depth.exr")
        depth = ch["B"] if "B" in ch else next(iter(ch.values())) if len(ch) == 1 else None
        if depth is None:
            raise InputError(
                f"{scene / 'depth.exr'}: expected a B channel or a single channel, found {sorted(ch)}"
            )
        with np.errstate(divide="ignore", invalid="ignore"):
            disp = np.where(depth > 0, 1.0 / np.asarray(depth, np.float64), np.nan)
    elif (scene / "disparity.npy").is_file():
        disp = np.asarray(np.load(scene / "disparity.npy", allow_pickle=False), np.float64)
    else:
        raise InputError(f"{scene}: no depth.exr (or disparity.npy) in this BLB scene")
    if disp.ndim != 2 or not np.isfinite(disp).any():
        raise InputError(f"{scene}: the disparity map must be a 2-D map with finite values")
    filled, _ = fill_invalid(disp.astype(np.float32))
    return filled


class BlbSource:
    """BLB, the synthetic benchmark released with BokehMe (Peng et al., CVPR 2022), from its folder.

    On-disk layout, per the release's instructions (github.com/JuewenPeng/BokehMe, README "BLB Dataset";
    scene previews under ``img/BLB/data/<scene>/``): ``root`` holds one folder per scene (10 scenes), each
    with the all-in-focus ``image.exr`` (linear light), ``depth.exr`` (disparity = ``1 / depth``, already
    scaled so that the signed defocus ``K (disp - disp_focus)`` is the CoC radius in pixels: not to be
    normalised), the renders ``bokeh_<kk>_<ff>.exr`` (``kk``: blur amount 0..4, ``ff``: refocused disparity
    0..9) and ``info.json`` with ``blur_parameters`` (the five ``K``) and the ten refocused disparities
    (key ``focus_key``; ``disp_focus`` by default: the release does not document this key's name, so a
    file using another one fails with the keys it has). PNG/JPEG images in place of the EXRs and a
    ``disparity.npy`` (raw ``1 / depth``) in place of ``depth.exr`` are accepted too.

    ``level``: the blur amount index (the paper's "BLB Level 5" is index 4); every refocused disparity of
    every scene is one example. Disparities outside [0, 1] are mapped into it exactly: ``d' = (d - lo) /
    (hi - lo)``, ``d_f' = (d_f - lo) / (hi - lo)``, ``K' = K (hi - lo)`` leave every CoC radius unchanged.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        level: int = 4,
        focus_key: str = "disp_focus",
        blur_key: str = "blur_parameters",
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{root}: no such folder")
        scenes = sorted(
            (p for p in self.root.iterdir() if (p / "info.json").is_file()),
            key=lambda p: _natural_key(p.name),
        )
        if not scenes:
            raise InputError(f"{root}: no BLB scene folders (folders holding info.json)")
        self.items: list[tuple[Path, int, float, float]] = []
        for scene in scenes:
            try:
                info = json.loads((scene / "info.json").read_text())
            except (OSError, ValueError) as e:
                raise InputError(f"{scene / 'info.json'}: unreadable ({e})") from None
            for key in (blur_key, focus_key):
                if not isinstance(info.get(key), list) or not info[key]:
                    raise InputError(
                        f"{scene / 'info.json'}: no list {key!r} (keys: {', '.join(sorted(info))}); "
                        "name the right key with --blb-focus-key / blur_key"
                    )
            if not 0 <= level < len(info[blur_key]):
                raise InputError(f"{scene}: blur level index {level} outside 0..{len(info[blur_key]) - 1}")
            k = float(info[blur_key][level])
            for j, f in enumerate(info[focus_key]):
                self.items.append((scene, j, float(f), k))
        self.level = level
        self.description = f"BLB {root} (blur level index {level}, {len(self.items)} renders)"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Example:
        scene, j, focus, strength = self.items[index]
        image = _blb_image(_preferred_file(scene, "image"))
        target = _blb_image(_preferred_file(scene, f"bokeh_{self.level:02d}_{j:02d}"))
        disp = _blb_disparity(scene)
        lo, hi = float(disp.min()), float(disp.max())
        if lo < 0.0 or hi > 1.0 or not 0.0 <= focus <= 1.0:
            lo, hi = min(lo, focus), max(hi, focus)
            span = max(hi - lo, 1e-12)
            disp, focus, strength = (disp - lo) / span, (focus - lo) / span, strength * span
        if image.shape != target.shape or disp.shape != image.shape[:2]:
            raise InputError(f"BLB {scene.name}: image, render and disparity sizes differ")
        name = f"blb_{scene.name}_{self.level:02d}_{j:02d}"
        return Example(
            name, _f32(image), _f32(np.clip(disp, 0, 1)), float(np.clip(focus, 0, 1)), strength, _f32(target)
        )


# ------------------------------------------------------------------------------------------ resizing
class Resized:
    """``source`` with every example area-downscaled (never upscaled) so its longer side is at most
    ``max_side`` pixels; ``strength`` is scaled with the image (it is in pixels)."""

    def __init__(self, source: Source, max_side: int) -> None:
        if max_side < 16:
            raise InputError(f"--max-side must be >= 16, got {max_side}")
        self.source, self.max_side = source, max_side
        self.description = f"{source.description}, longer side <= {max_side} px"

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Example:
        from bokehdiff_jax.data.samples import fit_longer_side
        from bokehdiff_jax.physics.optics import area_resize

        ex = self.source[index]
        h, w = ex.disparity.shape
        hw = fit_longer_side((h, w), self.max_side)
        if hw == (h, w):
            return ex
        chw = lambda x: np.moveaxis(np.asarray(area_resize(np.moveaxis(x, -1, 0), hw)), 0, -1)
        scale = 0.5 * (hw[0] / h + hw[1] / w)
        return Example(
            ex.name,
            _f32(np.clip(chw(ex.image), 0, 1)),
            _f32(np.clip(area_resize(ex.disparity, hw), 0, 1)),
            ex.focus,
            ex.strength * scale,
            _f32(np.clip(chw(ex.target), 0, 1)),
        )
