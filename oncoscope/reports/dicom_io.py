"""DICOM in and out.

Input
    :func:`read_dicom` decodes a DICOM Part-10 file (bytes with ``DICM`` at offset 128) to an RGB uint8
    array plus the patient / study metadata. :func:`oncoscope.ml.imageio.load_image` routes DICOM files
    here, so every upload path accepts them. Like ``load_image`` it only ever raises
    :class:`~oncoscope.ml.imageio.ImageLoadError`, with a message for the person who supplied the file.

    Which frame is used
        * VL whole-slide images stored ``TILED_FULL`` whose total pixel matrix is within the pixel limit:
          the tiles of the first focal plane / optical path are stitched into the whole level.
        * Cross-sectional volumes (modality MR, CT, PT, NM): the middle frame.
        * Everything else (VL microscopy, sparse-tiled slides, cine, secondary capture...): the first frame.

Output
    :func:`case_to_sr` writes a signed case as a DICOM Comprehensive SR (SOP class
    1.2.840.10008.5.1.4.1.1.88.33). :func:`mask_to_seg` writes a cell mask as a binary DICOM
    Segmentation referencing the DICOM source, or, for a non-DICOM source, a Secondary Capture made
    by :func:`rgb_to_secondary_capture` (deterministic UIDs, so the SC can be regenerated and sent
    alongside the SEG).

pydicom and highdicom are imported inside the functions that use them, so importing this module
(and load_image on non-DICOM files) stays cheap.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import math
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from ..ml.imageio import MAX_PIXELS, MIN_SIDE, ImageLoadError

# Root of the deterministic UIDs below (pydicom's generate_uid hashes these entropy sources).
_UID_NS = "oncoscope"
_PRIVATE_SCHEME = "99ONCOSCOPE"
VOLUME_MODALITIES = ("MR", "CT", "PT", "NM")
SEG_LABEL = "White blood cell"
COMPREHENSIVE_SR_UID = "1.2.840.10008.5.1.4.1.1.88.33"


class DicomExportError(ValueError):
    """The object cannot be exported to DICOM (e.g. the case is not signed)."""


# ============================================================================= input
@dataclass(frozen=True)
class DicomImage:
    """A decoded DICOM image (``rgb``) and what it says about itself.

    ``rgb`` is ``None`` in the metadata-only copy kept on :class:`~oncoscope.ml.imageio.LoadedImage`.
    """

    rgb: np.ndarray | None = field(repr=False, compare=False)
    patient_name: str  # "Family, Given Middle" (DICOM "^" separators turned into the usual form)
    patient_id: str
    birth_date: str | None  # ISO date or None
    sex: str  # DICOM code as stored: "F", "M", "O" or ""
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    modality: str
    photometric: str  # Photometric Interpretation as stored in the file
    frame_count: int
    description: str  # Series Description, else Study Description, else ""
    sop_class_uid: str = ""
    transfer_syntax: str = ""
    frame_index: int | None = 0  # the frame used; None when the tiles of a whole-slide level were stitched
    window: tuple[float, float] | None = None  # (center, width) applied, if any

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


def _stretch(x: np.ndarray) -> np.ndarray:
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return np.zeros_like(x, dtype=np.float64)
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float64) if lo <= 0 else np.ones_like(x, dtype=np.float64)
    return np.clip((np.nan_to_num(x, nan=lo) - lo) / (hi - lo), 0.0, 1.0)


def _grey_to_rgb(arr: np.ndarray, ds, index: int, photometric: str) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Modality LUT (rescale), VOI (window or stretch) and MONOCHROME1 inversion -> RGB uint8."""
    used = None
    if arr.dtype.kind == "f":  # Float / Double Float Pixel Data: no LUTs apply
        unit = _stretch(arr.astype(np.float64))
    else:
        slope, intercept = _rescale(ds, index)
        has_modality_lut = "ModalityLUTSequence" in ds
        if has_modality_lut:
            from pydicom.pixels import apply_modality_lut

            x = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        else:
            x = arr.astype(np.float64) * slope + intercept
        win = _window(ds, index)
        if win is not None:
            unit = _apply_window(x, *win)
            used = (win[0], win[1])
        elif "VOILUTSequence" in ds:
            from pydicom.pixels import apply_voi

            lut = apply_voi(np.rint(x).astype(np.int64), ds, index=0)  # input: the modality LUT output
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2]) or 16
            unit = np.clip(np.asarray(lut, dtype=np.float64) / float(2 ** bits - 1), 0.0, 1.0)
        elif int(ds.get("BitsStored", 8) or 8) <= 8 and (slope, intercept) == (1.0, 0.0) and not has_modality_lut \
                and x.size and x.min() >= 0 and x.max() <= 255:
            unit = x / 255.0  # 8-bit greyscale: taken as is, not stretched
        else:
            unit = _stretch(x)
    grey = np.rint(unit * 255.0).astype(np.uint8)
    if photometric == "MONOCHROME1":  # low values are white
        grey = 255 - grey
    return np.repeat(grey[..., None], 3, axis=2), used


