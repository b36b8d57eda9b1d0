"""Trainable / frozen split of the one-step model (issue 8 section 2): the LoRA and VAE parts equal
what peft and diffusers have on the full SDXL, the trees share their leaves, and a training step
moves the trainable tree only."""

import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import tiny_configs
import torch

from bokehdiff_jax.convert.base import load_base
from bokehdiff_jax.convert.lora import flax_lora_to_peft
from bokehdiff_jax.convert.mapping import torch_shape
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.attention import AttentionRouting
from bokehdiff_jax.models.bokehdiff import BokehDiff
from bokehdiff_jax.models.configs import UNetConfig, VAEConfig
from bokehdiff_jax.models.options import SPEC_LORA_TARGETS, LoRAConfig
from bokehdiff_jax.models.partition import SPEC_VAE_TRAINABLE, PartitionConfig, describe, merge, split


def _leaves(tree) -> dict[str, object]:
    return {"/".join(k.key for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def sdxl_split():
    """The full SDXL's trainable / frozen trees as abstract shapes (nothing allocated)."""
    part = PartitionConfig(lora=LoRAConfig(rank=8, alpha=8))
    model = BokehDiff.create(UNetConfig.sdxl(), VAEConfig.sdxl(), lora=part.unet_lora)
    return model, split(model.abstract_variables(), part)


def test_lora_tensors_equal_pefts_on_full_sdxl(sdxl_split):
    model, (trainable, _) = sdxl_split
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(model.unet.config.to_diffusers())
        unet.add_adapter(
            peft.LoraConfig(
                r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(SPEC_LORA_TARGETS)
            )
        )
    want = {k.replace(".default", ""): tuple(v.shape) for k, v in unet.state_dict().items() if ".lora_" in k}
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), trainable["unet"]["lora"])
    got = {k: v.shape for k, v in flax_lora_to_peft(zeros, prefix="").items()}
    assert len(want) == 1576  # 788 adapted modules on SDXL's U-Net
    assert got == want
    # Every one of SPEC's 14 target kinds is adapted somewhere.
    assert all(any(k.split(".lora_")[0].endswith(t) for k in got) for t in SPEC_LORA_TARGETS)


def test_vae_parts_equal_diffusers_parameters_on_full_sdxl(sdxl_split):
    model, (trainable, frozen) = sdxl_split
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(**model.vae.config.to_diffusers())
    want = {
        k: tuple(v.shape)
        for k, v in vae.state_dict().items()
        if any(k.startswith(p + ".") for p in SPEC_VAE_TRAINABLE)
    }
    got = dict(
        torch_shape(tuple(p.split("/")), x.shape) for p, x in _leaves(trainable["vae"]["params"]).items()
    )
    assert got == want and len(got) == 30  # conv_in 2, mid_block 2 x 8 + 10, conv_out 2
    # The rest of the VAE, the U-Net's base weights and the prompt are frozen; nothing is in both.
    assert len(_leaves(frozen["vae"]["params"])) == len(vae.state_dict()) - len(want)
    assert len(_leaves(frozen["unet"]["params"])) == 1680
    assert set(trainable) == {"unet", "vae"} and set(trainable["unet"]) == {"lora"}
    counts = describe(trainable, frozen)
    assert counts["trainable"] < 0.02 * counts["frozen"]


@pytest.fixture(scope="module")
def tiny():
    """The smallest U-Net of tiny_configs (one transformer layer) on its VAE, LoRA on, PISA off: the
    training step's backward compile grows with depth, and these tests are about which arrays move."""
    unet_cfg = {**tiny_configs.UNETS["odd"], "transformer_layers_per_block": 1, "in_channels": 3}
    unet_cfg["out_channels"] = tiny_configs.VAES["odd"]["latent_channels"]
    with pytest.warns(UserWarning, match="random prompt embeddings"):
        base = load_base("random", unet_config=unet_cfg, vae_config=tiny_configs.VAES["odd"])
    part = PartitionConfig()
    model = BokehDiff.create(
        base.unet_config, base.vae_config, lora=part.unet_lora, routing=AttentionRouting(pisa_paths=())
    )
    return model, part, model.add_lora(base.variables, jax.random.key(1))


def test_split_and_merge_share_every_leaf(tiny):
    _, part, variables = tiny
    trainable, frozen = split(variables, part)
    full, t, f = _leaves(variables), _leaves(trainable), _leaves(frozen)
    assert set(t).isdisjoint(f) and set(t) | set(f) == set(full)
    assert all(k.startswith(("unet/lora/", "vae/params/encoder/")) for k in t)
    assert {k.split("/")[3] for k in t if k.startswith("vae/")} == {"conv_in", "mid_block", "conv_out"}
    merged = _leaves(merge(trainable, frozen))
    assert merged.keys() == full.keys() and all(merged[k] is full[k] for k in full)  # no copies
    with pytest.raises(ValueError, match="both"):
        merge(trainable, variables)


