"""Scene sampling and synthesis: determinism, a real foreground tilt, K recorded = K rendered, the
released blur formula and its canvas scaling, clean edges of enlarged foregrounds, disparity labels,
canonical metadata, and input hygiene on hand-made bad files."""

import dataclasses
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from bokehdiff_jax.data.procedural import procedural_foreground
from bokehdiff_jax.data.synthesis import (
    SynthConfig,
    _alpha_bbox,
    _resize,
    layered_config,
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
    out, _ = render_scene(scene, cfg)
    p, s = scene.pad, cfg.size
    alpha = scene.rgba_lhwc[1, p : p + s, p : p + s, 3]
    opaque = alpha == 1.0  # the blended label is the plane's own value where the foreground is opaque
    d0, gx, gy = scene.meta["layers"][1]["plane"]
    assert (abs(gx) + abs(gy)) * (s + 2 * p) / s >= 0.2 - 1e-6  # tilts span the padded canvas
    u = (np.arange(s) + 0.5) / s - 0.5
    plane = d0 + gx * u[None, :] + gy * u[:, None]
    # the disparity map follows the tilted plane over the foreground, and varies across it
    np.testing.assert_allclose(out["disparity"][opaque], plane[opaque], atol=1e-5)
    assert np.ptp(out["disparity"][opaque]) > 0.015  # a no-op tilt (the original) gives 0
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

    cfg = dataclasses.replace(tiny_config, base_strength=3.0, log2_times=(0.5, 1.5))
    scene = sample_scene(cfg, *arrays, seed=2, index=5)
    sample, meta = synthesize_with_meta(cfg, *arrays, seed=2, index=5)
    focus = float(sample["focus"])
    assert float(sample["strength"]) == pytest.approx(3.0 * meta["times"] / max(focus, 1 - focus), rel=1e-6)
    assert float(sample["strength"]) == pytest.approx(scene.strength, rel=1e-6)
    p, s = scene.pad, cfg.size
    assert p >= 3.0 * meta["times"] >= sample["coc"].max()  # every ray landing in the crop sees content
    lc = layered_config(cfg)
    crop = (p, p, s, s)  # the window synthesis renders (same compilation)
    k = float(sample["strength"])
    again = np.asarray(render_layers(scene.rgba_lhwc, scene.planes_l3, scene.focus, k, config=lc, crop=crop))
    np.testing.assert_allclose(sample["bokeh"], np.clip(again, 0, 1), atol=1e-6)
    weaker = render_layers(scene.rgba_lhwc, scene.planes_l3, scene.focus, 0.7 * k, config=lc, crop=crop)
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


def test_enlarged_opaque_disc_keeps_its_colour_to_the_edge_and_no_alpha_outside():
    # An opaque disc of one colour on a transparent background of another, enlarged 1.77x as the
    # sampler enlarges foregrounds: no rim of shifted colour, no ring of alpha outside the disc.
    n, radius, scale = 40, 14.0, 1.77
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    inside = np.hypot(yy - n / 2, xx - n / 2) <= radius
    rgba = np.zeros((n, n, 4), np.float32)
    rgba[...] = (0.1, 0.9, 0.2, 0.0)
    rgba[inside] = (0.8, 0.35, 0.2, 1.0)
    m = round(n * scale)
    up = _resize(rgba, (m, m), premultiply=True)
    alpha = up[..., 3]
    assert alpha.min() >= 0.0 and alpha.max() <= 1.0  # a convex filter: nothing to clip
    np.testing.assert_allclose(
        up[alpha > 0, :3], np.broadcast_to((0.8, 0.35, 0.2), up[alpha > 0, :3].shape), atol=2e-6
    )
    yy, xx = (np.mgrid[0:m, 0:m] + 0.5) * (n / m)  # output pixel centres in input pixels
    dist = np.hypot(yy - n / 2, xx - n / 2)
    # Beyond the filter's reach (one input pixel past the disc's last pixel centres) alpha is exactly 0.
    assert (alpha[dist > radius + 1.5] == 0).all()
    assert (alpha[dist < radius - 1.5] == 1).all()
    # The whole chain: the foreground layer of a scene keeps this colour wherever it has alpha.
    cfg = SynthConfig(size=64, fg_scale=(1.0, 1.0), min_bg_side=16, log2_times=(0.0, 0.0))
    scene = sample_scene(cfg, [rgba], [np.full((64, 64, 3), 0.5, np.float32)], 0, 0)
    assert scene.meta["layers"][1]["scale"] > 1.5
    layer = scene.rgba_lhwc[1]
    seen = layer[..., 3] > 0
    np.testing.assert_allclose(
        layer[seen, :3], np.broadcast_to((0.8, 0.35, 0.2), layer[seen, :3].shape), atol=2e-6
    )


def test_blur_follows_the_released_formula_and_scales_with_the_canvas(arrays):
    from bokehdiff_jax.physics.optics import coc_radius
    from bokehdiff_jax.render import composite_layers

    assert SynthConfig().strength_scale == 12.0 and SynthConfig(size=384).strength_scale == 6.0
    assert SynthConfig(size=384, base_strength=5.0).strength_scale == 5.0
    cfg = SynthConfig(size=64, min_bg_side=16, min_fg_side=4)
    for index in range(6):
        scene = sample_scene(cfg, *arrays, seed=3, index=index)
        times, f, p, s = scene.meta["times"], scene.focus, scene.pad, cfg.size
        # Released: r = 12 times |d - d_f| / max(d_f, 1 - d_f), 12 px at 768 px, here 1 px at 64 px.
        assert scene.strength == pytest.approx(1.0 * times / max(f, 1 - f), rel=1e-9)
        _, disp = composite_layers(scene.rgba_lhwc, scene.planes_l3)
        radius = np.asarray(coc_radius(np.asarray(disp)[p : p + s, p : p + s], f, scene.strength))
        assert radius.max() <= times * (1 + 1e-5) and p >= times
        # The background reaches disparity 0 at its far corner (released), over the padded canvas.
        d0, gx, gy = scene.planes_l3[0]
        assert d0 - (abs(gx) + abs(gy)) / 2 == pytest.approx(0.0, abs=1e-6)
        tilt = abs(gx) + abs(gy)
        assert 0.0 <= tilt <= 0.25 + 1e-6
        # One foreground (released), inside the frame, above the background everywhere.
        (fg,) = scene.meta["layers"][1:]
        tx, ty, fw, fh = fg["box_xywh"]
        assert 0 <= tx <= s - fw and 0 <= ty <= s - fh
        assert (
            scene.planes_l3[1][0] - (abs(scene.planes_l3[1][1]) + abs(scene.planes_l3[1][2])) / 2
            >= tilt - 1e-6
        )


def test_disparity_label_modes(tiny_config, arrays):
    cfg = dataclasses.replace(tiny_config, fg_scale=(0.9, 0.9))
    assert cfg.disparity_label == "blend"  # the released labels by default
    scene = sample_scene(cfg, *arrays, seed=1, index=0)
    p, s = scene.pad, cfg.size
    alpha = scene.rgba_lhwc[1, p : p + s, p : p + s, 3]
    u = (np.arange(s) + 0.5) / s - 0.5
    bg, fg = (
        (d0 + gx * u[None, :] + gy * u[:, None])
        for d0, gx, gy in (lay["plane"] for lay in scene.meta["layers"])
    )
    labels = {}
    for label in ("blend", "threshold", "front"):
        c = dataclasses.replace(cfg, disparity_label=label, label_threshold=0.5)
        labels[label] = synthesize(c, *arrays, seed=1, index=0)["disparity"]
    strands = (alpha > 0.02) & (alpha < 0.5)
    assert strands.sum() > 10
    np.testing.assert_allclose(labels["blend"], alpha * fg + (1 - alpha) * bg, atol=2e-6)
    np.testing.assert_allclose(labels["threshold"], np.where(alpha >= 0.5, fg, bg), atol=2e-6)
    np.testing.assert_allclose(labels["front"], np.where(alpha > 0, fg, bg), atol=2e-6)
    with pytest.raises(ValueError, match="disparity_label"):
        SynthConfig(disparity_label="nearest")


def test_meta_is_canonical_json(tiny_config, arrays):
    sample, meta = synthesize_with_meta(tiny_config, *arrays, seed=0, index=2)
    _, again = synthesize_with_meta(tiny_config, *arrays, seed=0, index=2)

    def keys_sorted(tree):
        if isinstance(tree, dict):
            return list(tree) == sorted(tree) and all(keys_sorted(v) for v in tree.values())
        return all(keys_sorted(v) for v in tree) if isinstance(tree, list) else True

    assert keys_sorted(meta) and json.dumps(meta) == json.dumps(again)
    assert {"n_rays", "rays_mean", "strength", "focus", "times", "pad"} <= set(meta)
    assert 1 <= meta["rays_mean"] <= meta["n_rays"] <= tiny_config.rays_max
    # The cap binds: at half the rays this scene traced, no pixel gets more, and fewer are traced.
    cap = meta["n_rays"] // 2
    assert cap >= 1
    low, capped = synthesize_with_meta(
        dataclasses.replace(tiny_config, rays_max=cap), *arrays, seed=0, index=2
    )
    assert 1 <= capped["n_rays"] <= cap and capped["rays_mean"] < meta["rays_mean"]
    # What the metadata reports is what the renderer did: a cap at the rays traced changes nothing, a
    # cap below changes the rendered target (the input is the same scene either way).
    exact, _ = synthesize_with_meta(
        dataclasses.replace(tiny_config, rays_max=meta["n_rays"]), *arrays, seed=0, index=2
    )
    np.testing.assert_array_equal(exact["bokeh"], sample["bokeh"])
    np.testing.assert_array_equal(low["aif"], sample["aif"])
    assert np.abs(low["bokeh"].astype(np.float64) - sample["bokeh"]).max() > 0


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
    out, _ = render_scene(scene, cfg)
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
