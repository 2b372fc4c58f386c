"""Authorization matrix: every route x every role -> the expected status code.

Roles: ``anon`` (not signed in), ``doc_a`` (doctor A: patient 1 / case 1 / image 1 are assigned to
her), ``doc_b`` (doctor B: no access to patient 1), ``admin``, ``tech`` (a technologist assigned to
patient 1) and ``rev`` (a reviewer with no patient, consulted by doctor A on case 1: consult 1 is open,
consult 2 closed). The last two columns are in ``STAFF``, beside the first four in ``MATRIX``.

Policy that the table encodes:

* anonymous: protected pages redirect (302) to /login; /healthz, /login and /setup are public.
* a doctor asking for another doctor's patient / case / image gets 404, exactly as for an id that
  does not exist (object-level access does not reveal that the object exists).
* admin-only pages give 403 to doctors (the role check comes before any lookup).
* admins reach everything but the readers' work: they neither prepare nor sign (403).
* a role that may never do an action gets 403 before any lookup (technologists do not sign;
  reviewers change nothing); a reviewer consulted on a case reads it (only it: not its patient).

POST actions are sent with a payload that is either authorised-and-harmless (so the shared world
stays the same for every row) or empty; ``400`` for sign-off means "reached the view, form
rejected", which is what an authorised empty submission gets.
"""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import (ACCOUNTS, CASE_A_ID, IMAGE_A_ID, IMAGE_B_ID, PATIENT_A, PATIENT_A_ID, REVIEWER, SPARE, TECH,
                       AppFactory, copy_seed, login, make_users)

P, C, I = PATIENT_A_ID, CASE_A_ID, IMAGE_A_ID
ROLES = ("anon", "doc_a", "doc_b", "admin", "tech", "rev")
KINDS = ("original", "thumb", "cells", "heatmap", "heatmap-layer")

