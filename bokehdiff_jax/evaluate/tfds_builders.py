"""TFDS builders for the public benchmarks, reading their on-disk layouts from a manual folder.

- ``ebb_val294``: EBB! pairs (``sources.EbbSource``'s layout). ``manual_dir`` holds ``original/``,
  ``bokeh/``, ``disparity/`` (user-supplied, ``<id>.png/.npy``), and optionally ``ids.txt`` (the Val294
  list; default: every pair) and ``params.json`` (per-image focus and strength; without it the records
  store NaN and readers supply one ``--focus``/``--strength``). Images are stored as the 8-bit JPEG
  decodes, not exposure-aligned (``sources.TfdsSource`` aligns on reading).
- ``blb``: BokehMe's BLB (``sources.BlbSource``'s layout), one config per blur amount ``level1`` ..
  ``level5`` (the paper's "BLB Level 5" is ``blb/level5``); every refocused disparity of every scene is a
  record; images are the clipped sRGB float32 of the EXR renders.

Both have one split, ``test``, stored as ArrayRecord. Records hold an ``Example``'s fields: ``name``,
``image``, ``target``, ``disparity`` (float32 in [0, 1]), ``focus``, ``strength``. Build::

    from bokehdiff_jax.evaluate.tfds_builders import build
    build("blb/level5", manual_dir="BLB/", data_dir="~/tensorflow_datasets")

and evaluate with ``bokehdiff-jax evaluate --data tfds:blb/level5 --tfds-dir ~/tensorflow_datasets ...``.
"""

from __future__ import annotations

import abc
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.evaluate.sources import BlbSource, EbbSource, Example, exposure_align


class _Benchmark(tfds.core.GeneratorBasedBuilder):
    """Shared parts: ArrayRecord files, the test split from ``manual_dir``, the record layout."""

    IMAGE_DTYPE: Any = np.uint8

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS finds a builder's folder through importlib_resources, which it does not install here.
        from etils import epath

        return epath.Path(__file__)

    def __init__(self, *, file_format: str = "array_record", **kwargs: Any) -> None:
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        t = tfds.features.Tensor
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").splitlines()[0],
            features=tfds.features.FeaturesDict(
                {
                    "name": t(shape=(), dtype=np.object_),
                    "image": t(shape=(None, None, 3), dtype=self.IMAGE_DTYPE, encoding="zlib"),
                    "target": t(shape=(None, None, 3), dtype=self.IMAGE_DTYPE, encoding="zlib"),
                    "disparity": t(shape=(None, None), dtype=np.float32, encoding="zlib"),
                    "focus": t(shape=(), dtype=np.float32),
                    "strength": t(shape=(), dtype=np.float32),
                }
            ),
            supervised_keys=None,
        )

    @abc.abstractmethod
    def _source(self, folder: Path) -> EbbSource | BlbSource:
        """The benchmark's reader over the manual folder (each builder names its own)."""

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        return {"test": self._generate_examples(Path(dl_manager.manual_dir))}

    def _record(self, ex: Example) -> dict[str, Any]:
        store = (lambda x: np.round(x * 255).astype(np.uint8)) if self.IMAGE_DTYPE == np.uint8 else np.float32
        return {
            "name": ex.name.encode(),
            "image": store(ex.image),
            "target": store(ex.target),
            "disparity": ex.disparity.astype(np.float32),
            "focus": np.float32(ex.focus),
            "strength": np.float32(ex.strength),
        }

    def _generate_examples(self, folder: Path):
        src = self._source(folder)
        for i in range(len(src)):
            ex = src[i]
            yield ex.name, self._record(ex)


