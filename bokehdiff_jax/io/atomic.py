"""Atomic file and folder writes: an output either appears whole or not at all.

A temporary is created beside its destination and named ``.<name>.bdj<pid>-<host>.<random>.tmp...``:
the tag says it is ours and which process made it, so a later run can prove a leftover is a stale
temporary of a killed run (its process is gone) and remove it (``sweep_stale``). Replacing a folder
moves the old one aside as ``.<name>.bdj-old`` between two renames; a run killed there leaves the
destination hidden, and the next ``atomic_path`` or ``recover`` of it puts it back.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bokehdiff_jax.errors import InputError

# A host tag in temporaries' names: a pid is only meaningful on the host that made it (shared disks).
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TEMPORARY = re.compile(
    r"\.(?P<name>.+)\.bdj(?P<pid>\d+)-(?P<host>[0-9a-f]{8})\.[a-z0-9_]+\.tmp.*", re.DOTALL
)
_OLD = ".bdj-old"


def _default_mode(is_dir: bool) -> int:
    """The mode a plain ``open``/``mkdir`` would give under the current umask (``mkstemp`` and
    ``mkdtemp`` create private 0600/0700 files, which users do not expect of their outputs)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def check_apart(output: str | os.PathLike, inputs: list[str | os.PathLike], flag: str = "--out") -> None:
    """Refuses (``InputError``) an ``output`` that would replace one of ``inputs``: the same file or
    folder, compared by inode so ``a/../a/x.png``, symlinks, hard links and bind mounts are caught, or
    a folder holding an input (folder outputs are replaced whole). Call it before any work."""
    try:
        st = os.stat(output)
    except OSError:
        return  # nothing there yet: writing it replaces nothing
    for inp in inputs:
        here = Path(inp).resolve()
        for q in (here, *here.parents):
            try:
                sq = os.stat(q)
            except OSError:
                continue
            if (sq.st_dev, sq.st_ino) != (st.st_dev, st.st_ino):
                continue
            if q == here:
                raise InputError(f"{flag} {output} is the input {inp}; writing it would destroy it")
            raise InputError(
                f"{flag} {output} is a folder holding the input {inp}; writing there would delete it"
            )


