"""Flask application factory."""

from __future__ import annotations

import datetime as dt

from flask import Flask, flash, g, redirect, render_template, request, session, url_for
from flask_login import LoginManager, current_user, logout_user
from flask_wtf.csrf import CSRFError, CSRFProtect
from sqlalchemy.exc import OperationalError, InterfaceError
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import IntegerConverter

from ..config import Settings
from ..store.db import make_engine, make_session_factory
from ..store.files import FileStore

csrf = CSRFProtect()
login_manager = LoginManager()


def create_app(config: dict | None = None, settings: Settings | None = None, start_workers: bool = True) -> Flask:
    app = Flask(__name__)
    app.url_map.converters["int"] = BoundedInt  # ids beyond the database's integer range are simply not found
    settings = (settings or Settings.from_env()).prepare()
    app.config.update(
        SECRET_KEY=settings.secret_key,
        MAX_CONTENT_LENGTH=settings.max_upload_mb * 1024 * 1024 * 20,  # whole multi-file request; per file below
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        REMEMBER_COOKIE_HTTPONLY=True,
        WTF_CSRF_TIME_LIMIT=None,
        PERMANENT_SESSION_LIFETIME=dt.timedelta(minutes=settings.session_idle_minutes),
    )
    if config:
        app.config.update(config)
    if settings.trusted_proxies:  # the audited address is the client's, not the proxy's
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies)
    engine = make_engine(settings.database_url)
    app.extensions["oncoscope"] = {
        "settings": settings,
        "engine": engine,
        "sessions": make_session_factory(engine),
        "files": FileStore(settings.images_dir),
    }
    csrf.init_app(app)
    login_manager.init_app(app)
    login_manager.login_view = "auth.login"
    login_manager.login_message = "Please sign in to continue."
    # Flask-Login's own protection does nothing for permanent sessions; _session_checks binds them
    login_manager.session_protection = None

    from . import admin, api, auth, cases, patients, views

    for bp in (views.bp, auth.bp, patients.bp, cases.bp, admin.bp, api.bp):
        app.register_blueprint(bp)

    from . import audit
    from .helpers import browser_fingerprint, db_session_teardown, load_user

    login_manager.user_loader(load_user)
    app.teardown_appcontext(db_session_teardown)

    @login_manager.unauthorized_handler
    def _sign_in_first():
        audit.denied()
        if request.blueprint == "api":
            return _api_json(401, "unauthenticated", "Sign in first.")
        flash(login_manager.login_message, "info")
        return redirect(url_for("auth.login", next=request.full_path if request.query_string else request.path))

    @app.before_request
    def _session_checks():
        """End a session that was idle too long, or that is presented by another browser (a copied cookie)."""
        session.permanent = True
        if current_user.is_authenticated:
            now = dt.datetime.now(dt.timezone.utc).timestamp()
            last = session.get("seen", now)
            if "browser" not in session:  # opened by a version that did not record the browser
                message = "Please sign in again."
            elif session["browser"] != browser_fingerprint():
                message = "Your session was opened in another browser. Please sign in again."
            elif now - last > settings.session_idle_minutes * 60:
                message = "Your session expired after inactivity. Please sign in again."
            else:
                session["seen"] = now
                return
            logout_user()
            session.clear()
            flash(message, "info")

    @app.after_request
    def _security_headers(resp):
        resp.headers.setdefault("Content-Security-Policy",
                                "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
                                "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        resp.headers.setdefault("Permissions-Policy", "camera=(), microphone=(), geolocation=()")
        if request.endpoint and request.endpoint != "static":
            resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    def _api_json(status: int, code: str, message: str):
        from .api import error_response

        return error_response(status, code, message)

    @app.errorhandler(CSRFError)
    def _csrf(_e):
        return render_template("error.html", title="Form expired",
                               message="The form expired or was sent from elsewhere. Reload the page and try again."), 400

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(_e):
        if request.path.startswith("/api/"):
            return _api_json(413, "too_large", f"The request is too large (images up to {settings.max_upload_mb} MB).")
        return render_template("error.html", title="Upload too large",
                               message=f"Each image may be at most {settings.max_upload_mb} MB."), 413

    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    def _db_down(_e):
        g._login_user = login_manager.anonymous_user()  # the page must not ask the database who is signed in
        if request.path.startswith("/api/"):
            return _api_json(503, "database_unavailable", "The database is not answering. Nothing was saved.")
        return render_template("error.html", title="Database unavailable",
                               message="The database is not answering. Nothing was saved; please retry in a moment."), 503

    @app.errorhandler(403)
    def _forbidden(_e):
        if request.path.startswith("/api/"):
            return _api_json(403, "forbidden", "Your role does not allow this.")
        return render_template("error.html", title="Not allowed", message="You do not have access to this page."), 403

    @app.errorhandler(404)
    def _not_found(_e):
        if request.path.startswith("/api/"):
            return _api_json(404, "not_found", "There is nothing at this address.")
        return render_template("error.html", title="Not found", message="There is nothing at this address."), 404

    @app.errorhandler(405)
    def _method(_e):
        if request.path.startswith("/api/"):
            return _api_json(405, "method_not_allowed", f"{request.method} is not allowed here.")
        return render_template("error.html", title="Not allowed", message="This action is not available here."), 405

    @app.errorhandler(500)
    def _server_error(_e):
        if request.path.startswith("/api/"):
            return _api_json(500, "internal_error", "The server could not complete the request. Nothing was stored.")
        return render_template("error.html", title="Something went wrong",
                               message="The server could not complete the request. Nothing was stored."), 500

    audit.init_app(app)  # after the other hooks: its after_request runs first and sees the final answer
    if start_workers and not app.config.get("TESTING_NO_WORKERS"):
        from ..services.jobs import start_worker_pool

        start_worker_pool(app)
    return app


class BoundedInt(IntegerConverter):
    """``<int:...>`` whose values beyond 2**31-1 (the INTEGER range every supported database shares)
    become 0, an id no row has: the object lookups then answer 404 like any unknown id."""

    def to_python(self, value: str) -> int:
        v = super().to_python(value)
        return v if v <= MAX_ID else 0


MAX_ID = 2**31 - 1
