"""Safe image loading.

Every image that enters oncoscope (uploads, CLI paths, datasets) goes through
:func:`load_image`. It never raises anything but :class:`ImageLoadError`, whose
message is written for the person who supplied the file.

Handled: truncated and corrupt files, zero-byte files, non-images, decompression
bombs, absurd dimensions, palette/grayscale/RGBA/CMYK/16-bit modes, EXIF
orientation and animated images (the first frame is used). DICOM Part-10 files
(``DICM`` at byte 128) are decoded by :func:`oncoscope.imaging.dicom.read_dicom`.

Memory and work are bounded before decoding: see :mod:`oncoscope.imaging.limits`.
"""

from __future__ import annotations

import io
import os
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from .dicom import read_dicom
from .limits import (MAX_DECODE_BYTES, MAX_FILE_BYTES, MAX_PIXELS, MIN_SIDE, RGB_BPP, ImageLoadError,
                     check_dimensions, check_memory, check_work_bounds, fill_by_strips)

# The formats we accept; Pillow would otherwise try every decoder it has (PSD, TGA, PCX, ICO, EPS, ...).
FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF")

# Never let Pillow silently accept truncated data.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class LoadedImage:
    """An RGB uint8 array (H, W, 3) plus what we learnt while decoding it."""

    rgb: np.ndarray
    original_mode: str
    original_size: tuple[int, int]  # (width, height) before any EXIF rotation
    format: str | None
    exif_transposed: bool
    dicom: object | None = None  # DICOM metadata (a DicomImage without pixels) when format == "DICOM"


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png_crcs(data: bytes) -> None:
    """Refuse a PNG whose chunk checksums do not match.

    Pillow verifies the CRC of the chunks before the image data but skips those of
    IDAT (and later) chunks, so a PNG damaged there could load without complaint.
    Truncation is left to the decoder, which reports it.
    """
    if not data.startswith(_PNG_SIGNATURE):
        return
    pos, n = len(_PNG_SIGNATURE), len(data)
    while pos + 12 <= n:
        length = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > n:
            return
        ctype = data[pos + 4:pos + 8]
        if zlib.crc32(data[pos + 4:end]) != int.from_bytes(data[end:end + 4], "big"):
            name = ctype.decode("latin-1") if ctype.isalpha() else "?"
            raise ImageLoadError(f"The PNG file is corrupt (checksum error in the {name} chunk).")
        if ctype == b"IEND":
            return
        pos = end + 4


