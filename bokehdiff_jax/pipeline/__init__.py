"""Inference with a trained BokehDiff model (issue 13 section 1).

- ``OneStep.from_checkpoint(path)``: a training workdir or checkpoint, a trained-model folder or an export
  folder, on the base weights it names -> a jitted, deterministic callable ``(image [B, H, W, 3] in
  [-1, 1], disparity [B, H, W], focus [B], strength [B]) -> image``; one compilation per input shape
  (reused across focus, strength and focal-stack frames); whole images at any size (the exact tiled VAE
  around a one-pass U-Net with sparse PISA when the image is large).
- ``load_model``: the model and its variables from any of those sources.
- ``render_folder``: folder mode with a progress bar that resumes after an interruption.
"""

from bokehdiff_jax.pipeline.folder import pair_files, render_folder
from bokehdiff_jax.pipeline.load import LoadedModel, load_model, source_kind
from bokehdiff_jax.pipeline.onestep import OneStep, inference_model

__all__ = [
    "LoadedModel",
    "OneStep",
    "inference_model",
    "load_model",
    "pair_files",
    "render_folder",
    "source_kind",
]