# (method, path, form data) -> expected status for (anon, doc_a, doc_b, admin)
MATRIX: dict[tuple[str, str], tuple[int, int, int, int]] = {
    # public / session
    ("GET", "/"): (302, 200, 200, 200),
    ("GET", "/healthz"): (200, 200, 200, 200),
    ("GET", "/setup"): (302, 302, 302, 302),  # users exist: setup is closed
    ("POST", "/setup"): (302, 302, 302, 302),
    ("GET", "/login"): (200, 302, 302, 302),  # signed in: straight to home
    ("POST", "/login"): (200, 302, 302, 302),
    ("POST", "/logout"): (302, 302, 302, 302),
    ("GET", "/account/password"): (302, 200, 200, 200),
    ("POST", "/account/password"): (302, 200, 200, 200),  # empty form: re-rendered with errors
    ("GET", "/account/tokens"): (302, 200, 200, 200),
    ("POST", "/account/tokens"): (302, 200, 200, 200),  # empty form: re-rendered with errors
    ("POST", "/account/tokens/1/revoke"): (302, 404, 404, 404),  # nobody owns token 1 in this world
    # patients
    ("GET", "/patients/"): (302, 200, 200, 200),
    ("GET", "/patients/new"): (302, 200, 200, 200),
    ("POST", "/patients/new"): (302, 200, 200, 200),  # empty form: re-rendered with errors
    ("POST", "/patients/from-dicom"): (302, 302, 302, 302),  # no file: message and back to the form
    ("GET", f"/patients/{P}"): (302, 200, 404, 200),
    ("GET", f"/patients/{P}/edit"): (302, 200, 404, 200),
    ("POST", f"/patients/{P}/edit"): (302, 302, 404, 302),  # same values saved again
    ("POST", f"/patients/{P}/doctors"): (302, 403, 403, 302),  # admin only; keeps doctor A and the technologist
    ("GET", f"/patients/{P}/cases/new"): (302, 200, 404, 200),
    ("POST", f"/patients/{P}/cases/new"): (302, 200, 404, 200),  # empty form: re-rendered
    # cases
    ("GET", "/cases/"): (302, 200, 200, 200),
    ("GET", f"/cases/{C}"): (302, 200, 404, 200),
    ("GET", f"/cases/{C}/status.json"): (302, 200, 404, 200),
    ("POST", f"/cases/{C}/images"): (302, 302, 404, 302),  # no files: nothing added
    **{("GET", f"/cases/{C}/images/{I}/{k}.png"): (302, 200, 404, 200) for k in KINDS},
    ("POST", f"/cases/{C}/images/{I}/retry"): (302, 302, 404, 302),  # job is not failed: no-op
    ("POST", f"/cases/{C}/sign"): (302, 400, 404, 403),  # empty form: rejected by the view; admins do not sign
    ("GET", f"/cases/{C}/report.pdf"): (302, 200, 404, 200),
    ("GET", f"/cases/{C}/export/fhir"): (302, 302, 404, 302),  # case 1 is unsigned: back to the case page
    ("GET", f"/cases/{C}/export/hl7"): (302, 302, 404, 302),
    ("GET", f"/cases/{C}/images/{I}/seg.dcm"): (302, 302, 404, 302),  # no stored mask: back to the case page
    ("POST", f"/cases/{C}/hl7/send"): (302, 302, 404, 302),  # unsigned: flash and back
    ("POST", f"/cases/{C}/delete"): (302, 302, 404, 302),  # holds an image: refused, flash and back
    # cell gallery: case 1 is a smear-all case (no cell classes), so there is none for anybody
    ("GET", f"/cases/{C}/cells"): (302, 404, 404, 404),
    ("GET", f"/cases/{C}/images/{I}/gallery.jpg"): (302, 404, 404, 404),
    ("POST", f"/cases/{C}/cells"): (302, 404, 404, 403),  # (admins do not prepare: refused before the lookup)
    ("POST", f"/cases/{C}/cells/undo"): (302, 404, 404, 403),
    ("POST", f"/cases/{C}/wbc-count"): (302, 404, 404, 403),
    # report workflow (empty forms: re-rendered with errors, 400)
    ("POST", f"/cases/{C}/preliminary"): (302, 400, 404, 403),
    ("POST", f"/cases/{C}/second-read"): (302, 400, 404, 403),
    ("POST", f"/cases/{C}/cancel"): (302, 400, 404, 400),
    ("POST", f"/cases/{C}/consults"): (302, 400, 404, 403),
    ("GET", "/consults/1"): (302, 200, 404, 200),
    ("POST", "/consults/1/messages"): (302, 400, 404, 403),  # only the asker and the consultant write
    ("POST", "/consults/2/close"): (302, 302, 404, 302),  # already closed: message and back
    ("GET", "/worklist/verify"): (302, 200, 200, 200),
    ("GET", "/worklist/consults"): (302, 200, 200, 200),
    ("GET", "/admin/workflow"): (302, 403, 403, 200),
    ("POST", "/admin/workflow"): (302, 403, 403, 302),  # nothing chosen: the settings stay as they are
    # hospital integration (no PACS configured here: the page says so)
    ("GET", "/inbox"): (302, 200, 200, 200),
    ("POST", "/inbox/1.2.3/file"): (302, 302, 302, 302),  # no analyzer chosen: back with the reason
    ("POST", "/inbox/1.2.3/dismiss"): (302, 404, 404, 404),  # nothing of that study waits
    ("GET", f"/patients/{P}/pacs"): (302, 200, 404, 200),
    ("POST", f"/patients/{P}/pacs/retrieve"): (302, 302, 404, 302),  # nothing chosen: back
    ("POST", f"/cases/{C}/deliveries/1/retry"): (302, 404, 404, 404),  # no such delivery
    # administration
    ("GET", "/admin/users"): (302, 403, 403, 200),
    ("POST", "/admin/users"): (302, 403, 403, 200),  # empty form: re-rendered
    ("GET", f"/admin/users/{SPARE.id}"): (302, 403, 403, 200),
    ("POST", f"/admin/users/{SPARE.id}"): (302, 403, 403, 302),  # role stays "doctor"
    ("POST", f"/admin/users/{SPARE.id}/active"): (302, 403, 403, 302),  # toggles the spare account
    ("GET", "/admin/audit"): (302, 403, 403, 200),
    ("GET", "/admin/audit.csv"): (302, 403, 403, 200),
    ("GET", "/admin/dashboards"): (302, 403, 403, 200),
    ("GET", "/admin/dashboards.csv"): (302, 403, 403, 200),
    # analyzer pages
    ("GET", "/analyzers/smear-all"): (302, 200, 200, 200),
    ("GET", "/analyzers/smear-all/plots/roc.png"): (302, 200, 200, 200),
    ("GET", "/analyzers/smear-all/classes/Pro"): (302, 200, 200, 200),
}

