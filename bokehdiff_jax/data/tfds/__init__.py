"""TFDS builder ``synbokeh`` for precomputed pairs (see ``synbokeh.py``). Imports tensorflow_datasets."""

from bokehdiff_jax.data.tfds.synbokeh import Synbokeh, SynbokehSource, build_synbokeh

__all__ = ["Synbokeh", "SynbokehSource", "build_synbokeh"]
