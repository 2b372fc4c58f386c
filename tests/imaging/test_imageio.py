"""Tests for oncoscope.imaging.imageio.load_image on images generated here (never dataset files)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from oncoscope.imaging import imageio, limits
from oncoscope.imaging.imageio import MIN_SIDE, ImageLoadError, LoadedImage, load_image

# Pillow warns (e.g. "Corrupt EXIF data") on some fuzzed inputs; warnings are not failures.
fuzz_warnings = pytest.mark.filterwarnings("ignore::UserWarning")
FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- helpers

def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def smooth_rgb(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth colour image (JPEG/WebP lossy keep it close)."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    return np.asarray(low.resize((w, h), Image.BICUBIC), dtype=np.uint8)


def noise_rgb(h: int = 40, w: int = 56, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def png_chunks(data: bytes) -> list[tuple[int, int, bytes]]:
    """(offset, length, type) of each chunk of a PNG."""
    out, pos = [], 8
    while pos + 8 <= len(data):
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        out.append((pos, length, data[pos + 4:pos + 8]))
        pos += 12 + length
    return out


def fake_png(width: int, height: int, rows: int = 4) -> bytes:
    """A 1-bit grayscale PNG that *declares* width x height but only carries a few
    (compressed) rows: building it costs kilobytes, not gigabytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    idat = zlib.compress(row * rows, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def assert_valid(result: LoadedImage) -> None:
    assert isinstance(result, LoadedImage)
    assert isinstance(result.rgb, np.ndarray)
    assert result.rgb.dtype == np.uint8
    assert result.rgb.ndim == 3 and result.rgb.shape[2] == 3
    assert min(result.rgb.shape[:2]) >= MIN_SIDE
    assert result.rgb.flags["C_CONTIGUOUS"]


def assert_refused(source, *needles: str) -> str:
    with pytest.raises(ImageLoadError) as info:
        load_image(source)
    assert type(info.value) is ImageLoadError
    msg = str(info.value)
    assert msg.strip()
    for n in needles:
        assert n.lower() in msg.lower(), msg
    return msg


def load_or_refuse(data) -> None:
    """The contract: a valid LoadedImage, or ImageLoadError with a message. Nothing else."""
    try:
        result = load_image(data)
    except ImageLoadError as exc:
        assert str(exc).strip()
    else:
        assert_valid(result)


# --------------------------------------------------------------------------- formats

@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("TIFF", {}), ("BMP", {}), ("WEBP", {"lossless": True}),
                                    ("TIFF", {"compression": "tiff_lzw"})])
def test_lossless_formats_exact(fmt, kw):
    arr = noise_rgb()
    result = load_image(encode(Image.fromarray(arr), fmt, **kw))
    assert_valid(result)
    assert result.rgb.shape == (40, 56, 3)
    np.testing.assert_array_equal(result.rgb, arr)
    assert result.original_size == (56, 40)
    assert result.original_mode == "RGB"
    assert result.format == fmt
    assert result.exif_transposed is False


@pytest.mark.parametrize("fmt,kw", [("JPEG", {"quality": 95}), ("WEBP", {"quality": 95})])
def test_lossy_formats_close(fmt, kw):
    arr = smooth_rgb()
    result = load_image(encode(Image.fromarray(arr), fmt, **kw))
    assert_valid(result)
    assert result.rgb.shape == arr.shape
    assert result.format == fmt
    diff = np.abs(result.rgb.astype(int) - arr.astype(int))
    assert diff.mean() < 3 and diff.max() < 40


# --------------------------------------------------------------------------- modes

def test_mode_L_exact():
    gray = np.random.default_rng(2).integers(0, 256, (30, 20), dtype=np.uint8)
    result = load_image(encode(Image.fromarray(gray, "L"), "PNG"))
    assert result.original_mode == "L"
    assert result.rgb.shape == (30, 20, 3)
    for c in range(3):
        np.testing.assert_array_equal(result.rgb[..., c], gray)


