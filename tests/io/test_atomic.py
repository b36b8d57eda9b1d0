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
