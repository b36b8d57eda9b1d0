"""diffusers <-> Flax conversion: a declarative key table (``mapping``), a torch-free streaming
safetensors reader/writer (``safetensors_io``), our checkpoint format and loaders (``checkpoint``;
the format is documented there), and the fixed-prompt embeddings (``prompt``, the only torch user).

    module, variables = load_unet("converted/" or "sdxl-pipeline/unet", dtype=jnp.bfloat16)
    eps = module.apply(variables, sample_bhwc, t, context_bsc, text_embeds, time_ids)
"""

from bokehdiff_jax.convert.checkpoint import (
    from_diffusers,
    load_prompt_embeds,
    load_unet,
    load_vae,
    to_diffusers,
)
from bokehdiff_jax.convert.mapping import MappingError, diffusers_to_flax, flax_to_diffusers

__all__ = [
    "MappingError",
    "diffusers_to_flax",
    "flax_to_diffusers",
    "from_diffusers",
    "load_prompt_embeds",
    "load_unet",
    "load_vae",
    "to_diffusers",
]
