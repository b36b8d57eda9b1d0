"""TFDS builder ``synbokeh``: precomputed pairs from a ``bokehdiff-jax synth`` folder as ArrayRecord.

Build (no TensorFlow needed: tensors are stored zlib-compressed NumPy arrays)::

    from bokehdiff_jax.data.tfds import build_synbokeh
    build_synbokeh("path/to/synth_out", data_dir="~/tensorflow_datasets")

or with the TFDS API: ``Synbokeh(data_dir=...).download_and_prepare(download_config=
tfds.download.DownloadConfig(manual_dir="path/to/synth_out"))``. Read it as a random-access source:
``tfds.data_source("synbokeh", data_dir=...)["train"]`` (raw uint8/uint16 records) or
``SynbokehSource(data_dir)`` (float32 examples with the same keys as ``synthesize``, ready for
``bokehdiff_jax.data.loader.make_loader``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from bokehdiff_jax.data.items import decode_record, list_items, read_record
from bokehdiff_jax.errors import InputError


class Synbokeh(tfds.core.GeneratorBasedBuilder):
    """Paired all-in-focus / bokeh images with disparity, focus and blur strength (SPEC section 4)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: pairs from `bokehdiff-jax synth`."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Point manual_dir at a `bokehdiff-jax synth --out` folder."

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS looks the builder's folder up through ``importlib_resources``, a package it does not
        # install; this file is the answer (used to find checksums, of which this builder has none).
        from etils import epath

        return epath.Path(__file__)

    def __init__(self, *, file_format: str = "array_record", **kwargs: Any) -> None:
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        t = tfds.features.Tensor
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.splitlines()[0],
            features=tfds.features.FeaturesDict(
                {
                    "aif": t(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),  # sRGB, 8 bit
                    "bokeh": t(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
                    "disparity": t(shape=(None, None), dtype=np.uint16, encoding="zlib"),  # value / 65535
                    "focus": t(shape=(), dtype=np.float32),  # disparity in focus
                    "strength": t(shape=(), dtype=np.float32),  # K, pixels
                    "index": t(shape=(), dtype=np.int64),  # example index of the synth run
                    "meta": t(shape=(), dtype=np.object_),  # the item's meta.json (UTF-8 JSON bytes)
                }
            ),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        folder = Path(dl_manager.manual_dir)
        return {"train": self._generate_examples(folder)}

    def _generate_examples(self, folder: Path):
        items = list_items(folder)
        if not items:
            raise InputError(f"{folder} holds no finished synth items")
        for item in items:
            record = read_record(item)
            yield item.name, dict(record, meta=json.dumps(record["meta"]).encode())


def build_synbokeh(synth_dir: str | os.PathLike, data_dir: str | os.PathLike) -> Synbokeh:
    """Builds ``synbokeh`` from a ``synth`` output folder into ``data_dir``; returns the builder."""
    synth_dir = Path(synth_dir)
    if not (synth_dir / "items").is_dir():
        raise InputError(f"{synth_dir} is not a synth output folder (no items/ inside)")
    builder = Synbokeh(data_dir=os.fspath(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(synth_dir))
    )
    return builder


class SynbokehSource:
    """``synbokeh`` (built, ArrayRecord) as a grain random-access source of decoded float32 examples."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train") -> None:
        self.data_dir = os.fspath(data_dir)
        self.split = split
        self._source = None
        self._len = len(self._open())

    def _open(self):
        if self._source is None:
            self._source = tfds.data_source(
                "synbokeh",
                data_dir=self.data_dir,
                split=self.split,
                builder_kwargs={"file_format": "array_record"},
            )
        return self._source

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return decode_record(self._open()[int(index)])

    def __getstate__(self) -> dict[str, Any]:
        # The open ArrayRecord readers stay behind; each worker process reopens the files.
        return dict(self.__dict__, _source=None)

    def __repr__(self) -> str:
        return f"SynbokehSource({self.data_dir!r}, split={self.split!r}, n={self._len})"
