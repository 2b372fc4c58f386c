"""``/patients``: search, create, read, update, and (administrators) who may see a patient."""

from __future__ import annotations

from flask import g, request

from ...store import patients as patient_store
from .. import audit
from ..errors import ApiError
from ..helpers import db
from .core import api, committed
from .inputs import json_body, page_args, patient_or_404, require_role, validate_fields
from .schemas import PAGE_PARAMS
from .serializers import patient_json

EDITABLE = ("mrn", "family_name", "given_name", "birth_date", "sex", "notes")


def _patient_error(exc: patient_store.PatientError) -> ApiError:
    """A duplicate MRN is a conflict (409); anything else is invalid input (422)."""
    dup = "already exists" in str(exc)
    return ApiError(409 if dup else 422, "conflict" if dup else "invalid", str(exc), exc.field)


@api("/patients", "GET", summary="List or search patients (name or MRN)", tag="patients", response="PatientPage",
     query=[{"name": "q", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 100}}] + PAGE_PARAMS)
def list_patients():
    page, per_page = page_args()
    q = request.args.get("q", "")
    if len(q) > 100:
        raise ApiError(400, "invalid_parameter", "q is limited to 100 characters.", "q")
    res = patient_store.search(db(), g.api_user, q, page, per_page)
    audit.subject(shown_patients=[p.id for p in res.items])
    return {"items": [patient_json(p) for p in res.items], "page": res.page, "per_page": per_page,
            "pages": res.pages, "total": res.total}


@api("/patients", "POST", summary="Create a patient", tag="patients", response="Patient", status=201,
     body="PatientInput", idempotent_key=True, errors={409: "A patient with this MRN already exists"})
def create_patient():
    require_role("edit")
    data = validate_fields(json_body(), "PatientInput")
    with committed(patient_store.PatientError, _patient_error) as s:
        p = patient_store.create(s, g.api_user, data)
    audit.subject(patient_id=p.id, resource=("patient", p.id))
    return patient_json(p)


@api("/patients/{patient_id}", "GET", summary="Get a patient", tag="patients", response="Patient")
def get_patient(patient_id: int):
    return patient_json(patient_or_404(patient_id))


@api("/patients/{patient_id}", "PATCH", summary="Update a patient", tag="patients", response="Patient",
     body="PatientPatch", errors={409: "A patient with this MRN already exists"})
def update_patient(patient_id: int):
    require_role("edit")
    p = patient_or_404(patient_id)
    data = validate_fields(json_body(), "PatientPatch")
    merged = {k: getattr(p, k) for k in EDITABLE} | data
    with committed(patient_store.PatientError, _patient_error) as s:
        patient_store.update(s, p, merged)
    return patient_json(p)


@api("/patients/{patient_id}/doctors", "PUT", summary="Set which doctors may see a patient (administrators)",
     tag="patients", response="DoctorList", body="DoctorList", errors={403: "Administrators only"})
def set_patient_doctors(patient_id: int):
    if not g.api_user.is_admin:
        raise ApiError(403, "forbidden", "Only administrators assign patients.")
    p = patient_or_404(patient_id)
    data = json_body()
    ids = data.get("doctor_ids")
    if set(data) - {"doctor_ids"} or not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= 2**31 - 1 for i in ids) or len(ids) > 1000:
        raise ApiError(422, "invalid", "Send {\"doctor_ids\": [user ids]}.", "doctor_ids")
    patient_store.set_doctors(db(), p, ids)
    db().commit()
    db().refresh(p)
    return {"doctor_ids": sorted(d.id for d in p.doctors)}
