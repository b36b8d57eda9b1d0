"""Strict readers and atomic writers for images and disparity maps.

Every reader returns float32 arrays in the project's conventions (SPEC section 1) or raises
``InputError`` with what was wrong and what was expected; nothing is silently guessed. Disparity
readers also return ``notes``: human-readable remarks (filled values, flips, suspicious maps) that the
CLI prints to stderr.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.atomic import atomic_path

IMAGE_WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
# Every image we write carries this tag (PNG "Software" text, JPEG comment): an existing file at an
# output path is replaced only if it carries it, i.e. only if we wrote it (``check_image_output``).
SOFTWARE = "bokehdiff_jax"
_DISP_KEY = re.compile(r"disp", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------- images


def _check_is_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not {what}")
    if not path.is_file():
        raise InputError(f"{path}: no such file")


def _open_pil(path: str | os.PathLike):
    """Open, fully decode and EXIF-rotate an image with Pillow; any failure is an ``InputError``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    _check_is_file(path, "an image file")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so truncated/corrupt data fails here and not later
            im = ImageOps.exif_transpose(im)
            if im.width == 0 or im.height == 0:
                raise InputError(f"{path}: image has zero size {im.width}x{im.height}")
            return im
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{path}: image too large to read safely ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{path}: corrupt or truncated image ({e})") from None


def _pil_to_float(im) -> tuple[np.ndarray, np.ndarray | None]:
    """Pillow image of any mode -> (colour ``[H, W, 3]`` in [0, 1], alpha ``[H, W]`` or None)."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale (PNG/TIFF); "I" is how some versions expose it. Scale by the 16-bit range.
        g = np.asarray(im, dtype=np.float64) / 65535.0
        g = np.clip(g, 0.0, 1.0).astype(np.float32)
        return np.repeat(g[..., None], 3, axis=-1), None
    if mode == "F":
        g = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)
        return np.repeat(g[..., None], 3, axis=-1), None
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    elif mode != "RGBA":
        # CMYK, YCbCr, LAB, HSV, P, L, 1, RGB: Pillow's converters to RGB.
        im = im.convert("RGB")
    arr = np.asarray(im, dtype=np.float32) / 255.0
    if has_alpha:
        return np.ascontiguousarray(arr[..., :3]), np.ascontiguousarray(arr[..., 3])
    return arr[..., :3], None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image as sRGB float32 ``[H, W, 3]`` in [0, 1]. Grayscale is repeated to 3 channels, 16-bit is
    scaled by 65535, palette/CMYK are converted, EXIF orientation is applied, alpha is dropped."""
    rgb, _ = _pil_to_float(_open_pil(path))
    return rgb


def read_rgba(path: str | os.PathLike) -> np.ndarray:
    """An image as float32 ``[H, W, 4]``: sRGB colour in [0, 1] and alpha (1 where the file has none)."""
    rgb, alpha = _pil_to_float(_open_pil(path))
    if alpha is None:
        alpha = np.ones(rgb.shape[:2], np.float32)
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


def _quantize(array: np.ndarray, dtype: type, what: str) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype == dtype:
        return a
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise InputError(f"{what} holds NaN or inf values")
    top = float(np.iinfo(dtype).max)
    # Round half up (floor(x + 0.5) on values >= 0): the project's one rounding rule for stored pixels.
    return (np.clip(a, 0.0, 1.0) * top + 0.5).astype(dtype)


def to_uint8(array: np.ndarray, what: str = "image") -> np.ndarray:
    """Float in [0, 1] (clipped) -> uint8, ``floor(255 x + 0.5)``; uint8 passes through unchanged.
    Any shape. NaN/inf are an ``InputError`` naming ``what``. The one float -> 8-bit conversion."""
    return _quantize(array, np.uint8, what)


def to_uint16(array: np.ndarray, what: str = "disparity") -> np.ndarray:
    """Float in [0, 1] (clipped) -> uint16, ``floor(65535 x + 0.5)`` (16-bit PNG disparity); uint16 passes
    through unchanged. NaN/inf are an ``InputError`` naming ``what``."""
    return _quantize(array, np.uint16, what)


