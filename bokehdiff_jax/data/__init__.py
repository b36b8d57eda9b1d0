"""Training data: reading inputs (``io``), paired-data synthesis (``synthesis``), procedural
foregrounds (``procedural``), the Grain pipeline (``pipeline``), the TFDS builder (``tfds``) and the
``synth`` command (``cli``). Only the light, NumPy-level pieces are imported here; ``pipeline`` (grain)
and ``tfds`` load on demand."""

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
