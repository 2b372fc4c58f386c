"""First-run setup, sign in / out, password change."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, session, url_for
from flask_login import current_user, login_required, logout_user

from ..store import tokens as token_store
from ..store import users as user_store
from . import audit
from .forms import EmptyForm, LoginForm, PasswordForm, SetupForm, TokenForm
from .helpers import db, me, settings, show_errors, start_session

bp = Blueprint("auth", __name__)


def _safe_next(target: str | None) -> str:
    if (target and target.startswith("/") and not target.startswith("//") and "\\" not in target
            and not any(ord(ch) < 32 or ord(ch) == 127 for ch in target)):  # browsers drop tab/newline: "/\t/x" -> "//x"
        return target
    return url_for("main.home")


@bp.route("/setup", methods=["GET", "POST"])
def setup():
    s = db()
    if user_store.has_users(s):
        if request.method == "POST":
            audit.note("denied", reason="first-run setup is closed: accounts exist")
        return redirect(url_for("auth.login"))
    form = SetupForm()
    if form.validate_on_submit():
        try:
            u = user_store.create_user(s, form.email.data, form.name.data, form.password.data, role="admin")
            s.commit()
        except user_store.AccountError as exc:
            s.rollback()
            show_errors(form, exc, "email")
        else:
            start_session(u)
            audit.subject(resource=("user", u.id))
            flash("Administrator account created. Next: create accounts for your doctors.", "ok")
            return redirect(url_for("admin.users"))
    return render_template("auth/setup.html", form=form, title="First-run setup")


@bp.route("/login", methods=["GET", "POST"])
def login():
    s = db()
    if not user_store.has_users(s):
        return redirect(url_for("auth.setup"))
    if current_user.is_authenticated:
        audit.note(reason="already signed in")
        return redirect(url_for("main.home"))
    form = LoginForm()
    error = None  # (an idle-expired session is reported by a flash message)
    if form.validate_on_submit():
        st = settings()
        try:
            u = user_store.authenticate(s, form.email.data, form.password.data, st.login_max_failures,
                                        st.login_lock_minutes)
        except user_store.AccountError as exc:
            s.commit()  # keep the failure counter
            error = str(exc)
            audit.note("failure", reason=error, **user_store.sign_in_subject(s, form.email.data))
        else:
            s.commit()
            audit.note(actor=u, email=u.email)
            start_session(u)
            return redirect(_safe_next(request.args.get("next")))
    return render_template("auth/login.html", form=form, error=error, title="Sign in"), (401 if error and request.method == "POST" else 200)


@bp.post("/logout")
@login_required
def logout():
    # Sessions live in a signed cookie: bumping the version makes every copy of it (this
    # browser's and any other) invalid, so a copied cookie cannot outlive the sign-out.
    u = me()
    u.session_version += 1
    db().commit()
    logout_user()
    session.clear()
    flash("You are signed out.", "ok")
    return redirect(url_for("auth.login"))


@bp.route("/account/password", methods=["GET", "POST"])
@login_required
def change_password():
    form = PasswordForm()
    if form.validate_on_submit():
        s = db()
        u = me()
        try:
            user_store.authenticate(s, u.email, form.current.data, settings().login_max_failures,
                                    settings().login_lock_minutes)
        except user_store.AccountError:
            s.commit()
            audit.note("failure", reason="current password not correct")
            form.current.errors.append("The current password is not correct.")
        else:
            try:
                user_store.set_password(s, u, form.password.data)
            except user_store.AccountError as exc:
                form.password.errors.append(str(exc))
            else:
                s.commit()
                logout_user()
                session.clear()
                flash("Password changed. Every session was signed out; sign in with the new password.", "ok")
                return redirect(url_for("auth.login"))
    return render_template("auth/password.html", form=form, title="Change password")


@bp.route("/account/tokens", methods=["GET", "POST"])
@login_required
def tokens():
    form = TokenForm()
    new_token = None
    s = db()
    if form.validate_on_submit():
        _t, new_token = token_store.create(s, me(), form.name.data, form.expires_in_days.data)
        s.commit()
        audit.note("success", label=_t.name, prefix=_t.prefix)
        audit.subject(resource=("api_token", _t.id))
        form = TokenForm(formdata=None)
    return render_template("auth/tokens.html", form=form, tokens=token_store.for_user(s, me()), new_token=new_token,
                           action=EmptyForm(), title="API tokens")


@bp.post("/account/tokens/<int:token_id>/revoke")
@login_required
def revoke_token(token_id: int):
    if not EmptyForm().validate_on_submit():
        return redirect(url_for("auth.tokens"))
    if not token_store.revoke(db(), me(), token_id):
        abort(404)  # not yours, unknown or already revoked
    db().commit()
    flash("Token revoked.", "ok")
    return redirect(url_for("auth.tokens"))
