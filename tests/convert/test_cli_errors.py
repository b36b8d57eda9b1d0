"""Malformed inputs through ``bokehdiff-jax convert``: exit status 2, one line on stderr, no DST left."""

from __future__ import annotations

import json
import pickle
import struct

import diffusers
import numpy as np
import pytest
import tiny_configs
import torch

from bokehdiff_jax import cli
from bokehdiff_jax.convert import weights
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.safetensors_io import save_dict


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    """A real tiny diffusers VAE folder; each case copies and breaks it."""
    root = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(**tiny_configs.VAES["sdxl"]).save_pretrained(root / "vae")
    return root / "vae"


def _copy(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _break(case: str, folder):
    weights = folder / "diffusion_pytorch_model.safetensors"
    raw = weights.read_bytes()
    if case == "truncated":
        weights.write_bytes(raw[: len(raw) // 2])
        return "outside"
    if case == "header_past_eof":
        weights.write_bytes(struct.pack("<Q", 10**9) + raw[8:100])
        return "runs past the end"
    if case == "bad_json":
        weights.write_bytes(raw[:8] + b"[" + raw[9:])
        return "not valid JSON"
    if case == "pickle_bin":
        weights.unlink()
        (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
        return "never loaded"
    if case == "pickle_named_safetensors":
        weights.write_bytes(pickle.dumps({"w": [1.0] * 10}, protocol=4))
        return "pickle"
    if case == "missing_shard":
        weights.unlink()
        index = {
            "weight_map": {"decoder.conv_in.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"}
        }
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        return "missing shard"
    if case == "wrong_tensors":
        # Another architecture's weights under this config: one error listing all three kinds.
        torch.manual_seed(0)
        cfg = {**tiny_configs.VAES["sdxl"], "block_out_channels": [16, 32, 48], "layers_per_block": 2,
               "mid_block_add_attention": False}  # fmt: skip
        diffusers.AutoencoderKL(**cfg).save_pretrained(folder.parent / "other")
        weights.write_bytes((folder.parent / "other" / weights.name).read_bytes())
        return "missing .*unexpected .*shape/kind mismatches"
    if case == "not_a_model":
        (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
        return "not a diffusers model folder|not a supported model"
    if case == "config_wrong_type":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "layers_per_block": "1"}))
        return "layers_per_block must be an int"
    if case == "bad_config":
        (folder / "config.json").write_text("{not json")
        return "not valid JSON"
    raise AssertionError(case)


CASES = [
    "truncated",
    "header_past_eof",
    "bad_json",
    "pickle_bin",
    "pickle_named_safetensors",
    "missing_shard",
    "wrong_tensors",
    "not_a_model",
    "bad_config",
    "config_wrong_type",
]


@pytest.mark.parametrize("case", CASES)
def test_malformed_checkpoints_fail_cleanly(vae_folder, tmp_path, capsys, monkeypatch, case):
    src = _copy(vae_folder, tmp_path / "src")
    pattern = _break(case, src)
    with pytest.raises(InputError, match=pattern):  # the library raises the one clear error...
        weights.from_diffusers(src, tmp_path / "dst")
    monkeypatch.setattr(cli, "COMMANDS", {"convert": cli.COMMANDS["convert"]})
    capsys.readouterr()
    rc = cli.main(["convert", "from-diffusers", str(src), str(tmp_path / "dst")])  # ...the CLI prints it
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert (
        sorted(p.name for p in tmp_path.iterdir() if p.name not in ("src", "other")) == []
    )  # no DST, no temp


def test_to_diffusers_refuses_a_folder_that_is_not_ours(vae_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"convert": cli.COMMANDS["convert"]})
    assert cli.main(["convert", "to-diffusers", str(vae_folder), str(tmp_path / "out")]) == 2
    assert "not a bokehdiff_jax checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_output_over_the_source_is_refused(vae_folder, tmp_path, capsys, monkeypatch):
    """DST equal to SRC, or a folder above it, would be replaced by the output: the source would be lost."""
    monkeypatch.setattr(cli, "COMMANDS", {"convert": cli.COMMANDS["convert"]})
    (tmp_path / "pipe").mkdir()
    src = _copy(vae_folder, tmp_path / "pipe" / "vae")
    before = sorted(p.name for p in src.iterdir())
    for dst in (src, src.parent, tmp_path):
        capsys.readouterr()
        assert cli.main(["convert", "from-diffusers", str(src), str(dst)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        assert "is the input" in err or "holding the input" in err
    assert sorted(p.name for p in src.iterdir()) == before
    ours = tmp_path / "ours"
    assert cli.main(["convert", "from-diffusers", str(src), str(ours)]) == 0
    assert cli.main(["convert", "to-diffusers", str(ours), str(ours)]) == 2
    assert "is the input" in capsys.readouterr().err
    assert (ours / "bokehdiff_jax.json").is_file()


def test_our_checkpoint_is_checked_strictly(tmp_path):
    unet_cfg = tiny_configs.UNETS["sdxl"]
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(
        json.dumps({"_class_name": "UNet2DConditionModel", **unet_cfg})
    )
    save_dict(
        tmp_path / "unet" / "params.safetensors", {"conv_in/kernel": np.zeros((3, 3, 4, 7), np.float32)}
    )
    with pytest.raises(InputError, match=r"missing .*shape/kind mismatches: conv_in/kernel"):
        weights.load_unet(tmp_path)
    with pytest.raises(InputError, match="no vae found"):
        weights.load_vae(tmp_path)


def test_asking_for_the_wrong_component_says_so(vae_folder):
    with pytest.raises(InputError, match="not a unet"):
        weights.load_unet(vae_folder)
