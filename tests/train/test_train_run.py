"""The training program end to end, as users run it (``bokehdiff-jax train`` in subprocesses), on the
micro config (``tests/train/micro_config.py``: a two-level SDXL-shaped model, 16 px images):

- exact resume: SIGKILL at three random steps, then SIGTERM (which saves and exits 0), then a final
  restart reproduce an uninterrupted run's per-step metrics bit for bit;
- a diverging run stops with an error naming the step, a non-zero exit and no checkpoint after it;
- two processes on localhost (2 fake CPU devices each, gloo collectives) train with the losses of one
  process on 4 devices;
- ``--dry-run`` writes its report.

Every process gets one fake device unless said otherwise, the same XLA flags, and a persistent
compilation cache shared by the tests (the step compiles once per program, not once per restart);
``--xla_backend_optimization_level=0`` trades step speed (irrelevant at 16 px) for compile time.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MICRO = str(pathlib.Path(__file__).with_name("micro_config.py"))
# Everything a metrics row holds that is a function of the computation (not of timing).
TIMING = ("steps_per_s", "images_per_s")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("xla_cache")


def _env(cache_dir: pathlib.Path, devices: int = 1, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def _cmd(workdir: pathlib.Path, *overrides: str, config: str = MICRO) -> list[str]:
    return [sys.executable, "-m", "bokehdiff_jax.cli", "train", "--config", config, "--workdir", str(workdir)]


def _train(workdir, env, *overrides, config=MICRO, **kw) -> subprocess.CompletedProcess:
    cmd = _cmd(workdir, config=config) + ["--no-progress", *overrides]
    return subprocess.run(
        cmd, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, **kw
    )


def _rows(workdir: pathlib.Path) -> list[dict]:
    from bokehdiff_jax.train.logs import read_metrics

    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(workdir)]


def _checkpoints(workdir: pathlib.Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _run_until(workdir, env, step: int, sig: int) -> int:
    """Starts a run, sends ``sig`` once ``metrics.jsonl`` shows ``step``, returns the exit code."""
    proc = subprocess.Popen(
        _cmd(workdir) + ["--no-progress"],
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            rows = _rows(workdir)
            if rows and rows[-1]["step"] >= step:
                proc.send_signal(sig)
                break
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (0, -signal.SIGKILL), err
    return proc.returncode


def test_killed_and_restarted_run_repeats_the_uninterrupted_one(tmp_path, cache_dir):
    env = _env(cache_dir)
    ref = tmp_path / "ref"
    done = _train(ref, env)
    assert done.returncode == 0, done.stderr
    expected = _rows(ref)
    assert [r["step"] for r in expected] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in expected)
    assert {"mse", "edge", "lr", "grad_norm", "loss"} <= set(expected[0])
    assert _checkpoints(ref) == [6, 8]  # keep the last 2 (checkpoint.keep)
    assert json.loads((ref / "config.json").read_text())["steps"] == 8
    assert list((ref / "tensorboard").glob("events.out.tfevents.*"))

    run = tmp_path / "run"
    kills = sorted(np.random.default_rng(0).choice(np.arange(1, 7), size=3, replace=False))
    for at in kills:
        assert _run_until(run, env, int(at), signal.SIGKILL) == -signal.SIGKILL
    # SIGTERM (pod preemption): finishes its step, saves a checkpoint there, exits 0.
    assert _run_until(run, env, kills[-1] + 1, signal.SIGTERM) == 0
    assert _checkpoints(run)[-1] >= kills[-1] + 1
    final = _train(run, env)
    assert final.returncode == 0, final.stderr
    assert "resumed from the checkpoint" in final.stdout + final.stderr
    assert _rows(run) == expected  # every step's loss, terms, lr and grad norm, bit for bit


def test_diverging_run_stops_naming_the_step(tmp_path, cache_dir):
    work = tmp_path / "nan"
    out = _train(work, _env(cache_dir), "--config.optimizer.lr=1e30", "--config.checkpoint_every=1")
    assert out.returncode == 1
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: training diverged at step ")
    bad = int(line.split("step ")[1].split(":")[0])
    assert bad >= 2  # step 1 runs at learning rate 0 (warm-up starts at 0)
    assert _checkpoints(work) and max(_checkpoints(work)) < bad
    assert all(np.isfinite(r["loss"]) for r in _rows(work))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_with_four_devices(tmp_path, cache_dir):
    args = (
        "--config.batch_size=4",
        "--config.steps=3",
        "--config.checkpoint_every=3",
        "--config.image_every=0",
    )
    one = _train(tmp_path / "one", _env(cache_dir, devices=4), *args)
    assert one.returncode == 0, one.stderr
    port = _free_port()
    procs = []
    for i in range(2):
        env = _env(
            cache_dir,
            devices=2,
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
        )
        cmd = _cmd(tmp_path / "two") + ["--no-progress", *args]
        procs.append(
            subprocess.Popen(
                cmd,
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,  # never an xdist worker's stdin (its channel to pytest)
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "over 2 process(es)" in outs[0][0] + outs[0][1]
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        for k in ("loss", "mse", "edge", "grad_norm"):
            np.testing.assert_allclose(rb[k], ra[k], rtol=1e-6, err_msg=k)
    assert _checkpoints(tmp_path / "two") == [3]


def test_dry_run_report(tmp_path, cache_dir):
    out = _train(tmp_path / "dry", _env(cache_dir), "--dry-run")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "dry" / "dry_run.json").read_text())
    assert set(report["trainable_params"]) == {"unet", "vae"}  # trainable="all"
    assert report["trainable_params"]["unet"] > 0 and report["frozen_params"]["cond"] > 0
    mem = report["memory"]
    assert (
        mem["total_bytes"]
        == mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"] + mem["temp_bytes"]
    )
    assert mem["argument_bytes"] > 4 * sum(report["trainable_params"].values())  # fp32 params at least
    assert (
        report["flops"] > 0 and report["devices"]["count"] == 1 and report["mesh"] == {"data": 1, "fsdp": 1}
    )
    assert not (tmp_path / "dry" / "checkpoints").exists()
