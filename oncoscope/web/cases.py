"""Cases: create with uploads, result page, job status polling, image files, sign-off, PDF report, history."""

from __future__ import annotations

import datetime as dt
import uuid

from flask import (Blueprint, Response, abort, flash, jsonify, redirect, render_template, request, send_file,
                   session, url_for)
from flask_login import login_required
from sqlalchemy import select
from werkzeug.datastructures import MultiDict

from ..analyzers import registry
from ..analyzers.render import png_bytes
from ..imaging.imageio import ImageLoadError, load_image
from ..services import exports
from ..store import cases as case_store
from ..store import patients as patient_store
from ..store import workflow
from ..store.models import CaseImage, User
from ..vocab import SEND_NEEDS_SIGNATURE
from . import audit
from .case_page import CHOOSE, case_or_404 as _case_or_404, case_page as _case_page, seen_revision
from .forms import CaseForm, EmptyForm, SignForm
from .helpers import db, download, files, int_arg, me, notify_workers, role_required, settings, show_errors

bp = Blueprint("cases", __name__)

IMAGE_KINDS = {"original", "thumb", "cells", "heatmap", "heatmap-layer"}


def _uploads() -> list[tuple[str, bytes]]:
    limit = settings().max_upload_mb * 1024 * 1024
    out = []
    for f in request.files.getlist("images"):
        if not f or not f.filename:
            continue
        data = f.stream.read(limit + 1)
        out.append((f.filename, data))
    return out


def _report_outcome(outcome) -> None:
    audit.subject(images_added=len(outcome.added), images_duplicate=len(outcome.duplicates),
                  images_refused=len(outcome.errors))
    if outcome.added:
        flash(f"{len(outcome.added)} image{'s' if len(outcome.added) > 1 else ''} queued for analysis.", "ok")
    for name in outcome.duplicates:
        flash(f"{name}: already in this case (not added twice).", "info")
    for name, msg in outcome.errors:
        flash(f"{name}: not added. {msg}", "error")


@bp.route("/patients/<int:patient_id>/cases/new", methods=["GET", "POST"])
@role_required("edit")
def new(patient_id: int):
    s = db()
    patient = patient_store.get_visible(s, me(), patient_id)
    if patient is None:
        abort(404)
    audit.subject(patient_id=patient.id)
    form = CaseForm()
    form.analyzer_id.choices = [(a, registry.get(a).name) for a in registry.available()]
    if request.method == "GET":
        form.analyzer_id.data = "smear-all" if "smear-all" in registry.available() else None
    submission = request.form.get("submission_id") or uuid.uuid4().hex
    done = session.get("submissions", {})
    if request.method == "POST" and submission in done:  # a double-clicked / resent form
        audit.subject(resource=("case", done[submission]), resent_form=True)
        return redirect(url_for("cases.view", case_id=done[submission]))
    if form.validate_on_submit():
        uploads = _uploads()
        try:
            case = case_store.create_case(s, me(), patient, form.analyzer_id.data, form.clinical_note.data or "",
                                          form.priority.data)
            outcome = case_store.add_images(s, files(), case, me(), uploads, settings().max_upload_mb * 1024 * 1024)
            if uploads and not outcome.added:  # no usable image: no empty case is left behind
                msg = "No image could be added, so no case was created."
                raise case_store.CaseError(msg, None, [(None, msg)] + [(None, f"{n}: {m}") for n, m in outcome.errors])
            case_store.commit_upload(s, files(), outcome)
        except case_store.CaseError as exc:
            s.rollback()
            show_errors(form, exc)
            audit.note("rejected", images_refused=len(uploads))
        else:
            done = dict(list(done.items())[-20:])
            done[submission] = case.id
            session["submissions"] = done
            audit.subject(resource=("case", case.id), images_added=len(outcome.added),
                          images_refused=len(outcome.errors))
            _report_outcome(outcome)
            notify_workers()
            return redirect(url_for("cases.view", case_id=case.id))
    return render_template("cases/new.html", form=form, patient=patient, submission_id=submission,
                           max_mb=settings().max_upload_mb, title="New case")


@bp.get("/cases/<int:case_id>")
@login_required
def view(case_id: int):
    return _case_page(_case_or_404(case_id))