def write_image(path: str | os.PathLike, array_hwc: np.ndarray, *, quality: int = 95) -> Path:
    """Write ``[H, W]``, ``[H, W, 1|3|4]`` float in [0, 1] (clipped) or uint8 as PNG or JPEG, chosen by
    the extension, atomically (the file appears whole or not at all). Returns the path."""
    from PIL import Image

    path = Path(path)
    fmt = IMAGE_WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"{path}: unsupported output extension; expected one of {sorted(IMAGE_WRITE_FORMATS)}"
        )
    a = to_uint8(array_hwc, f"image for {path}")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise InputError(f"image for {path} must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {a.shape}")
    if fmt == "JPEG" and a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]  # JPEG has no alpha
    with atomic_path(path) as tmp:
        if fmt == "JPEG":
            kwargs = {"quality": quality, "comment": SOFTWARE.encode()}
        else:
            from PIL.PngImagePlugin import PngInfo

            kwargs = {"pnginfo": PngInfo()}
            kwargs["pnginfo"].add_text("Software", SOFTWARE)
        Image.fromarray(a).save(tmp, format=fmt, **kwargs)
    return path


def written_by_us(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an image ``write_image`` wrote (it carries our tag; reads the header only)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.info.get("Software") == SOFTWARE or im.info.get("comment") == SOFTWARE.encode()
    except Exception:  # not an image at all: certainly not ours
        return False


def check_image_output(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuses (``InputError``) an image output path where writing would replace something we did not
    write: a folder, or an existing file without our tag (a user's photo). Call it before any work."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; expected an image file")
    if (path.exists() or path.is_symlink()) and not written_by_us(path):
        raise InputError(
            f"{flag} {path} exists and was not written by bokehdiff-jax; choose another name or remove it"
        )


def write_disparity(path: str | os.PathLike, disparity_hw: np.ndarray) -> Path:
    """Write a disparity map in [0, 1] atomically: ``.npy`` (float32, exact) or ``.png`` (16-bit)."""
    from PIL import Image

    path = Path(path)
    d = np.asarray(disparity_hw, np.float32)
    if d.ndim != 2 or not np.all(np.isfinite(d)):
        raise InputError(f"disparity for {path} must be a finite [H, W] array, got shape {d.shape}")
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, d)
        elif suffix == ".png":
            Image.fromarray(to_uint16(d)).save(tmp, format="PNG")
        else:
            raise InputError(f"{path}: disparity is written as .npy or .png (16-bit), not {suffix!r}")
    return path


# -------------------------------------------------------------------------------------------- disparity


def _read_pfm(path: Path) -> np.ndarray:
    """Portable float map: header ``Pf`` (1 channel) or ``PF`` (3), ``W H``, scale (< 0: little endian);
    rows stored bottom to top."""
    try:
        with open(path, "rb") as f:
            kind = f.readline().strip()
            if kind not in (b"Pf", b"PF"):
                raise InputError(f"{path}: not a PFM file (header {kind[:8]!r}, expected Pf or PF)")
            dims = f.readline().split()
            scale = float(f.readline().strip())
            w, h = int(dims[0]), int(dims[1])
            channels = 3 if kind == b"PF" else 1
            dtype = "<f4" if scale < 0 else ">f4"
            data = np.frombuffer(f.read(), dtype=dtype)
    except InputError:
        raise
    except (ValueError, IndexError, OSError) as e:
        raise InputError(f"{path}: corrupt PFM header ({e})") from None
    if w <= 0 or h <= 0 or data.size < w * h * channels:
        raise InputError(f"{path}: PFM data holds {data.size} values, expected {w}x{h}x{channels}")
    arr = data[: w * h * channels].reshape(h, w, channels)[::-1]
    if channels == 3:
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise InputError(f"{path}: colour PFM with differing channels; a disparity map has one channel")
    return arr[..., 0].astype(np.float32)


def _read_npz(path: Path, notes: list[str]) -> np.ndarray:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip archive (an empty one: end record only)
        raise InputError(f"{path}: not a .npz archive (no zip header; a text file?); save with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            if not keys:
                raise InputError(f"{path}: empty .npz archive")
            matching = [k for k in keys if _DISP_KEY.search(k)]
            key = matching[0] if matching else keys[0]
            if len(keys) > 1:
                notes.append(f"{path.name}: using array {key!r} of {keys}")
            return np.asarray(z[key])
    except InputError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: corrupt .npz archive ({e})") from None


def _read_disparity_image(path: Path) -> np.ndarray:
    """A grayscale image's levels in [0, 1]. Colour is refused, not converted to luminance: a colour
    (or colour-palette) picture is a depth *preview* whose colours are not disparities. A channel's
    gray copies (RGB with R = G = B, a palette of grays) are read as the gray they hold; an alpha
    channel is refused unless opaque everywhere (a transparent pixel has no disparity)."""
    im = _open_pil(path)
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return np.asarray(im, dtype=np.float64).astype(np.float32) / 65535.0
    if mode == "F":
        return np.asarray(im, dtype=np.float32)
    if mode in ("L", "1"):
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    if mode not in ("LA", "P", "PA", "RGB", "RGBA"):
        raise InputError(
            f"{path}: a disparity image must be single-channel 8- or 16-bit grayscale, got mode {mode}"
        )
    palette = mode in ("P", "PA")
    a = np.asarray(im.convert("RGBA") if palette or mode == "LA" else im, dtype=np.float32)
    if a.shape[-1] == 4 and np.any(a[..., 3] < 255):
        raise InputError(
            f"{path}: the disparity image has transparent pixels (an alpha channel), and a transparent "
            "pixel has no disparity; save it as single-channel grayscale without alpha"
        )
    if not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])):
        kind = "a colour palette (a colour-mapped depth preview?)" if palette else "colour (R, G, B differ)"
        raise InputError(
            f"{path}: the disparity image holds {kind}; colours are not disparity values: save the "
            "disparity itself as single-channel 8- or 16-bit grayscale"
        )
    return a[..., 0] / 255.0


