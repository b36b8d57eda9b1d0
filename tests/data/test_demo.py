"""A fast smoke test of ``bokehdiff-jax demo`` with tiny settings."""

import re

import bokehdiff_jax.cli


def test_demo_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(bokehdiff_jax.cli, "COMMANDS", {"demo": bokehdiff_jax.cli.COMMANDS["demo"]})
    out = tmp_path / "demo"
    tiny = "--image-size 64 --stack 2 --strength 3 --synth-size 32 --samples 1 --rays-max 8 --procedural 1"
    argv = ["demo", "--out", str(out), *tiny.split()]
    assert bokehdiff_jax.cli.main(argv) == 0
    page = (out / "index.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) >= 2 + 2 + 4 + 3  # inputs, stack, one sample, synthesis inputs
    for src in srcs:
        assert (out / src).is_file(), src
    expected = (
        "motorcycle motorcycle_disparity stack_0 stack_1 sample_0_aif sample_0_bokeh sample_0_disparity"
    )
    for name in expected.split():
        assert f"{name}.png" in srcs
    assert "filled from neighbours" in page
    # atomic: no temporary folder left beside the output
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]
    assert bokehdiff_jax.cli.main(argv[:3] + ["--stack", "0"]) == 2


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
    assert capsys.readouterr().err.startswith("error: --samples, --procedural and --strength")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "photo.png"]
