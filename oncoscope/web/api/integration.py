"""Hospital integration over the API: a patient's studies in the PACS (QIDO-RS), retrieving series into
a case (WADO-RS), the DICOM inbox, and sending a case's results again. The same services, rules and
audit actions as the pages (web/integration)."""

from __future__ import annotations

from flask import g

from ...analyzers import registry
from ...imaging.dicom import is_dicom_uid
from ...services import deliveries, pacs
from ...services.dicomweb import DicomWebError
from ...store import receiving
from ...store.models import Delivery
from .. import audit
from ..errors import ApiError
from ..helpers import db, ext, files, notify_workers, settings
from .core import api
from .inputs import case_or_404, json_body, patient_or_404, require_role, validate_fields
from .serializers import case_json, iso

PACS_ERRORS = {409: "No PACS is configured (ONCOSCOPE_DICOMWEB_URL)", 502: "The PACS failed or cannot be reached"}


def _pacs_error(exc: DicomWebError) -> ApiError:
    if not settings().dicomweb_url:
        return ApiError(409, "no_pacs", str(exc))
    return ApiError(502, "pacs_error", str(exc))


@api("/patients/{patient_id}/pacs/studies", "GET", summary="The patient's studies (and their series) in the "
     "PACS, by Patient ID = MRN (QIDO-RS)", tag="pacs", response="PacsStudyList", errors=PACS_ERRORS)
def pacs_studies(patient_id: int):
    require_role("edit")
    p = patient_or_404(patient_id)
    try:
        found = pacs.studies(settings(), p.mrn)
    except DicomWebError as exc:
        raise _pacs_error(exc) from None
    audit.subject(studies=len(found))
    return {"items": [{"study_uid": st.study_uid, "date": st.date, "description": st.description,
                       "accession": st.accession, "modalities": st.modalities,
                       "series": [{"series_uid": se.series_uid, "modality": se.modality, "description": se.description,
                                   "body_part": se.body_part, "instance_count": se.instance_count}
                                  for se in st.series]} for st in found]}


@api("/patients/{patient_id}/pacs/retrieve", "POST", summary="Retrieve series of one of the patient's studies "
     "from the PACS (WADO-RS) into the study's case, analysed by the chosen analyzer", tag="pacs",
     response="RetrieveResult", body="RetrieveInput", errors=PACS_ERRORS)
def pacs_retrieve(patient_id: int):
    require_role("edit")
    p = patient_or_404(patient_id)
    data = validate_fields(json_body(), "RetrieveInput")
    for uid in (data["study_uid"], *data["series_uids"]):
        if not is_dicom_uid(uid):
            raise ApiError(422, "invalid", f"{uid!r} is not a DICOM UID.", "study_uid"
                           if uid == data["study_uid"] else "series_uids")
    if data["analyzer_id"] not in registry.available():
        raise ApiError(422, "invalid", f"analyzer_id must be one of {', '.join(registry.available())}.", "analyzer_id")
    try:
        got = pacs.retrieve(settings(), ext()["sessions"], files(), g.api_user, p.mrn, data["study_uid"],
                            data["series_uids"], data["analyzer_id"])
    except DicomWebError as exc:
        raise _pacs_error(exc) from None
    notify_workers()
    audit.subject(study_uid=data["study_uid"], filed=got.filed, refused=len(got.refused), cases=sorted(got.case_ids))
    return {"filed": got.filed, "duplicates": got.duplicates, "inbox": got.inbox, "refused": got.refused,
            "case_ids": sorted(got.case_ids)}


@api("/dicom-inbox", "GET", summary="Received DICOM studies waiting to be filed (no routing rule matched, or "
     "their case takes no more images), of patients the caller may see", tag="pacs", response="InboxList")
def dicom_inbox():
    require_role("edit")
    studies = receiving.inbox(db(), g.api_user)
    audit.subject(studies=len(studies))
    return {"items": [{"study_uid": st.study_uid, "patient_id": st.patient.id if st.patient else None,
                       "instances": st.count, "modality": st.modality, "body_part": st.body_part,
                       "description": st.description, "source": st.source, "received_at": iso(st.received_at),
                       "reason": st.reason} for st in studies]}


@api("/cases/{case_id}/deliveries/{delivery_id}/retry", "POST", summary="Send a waiting or failed delivery "
     "(SR/SEG to the PACS, ORU to the LIS) again now", tag="pacs", response="Case",
     errors={409: "The delivery was already sent, or is waiting for its next try"})
def retry_delivery(case_id: int, delivery_id: int):
    c = case_or_404(case_id, "edit")
    d = db().get(Delivery, delivery_id)
    if d is None or d.case_id != c.id:
        raise ApiError(404, "not_found", f"No delivery {delivery_id} of case {c.id}.")
    try:
        deliveries.send_again(db(), d)
        db().commit()
    except ValueError as exc:
        db().rollback()
        raise ApiError(409, "not_failed", str(exc)) from None
    pump = ext().get("deliveries")
    if pump is not None:
        pump.notify()
    audit.subject(resource=("delivery", d.id), kind=d.kind)
    return case_json(c)