def test_mode_LA_composited_on_white():
    g = np.full((20, 20), 100, np.uint8)
    a = np.full((20, 20), 255, np.uint8)
    a[0, 0] = 0
    a[0, 1] = 128
    img = Image.fromarray(np.dstack([g, a]), "LA")
    result = load_image(encode(img, "PNG"))
    assert result.original_mode == "LA"
    assert result.rgb[0, 0].tolist() == [255, 255, 255]
    assert result.rgb[5, 5].tolist() == [100, 100, 100]
    expected = 100 * 128 / 255 + 255 * (1 - 128 / 255)
    assert np.all(np.abs(result.rgb[0, 1].astype(float) - expected) <= 1.5)


def test_mode_RGBA_transparent_pixel_becomes_white():
    arr = np.zeros((20, 24, 4), np.uint8)
    arr[..., 0] = 200  # opaque red-ish
    arr[..., 3] = 255
    arr[0, 0] = (0, 0, 0, 0)  # fully transparent black -> white
    arr[1, 1] = (0, 0, 0, 128)  # half transparent black -> mid grey
    result = load_image(encode(Image.fromarray(arr, "RGBA"), "PNG"))
    assert result.original_mode == "RGBA"
    assert result.rgb.shape == (20, 24, 3)
    assert result.rgb[0, 0].tolist() == [255, 255, 255]
    assert result.rgb[5, 5].tolist() == [200, 0, 0]
    assert np.all(np.abs(result.rgb[1, 1].astype(int) - 127) <= 1)


def _palette_image() -> Image.Image:
    idx = np.zeros((20, 20), np.uint8)
    idx[:, 10:] = 1
    idx[0, 0] = 2
    img = Image.fromarray(idx, "P")
    img.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0] + [0] * (256 * 3 - 9))
    return img


def test_mode_P_without_transparency():
    result = load_image(encode(_palette_image(), "PNG"))
    assert result.original_mode == "P"
    assert result.rgb[5, 5].tolist() == [10, 20, 30]
    assert result.rgb[5, 15].tolist() == [200, 100, 50]
    assert result.rgb[0, 0].tolist() == [0, 255, 0]


def test_mode_P_with_transparency():
    result = load_image(encode(_palette_image(), "PNG", transparency=2))
    assert result.original_mode == "P"
    assert result.rgb[0, 0].tolist() == [255, 255, 255]  # transparent index -> white
    assert result.rgb[5, 5].tolist() == [10, 20, 30]
    assert result.rgb[5, 15].tolist() == [200, 100, 50]


def test_mode_1_bit():
    bits = np.random.default_rng(3).random((24, 32)) > 0.5
    result = load_image(encode(Image.fromarray(bits), "PNG"))
    assert result.original_mode == "1"
    expected = np.where(bits, 255, 0).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(result.rgb[..., c], expected)


def test_mode_CMYK_tiff_exact():
    arr = noise_rgb(seed=4)
    cmyk = Image.fromarray(arr).convert("CMYK")
    result = load_image(encode(cmyk, "TIFF"))
    assert result.original_mode == "CMYK"
    np.testing.assert_array_equal(result.rgb, arr)


def test_mode_CMYK_jpeg():
    arr = smooth_rgb(seed=5)
    cmyk = Image.fromarray(arr).convert("CMYK")
    result = load_image(encode(cmyk, "JPEG", quality=95))
    assert result.original_mode == "CMYK"
    assert result.format == "JPEG"
    assert result.rgb.shape == arr.shape
    assert np.abs(result.rgb.astype(int) - arr.astype(int)).mean() < 6


def _assert_rescaled_gray(result: LoadedImage, source: np.ndarray) -> None:
    rgb = result.rgb
    assert rgb.dtype == np.uint8
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    g = rgb[..., 0]
    # The range is used (not all crushed to 0 or 255 as a naive cast would do) ...
    assert g.min() == 0 and g.max() == 255
    # ... and the order of intensities is kept.
    flat_src, flat_out = source.ravel(), g.ravel().astype(int)
    order = np.argsort(flat_src, kind="stable")
    assert (np.diff(flat_out[order]) >= 0).all()


