"""Training configs as data, big_vision style: a config file's ``get_config(arg)`` returns a locked
``ml_collections.ConfigDict``; ``--config.KEY=VALUE`` overrides are applied strictly (an unknown key or
a value of the wrong type is one ``InputError`` naming it); the resolved config goes to
``WORKDIR/config.json``.

``default_config()`` declares every key the trainer reads, with the paper's values where it has one;
the files in ``configs/`` start from it and change values only, so no key is ever invented deep in the
code. ``apply_variants(config, "no_occlusion,no_edge")`` applies named variants (the paper's ablations
and PISA placements), so a config file's ``:arg`` changes one word, not code.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ml_collections

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.attention import SPEC_PISA_PATHS
from bokehdiff_jax.models.options import SPEC_LORA_TARGETS
from bokehdiff_jax.models.partition import SPEC_VAE_TRAINABLE
from bokehdiff_jax.pisa.config import PisaConfig

CONFIG_JSON = "config.json"
# Every config holds at least these (issue 9), with these names.
REQUIRED_KEYS = (
    "base",
    "trainable",
    "steps",
    "batch_size",
    "resolution",
    "seed",
    "log_every",
    "checkpoint_every",
)
# Keys whose change alters the shapes of the trained state or of the data stream: a workdir whose
# config differs in one of them cannot be resumed (a prefix covers the keys below it).
SHAPE_KEYS = (
    "base",
    "model.unet",
    "model.vae",
    "trainable",
    "lora.rank",
    "lora.targets",
    "vae_parts",
    "losses.discriminator",
    "batch_size",
    "resolution",
    "optimizer.grad_accum",
)
PRECISIONS = ("fp32", "bf16")


def default_config() -> ml_collections.ConfigDict:
    """Every key of a training config, with SPEC section 3's method and the released script's optimiser.

    The architecture (``model.unet``, ``model.vae``) is used when ``base`` is ``"random"`` (or for a
    dry run whose base folder is absent): ``"sdxl"`` (the public SDXL configs), a diffusers
    ``config.json`` path, or a dict of diffusers config keys.
    """
    c = ml_collections.ConfigDict()
    c.base = "random"  # "random" (seeded init of model.unet / model.vae) or a converted checkpoint folder
    c.trainable = "lora"  # "lora": LoRA + vae_parts (the paper); "all": every U-Net and VAE weight
    c.steps = 120_000
    c.batch_size = 2  # global: split over the mesh's (data, fsdp) devices and over processes
    c.resolution = 512  # training crop side, pixels
    c.seed = 0  # model init, data order, dropout and jitter all derive from it
    c.precision = "bf16"  # compute dtype of U-Net/VAE and storage of frozen weights; LoRA, optimiser: fp32
    c.log_every = 50  # metrics.jsonl, TensorBoard scalars, progress bar
    c.checkpoint_every = 1000
    c.image_every = 1000  # TensorBoard image grids (input / target / output / disparity); 0: never

    c.model = ml_collections.ConfigDict()
    c.model.unet = "sdxl"
    c.model.vae = "sdxl"
    c.model.remat = True  # recompute U-Net, VAE and loss-network (VGG) blocks in the backward pass
    c.model.timestep = 499  # the one-step model's fixed T

    # PISA: where (fnmatch patterns over diffusers attention paths; () = nowhere) and how (every
    # PisaConfig field; the released dropout in training, one home for the other defaults).
    c.pisa_paths = SPEC_PISA_PATHS
    c.pisa = ml_collections.ConfigDict(dataclasses.asdict(PisaConfig(dropout=0.1)))

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 8
    c.lora.alpha = 8.0
    c.lora.targets = SPEC_LORA_TARGETS
    c.vae_parts = SPEC_VAE_TRAINABLE  # VAE modules trained in full (diffusers paths) in "lora" mode

    c.losses = ml_collections.ConfigDict()
    c.losses.mse = 1.0
    c.losses.lpips = 5.0
    c.losses.edge = 1.0
    c.losses.edge_variant = "paper"  # or "released"
    c.losses.adversarial = 0.5  # paper; the released script used 0.1
    c.losses.adversarial_start = 30_000  # step at which the adversarial term (and D's training) begins
    c.losses.lpips_weights = ""  # LPIPS-VGG weights file; "": the cached default (fetched once)
    c.losses.discriminator = ml_collections.ConfigDict()
    # The frozen feature extractor under the trained head: "vgg16" (LPIPS's VGG16, offline weights) or
    # "convnext" (the released choice, ConvNeXt-base; `weights` = a timm safetensors file).
    c.losses.discriminator.backbone = "vgg16"
    c.losses.discriminator.weights = ""
    c.losses.discriminator.convnext_input = "imagenet"  # or "released": [0, 1] images, unnormalised
    c.losses.discriminator.hidden = 256

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 5e-5  # peak learning rate (released script; the paper says 1e-4)
    c.optimizer.schedule = "cosine"  # "cosine" (to end_lr_factor * lr at `steps`) or "constant"
    c.optimizer.warmup_steps = 20
    c.optimizer.end_lr_factor = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 1e-2  # torch AdamW's default, as the released script
    c.optimizer.clip_norm = 1.0  # per group; 0: no clipping
    c.optimizer.grad_accum = 1  # micro-batches per step (batch_size must divide by it)
    # Learning-rate multipliers per parameter group (the discriminator learns twice as fast, as released).
    c.optimizer.lr_scale = ml_collections.ConfigDict(
        {"lora": 1.0, "unet": 1.0, "vae": 1.0, "discriminator": 2.0}
    )

    c.data = ml_collections.ConfigDict()
    c.data.source = "synth"  # "synth": on-the-fly synthesis; or a `bokehdiff-jax synth` output folder
    c.data.fg = "samples"  # foreground folder for "synth", or "samples" (the embedded RGBA images)
    c.data.bg = "samples"  # background folder for "synth", or "samples" (the embedded photos)
    c.data.procedural = 4  # procedural hair/fur foregrounds added to the embedded ones
    c.data.length = 100_000  # distinct synthesized examples (the stream repeats, reshuffled, after)
    c.data.synth_size = 768  # synthesis canvas side (>= resolution: crops are random)
    c.data.base_strength = 12.0  # synthesis K at times = 1, px (SPEC section 4)
    c.data.log2_times = (-2.0, 3.0)
    c.data.rays_max = 256
    c.data.workers = 2  # grain worker processes (0: in the training process)
    c.data.threads = 1  # reader threads in the training process, or in each worker
    c.data.prefetch = 2  # batches read ahead (per worker with workers > 0)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 3  # the last N checkpoints ...
    c.checkpoint.keep_every = 10_000  # ... plus every K-th step (0: none)
    c.checkpoint.async_save = True

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})  # -1: the devices left
    return c


def set_architecture(
    config: ml_collections.ConfigDict, *, unet: dict[str, Any] | str, vae: dict[str, Any] | str
) -> ml_collections.ConfigDict:
    """Sets ``model.unet`` / ``model.vae`` to a dict of diffusers config keys (each key then overridable
    as ``--config.model.unet.KEY=VALUE``) or a string (``"sdxl"`` or a ``config.json`` path)."""
    with config.ignore_type():
        config.model.unet = ml_collections.ConfigDict(unet) if isinstance(unet, dict) else unet
        config.model.vae = ml_collections.ConfigDict(vae) if isinstance(vae, dict) else vae
    return config


# ----------------------------------------------------------------------------------------- variants
def _set(**values: Any) -> Callable[[ml_collections.ConfigDict], None]:
    def apply(c: ml_collections.ConfigDict) -> None:
        for dotted, v in values.items():
            set_key(c, dotted.replace("__", "."), v)

    return apply


# The paper's ablations (Table 3) and PISA placements: `--config configs/X.py:name[,name...]`.
VARIANTS: dict[str, tuple[Callable[[ml_collections.ConfigDict], None], str]] = {
    "no_occlusion": (_set(pisa__occlusion=False), "PISA without the visibility term (Eq. 8-9)"),
    "no_coc": (_set(pisa__coc=False), "PISA without the CoC mask (Eq. 5-6)"),
    "no_softmax_q": (_set(pisa__softmax_q=False), "PISA normalised over keys, not queries"),
    "vanilla_attention": (_set(pisa_paths=()), "no PISA anywhere: SDXL's attention"),
    "no_adversarial": (_set(losses__adversarial=0.0), "no adversarial term"),
    "no_edge": (_set(losses__edge=0.0), "no edge loss"),
    "no_lpips": (_set(losses__lpips=0.0), "no LPIPS term"),
    "pisa_down": (
        _set(pisa_paths=("down_blocks.*.attn1",)),
        "PISA in every down-block self-attention",
    ),
    "pisa_mid": (_set(pisa_paths=("mid_block.*.attn1",)), "PISA in the mid-block self-attentions"),
    "pisa_up": (_set(pisa_paths=("up_blocks.*.attn1",)), "PISA in every up-block self-attention"),
    "pisa_all": (_set(pisa_paths=("*.attn1",)), "PISA in every self-attention"),
    "paper": (
        _set(
            losses__mse=1.0,
            losses__lpips=5.0,
            losses__edge=1.0,
            losses__edge_variant="paper",
            losses__adversarial=0.5,
            optimizer__lr=1e-4,
        ),
        "the paper's loss weights (1 / 5 / 1 / 0.5), its edge loss and learning rate 1e-4",
    ),
    "released": (
        _set(losses__adversarial=0.1, losses__edge_variant="released", pisa__train_occlusion_clamp=0.99),
        "the released script's loss weights, edge variant and occlusion clamp",
    ),
}


def apply_variants(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Applies the comma-separated ``VARIANTS`` named in ``arg`` (``None`` or ``""``: none)."""
    for name in filter(None, (s.strip() for s in (arg or "").split(","))):
        if name not in VARIANTS:
            raise InputError(f"config variant {name!r}: expected one of {', '.join(VARIANTS)}")
        VARIANTS[name][0](config)
    return config


