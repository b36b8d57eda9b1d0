"""Strict image and disparity readers, atomic writers (bokehdiff_jax.io.images)."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io import images as io


def rgb_u8(h=6, w=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_png16_rgb(path, arr_u16):
    """A minimal 16-bit RGB PNG encoder (Pillow cannot write one)."""
    h, w, _ = arr_u16.shape
    raw = b"".join(b"\x00" + arr_u16[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    path.write_bytes(png)


def write_pfm(path, arr, little_endian=True, colour=False):
    h, w = arr.shape
    data = np.repeat(arr[..., None], 3, -1) if colour else arr
    dtype = "<f4" if little_endian else ">f4"
    with open(path, "wb") as f:
        f.write(b"PF\n" if colour else b"Pf\n")
        f.write(f"{w} {h}\n".encode())
        f.write(b"-1.0\n" if little_endian else b"1.0\n")
        f.write(np.ascontiguousarray(data[::-1]).astype(dtype).tobytes())


# ------------------------------------------------------------------------------------------------ images


def test_rgb_png_roundtrip_and_range(tmp_path):
    a = rgb_u8()
    Image.fromarray(a).save(tmp_path / "a.png")
    img = io.read_image(tmp_path / "a.png")
    assert img.dtype == np.float32 and img.shape == (6, 5, 3)
    np.testing.assert_allclose(img, a / 255.0, atol=1e-7)
    rgba = io.read_rgba(tmp_path / "a.png")
    assert rgba.shape == (6, 5, 4) and np.all(rgba[..., 3] == 1.0)


def test_grayscale_8_and_16_bit(tmp_path):
    g8 = rgb_u8()[..., 0]
    Image.fromarray(g8).save(tmp_path / "g8.png")
    img = io.read_image(tmp_path / "g8.png")
    np.testing.assert_allclose(img, np.repeat(g8[..., None] / 255.0, 3, -1), atol=1e-7)
    g16 = np.random.default_rng(1).integers(0, 65536, (7, 4), dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    img16 = io.read_image(tmp_path / "g16.png")
    np.testing.assert_allclose(img16[..., 1], g16 / 65535.0, atol=1e-6)  # full 16-bit precision


def test_16_bit_rgb(tmp_path):
    a = np.random.default_rng(2).integers(0, 65536, (5, 3, 3), dtype=np.uint16)
    write_png16_rgb(tmp_path / "c16.png", a)
    img = io.read_image(tmp_path / "c16.png")
    np.testing.assert_allclose(img, a / 65535.0, atol=1 / 255.0)  # at least 8-bit precision


def test_palette_with_transparency_la_and_rgba(tmp_path):
    p = Image.new("P", (4, 3))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.info["transparency"] = 0  # palette entry 0 (red) is transparent
    p.save(tmp_path / "p.png", transparency=0)
    rgba = io.read_rgba(tmp_path / "p.png")
    assert rgba[1, 1, 3] == 1.0 and rgba[0, 0, 3] == 0.0
    np.testing.assert_allclose(rgba[1, 1, :3], [0, 0, 1])
    la = np.stack([rgb_u8()[..., 0], np.full((6, 5), 128, np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    rgba = io.read_rgba(tmp_path / "la.png")
    np.testing.assert_allclose(rgba[..., 3], 128 / 255.0)
    np.testing.assert_allclose(rgba[..., 0], la[..., 0] / 255.0)
    assert io.read_image(tmp_path / "la.png").shape == (6, 5, 3)


def test_cmyk_is_converted(tmp_path):
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # no magenta/yellow ink missing = red
    cmyk.save(tmp_path / "c.jpg", quality=100)
    img = io.read_image(tmp_path / "c.jpg")
    assert img.shape == (4, 4, 3)
    assert img[..., 0].mean() > 0.9 and img[..., 1:].mean() < 0.1


def test_exif_rotation_is_applied(tmp_path):
    a = np.zeros((2, 3, 3), np.uint8)
    a[0, 0] = 255  # top-left white
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "r.png", exif=exif)
    img = io.read_image(tmp_path / "r.png")
    assert img.shape == (3, 2, 3)
    assert img[0, 1].min() == 1.0 and img.sum() == 3.0  # top-left moved to top-right


def test_corrupt_missing_and_truncated_files(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    with pytest.raises(InputError, match="junk.png"):
        io.read_image(tmp_path / "junk.png")
    Image.fromarray(rgb_u8(64, 64)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt|truncated"):
        io.read_rgba(tmp_path / "t.png")
    with pytest.raises(InputError, match="no such file"):
        io.read_image(tmp_path / "missing.png")


def test_write_image_png_jpeg_atomic(tmp_path):
    a = rgb_u8(8, 8) / 255.0
    io.write_image(tmp_path / "o.png", a)
    np.testing.assert_allclose(io.read_image(tmp_path / "o.png"), a, atol=1e-6)
    io.write_image(tmp_path / "o.jpg", a)
    assert io.read_image(tmp_path / "o.jpg").shape == (8, 8, 3)
    io.write_image(tmp_path / "g.png", a[..., 0])
    assert Image.open(tmp_path / "g.png").mode == "L"
    with pytest.raises(InputError, match="extension"):
        io.write_image(tmp_path / "o.bmp", a)
    with pytest.raises(InputError, match="NaN"):
        io.write_image(tmp_path / "nan.png", np.full((2, 2, 3), np.nan))
    with pytest.raises(InputError, match=r"\[H, W, 3\]"):
        io.write_image(tmp_path / "c2.png", np.zeros((2, 2, 2)))
    with pytest.raises(InputError, match="finite"):
        io.write_disparity(tmp_path / "d.npy", np.zeros((2, 2, 2)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "o.jpg", "o.png"]  # no temporaries


def test_to_uint8_and_uint16_round_half_up():
    # k / 255 lands on k exactly; (k + 0.5) / 255 rounds up (not half to even); out of range clips.
    k = np.arange(256)
    np.testing.assert_array_equal(io.to_uint8(k / 255.0), k)
    np.testing.assert_array_equal(io.to_uint8((k[:-1] + 0.5) / 255.0), k[1:])
    np.testing.assert_array_equal(io.to_uint8(np.array([-3.0, 0.0019, 0.0021, 7.0])), [0, 0, 1, 255])
    u8 = np.array([[1, 2]], np.uint8)
    assert io.to_uint8(u8) is u8  # already 8-bit: passed through
    np.testing.assert_array_equal(io.to_uint16(np.array([0.0, 0.5, 1.0, 2.0])), [0, 32768, 65535, 65535])
    for fn in (io.to_uint8, io.to_uint16):
        with pytest.raises(InputError, match="inf"):
            fn(np.array([0.5, np.inf]))


# --------------------------------------------------------------------------------------------- disparity


def ramp(h=12, w=10):
    """Near at the bottom and centre-ish: a plausible disparity map (no flip warning)."""
    return np.tile(np.linspace(0.2, 0.9, h, dtype=np.float32)[:, None], (1, w))


def test_npy_npz_pfm_and_png_formats(tmp_path):
    d = ramp()
    np.save(tmp_path / "d.npy", d)
    np.savez(tmp_path / "d.npz", other=np.zeros(3), disparity=d)
    np.savez(tmp_path / "first.npz", d)
    write_pfm(tmp_path / "le.pfm", d)
    write_pfm(tmp_path / "be.pfm", d, little_endian=False)
    write_pfm(tmp_path / "c.pfm", d, colour=True)
    Image.fromarray(np.round(d * 255).astype(np.uint8)).save(tmp_path / "d8.png")
    Image.fromarray(np.round(d * 65535).astype(np.uint16)).save(tmp_path / "d16.png")
    io.write_disparity(tmp_path / "w16.png", d)
    for name, atol in [
        ("d.npy", 0),
        ("d.npz", 0),
        ("first.npz", 0),
        ("le.pfm", 0),
        ("be.pfm", 0),
        ("c.pfm", 0),
        ("d8.png", 0.5 / 255),
        ("d16.png", 0.5 / 65535 + 1e-7),
        ("w16.png", 0.5 / 65535 + 1e-7),
    ]:
        out, notes = io.read_disparity(tmp_path / name)
        assert out.dtype == np.float32 and out.shape == d.shape, name
        np.testing.assert_allclose(out, d, atol=atol + 1e-7, err_msg=name)
        assert not any("warning" in n for n in notes), (name, notes)
    _, notes = io.read_disparity(tmp_path / "d.npz")
    assert any("'disparity'" in n for n in notes)  # says which array it used


def test_out_of_range_needs_normalize(tmp_path):
    depthish = ramp() * 40 + 3
    np.save(tmp_path / "d.npy", depthish)
    with pytest.raises(InputError, match=r"outside \[0, 1\].*normalize"):
        io.read_disparity(tmp_path / "d.npy")
    out, notes = io.read_disparity(tmp_path / "d.npy", normalize=True)
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0)
    np.testing.assert_allclose(out, (depthish - depthish.min()) / np.ptp(depthish), atol=1e-6)
    assert any("normalised" in n for n in notes)


def test_nan_and_inf_are_filled_from_neighbours_and_reported(tmp_path):
    d = ramp()
    d[3:5, 4:6] = np.nan
    d[0, 0] = np.inf
    d[11, 9] = -np.inf
    np.save(tmp_path / "d.npy", d)
    out, notes = io.read_disparity(tmp_path / "d.npy")
    assert np.all(np.isfinite(out))
    # A horizontal ramp region: filled values equal their row's valid neighbours.
    np.testing.assert_allclose(out[3:5, 4:6], ramp()[3:5, 4:6], atol=0.05)
    assert any("filled 6 non-finite" in n for n in notes)
    np.save(tmp_path / "allnan.npy", np.full((4, 4), np.nan))
    with pytest.raises(InputError, match="no finite"):
        io.read_disparity(tmp_path / "allnan.npy")


def test_flip_and_flipped_map_warning(tmp_path):
    d = ramp()
    np.save(tmp_path / "d.npy", 1.0 - d)  # depth-like: top nearer than bottom
    yy, xx = np.mgrid[0:12, 0:10]
    bowl = (np.hypot(yy - 5.5, xx - 4.5) / 8).astype(np.float32)  # border nearer than centre
    np.save(tmp_path / "bowl.npy", np.clip(bowl + (1 - d) * 0.3, 0, 1))
    _, notes = io.read_disparity(tmp_path / "bowl.npy")
    assert any("looks flipped" in n and "--flip-disparity" in n for n in notes)
    out, notes = io.read_disparity(tmp_path / "bowl.npy", flip=True)
    assert any("flipped disparity" in n for n in notes)
    assert not any("looks flipped" in n for n in notes)
    np.testing.assert_allclose(out, 1 - np.clip(bowl + (1 - d) * 0.3, 0, 1), atol=1e-6)


def test_bad_disparity_files(tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(InputError, match="corrupt"):
        io.read_disparity(tmp_path / "bad.npy")
    np.save(tmp_path / "3d.npy", np.zeros((2, 3, 4)))
    with pytest.raises(InputError, match="2-D"):
        io.read_disparity(tmp_path / "3d.npy")
    (tmp_path / "d.exr").write_bytes(b"x")
    with pytest.raises(InputError, match="unsupported"):
        io.read_disparity(tmp_path / "d.exr")
    Image.fromarray(rgb_u8()).save(tmp_path / "colour.png")
    with pytest.raises(InputError, match="single-channel"):
        io.read_disparity(tmp_path / "colour.png")
    (tmp_path / "bad.pfm").write_bytes(b"P6\n1 1\n255\n\x00\x00\x00")
    with pytest.raises(InputError, match="PFM"):
        io.read_disparity(tmp_path / "bad.pfm")
    write_pfm(tmp_path / "short.pfm", ramp())
    (tmp_path / "short.pfm").write_bytes((tmp_path / "short.pfm").read_bytes()[:-40])
    with pytest.raises(InputError, match="PFM data"):
        io.read_disparity(tmp_path / "short.pfm")


def test_fill_invalid_nearest():
    d = np.array([[0.1, np.nan, np.nan, np.nan, 0.9]], np.float32)
    out, n = io.fill_invalid(d)
    assert n == 3
    np.testing.assert_allclose(out, [[0.1, 0.1, 0.5, 0.9, 0.9]], atol=1e-6)


def test_fill_invalid_wide_hole_uses_coarse_levels():
    cols = np.linspace(0.0, 1.0, 48, dtype=np.float32)
    d = np.tile(cols, (64, 1))
    d[:40] = np.inf  # 40 rows: more than the 16 fine passes reach
    out, n = io.fill_invalid(d)
    assert n == 40 * 48 and np.all(np.isfinite(out))
    err = np.abs(out[:40] - np.tile(cols, (40, 1)))  # columns roughly keep their value
    assert err.max() < 0.15 and err.mean() < 0.03


# ------------------------------------------------------------------------------------------ issue 11
def test_palette_and_alpha_disparity_pngs_are_refused_with_the_reason(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    # A colour-mapped depth preview: a palette image whose colours are not disparities.
    colour = np.stack([gray, 255 - gray, gray // 2], -1)
    Image.fromarray(colour).quantize(16).save(tmp_path / "preview.png")
    with pytest.raises(InputError, match="colour palette"):
        io.read_disparity(tmp_path / "preview.png")
    # The same picture as RGB was already refused: both say why.
    Image.fromarray(colour).save(tmp_path / "preview_rgb.png")
    with pytest.raises(InputError, match="colour"):
        io.read_disparity(tmp_path / "preview_rgb.png")
    # A palette of grays holds gray levels: read like the grayscale PNG it encodes.
    Image.fromarray(gray).convert("P").save(tmp_path / "gray_palette.png")
    assert Image.open(tmp_path / "gray_palette.png").mode == "P"
    out, _ = io.read_disparity(tmp_path / "gray_palette.png")
    np.testing.assert_allclose(out, gray / 255.0, atol=1e-6)
    # Gray + alpha: transparent pixels have no disparity.
    alpha = np.full_like(gray, 255)
    alpha[0, 0] = 0
    Image.fromarray(np.stack([gray, alpha], -1), "LA").save(tmp_path / "la.png")
    Image.fromarray(np.stack([gray, gray, gray, alpha], -1), "RGBA").save(tmp_path / "rgba.png")
    for name in ("la.png", "rgba.png"):
        with pytest.raises(InputError, match="transparent"):
            io.read_disparity(tmp_path / name)
    # An alpha channel that is opaque everywhere carries nothing: accepted.
    Image.fromarray(np.stack([gray, np.full_like(gray, 255)], -1), "LA").save(tmp_path / "la_opaque.png")
    np.testing.assert_allclose(io.read_disparity(tmp_path / "la_opaque.png")[0], gray / 255.0, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (1, 1, 7), (1, 7, 1), (1, 1)])
def test_one_row_and_one_column_maps_keep_their_two_axes(tmp_path, shape):
    d = np.linspace(0, 1, int(np.prod(shape)), dtype=np.float32).reshape(shape)
    np.save(tmp_path / "d.npy", d)
    out, _ = io.read_disparity(tmp_path / "d.npy")
    want = tuple(s for i, s in enumerate(shape) if not (len(shape) == 3 and i == (0 if shape[0] == 1 else 2)))
    assert out.shape == want
    Image.fromarray((d.reshape(want) * 255).astype(np.uint8)).save(tmp_path / "d.png")
    assert io.read_disparity(tmp_path / "d.png")[0].shape == want
    assert io.read_image(tmp_path / "d.png").shape == (*want, 3)


def test_a_text_file_named_npy_or_npz_says_what_it_is(tmp_path):
    (tmp_path / "d.npy").write_text("0.1 0.2\n0.3 0.4\n")
    with pytest.raises(InputError, match=r"not a \.npy file.*numpy\.save") as e:
        io.read_disparity(tmp_path / "d.npy")
    assert "pickle" not in str(e.value)
    (tmp_path / "d.npz").write_text("0.1 0.2\n")
    with pytest.raises(InputError, match=r"not a \.npz archive") as e:
        io.read_disparity(tmp_path / "d.npz")
    assert "pickle" not in str(e.value)


def test_normalize_handles_values_near_the_float_limit(tmp_path):
    import warnings

    d = np.array([[-1e308, 0.0], [1e308, 1.7e308]])
    np.save(tmp_path / "d.npy", d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw RuntimeWarning from the arithmetic
        out, notes = io.read_disparity(tmp_path / "d.npy", normalize=True)
    assert np.isfinite(out).all() and out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out.ravel(), (d.ravel() / 1e308 + 1) / 2.7, atol=1e-6)
    assert not any("filled" in n for n in notes)


def test_messages_say_what_is_wrong_in_the_users_terms(tmp_path):
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(InputError, match="is a folder, not an image file"):
        io.read_image(tmp_path / "folder.png")
    (tmp_path / "folder.npy").mkdir()
    with pytest.raises(InputError, match="is a folder, not a disparity file"):
        io.read_disparity(tmp_path / "folder.npy")
    np.save(tmp_path / "big.npy", np.array([[0.0, 2.0]]))
    with pytest.raises(InputError, match="--normalize") as e:
        io.read_disparity(tmp_path / "big.npy")
    assert "normalize=True" not in str(e.value)
