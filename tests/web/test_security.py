"""Security properties claimed in SECURITY.md (OWASP ASVS 4.0.3, level 2) that no other test checked.

Each test names the ASVS requirement(s) it proves. Every test checks the real property and fails
when the property is broken (several include a control step that shows the attack would work if
the defence were absent, e.g. a forged session cookie signed with the real key is accepted).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from flask import Flask
from flask.sessions import SecureCookieSessionInterface
from sqlalchemy import delete, func, select

from oncoscope.store import users as user_store
from oncoscope.store.models import ApiToken, Base, CaseImage, LoginThrottle, Patient, User

from .conftest import (ACCOUNTS, ADMIN, CASE_A_ID, DOC_A, DOC_B, IMAGE_A_ID, PATIENT_A, PATIENT_A_ID, SPARE,
                       files_of, login, png_bytes, sessions_of)

MULTIPART = "multipart/form-data"
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- helpers
def _csrf_token(client, url: str) -> str:
    m = re.search(rb'name="csrf_token"[^>]*value="([^"]+)"', client.get(url).data)
    assert m, f"no csrf_token on {url}"
    return m.group(1).decode()


def _serializer(app_or_key):
    """Flask's own cookie-session serializer for an app (or for a bare secret key)."""
    if isinstance(app_or_key, str):
        dummy = Flask("forger")
        dummy.secret_key = app_or_key
        app_or_key = dummy
    return SecureCookieSessionInterface().get_signing_serializer(app_or_key)


def _snapshot(app) -> dict:
    """Every row of every table, to prove that a refused request changed nothing."""
    with sessions_of(app)() as s:
        return {t.name: [tuple(r) for r in s.execute(select(t).order_by(*t.primary_key.columns))]
                for t in Base.metadata.sorted_tables if "audit" not in t.name}  # (denials are audited)


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _upload_json(c, case_id, files):
    """files: [(name, bytes, content_type)] -> JSON answer of the web upload endpoint."""
    data = {"images": [(io.BytesIO(b), name, ctype) for name, b, ctype in files]}
    return c.post(f"/cases/{case_id}/images", data=data, content_type=MULTIPART,
                  headers={"Accept": "application/json"})


def _sign_case_1(c, token: str) -> None:
    r = c.post(f"/api/v1/cases/{CASE_A_ID}/sign", headers=_bearer(token),
               json={"final_diagnosis": "Nondiagnostic", "uncertainty_note": "generated test image",
                     "override_reason": "no AI call"})
    assert r.status_code == 200, r.data[:300]