class EbbVal294(_Benchmark):
    """EBB! (Ignatov et al. 2020) pairs, e.g. the Val294 subset, with user-supplied disparity."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Point manual_dir at an EBB! split folder holding original/, bokeh/ and your disparity/ maps "
        "(<id>.png/.npy), optionally ids.txt (the Val294 ids) and params.json (focus, strength per id)."
    )

    def _source(self, folder: Path) -> EbbSource:
        ids = folder / "ids.txt"
        params = folder / "params.json"
        self._known = params.is_file()
        # Without parameters, the records say focus and strength are unknown (NaN); readers supply them.
        kwargs = {"params": params} if self._known else {"focus": 0.0, "strength": 0.0}
        return EbbSource(folder, ids=ids if ids.is_file() else None, exposure_align=False, **kwargs)

    def _record(self, ex: Example) -> dict[str, Any]:
        r = super()._record(ex)
        if not self._known:
            r["focus"] = r["strength"] = np.float32(np.nan)
        return r


class Blb(_Benchmark):
    """BLB (Peng et al. 2022, BokehMe): Blender renders with exact disparity, focus and blur amount."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    IMAGE_DTYPE = np.float32
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=f"level{n}", description=f"blur amount {n} of 5") for n in range(1, 6)
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Point manual_dir at the BLB folder of the BokehMe release (one folder per scene)."
    )

    def _source(self, folder: Path) -> BlbSource:
        return BlbSource(folder, level=int(self.builder_config.name.removeprefix("level")) - 1)


class TfdsSource:
    """A built TFDS dataset of this module's builders (``ebb_val294``, ``blb/level5`` ...), split
    ``test``. Records store an :class:`Example`'s fields; NaN focus/strength (an EBB! build without a
    parameter file) take ``focus``/``strength``, and ``exposure_align`` applies to EBB! records."""

    def __init__(
        self,
        name: str,
        data_dir: str | os.PathLike,
        *,
        focus: float | None = None,
        strength: float | None = None,
        exposure_align: bool = True,
    ) -> None:
        try:
            self._source = tfds.data_source(
                name,
                data_dir=os.fspath(data_dir),
                split="test",
                builder_kwargs={"file_format": "array_record"},
            )
        except Exception as e:  # TFDS raises many kinds for a missing or unbuilt dataset
            raise InputError(f"tfds:{name} in {data_dir}: cannot open ({type(e).__name__}: {e})") from None
        self.name, self.focus, self.strength, self.exposure_align = name, focus, strength, exposure_align
        self.description = f"TFDS {name} ({len(self._source)} examples)"

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Example:
        r = self._source[int(index)]
        as01 = lambda x: np.asarray(x, np.float32) / (255.0 if np.asarray(x).dtype == np.uint8 else 1.0)
        image, target = as01(r["image"]), as01(r["target"])
        focus, strength = float(r["focus"]), float(r["strength"])
        if math.isnan(focus) or math.isnan(strength):
            if self.focus is None or self.strength is None:
                raise InputError(f"tfds:{self.name} stores no focus/strength: give --focus and --strength")
            focus, strength = float(self.focus), float(self.strength)
        name = r["name"].decode() if isinstance(r["name"], bytes) else str(r["name"])
        if self.exposure_align and self.name.startswith("ebb"):
            image = exposure_align(image, target)
        return Example(name, image, np.asarray(r["disparity"], np.float32), focus, strength, target)


def build(name: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
    """Builds ``ebb_val294`` or ``blb/levelN`` from ``manual_dir`` into ``data_dir``; returns the builder."""
    base, _, config = name.partition("/")
    if base == "ebb_val294" and not config:
        builder: tfds.core.DatasetBuilder = EbbVal294(data_dir=os.fspath(data_dir))
    elif base == "blb" and config in {f"level{n}" for n in range(1, 6)}:
        builder = Blb(config=config, data_dir=os.fspath(data_dir))
    else:
        raise InputError(f"unknown benchmark {name!r}: expected ebb_val294 or blb/level1..level5")
    if not Path(manual_dir).is_dir():
        raise InputError(f"{manual_dir}: no such folder")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )
    return builder