def _colour_to_rgb(arr: np.ndarray, ds, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = np.asarray(apply_color_lut(arr, ds))
        if rgb.dtype.itemsize > 1:  # 16-bit LUT entries
            rgb = np.rint(rgb.astype(np.float64) / 257.0)
        return np.clip(rgb, 0, 255).astype(np.uint8)
    if photometric in ("YBR_FULL", "YBR_FULL_422"):  # not converted by the decoder (as_rgb ignored)
        from pydicom.pixels import convert_color_space

        arr = convert_color_space(arr, photometric, "RGB")
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ImageLoadError(f"The DICOM image has an unexpected shape {tuple(arr.shape)} for {photometric}.")
    if arr.dtype.itemsize > 1 or arr.dtype.kind == "f":
        bits = int(ds.get("BitsStored", 16) or 16)
        return np.clip(np.rint(arr.astype(np.float64) / float(2 ** bits - 1) * 255.0), 0, 255).astype(np.uint8)
    return arr.astype(np.uint8, copy=False)


_GREY = ("MONOCHROME1", "MONOCHROME2")
_RGB_LIKE = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")


def _tiled_full(ds) -> tuple[int, int] | None:
    """(total rows, total columns) when ``ds`` is a TILED_FULL whole-slide level, else None."""
    if str(ds.get("DimensionOrganizationType", "")).upper() != "TILED_FULL":
        return None
    r, c = ds.get("TotalPixelMatrixRows"), ds.get("TotalPixelMatrixColumns")
    if not r or not c:
        return None
    return int(r), int(c)


def read_dicom(data: bytes, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> DicomImage:
    """Decode a DICOM Part-10 file to RGB uint8 plus metadata. Raises only :class:`ImageLoadError`."""
    import pydicom
    from pydicom.uid import UID

    data = bytes(data)
    if not is_dicom(data):
        raise ImageLoadError("The file is not a DICOM file (no 'DICM' marker at byte 128).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=False)
            ds.get("PixelData")  # converts the raw element now, so damage there surfaces here
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad data
        raise ImageLoadError(f"The DICOM file is corrupt or truncated ({exc.__class__.__name__}).") from None

    try:
        meta = _metadata(ds)
    except Exception as exc:  # noqa: BLE001 - malformed values surface lazily
        raise ImageLoadError(f"The DICOM file is corrupt: its header cannot be read ({exc.__class__.__name__}).") from None

    pixel_kw = next((k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
    if pixel_kw is None:
        kind = UID(meta["sop_class_uid"]).name if meta["sop_class_uid"] else ""
        if kind and kind != meta["sop_class_uid"]:
            what = f"it is a {kind.removesuffix(' Storage')} object"
        else:
            what = f"modality {meta['modality']}, no pixel data" if meta["modality"] else "no pixel data"
        raise ImageLoadError(f"The DICOM file contains no image ({what}); upload a DICOM image instead.")

    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        photometric = str(ds.PhotometricInterpretation).strip().upper()
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001 - missing or unreadable Image Pixel attributes
        raise ImageLoadError("The DICOM image is missing required attributes (Rows, Columns, "
                             "Photometric Interpretation).") from None
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise ImageLoadError(f"The DICOM image has invalid dimensions ({cols}x{rows}, {frames} frame(s)).")
    if photometric not in _GREY + _RGB_LIKE:
        raise ImageLoadError(f"The DICOM photometric interpretation {photometric!r} is not supported.")
    if rows * cols > max_pixels:
        raise ImageLoadError(f"The image is {cols}x{rows} pixels; the limit is {max_pixels / 1e6:.0f} megapixels. "
                             "Please upload a smaller field of view.")

    tiled = _tiled_full(ds) if frames > 1 else None
    if tiled is not None:
        t_rows, t_cols = tiled
        if t_rows * t_cols > max_pixels:
            tiled = None  # the whole level is too large: fall back to the first tile
    out_rows, out_cols = tiled if tiled else (rows, cols)
    if min(out_rows, out_cols) < min_side:
        raise ImageLoadError(f"The image is {out_cols}x{out_rows} pixels; at least {min_side}x{min_side} is needed.")

    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "") or "1.2.840.10008.1.2"))
    ts_text = f"{ts.name} ({ts})" if ts.name != str(ts) else str(ts)
    try:
        from pydicom.pixels import get_decoder

        decoder = get_decoder(ts)
    except Exception:  # noqa: BLE001 - NotImplementedError for unknown UIDs
        raise ImageLoadError(f"The DICOM file uses the transfer syntax {ts_text}, which is not supported. "
                             "Export it uncompressed (or as JPEG/PNG) and upload it again.") from None
    if not decoder.is_available:
        raise ImageLoadError(f"The DICOM file is compressed with {ts_text}, which cannot be decoded here. "
                             "Export it uncompressed (or as JPEG/PNG) and upload it again.")

    if tiled:
        index = None
    elif frames > 1 and meta["modality"] in VOLUME_MODALITIES:
        index = frames // 2
    else:
        index = 0
    opts = {"as_rgb": True}
    if pixel_kw != "PixelData":
        opts["pixel_keyword"] = pixel_kw
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if tiled:
                arr, out_pi = _stitch(decoder, ds, rows, cols, frames, tiled, opts)
            else:
                arr, info = decoder.as_array(ds, index=index, **opts)
                out_pi = str(info.get("photometric_interpretation", photometric)).upper()
    except ImageLoadError:
        raise
    except MemoryError:
        raise ImageLoadError("The DICOM image is too large to decode.") from None
    except Exception as exc:  # noqa: BLE001 - codec and length errors
        if ts.is_compressed:
            raise ImageLoadError(f"The DICOM image data could not be decoded ({ts_text}): the data is corrupt "
                                 "or uses an unsupported variant of that compression.") from None
        raise ImageLoadError(f"The DICOM pixel data is corrupt or truncated ({exc.__class__.__name__}).") from None

    try:
        arr = np.asarray(arr)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        window = None
        if photometric in _GREY and samples == 1:
            if arr.ndim != 2:
                raise ImageLoadError(f"The DICOM image has an unexpected shape {tuple(arr.shape)} for {photometric}.")
            rgb, window = _grey_to_rgb(arr, ds, index or 0, photometric)
        elif photometric in _GREY:
            raise ImageLoadError(f"The DICOM image is {photometric} with {samples} samples per pixel.")
        else:
            rgb = _colour_to_rgb(arr, ds, out_pi if out_pi in _RGB_LIKE else photometric)
    except ImageLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - bad LUTs and the like
        raise ImageLoadError(f"The DICOM image could not be converted to RGB ({exc.__class__.__name__}).") from None
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    return DicomImage(rgb=rgb, photometric=photometric, frame_count=frames, frame_index=index,
                      transfer_syntax=str(ts), window=window, **meta)


def _stitch(decoder, ds, rows: int, cols: int, frames: int, total: tuple[int, int], opts: dict):
    t_rows, t_cols = total
    across, down = math.ceil(t_cols / cols), math.ceil(t_rows / rows)
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


def _metadata(ds) -> dict:
    def text(keyword: str) -> str:
        v = ds.get(keyword)
        return "" if v is None else str(v).strip()

    return {
        "patient_name": _person_name(ds.get("PatientName")),
        "patient_id": text("PatientID"),
        "birth_date": _iso_date(ds.get("PatientBirthDate")),
        "sex": text("PatientSex").upper(),
        "study_uid": text("StudyInstanceUID"),
        "series_uid": text("SeriesInstanceUID"),
        "sop_instance_uid": text("SOPInstanceUID"),
        "sop_class_uid": text("SOPClassUID"),
        "modality": text("Modality").upper(),
        "description": text("SeriesDescription") or text("StudyDescription"),
    }


# ============================================================================= shared output helpers
def _uid(*parts) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[_UID_NS, *(str(p) for p in parts)]))