def check_writable(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuses (``InputError``) an output path that cannot be created: its nearest existing ancestor is
    a file, or a folder this process may not write in. Cheap; call it before any work (``atomic_path``
    would only find out at the end)."""
    path = Path(os.path.abspath(path))
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"cannot write {flag} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise InputError(f"cannot write {flag} {path}: no permission to write in {parent}")
            return


def read_marker(folder: str | os.PathLike, marker: str) -> dict | None:
    """The JSON object in ``folder/marker`` (the file our folder outputs carry to prove they are
    ours), or None when it is absent or not a JSON object."""
    import json

    try:
        m = json.loads((Path(folder) / marker).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def check_replaceable(
    path: str | os.PathLike,
    *,
    marker: str,
    format: str,
    names: str | None = None,
    flag: str = "--out",
    what: str = "output",
) -> None:
    """Refuses (``InputError``) an existing ``path`` that a folder output would wrongly replace.

    Only a folder we can prove we wrote may be replaced: one holding ``marker`` (a JSON object whose
    ``"format"`` is ``format``) and, when ``names`` (a regular expression) is given, nothing whose name
    does not fully match it (a file a user added to an earlier output). An absent path or an empty
    folder is fine; a file, or any other folder, is refused. Call it before any work.
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_dir():
        raise InputError(f"{flag} {path} exists and is not a folder")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    if (read_marker(path, marker) or {}).get("format") != format:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise InputError(
            f"{flag} {path} is a folder of other files ({shown}), not an earlier {what} (it has no "
            f"{marker} of ours); writing there would delete them: choose a new or empty folder"
        )
    foreign = [n for n in entries if n != marker and not (names and re.fullmatch(names, n))]
    if names is not None and foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise InputError(
            f"{flag} {path} is an earlier {what} that also holds other files ({shown}); replacing it "
            "would delete them: move them out or choose a new folder"
        )


def _tag() -> str:
    return f"bdj{os.getpid()}-{_HOST}"  # per call: a forked worker has its own pid


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale(folder: str | os.PathLike) -> list[str]:
    """Removes the temporaries in ``folder`` that a killed run of ours left: named by ``atomic_path``,
    made on this host, by a process that no longer exists. Returns one note per removal (for the
    user: what was removed and why). Anything else, a live run's temporaries included, is left alone."""
    folder = Path(folder)
    notes = []
    if not folder.is_dir():
        return notes
    for p in sorted(folder.iterdir()):
        m = _TEMPORARY.fullmatch(p.name)
        if m is None or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        _remove(p)
        notes.append(f"removed {p}, a temporary left by an interrupted run (process {m['pid']} is gone)")
    return notes


def recover(dst: str | os.PathLike) -> list[str]:
    """Undoes an interrupted folder replace of ``dst``: a folder moved aside (``.<name>.bdj-old``) is
    put back when ``dst`` is missing, or removed when the new ``dst`` is in place. Returns notes."""
    dst = Path(os.path.abspath(dst))
    old = dst.with_name(f".{dst.name}{_OLD}")
    if not (old.exists() or old.is_symlink()):
        return []
    if dst.exists() or dst.is_symlink():
        _remove(old)
        return [f"removed {old}, the previous {dst.name} an interrupted run had replaced"]
    os.replace(old, dst)
    return [f"restored {dst}, which an interrupted run had moved aside to {old.name}"]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def temporary_folder(parent: str | os.PathLike, name: str) -> Iterator[Path]:
    """A scratch folder ``parent/.<name>.bdj<pid>-<host>.<random>.tmp``, removed on exit. Named like
    ``atomic_path``'s temporaries, so what a killed run leaves is found by ``sweep_stale(parent)``."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{_tag()}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise InputError(f"cannot create a temporary folder in {parent}: {e.strerror or e}") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside ``dst``; on success renames it onto ``dst``, else deletes it.

    The temporary lives in ``dst``'s folder so the final ``os.replace`` is a same-filesystem rename.
    For folders, an existing ``dst`` is replaced only after the new one is complete. A file never
    replaces a folder nor a folder a file, and a ``dst`` whose folder cannot be written is an
    ``InputError`` (before any work is done inside the block). The result gets the usual umask mode.
    """
    dst = Path(os.path.abspath(dst))  # "." and "x/.." get a real name (the temporaries need one)
    with contextlib.suppress(OSError):
        for note in recover(dst):
            print(f"note: {note}", file=sys.stderr)
    if dst.exists() and dst.is_dir() != is_dir:
        kind = "a folder" if dst.is_dir() else "a file"
        raise InputError(f"{dst} exists and is {kind}; expected {'a folder' if is_dir else 'a file'}")
    suffix = "".join(dst.suffixes)  # keep the extension so writers that infer formats still work
    prefix = f".{dst.name}.{_tag()}."
    # Folders this call creates, deepest first: removed again if the write fails.
    created = [p for p in (dst.parent, *dst.parent.parents) if not p.exists()]
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=dst.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=f".tmp{suffix}", dir=dst.parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as e:
        blocker = next((p for p in dst.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:  # mkdir says only "File exists" / "Not a directory"
            raise InputError(f"cannot write {dst}: {blocker} is a file, not a folder") from None
        raise InputError(f"cannot write {dst}: {e.strerror or e}") from None
    try:
        yield tmp
        os.chmod(tmp, _default_mode(is_dir))
        if is_dir and dst.exists():
            # Two renames: no moment without a complete folder on disk (see ``recover``).
            old = dst.with_name(f".{dst.name}{_OLD}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            _remove(old)
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
