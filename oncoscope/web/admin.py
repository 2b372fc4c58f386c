"""Administration: user accounts, the audit trail and the dashboards."""

from __future__ import annotations

import datetime as dt

from flask import Blueprint, Response, abort, flash, redirect, render_template, request, stream_with_context, url_for
from sqlalchemy import select

from ..analyzers import registry
from ..store import audit as audit_store
from ..store import dashboards as dashboard_store
from ..store import users as user_store
from ..store.models import User
from .forms import EmptyForm, ResetPasswordForm, RoleForm, UserForm
from . import audit
from .helpers import admin_required, db, int_arg, me, show_errors

bp = Blueprint("admin", __name__, url_prefix="/admin")


def _user_or_404(user_id: int) -> User:
    u = db().get(User, user_id)
    if u is None:
        abort(404)
    return u


@bp.route("/users", methods=["GET", "POST"])
@admin_required
def users():
    s = db()
    form = UserForm()
    if form.validate_on_submit():
        try:
            u = user_store.create_user(s, form.email.data, form.name.data, form.password.data, form.role.data)
            s.commit()
        except user_store.AccountError as exc:
            s.rollback()
            show_errors(form, exc, "email")
        else:
            audit.subject(resource=("user", u.id), email=u.email, role=u.role)
            flash(f"Account created for {u.name}. Give them the initial password securely.", "ok")
            return redirect(url_for("admin.users"))
    rows = list(s.scalars(select(User).order_by(User.is_active.desc(), User.name)))
    return render_template("admin/users.html", users=rows, form=form, action=EmptyForm(), title="Users")


@bp.post("/users/<int:user_id>/active")
@admin_required
def toggle_active(user_id: int):
    u = _user_or_404(user_id)
    if not EmptyForm().validate_on_submit():
        abort(400)
    if u.id == me().id:
        flash("You cannot deactivate your own account.", "error")
    else:
        u.is_active = not u.is_active
        u.session_version += 1
        db().commit()
        audit.subject(change="reactivated" if u.is_active else "deactivated", email=u.email)
        flash(f"{u.name} {'re-activated' if u.is_active else 'deactivated'}.", "ok")
    return redirect(url_for("admin.users"))


@bp.route("/users/<int:user_id>", methods=["GET", "POST"])
@admin_required
def edit_user(user_id: int):
    u = _user_or_404(user_id)
    pw_form, role_form = ResetPasswordForm(prefix="pw"), RoleForm(prefix="role", obj=u)
    s = db()
    if "pw-password" in request.form:  # the reset form was sent (an empty password is an error, not a role change)
        audit.subject(change="password_reset", email=u.email)
        if u.id == me().id:  # without the current password, a stolen admin session could take the account
            audit.note("denied", reason="own password: use the password change form")
            flash("Change your own password on the Change password page (it asks for your current one).", "error")
            return redirect(url_for("admin.edit_user", user_id=u.id))
        elif pw_form.validate_on_submit():
            try:
                user_store.set_password(s, u, pw_form.password.data)
                s.commit()
            except user_store.AccountError as exc:
                pw_form.password.errors.append(str(exc))
            else:
                flash(f"Password reset for {u.name}; their sessions were signed out.", "ok")
                return redirect(url_for("admin.users"))
    elif "role-role" in request.form and role_form.validate_on_submit():
        if u.id == me().id and role_form.role.data != "admin":
            flash("You cannot remove your own administrator role.", "error")
        else:
            audit.subject(change="role", email=u.email, old_role=u.role, new_role=role_form.role.data)
            if role_form.role.data != u.role:  # only a real change signs the user out
                u.role = role_form.role.data
                u.session_version += 1
                s.commit()
            flash(f"{u.name} is now {'an administrator' if u.role == 'admin' else 'a doctor'}.", "ok")
            return redirect(url_for("admin.users"))
    return render_template("admin/user.html", user=u, pw_form=pw_form, role_form=role_form, title=u.name)


def _audit_filter() -> audit_store.AuditFilter:
    a = request.args

    def _date(v):
        try:
            return dt.date.fromisoformat(v) if v else None
        except ValueError:
            return None

    pid = a.get("patient", "").strip()
    outcome = a.get("outcome", "")
    return audit_store.AuditFilter(
        actor=a.get("actor", "")[:255], action=a.get("action", "")[:64],
        outcome=outcome if outcome in audit_store.OUTCOMES else "",
        patient_id=int(pid) if pid.isdigit() and int(pid) < 2**31 else None,
        resource=a.get("resource", "")[:100], ip=a.get("ip", "")[:64],
        date_from=_date(a.get("from")), date_to=_date(a.get("to")))


@bp.get("/audit")
@admin_required
def audit_log():
    f = _audit_filter()
    page = audit_store.search(db(), f, int_arg(request.args.get("page")), 50)
    actions = sorted({a for m in audit.ACTIONS.values() for a in m.values()} | set(audit_store.SYSTEM_ACTIONS))
    return render_template("admin/audit.html", page=page, f=f, args=request.args, actions=actions,
                           outcomes=audit_store.OUTCOMES, title="Audit trail")


@bp.get("/audit.csv")
@admin_required
def audit_csv():
    f = _audit_filter()
    s = db()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Response(stream_with_context(audit_store.export_csv(s, f)), mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="oncoscope-audit-{stamp}.csv"'})


def _dashboards():
    """The period asked for (?weeks=N, 1 to 104, default 12) and its dashboards, one per analyzer."""
    weeks = int_arg(request.args.get("weeks"), default=12, hi=104)
    return weeks, dashboard_store.dashboards(db(), me(), registry.available(), weeks)


@bp.get("/dashboards")
@admin_required
def dashboards():
    weeks, boards = _dashboards()
    return render_template("admin/dashboards.html", boards=boards, weeks=weeks, title="Dashboards")


@bp.get("/dashboards.csv")
@admin_required
def dashboards_csv():
    weeks, boards = _dashboards()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = f"oncoscope-dashboards-{weeks}w-{stamp}.csv"
    return Response(dashboard_store.dashboards_csv(boards), mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})
