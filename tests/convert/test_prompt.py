"""Fixed-prompt embeddings from a whole (tiny, random) SDXL pipeline folder, against diffusers' own
``StableDiffusionXLPipeline.encode_prompt``. The tokenizer is built here from a hand-written vocabulary."""

from __future__ import annotations

import json
import sys

import diffusers
import numpy as np
import pytest
import torch
import transformers

from bokehdiff_jax import cli
from bokehdiff_jax.convert import load_prompt_embeds, load_unet, weights
from bokehdiff_jax.convert.prompt import FIXED_PROMPT, encode_prompt
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.configs import UNetConfig, VAEConfig


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
    unet_cfg = UNetConfig.tiny()
    assert unet_cfg.cross_attention_dim == 24 and unet_cfg.text_embeds_dim == 16
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=diffusers.AutoencoderKL(**VAEConfig.tiny().to_diffusers()),
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
