"""Hospital integration on the pages: the DICOM inbox (received images no rule routed), the PACS
query and retrieval for a patient, and sending a case's results again. Thin views over
store/receiving, services/pacs and services/deliveries."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for

from ..analyzers import registry, routing
from ..services import deliveries, pacs
from ..services.dicomweb import DicomWebError
from ..store import cases as case_store
from ..store import receiving
from ..store.models import Delivery
from . import audit
from .case_page import case_or_404
from .forms import EmptyForm
from .helpers import db, ext, files, me, notify_workers, role_required, settings
from .patients import _patient_or_404

bp = Blueprint("integration", __name__)


def _analyzer_choices() -> list[tuple[str, str]]:
    return [(a, registry.get(a).name) for a in registry.available()]


def _checked_form() -> None:
    if not EmptyForm().validate_on_submit():
        abort(400)


def _analyzer_arg() -> str:
    aid = request.form.get("analyzer_id", "")
    if not aid:
        flash("Choose the analyzer that should read these images.", "error")
    elif aid not in registry.available():
        flash(f"There is no analyzer {aid!r} here; choose one from the list.", "error")
        aid = ""
    return aid


# ----------------------------------------------------------------------------- the DICOM inbox
@bp.get("/inbox")
@role_required("edit")
def inbox():
    studies = receiving.inbox(db(), me())
    audit.subject(studies=len(studies))
    choices = _analyzer_choices()
    readers = {st.study_uid: [(k, n) for k, n in choices if routing.can_read(k, st.modality, st.body_part)]
               for st in studies}
    return render_template("integration/inbox.html", studies=studies, readers=readers, form=EmptyForm(),
                           title="DICOM inbox")


@bp.post("/inbox/<study_uid>/file")
@role_required("edit")
def file_study(study_uid: str):
    _checked_form()
    aid = _analyzer_arg()
    if not aid:
        audit.note("rejected")
        return redirect(url_for("integration.inbox"))
    s = db()
    try:
        case = receiving.file_study(s, files(), me(), study_uid, aid, settings().max_upload_mb * 1024 * 1024)
        case_store.commit_upload(s, files(), None)
    except case_store.CaseGone as exc:
        s.rollback()
        abort(404, str(exc))
    except case_store.CaseError as exc:
        s.rollback()
        flash(str(exc), "error")
        audit.note("rejected")
        return redirect(url_for("integration.inbox"))
    notify_workers()
    audit.subject(resource=("case", case.id), patient_id=case.patient_id, study_uid=study_uid, analyzer=aid)
    flash(f"Filed into case #{case.id}; its images are being analysed.", "ok")
    return redirect(url_for("cases.view", case_id=case.id))


@bp.post("/inbox/<study_uid>/dismiss")
@role_required("edit")
def dismiss_study(study_uid: str):
    _checked_form()
    s = db()
    try:
        n = receiving.dismiss(s, me(), study_uid)
        s.commit()
    except case_store.CaseGone as exc:
        s.rollback()
        abort(404, str(exc))
    audit.subject(study_uid=study_uid, instances=n)
    flash(f"Dismissed {n} image{'s' if n != 1 else ''} of that study (kept on record, not analysed).", "ok")
    return redirect(url_for("integration.inbox"))


# ----------------------------------------------------------------------------- the PACS
@bp.get("/patients/<int:patient_id>/pacs")
@role_required("edit")
def pacs_studies(patient_id: int):
    p = _patient_or_404(patient_id)
    found, problem = [], ""
    try:
        found = pacs.studies(settings(), p.mrn)
    except DicomWebError as exc:
        problem = str(exc)
        if settings().dicomweb_url:  # (none configured: the page says so; nothing failed)
            audit.note("failure")
            audit.subject(error=problem)
    audit.subject(studies=len(found))
    rules = routing.table(settings().dicom_routes)
    suggested = {st.study_uid: next((a for se in st.series if (a := routing.route(rules, se.modality, se.body_part, ""))),
                                    "") for st in found}
    filed = {c.dicom_study_uid: c.id for c in p.cases if c.dicom_study_uid}
    return render_template("integration/pacs.html", patient=p, studies=found, problem=problem, suggested=suggested,
                           filed=filed, analyzers=_analyzer_choices(), form=EmptyForm(),
                           title=f"PACS: {p.display_name}")


@bp.post("/patients/<int:patient_id>/pacs/retrieve")
@role_required("edit")
def pacs_retrieve(patient_id: int):
    p = _patient_or_404(patient_id)
    _checked_form()
    study_uid, series = request.form.get("study_uid", ""), request.form.getlist("series_uid")
    aid = _analyzer_arg()
    if not aid or not study_uid or not series:
        if aid:
            flash("Choose the series to retrieve.", "error")
        audit.note("rejected")
        return redirect(url_for("integration.pacs_studies", patient_id=p.id))
    try:
        got = pacs.retrieve(settings(), ext()["sessions"], files(), me(), p.mrn, study_uid, series[:50], aid)
    except DicomWebError as exc:
        flash(f"Nothing retrieved: {exc}", "error")
        audit.note("failure")
        audit.subject(study_uid=study_uid, error=str(exc))
        return redirect(url_for("integration.pacs_studies", patient_id=p.id))
    notify_workers()
    audit.subject(study_uid=study_uid, series=series[:50], filed=got.filed, refused=len(got.refused),
                  cases=sorted(got.case_ids))
    for why in got.refused[:5]:
        flash(f"Not filed: {why}", "error")
    flash(f"Retrieved {got.filed} new image{'s' if got.filed != 1 else ''}"
          + (f" ({got.duplicates} already here)" if got.duplicates else "") + ".", "ok" if got.filed else "info")
    if len(got.case_ids) == 1:
        return redirect(url_for("cases.view", case_id=next(iter(got.case_ids))))
    return redirect(url_for("patients.view", patient_id=p.id))


# ----------------------------------------------------------------------------- deliveries
@bp.post("/cases/<int:case_id>/deliveries/<int:delivery_id>/retry")
@role_required("edit")
def send_again(case_id: int, delivery_id: int):
    c = case_or_404(case_id, "edit")
    _checked_form()
    d = db().get(Delivery, delivery_id)
    if d is None or d.case_id != c.id:
        abort(404)
    try:
        deliveries.send_again(db(), d)
        db().commit()
    except ValueError as exc:
        db().rollback()
        flash(str(exc), "info")
    else:
        pump = ext().get("deliveries")
        if pump is not None:
            pump.notify()
        audit.subject(resource=("delivery", d.id), kind=d.kind)
        flash("It will be sent again within a few seconds.", "ok")
    return redirect(url_for("cases.view", case_id=c.id) + "#deliveries")
