"""DISTS weights, offline: its learned alpha/beta, fetched once from the package index, verified, cached.

What DISTS needs. DISTS (Ding et al., "Image Quality Assessment: Unifying Structure and Texture
Similarity", TPAMI 2020) runs torchvision's ImageNet VGG16 (the same 13 convolutions LPIPS-VGG uses: we
take them from the verified LPIPS cache, ``losses.lpips_weights``) and weighs its per-channel structure
and texture terms with two learned vectors, ``alpha`` and ``beta``, 1475 values each (3 + 64 + 128 +
256 + 512 + 512 channels: the image itself, then the five VGG stages).

Where they come from. The ``dists-pytorch`` 0.1 wheel on PyPI (MIT licence) ships them as
``DISTS_pytorch/weights.pt``: a PyTorch file in the *legacy* (pre-1.6, non-zip) serialisation, i.e. a
run of pickles followed by the raw storage bytes. We never hand it to ``pickle`` or ``torch.load`` as is:
:func:`read_legacy_torch_tensors` parses it with a restricted unpickler whose only constructible globals
are torch's tensor-rebuild function, its float storage type and ``OrderedDict`` (each replaced by an
inert stand-in, so nothing in the file can run), then builds NumPy arrays from the storage bytes with
bounds checks. Torch is not needed; a test checks the result against ``torch.load(weights_only=True)``.

How they are fetched (``python -m bokehdiff_jax.evaluate.dists_weights``; ``launch/setup.sh`` runs it):
``pip download --no-deps dists-pytorch==0.1`` into a temporary folder, the wheel's SHA-256 checked
against the pinned value, ``weights.pt`` read from the wheel in memory and parsed as above, the two
tensors checked (``[1, 1475, 1, 1]`` float32) and written flat (``alpha``, ``beta``: ``[1475]``) to
``<cache>/dists/dists_alpha_beta.safetensors`` (atomically; ``<cache>`` as for LPIPS). Every load checks
the tensors' content SHA-256 against ``CONTENT_SHA256``. The verified wheel is kept beside them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.atomic import atomic_path
from bokehdiff_jax.io.safetensors_io import SafetensorsFile, save_dict
from bokehdiff_jax.losses.lpips_weights import content_sha256, default_cache_dir

DISTS_REQUIREMENT = "dists-pytorch==0.1"
DISTS_WHEEL = "DISTS_pytorch-0.1-py3-none-any.whl"
DISTS_WHEEL_SHA256 = "73e54ce13e7cf3ca962ee8e433d129884ec3dc75e00a27af90525e1da760ac61"
DISTS_MEMBER = "DISTS_pytorch/weights.pt"
WEIGHTS_NAME = "dists_alpha_beta.safetensors"
# SHA-256 of the converted tensors (``losses.lpips_weights.content_sha256``): pins the exact weights.
CONTENT_SHA256 = "c43648567e045214909fa79accbe4962e6d5e8537f068fbff60292818fe9a4a1"
FETCH_HINT = "python -m bokehdiff_jax.evaluate.dists_weights (launch/setup.sh runs it)"

# Channels of the six DISTS stages: the image, then VGG16's relu1_2 .. relu5_3.
DISTS_CHANNELS: tuple[int, ...] = (3, 64, 128, 256, 512, 512)
DISTS_WIDTH = sum(DISTS_CHANNELS)  # 1475

# The legacy format's leading magic number and protocol version (torch/serialization.py's constants).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {"FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8")}


# ------------------------------------------------------------------ the legacy torch format, torch-free
class _Storage:
    """An inert stand-in for a ``torch.*Storage`` class: remembers the element dtype."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _StorageRef:
    def __init__(self, key: str, dtype: np.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """What ``_rebuild_tensor_v2(storage, offset, size, stride, ...)`` would have built, not yet built."""

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> None:
        if not isinstance(storage, _StorageRef):
            raise InputError("torch file: a tensor whose storage is not a persistent storage reference")
        ints = lambda t: isinstance(t, tuple) and all(isinstance(v, int) and v >= 0 for v in t)
        if not (isinstance(offset, int) and offset >= 0 and ints(size) and ints(stride)):
            raise InputError("torch file: a tensor with a malformed offset, size or stride")
        if len(size) != len(stride):
            raise InputError("torch file: a tensor whose size and stride differ in rank")
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _LegacyTorchUnpickler(pickle.Unpickler):
    """Admits exactly the globals a saved dict of float tensors names, each as an inert stand-in."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _TensorRef
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(name)
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise InputError(
            f"refusing to unpickle global {module}.{name}: only float tensors in dicts are admitted"
        )

    def persistent_load(self, pid: Any) -> Any:
        # Legacy storages: ("storage", storage_type, key, location, numel, view_metadata).
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise InputError(f"torch file: unexpected persistent id {pid!r:.80}")
        kind, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(kind, _Storage) or not isinstance(key, str) or not isinstance(numel, int):
            raise InputError("torch file: malformed storage reference")
        if len(pid) > 5 and pid[5] is not None:
            raise InputError("torch file: storage views are not supported")
        return _StorageRef(key, kind.dtype, numel)


def _plain_load(f: io.BytesIO) -> Any:
    """One of the format's header pickles (ints, strings, dicts, lists only: no global is admitted)."""
    return _LegacyTorchUnpickler(f).load()


def read_legacy_torch_tensors(data: bytes) -> dict[str, np.ndarray]:
    """A legacy-format (non-zip) PyTorch file holding a (nested) dict of float tensors -> flat
    ``{"a/b": float array}``, without torch and without running code from the file.

    Raises ``InputError`` for any other global, a zip-format file, truncated data or a tensor reaching
    outside its storage.
    """
    if data[:4] == b"PK\x03\x04":
        raise InputError("torch file: zip-format (torch >= 1.6) files are not handled here")
    f = io.BytesIO(data)
    try:
        if _plain_load(f) != _LEGACY_MAGIC or _plain_load(f) != _LEGACY_PROTOCOL:
            raise InputError("torch file: not a legacy PyTorch file (bad magic number or protocol)")
        info = _plain_load(f)
        if not (isinstance(info, dict) and info.get("little_endian") is True):
            raise InputError("torch file: only little-endian files are supported")
        tree = _LegacyTorchUnpickler(f).load()
        keys = _plain_load(f)
    except InputError:
        raise
    except Exception as e:  # a malformed stream: one line
        raise InputError(f"torch file: malformed pickle stream ({type(e).__name__}: {e})") from None
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise InputError("torch file: malformed storage key list")

    refs: list[tuple[str, _TensorRef]] = []

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, dict):
            raise InputError(f"torch file: {prefix or '<root>'} is a {type(node).__name__}, expected a dict")
        for k, v in node.items():
            path = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, dict):
                walk(v, path)
            elif isinstance(v, _TensorRef):
                refs.append((path, v))
            else:
                raise InputError(f"torch file: {path} is a {type(v).__name__}, expected a tensor")

    walk(tree, "")
    wanted = {r.storage.key: r.storage for _, r in refs}
    storages: dict[str, np.ndarray] = {}
    for key in keys:  # the storages follow in this order, each as int64 numel then its bytes
        head = f.read(8)
        if len(head) != 8:
            raise InputError("torch file: truncated storage data")
        (numel,) = struct.unpack("<q", head)
        ref = wanted.get(key)
        if ref is None or numel != ref.numel:
            raise InputError(f"torch file: storage {key!r} is unexpected or has the wrong size")
        raw = f.read(numel * ref.dtype.itemsize)
        if len(raw) != numel * ref.dtype.itemsize:
            raise InputError("torch file: truncated storage data")
        storages[key] = np.frombuffer(raw, ref.dtype)
    out: dict[str, np.ndarray] = {}
    for path, r in refs:
        flat = storages.get(r.storage.key)
        if flat is None:
            raise InputError(f"torch file: {path} refers to a storage that is not in the file")
        last = r.offset + sum((n - 1) * s for n, s in zip(r.size, r.stride, strict=True) if n > 0)
        if any(n == 0 for n in r.size):
            out[path] = np.zeros(r.size, flat.dtype)
            continue
        if last >= flat.size:
            raise InputError(f"torch file: {path} reaches outside its storage")
        strides = tuple(s * flat.dtype.itemsize for s in r.stride)
        view = np.lib.stride_tricks.as_strided(flat[r.offset :], shape=r.size, strides=strides)
        out[path] = np.array(view, dtype=flat.dtype.newbyteorder("="))
    return out


