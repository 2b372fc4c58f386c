"""Cases: a patient's cases, the case history, uploads, retries, sign-off, deletion."""

from __future__ import annotations

import datetime as dt
import json

from flask import Response, g, request

from ...analyzers import registry
from ...store import cases as case_store
from ...store import workflow
from .. import audit
from ..errors import ApiError
from ..helpers import db, files, notify_workers, settings
from .core import api, committed
from .inputs import case_or_404, json_body, page_args, patient_or_404, require_role, validate_fields
from .schemas import ID, PAGE_PARAMS
from .serializers import case_json

STATUSES = ["open", "analysing", "ready", "signed"]
HISTORY_QUERY = [{"name": "status", "in": "query", "required": False, "schema": {"type": "string", "enum": STATUSES}},
                 {"name": "diagnosis", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 64}},
                 {"name": "doctor", "in": "query", "required": False, "schema": ID},
                 {"name": "from", "in": "query", "required": False, "schema": {"type": "string", "format": "date"}},
                 {"name": "to", "in": "query", "required": False, "schema": {"type": "string", "format": "date"}},
                 {"name": "q", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 100}}]


def _invalid(exc: case_store.CaseError) -> ApiError:
    return ApiError(422, "invalid", str(exc), exc.field)


@api("/patients/{patient_id}/cases", "GET", summary="List a patient's cases", tag="cases", response="CasePage",
     query=PAGE_PARAMS)
