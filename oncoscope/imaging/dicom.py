"""DICOM reading: :func:`read_dicom` decodes a DICOM Part-10 file (bytes with ``DICM`` at offset 128)
to an RGB uint8 array plus the patient / study metadata. :func:`oncoscope.imaging.imageio.load_image`
routes DICOM files here, so every upload path accepts them. Like ``load_image`` it only ever raises
:class:`~oncoscope.imaging.imageio.ImageLoadError`, with a message for the person who supplied the file.

Which frame is used
    * VL whole-slide images stored ``TILED_FULL`` whose total pixel matrix is within the pixel and
      memory limits: the tiles of the first focal plane / optical path are stitched into the whole level.
    * Cross-sectional volumes (modality MR, CT, PT, NM): the middle frame.
    * Everything else (VL microscopy, sparse-tiled slides, cine, secondary capture...): the first frame.

Memory is bounded before anything is decoded: the dataset's declared size, every encapsulated
frame's own header, and a capped inflate for the Deflated transfer syntax (see imageio's docstring).

pydicom is imported inside the functions that use it, so importing this module (and load_image on
non-DICOM files) stays cheap.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import re
import struct
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from .limits import (MAX_DECODE_BYTES, MAX_PIXELS, MIN_SIDE, RGB_BPP, ImageLoadError, check_dimensions, check_memory,
                      check_work_bounds, fill_by_strips, memory_needed)

VOLUME_MODALITIES = ("MR", "CT", "PT", "NM")
_UID_TEXT = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")  # PS3.5 9.1: no leading zero in a component


def is_dicom_uid(value) -> bool:
    """One valid DICOM UID: digits and dots, no leading zero in a component, at most 64 characters.
    (An invalid one may be stored by an earlier version: exports check before reusing it.)"""
    return isinstance(value, str) and len(value) <= 64 and _UID_TEXT.fullmatch(value) is not None


@dataclass(frozen=True)
class DicomImage:
    """A decoded DICOM image (``rgb``) and what it says about itself.

    ``rgb`` is ``None`` in the metadata-only copy kept on :class:`~oncoscope.imaging.imageio.LoadedImage`.
    """

    rgb: np.ndarray | None = field(repr=False, compare=False)
    patient_name: str  # "Family, Given Middle" (DICOM "^" separators turned into the usual form)
    patient_id: str  # several values joined by "\\", as DICOM writes them (no MRN has one)
    birth_date: str | None  # ISO date or None
    sex: str  # DICOM code as stored: "F", "M", "O" or ""
    study_uid: str | None  # UIDs: None when absent, multi-valued or not a valid UID (PS3.5 9.1)
    series_uid: str | None
    sop_instance_uid: str | None
    modality: str
    photometric: str  # Photometric Interpretation as stored in the file
    frame_count: int
    description: str  # Series Description, else Study Description, else ""
    sop_class_uid: str | None = None
    accession_number: str = ""  # the order this study answers (the LIS's accession), "" when not stated
    transfer_syntax: str = ""
    frame_index: int | None = 0  # the frame used; None when the tiles of a whole-slide level were stitched
    window: tuple[float, float] | None = None  # (center, width) applied, if any
    # what the acquisition was, for an analyzer's checks of what it was trained on (empty: not stated)
    body_part: str = ""  # Body Part Examined, upper case
    plane: str = ""  # "axial", "coronal", "sagittal" or "oblique", from Image Orientation (Patient)
    acquisition: str = ""  # Series Description, Image Type, Scanning Sequence, Sequence Name: words to match
    b_value: float | None = None  # Diffusion b-value (diffusion-weighted series)
    # (row spacing, column spacing) in mm of the pixels of ``rgb``: Pixel Spacing, else Imager Pixel Spacing
    # (at the detector: not corrected for magnification); None when absent or not two numbers in (0, 10) mm
    pixel_spacing: tuple[float, float] | None = None

    def without_pixels(self) -> "DicomImage":
        return replace(self, rgb=None)

    @property
    def sex_word(self) -> str:
        """The sex in the vocabulary of :mod:`oncoscope.store.patients`."""
        return {"F": "female", "M": "male", "O": "other"}.get(self.sex, "unknown")


def is_dicom(data: bytes) -> bool:
    """A DICOM Part-10 file: 128-byte preamble then ``DICM``."""
    return len(data) >= 132 and bytes(data[128:132]) == b"DICM"


def _person_name(pn) -> str:
    if pn is None or str(pn) == "":
        return ""
    try:
        family, given, middle = pn.family_name, pn.given_name, pn.middle_name
        prefix, suffix = pn.name_prefix, pn.name_suffix
    except Exception:  # noqa: BLE001 - odd encodings: fall back to the raw text
        return str(pn).replace("^", " ").strip()
    if not (family or given or middle):
        return str(pn).split("=")[0].replace("^", " ").strip()
    first = " ".join(p for p in (prefix, given, middle) if p)
    out = ", ".join(p for p in (family, first) if p)
    return f"{out} {suffix}".strip() if suffix else out


def _iso_date(value) -> str | None:
    s = str(value or "").strip()
    if len(s) == 10 and s[4] == "." and s[7] == ".":  # ACR-NEMA style YYYY.MM.DD
        s = s.replace(".", "")
    try:
        return dt.datetime.strptime(s[:8], "%Y%m%d").date().isoformat() if len(s) >= 8 else None
    except ValueError:
        return None


def _first_number(value) -> float | None:
    """The first value of a possibly multi-valued numeric element (DS/IS/FD), or None."""
    if value is None or isinstance(value, bytes):
        return None
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        value = next(iter(value), None)
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _functional_item(ds, index: int, sequence: str):
    """The item of a functional group macro for frame ``index`` (per-frame first, then shared)."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and len(seq) > i:
            inner = seq[i].get(sequence)
            if inner:
                return inner[0]
    return None


