"""diffusers <-> Flax conversion: a declarative key table (``mapping``), our weights format and
loaders (``weights``; the format is documented there; files are read by ``io.safetensors_io``), the
peft <-> Flax LoRA mapping (``lora``) and the fixed-prompt embeddings (``prompt``, the only torch user).

    module, variables = load_unet("converted/" or "sdxl-pipeline/unet", dtype=jnp.bfloat16)
    eps = module.apply(variables, sample_bhwc, t, context_bsc, text_embeds, time_ids)
"""

from bokehdiff_jax.convert.lora import flax_lora_to_peft, peft_to_flax_lora
from bokehdiff_jax.convert.mapping import MappingError, diffusers_to_flax, flax_to_diffusers
from bokehdiff_jax.convert.weights import (
    from_diffusers,
    load_prompt_embeds,
    load_unet,
    load_vae,
    to_diffusers,
)

__all__ = [
    "MappingError",
    "diffusers_to_flax",
    "flax_lora_to_peft",
    "flax_to_diffusers",
    "from_diffusers",
    "load_prompt_embeds",
    "load_unet",
    "load_vae",
    "peft_to_flax_lora",
    "to_diffusers",
]
