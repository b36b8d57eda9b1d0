import numpy as np
import pytest

from bokehdiff_jax.data.procedural import procedural_foreground


def test_seeded_and_well_formed():
    a = procedural_foreground((48, 64), 3)
    b = procedural_foreground((48, 64), 3)
    c = procedural_foreground((48, 64), 4)
    assert a.shape == (48, 64, 4) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0


@pytest.mark.parametrize("kind", ["hair", "fur", "whiskers", "mixed"])
def test_strands_have_soft_alpha_outside_an_opaque_body(kind):
    rgba = procedural_foreground(96, 0, kind=kind)
    alpha = rgba[..., 3]
    assert (alpha > 0.99).mean() > 0.05  # an opaque body
    assert alpha[0].max() < 1.0 or alpha[:, 0].max() < 1.0  # not a full rectangle
    # Thin strands: many pixels of fractional coverage more than 3 px away from the opaque body
    # (so not just its anti-aliased rim).
    near_body = alpha > 0.99
    for _ in range(3):
        grown = near_body.copy()
        grown[1:] |= near_body[:-1]
        grown[:-1] |= near_body[1:]
        grown[:, 1:] |= near_body[:, :-1]
        grown[:, :-1] |= near_body[:, 1:]
        near_body = grown
    strands = (alpha > 0.02) & (alpha < 0.95) & ~near_body
    assert strands.sum() > 60, strands.sum()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        procedural_foreground(4, 0)
    with pytest.raises(ValueError):
        procedural_foreground(32, 0, kind="feathers")


def test_procedural_lights_seeded_dark_with_saturated_points():
    from bokehdiff_jax.data.procedural import procedural_lights

    a, b = procedural_lights((40, 56), 1), procedural_lights((40, 56), 1)
    assert a.shape == (40, 56, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, procedural_lights((40, 56), 2))
    assert np.median(a) < 0.15 and (a.max(-1) == 1.0).sum() >= 1  # dark, with saturated lights
    with pytest.raises(ValueError):
        procedural_lights(4, 0)
