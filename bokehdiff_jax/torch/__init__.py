"""The PyTorch side of the project (the ``torch`` extra only; no core module imports it): plain-torch
references used by parity tests and the PyTorch halves of benchmarks.

- ``lpips``: LPIPS-VGG in plain torch (13 convolutions + linear heads), from the same verified weights.
- ``losses``: MSE and the multi-scale edge loss in torch (the released code's formula and the paper's).
- ``pisa``: PISA for inference as a diffusers attention processor, installed by module path.
- ``pipeline``: ``BokehDiffPipeline.from_export(DIR, base=PATH)``, the one-step model from an export.
"""


def __getattr__(name: str):
    # Lazy, so importing the LPIPS reference does not pull diffusers and the pipeline in.
    if name == "BokehDiffPipeline":
        from bokehdiff_jax.torch.pipeline import BokehDiffPipeline

        return BokehDiffPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
