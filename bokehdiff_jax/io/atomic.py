"""Atomic file and folder writes: an output either appears whole or not at all."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bokehdiff_jax.errors import InputError


def _default_mode(is_dir: bool) -> int:
    """The mode a plain ``open``/``mkdir`` would give under the current umask (``mkstemp`` and
    ``mkdtemp`` create private 0600/0700 files, which users do not expect of their outputs)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def check_output_folder(path: str | os.PathLike, ours: str, flag: str = "--out") -> None:
    """Refuses (``InputError``) an existing ``path`` that a folder output would wrongly replace: a file,
    or a folder holding entries whose names do not fully match the regular expression ``ours`` (the
    names the command itself writes). Call it before any work; an absent or empty folder is fine."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise InputError(f"{flag} {path} exists and is not a folder")
    foreign = sorted(p.name for p in path.iterdir() if not re.fullmatch(ours, p.name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise InputError(
            f"{flag} {path} is a folder holding other files ({shown}) that writing there would delete; "
            "choose a new or empty folder"
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside ``dst``; on success renames it onto ``dst``, else deletes it.

    The temporary lives in ``dst``'s folder so the final ``os.replace`` is a same-filesystem rename.
    For folders, an existing ``dst`` is replaced only after the new one is complete. A file never
    replaces a folder nor a folder a file, and a ``dst`` whose folder cannot be written is an
    ``InputError`` (before any work is done inside the block). The result gets the usual umask mode.
    """
    dst = Path(os.path.abspath(dst))  # "." and "x/.." get a real name (the temporaries need one)
    if dst.exists() and dst.is_dir() != is_dir:
        kind = "a folder" if dst.is_dir() else "a file"
        raise InputError(f"{dst} exists and is {kind}; expected {'a folder' if is_dir else 'a file'}")
    suffix = "".join(dst.suffixes)  # keep the extension so writers that infer formats still work
    # Folders this call creates, deepest first: removed again if the write fails.
    created = [p for p in (dst.parent, *dst.parent.parents) if not p.exists()]
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{dst.stem}.", suffix=f".tmp{suffix}", dir=dst.parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as e:
        raise InputError(f"cannot write {dst}: {e.strerror or e}") from None
    try:
        yield tmp
        os.chmod(tmp, _default_mode(is_dir))
        if is_dir and dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            _remove(old)  # a leftover of an interrupted replace
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
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        raise
