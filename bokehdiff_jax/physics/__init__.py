"""Pure-jnp optics shared by PISA, the renderers and the data synthesis (no Flax here)."""

from bokehdiff_jax.physics.optics import (
    area_resize,
    bilinear_sample,
    coc_radius,
    defocus_map,
    focus_at,
    focus_in_box,
    linear_to_srgb,
    srgb_to_linear,
)

__all__ = [
    "area_resize",
    "bilinear_sample",
    "coc_radius",
    "defocus_map",
    "focus_at",
    "focus_in_box",
    "linear_to_srgb",
    "srgb_to_linear",
]
