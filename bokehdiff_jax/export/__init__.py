"""Back to PyTorch: a trained model (our trained-model folder or a training workdir) -> diffusers/peft
files (``bundle``); imports of PyTorch weights live in ``convert.importers`` (``bokehdiff-jax convert
from-bokehdiff`` / ``from-lora``)."""