# (tech, rev) for every row of MATRIX
STAFF: dict[tuple[str, str], tuple[int, int]] = {
    ("GET", "/"): (200, 200),
    ("GET", "/healthz"): (200, 200),
    ("GET", "/setup"): (302, 302),
    ("POST", "/setup"): (302, 302),
    ("GET", "/login"): (302, 302),
    ("POST", "/login"): (302, 302),
    ("POST", "/logout"): (302, 302),
    ("GET", "/account/password"): (200, 200),
    ("POST", "/account/password"): (200, 200),
    ("GET", "/account/tokens"): (200, 200),
    ("POST", "/account/tokens"): (200, 200),
    ("POST", "/account/tokens/1/revoke"): (404, 404),
    ("GET", "/patients/"): (200, 200),
    ("GET", "/patients/new"): (200, 403),
    ("POST", "/patients/new"): (200, 403),
    ("POST", "/patients/from-dicom"): (302, 403),
    ("GET", f"/patients/{P}"): (200, 404),  # a consult opens the case, not the patient
    ("GET", f"/patients/{P}/edit"): (200, 403),
    ("POST", f"/patients/{P}/edit"): (302, 403),
    ("POST", f"/patients/{P}/doctors"): (403, 403),
    ("GET", f"/patients/{P}/cases/new"): (200, 403),
    ("POST", f"/patients/{P}/cases/new"): (200, 403),
    ("GET", "/cases/"): (200, 200),
    ("GET", f"/cases/{C}"): (200, 200),
    ("GET", f"/cases/{C}/status.json"): (200, 200),
    ("POST", f"/cases/{C}/images"): (302, 403),
    **{("GET", f"/cases/{C}/images/{I}/{k}.png"): (200, 200) for k in KINDS},
    ("POST", f"/cases/{C}/images/{I}/retry"): (302, 403),
    ("POST", f"/cases/{C}/sign"): (403, 403),
    ("GET", f"/cases/{C}/report.pdf"): (200, 200),
    ("GET", f"/cases/{C}/export/fhir"): (302, 302),
    ("GET", f"/cases/{C}/export/hl7"): (302, 302),
    ("GET", f"/cases/{C}/images/{I}/seg.dcm"): (302, 302),
    ("POST", f"/cases/{C}/hl7/send"): (302, 403),
    ("POST", f"/cases/{C}/delete"): (302, 403),
    ("GET", f"/cases/{C}/cells"): (404, 404),
    ("GET", f"/cases/{C}/images/{I}/gallery.jpg"): (404, 404),
    ("POST", f"/cases/{C}/cells"): (404, 403),
    ("POST", f"/cases/{C}/cells/undo"): (404, 403),
    ("POST", f"/cases/{C}/wbc-count"): (404, 403),
    ("POST", f"/cases/{C}/preliminary"): (400, 403),
    ("POST", f"/cases/{C}/second-read"): (403, 403),
    ("POST", f"/cases/{C}/cancel"): (400, 403),
    ("POST", f"/cases/{C}/consults"): (400, 403),
    ("GET", "/consults/1"): (200, 200),
    ("POST", "/consults/1/messages"): (403, 400),
    ("POST", "/consults/2/close"): (403, 302),
    ("GET", "/worklist/verify"): (200, 200),
    ("GET", "/worklist/consults"): (200, 200),
    ("GET", "/inbox"): (200, 403),
    ("POST", "/inbox/1.2.3/file"): (302, 403),
    ("POST", "/inbox/1.2.3/dismiss"): (404, 403),
    ("GET", f"/patients/{P}/pacs"): (200, 403),
    ("POST", f"/patients/{P}/pacs/retrieve"): (302, 403),
    ("POST", f"/cases/{C}/deliveries/1/retry"): (404, 403),
    ("GET", "/admin/users"): (403, 403),
    ("POST", "/admin/users"): (403, 403),
    ("GET", f"/admin/users/{SPARE.id}"): (403, 403),
    ("POST", f"/admin/users/{SPARE.id}"): (403, 403),
    ("POST", f"/admin/users/{SPARE.id}/active"): (403, 403),
    ("GET", "/admin/audit"): (403, 403),
    ("GET", "/admin/audit.csv"): (403, 403),
    ("GET", "/admin/dashboards"): (403, 403),
    ("GET", "/admin/dashboards.csv"): (403, 403),
    ("GET", "/admin/workflow"): (403, 403),
    ("POST", "/admin/workflow"): (403, 403),
    ("GET", "/analyzers/smear-all"): (200, 200),
    ("GET", "/analyzers/smear-all/plots/roc.png"): (200, 200),
    ("GET", "/analyzers/smear-all/classes/Pro"): (200, 200),
}

