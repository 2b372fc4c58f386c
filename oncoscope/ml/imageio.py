"""Safe image loading.

Every image that enters oncoscope (uploads, CLI paths, datasets) goes through
:func:`load_image`. It never raises anything but :class:`ImageLoadError`, whose
message is written for the person who supplied the file.

Handled: truncated and corrupt files, zero-byte files, non-images, decompression
bombs, absurd dimensions, palette/grayscale/RGBA/CMYK/16-bit modes, EXIF
orientation and animated images (the first frame is used). DICOM Part-10 files
(``DICM`` at byte 128) are decoded by :func:`oncoscope.reports.dicom_io.read_dicom`.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Limits. A 20000x20000 image is 400 MP: refuse it before decoding.
MAX_PIXELS = 64_000_000  # ~8000 x 8000
MIN_SIDE = 16
MAX_FILE_BYTES = 100 * 1024 * 1024
# Work bounds for files that are small but expensive to parse (only the first frame is used):
MAX_TIFF_PAGES = 1000  # Pillow walks the IFD chain in quadratic time: 100 000 pages (11 MB) took minutes
MAX_JPEG_SCANS = 500  # each progressive scan re-processes the whole image: thousands of tiny scans take minutes
# The formats we accept; Pillow would otherwise try every decoder it has (PSD, TGA, PCX, ICO, EPS, ...).
FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF")

# Never let Pillow silently accept truncated data.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageLoadError(ValueError):
    """The input cannot be used as an image. ``str(err)`` is user-facing."""


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


def _tiff_pages(data: bytes, limit: int) -> int:
    """How many pages (IFDs) a TIFF or BigTIFF file chains together, counting at most ``limit + 1``.
    A chain that loops or points outside the file ends there (the decoder reports real damage)."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or len(data) < 16:
        return 0
    version = int.from_bytes(data[2:4], "little" if order == "<" else "big")
    if version not in (42, 43):
        return 0
    big = version == 43
    off_size, count_size, entry_size = (8, 8, 20) if big else (4, 2, 12)
    fmt = {2: "H", 4: "I", 8: "Q"}

    def num(pos: int, size: int) -> int | None:
        if pos < 0 or pos + size > len(data):
            return None
        return struct.unpack_from(order + fmt[size], data, pos)[0]

    offset, seen, pages = num(8 if big else 4, off_size), set(), 0
    while offset and offset not in seen and pages <= limit:
        n = num(offset, count_size)
        if n is None:
            break
        seen.add(offset)
        pages += 1
        offset = num(offset + count_size + n * entry_size, off_size)
    return pages


def _check_work_bounds(data: bytes) -> None:
    """Refuse small files that would take minutes to parse: TIFFs with thousands of pages and
    progressive JPEGs with thousands of scans (both would be parsed before any pixel limit applies)."""
    if data[:2] in (b"II", b"MM") and _tiff_pages(data, MAX_TIFF_PAGES) > MAX_TIFF_PAGES:
        raise ImageLoadError(f"The TIFF file has more than {MAX_TIFF_PAGES} pages; upload the page to analyse "
                             "as a single image.")
    # In JPEG data 0xFF is always followed by a stuffed 0x00 or a marker, so this counts SOS markers
    # (plus those of embedded thumbnails; a normal progressive JPEG has about ten).
    if data[:2] == b"\xff\xd8" and data.count(b"\xff\xda") > MAX_JPEG_SCANS:
        raise ImageLoadError(f"The JPEG file has more than {MAX_JPEG_SCANS} scans and would take too long to "
                             "decode; save it again as a baseline JPEG or PNG.")


def _open(source) -> tuple[Image.Image, str | None]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageLoadError("The file is empty (0 bytes).")
        if len(data) > MAX_FILE_BYTES:
            raise ImageLoadError(f"The file is too large ({len(data) / 1e6:.0f} MB; limit {MAX_FILE_BYTES / 1e6:.0f} MB).")
        _check_png_crcs(data)
        _check_work_bounds(data)
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
        except Exception as exc:  # noqa: BLE001 - closed file, failing stream, ...
            raise ImageLoadError(f"Cannot read the file ({exc.__class__.__name__}).") from None
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
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad data
        raise ImageLoadError(f"The image could not be opened: {exc.__class__.__name__}.") from None
    return img, img.format


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = np.percentile(arr, [0.5, 99.5]) if arr.size else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1.0
        arr = np.clip((arr - lo) / (hi - lo), 0.0, 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "CMYK":
        return img.convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def load_image(source, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> LoadedImage:
    """Decode ``source`` (path, bytes or file object) to an RGB uint8 array.

    Raises :class:`ImageLoadError` with a clear message on any problem.
    """
    img, fmt = _open(source)
    if fmt == "DICOM":
        return _load_dicom(img, max_pixels, min_side)
    try:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageLoadError(
                f"The image is {width}x{height} pixels; the limit is {max_pixels / 1e6:.0f} megapixels. "
                "Please upload a smaller field of view."
            )
        if min(width, height) < min_side:
            raise ImageLoadError(f"The image is {width}x{height} pixels; at least {min_side}x{min_side} is needed.")
        try:
            # Counting frames parses every frame (GIF) or IFD (TIFF): corrupt ones raise here.
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            original_mode = img.mode
            img.load()
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt data
            raise ImageLoadError(f"The image data is corrupt or truncated ({exc.__class__.__name__}).") from None
        transposed = False
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - malformed EXIF is ignored, not fatal
            orientation = 1
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            try:
                img = ImageOps.exif_transpose(img)
                transposed = True
            except Exception:  # noqa: BLE001
                transposed = False
        try:
            rgb = np.ascontiguousarray(np.asarray(_to_rgb(img), dtype=np.uint8))
        except Exception as exc:  # noqa: BLE001
            raise ImageLoadError(f"The image could not be converted to RGB ({exc.__class__.__name__}).") from None
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ImageLoadError("The image could not be converted to RGB.")
        return LoadedImage(rgb=rgb, original_mode=original_mode, original_size=(width, height), format=fmt,
                           exif_transposed=transposed)
    finally:
        try:
            img.close()
        except Exception:  # noqa: BLE001
            pass


def _load_dicom(data: bytes, max_pixels: int, min_side: int) -> LoadedImage:
    from ..reports.dicom_io import read_dicom  # pydicom is imported only for DICOM input

    d = read_dicom(data, max_pixels=max_pixels, min_side=min_side)
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
