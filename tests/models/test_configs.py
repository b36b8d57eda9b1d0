"""Architecture configs: read from diffusers' config.json, strictly."""

import dataclasses
import json
from pathlib import Path

import pytest
import tiny_configs

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.configs import SDXL_CONFIG_DIR, UNetConfig, VAEConfig

# The project's reference copy of the public configs, beside the checkout (../shared/sdxl).
SHARED = Path(__file__).resolve().parents[3] / "shared"


def test_shipped_configs_are_the_public_sdxl_ones():
    shared = SHARED / "sdxl"
    # No silent skip: without the reference copy this test would check nothing.
    assert shared.is_dir(), f"{shared} (the project's reference copy of the SDXL configs) is missing"
    for name in ("unet_config.json", "vae_config.json", "scheduler_config.json"):
        ours = json.loads((SDXL_CONFIG_DIR / name).read_text())
        assert ours == json.loads((shared / name).read_text())
        assert ours["_class_name"]


def test_sdxl_unet_config():
    cfg = UNetConfig.sdxl()
    assert cfg == UNetConfig()  # the dataclass defaults are SDXL
    assert cfg.num_attention_heads == (5, 10, 20)  # diffusers' "attention_head_dim" is the head count
    assert cfg.transformer_layers_per_block == (1, 2, 10)
    assert cfg.time_embed_dim == 1280 and cfg.text_embeds_dim == 1280
    assert UNetConfig.from_diffusers(cfg.to_diffusers()) == cfg


def test_sdxl_vae_config():
    cfg = VAEConfig.sdxl()
    assert cfg == VAEConfig()
    assert VAEConfig.from_diffusers(cfg.to_diffusers()) == cfg
    assert VAEConfig.from_diffusers(SDXL_CONFIG_DIR / "vae_config.json") == cfg


def test_config_folder_and_metadata_keys(tmp_path):
    d = json.loads((SDXL_CONFIG_DIR / "unet_config.json").read_text())
    d["_diffusers_version"] = "0.19.0.dev0"
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert UNetConfig.from_diffusers(tmp_path) == UNetConfig.sdxl()


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("some_new_option", 1, "unknown key 'some_new_option'"),
        ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift='scale_shift' is not supported"),
        ("class_embed_type", "timestep", "class_embed_type"),
        ("cross_attention_dim", [2048, 2048, 2048], "cross_attention_dim must be one int"),
        ("transformer_layers_per_block", [1, 2], "transformer_layers_per_block"),
        ("up_block_types", ["CrossAttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"], "AttnUpBlock2D"),
        ("block_out_channels", "abc", "block_out_channels must be a list of ints"),
        ("layers_per_block", "2", "layers_per_block must be an int, got '2'"),
        ("norm_num_groups", 32.0, "norm_num_groups must be an int"),
    ],
)
def test_unet_config_rejects_what_it_cannot_build(key, value, match):
    d = json.loads((SDXL_CONFIG_DIR / "unet_config.json").read_text())
    d[key] = value
    with pytest.raises(InputError, match=match):
        UNetConfig.from_diffusers(d)


def test_vae_config_rejects_what_it_cannot_build(tmp_path):
    d = json.loads((SDXL_CONFIG_DIR / "vae_config.json").read_text())
    with pytest.raises(InputError, match="latents_mean"):
        VAEConfig.from_diffusers({**d, "latents_mean": [0.0] * 4})
    with pytest.raises(InputError, match="down_block_types"):
        VAEConfig.from_diffusers({**d, "down_block_types": ["DownEncoderBlock2D"]})
    with pytest.raises(InputError, match="no diffusers config"):
        VAEConfig.from_diffusers(tmp_path / "missing.json")
    with pytest.raises(InputError, match="norm_num_groups must be an int"):
        VAEConfig.from_diffusers({**d, "norm_num_groups": "32"})
    with pytest.raises(InputError, match="force_upcast must be true or false"):
        VAEConfig.from_diffusers({**d, "force_upcast": "no"})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        VAEConfig.from_diffusers(tmp_path / "bad.json")


def test_bad_shapes_are_input_errors():
    tiny = UNetConfig.from_diffusers(tiny_configs.UNETS["sdxl"])
    with pytest.raises(InputError, match="divide"):
        dataclasses.replace(tiny, num_attention_heads=(3, 2, 4))
    with pytest.raises(InputError, match="one per block"):
        dataclasses.replace(tiny, transformer_layers_per_block=(1, 1))
