"""Streaming safetensors reader and writer in NumPy: no torch, no pickle, one tensor in memory at a time.

File layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header length ``N``,
``N`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data buffer; offsets are relative to the buffer's start. We parse this ourselves and read
each tensor with ``os.preadv`` into a fresh array (not ``mmap``: mapped pages would count towards the
reader's resident memory until unmapped, so converting a 5 GB file would hold 5 GB).

Readers are ``Mapping[str, np.ndarray]`` whose values are read on access, so
``mapping.diffusers_to_flax`` streams from them directly. Every malformed input is an ``InputError``
saying what was wrong; a PyTorch ``.bin`` (pickle) is recognised and refused, never unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.atomic import atomic_path

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "U16": np.dtype(np.uint16),
    "U32": np.dtype(np.uint32),
    "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
}
FLOAT_DTYPES = frozenset(DTYPES[k] for k in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"))
DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit too

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: dtype, shape, and byte range within the data buffer."""

    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _sniff_not_safetensors(head: bytes) -> str | None:
    """Names a recognisable non-safetensors format from the first bytes, or ``None``."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch .bin/.pt pickle checkpoint?)"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "a Python pickle (a PyTorch .bin checkpoint?)"
    return None


def _is_count(x: Any) -> bool:
    """A JSON non-negative integer (``True`` and ``2.0`` are not; the format says ``usize``)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class _RepeatedName(Exception):
    pass


