"""DICOM writing: :func:`case_to_sr` writes a signed case as a DICOM Comprehensive SR (SOP class
1.2.840.10008.5.1.4.1.1.88.33). :func:`mask_to_seg` writes a cell mask as a binary DICOM Segmentation
referencing the DICOM source, or, for a non-DICOM source, a Secondary Capture made by
:func:`rgb_to_secondary_capture` (deterministic UIDs, so the SC can be regenerated and sent alongside
the SEG). Every value goes through :func:`dicom_value`. Reading is imaging/dicom.py.

pydicom and highdicom are imported inside the functions that use them, so importing this module stays cheap.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import re
import warnings

import numpy as np

from ..imaging.dicom import MAX_PIXELS, is_dicom, is_dicom_uid, parse_dataset, tiled_full

# Root of the deterministic UIDs below (pydicom's generate_uid hashes these entropy sources).
_UID_NS = "oncoscope"
_PRIVATE_SCHEME = "99ONCOSCOPE"
SEG_LABEL = "White blood cell"
COMPREHENSIVE_SR_UID = "1.2.840.10008.5.1.4.1.1.88.33"


class DicomExportError(ValueError):
    """The object cannot be exported to DICOM (e.g. the case is not signed)."""


def _uid(*parts) -> str:
    from pydicom.uid import generate_uid

    return dicom_value(str(generate_uid(entropy_srcs=[_UID_NS, *(str(p) for p in parts)])), "UI")


def case_study_uid(case) -> str:
    """The deterministic Study Instance UID of a case that did not come from DICOM.

    Hashes the case id with its creation time and the patient's MRN, so two installations that
    both have a case 1 do not produce the same UID.
    """
    created = case.created_at.isoformat() if getattr(case, "created_at", None) else ""
    return _uid("study", case.id, created, case.patient.mrn if case.patient else "")


# PS3.5 6.2: in these VRs "\" separates values, and no control character (bar ESC, meaningless under
# ISO_IR 192) is allowed; lone surrogates cannot be encoded at all. Maximum lengths in characters.
_ONE_VALUE_MAX = {"LO": 64, "SH": 16, "UC": None}
_TEXT_MAX = {"ST": 1024, "LT": 10240, "UT": None}
_CONTROL = "\x00-\x1f\x7f-\x9f\ud800-\udfff"
_NOT_IN_ONE_VALUE = re.compile(f"[\\\\%{_CONTROL}]")
_PN_BREAKS = re.compile(f"[\\\\^={_CONTROL}]")
_NOT_IN_TEXT = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ud800-\udfff]")  # CR, LF, FF are allowed


def dicom_value(value, vr: str = "LO") -> str:
    """``value`` (stored or user text) as one value of a DICOM element of ``vr``: every text this
    module writes goes through here, so no value can split into several or leak into other components.

    * LO, SH, UC (identifiers, descriptions, codes): ``\\``, control characters and ``%`` itself are
      written as ``%XX`` (their UTF-8 bytes). Reversible, so two different MRNs never export as the
      same Patient ID (``B-001\\ZZ`` -> ``B-001%5CZZ``, one value).
    * PN: ``value`` holds the components (family, given, middle, prefix, suffix), or is one string
      (the family name). ``^ = \\`` and control characters would move text into another component,
      component group or value: they become spaces. ``Doe=Smith`` -> ``Doe Smith^``.
    * ST, LT, UT (free text): control characters other than CR, LF and FF are dropped (tab: space).
    * UI: returned as is when it is one valid UID (digits and dots, no leading zero in a component, at most
      64 characters); anything else raises :class:`DicomExportError`, since an altered UID names another object.

    Other values are cut to the VR's maximum length.
    """
    if vr == "UI":
        if not is_dicom_uid(value):
            raise DicomExportError(f"Not a valid DICOM UID: {str(value)[:80]!r}.")
        return str(value)
    if vr == "PN":
        return _person_name_value([value] if isinstance(value, str) or value is None else list(value))
    text = "" if value is None else str(value)
    if vr in _TEXT_MAX:
        return _NOT_IN_TEXT.sub("", text.replace("\t", " "))[:_TEXT_MAX[vr]]
    limit = _ONE_VALUE_MAX[vr]  # KeyError: no rule written for that VR yet
    out, n = [], 0
    for ch in text:
        piece = ch
        if _NOT_IN_ONE_VALUE.match(ch):
            piece = "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
        if limit is not None and n + len(piece) > limit:
            break  # never half an escape
        out.append(piece)
        n += len(piece)
    return "".join(out)


def _person_name_value(components: list) -> str:
    parts = [" ".join(_PN_BREAKS.sub(" ", str(c or "")).split()) for c in components]
    while len(parts) > 2 and not parts[-1]:
        parts.pop()
    if not any(parts):
        return ""
    return "^".join(parts + [""] * (2 - len(parts)))[:64]  # "Doe^": a lone name is the family name


def _patient_pn(patient) -> str:
    return dicom_value((patient.family_name, patient.given_name), "PN")


def _text_item(name, value, relationship):
    from highdicom.sr import TextContentItem

    return TextContentItem(name, dicom_value(value, "UT") or "-", relationship)  # TEXT may not be empty


def _pname_item(name, value, relationship):
    from highdicom.sr import PnameContentItem

    return PnameContentItem(name, dicom_value(value, "PN") or "^", relationship)


_SEX_CODE = {"female": "F", "male": "M", "other": "O"}


def _da(d) -> str:
    return d.strftime("%Y%m%d") if d else ""


def _tm(t) -> str:
    return t.strftime("%H%M%S") if t else ""


def _dt(t) -> str:
    return t.strftime("%Y%m%d%H%M%S") if t else ""


def _code(value: str, meaning: str, scheme: str = _PRIVATE_SCHEME):
    from pydicom.sr.coding import Code

    return Code(dicom_value(str(value)[:64], "UC"), scheme, dicom_value(meaning or str(value), "LO"))


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
    Instance UID of the DICOM source images when the case came from DICOM (one valid UID, else
    :class:`DicomExportError`); otherwise a deterministic UID is derived from the case
    (:func:`case_study_uid`). UIDs and dates come from
    stored rows only, so exporting the same signed version twice gives the same document.
    An amended case lists the earlier versions' SR documents as predecessors.
    """
    from highdicom.sr import (CodeContentItem, ComprehensiveSR, ContainerContentItem, DateTimeContentItem,
                              NumContentItem, RelationshipTypeValues, UIDRefContentItem)
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes
    from pydicom.uid import SecondaryCaptureImageStorage

    from ..store.cases import label_names

    review = case.current_review
    if review is None:
        raise DicomExportError("The case is not signed: only a signed result can be exported.")
    patient = case.patient
    names = label_names(analyzer)

    def show(label):
        return names.get(label, label) if label else ""

    contains, obs_ctx = RelationshipTypeValues.CONTAINS, RelationshipTypeValues.HAS_OBS_CONTEXT
    study_uid = dicom_value(study_uid or case_study_uid(case), "UI")
    series_uid = _uid("sr-series", study_uid, case.id)

    def sr_uid(version: int) -> str:
        return _uid("sr", study_uid, case.id, version)

    root = ContainerContentItem(name=_code("11526-1", "Pathology study", "LN"))
    items = []
    # -- observers: the signing physician and the AI device
    signer = review.signed_by.name if review.signed_by else ""
    items.append(CodeContentItem(codes.DCM.ObserverType, codes.DCM.Person, obs_ctx))
    items.append(_pname_item(codes.DCM.PersonObserverName, signer, obs_ctx))
    analyses = [i.analysis for i in case.images if i.analysis is not None]
    a0 = next((a for a in analyses if a.model_version), None)
    model_id = case.analyzer_id
    model_version = (a0.model_version if a0 else None) or getattr(analyzer, "version", "") or ""
    model_sha = (a0.model_sha256 if a0 else None) or (analyzer.model_info.sha256 if analyzer is not None and
                                                      hasattr(analyzer, "model_info") else "")
    items.append(CodeContentItem(codes.DCM.ObserverType, codes.DCM.Device, obs_ctx))
    items.append(UIDRefContentItem(codes.DCM.DeviceObserverUID, _uid("device", model_id, model_version, model_sha),
                                   obs_ctx))
    items.append(_text_item(codes.DCM.DeviceObserverName, model_id, obs_ctx))
    items.append(_text_item(codes.DCM.DeviceObserverManufacturer, "oncoscope", obs_ctx))
    items.append(_text_item(codes.DCM.DeviceObserverModelName, getattr(analyzer, "name", None) or model_id, obs_ctx))
    # -- algorithm
    items.append(_text_item(codes.DCM.AlgorithmName, model_id, contains))
    items.append(_text_item(codes.DCM.AlgorithmVersion, model_version or "unknown", contains))
    if model_sha:
        items.append(_text_item(_code("MODEL-SHA256", "Model files SHA-256"), model_sha, contains))

    # -- one group per image
    no_units, cells_unit = _code("1", "no units", "UCUM"), _code("{cells}", "cells", "UCUM")
    for n, img in enumerate(case.images, start=1):
        a = img.analysis
        group = ContainerContentItem(name=codes.DCM.MeasurementGroup, relationship_type=contains)
        g = [_text_item(codes.DCM.TrackingIdentifier, f"Field {n}: {img.original_filename or img.sha256[:12]}",
                        contains),
             _text_item(_code("IMAGE-SHA256", "Image file SHA-256"), img.sha256, contains)]
        done = a is not None and a.job_status == "done"
        status = (a.result_status if done else ("error" if a is not None and a.job_status == "failed" else "pending"))
        g.append(_text_item(_code("AI-STATUS", "AI result status"), status or "unknown", contains))
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
                g.append(_text_item(codes.DCM.AlgorithmVersion, a.model_version, contains))
        for m in (a.messages or []) if done else []:
            if str(m).strip():
                g.append(_text_item(_code("AI-MESSAGE", "AI message"), str(m), contains))
        group.ContentSequence = g
        items.append(group)

    # -- the AI call over the case, then the physician's sign-off
    if review.ai_label:
        items.append(CodeContentItem(_code("AI-CASE-CLASS", "AI class for the case"),
                                     _code(review.ai_label, show(review.ai_label)), contains))
    items.append(_text_item(_code("AI-CASE-STATUS", "AI status for the case"), review.ai_status or "unknown",
                            contains))
    final = CodeContentItem(_code("22637-3", "Pathology report final diagnosis", "LN"),
                            _code(review.final_diagnosis, show(review.final_diagnosis)), contains)
    final.ObservationDateTime = _dt(review.signed_at)
    items.append(final)
    items.append(_text_item(_code("FINAL-DX-TEXT", "Final diagnosis (text)"), show(review.final_diagnosis), contains))
    items.append(CodeContentItem(_code("AGREES-WITH-AI", "Final diagnosis agrees with AI"),
                                 codes.SCT.Yes if review.agrees_with_ai else codes.SCT.No, contains))
    for value, code, meaning in ((review.override_reason, "OVERRIDE-REASON", "Reason for overriding the AI"),
                                 (review.uncertainty_note, "UNCERTAINTY-NOTE", "Note on an uncertain AI result"),
                                 (review.comment, "COMMENT", "Comment"),
                                 (review.amendment_reason, "AMENDMENT-REASON", "Reason for the amendment")):
        if value:
            items.append(_text_item(_code(code, meaning), value, contains))
    items.append(_pname_item(_code("SIGNED-BY", "Signed by"), signer, contains))
    items.append(DateTimeContentItem(_code("SIGNED-AT", "Signed at (UTC)"), review.signed_at, contains))
    items.append(_text_item(_code("REVIEW-VERSION", "Sign-off version"), str(review.version), contains))
    if review.content_sha256:
        items.append(_text_item(_code("REVIEW-SHA256", "Sign-off content SHA-256"), review.content_sha256,
                                contains))
    root.ContentSequence = items

    # highdicom takes patient and study from its first evidence item; the case has no DICOM evidence
    # of its own, so a stand-in carries the patient, and is dropped from the evidence lists after.
    stand_in = Dataset()
    stand_in.PatientName = _patient_pn(patient)
    stand_in.PatientID = dicom_value(patient.mrn, "LO")
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sr = ComprehensiveSR(
            evidence=[stand_in], content=root, series_instance_uid=series_uid, series_number=900,
            sop_instance_uid=sr_uid(review.version), instance_number=review.version, manufacturer="oncoscope",
            is_complete=True, is_final=True, is_verified=True,
            institution_name=dicom_value(institution, "LO") if institution else None,
            verifying_observer_name=dicom_value(signer, "PN") or "^",
            verifying_organization=dicom_value(institution or "oncoscope", "LO"),
            previous_versions=previous or None, specific_character_set="ISO_IR 192",
            series_description="oncoscope signed result", manufacturer_model_name=dicom_value(model_id, "LO"),
            software_versions=dicom_value(f"oncoscope {_package_version()}", "LO"),
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
    and the study UID when given; otherwise ``patient_name`` is ``Family^Given`` or free text (all
    family name). Returns the pydicom Dataset."""
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
    else:
        patient_name = dicom_value((patient_name or "").split("^"), "PN")
    digest = hashlib.sha256(rgb.tobytes() + repr(rgb.shape).encode()).hexdigest()
    study_uid = dicom_value(study_uid or _uid("sc-study", digest), "UI")
    # A smear field is a slide: SLIDE coordinates, with the image digest standing in for the slide id.
    specimen = SpecimenDescription(specimen_id=f"field-{digest[:12]}", specimen_uid=_uid("specimen", study_uid, digest),
                                   specimen_short_description="Peripheral blood smear field")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc = SCImage(pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="SLIDE",
                     container_identifier=f"field-{digest[:12]}", specimen_descriptions=[specimen],
                     study_instance_uid=study_uid, series_instance_uid=_uid("sc-series", study_uid),
                     series_number=901, sop_instance_uid=_uid("sc", study_uid, digest), instance_number=1,
                     manufacturer="oncoscope", patient_id=dicom_value(patient_id, "LO"), patient_name=patient_name or None,
                     patient_birth_date=_da(birth_date) or None, patient_sex=(sex or None),
                     specific_character_set="ISO_IR 192")
    # Deterministic dates: none is known for a plain upload, so the Type 3 capture date/time are dropped.
    for kw in ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"):
        if kw in sc:
            del sc[kw]
    return sc


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
    from ..imaging.imageio import load_image

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
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):  # the SEG copies them
        if not is_dicom_uid(src.get(kw)):
            raise DicomExportError(f"The source image's {kw} is not a valid DICOM UID, so a SEG cannot reference it.")
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
    mask = _fit_mask(mask > 0, target)
    digest = hashlib.sha256(np.packbits(mask).tobytes() + repr(mask.shape).encode()).hexdigest()
    algo = hd.AlgorithmIdentificationSequence(name=dicom_value(model_id, "LO"),
                                              family=codes.cid7162.ArtificialIntelligence,
                                              version=dicom_value(model_version or "unknown", "LO"))
    desc = SegmentDescription(segment_number=1, segment_label=dicom_value(segment_label, "LO"),
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
            instance_number=1, manufacturer="oncoscope", manufacturer_model_name=dicom_value(model_id, "LO"),
            software_versions=dicom_value(model_version or _package_version(), "LO"), device_serial_number="0",
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
