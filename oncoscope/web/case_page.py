"""The case page, shared by the blueprints that act on a case (cases, cells, workflow): finding the
case the user may see, and rendering the page with its forms."""

from __future__ import annotations

from flask import abort, render_template, request

from ..analyzers import registry
from ..store import access
from ..store import cases as case_store
from . import audit
from .api.serializers import cell_review_json
from ..store import consults as consult_store
from ..store import workflow, worklists
from ..vocab import SECOND_READER_POLICIES
from .forms import AnswerForm, CancelForm, ConsultForm, EmptyForm, PreliminaryForm, SecondReadForm, SignForm
from .helpers import db, me, settings


def case_or_404(case_id: int, need: str | None = None):
    """The case, if the user may see it (else 404, as for one that does not exist); with ``need``, the
    user must also have full access to it for that capability (a consultant only reads: 403)."""
    c = case_store.get_visible(db(), me(), case_id)
    if c is None:
        abort(404)
    audit.subject(patient_id=c.patient_id)
    if need is not None:
        try:
            access.require(db(), me(), need, c)
        except access.Forbidden:
            abort(403)
    return c


CHOOSE = ("", "Choose a diagnosis…")


def sign_form_for(c, an, agg) -> SignForm:
    """A fresh sign-off form. Pre-selected only with something a person or the AI actually said:
    an amendment starts from the signed version (its texts too), a first sign-off from the AI's
    label when the AI was sure of it; with no AI label, or an uncertain one, nothing is chosen and
    the signer must pick one explicitly (one click must not accept a result the AI itself refers)."""
    form = SignForm(formdata=None)
    form.final_diagnosis.choices = [CHOOSE] + case_store.diagnosis_options(an)
    current = c.current_review
    if current is not None:
        form.final_diagnosis.data = current.final_diagnosis
        form.override_reason.data = current.override_reason
        form.uncertainty_note.data = current.uncertainty_note
        form.comment.data = current.comment
    elif (prelim := workflow.current_reading(c, "preliminary")) is not None:  # what the preparer said
        form.final_diagnosis.data, form.comment.data = prelim.diagnosis, prelim.comment
    else:
        form.final_diagnosis.data = agg.label if agg.label and agg.status == "ok" else ""
    form.revision.data = str(c.revision)
    return form


def case_page(c, sign_form: SignForm | None = None, status: int = 200, workflow_forms: dict | None = None):
    """The case page; ``sign_form`` carries a rejected submission, else a fresh pre-filled form is made."""
    an = registry.installed(c.analyzer_id)
    agg = case_store.aggregate(c)
    if sign_form is None and an is not None:
        sign_form = sign_form_for(c, an, agg)
    if sign_form is not None and agg.label is None:
        sign_form.override_reason.label.text = "Reason for this diagnosis"
    cell_review = cell_review_json(c, settings().blast_flag_pct)
    queue = request.args.get("wl", "")
    next_case = worklists.next_case(db(), me(), queue, c.id) if queue in worklists.QUEUES else None
    return render_template("cases/view.html", case=c, analyzer=an, agg=agg, sign_form=sign_form, cell_review=cell_review,
                           upload_form=EmptyForm(), max_mb=settings().max_upload_mb, wf=panel(c, workflow_forms),
                           next_case=next_case, worklist_queue=queue, title=f"Case {c.id}"), status


def diagnosis_choices(c) -> list[tuple[str, str]]:
    """What a reading of the case can name (none when its analyzer is no longer installed)."""
    an = registry.installed(c.analyzer_id)
    return case_store.diagnosis_options(an) if an is not None else []


def diagnosis_codes(c) -> list[str]:
    """The codes of :func:`diagnosis_choices`, which a reading is checked against."""
    return [k for k, _ in diagnosis_choices(c)]


def seen_revision(form) -> int | None:
    """The case revision the form was filled in on (its hidden field), or None."""
    return int(form.revision.data) if (form.revision.data or "").isdigit() else None


def consult_form(c, form: ConsultForm | None = None) -> ConsultForm:
    """The form to ask about case ``c`` (the submitted one, or a blank one), with its choices."""
    form = form or ConsultForm(formdata=None)
    form.consultant_id.choices = [(0, "Any reviewer")] + [
        (x.id, f"{x.name} ({access.ROLE_NAMES[x.role].lower()})") for x in consult_store.consultant_choices(db(), me())]
    form.image_id.choices = [(0, "The whole case")] + [(i.id, f"Image {n}: {i.original_filename}")
                                                       for n, i in enumerate(c.images, start=1)]
    return form


def panel(c, forms: dict | None = None) -> dict:
    """What the case page shows of the workflow to the signed-in user (blinding included)."""
    s, u = db(), me()
    forms = forms or {}
    full = access.case_access(s, u, c) == "full"
    blind = workflow.blinded(c, u)
    readings = [] if blind else [r for r in c.readings if r.current]
    prelim = PreliminaryForm(formdata=None) if "preliminary" not in forms else forms["preliminary"]
    prelim.diagnosis.choices = [CHOOSE] + diagnosis_choices(c)
    second = SecondReadForm(formdata=None) if "second" not in forms else forms["second"]
    second.diagnosis.choices = [CHOOSE] + diagnosis_choices(c)
    for f in (prelim, second):
        f.revision.data = str(c.revision)
    consult = consult_form(c, forms.get("consult"))
    mine = consult_store.shown_on(c, u, full)
    readers = {r.user_id for r in c.readings if r.current and r.kind in ("first", "second")}
    analyses = [i.analysis for i in c.images if i.analysis is not None]
    nothing_to_read = not any(a.job_status == "done" and a.result_status in ("ok", "uncertain") for a in analyses)
    policy = workflow.second_reader_policy(s, c.analyzer_id)
    return {
        "report_state": case_store.report_state(c), "full_access": full, "blinded": blind, "readings": readings,
        "may": {cap: full and access.may(u, cap) for cap in access.CAPABILITIES},
        "second_reader_due": c.status == "second_read" and blind and access.may(u, "sign"),
        "discordant": (c.status == "second_read" and workflow.current_reading(c, "second") is not None),
        "preliminary_form": prelim, "second_form": second, "cancel_form": forms.get("cancel") or CancelForm(formdata=None),
        "consult_form": consult, "answer_form": AnswerForm(formdata=None), "consults": mine,
        "policy": SECOND_READER_POLICIES[policy], "policy_applies": policy != "none" and c.current_review is None,
        "is_reader": u.id in readers,
        "releasable": c.status == "preliminary" and workflow.preliminary_release_allowed(s),
        "cancellable": (full and access.may(u, "edit") and c.status in case_store.UNSIGNED and nothing_to_read
                        and not any(a.job_status in case_store.PENDING for a in analyses)),
    }



