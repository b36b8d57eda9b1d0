"""Imports of PyTorch weights (convert.importers, convert.peft_files): the released code's checkpoint layout
and any PEFT/diffusers LoRA, written here by real peft/diffusers/torch code; strict errors; the CLI."""

import json

import diffusers
import numpy as np
import pytest
import tiny_configs
import torch
from export_helpers import assert_trees_equal, base_vae_parts, write_base
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from bokehdiff_jax import cli
from bokehdiff_jax.convert.importers import import_lora, import_released
from bokehdiff_jax.convert.lora import flax_lora_to_peft
from bokehdiff_jax.convert.mapping import MappingError
from bokehdiff_jax.convert.peft_files import lora_shapes
from bokehdiff_jax.convert.trained import flatten, load_trained, unet_shapes
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.options import SPEC_LORA_TARGETS, LoRAConfig

VAE_PARTS = ("encoder.conv_in.", "encoder.mid_block.", "encoder.conv_out.")
# The tiny bases have no text encoders: imports fall back to seeded random prompt embeddings, with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:.*random prompt embeddings")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("base"), "mini")


def _peft_unet(base, rank=4, alpha=4, seed=0):
    """The base U-Net with a peft adapter (the released training's LoraConfig), B moved off zero."""
    unet = diffusers.UNet2DConditionModel.from_pretrained(base / "unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=list(SPEC_LORA_TARGETS)))  # fmt: skip
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return unet


@pytest.fixture(scope="module")
def released(base, tmp_path_factory):
    """A folder in the released code's layout: save_attn_procs-style LoRA (no prefix, no alpha metadata)
    and vae.ckpt, a torch pickle of the trained VAE parameters."""
    root = tmp_path_factory.mktemp("released")
    sd = {k: v.contiguous() for k, v in get_peft_model_state_dict(_peft_unet(base)).items()}
    assert not any(k.startswith("unet.") for k in sd)
    save_file(sd, root / "pytorch_lora_weights.safetensors", metadata={"format": "pt"})
    vae = diffusers.AutoencoderKL.from_pretrained(base / "vae")
    torch.manual_seed(1)
    parts = {
        n: (p.detach() + 0.01 * torch.randn_like(p))
        for n, p in vae.named_parameters()
        if n.startswith(VAE_PARTS)
    }
    torch.save(parts, root / "vae.ckpt")
    return root, sd, parts


def test_released_checkpoint_imports_exactly(base, released, tmp_path):
    root, sd, parts = released
    m = import_released(root, base, fingerprint=False)
    back = flax_lora_to_peft(m.trainable["unet"]["lora"], prefix="")
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v.numpy())
    from bokehdiff_jax.convert import mapping

    vae = dict(mapping.iter_flax_to_diffusers(m.trainable["vae"]["params"]))
    assert sorted(vae) == sorted(parts)
    for k, v in parts.items():
        np.testing.assert_array_equal(vae[k], v.numpy())
    assert (m.spec.lora.rank, m.spec.lora.alpha, m.spec.lora.targets) == (4, 4.0, SPEC_LORA_TARGETS)
    pisa = m.spec.routing.pisa
    assert (pisa.units, pisa.t_from_query) == (
        "released",
        True,
    )  # the attention the weights were trained with
    # Through the CLI into our folder, which reads back to the same tree.
    with pytest.warns(UserWarning, match="random prompt embeddings"):
        rc = cli.main(["convert", "from-bokehdiff", str(root), str(tmp_path / "ours"), "--base", str(base)])
    assert rc == 0
    ours = load_trained(tmp_path / "ours")
    assert_trees_equal(ours.trainable, m.trainable)
    assert ours.spec.base["fingerprint"] is not None


def test_released_vae_must_hold_exactly_the_trained_parts(base, released, tmp_path):
    root, sd, parts = released
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "pytorch_lora_weights.safetensors").write_bytes(
        (root / "pytorch_lora_weights.safetensors").read_bytes()
    )
    extra = {**parts, "decoder.conv_in.weight": torch.zeros(3)}
    torch.save({k: v for k, v in extra.items() if not k.startswith("encoder.conv_out.")}, bad / "vae.ckpt")
    with pytest.raises(MappingError) as e:
        import_released(bad, base, fingerprint=False)
    assert "decoder.conv_in.weight" in str(e.value) and "conv_out" in str(e.value)
    torch.save({"step": 3}, bad / "vae.ckpt")
    with pytest.raises(InputError, match="flat dict of tensors"):
        import_released(bad, base, fingerprint=False)
    with pytest.raises(InputError, match="no vae.ckpt"):
        (bad / "vae.ckpt").unlink()
        import_released(bad, base, fingerprint=False)