def _load_raw(path: Path, notes: list[str]) -> np.ndarray:
    suffix = path.suffix.lower()
    _check_is_file(path, "a disparity file")
    if suffix == ".npy":
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":  # np.load would try it as a pickle and say only that
                raise InputError(
                    f"{path}: not a .npy file (no NumPy header; a text file?); save the array with numpy.save"
                )
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise InputError(f"{path}: corrupt .npy file ({e})") from None
    if suffix == ".npz":
        return _read_npz(path, notes)
    if suffix == ".pfm":
        return _read_pfm(path)
    if suffix in (".png", ".tif", ".tiff"):
        return _read_disparity_image(path)
    raise InputError(f"{path}: unsupported disparity format {suffix!r}; expected .npy, .npz, .pfm or .png")


def _grow(d: np.ndarray, valid: np.ndarray, max_passes: int) -> np.ndarray:
    """Up to ``max_passes`` times, give every invalid pixel touching valid ones (8-neighbourhood) their
    mean. Updates ``d`` in place; returns the new validity mask."""
    h, w = d.shape
    for _ in range(max_passes):
        if valid.all():
            break
        vp = np.pad(valid, 1).astype(np.float64)
        dp = np.pad(np.where(valid, d, 0.0), 1)
        total = np.zeros((h, w))
        count = np.zeros((h, w))
        for oy in (0, 1, 2):
            for ox in (0, 1, 2):
                if oy == 1 and ox == 1:
                    continue
                total += dp[oy : oy + h, ox : ox + w]
                count += vp[oy : oy + h, ox : ox + w]
        grow = ~valid & (count > 0)
        d[grow] = total[grow] / count[grow]
        valid = valid | grow
    return valid


