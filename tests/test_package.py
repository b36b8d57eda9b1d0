"""Package-level contracts: the CLI answers --help for every command, and core code never imports torch."""

import subprocess
import sys

import pytest

from bokehdiff_jax import cli


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: bokehdiff-jax" in capsys.readouterr().out


def test_cli_without_command_fails(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bokehdiff-jax: ") and err.count("\n") == 1


def test_core_never_imports_torch():
    code = (
        "import sys\n"
        "import bokehdiff_jax.cli, bokehdiff_jax.physics, bokehdiff_jax.pisa, bokehdiff_jax.models.unet, "
        "bokehdiff_jax.models.vae, bokehdiff_jax.convert, bokehdiff_jax.render, bokehdiff_jax.data\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
