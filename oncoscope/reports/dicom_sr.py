"""The DICOM Comprehensive SR (SOP class 1.2.840.10008.5.1.4.1.1.88.33) of a signed case:
:func:`case_to_sr`.

The content tree, under a "Pathology study" container: who observed (the signing physician and
the AI device), the algorithm, one measurement group per image, the AI call for the case, and the
physician's sign-off. UIDs and dates come from stored rows only, so exporting the same signed
version twice gives the same bytes. Shared DICOM helpers are in :mod:`.dicom_common`.

pydicom and highdicom are imported inside the functions that use them: importing them costs
start-up time (about 0.3 s together), which a process that never writes DICOM does not pay.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..store.cases import label_names
from .case_facts import first_model_analysis, image_status, is_done
from .dicom_common import (SEX_CODE, DicomExportError, case_study_uid, code, derived_uid, dicom_date,
                           dicom_datetime, dicom_time, dicom_value, package_version, patient_pn, pin_times,
                           private_scheme_item, to_part10)

COMPREHENSIVE_SR_UID = "1.2.840.10008.5.1.4.1.1.88.33"


@dataclass(frozen=True)
class _Model:
    """The AI model the SR names: the case's analyzer id, and the version and files digest it ran with."""

    id: str
    version: str
    sha256: str


@dataclass(frozen=True)
class _Ids:
    """The study the SR belongs to, and the series that holds every signed version of it."""

    study: str
    series: str
    case_id: int

    def sr(self, version: int) -> str:
        return derived_uid("sr", self.study, self.case_id, version)


def case_to_sr(case, analyzer=None, *, study_uid: str | None = None, institution: str | None = None) -> bytes:
    """The signed result of ``case`` (an ORM :class:`~oncoscope.store.models.Case`) as a DICOM
    Comprehensive SR, Part-10 bytes.

    ``analyzer`` (optional) supplies display names and the model name. ``study_uid``: the Study
    Instance UID of the DICOM source images when the case came from DICOM (one valid UID, else
    :class:`DicomExportError`); otherwise a deterministic UID is derived from the case
    (:func:`~.dicom_common.case_study_uid`). UIDs and dates come from
    stored rows only, so exporting the same signed version twice gives the same document.
    An amended case lists the earlier versions' SR documents as predecessors.
    """
    review = case.current_review
    if review is None:
        raise DicomExportError("The case is not signed: only a signed result can be exported.")
    names = label_names(analyzer)
    signer = review.signed_by.name if review.signed_by else ""
    model = _model(case, analyzer)
    study = dicom_value(study_uid or case_study_uid(case), "UI")
    ids = _Ids(study, derived_uid("sr-series", study, case.id), case.id)
    root = _content_tree(case, review, analyzer, model, names, signer)
    sr = _document(case, review, root, ids, model, signer, institution)
    _finish(sr, case, review)
    return to_part10(sr)


def _model(case, analyzer) -> _Model:
    a0 = first_model_analysis(case)
    version = (a0.model_version if a0 else None) or getattr(analyzer, "version", "") or ""
    sha = (a0.model_sha256 if a0 else None) or (analyzer.model_info.sha256 if analyzer is not None and
                                                hasattr(analyzer, "model_info") else "")
    return _Model(case.analyzer_id, version, sha)


def _show(names: dict[str, str], label) -> str:
    return names.get(label, label) if label else ""


# ----------------------------------------------------------------------------- content tree
def _content_tree(case, review, analyzer, model: _Model, names: dict[str, str], signer: str):
    from highdicom.sr import ContainerContentItem

    root = ContainerContentItem(name=code("11526-1", "Pathology study", "LN"))
    root.ContentSequence = [
        *_observer_items(analyzer, model, signer),
        *_algorithm_items(model),
        *(_image_group(n, img, names) for n, img in enumerate(case.images, start=1)),
        *_ai_call_items(review, names),
        *_sign_off_items(review, names, signer),
    ]
    return root


def _text_item(name, value, relationship):
    from highdicom.sr import TextContentItem

    return TextContentItem(name, dicom_value(value, "UT") or "-", relationship)  # TEXT may not be empty


def _pname_item(name, value, relationship):
    from highdicom.sr import PnameContentItem

    return PnameContentItem(name, dicom_value(value, "PN") or "^", relationship)