def _rescale(ds, index: int) -> tuple[float, float]:
    src = ds if "RescaleSlope" in ds or "RescaleIntercept" in ds else _functional_item(
        ds, index, "PixelValueTransformationSequence")
    if src is None:
        return 1.0, 0.0
    slope = _first_number(src.get("RescaleSlope"))
    intercept = _first_number(src.get("RescaleIntercept"))
    return (slope if slope not in (None, 0.0) else 1.0), (intercept or 0.0)


def _window(ds, index: int) -> tuple[float, float, str] | None:
    src = ds if "WindowCenter" in ds else _functional_item(ds, index, "FrameVOILUTSequence")
    if src is None:
        return None
    c, w = _first_number(src.get("WindowCenter")), _first_number(src.get("WindowWidth"))
    if c is None or w is None:
        return None
    func = str(src.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if w < 1 or (func == "LINEAR_EXACT" and w <= 0):
        return None
    return c, w, func


def _apply_window(x: np.ndarray, c: float, w: float, func: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1]."""
    if func == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if func == "LINEAR_EXACT":
        return np.clip((x - (c - w / 2.0)) / w, 0.0, 1.0)
    if w <= 1:  # LINEAR with width 1: a threshold at c - 0.5
        return (x > c - 0.5).astype(np.float64)
    return np.clip((x - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)


def _stretch(v: np.ndarray, slope: float = 1.0, intercept: float = 0.0):
    """The 0.5-99.5 percentile stretch of x = v * slope + intercept to [0, 1], as a function of strips of v.
    The percentiles are taken on v as stored (no float copy of the frame): an affine map commutes with them."""
    finite = v[np.isfinite(v)] if v.dtype.kind == "f" else v
    if finite.size == 0:
        return lambda s: np.zeros(s.shape)
    lo, hi = sorted(float(q) * slope + intercept for q in np.percentile(finite, [0.5, 99.5]))
    if hi <= lo:
        lo, hi = sorted(float(q) * slope + intercept for q in (finite.min(), finite.max()))
    if hi <= lo:
        return lambda s: np.full(s.shape, 0.0 if lo <= 0 else 1.0)
    return lambda s: np.clip((np.nan_to_num(s * slope + intercept, nan=lo) - lo) / (hi - lo), 0.0, 1.0)


def _modality(arr: np.ndarray, ds, index: int) -> tuple[np.ndarray, float, float]:
    """(v, slope, intercept) such that the modality values are v * slope + intercept."""
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(arr, ds)), 1.0, 0.0
    return (arr, *_rescale(ds, index))


def _grey_unit(arr: np.ndarray, ds, index: int):
    """(v, f, window used): f maps strips of v to [0, 1] by the modality LUT (rescale) then the VOI
    (window, VOI LUT or stretch)."""
    if arr.dtype.kind == "f":  # Float / Double Float Pixel Data: no LUTs apply
        return arr, _stretch(arr), None
    v, slope, intercept = _modality(arr, ds, index)
    win = _window(ds, index)
    if win is not None:
        return v, lambda s: _apply_window(s * slope + intercept, *win), (win[0], win[1])
    if "VOILUTSequence" in ds:
        from pydicom.pixels import apply_voi

        top = float(2 ** (int(ds.VOILUTSequence[0].LUTDescriptor[2]) or 16) - 1)
        # input: the modality LUT output
        return v, lambda s: np.clip(np.asarray(apply_voi(np.rint(s * slope + intercept).astype(np.int64), ds,
                                                         index=0), dtype=np.float64) / top, 0.0, 1.0), None
    if int(ds.get("BitsStored", 8) or 8) <= 8 and (slope, intercept) == (1.0, 0.0) \
            and "ModalityLUTSequence" not in ds and v.size and v.min() >= 0 and v.max() <= 255:
        return v, lambda s: s / 255.0, None  # 8-bit greyscale: taken as is, not stretched
    return v, _stretch(v, slope, intercept), None


def _grey_to_rgb(arr: np.ndarray, ds, index: int, photometric: str) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Modality LUT (rescale), VOI (window or stretch) and MONOCHROME1 inversion -> RGB uint8."""
    v, unit, used = _grey_unit(arr, ds, index)

    def grey(rows: slice) -> np.ndarray:
        g = np.rint(unit(v[rows]) * 255.0).astype(np.uint8)
        return (255 - g if photometric == "MONOCHROME1" else g)[..., None]  # MONOCHROME1: low values are white

    return fill_by_strips(np.empty(arr.shape + (3,), np.uint8), grey), used


def _colour_strip(ds, photometric: str):
    """A function converting a strip of decoded colour samples to RGB uint8."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        def palette(s: np.ndarray) -> np.ndarray:
            rgb = np.asarray(apply_color_lut(s, ds))
            if rgb.dtype.itemsize > 1:  # 16-bit LUT entries
                rgb = np.rint(rgb.astype(np.float64) / 257.0)
            return np.clip(rgb, 0, 255).astype(np.uint8)

        return palette
    top = float(2 ** int(ds.get("BitsStored", 16) or 16) - 1)

    def colour(s: np.ndarray) -> np.ndarray:
        if photometric in ("YBR_FULL", "YBR_FULL_422"):  # left to us: pydicom's whole-frame conversion is costly
            from pydicom.pixels import convert_color_space

            s = convert_color_space(s, photometric, "RGB")
        if s.dtype.itemsize > 1 or s.dtype.kind == "f":
            return np.clip(np.rint(s.astype(np.float64) / top * 255.0), 0, 255).astype(np.uint8)
        return s

    return colour


def _colour_to_rgb(arr: np.ndarray, ds, photometric: str) -> np.ndarray:
    if photometric != "PALETTE COLOR" and (arr.ndim != 3 or arr.shape[-1] != 3):
        raise ImageLoadError(f"The DICOM image has an unexpected shape {tuple(arr.shape)} for {photometric}.")
    if photometric in ("RGB", "YBR_ICT", "YBR_RCT") and arr.dtype == np.uint8:
        return arr
    convert = _colour_strip(ds, photometric)
    return fill_by_strips(np.empty(arr.shape[:2] + (3,), np.uint8), lambda rows: convert(arr[rows]))


_GREY = ("MONOCHROME1", "MONOCHROME2")
_RGB_LIKE = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")


def tiled_full(ds) -> tuple[int, int] | None:
    """(total rows, total columns) when ``ds`` is a TILED_FULL whole-slide level, else None."""
    if str(ds.get("DimensionOrganizationType", "")).upper() != "TILED_FULL":
        return None
    r, c = ds.get("TotalPixelMatrixRows"), ds.get("TotalPixelMatrixColumns")
    if not r or not c:
        return None
    return int(r), int(c)


# A Deflated body is inflated at most this far: pydicom inflates all of it before anything can be checked
# (a 0.5 MB file took 1 GB). The inflated dataset is held twice while it is inflated, then parsed.
MAX_INFLATED_BYTES = 64_000_000


def _opened(data: bytes):
    """(dataset, metadata, pixel keyword) of a Part-10 file that holds an image, or ImageLoadError."""
    data = bytes(data)
    if not is_dicom(data):
        raise ImageLoadError("The file is not a DICOM file (no 'DICM' marker at byte 128).")
    ds = parse_dataset(data)
    try:
        meta = _metadata(ds)
    except Exception:  # noqa: BLE001 - malformed values surface lazily
        raise ImageLoadError("The DICOM file is corrupt: its header cannot be read.") from None
    return ds, meta, _pixel_keyword(ds, meta)


def read_dicom(data: bytes, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE,
               max_bytes: int = MAX_DECODE_BYTES) -> DicomImage:
    """Decode a DICOM Part-10 file to RGB uint8 plus metadata. Raises only :class:`ImageLoadError`.

    The transfer syntax, the declared dimensions and the memory they imply are checked before any pixel
    data is decoded (see :mod:`oncoscope.imaging.imageio`)."""
    from pydicom.uid import UID

    ds, meta, pixel_kw = _opened(data)
    rows, cols, samples, photometric, frames, bits = _geometry(ds)
    check_dimensions(cols, rows, max_pixels, 0)
    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "") or "1.2.840.10008.1.2"))
    decoder = _decoder(ts)
    bpp = _decode_bpp(ts, samples, bits)
    held = len(ds[pixel_kw].value) if isinstance(ds[pixel_kw].value, bytes) else 0
    tiled = tiled_full(ds) if frames > 1 else None
    if tiled and (tiled[0] * tiled[1] > max_pixels or memory_needed(tiled[0] * tiled[1], bpp, held) > max_bytes):
        tiled = None  # the whole level is too large: fall back to the first tile
    out_rows, out_cols = tiled if tiled else (rows, cols)
    check_dimensions(out_cols, out_rows, max_pixels, min_side)
    check_memory(out_cols, out_rows, bpp, f"DICOM {photometric}, {samples} x {bits}-bit samples", max_bytes=max_bytes,
                 extra=held)
    if tiled:
        index = None
    elif frames > 1 and meta["modality"] in VOLUME_MODALITIES:
        index = frames // 2
    else:
        index = 0
    if ts.is_encapsulated:
        _check_frames(ds, ts, index, _grid(rows, cols, tiled), (rows, cols, samples, bits))
    arr, out_pi = _decode(decoder, ds, ts, index, pixel_kw, (rows, cols, frames, tiled))
    rgb, window = _to_rgb(arr, ds, index or 0, photometric, samples, out_pi)
    meta.update(_acquisition(ds, index or 0))
    # the pixels are read at their native size (a stitched whole-slide level too), so the spacing applies as is
    meta["pixel_spacing"] = _pixel_spacing(ds, index or 0)
    return DicomImage(rgb=rgb, photometric=photometric, frame_count=frames, frame_index=index,
                      transfer_syntax=str(ts), window=window, **meta)


@dataclass(frozen=True)
class DicomHeader:
    """What a received single-frame DICOM image says about itself, read without decoding its pixels
    (``read_header``): the metadata of :class:`DicomImage` (``image``, ``rgb`` None) and its size."""

    image: DicomImage
    width: int
    height: int


def read_header(data: bytes, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> DicomHeader | None:
    """The checks and metadata of :func:`read_dicom` without decoding the pixels: for an uncompressed
    single-frame image, whose pixel data can be checked by its length alone (the DICOM receiver files
    each instance in a few milliseconds; the analysis decodes it). ``None`` when the image is not of that
    kind (multi-frame, compressed, whole-slide): the caller decodes it with :func:`read_dicom`. Raises
    :class:`ImageLoadError` on what :func:`read_dicom` would refuse before decoding."""
    from pydicom.uid import UID

    ds, meta, pixel_kw = _opened(data)
    rows, cols, samples, photometric, frames, bits = _geometry(ds)
    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "") or "1.2.840.10008.1.2"))
    plain = {"MONOCHROME1": 1, "MONOCHROME2": 1, "RGB": 3}
    if (frames != 1 or ts.is_encapsulated or pixel_kw != "PixelData" or plain.get(photometric) != samples
            or bits not in (8, 16)):
        return None  # anything unusual: the full decoder checks it
    check_dimensions(cols, rows, max_pixels, min_side)
    if len(ds.PixelData) < rows * cols * samples * (bits // 8):
        raise ImageLoadError("The DICOM file is corrupt or truncated: its pixel data is shorter than its "
                             f"{cols}x{rows} image.")
    meta.update(_acquisition(ds, 0))
    meta["pixel_spacing"] = _pixel_spacing(ds, 0)
    image = DicomImage(rgb=None, photometric=photometric, frame_count=1, frame_index=0, transfer_syntax=str(ts),
                       **meta)
    return DicomHeader(image, cols, rows)


def _decode_bpp(ts, samples: int, bits: int) -> float:
    """Bytes per pixel alive at once while a frame is decoded, then converted (measured). Decoding: a native frame
    is held once; an RLE, JPEG or JPEG-LS one about four times; JPEG 2000 costs openjpeg ~10 bytes a sample (its
    32-bit samples, code-blocks and precincts) besides Pillow's image and pydicom's frame. Converting: the frame,
    the modality LUT output and the sorted copy of the percentiles (greyscale) and the RGB result."""
    from pydicom.uid import JPEG2000TransferSyntaxes

    frame = samples * max(1, -(-bits // 8))
    if ts in JPEG2000TransferSyntaxes:
        decode = samples * 10 + (4 if samples == 3 else frame) + frame  # Pillow keeps RGB in 4 bytes
    else:
        decode = frame * (4 if ts.is_encapsulated else 1)
    return max(decode, frame * (3 if samples == 1 else 1) + RGB_BPP)


def parse_dataset(data: bytes):
    """The parsed file, pixel data included (damage there surfaces here), a Deflated body inflated with a cap."""
    import pydicom
    from pydicom.dataset import FileDataset
    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fp = io.BytesIO(data)
            preamble = read_preamble(fp, False)
            file_meta = _file_meta(fp)
            if file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
                body = read_dataset(io.BytesIO(_inflate(data[fp.tell():])), is_implicit_VR=False,
                                    is_little_endian=True)
                ds = FileDataset(fp, body, preamble, file_meta, is_implicit_VR=False, is_little_endian=True)
            else:
                ds = pydicom.dcmread(io.BytesIO(data), force=False)
            ds.get("PixelData")  # converts the raw element now, so damage there surfaces here
    except ImageLoadError:
        raise
    except Exception:  # noqa: BLE001 - pydicom raises many types for bad data
        raise ImageLoadError("The DICOM file is corrupt or truncated (an incomplete copy?). Export it again from the PACS.") from None
    return ds


def _file_meta(fp):
    """The File Meta group at ``fp``, which tells whether the body is deflated: read with what dcmread reads it
    with (its public twin takes only paths), or, should a pydicom upgrade drop that private function, the way it
    reads it: the public read_dataset, Explicit VR Little Endian, up to the first element outside group 2."""
    from pydicom import filereader
    from pydicom.dataset import FileMetaDataset

    private = getattr(filereader, "_read_file_meta_info", None)
    if private is not None:
        return private(fp)
    return FileMetaDataset(filereader.read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                                                   stop_when=lambda tag, vr, length: tag.group != 2))


def _inflate(body: bytes, limit: int | None = None) -> bytes:
    import zlib

    limit = MAX_INFLATED_BYTES if limit is None else limit
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)  # never more than limit + 1 bytes in memory
    except zlib.error:
        raise ImageLoadError("The DICOM file is corrupt: its deflated data cannot be inflated.") from None
    if len(out) > limit:
        raise ImageLoadError(f"The DICOM file is deflated and would expand to more than {limit / 1e6:.0f} MB. "
                             "Export it uncompressed or with an image compression (JPEG, JPEG-LS, RLE) and "
                             "upload it again.")
    if not inflater.eof:
        raise ImageLoadError("The DICOM file is corrupt or truncated: its deflated data ends early.")
    return out


def _pixel_keyword(ds, meta: dict) -> str:
    from pydicom.uid import UID

    pixel_kw = next((k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
    if pixel_kw is None:
        kind = UID(meta["sop_class_uid"]).name if meta["sop_class_uid"] else ""
        if kind and kind != meta["sop_class_uid"]:
            what = f"it is a {kind.removesuffix(' Storage')} object"
        else:
            what = f"modality {meta['modality']}, no pixel data" if meta["modality"] else "no pixel data"
        raise ImageLoadError(f"The DICOM file contains no image ({what}); upload a DICOM image instead.")
    return pixel_kw


def _geometry(ds) -> tuple[int, int, int, str, int, int]:
    """(rows, columns, samples per pixel, photometric interpretation, frames, bits allocated), validated."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        photometric = str(ds.PhotometricInterpretation).strip().upper()
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.get("BitsAllocated", 8) or 8)
    except Exception:  # noqa: BLE001 - missing or unreadable Image Pixel attributes
        raise ImageLoadError("The DICOM image is missing required attributes (Rows, Columns, "
                             "Photometric Interpretation).") from None
    if rows <= 0 or cols <= 0 or frames <= 0 or samples not in (1, 3) or not 1 <= bits <= 64:
        raise ImageLoadError(f"The DICOM image has invalid dimensions ({cols}x{rows}, {frames} frame(s), "
                             f"{samples} sample(s) of {bits} bits per pixel).")
    if photometric not in _GREY + _RGB_LIKE:
        raise ImageLoadError(f"The DICOM photometric interpretation {photometric!r} is not supported.")
    return rows, cols, samples, photometric, frames, bits


