"""The training program end to end, as users run it (``bokehdiff-jax train`` in subprocesses), on the
micro config (``tests/train/micro_config.py``: a two-level SDXL-shaped model, 16 px images):

- exact resume: SIGKILL at three random steps, then SIGTERM (which saves and exits 0), then a final
  restart reproduce an uninterrupted run's per-step metrics bit for bit;
- a diverging run stops with an error naming the step, a non-zero exit and no checkpoint after it;
- two processes on localhost (2 fake CPU devices each, gloo collectives) train with the losses of one
  process on 4 devices, and SIGTERM to one of them stops both after the same step, with a checkpoint;
- ``--dry-run`` writes its report, also compiled for a TPU slice this machine does not have.

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


def _two_processes(workdir, cache_dir, *args) -> list[subprocess.Popen]:
    """Starts ``train`` as two processes on localhost, two fake CPU devices each."""
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
        procs.append(
            subprocess.Popen(
                _cmd(workdir) + ["--no-progress", *args],
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[str, str]]:
    """Both processes' (stdout, stderr); on a timeout, kills both and fails showing their output."""
    deadline = time.monotonic() + timeout
    try:
        return [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = [(out[-3000:], err[-3000:]) for out, err in (p.communicate() for p in procs)]
        pytest.fail(f"two-process training did not finish in {timeout:.0f} s: {tails}")


def test_two_processes_train_like_one_with_four_devices(tmp_path, cache_dir):
    args = (
        "--config.batch_size=4",
        "--config.steps=3",
        "--config.checkpoint_every=3",
        "--config.image_every=0",
    )
    one = _train(tmp_path / "one", _env(cache_dir, devices=4), *args)
    assert one.returncode == 0, one.stderr
    procs = _two_processes(tmp_path / "two", cache_dir, *args)
    outs = _finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "over 2 process(es)" in outs[0][0] + outs[0][1]
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        for k in ("loss", "mse", "edge", "grad_norm"):
            np.testing.assert_allclose(rb[k], ra[k], rtol=1e-6, err_msg=k)
    assert _checkpoints(tmp_path / "two") == [3]


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path, cache_dir):
    work = tmp_path / "two"
    steps = 200
    procs = _two_processes(
        work,
        cache_dir,
        "--config.batch_size=4",
        f"--config.steps={steps}",
        "--config.image_every=0",
        "--config.checkpoint_every=1000",
    )
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            rows = _rows(work)
            if rows and rows[-1]["step"] >= 2:
                procs[1].send_signal(signal.SIGTERM)  # not the process that writes the logs
                break
            time.sleep(0.05)
        outs = _finish(procs, timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    saved = _checkpoints(work)
    assert len(saved) == 1 and 2 < saved[0] < steps, saved  # one preemption checkpoint, mid-run
    assert _rows(work)[-1]["step"] == saved[0]  # both stopped right after that step
    assert f"saved the checkpoint at step {saved[0]}" in outs[0][0] + outs[0][1]


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
    assert report["grad_accum"] == 1 and report["flops_xla"] == report["flops"]
    assert not (tmp_path / "dry" / "checkpoints").exists()

    # Two micro-batches of one image: XLA counts the accumulation loop's body once; the report counts
    # the step (the same work as one batch of two, up to the optimiser update counted twice).
    out = _train(tmp_path / "acc", _env(cache_dir), "--dry-run", "--config.optimizer.grad_accum=2")
    assert out.returncode == 0, out.stderr
    acc = json.loads((tmp_path / "acc" / "dry_run.json").read_text())
    assert acc["grad_accum"] == 2 and acc["flops_xla"] < 0.6 * report["flops"]
    assert acc["flops"] == 2 * acc["flops_xla"] and abs(acc["flops"] / report["flops"] - 1) < 0.1


# libtpu (the TPU compiler, no TPU needed) lives beside the venv, not in it: installed there, JAX would
# try a TPU backend in every process (launch/setup.sh puts it here for this test and `bench train`).
LIBTPU_DIR = ROOT / ".venv" / "libtpu"


def test_dry_run_for_a_tpu_slice_without_one(tmp_path, cache_dir, monkeypatch):
    if not (LIBTPU_DIR / "libtpu").is_dir():
        pytest.fail(f"{LIBTPU_DIR} has no libtpu: run launch/setup.sh")
    env = _env(cache_dir, PYTHONPATH=str(LIBTPU_DIR))
    work = tmp_path / "tpu"
    out = _train(work, env, "--dry-run", "--topology", "v5e:2x2", "--config.batch_size=4")
    assert out.returncode == 0, out.stderr
    report = json.loads((work / "dry_run.json").read_text())
    assert report["devices"] == {"count": 4, "platform": "tpu", "kind": "TPU v5 lite", "processes": 1}
    assert report["topology"] == "v5e:2x2" and report["mesh"] == {"data": 4, "fsdp": 1}
    mem = report["memory"]
    assert mem["total_bytes"] == (
        mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"] + mem["temp_bytes"]
    )
    assert mem["argument_bytes"] > 4 * sum(report["trainable_params"].values()) and report["flops"] > 0

    bad = _train(tmp_path / "bad", env, "--dry-run", "--topology", "v5e:banana")
    line = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and line.startswith("error: --topology v5e:banana: not a TPU slice"), line
    assert not (tmp_path / "bad" / "dry_run.json").exists()

    # A step over the chip's memory: one error line naming the chip and XLA's figures, exit 2, no report;
    # `bench train --target tpu` turns it into a "does not fit" row.
    from bokehdiff_jax.bench import train as bench_train

    big = ("tests/train/micro_config.py", ["--config.batch_size=131072", "--config.data.length=131072"])
    monkeypatch.setitem(bench_train.DRY_RUNS, "big", (*big, 1, "v5e:1x1", 16.0))
    monkeypatch.setenv("PYTHONPATH", str(LIBTPU_DIR))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    row = bench_train.dry_run("big", tmp_path / "bench", target="tpu")
    assert row["does_not_fit"].startswith("the step does not fit one TPU v5 lite: "), row
    assert "exceeds available HBM" in row["does_not_fit"]
    assert not list((tmp_path / "bench").rglob("dry_run.json"))


def test_topology_errors(tmp_path):
    import argparse

    from bokehdiff_jax.errors import InputError
    from bokehdiff_jax.train import cli
    from bokehdiff_jax.train.dry_run import topology_devices

    with pytest.raises(InputError, match="needs libtpu, which is not installed"):
        topology_devices("v5e:2x2")  # this process has no libtpu on its path
    args = argparse.Namespace(config=MICRO, workdir=str(tmp_path / "w"), dry_run=False, topology="v5e:2x2")
    with pytest.raises(InputError, match="needs --dry-run"):
        cli.run(args)
    assert not (tmp_path / "w").exists()
