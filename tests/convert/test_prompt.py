"""Fixed-prompt embeddings from a whole (tiny, random) SDXL pipeline folder, against diffusers' own
``StableDiffusionXLPipeline.encode_prompt``. The tokenizer is built here from a hand-written vocabulary."""

from __future__ import annotations

import json
import sys

import diffusers
import numpy as np
import pytest
import tiny_configs
import torch
import transformers

from bokehdiff_jax import cli
from bokehdiff_jax.convert import load_prompt_embeds, load_unet, weights
from bokehdiff_jax.convert.prompt import FIXED_PROMPT, encode_prompt
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.configs import UNetConfig


def _tokenizer(tmp_path, max_length: int):
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges = ["an</w>", "ph", "ot", "ex", "ce"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for tok in [*letters, *(c + "</w>" for c in letters), *(m.replace(" ", "") for m in merges)]:
        vocab.setdefault(tok, len(vocab))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    merge_lines = [f"{m[0]} {m[1:]}" for m in merges]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n")
    return transformers.CLIPTokenizer(
        str(tmp_path / "vocab.json"),
        str(tmp_path / "merges.txt"),
        model_max_length=max_length,
        pad_token="<|endoftext|>",
    )


def _clip_config(hidden: int, projection: int, vocab: int, max_length: int):
    return transformers.CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        projection_dim=projection,
        hidden_act="gelu",
    )


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A saved tiny SDXL pipeline: CLIP widths 8 + 16 = the U-Net's cross_attention_dim 24."""
    root = tmp_path_factory.mktemp("pipe")
    tok = _tokenizer(root, max_length=12)
    unet_cfg = UNetConfig.from_diffusers(tiny_configs.UNETS["sdxl"])
    assert unet_cfg.cross_attention_dim == 24 and unet_cfg.text_embeds_dim == 16
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=diffusers.AutoencoderKL(**tiny_configs.VAES["sdxl"]),
        text_encoder=transformers.CLIPTextModel(_clip_config(8, 8, len(tok), 12)).eval(),
        text_encoder_2=transformers.CLIPTextModelWithProjection(_clip_config(16, 16, len(tok), 12)).eval(),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=diffusers.UNet2DConditionModel(**unet_cfg.to_diffusers()),
        scheduler=diffusers.EulerDiscreteScheduler(),
    )
    pipe.save_pretrained(root / "sdxl")
    return pipe, root / "sdxl"


def test_pipeline_conversion_stores_the_prompt_embeddings(pipeline, tmp_path, monkeypatch):
    pipe, folder = pipeline
    monkeypatch.setattr(cli, "COMMANDS", {"convert": cli.COMMANDS["convert"]})
    assert cli.main(["convert", "from-diffusers", str(folder), str(tmp_path / "ck"), "--dtype", "bf16"]) == 0
    manifest = json.loads((tmp_path / "ck" / weights.MANIFEST).read_text())
    assert manifest["components"] == ["unet", "vae"] and manifest["prompt_embeds"] is True
    got = load_prompt_embeds(tmp_path / "ck")
    with torch.no_grad():
        ref, _, pooled, _ = pipe.encode_prompt(FIXED_PROMPT, device="cpu", do_classifier_free_guidance=False)
    assert got["prompt_embeds"].shape == (1, 12, 24) and got["text_embeds"].shape == (1, 16)
    np.testing.assert_allclose(got["prompt_embeds"], ref.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["text_embeds"], pooled.numpy(), rtol=1e-6, atol=1e-6)
    _, params = load_unet(tmp_path / "ck", dtype="bf16")
    assert params["params"]["conv_in"]["kernel"].dtype.name == "bfloat16"