def _open(source) -> tuple[Image.Image, str | None]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageLoadError("The file is empty (0 bytes).")
        if len(data) > MAX_FILE_BYTES:
            raise ImageLoadError(f"The file is too large ({len(data) / 1e6:.0f} MB; limit {MAX_FILE_BYTES / 1e6:.0f} MB).")
        _check_png_crcs(data)
        check_work_bounds(data)
        if data[128:132] == b"DICM":  # DICOM Part-10: decoded by load_image via read_dicom
            return data, "DICOM"
        fp = io.BytesIO(data)
    elif isinstance(source, (str, os.PathLike)):
        try:
            path = os.fspath(source)
            if os.path.isdir(path):
                raise ImageLoadError("The path is a folder, not an image file.")
            size = os.path.getsize(path)
            if size == 0:
                raise ImageLoadError("The file is empty (0 bytes).")
            if size > MAX_FILE_BYTES:
                raise ImageLoadError(
                    f"The file is too large ({size / 1e6:.0f} MB; limit {MAX_FILE_BYTES / 1e6:.0f} MB).")
            with open(path, "rb") as fh:
                data = fh.read(MAX_FILE_BYTES + 1)  # the bytes branch below re-checks the size
        except ImageLoadError:
            raise
        except OSError as exc:
            raise ImageLoadError(f"Cannot read the file: {exc.strerror or exc}.") from None
        except (ValueError, TypeError):  # e.g. an embedded NUL byte in the path
            raise ImageLoadError("Cannot read the file: the path is not valid.") from None
        return _open(data)
    elif hasattr(source, "read"):
        try:
            data = source.read()
        except Exception:  # noqa: BLE001 - closed file, failing stream, ...
            raise ImageLoadError("The file could not be read. Choose it again and retry.") from None
        if not isinstance(data, (bytes, bytearray, memoryview)):
            # A text-mode file would otherwise have its *content* taken for a path.
            raise ImageLoadError("The file must be opened in binary mode.")
        return _open(data)
    else:
        raise ImageLoadError(f"Unsupported input type {type(source).__name__}.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own bomb check fires before ours for very large images (e.g. 20000x20000).
        raise ImageLoadError(
            f"The image has too many pixels to be processed safely (the limit is {MAX_PIXELS / 1e6:.0f} megapixels). "
            "Please upload a smaller field of view."
        ) from None
    except UnidentifiedImageError:
        raise ImageLoadError("The file is not a recognised image format (JPEG, PNG, TIFF, BMP, WebP, GIF).") from None
    except Exception:  # noqa: BLE001 - Pillow raises many types for bad data
        raise ImageLoadError("The image could not be opened: the file is damaged or not a supported image.") from None
    return img, img.format


_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_MODE_WORDS = {"1": "1-bit", "L": "8-bit greyscale", "LA": "8-bit greyscale with alpha", "P": "palette colour",
               "RGB": "8-bit colour", "RGBA": "8-bit colour with alpha", "CMYK": "CMYK colour",
               "I;16": "16-bit greyscale", "I;16B": "16-bit greyscale", "I": "32-bit greyscale", "F": "32-bit float"}


def _pillow_bpp(img: Image.Image, fmt: str | None) -> float:
    """Bytes per pixel that decoding ``img`` and converting it to RGB hold at their peak."""
    src = 1 if img.mode in ("1", "L", "P") else 2 if img.mode.startswith("I;16") else 4
    work = 2 * src if img.mode in _HIGH_DEPTH else 0  # the samples and the sorted copy np.percentile makes
    return src + _codec_bytes(img, fmt) / max(1, img.width * img.height) + max(RGB_BPP, work)


def _codec_bytes(img: Image.Image, fmt: str | None) -> int:
    """What the codec allocates besides the image: it is freed after decoding, but small blocks stay in
    the heap, so it is counted as held throughout."""
    w, h = img.size
    if fmt == "JPEG":  # every DCT coefficient (2 bytes) if progressive or multi-scan, which the header does not tell
        layers = getattr(img, "layer", None) or [(0, 1, 1, 0)] * len(img.getbands())
        hmax, vmax = max(l[1] for l in layers) or 1, max(l[2] for l in layers) or 1
        return int(2 * w * h * sum(l[1] * l[2] for l in layers) / (hmax * vmax))
    if fmt == "WEBP":  # libwebp decodes into an RGBA canvas, which Pillow copies out as bytes (9 measured)
        return 10 * w * h
    if fmt == "TIFF":  # libtiff reads a whole strip or tile; a header may declare them larger than the image
        return _tiff_buffer_bytes(img)
    return 0


def _tiff_buffer_bytes(img: Image.Image) -> int:
    w, h = img.size
    try:
        tags = img.tag_v2
        bits = tags.get(258, (1,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        sample_bits = sum(bits) if len(bits) > 1 else bits[0] * int(tags.get(277, 1))
        if 322 in tags and 323 in tags:
            pixels = int(tags[322]) * int(tags[323])
        else:
            pixels = w * min(int(tags.get(278, h)), h)
        return pixels * max(-(-int(sample_bits) // 8), 4)  # RGBA when libtiff converts (YCbCr, old JPEG)
    except Exception:  # noqa: BLE001 - malformed tags: assume the worst plausible buffer
        return w * h * 8


def _to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit-per-band image (or a strip of one) as RGB."""
    mode = img.mode
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def _strip_converter(img: Image.Image):
    """A function turning a strip of ``img`` into RGB uint8 samples (or grey ones that broadcast to RGB)."""
    if img.mode not in _HIGH_DEPTH:
        return lambda strip: np.asarray(_to_rgb(strip), dtype=np.uint8)
    arr = np.asarray(img)
    lo, hi = (float(v) for v in np.percentile(arr, [0.5, 99.5])) if arr.size else (0.0, 1.0)
    del arr
    if hi <= lo:
        hi = lo + 1.0

    def grey(strip: Image.Image) -> np.ndarray:
        unit = np.clip((np.asarray(strip, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
        return (unit * 255.0).astype(np.uint8)[..., None]

    return grey


# EXIF orientation -> the upright result seen in the stored pixel order (a view: writing to it fills the result)
_STORED_ORDER = {2: lambda u: u[:, ::-1], 3: lambda u: u[::-1, ::-1], 4: lambda u: u[::-1],
                 5: lambda u: u.swapaxes(0, 1), 6: lambda u: np.rot90(u, 1),
                 7: lambda u: np.rot90(u, 2).swapaxes(0, 1), 8: lambda u: np.rot90(u, -1)}


def _rgb_array(img: Image.Image, orientation: int) -> np.ndarray:
    """``img`` as an upright (H, W, 3) uint8 array, converted strip by strip straight into its final place,
    so the only full-size arrays are the decoded image and the result."""
    w, h = img.size
    upright = np.empty((w, h, 3) if orientation in (5, 6, 7, 8) else (h, w, 3), np.uint8)
    convert = _strip_converter(img)
    fill_by_strips(_STORED_ORDER.get(orientation, lambda u: u)(upright),
                   lambda rows: convert(img.crop((0, rows.start, w, rows.stop))))
    return upright


def _orientation(img: Image.Image) -> int:
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF is ignored, not fatal
        return 1
    return orientation if orientation in _STORED_ORDER else 1


def load_image(source, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE,
               max_bytes: int = MAX_DECODE_BYTES) -> LoadedImage:
    """Decode ``source`` (path, bytes or file object) to an RGB uint8 array.

    Raises :class:`ImageLoadError` with a clear message on any problem.
    """
    img, fmt = _open(source)
    if fmt == "DICOM":
        return _load_dicom(img, max_pixels, min_side, max_bytes)
    try:
        width, height = img.size
        check_dimensions(width, height, max_pixels, min_side)
        check_memory(width, height, _pillow_bpp(img, fmt), f"{fmt}, {_MODE_WORDS.get(img.mode, img.mode)}",
                     max_bytes=max_bytes)
        try:
            # Counting frames parses every frame (GIF) or IFD (TIFF): corrupt ones raise here.
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            original_mode = img.mode
            img.load()
        except Exception:  # noqa: BLE001 - truncated/corrupt data
            raise ImageLoadError("The image data is corrupt or truncated (an incomplete copy?). Export it again and upload the new file.") from None
        if img.size != (width, height):  # the memory check used the header's size
            raise ImageLoadError("The image data does not match its header.")
        orientation = _orientation(img)
        try:
            rgb = _rgb_array(img, orientation)
        except Exception:  # noqa: BLE001
            raise ImageLoadError("The image's colour format is not supported. Save it as PNG or JPEG and upload it again.") from None
        return LoadedImage(rgb=rgb, original_mode=original_mode, original_size=(width, height), format=fmt,
                           exif_transposed=orientation != 1)
    finally:
        try:
            img.close()
        except Exception:  # noqa: BLE001
            pass


def _load_dicom(data: bytes, max_pixels: int, min_side: int, max_bytes: int) -> LoadedImage:
    d = read_dicom(data, max_pixels=max_pixels, min_side=min_side, max_bytes=max_bytes)
    return LoadedImage(rgb=d.rgb, original_mode=d.photometric, original_size=(d.rgb.shape[1], d.rgb.shape[0]),
                       format="DICOM", exif_transposed=False, dicom=d.without_pixels())


def resize_rgb(rgb: np.ndarray, size: int | tuple[int, int], resample=Image.BILINEAR) -> np.ndarray:
    """Resize an RGB uint8 array to ``size`` (square int or (w, h))."""
    if isinstance(size, int):
        size = (size, size)
    if rgb.shape[1] == size[0] and rgb.shape[0] == size[1]:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(size, resample), dtype=np.uint8)


def pad_to_square(rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad with the median border colour; returns the square image and the (top, left) offset."""
    h, w = rgb.shape[:2]
    if h == w:
        return rgb, (0, 0)
    s = max(h, w)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    colour = np.median(border, axis=0).astype(np.uint8)
    out = np.empty((s, s, 3), np.uint8)
    out[:] = colour
    top, left = (s - h) // 2, (s - w) // 2
    out[top:top + h, left:left + w] = rgb
    return out, (top, left)


def to_gray3(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luminance replicated into three channels (radiology models see grayscale only)."""
    if rgb.ndim == 3 and rgb.shape[2] == 3 and (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb
    y = np.asarray(Image.fromarray(rgb).convert("L"))
    return np.repeat(y[:, :, None], 3, axis=2)


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"}