def _no_repeated_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object hook: a name given twice is an error (which entry wins would be the parser's whim)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _RepeatedName(k)
        out[k] = v
    return out


def require_float(infos: Mapping[str, TensorInfo], what: str) -> None:
    """Refuses (``InputError``) tensors stored as integers or booleans: model parameters are floats, and
    casting an ``I32`` tensor to float reinterprets nothing, it silently changes every value."""
    bad = sorted(f"{k} ({DTYPE_NAMES[i.dtype]})" for k, i in infos.items() if i.dtype not in FLOAT_DTYPES)
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise InputError(f"{what}: parameters must be floating point; stored as integers: {shown}")


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A lazily read safetensors file: ``f[name]`` reads that tensor only. Use as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            what = "is a folder, not a safetensors file" if self.path.is_dir() else "no such safetensors file"
            raise InputError(f"{self.path}: {what}")
        self._fd = -1
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.infos, self.metadata, self.data_start = self._parse()
        except BaseException:
            self.close()
            raise

    def _parse(self) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise InputError(f"{self.path}: truncated: {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        first = os.pread(self._fd, 1, 8) if n <= size - 8 else b""
        if first != b"{" and (what := _sniff_not_safetensors(head)) is not None:
            # Only once the bytes fail as safetensors: a valid header length may start with 0x80 too.
            raise InputError(
                f"{self.path}: not a safetensors file: it is {what}; only safetensors are read "
                "(pickles are never loaded)"
            )
        if n > size - 8:
            raise InputError(
                f"{self.path}: header length {n} runs past the end of the file ({size} bytes): "
                "truncated or not a safetensors file"
            )
        if n > MAX_HEADER_BYTES:
            raise InputError(f"{self.path}: header length {n} exceeds {MAX_HEADER_BYTES} bytes")
        raw = os.pread(self._fd, n, 8)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_repeated_names)
        except _RepeatedName as e:
            raise InputError(
                f"{self.path}: tensor {e.args[0]!r} appears more than once in the header"
            ) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(
                f"{self.path}: not a safetensors file: its header is not valid JSON ({e})"
            ) from None
        if not isinstance(header, dict):
            raise InputError(
                f"{self.path}: safetensors header must be a JSON object, got {type(header).__name__}"
            )
        data_start, data_size = 8 + n, size - 8 - n
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise InputError(
                f"{self.path}: __metadata__ must map strings to strings, got {json.dumps(metadata)[:80]}"
            )
        infos: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            infos[name] = self._check_entry(name, entry, data_size)
        # The format's layout rule: the tensors tile the data buffer exactly, in offset order, with no
        # byte shared (two tensors aliasing one region) and none unused (a gap, or trailing bytes).
        covered = 0
        for name, info in sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
            if info.begin != covered:
                what = "overlaps the previous tensor" if info.begin < covered else "leaves a gap before it"
                raise InputError(
                    f"{self.path}: tensor {name!r} starts at byte {info.begin} of the data buffer, "
                    f"expected {covered}: it {what}"
                )
            covered = info.end
        if covered != data_size:
            raise InputError(
                f"{self.path}: the tensors cover {covered} of the {data_size} data bytes; "
                "a safetensors file holds nothing else"
            )
        return infos, metadata, data_start

    def _check_entry(self, name: str, entry: Any, data_size: int) -> TensorInfo:
        where = f"{self.path}: tensor {name!r}"
        try:
            dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not (isinstance(shape, list) and all(_is_count(s) for s in shape)):
                raise TypeError
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
                raise TypeError
        except (KeyError, TypeError):
            raise InputError(
                f"{where}: malformed entry {json.dumps(entry)[:200]} (need dtype, shape: a list of "
                "integers >= 0, data_offsets: [begin, end] integers >= 0)"
            ) from None
        shape, (begin, end) = tuple(shape), offsets
        if dtype_name not in DTYPES:
            raise InputError(f"{where}: unsupported dtype {dtype_name!r} (supported: {sorted(DTYPES)})")
        dtype = DTYPES[dtype_name]
        if not 0 <= begin <= end <= data_size:
            raise InputError(
                f"{where}: data offsets [{begin}, {end}] lie outside the {data_size}-byte data buffer "
                "(truncated file?)"
            )
        if (end - begin) != math.prod(shape) * dtype.itemsize:  # exact: no int64 wrap-around
            raise InputError(
                f"{where}: {end - begin} bytes do not hold a {dtype_name} tensor of shape {shape}"
            )
        return TensorInfo(dtype, shape, begin, end)

    # Mapping interface: values are read from disk on each access.
    def __getitem__(self, name: str) -> np.ndarray:
        info = self.infos[name]
        arr = np.empty(info.shape, info.dtype)
        view = memoryview(arr.reshape(-1).view(np.uint8))
        done, offset = 0, self.data_start + info.begin
        while done < len(view):  # preadv may return short counts on large reads
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise InputError(f"{self.path}: tensor {name!r}: unexpected end of file (truncated?)")
            done += got
        return arr

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()


class ShardedSafetensors(Mapping[str, np.ndarray]):
    """Several safetensors shards behind a ``*.safetensors.index.json`` (``weight_map``: name -> file)."""

    def __init__(self, index_path: str | os.PathLike):
        index_path = Path(index_path)
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise InputError(
                f"{index_path}: not a valid shard index (need JSON with a 'weight_map' object)"
            ) from None
        self.path = index_path
        odd = sorted({repr(v) for v in weight_map.values() if not _is_plain_file_name(v)})
        if odd:
            raise InputError(
                f"{index_path}: weight_map names shard files {', '.join(odd[:3])} that are not plain file "
                "names in the index's folder"
            )
        self._where = dict(weight_map)
        files = sorted(set(self._where.values()))
        missing = [f for f in files if not (index_path.parent / f).is_file()]
        if missing:
            raise InputError(
                f"{index_path}: missing shard file(s) {', '.join(missing)} in {index_path.parent}"
            )
        self.shards: dict[str, SafetensorsFile] = {}
        try:
            for f in files:
                self.shards[f] = SafetensorsFile(index_path.parent / f)
                listed = {k for k, v in self._where.items() if v == f}
                if set(self.shards[f].infos) != listed:
                    extra = sorted(set(self.shards[f].infos) - listed)[:5]
                    absent = sorted(listed - set(self.shards[f].infos))[:5]
                    raise InputError(
                        f"{index_path}: shard {f} does not hold what the index says "
                        f"(absent: {absent}, not in index: {extra})"
                    )
        except BaseException:
            self.close()
            raise
        self.metadata: dict[str, str] = {}

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return {k: self.shards[f].infos[k] for k, f in self._where.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        return self.shards[self._where[name]][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        for s in self.shards.values():
            s.close()

    def __enter__(self) -> ShardedSafetensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_plain_file_name(name: Any) -> bool:
    # A shard is a file beside its index: never a path elsewhere ("../x", "/etc/x").
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and os.sep not in name


def _variant_name(name: str, variant: str | None) -> str:
    # diffusers' rule: the variant goes before the last suffix ("x.safetensors" -> "x.fp16.safetensors").
    if variant is None:
        return name
    stem, _, ext = name.rpartition(".")
    return f"{stem}.{variant}.{ext}"


def open_diffusers_weights(
    folder: str | os.PathLike, variant: str | None = None
) -> SafetensorsFile | ShardedSafetensors:
    """Opens a diffusers model folder's weights: single file or sharded, plain or a variant (``"fp16"``).

    With ``variant=None`` the full-precision files are preferred and the ``fp16`` variant is the
    fallback. A folder holding only PyTorch pickles (``.bin``) is refused with a clear error.
    """
    folder = Path(folder)
    for v in (variant,) if variant is not None else (None, "fp16"):
        single, index = folder / _variant_name(WEIGHTS_NAME, v), folder / _variant_name(INDEX_NAME, v)
        if single.is_file():
            return SafetensorsFile(single)
        if index.is_file():
            return ShardedSafetensors(index)
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.bin.index*.json")
    )
    if pickles:
        raise InputError(
            f"{folder}: holds only PyTorch pickle weights ({', '.join(pickles)}); pickles are never loaded. "
            "Re-save the model with diffusers' save_pretrained(..., safe_serialization=True)"
        )
    want = (
        _variant_name(WEIGHTS_NAME, variant) if variant else f"{WEIGHTS_NAME} (or its .fp16 variant / index)"
    )
    raise InputError(f"{folder}: no diffusers weights found: expected {want}")


# ------------------------------------------------------------------------------------------- writer
@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What the writer must know about a tensor before any data is written."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


def write_safetensors(
    path: str | os.PathLike,
    specs: Sequence[TensorSpec],
    arrays: Iterable[np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes a safetensors file tensor by tensor, atomically (the file appears complete or not at all).

    ``specs`` fixes the header (names, dtypes, shapes, in data order); ``arrays`` then yields each
    tensor in that order and is consumed lazily, so only one tensor need exist at a time. Each array
    must match its spec exactly (no silent casts); bytes are written as they are in memory (C order,
    little-endian), so reading back gives bit-identical tensors.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for s in specs:
        dt = np.dtype(s.dtype)
        if dt not in DTYPE_NAMES:
            raise InputError(f"tensor {s.name!r}: dtype {dt} cannot be stored in safetensors")
        if s.name in header:
            raise InputError(f"tensor {s.name!r} appears twice")
        nbytes = math.prod(s.shape) * dt.itemsize
        header[s.name] = {
            "dtype": DTYPE_NAMES[dt],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # pad so the data buffer starts 8-byte aligned, as the reference does
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        it = iter(arrays)
        for s in specs:
            arr = next(it, None)
            if arr is None:
                raise InputError(f"writing {path}: ran out of tensors at {s.name!r}")
            arr = np.asarray(arr)
            if arr.dtype != np.dtype(s.dtype) or tuple(arr.shape) != tuple(s.shape):
                raise InputError(
                    f"writing {path}: tensor {s.name!r} is {arr.dtype}{tuple(arr.shape)}, "
                    f"the header says {np.dtype(s.dtype)}{tuple(s.shape)}"
                )
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
        if next(it, None) is not None:
            raise InputError(f"writing {path}: more tensors than header entries")
        f.flush()
        os.fsync(f.fileno())


def save_dict(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes an in-memory dict (small files: prompt embeddings, tests); keys in sorted order."""
    names = sorted(tensors)
    specs = [TensorSpec(k, np.asarray(tensors[k]).dtype, tuple(np.shape(tensors[k]))) for k in names]
    write_safetensors(path, specs, (tensors[k] for k in names), metadata)