def _ts_text(ts) -> str:
    return f"{ts.name} ({ts})" if ts.name != str(ts) else str(ts)


def _decoder(ts):
    try:
        from pydicom.pixels import get_decoder

        decoder = get_decoder(ts)
    except Exception:  # noqa: BLE001 - NotImplementedError for unknown UIDs
        raise ImageLoadError(f"The DICOM file uses the transfer syntax {_ts_text(ts)}, which is not supported. "
                             "Export it uncompressed (or as JPEG/PNG) and upload it again.") from None
    if not decoder.is_available:
        raise ImageLoadError(f"The DICOM file is compressed with {_ts_text(ts)}, which cannot be decoded here. "
                             "Export it uncompressed (or as JPEG/PNG) and upload it again.")
    return decoder


# ----------------------------------------------------------------------------- encapsulated frames
# The codecs trust a frame's own header, not the dataset: Pillow decodes a JPEG or JPEG 2000 frame at the size
# its SOF or SIZ marker gives (pydicom compares it with Rows and Columns only afterwards: a 1.5 kB file declaring
# 512x512 whose JPEG claimed 8000x8000 took 639 MB), CharLS does the same for JPEG-LS, and an RLE segment expands
# as far as its runs say. So the header of every frame to be decoded is read first and must match the dataset.
MAX_J2K_TILES = 1024  # openjpeg allocates ~12 kB a tile before decoding: 175 bytes declaring 62 500 tiles took 755 MB
# log2 of the smallest JPEG 2000 code-block side, and precinct side in full-size pixels, accepted: openjpeg allocates
# ~420 bytes a code-block and more a precinct, so a 2000x2000 RGB frame of 4x4 code-blocks took 400 MB (100 bytes a
# pixel), one of 32x32 precincts 18 bytes a pixel. Encoders default to 64x64 code-blocks and whole-image precincts.
_J2K_MIN_CODEBLOCK, _J2K_MIN_PRECINCT = 5, 6
_J2K_MARKERS = frozenset((0xFF50, 0xFF51, 0xFF52, 0xFF53, 0xFF55, 0xFF57, 0xFF58, 0xFF59, 0xFF5C, 0xFF5D, 0xFF5E,
                          0xFF5F, 0xFF60, 0xFF61, 0xFF63, 0xFF64, 0xFF74, 0xFF75, 0xFF77, 0xFF78, 0xFF90))
