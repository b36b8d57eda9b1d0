"""``convert.base.load_base``: the one-step model's base from our checkpoint or a seeded random init."""

import diffusers
import jax
import ml_dtypes
import numpy as np
import pytest
import tiny_configs
import torch

from bokehdiff_jax.convert.base import load_base
from bokehdiff_jax.convert.weights import PROMPT_EMBEDS, from_diffusers, load_unet
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.safetensors_io import save_dict

# The smallest pair of tiny_configs, the U-Net reading the VAE's 3 latent channels.
UNET = {**tiny_configs.UNETS["odd"], "in_channels": 3, "out_channels": 3}
VAE = tiny_configs.VAES["odd"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(**UNET).save_pretrained(root / "src" / "unet")
    diffusers.AutoencoderKL(**VAE).save_pretrained(root / "src" / "vae")
    from_diffusers(root / "src", root / "ckpt", dtype="bf16")
    return root / "ckpt"


def test_checkpoint_without_prompt_gets_seeded_random_embeddings(checkpoint):
    with pytest.warns(UserWarning, match="random prompt embeddings from seed 5"):
        base = load_base(checkpoint, prompt_seed=5, dtype="bf16")
    assert base.prompt_source == "random (seed 5)" and base.unet_config.in_channels == 3
    _, unet_vars = load_unet(checkpoint, "bf16")
    for a, b in zip(jax.tree.leaves(base.variables["unet"]), jax.tree.leaves(unet_vars), strict=True):
        assert a.dtype == ml_dtypes.bfloat16 and np.array_equal(a, b)
    cond = base.variables["cond"]
    assert cond["prompt_embeds"].shape == (1, 77, UNET["cross_attention_dim"])
    with pytest.warns(UserWarning):
        again = load_base(checkpoint, prompt_seed=5)
    np.testing.assert_array_equal(again.variables["cond"]["prompt_embeds"], cond["prompt_embeds"])


def test_checkpoint_prompt_embeddings_are_used_and_checked(checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    c = UNET["cross_attention_dim"]
    prompt = {
        "prompt_embeds": rng.standard_normal((1, 77, c)).astype(np.float32),
        "text_embeds": np.zeros((1, 0), np.float32),  # this U-Net has no text_time conditioning
    }
    save_dict(checkpoint / PROMPT_EMBEDS, prompt)
    try:
        base = load_base(checkpoint)
        assert base.prompt_source == "checkpoint"
        np.testing.assert_array_equal(base.variables["cond"]["prompt_embeds"], prompt["prompt_embeds"])
        save_dict(checkpoint / PROMPT_EMBEDS, {**prompt, "prompt_embeds": prompt["prompt_embeds"][..., :-1]})
        with pytest.raises(InputError, match="prompt_embeds has shape"):
            load_base(checkpoint)
    finally:
        (checkpoint / PROMPT_EMBEDS).unlink()


def test_random_base_is_seeded_and_needs_configs():
    with pytest.warns(UserWarning, match="random base"):
        a = load_base("random", unet_config=UNET, vae_config=VAE, seed=1)
    with pytest.warns(UserWarning):
        b = load_base("random", unet_config=UNET, vae_config=VAE, seed=1, dtype="bf16")
    for x, y in zip(jax.tree.leaves(a.variables["vae"]), jax.tree.leaves(b.variables["vae"]), strict=True):
        assert y.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(np.asarray(x).astype(ml_dtypes.bfloat16), y)  # same seed, same draw
    with pytest.raises(InputError, match="needs a VAE config"):
        load_base("random", unet_config=UNET)
