"""The DICOM Segmentation of a cell mask (:func:`mask_to_seg`), and the Secondary Capture it
references when the source image is not DICOM (:func:`rgb_to_secondary_capture`).

A SEG must reference a DICOM image: for a DICOM upload that is the source itself; for a PNG or JPEG
it is a Secondary Capture of the same pixels, made with deterministic UIDs so it can be regenerated
and sent alongside the SEG. That is why the two writers live together. Shared DICOM helpers are in
:mod:`.dicom_common`.

pydicom and highdicom are imported inside the functions that use them: importing them costs
start-up time (about 0.3 s together), which a process that never writes DICOM does not pay.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import warnings

import numpy as np
from PIL import Image

from ..imaging.dicom import MAX_PIXELS, is_dicom, is_dicom_uid, parse_dataset, tiled_full
from ..imaging.imageio import load_image
from .dicom_common import (SEX_CODE, DicomExportError, case_study_uid, code, derived_uid, dicom_date, dicom_value,
                           package_version, patient_pn, pin_times, to_part10)

SEG_LABEL = "White blood cell"


# ============================================================================= Secondary Capture
def rgb_to_secondary_capture(rgb: np.ndarray, *, case=None, study_uid: str | None = None, patient_id: str = "",
                             patient_name: str = "", birth_date: dt.date | None = None, sex: str = ""):
    """Wrap an RGB uint8 image in a DICOM Secondary Capture (highdicom ``SCImage``), deterministically:
    the same pixels in the same study give the same UIDs. ``case`` (ORM Case) supplies the patient
    and the study UID when given; otherwise ``patient_name`` is ``Family^Given`` or free text (all
    family name). Returns the pydicom Dataset."""
    from highdicom import SpecimenDescription
    from highdicom.sc import SCImage

    rgb = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got shape {rgb.shape}")
    if case is not None:
        p = case.patient
        patient_id, patient_name = p.mrn, patient_pn(p)
        birth_date, sex = p.birth_date, SEX_CODE.get(p.sex, "")
        study_uid = study_uid or case_study_uid(case)
    else:
        patient_name = dicom_value((patient_name or "").split("^"), "PN")
    digest = hashlib.sha256(rgb.tobytes() + repr(rgb.shape).encode()).hexdigest()
    study_uid = dicom_value(study_uid or derived_uid("sc-study", digest), "UI")
    # A smear field is a slide: SLIDE coordinates, with the image digest standing in for the slide id.
    specimen = SpecimenDescription(specimen_id=f"field-{digest[:12]}",
                                   specimen_uid=derived_uid("specimen", study_uid, digest),
                                   specimen_short_description="Peripheral blood smear field")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc = SCImage(pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="SLIDE",
                     container_identifier=f"field-{digest[:12]}", specimen_descriptions=[specimen],
                     study_instance_uid=study_uid, series_instance_uid=derived_uid("sc-series", study_uid),
                     series_number=901, sop_instance_uid=derived_uid("sc", study_uid, digest), instance_number=1,
                     manufacturer="oncoscope", patient_id=dicom_value(patient_id, "LO"),
                     patient_name=patient_name or None, patient_birth_date=dicom_date(birth_date) or None,
                     patient_sex=(sex or None),
                     specific_character_set="ISO_IR 192")
    # Deterministic dates: none is known for a plain upload, so the Type 3 capture date/time are dropped.
    for kw in ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"):
        if kw in sc:
            del sc[kw]
    return sc


# ============================================================================= Segmentation
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
    from highdicom.seg import Segmentation, SegmentationTypeValues

    src = _source_dataset(source, case=case, study_uid=study_uid)
    _check_referenced_uids(src)
    mask, tiled = _mask_on_source(src, mask)
    digest = hashlib.sha256(np.packbits(mask).tobytes() + repr(mask.shape).encode()).hexdigest()
    desc = _segment_description(model_id, model_version, segment_label)
    kwargs = {"tile_pixel_array": True, "tile_size": (int(src.Rows), int(src.Columns))} if tiled else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = Segmentation(
            source_images=[src], pixel_array=mask.astype(np.uint8), segmentation_type=SegmentationTypeValues.BINARY,
            segment_descriptions=[desc],
            series_instance_uid=derived_uid("seg-series", src.StudyInstanceUID, model_id), series_number=902,
            sop_instance_uid=derived_uid("seg", src.SOPInstanceUID, digest, model_id, model_version),
            instance_number=1, manufacturer="oncoscope", manufacturer_model_name=dicom_value(model_id, "LO"),
            software_versions=dicom_value(model_version or package_version(), "LO"), device_serial_number="0",
            omit_empty_frames=False, content_label="CELLS", **kwargs)
    _pin_dimension_organization(seg)
    if created_at is not None:
        pin_times(seg, created_at)
    return to_part10(seg)


def _source_dataset(source, case=None, study_uid: str | None = None):
    """The DICOM dataset ``mask_to_seg`` references: the source itself, or a Secondary Capture of it."""
    from pydicom.dataset import Dataset

    if isinstance(source, Dataset):
        return source
    if isinstance(source, np.ndarray):
        return rgb_to_secondary_capture(source, case=case, study_uid=study_uid)
    data = bytes(source)
    if is_dicom(data):
        return parse_dataset(data)  # a Deflated body inflated with its cap, as on upload
    return rgb_to_secondary_capture(load_image(data).rgb, case=case, study_uid=study_uid)


def _check_referenced_uids(src) -> None:
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):  # the SEG copies them
        if not is_dicom_uid(src.get(kw)):
            raise DicomExportError(f"The source image's {kw} is not a valid DICOM UID, so a SEG cannot reference it.")


def _mask_on_source(src, mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int] | None]:
    """The mask as a boolean array the size of the source image, and the (rows, columns) of the total
    pixel matrix when the source is a TILED_FULL slide (None for a single frame)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    frames = int(src.get("NumberOfFrames", 1) or 1)
    tiled = tiled_full(src) if frames > 1 else None
    if frames > 1 and tiled is None:
        raise ValueError("mask_to_seg supports single-frame sources and TILED_FULL whole-slide images only")
    if tiled and tiled[0] * tiled[1] > MAX_PIXELS:
        raise ValueError("the whole-slide level is larger than the analysis limit, so no mask of it exists")
    target = tiled or (int(src.Rows), int(src.Columns))
    return _fit_mask(mask > 0, target), tiled


