"""Scene sampling and synthesis: determinism, a real foreground tilt, K recorded = K rendered, and
input hygiene on hand-made bad files."""

import dataclasses
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from bokehdiff_jax.data.procedural import procedural_foreground
from bokehdiff_jax.data.synthesis import (
    _alpha_bbox,
    _resize,
    load_foreground,
    render_scene,
    sample_scene,
    scan_folder,
    scan_inputs,
    synthesize,
    synthesize_with_meta,
)
from bokehdiff_jax.errors import InputError


@pytest.fixture(scope="module")
def arrays():
    fg = [procedural_foreground(40, i) for i in range(3)]
    rng = np.random.default_rng(1)
    bg = [rng.random((48, 72, 3)).astype(np.float32), rng.random((60, 40, 3)).astype(np.float32)]
    return fg, bg


def test_same_seed_index_identical_other_index_differs(tiny_config, input_dirs):
    inputs = scan_inputs(*input_dirs, tiny_config)
    a = synthesize(tiny_config, inputs.fg, inputs.bg, 7, 3)
    b = synthesize(tiny_config, inputs.fg, inputs.bg, 7, 3)
    c = synthesize(tiny_config, inputs.fg, inputs.bg, 7, 4)
    assert set(a) == {"aif", "bokeh", "disparity", "focus", "strength", "coc"}
    s = tiny_config.size
    assert a["aif"].shape == a["bokeh"].shape == (s, s, 3)
    assert a["disparity"].shape == a["coc"].shape == (s, s)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["aif"], c["aif"])
    assert (
        a["aif"].min() >= 0
        and a["aif"].max() <= 1
        and a["disparity"].min() >= 0
        and a["disparity"].max() <= 1
    )


def test_foreground_plane_really_tilts(tiny_config, arrays):
    cfg = dataclasses.replace(tiny_config, fg_count=(1, 1), fg_tilt=(0.2, 0.25), fg_scale=(0.9, 0.9))
    scene = sample_scene(cfg, *arrays, seed=0, index=0)
    out = render_scene(scene, cfg)
    p, s = scene.pad, cfg.size
    alpha = scene.rgba_lhwc[1, p : p + s, p : p + s, 3]
    opaque = alpha >= 0.5
    d0, gx, gy = scene.meta["layers"][1]["plane"]
    assert abs(gx) + abs(gy) >= 0.2 - 1e-6
    u = (np.arange(s) + 0.5) / s - 0.5
    plane = d0 + gx * u[None, :] + gy * u[:, None]
    # the disparity map follows the tilted plane over the foreground, and varies across it
    np.testing.assert_allclose(out["disparity"][opaque], plane[opaque], atol=1e-5)
    assert np.ptp(out["disparity"][opaque]) > 0.05
    # the foreground lies in front of the background everywhere (no crossing planes)
    bg_d0, bg_gx, bg_gy = scene.meta["layers"][0]["plane"]
    bg = bg_d0 + bg_gx * u[None, :] + bg_gy * u[:, None]
    assert (plane > bg).all()


def test_layers_alpha_clipped_and_background_crop_keeps_aspect(tiny_config, arrays):
    for index in range(4):
        scene = sample_scene(tiny_config, *arrays, seed=1, index=index)
        assert scene.rgba_lhwc.min() >= 0.0 and scene.rgba_lhwc.max() <= 1.0
        assert (scene.rgba_lhwc[0, ..., 3] == 1).all()
        x0, y0, w, h = scene.meta["layers"][0]["crop_xywh"]
        assert w == h  # a square crop of the image, never a stretch
        src = arrays[1][0] if "(48, 72, 3)" in scene.meta["layers"][0]["source"] else arrays[1][1]
        assert x0 + w <= src.shape[1] and y0 + h <= src.shape[0]


