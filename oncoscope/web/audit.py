"""Audit trail, web side: every request to a route that touches accounts or patient data leaves
exactly one entry, written after the response is known (so its outcome is the real one).

``ACTIONS`` is the one catalogue: each endpoint and method maps to an action name. A route that is
not in ``ACTIONS`` must be in ``EXEMPT`` (static files, health check, API description, the empty
sign-in forms); a test checks that every route is one or the other.

Views add what only they know through ``subject(...)`` (the patient a case belongs to, the id of a
record just created, the records listed on a page) and ``note(...)`` (the outcome of a sign-in, the
e-mail address tried). The outcome otherwise follows from the status code.
"""

from __future__ import annotations

import logging

from flask import Flask, current_app, g, request
from flask_login import current_user

from ..store.audit import AuditLog
from .errors import Failure

log = logging.getLogger("oncoscope.audit")

ACTIONS: dict[str, dict[str, str]] = {
    # authentication and accounts
    "auth.setup": {"POST": "auth.setup"},
    "auth.login": {"POST": "auth.login"},
    "auth.logout": {"POST": "auth.logout"},
    "auth.change_password": {"GET": "auth.password_form", "POST": "auth.password_change"},
    "auth.tokens": {"GET": "auth.token_list", "POST": "auth.token_create"},
    "auth.revoke_token": {"POST": "auth.token_revoke"},
    "admin.users": {"GET": "admin.user_list", "POST": "admin.user_create"},
    "admin.edit_user": {"GET": "admin.user_view", "POST": "admin.user_update"},
    "admin.toggle_active": {"POST": "admin.user_active"},
    "admin.audit_log": {"GET": "audit.search"},
    "admin.audit_csv": {"GET": "audit.export"},
    "admin.dashboards": {"GET": "dashboard.analytics"},
    "admin.dashboards_csv": {"GET": "dashboard.export"},
    # pages
    "main.home": {"GET": "dashboard.view"},
    "main.analyzer": {"GET": "analyzer.view"},
    "main.analyzer_plot": {"GET": "analyzer.plot"},
    "main.class_info": {"GET": "analyzer.class_info"},
    # patients
    "patients.index": {"GET": "patient.list"},
    "patients.new": {"GET": "patient.new_form", "POST": "patient.create"},
    "patients.from_dicom": {"POST": "patient.create_from_dicom"},
    "patients.view": {"GET": "patient.view"},
    "patients.edit": {"GET": "patient.edit_form", "POST": "patient.update"},
    "patients.assign": {"POST": "patient.assign_doctors"},
    # cases, images, reports
    "cases.history": {"GET": "case.list"},
    "cases.new": {"GET": "case.new_form", "POST": "case.create"},
    "cases.view": {"GET": "case.view"},
    "cases.status": {"GET": "case.status"},
    "cases.upload": {"POST": "case.upload"},
    "cases.image": {"GET": "image.download"},
    "cases.retry": {"POST": "analysis.retry"},
    "cases.sign": {"POST": "case.sign"},
    "cases.delete": {"POST": "case.delete"},
    "cases.report": {"GET": "report.pdf"},
    "cells.view": {"GET": "cell.gallery"},
    "cells.sprite": {"GET": "image.download"},
    "cells.reclassify": {"POST": "cell.reclassify"},
    "cells.undo": {"POST": "cell.undo"},
    "cells.wbc_count": {"POST": "case.wbc_count"},
    "cases.export": {"GET": "report.export"},
    "cases.export_seg": {"GET": "report.dicom_seg"},
    "cases.send_hl7": {"POST": "report.hl7_send"},
    # report workflow, consults, worklists
    "workflow.preliminary": {"POST": "case.preliminary"},
    "workflow.second_read": {"POST": "case.second_read"},
    "workflow.cancel": {"POST": "case.cancel"},
    "workflow.ask": {"POST": "consult.ask"},
    "workflow.consult": {"GET": "consult.view"},
    "workflow.answer": {"POST": "consult.answer"},
    "workflow.close": {"POST": "consult.close"},
    "workflow.worklist": {"GET": "worklist.view"},
    "workflow.settings_page": {"GET": "settings.workflow_view", "POST": "settings.workflow_update"},
    # hospital integration
    "integration.inbox": {"GET": "dicom.inbox_view"},
    "integration.file_study": {"POST": "dicom.inbox_file"},
    "integration.dismiss_study": {"POST": "dicom.inbox_dismiss"},
    "integration.pacs_studies": {"GET": "pacs.query"},
    "integration.pacs_retrieve": {"POST": "pacs.retrieve"},
    "integration.send_again": {"POST": "delivery.retry"},
    # JSON API
    "api.list_analyzers": {"GET": "analyzer.list"},
    "api.list_patients": {"GET": "patient.list"},
    "api.create_patient": {"POST": "patient.create"},
    "api.get_patient": {"GET": "patient.view"},
    "api.update_patient": {"PATCH": "patient.update"},
    "api.set_patient_doctors": {"PUT": "patient.assign_doctors"},
    "api.list_patient_cases": {"GET": "case.list"},
    "api.create_case": {"POST": "case.create"},
    "api.list_cases": {"GET": "case.list"},
    "api.get_case": {"GET": "case.view"},
    "api.upload_images": {"POST": "case.upload"},
    "api.retry_analysis": {"POST": "analysis.retry"},
    "api.sign_case": {"POST": "case.sign"},
    "api.delete_case": {"DELETE": "case.delete"},
    "api.list_cells": {"GET": "cell.list"},
    "api.reclassify_cells": {"PATCH": "cell.reclassify"},
    "api.undo_cells": {"POST": "cell.undo"},
    "api.case_report": {"GET": "report.pdf"},
    "api.case_fhir": {"GET": "report.fhir"},
    "api.case_hl7": {"GET": "report.hl7"},
    "api.case_dicom_sr": {"GET": "report.dicom_sr"},
    "api.image_dicom_seg": {"GET": "report.dicom_seg"},
    "api.case_hl7_send": {"POST": "report.hl7_send"},
    "api.write_preliminary": {"POST": "case.preliminary"},
    "api.second_read": {"POST": "case.second_read"},
    "api.cancel_case": {"POST": "case.cancel"},
    "api.list_consults": {"GET": "consult.list"},
    "api.ask_consult": {"POST": "consult.ask"},
    "api.get_consult": {"GET": "consult.view"},
    "api.answer_consult": {"POST": "consult.answer"},
    "api.close_consult": {"POST": "consult.close"},
    "api.worklist": {"GET": "worklist.view"},
    "api.pacs_studies": {"GET": "pacs.query"},
    "api.pacs_retrieve": {"POST": "pacs.retrieve"},
    "api.dicom_inbox": {"GET": "dicom.inbox_view"},
    "api.retry_delivery": {"POST": "delivery.retry"},
}

