"""``bokehdiff-jax render --model`` and folder mode (``render DIR --disparity-dir DIR2 --out DIR3``),
through the real dispatcher: the diffusion method renders what ``OneStep`` renders, a folder resumes
after an interruption, and bad combinations are one-line errors before any work."""

import json

import numpy as np
import pytest
from PIL import Image
from pipeline_helpers import write_workdir

from bokehdiff_jax import cli
from bokehdiff_jax.io import images as io


@pytest.fixture
def main(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"render": cli.COMMANDS["render"]})
    return lambda *argv: cli.main(["render", *map(str, argv)])


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("scene")
    rng = np.random.default_rng(0)
    (root / "photos").mkdir()
    (root / "disps").mkdir()
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(
            root / "photos" / f"{name}.png"
        )
        disp = np.full((16, 24), 0.2, np.float32)
        disp[4:12, 6:18] = rng.uniform(0.5, 0.9)
        np.save(root / "disps" / f"{name}.npy", disp)
    workdir, *_ = write_workdir(root / "run", "all")
    return root, workdir


def test_render_with_a_model_equals_onestep(main, scene, capsys):
    from bokehdiff_jax.pipeline import OneStep

    root, workdir = scene
    photo, disp = root / "photos" / "a.png", root / "disps" / "a.npy"
    out = root / "a_model.png"
    args = (photo, "--disparity", disp, "--focus", 0.6, "--strength", 5)
    assert main(*args, "--model", workdir, "--out", out) == 0
    assert "note: model" in capsys.readouterr().err
    expected = OneStep.from_checkpoint(workdir).render(io.read_image(photo), np.load(disp), 0.6, 5.0)
    np.testing.assert_allclose(io.read_image(out), expected, atol=1.5 / 255)
    assert main(*args, "--out", root / "a_classical.png") == 0  # without --model: the classical renderer
    assert np.abs(io.read_image(root / "a_classical.png") - io.read_image(out)).max() > 0.05


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--method", "diffusion"], "needs --model"),
        (["--method", "classical", "--model", "x"], "for --method diffusion"),
        (["--model", "x", "--aperture-blades", 6], "--aperture-blades: options of the classical"),
        (["--model", "no_such_model"], "no such file"),
    ],
)
def test_bad_model_options_are_one_line_errors(main, scene, capsys, extra, message):
    root, _ = scene
    rc = main(root / "photos" / "a.png", "--disparity", root / "disps" / "a.npy", "--focus", 0.5,
              "--strength", 3, "--out", root / "x.png", *extra)  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and message in err[-1], err
    assert not (root / "x.png").exists()


def test_folder_mode_resumes_and_guards_its_folder(main, scene, capsys):
    root, workdir = scene
    out = root / "renders"
    base = (
        root / "photos",
        "--disparity-dir",
        root / "disps",
        "--out",
        out,
        "--focus-at",
        "12,8",
        "--strength",
        4,
    )
    assert main(*base) == 0  # classical
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "render_folder.json"]
    assert "2 rendered, 0 already there" in capsys.readouterr().out
    first = io.read_image(out / "b.png")
    (out / "a.png").unlink()  # as if interrupted after b
    assert main(*base) == 0
    assert "1 rendered, 1 already there" in capsys.readouterr().out
    np.testing.assert_array_equal(io.read_image(out / "b.png"), first)  # not redone
    # Other settings into the same folder, a file of the user's there, a missing map: refused.
    assert main(*base[:-1], 9) == 2
    assert "other settings (strength)" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    assert main(*base) == 2 and "notes.txt" in capsys.readouterr().err
    (out / "notes.txt").unlink()
    (root / "photos" / "c.png").write_bytes((root / "photos" / "a.png").read_bytes())
    try:
        assert main(*base) == 2 and "no disparity map for 1 image(s): c" in capsys.readouterr().err
    finally:
        (root / "photos" / "c.png").unlink()
    assert main(root / "photos", "--disparity", root / "disps" / "a.npy", "--strength", 3) == 2

    # The model, focal stacks per image: one folder each, with the stack's marker.
    stacks = root / "stacks"
    args = (root / "photos", "--disparity-dir", root / "disps", "--out", stacks, "--strength", 4)
    assert main(*args, "--model", workdir, "--focal-stack", 3, "--batch", 3) == 0
    marker = json.loads((stacks / "a" / "focal_stack.json").read_text())
    assert len(marker["focus"]) == 3 and marker["strength"] == 4
    assert (
        len(list((stacks / "b").glob("focus_*.png"))) == 3 and (stacks / "b" / "contact_sheet.png").is_file()
    )
    settings = json.loads((stacks / "render_folder.json").read_text())["settings"]
    assert settings["method"] == "diffusion" and settings["model"] == str(workdir.resolve())