def _fill(d: np.ndarray, valid: np.ndarray) -> np.ndarray:
    valid = _grow(d, valid, max_passes=16)
    if valid.all():
        return d
    # Large holes: fill the rest from a half-resolution copy (valid-weighted 2x2 means), recursively,
    # so the cost stays O(pixels) however wide the hole (sky marked inf, say).
    h, w = d.shape
    hp, wp = h + h % 2, w + w % 2
    dv = np.pad(np.where(valid, d, 0.0), ((0, hp - h), (0, wp - w)))
    vv = np.pad(valid, ((0, hp - h), (0, wp - w))).astype(np.float64)
    block = lambda x: x.reshape(hp // 2, 2, wp // 2, 2).sum(axis=(1, 3))
    count = block(vv)
    coarse = np.where(count > 0, block(dv) / np.maximum(count, 1.0), 0.0)
    coarse = _fill(coarse, count > 0)
    up = np.repeat(np.repeat(coarse, 2, axis=0), 2, axis=1)[:h, :w]
    d[~valid] = up[~valid]
    return d


def fill_invalid(disparity_hw: np.ndarray) -> tuple[np.ndarray, int]:
    """Fill NaN/inf values from valid neighbours: holes fill from their borders inwards (each pass gives
    every invalid pixel touching valid ones their mean: a nearest-valid fill, averaged at ties); what
    16 passes leave (wide holes) is filled from a recursively filled half-resolution copy. Returns
    ``(filled float32 [H, W], number filled)``. Raises ``InputError`` when no value is finite."""
    d = np.asarray(disparity_hw, np.float64).copy()
    valid = np.isfinite(d)
    n_bad = int(valid.size - valid.sum())
    if n_bad == 0:
        return d.astype(np.float32), 0
    if not valid.any():
        raise InputError("disparity map holds no finite value")
    d[~valid] = 0.0
    return _fill(d, valid).astype(np.float32), n_bad


def looks_flipped(disparity_hw: np.ndarray, margin: float = 0.05) -> bool:
    """Heuristic: in most photos the subject (centre) and the ground (bottom) are nearer than the border
    and the top. With disparity (near = 1) that means a larger centre and bottom; a map whose top band
    *and* border ring are both clearly larger (by ``margin``) looks like depth (near = small)."""
    d = np.asarray(disparity_hw, np.float32)
    h, w = d.shape
    if h < 8 or w < 8:
        return False
    bh, bw = max(1, h // 6), max(1, w // 6)
    top, bottom = d[:bh].mean(), d[-bh:].mean()
    ring = np.ones_like(d, bool)
    ring[bh:-bh, bw:-bw] = False
    centre = d[h // 4 : h - h // 4, w // 4 : w - w // 4].mean()
    return bool(top - bottom > margin and d[ring].mean() - centre > margin)


def read_disparity(
    path: str | os.PathLike, *, normalize: bool = False, flip: bool = False
) -> tuple[np.ndarray, list[str]]:
    """A disparity map as float32 ``[H, W]`` in [0, 1] (1 = near) and a list of notes.

    Formats: ``.npy``, ``.npz`` (the array whose key contains 'disp', else the first), ``.pfm``, 8- and
    16-bit grayscale PNG (scaled by 255 / 65535), float TIFF. Extra singleton axes are dropped (``[1, H, W]``,
    ``[H, W, 1]``; a one-row ``[1, W]`` map stays 2-D). Values outside
    [0, 1] (finite ones) are an ``InputError`` unless ``normalize`` (min-max over finite values). NaN/inf
    are filled from valid neighbours and reported. ``flip`` maps ``d -> 1 - d`` (for depth-like maps
    where near is small). A note warns when the result looks flipped (:func:`looks_flipped`).
    """
    path = Path(path)
    notes: list[str] = []
    raw = _load_raw(path, notes)
    if raw.dtype.kind not in "fiub":
        raise InputError(f"{path}: disparity must be numeric, got dtype {raw.dtype}")
    arr = np.asarray(raw, np.float64)
    while arr.ndim > 2 and 1 in (arr.shape[0], arr.shape[-1]):  # drop batch/channel axes, never H or W
        arr = arr[0] if arr.shape[0] == 1 else arr[..., 0]
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise InputError(f"{path}: disparity must be a 2-D [H, W] map, got shape {raw.shape}")
    finite = np.isfinite(arr)
    if not finite.any():
        raise InputError(f"{path}: disparity map holds no finite value")
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    if normalize:
        if hi > lo:
            # Halved first: hi - lo overflows for values near the float64 limit (1e308 - -1e308).
            arr = (arr / 2 - lo / 2) / (hi / 2 - lo / 2)
            notes.append(f"normalised disparity from [{lo:.4g}, {hi:.4g}] to [0, 1]")
        else:
            arr = np.where(finite, 0.5, arr)
            notes.append(f"disparity is constant ({lo:.4g}); set to 0.5")
    elif lo < -1e-6 or hi > 1.0 + 1e-6:
        raise InputError(
            f"{path}: disparity values span [{lo:.4g}, {hi:.4g}], outside [0, 1]; "
            "use --normalize to rescale min-max to [0, 1]"
        )
    arr = np.clip(arr, 0.0, 1.0)  # NaN stays NaN, inf was finite-checked out of the range above
    arr[~finite] = np.nan
    filled, n_bad = fill_invalid(arr)
    if n_bad:
        notes.append(
            f"filled {n_bad} non-finite disparity values ({100.0 * n_bad / arr.size:.2f}%) "
            "from their valid neighbours"
        )
    if flip:
        filled = 1.0 - filled
        notes.append("flipped disparity (d -> 1 - d)")
    if looks_flipped(filled):
        notes.append(
            "warning: this disparity map looks flipped (its top and border are nearer than its centre "
            "and bottom); disparity must be 1 near, 0 far" + ("" if flip else ": try --flip-disparity")
        )
    return filled.astype(np.float32), notes
