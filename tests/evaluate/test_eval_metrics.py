"""PSNR and SSIM against scikit-image on the same images; the Scorer's LPIPS against the loss module's."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.evaluate.metrics import PSNR_CAP, Scorer, SSIMConfig, psnr, ssim


def _pair(seed: int, shape=(37, 45, 3)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # A smooth image and a noisy, blurred-ish copy: realistic SSIM values, not ~0 or ~1.
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    base = 0.5 + 0.4 * np.sin(xx[..., None] / 5.0 + yy[..., None] / 7.0 + np.arange(3))
    target = np.clip(base + 0.05 * rng.standard_normal(shape), 0, 1)
    pred = np.clip(0.8 * target + 0.1 + 0.08 * rng.standard_normal(shape), 0, 1)
    return pred, target


@pytest.mark.parametrize("seed", [0, 1])
def test_psnr_equals_scikit_image(seed):
    pred, target = _pair(seed)
    assert psnr(pred, target) == pytest.approx(
        peak_signal_noise_ratio(target, pred, data_range=1.0), abs=1e-10
    )


def test_psnr_of_identical_images_is_capped():
    _, target = _pair(0)
    assert psnr(target, target) == PSNR_CAP


@pytest.mark.parametrize("seed", [0, 3])
def test_ssim_wang_equals_scikit_image(seed):
    pred, target = _pair(seed)
    ref = structural_similarity(
        target,
        pred,
        channel_axis=-1,
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert 0.2 < ref < 0.95  # a discriminating pair
    assert ssim(pred, target) == pytest.approx(ref, abs=1e-10)


def test_ssim_uniform_window_equals_scikit_image_default():
    pred, target = _pair(5, shape=(20, 31, 3))
    ref = structural_similarity(target, pred, channel_axis=-1, data_range=1.0)
    assert ssim(pred, target, SSIMConfig(gaussian=False)) == pytest.approx(ref, abs=1e-10)


def test_ssim_rejects_images_smaller_than_the_window():
    pred, target = _pair(0, shape=(9, 40, 3))
    with pytest.raises(InputError, match="at least 11 x 11"):
        ssim(pred, target)


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(InputError, match="one size"):
        psnr(np.zeros((8, 8, 3)), np.zeros((8, 9, 3)))


def test_scorer_lpips_equals_a_plain_torch_lpips_on_images_mapped_to_minus1_1():
    import torch

    from bokehdiff_jax.torch.lpips import LPIPSVGG

    pred, target = _pair(2, shape=(32, 40, 3))
    scorer = Scorer(["lpips", "psnr"])
    got = scorer(pred, target)
    nchw = lambda x: torch.from_numpy(np.asarray(x, np.float32)).permute(2, 0, 1)[None] * 2 - 1
    with torch.no_grad():
        want = float(LPIPSVGG.from_cache()(nchw(pred), nchw(target))[0])
    assert got["lpips"] == pytest.approx(want, rel=1e-4)
    assert got["lpips"] > 0.01
    assert list(got) == ["lpips", "psnr"]
    assert scorer(target, target)["lpips"] == pytest.approx(0.0, abs=1e-6)


def test_scorer_rejects_unknown_metrics():
    with pytest.raises(InputError, match="psnr, ssim, lpips, dists"):
        Scorer(["psnr", "fid"])