PAYLOADS = {
    ("POST", f"/patients/{P}/edit"): PATIENT_A,
    ("POST", f"/patients/{P}/doctors"): {"doctors": [ACCOUNTS["doc_a"].id, ACCOUNTS["tech"].id]},
    ("POST", f"/admin/users/{SPARE.id}"): {"role-role": "doctor"},
}

# Ids that do not exist: 404 for every signed-in role (admin-only routes: 403 for doctors first).
MISSING = 999_999
NONEXISTENT: dict[tuple[str, str], tuple[int, int, int]] = {  # (doc_a, doc_b, admin)
    ("GET", f"/patients/{MISSING}"): (404, 404, 404),
    ("GET", f"/patients/{MISSING}/edit"): (404, 404, 404),
    ("POST", f"/patients/{MISSING}/edit"): (404, 404, 404),
    ("POST", f"/patients/{MISSING}/doctors"): (403, 403, 404),
    ("GET", f"/patients/{MISSING}/cases/new"): (404, 404, 404),
    ("POST", f"/patients/{MISSING}/cases/new"): (404, 404, 404),
    ("GET", f"/cases/{MISSING}"): (404, 404, 404),
    ("GET", f"/cases/{MISSING}/status.json"): (404, 404, 404),
    ("POST", f"/cases/{MISSING}/images"): (404, 404, 404),
    **{("GET", f"/cases/{MISSING}/images/{I}/{k}.png"): (404, 404, 404) for k in KINDS},
    **{("GET", f"/cases/{C}/images/{MISSING}/{k}.png"): (404, 404, 404) for k in KINDS},
    # an existing image of another case (doctor B's) through a case the user may see
    **{("GET", f"/cases/{C}/images/{IMAGE_B_ID}/{k}.png"): (404, 404, 404) for k in KINDS},
    ("GET", f"/cases/{C}/images/{I}/nonsense.png"): (404, 404, 404),
    ("POST", f"/cases/{MISSING}/images/{I}/retry"): (404, 404, 404),
    ("POST", f"/cases/{C}/images/{MISSING}/retry"): (404, 404, 404),
    ("POST", f"/cases/{MISSING}/sign"): (404, 404, 403),
    ("POST", f"/cases/{MISSING}/preliminary"): (404, 404, 403),
    ("POST", f"/cases/{MISSING}/cancel"): (404, 404, 404),
    ("POST", f"/cases/{MISSING}/consults"): (404, 404, 403),
    ("GET", f"/consults/{MISSING}"): (404, 404, 404),
    ("POST", f"/consults/{MISSING}/messages"): (404, 404, 404),
    ("POST", f"/consults/{MISSING}/close"): (404, 404, 404),
    ("GET", "/worklist/nope"): (404, 404, 404),
    ("GET", f"/patients/{MISSING}/pacs"): (404, 404, 404),
    ("POST", f"/patients/{MISSING}/pacs/retrieve"): (404, 404, 404),
    ("POST", f"/cases/{MISSING}/deliveries/1/retry"): (404, 404, 404),
    ("POST", f"/cases/{MISSING}/delete"): (404, 404, 404),
    ("GET", f"/cases/{MISSING}/report.pdf"): (404, 404, 404),
    ("GET", f"/admin/users/{MISSING}"): (403, 403, 404),
    ("POST", f"/admin/users/{MISSING}"): (403, 403, 404),
    ("POST", f"/admin/users/{MISSING}/active"): (403, 403, 404),
    ("GET", "/analyzers/nope"): (404, 404, 404),
    ("GET", "/analyzers/smear-all/plots/nope.png"): (404, 404, 404),
    ("GET", "/analyzers/smear-all/plots/model_card.json"): (404, 404, 404),
    ("GET", "/analyzers/smear-all/classes/nope"): (404, 404, 404),
    ("GET", "/analyzers/smear-all/classes/blast"): (404, 404, 404),  # a cell class of another analyzer
    ("GET", "/analyzers/nope/classes/Pro"): (404, 404, 404),
}