def _observer_items(analyzer, model: _Model, signer: str) -> list:
    """Observation context: the signing physician, then the AI device."""
    from highdicom.sr import CodeContentItem, RelationshipTypeValues, UIDRefContentItem
    from pydicom.sr.codedict import codes

    obs_ctx = RelationshipTypeValues.HAS_OBS_CONTEXT
    device_uid = derived_uid("device", model.id, model.version, model.sha256)
    return [
        CodeContentItem(codes.DCM.ObserverType, codes.DCM.Person, obs_ctx),
        _pname_item(codes.DCM.PersonObserverName, signer, obs_ctx),
        CodeContentItem(codes.DCM.ObserverType, codes.DCM.Device, obs_ctx),
        UIDRefContentItem(codes.DCM.DeviceObserverUID, device_uid, obs_ctx),
        _text_item(codes.DCM.DeviceObserverName, model.id, obs_ctx),
        _text_item(codes.DCM.DeviceObserverManufacturer, "oncoscope", obs_ctx),
        _text_item(codes.DCM.DeviceObserverModelName, getattr(analyzer, "name", None) or model.id, obs_ctx),
    ]


def _algorithm_items(model: _Model) -> list:
    from highdicom.sr import RelationshipTypeValues
    from pydicom.sr.codedict import codes

    contains = RelationshipTypeValues.CONTAINS
    items = [_text_item(codes.DCM.AlgorithmName, model.id, contains),
             _text_item(codes.DCM.AlgorithmVersion, model.version or "unknown", contains)]
    if model.sha256:
        items.append(_text_item(code("MODEL-SHA256", "Model files SHA-256"), model.sha256, contains))
    return items


def _image_group(n: int, img, names: dict[str, str]):
    """One measurement group per image: its identity, AI status, and (when done) the AI result."""
    from highdicom.sr import ContainerContentItem, RelationshipTypeValues
    from pydicom.sr.codedict import codes

    contains = RelationshipTypeValues.CONTAINS
    a = img.analysis
    group = ContainerContentItem(name=codes.DCM.MeasurementGroup, relationship_type=contains)
    items = [_text_item(codes.DCM.TrackingIdentifier, f"Field {n}: {img.original_filename or img.sha256[:12]}",
                        contains),
             _text_item(code("IMAGE-SHA256", "Image file SHA-256"), img.sha256, contains),
             _text_item(code("AI-STATUS", "AI result status"), image_status(a) or "unknown", contains)]
    if is_done(a):
        items += _image_result_items(a, names)
    group.ContentSequence = items
    return group


def _image_result_items(a, names: dict[str, str]) -> list:
    """The AI result of one done analysis: class, probabilities, cell count, version, messages."""
    from highdicom.sr import CodeContentItem, NumContentItem, RelationshipTypeValues
    from pydicom.sr.codedict import codes

    contains = RelationshipTypeValues.CONTAINS
    no_units, cells_unit = code("1", "no units", "UCUM"), code("{cells}", "cells", "UCUM")
    items = []
    if a.label:
        items.append(CodeContentItem(codes.DCM.Finding, code(a.label, _show(names, a.label)), contains))
    for label, p in (a.probabilities or {}).items():
        items.append(NumContentItem(code(f"P-{label}", f"Probability of {_show(names, label)}"), float(p), no_units,
                                    relationship_type=contains))
    if a.malignant_probability is not None:
        items.append(NumContentItem(code("P-MALIGNANT", "Probability of malignancy"),
                                    float(a.malignant_probability), no_units, relationship_type=contains))
    if a.cell_count is not None:
        items.append(NumContentItem(code("CELL-COUNT", "White blood cell count"), int(a.cell_count), cells_unit,
                                    relationship_type=contains))
    if a.model_version:
        items.append(_text_item(codes.DCM.AlgorithmVersion, a.model_version, contains))
    items += [_text_item(code("AI-MESSAGE", "AI message"), str(m), contains)
              for m in (a.messages or []) if str(m).strip()]
    return items


def _ai_call_items(review, names: dict[str, str]) -> list:
    """The AI call over the case, as the physician saw it when signing."""
    from highdicom.sr import CodeContentItem, RelationshipTypeValues

    contains = RelationshipTypeValues.CONTAINS
    items = []
    if review.ai_label:
        items.append(CodeContentItem(code("AI-CASE-CLASS", "AI class for the case"),
                                     code(review.ai_label, _show(names, review.ai_label)), contains))
    items.append(_text_item(code("AI-CASE-STATUS", "AI status for the case"), review.ai_status or "unknown",
                            contains))
    return items


_REVIEW_TEXTS = (("override_reason", "OVERRIDE-REASON", "Reason for overriding the AI"),
                 ("uncertainty_note", "UNCERTAINTY-NOTE", "Note on an uncertain AI result"),
                 ("comment", "COMMENT", "Comment"),
                 ("amendment_reason", "AMENDMENT-REASON", "Reason for the amendment"))


