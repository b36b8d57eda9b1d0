"""The training input pipeline on Grain: one global stream of examples, each process reading its rows.

The stream is a function of the config alone, whatever the number of processes: example ``i`` of the
stream is record ``shuffle_seed(i)`` of the source (reshuffled every epoch), randomly cropped with an
RNG that grain derives from the seed and ``i``, and global batch ``s`` is stream positions
``s * B .. s * B + B - 1`` in row order. Each process synthesizes or reads only the rows its devices
hold (``process_rows``), so two hosts with two devices each see the same global batches, row for row,
as one host with four devices, and the per-step losses agree.

The iterator is a grain ``DatasetIterator``: ``get_state()`` / ``set_state()`` (stored with every
checkpoint by ``train.checkpoint``) resume the stream at the exact next batch.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from bokehdiff_jax.data.loader import FolderSource, RandomCrop, SynthSource
from bokehdiff_jax.data.synthesis import SynthConfig, scan_inputs
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.train.objective import BATCH_KEYS

SAMPLES = "samples"
_PROCEDURAL_KINDS = ("mixed", "hair", "fur", "whiskers")


def synth_config(config: ml_collections.ConfigDict) -> SynthConfig:
    d = config.data
    return SynthConfig(
        size=d.synth_size,
        base_strength=float(d.base_strength),
        log2_times=tuple(float(x) for x in d.log2_times),
        rays_max=d.rays_max,
        min_bg_side=min(64, d.synth_size),
        min_fg_side=min(8, d.synth_size),
    )


def synth_inputs(config: ml_collections.ConfigDict, synth: SynthConfig) -> tuple[list[Any], list[Any]]:
    """Foreground and background sources: the embedded samples (``data.fg = data.bg = "samples"``:
    scikit-image's horse and logo plus ``data.procedural`` procedural hair/fur foregrounds, its photos as
    backgrounds) or two folders (scanned, sorted, unusable files reported by ``scan_inputs``)."""
    d = config.data
    if (d.fg == SAMPLES) != (d.bg == SAMPLES):
        raise InputError('config data.fg and data.bg: give two folders, or "samples" for both')
    if d.fg != SAMPLES:
        inputs = scan_inputs(d.fg, d.bg, synth)
        return list(inputs.fg), list(inputs.bg)
    from bokehdiff_jax.data.procedural import procedural_foreground
    from bokehdiff_jax.data.samples import horse_rgba, logo_rgba, photo_paths

    fg = [horse_rgba(), logo_rgba()] + [
        procedural_foreground((320, 320), config.seed * 1000 + i, kind=_PROCEDURAL_KINDS[i % 4])
        for i in range(d.procedural)
    ]
    return fg, [str(p) for p in photo_paths()]


def make_source(config: ml_collections.ConfigDict) -> Any:
    """The random-access source: on-the-fly synthesis or a ``synth`` output folder."""
    if config.data.source == "synth":
        synth = synth_config(config)
        fg, bg = synth_inputs(config, synth)
        return SynthSource(synth, fg, bg, seed=config.seed, length=config.data.length)
    return FolderSource(config.data.source)


class ProcessRows(grain.MapDataset):
    """The rows ``[offset, offset + local)`` of every global batch of ``global_batch`` consecutive
    elements of ``parent``: element ``i`` is ``parent[(i // local) * global_batch + offset + i % local]``."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, local: int, offset: int) -> None:
        super().__init__(parent)
        if not (0 <= offset and offset + local <= global_batch):
            raise ValueError(f"rows [{offset}, {offset + local}) outside a batch of {global_batch}")
        self._global, self._local, self._offset = global_batch, local, offset

    def __len__(self) -> int:
        return (len(self._parent) // self._global) * self._local

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        s, k = divmod(int(index), self._local)
        return self._parent[s * self._global + self._offset + k]

    def __str__(self) -> str:
        return f"ProcessRows(global={self._global}, local={self._local}, offset={self._offset})"


def process_rows(sharding: jax.sharding.Sharding, global_batch: int) -> tuple[int, int]:
    """``(offset, count)``: the contiguous rows of a ``[global_batch, ...]`` array that this process's
    devices hold under ``sharding``."""
    rows: set[int] = set()
    for idx in sharding.addressable_devices_indices_map((global_batch,)).values():
        sl = idx[0]
        rows.update(range(*sl.indices(global_batch)))
    lo, hi = min(rows), max(rows) + 1
    if len(rows) != hi - lo:
        raise InputError(f"this process's devices hold non-contiguous batch rows {sorted(rows)}")
    return lo, hi - lo


def _select(example: dict) -> dict:
    return {k: np.asarray(example[k], np.float32) for k in BATCH_KEYS}


def make_dataset(
    config: ml_collections.ConfigDict, batch_sharding: jax.sharding.Sharding, source: Any | None = None
) -> grain.IterDataset:
    """This process's batches (dicts of NumPy arrays, ``BATCH_KEYS``) as a grain ``IterDataset``."""
    source = make_source(config) if source is None else source
    offset, local = process_rows(batch_sharding, config.batch_size)
    ds = grain.MapDataset.source(source).shuffle(seed=config.seed).repeat(None)
    ds = ds.random_map(RandomCrop(config.resolution), seed=config.seed)
    ds = ProcessRows(ds, config.batch_size, local, offset).map(_select).batch(local, drop_remainder=True)
    # Read ahead only ``prefetch`` batches (grain's default, 16 threads and 500 elements, would keep the
    # host busy synthesizing far ahead, starving the step; on the CPU backend it delayed one process's
    # collectives past gloo's 30 s set-up window).
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=config.data.threads, prefetch_buffer_size=config.data.prefetch)
    )
    if config.data.workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker pool reads absl flags
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.data.workers, per_worker_buffer_size=config.data.prefetch
            )
        )
    return it


def to_global(batch: dict, shardings: dict) -> dict:
    """This process's rows -> global ``jax.Array``s sharded over the mesh (no data crosses hosts)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], batch[k]) for k in shardings}
