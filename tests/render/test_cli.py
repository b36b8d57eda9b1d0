"""``bokehdiff-jax render`` end to end through the real dispatcher (bokehdiff_jax.cli.main)."""

import numpy as np
import pytest
from PIL import Image

from bokehdiff_jax import cli
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io import images as io


@pytest.fixture
def main(monkeypatch):
    # Only the render subcommand: the dispatcher builds every subparser, and this keeps the test
    # independent of the other subcommands' modules. The dispatch and error handling are the real ones.
    monkeypatch.setattr(cli, "COMMANDS", {"render": cli.COMMANDS["render"]})
    return lambda *argv: cli.main(["render", *map(str, argv)])


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "photo.png")
    disp = np.full((24, 32), 0.2, np.float32)
    disp[6:18, 8:24] = 0.8
    np.save(tmp_path / "disp.npy", disp)
    return tmp_path, img / 255.0, disp


def test_render_end_to_end(main, inputs, capsys):
    root, img, _ = inputs
    out = root / "out.png"
    rc = main(
        root / "photo.png",
        "--disparity",
        root / "disp.npy",
        "--focus-at",
        "16,12",
        "--strength",
        6,
        "--out",
        out,
    )
    assert rc == 0
    assert capsys.readouterr().out.strip() == str(out)
    result = io.read_image(out)
    assert result.shape == img.shape
    np.testing.assert_allclose(result[8:16, 10:22], img[8:16, 10:22], atol=2 / 255)  # in focus: sharp
    assert np.abs(result[:3] - img[:3]).mean() > 0.05  # background (CoC 3.6 px) blurred
    # A hexagonal aperture and the highlight boost change the render; --focus-box and default --out work.
    rc = main(
        root / "photo.png",
        "--disparity",
        root / "disp.npy",
        "--focus-box",
        "0,0,32,4",
        "--strength",
        6,
        "--aperture-blades",
        6,
        "--aperture-rotation",
        15,
        "--highlight-boost",
        1.0,
    )
    assert rc == 0
    other = io.read_image(root / "photo_bokeh.png")
    assert np.abs(other[:3] - img[:3]).mean() < 0.02  # focused on the background now
    assert np.abs(other[8:16, 10:22] - img[8:16, 10:22]).mean() > 0.05


def test_focal_stack_writes_images_and_contact_sheet(main, inputs, capsys):
    root, _, _ = inputs
    out = root / "stack"
    rc = main(
        root / "photo.png",
        "--disparity",
        root / "disp.npy",
        "--strength",
        5,
        "--focal-stack",
        3,
        "--out",
        out,
    )
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "contact_sheet.png",
        "focal_stack.json",  # the marker: proves the folder is a stack we wrote (and lists what)
        "focus_00_d0.200.png",
        "focus_01_d0.500.png",
        "focus_02_d0.800.png",
    ]
    sheet = io.read_image(out / "contact_sheet.png")
    assert sheet.shape[0] > 100 and sheet.shape[1] > 2 * 256  # 2 x 2 grid of 256 px tiles with labels
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_notes_go_to_stderr(main, inputs, capsys):
    root, _, disp = inputs
    d = disp * 50 + 10
    d[0, 0] = np.nan
    np.save(root / "depthish.npy", d)
    rc = main(
        root / "photo.png",
        "--disparity",
        root / "depthish.npy",
        "--normalize",
        "--focus",
        0.5,
        "--strength",
        2,
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "normalised disparity" in err and "filled 1 non-finite" in err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--focus", 0.5, "--strength", 4, "--disparity", "small.npy"], "must match"),
        (["--focus", 0.5, "--strength", 4, "--disparity", "big.npy"], "--normalize"),
        (["--strength", 4, "--disparity", "disp.npy"], "--focus"),
        (["--focus", 1.5, "--strength", 4, "--disparity", "disp.npy"], "[0, 1]"),
        (["--focus", 0.5, "--strength", 4, "--disparity", "disp.npy", "--focal-stack", 2], "drop --focus"),
        (["--focus", 0.5, "--strength", -1, "--disparity", "disp.npy"], "--strength"),
        (["--focus-at", "99,2", "--strength", 4, "--disparity", "disp.npy"], "outside"),
        (["--focus", 0.5, "--strength", 4, "--disparity", "disp.npy", "--aperture-blades", 2], "blades"),
        (["--focus", 0.5, "--strength", 4, "--disparity", "missing.npy"], "no such file"),
    ],
)
def test_errors_exit_2_with_one_line_and_no_output(main, inputs, capsys, extra, message):
    root, _, _ = inputs
    np.save(root / "small.npy", np.zeros((12, 16), np.float32))
    np.save(root / "big.npy", np.full((24, 32), 7.0, np.float32))
    extra = [root / e if str(e).endswith(".npy") else e for e in extra]
    before = set(root.iterdir())
    rc = main(root / "photo.png", *extra, "--out", root / "res.png")
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert set(root.iterdir()) == before  # nothing written, no temporaries


