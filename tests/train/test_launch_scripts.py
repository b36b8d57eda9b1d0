"""The launch scripts parse (``bash -n``), and the training section of ``launch/gpu_check.sh`` names only
commands and config keys that exist (it runs where no test does: on a machine with an NVIDIA GPU)."""

import pathlib
import re
import subprocess

import pytest

from bokehdiff_jax.train import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "launch").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_gpu_check_train_overrides_resolve():
    text = (ROOT / "launch" / "gpu_check.sh").read_text()
    overrides = re.findall(r'--config\.([a-z_.0-9]+)=("[^"]*"|[^\s)"]+)', text)
    assert overrides
    args = [f"--config.{k}={v.strip(chr(34))}" for k, v in overrides if "$" not in v]
    config_lib.resolve(str(ROOT / "configs" / "sdxl_gpu1.py"), args)  # raises on an unknown key or bad type
    for usage in ("train_gpu1.sh", "train_tpu_pod.sh"):
        out = subprocess.run(["bash", str(ROOT / "launch" / usage)], capture_output=True, text=True)
        assert out.returncode == 2 and "usage:" in out.stderr
