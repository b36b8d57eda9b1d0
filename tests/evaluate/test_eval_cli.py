"""``bokehdiff-jax evaluate`` end to end on tiny folders: scores, outputs, robustness, refusals."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from eval_fixtures import write_ebb
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from bokehdiff_jax.cli import main
from bokehdiff_jax.evaluate.sources import EbbSource
from bokehdiff_jax.io.images import read_image, to_uint8


def _rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_pred_target_folders(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "p").mkdir()
    (tmp_path / "t").mkdir()
    for name in ("a", "b", "c"):
        t = rng.random((20, 24, 3))
        Image.fromarray(to_uint8(t)).save(tmp_path / "t" / f"{name}.png")
        Image.fromarray(to_uint8(np.clip(t + 0.1 * rng.standard_normal(t.shape), 0, 1))).save(
            tmp_path / "p" / f"{name}.png"
        )
    out = tmp_path / "out"
    argv = ["evaluate", "--pred", str(tmp_path / "p"), "--target", str(tmp_path / "t"), "--out", str(out)]
    assert main(argv + ["--metrics", "psnr,ssim", "--worst", "2", "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    want = []
    for name in ("a", "b", "c"):
        p, t = read_image(tmp_path / "p" / f"{name}.png"), read_image(tmp_path / "t" / f"{name}.png")
        want.append(
            (
                peak_signal_noise_ratio(t, p, data_range=1),
                structural_similarity(t, p, channel_axis=-1, data_range=1, gaussian_weights=True,
                                      sigma=1.5, use_sample_covariance=False),
            )
        )  # fmt: skip
    assert s["count"] == 3
    assert s["metrics"]["psnr"] == pytest.approx(np.mean([w[0] for w in want]), abs=1e-6)
    assert s["metrics"]["ssim"] == pytest.approx(np.mean([w[1] for w in want]), abs=1e-6)
    assert [r["name"] for r in _rows(out / "per_image.csv")] == ["a", "b", "c"]
    page = (out / "index.html").read_text()
    thumbs = re.findall(r'src="(report/[^"]+)"', page)
    assert len(thumbs) == 2 * 3 and all((out / t).is_file() for t in thumbs)  # 2 worst x (pred, ref, error)


def test_data_methods_robustness_and_outputs(tmp_path):
    write_ebb(tmp_path / "ebb", ids=("0", "1"), hw=(32, 40))
    out = tmp_path / "out"
    argv = [
        "evaluate", "--data", f"ebb:{tmp_path / 'ebb'}", "--params", str(tmp_path / "ebb" / "params.json"),
        "--method", "identity", "--method", "blur=classical", "--metrics", "psnr,lpips",
        "--robustness", "--robustness-ks", "-2,0,2", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["count"] == 2 and list(s["methods"]) == ["identity", "blur"]
    assert s["methods"]["blur"]["spec"] == "classical" and "metrics" not in s  # two methods: per method only
    rows = _rows(out / "per_image.csv")
    assert len(rows) == 4
    src = EbbSource(tmp_path / "ebb", params=tmp_path / "ebb" / "params.json")
    ex = src[0]
    # identity's prediction is the (exposure-aligned) input as 8 bit; its PSNR is scored against the 8-bit
    # reference, as a saved file would be.
    pred = read_image(out / "pred" / "identity" / "ebb_0.png")
    np.testing.assert_array_equal(pred, to_uint8(ex.image) / np.float32(255))
    row = next(r for r in rows if r["name"] == "ebb_0" and r["method"] == "identity")
    assert float(row["psnr"]) == pytest.approx(
        peak_signal_noise_ratio(to_uint8(ex.target) / 255.0, pred, data_range=1), rel=1e-5
    )
    blur = read_image(out / "pred" / "blur" / "ebb_0.png")
    assert np.abs(blur - pred).mean() > 1e-3  # the classical renderer did blur
    rob = _rows(out / "robustness.csv")
    assert len(rob) == 2 * 3 * 2  # methods x ks x metrics
    k0 = next(r for r in rob if r["method"] == "identity" and r["k"] == "0" and r["metric"] == "psnr")
    assert float(k0["mean"]) == pytest.approx(s["methods"]["identity"]["metrics"]["psnr"], rel=1e-5)
    assert (out / "robustness.png").stat().st_size > 1000
    page = (out / "index.html").read_text()
    assert "robustness.png" in page
    assert any(f"report/ebb_{i}_blur.jpg" in page for i in "01")
    # An earlier output of this command may be replaced.
    assert main(argv[:-3] + ["--metrics", "psnr", "--out", str(out), "--no-progress"]) == 0
    assert "lpips" not in json.loads((out / "summary.json").read_text())["methods"]["identity"]["metrics"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "heldout"], "at least one --method"),
        (["--pred", "a"], "go together"),
        (["--data", "heldout", "--pred", "a", "--target", "b", "--method", "identity"], "either"),
        (["--data", "heldout", "--method", "bogus"], "expected [LABEL=]identity"),
        (
            ["--data", "heldout", "--method", "a=identity", "--method", "a=classical", "--count", "1"],
            "distinct",
        ),
        (["--data", "heldout", "--method", "identity", "--metrics", "psnr,fid"], "psnr, ssim, lpips, dists"),
    ],
)
def test_usage_errors_exit_2(tmp_path, capsys, args, message):
    assert main(["evaluate", *args, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "o").exists()


def test_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["evaluate", "--data", "heldout", "--method", "identity", "--out", str(out)]) == 2
    assert "no summary.json of ours" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep"


def test_model_method_without_a_checkpoint_is_one_error_line(tmp_path, capsys):
    argv = [
        "evaluate",
        "--data",
        "heldout",
        "--method",
        f"model:{tmp_path / 'missing'}",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ")
