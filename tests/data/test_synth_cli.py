"""``bokehdiff-jax synth`` end to end: outputs, resume, refusal of a different run, error exits."""

import json

import numpy as np
import pytest

import bokehdiff_jax.cli
from bokehdiff_jax.data.items import list_items, read_item


@pytest.fixture
def main(monkeypatch):
    # The real dispatcher, restricted to this command so unrelated subcommands are not imported.
    monkeypatch.setattr(bokehdiff_jax.cli, "COMMANDS", {"synth": bokehdiff_jax.cli.COMMANDS["synth"]})
    return bokehdiff_jax.cli.main


def _args(fg, bg, out, n, *extra):
    tiny = "--size 32 --log2-times -1 -1 --rays-max 8 --no-progress".split()
    return ["synth", "--fg", str(fg), "--bg", str(bg), "--out", str(out), "-n", str(n), *tiny, *extra]


def test_synth_writes_resumes_and_refuses_other_runs(main, input_dirs, tmp_path, capsys):
    fg, bg = input_dirs
    out = tmp_path / "out"
    assert main(_args(fg, bg, out, 2)) == 0
    items = list_items(out)
    assert [p.name for p in items] == ["000000", "000001"]
    meta = json.loads((items[0] / "meta.json").read_text())
    assert {"focus", "strength", "layers", "n_rays", "seed", "index"} <= set(meta)
    # Blur scales with the canvas (12 px at 768); released K = 12 times / max(d_f, 1 - d_f).
    assert meta["strength"] == pytest.approx(12.0 * 32 / 768 * 0.5 / max(meta["focus"], 1 - meta["focus"]))
    first = read_item(items[0])
    assert first["aif"].shape == (32, 32, 3) and first["disparity"].dtype == np.float32
    np.testing.assert_allclose(first["coc"], first["strength"] * np.abs(first["disparity"] - first["focus"]))
    mtime = (items[0] / "aif.png").stat().st_mtime_ns

    # An interrupted item leaves only a hidden temporary folder: ignored, and redone on resume.
    (out / "items" / ".000002.abc.tmp").mkdir()
    assert [p.name for p in list_items(out)] == ["000000", "000001"]
    capsys.readouterr()
    assert main(_args(fg, bg, out, 3)) == 0
    assert "resuming: 2 of 3" in capsys.readouterr().out
    assert [p.name for p in list_items(out)] == ["000000", "000001", "000002"]
    assert (items[0] / "aif.png").stat().st_mtime_ns == mtime  # finished items are not rewritten

    # Resume gives exactly what a fresh run gives.
    fresh = tmp_path / "fresh"
    assert main(_args(fg, bg, fresh, 3)) == 0
    for a, b in zip(list_items(out), list_items(fresh), strict=True):
        x, y = read_item(a), read_item(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])

    # Worker processes write the same items.
    par = tmp_path / "par"
    assert main(_args(fg, bg, par, 3, "--workers", "2")) == 0
    for a, b in zip(list_items(par), list_items(fresh), strict=True):
        x, y = read_item(a), read_item(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
        assert (a / "meta.json").read_bytes() == (b / "meta.json").read_bytes()  # whatever --workers

    # A different run into the same folder is refused with a one-line error and status 2.
    assert main(_args(fg, bg, out, 3, "--seed", "5")) == 2
    assert "different synth run" in capsys.readouterr().err


def test_synth_error_exits(main, input_dirs, tmp_path, capsys):
    fg, bg = input_dirs
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_args(empty, bg, tmp_path / "o1", 1)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no usable foreground") and err.count("\n") == 1
    assert main(_args(fg, tmp_path / "nope", tmp_path / "o2", 1)) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(_args(fg, bg, tmp_path / "o3", 0)) == 2
    capsys.readouterr()
    (tmp_path / "afile").write_text("x")
    assert main(_args(fg, bg, tmp_path / "afile", 1)) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(_args(fg, bg, tmp_path / "afile" / "sub", 1)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot create") and err.count("\n") == 1
    assert (tmp_path / "afile").read_text() == "x"
    # Settings the renderer would reject mid-run are refused up front, before anything is written.
    assert main(_args(fg, bg, tmp_path / "o4", 1, "--rays-max", "0")) == 2
    err = capsys.readouterr().err  # in the user's terms: flags, not SynthConfig's field names
    assert "--rays-max: must be an integer in [1, 65536]" in err and "rays_min" not in err
    assert not (tmp_path / "o4").exists()
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3" / "items").exists()


# ------------------------------------------------------------------------------- issue 11
def test_resume_redoes_incomplete_items_and_agrees_with_list_items(main, input_dirs, tmp_path, capsys):
    from bokehdiff_jax.data.items import ITEM_FILES, item_complete

    fg, bg = input_dirs
    out = tmp_path / "out"
    assert main(_args(fg, bg, out, 3)) == 0
    (out / "items" / "000001" / "bokeh.png").unlink()  # a file lost
    for f in ITEM_FILES:  # an empty item folder
        (out / "items" / "000002" / f).unlink()
    assert [p.name for p in list_items(out)] == ["000000"]
    assert not item_complete(out / "items" / "000001")
    capsys.readouterr()
    assert main(_args(fg, bg, out, 3)) == 0
    assert "resuming: 1 of 3" in capsys.readouterr().out
    assert [p.name for p in list_items(out)] == ["000000", "000001", "000002"]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '"text"', '{"config": 3}'])
