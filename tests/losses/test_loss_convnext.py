"""ConvNeXt-base in Flax vs a plain-torch ConvNeXt written here with timm's parameter names (timm itself
cannot be imported: it needs torchvision), on random weights of the real convnext_base shapes, through
the strict safetensors converter; and the converter's refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.safetensors_io import save_dict
from bokehdiff_jax.losses import AdversarialConfig, backbone_channels, generator_loss, init_discriminator
from bokehdiff_jax.losses.adversarial import backbone_features
from bokehdiff_jax.losses.convnext import ConvNeXt, ConvNeXtConfig, convnext_from_timm

BASE = ConvNeXtConfig.base()
SMALL = ConvNeXtConfig(depths=(1, 1, 2, 1), dims=(16, 32, 64, 96))


def timm_state_dict(config: ConvNeXtConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under timm's ConvNeXt names and shapes, every one moved off its init (layer scale
    ``gamma`` of order 0.3, not timm's 1e-6, so every block changes the output), plus a classifier
    head that the converter must ignore."""
    rng = np.random.default_rng(seed)

    def rnd(*shape: int, scale: float, mean: float = 0.0) -> torch.Tensor:
        return torch.from_numpy((mean + scale * rng.standard_normal(shape, np.float32)).astype(np.float32))

    sd: dict[str, torch.Tensor] = {}

    def norm(name: str, c: int) -> None:
        sd[f"{name}.weight"], sd[f"{name}.bias"] = rnd(c, scale=0.1, mean=1.0), rnd(c, scale=0.1)

    dims = config.dims
    sd["stem.0.weight"], sd["stem.0.bias"] = rnd(dims[0], 3, 4, 4, scale=0.2), rnd(dims[0], scale=0.1)
    norm("stem.1", dims[0])
    for s, (depth, c) in enumerate(zip(config.depths, dims, strict=True)):
        if s > 0:
            norm(f"stages.{s}.downsample.0", dims[s - 1])
            sd[f"stages.{s}.downsample.1.weight"] = rnd(c, dims[s - 1], 2, 2, scale=(4 * dims[s - 1]) ** -0.5)
            sd[f"stages.{s}.downsample.1.bias"] = rnd(c, scale=0.1)
        for b in range(depth):
            p = f"stages.{s}.blocks.{b}"
            sd[f"{p}.conv_dw.weight"], sd[f"{p}.conv_dw.bias"] = (
                rnd(c, 1, 7, 7, scale=1 / 7),
                rnd(c, scale=0.1),
            )
            norm(f"{p}.norm", c)
            sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"] = (
                rnd(4 * c, c, scale=c**-0.5),
                rnd(4 * c, scale=0.1),
            )
            sd[f"{p}.mlp.fc2.weight"] = rnd(c, 4 * c, scale=(4 * c) ** -0.5)
            sd[f"{p}.mlp.fc2.bias"] = rnd(c, scale=0.1)
            sd[f"{p}.gamma"] = rnd(c, scale=0.3)
    norm("head.norm", dims[-1])
    sd["head.fc.weight"], sd["head.fc.bias"] = rnd(16, dims[-1], scale=0.01), rnd(16, scale=0.01)
    return sd


