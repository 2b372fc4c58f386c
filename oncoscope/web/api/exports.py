"""A case's reports: PDF, FHIR, HL7 v2, DICOM SR and SEG, and sending HL7 (``services.exports``
builds them; a refusal there is answered here with the API's error codes)."""

from __future__ import annotations

from flask import request

from ...services import exports
from ..errors import ApiError, error_response
from ..helpers import download, files, settings
from .core import api, bp
from .inputs import case_or_404

REFUSAL_CODES = {exports.NotSigned: "not_signed", exports.NoMask: "no_mask"}


@bp.errorhandler(exports.ExportRefused)
def _refused(exc: exports.ExportRefused):
    return error_response(409, REFUSAL_CODES[type(exc)], str(exc))


@bp.errorhandler(exports.ImageNotInCase)
def _no_such_image(exc: exports.ImageNotInCase):
    return error_response(404, "not_found", str(exc))


@api("/cases/{case_id}/report.pdf", "GET", summary="The PDF report", tag="reports", media="application/pdf")
def case_report(case_id: int):
    c = case_or_404(case_id)
    return download(exports.pdf_report(c, files(), settings().clinic_name, version_in_name=False))


@api("/cases/{case_id}/fhir", "GET", summary="FHIR R4 Bundle of a signed case (DiagnosticReport, Observations, "
     "Media, Patient, Device, Practitioner)", tag="reports", media="application/fhir+json",
     errors={409: "The case is not signed"})
def case_fhir(case_id: int):
    c = case_or_404(case_id)
    return download(exports.fhir_bundle(c, files(), settings().clinic_name, request.host_url.rstrip("/")))


@api("/cases/{case_id}/hl7", "GET", summary="HL7 v2.5.1 ORU^R01 message of a signed case", tag="reports",
     media="application/hl7-v2", errors={409: "The case is not signed"})
def case_hl7(case_id: int):
    return download(exports.hl7_message(case_or_404(case_id)))


@api("/cases/{case_id}/dicom-sr", "GET", summary="DICOM Comprehensive SR of a signed case", tag="reports",
     media="application/dicom", errors={409: "The case is not signed"})
def case_dicom_sr(case_id: int):
    return download(exports.dicom_sr(case_or_404(case_id), settings().clinic_name))


@api("/cases/{case_id}/images/{image_id}/dicom-seg", "GET", summary="DICOM SEG of an image's cell mask",
     tag="reports", media="application/dicom", errors={409: "The image has no cell mask"})
def image_dicom_seg(case_id: int, image_id: int):
    return download(exports.dicom_seg(case_or_404(case_id), image_id, files()))


@api("/cases/{case_id}/hl7/send", "POST", summary="Send the ORU^R01 message to the configured HL7 destination (MLLP)",
     tag="reports", response="Hl7SendResult",
     errors={409: "The case is not signed, or no HL7 destination is configured",
             502: "The receiving system refused the message or could not be reached"})
def case_hl7_send(case_id: int):
    st = settings()
    delivery = exports.send_hl7(case_or_404(case_id, "edit"), st.hl7_host, st.hl7_port)
    if delivery.outcome == exports.NO_DESTINATION:
        raise ApiError(409, "hl7_not_configured", "No HL7 destination is configured (ONCOSCOPE_HL7_HOST/PORT).")
    if not delivery.sent:
        raise ApiError(502, "hl7_send_failed", delivery.detail)
    return {"sent": True, "ack": delivery.detail}
