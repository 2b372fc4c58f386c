"""Audit completeness: every route is either audited or deliberately exempt, and driving every
route (web pages for every role, every API operation with and without access) leaves exactly one
audit entry with the right action, actor, record and outcome. Plus: sign-in events, no secrets in
the trail, the admin search page and CSV export, and what happens when the database is down."""

from __future__ import annotations

import csv
import io
import re

import pytest
from sqlalchemy import func, select

from oncoscope.store import audit as audit_store
from oncoscope.store.models import AuditEvent
from oncoscope.web import audit as web_audit

from .conftest import (ACCOUNTS, ADMIN, CASE_A_ID, DOC_A, IMAGE_A_ID, PATIENT_A_ID, PATIENT_B_ID, login, png_bytes,
                       sessions_of)
from .test_authz import MATRIX, PAYLOADS, ROLES, _client, _send, world  # noqa: F401 - fixture

P, C, I = PATIENT_A_ID, CASE_A_ID, IMAGE_A_ID


def _entries_after(app, seq: int) -> list[AuditEvent]:
    s = sessions_of(app)()
    try:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.seq > seq).order_by(AuditEvent.seq)))
    finally:
        s.close()


def _last_seq(app) -> int:
    s = sessions_of(app)()
    try:
        return s.scalar(select(func.coalesce(func.max(AuditEvent.seq), 0)))
    finally:
        s.close()


def _endpoint(app, method: str, path: str) -> str:
    return app.url_map.bind("localhost").match(path.split("?")[0], method=method)[0]


def test_every_route_is_audited_or_deliberately_exempt(app):
    routes = {(r.endpoint, m) for r in app.url_map.iter_rules() for m in r.methods - {"HEAD", "OPTIONS"}}
    audited = {(e, m) for e, ms in web_audit.ACTIONS.items() for m in ms}
    assert routes - audited - set(web_audit.EXEMPT) == set(), "routes with no audit action"
    assert audited - routes == set(), "audit actions for routes that no longer exist"
    assert audited & set(web_audit.EXEMPT) == set()


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("method,path", list(MATRIX))
def test_every_web_route_leaves_exactly_one_entry(world, method, path, role):  # noqa: F811
    app = world[0]
    if path == "/logout" and role != "anon":
        client = app.test_client()
        assert login(client, ACCOUNTS[role]).status_code == 302
    else:
        client = _client(world, role)
    before = _last_seq(app)
    r = _send(client, method, path, PAYLOADS.get((method, path)))
    if path == "/logout" and role != "anon":  # the shared session just ended: replace it
        fresh = app.test_client()
        assert login(fresh, ACCOUNTS[role]).status_code == 302
        world[1][role] = fresh.get_cookie("session").value
    new = _entries_after(app, before)
    if path == "/logout" and role != "anon":
        new = new[:1]  # (the fresh sign-in above is the second entry)
    action = web_audit.action_for(_endpoint(app, method, path), method)
    if action is None:
        assert new == [], f"{method} {path} is exempt but left {[(e.action) for e in new]}"
        return
    assert len(new) == 1, f"{role} {method} {path}: {[(e.action, e.outcome) for e in new]}"
    e = new[0]
    assert (e.action, e.method, e.path, e.status_code) == (action, method, path, r.status_code)
    assert e.actor == (ACCOUNTS[role].email if role != "anon" else "anonymous")
    assert e.ip == "127.0.0.1" and e.channel == "web"
    if r.status_code in (401, 403, 404) or (role == "anon" and r.headers.get("Location", "").startswith("/login")):
        assert e.outcome == "denied", (role, method, path, e.outcome)
    elif r.status_code < 300 and method == "GET":
        assert e.outcome == "success"
    assert e.outcome != "error"
    touches_patient_a = re.match(rf"^/(patients/{P}|cases/{C})(/|$)", path)
    if touches_patient_a and e.outcome == "success":
        assert e.patient_id == P, (method, path, e.patient_id)
    if role == "doc_b" and touches_patient_a:
        assert e.outcome == "denied"
        if path.startswith("/cases/"):
            assert e.patient_id is None  # a refused case does not reveal whose it is


