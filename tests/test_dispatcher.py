"""The ``bokehdiff-jax`` dispatcher's promises (README): a usage error is one ``error:`` line and exit
status 2, a number like ``-1,10`` is a value, and ``--help`` shows every default."""

import pytest

from bokehdiff_jax import cli

USAGE_ERRORS = [
    [],  # no command
    ["nonsense"],
    ["render"],  # required arguments missing
    ["render", "p.png", "--disparity", "d.npy", "--strength", "abc"],
    ["render", "p.png", "--disparity", "d.npy", "--strength", "4", "--layers", "9999"],
    ["render", "p.png", "--disparity", "d.npy", "--strength", "4", "--focus", "0.5", "--focus-at", "1,2"],
    ["synth", "--fg", "a", "--bg", "b", "--out", "c", "-n", "1", "--log2-times", "40", "40"],
    ["convert", "from-diffusers"],
    ["bench", "pisa", "--heads", "0"],
    ["bench", "unet", "--latent", "0"],
    ["demo", "--synth-size", "8"],
    ["render", "p.png", "--bogus-flag"],
]


@pytest.mark.parametrize("argv", USAGE_ERRORS, ids=lambda a: " ".join(a) or "(none)")
def test_usage_errors_are_one_line_and_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err


def test_number_like_values_are_not_taken_for_options():
    parser = cli.build_parser()
    args = parser.parse_args(
        ["render", "p.png", "--disparity", "d.npy", "--strength", "4", "--focus-at", "-1,10"]
    )
    assert args.focus_at == "-1,10"
    args = parser.parse_args("synth --fg a --bg b --out c -n 1 --log2-times -1e0 -.5".split())
    assert args.log2_times == [-1.0, -0.5]


@pytest.mark.parametrize("command", [["render"], ["synth"], ["demo"], ["bench", "pisa"], ["bench", "render"]])
def test_help_shows_every_default(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices[command[0]]
    if len(command) > 1:
        sub = sub._subparsers._group_actions[0].choices[command[1]]
    for action in sub._actions:
        unset = action.default is None or action.default is False or action.default == "==SUPPRESS=="
        if action.option_strings and not unset and action.help:
            shown = (
                " ".join(map(str, action.default))
                if isinstance(action.default, list)
                else str(action.default)
            )
            assert f"default: {shown})" in text or f"({shown})" in text, (action.dest, shown)
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help"


def test_bench_convert_workdir_must_be_a_folder_and_is_left_alone(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a user's file")
    assert cli.main(["bench", "convert", "--workdir", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --workdir") and err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
