"""The report's workflow on the case page: preliminary result, second reading, cancelling, consults;
the worklists; the administrator's workflow settings. Thin views over store/workflow, store/consults
and store/worklists."""

from __future__ import annotations

from flask import Blueprint, abort, flash, g, redirect, render_template, request, url_for
from flask_login import login_required

from ..analyzers import registry
from ..services import gallery
from ..store import access
from ..store import cases as case_store
from ..store import consults as consult_store
from ..store import workflow
from ..store import worklists
from ..vocab import SECOND_READER_POLICIES
from . import audit
from .case_page import (CHOOSE, case_or_404 as _case_or_404, case_page, consult_form, diagnosis_choices,
                        diagnosis_codes, seen_revision)
from .cells import thumbnails
from .forms import (AnswerForm, CancelForm, ConsultForm, EmptyForm, PreliminaryForm, SecondReadForm,
                    WorkflowSettingsForm)
from .helpers import admin_required, db, int_arg, me, role_required, show_errors

bp = Blueprint("workflow", __name__)


# ----------------------------------------------------------------------------- the case page's part
def _back(c):
    return redirect(url_for("cases.view", case_id=c.id))


def _rerender(c, status: int = 400, **forms):
    return case_page(c, workflow_forms=forms, status=status)


def _saved(form, field: str, act):
    """Run a store change and commit it: (True, its result), or (False, None) with the refusal shown
    on the form (``field`` when the store named none)."""
    try:
        out = act()
        db().commit()
    except case_store.CaseError as exc:
        db().rollback()
        show_errors(form, exc, field)
        return False, None
    return True, out


def _diagnosis_form(form_class, c):
    form = form_class()
    form.diagnosis.choices = [CHOOSE] + diagnosis_choices(c)
    return form


# ----------------------------------------------------------------------------- transitions
@bp.post("/cases/<int:case_id>/preliminary")
@role_required("prepare")
def preliminary(case_id: int):
    c = _case_or_404(case_id, "prepare")
    form = _diagnosis_form(PreliminaryForm, c)
    if form.validate_on_submit():
        ok, _ = _saved(form, "diagnosis", lambda: workflow.write_preliminary(
            db(), c, me(), form.diagnosis.data, diagnosis_codes(c), form.comment.data or "",
            revision=seen_revision(form)))
        if ok:
            flash("Preliminary result saved; the case is in the doctors' worklist to verify.", "ok")
            return _back(c)
    return _rerender(_case_or_404(case_id), preliminary=form)


@bp.post("/cases/<int:case_id>/second-read")
@role_required("sign")
def second_read(case_id: int):
    c = _case_or_404(case_id, "sign")
    form = _diagnosis_form(SecondReadForm, c)
    if form.validate_on_submit():
        ok, review = _saved(form, "diagnosis", lambda: workflow.second_read(
            db(), c, me(), form.diagnosis.data, diagnosis_codes(c), form.comment.data or "",
            revision=seen_revision(form)))
        if ok:
            audit.subject(agrees=review is not None)
            if review is not None:
                flash("Your reading agrees with the first reader's: the report is final.", "ok")
            else:
                flash("Your reading differs from the first reader's. Both readings are now shown to both of you: "
                      "one of you signs the agreed diagnosis.", "info")
            return _back(c)
    return _rerender(_case_or_404(case_id), second=form)


@bp.post("/cases/<int:case_id>/cancel")
@role_required("edit")
def cancel(case_id: int):
    c = _case_or_404(case_id, "edit")
    form = CancelForm()
    if form.validate_on_submit():
        ok, _ = _saved(form, "reason", lambda: workflow.cancel(db(), c, me(), form.reason.data))
        if ok:
            flash(f"Case #{c.id} cancelled.", "ok")
            return _back(c)
    return _rerender(_case_or_404(case_id), cancel=form)


# ----------------------------------------------------------------------------- consults
@bp.post("/cases/<int:case_id>/consults")
@role_required("consult")
def ask(case_id: int):
    c = _case_or_404(case_id, "consult")
    form = consult_form(c, ConsultForm())
    if form.validate_on_submit():
        region = [int(v) for v in form.region.data.split(",")] if form.region.data else None
        cells = [int(v) for v in form.cell_ids.data.split(",")] if form.cell_ids.data else None
        ok, k = _saved(form, "question", lambda: consult_store.ask(
            db(), c, me(), form.consultant_id.data or None, form.question.data, form.image_id.data or None, region,
            cells))
        if ok:
            audit.subject(resource=("consult", k.id), consultant=k.consultant_id, cells=len(k.cell_ids or []))
            flash("Consult sent.", "ok")
            return redirect(url_for("workflow.consult", consult_id=k.id))
    if request.form.get("from") == "cells":  # asked from the gallery: back to it, with the reasons
        for errors in form.errors.values():
            for message in errors:
                flash(message, "error")
        audit.note("rejected")
        return redirect(url_for("cells.view", case_id=c.id))
    return _rerender(_case_or_404(case_id), consult=form)