# ------------------------------------------------------------------------------------ fetch and load
def dists_weights_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted weights live: ``<cache>/dists/dists_alpha_beta.safetensors``."""
    return Path(cache_dir or default_cache_dir()) / "dists" / WEIGHTS_NAME


def convert_dists_checkpoint(data: bytes) -> dict[str, np.ndarray]:
    """``weights.pt`` bytes -> ``{"alpha": [1475], "beta": [1475]}`` float32. Strict about names/shapes."""
    flat = read_legacy_torch_tensors(data)
    if sorted(flat) != ["alpha", "beta"]:
        raise InputError(f"DISTS weights: expected tensors alpha and beta, found {sorted(flat)}")
    out = {}
    for name, a in flat.items():
        if a.shape != (1, DISTS_WIDTH, 1, 1) or a.dtype != np.float32:
            raise InputError(
                f"DISTS weights: {name} is {a.dtype}{a.shape}, expected float32(1, {DISTS_WIDTH}, 1, 1)"
            )
        out[name] = np.ascontiguousarray(a.reshape(-1))
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_wheel(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:"]
    cmd += ["-d", str(folder), DISTS_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = folder / DISTS_WHEEL
    if proc.returncode != 0 or not path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InputError(f"could not download {DISTS_REQUIREMENT} with pip: {tail[0]}")
    return path


def fetch_dists_weights(
    cache_dir: str | os.PathLike | None = None, *, wheel: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Makes sure verified DISTS weights are in the cache; returns their path. Idempotent.

    ``wheel``: an already downloaded ``DISTS_pytorch-0.1-py3-none-any.whl`` (otherwise pip downloads it).
    The wheel's SHA-256 and the converted tensors' SHA-256 must both equal the pinned values.
    """
    dst = dists_weights_path(cache_dir)
    kept = dst.with_name(DISTS_WHEEL)
    if dst.is_file() and kept.is_file() and not force:
        load_dists_weights(dst)  # verifies: a corrupt file is an error, not silently kept
        return dst
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(wheel) if wheel is not None else _download_wheel(Path(tmp))
        if not archive.is_file():
            raise InputError(f"{archive}: no such file (expected {DISTS_WHEEL})")
        digest = _sha256_file(archive)
        if digest != DISTS_WHEEL_SHA256:
            raise InputError(f"{archive}: SHA-256 {digest} is not the pinned {DISTS_WHEEL_SHA256}")
        try:
            with zipfile.ZipFile(archive) as z:
                data = z.read(DISTS_MEMBER)
        except (KeyError, zipfile.BadZipFile) as e:
            raise InputError(f"{archive}: cannot read {DISTS_MEMBER}: {e}") from None
        wheel_bytes = archive.read_bytes()
    tensors = convert_dists_checkpoint(data)
    digest = content_sha256(tensors)
    if digest != CONTENT_SHA256:
        raise InputError(
            f"converted DISTS weights have content SHA-256 {digest}, not the pinned {CONTENT_SHA256}"
        )
    meta = {"source": DISTS_REQUIREMENT, "source_sha256": DISTS_WHEEL_SHA256, "content_sha256": digest}
    save_dict(dst, tensors, metadata=meta)
    # The verified wheel (20 kB) is kept beside them: the tests read its weights.pt with torch as well.
    with atomic_path(kept) as tmp_wheel:
        tmp_wheel.write_bytes(wheel_bytes)
    return dst


