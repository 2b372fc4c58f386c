"""A case's exports as plain values: the bytes, their media type and the file name to save them as.

Nothing here knows Flask: the case pages and the API both call these functions and only turn the
result into a download (``web.helpers.download``). The rules every export shares live here once:
only a signed case leaves the system (:class:`NotSigned`, raised before anything is built), and
every file is named ``oncoscope-case-<id>...`` so that downloads of different cases never collide.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from PIL import Image
from sqlalchemy.orm import object_session

from ..analyzers import registry
from ..reports.case_facts import preliminary_result
from ..reports.case_report import case_report_pdf
from ..reports.dicom_common import case_study_uid
from ..reports.dicom_seg import mask_to_seg
from ..reports.dicom_sr import case_to_sr
from ..reports.fhir import case_bundle, original_pngs
from ..reports.hl7v2 import HL7SendError, oru_r01, send_mllp
from ..store import cases as case_store
from ..store import workflow
from ..store.files import FileStore
from ..vocab import EXPORT_NEEDS_SIGNATURE

PDF = "application/pdf"
FHIR_JSON = "application/fhir+json"
HL7_V2 = "application/hl7-v2"
DICOM = "application/dicom"


@dataclass(frozen=True)
class Export:
    body: bytes
    media_type: str
    filename: str


class ExportRefused(Exception):
    """This case (or image) cannot give that export; the message says why, for people."""


class NotSigned(ExportRefused):
    def __init__(self, message: str = EXPORT_NEEDS_SIGNATURE):
        super().__init__(message)


class NoMask(ExportRefused):
    def __init__(self, message: str = "This image has no cell mask (not analysed, or out of domain)."):
        super().__init__(message)


class ImageNotInCase(LookupError):
    def __init__(self, case, image_id: int):
        super().__init__(f"No image {image_id} in case {case.id}.")


def _signed(case, preliminary_ok: bool = True) -> None:
    """Only a signed case leaves, or a preliminary result when the administrator releases them
    (store/workflow's setting; it is reported as preliminary: FHIR status, HL7 P)."""
    if case.status == "signed" and case.current_review is not None:
        return
    if preliminary_ok and preliminary_result(case) is not None and workflow.preliminary_release_allowed(
            object_session(case)):
        return
    raise NotSigned()


def pdf_report(case, files: FileStore, clinic: str, *, version_in_name: bool = True) -> Export:
    """The PDF report; a draft too (it says so). The case page names the version (``-v2``,
    ``-draft``) so that a doctor's downloads of one case stay apart; the API keeps its first name."""
    name = f"oncoscope-case-{case.id}"
    if version_in_name:
        name += f"-v{case.current_review.version}" if case.current_review else "-draft"
    return Export(case_report_pdf(case, files, clinic), PDF, f"{name}.pdf")


def fhir_bundle(case, files: FileStore, clinic: str, base_url: str) -> Export:
    """FHIR R4 Bundle with the signed PDF and the original images; ``base_url`` names its resources."""
    _signed(case)
    pdf = case_report_pdf(case, files, clinic)
    bundle = case_bundle(case, pdf, base_url=base_url, images=original_pngs(case, files))
    return Export(json.dumps(bundle, sort_keys=True).encode(), FHIR_JSON, f"oncoscope-case-{case.id}-fhir.json")


def hl7_message(case) -> Export:
    """HL7 v2.5.1 ORU^R01 message."""
    _signed(case)
    message = oru_r01(case, registry.get(case.analyzer_id))
    return Export(message.encode(), HL7_V2, f"oncoscope-case-{case.id}.hl7")


def dicom_sr(case, clinic: str) -> Export:
    """DICOM Comprehensive SR, in the study of the case's DICOM images when they came from one (signed
    reports only: the SR is what a PACS keeps)."""
    _signed(case, preliminary_ok=False)
    data = case_to_sr(case, registry.get(case.analyzer_id), study_uid=case_store.dicom_study_uid(case),
                      institution=clinic)
    return Export(data, DICOM, f"oncoscope-case-{case.id}-sr.dcm")


def dicom_seg(case, image_id: int, files: FileStore) -> Export:
    """DICOM SEG of one image's cell mask (signed or not: it is the model's output, not a diagnosis).

    Raises :class:`ImageNotInCase`, or :class:`NoMask` when the analysis stored no mask."""
    img = next((i for i in case.images if i.id == image_id), None)
    if img is None:
        raise ImageNotInCase(case, image_id)
    name = f"mask-{case.analyzer_id}"
    if not files.exists(img.sha256, name):
        raise NoMask()
    mask = np.asarray(Image.open(files.path(img.sha256, name))) > 127
    a = img.analysis
    data = mask_to_seg(files.path(img.sha256).read_bytes(), mask, case=case,
                       study_uid=img.dicom_study_uid or case_store.dicom_study_uid(case) or case_study_uid(case),
                       model_id=case.analyzer_id, model_version=(a.model_version if a else "") or "",
                       created_at=a.finished_at if a else None)
    return Export(data, DICOM, f"oncoscope-case-{case.id}-image-{img.id}-seg.dcm")


# ----------------------------------------------------------------------------- sending
SENT, NO_DESTINATION, FAILED = "sent", "no_destination", "failed"


@dataclass(frozen=True)
class Hl7Delivery:
    """What became of sending: ``SENT`` (``detail``: the receiver's ACK), ``NO_DESTINATION`` (none
    is configured; nothing was tried) or ``FAILED`` (``detail``: why, after the retries)."""

    outcome: str
    detail: str = ""

    @property
    def sent(self) -> bool:
        return self.outcome == SENT


def send_hl7(case, host: str, port: int) -> Hl7Delivery:
    """Send the ORU^R01 message over MLLP to the configured destination (``ONCOSCOPE_HL7_HOST/PORT``;
    empty or 0: none)."""
    _signed(case)
    if not host or not port:
        return Hl7Delivery(NO_DESTINATION)
    try:
        ack = send_mllp(oru_r01(case, registry.get(case.analyzer_id)), host, port)
    except HL7SendError as exc:
        return Hl7Delivery(FAILED, str(exc))
    return Hl7Delivery(SENT, ack)