@bp.post("/cases/<int:case_id>/images")
@role_required("edit")
def upload(case_id: int):
    c = _case_or_404(case_id, "edit")
    s = db()
    form = EmptyForm()
    wants_json = request.accept_mimetypes.best == "application/json"
    if not form.validate_on_submit():
        if wants_json:
            return jsonify({"error": "The form expired; reload the page."}), 400
        abort(400)
    try:
        outcome = case_store.add_images(s, files(), c, me(), _uploads(), settings().max_upload_mb * 1024 * 1024)
        case_store.commit_upload(s, files(), outcome)
    except case_store.CaseError as exc:
        s.rollback()
        if wants_json:
            return jsonify({"error": str(exc)}), 409
        flash(str(exc), "error")
        return redirect(url_for("cases.view", case_id=c.id))
    notify_workers()
    if wants_json:
        return jsonify({"added": [i.id for i in outcome.added], "duplicates": outcome.duplicates,
                        "errors": [{"file": n, "message": m} for n, m in outcome.errors]}), \
            (200 if outcome.added or outcome.duplicates else 422)
    _report_outcome(outcome)
    return redirect(url_for("cases.view", case_id=c.id))


@bp.get("/cases/<int:case_id>/status.json")
@login_required
def status(case_id: int):
    c = _case_or_404(case_id)
    return jsonify({"case": c.id, "status": c.status,
                    "images": [{"id": i.id, "job": i.analysis.job_status if i.analysis else None,
                                "result": i.analysis.result_status if i.analysis else None} for i in c.images]})


@bp.get("/cases/<int:case_id>/images/<int:image_id>/<kind>.png")
@login_required
def image(case_id: int, image_id: int, kind: str):
    c = _case_or_404(case_id)
    img = db().scalar(select(CaseImage).where(CaseImage.id == image_id, CaseImage.case_id == c.id))
    if img is None or kind not in IMAGE_KINDS:
        abort(404)
    store = files()
    if kind == "original":
        rgb = load_image(store.path(img.sha256)).rgb
        return Response(png_bytes(rgb), mimetype="image/png", headers={"Cache-Control": "private, max-age=3600"})
    name = kind if kind == "thumb" else f"{kind}-{c.analyzer_id}"
    if kind == "thumb":
        try:  # received over DICOM, not yet analysed (its analysis says why if it cannot be read)
            store.ensure_thumbnail(img.sha256)
        except ImageLoadError:
            abort(404)
    if not store.exists(img.sha256, name):
        abort(404)
    resp = send_file(store.path(img.sha256, name), mimetype="image/png", max_age=3600)
    resp.cache_control.public = False  # patient images: never in a shared (proxy) cache, like original.png
    resp.cache_control.private = True
    return resp


@bp.post("/cases/<int:case_id>/images/<int:image_id>/retry")
@role_required("edit")
def retry(case_id: int, image_id: int):
    c = _case_or_404(case_id, "edit")
    img = db().scalar(select(CaseImage).where(CaseImage.id == image_id, CaseImage.case_id == c.id))
    if img is None or img.analysis is None or not EmptyForm().validate_on_submit():
        abort(404)
    try:  # refused once signed: re-queuing would reopen a signed case (and unfreeze its uploads)
        case_store.retry_failed(db(), img.analysis)
        db().commit()
    except case_store.CaseError as exc:
        db().rollback()
        flash(str(exc), "error")
    else:
        notify_workers()
    return redirect(url_for("cases.view", case_id=c.id))


@bp.post("/cases/<int:case_id>/sign")
@role_required("sign")
def sign(case_id: int):
    c = _case_or_404(case_id, "sign")
    options = case_store.diagnosis_options(registry.get(c.analyzer_id))
    labels = [k for k, _ in options]
    form = SignForm()
    form.final_diagnosis.choices = [CHOOSE] + options
    seen = seen_revision(form)
    s = db()
    if form.validate_on_submit():
        try:
            done = workflow.sign(s, c, me(), form.final_diagnosis.data, labels, comment=form.comment.data,
                                 override_reason=form.override_reason.data, uncertainty_note=form.uncertainty_note.data,
                                 amendment_reason=form.amendment_reason.data, revision=seen,
                                 confirm_unverified=bool(form.confirm_unverified.data),
                                 blast_flag_pct=settings().blast_flag_pct)
            s.commit()
        except case_store.CaseError as exc:
            s.rollback()
            show_errors(form, exc)
        else:
            if done.review is None:
                flash("Your reading is recorded. The analyzer's policy asks a second doctor to confirm it before the "
                      "report is final; the case is in the second-read worklist.", "ok")
            else:
                flash(f"Case signed (version {done.review.version}).", "ok")
            return redirect(url_for("cases.view", case_id=c.id))
    else:  # the form itself was refused: say everything else the sign-off lacks too, in one pass
        problems = [(f, m) for f, m in case_store.sign_problems(
            c, form.final_diagnosis.data or "", labels, override_reason=form.override_reason.data,
            uncertainty_note=form.uncertainty_note.data, amendment_reason=form.amendment_reason.data)
            if not getattr(form, f).errors]
        if seen is not None and seen != c.revision:
            problems.append((None, case_store.CASE_CHANGED))
        for field, message in problems:
            show_errors(form, case_store.CaseError(message, field))
    c = _case_or_404(case_id)
    form.revision.data = str(c.revision)  # the page shown now is what the signer reviews next
    return _case_page(c, form, 400)


