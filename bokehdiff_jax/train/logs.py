"""What people see while a run trains: a tqdm progress bar, ``WORKDIR/metrics.jsonl`` and TensorBoard
event files (``WORKDIR/tensorboard/``: scalars, and image grids of input / target / output / disparity).

Only process 0 writes. On resume from checkpoint ``n``, lines of ``metrics.jsonl`` after step ``n`` (steps
a killed run did but did not checkpoint) are dropped first, and TensorBoard is told to purge events
after ``n``, so each step appears once, with the values of the run that continues.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from bokehdiff_jax.io.atomic import atomic_path

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """The complete lines of ``metrics.jsonl`` (a torn last line of a killed run is skipped)."""
    path = Path(workdir) / METRICS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            out.append(row)
    return out


def _finite_or_str(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)  # JSON has no NaN/inf: write them as strings


def image_grid(batch: dict[str, np.ndarray], output: np.ndarray, rows: int = 4) -> np.ndarray:
    """``[rows * S, 4 * S, 3]`` uint8: per example, input | target | output | disparity (grey)."""
    n = min(rows, output.shape[0])
    disp = np.repeat(np.asarray(batch["disparity"][:n])[..., None], 3, axis=-1)
    cols = [np.asarray(batch["aif"][:n]), np.asarray(batch["bokeh"][:n]), np.asarray(output[:n]), disp]
    grid = np.concatenate([np.concatenate([c[i] for c in cols], axis=1) for i in range(n)], axis=0)
    return (np.clip(grid, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


class Monitor:
    """Progress bar, metrics file and TensorBoard of one run (no-ops where ``enabled`` is False: processes
    other than 0). ``progress=False`` hides the bar only."""

    def __init__(
        self,
        workdir: str | Path,
        *,
        start_step: int,
        total_steps: int,
        batch_size: int,
        enabled: bool = True,
        progress: bool = True,
    ) -> None:
        self.enabled = enabled
        self.batch_size = batch_size
        self.workdir = Path(workdir)
        self._last_time = time.perf_counter()
        self._last_step = start_step
        if not enabled:
            return
        self._truncate(start_step)
        self._file = open(self.workdir / METRICS, "a", buffering=1)  # line-buffered: whole lines on disk
        from tensorboardX import SummaryWriter
        from tqdm import tqdm

        self._tb = SummaryWriter(
            str(self.workdir / TENSORBOARD), purge_step=start_step + 1 if start_step > 0 else None
        )
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
            disable=not progress,
        )

    def _truncate(self, start_step: int) -> None:
        path = self.workdir / METRICS
        if not path.exists():
            return
        keep = [row for row in read_metrics(self.workdir) if int(row["step"]) <= start_step]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in keep))

    def tick(self, step: int) -> None:
        """Advances the progress bar to ``step`` (updates done)."""
        if self.enabled:
            self._bar.update(step - self._bar.n)

    def log(self, step: int, metrics: dict[str, float]) -> dict[str, Any]:
        """Writes one metrics row (adds ``steps_per_s`` and ``images_per_s`` since the last row)."""
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        row = {"step": step, **{k: _finite_or_str(float(v)) for k, v in metrics.items()}}
        row["steps_per_s"] = rate
        row["images_per_s"] = rate * self.batch_size
        if self.enabled:
            self._file.write(json.dumps(row) + "\n")
            for k, v in row.items():
                if k != "step" and isinstance(v, float):
                    self._tb.add_scalar(f"train/{k}", v, step)
            self._bar.set_postfix(loss=f"{float(metrics['loss']):.4g}", img_s=f"{row['images_per_s']:.3g}")
        return row

    def images(self, step: int, batch: dict[str, np.ndarray], output: np.ndarray) -> None:
        if self.enabled:
            self._tb.add_image(
                "train/input_target_output_disparity", image_grid(batch, output), step, dataformats="HWC"
            )

    def note(self, text: str) -> None:
        if self.enabled:
            self._bar.write(text)

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._tb.close()
            self._file.close()
