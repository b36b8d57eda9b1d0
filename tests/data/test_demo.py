"""A fast smoke test of ``bokehdiff-jax demo`` with tiny settings. The model part runs on a micro model's
workdir written by the trainer's checkpoint code (``--model``): the demo's own training run costs a
train-step compilation (about a minute of CPU even for the micro model), so the suite checks its config
and leaves the run to the demo itself."""

import json
import re
import shutil

import pytest
from pipeline_helpers import MICRO, write_workdir

import bokehdiff_jax.cli
from bokehdiff_jax import demo


def test_demo_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(bokehdiff_jax.cli, "COMMANDS", {"demo": bokehdiff_jax.cli.COMMANDS["demo"]})
    out = tmp_path / "demo"
    run, *_ = write_workdir(tmp_path / "run", "all")
    rows = [{"step": s, "loss": 1.0 / s, "mse": 0.5 / s, "edge": 0.2 / s} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny = "--image-size 64 --stack 2 --strength 3 --synth-size 32 --samples 1 --rays-max 8 --procedural 1"
    model = f"--model {run} --eval-count 1 --eval-size 16"
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
    # The model part: the workdir's model and its untrained start, evaluated beside identity and classical.
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert set(summary["methods"]) == {"identity", "classical", "untrained", "trained"}
    assert "Trained vs untrained" in page and "cannot show" in page and 'href="eval/index.html"' in page
    assert json.loads((out / "demo.json").read_text())["cpu_seconds"] > 0
    # atomic: no temporary folder left beside the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "run"]
    assert bokehdiff_jax.cli.main(argv[:3] + ["--stack", "0"]) == 2
    # --model inside the folder it would replace: refused before any work.
    shutil.copytree(run, out / "train")
    assert bokehdiff_jax.cli.main(argv[:3] + ["--model", str(out / "train")]) == 2
    shutil.rmtree(out / "train")
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


def test_demo_training_config(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    ns = parser.parse_args(["--train-steps", "7", "--train-config", str(MICRO)])
    config = demo._train_config(ns)
    assert (config.steps, config.checkpoint_every, config.image_every, config.log_every) == (7, 7, 0, 1)
    defaults = parser.parse_args([])
    assert defaults.train_steps == 120 and defaults.train_config.endswith("configs/tiny_cpu.py")
    assert demo._train_config(defaults).model.unet.block_out_channels == (32, 64, 64)  # tiny_cpu itself
    demo.plot_losses([{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}], tmp_path / "l.png", "t")
    assert (tmp_path / "l.png").stat().st_size > 1000