def test_bad_out_extension_and_stack_into_file(main, inputs, capsys):
    root, _, _ = inputs
    rc = main(
        root / "photo.png",
        "--disparity",
        root / "disp.npy",
        "--focus",
        0.5,
        "--strength",
        3,
        "--out",
        root / "x.tiff",
    )
    assert rc == 2
    rc = main(
        root / "photo.png",
        "--disparity",
        root / "disp.npy",
        "--strength",
        3,
        "--focal-stack",
        2,
        "--out",
        root / "x.png",
    )
    assert rc == 2
    assert not (root / "x.tiff").exists() and not (root / "x.png").exists()


def test_focal_stack_never_replaces_a_users_folder(main, inputs, capsys):
    root, _, _ = inputs
    args = [root / "photo.png", "--disparity", root / "disp.npy", "--strength", 3, "--focal-stack", 2]
    mine = root / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(*args, "--out", mine) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "notes.txt" in err[0]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    # An earlier stack (or an empty folder) is replaced whole.
    stack = root / "stack"
    assert main(*args, "--out", stack) == 0
    assert main(*args, "--out", stack, "--strength", 4) == 0
    assert len(list(stack.iterdir())) == 4  # 2 renders, the contact sheet, the marker


def test_outputs_get_the_umask_mode_and_unwritable_out_is_an_error(main, inputs, capsys):
    import os
    import stat

    root, _, _ = inputs
    args = [root / "photo.png", "--disparity", root / "disp.npy", "--focus", 0.5, "--strength", 3]
    old = os.umask(0o022)
    try:
        assert main(*args, "--out", root / "res.png") == 0
        assert main(*args[:3], "--strength", 3, "--focal-stack", 2, "--out", root / "st") == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((root / "res.png").stat().st_mode) == 0o644
    assert stat.S_IMODE((root / "st").stat().st_mode) == 0o755
    capsys.readouterr()
    blocker = root / "blocker"
    blocker.write_text("a file where a folder is needed")
    assert main(*args, "--out", blocker / "res.png") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot write") and not any("Traceback" in e for e in err)
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"sizes": "abc"}, "--sizes"),
        ({"sizes": "64,8"}, "16..8192"),
        ({"sizes": "64,100000"}, "16..8192"),
        ({"strength": 0.0}, "--strength"),
        ({"rays": 0}, "--rays"),
        ({"repeats": 0}, "--repeats"),
    ],
)
def test_bench_render_rejects_bad_flags_before_work(flags, message):
    import argparse

    from bokehdiff_jax.bench import render as bench_render

    parser = argparse.ArgumentParser()
    bench_render.add_arguments(parser)
    args = parser.parse_args([])
    assert bench_render._check_args(args) == [512, 1024]
    for k, v in flags.items():
        setattr(args, k, v)
    with pytest.raises(InputError, match=message):
        bench_render._check_args(args)


def test_depth_like_map_warns_and_flip_disparity_fixes_it(main, inputs, capsys):
    root, _, _ = inputs
    yy, xx = np.mgrid[0:24, 0:32]
    # Disparity of a typical photo: the subject (centre) and the ground (bottom) are near. Saved flipped.
    disp = np.clip(0.2 + 0.4 * yy / 24 + 0.4 * np.exp(-((yy - 12) ** 2 + (xx - 16) ** 2) / 40), 0, 1)
    np.save(root / "depth_like.npy", (1 - disp).astype(np.float32))
    args = [root / "photo.png", "--disparity", root / "depth_like.npy", "--focus", 0.5, "--strength", 2]
    assert main(*args, "--out", root / "a.png") == 0
    warnings = [e for e in capsys.readouterr().err.splitlines() if e.startswith("warning:")]
    assert len(warnings) == 1 and "looks flipped" in warnings[0] and "--flip-disparity" in warnings[0]
    assert main(*args, "--flip-disparity", "--out", root / "b.png") == 0
    err = capsys.readouterr().err
    assert "flipped disparity" in err and "warning" not in err
