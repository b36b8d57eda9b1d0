"""Range-checked argparse types: NaN, inf, out-of-range and malformed values are refused by the parser."""

import argparse

import pytest

from bokehdiff_jax.io.flags import float_in, int_in


def test_int_in():
    t = int_in(3, 256)
    assert t("3") == 3 and t("256") == 256
    for bad in ("2", "257", "3.5", "x", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"must be an integer in \[3, 256\]"):
            t(bad)
    assert int_in(0)("0") == 0
    with pytest.raises(argparse.ArgumentTypeError, match=r"integer >= 0, got '-1'"):
        int_in(0)("-1")


def test_float_in_refuses_non_finite_and_out_of_range():
    t = float_in(0, 100)
    assert t("0") == 0.0 and t("1e2") == 100.0
    for bad in ("nan", "inf", "-inf", "-0.1", "100.5", "1e308", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"finite number in \[0, 100\]"):
            t(bad)
    with pytest.raises(argparse.ArgumentTypeError, match=r"> 0, got '0'"):
        float_in(0, above=True)("0")
    assert float_in()("-3.5") == -3.5
    with pytest.raises(argparse.ArgumentTypeError, match="finite number, got 'nan'"):
        float_in()("nan")