@bp.post("/cases/<int:case_id>/delete")
@role_required("edit")
def delete(case_id: int):
    c = _case_or_404(case_id, "edit")
    if not EmptyForm().validate_on_submit():
        abort(400)
    patient_id = c.patient_id
    try:
        case_store.delete_empty_case(db(), c)
        db().commit()
    except case_store.CaseError as exc:
        db().rollback()
        flash(str(exc), "error")
        return redirect(url_for("cases.view", case_id=case_id))
    flash(f"Empty case #{case_id} deleted.", "ok")
    return redirect(url_for("patients.view", patient_id=patient_id))


@bp.get("/cases/<int:case_id>/report.pdf")
@login_required
def report(case_id: int):
    c = _case_or_404(case_id)
    return download(exports.pdf_report(c, files(), settings().clinic_name))


EXPORTS = {  # format in the URL -> the export of a case
    "fhir": lambda c: exports.fhir_bundle(c, files(), settings().clinic_name, request.host_url.rstrip("/")),
    "hl7": exports.hl7_message,
    "dicom-sr": lambda c: exports.dicom_sr(c, settings().clinic_name),
}


@bp.get("/cases/<int:case_id>/export/<fmt>")
@login_required
def export(case_id: int, fmt: str):
    """Downloads for hospital systems: FHIR R4 bundle, HL7 v2 ORU^R01 or DICOM SR (signed cases only)."""
    c = _case_or_404(case_id)
    if fmt not in EXPORTS:
        abort(404)
    try:
        return download(EXPORTS[fmt](c))
    except exports.NotSigned as exc:
        flash(str(exc), "error")
        return redirect(url_for("cases.view", case_id=c.id))


@bp.get("/cases/<int:case_id>/images/<int:image_id>/seg.dcm")
@login_required
def export_seg(case_id: int, image_id: int):
    c = _case_or_404(case_id)
    try:
        return download(exports.dicom_seg(c, image_id, files()))
    except exports.ImageNotInCase:
        abort(404)
    except exports.NoMask as exc:
        flash(str(exc), "error")
        return redirect(url_for("cases.view", case_id=c.id))


@bp.post("/cases/<int:case_id>/hl7/send")
@role_required("edit")
def send_hl7(case_id: int):
    c = _case_or_404(case_id, "edit")
    if not EmptyForm().validate_on_submit():
        abort(400)
    try:
        delivery = exports.send_hl7(c, settings().hl7_host, settings().hl7_port)
    except exports.NotSigned:
        flash(SEND_NEEDS_SIGNATURE, "error")
    else:
        if delivery.sent:
            flash("HL7 result sent; the receiving system acknowledged it.", "ok")
        elif delivery.outcome == exports.NO_DESTINATION:
            flash("No HL7 destination is configured (ONCOSCOPE_HL7_HOST / ONCOSCOPE_HL7_PORT).", "error")
        else:
            flash(f"Sending failed: {delivery.detail}", "error")
    return redirect(url_for("cases.view", case_id=c.id))


@bp.get("/cases/")
@login_required
def history():
    s, u = db(), me()
    # only the filters travel on in the pager's links
    args = MultiDict([(k, v) for k, v in request.args.items(multi=True) if k in ("status", "diagnosis", "doctor", "from", "to", "q")])

    def _date(v):
        try:
            return dt.date.fromisoformat(v) if v else None
        except ValueError:
            return None

    filters = {"status": args.get("status", "")[:20], "diagnosis": args.get("diagnosis", "")[:64],
               "doctor_id": int_arg(args.get("doctor"), 0, 0) or None, "date_from": _date(args.get("from")),
               "date_to": _date(args.get("to")), "text": args.get("q", "")[:100]}
    page = case_store.history(s, u, page=int_arg(args.get("page")), per_page=settings().page_size, **filters)
    audit.subject(shown_cases=[c.id for c in page.items])
    doctors = list(s.scalars(select(User).where(User.role == "doctor").order_by(User.name))) if u.is_admin else []
    names = {}  # code -> name; one option per code, even where two analyzers share a code
    for a in registry.available():
        for code, name in case_store.diagnosis_options(registry.get(a)):
            names.setdefault(code, name)
    labels = sorted(names.items(), key=lambda cn: cn[1])
    return render_template("cases/history.html", page=page, filters=filters, args=args, doctors=doctors,
                           labels=labels, title="Case history")
