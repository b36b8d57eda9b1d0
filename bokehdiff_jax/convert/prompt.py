"""The fixed-prompt conditioning of SPEC section 3, computed once with transformers' PyTorch CLIP.

This is the only place the package imports torch (the optional ``torch`` extra). It follows
diffusers' SDXL ``encode_prompt``: each tokenizer pads/truncates to its ``model_max_length``; each
encoder's penultimate hidden state is taken and the two are concatenated along channels; the pooled
``text_embeds`` is ``text_encoder_2``'s projected output.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bokehdiff_jax.errors import InputError

FIXED_PROMPT = "an excellent photo with a large aperture"


def _variant_for(folder: Path, variant: str | None) -> str | None:
    """The weights variant to read from a transformers model folder: ``variant`` when given, else the
    full-precision files, else the ``fp16`` variant (the rule ``open_diffusers_weights`` follows)."""
    if variant is not None:
        return variant
    plain = ("model.safetensors", "model.safetensors.index.json")
    fp16 = ("model.fp16.safetensors", "model.safetensors.index.fp16.json")
    if not any((folder / n).is_file() for n in plain) and any((folder / n).is_file() for n in fp16):
        return "fp16"
    return None


def encode_prompt(
    pipeline: str | os.PathLike, prompt: str = FIXED_PROMPT, *, variant: str | None = None
) -> dict[str, np.ndarray]:
    """Encodes ``prompt`` with a pipeline folder's two CLIP text encoders (weights ``variant`` as for
    the U-Net and VAE: ``"fp16"``, or None for full precision falling back to ``fp16``).

    Returns ``{"prompt_embeds": [1, L, C1 + C2], "text_embeds": [1, P]}`` in float32 (SDXL: L = 77,
    C1 + C2 = 768 + 1280 = 2048, P = 1280).
    """
    try:
        import torch
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection
    except ImportError as e:
        raise InputError(
            f"computing the prompt embeddings needs PyTorch and transformers ({e.name} is missing): "
            "install the torch extra (pip install 'bokehdiff_jax[torch]'), or convert unet/ and vae/ alone"
        ) from None
    root = Path(pipeline)
    hidden, pooled = [], None
    for tok_dir, enc_dir, cls in (
        ("tokenizer", "text_encoder", CLIPTextModel),
        ("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection),
    ):
        try:
            tokenizer = AutoTokenizer.from_pretrained(root / tok_dir, local_files_only=True)
            encoder = cls.from_pretrained(
                root / enc_dir,
                local_files_only=True,
                use_safetensors=True,
                variant=_variant_for(root / enc_dir, variant),
                torch_dtype=torch.float32,  # fp16 weights are encoded in float32 like the rest
            ).eval()
        except (OSError, ValueError) as e:
            raise InputError(
                f"{root}: cannot load {tok_dir}/ or {enc_dir}/ ({str(e).splitlines()[0]})"
            ) from None
        ids = tokenizer(
            [prompt],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2].float().numpy())
        if cls is CLIPTextModelWithProjection:
            pooled = out.text_embeds.float().numpy()
    return {"prompt_embeds": np.concatenate(hidden, axis=-1), "text_embeds": pooled}