@pytest.fixture(scope="module")
def world(seed_homes, tmp_path_factory):
    """One app for the whole matrix (its requests leave the world as it was), and a signed-in
    session cookie per role, so each row only pays for its own request."""
    home = copy_seed(seed_homes, "world", tmp_path_factory.mktemp("authz") / "home")
    factory = AppFactory(home)
    app = factory()
    # The generated image is out of domain, so the analyzer wrote no overlays. Put placeholder
    # overlays where the analyzer would, so that the access rule (not a missing file) decides.
    store = app.extensions["oncoscope"]["files"]
    with app.extensions["oncoscope"]["sessions"]() as s:
        from oncoscope.store.models import CaseImage

        for img in s.query(CaseImage):
            placeholder = np.zeros((8, 8, 3), np.uint8)
            for name in ("cells", "heatmap", "heatmap-layer"):
                store.put_png(img.sha256, f"{name}-smear-all", placeholder)
    with app.extensions["oncoscope"]["sessions"]() as s:
        from oncoscope.store import consults as consult_store
        from oncoscope.store import patients as patient_store
        from oncoscope.store.models import Case, Patient, User

        staff = make_users(s, (TECH, REVIEWER))
        patient_store.set_doctors(s, s.get(Patient, P), [ACCOUNTS["doc_a"].id, staff["tech"].id])
        case, doc_a = s.get(Case, C), s.get(User, ACCOUNTS["doc_a"].id)
        consult_store.ask(s, case, doc_a, staff["rev"].id, "Is this a blast?")
        closed = consult_store.ask(s, case, doc_a, staff["rev"].id, "An older question")
        consult_store.close(s, closed, doc_a)
        s.commit()
    cookies = {}
    for role in ROLES[1:]:
        c = app.test_client()
        assert login(c, ACCOUNTS[role]).status_code == 302
        cookies[role] = c.get_cookie("session").value
    yield app, cookies
    factory.close()


def _client(world, role):
    app, cookies = world
    c = app.test_client()
    if role != "anon":
        c.set_cookie("session", cookies[role])
    return c


