"""Error answers, one mechanism for the whole app: the JSON error shape under ``/api/``, the HTML
error page everywhere else. ``init_app`` registers a handler for each failure in ``FAILURES``."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, current_app, g, jsonify, render_template, request
from flask_wtf.csrf import CSRFError
from sqlalchemy.exc import InterfaceError, OperationalError
from werkzeug.exceptions import RequestEntityTooLarge

from .helpers import settings


class ApiError(Exception):
    """Raised in an API handler: answered with ``error_response`` (the api blueprint's handler)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


def error_response(status: int, code: str, message: str, field: str | None = None):
    """The API's error answer: ``{"error": {"code", "message", "field"}}``."""
    resp = jsonify({"error": {"code": code, "message": message, "field": field}})
    resp.status_code = status
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="oncoscope"'
    return resp


def error_page(status: int, title: str, message: str):
    return render_template("error.html", title=title, message=message), status


@dataclass(frozen=True)
class Failure:
    """How one failure is told: to an API client (``code``, ``message``) and on a page (``title``,
    ``page``). ``{method}`` and ``{max_mb}`` are filled in from the request and the settings."""

    status: int
    code: str | None  # None: always the page (a form failure cannot happen under /api/)
    message: str
    title: str
    page: str

    def answer(self):
        values = {"method": request.method, "max_mb": settings().max_upload_mb}
        if self.code is not None and request.path.startswith("/api/"):
            return error_response(self.status, self.code, self.message.format(**values))
        return error_page(self.status, self.title, self.page.format(**values))


DATABASE_DOWN = Failure(503, "database_unavailable", "The database is not answering. Nothing was saved.",
                        "Database unavailable",
                        "The database is not answering. Nothing was saved; please retry in a moment.")
FAILURES: dict[type[Exception] | int, Failure] = {
    CSRFError: Failure(400, None, "", "Form expired",
                       "The form expired or was sent from elsewhere. Reload the page and try again."),
    RequestEntityTooLarge: Failure(413, "too_large", "The request is too large (images up to {max_mb} MB).",
                                   "Upload too large", "Each image may be at most {max_mb} MB."),
    403: Failure(403, "forbidden", "Your role does not allow this.",
                 "Not allowed", "You do not have access to this page."),
    404: Failure(404, "not_found", "There is nothing at this address.",
                 "Not found", "There is nothing at this address."),
    405: Failure(405, "method_not_allowed", "{method} is not allowed here.",
                 "Not allowed", "This action is not available here."),
    500: Failure(500, "internal_error", "The server could not complete the request. Nothing was stored.",
                 "Something went wrong", "The server could not complete the request. Nothing was stored."),
}


def _database_down(_e):
    g._login_user = current_app.login_manager.anonymous_user()  # the page must not ask the database who is signed in
    return DATABASE_DOWN.answer()


def _handler(failure: Failure):
    def handle(_e):
        return failure.answer()

    return handle


def init_app(app: Flask) -> None:
    for failure_type, failure in FAILURES.items():
        app.register_error_handler(failure_type, _handler(failure))
    for db_error in (OperationalError, InterfaceError):
        app.register_error_handler(db_error, _database_down)
