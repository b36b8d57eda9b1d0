"""``cli.main`` turns bad input into one line ``error: ...`` and exit 2 for every subcommand, with nothing
written. Each case below once escaped as a traceback (a ValueError or OverflowError from deep inside)."""

import numpy as np
import pytest
from PIL import Image

from bokehdiff_jax import cli


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    np.save(tmp_path / "d.npy", np.full((12, 16), 0.5, np.float32))
    return tmp_path


CASES = {
    # float("inf") passed the old "X,Y" parser and failed converting to int (OverflowError).
    "render-focus-at-inf": ("render p.png --disparity d.npy --focus-at inf,3 --strength 2", "--focus-at"),
    "render-focus-box-nan": (
        "render p.png --disparity d.npy --focus-box 0,0,nan,4 --strength 2",
        "--focus-box",
    ),
    # SynthConfig's checks raised a plain ValueError from the demo (the synth command converted them);
    # now every number is range-checked by the parser, and the message names the flag.
    "demo-synth-size": ("demo --out demo --synth-size 15", "--synth-size: must be an integer in [16,"),
    "demo-rays-max": ("demo --out demo --rays-max 0", "--rays-max: must be an integer in [1,"),
    "synth-size": ("synth --fg . --bg . --out synth -n 1 --size 8", "--size: must be an integer in [16,"),
    "bench-pisa-impl": ("bench pisa --sizes 4 --impls nope --image 16 --repeats 1", "impl"),
    "convert-not-a-folder": ("convert from-diffusers p.png converted", "no such folder"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_exit_2(name, inputs, capsys, monkeypatch):
    argv, message = CASES[name]
    monkeypatch.chdir(inputs)
    before = sorted(p.name for p in inputs.iterdir())
    assert cli.main(argv.split()) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(p.name for p in inputs.iterdir()) == before  # nothing written