def test_an_invalid_synth_json_is_one_error_line(main, input_dirs, tmp_path, capsys, content):
    fg, bg = input_dirs
    out = tmp_path / "out"
    out.mkdir()
    (out / "synth.json").write_text(content)
    capsys.readouterr()
    assert main(_args(fg, bg, out, 1)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "synth.json" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["synth.json"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--log2-times", "40", "40"],
        ["--log2-times", "2", "1"],
        ["--seed", "-1"],
        ["--size", "100000"],
        ["--fg-count", "0", "2"],
        ["-n", "0"],
        ["--workers", "-1"],
    ],
)
def test_out_of_range_options_fail_before_anything_is_written(main, input_dirs, tmp_path, capsys, extra):
    fg, bg = input_dirs
    capsys.readouterr()
    assert main(_args(fg, bg, tmp_path / "out", 1) + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_synth_never_writes_into_a_users_folder_or_its_inputs(main, input_dirs, tmp_path, capsys):
    fg, bg = input_dirs
    users = tmp_path / "users"
    users.mkdir()
    (users / "report.txt").write_text("my report")
    before = {p: p.read_bytes() for p in [*fg.iterdir(), *bg.iterdir()]}
    for out in (users, fg, fg.parent):
        capsys.readouterr()
        assert main(_args(fg, bg, out, 1)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert (users / "report.txt").read_text() == "my report" and sorted(users.iterdir()) == [
        users / "report.txt"
    ]
    assert {p: p.read_bytes() for p in [*fg.iterdir(), *bg.iterdir()]} == before
    (tmp_path / "empty").mkdir()
    assert main(_args(fg, bg, tmp_path / "empty", 1)) == 0  # an empty folder is fine


def test_stale_item_temporaries_are_removed_and_reported(main, input_dirs, tmp_path, capsys):
    import subprocess
    import sys

    from bokehdiff_jax.io import atomic

    fg, bg = input_dirs
    out = tmp_path / "out"
    assert main(_args(fg, bg, out, 1)) == 0
    pid = int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout
    )
    stale = out / "items" / f".000001.bdj{pid}-{atomic._HOST}.abcd1234.tmp"
    stale.mkdir()
    (stale / "aif.png").write_bytes(b"half")
    capsys.readouterr()
    assert main(_args(fg, bg, out, 2)) == 0
    assert "interrupted" in capsys.readouterr().err and not stale.exists()
    assert [p.name for p in (out / "items").iterdir()] == ["000000", "000001"]


def test_synth_ray_bounds(main, input_dirs, tmp_path, capsys):
    # --rays-min = --rays-max forces the ray count everywhere (e.g. an 8192-ray reference); the count
    # is of aperture cells: a 2 x 2 grid's 4 cells all meet the disc.
    fg, bg = input_dirs
    out = tmp_path / "fixed"
    assert main(_args(fg, bg, out, 1, "--rays-min", "4", "--rays-max", "4")) == 0
    meta = json.loads((list_items(out)[0] / "meta.json").read_text())
    assert meta["n_rays"] == meta["rays_mean"] == 4
    assert json.loads((out / "synth.json").read_text())["config"]["rays_min"] == 4
    assert main(_args(fg, bg, tmp_path / "bad", 1, "--rays-min", "9", "--rays-max", "8")) == 2
    assert "--rays-max 8 is below" in capsys.readouterr().err