# Routes that show no account or patient data (with the reason, for the completeness test).
EXEMPT: dict[tuple[str, str], str] = {
    ("static", "GET"): "style sheets and scripts",
    ("main.healthz", "GET"): "health check for load balancers; no data",
    ("api.openapi_json", "GET"): "API description; no data",
    ("api.docs", "GET"): "API documentation page; no data",
    ("auth.login", "GET"): "the empty sign-in form (each sign-in attempt is audited)",
    ("auth.setup", "GET"): "the empty first-run form (account creation is audited)",
}

# view argument -> record type, most specific first
RESOURCES = (("image_id", "image"), ("consult_id", "consult"), ("token_id", "api_token"), ("user_id", "user"), ("case_id", "case"),
             ("patient_id", "patient"), ("analyzer_id", "analyzer"))
QUERY_KEYS = ("q", "status", "diagnosis", "doctor", "from", "to", "page", "per_page", "fmt", "actor", "action",
              "outcome", "patient", "resource", "ip", "patient_id", "queue", "sort")


def action_for(endpoint: str | None, method: str) -> str | None:
    if not endpoint:
        return None
    return ACTIONS.get(endpoint, {}).get("GET" if method == "HEAD" else method)


def subject(patient_id: int | None = None, resource: tuple[str, object] | None = None, **details) -> None:
    """What the request touched, known only inside the view."""
    a = g.setdefault("audit", {})
    if patient_id is not None:
        a["patient_id"] = patient_id
    if resource is not None:
        a["resource"] = resource
    a.setdefault("details", {}).update(details)


def touched_patient() -> int | None:
    """The patient this request has touched so far (set by ``subject``), if any."""
    return g.get("audit", {}).get("patient_id")


def note(outcome: str | None = None, actor=None, **details) -> None:
    """Set the outcome (e.g. a failed sign-in answers 200 with the form) or the actor explicitly."""
    a = g.setdefault("audit", {})
    if outcome:
        a["outcome"] = outcome
    if actor is not None:
        a["actor"] = actor
    a.setdefault("details", {}).update(details)


