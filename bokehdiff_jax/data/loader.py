"""Grain input pipeline: random-access sources, random crops, batching, workers, checkpointable state.

Two sources: ``SynthSource`` synthesizes example ``i`` on the fly (``synthesize(config, fg, bg, seed, i)``,
so record ``i`` never depends on which worker or host reads it), and ``FolderSource`` reads a
precomputed ``bokehdiff-jax synth`` folder. ``make_loader`` wraps either in a ``grain.DataLoader``:
a seeded ``IndexSampler`` (shuffle, epochs), sharded per JAX process, a random crop whose RNG grain
derives from the sampler seed and the record, and batching. The loader's iterator exposes
``get_state()`` / ``set_state()``: restoring the state yields exactly the batches that would have come
next, so training resumes exactly (store the state with the checkpoint).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from bokehdiff_jax.data.synthesis import Source, SynthConfig, synthesize
from bokehdiff_jax.errors import InputError

# Keys holding [H, W, ...] maps: cropped together.
SPATIAL_KEYS = ("aif", "bokeh", "disparity", "coc")


class SynthSource:
    """On-the-fly synthesis as a grain random-access source of ``length`` examples.

    ``worker_platform``: JAX platform forced in grain worker processes (a source unpickled in a fresh
    process, before JAX is imported there). ``"cpu"`` by default so loader workers never compete with
    the training process for accelerator memory; ``None`` leaves JAX's default.
    """

    def __init__(
        self,
        config: SynthConfig,
        fg_sources: Sequence[Source],
        bg_sources: Sequence[Source],
        *,
        seed: int,
        length: int,
        worker_platform: str | None = "cpu",
    ) -> None:
        if length < 1:
            raise InputError(f"a synth source needs length >= 1, got {length}")
        if not fg_sources or not bg_sources:
            raise InputError("a synth source needs at least one foreground and one background")
        self.config = config
        self.fg = tuple(fg_sources)
        self.bg = tuple(bg_sources)
        self.seed = int(seed)
        self.length = int(length)
        self.worker_platform = worker_platform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range [0, {self.length})")
        out = synthesize(self.config, self.fg, self.bg, self.seed, index)
        return dict(out, index=np.int64(index))

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # Unpickling happens in grain's worker processes: pin their JAX platform before JAX loads.
        if self.worker_platform and "jax" not in sys.modules:
            os.environ["JAX_PLATFORMS"] = self.worker_platform

    def __repr__(self) -> str:
        return (
            f"SynthSource(size={self.config.size}, fg={len(self.fg)}, bg={len(self.bg)}, "
            f"seed={self.seed}, length={self.length})"
        )


class FolderSource:
    """A precomputed ``synth`` output folder as a random-access source (items in index order)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        from bokehdiff_jax.data.items import list_items

        self.folder = Path(folder)
        self.items = [str(p) for p in list_items(self.folder)]
        if not self.items:
            raise InputError(f"{folder} holds no finished synth items")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        from bokehdiff_jax.data.items import read_item

        return read_item(self.items[int(index)])

    def __repr__(self) -> str:
        return f"FolderSource({str(self.folder)!r}, n={len(self.items)})"


@dataclasses.dataclass(frozen=True)
class RandomCrop(grain.transforms.RandomMap):
    """Crops all spatial maps of an example at the same random ``size x size`` window.

    The CoC radius is in pixels, so a crop (no resize) keeps ``strength`` and ``coc`` valid.
    """

    size: int

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        h, w = element["aif"].shape[:2]
        if self.size > min(h, w):
            raise InputError(f"crop {self.size} is larger than the {w}x{h} example")
        y0, x0 = int(rng.integers(h - self.size + 1)), int(rng.integers(w - self.size + 1))
        out = dict(element)
        for k in SPATIAL_KEYS:
            if k in out:
                out[k] = np.ascontiguousarray(out[k][y0 : y0 + self.size, x0 : x0 + self.size])
        return out


def process_shard_options(drop_remainder: bool = True) -> grain.sharding.ShardOptions:
    """Shards by JAX process: shard ``jax.process_index()`` of ``jax.process_count()``."""
    import jax

    return grain.sharding.ShardOptions(
        shard_index=jax.process_index(), shard_count=jax.process_count(), drop_remainder=drop_remainder
    )


def make_loader(
    source: Any,
    *,
    batch_size: int,
    seed: int,
    crop: int | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 1,
    shard_options: grain.sharding.ShardOptions | None = None,
    drop_remainder: bool = True,
) -> grain.DataLoader:
    """A deterministic grain ``DataLoader`` over ``source``: sample, random crop, batch.

    ``shard_options``: defaults to this JAX process's shard (``process_shard_options()``).
    ``worker_count``: grain worker processes (0 = in this process). ``num_epochs=None`` repeats forever.
    Batches are dicts of stacked NumPy arrays: ``aif [B, S, S, 3]``, ..., ``focus [B]``, ``index [B]``.
    Same ``seed``, sharding and ``worker_count`` -> same batches (grain batches inside each worker, so
    batch composition depends on the worker count; each record itself never does).
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if shard_options is None:
        shard_options = process_shard_options()
    if worker_count > 0:
        # Grain's worker pool reads absl flags; programs not started by absl.app never parse them.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=shard_options,
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=int(seed),
    )
    ops: list[Any] = []
    if crop is not None:
        ops.append(RandomCrop(int(crop)))
    ops.append(grain.transforms.Batch(batch_size=batch_size, drop_remainder=drop_remainder))
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=ops,
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
    )
