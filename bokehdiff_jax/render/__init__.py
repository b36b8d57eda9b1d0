"""Physically based lens blur with no model weights: the scatter renderer (one image + disparity),
the layered thin-lens ray tracer (ground truth for synthesis) and focal stacks. All jitted, in JAX."""

from bokehdiff_jax.render.layered import LayeredConfig, composite_layers, render_layers
from bokehdiff_jax.render.scatter import ScatterConfig, render_scatter
from bokehdiff_jax.render.stack import focal_stack

__all__ = [
    "LayeredConfig",
    "ScatterConfig",
    "composite_layers",
    "focal_stack",
    "render_layers",
    "render_scatter",
]
