"""Peak memory of the upload decoding path on crafted hostile files (issue 11, item 4).

Each file is decoded in a fresh Python process the way an upload is (``load_image`` then the thumbnail
``FileStore.put_thumbnail`` makes, as ``oncoscope.store.cases.add_images`` does), after the codecs and
the analyzer model are loaded. The growth of the process's peak RSS (VmHWM, reset just before the
decode) must stay under :data:`GROWTH_LIMIT` for any upload of at most 25 MB, and a refusal must be an
:class:`ImageLoadError` saying why. The hostile files are generated here in milliseconds: their deflate
streams repeat one fully flushed block, so a body of 1 GiB costs the work of one compressed MiB.
"""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (ComputedRadiographyImageStorage, DeflatedExplicitVRLittleEndian, JPEG2000Lossless,
                         JPEGBaseline8Bit, JPEGLSLossless, MRImageStorage, RLELossless)

from oncoscope.imaging import limits
from oncoscope.ml import synthetic
from oncoscope.imaging.imageio import ImageLoadError
from oncoscope.imaging import dicom
from oncoscope.imaging.dicom import read_dicom
from oncoscope.reports import dicom_seg

from .test_dicom import VL_WSI, colour, gradient, make_dicom, to_bytes

REPO = Path(__file__).resolve().parents[2]
GROWTH_LIMIT = 300_000_000  # bytes: what one upload of at most 25 MB may add to a process
UPLOAD_LIMIT = 25 * 1024 * 1024


# ----------------------------------------------------------------------------- crafting
def _deflate_repeated(prefix: bytes, block: bytes, times: int, suffix: bytes = b"",
                      zlib_wrapper: bool = False) -> bytes:
    """``prefix + block * times + suffix`` deflated in the time of one block: after a full flush the
    compressor forgets its history, so every copy of ``block`` compresses to the same bytes."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    body = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    raw = head + body * times + c.compress(suffix) + c.flush()
    if not zlib_wrapper:
        return raw
    adler = zlib.adler32(prefix)
    for _ in range(times):
        adler = zlib.adler32(block, adler)
    return b"\x78\xda" + raw + struct.pack(">I", zlib.adler32(suffix, adler))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_zeros(w: int, h: int, bit_depth: int, colour_type: int) -> bytes:
    """A real PNG (every row present) of a black image: tiny, since it compresses."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = bytes(1 + w * channels * bit_depth // 8)  # filter byte 0 and black samples
    rows_per_block = max(1, (1 << 20) // len(row))
    idat = _deflate_repeated(b"", row * rows_per_block, h // rows_per_block, row * (h % rows_per_block), True)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _png_declaring_with_data(w: int, h: int, mib: int) -> bytes:
    """An 8-bit RGB PNG of w x h whose image data inflates to ``mib`` MiB: only what the header needs is read."""
    idat = _deflate_repeated(b"", bytes(1 << 20), mib, b"", True)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def tiff_of_zeros(w: int, h: int) -> bytes:
    """A real 8-bit RGB TIFF of a black image in one Deflate-compressed strip."""
    strip = _deflate_repeated(b"", bytes(w * 3 * 64), h // 64, bytes(w * 3 * (h % 64)), True)
    bps_at = 8 + 2 + 11 * 12 + 4
    strip_at = bps_at + 6
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, bps_at), (259, 3, 1, 8), (262, 3, 1, 2),
               (273, 4, 1, strip_at), (277, 3, 1, 3), (278, 4, 1, h), (279, 4, 1, len(strip)), (284, 3, 1, 1),
               (339, 3, 1, 1)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, typ, n) + (struct.pack("<HH", v, 0) if typ == 3 and n == 1 else struct.pack("<I", v))
        for tag, typ, n, v in entries) + struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<HHH", 8, 8, 8) + strip


