"""Atomic file and folder writes: an output either appears whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside ``dst``; on success renames it onto ``dst``, else deletes it.

    The temporary lives in ``dst``'s folder so the final ``os.replace`` is a same-filesystem rename.
    For folders, an existing ``dst`` is replaced only after the new one is complete.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(dst.suffixes)  # keep the extension so writers that infer formats still work
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{dst.stem}.", suffix=f".tmp{suffix}", dir=dst.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir and dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
