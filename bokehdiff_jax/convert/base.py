"""The base of the one-step model in one call: U-Net and VAE configs, their (frozen) weights and the
fixed-prompt embeddings, from our converted checkpoint (or a diffusers folder) or from a seeded random
init of given configs.

It lives in ``convert`` because it reads checkpoints; ``models`` never imports ``convert``.

::

    base = load_base("sdxl_jax/", dtype=jnp.bfloat16)
    base = load_base("random", unet_config=UNetConfig.tiny(), vae_config=VAEConfig.tiny(), seed=0)
    model = BokehDiff.create(base.unet_config, base.vae_config, lora=LoRAConfig())
    variables = model.add_lora(base.variables, jax.random.key(0))
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bokehdiff_jax.convert.weights import PROMPT_EMBEDS, load_prompt_embeds, load_unet, load_vae, parse_dtype
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.bokehdiff import BokehDiff, Variables, random_prompt_embeds
from bokehdiff_jax.models.configs import UNetConfig, VAEConfig

RANDOM = "random"
_TEXT_ENCODER_DIRS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


@dataclasses.dataclass(frozen=True, eq=False)
class Base:
    """A loaded base model.

    Attributes:
      unet_config, vae_config: the architectures.
      variables: ``{"unet": {"params"}, "vae": {"params"}, "cond": {"prompt_embeds", "text_embeds"}}``
        (the layout of ``models.bokehdiff``; no LoRA: ``BokehDiff.add_lora`` adds it).
      prompt_source: where the prompt embeddings came from: ``"checkpoint"``, ``"text encoders"`` or
        ``"random (seed N)"``.
    """

    unet_config: UNetConfig
    vae_config: VAEConfig
    variables: Variables
    prompt_source: str


def _config(config: Any, cls: type, what: str) -> Any:
    if config is None:
        raise InputError(f'load_base("random") needs a {what} config (a {cls.__name__}, dict or path)')
    return config if isinstance(config, cls) else cls.from_diffusers(config)


def _checked_prompt(
    prompt: dict[str, np.ndarray], unet_config: UNetConfig, what: str
) -> dict[str, jax.Array]:
    """The embeddings as float32 arrays, their shapes checked against the U-Net they condition."""
    want = {
        "prompt_embeds": (1, None, unet_config.cross_attention_dim),
        "text_embeds": (1, unet_config.text_embeds_dim),
    }
    if set(prompt) != set(want):
        raise InputError(f"{what}: prompt embeddings hold {sorted(prompt)}, expected {sorted(want)}")
    for k, shape in want.items():
        got = tuple(prompt[k].shape)
        if len(got) != len(shape) or any(s is not None and g != s for g, s in zip(got, shape, strict=True)):
            raise InputError(f"{what}: {k} has shape {got}, expected {shape} (None: any) for this U-Net")
    return {k: jnp.asarray(v, jnp.float32) for k, v in prompt.items()}


def _random_prompt(unet_config: UNetConfig, seed: int, reason: str) -> tuple[dict, str]:
    warnings.warn(
        f"{reason}: using fixed random prompt embeddings from seed {seed} (fine for a model trained from "
        "scratch; a pretrained SDXL needs the real ones: convert its pipeline folder with the text encoders)",
        stacklevel=3,
    )
    return random_prompt_embeds(unet_config, seed), f"random (seed {seed})"


def load_base(
    source: str | os.PathLike,
    *,
    unet_config: UNetConfig | dict | str | os.PathLike | None = None,
    vae_config: VAEConfig | dict | str | os.PathLike | None = None,
    dtype: Any = None,
    seed: int = 0,
    prompt_seed: int = 0,
) -> Base:
    """The base model from ``source``.

    Args:
      source: our checkpoint folder, a diffusers pipeline folder (``unet/`` and ``vae/``), or the string
        ``"random"`` for a seeded random init of ``unet_config`` and ``vae_config`` (a folder literally
        named ``random`` is ``"./random"``).
      unet_config, vae_config: the architectures for ``"random"`` (``UNetConfig``/``VAEConfig``, a diffusers
        config dict, or a ``config.json`` path); ignored otherwise.
      dtype: parameter dtype (default float32), e.g. ``jnp.bfloat16`` or ``"bf16"``.
      seed: the random init's seed.
      prompt_seed: seed of the random prompt embeddings used when ``source`` has none (with a warning).

    The prompt embeddings come from our checkpoint's ``prompt_embeds.safetensors``, else from the
    pipeline folder's text encoders (needs the ``torch`` extra), else are random (``random_prompt_embeds``).
    """
    np_dtype = parse_dtype(dtype) if dtype is not None else np.dtype(np.float32)
    if isinstance(source, str) and source == RANDOM:
        ucfg = _config(unet_config, UNetConfig, "U-Net")
        vcfg = _config(vae_config, VAEConfig, "VAE")
        model = BokehDiff.create(ucfg, vcfg, param_dtype=jnp.dtype(np_dtype))
        variables = model.init_base_params(jax.random.key(seed))
        prompt, prompt_source = _random_prompt(ucfg, prompt_seed, "random base")
        return Base(ucfg, vcfg, {**variables, "cond": _checked_prompt(prompt, ucfg, RANDOM)}, prompt_source)

    path = Path(source)
    unet, unet_vars = load_unet(path, np_dtype)
    vae, vae_vars = load_vae(path, np_dtype)
    if (path / PROMPT_EMBEDS).is_file():
        prompt, prompt_source = load_prompt_embeds(path), "checkpoint"
    elif all((path / d).is_dir() for d in _TEXT_ENCODER_DIRS):
        from bokehdiff_jax.convert.prompt import FIXED_PROMPT, encode_prompt

        prompt, prompt_source = encode_prompt(path, FIXED_PROMPT), "text encoders"
    else:
        prompt, prompt_source = _random_prompt(unet.config, prompt_seed, f"{path} has no {PROMPT_EMBEDS}")
    variables = {"unet": unet_vars, "vae": vae_vars, "cond": _checked_prompt(prompt, unet.config, str(path))}
    return Base(unet.config, vae.config, variables, prompt_source)