# ------------------------------------------------------------------------------------------ loading
def split_spec(spec: str) -> tuple[Path, str | None]:
    """``"configs/x.py:arg"`` -> ``(Path("configs/x.py"), "arg")``; no ``:`` -> ``(path, None)``."""
    path, sep, arg = spec.rpartition(":")
    if not sep or not path.endswith(".py"):
        return Path(spec), None
    return Path(path), arg


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Runs ``get_config([arg])`` of the config file ``spec = path[:arg]``; returns it locked."""
    path, arg = split_spec(spec)
    if not path.is_file():
        raise InputError(
            f"--config {path}: no such file (expected a Python config, e.g. configs/tiny_cpu.py)"
        )
    spec_ = importlib.util.spec_from_file_location(f"_bokehdiff_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec_)
    try:
        spec_.loader.exec_module(module)
    except InputError:
        raise
    except Exception as e:  # a broken user file: say which and why, in one line
        raise InputError(f"--config {path}: failed to load ({type(e).__name__}: {e})") from e
    get = getattr(module, "get_config", None)
    if not callable(get):
        raise InputError(f"--config {path}: defines no get_config()")
    config = get(arg) if arg is not None else get()
    if not isinstance(config, ml_collections.ConfigDict):
        raise InputError(
            f"--config {path}: get_config() returned {type(config).__name__}, expected a ConfigDict"
        )
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise InputError(f"--config {path}: missing required keys {missing}")
    config.lock()
    return config


def set_key(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """``config[a][b]... = value`` for an existing key ``"a.b..."``; ``InputError`` otherwise."""
    *parents, leaf = dotted.split(".")
    node = config
    for i, name in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            raise InputError(f"unknown config key {'.'.join(parents[: i + 1])!r} (in --config.{dotted})")
        node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise InputError(f"unknown config key {dotted!r}")
    try:
        node[leaf] = value
    except (TypeError, AttributeError, KeyError) as e:
        raise InputError(f"config key {dotted!r}: cannot set {value!r} ({e})") from None


def _parse_bool(key: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise InputError(f"--config.{key}={raw}: expected a bool (true or false)")


def parse_value(key: str, raw: str, current: Any) -> Any:
    """The typed value of ``--config.KEY=raw`` given the key's current value (its declared type)."""
    if isinstance(current, ml_collections.ConfigDict):
        raise InputError(
            f"--config.{key}: {key!r} is a group of keys ({', '.join(current)}); set one of them"
        )
    if isinstance(current, bool):
        return _parse_bool(key, raw)
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            raise InputError(f"--config.{key}={raw}: expected an int") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise InputError(f"--config.{key}={raw}: expected a float") from None
    if isinstance(current, str):
        return raw
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = tuple(s.strip() for s in raw.split(",") if s.strip())  # a,b,c for strings
        if isinstance(value, (str, int, float)):
            value = (value,)
        if not isinstance(value, (tuple, list)):
            raise InputError(f"--config.{key}={raw}: expected a tuple, e.g. (1, 2) or a,b")
        for old in current[:1]:
            if any(
                type(v) is not type(old) and not (isinstance(old, float) and type(v) is int) for v in value
            ):
                raise InputError(f"--config.{key}={raw}: expected a tuple of {type(old).__name__}")
        return tuple(value)
    try:  # an untyped placeholder (None): a Python literal, else the string itself
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node: Any = config
    names = dotted.split(".")
    for i, name in enumerate(names):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            where = "" if i == len(names) - 1 else f" (in --config.{dotted})"
            raise InputError(f"unknown config key {'.'.join(names[: i + 1])!r}{where}")
        node = node[name]
    return node


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Applies command-line overrides ``--config.KEY=VALUE`` (or ``--config.KEY VALUE`` pairs already
    joined by the caller) to ``config`` in place; returns it."""
    for token in overrides:
        if not token.startswith("--config.") or "=" not in token:
            raise InputError(f"unexpected argument {token!r}: expected --config.KEY=VALUE")
        key, raw = token[len("--config.") :].split("=", 1)
        set_key(config, key, parse_value(key, raw, _get(config, key)))
    return config


def join_override_args(args: list[str]) -> list[str]:
    """Normalises ``["--config.a", "1", "--config.b=2"]`` to ``["--config.a=1", "--config.b=2"]``."""
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--config.") and "=" not in a and i + 1 < len(args):
            out.append(f"{a}={args[i + 1]}")
            i += 2
        else:
            out.append(a)
            i += 1
    return out


# --------------------------------------------------------------------------------------- validation
def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise InputError(msg)


def validate(c: ml_collections.ConfigDict) -> None:
    """Range checks of the values the trainer reads (one ``InputError`` naming the key)."""
    for key in ("steps", "batch_size", "resolution", "log_every", "checkpoint_every"):
        _check(isinstance(c[key], int) and c[key] >= 1, f"config {key}={c[key]!r}: expected an int >= 1")
    _check(c.image_every >= 0, f"config image_every={c.image_every}: expected >= 0")
    _check(c.precision in PRECISIONS, f"config precision={c.precision!r}: expected one of {PRECISIONS}")
    _check(c.trainable in ("lora", "all"), f"config trainable={c.trainable!r}: expected 'lora' or 'all'")
    o = c.optimizer
    _check(o.lr > 0 and math.isfinite(o.lr), f"config optimizer.lr={o.lr}: expected a finite value > 0")
    _check(
        o.schedule in ("cosine", "constant"), f"config optimizer.schedule={o.schedule!r}: cosine or constant"
    )
    _check(o.warmup_steps >= 0, "config optimizer.warmup_steps: expected >= 0")
    _check(o.clip_norm >= 0, "config optimizer.clip_norm: expected >= 0 (0: no clipping)")
    _check(o.grad_accum >= 1, "config optimizer.grad_accum: expected >= 1")
    _check(
        c.batch_size % o.grad_accum == 0,
        f"config batch_size={c.batch_size} is not divisible by optimizer.grad_accum={o.grad_accum}",
    )
    for k, v in c.losses.items():
        if isinstance(v, float) and k != "adversarial_start":
            _check(v >= 0 and math.isfinite(v), f"config losses.{k}={v}: expected a finite weight >= 0")
    _check(c.losses.edge_variant in ("paper", "released"), "config losses.edge_variant: paper or released")
    _check(c.checkpoint.keep >= 1, "config checkpoint.keep: expected >= 1")
    _check(c.checkpoint.keep_every >= 0, "config checkpoint.keep_every: expected >= 0 (0: none)")
    _check(
        c.data.workers >= 0 and c.data.threads >= 1 and c.data.prefetch >= 1,
        "config data.workers >= 0, data.threads >= 1 and data.prefetch >= 1",
    )
    if c.data.source == "synth":
        _check(
            c.data.synth_size >= c.resolution,
            f"config data.synth_size={c.data.synth_size} is smaller than resolution={c.resolution}",
        )
        _check(c.data.length >= c.batch_size, "config data.length: expected >= batch_size")


# ------------------------------------------------------------------------------------------- workdir
def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON values (tuples as lists), for ``config.json`` and comparisons."""
    return json.loads(config.to_json())


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(shape-changing keys that differ, other keys that differ)`` between two config dicts."""
    a, b = _flatten(old), _flatten(new)
    changed = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    shape = [k for k in changed if any(k == s or k.startswith(s + ".") for s in SHAPE_KEYS)]
    return shape, [k for k in changed if k not in shape]


def read_workdir_config(workdir: Path) -> dict[str, Any] | None:
    """The ``config.json`` of an earlier run in ``workdir``, or None."""
    path = Path(workdir) / CONFIG_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(
            f"{path}: not a readable config ({e}); move it away or choose another --workdir"
        ) from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a JSON object; move it away or choose another --workdir")
    return data


def check_workdir(workdir: Path, config: ml_collections.ConfigDict, has_checkpoints: bool) -> list[str]:
    """Refuses a workdir whose run cannot be continued with ``config``; returns notes for the user.

    - An existing ``config.json`` that differs in a ``SHAPE_KEYS`` key: ``InputError`` naming the keys
      (nothing is written). Other differences are allowed and reported.
    - A non-empty folder without our ``config.json``: refused (it is not a run of ours).
    """
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise InputError(f"--workdir {workdir} exists and is not a folder")
    old = read_workdir_config(workdir)
    if old is None:
        entries = sorted(p.name for p in workdir.iterdir()) if workdir.is_dir() else []
        if entries:
            raise InputError(
                f"--workdir {workdir} holds other files ({', '.join(entries[:3])}) but no {CONFIG_JSON} of a "
                "run: choose a new or empty folder"
            )
        return []
    shape, other = config_differences(old, to_dict(config))
    if shape:
        what = "its checkpoints were made" if has_checkpoints else "it was started"
        raise InputError(
            f"--workdir {workdir}: the config differs from the one {what} with in shape-changing keys "
            f"{shape}; use a new --workdir (nothing was overwritten)"
        )
    return (
        [f"config differs from the workdir's earlier run in {other} (allowed: no shapes change)"]
        if other
        else []
    )


def write_config(workdir: Path, config: ml_collections.ConfigDict) -> Path:
    """Writes the resolved config to ``workdir/config.json`` atomically."""
    from bokehdiff_jax.io.atomic import atomic_path

    path = Path(workdir) / CONFIG_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_dict(config), indent=1, sort_keys=True) + "\n")
    return path


def resolve(spec: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """Loads ``spec``, applies ``overrides``, validates: the resolved, locked config."""
    config = load_config(spec)
    apply_overrides(config, join_override_args(overrides))
    validate(config)
    return config


def config_from_json(data: dict[str, Any]) -> ml_collections.ConfigDict:
    """A locked ConfigDict from a ``config.json`` (lists back to tuples where the defaults have tuples)."""

    def fix(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: fix(v) for k, v in d.items()}
        if isinstance(d, list):
            return tuple(fix(v) for v in d)
        return d

    c = ml_collections.ConfigDict(fix(data))
    c.lock()
    return c