@pytest.mark.parametrize("spelling", ["unet_prefix_with_metadata", "bare", "adapter_name"])
def test_any_peft_spelling_gives_the_same_model(base, released, tmp_path, spelling):
    _, sd, _ = released
    want = import_released(released[0], base, fingerprint=False).trainable["unet"]["lora"]
    meta = {"format": "pt"}
    if spelling == "unet_prefix_with_metadata":
        file_sd = {f"unet.{k}": v for k, v in sd.items()}
        lora_meta = {"unet.r": 4, "unet.lora_alpha": 2, "unet.target_modules": list(SPEC_LORA_TARGETS)}
        meta["lora_adapter_metadata"] = json.dumps(lora_meta)
    elif spelling == "bare":
        file_sd = dict(sd)
    else:
        file_sd = {k.replace(".weight", ".default.weight"): v for k, v in sd.items()}
    save_file(file_sd, tmp_path / "l.safetensors", metadata=meta)
    m = import_lora(tmp_path / "l.safetensors", base, fingerprint=False)
    assert_trees_equal(m.trainable["unet"]["lora"], want)
    assert m.spec.lora.alpha == (
        2.0 if spelling == "unet_prefix_with_metadata" else 4.0
    )  # metadata, else rank
    # No VAE in the file: the base's own parts (a start for training).
    assert_trees_equal(m.trainable["vae"]["params"], base_vae_parts(base))


def _write(tmp_path, sd, name="x.safetensors", **meta):
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / name, metadata={"format": "pt", **meta})
    return tmp_path / name


def test_errors_are_strict_and_list_everything(base, released, tmp_path):
    _, sd, _ = released
    kohya = {"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 64),
             "lora_unet_down_blocks_1_attentions_0_proj_in.alpha": torch.tensor(4.0)}  # fmt: skip
    with pytest.raises(InputError, match="kohya"):
        import_lora(_write(tmp_path, kohya), base, fingerprint=False)

    key_a = "down_blocks.1.attentions.0.proj_in.lora_A.weight"
    key_b = "down_blocks.1.attentions.0.proj_out.lora_B.weight"
    broken = dict(sd)
    broken[key_a] = torch.zeros(3, sd[key_a].shape[1])  # A of rank 3, B of rank 4
    broken["up_blocks.9.nothing.lora_A.weight"] = torch.zeros(4, 8)
    broken["up_blocks.9.nothing.lora_B.weight"] = torch.zeros(8, 4)
    broken["unet.something_else.weight"] = torch.zeros(2)
    del broken[key_b]
    with pytest.raises(MappingError) as e:
        import_lora(_write(tmp_path, broken), base, fingerprint=False)
    msg = str(e.value)
    assert "rank differs between A" in msg and "proj_in" in msg  # A/B rank mismatch
    assert "proj_out" in msg and "missing" in msg  # a factor without its partner
    assert "unet.something_else.weight" in msg  # not a LoRA tensor

    unmatched = {**sd, "up_blocks.9.nothing.lora_A.weight": torch.zeros(4, 8),
                 "up_blocks.9.nothing.lora_B.weight": torch.zeros(8, 4)}  # fmt: skip
    with pytest.raises(MappingError, match="up_blocks.9.nothing"):
        import_lora(_write(tmp_path, unmatched, "u.safetensors"), base, fingerprint=False)

    # A LoRA made for another base: same module names, other widths.
    other = write_base(tmp_path / "other", "mini", block_out_channels=[24, 48])
    with pytest.raises(MappingError, match="shape"):
        import_lora(_write(tmp_path, get_peft_model_state_dict(_peft_unet(other)), "o.safetensors"), base,
                    fingerprint=False)  # fmt: skip

    rc = cli.main(["convert", "from-lora", str(_write(tmp_path, kohya, "k.safetensors")), str(tmp_path / "d"),
                   "--base", str(base), "--no-fingerprint"])  # fmt: skip
    assert rc == 2 and not (tmp_path / "d").exists()


def test_lora_shapes_from_the_header_equal_the_models_own(tmp_path):
    """convert.peft_files.lora_shapes (no model traced) == the Flax U-Net's LoRA collection at init."""
    import jax

    from bokehdiff_jax.convert.trained import base_configs
    from bokehdiff_jax.models.unet import UNet2DConditionModel

    for name in ("mini", "sd15"):  # linear and 1x1-conv projections
        base = write_base(tmp_path / name, name)
        lora = LoRAConfig(rank=3)
        unet_config, _ = base_configs(base)
        model = UNet2DConditionModel(config=unet_config, lora=lora)
        inputs = model.init_inputs(batch=1, size=(8, 8), seq=4)
        want = jax.eval_shape(lambda k, m=model, i=inputs: m.init(k, *i), jax.random.key(0))["lora"]
        got = lora_shapes(unet_shapes(base), lora)
        assert {k: v.shape for k, v in flatten(got).items()} == {k: v.shape for k, v in flatten(want).items()}
    assert not tiny_configs.UNETS["sd15"]["use_linear_projection"]


def test_pickles_are_never_unpickled_for_lora(tmp_path, base):
    torch.save({"a": torch.zeros(1)}, tmp_path / "pytorch_lora_weights.safetensors")
    with pytest.raises(InputError, match="pickle"):
        import_lora(tmp_path, base, fingerprint=False)
