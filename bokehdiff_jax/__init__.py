"""bokehdiff_jax: BokehDiff (ICCV 2025) in JAX/Flax.

Subpackages: ``physics`` (optics conventions), ``pisa`` (physics-inspired self-attention),
``models`` (Flax SDXL U-Net and VAE), ``convert`` (diffusers <-> Flax), ``render`` (classical
renderers), ``data`` (paired-data synthesis and pipelines), ``bench`` (benchmarks).
"""

__version__ = "0.1.0"
