"""Limits on what an image may cost before it is decoded: pixels, bytes of memory, parsing work.

Memory is bounded in bytes, not only in pixels, and from the header alone, before anything is
decoded (:func:`check_memory`)::

    extra + width * height * max(bpp, CALLER_BPP) <= MAX_DECODE_BYTES

``bpp`` counts every full-size buffer alive at the decoder's peak, per pixel:

* Pillow (:func:`_pillow_bpp`): the decoded image (1 byte for modes 1/L/P, 2 for I;16, 4 for every
  other mode), the codec's own buffer (JPEG: 2 bytes per DCT coefficient of each component, which
  libjpeg keeps for the whole image when a file is progressive or has several scans; TIFF: one strip
  or tile at the raw depth, at least 4 bytes per pixel, so a header declaring huge tiles is refused;
  WebP: 10, measured 9), and the RGB result (3), or for I;16/I/F the copy and the sorted copy the
  percentile window needs (2 x the source).
* DICOM (:func:`oncoscope.imaging.dicom.read_dicom`), with f = samples x bytes per sample:
  ``max(decode, f x 3 + 3 if greyscale else f + 3)``, where decode is f for native data, f x 4 for RLE,
  JPEG and JPEG-LS, and samples x 10 + Pillow's image (4 if RGB, else f) + f for JPEG 2000; ``extra``
  is the pixel data the parsed dataset holds. A Deflated body is inflated with a cap first. The codecs
  trust a compressed frame's own header, not the dataset, so every frame to be decoded must declare the
  dataset's size, samples and at most its depth (and JPEG 2000 a bounded tile, code-block and precinct
  layout; RLE segments must not expand past the frame) before any is decoded.

``CALLER_BPP`` (7) is the RGB result plus the Pillow copy a caller makes of it (thumbnail, resize).
Conversions to RGB run strip by strip (:func:`fill_by_strips`), so their temporaries stay at a few MB.
"""

from __future__ import annotations

import struct

import numpy as np

# Limits. A 20000x20000 image is 400 MP: refuse it before decoding.
MAX_PIXELS = 64_000_000  # ~8000 x 8000; at the default MAX_DECODE_BYTES the memory bound is the tighter one


# Pixels alone did not bound memory (a 128 kB 16-bit PNG of 7999x7999 took 1.6 GB): bytes do (see above).
# This admits ~36 MP of PNG/BMP/GIF or uncompressed DICOM, ~25 MP of JPEG, ~23 MP of TIFF, ~15 MP of WebP,
# and keeps a process's growth per upload under 300 MB with the interpreter's own overhead.
MAX_DECODE_BYTES = 256_000_000


RGB_BPP = 3


CALLER_BPP = RGB_BPP + 4  # a caller's Pillow copy of the RGB result stores 4 bytes per pixel


STRIP_PIXELS = 1 << 20


MIN_SIDE = 16


MAX_FILE_BYTES = 100 * 1024 * 1024


# Work bounds for files that are small but expensive to parse (only the first frame is used):
MAX_TIFF_PAGES = 1000  # Pillow walks the IFD chain in quadratic time: 100 000 pages (11 MB) took minutes


MAX_JPEG_SCANS = 500  # each progressive scan re-processes the whole image: thousands of tiny scans take minutes


class ImageLoadError(ValueError):
    """The input cannot be used as an image. ``str(err)`` is user-facing."""


def check_memory(width: int, height: int, bpp: float, what: str, *, max_bytes: int = MAX_DECODE_BYTES,
                 extra: int = 0) -> None:
    """Refuse an image whose decoding would hold more than ``max_bytes`` at once (see the module docstring)."""
    if memory_needed(width * height, bpp, extra) <= max_bytes:
        return
    fits = max(0, max_bytes - extra) / max(bpp, CALLER_BPP) / 1e6
    advice = (f"Please upload a smaller field of view (at most about {int(fits)} megapixels for this kind of image)."
              if fits >= 1 else "Its header declares far more data than such an image holds; save it again.")
    raise ImageLoadError(
        f"The image is {width}x{height} pixels ({what}); decoding it would need about "
        f"{memory_needed(width * height, bpp, extra) / 1e6:.0f} MB of memory, more than the {max_bytes / 1e6:.0f} MB "
        f"allowed for one image. {advice}")


def memory_needed(pixels: int, bpp: float, extra: int = 0) -> int:
    return int(extra + pixels * max(bpp, CALLER_BPP))


def fill_by_strips(out: np.ndarray, strip) -> np.ndarray:
    """``out[rows] = strip(rows)`` for row ranges of about STRIP_PIXELS pixels: conversions run per strip so
    that their temporaries (floats at 8 bytes per sample) stay at a few MB, not several copies of the image."""
    height, width = out.shape[:2]
    step = max(1, STRIP_PIXELS // max(width, 1))
    for y in range(0, height, step):
        out[y:y + step] = strip(slice(y, min(height, y + step)))
    return out


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


def check_work_bounds(data: bytes) -> None:
    """Refuse small files that would take minutes to parse: TIFFs with thousands of pages and
    progressive JPEGs with thousands of scans (both would be parsed before any pixel limit applies).
    Also applied to each JPEG frame of a DICOM file."""
    if data[:2] in (b"II", b"MM") and _tiff_pages(data, MAX_TIFF_PAGES) > MAX_TIFF_PAGES:
        raise ImageLoadError(f"The TIFF file has more than {MAX_TIFF_PAGES} pages; upload the page to analyse "
                             "as a single image.")
    # In JPEG data 0xFF is always followed by a stuffed 0x00 or a marker, so this counts SOS markers
    # (plus those of embedded thumbnails; a normal progressive JPEG has about ten).
    if data[:2] == b"\xff\xd8" and data.count(b"\xff\xda") > MAX_JPEG_SCANS:
        raise ImageLoadError(f"The JPEG file has more than {MAX_JPEG_SCANS} scans and would take too long to "
                             "decode; save it again as a baseline JPEG or PNG.")


def check_dimensions(width: int, height: int, max_pixels: int, min_side: int) -> None:
    if width * height > max_pixels:
        raise ImageLoadError(
            f"The image is {width}x{height} pixels; the limit is {max_pixels / 1e6:.0f} megapixels. "
            "Please upload a smaller field of view."
        )
    if min(width, height) < min_side:
        raise ImageLoadError(f"The image is {width}x{height} pixels; at least {min_side}x{min_side} is needed.")