def _fit_mask(mask: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    rows, cols = target
    if mask.shape == (rows, cols):
        return mask
    mr, mc = mask.shape
    if mr > rows or mc > cols or abs(mr / mc - rows / cols) > 0.02 * (rows / cols):
        raise ValueError(f"the mask is {mc}x{mr} but the image is {cols}x{rows}")
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((cols, rows), Image.NEAREST)
    return np.asarray(img) > 0


def _segment_description(model_id: str, model_version: str, segment_label: str):
    """The one segment: white blood cells, found automatically by the AI model."""
    import highdicom as hd
    from highdicom.seg import SegmentAlgorithmTypeValues, SegmentDescription
    from pydicom.sr.codedict import codes

    algo = hd.AlgorithmIdentificationSequence(name=dicom_value(model_id, "LO"),
                                              family=codes.cid7162.ArtificialIntelligence,
                                              version=dicom_value(model_version or "unknown", "LO"))
    return SegmentDescription(segment_number=1, segment_label=dicom_value(segment_label, "LO"),
                              segmented_property_category=codes.SCT.Cell,
                              segmented_property_type=code("52501007", "White blood cell", "SCT"),
                              algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo)


def _pin_dimension_organization(seg) -> None:
    """highdicom draws a random Dimension Organization UID: derive it from the SEG instead."""
    dim_uid = derived_uid("seg-dimensions", seg.SOPInstanceUID)
    for kw in ("DimensionIndexSequence", "DimensionOrganizationSequence"):
        for item in seg.get(kw, []):
            item.DimensionOrganizationUID = dim_uid