def case_study_uid(case) -> str:
    """The deterministic Study Instance UID of a case that did not come from DICOM.

    Hashes the case id with its creation time and the patient's MRN, so two installations that
    both have a case 1 do not produce the same UID.
    """
    created = case.created_at.isoformat() if getattr(case, "created_at", None) else ""
    return _uid("study", case.id, created, case.patient.mrn if case.patient else "")


def _dicom_person_name(name: str) -> str:
    """A free-text name (no structure known) as a DICOM PN: everything in the family component."""
    name = (name or "").replace("^", " ").replace("=", " ").replace("\\", " ").strip()
    return f"{name[:60]}^" if name else ""


def _patient_pn(patient) -> str:
    fam = (patient.family_name or "").replace("^", " ").strip()
    giv = (patient.given_name or "").replace("^", " ").strip()
    return f"{fam}^{giv}" if giv else f"{fam}^"


_SEX_CODE = {"female": "F", "male": "M", "other": "O"}


def _da(d) -> str:
    return d.strftime("%Y%m%d") if d else ""


def _tm(t) -> str:
    return t.strftime("%H%M%S") if t else ""


def _dt(t) -> str:
    return t.strftime("%Y%m%d%H%M%S") if t else ""


def _code(value: str, meaning: str, scheme: str = _PRIVATE_SCHEME):
    from pydicom.sr.coding import Code

    return Code(str(value)[:64], scheme, (meaning or str(value))[:64])


