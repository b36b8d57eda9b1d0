"""Optics shared by PISA, the renderers and the data synthesis (no Flax here): pure-jnp conventions
(``optics``), host-side focus resolution and radius sizing (``focus``), occlusion."""

from bokehdiff_jax.physics.focus import capped_radius, focus_at, focus_in_box, needed_radius, resolve_focus
from bokehdiff_jax.physics.optics import (
    area_resize,
    bilinear_sample,
    coc_radius,
    defocus_map,
    linear_to_srgb,
    srgb_to_linear,
)

__all__ = [
    "area_resize",
    "bilinear_sample",
    "capped_radius",
    "coc_radius",
    "defocus_map",
    "focus_at",
    "focus_in_box",
    "linear_to_srgb",
    "needed_radius",
    "resolve_focus",
    "srgb_to_linear",
]
