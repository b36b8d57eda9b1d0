"""The diffusion schedule constants of the one-step model (SPEC section 3), from diffusers'
``scheduler_config.json``.

BokehDiff evaluates the U-Net once, at a fixed timestep ``T`` (499) of SDXL's training schedule, and
needs only ``abar_T``, the cumulative product of ``1 - beta_t`` up to ``T``. The betas follow diffusers'
``DDPMScheduler``: ``"linear"`` is ``linspace(beta_start, beta_end, n)``, ``"scaled_linear"`` is
``linspace(sqrt(beta_start), sqrt(beta_end), n) ** 2``. They are computed here in float64 (diffusers
uses float32; the two agree to ~1e-7 relative) on the host: these are constants, not traced values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.configs import SDXL_CONFIG_DIR

SDXL_SCHEDULER_CONFIG = SDXL_CONFIG_DIR / "scheduler_config.json"
ONE_STEP_TIMESTEP = 499  # SPEC section 3: the fixed timestep of the one-step model

_BETA_SCHEDULES = ("linear", "scaled_linear")


def load_scheduler_config(config: str | os.PathLike | dict[str, Any] | None = None) -> dict[str, Any]:
    """A diffusers scheduler config: a dict, a ``scheduler_config.json`` path or its folder; None is
    SDXL's (the copy shipped in ``models/sdxl_configs``)."""
    if isinstance(config, dict):
        return dict(config)
    path = Path(config) if config is not None else SDXL_SCHEDULER_CONFIG
    if path.is_dir():
        path = path / "scheduler_config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"no scheduler config at {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def alphas_cumprod(config: str | os.PathLike | dict[str, Any] | None = None) -> np.ndarray:
    """``abar_t`` for ``t = 0 .. num_train_timesteps - 1``, float64 ``[num_train_timesteps]``."""
    cfg = load_scheduler_config(config)
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], np.float64)
    else:
        kind = cfg.get("beta_schedule", "linear")
        if kind not in _BETA_SCHEDULES:
            raise InputError(f"scheduler config: beta_schedule {kind!r} is not supported ({_BETA_SCHEDULES})")
        try:
            n = int(cfg.get("num_train_timesteps", 1000))
            lo, hi = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
        except (TypeError, ValueError) as e:
            raise InputError(f"scheduler config: malformed value ({e})") from None
        if kind == "linear":
            betas = np.linspace(lo, hi, n, dtype=np.float64)
        else:
            betas = np.linspace(math.sqrt(lo), math.sqrt(hi), n, dtype=np.float64) ** 2
    if betas.ndim != 1 or betas.size == 0 or not np.all((betas > 0) & (betas < 1)):
        raise InputError("scheduler config: betas must be a non-empty list of values in (0, 1)")
    return np.cumprod(1.0 - betas)


@dataclasses.dataclass(frozen=True)
class OneStepSchedule:
    """The constants of one denoising step from timestep ``timestep`` straight to ``z0``.

    ``z0 = (z - sqrt(1 - abar) eps) / sqrt(abar)`` (epsilon prediction, SPEC section 3).
    """

    timestep: int = ONE_STEP_TIMESTEP
    alpha_bar: float = 0.0

    @property
    def sqrt_alpha_bar(self) -> float:
        return math.sqrt(self.alpha_bar)

    @property
    def sqrt_one_minus_alpha_bar(self) -> float:
        return math.sqrt(1.0 - self.alpha_bar)

    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike | dict[str, Any] | None = None,
        timestep: int = ONE_STEP_TIMESTEP,
    ) -> OneStepSchedule:
        """From a diffusers scheduler config (None: SDXL's). Only epsilon prediction is supported."""
        cfg = load_scheduler_config(config)
        pred = cfg.get("prediction_type", "epsilon")
        if pred != "epsilon":
            raise InputError(
                f"scheduler config: prediction_type {pred!r} is not supported (expected 'epsilon')"
            )
        abar = alphas_cumprod(cfg)
        if not (0 <= timestep < abar.size):
            raise InputError(f"one-step timestep {timestep}: expected in [0, {abar.size - 1}]")
        return cls(timestep=int(timestep), alpha_bar=float(abar[timestep]))