def _consult_or_404(consult_id: int):
    k = consult_store.get_visible(db(), me(), consult_id)
    if k is None:
        abort(404)
    audit.subject(patient_id=k.case.patient_id)
    return k


@bp.get("/consults/<int:consult_id>")
@login_required
def consult(consult_id: int):
    return _consult_page(_consult_or_404(consult_id), AnswerForm(formdata=None))


def _consult_page(k, form, status: int = 200):
    cells, images = thumbnails(db(), k.case, k.cell_ids) if k.cell_ids else ([], {})
    return render_template("cases/consult.html", consult=k, form=form, may_answer=consult_store.may_answer(me(), k),
                           cells=cells, images=images, thumb_px=gallery.THUMB_PX, columns=gallery.COLUMNS,
                           may_open_case=case_store.get_visible(db(), me(), k.case_id) is not None,
                           may_close=k.status == "open" and consult_store.may_close(me(), k),
                           title=f"Consult {k.id} on case {k.case_id}"), status


@bp.post("/consults/<int:consult_id>/messages")
@login_required
def answer(consult_id: int):
    k = _consult_or_404(consult_id)
    if not consult_store.may_answer(me(), k) and k.status == "open":
        abort(403)
    form = AnswerForm()  # (a closed consult is refused by the store, with its message on the form)
    if form.validate_on_submit():
        ok, _ = _saved(form, "body", lambda: consult_store.answer(db(), k, me(), form.body.data))
        if ok:
            return redirect(url_for("workflow.consult", consult_id=k.id))
    return _consult_page(k, form, 400)


@bp.post("/consults/<int:consult_id>/close")
@login_required
def close(consult_id: int):
    k = _consult_or_404(consult_id)
    if not EmptyForm().validate_on_submit():
        abort(400)
    try:
        consult_store.close(db(), k, me())
        db().commit()
    except access.Forbidden:
        db().rollback()
        abort(403)
    except case_store.CaseError as exc:
        db().rollback()
        flash(str(exc), "error")
    else:
        flash("Consult closed; the consultant's access to the case ended.", "ok")
    return redirect(url_for("workflow.consult", consult_id=k.id))


# ----------------------------------------------------------------------------- worklists
@bp.get("/worklist/<queue>")
@login_required
def worklist(queue: str):
    if queue not in worklists.QUEUES:
        abort(404)
    sort = request.args.get("sort", "priority")
    sort = sort if sort in worklists.SORTS else "priority"
    page = worklists.queue_page(db(), me(), queue, sort, int_arg(request.args.get("page")))
    g.worklist_counts = worklists.counts(db(), me(), known={queue: page.total})  # (the navigation's)
    shown = [x.case_id for x in page.items] if queue == "consults" else [x.id for x in page.items]
    audit.subject(shown_cases=shown)
    return render_template("worklist.html", queue=queue, queues=worklists.QUEUES, sort=sort, sorts=worklists.SORTS,
                           page=page, title=worklists.QUEUES[queue])


# ----------------------------------------------------------------------------- settings
@bp.route("/admin/workflow", methods=["GET", "POST"])
@admin_required
def settings_page():
    s = db()
    form = WorkflowSettingsForm()
    if request.method == "POST" and form.validate_on_submit():
        try:
            for a in registry.available():
                chosen = request.form.get(f"policy-{a}", "")
                if chosen:
                    workflow.set_second_reader_policy(s, me(), a, chosen)
            workflow.set_preliminary_release(s, me(), bool(form.release_preliminary.data))
            s.commit()
        except case_store.CaseError as exc:
            s.rollback()
            flash(str(exc), "error")
        else:
            audit.subject(policies=workflow.policies(s), release_preliminary=workflow.preliminary_release_allowed(s))
            flash("Workflow settings saved.", "ok")
            return redirect(url_for("workflow.settings_page"))
    if request.method == "GET":
        form.release_preliminary.data = workflow.preliminary_release_allowed(s)
    return render_template("admin/workflow.html", form=form, policies=workflow.policies(s),
                           choices=SECOND_READER_POLICIES, analyzer_names={a: registry.get(a).name
                                                                           for a in registry.available()},
                           title="Workflow settings")