# JPEG start-of-frame markers (T.81 B.1.1.3; C4, C8 and CC are other markers) and JPEG-LS SOF55 (F7)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_JPEG_NO_LENGTH = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM


class _BadFrame(Exception):
    """A frame header that cannot be read or is refused; ``str()`` completes "its frame ..."."""


def _check_frames(ds, ts, index: int | None, grid: tuple[int, int], declared: tuple[int, int, int, int]) -> None:
    """Refuse, before decoding, an encapsulated frame whose header disagrees with ``declared`` (rows, columns,
    samples, bits allocated): every frame the decoder will be given, found as pydicom's decoder finds them."""
    from itertools import islice

    from pydicom.encaps import generate_frames, get_frame
    from pydicom.pixels.decoders.base import DecodeRunner

    problem_in = _frame_check(ts)
    try:
        runner = DecodeRunner(ts)
        runner.set_source(ds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runner.validate()
        where = {"number_of_frames": runner.number_of_frames, "extended_offsets": runner.extended_offsets}
        frames = (enumerate(islice(generate_frames(runner.src, **where), grid[0] * grid[1])) if index is None
                  else [(index, get_frame(runner.src, index, **where))])
        for n, frame in frames:
            problem = problem_in(frame, *declared)
            if problem:
                rows, cols, samples, bits = declared
                raise ImageLoadError(
                    f"The DICOM file declares {cols}x{rows} pixels of {samples} x {bits}-bit samples, but its frame "
                    f"{n + 1} ({_ts_text(ts)}) {problem}. The file is damaged or was altered; export it again from "
                    "the PACS.")
    except ImageLoadError:
        raise
    except Exception:  # noqa: BLE001 - pydicom's frame lookup on damaged offsets and fragments
        raise _undecodable(ts) from None


def _frame_check(ts):
    """The function naming what is wrong with a frame of ``ts`` (None: nothing). Syntaxes whose frames we cannot
    read are refused: their decoder could allocate anything."""
    from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes, RLELossless

    if ts in JPEGTransferSyntaxes or ts in JPEGLSTransferSyntaxes:
        return lambda frame, *declared: _header_problem(_jpeg_header, frame, *declared)
    if ts in JPEG2000TransferSyntaxes:
        return lambda frame, *declared: _header_problem(_j2k_header, frame, *declared)
    if ts == RLELossless:
        return _rle_problem
    raise ImageLoadError(f"The DICOM file is compressed with {_ts_text(ts)}, whose frames cannot be checked "
                         "before decoding here. Export it uncompressed (or as JPEG/PNG) and upload it again.")


def _header_problem(read, frame: bytes, rows: int, cols: int, samples: int, bits: int) -> str | None:
    """What a JPEG-family frame header says, when that is not what the dataset declares: another size, sample
    count, or samples wider than Bits Allocated (a narrower one decodes to less)."""
    try:
        width, height, components, precision = read(frame)
    except _BadFrame as exc:
        return str(exc)
    except (struct.error, IndexError):
        return "has a truncated header"
    if (width, height, components) != (cols, rows, samples) or -(-precision // 8) > -(-bits // 8):
        return f"declares {width}x{height} pixels of {components} x {precision}-bit samples"
    return None


def _jpeg_header(frame: bytes) -> tuple[int, int, int, int]:
    """(width, height, components, precision) of a JPEG or JPEG-LS frame. The segments are walked up to the first
    scan, as libjpeg and CharLS walk them; exactly one start-of-frame is allowed (with two, Pillow would size its
    image from the last and libjpeg decode the first)."""
    check_work_bounds(frame)  # thousands of progressive scans: minutes of decoding
    if frame[:2] != b"\xff\xd8":
        raise _BadFrame("is not JPEG data")
    sofs, pos = [], 2
    while True:
        if frame[pos] != 0xFF:
            raise _BadFrame("has a damaged JPEG header")
        code = frame[pos + 1]
        if code in (0xDA, 0xD9):  # start of scan, end of image
            break
        if code == 0xFF or code in _JPEG_NO_LENGTH:  # fill byte, or a marker without a length
            pos += 1 if code == 0xFF else 2
            continue
        length = int.from_bytes(frame[pos + 2:pos + 4], "big")
        if code in _JPEG_SOF:
            sofs.append(frame[pos + 4:pos + 2 + length])
        elif code == 0xF8 and frame[pos + 4] == 4:  # JPEG-LS LSE type 4: a size beyond the SOF's 16 bits
            raise _BadFrame("declares its size outside its frame header")
        pos += 2 + max(length, 2)
    if len(sofs) != 1:
        raise _BadFrame(f"has {len(sofs)} JPEG frame headers, not one")
    precision, height, width, components = struct.unpack_from(">BHHB", sofs[0])
    return width, height, components, precision


def _j2k_header(frame: bytes) -> tuple[int, int, int, int]:
    """(width, height, components, widest precision) of a JPEG 2000 codestream (SIZ), after checking the tile
    grid and the code-block and precinct sizes (COD, COC) of the main and every tile-part header: they set how
    many structures openjpeg allocates."""
    if frame[:4] != b"\xff\x4f\xff\x51":
        raise _BadFrame("is not a JPEG 2000 codestream")
    segments = _j2k_segments(frame)
    _, siz = next(segments)
    x1, y1, x0, y0, tw, th, tx0, ty0, csiz = struct.unpack_from(">8IH", siz, 2)
    if not (tw and th and x1 > x0 and y1 > y0 and tx0 <= x0 and ty0 <= y0):
        raise _BadFrame("has a damaged JPEG 2000 size marker")
    if math.ceil((x1 - tx0) / tw) * math.ceil((y1 - ty0) / th) > MAX_J2K_TILES:
        raise _BadFrame(f"is cut into more than {MAX_J2K_TILES} tiles")
    for marker, body in segments:
        if marker == 0xFF51:
            raise _BadFrame("has two JPEG 2000 size markers")
        if marker in (0xFF52, 0xFF53):  # COD: Scod, 4 bytes, SPcod; COC: Ccoc (1 or 2 bytes), Scoc, SPcoc
            at = 0 if marker == 0xFF52 else 1 + (csiz > 256)
            _check_j2k_coding(body[at], body[at + (5 if marker == 0xFF52 else 1):])
    precision = max(((siz[36 + 3 * c] & 0x7F) + 1 for c in range(csiz)), default=0)  # Ssiz: depth - 1
    return x1 - x0, y1 - y0, csiz, precision


def _j2k_segments(cs: bytes):
    """(marker, body) of the segments of the main header and of every tile-part header. Tile data is skipped by
    its tile-part's length (Psot), as openjpeg skips it; an unknown marker is refused, since openjpeg searches
    past it for a known one and could find a header we did not read."""
    pos, tile_part = 2, None
    while pos + 2 <= len(cs):
        marker = int.from_bytes(cs[pos:pos + 2], "big")
        if marker == 0xFFD9:  # end of codestream
            return
        if marker == 0xFF93:  # start of data: the tile-part ends Psot bytes after its SOT (0: at the end)
            if tile_part is None:
                raise _BadFrame("has a damaged JPEG 2000 tile-part")
            start, psot = tile_part
            if not psot:
                return
            pos, tile_part = start + psot, None
            continue
        if marker not in _J2K_MARKERS:
            raise _BadFrame(f"has an unknown JPEG 2000 marker {marker:04X}")
        length = int.from_bytes(cs[pos + 2:pos + 4], "big")
        body = cs[pos + 4:pos + 2 + length]
        if marker == 0xFF90:  # SOT: Isot (2), Psot (4), TPsot, TNsot
            psot = struct.unpack_from(">I", body, 2)[0]
            if psot and (psot < 14 or pos + psot > len(cs)):
                raise _BadFrame("has a damaged JPEG 2000 tile-part length")
            tile_part = (pos, psot)
        yield marker, body
        pos += 2 + max(length, 2)


def _check_j2k_coding(style: int, sp: bytes) -> None:
    """SPcod / SPcoc: decomposition levels, code-block width and height exponents (- 2), style, transform, then
    when bit 0 of ``style`` is set one precinct size byte per resolution, lowest first (log2 width in the low
    nibble). A precinct of resolution r spans 2^(levels - r) full-size pixels per pixel of its own: encoders
    halve precincts at each lower resolution, which keeps their count per resolution, and their cost, the same."""
    levels, xcb, ycb = sp[0], sp[1] + 2, sp[2] + 2
    precincts = sp[5:6 + levels] if style & 1 else b""
    if style & 1 and len(precincts) != levels + 1:
        raise _BadFrame("has a truncated JPEG 2000 coding style")
    if min(xcb, ycb) < _J2K_MIN_CODEBLOCK or any(
            min(p & 15, p >> 4) + levels - r < _J2K_MIN_PRECINCT for r, p in enumerate(precincts)):
        raise _BadFrame(f"uses JPEG 2000 code-blocks under {1 << _J2K_MIN_CODEBLOCK} or precincts under "
                        f"{1 << _J2K_MIN_PRECINCT} pixels, which take far more memory to decode than the image")


def _rle_problem(frame: bytes, rows: int, cols: int, samples: int, bits: int) -> str | None:
    """RLE frames state no size: each segment must not expand past Rows x Columns bytes (plus a byte a row of the
    padding pydicom tolerates), which pydicom finds out only after expanding it, up to 64 times its length."""
    if len(frame) < 64 or not 1 <= int.from_bytes(frame[:4], "little") <= 15:
        return "has a damaged RLE header"
    count = int.from_bytes(frame[:4], "little")
    bounds = [*struct.unpack_from(f"<{count}I", frame, 4), len(frame)]
    limit = rows * (cols + 1) + 1
    for k in range(count):  # the slices pydicom decodes
        if _packbits_length(frame[bounds[k]:bounds[k + 1]], limit) > limit:
            return f"holds an RLE segment that expands past {cols}x{rows} pixels"
    return None


def _packbits_length(segment: bytes, limit: int) -> int:
    """How many bytes the PackBits ``segment`` expands to, counting no further than past ``limit`` (0 when it
    is too short to get there)."""
    if 64 * len(segment) <= limit:  # a run of 2 bytes expands to at most 128
        return 0
    n = pos = 0
    end = len(segment)
    while pos < end and n <= limit:
        h = segment[pos]
        if h < 128:  # h + 1 literal bytes
            n, pos = n + h + 1, pos + h + 2
        elif h > 128:  # the next byte, 257 - h times
            n, pos = n + 257 - h, pos + 2
        else:  # no-op
            pos += 1
    return n


def _decode(decoder, ds, ts, index: int | None, pixel_kw: str, layout: tuple) -> tuple[np.ndarray, str]:
    """(the frame ``index``, or the stitched level, as decoded samples; its photometric interpretation)."""
    rows, cols, frames, tiled = layout
    opts = {"as_rgb": False}  # colour conversion happens by strips in _to_rgb: pydicom's took ~27 bytes per pixel
    if pixel_kw != "PixelData":
        opts["pixel_keyword"] = pixel_kw
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if tiled:
                return _stitch(decoder, ds, rows, cols, frames, tiled, opts)
            arr, info = decoder.as_array(ds, index=index, **opts)
            return arr, str(info.get("photometric_interpretation", ds.PhotometricInterpretation)).upper()
    except ImageLoadError:
        raise
    except MemoryError:
        raise ImageLoadError("The DICOM image is too large to decode.") from None
    except Exception:  # noqa: BLE001 - codec and length errors
        raise _undecodable(ts) from None


def _undecodable(ts) -> ImageLoadError:
    if ts.is_compressed:
        return ImageLoadError(f"The DICOM image data could not be decoded ({_ts_text(ts)}): the data is corrupt "
                              "or uses an unsupported variant of that compression.")
    return ImageLoadError("The DICOM pixel data is corrupt or truncated (an incomplete copy?). Export it again "
                          "from the PACS.")


def _to_rgb(arr, ds, index: int, photometric: str, samples: int, out_pi: str):
    """(RGB uint8 array, window used) from the decoded samples."""
    try:
        arr = np.asarray(arr)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if photometric in _GREY and samples == 1:
            if arr.ndim != 2:
                raise ImageLoadError(f"The DICOM image has an unexpected shape {tuple(arr.shape)} for {photometric}.")
            return _grey_to_rgb(arr, ds, index, photometric)
        if photometric in _GREY:
            raise ImageLoadError(f"The DICOM image is {photometric} with {samples} samples per pixel.")
        return np.ascontiguousarray(_colour_to_rgb(arr, ds, out_pi if out_pi in _RGB_LIKE else photometric)), None
    except ImageLoadError:
        raise
    except Exception:  # noqa: BLE001 - bad LUTs and the like
        raise ImageLoadError("The DICOM image's colour format is not supported.") from None


def _grid(rows: int, cols: int, total: tuple[int, int] | None) -> tuple[int, int]:
    """(tiles across, tiles down) of a stitched level of ``total`` (rows, columns); (1, 1) for one frame."""
    return (math.ceil(total[1] / cols), math.ceil(total[0] / rows)) if total else (1, 1)


def _stitch(decoder, ds, rows: int, cols: int, frames: int, total: tuple[int, int], opts: dict):
    t_rows, t_cols = total
    across, down = _grid(rows, cols, total)
    if across * down > frames:
        raise ImageLoadError(f"The whole-slide image is inconsistent: {across * down} tiles are needed "
                             f"but it holds {frames} frames.")
    out, out_pi = None, None
    for k, (tile, info) in enumerate(decoder.iter_array(ds, **opts)):
        if k >= across * down:
            break
        if out is None:
            out = np.zeros((down * rows, across * cols) + tile.shape[2:], dtype=tile.dtype)
            out_pi = str(info.get("photometric_interpretation", ds.PhotometricInterpretation)).upper()
        r, c = divmod(k, across)
        out[r * rows:(r + 1) * rows, c * cols:(c + 1) * cols] = tile
    return out[:t_rows, :t_cols], out_pi


def _values(ds, keyword: str) -> list:
    """The values of an element, none when it is absent (``str()`` of a multi-valued one is a Python list)."""
    from pydicom.multival import MultiValue

    value = ds.get(keyword)
    return [] if value is None else list(value) if isinstance(value, MultiValue) else [value]


def _metadata(ds) -> dict:
    def one(keyword: str):
        values = _values(ds, keyword)
        return values[0] if len(values) == 1 else None

    def uid(keyword: str) -> str | None:  # one valid UID or None: exports then make their own
        value = str(one(keyword) or "").replace("\0", "").strip()  # NUL pads a UID; stored identifiers drop it
        return value if is_dicom_uid(value) else None

    names = _values(ds, "PatientName")
    return {
        "patient_name": _person_name(names[0] if names else None),
        "patient_id": _text(ds, "PatientID"),  # "A\\B": the MRN rule refuses it with its message, and says why
        "birth_date": _iso_date(one("PatientBirthDate")),
        "sex": _text(ds, "PatientSex").upper(),
        "study_uid": uid("StudyInstanceUID"),
        "series_uid": uid("SeriesInstanceUID"),
        "sop_instance_uid": uid("SOPInstanceUID"),
        "sop_class_uid": uid("SOPClassUID"),
        "modality": _text(ds, "Modality").upper(),
        "description": _text(ds, "SeriesDescription") or _text(ds, "StudyDescription"),
        "accession_number": _text(ds, "AccessionNumber")[:64],
    }


def _acquisition(ds, index: int) -> dict:
    """What the file says it shows, for the frame analysed: body part, slice plane, the words of its
    series description, image type and sequence, and a diffusion b-value. Optional facts: a value
    that cannot be read is left out (empty), never an error that refuses the file."""
    out = {"body_part": "", "plane": "", "acquisition": "", "b_value": None}
    for key, read in (("body_part", lambda: _text(ds, "BodyPartExamined").upper()),
                      ("plane", lambda: _plane(ds, index)),
                      ("acquisition", lambda: " ".join(t for k in ("SeriesDescription", "ImageType", "ScanningSequence",
                                                                  "SequenceName") if (t := _text(ds, k)))),
                      ("b_value", lambda: _b_value(ds, index))):
        try:
            out[key] = read()
        except Exception:  # noqa: BLE001 - a malformed optional value
            pass
    return out


MAX_PIXEL_SPACING_MM = 10.0  # a larger spacing is no image anyone measures on: a unit or encoding error


def _pixel_spacing(ds, index: int = 0) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm: Pixel Spacing of the file, else of the frame's functional groups
    (enhanced MR / CT, whole-slide images), else Imager Pixel Spacing (projection radiographs, measured at the
    detector). None when absent, or not two finite numbers above 0 and under 10 mm: a distance is then shown
    in pixels, never in millimetres made up from a wrong value."""
    def per_frame() -> list:
        item = _functional_item(ds, index, "PixelMeasuresSequence")
        return _values(item, "PixelSpacing") if item is not None else []

    for read in (lambda: _values(ds, "PixelSpacing"), per_frame, lambda: _values(ds, "ImagerPixelSpacing")):
        try:
            values = read()
        except Exception:  # noqa: BLE001 - a malformed optional value
            continue
        if not values:
            continue
        try:
            pair = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            return None
        ok = len(pair) == 2 and all(math.isfinite(v) and 0 < v < MAX_PIXEL_SPACING_MM for v in pair)
        return pair if ok else None  # the first stated value decides: a wrong one is not replaced by another
    return None


def _text(ds, keyword: str) -> str:
    """An element's values joined as DICOM writes them ("" when absent)."""
    return "\\".join(str(v).strip() for v in _values(ds, keyword)).strip()


def _b_value(ds, index: int) -> float | None:
    """The diffusion b-value: the file's own, or the analysed frame's (enhanced MR functional groups)."""
    value = _first_number(ds.get("DiffusionBValue"))
    if value is None:
        item = _functional_item(ds, index, "MRDiffusionSequence")
        value = _first_number(item.get("DiffusionBValue")) if item is not None else None
    return value


OBLIQUE_COS = 0.906  # cos 25 degrees: a slice tilted more than this from every body plane is oblique


def _plane(ds, index: int = 0) -> str:
    """The body plane of the slice (of frame ``index``), from its row and column directions: the axis
    of the slice normal; "" when the file does not say or says nonsense."""
    iop = _values(ds, "ImageOrientationPatient")
    if len(iop) != 6:
        item = _functional_item(ds, index, "PlaneOrientationSequence")
        iop = _values(item, "ImageOrientationPatient") if item is not None else []
    try:
        v = np.array([float(x) for x in iop], np.float64)
    except (TypeError, ValueError):
        return ""
    if v.size != 6 or not np.isfinite(v).all():
        return ""
    normal = np.cross(v[:3], v[3:])
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        return ""
    n = np.abs(normal) / length
    axis = int(np.argmax(n))
    return ("sagittal", "coronal", "axial")[axis] if n[axis] >= OBLIQUE_COS else "oblique"


# ============================================================================= shared output helpers
