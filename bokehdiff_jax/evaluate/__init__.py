"""Evaluation (``bokehdiff-jax evaluate``): metrics, data sources, methods, runs, robustness, reports.

- ``metrics``: PSNR and SSIM (NumPy, equal to scikit-image's), LPIPS-VGG (``losses.lpips``) and DISTS
  (``dists``, weights from ``dists_weights``), all behind ``Scorer``.
- ``sources``: the held-out synthetic set, ``synth`` folders, EBB! and BLB from their on-disk layouts;
  ``datasets.open_source`` parses ``--data``; ``tfds_builders``: TFDS builders ``ebb_val294``, ``blb``.
- ``methods``: ``make_renderer`` (identity, classical, ``model:PATH``): the one integration point.
- ``robustness``: disparity erosion/dilation at depth edges, summary CSV and plot.
- ``run``: evaluate a source with methods, or two folders; ``report``: CSV, JSON, HTML.
"""

from bokehdiff_jax.evaluate.datasets import SOURCE_KINDS, SourceOptions, open_source
from bokehdiff_jax.evaluate.methods import METHOD_KINDS, Method, Renderer, make_renderer, parse_method
from bokehdiff_jax.evaluate.metrics import METRICS, Scorer, SSIMConfig, psnr, ssim
from bokehdiff_jax.evaluate.robustness import perturb_disparity
from bokehdiff_jax.evaluate.run import evaluate_folders, evaluate_source
from bokehdiff_jax.evaluate.sources import (
    BlbSource,
    EbbSource,
    Example,
    HeldoutSynthetic,
    Source,
    SynthFolder,
)

__all__ = [
    "METHOD_KINDS",
    "METRICS",
    "SOURCE_KINDS",
    "BlbSource",
    "EbbSource",
    "Example",
    "HeldoutSynthetic",
    "Method",
    "Renderer",
    "SSIMConfig",
    "Scorer",
    "Source",
    "SourceOptions",
    "SynthFolder",
    "evaluate_folders",
    "evaluate_source",
    "make_renderer",
    "open_source",
    "parse_method",
    "perturb_disparity",
    "psnr",
    "ssim",
]
