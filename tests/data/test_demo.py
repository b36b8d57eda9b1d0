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