API_CALLS = [  # (method, path, json body, endpoint) - harmless for the shared world
    ("GET", "/api/v1/analyzers", None),
    ("GET", "/api/v1/patients?q=Doe", None),
    ("POST", "/api/v1/patients", {"mrn": "MRN-AUDIT-1", "family_name": "Audit", "given_name": "Ann"}),
    ("GET", f"/api/v1/patients/{P}", None),
    ("PATCH", f"/api/v1/patients/{P}", {"notes": "checked"}),
    ("PUT", f"/api/v1/patients/{P}/doctors", {"doctor_ids": [DOC_A.id]}),
    ("GET", f"/api/v1/patients/{P}/cases", None),
    ("POST", f"/api/v1/patients/{P}/cases", {"analyzer_id": "smear-all"}),
    ("GET", "/api/v1/cases", None),
    ("GET", f"/api/v1/cases/{C}", None),
    ("POST", f"/api/v1/cases/{C}/images", "upload"),
    ("POST", f"/api/v1/cases/{C}/images/{I}/retry", None),
    ("POST", f"/api/v1/cases/{C}/sign", {"final_diagnosis": "Benign"}),
    ("GET", f"/api/v1/cases/{C}/report.pdf", None),
    ("GET", f"/api/v1/cases/{C}/fhir", None),
    ("GET", f"/api/v1/cases/{C}/hl7", None),
    ("GET", f"/api/v1/cases/{C}/dicom-sr", None),
    ("GET", f"/api/v1/cases/{C}/images/{I}/dicom-seg", None),
    ("POST", f"/api/v1/cases/{C}/hl7/send", None),
    ("GET", f"/api/v1/cases/{C}/cells", None),  # a smear-all case: refused, no cells to review
    ("PATCH", f"/api/v1/cases/{C}/cells", {"changes": [{"id": 1, "class": "blast"}]}),
    ("POST", f"/api/v1/cases/{C}/cells/undo", None),
    ("POST", f"/api/v1/cases/{C}/preliminary", {"diagnosis": "no such class"}),
    ("POST", f"/api/v1/cases/{C}/second-read", {"diagnosis": "Benign"}),  # not waiting for one: refused
    ("POST", f"/api/v1/cases/{C}/cancel", {"reason": ""}),
    ("GET", f"/api/v1/cases/{C}/consults", None),
    ("POST", f"/api/v1/cases/{C}/consults", {"question": ""}),
    ("GET", "/api/v1/consults/999", None),
    ("POST", "/api/v1/consults/999/messages", {"body": "Hello"}),
    ("POST", "/api/v1/consults/999/close", None),
    ("GET", "/api/v1/worklist?queue=verify", None),
    ("GET", f"/api/v1/patients/{P}/pacs/studies", None),  # no PACS configured: 409
    ("POST", f"/api/v1/patients/{P}/pacs/retrieve", {"study_uid": "1.2", "series_uids": ["1.2.3"],
                                                     "analyzer_id": "nope"}),
    ("GET", "/api/v1/dicom-inbox", None),
    ("POST", f"/api/v1/cases/{C}/deliveries/999/retry", None),
    ("DELETE", f"/api/v1/cases/{C}", None),  # case 1 holds an image: refused, nothing deleted
]


def _api(client, method, path, body, token):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body == "upload":
        return client.open(path, method=method, headers=headers,
                           data={"images": (io.BytesIO(png_bytes(7)), "audit.png")}, content_type="multipart/form-data")
    return client.open(path, method=method, headers=headers, json=body)


def test_api_calls_cover_every_api_route(app):
    api_actions = {e for e in web_audit.ACTIONS if e.startswith("api.")}
    assert {_endpoint(app, m, p) for m, p, _ in API_CALLS} == api_actions