def _send(c, method, path, data=None):
    if method == "GET":
        return c.get(path)
    return c.post(path, data=data or {})


def test_matrix_covers_every_route(world):
    """A new route must be added to the matrix: compare against the app's url map."""
    app, _ = world
    # /api/ routes authenticate by token; their matrix is in test_api.py.
    rules = {(m, r.rule) for r in app.url_map.iter_rules() if r.endpoint != "static"
             and not r.rule.startswith("/api/") for m in r.methods & {"GET", "POST"}}
    import re

    covered = set()
    for (m, path) in MATRIX:
        for (rm, rule) in rules:
            pattern = "^" + re.sub(r"<(?:[^:>]+:)?[^>]+>", r"[^/]+", rule) + "$"
            if rm == m and re.match(pattern, path):
                covered.add((rm, rule))
    assert rules - covered == set()
    assert set(STAFF) == set(MATRIX)  # every row has its technologist and reviewer columns


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("method,path", list(MATRIX))
def test_authorization_matrix(world, method, path, role):
    expected = (MATRIX[(method, path)] + STAFF[(method, path)])[ROLES.index(role)]
    if path == "/logout" and role != "anon":
        # Signing out ends every session of the user (cookies are bearer tokens), so use a
        # session of its own rather than the shared one the other rows replay.
        client = world[0].test_client()
        assert login(client, ACCOUNTS[role]).status_code == 302
    else:
        client = _client(world, role)
    r = _send(client, method, path, PAYLOADS.get((method, path)))
    if path == "/logout" and role != "anon":  # refresh the shared session the logout just ended
        fresh = world[0].test_client()
        assert login(fresh, ACCOUNTS[role]).status_code == 302
        world[1][role] = fresh.get_cookie("session").value
    assert r.status_code == expected, f"{role} {method} {path}: {r.status_code} {r.headers.get('Location')}"
    assert b"Traceback" not in r.data
    if role == "anon" and expected == 302 and path not in ("/setup", "/"):
        assert r.headers["Location"].startswith("/login"), r.headers["Location"]
    if r.status_code in (403, 404) and not path.endswith((".png", ".json")):
        assert b"Not allowed" in r.data or b"Not found" in r.data  # the friendly error page


@pytest.mark.parametrize("role", ROLES[1:4])
@pytest.mark.parametrize("method,path", list(NONEXISTENT))
def test_nonexistent_ids_are_404(world, method, path, role):
    expected = NONEXISTENT[(method, path)][ROLES.index(role) - 1]
    r = _send(_client(world, role), method, path)
    assert r.status_code == expected, f"{role} {method} {path}: {r.status_code}"
    assert b"Traceback" not in r.data


def test_other_doctors_object_looks_exactly_like_a_missing_one(world):
    """Doctor B asking for patient 1 gets the same page as for a patient that does not exist."""
    c = _client(world, "doc_b")
    theirs, missing = c.get(f"/patients/{P}"), c.get(f"/patients/{MISSING}")
    assert theirs.status_code == missing.status_code == 404 and theirs.data == missing.data
    assert PATIENT_A["family_name"].encode() not in theirs.data


def test_doctor_b_lists_do_not_show_doctor_a_patient(world):
    c = _client(world, "doc_b")
    for url in ("/patients/", "/cases/", "/", f"/patients/?q={PATIENT_A['mrn']}"):
        r = c.get(url)
        assert r.status_code == 200
        assert b"Doe, Jane" not in r.data and f'href="/patients/{P}"'.encode() not in r.data, url
        if "?q=" not in url:  # (the search page echoes the query itself)
            assert PATIENT_A["mrn"].encode() not in r.data, url


def test_anonymous_redirect_keeps_next(world):
    r = _client(world, "anon").get(f"/cases/{C}")
    assert r.status_code == 302 and r.headers["Location"].startswith("/login?next=")
