"""DISTS: the torch-free reader of its weights file, and the JAX metric against a plain-torch DISTS
written here from the paper's definition with the same weights (VGG16 from the LPIPS cache, alpha/beta
read by torch itself from the dists-pytorch wheel kept in the cache)."""

from __future__ import annotations

import io
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.evaluate.dists import dists_distance, dists_params, l2_pool
from bokehdiff_jax.evaluate.dists_weights import (
    DISTS_CHANNELS,
    DISTS_MEMBER,
    DISTS_WHEEL,
    FETCH_HINT,
    dists_weights_path,
    load_dists_weights,
    read_legacy_torch_tensors,
)
from bokehdiff_jax.losses.lpips_weights import VGG16_BLOCKS


def test_legacy_reader_equals_what_torch_saved(tmp_path):
    g = torch.Generator().manual_seed(0)
    obj = {
        "a": torch.randn(1, 7, 1, 1, generator=g),
        "b": torch.randn(3, 4, generator=g).t(),  # non-contiguous: strides matter
        "nested": {"c": torch.arange(6, dtype=torch.float64).reshape(2, 3)},
    }
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    got = read_legacy_torch_tensors(buf.getvalue())
    assert sorted(got) == ["a", "b", "nested/c"]
    for k, t in {"a": obj["a"], "b": obj["b"], "nested/c": obj["nested"]["c"]}.items():
        np.testing.assert_array_equal(got[k], t.numpy())
        assert got[k].dtype == t.numpy().dtype


def test_legacy_reader_refuses_code_and_zip_files():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = b"".join(
        pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True})
    )
    with pytest.raises(InputError, match="refusing to unpickle global .*print"):
        read_legacy_torch_tensors(bad + pickle.dumps({"x": Evil()}, protocol=2))
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(2)}, buf)  # zip format
    with pytest.raises(InputError, match="zip-format"):
        read_legacy_torch_tensors(buf.getvalue())


@pytest.fixture(scope="module")
def alpha_beta() -> dict[str, torch.Tensor]:
    """alpha/beta as torch itself loads them from the verified wheel's weights.pt."""
    wheel = dists_weights_path().with_name(DISTS_WHEEL)
    if not wheel.is_file():
        pytest.fail(f"{wheel} missing: run {FETCH_HINT} --force")
    data = zipfile.ZipFile(wheel).read(DISTS_MEMBER)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def test_cached_weights_equal_torch_load_of_the_wheel(alpha_beta):
    cached = load_dists_weights()
    for k in ("alpha", "beta"):
        np.testing.assert_array_equal(cached[k], alpha_beta[k].numpy().reshape(-1))


class TorchDISTS(torch.nn.Module):
    """DISTS from the paper (Sec. 3), plain torch, NCHW images in [0, 1]."""

    def __init__(self, vgg: dict, alpha: torch.Tensor, beta: torch.Tensor):
        super().__init__()
        self.convs = {
            k: (
                torch.from_numpy(np.transpose(v["kernel"], (3, 2, 0, 1)).copy()),
                torch.from_numpy(v["bias"].copy()),
            )
            for k, v in vgg.items()
        }
        self.alpha, self.beta = alpha.reshape(-1), beta.reshape(-1)
        w = torch.tensor([0.5, 1.0, 0.5])
        self.blur = torch.outer(w, w) / torch.outer(w, w).sum()

    def l2pool(self, x):
        c = x.shape[1]
        k = self.blur[None, None].repeat(c, 1, 1, 1)
        return torch.sqrt(F.conv2d(x * x, k, stride=2, padding=1, groups=c) + 1e-12)

    def features(self, x):
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        h, out = (x - mean) / std, [x]
        for b, block in enumerate(VGG16_BLOCKS):
            if b:
                h = self.l2pool(h)
            for i in range(len(block)):
                w, bias = self.convs[f"conv{b + 1}_{i + 1}"]
                h = F.relu(F.conv2d(h, w, bias, padding=1))
            out.append(h)
        return out

    def forward(self, x, y):
        fx, fy = self.features(x), self.features(y)
        a = torch.split(self.alpha / (self.alpha.sum() + self.beta.sum()), list(DISTS_CHANNELS))
        b = torch.split(self.beta / (self.alpha.sum() + self.beta.sum()), list(DISTS_CHANNELS))
        total = 0.0
        for k in range(len(DISTS_CHANNELS)):
            mx, my = fx[k].mean((2, 3)), fy[k].mean((2, 3))
            vx = ((fx[k] - mx[..., None, None]) ** 2).mean((2, 3))
            vy = ((fy[k] - my[..., None, None]) ** 2).mean((2, 3))
            cxy = (fx[k] * fy[k]).mean((2, 3)) - mx * my
            t = (2 * mx * my + 1e-6) / (mx**2 + my**2 + 1e-6)
            s = (2 * cxy + 1e-6) / (vx + vy + 1e-6)
            total = total + (t * a[k]).sum(1) + (s * b[k]).sum(1)
        return 1 - total


def test_dists_matches_a_plain_torch_dists_on_the_same_weights(alpha_beta):
    params = dists_params()
    ref = TorchDISTS(params["vgg"], alpha_beta["alpha"], alpha_beta["beta"])
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:33, :40]
    x = 0.5 + 0.4 * np.sin(xx[..., None] / 4.0 + yy[..., None] / 6.0 + np.arange(3))
    x = np.stack([x, np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)]).astype(np.float32)
    y = np.clip(x * 0.7 + 0.1 + 0.05 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    fn, p = jax.jit(dists_distance), jax.tree.map(jnp.asarray, params)
    got = np.asarray(fn(p, x, y))
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.all(want > 0.05)  # a real distance, not ~0
    same = np.asarray(fn(p, x, x))
    np.testing.assert_allclose(same, 0.0, atol=1e-5)


def test_l2_pool_shape_and_value_on_a_constant():
    x = jnp.full((1, 9, 8, 2), 2.0)
    y = l2_pool(x)
    assert y.shape == (1, 5, 4, 2)
    # Interior: the full normalised window sees the constant, sqrt(4 * 1) = 2; a corner sees 9/16 of it.
    assert float(y[0, 2, 2, 0]) == pytest.approx(2.0, abs=1e-5)
    assert float(y[0, 0, 0, 0]) == pytest.approx(np.sqrt(4.0 * 9 / 16), abs=1e-5)
