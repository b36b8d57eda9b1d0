"""A fast smoke test of ``bokehdiff-jax demo`` with tiny settings (the model part trains the micro
config of tests/train for two steps instead of configs/tiny_cpu.py)."""

import json
import pathlib
import re

import pytest

import bokehdiff_jax.cli

MICRO = pathlib.Path(__file__).resolve().parents[1] / "train" / "micro_config.py"
# The micro config with a batch that divides the 8 fake devices of the test process (tests/conftest.py).
CONFIG = f"""
from bokehdiff_jax.train.config import load_config

def get_config():
    c = load_config({str(MICRO)!r})
    c.batch_size = 8
    return c
"""


def test_demo_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(bokehdiff_jax.cli, "COMMANDS", {"demo": bokehdiff_jax.cli.COMMANDS["demo"]})
    out = tmp_path / "demo"
    (tmp_path / "micro8.py").write_text(CONFIG)
    tiny = "--image-size 64 --stack 2 --strength 3 --synth-size 32 --samples 1 --rays-max 8 --procedural 1"
    model = f"--train-steps 2 --train-config {tmp_path / 'micro8.py'} --eval-count 1 --eval-size 16"
    argv = ["demo", "--out", str(out), *tiny.split(), *model.split()]
    assert bokehdiff_jax.cli.main(argv) == 0
    page = (out / "index.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) >= 2 + 2 + 4 + 3  # inputs, stack, one sample, synthesis inputs
    for src in srcs:
        assert (out / src).is_file(), src
    expected = (
        "motorcycle motorcycle_disparity stack_0 stack_1 sample_0_aif sample_0_bokeh sample_0_disparity "
        "loss model_stack_0 model_stack_1"
    )
    for name in expected.split():
        assert f"{name}.png" in srcs
    assert "filled from neighbours" in page
    # The model part: a training workdir with its checkpoint, the evaluation of four methods.
    assert (out / "train" / "checkpoints" / "2").is_dir() and (out / "train" / "metrics.jsonl").is_file()
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert set(summary["methods"]) == {"identity", "classical", "untrained", "trained"}
    assert "Trained vs untrained" in page and "cannot show" in page and 'href="eval/index.html"' in page
    run = json.loads((out / "demo.json").read_text())
    assert run["cpu_seconds"] > 0 and run["train_seconds"] > 0
    # atomic: no temporary folder left beside the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "micro8.py"]
    assert bokehdiff_jax.cli.main(argv[:3] + ["--stack", "0"]) == 2
    # --model inside the folder it would replace: refused before any work.
    assert bokehdiff_jax.cli.main(argv[:3] + ["--model", str(out / "train")]) == 2
    # Our marker proves the folder is an earlier demo; a file a user added to it is never deleted.
    assert json.loads((out / "demo.json").read_text())["format"] == "bokehdiff_jax.demo"
    (out / "my_notes.txt").write_text("keep me")
    assert bokehdiff_jax.cli.main(argv) == 2
    assert (out / "my_notes.txt").read_text() == "keep me" and (out / "index.html").read_text() == page


def test_demo_refuses_to_replace_a_file_or_a_users_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bokehdiff_jax.cli, "COMMANDS", {"demo": bokehdiff_jax.cli.COMMANDS["demo"]})
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    (tmp_path / "photo.png").write_bytes(b"keep me too")
    for out, message in ((mine, "thesis.tex"), (tmp_path / "photo.png", "not a folder")):
        assert bokehdiff_jax.cli.main(["demo", "--out", str(out)]) == 2  # refused before any work
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert (mine / "thesis.tex").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    assert (tmp_path / "photo.png").read_bytes() == b"keep me too"
    assert bokehdiff_jax.cli.main(["demo", "--out", str(tmp_path / "d"), "--strength", "nan"]) == 2
    assert "argument --strength: must be a finite number" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "photo.png"]
    # Named like a demo's files, but without our marker: a user's folder all the same.
    lookalike = tmp_path / "site"
    lookalike.mkdir()
    (lookalike / "index.html").write_text("<html>my homepage</html>")
    assert bokehdiff_jax.cli.main(["demo", "--out", str(lookalike)]) == 2
    assert "not an earlier demo" in capsys.readouterr().err
    assert (lookalike / "index.html").read_text() == "<html>my homepage</html>"


@pytest.mark.parametrize(
    "flag,value",
    [("--synth-size", 8), ("--rays-max", 0), ("--seed", -1), ("--stack", 100000), ("--image-size", 10**6),
     ("--samples", -1), ("--strength", "inf"), ("--procedural", 10**6), ("--train-steps", -1),
     ("--eval-count", 0), ("--eval-size", 8), ("--model", "no_such_model"), ("--train-config", "nope.py")],
)  # fmt: skip
def test_demo_numbers_are_range_checked_before_work(tmp_path, monkeypatch, capsys, flag, value):
    monkeypatch.setattr(bokehdiff_jax.cli, "COMMANDS", {"demo": bokehdiff_jax.cli.COMMANDS["demo"]})
    assert bokehdiff_jax.cli.main(["demo", "--out", str(tmp_path / "d"), flag, str(value)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and flag in err and "rays_min" not in err, err
    assert list(tmp_path.iterdir()) == []