def _private_scheme_item():
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = _PRIVATE_SCHEME
    item.CodingSchemeName = "oncoscope local codes"
    item.CodingSchemeResponsibleOrganization = "oncoscope"
    return item


def _pin_times(ds, when: dt.datetime) -> None:
    """Replace the wall-clock times highdicom writes by ``when`` (reproducible output)."""
    ds.ContentDate, ds.ContentTime = _da(when), _tm(when)
    ds.InstanceCreationDate, ds.InstanceCreationTime = _da(when), _tm(when)
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = _dt(when)


def to_part10(ds) -> bytes:
    """A pydicom Dataset (with file meta) as DICOM Part-10 file bytes."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ============================================================================= SR
def case_to_sr(case, analyzer=None, *, study_uid: str | None = None, institution: str | None = None) -> bytes:
    """The signed result of ``case`` (an ORM :class:`~oncoscope.store.models.Case`) as a DICOM
    Comprehensive SR, Part-10 bytes.

    ``analyzer`` (optional) supplies display names and the model name. ``study_uid``: the Study
    Instance UID of the DICOM source images when the case came from DICOM; otherwise a
    deterministic UID is derived from the case (:func:`case_study_uid`). UIDs and dates come from
    stored rows only, so exporting the same signed version twice gives the same document.
    An amended case lists the earlier versions' SR documents as predecessors.
    """
    from highdicom.sr import (CodeContentItem, ComprehensiveSR, ContainerContentItem, DateTimeContentItem,
                              NumContentItem, PnameContentItem, RelationshipTypeValues, TextContentItem,
                              UIDRefContentItem)
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes
    from pydicom.uid import SecondaryCaptureImageStorage

    from ..store.cases import NONDIAGNOSTIC

    review = case.current_review
    if review is None:
        raise DicomExportError("The case is not signed: only a signed result can be exported.")
    patient = case.patient
    names = {NONDIAGNOSTIC: "Non-diagnostic sample", **dict(getattr(analyzer, "display_names", {}) or {})}

    def show(label):
        return names.get(label, label) if label else ""

    contains, obs_ctx = RelationshipTypeValues.CONTAINS, RelationshipTypeValues.HAS_OBS_CONTEXT
    study_uid = study_uid or case_study_uid(case)
    series_uid = _uid("sr-series", study_uid, case.id)

    def sr_uid(version: int) -> str:
        return _uid("sr", study_uid, case.id, version)

    root = ContainerContentItem(name=_code("11526-1", "Pathology study", "LN"))
    items = []
    # -- observers: the signing physician and the AI device
    signer = review.signed_by.name if review.signed_by else ""
    items.append(CodeContentItem(codes.DCM.ObserverType, codes.DCM.Person, obs_ctx))
    items.append(PnameContentItem(codes.DCM.PersonObserverName, _dicom_person_name(signer) or "^", obs_ctx))
    analyses = [i.analysis for i in case.images if i.analysis is not None]
    a0 = next((a for a in analyses if a.model_version), None)
    model_id = case.analyzer_id
    model_version = (a0.model_version if a0 else None) or getattr(analyzer, "version", "") or ""
    model_sha = (a0.model_sha256 if a0 else None) or (analyzer.model_info.sha256 if analyzer is not None and
                                                      hasattr(analyzer, "model_info") else "")
    items.append(CodeContentItem(codes.DCM.ObserverType, codes.DCM.Device, obs_ctx))
    items.append(UIDRefContentItem(codes.DCM.DeviceObserverUID, _uid("device", model_id, model_version, model_sha),
                                   obs_ctx))
    items.append(TextContentItem(codes.DCM.DeviceObserverName, model_id, obs_ctx))
    items.append(TextContentItem(codes.DCM.DeviceObserverManufacturer, "oncoscope", obs_ctx))
    items.append(TextContentItem(codes.DCM.DeviceObserverModelName,
                                 getattr(analyzer, "name", None) or model_id, obs_ctx))
    # -- algorithm
    items.append(TextContentItem(codes.DCM.AlgorithmName, model_id, contains))
    items.append(TextContentItem(codes.DCM.AlgorithmVersion, model_version or "unknown", contains))
    if model_sha:
        items.append(TextContentItem(_code("MODEL-SHA256", "Model files SHA-256"), model_sha, contains))

    # -- one group per image
    no_units, cells_unit = _code("1", "no units", "UCUM"), _code("{cells}", "cells", "UCUM")
    for n, img in enumerate(case.images, start=1):
        a = img.analysis
        group = ContainerContentItem(name=codes.DCM.MeasurementGroup, relationship_type=contains)
        g = [TextContentItem(codes.DCM.TrackingIdentifier, f"Field {n}: {img.original_filename or img.sha256[:12]}",
                             contains),
             TextContentItem(_code("IMAGE-SHA256", "Image file SHA-256"), img.sha256, contains)]
        done = a is not None and a.job_status == "done"
        status = (a.result_status if done else ("error" if a is not None and a.job_status == "failed" else "pending"))
        g.append(TextContentItem(_code("AI-STATUS", "AI result status"), status or "unknown", contains))
        if done and a.label:
            g.append(CodeContentItem(codes.DCM.Finding, _code(a.label, show(a.label)), contains))
        if done:
            for label, p in (a.probabilities or {}).items():
                g.append(NumContentItem(_code(f"P-{label}", f"Probability of {show(label)}"), float(p), no_units,
                                        relationship_type=contains))
            if a.malignant_probability is not None:
                g.append(NumContentItem(_code("P-MALIGNANT", "Probability of malignancy"),
                                        float(a.malignant_probability), no_units, relationship_type=contains))
            if a.cell_count is not None:
                g.append(NumContentItem(_code("CELL-COUNT", "White blood cell count"), int(a.cell_count), cells_unit,
                                        relationship_type=contains))
            if a.model_version:
                g.append(TextContentItem(codes.DCM.AlgorithmVersion, a.model_version, contains))
        for m in (a.messages or []) if done else []:
            if str(m).strip():
                g.append(TextContentItem(_code("AI-MESSAGE", "AI message"), str(m), contains))
        group.ContentSequence = g
        items.append(group)

    # -- the AI call over the case, then the physician's sign-off
    if review.ai_label:
        items.append(CodeContentItem(_code("AI-CASE-CLASS", "AI class for the case"),
                                     _code(review.ai_label, show(review.ai_label)), contains))
    items.append(TextContentItem(_code("AI-CASE-STATUS", "AI status for the case"), review.ai_status or "unknown",
                                 contains))
    final = CodeContentItem(_code("22637-3", "Pathology report final diagnosis", "LN"),
                            _code(review.final_diagnosis, show(review.final_diagnosis)), contains)
    final.ObservationDateTime = _dt(review.signed_at)
    items.append(final)
    items.append(TextContentItem(_code("FINAL-DX-TEXT", "Final diagnosis (text)"),
                                 show(review.final_diagnosis), contains))
    items.append(CodeContentItem(_code("AGREES-WITH-AI", "Final diagnosis agrees with AI"),
                                 codes.SCT.Yes if review.agrees_with_ai else codes.SCT.No, contains))
    for value, code, meaning in ((review.override_reason, "OVERRIDE-REASON", "Reason for overriding the AI"),
                                 (review.uncertainty_note, "UNCERTAINTY-NOTE", "Note on an uncertain AI result"),
                                 (review.comment, "COMMENT", "Comment"),
                                 (review.amendment_reason, "AMENDMENT-REASON", "Reason for the amendment")):
        if value:
            items.append(TextContentItem(_code(code, meaning), value, contains))
    items.append(PnameContentItem(_code("SIGNED-BY", "Signed by"), _dicom_person_name(signer) or "^", contains))
    items.append(DateTimeContentItem(_code("SIGNED-AT", "Signed at (UTC)"), review.signed_at, contains))
    items.append(TextContentItem(_code("REVIEW-VERSION", "Sign-off version"), str(review.version), contains))
    if review.content_sha256:
        items.append(TextContentItem(_code("REVIEW-SHA256", "Sign-off content SHA-256"), review.content_sha256,
                                     contains))
    root.ContentSequence = items

    # highdicom takes patient and study from its first evidence item; the case has no DICOM evidence
    # of its own, so a stand-in carries the patient, and is dropped from the evidence lists after.
    stand_in = Dataset()
    stand_in.PatientName = _patient_pn(patient)
    stand_in.PatientID = patient.mrn
    stand_in.PatientBirthDate = _da(patient.birth_date)
    stand_in.PatientSex = _SEX_CODE.get(patient.sex, "")
    stand_in.StudyInstanceUID = study_uid
    stand_in.SeriesInstanceUID = _uid("stand-in", study_uid)
    stand_in.SOPInstanceUID = _uid("stand-in-sop", study_uid)
    stand_in.SOPClassUID = SecondaryCaptureImageStorage
    stand_in.AccessionNumber = ""
    stand_in.StudyID = str(case.id)[:16]
    stand_in.StudyDate = _da(case.created_at)
    stand_in.StudyTime = _tm(case.created_at)
    stand_in.ReferringPhysicianName = ""
    previous = []
    for old in case.reviews[:-1]:
        p = Dataset()
        p.SOPClassUID, p.SOPInstanceUID = COMPREHENSIVE_SR_UID, sr_uid(old.version)
        p.StudyInstanceUID, p.SeriesInstanceUID = study_uid, series_uid
        previous.append(p)
    verifier = _dicom_person_name(signer) or "^"
    org = (institution or "oncoscope")[:64]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sr = ComprehensiveSR(
            evidence=[stand_in], content=root, series_instance_uid=series_uid, series_number=900,
            sop_instance_uid=sr_uid(review.version), instance_number=review.version, manufacturer="oncoscope",
            is_complete=True, is_final=True, is_verified=True, institution_name=institution,
            verifying_observer_name=verifier, verifying_organization=org,
            previous_versions=previous or None, specific_character_set="ISO_IR 192",
            series_description="oncoscope signed result", manufacturer_model_name=model_id[:64],
            software_versions=f"oncoscope {_package_version()}",
        )
    for kw in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        if kw in sr:
            del sr[kw]
    signed = review.signed_at
    sr.VerifyingObserverSequence[0].VerificationDateTime = _dt(signed)
    _pin_times(sr, signed)
    first_signed = case.reviews[0].signed_at or signed  # the series holds every version of the document
    sr.SeriesDate, sr.SeriesTime = _da(first_signed), _tm(first_signed)
    sr.CodingSchemeIdentificationSequence = [_private_scheme_item()]
    return to_part10(sr)


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("oncoscope")
    except Exception:  # noqa: BLE001
        return "dev"


# ============================================================================= SC and SEG
def rgb_to_secondary_capture(rgb: np.ndarray, *, case=None, study_uid: str | None = None, patient_id: str = "",
                             patient_name: str = "", birth_date: dt.date | None = None, sex: str = ""):
    """Wrap an RGB uint8 image in a DICOM Secondary Capture (highdicom ``SCImage``), deterministically:
    the same pixels in the same study give the same UIDs. ``case`` (ORM Case) supplies the patient
    and the study UID when given. Returns the pydicom Dataset."""
    from highdicom import SpecimenDescription
    from highdicom.sc import SCImage

    rgb = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got shape {rgb.shape}")
    if case is not None:
        p = case.patient
        patient_id, patient_name = p.mrn, _patient_pn(p)
        birth_date, sex = p.birth_date, _SEX_CODE.get(p.sex, "")
        study_uid = study_uid or case_study_uid(case)
    elif patient_name and "^" not in patient_name:
        patient_name = _dicom_person_name(patient_name)
    digest = hashlib.sha256(rgb.tobytes() + repr(rgb.shape).encode()).hexdigest()
    study_uid = study_uid or _uid("sc-study", digest)
    # A smear field is a slide: SLIDE coordinates, with the image digest standing in for the slide id.
    specimen = SpecimenDescription(specimen_id=f"field-{digest[:12]}", specimen_uid=_uid("specimen", study_uid, digest),
                                   specimen_short_description="Peripheral blood smear field")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc = SCImage(pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="SLIDE",
                     container_identifier=f"field-{digest[:12]}", specimen_descriptions=[specimen],
                     study_instance_uid=study_uid, series_instance_uid=_uid("sc-series", study_uid),
                     series_number=901, sop_instance_uid=_uid("sc", study_uid, digest), instance_number=1,
                     manufacturer="oncoscope", patient_id=patient_id or "", patient_name=patient_name or None,
                     patient_birth_date=_da(birth_date) or None, patient_sex=(sex or None),
                     specific_character_set="ISO_IR 192")
    # Deterministic dates: none is known for a plain upload, so the Type 3 capture date/time are dropped.
    for kw in ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"):
        if kw in sc:
            del sc[kw]
    return sc


def _source_dataset(source, case=None, study_uid: str | None = None):
    """The DICOM dataset ``mask_to_seg`` references: the source itself, or a Secondary Capture of it."""
    import pydicom
    from pydicom.dataset import Dataset

    if isinstance(source, Dataset):
        return source
    if isinstance(source, np.ndarray):
        return rgb_to_secondary_capture(source, case=case, study_uid=study_uid)
    data = bytes(source)
    if is_dicom(data):
        try:
            return pydicom.dcmread(io.BytesIO(data))
        except Exception as exc:  # noqa: BLE001
            raise ImageLoadError(f"The DICOM file is corrupt or truncated ({exc.__class__.__name__}).") from None
    from ..ml.imageio import load_image

    return rgb_to_secondary_capture(load_image(data).rgb, case=case, study_uid=study_uid)


def mask_to_seg(source, mask: np.ndarray, *, case=None, study_uid: str | None = None, model_id: str = "oncoscope",
                model_version: str = "", segment_label: str = SEG_LABEL,
                created_at: dt.datetime | None = None) -> bytes:
    """A binary DICOM Segmentation (one segment, "White blood cell") of ``mask`` (> 0 is foreground;
    instance labels are fine) as Part-10 bytes.

    ``source``: the image the mask belongs to: DICOM bytes or a pydicom Dataset (the SEG references
    it and inherits its patient and study), or non-DICOM image bytes / an RGB array, which are first
    wrapped in a Secondary Capture (:func:`rgb_to_secondary_capture`, with ``case`` / ``study_uid``
    for the patient and study). The mask must match the image the pipeline saw: the source frame size,
    or the total pixel matrix of a TILED_FULL slide. A mask computed on a downscaled copy (same aspect)
    is enlarged by nearest neighbour. Multi-frame sources other than tiled slides are not supported.
    UIDs are derived from the source instance, the mask and the model; ``created_at`` (e.g. the
    analysis' finish time) fixes the content and creation date/time, so the bytes are reproducible.
    """
    import highdicom as hd
    from highdicom.seg import Segmentation, SegmentAlgorithmTypeValues, SegmentationTypeValues, SegmentDescription
    from pydicom.sr.codedict import codes

    src = _source_dataset(source, case=case, study_uid=study_uid)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    frames = int(src.get("NumberOfFrames", 1) or 1)
    tiled = _tiled_full(src) if frames > 1 else None
    if frames > 1 and tiled is None:
        raise ValueError("mask_to_seg supports single-frame sources and TILED_FULL whole-slide images only")
    if tiled and tiled[0] * tiled[1] > MAX_PIXELS:
        raise ValueError("the whole-slide level is larger than the analysis limit, so no mask of it exists")
    target = tiled or (int(src.Rows), int(src.Columns))
    mask = _fit_mask(mask > 0, target)
    digest = hashlib.sha256(np.packbits(mask).tobytes() + repr(mask.shape).encode()).hexdigest()
    algo = hd.AlgorithmIdentificationSequence(name=model_id[:64], family=codes.cid7162.ArtificialIntelligence,
                                              version=(model_version or "unknown")[:64])
    desc = SegmentDescription(segment_number=1, segment_label=segment_label[:64],
                              segmented_property_category=codes.SCT.Cell,
                              segmented_property_type=_code("52501007", "White blood cell", "SCT"),
                              algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo)
    kwargs = {}
    if tiled:
        kwargs.update(tile_pixel_array=True, tile_size=(int(src.Rows), int(src.Columns)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = Segmentation(
            source_images=[src], pixel_array=mask.astype(np.uint8), segmentation_type=SegmentationTypeValues.BINARY,
            segment_descriptions=[desc], series_instance_uid=_uid("seg-series", src.StudyInstanceUID, model_id),
            series_number=902, sop_instance_uid=_uid("seg", src.SOPInstanceUID, digest, model_id, model_version),
            instance_number=1, manufacturer="oncoscope", manufacturer_model_name=model_id[:64],
            software_versions=(model_version or _package_version())[:64], device_serial_number="0",
            omit_empty_frames=False, content_label="CELLS", **kwargs)
    dim_uid = _uid("seg-dimensions", seg.SOPInstanceUID)  # highdicom draws a random one
    for kw in ("DimensionIndexSequence", "DimensionOrganizationSequence"):
        for item in seg.get(kw, []):
            item.DimensionOrganizationUID = dim_uid
    if created_at is not None:
        _pin_times(seg, created_at)
    return to_part10(seg)


def _fit_mask(mask: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    rows, cols = target
    if mask.shape == (rows, cols):
        return mask
    mr, mc = mask.shape
    if mr > rows or mc > cols or abs(mr / mc - rows / cols) > 0.02 * (rows / cols):
        raise ValueError(f"the mask is {mc}x{mr} but the image is {cols}x{rows}")
    from PIL import Image

    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((cols, rows), Image.NEAREST)
    return np.asarray(img) > 0