def jpeg_declaring(w: int, h: int, jpeg: bytes | None = None, sof: bytes = b"\xff\xc2") -> bytes:
    """A small JPEG (by default progressive) whose frame header claims w x h: a lying header."""
    if jpeg is None:
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (90, 120, 200)).save(buf, "JPEG", progressive=True)
        jpeg = buf.getvalue()
    j = bytearray(jpeg)
    i = j.index(sof)
    j[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(j)


def jpeg_ls_declaring(w: int, h: int) -> bytes:
    """A small 16-bit JPEG-LS codestream whose frame header (SOF55) claims w x h."""
    import jpeg_ls

    return jpeg_declaring(w, h, bytes(jpeg_ls.encode(np.full((64, 64), 1000, np.uint16))), b"\xff\xf7")


def j2k_declaring(w: int, h: int, mode: str = "RGB", tile: int | None = None, codeblock: int = 64) -> bytes:
    """A small JPEG 2000 codestream whose size marker claims w x h, in one tile or in tiles of ``tile``."""
    buf = io.BytesIO()
    Image.new(mode, (64, 64), 90).save(buf, "JPEG2000", no_jp2=True, codeblock_size=(codeblock, codeblock))
    j = bytearray(buf.getvalue())
    struct.pack_into(">II", j, 8, w, h)  # SIZ: Xsiz, Ysiz
    struct.pack_into(">II", j, 24, tile or w, tile or h)  # XTsiz, YTsiz
    return bytes(j)


def j2k_frame(side: int, mode: str = "RGB", bits: int = 8) -> bytes:
    """A real JPEG 2000 frame with the smallest code-blocks and precincts accepted (the costliest to decode)."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    grey = 128 + 100 * np.sin(x / 97) * np.cos(y / 53)
    px = (grey * 16).astype(np.uint16) if bits == 16 else grey.astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.stack([px, px[::-1], px.T], -1) if mode == "RGB" else px).save(
        buf, "JPEG2000", no_jp2=True, irreversible=False, precinct_size=(64, 64), codeblock_size=(32, 32))
    return buf.getvalue()


# An 8000x8000 lossless WebP of one colour (Pillow needs 1.4 s to write these 38 bytes).
WEBP_8000 = bytes.fromhex("524946461e000000574542505650384c110000002f3fdfcf070750c1e295b1ff8188e87f0000")


def _dicom_without_pixels(rows: int, cols: int, *, frames: int = 1, bits: int = 16, photometric: str = "MONOCHROME2",
                          ts: str = RLELossless, pixel_data: bytes = b"\0\0", **kw) -> bytes:
    ds = make_dicom(None, photometric, bits_allocated=bits, rows=rows, columns=cols, frames=frames,
                    transfer_syntax=ts, pixel_data=pixel_data, **kw)
    return to_bytes(ds)


def _rle_segment_of_zeros(n: int) -> bytes:
    """PackBits runs of 128 zero bytes (2 bytes each): 64 MB of samples in 1 MB."""
    full, rest = divmod(n, 128)
    seg = b"\x81\0" * full + (bytes([257 - rest, 0]) if rest > 1 else b"\0\0" if rest else b"")
    return seg + (b"\x80" if len(seg) % 2 else b"")  # 0x80 is a no-op that pads to an even length


def rle_frame(rows: int, cols: int, segments: int, segment_bytes: int | None = None) -> bytes:
    seg = _rle_segment_of_zeros(rows * cols) if segment_bytes is None else b"\x81\0" * (segment_bytes // 2)
    offsets = [64 + k * len(seg) for k in range(segments)]
    return struct.pack("<16I", segments, *offsets, *[0] * (15 - segments)) + seg * segments


def deflated_dicom(rows: int = 4096, cols: int = 4096, frames: int = 32) -> bytes:
    """A valid Deflated Explicit VR Little Endian MR file of black frames; by default a bomb whose 1 MB body
    inflates to 1 GiB (32 frames of 4096x4096x16 bits, each within the pixel limit)."""
    plain = _dicom_without_pixels(rows, cols, frames=frames, ts="1.2.840.10008.1.2.1", modality="MR",
                                  sop_class=MRImageStorage)
    meta_end = 132 + 12 + struct.unpack_from("<I", plain, 140)[0]
    body = plain[meta_end:]
    body = body[:body.rindex(b"\xe0\x7f\x10\x00")]  # drop the 2-byte Pixel Data element
    size = rows * cols * 2 * frames
    header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, size)
    meta = make_dicom(None).file_meta
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta)
    block = bytes(1 << 20)
    return bytes(128) + b"DICM" + buf.getvalue() + _deflate_repeated(body + header, block, size // len(block),
                                                                     bytes(size % len(block)))


def radiograph_16bit(side: int = 2048) -> bytes:
    """A computed radiograph of the size a detector gives, 12 bits stored in 16, windowed."""
    grey = synthetic.radiograph_like(1, width=side, height=side)[..., 0].astype(np.uint16) * 16
    ds = make_dicom(grey, "MONOCHROME2", bits_allocated=16, bits_stored=12, modality="CR",
                    sop_class=ComputedRadiographyImageStorage, extra={"WindowCenter": "2048", "WindowWidth": "4096"})
    return to_bytes(ds)


def flat(fmt: str, w: int, h: int, **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 200)).save(buf, fmt, **kw)
    return buf.getvalue()


def rle_dicom(rows: int, cols: int, photometric: str = "MONOCHROME2", bits: int = 16, frames: int = 1,
              **kw) -> bytes:
    segments = (3 if photometric == "RGB" else 1) * bits // 8
    return _dicom_without_pixels(rows, cols, frames=frames, bits=bits, photometric=photometric,
                                 pixel_data=encapsulate([rle_frame(rows, cols, segments)] * frames), **kw)


def _encapsulated_dicom(rows: int, cols: int, ts: str, frame: bytes, photometric: str = "YBR_FULL_422",
                        bits: int = 8) -> bytes:
    """A DICOM file declaring rows x cols that holds ``frame``, whose own header may say otherwise."""
    return _dicom_without_pixels(rows, cols, bits=bits, photometric=photometric, ts=ts,
                                 pixel_data=encapsulate([frame]))


def native_dicom(rows: int, cols: int, photometric: str = "MONOCHROME2", bits: int = 16) -> bytes:
    size = rows * cols * (3 if photometric != "MONOCHROME2" else 1) * bits // 8
    return _dicom_without_pixels(rows, cols, bits=bits, photometric=photometric, ts="1.2.840.10008.1.2.1",
                                 pixel_data=bytes(size))


def jpeg_ls_dicom(side: int) -> bytes:
    """A real lossless JPEG-LS 16-bit greyscale DICOM (CharLS, through pyjpegls)."""
    import jpeg_ls

    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    px = (1600 + 1500 * np.sin(x / 97) * np.cos(y / 53)).astype(np.uint16)
    return _encapsulated_dicom(side, side, JPEGLSLossless, bytes(jpeg_ls.encode(px)), "MONOCHROME2", 16)


def photo_jpeg(w: int = 4000, h: int = 3000) -> bytes:
    """A camera-sized RGB JPEG with smooth content (a microscope photograph is of this order)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([128 + 100 * np.sin(x / 97), 128 + 100 * np.cos(y / 53), 128 + 60 * np.sin((x + y) / 211)], -1)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# name -> (builder, expectation): "ok", or "refused:<words of the message>". Built once, lazily.
HOSTILE = {
    # small files that decode to gigabytes
    "deflated-dicom-bomb-1GiB.dcm": (deflated_dicom, "refused:deflated"),
    "png-16bit-7999x7999.png": (lambda: png_of_zeros(7999, 7999, 16, 0), "refused:memory"),
    "png-rgb-8bit-8000x8000.png": (lambda: png_of_zeros(8000, 8000, 8, 2), "refused:memory"),
    "png-rgba-16bit-7999x7999.png": (lambda: png_of_zeros(7999, 7999, 16, 6), "refused:memory"),
    "tiff-rgb-8000x8000-one-strip.tif": (lambda: tiff_of_zeros(8000, 8000), "refused:memory"),
    "webp-8000x8000-38-bytes.webp": (lambda: WEBP_8000, "refused:memory"),
    "dicom-rle-mr-3-frames-of-8000x8000x16bit.dcm": (
        lambda: rle_dicom(8000, 8000, frames=3, modality="MR", sop_class=MRImageStorage), "refused:memory"),
    # lying headers: dimensions the data does not hold, or data the dimensions do not need
    "jpeg-progressive-declaring-8000x8000.jpg": (lambda: jpeg_declaring(8000, 8000), "refused:memory"),
    "dicom-jpeg-512x512-holding-a-jpeg-declaring-8000x8000.dcm": (
        lambda: _encapsulated_dicom(512, 512, JPEGBaseline8Bit, jpeg_declaring(8000, 8000)), "refused:declares"),
    "dicom-j2k-512x512-holding-a-j2k-declaring-8000x8000.dcm": (
        lambda: _encapsulated_dicom(512, 512, JPEG2000Lossless, j2k_declaring(8000, 8000), "RGB"), "refused:declares"),
    "dicom-jpeg-ls-512x512-holding-a-jpeg-ls-declaring-16000x16000.dcm": (
        lambda: _encapsulated_dicom(512, 512, JPEGLSLossless, jpeg_ls_declaring(16000, 16000), "MONOCHROME2", 16),
        "refused:declares"),
    "dicom-j2k-4000x4000-in-62500-tiles.dcm": (
        lambda: _encapsulated_dicom(4000, 4000, JPEG2000Lossless, j2k_declaring(4000, 4000, "L", tile=16),
                                    "MONOCHROME2"), "refused:tiles"),
    "dicom-j2k-4000x4000-in-4x4-code-blocks.dcm": (
        lambda: _encapsulated_dicom(4000, 4000, JPEG2000Lossless, j2k_declaring(4000, 4000, "L", codeblock=4),
                                    "MONOCHROME2"), "refused:code-blocks"),
    "dicom-rle-512x512-with-a-segment-expanding-to-1GiB.dcm": (
        lambda: _dicom_without_pixels(512, 512, bits=8, pixel_data=encapsulate([rle_frame(512, 512, 1, 1 << 24)])),
        "refused:expands past"),
    "png-100x100-with-1GiB-of-image-data.png": (lambda: _png_declaring_with_data(100, 100, 1024), "ok"),
    "dicom-native-mr-100000-frames-of-4096x4096.dcm": (
        lambda: _dicom_without_pixels(4096, 4096, frames=100_000, modality="MR", sop_class=MRImageStorage,
                                      ts="1.2.840.10008.1.2.1", pixel_data=bytes(4096)), "refused:truncated"),
    "dicom-rle-mr-1000000000-frames-of-512x512.dcm": (
        lambda: _dicom_without_pixels(512, 512, frames=1_000_000_000, modality="MR", sop_class=MRImageStorage,
                                      pixel_data=encapsulate([rle_frame(512, 512, 2)])), "refused:"),
    "dicom-native-8000x8000x16bit-with-4kB-of-pixels.dcm": (
        lambda: _dicom_without_pixels(8000, 8000, ts="1.2.840.10008.1.2.1", pixel_data=bytes(4096)), "refused:memory"),
    "dicom-native-4096x4096x16bit-with-4kB-of-pixels.dcm": (
        lambda: _dicom_without_pixels(4096, 4096, ts="1.2.840.10008.1.2.1", pixel_data=bytes(4096)),
        "refused:truncated"),
    "dicom-rle-rgb-5000x5000x16bit-with-short-segments.dcm": (
        lambda: _dicom_without_pixels(5000, 5000, photometric="RGB",
                                      pixel_data=encapsulate([rle_frame(5000, 5000, 6, segment_bytes=64)])),
        "refused:memory"),
    # just under the limits: accepted, and still within GROWTH_LIMIT
    "png-rgb-8bit-6000x6000.png": (lambda: png_of_zeros(6000, 6000, 8, 2), "ok"),
    "png-16bit-6000x6000.png": (lambda: png_of_zeros(6000, 6000, 16, 0), "ok"),
    "jpeg-progressive-5000x5000.jpg": (lambda: flat("JPEG", 5000, 5000, progressive=True), "ok"),
    "tiff-rgb-4800x4800-one-strip.tif": (lambda: tiff_of_zeros(4800, 4800), "ok"),
    "webp-3840x3840.webp": (lambda: flat("WEBP", 3840, 3840, lossless=True, method=0, quality=0), "ok"),
    "dicom-rle-16bit-5000x5000.dcm": (lambda: rle_dicom(5000, 5000), "ok"),
    "dicom-rle-rgb-8bit-4500x4500.dcm": (lambda: rle_dicom(4500, 4500, "RGB", 8), "ok"),
    "dicom-native-16bit-3500x3500.dcm": (lambda: native_dicom(3500, 3500), "ok"),
    "dicom-native-ybr-full-2800x2800.dcm": (lambda: native_dicom(2800, 2800, "YBR_FULL", 8), "ok"),
    "dicom-jpeg-progressive-rgb-4600x4600.dcm": (
        lambda: _encapsulated_dicom(4600, 4600, JPEGBaseline8Bit, flat("JPEG", 4600, 4600, progressive=True,
                                                                        subsampling=0)), "ok"),
    "dicom-j2k-rgb-2600x2600-smallest-precincts.dcm": (
        lambda: _encapsulated_dicom(2600, 2600, JPEG2000Lossless, j2k_frame(2600), "RGB"), "ok"),
    "dicom-j2k-8bit-4550x4550-smallest-precincts.dcm": (
        lambda: _encapsulated_dicom(4550, 4550, JPEG2000Lossless, j2k_frame(4550, "L"), "MONOCHROME2"), "ok"),
    "dicom-j2k-16bit-4200x4200-smallest-precincts.dcm": (
        lambda: _encapsulated_dicom(4200, 4200, JPEG2000Lossless, j2k_frame(4200, "I;16", 16), "MONOCHROME2", 16),
        "ok"),
    "dicom-jpeg-ls-16bit-5200x5200.dcm": (lambda: jpeg_ls_dicom(5200), "ok"),
    "dicom-deflated-16bit-4000x4000.dcm": (lambda: deflated_dicom(4000, 4000, 1), "ok"),
    "dicom-deflated-mr-7-frames-of-2048x2048-59MB-inflated.dcm": (lambda: deflated_dicom(2048, 2048, 7), "ok"),
}

# Legitimate large images: accepted, and measured with an analyzer run on them.
LEGITIMATE = {
    "cr-2048x2048x16bit.dcm": (radiograph_16bit, "bone-xray"),
    "photo-4000x3000.jpg": (photo_jpeg, "smear-all"),
}


@functools.cache
def crafted(name: str) -> bytes:
    return {**HOSTILE, **LEGITIMATE}[name][0]()


@pytest.fixture(scope="module")
def warm_files(tmp_path_factory) -> list[Path]:
    """One small file per decoder, loaded before the measure so that importing codecs is not counted."""
    d = tmp_path_factory.mktemp("warm")
    small = Image.new("RGB", (32, 32), (10, 200, 30))
    files = {}
    for fmt, kw in (("PNG", {}), ("JPEG", {"progressive": True}), ("TIFF", {"compression": "tiff_deflate"}),
                    ("WEBP", {"lossless": True})):
        buf = io.BytesIO()
        small.save(buf, fmt, **kw)
        files[fmt] = buf.getvalue()
    files["I16.png"] = png_of_zeros(32, 32, 16, 0)
    files["native.dcm"] = to_bytes(make_dicom(np.zeros((32, 32), np.uint16), bits_allocated=16))
    ds = make_dicom(np.zeros((32, 32, 3), np.uint8), "RGB")
    ds.compress(RLELossless, encoding_plugin="pydicom")
    files["rle.dcm"] = to_bytes(ds)
    out = []
    for name, data in files.items():
        (d / name).write_bytes(data)
        out.append(d / name)
    return out


_CHILD = r"""
import gc, json, sys, tempfile, time
import numpy as np
import pydicom, pydicom.pixels
from oncoscope.imaging.imageio import ImageLoadError, load_image
from oncoscope.imaging import dicom  # noqa: F401 - load_image imports it on the first DICOM
from oncoscope.store.files import FileStore

def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

path, analyzer_id, warm = sys.argv[1], sys.argv[2], sys.argv[3:]
analyzer = None
if analyzer_id:
    from oncoscope.analyzers import registry
    analyzer = registry.get(analyzer_id)
    analyzer.analyze(np.full((300, 400, 3), 128, np.uint8))  # the model loads before the measure
for name in warm:
    load_image(name)
store = FileStore(tempfile.mkdtemp())
with open(path, "rb") as fh:
    data = fh.read()
gc.collect()
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # resets the peak (VmHWM) to the current RSS
out = {}
t0 = time.perf_counter()
try:
    loaded = load_image(data)  # what cases.add_images does with an upload
    store.put_thumbnail("0" * 64, loaded.rgb)
    out.update(outcome="ok", shape=list(loaded.rgb.shape))
except ImageLoadError as exc:
    out.update(outcome="refused", message=str(exc))
out["seconds"] = time.perf_counter() - t0
out["growth"] = status("VmHWM") - before
if analyzer is not None and out["outcome"] == "ok":  # what the worker then does with it
    t0 = time.perf_counter()
    result = analyzer.analyze(loaded)
    out.update(status=result.status, classified=bool(result.probabilities))
    out["analysis_seconds"] = time.perf_counter() - t0
    out["analysis_growth"] = status("VmHWM") - before
print(json.dumps(out))
"""


def measure(tmp_path: Path, name: str, warm: list[Path], analyzer: str = "") -> dict:
    path = tmp_path / name
    path.write_bytes(crafted(name))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(path), analyzer, *map(str, warm)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{name}: the child failed ({r.returncode}): {r.stderr[-3000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    analysis = (f"; with {analyzer}: +{out['analysis_growth'] / 1e6:.0f} MB, {out['analysis_seconds']:.2f} s"
                if "analysis_growth" in out else "")
    print(f"{name}: {len(crafted(name)) / 1e6:.2f} MB file, peak RSS +{out['growth'] / 1e6:.0f} MB, "
          f"{out['seconds']:.2f} s, {out['outcome']} {out.get('message', out.get('shape', ''))}{analysis}")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_file_peak_memory(tmp_path, warm_files, name):
    assert len(crafted(name)) <= UPLOAD_LIMIT
    out, expect = measure(tmp_path, name, warm_files), HOSTILE[name][1]
    assert out["growth"] < GROWTH_LIMIT, f"{name}: the process grew by {out['growth'] / 1e6:.0f} MB"
    assert out["seconds"] < 10, f"{name}: took {out['seconds']:.1f} s"
    if expect == "ok":
        assert out["outcome"] == "ok", out
    else:
        assert out["outcome"] == "refused" and expect.split(":", 1)[1] in out["message"], out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LEGITIMATE))
def test_large_clinical_image_accepted_within_memory(tmp_path, warm_files, name):
    out = measure(tmp_path, name, warm_files, LEGITIMATE[name][1])
    assert out["outcome"] == "ok", out
    assert out["classified"], out  # the analysis ran (not refused for its modality)
    assert out["growth"] < GROWTH_LIMIT, f"{name}: the upload grew the process by {out['growth'] / 1e6:.0f} MB"
    assert out["analysis_growth"] < GROWTH_LIMIT, f"{name}: analysing grew it by {out['analysis_growth'] / 1e6:.0f} MB"
    assert out["seconds"] + out["analysis_seconds"] < 20, out


# ----------------------------------------------------------------------------- in-process checks (fast)
def _deflated(ds) -> bytes:
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian  # pydicom deflates the body on writing
    return to_bytes(ds)


def test_deflated_dicom_within_the_cap_is_read():
    px = gradient(40, 48, np.uint16, 4000)
    plain = read_dicom(to_bytes(make_dicom(px, bits_allocated=16)))
    d = read_dicom(_deflated(make_dicom(px, bits_allocated=16)))
    assert d.transfer_syntax == DeflatedExplicitVRLittleEndian and d.patient_id == "MRN-DCM-1"
    assert np.array_equal(d.rgb, plain.rgb)


def test_deflated_dicom_is_never_inflated_whole(monkeypatch):
    data = _deflated(make_dicom(gradient(100, 100, np.uint16, 4000), bits_allocated=16))

    def unbounded(*a, **k):  # pydicom's own path: zlib.decompress of the whole body
        raise AssertionError("inflated without a cap")

    monkeypatch.setattr(zlib, "decompress", unbounded)
    monkeypatch.setattr(dicom, "MAX_INFLATED_BYTES", 10_000)  # the body inflates to ~21 kB
    with pytest.raises(ImageLoadError, match="deflated and would expand to more than"):
        read_dicom(data)
    monkeypatch.setattr(dicom, "MAX_INFLATED_BYTES", 30_000)
    assert read_dicom(data).rgb.shape == (100, 100, 3)


@pytest.mark.parametrize("cut", [40, 400])
def test_truncated_or_damaged_deflated_dicom_refused(cut):
    data = _deflated(make_dicom(gradient(100, 100, np.uint16, 4000), bits_allocated=16))
    with pytest.raises(ImageLoadError, match="corrupt"):
        read_dicom(data[:-cut])
    with pytest.raises(ImageLoadError, match="corrupt"):
        read_dicom(data[:-cut] + bytes(range(256)) * 2)


def test_dicom_refused_by_memory_before_decoding(monkeypatch):
    from pydicom.pixels.decoders.base import Decoder

    def boom(*a, **k):
        raise AssertionError("decoding started")

    monkeypatch.setattr(Decoder, "as_array", boom)
    data = _dicom_without_pixels(5000, 5000, photometric="RGB",
                                 pixel_data=encapsulate([rle_frame(5000, 5000, 6, segment_bytes=64)]))
    with pytest.raises(ImageLoadError, match=r"5000x5000 pixels \(DICOM RGB, 3 x 16-bit samples\).*memory"):
        read_dicom(data)


def test_whole_slide_level_too_large_in_memory_falls_back_to_the_first_tile():
    full = colour(rows=50, cols=60, seed=9)
    padded = np.zeros((64, 64, 3), dtype=np.uint8)
    padded[:50, :60] = full
    tiles = np.stack([padded[r:r + 32, c:c + 32] for r in (0, 32) for c in (0, 32)])
    data = to_bytes(make_dicom(tiles, "RGB", frames=4, modality="SM", sop_class=VL_WSI,
                               extra={"DimensionOrganizationType": "TILED_FULL", "TotalPixelMatrixRows": 50,
                                      "TotalPixelMatrixColumns": 60}))
    # 12 288 bytes of pixel data held, then 7 bytes a pixel: 3000 stitched pixels need 33 288, a tile 19 456.
    assert read_dicom(data, max_bytes=40_000).frame_index is None
    d = read_dicom(data, max_bytes=25_000)
    assert d.frame_index == 0 and np.array_equal(d.rgb, tiles[0])


def _strip_variants() -> dict[str, bytes]:
    px16 = gradient(45, 53, np.uint16, 4000)
    px16[3, :5] = [0, 4000, 17, 2999, 1]
    signed = (px16.astype(np.int32) - 2000).astype(np.int16)
    voi = Dataset()
    voi.LUTDescriptor = [256, 0, 8]
    voi.add_new("LUTData", "US", list(range(255, -1, -1)))
    palette = {f"{c}PaletteColorLookupTableDescriptor": [256, 0, 16] for c in ("Red", "Green", "Blue")}
    palette.update({f"{c}PaletteColorLookupTableData": (np.arange(256, dtype="<u2") * (k + 1) * 97).tobytes()
                    for k, c in enumerate(("Red", "Green", "Blue"))})
    float_ds = make_dicom(None, rows=45, columns=53, pixel_data=b"\0\0", bits_allocated=32)
    del float_ds.PixelData
    float_ds.FloatPixelData = np.linspace(-3, 9, 45 * 53, dtype="<f4").tobytes()
    from pydicom.pixels import convert_color_space

    return {
        "16-bit stretch": to_bytes(make_dicom(px16, bits_allocated=16)),
        "16-bit window": to_bytes(make_dicom(px16, bits_allocated=16, extra={"WindowCenter": "1500",
                                                                              "WindowWidth": "1001"})),
        "MONOCHROME1 stretch": to_bytes(make_dicom(px16, "MONOCHROME1", bits_allocated=16)),
        "signed, negative slope, stretch": to_bytes(make_dicom(signed, bits_allocated=16, signed=True, extra={
            "RescaleSlope": "-2", "RescaleIntercept": "100"})),
        "VOI LUT": to_bytes(make_dicom(gradient(45, 53), extra={"VOILUTSequence": [voi]})),
        "palette": to_bytes(make_dicom(gradient(45, 53), "PALETTE COLOR", extra=palette)),
        "YBR_FULL": to_bytes(make_dicom(convert_color_space(colour(45, 53, 1), "RGB", "YBR_FULL"), "YBR_FULL")),
        "RGB 16-bit": to_bytes(make_dicom((colour(45, 53, 2).astype(np.uint16) * 257), "RGB", bits_allocated=16)),
        "float": to_bytes(float_ds),
    }


_VARIANTS = _strip_variants()


def _x_stretched_whole(data: bytes) -> np.ndarray:
    """The stretch as it was before strips: on the whole frame of modality values, in float64."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    x = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    lo, hi = np.percentile(x, [0.5, 99.5])
    return np.rint(np.clip((x - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


@pytest.mark.parametrize("name", list(_VARIANTS))
def test_dicom_conversion_by_strips_matches_one_strip(monkeypatch, name):
    whole = read_dicom(_VARIANTS[name]).rgb
    monkeypatch.setattr(limits, "STRIP_PIXELS", 4 * 53 + 1)  # 4 rows a strip, the last one partial
    assert np.array_equal(read_dicom(_VARIANTS[name]).rgb, whole)
    if "stretch" in name:  # the percentiles of the stored values, mapped, are those of the modality values
        expected = _x_stretched_whole(_VARIANTS[name])
        assert np.array_equal(whole[..., 0], 255 - expected if "MONOCHROME1" in name else expected)


# ----------------------------------------------------------------------------- encapsulated frames (fast)
FRAME_LIES = {name: expect.split(":", 1)[1] for name, (_, expect) in HOSTILE.items()
              if name.startswith(("dicom-jpeg", "dicom-j2k", "dicom-rle-512x512-with")) and expect != "ok"}


@pytest.fixture
def no_decoding(monkeypatch):
    from pydicom.pixels.decoders.base import Decoder

    def boom(*a, **k):
        raise AssertionError("decoding started")

    monkeypatch.setattr(Decoder, "as_array", boom)
    monkeypatch.setattr(Decoder, "iter_array", boom)


@pytest.mark.parametrize("name", list(FRAME_LIES))
def test_frame_whose_own_header_disagrees_is_refused_before_decoding(no_decoding, name):
    with pytest.raises(ImageLoadError, match=FRAME_LIES[name]):
        read_dicom(crafted(name))


def _jpeg(px: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _j2k(px: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "JPEG2000", no_jp2=True, irreversible=False, **kw)
    return buf.getvalue()


def test_frames_as_encoders_write_them_are_accepted():
    import jpeg_ls

    rgb, grey = colour(256, 320, 3), gradient(256, 320)
    grey16 = gradient(256, 320, np.uint16, 4000)
    cases = [  # (frame, photometric, bits, transfer syntax)
        (_jpeg(rgb, quality=90), "YBR_FULL_422", 8, JPEGBaseline8Bit),  # 4:2:0, baseline
        (_jpeg(grey, progressive=True), "MONOCHROME2", 8, JPEGBaseline8Bit),
        (_j2k(rgb, tile_size=(128, 128)), "RGB", 8, JPEG2000Lossless),  # tiled
        (_j2k(grey, precinct_size=(64, 64), codeblock_size=(32, 32)), "MONOCHROME2", 8, JPEG2000Lossless),
        (_j2k(grey16), "MONOCHROME2", 16, JPEG2000Lossless),
        (bytes(jpeg_ls.encode(grey16)), "MONOCHROME2", 16, JPEGLSLossless),
        (bytes(jpeg_ls.encode(rgb)), "RGB", 8, JPEGLSLossless),
    ]
    for frame, photometric, bits, ts in cases:
        d = read_dicom(_encapsulated_dicom(256, 320, ts, frame, photometric, bits))
        assert d.rgb.shape == (256, 320, 3), (ts, photometric)
    # a segment padded by one decoded byte (pydicom drops it) is within the slack allowed
    ds = make_dicom(grey)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    d = read_dicom(_encapsulated_dicom(256, 320, RLELossless, frame + b"\0\0", "MONOCHROME2"))
    assert np.array_equal(d.rgb[..., 0], grey)


def _second_sof(jpeg: bytes) -> bytes:
    """``jpeg`` with a copy of its frame header claiming 4000x4000 inserted before it."""
    i = jpeg.index(b"\xff\xc0")
    n = int.from_bytes(jpeg[i + 2:i + 4], "big")
    return jpeg[:i] + jpeg_declaring(4000, 4000, jpeg[i:i + 2 + n], b"\xff\xc0") + jpeg[i:]


def _siz(cs: bytes) -> bytes:
    """The size marker segment of the JPEG 2000 codestream ``cs`` (it follows the 2-byte SOC)."""
    return cs[2:4 + int.from_bytes(cs[4:6], "big")]


def _after_siz(cs: bytes, segment: bytes) -> bytes:
    """The JPEG 2000 codestream ``cs`` with ``segment`` inserted after its size marker."""
    end = 2 + len(_siz(cs))
    return cs[:end] + segment + cs[end:]


def _jp2(px: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "JPEG2000")  # the JP2 file format, which DICOM does not allow
    return buf.getvalue()


@pytest.mark.parametrize("frame,ts,words", [
    (lambda: _second_sof(_jpeg(colour(64, 64))), JPEGBaseline8Bit, "2 JPEG frame headers"),
    (lambda: _jpeg(colour(64, 64))[:200], JPEGBaseline8Bit, "truncated header"),
    (lambda: _j2k(colour(64, 64)), JPEGBaseline8Bit, "is not JPEG data"),  # Pillow would decode it as JPEG 2000
    (lambda: _jpeg(colour(64, 64)), JPEG2000Lossless, "not a JPEG 2000 codestream"),
    (lambda: _jp2(colour(64, 64)), JPEG2000Lossless, "not a JPEG 2000 codestream"),
    (lambda: _j2k(colour(64, 64), precinct_size=(32, 32)), JPEG2000Lossless, "precincts under 64"),
    (lambda: _after_siz(_j2k(colour(64, 64)), _siz(j2k_declaring(4000, 4000))), JPEG2000Lossless, "two JPEG 2000 size"),
    (lambda: _after_siz(_j2k(colour(64, 64)), b"\xff\x6f\x00\x04ab"), JPEG2000Lossless, "unknown JPEG 2000 marker"),
])
def test_frame_headers_that_cannot_be_trusted_are_refused(no_decoding, frame, ts, words):
    with pytest.raises(ImageLoadError, match=words):
        read_dicom(_encapsulated_dicom(64, 64, ts, frame(), "RGB"))


def test_the_frames_that_will_be_decoded_are_the_ones_checked(no_decoding):
    honest, lie = _jpeg(gradient(64, 64)), jpeg_declaring(8000, 8000, _jpeg(gradient(64, 64), progressive=True))
    mr = _dicom_without_pixels(64, 64, bits=8, frames=3, modality="MR", sop_class=MRImageStorage,
                               ts=JPEGBaseline8Bit, pixel_data=encapsulate([honest, lie, honest]))
    with pytest.raises(ImageLoadError, match="frame 2 .* declares 8000x8000"):  # a volume: the middle frame
        read_dicom(mr)
    wsi = _dicom_without_pixels(64, 64, bits=8, frames=4, modality="SM", sop_class=VL_WSI, ts=JPEGBaseline8Bit,
                                pixel_data=encapsulate([honest, honest, honest, lie]),
                                extra={"DimensionOrganizationType": "TILED_FULL", "TotalPixelMatrixRows": 128,
                                       "TotalPixelMatrixColumns": 128})
    with pytest.raises(ImageLoadError, match="frame 4 .* declares 8000x8000"):  # stitched: every tile
        read_dicom(wsi)


def test_an_encapsulated_syntax_whose_frames_cannot_be_checked_is_refused():
    from pydicom.uid import UID

    with pytest.raises(ImageLoadError, match="cannot be checked before decoding"):
        dicom._frame_check(UID("1.2.840.10008.1.2.4.110"))  # JPEG XL, should a decoder be installed


# ----------------------------------------------------------------------------- the file meta reader
def test_dicom_is_read_without_pydicom_private_file_meta_reader(monkeypatch):
    import pydicom.filereader

    px = gradient(40, 48, np.uint16, 4000)
    plain, deflated = to_bytes(make_dicom(px, bits_allocated=16)), _deflated(make_dicom(px, bits_allocated=16))
    expected = read_dicom(plain).rgb
    metas = [dicom._file_meta(io.BytesIO(data[132:])) for data in (plain, deflated)]
    assert metas[1].TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    monkeypatch.delattr(pydicom.filereader, "_read_file_meta_info")  # as a pydicom upgrade might
    # dcmread (the plain path) calls it too, so the public reader is compared with it, and the deflated path,
    # which needs no dcmread, is read whole
    assert [dicom._file_meta(io.BytesIO(data[132:])) for data in (plain, deflated)] == metas
    d = read_dicom(deflated)
    assert d.transfer_syntax == DeflatedExplicitVRLittleEndian and np.array_equal(d.rgb, expected)
    monkeypatch.setattr(zlib, "decompress", lambda *a, **k: pytest.fail("inflated without a cap"))
    monkeypatch.setattr(dicom, "MAX_INFLATED_BYTES", 1_000)
    with pytest.raises(ImageLoadError, match="deflated and would expand to more than"):
        read_dicom(deflated)


def test_seg_source_is_read_with_the_inflate_cap(monkeypatch):
    data = _deflated(make_dicom(colour(), "RGB"))
    monkeypatch.setattr(zlib, "decompress", lambda *a, **k: pytest.fail("inflated without a cap"))
    assert dicom_seg.mask_to_seg(data, np.ones((40, 48), np.uint8))  # within the cap: read as on upload
    monkeypatch.setattr(dicom, "MAX_INFLATED_BYTES", 1_000)
    with pytest.raises(ImageLoadError, match="deflated and would expand to more than"):
        dicom_seg.mask_to_seg(data, np.ones((40, 48), np.uint8))