def test_mode_I16_png_rescaled():
    src = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 3 + 1000)  # 1000..4069: ~6% of 16 bits
    img = Image.fromarray(src)
    assert img.mode.startswith("I;16")
    data = encode(img, "PNG")
    result = load_image(data)
    assert result.original_mode.startswith("I")
    assert result.rgb.shape == (32, 32, 3)
    _assert_rescaled_gray(result, src)


def test_mode_I_tiff_rescaled():
    src = (np.arange(24 * 20, dtype=np.int32).reshape(24, 20) * 1000 - 50_000)
    img = Image.fromarray(src)
    assert img.mode == "I"
    result = load_image(encode(img, "TIFF"))
    assert result.original_mode == "I"
    _assert_rescaled_gray(result, src)


def test_mode_F_tiff_rescaled():
    src = np.linspace(-3.5, 7.25, 20 * 30, dtype=np.float32).reshape(20, 30)
    img = Image.fromarray(src)
    assert img.mode == "F"
    result = load_image(encode(img, "TIFF"))
    assert result.original_mode == "F"
    _assert_rescaled_gray(result, src)


def test_constant_16bit_does_not_crash():
    img = Image.fromarray(np.full((20, 20), 777, np.uint16))
    result = load_image(encode(img, "PNG"))
    assert_valid(result)


# --------------------------------------------------------------------------- EXIF orientation

RED = (255, 0, 0)


def _oriented_jpeg(orientation: int) -> bytes:
    """64 wide x 32 high, blue, with a 16x16 red block at the stored top-left corner."""
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[...] = (0, 0, 255)
    arr[:16, :16] = RED
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


def _corner_is_red(rgb: np.ndarray, corner: str) -> bool:
    h, w = rgb.shape[:2]
    ys = slice(2, 14) if corner[0] == "t" else slice(h - 14, h - 2)
    xs = slice(2, 14) if corner[1] == "l" else slice(w - 14, w - 2)
    patch = rgb[ys, xs].reshape(-1, 3).mean(axis=0)
    return patch[0] > 200 and patch[1] < 60 and patch[2] < 60


@pytest.mark.parametrize("orientation,shape,corner", [
    (1, (32, 64, 3), "tl"),
    (3, (32, 64, 3), "br"),  # rotated 180
    (6, (64, 32, 3), "tr"),  # rotate 90 clockwise to display
    (8, (64, 32, 3), "bl"),  # rotate 90 counter-clockwise to display
])
def test_exif_orientation(orientation, shape, corner):
    result = load_image(_oriented_jpeg(orientation))
    assert result.rgb.shape == shape
    assert result.original_size == (64, 32)  # before rotation
    assert result.exif_transposed is (orientation != 1)
    assert _corner_is_red(result.rgb, corner)
    others = {"tl", "tr", "bl", "br"} - {corner}
    assert not any(_corner_is_red(result.rgb, c) for c in others)


# --------------------------------------------------------------------------- broken input

def test_zero_byte_bytes_and_file(tmp_path):
    assert_refused(b"", "empty")
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    assert_refused(p, "empty")
    assert_refused(str(p), "empty")
    assert_refused(io.BytesIO(b""), "empty")


def test_random_bytes_refused():
    data = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert_refused(data)


