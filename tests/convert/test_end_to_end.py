"""The whole path: random diffusers models -> save_pretrained -> ``bokehdiff-jax convert`` -> load -> outputs.

The model tests check the Flax modules; these check files, the CLI, the loaders and the inverse.
"""

from __future__ import annotations

import json

import diffusers
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tiny_configs
import torch

from bokehdiff_jax import cli
from bokehdiff_jax.convert import load_unet, load_vae, mapping, weights
from bokehdiff_jax.io.safetensors_io import SafetensorsFile

RTOL = 1e-4  # max |flax - torch| <= RTOL * max |torch|, fp32


# name -> (diffusers U-Net config, diffusers VAE config): tests/tiny_configs.py, shared with the model tests.
CASES = tiny_configs.convert_cases()


def run_cli(argv: list[str], monkeypatch) -> int:
    # The real dispatcher and error handling, with only our subcommand registered (the others are
    # other modules' business and may not exist yet).
    monkeypatch.setattr(cli, "COMMANDS", {"convert": cli.COMMANDS["convert"]})
    return cli.main(["convert", *argv])


def _perturbed(model, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():  # move every weight off its init so norms' scale/bias and zero-inits count
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _nchw(x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def _close(flax_out, torch_out: np.ndarray) -> float:
    return float(np.abs(np.asarray(flax_out, np.float32) - torch_out).max() / np.abs(torch_out).max())


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, tmp_path_factory):
    """A pipeline folder (plain U-Net, sharded VAE) converted with the CLI."""
    unet_cfg, vae_cfg = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    unet = _perturbed(diffusers.UNet2DConditionModel(**unet_cfg), 1)
    vae = _perturbed(diffusers.AutoencoderKL(**vae_cfg), 2)
    unet.save_pretrained(root / "src" / "unet")
    vae.save_pretrained(root / "src" / "vae", max_shard_size="40KB")
    assert (root / "src" / "vae" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    mp = pytest.MonkeyPatch()
    try:
        assert run_cli(["from-diffusers", str(root / "src"), str(root / "dst")], mp) == 0
    finally:
        mp.undo()
    return unet, vae, root


def test_unet_matches_diffusers(converted):
    unet, _, root = converted
    module, variables = load_unet(root / "dst")
    cfg = module.config
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 12, cfg.in_channels)).astype(np.float32)
    t = np.array([499.0, 3.0], np.float32)
    ctx = rng.standard_normal((2, 5, cfg.cross_attention_dim)).astype(np.float32)
    extra, kwargs = (), {}
    if cfg.addition_embed_type == "text_time":
        text = rng.standard_normal((2, cfg.text_embeds_dim)).astype(np.float32)
        ids = np.tile(np.array([[64, 96, 0, 0, 64, 96]], np.float32), (2, 1))
        extra = (text, ids)
        kwargs = {
            "added_cond_kwargs": {"text_embeds": torch.from_numpy(text), "time_ids": torch.from_numpy(ids)}
        }
    eps = jax.jit(module.apply)(variables, x, t, ctx, *extra)  # jit: eager would compile op by op, slower
    with torch.no_grad():
        ref = _nhwc(unet(_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), **kwargs).sample)
    assert _close(eps, ref) <= RTOL


def test_vae_matches_diffusers(converted):
    _, vae, root = converted
    module, variables = load_vae(root / "dst")
    x = np.random.default_rng(1).uniform(-1, 1, (1, 16, 24, module.config.in_channels)).astype(np.float32)
    mean, _ = jax.jit(lambda v, x: module.apply(v, x, method="encode"))(variables, x)
    z = np.random.default_rng(2).standard_normal(mean.shape).astype(np.float32)
    dec = jax.jit(lambda v, z: module.apply(v, z, method="decode"))(variables, z)
    with torch.no_grad():
        ref_mean = _nhwc(vae.encode(_nchw(x)).latent_dist.mean)
        ref_dec = _nhwc(vae.decode(_nchw(z)).sample)
    assert _close(mean, ref_mean) <= RTOL
    assert _close(dec, ref_dec) <= RTOL


def test_loading_the_diffusers_folder_directly_gives_the_same_params(converted):
    _, _, root = converted
    _, a = load_vae(root / "dst")
    _, b = load_vae(root / "src")  # pipeline folder, sharded VAE, no conversion step
    same = jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)
    assert jax.tree.all(same)


