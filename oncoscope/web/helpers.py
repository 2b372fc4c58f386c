"""Request-scoped helpers shared by the blueprints (no SQL in templates, thin views)."""

from __future__ import annotations

import hashlib
import time
from functools import wraps

from flask import Response, abort, current_app, g, request, session
from flask_login import current_user, login_required, login_user
from sqlalchemy.orm import Session

from ..config import Settings
from ..services.exports import Export
from ..store import access
from ..store.files import FileStore
from ..store.models import User


def ext() -> dict:
    return current_app.extensions["oncoscope"]


def settings() -> Settings:
    return ext()["settings"]


def files() -> FileStore:
    return ext()["files"]


def notify_workers() -> None:
    """After a commit that queued analyses: wake the in-process pool, or hand the jobs to the queue."""
    runner = ext().get("workers")
    if runner is not None:
        runner.notify()


def db() -> Session:
    if "db" not in g:
        g.db = ext()["sessions"]()
    return g.db


def db_session_teardown(exc=None) -> None:
    s = g.pop("db", None)
    if s is not None:
        if exc is not None:
            s.rollback()
        s.close()


class LoginUser:
    """What Flask-Login keeps: the user row plus the session version it was issued for."""

    def __init__(self, user):
        self.user = user
        self.id = user.id

    is_authenticated = True
    is_anonymous = False

    @property
    def is_active(self):
        return self.user.is_active

    def get_id(self) -> str:
        return f"{self.user.id}:{self.user.session_version}"

    def __getattr__(self, name):
        return getattr(self.user, name)


def load_user(token: str):
    try:
        uid, ver = (int(x) for x in token.split(":"))
    except ValueError:
        return None
    user = db().get(User, uid)
    if user is None or not user.is_active or user.session_version != ver:
        return None  # password changed / deactivated: every session ends
    return LoginUser(user)


def browser_fingerprint() -> str:
    """What ties a session to the browser it was opened in: its user agent. (Not its address:
    mobile networks and hospital NAT change that legitimately; the audit trail records it.)"""
    return hashlib.sha256(request.headers.get("User-Agent", "").encode("utf-8", "replace")).hexdigest()[:32]


def start_session(user) -> None:
    """Sign ``user`` in with a new session bound to this browser (anything planted before is dropped)."""
    session.clear()
    login_user(LoginUser(user))
    session["seen"] = time.time()
    session["browser"] = browser_fingerprint()


def me():
    """The signed-in User row."""
    return current_user.user


def admin_required(view):
    @wraps(view)
    @login_required
    def wrapper(*a, **kw):
        if not current_user.is_admin:
            abort(403)
        return view(*a, **kw)

    return wrapper


def role_required(capability: str):
    """The signed-in user's role must allow ``capability`` (store/access), checked before any lookup."""
    def decorate(view):
        @wraps(view)
        @login_required
        def wrapper(*a, **kw):
            if not access.may(me(), capability):
                abort(403)
            return view(*a, **kw)

        return wrapper

    return decorate


def show_errors(form, exc, default: str | None = None) -> None:
    """Every problem a store function found next to its field (``exc.errors``: (field, message)
    pairs, else ``exc.field``, else ``default``); those about no field go above the form, and the
    error summary lists them all."""
    for name, message in getattr(exc, "errors", None) or [(getattr(exc, "field", None) or default, str(exc))]:
        field = getattr(form, name, None) if name else None
        if field is not None:
            field.errors = [*field.errors, message]
        else:
            form.form_errors.append(message)


def int_arg(value, default: int = 1, lo: int = 1, hi: int = 10_000) -> int:
    try:
        return max(lo, min(hi, int(value)))
    except (TypeError, ValueError):
        return default


def download(export: Export) -> Response:
    """An export (``services.exports``) as a file download."""
    return Response(export.body, mimetype=export.media_type,
                    headers={"Content-Disposition": f'attachment; filename="{export.filename}"'})
