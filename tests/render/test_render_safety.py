"""``render`` never loses a user's file, refuses every bad number before work, and says what is wrong
in the user's terms (issue 11)."""

import os

import numpy as np
import pytest
from PIL import Image

from bokehdiff_jax import cli
from bokehdiff_jax.io import images as io


@pytest.fixture
def main(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", {"render": cli.COMMANDS["render"]})

    def run(*argv):
        capsys.readouterr()
        rc = cli.main(["render", *map(str, argv)])
        return rc, capsys.readouterr().err

    return run


@pytest.fixture
def root(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    disp = np.full((24, 32), 0.2, np.float32)
    disp[6:18, 8:24] = 0.8
    np.save(tmp_path / "disp.npy", disp)
    Image.fromarray((disp * 255).astype(np.uint8)).save(tmp_path / "disp.png")
    return tmp_path


def _snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _one_error_line(rc, err, *fragments):
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, err


def test_out_never_replaces_an_input(main, root):
    (root / "out").mkdir()
    os.replace(root / "photo.png", root / "out" / "img.png")
    os.link(root / "out" / "img.png", root / "hard.png")
    (root / "sym.png").symlink_to(root / "out" / "img.png")
    before = _snapshot(root)
    args = ["--disparity", root / "disp.png", "--focus", 0.5, "--strength", 3]
    for out in (
        root / "out" / "img.png",
        root / "out/../out/./img.png",
        root / "hard.png",
        root / "sym.png",
        root / "disp.png",  # the disparity map
    ):
        _one_error_line(*main(root / "out" / "img.png", *args, "--out", out), "is the input")
    assert _snapshot(root) == before


def test_focal_stack_never_deletes_its_sources(main, root):
    stack = root / "stack"
    stack.mkdir()
    os.replace(root / "photo.png", stack / "contact_sheet.png")  # sources named like stack outputs
    os.replace(root / "disp.png", stack / "focus_00_d0.500.png")
    before = _snapshot(root)
    rc, err = main(
        stack / "contact_sheet.png", "--disparity", stack / "focus_00_d0.500.png", "--strength", 3,
        "--focal-stack", 2, "--out", stack,
    )  # fmt: skip
    _one_error_line(rc, err)
    assert "holding the input" in err or "not an earlier" in err
    # Named like outputs, but without our marker: still not ours.
    (root / "p2.png").write_bytes((stack / "contact_sheet.png").read_bytes())
    before = _snapshot(root)
    rc, err = main(
        root / "p2.png", "--disparity", root / "disp.npy", "--strength", 3, "--focal-stack", 2, "--out", stack
    )
    _one_error_line(rc, err, "not an earlier")
    assert _snapshot(root) == before
    # A real earlier stack whose image is used as the input: replacing the stack would delete it.
    good = root / "good"
    assert main(stack / "contact_sheet.png", "--disparity", root / "disp.npy", "--strength", 3,
                "--focal-stack", 2, "--out", good)[0] == 0  # fmt: skip
    source = sorted(good.glob("focus_*.png"))[0]
    rc, err = main(
        source, "--disparity", root / "disp.npy", "--strength", 3, "--focal-stack", 2, "--out", good
    )
    _one_error_line(rc, err, "holding the input")
    assert source.is_file()


def test_an_existing_file_not_written_by_render_is_not_replaced(main, root):
    (root / "holiday.png").write_bytes((root / "photo.png").read_bytes())
    before = (root / "holiday.png").read_bytes()
    args = [root / "photo.png", "--disparity", root / "disp.npy", "--focus", 0.5, "--strength", 3]
    _one_error_line(*main(*args, "--out", root / "holiday.png"), "not written by bokehdiff-jax")
    assert (root / "holiday.png").read_bytes() == before
    for name in ("res.png", "res.jpg", "res.png"):  # our own earlier output is replaced
        assert main(*args, "--out", root / name)[0] == 0
    assert io.written_by_us(root / "res.jpg") and not io.written_by_us(root / "holiday.png")


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--aperture-rotation", "nan"], "--aperture-rotation"),
        (["--aperture-rotation", "inf"], "--aperture-rotation"),
        (["--highlight-boost", "inf"], "--highlight-boost"),
        (["--highlight-boost", "nan"], "--highlight-boost"),
        (["--highlight-threshold", "nan"], "--highlight-threshold"),
        (["--gamma", "inf"], "--gamma"),
        (["--strength", "inf"], "--strength"),
        (["--layers", "100000"], "--layers"),
        (["--max-radius", "100000"], "--max-radius"),
        (["--aperture-blades", "100000"], "--aperture-blades"),
        (["--focus", "nan"], "--focus"),
    ],
)
def test_every_number_is_range_checked_before_work(main, root, extra, fragment):
    before = _snapshot(root)
    rc, err = main(root / "photo.png", "--disparity", root / "disp.npy", "--focus-at", "4,4", "--strength", 3,
                   *extra, "--out", root / "res.png")  # fmt: skip
    _one_error_line(rc, err, fragment)
    assert _snapshot(root) == before


def test_focal_stack_size_is_bounded(main, root):
    rc, err = main(
        root / "photo.png", "--disparity", root / "disp.npy", "--strength", 3, "--focal-stack", "100000"
    )
    _one_error_line(rc, err, "--focal-stack")


def test_focal_stack_names_are_zero_padded_to_the_stack_size():
    from bokehdiff_jax.commands.render import stack_image_name

    names = [stack_image_name(i, 150, 0.25) for i in range(150)]
    assert sorted(names) == names and names[7] == "focus_007_d0.250.png"
    assert stack_image_name(3, 5, 0.5) == "focus_03_d0.500.png"


def test_messages_in_the_users_terms(main, root):
    args = [root / "photo.png", "--disparity", root / "disp.npy", "--strength", 3]
    # A negative coordinate is a value, not an option: the error says where it lies.
    _one_error_line(*main(*args, "--focus-at", "-1,10"), "outside")
    _one_error_line(*main(*args, "--focus-box", "20,4,10,8"), "empty or inverted")
    _one_error_line(*main(*args, "--focus-box", "10,4,10,8"), "empty or inverted")
    (root / "folder.png").mkdir()
    _one_error_line(*main(root / "folder.png", *args[1:], "--focus", 0.5), "is a folder")


def test_output_writability_is_checked_before_rendering(main, root, monkeypatch):
    import bokehdiff_jax.render.scatter as scatter

    def never(*a, **k):
        raise AssertionError("rendered although the output cannot be written")

    monkeypatch.setattr(scatter, "render_scatter", never)
    (root / "blocker").write_text("a file where a folder is needed")
    args = [root / "photo.png", "--disparity", root / "disp.npy", "--focus", 0.5, "--strength", 3]
    _one_error_line(*main(*args, "--out", root / "blocker" / "res.png"), "blocker is a file, not a folder")


def test_a_one_row_image_renders(main, root):
    # (1-column maps are read the same way: tests/io/test_images.py)
    for shape in ((1, 32),):
        Image.fromarray(np.full((*shape, 3), 128, np.uint8)).save(root / "thin.png")
        np.save(root / "thin.npy", np.linspace(0, 1, shape[0] * shape[1]).reshape(shape))
        rc, err = main(root / "thin.png", "--disparity", root / "thin.npy", "--focus", 0.5, "--strength", 2,
                       "--out", root / "thin_out.png")  # fmt: skip
        assert rc == 0, err
        assert io.read_image(root / "thin_out.png").shape == (*shape, 3)
