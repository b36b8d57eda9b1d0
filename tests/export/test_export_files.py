"""``bokehdiff-jax export``: the files diffusers/peft users load, checked with the real libraries on a tiny
random SDXL-shaped model; the round trip ours -> export -> import; the merged U-Net."""

import json

import diffusers
import numpy as np
import pytest
import torch
from export_helpers import assert_trees_equal, random_trained, write_base
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bokehdiff_jax import cli
from bokehdiff_jax.convert import mapping
from bokehdiff_jax.convert.importers import import_lora
from bokehdiff_jax.convert.lora import flax_lora_to_peft
from bokehdiff_jax.convert.peft_files import METADATA_KEY, OUR_KEY
from bokehdiff_jax.convert.trained import load_trained, save_trained
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.export.bundle import export_model

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("base"), "mini")


@pytest.fixture(scope="module")
def exported(base, tmp_path_factory):
    """alpha = 2 rank: the fold is visible (B in the file is twice ours)."""
    trained = random_trained(base, rank=4, alpha=8.0)
    out = tmp_path_factory.mktemp("exp") / "export"
    export_model(trained, out, merge=True)
    return trained, out


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 5, unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(1, 16, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
    with torch.no_grad():
        return unet(x, torch.tensor([499.0]), ctx, added_cond_kwargs=added).sample


def test_lora_file_names_layouts_fold_and_metadata(exported):
    trained, out = exported
    assert sorted(p.name for p in out.iterdir()) == [
        "bokehdiff.json", "prompt_embeds.safetensors", "pytorch_lora_weights.safetensors", "unet",
        "vae_encoder.safetensors",
    ]  # fmt: skip
    sd = load_file(out / "pytorch_lora_weights.safetensors")
    ours = flax_lora_to_peft(trained.trainable["unet"]["lora"], prefix="unet.")
    assert sorted(sd) == sorted(ours) and all(k.startswith("unet.") for k in sd)
    assert f"unet.{ATTN}.lora_A.weight" in sd
    for k, v in sd.items():  # PyTorch layouts; B carries alpha / rank = 2 (exactly: a power of two)
        want = ours[k] * (2.0 if ".lora_B." in k else 1.0)
        np.testing.assert_array_equal(v.numpy(), want)
    with safe_open(out / "pytorch_lora_weights.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    lora_meta = json.loads(meta[METADATA_KEY])
    modules = sorted({k[len("unet.") :].rsplit(".lora_", 1)[0] for k in sd})
    # diffusers strips the "unet." prefix and builds LoraConfig(**rest): every key must be a field.
    config = LoraConfig(**{k[len("unet.") :]: v for k, v in lora_meta.items()})
    assert (config.r, config.lora_alpha) == (4, 4)  # alpha folded: scale 1 with or without metadata
    assert sorted(config.target_modules) == modules
    assert json.loads(meta[OUR_KEY])["alpha"] == 8.0
    manifest = json.loads((out / "bokehdiff.json").read_text())
    assert manifest["lora"] == {"rank": 4, "alpha": 8.0, "targets": list(trained.spec.lora.targets)}
    assert manifest["pisa_paths"] == ["down_blocks.1.attentions.0.transformer_blocks.*.attn1"]
    assert manifest["inference_hardness"] == pytest.approx(np.log(1e7)) and manifest["timestep"] == 499


def test_vae_parts_load_with_no_unexpected_keys(base, exported):
    trained, out = exported
    vae = diffusers.AutoencoderKL.from_pretrained(base / "vae")
    parts = load_file(out / "vae_encoder.safetensors")
    assert parts and all(
        k.startswith(("encoder.conv_in.", "encoder.mid_block.", "encoder.conv_out.")) for k in parts
    )
    result = vae.load_state_dict(parts, strict=False)
    assert result.unexpected_keys == []
    want = dict(mapping.iter_flax_to_diffusers(trained.trainable["vae"]["params"]))
    assert sorted(want) == sorted(parts)
    for k, v in vae.state_dict().items():
        if k in want:
            np.testing.assert_array_equal(v.numpy(), want[k])


def test_load_lora_weights_changes_the_unet_and_equals_the_merged_one(base, exported, tmp_path):
    _, out = exported

    def pipe():
        return diffusers.StableDiffusionXLPipeline(
            vae=diffusers.AutoencoderKL.from_pretrained(base / "vae"),
            text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
            unet=diffusers.UNet2DConditionModel.from_pretrained(base / "unet"),
            scheduler=diffusers.EulerDiscreteScheduler(),
        )  # fmt: skip

    p = pipe()
    before = _unet_out(p.unet)
    p.load_lora_weights(out)
    after = _unet_out(p.unet)
    assert (after - before).abs().max() > 1e-2 * before.abs().max()  # the load is not a no-op
    merged = _unet_out(diffusers.UNet2DConditionModel.from_pretrained(out / "unet"))
    # W + B A merged in float32 vs the adapter's two branches: equal up to float rounding.
    assert (merged - after).abs().max() <= 1e-4 * after.abs().max(), float((merged - after).abs().max())
    # A loader that ignores the metadata (diffusers 0.32) gets the same scale: the fold makes it so.
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(load_file(out / "pytorch_lora_weights.safetensors"), bare / "pytorch_lora_weights.safetensors")
    q = pipe()
    q.load_lora_weights(bare)
    # Equal up to float rounding (diffusers 0.42 / peft 0.22 differ from the metadata load by ~1e-6 of
    # the output's range); a wrong scale would differ by the order of the LoRA's effect (> 1e-2, above).
    bare_out = _unet_out(q.unet)
    assert (bare_out - after).abs().max() <= 1e-5 * after.abs().max(), float((bare_out - after).abs().max())


@pytest.mark.parametrize("alpha", [4.0, 8.0])
def test_round_trip_ours_export_import_is_bit_identical(base, tmp_path, alpha):
    trained = random_trained(base, rank=4, alpha=alpha, seed=5)
    export_model(trained, tmp_path / "exp")
    back = import_lora(tmp_path / "exp", base, fingerprint=False)
    assert_trees_equal(back.trainable, trained.trainable)
    assert back.spec.lora == trained.spec.lora and back.spec.routing == trained.spec.routing
    assert (back.spec.vae_parts, back.spec.timestep, back.spec.prompt) == (
        trained.spec.vae_parts, trained.spec.timestep, trained.spec.prompt,
    )  # fmt: skip
    assert_trees_equal(back.cond, {k: np.asarray(v) for k, v in trained.cond.items()})
    # ... and through our trained-model folder and the CLI.
    save_trained(back, tmp_path / "ours")
    assert cli.main(["export", str(tmp_path / "ours"), "--to", str(tmp_path / "exp2")]) == 0
    again = load_trained(tmp_path / "ours")
    assert_trees_equal(again.trainable, trained.trainable)
    for name in ("pytorch_lora_weights.safetensors", "vae_encoder.safetensors", "prompt_embeds.safetensors"):
        assert (tmp_path / "exp" / name).read_bytes() == (tmp_path / "exp2" / name).read_bytes()


def test_export_refuses_foreign_folders_and_merge_without_base(base, tmp_path):
    trained = random_trained(base)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="other files"):
        export_model(trained, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    orphan = type(trained)(trained.trainable, trained.cond, trained.spec.__class__(
        **{**trained.spec.__dict__, "base": {"path": "random", "fingerprint": None}}))  # fmt: skip
    with pytest.raises(InputError, match="--merge needs the base"):
        export_model(orphan, tmp_path / "x", merge=True)
    export_model(trained, tmp_path / "again")
    export_model(trained, tmp_path / "again")  # an earlier export is replaced