def torch_forward_features(
    sd: dict[str, torch.Tensor], config: ConvNeXtConfig, x_nchw: torch.Tensor
) -> torch.Tensor:
    """ConvNeXt ``forward_features`` as the paper describes it: patchify stem + LayerNorm over channels;
    per stage a LayerNorm + 2x2/2 conv downsample (not the first), then residual blocks
    ``x + gamma * fc2(gelu(fc1(LN(dw7x7(x)))))``."""

    def ln_channels(x: torch.Tensor, name: str) -> torch.Tensor:  # LayerNorm2d: over C of NCHW
        y = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-6)
        return y.permute(0, 3, 1, 2)

    x = F.conv2d(x_nchw, sd["stem.0.weight"], sd["stem.0.bias"], stride=4)
    x = ln_channels(x, "stem.1")
    for s, (depth, c) in enumerate(zip(config.depths, config.dims, strict=True)):
        if s > 0:
            x = ln_channels(x, f"stages.{s}.downsample.0")
            x = F.conv2d(
                x, sd[f"stages.{s}.downsample.1.weight"], sd[f"stages.{s}.downsample.1.bias"], stride=2
            )
        for b in range(depth):
            p = f"stages.{s}.blocks.{b}"
            y = F.conv2d(x, sd[f"{p}.conv_dw.weight"], sd[f"{p}.conv_dw.bias"], padding=3, groups=c)
            y = y.permute(0, 2, 3, 1)
            y = F.layer_norm(y, (c,), sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"], 1e-6)
            y = F.linear(y, sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"])
            y = F.gelu(y)
            y = F.linear(y, sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])
            x = x + (y * sd[f"{p}.gamma"]).permute(0, 3, 1, 2)
    return x


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """convnext_base-shaped random weights written as a timm safetensors file and converted from it."""
    sd = timm_state_dict(BASE, 0)
    path = tmp_path_factory.mktemp("convnext") / "model.safetensors"
    save_dict(path, {k: v.numpy() for k, v in sd.items()})
    return sd, convnext_from_timm(path)


def test_convnext_base_equals_plain_torch_on_real_shapes(converted):
    sd, params = converted
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    assert n_params == sum(v.numel() for k, v in sd.items() if not k.startswith("head."))
    assert n_params > 87_000_000  # convnext_base without its head: 87.6 M
    x = np.random.default_rng(1).uniform(-1, 1, (2, 64, 96, 3)).astype(np.float32)
    ours = jax.jit(lambda p, x: ConvNeXt(BASE).apply({"params": p}, x))(params, x)
    with torch.no_grad():
        want = torch_forward_features(sd, BASE, torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert ours.shape == want.shape == (2, 2, 3, 1024)
    err, scale = float(np.abs(np.asarray(ours) - want.numpy()).max()), float(want.abs().max())
    assert err <= 1e-4 * scale, (err, scale)


def test_head_input_adapts_to_the_backbone():
    for cfg, channels in (
        (AdversarialConfig(backbone="convnext"), 1024),  # ConvNeXt-base's last stage
        (AdversarialConfig(backbone="convnext", convnext=SMALL), 96),
        (AdversarialConfig(), 512),  # VGG16 relu5_3
        (AdversarialConfig(vgg_tap="relu3_3"), 256),
    ):
        assert backbone_channels(cfg) == channels
    head, spectral = init_discriminator(jax.random.key(0), 1024, AdversarialConfig(backbone="convnext"))
    assert head["fc1"]["kernel"].shape == (1024, 256) and head["fc2"]["kernel"].shape == (256, 1)
    assert spectral["fc1"]["v"].shape == (1024,) and spectral["fc2"]["u"].shape == (1,)


def test_convnext_backbone_inputs_and_gradient():
    sd = timm_state_dict(SMALL, 3)
    params = convnext_from_timm({k: v.numpy() for k, v in sd.items()}, SMALL)
    cfg = AdversarialConfig(backbone="convnext", convnext=SMALL)
    released = AdversarialConfig(backbone="convnext", convnext=SMALL, convnext_input="released")
    head, spectral = init_discriminator(jax.random.key(0), backbone_channels(cfg), cfg)
    fake = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (1, 64, 64, 3)), jnp.float32)

    @jax.jit
    def run(fake):
        loss, grad = jax.value_and_grad(lambda f: generator_loss(head, spectral, params, f, cfg))(fake)
        return backbone_features(params, fake, cfg), backbone_features(params, fake, released), loss, grad

    feats, feats_released, loss, grad = run(fake)
    with torch.no_grad():
        x01 = torch.from_numpy(np.asarray(fake) * 0.5 + 0.5).permute(0, 3, 1, 2)
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        imagenet = torch_forward_features(sd, SMALL, (x01 - mean[:, None, None]) / std[:, None, None])
        unnormalised = torch_forward_features(sd, SMALL, x01)  # the released code's input
    np.testing.assert_allclose(np.asarray(feats), imagenet.permute(0, 2, 3, 1).numpy(), atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(feats_released), unnormalised.permute(0, 2, 3, 1).numpy(), atol=1e-4
    )
    assert (
        np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad))) and float(jnp.abs(grad).max()) > 0
    )


def test_converter_is_strict(tmp_path):
    sd = {k: v.numpy() for k, v in timm_state_dict(SMALL, 0).items()}
    tiny = ConvNeXtConfig(depths=(1, 1, 1, 1), dims=SMALL.dims)
    with pytest.raises(InputError, match=r"unexpected \(9\): stages\.2\.blocks\.1\."):
        convnext_from_timm(sd, tiny)  # a deeper model's keys
    missing = {k: v for k, v in sd.items() if k != "stages.2.blocks.1.gamma"}
    with pytest.raises(InputError, match=r"missing \(1\): stages\.2\.blocks\.1\.gamma"):
        convnext_from_timm(missing, SMALL)
    wrong = dict(sd, **{"stem.0.weight": sd["stem.0.weight"][:, :, :3, :3]})
    with pytest.raises(InputError, match=r"shape mismatches \(1\): stem\.0\.weight"):
        convnext_from_timm(wrong, SMALL)
    pickled = tmp_path / "pytorch_model.bin"
    torch.save({"stem.0.bias": torch.zeros(3)}, pickled)
    with pytest.raises(InputError, match="pickles are never loaded"):
        convnext_from_timm(pickled, SMALL)