def test_all_mode_trains_every_weight_and_bad_configs_are_errors(tiny):
    _, part, variables = tiny
    base = {**variables, "unet": {"params": variables["unet"]["params"]}}
    trainable, frozen = split(base, PartitionConfig(trainable="all"))
    assert set(frozen) == {"cond"}
    assert len(_leaves(trainable)) == len(_leaves(base)) - 2  # all but the two prompt arrays
    with pytest.raises(InputError, match="no LoRA"):
        split(base, part)
    with pytest.raises(InputError, match="without LoRA"):
        split(variables, PartitionConfig(trainable="all"))
    with pytest.raises(InputError, match="encoder.conv_typo"):
        split(variables, PartitionConfig(vae_parts=("encoder.conv_in", "encoder.conv_typo")))
    with pytest.raises(InputError, match="trainable"):
        PartitionConfig(trainable="some")
    t, _ = split(variables, PartitionConfig(unet_parts=("conv_in", "down_blocks.*.resnets.0.norm1")))
    assert set(t["unet"]["params"]) == {"conv_in", "down_blocks_0", "down_blocks_1"}


def test_lora_init_is_pefts_gaussian(tiny):
    model, _, variables = tiny
    lora = _leaves(variables["unet"]["lora"])
    a = np.concatenate([np.ravel(x) for k, x in lora.items() if k.endswith("/A")])
    assert all(not np.any(x) for k, x in lora.items() if k.endswith("/B"))
    assert a.size > 10_000 and abs(a.std() - 1 / 8) < 0.005 and abs(a.mean()) < 0.005  # N(0, 1/8^2)
    again = _leaves(model.init_lora(jax.random.key(1)))
    assert all(np.array_equal(again[k], lora[k]) for k in lora)  # same key, same arrays


def test_random_base_follows_the_module_initialisers(tiny):
    _, _, variables = tiny
    params = _leaves(variables["unet"]["params"])
    assert {k.rsplit("/", 1)[1] for k in params} == {"kernel", "bias", "scale"}
    assert all(not np.any(x) for k, x in params.items() if k.endswith("/bias"))
    assert all(np.all(x == 1) for k, x in params.items() if k.endswith("/scale"))
    k = np.asarray(max((x for n, x in params.items() if n.endswith("/kernel")), key=np.size))
    fan_in = np.prod(k.shape[:-1])  # lecun-normal: N(0, 1/fan_in) truncated at 2 std
    assert abs(k.std() * np.sqrt(fan_in) - 1) < 0.05 and np.abs(k).max() <= 2 / 0.8796 / np.sqrt(fan_in)


def test_a_training_step_moves_the_trainable_tree_only(tiny):
    model, part, variables = tiny
    trainable, frozen = split(variables, part)
    before = jax.tree.map(np.array, frozen)
    rng = np.random.default_rng(0)
    # 16 x 24 pixels: the lowest U-Net level still has 2 tokens (with 1, softmax ignores q and k).
    image = rng.uniform(-1, 1, (1, 16, 24, 3)).astype(np.float32)
    disparity = rng.uniform(0, 1, (1, 16, 24)).astype(np.float32)
    target = np.clip(image + 0.1, -1, 1)
    opt = optax.adam(1e-3)

    # LLVM's optimisation passes dominate the CPU compile here; the values are not what this tests.
    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def step(trainable, opt_state, frozen):
        def loss_fn(t):
            return jnp.mean((model.apply(merge(t, frozen), image, disparity, 0.5, 6.0) - target) ** 2)

        grads = jax.grad(loss_fn)(trainable)  # w.r.t. the trainable tree only
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, grads

    new, _, grads = step(trainable, opt.init(trainable), frozen)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    for k, x in _leaves(frozen).items():  # the frozen arrays are untouched, bit for bit
        np.testing.assert_array_equal(x, _leaves(before)[k], err_msg=k)
    old, moved = _leaves(trainable), _leaves(new)
    changed = {k for k in old if not np.array_equal(old[k], moved[k])}
    assert {k for k in old if k.endswith("/B")} <= changed  # B starts at 0 and gets a gradient
    assert not any(k.endswith("/A") for k in changed)  # with B = 0, dL/dA = 0
    assert {k for k in old if k.startswith("vae/params/encoder/conv_in")} <= changed