def load_dists_weights(path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The verified ``{"alpha": [1475], "beta": [1475]}`` float32 arrays. A missing file is an
    ``InputError`` saying how to fetch it; altered tensors fail the checksum."""
    path = Path(path) if path is not None else dists_weights_path()
    if not path.is_file():
        raise InputError(f"DISTS weights not found at {path}; fetch them once with: {FETCH_HINT}")
    with SafetensorsFile(path) as f:
        tensors = {k: f[k] for k in f}
    if {k: tuple(v.shape) for k, v in tensors.items()} != {"alpha": (DISTS_WIDTH,), "beta": (DISTS_WIDTH,)}:
        raise InputError(f"{path}: tensors are not DISTS's alpha and beta; refetch with: {FETCH_HINT}")
    digest = content_sha256(tensors)
    if digest != CONTENT_SHA256:
        raise InputError(
            f"{path}: content SHA-256 {digest} is not the pinned {CONTENT_SHA256}; refetch with: {FETCH_HINT}"
        )
    return tensors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bokehdiff_jax.evaluate.dists_weights",
        description="Fetch, verify and cache DISTS's alpha/beta (from the dists-pytorch wheel on PyPI).",
    )
    p.add_argument("--cache-dir", default=None, help="cache folder (default: see the module doc)")
    p.add_argument("--wheel", default=None, help=f"use this local {DISTS_WHEEL} instead of downloading")
    p.add_argument("--force", action="store_true", help="convert again even if the cache holds valid weights")
    args = p.parse_args(argv)
    try:
        path = fetch_dists_weights(args.cache_dir, wheel=args.wheel, force=args.force)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"DISTS weights verified: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
