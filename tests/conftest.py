"""Test-wide set-up. Eight fake CPU devices so sharding tests run anywhere; must precede jax import."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def sdxl_config_dir() -> pathlib.Path:
    """The exact public SDXL configs shipped in the package (tests/models/test_configs.py checks them
    against the project's reference copy, ``../shared/sdxl``)."""
    from bokehdiff_jax.models.configs import SDXL_CONFIG_DIR

    return SDXL_CONFIG_DIR