def test_to_diffusers_round_trip_loads_in_diffusers(converted, monkeypatch):
    unet, vae, root = converted
    assert run_cli(["to-diffusers", str(root / "dst"), str(root / "back")], monkeypatch) == 0
    for original, cls, sub in (
        (unet, diffusers.UNet2DConditionModel, "unet"),
        (vae, diffusers.AutoencoderKL, "vae"),
    ):
        loaded = cls.from_pretrained(root / "back" / sub)
        a, b = original.state_dict(), loaded.state_dict()
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a), sub  # fp32 all the way: exact, so outputs are equal


def test_variant_fp16_and_bf16_round_trip_bit_identical(tmp_path, monkeypatch):
    unet_cfg, _ = CASES[sorted(CASES)[0]]
    unet = _perturbed(diffusers.UNet2DConditionModel(**unet_cfg), 3).half()
    unet.save_pretrained(tmp_path / "u16", variant="fp16")
    assert (tmp_path / "u16" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    # fp16 variant -> bf16 checkpoint -> diffusers -> bf16 checkpoint: identical tensors both times.
    assert (
        run_cli(
            ["from-diffusers", str(tmp_path / "u16"), str(tmp_path / "a"), "--dtype", "bf16"], monkeypatch
        )
        == 0
    )
    assert run_cli(["to-diffusers", str(tmp_path / "a"), str(tmp_path / "d")], monkeypatch) == 0
    assert (
        run_cli(["from-diffusers", str(tmp_path / "d"), str(tmp_path / "b"), "--dtype", "bf16"], monkeypatch)
        == 0
    )
    with (
        SafetensorsFile(tmp_path / "a/unet/params.safetensors") as fa,
        SafetensorsFile(tmp_path / "b/unet/params.safetensors") as fb,
    ):
        assert set(fa) == set(fb) and len(fa) == len(unet.state_dict())
        assert all(fa[k].dtype == ml_dtypes.bfloat16 and fa[k].tobytes() == fb[k].tobytes() for k in fa)
    loaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "d" / "unet")
    sd = unet.state_dict()
    assert all(torch.equal(v, sd[k].to(torch.bfloat16)) for k, v in loaded.state_dict().items())
    # The fp16 variant loads directly too, cast once to the requested dtype.
    _, p16 = load_unet(tmp_path / "u16", dtype=jnp.float16)
    k = p16["params"]["conv_in"]["kernel"]
    assert k.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(k), sd["conv_in.weight"].numpy().transpose(2, 3, 1, 0))
    # --dtype keep: diffusers -> ours -> diffusers gives the source file's tensors byte for byte.
    assert (
        run_cli(
            ["from-diffusers", str(tmp_path / "u16"), str(tmp_path / "k"), "--dtype", "keep"], monkeypatch
        )
        == 0
    )
    assert run_cli(["to-diffusers", str(tmp_path / "k"), str(tmp_path / "k2d")], monkeypatch) == 0
    with (
        SafetensorsFile(tmp_path / "u16/diffusion_pytorch_model.fp16.safetensors") as fs,
        SafetensorsFile(tmp_path / "k2d/unet/diffusion_pytorch_model.safetensors") as fk,
    ):
        assert set(fs) == set(fk) and all(
            fs[k].dtype == np.float16 and fs[k].tobytes() == fk[k].tobytes() for k in fs
        )
    assert json.loads((tmp_path / "k" / weights.MANIFEST).read_text())["dtype"] == "float16"
    manifest = json.loads((tmp_path / "a" / weights.MANIFEST).read_text())
    assert (
        manifest["format"] == "bokehdiff_jax"
        and manifest["dtype"] == "bfloat16"
        and manifest["components"] == ["unet"]
    )


@pytest.mark.parametrize(
    "component, config, n_tensors", [("unet", "unet_config.json", 1680), ("vae", "vae_config.json", 248)]
)
def test_full_sdxl_name_and_shape_coverage(sdxl_config_dir, component, config, n_tensors):
    cfg = json.loads((sdxl_config_dir / config).read_text())
    cls = diffusers.UNet2DConditionModel if component == "unet" else diffusers.AutoencoderKL
    with torch.device("meta"):  # shapes only: no weights anywhere
        reference = cls.from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    abstract = weights.abstract_params(weights.build_module(component, cfg))
    steps = mapping.plan_diffusers_to_flax(shapes, abstract, what=f"SDXL {component}")
    assert len(shapes) == n_tensors and len(steps) == n_tensors
    assert sum(int(np.prod(s)) for s in shapes.values()) == sum(int(np.prod(s.shape)) for s in steps)
    # and back: every Flax leaf names its diffusers key and shape
    for s in steps:
        assert mapping.torch_shape(s.path, s.shape) == (s.key, shapes[s.key])
