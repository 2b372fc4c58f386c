"""One error mechanism (``oncoscope.web.errors``): each failure answers an API client with the JSON
error shape and a browser with the error page, from the same declaration."""

from __future__ import annotations

import pytest
from flask import abort
from sqlalchemy.exc import OperationalError

from oncoscope.store import tokens as token_store
from oncoscope.store.models import User
from oncoscope.web import errors

from .conftest import CASE_A_ID, DOC_A, sessions_of


def _token(app) -> str:
    with sessions_of(app)() as s:
        _t, secret = token_store.create(s, s.get(User, DOC_A.id), "errors")
        s.commit()
    return secret


def _down():
    raise OperationalError("SELECT 1", {}, Exception("database is down"))


CASES = [  # (what the view does, status, API code, page title)
    (lambda: abort(403), 403, "forbidden", "Not allowed"),
    (lambda: abort(404), 404, "not_found", "Not found"),
    (lambda: abort(500), 500, "internal_error", "Something went wrong"),
    (_down, 503, "database_unavailable", "Database unavailable"),
]


@pytest.mark.parametrize("fail, status, code, title", CASES, ids=["403", "404", "500", "database"])
def test_one_failure_answers_api_and_page(make_app, fail, status, code, title):
    app = make_app()
    app.add_url_rule("/api/v1/test-failure", "api_test_failure", fail)
    app.add_url_rule("/test-failure", "page_test_failure", fail)
    c = app.test_client()
    r = c.get("/api/v1/test-failure")
    failure = errors.DATABASE_DOWN if code == "database_unavailable" else errors.FAILURES[status]
    assert r.status_code == status and r.get_json() == {"error": {"code": code, "message": failure.message,
                                                                  "field": None}}
    r = c.get("/test-failure")
    assert r.status_code == status and r.mimetype == "text/html"
    assert f"<h1>{title}</h1><p>{failure.page}</p>".encode() in r.data


def test_messages_name_the_method_and_the_upload_limit(make_app):
    app = make_app(max_upload_mb=3)
    app.config["MAX_CONTENT_LENGTH"] = 1000  # the limit the message names is the setting, per image
    c = app.test_client()
    r = c.delete("/api/v1/openapi.json")
    assert r.status_code == 405 and r.get_json()["error"] == {
        "code": "method_not_allowed", "message": "DELETE is not allowed here.", "field": None}
    too_big = b"x" * 1001
    r = c.post(f"/api/v1/cases/{CASE_A_ID}/images", data=too_big, content_type="application/octet-stream",
               headers={"Authorization": f"Bearer {_token(app)}"})
    assert r.status_code == 413 and r.get_json()["error"]["message"] == \
        "The request is too large (images up to 3 MB)."
    r = c.post("/login", data=too_big, content_type="application/octet-stream")
    assert r.status_code == 413 and b"Each image may be at most 3 MB." in r.data


def test_an_unauthenticated_api_call_is_told_how_to_authenticate(app):
    r = app.test_client().get("/api/v1/patients")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == 'Bearer realm="oncoscope"'
    assert r.get_json()["error"]["code"] == "unauthenticated"
