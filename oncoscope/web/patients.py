"""Patients: search, create, edit, view with the case timeline, assignment to doctors."""

from __future__ import annotations

import datetime as dt

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import login_required
from sqlalchemy import select

from ..imaging.imageio import ImageLoadError, load_image
from ..store import access
from ..store import history as history_store
from ..store import patients as patient_store
from ..store.models import User
from .forms import AssignForm, EmptyForm, PatientForm
from . import audit
from .helpers import admin_required, db, int_arg, me, role_required, settings, show_errors

bp = Blueprint("patients", __name__, url_prefix="/patients")


def _patient_or_404(patient_id: int):
    p = patient_store.get_visible(db(), me(), patient_id)
    if p is None:
        abort(404)  # same answer whether it does not exist or is someone else's
    audit.subject(patient_id=p.id)
    return p


@bp.get("/")
@login_required
def index():
    q = request.args.get("q", "")[:100]
    page = patient_store.search(db(), me(), q, int_arg(request.args.get("page")), settings().page_size)
    audit.subject(shown_patients=[p.id for p in page.items])
    return render_template("patients/index.html", page=page, q=q, title="Patients")


@bp.route("/new", methods=["GET", "POST"])
@role_required("edit")
def new():
    form = PatientForm()
    if form.validate_on_submit():
        s = db()
        try:
            p = patient_store.create(s, me(), form.data)
            s.commit()
        except patient_store.PatientError as exc:
            s.rollback()
            show_errors(form, exc, "mrn")
        else:
            audit.subject(patient_id=p.id, resource=("patient", p.id))
            flash(f"Patient {p.display_name} created.", "ok")
            return redirect(url_for("patients.view", patient_id=p.id))
    return render_template("patients/form.html", form=form, patient=None, dicom_form=EmptyForm(), title="New patient")


@bp.post("/from-dicom")
@role_required("edit")
def from_dicom():
    """Pre-fill the new-patient form from a DICOM file's patient module (nothing is stored)."""
    if not EmptyForm().validate_on_submit():
        abort(400)
    f = request.files.get("dicom")
    form = PatientForm(formdata=None)
    try:
        loaded = load_image(f.read() if f else b"")
        meta = loaded.dicom
        if meta is None:
            raise ImageLoadError("This file is an image but not DICOM: there is no patient information in it.")
    except ImageLoadError as exc:
        flash(f"Could not read patient data: {exc}", "error")
        return redirect(url_for("patients.new"))
    existing = patient_store.get_visible_by_mrn(db(), me(), meta.patient_id) if meta.patient_id else None
    if existing is not None:
        flash(f"A patient with MRN {meta.patient_id} already exists.", "info")
        return redirect(url_for("patients.view", patient_id=existing.id))
    family, _, given = (meta.patient_name or "").partition(", ")
    form.mrn.data, form.family_name.data, form.given_name.data = meta.patient_id, family, given
    problem = patient_store.mrn_problem(meta.patient_id) if meta.patient_id else None
    if problem:  # shown, not dropped: the person sees what the file says and types the real MRN
        form.mrn.errors = [f"The Patient ID in this DICOM file cannot be used as the MRN. {problem}"]
    if meta.birth_date:
        form.birth_date.data = dt.date.fromisoformat(meta.birth_date)
    form.sex.data = meta.sex_word
    flash("Pre-filled from the DICOM file: check the values, then save.", "info")
    return render_template("patients/form.html", form=form, patient=None, dicom_form=EmptyForm(), title="New patient")


@bp.get("/<int:patient_id>")
@login_required
def view(patient_id: int):
    p = _patient_or_404(patient_id)
    assign = None
    if me().is_admin:
        assign = AssignForm()
        assign.doctors.choices = _doctor_choices()
        assign.doctors.data = [d.id for d in p.doctors]
    history = history_store.patient_timeline(db(), me(), p)
    return render_template("patients/view.html", patient=p, assign=assign, history=history,
                           blast_flag_pct=settings().blast_flag_pct, title=p.display_name)


@bp.route("/<int:patient_id>/edit", methods=["GET", "POST"])
@role_required("edit")
def edit(patient_id: int):
    p = _patient_or_404(patient_id)
    form = PatientForm(obj=p)
    if form.validate_on_submit():
        s = db()
        try:
            patient_store.update(s, p, form.data)
            s.commit()
        except patient_store.PatientError as exc:
            s.rollback()
            show_errors(form, exc, "mrn")
        else:
            flash("Patient updated.", "ok")
            return redirect(url_for("patients.view", patient_id=p.id))
    return render_template("patients/form.html", form=form, patient=p, title=f"Edit {p.display_name}")


def _doctor_choices():
    staff = select(User).where(User.role.in_(patient_store.STAFF_ROLES), User.is_active.is_(True))
    return [(u.id, f"{u.name} ({access.ROLE_NAMES[u.role].lower()}, {u.email})")
            for u in db().scalars(staff.order_by(User.name))]


@bp.post("/<int:patient_id>/doctors")
@admin_required
def assign(patient_id: int):
    p = _patient_or_404(patient_id)
    form = AssignForm()
    form.doctors.choices = _doctor_choices()
    if form.validate_on_submit():
        patient_store.set_doctors(db(), p, form.doctors.data or [])
        db().commit()
        flash("Access updated.", "ok")
    else:
        flash("Choose doctors from the list.", "error")
    return redirect(url_for("patients.view", patient_id=p.id))
