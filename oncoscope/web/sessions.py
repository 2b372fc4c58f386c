"""Who is signed in: Flask-Login wiring, and the checks every request's session passes (idle too
long, or presented by another browser: a copied cookie)."""

from __future__ import annotations

import datetime as dt

from flask import Flask, flash, redirect, request, session, url_for
from flask_login import LoginManager, current_user, logout_user

from . import audit
from .errors import error_response
from .helpers import browser_fingerprint, load_user, settings

login_manager = LoginManager()


def sign_in_first():
    """A page that needs a signed-in user: the API answers 401, a page sends the browser to sign in."""
    audit.denied()
    if request.blueprint == "api":
        return error_response(401, "unauthenticated", "Sign in first.")
    flash(login_manager.login_message, "info")
    return redirect(url_for("auth.login", next=request.full_path if request.query_string else request.path))


def check_session():
    """End a session that was idle too long, or that is presented by another browser (a copied cookie)."""
    session.permanent = True
    if not current_user.is_authenticated:
        return
    now = dt.datetime.now(dt.timezone.utc).timestamp()
    last = session.get("seen", now)
    if "browser" not in session:  # opened by a version that did not record the browser
        message = "Please sign in again."
    elif session["browser"] != browser_fingerprint():
        message = "Your session was opened in another browser. Please sign in again."
    elif now - last > settings().session_idle_minutes * 60:
        message = "Your session expired after inactivity. Please sign in again."
    else:
        session["seen"] = now
        return
    logout_user()
    session.clear()
    flash(message, "info")


def init_app(app: Flask) -> None:
    login_manager.init_app(app)
    login_manager.login_view = "auth.login"
    login_manager.login_message = "Please sign in to continue."
    # Flask-Login's own protection does nothing for permanent sessions; check_session binds them
    login_manager.session_protection = None
    login_manager.user_loader(load_user)
    login_manager.unauthorized_handler(sign_in_first)
    app.before_request(check_session)
