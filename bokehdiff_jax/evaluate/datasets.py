"""``--data SPEC`` -> an evaluation source (``evaluate.sources``; ``tfds:`` sources from
``evaluate.tfds_builders``, imported only for them: it needs tensorflow_datasets)."""

from __future__ import annotations

import dataclasses

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.evaluate.sources import (
    HELDOUT_SEED,
    BlbSource,
    EbbSource,
    HeldoutSynthetic,
    Resized,
    Source,
    SynthFolder,
)


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """Options of :func:`open_source` (the ``evaluate`` flags): the held-out set's ``count``, ``size``,
    ``seed``; EBB!'s ``disparity_dir``, ``ids``, ``params``, ``focus``, ``strength``, ``exposure_align``,
    ``normalize``, ``flip``; BLB's ``blb_level``, ``blb_focus_key``; TFDS's ``tfds_dir``; and ``max_side``
    (downscale every example; ``None``: as stored)."""

    count: int = 8
    size: int = 128
    seed: int = HELDOUT_SEED
    base_strength: float | None = None
    disparity_dir: str | None = None
    ids: str | None = None
    params: str | None = None
    focus: float | None = None
    strength: float | None = None
    exposure_align: bool = True
    normalize: bool = False
    flip: bool = False
    blb_level: int = 4
    blb_focus_key: str = "disp_focus"
    tfds_dir: str | None = None
    max_side: int | None = None


SOURCE_KINDS = ("heldout", "synth:DIR", "ebb:DIR", "blb:DIR", "tfds:NAME")


def open_source(spec: str, options: SourceOptions = SourceOptions()) -> Source:
    """The source named by ``spec`` (one of ``SOURCE_KINDS``; ``evaluate.sources``' doc), with ``options``."""
    kind, _, arg = spec.partition(":")
    o = options
    if kind == "heldout" and not arg:
        src: Source = HeldoutSynthetic(o.count, o.size, o.seed, base_strength=o.base_strength)
    elif kind == "synth" and arg:
        src = SynthFolder(arg)
    elif kind == "ebb" and arg:
        src = EbbSource(
            arg,
            disparity_dir=o.disparity_dir,
            ids=o.ids,
            params=o.params,
            focus=o.focus,
            strength=o.strength,
            exposure_align=o.exposure_align,
            normalize=o.normalize,
            flip=o.flip,
        )
    elif kind == "blb" and arg:
        src = BlbSource(arg, level=o.blb_level, focus_key=o.blb_focus_key)
    elif kind == "tfds" and arg:
        if o.tfds_dir is None:
            raise InputError("--data tfds:NAME needs --tfds-dir (where the dataset was built)")
        from bokehdiff_jax.evaluate.tfds_builders import TfdsSource

        src = TfdsSource(arg, o.tfds_dir, focus=o.focus, strength=o.strength, exposure_align=o.exposure_align)
    else:
        raise InputError(f"--data {spec!r}: expected one of {', '.join(SOURCE_KINDS)}")
    return Resized(src, o.max_side) if o.max_side else src