# ============================================================================= V2 Authentication
def test_passwords_are_stored_as_salted_argon2id_never_plain(app, client_for):
    """ASVS 2.4.1 / 2.4.2: argon2id with a unique random salt per credential; no plain text."""
    admin = client_for("admin")
    pw = "Same password for both 42"
    for i in (1, 2):
        r = admin.post("/admin/users", data={"name": f"New {i}", "email": f"new{i}@clinic.test", "role": "doctor",
                                             "password": pw})
        assert r.status_code == 302, r.data[:300]
    with sessions_of(app)() as s:
        hashes = [s.scalar(select(User.password_hash).where(User.email == f"new{i}@clinic.test")) for i in (1, 2)]
        every = list(s.scalars(select(User.password_hash)))
    for h in hashes:
        assert h.startswith("$argon2id$"), h
        assert pw not in h and pw.encode().hex() not in h
        assert PasswordHasher().verify(h, pw)
    # same password, different salts -> different hashes; salts are >= 32 bits (argon2-cffi: 128 bits)
    assert hashes[0] != hashes[1]
    salts = [h.split("$")[4] for h in hashes]
    assert salts[0] != salts[1] and all(len(s) * 6 // 8 >= 4 for s in salts)
    # no account in the database holds anything but an argon2id hash
    assert all(h.startswith("$argon2id$") for h in every)
    for a in ACCOUNTS.values():
        assert a.password not in "".join(every)


def test_production_argon2_parameters_are_strong():
    """ASVS 2.4.1: the production hasher (the tests swap in a cheap one) uses argon2id with at least
    the OWASP-recommended cost (m >= 19 MiB, t >= 2)."""
    code = ("from oncoscope.store import users as u; h = u._hasher; "
            "print(h.type.name, h.time_cost, h.memory_cost, h.parallelism, u._DUMMY_HASH.split('$')[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.split()
    kind, t, m, _p, dummy = out[0], int(out[1]), int(out[2]), int(out[3]), out[4]
    assert kind == "ID" and dummy == "argon2id"
    assert m >= 19 * 1024 and t >= 2


def test_old_hash_parameters_are_upgraded_at_sign_in(app):
    """ASVS 6.2.4: hashing parameters can be raised later; stored hashes follow at the next sign-in."""
    weaker = PasswordHasher(time_cost=2, memory_cost=512, parallelism=1)
    with sessions_of(app)() as s:
        s.get(User, DOC_A.id).password_hash = weaker.hash(DOC_A.password)
        s.commit()
    assert user_store._hasher.check_needs_rehash(weaker.hash("x"))  # the control: it is "old"
    assert login(app.test_client(), DOC_A).status_code == 302
    with sessions_of(app)() as s:
        h = s.get(User, DOC_A.id).password_hash
    assert not user_store._hasher.check_needs_rehash(h) and user_store._hasher.verify(h, DOC_A.password)


def test_long_unicode_passwords_with_spaces_are_kept_whole(app, client_for):
    """ASVS 2.1.2 / 2.1.3 / 2.1.4: 64+ characters, spaces and any Unicode are accepted; nothing is
    truncated (a prefix of the password does not sign in)."""
    c = client_for("doc_a")
    pw = "correct  horse 🐴 bätterie 馬 " * 8  # 232 characters, double spaces, emoji, kanji
    assert len(pw) > 200
    r = c.post("/account/password", data={"current": DOC_A.password, "password": pw, "confirm": pw})
    assert r.status_code == 302, r.data[:500]
    fresh = app.test_client()
    for prefix in (pw[:72], pw[:128], pw[:-1], pw.replace("  ", " ")):
        assert login(fresh, DOC_A.email, prefix).status_code == 401
    assert login(fresh, DOC_A.email, pw).status_code == 302


def test_no_forced_rotation_and_no_password_history(app, client_for):
    """ASVS 2.1.10: passwords do not expire and an earlier password may be chosen again."""
    from oncoscope.store.models import utcnow

    c = client_for("doc_a")
    new = "an-interim-password-77"
    r = c.post("/account/password", data={"current": DOC_A.password, "password": new, "confirm": new})
    assert r.status_code == 302
    login(c, DOC_A.email, new)
    r = c.post("/account/password", data={"current": new, "password": DOC_A.password, "confirm": DOC_A.password})
    assert r.status_code == 302  # back to the earlier password: allowed
    with sessions_of(app)() as s:  # an account untouched for years still signs in normally
        u = s.get(User, DOC_A.id)
        u.created_at = utcnow().replace(year=2001)
        s.commit()
    r = login(app.test_client(), DOC_A)
    assert r.status_code == 302 and r.headers["Location"] == "/"


def test_corrupt_password_hash_fails_closed(app):
    """ASVS 6.2.1: a damaged or foreign hash in the database is a failed sign-in, not an error or a
    bypass, and the answer is the generic one."""
    for bad in ("", "garbage", "$argon2id$v=19$m=1,t=1,p=1$AAAA$AAAA", "$2b$12$" + "a" * 53, DOC_A.password):
        with sessions_of(app)() as s:
            s.get(User, DOC_A.id).password_hash = bad
            s.commit()
        r = login(app.test_client(), DOC_A)
        assert r.status_code == 401 and b"Email or password is incorrect." in r.data, bad
        with sessions_of(app)() as s:  # reset the failure counter so the lock does not decide
            s.execute(delete(LoginThrottle))
            s.commit()


def _assert_paste_allowed(html: bytes) -> None:
    fields = re.findall(rb"<input[^>]*type=\"password\"[^>]*>", html)
    assert fields, html[:300]
    for f in fields:
        assert b"onpaste" not in f and b'autocomplete="off"' not in f, f
    assert b"onpaste" not in html and b"oncopy" not in html


def test_password_fields_allow_paste_and_password_managers(client_for):
    """ASVS 2.1.11: no paste blocking, no autocomplete=off on password fields (the first-run setup
    page is checked in test_no_default_account_exists_before_setup)."""
    _assert_paste_allowed(client_for(None).get("/login").data)
    _assert_paste_allowed(client_for("doc_a").get("/account/password").data)
    _assert_paste_allowed(client_for("admin").get(f"/admin/users/{SPARE.id}").data)
    js = (REPO / "oncoscope" / "web" / "static" / "app.js").read_text()
    assert "paste" not in js


def test_no_default_account_exists_before_setup(make_empty_app):
    """ASVS 2.5.4: a fresh instance has no account at all (no admin/admin); the first administrator
    chooses their own password in the first-run setup."""
    app = make_empty_app()
    with sessions_of(app)() as s:
        assert s.scalar(select(func.count(User.id))) == 0
    c = app.test_client()
    _assert_paste_allowed(c.get("/setup").data)
    for email, pw in (("admin", "admin"), ("admin@localhost", "admin"), ("root@localhost", "root")):
        r = login(c, email, pw)
        assert r.status_code == 302 and r.headers["Location"] == "/setup"
    assert c.get("/patients/").status_code == 302


# ============================================================================= V3 Session management
def test_session_cookie_flags_secure_httponly_samesite(make_app, monkeypatch):
    """ASVS 3.4.1 / 3.4.2 / 3.4.3: with ONCOSCOPE_SECURE_COOKIES=1 (TLS deployments) the session
    cookie is Secure, HttpOnly and SameSite=Lax; no long-lived remember-me cookie is ever set."""
    monkeypatch.setenv("ONCOSCOPE_SECURE_COOKIES", "1")
    app = make_app()
    c = app.test_client()
    r = login(c, DOC_A)
    assert r.status_code == 302
    cookies = r.headers.getlist("Set-Cookie")
    session_cookie = [x for x in cookies if x.startswith("session=")]
    assert session_cookie, cookies
    attrs = [a.strip().lower() for a in session_cookie[0].split(";")]
    assert "secure" in attrs and "httponly" in attrs and "samesite=lax" in attrs and "path=/" in attrs
    assert not any(x.startswith("remember_token=") for x in cookies)
    # the switch really is what sets it: without it (plain-HTTP development) there is no Secure flag
    monkeypatch.delenv("ONCOSCOPE_SECURE_COOKIES")
    plain = make_app().test_client()
    attrs = [a.strip().lower() for a in login(plain, DOC_A).headers["Set-Cookie"].split(";")]
    assert "secure" not in attrs and "httponly" in attrs


def test_sign_in_issues_a_new_session(app):
    """ASVS 3.2.1: signing in starts a new session: nothing planted before sign-in survives it
    (session fixation), and the cookie value changes."""
    c = app.test_client()
    with c.session_transaction() as sess:
        sess["planted"] = "attacker"
    before = c.get_cookie("session").value
    assert login(c, DOC_A).status_code == 302
    after = c.get_cookie("session").value
    assert after != before
    with c.session_transaction() as sess:
        assert "planted" not in sess
        assert sess["_user_id"].split(":")[0] == str(DOC_A.id)


def test_forged_or_tampered_session_cookie_is_refused(app):
    """ASVS 3.5.3 / 4.1.2: the stateless session is signed; changing the user id in it (privilege
    escalation to the admin) works only with the instance's secret key."""
    c = app.test_client()
    assert login(c, DOC_B).status_code == 302
    real = _serializer(app)
    data = real.loads(c.get_cookie("session").value)
    assert data["_user_id"].startswith(f"{DOC_B.id}:")
    with sessions_of(app)() as s:
        data["_user_id"] = f"{ADMIN.id}:{s.get(User, ADMIN.id).session_version}"

    def as_cookie(value):
        t = app.test_client()
        t.set_cookie("session", value)
        return t

    # the signature is an HMAC (Flask: HMAC-SHA1 with a >= 256-bit instance key)
    si = app.session_interface
    assert si.key_derivation == "hmac" and si.digest_method().name in ("sha1", "sha256", "sha512")
    assert len(app.secret_key) >= 32
    # control: signed with the real key, the edited session *would* be the admin's
    assert as_cookie(real.dumps(data)).get("/admin/users").status_code == 200
    # signed with any other key, or edited without re-signing: anonymous
    forged = _serializer("a-different-secret-key-of-sufficient-length-0123456789").dumps(data)
    assert as_cookie(forged).get("/admin/users").status_code == 302
    sig = c.get_cookie("session").value.rpartition(".")[2]
    assert as_cookie(real.dumps(data).rpartition(".")[0] + "." + sig).get("/admin/users").status_code == 302
    assert as_cookie("").get("/admin/users").status_code == 302


def test_session_and_api_tokens_never_travel_in_urls(app, tok):
    """ASVS 3.1.1 / 13.1.3: the session lives in a cookie, API tokens only in the Authorization
    header; a token put in the query string or the body is not accepted."""
    c = app.test_client()
    r = login(c, DOC_A, next_url="/patients/")
    cookie = c.get_cookie("session").value
    assert cookie not in r.headers["Location"] and "session" not in r.headers["Location"]
    page = c.get("/patients/").data.decode()
    assert cookie not in page
    t = tok("doc_a")
    anon = app.test_client()
    assert anon.get("/api/v1/patients", headers=_bearer(t)).status_code == 200  # control
    for q in ("access_token", "token", "api_key", "bearer"):
        r = anon.get(f"/api/v1/patients?{q}={t}")
        assert r.status_code == 401 and r.get_json()["error"]["code"] == "unauthenticated", q
    r = anon.post("/api/v1/patients", data={"access_token": t, "mrn": "X", "family_name": "Y"})
    assert r.status_code == 401
    doc = app.test_client().get("/api/v1/openapi.json").get_json()
    scheme = doc["components"]["securitySchemes"]["bearer"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    params = [p for ops in doc["paths"].values() for op in ops.values() for p in op.get("parameters", [])]
    assert not [p for p in params if p["in"] in ("query", "cookie") and re.search("token|key|auth", p["name"], re.I)]


def test_api_tokens_are_random_hashed_shown_once_and_revocable_only_by_their_owner(app, client_for):
    """ASVS 3.5.1 / 6.3.1 / 2.10.3: a personal token is shown once, stored as SHA-256 only, has 256
    random bits, and only its owner can revoke it (another doctor gets the same 404 as for a
    missing token)."""
    a = client_for("doc_a")
    r = a.post("/account/tokens", data={"name": "PACS bridge"})
    secrets_shown = re.findall(r"osk_[0-9a-f]{8}_[A-Za-z0-9_\-]{43}", r.data.decode())
    assert len(secrets_shown) == 1
    secret = secrets_shown[0]
    assert secret not in a.get("/account/tokens").data.decode()  # never shown again
    r2 = a.post("/account/tokens", data={"name": "second"})
    assert re.findall(r"osk_[0-9a-f]{8}_[A-Za-z0-9_\-]{43}", r2.data.decode())[0] != secret
    with sessions_of(app)() as s:
        row = s.scalar(select(ApiToken).where(ApiToken.name == "PACS bridge"))
        stored = [str(v) for v in s.execute(select(ApiToken.__table__)).all()]
    assert row.token_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert not any(secret in v or secret[13:] in v for v in stored)
    api = app.test_client()
    assert api.get("/api/v1/patients", headers=_bearer(secret)).status_code == 200
    b = client_for("doc_b")
    assert b.post(f"/account/tokens/{row.id}/revoke").status_code == 404
    assert api.get("/api/v1/patients", headers=_bearer(secret)).status_code == 200  # still valid
    assert a.post(f"/account/tokens/{row.id}/revoke").status_code == 302
    assert api.get("/api/v1/patients", headers=_bearer(secret)).status_code == 401


def test_deactivated_users_tokens_stop_working(app, client_for, tok):
    """ASVS 3.3.1 / 4.1.1: deactivating an account ends its API access immediately too."""
    t = tok("doc_a")
    api = app.test_client()
    assert api.get("/api/v1/patients", headers=_bearer(t)).status_code == 200
    assert client_for("admin").post(f"/admin/users/{DOC_A.id}/active").status_code == 302
    assert api.get("/api/v1/patients", headers=_bearer(t)).status_code == 401


# ============================================================================= V4 Access control
def _post_payloads() -> dict[str, dict]:
    """Form data that each POST endpoint would accept if CSRF were not checked (so the test shows
    that only the missing token stops it)."""
    return {
        "auth.setup": {"name": "X", "email": "x@clinic.test", "password": "long-enough-pw-1", "confirm": "long-enough-pw-1"},
        "auth.login": {"email": DOC_A.email, "password": DOC_A.password},
        "auth.change_password": {"current": ADMIN.password, "password": "csrf-changed-pw-9",
                                 "confirm": "csrf-changed-pw-9"},
        "auth.tokens": {"name": "csrf token"},
        "patients.new": {"mrn": "CSRF-1", "family_name": "Forged", "sex": "unknown"},
        "patients.edit": dict(PATIENT_A, family_name="Forged"),
        "patients.assign": {"doctors": [DOC_A.id, DOC_B.id]},
        "cases.new": {"analyzer_id": "smear-all", "clinical_note": "forged"},
        "cases.sign": {"final_diagnosis": "Nondiagnostic", "uncertainty_note": "x", "override_reason": "x",
                       "confirm": "y"},
        "admin.users": {"name": "Evil", "email": "evil@clinic.test", "role": "admin", "password": "evil-password-1"},
        "admin.edit_user": {"role-role": "admin"},
    }


def _fill(rule: str) -> str:
    ids = {"user_id": SPARE.id, "patient_id": PATIENT_A_ID, "case_id": CASE_A_ID, "image_id": IMAGE_A_ID,
           "token_id": 1}
    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", lambda m: str(ids.get(m.group(1), 1)), rule)


def test_csrf_is_enforced_on_every_state_changing_form(make_app):
    """ASVS 4.2.2 / 13.2.3: every non-API POST route (found from the URL map, so new ones are
    included automatically) refuses a request without a valid CSRF token, and nothing changes."""
    app = make_app({"WTF_CSRF_ENABLED": True})
    c = app.test_client()
    token = _csrf_token(c, "/login")
    assert c.post("/login", data={"email": ADMIN.email, "password": ADMIN.password, "csrf_token": token}).status_code == 302
    before = _snapshot(app)
    payloads = _post_payloads()
    rules = [r for r in app.url_map.iter_rules() if "POST" in r.methods and not r.rule.startswith("/api/")]
    assert len(rules) >= 15
    for rule in rules:
        path = _fill(rule.rule)
        data = payloads.get(rule.endpoint, {})
        for extra in ({}, {"csrf_token": "forged"}, {"csrf_token": token + "x"}):
            r = c.post(path, data={**data, **extra})
            assert r.status_code == 400 and b"Form expired" in r.data, (rule.rule, extra, r.status_code)
        r = c.post(path, data={"images": (io.BytesIO(png_bytes(9)), "x.png"), **data}, content_type=MULTIPART,
                   headers={"Accept": "application/json"})
        assert r.status_code == 400, rule.rule
    assert _snapshot(app) == before
    assert c.get("/admin/users").status_code == 200  # still signed in: logout was refused too
    # control: with the token the same kind of request goes through
    r = c.post("/patients/new", data={**payloads["patients.new"], "csrf_token": _csrf_token(c, "/patients/new")})
    assert r.status_code == 302


def test_directory_listing_and_instance_files_are_not_served(app, client_for):
    """ASVS 4.3.2 / 12.5.1 / 12.4.1: no directory listings, and nothing of the instance folder
    (database, secret key, uploaded originals) or the source tree is reachable over HTTP."""
    c = client_for("admin")
    home = app.extensions["oncoscope"]["settings"].home
    with sessions_of(app)() as s:
        sha = s.get(CaseImage, IMAGE_A_ID).sha256
    probes = ["/static/", "/static", "/images/", "/instance/", "/.git/config", "/.env", "/secret_key",
              "/oncoscope.db", "/static/../config.py", "/static/..%2fconfig.py", "/static/%2e%2e/__init__.py",
              f"/images/{sha[:2]}/{sha[2:4]}/{sha}/original", f"/static/{sha}", "/static/app.js.bak",
              "/static/.app.js.swp", "/cases/1/images/1/../../../secret_key", "/analyzers/smear-all/plots/..%2fmodel.onnx"]
    secret = (home / "secret_key").read_text().encode()
    for p in probes:
        r = c.get(p)
        assert r.status_code in (404, 308) or (r.status_code == 302 and "/login" not in r.headers["Location"]), (
            p, r.status_code)
        assert secret not in r.data and b"SQLite format" not in r.data and b"Index of" not in r.data, p
    assert c.get("/static/app.js").status_code == 200  # control: the real assets are served


def test_unexpected_errors_fail_closed_with_a_generic_answer(make_app, monkeypatch):
    """ASVS 4.1.5 / 7.4.1 / 7.4.3: an exception inside a protected view gives the last-resort 500
    page (HTML) or error object (API): no stack trace, no exception text, no data."""
    from oncoscope.store import patients as patient_store

    app = make_app({"PROPAGATE_EXCEPTIONS": False})
    secret = "SECRET-DETAIL password=hunter2 /srv/oncoscope/instance"

    def boom(*_a, **_k):
        raise RuntimeError(secret)

    monkeypatch.setattr(patient_store, "search", boom)
    c = app.test_client()
    login(c, DOC_A)
    r = c.get("/patients/")
    assert r.status_code == 500 and b"Something went wrong" in r.data
    for leak in (b"SECRET-DETAIL", b"hunter2", b"Traceback", b"RuntimeError", b"File \"", b"/srv/"):
        assert leak not in r.data
    from oncoscope.store import tokens as token_store

    with sessions_of(app)() as s:
        _t, t = token_store.create(s, s.get(User, DOC_A.id), "err")
        s.commit()
    r = app.test_client().get("/api/v1/patients", headers=_bearer(t))
    assert r.status_code == 500 and r.get_json()["error"]["code"] == "internal_error"
    assert b"SECRET" not in r.data and b"Traceback" not in r.data
    assert "Content-Security-Policy" in r.headers and r.headers["X-Content-Type-Options"] == "nosniff"


# ============================================================================= V5 Validation, sanitization, encoding
@pytest.mark.parametrize("needle", ["' OR '1'='1", "%", "_", "Doe' --", "1; DROP TABLE patients; --",
                                    "\" OR \"\"=\"", "MRN-A-0001' OR 1=1 --", "%Doe%",
                                    "x') OR ('1'='1", "x')) OR 1=1 --"])
def test_sql_metacharacters_in_searches_are_plain_data(app, client_for, tok, needle):
    """ASVS 5.3.4: search text reaches the database as bound parameters: quotes and LIKE wildcards
    do not widen a doctor's results to another doctor's patient, and no table is harmed."""
    c = client_for("doc_b")
    for url in ("/patients/", "/cases/"):
        r = c.get(url, query_string={"q": needle})
        assert r.status_code == 200
        assert f'href="/patients/{PATIENT_A_ID}"'.encode() not in r.data and b"Doe, Jane" not in r.data
        assert f'href="/cases/{CASE_A_ID}"'.encode() not in r.data
    r = app.test_client().get("/api/v1/patients", query_string={"q": needle}, headers=_bearer(tok("doc_b")))
    assert r.status_code == 200 and PATIENT_A_ID not in [p["id"] for p in r.get_json()["items"]]
    r = app.test_client().get("/api/v1/cases", query_string={"q": needle}, headers=_bearer(tok("doc_b")))
    assert r.status_code == 200 and CASE_A_ID not in [x["id"] for x in r.get_json()["items"]]
    with sessions_of(app)() as s:
        assert s.scalar(select(func.count(Patient.id))) == 2


def test_template_syntax_in_user_data_is_not_evaluated(app, client_for):
    """ASVS 5.2.5: user text containing Jinja syntax is shown literally, never rendered."""
    c = client_for("doc_a")
    r = c.post("/patients/new", data={"mrn": "SSTI-1", "family_name": "{{ 7*191 }}",
                                      "given_name": "{% print(1111*3) %}", "notes": "{{ config.SECRET_KEY }}",
                                      "sex": "unknown"})
    assert r.status_code == 302
    body = c.get(r.headers["Location"]).data
    assert b"{{ 7*191 }}" in body and b"1337" not in body and b"3333" not in body
    assert app.config["SECRET_KEY"].encode() not in body


def test_parameters_are_read_from_their_own_source_only(app):
    """ASVS 5.1.1: credentials are read from the form body only (query-string copies are ignored),
    and a duplicated parameter cannot override the first value."""
    c = app.test_client()
    r = c.post("/login", query_string={"email": DOC_A.email, "password": DOC_A.password}, data={})
    assert r.status_code == 200 and c.get("/patients/").status_code == 302
    r = c.post("/login", query_string={"password": DOC_A.password},
               data={"email": DOC_A.email, "password": "wrong-password-1"})
    assert r.status_code == 401
    r = c.post("/login", data={"email": [DOC_B.email, DOC_A.email], "password": [DOC_A.password]})
    assert r.status_code == 401  # the first email counts, not a later duplicate


def test_mass_assignment_of_unlisted_fields_is_ignored_or_refused(app, client_for, tok):
    """ASVS 5.1.2: only declared fields are bound: ids, owners, roles and access lists sent with a
    create / update are ignored (forms) or refused (API)."""
    c = client_for("doc_a")
    r = c.post("/patients/new", data={"mrn": "MASS-1", "family_name": "Mass", "sex": "unknown", "id": "777",
                                      "created_by_id": str(ADMIN.id), "doctors": [DOC_B.id]})
    assert r.status_code == 302
    with sessions_of(app)() as s:
        p = s.scalar(select(Patient).where(Patient.mrn == "MASS-1"))
        assert p.id != 777 and p.created_by_id == DOC_A.id and [d.id for d in p.doctors] == [DOC_A.id]
    r = c.post("/account/password", data={"current": DOC_A.password, "password": "x", "role": "admin",
                                          "is_admin": "1"})
    with sessions_of(app)() as s:
        assert s.get(User, DOC_A.id).role == "doctor"
    t = _bearer(tok("doc_a"))
    api = app.test_client()
    for extra in ({"id": 9}, {"created_by_id": 1}, {"doctor_ids": [3]}):
        r = api.patch(f"/api/v1/patients/{PATIENT_A_ID}", json={"notes": "n", **extra}, headers=t)
        assert r.status_code == 422 and r.get_json()["error"]["code"] == "unknown_field", extra


SINK = re.compile(r"\b(eval|exec)\(|\bpickle\b|\bmarshal\.loads|\bsubprocess\b|\bos\.system\(|\bos\.popen\(|"
                  r"shell\s*=\s*True|yaml\.load\(|render_template_string|allow_pickle\s*=\s*True|\bjsonpickle\b")


def test_request_handling_code_has_no_dangerous_sinks():
    """ASVS 5.2.4 / 5.3.8 / 5.5.3 / 12.3.5: the code that handles requests, uploads and stored data
    never evaluates code, starts shell commands or unpickles data (the offline ML tools in
    oncoscope/ml may use subprocess to measure memory; they take no user input)."""
    pkg = REPO / "oncoscope"
    files = [p for d in ("web", "store", "reports", "analyzers") for p in (pkg / d).rglob("*.py")]
    files += [pkg / n for n in ("jobs.py", "config.py", "cli.py") if (pkg / n).exists()]
    files += [pkg / "imaging" / "imageio.py"]
    assert len(files) > 15
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if SINK.search(line) and not line.lstrip().startswith("#")]
    assert hits == []
    # the web templates do not switch autoescaping off or mark data as safe, and load nothing
    # from other origins (ASVS 12.3.6: no CDN scripts or styles)
    for t in (pkg / "web" / "templates").rglob("*.html"):
        text = t.read_text()
        assert "|safe" not in text.replace(" ", "") and "autoescape false" not in text, t
        assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=\"(https?:)?//", text), t
    # the browser code parses JSON with JSON.parse / fetch().json() and writes text, never HTML
    js = (pkg / "web" / "static" / "app.js").read_text()
    assert "JSON.parse" in js or ".json()" in js
    for sink in ("eval(", "new Function", "innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
        assert sink not in js, sink


# ============================================================================= V12 Files and resources
HTML = b"<!DOCTYPE html><html><body><script>alert(document.cookie)</script></body></html>"
SVG = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64" '
       b'onload="alert(1)"><rect width="64" height="64"/></svg>')


def test_uploads_are_validated_by_content_not_name_or_declared_type(app, client_for):
    """ASVS 12.2.1 / 5.2.7: HTML or SVG dressed up as PNG (name and Content-Type) is refused; a real
    image with a misleading name and type is accepted and recorded with the type found in it."""
    c = client_for("doc_a")
    r = _upload_json(c, CASE_A_ID, [("scan.png", HTML, "image/png"), ("scan2.png", SVG, "image/svg+xml"),
                                    ("scan3.jpg", b"MZ\x90\x00" + b"\0" * 400, "image/jpeg")])
    assert r.status_code == 422 and r.json["added"] == []
    assert [e["file"] for e in r.json["errors"]] == ["scan.png", "scan2.png", "scan3.jpg"]
    good = png_bytes(11)
    r = _upload_json(c, CASE_A_ID, [("report.exe", good, "application/x-msdownload")])
    assert r.status_code == 200 and len(r.json["added"]) == 1
    with sessions_of(app)() as s:
        img = s.get(CaseImage, r.json["added"][0])
        assert img.content_type == "PNG" and img.original_filename == "report.exe"
    store = files_of(app)
    for bad in (HTML, SVG):
        assert not store.exists(hashlib.sha256(bad).hexdigest())


@pytest.mark.parametrize("name", ["../../../../evil.png", "..\\..\\..\\evil.png", "/etc/cron.d/evil.png",
                                  "C:\\Windows\\evil.png", "....//....//evil.png"])
def test_uploaded_file_names_never_reach_the_filesystem(app, client_for, world_home, name):
    """ASVS 12.3.1 / 12.3.2 / 12.4.1: files are stored by content hash with private permissions;
    the uploaded name is kept only as a display label (last path segment)."""
    c = client_for("doc_a")
    before = {p for p in world_home.parent.rglob("*")}
    data = png_bytes(13)
    r = _upload_json(c, CASE_A_ID, [(name, data, "image/png")])
    assert r.status_code == 200 and len(r.json["added"]) == 1, r.json
    sha = hashlib.sha256(data).hexdigest()
    with sessions_of(app)() as s:
        label = s.get(CaseImage, r.json["added"][0]).original_filename
    assert "/" not in label and "\\" not in label and label.endswith("evil.png")  # a label, not a path
    images = files_of(app).root
    new = {p for p in world_home.parent.rglob("*")} - before
    new_files = {p for p in new if p.is_file()}
    assert new_files and all(p.is_relative_to(images / sha[:2] / sha[2:4] / sha) for p in new_files), new_files
    assert not any("evil" in p.name for p in new)
    for p in new_files:  # readable by the service account only
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, (p, oct(p.stat().st_mode))


def test_served_images_are_reencoded_with_fixed_type_and_private_caching(app, client_for):
    """ASVS 12.5.2 / 12.3.4: an uploaded file is never served as it came (a PNG carrying an HTML
    payload after IEND is re-encoded); every image answer is image/png + nosniff and may not be
    kept by shared caches (Cache-Control: private)."""
    c = client_for("doc_a")
    poly = png_bytes(14) + HTML
    r = _upload_json(c, CASE_A_ID, [("poly.png", poly, "text/html")])
    assert r.status_code == 200 and r.json["added"], r.json
    iid = r.json["added"][0]
    for kind in ("original", "thumb"):
        r = c.get(f"/cases/{CASE_A_ID}/images/{iid}/{kind}.png")
        assert r.status_code == 200 and r.mimetype == "image/png"
        assert r.data.startswith(b"\x89PNG\r\n\x1a\n") and b"<script" not in r.data and r.data != poly
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        cc = r.headers["Cache-Control"]
        assert "private" in cc and "public" not in cc, (kind, cc)


def test_downloads_are_attachments_with_server_chosen_names(app, client_for, tok):
    """ASVS 12.3.4: reports and exports are attachments whose file names the server builds from
    ids only (no user text), each with a fixed media type."""
    t = tok("doc_a")
    api = app.test_client()
    _sign_case_1(api, t)
    c = client_for("doc_a")
    expected = {f"/cases/{CASE_A_ID}/report.pdf": "application/pdf",
                f"/cases/{CASE_A_ID}/export/fhir": "application/fhir+json",
                f"/cases/{CASE_A_ID}/export/hl7": "application/hl7-v2",
                f"/cases/{CASE_A_ID}/export/dicom-sr": "application/dicom",
                f"/api/v1/cases/{CASE_A_ID}/hl7": "application/hl7-v2"}
    for url, media in expected.items():
        r = (api.get(url, headers=_bearer(t)) if url.startswith("/api/") else c.get(url))
        assert r.status_code == 200 and r.mimetype == media, (url, r.status_code, r.mimetype)
        cd = r.headers["Content-Disposition"]
        assert re.fullmatch(r'attachment; filename="oncoscope-case-\d+[a-z0-9\-]*\.(pdf|json|hl7|dcm)"', cd), cd
        assert r.headers["X-Content-Type-Options"] == "nosniff"


def _evil_backup(path: Path, rel: str, payload: bytes) -> None:
    manifest = {"format": 1, "created": "2024-01-01T00:00:00+00:00", "alembic_revision": None,
                "database_dialect": "sqlite", "tables": {}, "images": {rel: hashlib.sha256(payload).hexdigest()}}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in ((f"images/{rel}", payload), ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("kind", ["absolute", "dotdot"])
def test_restore_never_writes_outside_the_image_folder(tmp_path, kind):
    """ASVS 12.3.1 / 12.3.2 (archive path traversal): a crafted backup whose manifest names an
    absolute or ../ path is refused before anything is written."""
    from oncoscope.store.backup import BackupError, restore_backup

    target = tmp_path / "outside" / "planted.txt"
    rel = str(target) if kind == "absolute" else "../outside/planted.txt"
    archive = tmp_path / "evil.tar.gz"
    _evil_backup(archive, rel, b"owned")
    home = tmp_path / "home"
    (home / "images").mkdir(parents=True)
    with pytest.raises(BackupError):
        restore_backup(f"sqlite:///{home / 'o.db'}", home / "images", archive)
    assert not target.exists() and not (home / "outside").exists()
    assert not (home / "o.db").exists()  # refused before the database was touched


def test_outbound_connections_go_only_to_the_configured_destination(app, tok):
    """ASVS 5.2.6 / 12.6.1 (SSRF): the only outbound connection (HL7 MLLP) goes to the host set by
    the operator; request parameters cannot choose a destination."""
    t = tok("doc_a")
    c = app.test_client()
    _sign_case_1(c, t)
    r = c.post(f"/api/v1/cases/{CASE_A_ID}/hl7/send?host=127.0.0.1&port=22&url=http://169.254.169.254/",
               json={"host": "127.0.0.1", "port": 22}, headers=_bearer(t))
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "hl7_not_configured"


# ============================================================================= V13 API
def test_api_ignores_browser_session_cookies(app, client_for):
    """ASVS 13.2.3: the API authenticates by bearer token only, so a signed-in browser cannot be
    driven cross-site against it (its CSRF exemption is safe)."""
    c = client_for("doc_a")
    assert c.get("/patients/").status_code == 200  # the browser session is valid
    r = c.get("/api/v1/patients")
    assert r.status_code == 401 and r.get_json()["error"]["code"] == "unauthenticated"
    r = c.post("/api/v1/patients", json={"mrn": "CSRF-API", "family_name": "Forged"})
    assert r.status_code == 401
    with sessions_of(app)() as s:
        assert s.scalar(select(func.count(Patient.id)).where(Patient.mrn == "CSRF-API")) == 0


def test_api_requires_json_content_type(app, tok):
    """ASVS 13.2.5 / 13.1.5: JSON bodies are only read with Content-Type application/json; the same
    bytes sent as text/plain or a form are refused (400 invalid_json) and nothing is created."""
    c = app.test_client()
    t = _bearer(tok("doc_a"))
    body = json.dumps({"mrn": "CT-1", "family_name": "Type"})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "text/html", None):
        r = c.post("/api/v1/patients", data=body, headers=t, content_type=ctype)
        assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_json", ctype
    with sessions_of(app)() as s:
        assert s.scalar(select(func.count(Patient.id)).where(Patient.mrn == "CT-1")) == 0
    assert c.post("/api/v1/patients", data=body, headers=t, content_type="application/json").status_code == 201


# ============================================================================= headers on every kind of answer
def test_security_headers_on_every_kind_of_response(app, client_for, tok):
    """ASVS 14.4 (supports 5.3.3, 12.5.2): CSP, nosniff, frame and referrer policies on HTML pages,
    redirects, error pages, JSON, API errors, images, PDFs and static files; no-store on every
    dynamic answer except images (which are private)."""
    doc, anon = client_for("doc_a"), client_for(None)
    t = _bearer(tok("doc_a"))
    csrf_app = app.test_client()
    app_csrf = app  # same app with CSRF switched on for one request
    responses = {
        "html": doc.get("/patients/"), "redirect": anon.get("/patients/"), "login": anon.get("/login"),
        "404": doc.get("/nowhere"), "403": doc.get("/admin/users"),
        "404-object": client_for("doc_b").get(f"/patients/{PATIENT_A_ID}"),
        "json": doc.get(f"/cases/{CASE_A_ID}/status.json"), "healthz": anon.get("/healthz"),
        "api": anon.get("/api/v1/patients", headers=t), "api-401": anon.get("/api/v1/patients"),
        "api-404": anon.get("/api/v1/patients/999999", headers=t), "openapi": anon.get("/api/v1/openapi.json"),
        "png": doc.get(f"/cases/{CASE_A_ID}/images/{IMAGE_A_ID}/original.png"),
        "thumb": doc.get(f"/cases/{CASE_A_ID}/images/{IMAGE_A_ID}/thumb.png"),
        "pdf": doc.get(f"/cases/{CASE_A_ID}/report.pdf"), "static": anon.get("/static/app.js"),
    }
    app_csrf.config["WTF_CSRF_ENABLED"] = True
    try:
        responses["csrf-400"] = csrf_app.post("/login", data={"email": "a@b.c", "password": "x"})
    finally:
        app_csrf.config["WTF_CSRF_ENABLED"] = False
    for kind, r in responses.items():
        h = r.headers
        csp = h.get("Content-Security-Policy", "")
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "object-src 'none'" in csp, kind
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, kind
        assert h.get("X-Content-Type-Options") == "nosniff", kind
        assert h.get("X-Frame-Options") == "DENY", kind
        assert h.get("Referrer-Policy") == "no-referrer", kind
        assert h.get("Content-Type"), kind
        cc = h.get("Cache-Control", "")
        if kind in ("png", "thumb"):
            assert "private" in cc and "public" not in cc, (kind, cc)
        elif kind not in ("static", "404"):  # (an unmatched URL carries no data)
            assert "no-store" in cc, (kind, cc)
    assert responses["csrf-400"].status_code == 400


# ----------------------------------------------------------------------------- issue 11 (outside review)
def test_a_session_cookie_presented_by_another_browser_is_ended(app, client_for):
    c = client_for("doc_a")  # signed in with the test client's own user agent
    assert c.get("/patients/").status_code == 200
    r = c.get("/patients/", headers={"User-Agent": "Mozilla/5.0 (a copied cookie)"})
    assert r.status_code == 302 and r.headers["Location"].startswith("/login")
    page = c.get("/login").data.decode()
    assert "Your session was opened in another browser" in page
    assert c.get("/patients/").status_code == 302  # ended for the original browser too


def test_a_changed_address_alone_keeps_the_session(client_for):
    c = client_for("doc_a")
    assert c.get("/patients/", environ_base={"REMOTE_ADDR": "10.9.9.9"}).status_code == 200


def _audited_ip(app) -> str:
    from oncoscope.store.models import AuditEvent

    with sessions_of(app)() as s:
        return s.scalar(select(AuditEvent.ip).order_by(AuditEvent.seq.desc()).limit(1))


def test_the_audited_address_is_the_clients_behind_a_trusted_proxy_only(make_app):
    forwarded = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    direct = make_app()  # no proxy configured: the header is anybody's to forge, so it is ignored
    login(direct.test_client(), DOC_A.email, "wrong-password-1")
    direct.test_client().post("/login", data={"email": DOC_A.email, "password": "x"}, headers=forwarded,
                              environ_base={"REMOTE_ADDR": "10.0.0.2"})
    assert _audited_ip(direct) == "10.0.0.2"
    proxied = make_app(trusted_proxies=1)
    proxied.test_client().post("/login", data={"email": DOC_A.email, "password": "x"},
                               headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.7", "X-Forwarded-Proto": "https"},
                               environ_base={"REMOTE_ADDR": "10.0.0.2"})
    assert _audited_ip(proxied) == "203.0.113.7"  # the entry the one trusted proxy added, not a forged first one


@pytest.mark.parametrize("query", ["endpoint=x", "_external=1", "_scheme=javascript", "_anchor=x&page=2",
                                   "_method=POST", "values=1", "page=2&page=3&actor=%00"])
def test_audit_and_history_pages_take_any_query_argument(make_app, query):
    app = make_app(page_size=1)  # every list has several pages: the pager links are drawn
    admin = app.test_client()
    login(admin, ADMIN)
    for url in ("/admin/audit", "/cases/", "/patients/"):
        r = admin.get(f"{url}?{query}")
        assert r.status_code == 200, (url, query, r.status_code)
