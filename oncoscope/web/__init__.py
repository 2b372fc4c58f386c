"""Flask application factory: ``create_app`` only assembles; each piece wires itself (``init_app``)."""

from __future__ import annotations

import datetime as dt

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import IntegerConverter

from ..config import Settings
from ..services.deliveries import start_delivery_pump
from ..services.jobs import start_worker_pool
from ..store.db import make_engine, make_session_factory
from ..store.files import FileStore
from . import admin, api, audit, auth, cases, cells, errors, integration, patients, security, sessions, views, workflow
from .helpers import db_session_teardown
from .security import csrf

BLUEPRINTS = (views.bp, auth.bp, patients.bp, cases.bp, cells.bp, workflow.bp, integration.bp, admin.bp, api.bp)


def create_app(config: dict | None = None, settings: Settings | None = None, start_workers: bool = True) -> Flask:
    app = Flask(__name__)
    settings = (settings or Settings.from_env()).prepare()
    configure(app, settings, config)
    open_stores(app, settings)
    csrf.init_app(app)  # first: a forged form is refused before the session checks run
    sessions.init_app(app)
    for bp in BLUEPRINTS:
        app.register_blueprint(bp)
    security.init_app(app)
    errors.init_app(app)
    audit.init_app(app)  # after the other hooks: its after_request runs first and sees the final answer
    if start_workers and not app.config.get("TESTING_NO_WORKERS"):
        start_worker_pool(app)
        start_delivery_pump(app)
    return app


def configure(app: Flask, settings: Settings, config: dict | None) -> None:
    """Flask's configuration from the settings (``config`` overrides, e.g. for tests)."""
    app.url_map.converters["int"] = BoundedInt  # ids beyond the database's integer range are simply not found
    app.config.update(
        SECRET_KEY=settings.secret_key,
        MAX_CONTENT_LENGTH=settings.max_upload_mb * 1024 * 1024 * 20,  # whole multi-file request; per file below
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        REMEMBER_COOKIE_HTTPONLY=True,
        WTF_CSRF_TIME_LIMIT=None,
        # Over HTTPS flask-wtf also demands a same-site Referer, which browsers never send: every page
        # answers Referrer-Policy: no-referrer (URLs name patients' cases). The token still decides.
        WTF_CSRF_SSL_STRICT=False,
        PERMANENT_SESSION_LIFETIME=dt.timedelta(minutes=settings.session_idle_minutes),
    )
    if config:
        app.config.update(config)
    if settings.trusted_proxies:  # the audited address is the client's, not the proxy's
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies)


def open_stores(app: Flask, settings: Settings) -> None:
    """The database and the image store, shared by every request (``helpers.db()``, ``files()``)."""
    engine = make_engine(settings.database_url)
    app.extensions["oncoscope"] = {
        "settings": settings,
        "engine": engine,
        "sessions": make_session_factory(engine),
        "files": FileStore(settings.images_dir),
    }
    app.teardown_appcontext(db_session_teardown)


class BoundedInt(IntegerConverter):
    """``<int:...>`` whose values beyond 2**31-1 (the INTEGER range every supported database shares)
    become 0, an id no row has: the object lookups then answer 404 like any unknown id."""

    def to_python(self, value: str) -> int:
        v = super().to_python(value)
        return v if v <= MAX_ID else 0


MAX_ID = 2**31 - 1