def _sign_off_items(review, names: dict[str, str], signer: str) -> list:
    """The physician's final diagnosis, its relation to the AI call, the notes, and who signed when."""
    from highdicom.sr import CodeContentItem, DateTimeContentItem, RelationshipTypeValues
    from pydicom.sr.codedict import codes

    contains = RelationshipTypeValues.CONTAINS
    final_text = _show(names, review.final_diagnosis)
    final = CodeContentItem(code("22637-3", "Pathology report final diagnosis", "LN"),
                            code(review.final_diagnosis, final_text), contains)
    final.ObservationDateTime = dicom_datetime(review.signed_at)
    items = [final,
             _text_item(code("FINAL-DX-TEXT", "Final diagnosis (text)"), final_text, contains),
             CodeContentItem(code("AGREES-WITH-AI", "Final diagnosis agrees with AI"),
                             codes.SCT.Yes if review.agrees_with_ai else codes.SCT.No, contains)]
    items += [_text_item(code(value_code, meaning), getattr(review, field), contains)
              for field, value_code, meaning in _REVIEW_TEXTS if getattr(review, field)]
    items += [_pname_item(code("SIGNED-BY", "Signed by"), signer, contains),
              DateTimeContentItem(code("SIGNED-AT", "Signed at (UTC)"), review.signed_at, contains),
              _text_item(code("REVIEW-VERSION", "Sign-off version"), str(review.version), contains)]
    if review.content_sha256:
        items.append(_text_item(code("REVIEW-SHA256", "Sign-off content SHA-256"), review.content_sha256,
                                contains))
    return items


# ----------------------------------------------------------------------------- the document
def _document(case, review, root, ids: _Ids, model: _Model, signer: str, institution: str | None):
    from highdicom.sr import ComprehensiveSR

    stand_in, previous = _patient_stand_in(case, ids.study), _previous_versions(case, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ComprehensiveSR(
            evidence=[stand_in], content=root, series_instance_uid=ids.series,
            series_number=900, sop_instance_uid=ids.sr(review.version), instance_number=review.version,
            manufacturer="oncoscope", is_complete=True, is_final=True, is_verified=True,
            institution_name=dicom_value(institution, "LO") if institution else None,
            verifying_observer_name=dicom_value(signer, "PN") or "^",
            verifying_organization=dicom_value(institution or "oncoscope", "LO"),
            previous_versions=previous or None, specific_character_set="ISO_IR 192",
            series_description="oncoscope signed result", manufacturer_model_name=dicom_value(model.id, "LO"),
            software_versions=dicom_value(f"oncoscope {package_version()}", "LO"),
        )


def _patient_stand_in(case, study_uid: str):
    """highdicom takes patient and study from its first evidence item; the case has no DICOM evidence
    of its own, so a stand-in carries the patient, and is dropped from the evidence lists after."""
    from pydicom.dataset import Dataset
    from pydicom.uid import SecondaryCaptureImageStorage

    patient = case.patient
    stand_in = Dataset()
    stand_in.PatientName = patient_pn(patient)
    stand_in.PatientID = dicom_value(patient.mrn, "LO")
    stand_in.PatientBirthDate = dicom_date(patient.birth_date)
    stand_in.PatientSex = SEX_CODE.get(patient.sex, "")
    stand_in.StudyInstanceUID = study_uid
    stand_in.SeriesInstanceUID = derived_uid("stand-in", study_uid)
    stand_in.SOPInstanceUID = derived_uid("stand-in-sop", study_uid)
    stand_in.SOPClassUID = SecondaryCaptureImageStorage
    stand_in.AccessionNumber = ""
    stand_in.StudyID = str(case.id)[:16]
    stand_in.StudyDate = dicom_date(case.created_at)
    stand_in.StudyTime = dicom_time(case.created_at)
    stand_in.ReferringPhysicianName = ""
    return stand_in


def _previous_versions(case, ids: _Ids) -> list:
    """References to the SR documents of the earlier signed versions (predecessors of an amendment)."""
    from pydicom.dataset import Dataset

    previous = []
    for old in case.reviews[:-1]:
        p = Dataset()
        p.SOPClassUID, p.SOPInstanceUID = COMPREHENSIVE_SR_UID, ids.sr(old.version)
        p.StudyInstanceUID, p.SeriesInstanceUID = ids.study, ids.series
        previous.append(p)
    return previous


def _finish(sr, case, review) -> None:
    """Drop the stand-in evidence, and date everything from the stored sign-off times."""
    for kw in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        if kw in sr:
            del sr[kw]
    signed = review.signed_at
    sr.VerifyingObserverSequence[0].VerificationDateTime = dicom_datetime(signed)
    pin_times(sr, signed)
    first_signed = case.reviews[0].signed_at or signed  # the series holds every version of the document
    sr.SeriesDate, sr.SeriesTime = dicom_date(first_signed), dicom_time(first_signed)
    sr.CodingSchemeIdentificationSequence = [private_scheme_item()]