def test_strength_is_the_k_that_rendered_the_target(tiny_config, arrays):
    from bokehdiff_jax.render import render_layers
    from bokehdiff_jax.render.layered import LayeredConfig

    cfg = dataclasses.replace(tiny_config, base_strength=3.0, log2_times=(0.5, 1.5))
    scene = sample_scene(cfg, *arrays, seed=2, index=5)
    sample, meta = synthesize_with_meta(cfg, *arrays, seed=2, index=5)
    assert float(sample["strength"]) == pytest.approx(3.0 * meta["times"], rel=1e-6)
    assert float(sample["strength"]) == pytest.approx(scene.strength, rel=1e-6)
    p, s = scene.pad, cfg.size
    assert p >= scene.strength  # every ray that lands in the crop sees real content
    lc = LayeredConfig(num_rays=scene.n_rays)
    again = np.asarray(
        render_layers(scene.rgba_lhwc, scene.planes_l3, scene.focus, float(sample["strength"]), config=lc)
    )[p : p + s, p : p + s]
    np.testing.assert_allclose(sample["bokeh"], np.clip(again, 0, 1), atol=1e-6)
    weaker = np.asarray(
        render_layers(
            scene.rgba_lhwc, scene.planes_l3, scene.focus, 0.7 * float(sample["strength"]), config=lc
        )
    )[p : p + s, p : p + s]
    assert np.abs(weaker - sample["bokeh"]).max() > 1e-2
    np.testing.assert_allclose(
        sample["coc"], sample["strength"] * np.abs(sample["disparity"] - sample["focus"]), rtol=1e-6
    )


def test_focus_on_foreground_or_background(tiny_config, arrays):
    on_fg = dataclasses.replace(tiny_config, fg_focus_prob=1.0, fg_count=(1, 1))
    on_bg = dataclasses.replace(tiny_config, fg_focus_prob=0.0)
    for index in range(3):
        s = sample_scene(on_bg, *arrays, seed=0, index=index)
        assert s.meta["focus_layer"] == 0
        assert s.focus == pytest.approx(s.meta["layers"][0]["plane"][0], abs=1e-6)  # mean of the plane
        s = sample_scene(on_fg, *arrays, seed=0, index=index)
        assert s.meta["focus_layer"] == 1
        d0, gx, gy = s.meta["layers"][1]["plane"]
        assert d0 - (abs(gx) + abs(gy)) / 2 - 1e-6 <= s.focus <= d0 + (abs(gx) + abs(gy)) / 2 + 1e-6
        assert s.focus > s.meta["layers"][0]["plane"][0]


def test_bbox_and_resize_edges():
    a = np.zeros((10, 12), bool)
    a[0, 11] = a[9, 0] = True  # opaque pixels on the last row and column count
    assert _alpha_bbox(a) == (0, 10, 0, 12)
    assert _alpha_bbox(np.zeros((4, 4), bool)) is None
    hard = np.zeros((8, 8, 4), np.float32)
    hard[2:6, 2:6] = 1.0
    up = _resize(hard, (37, 37), premultiply=True)  # Lanczos overshoots: alpha must be clipped
    assert up[..., 3].min() >= 0.0 and up[..., 3].max() <= 1.0


def _png(path, arr, mode=None):
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)