def test_text_file_refused(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("This is not an image, just some notes.\n" * 20)
    assert_refused(p, "not a recognised image")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_refused(fmt):
    data = encode(Image.fromarray(noise_rgb(64, 64)), fmt)
    assert_refused(data[: len(data) // 2])


def _png_with_bad_idat_crc() -> bytes:
    data = bytearray(encode(Image.fromarray(noise_rgb(64, 64)), "PNG"))
    pos, length, ctype = next(c for c in png_chunks(bytes(data)) if c[2] == b"IDAT")
    data[pos + 8 + length] ^= 0xFF  # first CRC byte; the pixel data itself is intact
    return bytes(data)


def test_png_bad_idat_crc_refused():
    assert_refused(_png_with_bad_idat_crc(), "corrupt")


def test_png_garbage_in_middle_refused():
    data = bytearray(encode(Image.fromarray(noise_rgb(64, 64)), "PNG"))
    mid = len(data) // 2
    data[mid:mid + 64] = b"GARBAGE!" * 8
    assert_refused(bytes(data))


def test_png_garbage_in_idat_with_fixed_crc_refused():
    """Garbage in the compressed data with a recomputed CRC: the decoder must catch it."""
    data = encode(Image.fromarray(noise_rgb(64, 64)), "PNG")
    pos, length, _ = next(c for c in png_chunks(data) if c[2] == b"IDAT")
    idat = bytearray(data[pos + 8: pos + 8 + length])
    idat[length // 2: length // 2 + 64] = b"\xff" * 64
    fixed = data[:pos] + png_chunk(b"IDAT", bytes(idat)) + data[pos + 12 + length:]
    assert_refused(fixed)


def test_jpeg_garbage_in_middle_does_not_escape():
    data = bytearray(encode(Image.fromarray(noise_rgb(64, 64)), "JPEG"))
    mid = len(data) // 2
    data[mid:mid + 64] = b"\xff\xd9" * 32  # EOI markers: premature end of the scan
    load_or_refuse(bytes(data))


# --------------------------------------------------------------------------- dimensions

def test_too_small_refused_with_size():
    msg = assert_refused(encode(Image.new("RGB", (10, 10), (1, 2, 3)), "PNG"), "10x10")
    assert "16" in msg


@pytest.mark.parametrize("size", [(16, 16), (16, 300), (300, 16)])
def test_min_side_accepted(size):
    result = load_image(encode(Image.new("RGB", size, (1, 2, 3)), "PNG"))
    assert result.rgb.shape == (size[1], size[0], 3)
    assert (result.rgb == (1, 2, 3)).all()


@pytest.mark.parametrize("size", [(15, 300), (300, 15)])
def test_one_side_too_small_refused(size):
    assert_refused(encode(Image.new("RGB", size), "PNG"), f"{size[0]}x{size[1]}")


def test_huge_dimensions_refused_cheaply():
    data = fake_png(20000, 20000)
    assert len(data) < 100_000
    assert struct.unpack(">II", data[16:24]) == (20000, 20000)  # the header really says so
    assert_refused(data, "megapixels")


def test_over_megapixel_limit_refused_with_message():
    # 9000x9000 = 81 MP: above oncoscope's 64 MP limit, below Pillow's bomb threshold.
    data = fake_png(9000, 9000)
    assert 9000 * 9000 > imageio.MAX_PIXELS
    assert_refused(data, "9000x9000", "megapixels")


def test_max_pixels_argument():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageLoadError, match="megapixels"):
        load_image(data, max_pixels=5000)
    assert load_image(data, max_pixels=10_000).rgb.shape == (100, 100, 3)


@pytest.mark.parametrize("side", [40, 64])  # 1600 px: bomb *warning*; 4096 px: bomb *error*
def test_decompression_bomb_refused(monkeypatch, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert_refused(encode(Image.new("RGB", (side, side)), "PNG"), "pixels")


# --------------------------------------------------------------------------- memory (bytes, not pixels)
# Peak-RSS measurements on crafted files are in test_limits.py.

def _tiff_declaring_tiles(side: int, tile: int) -> bytes:
    """A side x side greyscale TIFF whose header declares tile x tile tiles: libtiff would allocate one."""
    entries = [(256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1), (322, 4, tile),
               (323, 4, tile), (324, 4, 200), (325, 4, 10)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, typ, 1) + (struct.pack("<HH", v, 0) if typ == 3 else struct.pack("<I", v))
        for tag, typ, v in entries) + struct.pack("<I", 0)
    head = b"II*\0" + struct.pack("<I", 8) + ifd
    return head.ljust(200, b"\0") + zlib.compress(bytes(100))


def test_memory_limit_counts_bytes_not_pixels():
    # 100x100 pixels each. PNG: the RGB result and a caller's copy, 7 bytes a pixel. WebP: the image (4),
    # libwebp's canvas and its copy (10) and the result (3).
    png = encode(Image.new("RGB", (100, 100)), "PNG")
    webp = encode(Image.new("RGB", (100, 100)), "WEBP", lossless=True)
    assert load_image(png, max_bytes=100_000).rgb.shape == (100, 100, 3)
    with pytest.raises(ImageLoadError, match=r"100x100 pixels \(WEBP, 8-bit colour\); decoding it would need"):
        load_image(webp, max_bytes=100_000)
    assert load_image(webp, max_bytes=170_000).rgb.shape == (100, 100, 3)


def test_16bit_png_within_the_pixel_limit_refused_by_bytes_before_decoding(monkeypatch):
    """The review's case: a 128 kB 16-bit PNG of 7999x7999 took 1.6 GB and 5 s."""
    from PIL import ImageFile

    from .test_limits import png_of_zeros

    data = png_of_zeros(7999, 7999, 16, 0)
    assert len(data) < 200_000 and 7999 * 7999 <= imageio.MAX_PIXELS

    def boom(self):
        raise AssertionError("decoding started")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    msg = assert_refused(data, "7999x7999", "memory", "256 MB")
    assert "at most about 36 megapixels" in msg


def test_tiff_declaring_huge_tiles_refused():
    assert_refused(_tiff_declaring_tiles(64, 60000), "64x64", "memory", "header declares")


def _whole_image_rgb(data: bytes) -> np.ndarray:
    """The conversion as it was before it ran by strips: the whole image at once, in float64."""
    img = Image.open(io.BytesIO(data))
    if img.mode in ("I;16", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = np.percentile(arr, [0.5, 99.5])
        grey = (np.clip((arr - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def _strip_samples() -> dict[str, bytes]:
    rng = np.random.default_rng(11)
    h, w = 47, 61
    rgba = np.concatenate([noise_rgb(h, w, 2), rng.integers(0, 256, (h, w, 1), dtype=np.uint8)], axis=2)
    return {
        "I;16.png": encode(Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)), "PNG"),
        "I.tif": encode(Image.fromarray(rng.integers(-2**31, 2**31 - 1, (h, w), dtype=np.int32)), "TIFF"),
        "F.tif": encode(Image.fromarray(rng.normal(0, 100, (h, w)).astype(np.float32)), "TIFF"),
        "RGBA.png": encode(Image.fromarray(rgba), "PNG"),
        "LA.png": encode(Image.fromarray(rgba).convert("LA"), "PNG"),
        "P-transparency.png": encode(Image.fromarray(noise_rgb(h, w, 3)).convert("P"), "PNG", transparency=7),
        "CMYK.tif": encode(Image.fromarray(noise_rgb(h, w, 4)).convert("CMYK"), "TIFF"),
        "1.png": encode(Image.fromarray(noise_rgb(h, w, 5)).convert("1"), "PNG"),
        "L.png": encode(Image.fromarray(noise_rgb(h, w, 6)).convert("L"), "PNG"),
    }


_STRIP_SAMPLES = _strip_samples()


@pytest.mark.parametrize("name", sorted(_STRIP_SAMPLES))
def test_conversion_by_strips_matches_the_whole_image(monkeypatch, name):
    data = _STRIP_SAMPLES[name]
    monkeypatch.setattr(limits, "STRIP_PIXELS", 5 * 61 + 3)  # 5 rows a strip, the last one partial
    diff = np.abs(load_image(data).rgb.astype(int) - _whole_image_rgb(data))
    assert diff.max() <= (1 if name == "F.tif" else 0)  # F: percentiles now taken in float32


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_by_strips_matches_pillow(monkeypatch, orientation):
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(noise_rgb(37, 53, orientation)), "PNG", exif=exif.tobytes())
    monkeypatch.setattr(limits, "STRIP_PIXELS", 4 * 53)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    result = load_image(data)
    assert np.array_equal(result.rgb, expected) and result.exif_transposed is (orientation != 1)


# --------------------------------------------------------------------------- animation

def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (32, 24), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    result = load_image(buf.getvalue())
    assert result.format == "GIF"
    assert result.rgb.shape == (24, 32, 3)
    assert (result.rgb == (255, 0, 0)).all()


def test_gif_with_truncated_second_frame_refused():
    """Regression: counting frames (n_frames) parses every frame; a broken later frame
    used to escape as struct.error."""
    frames = [Image.new("RGB", (32, 24), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    gif = buf.getvalue()
    descriptor = b"\x2c\x00\x00\x00\x00\x20\x00\x18\x00"  # image separator, 0,0, 32x24
    first, second = gif.index(descriptor), gif.rindex(descriptor)
    assert first < second
    assert_refused(gif[:second + 4], "corrupt")


def test_tiff_with_broken_second_ifd_refused():
    """Regression: a second TIFF page without ImageWidth used to escape as TypeError."""
    frames = [Image.new("RGB", (32, 24), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    tif = bytearray(buf.getvalue())
    assert tif[:4] == b"II*\x00"
    ifd0 = struct.unpack("<I", tif[4:8])[0]
    n0 = struct.unpack("<H", tif[ifd0:ifd0 + 2])[0]
    ifd1 = struct.unpack("<I", tif[ifd0 + 2 + 12 * n0: ifd0 + 6 + 12 * n0])[0]
    assert ifd1
    renamed = 0
    for e in range(struct.unpack("<H", tif[ifd1:ifd1 + 2])[0]):
        off = ifd1 + 2 + 12 * e
        if struct.unpack("<H", tif[off:off + 2])[0] == 256:  # ImageWidth -> unknown tag
            tif[off:off + 2] = struct.pack("<H", 65000)
            renamed += 1
    assert renamed == 1
    assert_refused(bytes(tif), "corrupt")


def test_animated_png_first_frame():
    frames = [Image.new("RGB", (32, 24), c) for c in [(0, 128, 0), (9, 9, 9)]]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:], duration=100)
    result = load_image(buf.getvalue())
    assert (result.rgb == (0, 128, 0)).all()


# --------------------------------------------------------------------------- input kinds

def test_input_kinds(tmp_path):
    arr = noise_rgb(20, 30, seed=9)
    data = encode(Image.fromarray(arr), "PNG")
    p = tmp_path / "img.png"
    p.write_bytes(data)
    with open(p, "rb") as fh:
        from_file = load_image(fh)
    for result in [load_image(data), load_image(bytearray(data)), load_image(memoryview(data)),
                   load_image(str(p)), load_image(p), load_image(io.BytesIO(data)), from_file]:
        np.testing.assert_array_equal(result.rgb, arr)


def test_nonexistent_path(tmp_path):
    assert_refused(tmp_path / "nope.png", "cannot read")
    assert_refused(str(tmp_path / "nope.png"), "cannot read")


def test_bad_inputs_refused(tmp_path):
    assert_refused(tmp_path)  # a folder
    assert_refused(str(tmp_path / "a\0b.png"))  # NUL byte in the path
    assert_refused(12345, "unsupported")
    closed = io.BytesIO(encode(Image.new("RGB", (20, 20)), "PNG"))
    closed.close()
    assert_refused(closed)


def test_text_mode_file_object_refused(tmp_path):
    # The *content* of a text-mode file must never be taken for a path.
    target = tmp_path / "real.png"
    target.write_bytes(encode(Image.new("RGB", (20, 20)), "PNG"))
    p = tmp_path / "pointer.txt"
    p.write_text(str(target))
    with open(p) as fh:
        assert_refused(fh, "binary")


def test_file_too_large(monkeypatch, tmp_path):
    data = encode(Image.fromarray(noise_rgb()), "PNG")
    p = tmp_path / "big.png"
    p.write_bytes(data)
    monkeypatch.setattr(imageio, "MAX_FILE_BYTES", 100)
    assert_refused(data, "too large")
    assert_refused(p, "too large")
    assert_refused(io.BytesIO(data), "too large")


# --------------------------------------------------------------------------- properties

_MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
          b"RIFF\x00\x01\x00\x00WEBPVP8 "]


@fuzz_warnings
@FUZZ
@given(prefix=st.sampled_from(_MAGIC), body=st.binary(max_size=2048))
def test_property_arbitrary_bytes(prefix, body):
    load_or_refuse(prefix + body)


_shapes = st.tuples(st.integers(16, 64), st.integers(16, 64))


@fuzz_warnings
@FUZZ
@given(data=st.data(), mode=st.sampled_from(["L", "RGB", "RGBA"]), hw=_shapes)
def test_property_small_png_arrays(data, mode, hw):
    h, w = hw
    shape = (h, w) if mode == "L" else (h, w, len(mode))
    arr = data.draw(hnp.arrays(np.uint8, shape))
    result = load_image(encode(Image.fromarray(arr, mode), "PNG"))
    assert_valid(result)
    assert result.rgb.shape == (h, w, 3)
    assert result.original_mode == mode
    if mode == "RGB":
        np.testing.assert_array_equal(result.rgb, arr)
    elif mode == "L":
        np.testing.assert_array_equal(result.rgb, np.repeat(arr[..., None], 3, axis=2))
    else:
        a = arr[..., 3:].astype(float) / 255
        expected = arr[..., :3] * a + 255 * (1 - a)
        assert np.abs(result.rgb - expected).max() <= 1.5


def _multi_frame(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, save_all=True, append_images=[img.transpose(Image.Transpose.ROTATE_180)])
    return buf.getvalue()


def _valid_samples() -> dict[str, bytes]:
    arr = smooth_rgb(32, 40, seed=11)
    img = Image.fromarray(arr)
    return {
        "jpeg": encode(img, "JPEG", quality=90),
        "png": encode(img, "PNG"),
        "png-rgba": encode(img.convert("RGBA"), "PNG"),
        "gif": encode(img.convert("P"), "GIF"),
        "tiff": encode(img, "TIFF"),
        "bmp": encode(img, "BMP"),
        "webp": encode(img, "WEBP", quality=80),
        "gif-anim": _multi_frame(img, "GIF"),
        "tiff-multi": _multi_frame(img, "TIFF"),
    }


_SAMPLES = _valid_samples()


@pytest.mark.parametrize("name", sorted(_SAMPLES))
def test_samples_are_valid(name):
    assert_valid(load_image(_SAMPLES[name]))


@fuzz_warnings
@FUZZ
@given(name=st.sampled_from(sorted(_SAMPLES)), data=st.data())
def test_property_mutated_valid_files(name, data):
    buf = bytearray(_SAMPLES[name])
    n_mut = data.draw(st.integers(1, 8), label="n_mutations")
    for _ in range(n_mut):
        i = data.draw(st.integers(0, len(buf) - 1), label="offset")
        buf[i] = data.draw(st.integers(0, 255), label="byte")
    if data.draw(st.booleans(), label="truncate"):
        buf = buf[: data.draw(st.integers(0, len(buf)), label="cut")]
    load_or_refuse(bytes(buf))


@fuzz_warnings
@FUZZ
@given(data=st.data())
def test_property_mutated_png_idat_with_valid_crc(data):
    """Mutations that get past the CRC check reach the decompressor: still only ImageLoadError."""
    png = _SAMPLES[data.draw(st.sampled_from(["png", "png-rgba"]))]
    pos, length, _ = next(c for c in png_chunks(png) if c[2] == b"IDAT")
    idat = bytearray(png[pos + 8: pos + 8 + length])
    for _ in range(data.draw(st.integers(1, 6))):
        idat[data.draw(st.integers(0, length - 1))] = data.draw(st.integers(0, 255))
    load_or_refuse(png[:pos] + png_chunk(b"IDAT", bytes(idat)) + png[pos + 12 + length:])
