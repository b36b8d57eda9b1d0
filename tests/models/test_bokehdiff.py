"""The one-step model (issue 8 section 1) against a direct diffusers computation, and its contracts:
schedule constants, odd sizes, time_ids, LoRA with B = 0, explicit PISA keys and hardness step."""

import json

import diffusers
import jax
import numpy as np
import pytest
import tiny_configs
import torch
from parity_utils import assert_close, flax_params, nchw, nhwc, perturbed

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.attention import AttentionRouting
from bokehdiff_jax.models.bokehdiff import BokehDiff, pad_to_multiple, random_prompt_embeds, sdxl_time_ids
from bokehdiff_jax.models.configs import UNetConfig, VAEConfig
from bokehdiff_jax.models.options import LoRAConfig
from bokehdiff_jax.models.schedule import SDXL_SCHEDULER_CONFIG, OneStepSchedule, alphas_cumprod
from bokehdiff_jax.pisa import PisaConfig

SIZE = (13, 22)  # neither side a multiple of the tiny VAE's factor 4: padded to 16 x 24, cropped back


def test_schedule_equals_diffusers():
    for cfg in (
        json.loads(SDXL_SCHEDULER_CONFIG.read_text()),
        {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000},
    ):
        ref = diffusers.DDPMScheduler.from_config(cfg).alphas_cumprod.double().numpy()
        np.testing.assert_allclose(alphas_cumprod(cfg), ref, rtol=2e-6)
    sdxl = OneStepSchedule.from_config()
    ref = float(
        diffusers.DDPMScheduler.from_config(json.loads(SDXL_SCHEDULER_CONFIG.read_text())).alphas_cumprod[499]
    )
    assert sdxl.timestep == 499 and abs(sdxl.alpha_bar - ref) < 1e-6 * ref
    with pytest.raises(InputError, match="prediction_type"):
        OneStepSchedule.from_config(
            {**json.loads(SDXL_SCHEDULER_CONFIG.read_text()), "prediction_type": "v_prediction"}
        )


def test_time_ids_and_padding():
    np.testing.assert_array_equal(sdxl_time_ids(13, 22, 2), [[13, 22, 0, 0, 13, 22]] * 2)  # (H, W)
    x = np.arange(2 * 5 * 7).reshape(2, 5, 7).astype(np.float32)
    for mode in ("reflect", "edge"):
        np.testing.assert_array_equal(
            pad_to_multiple(x, 4, mode), np.pad(x, ((0, 0), (0, 3), (0, 1)), mode=mode)
        )
    assert pad_to_multiple(x[:, :4, :4], 4).shape == (2, 4, 4)  # already a multiple: unchanged
    with pytest.raises(InputError, match="pad mode"):
        pad_to_multiple(x, 4, "wrap")


@pytest.fixture(scope="module")
def tiny():
    """Random diffusers U-Net and VAE, their weights in our tree, and inputs of an odd size."""
    torch.manual_seed(0)
    unet = perturbed(diffusers.UNet2DConditionModel(**tiny_configs.UNETS["sdxl"]), 1)
    vae = perturbed(diffusers.AutoencoderKL(**tiny_configs.VAES["sdxl"]), 2)
    ucfg = UNetConfig.from_diffusers(tiny_configs.UNETS["sdxl"])
    vcfg = VAEConfig.from_diffusers(tiny_configs.VAES["sdxl"])
    model = BokehDiff.create(ucfg, vcfg)
    side = 2 ** len(ucfg.block_out_channels)
    variables = {
        "unet": {"params": flax_params(model.unet, unet, *model.unet.init_inputs(size=(side, side), seq=4))},
        "vae": {"params": flax_params(model.vae, vae, np.zeros((1, 4, 4, 3), np.float32))},
        "cond": random_prompt_embeds(ucfg, seed=3),
    }
    rng = np.random.default_rng(0)
    inputs = (
        rng.uniform(-1, 1, (2, *SIZE, 3)).astype(np.float32),
        rng.uniform(0, 1, (2, *SIZE)).astype(np.float32),
        np.array([0.3, 0.7], np.float32),
        np.array([4.0, 9.0], np.float32),
    )
    return unet, vae, ucfg, vcfg, variables, inputs


