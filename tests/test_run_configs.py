"""Every run config in configs/ loads, is locked, has the training contract's keys, and builds what it
names: the mesh, the model configs and PISA's routing."""

import importlib.util
import pathlib

import jax
import pytest

from bokehdiff_jax.models.attention import AttentionRouting
from bokehdiff_jax.models.configs import UNetConfig, VAEConfig
from bokehdiff_jax.pisa import PisaConfig
from bokehdiff_jax.sharding import make_mesh

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))
REQUIRED = (
    "base trainable steps batch_size resolution seed log_every checkpoint_every mesh model pisa_paths pisa"
).split()


def _load(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"run_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_configs():
    assert "tiny_cpu.py" in [p.name for p in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_locked_and_coherent(path):
    config = _load(path).get_config()
    assert config.is_locked
    assert sorted(set(REQUIRED) - set(config.keys())) == []
    with pytest.raises(AttributeError):
        config.not_a_key = 1  # locked: a typo is an error, not a new key
    assert config.trainable in ("lora", "all")
    mesh = make_mesh(config.mesh)
    assert mesh.size == len(jax.devices())
    if config.base == "random":
        UNetConfig.from_diffusers(config.model.unet.to_dict())
        VAEConfig.from_diffusers(config.model.vae.to_dict())
    AttentionRouting(pisa_paths=tuple(config.pisa_paths), pisa=PisaConfig(**config.pisa.to_dict()))
