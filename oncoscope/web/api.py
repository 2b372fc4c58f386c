"""REST API ``/api/v1``: thin JSON endpoints over the same store functions and object-level
rules as the web pages. The OpenAPI 3.1 document is generated from the route declarations
below (``@api(...)``), so code and document cannot drift apart."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from functools import wraps

from flask import Blueprint, Response, g, jsonify, render_template, request
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from .. import __version__
from ..analyzers import registry
from ..store import cases as case_store
from ..store import patients as patient_store
from ..store import tokens as token_store
from ..store.models import IdempotencyRecord, utcnow
from . import audit, csrf
from .helpers import db, files, notify_workers, settings

bp = Blueprint("api", __name__, url_prefix="/api/v1")
csrf.exempt(bp)

PATHS: dict[str, dict] = {}


# ----------------------------------------------------------------------------- errors
class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


def error_response(status: int, code: str, message: str, field: str | None = None):
    resp = jsonify({"error": {"code": code, "message": message, "field": field}})
    resp.status_code = status
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="oncoscope"'
    return resp


@bp.errorhandler(ApiError)
def _api_error(e: ApiError):
    return error_response(e.status, e.code, e.message, e.field)


# ----------------------------------------------------------------------------- schemas
def _obj(props: dict, required: list[str] | None = None, **kw) -> dict:
    d = {"type": "object", "properties": props, **kw}
    if required:
        d["required"] = required
    return d


STR, INT, NUM, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
NSTR = {"type": ["string", "null"]}
NINT = {"type": ["integer", "null"]}
NNUM = {"type": ["number", "null"]}
DATETIME = {"type": ["string", "null"], "format": "date-time"}
# the store checks it (after trimming), so invalid MRNs get its message whatever the client validated
MRN_INPUT = {"type": "string", "minLength": 1, "maxLength": patient_store.MRN_MAX,
             "pattern": f"^{patient_store.MRN_PATTERN}$", "description": patient_store.MRN_RULE}
SCHEMAS: dict[str, dict] = {
    "Error": _obj({"error": _obj({"code": STR, "message": STR, "field": NSTR}, ["code", "message", "field"])},
                  ["error"]),
    "Patient": _obj({"id": INT, "mrn": STR, "family_name": STR, "given_name": STR,
                     "birth_date": {"type": ["string", "null"], "format": "date"},
                     "sex": {"type": "string", "enum": ["female", "male", "other", "unknown"]}, "notes": STR,
                     "created_at": DATETIME, "updated_at": DATETIME},
                    ["id", "mrn", "family_name", "given_name", "birth_date", "sex"]),
    "PatientInput": _obj({"mrn": MRN_INPUT,
                          "family_name": {"type": "string", "minLength": 1, "maxLength": 100},
                          "given_name": {"type": "string", "maxLength": 100},
                          "birth_date": {"type": ["string", "null"], "format": "date"},
                          "sex": {"type": "string", "enum": ["female", "male", "other", "unknown"]},
                          "notes": {"type": "string", "maxLength": 5000}}, ["mrn", "family_name"],
                         additionalProperties=False),
    "PatientPatch": _obj({"mrn": MRN_INPUT,
                          "family_name": {"type": "string", "minLength": 1, "maxLength": 100},
                          "given_name": {"type": "string", "maxLength": 100},
                          "birth_date": {"type": ["string", "null"], "format": "date"},
                          "sex": {"type": "string", "enum": ["female", "male", "other", "unknown"]},
                          "notes": {"type": "string", "maxLength": 5000}}, additionalProperties=False),
    "Analysis": _obj({"image_id": INT, "filename": STR, "width": INT, "height": INT, "sha256": STR,
                      "job_status": {"type": "string", "enum": ["queued", "running", "done", "failed", "retried"]},
                      "attempts": INT, "result_status": NSTR, "label": NSTR, "confidence": NNUM,
                      "malignant": {"type": ["boolean", "null"]}, "malignant_probability": NNUM,
                      "probabilities": {"type": ["object", "null"], "additionalProperties": NUM},
                      "cell_count": NINT, "cells": {"type": ["array", "null"], "items": {"type": "object"}},
                      "messages": {"type": ["array", "null"], "items": STR},
                      "model_version": NSTR, "model_sha256": NSTR, "finished_at": DATETIME},
                     ["image_id", "job_status"]),
    "Review": _obj({"version": INT, "final_diagnosis": STR, "agrees_with_ai": BOOL, "ai_label": NSTR,
                    "ai_status": NSTR, "override_reason": STR, "uncertainty_note": STR, "comment": STR,
                    "amendment_reason": STR, "signed_by": STR, "signed_at": DATETIME, "content_sha256": STR},
                   ["version", "final_diagnosis", "agrees_with_ai", "signed_by", "signed_at"]),
    "Case": _obj({"id": INT, "patient_id": INT, "analyzer_id": STR, "status": STR, "revision": INT, "clinical_note": STR,
                  "created_at": DATETIME, "final_diagnosis": NSTR,
                  "aggregate": _obj({"label": NSTR, "status": STR, "probabilities": {"type": "object"},
                                     "text": STR}),
                  "images": {"type": "array", "items": {"$ref": "#/components/schemas/Analysis"}},
                  "reviews": {"type": "array", "items": {"$ref": "#/components/schemas/Review"}}},
                 ["id", "patient_id", "analyzer_id", "status", "revision", "images", "reviews"]),
    "CaseInput": _obj({"analyzer_id": {"type": "string", "maxLength": 64},
                       "clinical_note": {"type": "string", "maxLength": 5000}}, ["analyzer_id"],
                      additionalProperties=False),
    "SignInput": _obj({"final_diagnosis": {"type": "string", "maxLength": 64},
                       "override_reason": {"type": "string", "maxLength": 5000},
                       "uncertainty_note": {"type": "string", "maxLength": 5000},
                       "comment": {"type": "string", "maxLength": 10000},
                       "amendment_reason": {"type": "string", "maxLength": 5000},
                       "revision": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1,
                                    "description": "The case revision the signer reviewed (from the Case). When "
                                                   "given, signing fails with 409 if images were added or the case "
                                                   "was signed since."}}, ["final_diagnosis"],
                      additionalProperties=False),
    "UploadResult": _obj({"added": {"type": "array", "items": INT}, "duplicates": {"type": "array", "items": STR},
                          "errors": {"type": "array", "items": _obj({"file": STR, "message": STR})},
                          "case": {"$ref": "#/components/schemas/Case"}}, ["added", "duplicates", "errors"]),
    "Analyzer": _obj({"id": STR, "name": STR, "version": STR, "modality": STR, "labels": {"type": "array", "items": STR},
                      "display_names": {"type": "object", "additionalProperties": STR},
                      "malignant_labels": {"type": "array", "items": STR}, "positive_term": STR,
                      "input_description": STR, "dicom_modalities": {"type": "array", "items": STR}, "sha256": STR,
                      "validation_summary": STR}, ["id", "name", "version", "labels"]),
}


def _page_schema(item: str) -> dict:
    return _obj({"items": {"type": "array", "items": {"$ref": f"#/components/schemas/{item}"}}, "page": INT,
                 "per_page": INT, "pages": INT, "total": INT}, ["items", "page", "per_page", "pages", "total"])


SCHEMAS["PatientPage"] = _page_schema("Patient")
SCHEMAS["CasePage"] = _page_schema("Case")
SCHEMAS["DoctorList"] = _obj({"doctor_ids": {"type": "array", "maxItems": 1000,
                                               "items": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}}},
                             ["doctor_ids"], additionalProperties=False)
SCHEMAS["Hl7SendResult"] = _obj({"sent": BOOL, "ack": STR}, ["sent", "ack"])
SCHEMAS["AnalyzerList"] = _obj({"items": {"type": "array", "items": {"$ref": "#/components/schemas/Analyzer"}}},
                               ["items"])


# ----------------------------------------------------------------------------- route declaration
def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _err(desc: str) -> dict:
    return {"description": desc, "content": {"application/json": {"schema": _ref("Error")}}}


def api(path: str, method: str, *, summary: str, tag: str, response: str | None = None, status: int = 200,
        body: str | None = None, multipart: bool = False, query: list[dict] | None = None,
        media: str = "application/json", idempotent_key: bool = False, public: bool = False,
        errors: dict[int, str] | None = None):
    """Register a Flask route and its OpenAPI operation in one place."""

    def deco(fn):
        flask_path = path
        params = []
        for seg in [p for p in path.split("/") if p.startswith("{")]:
            name = seg[1:-1]
            flask_path = flask_path.replace(seg, f"<int:{name}>")
            params.append({"name": name, "in": "path", "required": True,
                           "schema": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}})
        params += query or []
        if idempotent_key:
            params.append({"name": "Idempotency-Key", "in": "header", "required": False,
                           "schema": {"type": "string", "maxLength": 128},
                           "description": "Retries with the same key replay the first answer instead of acting twice."})
        op = {"summary": summary, "tags": [tag], "operationId": fn.__name__, "parameters": params, "responses": {}}
        if not public:
            op["security"] = [{"bearer": []}]
            op["responses"]["401"] = _err("Missing, invalid, revoked or expired token")
        if params and any(p["in"] == "path" for p in params):
            op["responses"]["404"] = _err("Not found, or not visible to this user")
        if body:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
            op["responses"]["422"] = _err("Validation error (see error.field)")
            op["responses"]["400"] = _err("The body is not a JSON object")
        if query:
            op["responses"]["400"] = _err("Invalid query parameter (see error.field)")
        if idempotent_key:
            op["responses"].setdefault("400", _err("Invalid Idempotency-Key"))
            op["responses"].setdefault("422", _err("Idempotency-Key reused for a different request"))
        for code, desc in (errors or {}).items():
            op["responses"][str(code)] = _err(desc)
        if multipart:
            op["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": _obj(
                {"images": {"type": "array", "items": {"type": "string", "contentMediaType": "application/octet-stream"}}},
                ["images"])}}}
            op["responses"]["409"] = _err("The case is signed")
            op["responses"]["422"] = {"description": "No image could be used (per-file reasons in errors), or no "
                                                     "files / a reused Idempotency-Key (Error shape)",
                                      "content": {"application/json": {"schema": {"oneOf": [_ref("UploadResult"),
                                                                                            _ref("Error")]}}}}
        ok = {"description": "OK"}
        if media == "application/json":
            if response:
                ok["content"] = {"application/json": {"schema": _ref(response)}}
            if method == "GET":
                op["responses"]["304"] = {"description": "Not modified (If-None-Match)"}
        else:
            ok["content"] = {media: {"schema": {"type": "string"}}}
        op["responses"][str(status)] = ok
        PATHS.setdefault(path, {})[method.lower()] = op

        @wraps(fn)
        def wrapper(*a, **kw):
            if not public:
                _authenticate()
            if idempotent_key and request.headers.get("Idempotency-Key"):
                return _idempotent(lambda: _finish(fn(*a, **kw), status, media))
            return _finish(fn(*a, **kw), status, media)

        bp.add_url_rule(flask_path, endpoint=fn.__name__, view_func=wrapper, methods=[method])
        return fn

    return deco


def _finish(result, status: int, media: str):
    if isinstance(result, Response):
        return result
    if media != "application/json":
        return result
    body = json.dumps(result, sort_keys=True, default=str)
    resp = Response(body, status=status, mimetype="application/json")
    if request.method == "GET":
        etag = hashlib.sha256(body.encode()).hexdigest()[:32]
        resp.set_etag(etag, weak=True)
        if request.if_none_match and request.if_none_match.contains_weak(etag):
            return Response(status=304, headers={"ETag": resp.headers["ETag"]})
    return resp


def _authenticate() -> None:
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer "):
        raise ApiError(401, "unauthenticated", "Send a personal API token: 'Authorization: Bearer <token>'.")
    t = token_store.verify(db(), auth[7:].strip())
    if t is None:
        raise ApiError(401, "invalid_token", "The token is invalid, revoked or expired.")
    db().commit()
    g.api_user = t.user


def _idempotent(run):
    """Replay the stored answer to a retried request, once the caller may still see what it shows."""
    key = request.headers["Idempotency-Key"]
    if len(key) > 128 or not key.strip():
        raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key must be 1-128 characters.", "Idempotency-Key")
    s = db()
    fp = _fingerprint()
    expired = utcnow() - dt.timedelta(hours=settings().idempotency_hours)
    rec = s.scalar(select(IdempotencyRecord).where(IdempotencyRecord.user_id == g.api_user.id,
                                                   IdempotencyRecord.key == key, IdempotencyRecord.created_at >= expired))
    if rec is not None:
        if rec.request_fingerprint != fp:
            raise ApiError(422, "idempotency_key_reused", "This Idempotency-Key was used for a different request.",
                           "Idempotency-Key")
        if rec.patient_id is not None:  # access may have been removed since the first answer
            audit.subject(patient_id=rec.patient_id)
            if patient_store.get_visible(s, g.api_user, rec.patient_id) is None:
                raise ApiError(404, "not_found", "What this request created is no longer visible to you.")
        resp = Response(json.dumps(rec.response, sort_keys=True), status=rec.status_code, mimetype="application/json")
        resp.headers["Idempotent-Replayed"] = "true"
        return resp
    resp = run()
    if resp.status_code < 500:
        try:
            s.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at < expired))
            s.add(IdempotencyRecord(user_id=g.api_user.id, key=key, request_fingerprint=fp,
                                    status_code=resp.status_code, response=json.loads(resp.get_data() or b"null"),
                                    patient_id=audit.touched_patient()))
            s.commit()
        except IntegrityError:  # a concurrent retry stored it first: its answer stands
            s.rollback()
    return resp


def _fingerprint() -> str:
    """What the request asks for, independent of transport details (multipart boundaries, key order)."""
    h = hashlib.sha256(f"{request.method} {request.path}\n".encode())
    if request.files:
        for field, f in sorted(request.files.items(multi=True), key=lambda kv: (kv[0] or "", kv[1].filename or "")):
            pos = f.stream.tell()
            h.update(f"{field}:{f.filename}:".encode() + hashlib.sha256(f.stream.read()).digest())
            f.stream.seek(pos)
        for k, v in sorted(request.form.items(multi=True), key=lambda kv: (kv[0] or "", kv[1] or "")):
            h.update(f"{k}={v}\n".encode())
    else:
        data = _request_json()
        h.update(json.dumps(data, sort_keys=True).encode() if data is not None else request.get_data())
    return h.hexdigest()


def _request_json():
    """The parsed JSON body, or None when there is none or it does not parse (nesting deeper than
    the parser goes, e.g. 100 000 '[', raises RecursionError rather than a ValueError)."""
    try:
        return request.get_json(silent=True)
    except RecursionError:
        return None


def _json_body() -> dict:
    data = _request_json()
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "Send a JSON object with Content-Type: application/json.")
    return data


def _validate_fields(data: dict, schema_name: str) -> dict:
    """Strict validation against the documented schema: unknown fields, wrong types, lengths, enums."""
    sch = SCHEMAS[schema_name]
    props = sch["properties"]
    for k, v in data.items():
        if k not in props:
            raise ApiError(422, "unknown_field", f"Unknown field {k!r}.", k)
        spec = props[k]
        types = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
        if v is None and "null" not in types:
            raise ApiError(422, "invalid", f"{k} may not be null.", k)
        if "integer" in types and v is not None:
            if not isinstance(v, int) or isinstance(v, bool) or not spec["minimum"] <= v <= spec["maximum"]:
                raise ApiError(422, "invalid", f"{k} must be an integer from {spec['minimum']} to {spec['maximum']}.", k)
            continue
        if v is not None and not isinstance(v, str):
            raise ApiError(422, "invalid", f"{k} must be a string.", k)
        if isinstance(v, str):
            if len(v) > spec.get("maxLength", 10_000):
                raise ApiError(422, "too_long", f"{k} is limited to {spec['maxLength']} characters.", k)
            if len(v) < spec.get("minLength", 0):
                raise ApiError(422, "invalid", f"{k} may not be empty.", k)
            if "enum" in spec and v not in spec["enum"]:
                raise ApiError(422, "invalid", f"{k} must be one of {', '.join(spec['enum'])}.", k)
    for k in sch.get("required", []):
        if k not in data:
            raise ApiError(422, "missing", f"{k} is required.", k)
    return data


def _page_args() -> tuple[int, int]:
    def num(name, default, hi):
        raw = request.args.get(name)
        if raw is None:
            return default
        try:
            v = int(raw)
        except ValueError:
            raise ApiError(400, "invalid_parameter", f"{name} must be an integer.", name) from None
        if v < 1 or v > hi:
            raise ApiError(400, "invalid_parameter", f"{name} must be between 1 and {hi}.", name)
        return v

    return num("page", 1, 100_000), num("per_page", 25, 100)


PAGE_PARAMS = [{"name": "page", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 100000}},
               {"name": "per_page", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 100}}]


# ----------------------------------------------------------------------------- serialisation
def _iso(t):
    return t.replace(tzinfo=dt.timezone.utc).isoformat() if isinstance(t, dt.datetime) else (t.isoformat() if t else None)


def patient_json(p) -> dict:
    return {"id": p.id, "mrn": p.mrn, "family_name": p.family_name, "given_name": p.given_name,
            "birth_date": p.birth_date.isoformat() if p.birth_date else None, "sex": p.sex, "notes": p.notes,
            "created_at": _iso(p.created_at), "updated_at": _iso(p.updated_at)}


def case_json(c) -> dict:
    agg = case_store.aggregate(c)
    images = []
    for i in c.images:
        a = i.analysis
        images.append({"image_id": i.id, "filename": i.original_filename, "width": i.width, "height": i.height,
                       "sha256": i.sha256, "job_status": a.job_status if a else "queued",
                       "attempts": a.attempts if a else 0, "result_status": a.result_status if a else None,
                       "label": a.label if a else None, "confidence": a.confidence if a else None,
                       "malignant": a.malignant if a else None,
                       "malignant_probability": a.malignant_probability if a else None,
                       "probabilities": a.probabilities if a else None, "cell_count": a.cell_count if a else None,
                       "cells": a.cells if a else None, "messages": a.messages if a else None,
                       "model_version": a.model_version if a else None, "model_sha256": a.model_sha256 if a else None,
                       "finished_at": _iso(a.finished_at) if a else None})
    return {"id": c.id, "patient_id": c.patient_id, "analyzer_id": c.analyzer_id, "status": c.status,
            "revision": c.revision,
            "clinical_note": c.clinical_note, "created_at": _iso(c.created_at), "final_diagnosis": c.final_diagnosis,
            "aggregate": {"label": agg.label, "status": agg.status, "probabilities": agg.probabilities,
                          "text": agg.text},
            "images": images,
            "reviews": [{"version": r.version, "final_diagnosis": r.final_diagnosis, "agrees_with_ai": r.agrees_with_ai,
                         "ai_label": r.ai_label, "ai_status": r.ai_status, "override_reason": r.override_reason,
                         "uncertainty_note": r.uncertainty_note, "comment": r.comment,
                         "amendment_reason": r.amendment_reason, "signed_by": r.signed_by.name,
                         "signed_at": _iso(r.signed_at), "content_sha256": r.content_sha256} for r in c.reviews]}


def _patient_error(exc) -> ApiError:
    """A duplicate MRN is a conflict (409); anything else is invalid input (422)."""
    dup = "already exists" in str(exc)
    return ApiError(409 if dup else 422, "conflict" if dup else "invalid", str(exc), exc.field)


def _patient_or_404(pid: int):
    p = patient_store.get_visible(db(), g.api_user, pid)
    if p is None:
        raise ApiError(404, "not_found", f"No patient {pid} visible to you.")
    audit.subject(patient_id=p.id)
    return p


def _case_or_404(cid: int):
    c = case_store.get_visible(db(), g.api_user, cid)
    if c is None:
        raise ApiError(404, "not_found", f"No case {cid} visible to you.")
    audit.subject(patient_id=c.patient_id)
    return c


# ----------------------------------------------------------------------------- endpoints
@api("/analyzers", "GET", summary="List analyzers with a summary of their validation", tag="analyzers",
     response="AnalyzerList")
def list_analyzers():
    return {"items": [dict(registry.get(a).describe(), validation_summary=registry.get(a).validation_summary())
                      for a in registry.available()]}


@api("/patients", "GET", summary="List or search patients (name or MRN)", tag="patients", response="PatientPage",
     query=[{"name": "q", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 100}}] + PAGE_PARAMS)
def list_patients():
    page, per_page = _page_args()
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
    data = _validate_fields(_json_body(), "PatientInput")
    s = db()
    try:
        p = patient_store.create(s, g.api_user, data)
        s.commit()
    except patient_store.PatientError as exc:
        s.rollback()
        raise _patient_error(exc) from None
    audit.subject(patient_id=p.id, resource=("patient", p.id))
    return patient_json(p)


@api("/patients/{patient_id}", "GET", summary="Get a patient", tag="patients", response="Patient")
def get_patient(patient_id: int):
    return patient_json(_patient_or_404(patient_id))


@api("/patients/{patient_id}", "PATCH", summary="Update a patient", tag="patients", response="Patient",
     body="PatientPatch", errors={409: "A patient with this MRN already exists"})
def update_patient(patient_id: int):
    p = _patient_or_404(patient_id)
    data = _validate_fields(_json_body(), "PatientPatch")
    merged = {k: getattr(p, k) for k in ("mrn", "family_name", "given_name", "birth_date", "sex", "notes")}
    merged.update(data)
    s = db()
    try:
        patient_store.update(s, p, merged)
        s.commit()
    except patient_store.PatientError as exc:
        s.rollback()
        raise _patient_error(exc) from None
    return patient_json(p)


@api("/patients/{patient_id}/cases", "GET", summary="List a patient's cases", tag="cases", response="CasePage",
     query=PAGE_PARAMS)
def list_patient_cases(patient_id: int):
    p = _patient_or_404(patient_id)
    page, per_page = _page_args()
    items = p.cases
    total = len(items)
    pages = max(1, -(-total // per_page))
    chunk = items[(page - 1) * per_page: page * per_page]
    return {"items": [case_json(c) for c in chunk], "page": page, "per_page": per_page, "pages": pages,
            "total": total}


@api("/patients/{patient_id}/cases", "POST", summary="Create a case (then upload images to it)", tag="cases",
     response="Case", status=201, body="CaseInput", idempotent_key=True)
def create_case(patient_id: int):
    p = _patient_or_404(patient_id)
    data = _validate_fields(_json_body(), "CaseInput")
    note = data.get("clinical_note", "")
    s = db()
    try:
        c = case_store.create_case(s, g.api_user, p, data["analyzer_id"], note)
        s.commit()
    except case_store.CaseError as exc:
        s.rollback()
        raise ApiError(422, "invalid", str(exc), exc.field) from None
    audit.subject(resource=("case", c.id))
    return case_json(c)


@api("/cases", "GET", summary="Case history with filters (status, final diagnosis, doctor, dates, patient)",
     tag="cases", response="CasePage",
     query=[{"name": "status", "in": "query", "required": False,
             "schema": {"type": "string", "enum": ["open", "analysing", "ready", "signed"]}},
            {"name": "diagnosis", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 64}},
            {"name": "doctor", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}},
            {"name": "from", "in": "query", "required": False, "schema": {"type": "string", "format": "date"}},
            {"name": "to", "in": "query", "required": False, "schema": {"type": "string", "format": "date"}},
            {"name": "q", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 100}}]
     + PAGE_PARAMS)
def list_cases():
    page, per_page = _page_args()
    a = request.args

    def date(name):
        v = a.get(name)
        if not v:
            return None
        try:
            return dt.date.fromisoformat(v)
        except ValueError:
            raise ApiError(400, "invalid_parameter", f"{name} must be a date (YYYY-MM-DD).", name) from None

    status = a.get("status", "")
    if status and status not in ("open", "analysing", "ready", "signed"):
        raise ApiError(400, "invalid_parameter", "status must be open, analysing, ready or signed.", "status")
    doctor = a.get("doctor")
    if doctor is not None and (not doctor.isdigit() or not 1 <= int(doctor) <= 2**31 - 1):
        raise ApiError(400, "invalid_parameter", "doctor must be a user id.", "doctor")
    q, diagnosis = a.get("q", ""), a.get("diagnosis", "")
    if len(q) > 100 or len(diagnosis) > 64:
        raise ApiError(400, "invalid_parameter", "q or diagnosis is too long.", "q" if len(q) > 100 else "diagnosis")
    res = case_store.history(db(), g.api_user, status=status, diagnosis=diagnosis,
                             doctor_id=int(doctor) if doctor else None, date_from=date("from"), date_to=date("to"),
                             text=q, page=page, per_page=per_page)
    audit.subject(shown_cases=[c.id for c in res.items])
    return {"items": [case_json(c) for c in res.items], "page": res.page, "per_page": per_page, "pages": res.pages,
            "total": res.total}


@api("/cases/{case_id}/images/{image_id}/retry", "POST", summary="Re-queue a failed analysis", tag="cases",
     response="Case", errors={409: "The analysis has not failed, or the case is signed"})
def retry_analysis(case_id: int, image_id: int):
    c = _case_or_404(case_id)
    img = next((i for i in c.images if i.id == image_id), None)
    if img is None or img.analysis is None:
        raise ApiError(404, "not_found", f"No image {image_id} in case {c.id}.")
    try:
        if img.analysis.job_status != "failed":
            raise case_store.CaseError("not failed")
        case_store.retry_failed(db(), img.analysis)  # refuses a signed case
        db().commit()
    except case_store.CaseError:
        db().rollback()
        raise ApiError(409, "not_failed", "Only failed analyses of unsigned cases can be retried.") from None
    notify_workers()
    return case_json(c)


@api("/patients/{patient_id}/doctors", "PUT", summary="Set which doctors may see a patient (administrators)",
     tag="patients", response="DoctorList", body="DoctorList", errors={403: "Administrators only"})
def set_patient_doctors(patient_id: int):
    if not g.api_user.is_admin:
        raise ApiError(403, "forbidden", "Only administrators assign patients.")
    p = _patient_or_404(patient_id)
    data = _json_body()
    ids = data.get("doctor_ids")
    if set(data) - {"doctor_ids"} or not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= 2**31 - 1 for i in ids) or len(ids) > 1000:
        raise ApiError(422, "invalid", "Send {\"doctor_ids\": [user ids]}.", "doctor_ids")
    patient_store.set_doctors(db(), p, ids)
    db().commit()
    db().refresh(p)
    return {"doctor_ids": sorted(d.id for d in p.doctors)}


@api("/cases/{case_id}", "GET", summary="Get a case: job status, AI results, reviews", tag="cases", response="Case")
def get_case(case_id: int):
    return case_json(_case_or_404(case_id))


@api("/cases/{case_id}/images", "POST", summary="Upload one or more images (multipart field 'images')",
     tag="cases", response="UploadResult", multipart=True, idempotent_key=True)
def upload_images(case_id: int):
    c = _case_or_404(case_id)
    limit = settings().max_upload_mb * 1024 * 1024
    uploads = [(f.filename or "image", f.stream.read(limit + 1)) for f in request.files.getlist("images") if f]
    if not uploads:
        raise ApiError(422, "no_files", "Send the images as multipart/form-data field 'images'.", "images")
    s = db()
    try:
        out = case_store.add_images(s, files(), c, g.api_user, uploads, limit)
        case_store.commit_upload(s, files(), out)
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


@api("/cases/{case_id}/sign", "POST", summary="Sign (or amend) the diagnosis", tag="cases", response="Case",
     body="SignInput", errors={409: "Images are still being analysed, or the case changed since the given revision"})
def sign_case(case_id: int):
    c = _case_or_404(case_id)
    data = _validate_fields(_json_body(), "SignInput")
    an = registry.get(c.analyzer_id)
    labels = [k for k, _ in case_store.diagnosis_options(an)]
    s = db()
    try:
        case_store.sign(s, c, g.api_user, data.get("final_diagnosis", ""), labels, comment=data.get("comment", ""),
                        override_reason=data.get("override_reason", ""),
                        uncertainty_note=data.get("uncertainty_note", ""),
                        amendment_reason=data.get("amendment_reason", ""), revision=data.get("revision"))
        s.commit()
    except case_store.CaseError as exc:
        s.rollback()
        if exc.field is None:  # about the case's state, not the input
            raise ApiError(409, "case_not_signable", str(exc)) from None
        raise ApiError(422, "invalid", str(exc), exc.field) from None
    return case_json(c)


@api("/cases/{case_id}", "DELETE", summary="Delete an empty case (no images, never signed)", tag="cases",
     status=204, media="text/plain", errors={409: "The case holds images or was signed"})
def delete_case(case_id: int):
    c = _case_or_404(case_id)
    try:
        case_store.delete_empty_case(db(), c)
        db().commit()
    except case_store.CaseError as exc:
        db().rollback()
        raise ApiError(409, "not_empty", str(exc)) from None
    return Response(status=204)


@api("/cases/{case_id}/report.pdf", "GET", summary="The PDF report", tag="reports", media="application/pdf")
def case_report(case_id: int):
    from ..reports.case_report import case_report_pdf

    c = _case_or_404(case_id)
    pdf = case_report_pdf(c, files(), settings().clinic_name)
    return Response(pdf, mimetype="application/pdf",
                    headers={"Content-Disposition": f'attachment; filename="oncoscope-case-{c.id}.pdf"'})


@api("/cases/{case_id}/fhir", "GET", summary="FHIR R4 Bundle of a signed case (DiagnosticReport, Observations, "
     "Media, Patient, Device, Practitioner)", tag="reports", media="application/fhir+json",
     errors={409: "The case is not signed"})
def case_fhir(case_id: int):
    c = _case_or_404(case_id)
    return fhir_response(c)


@api("/cases/{case_id}/hl7", "GET", summary="HL7 v2.5.1 ORU^R01 message of a signed case", tag="reports",
     media="application/hl7-v2", errors={409: "The case is not signed"})
def case_hl7(case_id: int):
    c = _case_or_404(case_id)
    return hl7_response(c)


@api("/cases/{case_id}/dicom-sr", "GET", summary="DICOM Comprehensive SR of a signed case", tag="reports",
     media="application/dicom", errors={409: "The case is not signed"})
def case_dicom_sr(case_id: int):
    return dicom_sr_response(_case_or_404(case_id))


@api("/cases/{case_id}/images/{image_id}/dicom-seg", "GET", summary="DICOM SEG of an image's cell mask",
     tag="reports", media="application/dicom", errors={409: "The image has no cell mask"})
def image_dicom_seg(case_id: int, image_id: int):
    return dicom_seg_response(_case_or_404(case_id), image_id)


@api("/cases/{case_id}/hl7/send", "POST", summary="Send the ORU^R01 message to the configured HL7 destination (MLLP)",
     tag="reports", response="Hl7SendResult",
     errors={409: "The case is not signed, or no HL7 destination is configured",
             502: "The receiving system refused the message or could not be reached"})
def case_hl7_send(case_id: int):
    ok, detail = send_hl7(_case_or_404(case_id))
    if not ok:
        raise ApiError(502 if detail != "no_destination" else 409,
                       "hl7_not_configured" if detail == "no_destination" else "hl7_send_failed",
                       "No HL7 destination is configured (ONCOSCOPE_HL7_HOST/PORT)." if detail == "no_destination"
                       else detail)
    return {"sent": True, "ack": detail}


def send_hl7(c) -> tuple[bool, str]:
    from ..reports.hl7v2 import HL7SendError, oru_r01, send_mllp

    st = settings()
    if c.current_review is None:
        raise ApiError(409, "not_signed", "Only signed cases can be exported.")
    if not st.hl7_host or not st.hl7_port:
        return False, "no_destination"
    try:
        ack = send_mllp(oru_r01(c, registry.get(c.analyzer_id)), st.hl7_host, st.hl7_port)
    except HL7SendError as exc:
        return False, str(exc)
    return True, ack


def dicom_sr_response(c) -> Response:
    from ..reports.dicom_io import case_to_sr

    if c.current_review is None:
        raise ApiError(409, "not_signed", "Only signed cases can be exported.")
    data = case_to_sr(c, registry.get(c.analyzer_id), study_uid=case_store.dicom_study_uid(c),
                      institution=settings().clinic_name)
    return Response(data, mimetype="application/dicom",
                    headers={"Content-Disposition": f'attachment; filename="oncoscope-case-{c.id}-sr.dcm"'})


def dicom_seg_response(c, image_id: int) -> Response:
    import numpy as np
    from PIL import Image as PILImage

    from ..reports.dicom_io import case_study_uid, mask_to_seg

    img = next((i for i in c.images if i.id == image_id), None)
    if img is None:
        raise ApiError(404, "not_found", f"No image {image_id} in case {c.id}.")
    store = files()
    name = f"mask-{c.analyzer_id}"
    if not store.exists(img.sha256, name):
        raise ApiError(409, "no_mask", "This image has no cell mask (not analysed, or out of domain).")
    mask = np.asarray(PILImage.open(store.path(img.sha256, name))) > 127
    a = img.analysis
    data = mask_to_seg(store.path(img.sha256).read_bytes(), mask, case=c,
                       study_uid=img.dicom_study_uid or case_store.dicom_study_uid(c) or case_study_uid(c),
                       model_id=c.analyzer_id, model_version=(a.model_version if a else "") or "",
                       created_at=a.finished_at if a else None)
    return Response(data, mimetype="application/dicom",
                    headers={"Content-Disposition": f'attachment; filename="oncoscope-case-{c.id}-image-{img.id}-seg.dcm"'})


def fhir_response(c) -> Response:
    from ..reports.case_report import case_report_pdf
    from ..reports.fhir import case_bundle, original_pngs

    if c.current_review is None:
        raise ApiError(409, "not_signed", "Only signed cases can be exported.")
    pdf = case_report_pdf(c, files(), settings().clinic_name)
    bundle = case_bundle(c, pdf, base_url=request.host_url.rstrip("/"), images=original_pngs(c, files()))
    return Response(json.dumps(bundle, sort_keys=True), mimetype="application/fhir+json",
                    headers={"Content-Disposition": f'attachment; filename="oncoscope-case-{c.id}-fhir.json"'})


def hl7_response(c) -> Response:
    from ..reports.hl7v2 import oru_r01

    if c.current_review is None:
        raise ApiError(409, "not_signed", "Only signed cases can be exported.")
    msg = oru_r01(c, registry.get(c.analyzer_id))
    return Response(msg, mimetype="application/hl7-v2",
                    headers={"Content-Disposition": f'attachment; filename="oncoscope-case-{c.id}.hl7"'})


# ----------------------------------------------------------------------------- the document
def openapi_document() -> dict:
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {"title": "oncoscope API", "version": __version__,
                 "description": "Patients, cases, AI analyses, sign-off and reports. Authenticate with a personal "
                                "API token created on the account page: `Authorization: Bearer <token>`. Errors have "
                                "the shape `{\"error\": {\"code\", \"message\", \"field\"}}`."},
        "servers": [{"url": "/api/v1"}],
        "paths": PATHS,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "Personal API token (osk_...)"}}},
    }


@bp.get("/openapi.json")
def openapi_json():
    return jsonify(openapi_document())


@bp.app_template_filter("backticks")
def _backticks(text: str):
    """`code` spans -> <code>, everything else escaped (for the docs page)."""
    from markupsafe import Markup, escape

    parts = str(text).split("`")
    return Markup("".join(f"<code>{escape(p)}</code>" if i % 2 else str(escape(p)) for i, p in enumerate(parts)))


@bp.get("/docs")
def docs():
    return render_template("api_docs.html", spec=openapi_document(), title="API documentation")