def denied() -> None:
    """Mark the request as refused before the view ran (sign-in required, wrong role)."""
    note("denied")


def _outcome(status: int, method: str, html: bool) -> str:
    if status >= 500:
        return "error"
    if status in (401, 403, 404):
        return "denied"  # 404 is also the answer for records the user may not see
    if status >= 400:
        return "rejected"
    if html and method not in ("GET", "HEAD") and status == 200:
        return "rejected"  # a form sent back with its errors
    return "success"


def _actor_fields(user) -> dict:
    if user is None:
        return {"actor_id": None, "actor": "anonymous", "actor_role": ""}
    return {"actor_id": user.id, "actor": user.email, "actor_role": user.role}


def _current_user_row():
    api_user = g.get("api_user")
    if api_user is not None:
        return api_user
    try:
        if current_user.is_authenticated:
            return current_user.user
    except Exception:  # noqa: BLE001 - e.g. the database is down: the actor captured earlier stands
        return None
    return None


def _resource_and_patient(a: dict, details: dict) -> tuple[str | None, object, int | None]:
    """The record the request touched (what the view said, else the most specific id in the URL),
    the patient it belongs to, and the other ids in the URL (added to ``details``)."""
    view_args = request.view_args or {}
    kind, rid = a.get("resource") or (None, None)
    if kind is None:
        kind, rid = next(((name, view_args[arg]) for arg, name in RESOURCES if arg in view_args), (kind, rid))
    patient_id = a.get("patient_id")
    if patient_id is None and kind == "patient":
        patient_id = rid
    if patient_id is None and "patient_id" in view_args:
        patient_id = view_args["patient_id"]  # the record the URL names (even when refused)
    for arg, name in RESOURCES:
        if arg in view_args and name not in (kind, "patient"):
            details.setdefault(f"{name}_id", view_args[arg])
    return kind, rid, patient_id


def _final_actor(a: dict) -> dict:
    try:  # read the actor before the rollback in _audit_finish expires the ORM objects
        user = a.get("actor") or _current_user_row()
        actor = _actor_fields(user) if user is not None else None
    except Exception:  # noqa: BLE001 - e.g. the database went away during the request
        actor = None
    return actor or g.get("audit_actor") or _actor_fields(None)


def _audit_start():
    if action_for(request.endpoint, request.method) is None:
        return
    g.audit_actor = None
    try:
        if current_user.is_authenticated:
            g.audit_actor = _actor_fields(current_user.user)  # plain values: they survive a rollback
    except Exception:  # noqa: BLE001 - database down: the request will answer 503 and be audited as such
        pass


def _audit_finish(resp):
    action = action_for(request.endpoint, request.method)
    if action is None:
        return resp
    a = g.get("audit", {})
    actor = _final_actor(a)
    sess = g.get("db")
    if sess is not None:
        try:
            sess.rollback()  # whatever the view meant to keep is committed; never hold a lock here
        except Exception:  # noqa: BLE001
            pass
    details = dict(a.get("details", {}))
    kind, rid, patient_id = _resource_and_patient(a, details)
    for k in QUERY_KEYS:
        if k in request.args:
            details.setdefault(f"query_{k}", request.args.get(k))
    html = resp.mimetype == "text/html"
    try:
        current_app.extensions["oncoscope"]["audit"].record(
            **actor, channel="api" if request.blueprint == "api" else "web", action=action,
            method=request.method, path=request.path, resource_type=kind or "", resource_id=rid if rid is not None else "",
            patient_id=patient_id, outcome=a.get("outcome") or _outcome(resp.status_code, request.method, html),
            status_code=resp.status_code, ip=request.remote_addr or "",
            user_agent=request.headers.get("User-Agent", ""), details=details)
    except Exception:  # noqa: BLE001 - neither the database nor the spool took the entry: fail closed
        log.exception("audit entry could not be written; refusing the response")
        return current_app.make_response(AUDIT_UNAVAILABLE.answer())
    return resp


AUDIT_UNAVAILABLE = Failure(503, "audit_unavailable", "The audit trail cannot be written; nothing was shown.",
                            "Audit trail unavailable",
                            "This access could not be recorded, so it was refused. Please retry in a moment.")


def init_app(app: Flask) -> None:
    """Register last: after_request hooks run in reverse, so the entry records the final answer."""
    ext = app.extensions["oncoscope"]
    ext["audit"] = AuditLog(ext["sessions"], ext["settings"].audit_spool)
    app.before_request(_audit_start)
    app.after_request(_audit_finish)