@pytest.mark.parametrize("who", ["doc_a", "admin", "doc_b", "anon", "bad_token"])
def test_every_api_route_leaves_exactly_one_entry(app, tok, who):
    token = {"anon": None, "bad_token": "osk_00000000_not-a-real-token"}[who] if who in ("anon", "bad_token") \
        else tok(who)
    c = app.test_client()
    for method, path, body in API_CALLS:
        before = _last_seq(app)
        r = _api(c, method, path, body, token)
        assert r.status_code < 500, (who, method, path, r.status_code, r.data[:200])
        new = _entries_after(app, before)
        assert len(new) == 1, (who, method, path, [(e.action, e.outcome) for e in new])
        e = new[0]
        assert (e.action, e.channel, e.status_code) == \
            (web_audit.action_for(_endpoint(app, method, path), method), "api", r.status_code)
        if who in ("anon", "bad_token"):
            assert r.status_code == 401 and e.outcome == "denied" and e.actor == "anonymous"
            continue
        assert e.actor == ACCOUNTS[who].email and e.actor_id == ACCOUNTS[who].id
        if r.status_code in (403, 404):
            assert e.outcome == "denied"
        elif r.status_code < 400:
            assert e.outcome == "success"
            if f"/{P}" in path.replace("/cases/", "/patients/") and "/api/v1/patients" in path or f"/cases/{C}" in path:
                assert e.patient_id == P, (method, path)
        else:
            assert e.outcome == "rejected", (method, path, r.status_code)
        if who == "doc_b" and (f"/patients/{P}" in path or f"/cases/{C}" in path):
            assert e.outcome == "denied", (method, path, r.status_code)
    # the token itself is never written down
    s = sessions_of(app)()
    try:
        dump = "".join(audit_store.export_csv(s, audit_store.AuditFilter()))
    finally:
        s.close()
    if token:
        # the secret is everything after osk_<prefix>_ (it may itself hold "_": splitting on every "_" once
        # left a one-letter piece that any CSV contains, a failure about nothing)
        assert token not in dump and token.split("_", 2)[2] not in dump


def test_sign_in_events_and_no_passwords_in_the_trail(app):
    c = app.test_client()
    before = _last_seq(app)
    wrong = "not-the-password-42"
    assert login(c, DOC_A.email, wrong).status_code == 401
    assert login(c, "nobody@clinic.test", wrong).status_code == 401
    assert login(c, DOC_A).status_code == 302
    r = c.post("/account/password", data={"current": wrong, "password": "a-new-password-123", "confirm": "a-new-password-123"})
    assert r.status_code == 200
    assert c.post("/logout").status_code == 302
    new = _entries_after(app, before)
    assert [(e.action, e.outcome, e.actor) for e in new] == [
        ("auth.login", "failure", "anonymous"),
        ("auth.login", "failure", "anonymous"),
        ("auth.login", "success", DOC_A.email),
        ("auth.password_change", "failure", DOC_A.email),
        ("auth.logout", "success", DOC_A.email),
    ]
    assert new[0].details["email"] == DOC_A.email and new[0].details["account_id"] == DOC_A.id
    # an unknown address is kept only as a short hash: it may be a password typed into the wrong box
    assert "email" not in new[1].details and len(new[1].details["unknown_account"]) == 16
    s = sessions_of(app)()
    try:
        dump = "".join(audit_store.export_csv(s, audit_store.AuditFilter()))
    finally:
        s.close()
    for secret in (wrong, DOC_A.password, "a-new-password-123"):
        assert secret not in dump


def test_token_creation_is_audited_without_the_secret(app, client_for):
    c = client_for("doc_a")
    before = _last_seq(app)
    r = c.post("/account/tokens", data={"name": "lab robot", "expires_in_days": "30"})
    assert r.status_code == 200
    secret = re.search(rb"osk_[0-9a-f]+_[A-Za-z0-9_\-]+", r.data).group().decode()
    (e,) = _entries_after(app, before)
    assert (e.action, e.outcome, e.resource_type) == ("auth.token_create", "success", "api_token")
    assert e.details["label"] == "lab robot"
    assert secret not in str(e.details) and secret.split("_", 2)[2] not in str(e.details)  # the random part


