"""Atomic writes: whole or nothing, and nothing left behind on failure."""

import pytest

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.atomic import atomic_path


def test_file_appears_only_on_success(tmp_path):
    dst = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(dst) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(dst) as tmp:
        tmp.write_text("whole")
    assert dst.read_text() == "whole"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_failed_write_removes_the_folders_it_created(tmp_path):
    dst = tmp_path / "a" / "b" / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic_path(dst, is_dir=True) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_folder_replaced_whole_and_kinds_never_swap(tmp_path):
    dst = tmp_path / "ckpt"
    dst.mkdir()
    (dst / "old").write_text("1")
    with atomic_path(dst, is_dir=True) as tmp:
        (tmp / "new").write_text("2")
    assert [p.name for p in dst.iterdir()] == ["new"]
    with pytest.raises(InputError, match="is a folder"):
        with atomic_path(dst):
            pass


# ------------------------------------------------------------------ interrupted runs (issue 11)
_CHILD = """
import os, signal, sys
from pathlib import Path
from bokehdiff_jax.io.atomic import atomic_path

dst, when = Path(sys.argv[1]), sys.argv[2]
if when == "between_renames":  # die like kill -9 right after the old folder was moved aside
    real, calls = os.replace, []
    def replace(a, b):
        calls.append(a)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        real(a, b)
    os.replace = replace
with atomic_path(dst, is_dir=dst.suffix == "") as tmp:
    if tmp.is_dir():
        (tmp / "new").write_text("2")
    else:
        tmp.write_text("2")
    if when == "inside":
        os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_child(tmp_path, dst, when):
    import subprocess
    import sys

    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    proc = subprocess.run([sys.executable, str(script), str(dst), when], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr


@pytest.mark.parametrize("name", ["ckpt", "out.png"])
def test_stale_temporaries_of_a_killed_run_are_swept_and_reported(tmp_path, name):
    from bokehdiff_jax.io.atomic import sweep_stale

    root = tmp_path / "root"
    root.mkdir()
    _killed_child(tmp_path, root / name, "inside")
    left = [p.name for p in root.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".{name}.") and ".tmp" in left[0]
    (root / f".{name}.user.tmp").write_text("a user's file that merely looks like a temporary")
    notes = sweep_stale(root)
    assert len(notes) == 1 and left[0] in notes[0] and "interrupted" in notes[0]
    assert [p.name for p in root.iterdir()] == [f".{name}.user.tmp"]
    assert sweep_stale(root) == []


def test_a_live_runs_temporaries_are_left_alone(tmp_path):
    from bokehdiff_jax.io.atomic import sweep_stale

    with atomic_path(tmp_path / "ckpt", is_dir=True) as tmp:
        assert sweep_stale(tmp_path) == [] and tmp.is_dir()


def test_a_folder_hidden_by_a_kill_between_the_renames_is_restored(tmp_path):
    from bokehdiff_jax.io.atomic import recover, sweep_stale

    dst = tmp_path / "ckpt"
    dst.mkdir()
    (dst / "old").write_text("1")
    _killed_child(tmp_path, dst, "between_renames")
    assert not dst.exists()  # the kill left the previous output moved aside...
    notes = recover(dst)  # ...the next run restores it
    assert (dst / "old").read_text() == "1" and "restored" in notes[0]
    # A kill after the second rename leaves both: the moved-aside copy is removed.
    _killed_child(tmp_path, dst, "between_renames")
    dst.mkdir()
    (dst / "new").write_text("2")
    notes = recover(dst)
    assert "removed" in notes[0] and [p.name for p in dst.iterdir()] == ["new"]
    assert len(sweep_stale(tmp_path)) == 2  # the two killed runs' temporaries
    assert not any(p.name.startswith(".ckpt") for p in tmp_path.iterdir())
    assert recover(dst) == []


def test_atomic_path_restores_a_hidden_destination_before_replacing_it(tmp_path, capsys):
    dst = tmp_path / "ckpt"
    dst.mkdir()
    (dst / "old").write_text("1")
    _killed_child(tmp_path, dst, "between_renames")
    with atomic_path(dst, is_dir=True) as tmp:
        assert (dst / "old").read_text() == "1"  # put back before the write starts
        (tmp / "new").write_text("3")
    assert [p.name for p in dst.iterdir()] == ["new"]
    assert "restored" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")][0].endswith(".tmp")


def test_check_apart_compares_inodes_not_spellings(tmp_path):
    import os

    from bokehdiff_jax.io.atomic import check_apart

    (tmp_path / "out").mkdir()
    img = tmp_path / "out" / "img.png"
    img.write_bytes(b"x")
    os.link(img, tmp_path / "hard.png")
    (tmp_path / "sym.png").symlink_to(img)
    for spelling in (img, tmp_path / "out/../out/./img.png", tmp_path / "hard.png", tmp_path / "sym.png"):
        with pytest.raises(InputError, match="is the input"):
            check_apart(spelling, [img])
    with pytest.raises(InputError, match="folder holding the input"):
        check_apart(tmp_path / "out/../out", [tmp_path / "sym.png"])
    check_apart(tmp_path / "new.png", [img])  # absent: fine
    check_apart(tmp_path / "hard.png", [tmp_path / "out"])  # an output beside, not over, the input


def test_check_replaceable_needs_our_marker_and_nothing_foreign(tmp_path):
    import json

    from bokehdiff_jax.io.atomic import check_replaceable

    kw = {"marker": "m.json", "format": "fmt", "names": r"a\d\.png"}
    check_replaceable(tmp_path / "absent", **kw)
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", **kw)
    d = tmp_path / "d"
    d.mkdir()
    (d / "a1.png").write_text("a user's file named like an output")
    with pytest.raises(InputError, match="not an earlier"):
        check_replaceable(d, **kw)
    (d / "m.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(InputError, match="not an earlier"):
        check_replaceable(d, **kw)
    (d / "m.json").write_text(json.dumps({"format": "fmt"}))
    check_replaceable(d, **kw)
    (d / "notes.txt").write_text("added later")
    with pytest.raises(InputError, match=r"also holds other files \(notes\.txt\)"):
        check_replaceable(d, **kw)
    with pytest.raises(InputError, match="not a folder"):
        check_replaceable(d / "notes.txt", **kw)


def test_a_file_in_the_way_of_the_parent_folder_is_named(tmp_path):
    (tmp_path / "afile").write_text("x")
    for dst in (tmp_path / "afile" / "out.png", tmp_path / "afile" / "sub" / "out.png"):
        with pytest.raises(InputError, match=r"afile is a file, not a folder") as e:
            with atomic_path(dst):
                pass
        assert "File exists" not in str(e.value) and "Not a directory" not in str(e.value)
    assert (tmp_path / "afile").read_text() == "x"


def test_temporary_folder_is_removed_and_a_killed_ones_is_swept(tmp_path):
    import subprocess
    import sys

    from bokehdiff_jax.io.atomic import sweep_stale, temporary_folder

    with pytest.raises(RuntimeError):
        with temporary_folder(tmp_path, "scratch") as tmp:
            (tmp / "big").write_bytes(b"\0" * 100)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    code = (
        "import os, signal, sys\nfrom bokehdiff_jax.io.atomic import temporary_folder\n"
        "with temporary_folder(sys.argv[1], 'scratch'):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)]).returncode == -9
    assert len(list(tmp_path.iterdir())) == 1
    (tmp_path / "mine.txt").write_text("a user's file")
    assert len(sweep_stale(tmp_path)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