def test_input_hygiene(tmp_path, tiny_config):
    fg, bg = tmp_path / "fg", tmp_path / "bg"
    fg.mkdir()
    bg.mkdir()
    good = (procedural_foreground(40, 0) * 255).astype(np.uint8)
    _png(fg / "a_good.png", good, "RGBA")
    _png(fg / "b_no_alpha.png", good[..., :3])
    transparent = good.copy()
    transparent[..., 3] = 0
    _png(fg / "c_transparent.png", transparent, "RGBA")
    speck = np.zeros((20, 20, 4), np.uint8)
    speck[5:7, 5:7] = 255  # a 2x2 visible part
    _png(fg / "d_tiny.png", speck, "RGBA")
    (fg / "e_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    pal = Image.fromarray(good, "RGBA").convert("RGBA").quantize(16)  # palette with transparency
    pal.save(fg / "f_palette.png")
    (fg / "notes.txt").write_text("not an image")

    rng = np.random.default_rng(0)
    rgb = (rng.random((40, 60, 3)) * 255).astype(np.uint8)
    _png(bg / "a_rgb.png", rgb)
    _png(bg / "b_gray.png", rgb[..., 0], "L")
    Image.fromarray((rng.random((40, 50)) * 65535).astype(np.uint16)).save(bg / "c_16bit.png")
    Image.fromarray(rgb).convert("CMYK").save(bg / "d_cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(rgb).save(bg / "e_exif.jpg", exif=exif)
    _png(bg / "f_tiny.png", rgb[:1, :1])
    Image.fromarray((rng.random((30, 300, 3)) * 255).astype(np.uint8)).save(bg / "g_huge.png")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG")
    (bg / "h_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])

    cfg = dataclasses.replace(tiny_config, max_input_side=128)
    inputs = scan_inputs(fg, bg, cfg)
    fg_names = [p.name for p in inputs.fg]
    assert fg_names == ["a_good.png", "f_palette.png"]  # sorted
    skipped = {p.split("/")[-1]: r for p, r in inputs.fg_report.skipped}
    assert set(skipped) == {"b_no_alpha.png", "c_transparent.png", "d_tiny.png", "e_corrupt.png", "notes.txt"}
    assert "transparency" in skipped["b_no_alpha.png"]
    assert "fully transparent" in skipped["c_transparent.png"]
    assert "too small" in skipped["d_tiny.png"]
    assert "not an image" in skipped["notes.txt"]
    assert skipped["e_corrupt.png"].startswith("corrupt")  # the reason, not the path a second time
    assert (
        "P converted" in dict((p.split("/")[-1], r) for p, r in inputs.fg_report.converted)["f_palette.png"]
    )

    bg_names = [p.name for p in inputs.bg]
    assert bg_names == ["a_rgb.png", "b_gray.png", "c_16bit.png", "d_cmyk.jpg", "e_exif.jpg", "g_huge.png"]
    bskipped = {p.split("/")[-1]: r for p, r in inputs.bg_report.skipped}
    assert set(bskipped) == {"f_tiny.png", "h_truncated.jpg"}
    conv = {p.split("/")[-1]: r for p, r in inputs.bg_report.converted}
    assert "L converted" in conv["b_gray.png"] and "CMYK converted" in conv["d_cmyk.jpg"]
    assert "EXIF orientation 6" in conv["e_exif.jpg"] and "downscaled" in conv["g_huge.png"]
    assert "I;16" in conv["c_16bit.png"] or "I" in conv["c_16bit.png"]
    summary = inputs.summary()
    assert "foregrounds: 2 usable, 5 skipped" in summary and "backgrounds: 6 usable, 2 skipped" in summary

    # The converted inputs synthesize; a file broken after the scan is skipped mid-run, not a crash.
    shutil.copy(fg / "e_corrupt.png", fg / "a_good.png")
    for index in range(3):
        out, meta = synthesize_with_meta(cfg, inputs.fg, inputs.bg, 0, index)
        assert np.isfinite(out["bokeh"]).all()
        assert all("a_good.png" not in layer["source"] for layer in meta["layers"][1:])


def test_load_foreground_reasons_and_empty_sets(tmp_path, tiny_config):
    with pytest.raises(InputError, match="fully transparent"):
        load_foreground(np.zeros((8, 8, 4), np.float32), tiny_config)
    (tmp_path / "fg").mkdir()
    (tmp_path / "bg").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "fg" / "opaque.png")
    with pytest.raises(InputError, match="no usable foreground.*opaque.png"):
        scan_inputs(tmp_path / "fg", tmp_path / "bg", tiny_config)
    with pytest.raises(InputError, match="does not exist"):
        scan_folder(tmp_path / "missing", "bg", tiny_config)


def test_in_focus_foreground_stays_sharp_over_a_blurred_background(tiny_config, arrays):
    # Whole chain: planes mapped to the padded canvas, focus on the fronto-parallel foreground.
    cfg = dataclasses.replace(
        tiny_config,
        size=48,
        fg_count=(1, 1),
        fg_tilt=(0.0, 0.0),
        bg_tilt=(0.0, 0.0),
        fg_focus_prob=1.0,
        fg_scale=(0.9, 0.9),
        base_strength=6.0,
    )
    scene = sample_scene(cfg, *arrays, seed=4, index=0)
    out = render_scene(scene, cfg)
    p, s = scene.pad, cfg.size
    solid = scene.rgba_lhwc[1, p : p + s, p : p + s, 3] > 0.999
    for _ in range(2):  # erode: the foreground's rim legitimately mixes with the blurred background
        solid = (
            solid
            & np.roll(solid, 1, 0)
            & np.roll(solid, -1, 0)
            & np.roll(solid, 1, 1)
            & np.roll(solid, -1, 1)
        )
    assert solid.sum() > 50
    np.testing.assert_allclose(out["bokeh"][solid], out["aif"][solid], atol=2e-3)
    background = scene.rgba_lhwc[1, p : p + s, p : p + s, 3] == 0
    err_bg = np.abs(out["bokeh"][background] - out["aif"][background]).mean()
    assert err_bg > 0.02, err_bg  # the background (random noise) is visibly blurred