def test_lockout_is_audited(make_app):
    app = make_app(login_max_failures=2)
    c = app.test_client()
    before = _last_seq(app)
    for _ in range(3):
        login(c, DOC_A.email, "wrong-wrong-wrong")
    assert login(c, DOC_A).status_code == 401  # locked even with the right password
    new = _entries_after(app, before)
    assert [e.outcome for e in new] == ["failure"] * 4
    assert "too many failed attempts" in new[-1].details["reason"].lower()


def test_admin_can_search_and_export_doctors_cannot(app, client_for):
    doc = client_for("doc_a")
    assert doc.get(f"/patients/{P}").status_code == 200
    assert doc.get(f"/patients/{PATIENT_B_ID}").status_code == 404
    r = doc.get("/admin/audit")
    assert r.status_code == 403
    admin = client_for("admin")
    r = admin.get(f"/admin/audit?actor={DOC_A.email}&action=patient.view")
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert "patient.view" in html and html.count("<tr>") >= 3  # header + the success + the denial
    assert "denied" in html and "success" in html
    r = admin.get(f"/admin/audit.csv?patient={P}&outcome=success")
    rows = list(csv.DictReader(io.StringIO(r.get_data(as_text=True))))
    assert rows and {(row["patient_id"], row["outcome"]) for row in rows} == {(str(P), "success")}
    r = admin.get(f"/admin/audit.csv?actor={DOC_A.email}")
    assert r.status_code == 200 and r.mimetype == "text/csv"
    assert "attachment" in r.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(r.get_data(as_text=True))))
    assert {row["actor"] for row in rows} == {DOC_A.email}
    assert {"auth.login", "patient.view", "audit.search"} <= {row["action"] for row in rows}
    assert all(len(row["hash"]) == 64 for row in rows)
    # viewing and exporting the trail are themselves in the trail, with the admin as actor
    s = sessions_of(app)()
    try:
        last = list(s.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(3)))
        assert [(e.action, e.actor) for e in last] == [("audit.export", ADMIN.email)] * 2 + \
            [("audit.search", ADMIN.email)]
        assert audit_store.verify(s).ok
    finally:
        s.close()
    assert admin.get("/admin/audit?patient=abc&from=nonsense&outcome=<script>").status_code == 200


def test_injected_text_in_the_trail_is_escaped_on_the_page(app, client_for):
    client_for("doc_a").get("/patients/", query_string={"q": "<script>alert(1)</script>"})
    r = client_for("admin").get("/admin/audit?action=patient.list")
    assert b"<script>alert(1)</script>" not in r.data and b"&lt;script&gt;" in r.data


def test_entry_spooled_when_the_database_refuses_it_then_drained(app, client_for, monkeypatch):
    c = client_for("doc_a")
    real = audit_store._append_normalised
    from sqlalchemy.exc import OperationalError

    def down(*a, **kw):
        raise OperationalError("INSERT", {}, Exception("database is down"))

    monkeypatch.setattr(audit_store, "_append_normalised", down)
    r = c.get(f"/patients/{P}")
    assert r.status_code == 200  # the access happened and is on disk in the spool
    spool = app.extensions["oncoscope"]["settings"].audit_spool
    assert "patient.view" in spool.read_text()
    monkeypatch.setattr(audit_store, "_append_normalised", real)
    before = _last_seq(app)
    assert c.get("/patients/").status_code == 200
    new = _entries_after(app, before)
    assert [e.action for e in new] == ["patient.view", "patient.list"]  # spooled first, in order
    assert spool.read_text() == ""


def test_no_data_leaves_when_the_access_cannot_be_recorded(app, client_for, monkeypatch):
    c = client_for("doc_a")
    from sqlalchemy.exc import OperationalError

    def down(*a, **kw):
        raise OperationalError("INSERT", {}, Exception("database is down"))

    monkeypatch.setattr(audit_store, "_append_normalised", down)
    app.extensions["oncoscope"]["audit"].spool = app.extensions["oncoscope"]["settings"].home / "no" / "spool"
    r = c.get(f"/patients/{P}")
    assert r.status_code == 503 and b"Doe" not in r.data and b"could not be recorded" in r.data
    r = c.get(f"/api/v1/patients/{P}")
    assert r.status_code in (401, 503) and b"Doe" not in r.data