def _diffusers_one_step(unet, vae, cond, image, time_ids):
    """SPEC section 3 written with diffusers' own modules and scheduler."""
    sf = vae.config.scaling_factor
    abar = diffusers.DDPMScheduler.from_config(json.loads(SDXL_SCHEDULER_CONFIG.read_text())).alphas_cumprod[
        499
    ]
    b = image.shape[0]
    with torch.no_grad():
        z = vae.encode(nchw(image)).latent_dist.mean * sf
        eps = unet(
            z,
            torch.full((b,), 499),
            torch.from_numpy(cond["prompt_embeds"]).expand(b, -1, -1),
            added_cond_kwargs={
                "text_embeds": torch.from_numpy(cond["text_embeds"]).expand(b, -1),
                "time_ids": torch.tensor(time_ids, dtype=torch.float32).expand(b, -1),
            },
        ).sample
        z0 = (z - (1 - abar).sqrt() * eps) / abar.sqrt()
        return nhwc(vae.decode(z0 / sf).sample)


@pytest.fixture(scope="module")
def no_pisa(tiny):
    """The model with PISA off (for comparison with diffusers) and its output on the tiny inputs.
    Eager: the LoRA test below reuses the per-operation executables this compiles."""
    *_, ucfg, vcfg, variables, inputs = tiny
    model = BokehDiff.create(ucfg, vcfg, routing=AttentionRouting(pisa_paths=()))
    return model, np.asarray(model.apply(variables, *inputs))


def test_one_step_equals_diffusers_at_an_odd_size(tiny, no_pisa):
    unet, vae, *_, variables, (image, *_) = tiny
    _, got = no_pisa
    assert got.shape == (2, *SIZE, 3)
    h, w = SIZE
    padded = np.pad(image, ((0, 0), (0, 3), (0, 2), (0, 0)), mode="reflect")  # to 16 x 24
    want = _diffusers_one_step(unet, vae, variables["cond"], padded, [h, w, 0, 0, h, w])[:, :h, :w]
    print(
        f"one-step vs diffusers: max |diff| / max |ref| = {np.abs(got - want).max() / np.abs(want).max():.2e}"
    )
    assert_close(got, want, rel=1e-4)
    # time_ids matter here: the swapped (W, H) of the released code gives another image.
    swapped = _diffusers_one_step(unet, vae, variables["cond"], padded, [w, h, 0, 0, w, h])[:, :h, :w]
    assert np.abs(swapped - want).max() > 100 * 1e-4 * np.abs(want).max()


def test_lora_with_zero_b_is_the_model_without_lora_bit_for_bit(tiny, no_pisa):
    *_, ucfg, vcfg, variables, inputs = tiny
    plain, want = no_pisa
    lora = BokehDiff.create(ucfg, vcfg, routing=plain.unet.routing, lora=LoRAConfig(rank=4, alpha=8))
    with_lora = lora.add_lora(variables, jax.random.key(0))
    assert with_lora["unet"]["params"] is variables["unet"]["params"]
    assert any(np.any(x) for x in jax.tree.leaves(with_lora["unet"]["lora"]))  # A is random
    np.testing.assert_array_equal(lora.apply(with_lora, *inputs), want)


def test_pisa_training_key_and_hardness_step_are_explicit(tiny):
    *_, ucfg, vcfg, variables, inputs = tiny
    model = BokehDiff.create(ucfg, vcfg, routing=AttentionRouting(pisa=PisaConfig(dropout=0.1)))
    run = lambda key, step: np.asarray(model.apply(variables, *inputs, step=step, key=key, train=True))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    first = run(k1, 0)
    np.testing.assert_array_equal(run(k1, 0), first)  # same key and step: same output
    assert not np.array_equal(run(k2, 0), first)  # the key draws the jitter and dropout
    assert not np.array_equal(run(k1, 5000), first)  # the step sets the hardness log(3 + step)


def test_bad_inputs_are_one_line_errors(tiny):
    *_, ucfg, vcfg, variables, (image, disparity, focus, strength) = tiny
    model = BokehDiff.create(ucfg, vcfg)
    with pytest.raises(InputError, match="disparity shape"):
        model.apply(variables, image, disparity[:, :-1], focus, strength)
    with pytest.raises(InputError, match="focus shape"):
        model.apply(variables, image, disparity, focus[:1], strength)
    with pytest.raises(InputError, match="image shape"):
        model.apply(variables, image[..., :2], disparity, focus, strength)
    with pytest.raises(InputError, match="pad_mode"):
        BokehDiff.create(ucfg, vcfg, pad_mode="wrap")