def test_missing_torch_is_a_clear_error(pipeline, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # what `import torch` sees without the extra
    with pytest.raises(InputError, match="torch extra"):
        encode_prompt(pipeline[1])


def test_fp16_variant_text_encoders_are_read(pipeline, tmp_path, monkeypatch, capsys):
    """A pipeline saved only as ``*.fp16.safetensors`` (text encoders included) converts, with and
    without ``--variant fp16``, to the same prompt embeddings."""
    pipe, folder = pipeline
    pipe.save_pretrained(tmp_path / "v", variant="fp16")
    assert (tmp_path / "v" / "text_encoder" / "model.fp16.safetensors").is_file()
    assert not (tmp_path / "v" / "text_encoder" / "model.safetensors").exists()
    monkeypatch.setattr(cli, "COMMANDS", {"convert": cli.COMMANDS["convert"]})
    ref = encode_prompt(folder)
    assert cli.main(["convert", "from-diffusers", str(tmp_path / "v"), str(tmp_path / "ck")]) == 0
    np.testing.assert_array_equal(load_prompt_embeds(tmp_path / "ck")["prompt_embeds"], ref["prompt_embeds"])
    got = encode_prompt(tmp_path / "v", variant="fp16")  # what --variant fp16 passes down
    np.testing.assert_array_equal(got["text_embeds"], ref["text_embeds"])


def test_refiner_pipeline_notes_the_skipped_prompt_and_takes_five_time_ids(tmp_path, monkeypatch, capsys):
    """An SDXL-refiner-style pipeline: no text_encoder (so no prompt embeddings: a note says so) and a
    U-Net whose time ids are original size, crop and aesthetic score (5), against diffusers' U-Net."""
    import jax
    import jax.numpy as jnp

    tok = _tokenizer(tmp_path, max_length=12)
    cfg = {  # the smallest text_time U-Net: only its added conditioning matters here
        "block_out_channels": [8],
        "down_block_types": ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"],
        "layers_per_block": 1,
        "attention_head_dim": [1],
        "cross_attention_dim": 16,
        "norm_num_groups": 4,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 5 * 8 + 16,
        "sample_size": 8,
    }
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**cfg).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=None,  # only the U-Net and the text side matter here
        text_encoder=None,
        text_encoder_2=transformers.CLIPTextModelWithProjection(_clip_config(16, 16, len(tok), 12)).eval(),
        tokenizer=None,
        tokenizer_2=tok,
        unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(),
        requires_aesthetics_score=True,
    ).save_pretrained(tmp_path / "refiner")
    monkeypatch.setattr(cli, "COMMANDS", {"convert": cli.COMMANDS["convert"]})
    capsys.readouterr()
    assert cli.main(["convert", "from-diffusers", str(tmp_path / "refiner"), str(tmp_path / "ck")]) == 0
    err = capsys.readouterr().err
    assert "5 time ids" in err and "prompt embeddings not stored" in err and "text_encoder" in err
    manifest = json.loads((tmp_path / "ck" / weights.MANIFEST).read_text())
    assert manifest["num_time_ids"] == 5 and manifest["prompt_embeds"] is False
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 5, 16)).astype(np.float32)
    text = rng.standard_normal((1, 16)).astype(np.float32)
    ids = np.array([[64.0, 64.0, 0.0, 0.0, 6.0]], np.float32)  # size, crop, aesthetic score
    added = {"text_embeds": torch.from_numpy(text), "time_ids": torch.from_numpy(ids)}
    with torch.no_grad():
        ref = unet(
            torch.from_numpy(x.transpose(0, 3, 1, 2)), 499, torch.from_numpy(ctx), added_cond_kwargs=added
        )
    ref = ref.sample.permute(0, 2, 3, 1).numpy()
    module, params = load_unet(tmp_path / "ck")
    assert module.config.num_time_ids == 5 and module.config.text_embeds_dim == 16
    out = np.asarray(jax.jit(module.apply)(params, jnp.asarray(x), jnp.asarray([499.0]), ctx, text, ids))
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    assert weights.time_ids_of(tmp_path / "refiner" / "unet") == 5  # the pipeline folder says so too
