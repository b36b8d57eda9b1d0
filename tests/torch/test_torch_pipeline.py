"""BokehDiffPipeline.from_export (PyTorch/diffusers) against the JAX one-step model, on a tiny random
SDXL-shaped base with non-zero LoRA B and modified VAE parts, fp32, PISA on and off (issue 10 section 2)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from export_helpers import random_trained, write_base

from bokehdiff_jax.convert.base import load_base
from bokehdiff_jax.convert.trained import base_fingerprint
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.export.bundle import export_model
from bokehdiff_jax.models.bokehdiff import BokehDiff
from bokehdiff_jax.models.partition import merge, split
from bokehdiff_jax.torch.pipeline import BokehDiffPipeline

# Odd sides (the mini VAE's factor is 2): padding and cropping are exercised; the PISA grid is 5 x 7.
H, W = 17, 25


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("base"), "mini")


@pytest.fixture(scope="module")
def base_variables(base):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no text encoders: random prompt embeddings (replaced below)
        return load_base(base).variables


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    img = rng.uniform(-1, 1, (2, H, W, 3)).astype(np.float32)
    disp = np.kron(rng.uniform(0, 1, (2, 3, 3)), np.ones((1, 8, 10)))[:, :H, :W]
    disp = np.clip(disp + 0.05 * rng.uniform(size=disp.shape), 0, 1).astype(np.float32)
    return img, disp, np.array([0.3, 0.7], np.float32), np.array([6.0, 10.0], np.float32)


def _jax_output(trained, base_variables, inputs):
    spec = trained.spec
    model = BokehDiff.create(spec.unet_config, spec.vae_config, lora=spec.lora, routing=spec.routing)
    placeholder = {**base_variables, "unet": {**base_variables["unet"], "lora": {"_": {}}}}
    _, frozen = split(placeholder, spec.partition)
    frozen = {**frozen, "cond": {k: jnp.asarray(v) for k, v in trained.cond.items()}}
    trainable = jax.tree.map(jnp.asarray, trained.trainable)
    return np.asarray(jax.jit(lambda t, *a: model.apply(merge(t, frozen), *a))(trainable, *inputs))


@pytest.mark.parametrize("pisa", [True, False], ids=["pisa", "vanilla"])
def test_pytorch_pipeline_matches_the_jax_one_step_model(base, base_variables, tmp_path, pisa):
    trained = random_trained(base, rank=4, alpha=8.0, pisa=pisa, seed=3, lora_std=0.1)
    trained.spec.base["fingerprint"] = base_fingerprint(base)
    export_model(trained, tmp_path / "exp")
    pipe = BokehDiffPipeline.from_export(tmp_path / "exp", base=base)
    layer = pipe.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1")
    assert type(layer.processor).__name__ == ("PisaAttnProcessor" if pisa else "AttnProcessor2_0")
    img, disp, f, s = _inputs()
    want = _jax_output(trained, base_variables, (img, disp, f, s))
    nchw = torch.from_numpy(img.transpose(0, 3, 1, 2).copy())
    got = pipe(nchw, torch.from_numpy(disp), torch.from_numpy(f), torch.from_numpy(s)).numpy()
    got = got.transpose(0, 2, 3, 1)
    assert got.shape == want.shape == (2, H, W, 3)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"PISA {'on' if pisa else 'off'}: max |torch - jax| / max |jax| = {err:.2e}")
    assert err <= 1e-4
    # The same call again gives the same image (no randomness anywhere at inference).
    again = pipe(nchw, torch.from_numpy(disp), f, s)
    np.testing.assert_array_equal(again.numpy().transpose(0, 2, 3, 1), got)
    # Neither the LoRA nor PISA is a no-op here: switching either off changes the image.
    pipe.unet.disable_adapters()
    assert np.abs(pipe(nchw, disp, f, s).numpy().transpose(0, 2, 3, 1) - got).max() > 1e-2 * np.abs(got).max()
    pipe.unet.enable_adapters()
    if pisa:
        from diffusers.models.attention_processor import AttnProcessor2_0

        layer.set_processor(AttnProcessor2_0())
        assert (
            np.abs(pipe(nchw, disp, f, s).numpy().transpose(0, 2, 3, 1) - got).max()
            > 1e-3 * np.abs(got).max()
        )


def test_from_export_checks_the_base_and_its_inputs(base, tmp_path):
    trained = random_trained(base, seed=4)
    trained.spec.base["fingerprint"] = {"unet": "0" * 64, "vae": "0" * 64}  # "trained on another base"
    export_model(trained, tmp_path / "exp")
    with pytest.warns(UserWarning, match="differ from the base"):
        pipe = BokehDiffPipeline.from_export(tmp_path / "exp", base=base)
    img, disp, f, s = _inputs()
    with pytest.raises(InputError, match="disparity shape"):
        pipe(torch.from_numpy(img.transpose(0, 3, 1, 2).copy()), torch.from_numpy(disp[:, :-1]), f, s)
    with pytest.raises(InputError, match="not a bokehdiff_jax export"):
        BokehDiffPipeline.from_export(base, base=base)