def list_patient_cases(patient_id: int):
    p = patient_or_404(patient_id)
    page, per_page = page_args()
    items = p.cases
    total = len(items)
    pages = max(1, -(-total // per_page))
    chunk = items[(page - 1) * per_page: page * per_page]
    return {"items": [case_json(c) for c in chunk], "page": page, "per_page": per_page, "pages": pages,
            "total": total}


@api("/patients/{patient_id}/cases", "POST", summary="Create a case (then upload images to it)", tag="cases",
     response="Case", status=201, body="CaseInput", idempotent_key=True)
def create_case(patient_id: int):
    require_role("edit")
    p = patient_or_404(patient_id)
    data = validate_fields(json_body(), "CaseInput")
    with committed(case_store.CaseError, _invalid) as s:
        c = case_store.create_case(s, g.api_user, p, data["analyzer_id"], data.get("clinical_note", ""),
                                   data.get("priority", "routine"))
    audit.subject(resource=("case", c.id))
    return case_json(c)


def _history_filters(a) -> dict:
    """The history filters from the query, each checked (400 naming the parameter)."""
    def date(name):
        v = a.get(name)
        if not v:
            return None
        try:
            return dt.date.fromisoformat(v)
        except ValueError:
            raise ApiError(400, "invalid_parameter", f"{name} must be a date (YYYY-MM-DD).", name) from None

    status = a.get("status", "")
    if status and status not in STATUSES:
        raise ApiError(400, "invalid_parameter", "status must be open, analysing, ready or signed.", "status")
    doctor = a.get("doctor")
    if doctor is not None and (not doctor.isdigit() or not 1 <= int(doctor) <= 2**31 - 1):
        raise ApiError(400, "invalid_parameter", "doctor must be a user id.", "doctor")
    q, diagnosis = a.get("q", ""), a.get("diagnosis", "")
    if len(q) > 100 or len(diagnosis) > 64:
        raise ApiError(400, "invalid_parameter", "q or diagnosis is too long.", "q" if len(q) > 100 else "diagnosis")
    return {"status": status, "diagnosis": diagnosis, "doctor_id": int(doctor) if doctor else None,
            "date_from": date("from"), "date_to": date("to"), "text": q}


@api("/cases", "GET", summary="Case history with filters (status, final diagnosis, doctor, dates, patient)",
     tag="cases", response="CasePage", query=HISTORY_QUERY + PAGE_PARAMS)
def list_cases():
    page, per_page = page_args()
    res = case_store.history(db(), g.api_user, **_history_filters(request.args), page=page, per_page=per_page)
    audit.subject(shown_cases=[c.id for c in res.items])
    return {"items": [case_json(c) for c in res.items], "page": res.page, "per_page": per_page, "pages": res.pages,
            "total": res.total}


def _not_failed(_exc) -> ApiError:
    return ApiError(409, "not_failed", "Only failed analyses of unsigned cases can be retried.")


@api("/cases/{case_id}/images/{image_id}/retry", "POST", summary="Re-queue a failed analysis", tag="cases",
     response="Case", errors={409: "The analysis has not failed, or the case is signed"})
def retry_analysis(case_id: int, image_id: int):
    c = case_or_404(case_id, "edit")
    img = next((i for i in c.images if i.id == image_id), None)
    if img is None or img.analysis is None:
        raise ApiError(404, "not_found", f"No image {image_id} in case {c.id}.")
    with committed(case_store.CaseError, _not_failed) as s:
        if img.analysis.job_status != "failed":
            raise case_store.CaseError("not failed")
        case_store.retry_failed(s, img.analysis)  # refuses a signed case
    notify_workers()
    return case_json(c)


@api("/cases/{case_id}", "GET", summary="Get a case: job status, AI results, reviews", tag="cases", response="Case")
def get_case(case_id: int):
    return case_json(case_or_404(case_id))


@api("/cases/{case_id}/images", "POST", summary="Upload one or more images (multipart field 'images')",
     tag="cases", response="UploadResult", multipart=True, idempotent_key=True)
def upload_images(case_id: int):
    c = case_or_404(case_id, "edit")
    limit = settings().max_upload_mb * 1024 * 1024
    uploads = [(f.filename or "image", f.stream.read(limit + 1)) for f in request.files.getlist("images") if f]
    if not uploads:
        raise ApiError(422, "no_files", "Send the images as multipart/form-data field 'images'.", "images")
    s = db()
    try:
        out = case_store.add_images(s, files(), c, g.api_user, uploads, limit)
        case_store.commit_upload(s, files(), out)  # commits, or removes the files it stored
    except case_store.CaseGone as exc:
        s.rollback()
        raise ApiError(404, "not_found", str(exc)) from None
    except case_store.CaseError as exc:
        s.rollback()
        raise ApiError(409, "case_signed", str(exc)) from None
    notify_workers()
    body = {"added": [i.id for i in out.added], "duplicates": out.duplicates,
            "errors": [{"file": n, "message": m} for n, m in out.errors], "case": case_json(c)}
    if not out.added and not out.duplicates:
        return Response(json.dumps(body, sort_keys=True), status=422, mimetype="application/json")
    return body


def _not_signable(exc: case_store.CaseError) -> ApiError:
    if exc.field is None:  # about the case's state, not the input
        return ApiError(409, "case_not_signable", str(exc))
    return _invalid(exc)


@api("/cases/{case_id}/sign", "POST", summary="Sign (or amend) the diagnosis", tag="cases", response="Case",
     body="SignInput", errors={409: "Images are still being analysed, or the case changed since the given revision"})
def sign_case(case_id: int):
    c = case_or_404(case_id, "sign")
    data = validate_fields(json_body(), "SignInput")
    labels = case_store.diagnosis_labels(registry.get(c.analyzer_id))
    with committed(case_store.CaseError, _not_signable) as s:
        workflow.sign(s, c, g.api_user, data.get("final_diagnosis", ""), labels, comment=data.get("comment", ""),
                      override_reason=data.get("override_reason", ""),
                      uncertainty_note=data.get("uncertainty_note", ""),
                      amendment_reason=data.get("amendment_reason", ""), revision=data.get("revision"),
                      confirm_unverified=data.get("confirm_unverified", False),
                      blast_flag_pct=settings().blast_flag_pct)
    return case_json(c)


def _not_empty(exc: case_store.CaseError) -> ApiError:
    return ApiError(409, "not_empty", str(exc))


@api("/cases/{case_id}", "DELETE", summary="Delete an empty case (no images, never signed)", tag="cases",
     status=204, media="text/plain", errors={409: "The case holds images or was signed"})
def delete_case(case_id: int):
    c = case_or_404(case_id, "edit")
    with committed(case_store.CaseError, _not_empty) as s:
        case_store.delete_empty_case(s, c)
    return Response(status=204, mimetype="text/plain")  # as documented (Flask's default would be text/html)
