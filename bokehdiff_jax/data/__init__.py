"""Training data: paired-data synthesis (``synthesis``), procedural foregrounds (``procedural``), the
synth item format (``items``), the Grain loader (``loader``), the TFDS builder (``tfds``) and the
``synth`` command (``cli``). Only the light, NumPy-level pieces are imported here; ``loader`` (grain)
and ``tfds`` load on demand. Image and disparity files are read by ``bokehdiff_jax.io``."""

from bokehdiff_jax.data.procedural import procedural_foreground
from bokehdiff_jax.data.synthesis import (
    InputReport,
    Inputs,
    Scene,
    SynthConfig,
    sample_scene,
    scan_inputs,
    synthesize,
    synthesize_with_meta,
)

__all__ = [
    "InputReport",
    "Inputs",
    "Scene",
    "SynthConfig",
    "procedural_foreground",
    "sample_scene",
    "scan_inputs",
    "synthesize",
    "synthesize_with_meta",
]
