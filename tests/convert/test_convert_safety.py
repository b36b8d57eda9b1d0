"""``convert`` never loses a user's files and accepts no malformed checkpoint (issue 11).

Destinations: only an absent or empty folder, or an earlier output of the same direction (proved by our
manifest / export marker and holding nothing else), is replaced. Sources: ``to-diffusers`` checks our
checkpoint as strictly as ``load_unet`` (manifest, components, every tensor) before writing anything.
"""

from __future__ import annotations

import json
import subprocess
import sys

import diffusers
import numpy as np
import pytest
import tiny_configs
import torch

from bokehdiff_jax import cli
from bokehdiff_jax.convert import weights
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io import atomic
from bokehdiff_jax.io.safetensors_io import SafetensorsFile, save_dict


@pytest.fixture(scope="module")
def vae_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_src")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(**tiny_configs.VAES["sdxl"]).save_pretrained(root / "vae")
    return root / "vae"


@pytest.fixture(scope="module")
def ours(vae_src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("ours") / "ck"
    weights.from_diffusers(vae_src, dst)
    return dst


def _copy(src, dst):
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_dir():
            _copy(p, dst / p.name)
        else:
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _convert(monkeypatch, capsys, *argv) -> tuple[int, str]:
    monkeypatch.setattr(cli, "COMMANDS", {"convert": cli.COMMANDS["convert"]})
    capsys.readouterr()
    rc = cli.main(["convert", *map(str, argv)])
    return rc, capsys.readouterr().err


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _users_folder(path):
    path.mkdir()
    (path / "holiday.jpg").write_bytes(b"\xff\xd8 a photo")
    (path / "notes.txt").write_text("my notes")
    return _tree(path)


# ----------------------------------------------------------------------------------- destinations
@pytest.mark.parametrize("direction", ["from-diffusers", "to-diffusers"])
def test_a_users_folder_is_never_replaced(direction, vae_src, ours, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "photos"
    before = _users_folder(dst)
    src = vae_src if direction == "from-diffusers" else ours
    rc, err = _convert(monkeypatch, capsys, direction, src, dst)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "not an earlier" in err and "holiday.jpg" in err
    assert _tree(dst) == before and (dst / "notes.txt").read_text() == "my notes"


@pytest.mark.parametrize("direction", ["from-diffusers", "to-diffusers"])
def test_an_earlier_output_is_replaced_unless_a_user_added_files(
    direction, vae_src, ours, tmp_path, monkeypatch, capsys
):
    dst = tmp_path / "out"
    src = vae_src if direction == "from-diffusers" else ours
    assert _convert(monkeypatch, capsys, direction, src, dst)[0] == 0
    first = _tree(dst)
    assert _convert(monkeypatch, capsys, direction, src, dst)[0] == 0  # an earlier run: replaced
    assert _tree(dst) == first
    (dst / "notes.txt").write_text("added by the user")
    rc, err = _convert(monkeypatch, capsys, direction, src, dst)
    assert rc == 2 and "notes.txt" in err and (dst / "notes.txt").is_file()
    # An output of the other direction is not "ours" for this one.
    other = ours if direction == "from-diffusers" else tmp_path / "exported"
    if direction == "to-diffusers":
        assert _convert(monkeypatch, capsys, "to-diffusers", ours, other)[0] == 0
        rc, err = _convert(monkeypatch, capsys, "from-diffusers", vae_src, other)
    else:
        keep = _copy(ours, tmp_path / "ck_copy")
        rc, err = _convert(monkeypatch, capsys, "to-diffusers", ours, keep)
    assert rc == 2 and "not an earlier" in err


def test_outputs_never_replace_their_inputs(vae_src, ours, tmp_path, monkeypatch, capsys):
    ck = _copy(ours, tmp_path / "ck")
    before = _tree(ck)
    for dst in (ck, ck / "vae", tmp_path / "ck/../ck/./vae", tmp_path):
        rc, err = _convert(monkeypatch, capsys, "to-diffusers", ck, dst)
        assert rc == 2 and ("is the input" in err or "holding the input" in err), err
    (tmp_path / "link").symlink_to(ck, target_is_directory=True)
    assert _convert(monkeypatch, capsys, "to-diffusers", ck, tmp_path / "link")[0] == 2
    assert _tree(ck) == before
    pipe = _copy(vae_src, tmp_path / "pipe" / "vae").parent
    for dst in (pipe / "vae", pipe):
        rc, err = _convert(monkeypatch, capsys, "from-diffusers", pipe, dst)
        assert rc == 2 and ("is the input" in err or "holding the input" in err), err


def test_stale_temporaries_of_a_killed_conversion_are_removed_and_reported(
    vae_src, tmp_path, monkeypatch, capsys
):
    # A genuine dead process's temporary, named as atomic_path names them (the pid no longer exists).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".ck.bdj{pid}-{atomic._HOST}.x1y2z3ab.tmp"
    (stale / "vae").mkdir(parents=True)
    (stale / "vae" / "params.safetensors").write_bytes(b"\0" * 1000)
    lookalike = tmp_path / ".ck.mine.tmp"
    lookalike.write_text("a user's file")
    rc, err = _convert(monkeypatch, capsys, "from-diffusers", vae_src, tmp_path / "ck")
    assert rc == 0 and "interrupted" in err and stale.name in err
    assert not stale.exists() and lookalike.is_file()


# ----------------------------------------------------------------------------------------- sources
def _break_checkpoint(case: str, ck):
    manifest = json.loads((ck / weights.MANIFEST).read_text())
    if case == "tensor removed":
        p = ck / "vae" / weights.PARAMS
        with SafetensorsFile(p) as f:
            t = {k: f[k] for k in f}
        t.pop(sorted(t)[3])
        save_dict(p, t)
        return "missing"
    if case == "integer tensor":
        p = ck / "vae" / weights.PARAMS
        with SafetensorsFile(p) as f:
            t = {k: f[k] for k in f}
        k = next(k for k in sorted(t) if k.endswith("bias"))
        t[k] = t[k].view(np.int32)
        save_dict(p, t)
        return "floating point"
    if case == "manifest not JSON":
        (ck / weights.MANIFEST).write_text("{oops")
        return "not valid JSON"
    if case == "manifest not ours":
        (ck / weights.MANIFEST).write_text(json.dumps({**manifest, "format": "something_else"}))
        return "not a bokehdiff_jax checkpoint"
    if case == "future version":
        (ck / weights.MANIFEST).write_text(json.dumps({**manifest, "version": 2}))
        return "newer"
    if case == "version not an int":
        (ck / weights.MANIFEST).write_text(json.dumps({**manifest, "version": "1"}))
        return "version"
    if case == "listed component missing":
        (ck / weights.MANIFEST).write_text(json.dumps({**manifest, "components": ["unet", "vae"]}))
        return "unet.*missing"
    if case == "unknown component":
        (ck / weights.MANIFEST).write_text(json.dumps({**manifest, "components": ["vae", "text_encoder"]}))
        return "unknown component"
    if case == "components not a list":
        (ck / weights.MANIFEST).write_text(json.dumps({**manifest, "components": "vae"}))
        return "components"
    raise AssertionError(case)


SOURCE_CASES = [
    "tensor removed",
    "integer tensor",
    "manifest not JSON",
    "manifest not ours",
    "future version",
    "version not an int",
    "listed component missing",
    "unknown component",
    "components not a list",
]


@pytest.mark.parametrize("case", SOURCE_CASES)
def test_to_diffusers_checks_its_source_like_load(case, ours, tmp_path, monkeypatch, capsys):
    ck = _copy(ours, tmp_path / "ck")
    pattern = _break_checkpoint(case, ck)
    rc, err = _convert(monkeypatch, capsys, "to-diffusers", ck, tmp_path / "out")
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert __import__("re").search(pattern, err), err
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match=pattern):  # the loader agrees
        weights.load_vae(ck)


def test_an_integer_tensor_in_diffusers_weights_is_refused(vae_src, tmp_path):
    """A float tensor whose header says I32 must not be cast (0.1167 would become 1.039e9)."""
    src = _copy(vae_src, tmp_path / "vae")
    p = src / "diffusion_pytorch_model.safetensors"
    with SafetensorsFile(p) as f:
        t = {k: f[k] for k in f}
    t["decoder.conv_in.bias"] = t["decoder.conv_in.bias"].view(np.int32)
    save_dict(p, t)
    for call in (lambda: weights.from_diffusers(src, tmp_path / "out"), lambda: weights.load_vae(src)):
        with pytest.raises(InputError, match=r"floating point.*decoder\.conv_in\.bias \(I32\)"):
            call()
    assert not (tmp_path / "out").exists()


def test_a_folder_named_config_json_is_an_input_error(vae_src, tmp_path):
    src = _copy(vae_src, tmp_path / "vae")
    (src / "config.json").unlink()
    (src / "config.json").mkdir()
    with pytest.raises(InputError, match="config.json: cannot read it"):
        weights.read_config(src)  # a traceback (IsADirectoryError) before
