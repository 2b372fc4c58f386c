"""End-to-end flows of the clinical web app: setup, accounts and sessions, patients, cases and
uploads, the analysis job queue, sign-off and amendments, the PDF report, and hardening
(CSRF, security headers, escaping, redirects, database outage)."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import re
import time

import pytest
from sqlalchemy import func, select, update

from oncoscope.store import users as user_store
from oncoscope.store.models import Analysis, Case, CaseImage, LoginThrottle, Patient, Review, User, utcnow

from .conftest import (ADMIN, CASE_A_ID, DOC_A, DOC_B, PATIENT_A, PATIENT_A_ID, PATIENT_B, PATIENT_B_ID, SPARE,
                       field_errors, files_of, flashes, login, one, png_bytes, pool_for, q, sessions_of)

P = PATIENT_A_ID
MULTIPART = "multipart/form-data"


# ----------------------------------------------------------------------------- helpers

def update_row(app, model, pk, **values):
    with sessions_of(app)() as s:
        row = s.get(model, pk)
        for k, v in values.items():
            setattr(row, k, v)
        s.commit()


def new_patient(c, **values):
    data = {"mrn": "MRN-NEW", "family_name": "Newman", "given_name": "", "sex": "unknown", "birth_date": "",
            "notes": ""}
    data.update(values)
    return c.post("/patients/new", data=data)


def new_case(c, patient_id, files, submission_id=None, note=""):
    data = {"analyzer_id": "smear-all", "clinical_note": note,
            "images": [(io.BytesIO(b), name) for name, b in files]}
    if submission_id:
        data["submission_id"] = submission_id
    return c.post(f"/patients/{patient_id}/cases/new", data=data, content_type=MULTIPART)


def case_id_of(r) -> int:
    assert r.status_code == 302, r.data[:2000]
    m = re.fullmatch(r"/cases/(\d+)", r.headers["Location"])
    assert m, r.headers["Location"]
    return int(m.group(1))


def upload(c, case_id, files, json=False):
    headers = {"Accept": "application/json"} if json else {}
    return c.post(f"/cases/{case_id}/images", data={"images": [(io.BytesIO(b), n) for n, b in files]},
                  content_type=MULTIPART, headers=headers)


def sign(c, case_id, **fields):
    data = {"confirm": "y"}
    data.update(fields)
    return c.post(f"/cases/{case_id}/sign", data=data)


def patient_ids(html: bytes) -> list[int]:
    return [int(x) for x in re.findall(rb'<td><a href="/patients/(\d+)">', html)]


def stored_files(app) -> set[str]:
    root = files_of(app).root
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def analysed_case(app, c, seed: int) -> int:
    cid = case_id_of(new_case(c, P, [(f"field-{seed}.png", png_bytes(seed))]))
    assert pool_for(app).run_one()
    return cid


# ----------------------------------------------------------------------------- first-run setup
def test_setup_only_on_an_empty_database(make_empty_app):
    app = make_empty_app()
    c = app.test_client()
    assert c.get("/").headers["Location"] == "/setup"
    assert c.get("/login").headers["Location"] == "/setup"
    assert c.get("/setup").status_code == 200
    r = c.post("/setup", data={"name": "First Admin", "email": "First@Clinic.test", "password": "first-pass-123!",
                               "confirm": "first-pass-123!"})
    assert r.status_code == 302 and r.headers["Location"] == "/admin/users"
    assert c.get("/admin/users").status_code == 200  # signed in as the new administrator

    other = app.test_client()
    r = other.get("/setup")
    assert r.status_code == 302 and r.headers["Location"] == "/login"
    r = other.post("/setup", data={"name": "Intruder", "email": "intruder@evil.test", "password": "intruder-pass-1!",
                                   "confirm": "intruder-pass-1!"})
    assert r.status_code == 302 and r.headers["Location"] == "/login"
    assert q(app, select(User.email, User.role)) == [("first@clinic.test", "admin")]
    assert login(other, "intruder@evil.test", "intruder-pass-1!").status_code == 401
    assert other.get("/admin/users").status_code == 302


def test_setup_validation_errors_next_to_fields(make_empty_app):
    c = make_empty_app().test_client()
    r = c.post("/setup", data={"name": "A", "email": "not-an-email", "password": "short", "confirm": "other"})
    assert r.status_code == 200
    assert field_errors(r.data, "email") == ["Enter a valid email address."]
    assert field_errors(r.data, "password") and field_errors(r.data, "confirm") == ["Passwords differ."]
    r = c.post("/setup", data={"name": "A", "email": "a@b.test", "password": "onlyletters", "confirm": "onlyletters"})
    assert r.status_code == 200 and field_errors(r.data, "password")[0].startswith("Mix letters")


# ----------------------------------------------------------------------------- sign-in, throttling, sessions
def test_login_throttling_locks_after_five_failures_until_the_lock_expires(app, monkeypatch):
    c = app.test_client()
    for _ in range(5):
        r = login(c, DOC_A.email, "wrong-password-1")
        assert r.status_code == 401 and b"Email or password is incorrect." in r.data
    r = login(c, DOC_A)  # the right password is refused while locked
    assert r.status_code == 401 and b"Too many failed attempts. Try again in 15 minutes." in r.data
    assert c.get("/patients/").status_code == 302

    real_now = utcnow()
    monkeypatch.setattr(user_store, "utcnow", lambda: real_now + dt.timedelta(minutes=14))
    r = login(c, DOC_A)
    assert r.status_code == 401 and b"Try again in 1 minute." in r.data
    monkeypatch.setattr(user_store, "utcnow", lambda: real_now + dt.timedelta(minutes=15, seconds=1))
    r = login(c, DOC_A)
    assert r.status_code == 302 and c.get("/patients/").status_code == 200
    assert q(app, select(LoginThrottle)) == []  # a successful sign-in clears the count


def test_lock_can_be_lifted_by_setting_locked_until_in_the_past(app):
    c = app.test_client()
    for _ in range(5):
        login(c, DOC_B.email, "wrong-password-1")
    assert b"Too many failed attempts" in login(c, DOC_B).data
    with sessions_of(app)() as s:
        s.execute(update(LoginThrottle).values(locked_until=utcnow() - dt.timedelta(seconds=1)))
        s.commit()
    assert login(c, DOC_B).status_code == 302


def test_an_admin_password_reset_lifts_the_lock(app, client_for):
    c = app.test_client()
    for _ in range(5):
        login(c, DOC_B.email, "wrong-password-1")
    assert b"Too many failed attempts" in login(c, DOC_B).data
    admin = client_for("admin")
    assert admin.post(f"/admin/users/{DOC_B.id}", data={"pw-password": "reset-pass-4242!"}).status_code == 302
    assert login(c, DOC_B.email, "reset-pass-4242!").status_code == 302


def test_login_error_does_not_reveal_whether_the_email_exists(app):
    c = app.test_client()
    known = login(c, DOC_A.email, "wrong-password-1")
    unknown = login(c, "nobody@clinic.test", "wrong-password-1")
    assert known.status_code == unknown.status_code == 401

    def alert(r):
        return re.findall(r'<p class="error" role="alert">(.*?)</p>', r.data.decode())

    assert alert(known) == alert(unknown) == ["Email or password is incorrect."]
    # the two pages are identical apart from the email typed in
    assert known.data.replace(DOC_A.email.encode(), b"@") == unknown.data.replace(b"nobody@clinic.test", b"@")


def test_deactivated_account_cannot_sign_in_and_the_answer_does_not_confirm_the_password(app, client_for):
    admin = client_for("admin")
    assert admin.post(f"/admin/users/{SPARE.id}/active").status_code == 302
    right = login(app.test_client(), SPARE)
    wrong = login(app.test_client(), SPARE.email, "wrong-password-1")
    assert right.status_code == wrong.status_code == 401
    assert b"deactivated" not in right.data and b"Email or password is incorrect." in right.data
    assert right.data == wrong.data  # the right password gets exactly the wrong password's page


def test_session_expires_after_idle_time(client_for):
    c = client_for("doc_a")
    with c.session_transaction() as sess:
        sess["seen"] = time.time() - 29 * 60  # still inside the 30 minute window
    assert c.get("/patients/").status_code == 200
    with c.session_transaction() as sess:
        assert time.time() - sess["seen"] < 60  # activity refreshed the clock
        sess["seen"] = time.time() - 31 * 60
    r = c.get("/patients/")
    assert r.status_code == 302 and r.headers["Location"].startswith("/login")
    page = c.get(r.headers["Location"])
    assert page.status_code == 200 and b"Your session expired after inactivity" in page.data
    assert c.get("/patients/").status_code == 302  # signed out for good, not just for one request


def test_session_idle_minutes_setting(make_app):
    app = make_app(session_idle_minutes=1)
    c = app.test_client()
    login(c, DOC_A)
    with c.session_transaction() as sess:
        sess["seen"] = time.time() - 61
    assert c.get("/").status_code == 302


def test_password_change_signs_out_every_session(app, client_for):
    c1, c2 = client_for("doc_a"), client_for("doc_a")
    r = c1.post("/account/password", data={"current": "not-the-password-1", "password": "brand-new-pass-42",
                                           "confirm": "brand-new-pass-42"})
    assert r.status_code == 200 and field_errors(r.data, "current") == ["The current password is not correct."]
    r = c1.post("/account/password", data={"current": DOC_A.password, "password": "brand-new-pass-42",
                                           "confirm": "brand-new-pass-42"})
    assert r.status_code == 302 and r.headers["Location"] == "/login"
    assert c1.get("/patients/").status_code == 302
    assert c2.get("/patients/").status_code == 302  # the other browser is signed out too
    assert login(app.test_client(), DOC_A).status_code == 401  # old password
    assert login(c2, DOC_A.email, "brand-new-pass-42").status_code == 302
    assert c2.get("/patients/").status_code == 200


def test_admin_deactivation_ends_the_users_session(app, client_for):
    doc, admin = client_for("doc_a"), client_for("admin")
    assert doc.get("/patients/").status_code == 200
    r = admin.post(f"/admin/users/{DOC_A.id}/active", follow_redirects=True)
    assert "Dr Alice A deactivated." in flashes(r.data)
    assert doc.get("/patients/").status_code == 302
    r = login(doc, DOC_A)  # refused like a wrong password (the answer confirms nothing)
    assert r.status_code == 401 and b"Email or password is incorrect." in r.data
    r = admin.post(f"/admin/users/{DOC_A.id}/active", follow_redirects=True)
    assert "Dr Alice A re-activated." in flashes(r.data)
    assert login(doc, DOC_A).status_code == 302
    # an administrator cannot lock themselves out
    r = admin.post(f"/admin/users/{ADMIN.id}/active", follow_redirects=True)
    assert "You cannot deactivate your own account." in flashes(r.data)
    assert one(app, select(User.is_active).where(User.id == ADMIN.id)) is True


def test_admin_resets_a_password(app, client_for):
    doc, admin = client_for("doc_a"), client_for("admin")
    r = admin.post(f"/admin/users/{DOC_A.id}", data={"pw-password": "short"})
    assert r.status_code == 200 and field_errors(r.data, "pw-password")
    r = admin.post(f"/admin/users/{DOC_A.id}", data={"pw-password": "reset-by-admin-77"})
    assert r.status_code == 302 and r.headers["Location"] == "/admin/users"
    assert doc.get("/patients/").status_code == 302  # their sessions ended
    assert login(doc, DOC_A).status_code == 401
    assert login(doc, DOC_A.email, "reset-by-admin-77").status_code == 302


def test_admin_reset_with_an_empty_password_changes_nothing(app, client_for):
    doc, admin = client_for("doc_a"), client_for("admin")
    r = admin.post(f"/admin/users/{DOC_A.id}", data={"pw-password": ""})
    assert r.status_code == 200 and field_errors(r.data, "pw-password") == ["This field is required."]
    assert doc.get("/patients/").status_code == 200  # not signed out
    assert one(app, select(User.session_version).where(User.id == DOC_A.id)) == 1


def test_admin_changes_a_role(app, client_for):
    admin = client_for("admin")
    r = admin.post(f"/admin/users/{SPARE.id}", data={"role-role": "admin"}, follow_redirects=True)
    assert "Dr Spare S is now an administrator." in flashes(r.data)
    assert one(app, select(User.role).where(User.id == SPARE.id)) == "admin"
    r = admin.post(f"/admin/users/{ADMIN.id}", data={"role-role": "doctor"})
    assert "You cannot remove your own administrator role." in flashes(r.data)
    assert one(app, select(User.role).where(User.id == ADMIN.id)) == "admin"


def test_admin_creates_a_user_with_field_errors(app, client_for):
    admin = client_for("admin")
    r = admin.post("/admin/users", data={"name": "Dup", "email": DOC_A.email.upper(), "role": "doctor",
                                         "password": "dup-pass-1234!"})
    assert r.status_code == 200 and field_errors(r.data, "email") == ["A user with this email already exists."]
    r = admin.post("/admin/users", data={"name": "Dr New", "email": "new@clinic.test", "role": "doctor",
                                         "password": "new-pass-1234!"})
    assert r.status_code == 302
    assert login(app.test_client(), "new@clinic.test", "new-pass-1234!").status_code == 302


# ----------------------------------------------------------------------------- patients
def test_mrn_must_be_unique(app, client_for):
    c = client_for("doc_a")
    r = new_patient(c, mrn=PATIENT_A["mrn"], family_name="Other")
    assert r.status_code == 200
    assert field_errors(r.data, "mrn") == ["A patient with this MRN already exists."]
    assert b'value="Other"' in r.data  # what was typed is kept
    r = c.post(f"/patients/{P}/edit", data=dict(PATIENT_A, mrn=PATIENT_B["mrn"]))
    assert r.status_code == 200 and field_errors(r.data, "mrn") == ["A patient with this MRN already exists."]
    assert one(app, select(func.count(Patient.id))) == 2


@pytest.mark.parametrize("values,field,message", [
    ({"family_name": ""}, "family_name", "This field is required."),
    ({"mrn": ""}, "mrn", "This field is required."),
    ({"birth_date": "1980-13-45"}, "birth_date", "Not a valid date value."),
    ({"birth_date": "03/02/1980"}, "birth_date", "Not a valid date value."),
    ({"birth_date": "2999-01-01"}, "birth_date", "The birth date is not plausible."),
    ({"sex": "robot"}, "sex", "Not a valid choice."),
])
def test_patient_validation_errors_next_to_fields(app, client_for, values, field, message):
    r = new_patient(client_for("doc_a"), **values)
    assert r.status_code == 200
    assert field_errors(r.data, field) == [message]
    assert f'id="{field}" ' in r.data.decode() and 'aria-invalid="true"' in r.data.decode()
    assert one(app, select(func.count(Patient.id))) == 2


def test_patient_search_by_name_and_mrn(app, client_for):
    c = client_for("doc_a")
    ids = {}
    for mrn, family, given in [("S-100", "Smith", "Anna"), ("S-200", "Smithers", "Bob"), ("J-300", "Jones", "Cy")]:
        ids[mrn] = int(new_patient(c, mrn=mrn, family_name=family, given_name=given).headers["Location"]
                       .rsplit("/", 1)[1])
    assert sorted(patient_ids(c.get("/patients/?q=Smith").data)) == sorted([ids["S-100"], ids["S-200"]])
    assert patient_ids(c.get("/patients/?q=S-100").data) == [ids["S-100"]]
    assert sorted(patient_ids(c.get("/patients/?q=S-").data)) == sorted([ids["S-100"], ids["S-200"]])
    assert patient_ids(c.get("/patients/?q=Anna").data) == [ids["S-100"]]
    r = c.get("/patients/?q=Nobody")
    assert patient_ids(r.data) == [] and "No patient matches “Nobody”." in r.data.decode()
    # doctor B does not find doctor A's patients
    assert patient_ids(client_for("doc_b").get("/patients/?q=Smith").data) == []


def test_patient_pagination(app, client_for):
    c = client_for("spare")  # a doctor with no patients yet
    for i in range(30):
        assert new_patient(c, mrn=f"PG-{i:03d}", family_name=f"Page{i:03d}").status_code == 302
    first, second = c.get("/patients/"), c.get("/patients/?page=2")
    assert len(patient_ids(first.data)) == 25 and len(patient_ids(second.data)) == 5
    assert len(set(patient_ids(first.data)) | set(patient_ids(second.data))) == 30
    assert "Page 2 of 2 (30)" in second.data.decode()
    assert patient_ids(c.get("/patients/?page=99").data) == patient_ids(second.data)  # clamped
    assert patient_ids(c.get("/patients/?page=abc").data) == patient_ids(first.data)


def test_doctor_sees_only_assigned_patients_and_admin_assigns(app, client_for):
    a, b, admin = client_for("doc_a"), client_for("doc_b"), client_for("admin")
    assert patient_ids(a.get("/patients/").data) == [P]
    assert patient_ids(b.get("/patients/").data) == [PATIENT_B_ID]
    assert sorted(patient_ids(admin.get("/patients/").data)) == [1, 2]
    assert b.get(f"/patients/{P}").status_code == 404

    r = admin.post(f"/patients/{P}/doctors", data={"doctors": [DOC_A.id, DOC_B.id]}, follow_redirects=True)
    assert "Access updated." in flashes(r.data)
    assert b.get(f"/patients/{P}").status_code == 200
    assert b.get(f"/cases/{CASE_A_ID}").status_code == 200
    assert P in patient_ids(b.get("/patients/").data)

    # taking access away works the same way
    admin.post(f"/patients/{P}/doctors", data={"doctors": [DOC_B.id]})
    assert a.get(f"/patients/{P}").status_code == 404 and a.get(f"/cases/{CASE_A_ID}").status_code == 404
    # only doctors can be assigned; an administrator id is not a choice
    r = admin.post(f"/patients/{P}/doctors", data={"doctors": [ADMIN.id]}, follow_redirects=True)
    assert "Choose doctors from the list." in flashes(r.data)
    assert b.get(f"/patients/{P}").status_code == 200


def test_patient_edit(app, client_for):
    c = client_for("doc_a")
    r = c.post(f"/patients/{P}/edit", data=dict(PATIENT_A, given_name="Janet", notes="allergic to penicillin"))
    assert r.status_code == 302
    page = c.get(f"/patients/{P}").data.decode()
    assert "Doe, Janet" in page and "allergic to penicillin" in page


# ----------------------------------------------------------------------------- cases and uploads
def test_upload_mixed_good_corrupt_and_empty_files(app, client_for):
    c = client_for("doc_a")
    before = stored_files(app)
    good1, good2 = png_bytes(1), png_bytes(3)
    corrupt = b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20
    r = new_case(c, P, [("good1.png", good1), ("corrupt.png", corrupt), ("empty.png", b""), ("good2.png", good2)])
    cid = case_id_of(r)
    msgs = flashes(c.get(f"/cases/{cid}").data)
    assert "2 images queued for analysis." in msgs
    assert any(m.startswith("corrupt.png: not added.") for m in msgs)
    assert not any(re.search(r"\b\w*(Error|Exception)\b", m) for m in msgs), msgs  # no "(OSError)" for people
    assert "empty.png: not added. The file is empty (0 bytes)." in msgs

    rows = q(app, select(CaseImage.original_filename, CaseImage.sha256, Analysis.job_status)
             .join(Analysis, Analysis.image_id == CaseImage.id).where(CaseImage.case_id == cid).order_by(CaseImage.id))
    sha1, sha2 = hashlib.sha256(good1).hexdigest(), hashlib.sha256(good2).hexdigest()
    assert rows == [("good1.png", sha1, "queued"), ("good2.png", sha2, "queued")]
    assert one(app, select(Case.status).where(Case.id == cid)) == "analysing"
    # the store holds exactly the two good originals (+ thumbnails): nothing for the bad files, no temp files
    added = stored_files(app) - before
    assert added == {f"{h[:2]}/{h[2:4]}/{h}/{n}" for h in (sha1, sha2) for n in ("original", "thumb.png")}
    assert files_of(app).path(sha1).read_bytes() == good1
    for bad in (corrupt, b""):
        assert not files_of(app).exists(hashlib.sha256(bad).hexdigest())


def test_a_new_case_whose_uploads_all_fail_is_not_created(app, client_for):
    c = client_for("doc_a")
    cases_before = one(app, select(func.count(Case.id)))
    r = new_case(c, P, [("corrupt.png", b"\x89PNG\r\n\x1a\n" + b"junk" * 50), ("empty.png", b"")], note="keep me")
    assert r.status_code == 200
    html = r.data.decode()
    summary = re.search(r'<div class="error-summary"[^>]*>(.*?)</div>', html, re.S).group(1)
    assert "No image could be added, so no case was created." in summary
    assert "corrupt.png:" in summary and "empty.png: The file is empty (0 bytes)." in summary
    assert "keep me" in html  # what was typed is kept for the next try
    assert one(app, select(func.count(Case.id))) == cases_before


def test_an_empty_case_can_be_deleted_and_a_case_with_images_cannot(app, client_for, tok):
    c = client_for("doc_a")
    r = c.post(f"/patients/{P}/cases/new", data={"analyzer_id": "smear-all"}, content_type=MULTIPART)
    cid = case_id_of(r)  # no files at all: an (empty) case, images to follow
    page = c.get(f"/cases/{cid}").data.decode()
    assert "Delete this empty case" in page
    assert client_for("doc_b").post(f"/cases/{cid}/delete").status_code == 404  # not doctor B's patient
    r = c.post(f"/cases/{cid}/delete", follow_redirects=True)
    assert f"Empty case #{cid} deleted." in flashes(r.data)
    assert one(app, select(func.count(Case.id)).where(Case.id == cid)) == 0
    r = c.post(f"/cases/{CASE_A_ID}/delete", follow_redirects=True)
    assert "Only an empty case (no images, never signed) can be deleted." in flashes(r.data)
    assert "Delete this empty case" not in c.get(f"/cases/{CASE_A_ID}").data.decode()
    h = {"Authorization": f"Bearer {tok('doc_a')}"}
    api = app.test_client()
    cid = api.post(f"/api/v1/patients/{P}/cases", json={"analyzer_id": "smear-all"}, headers=h).json["id"]
    assert api.delete(f"/api/v1/cases/{CASE_A_ID}", headers=h).status_code == 409
    assert api.delete(f"/api/v1/cases/{cid}", headers=h).status_code == 204
    assert api.get(f"/api/v1/cases/{cid}", headers=h).status_code == 404


def test_upload_json_reports_per_file(app, client_for):
    c = client_for("doc_a")
    r = upload(c, CASE_A_ID, [("bad.png", b"junk")], json=True)
    assert r.status_code == 422 and r.json["added"] == [] and r.json["errors"][0]["file"] == "bad.png"
    r = upload(c, CASE_A_ID, [("new.png", png_bytes(7))], json=True)
    assert r.status_code == 200 and len(r.json["added"]) == 1


def test_duplicate_image_in_a_case_is_not_added_twice(app, client_for):
    c = client_for("doc_a")
    data = png_bytes(0)  # the image already in case 1
    r = upload(c, CASE_A_ID, [("again.png", data)], json=True)
    assert r.status_code == 200 and r.json == {"added": [], "duplicates": ["again.png"], "errors": []}
    r = upload(c, CASE_A_ID, [("again.png", data)], json=False)
    assert "again.png: already in this case (not added twice)." in flashes(c.get(r.headers["Location"]).data)
    # the same new file twice in one request: added once
    fresh = png_bytes(8)
    r = upload(c, CASE_A_ID, [("x.png", fresh), ("y.png", fresh)], json=True)
    assert len(r.json["added"]) == 1 and r.json["duplicates"] == ["y.png"]
    assert one(app, select(func.count(CaseImage.id)).where(CaseImage.case_id == CASE_A_ID)) == 2


def test_resubmitted_new_case_form_does_not_create_a_second_case(app, client_for):
    c = client_for("doc_a")
    files = [("f.png", png_bytes(4))]
    first = case_id_of(new_case(c, P, files, submission_id="sub-123"))
    again = case_id_of(new_case(c, P, files, submission_id="sub-123"))
    assert first == again
    assert one(app, select(func.count(Case.id)).where(Case.patient_id == P)) == 2  # seed case + this one
    other = case_id_of(new_case(c, P, files, submission_id="sub-456"))
    assert other != first
    # the form carries a fresh submission id each time it is shown
    ids = {re.search(rb'name="submission_id" value="([0-9a-f]+)"', c.get(f"/patients/{P}/cases/new").data).group(1)
           for _ in range(2)}
    assert len(ids) == 2


def test_upload_bigger_than_the_limit(make_app):
    app = make_app(max_upload_mb=1)
    c = app.test_client()
    login(c, DOC_A)
    big = png_bytes(0) + b"\0" * (1024 * 1024)
    cid = case_id_of(new_case(c, P, [("big.png", big), ("ok.png", png_bytes(1))]))
    msgs = flashes(c.get(f"/cases/{cid}").data)
    assert "big.png: not added. larger than the 1 MB limit" in msgs and "1 image queued for analysis." in msgs
    assert q(app, select(CaseImage.original_filename).where(CaseImage.case_id == cid)) == [("ok.png",)]
    assert not files_of(app).exists(hashlib.sha256(big).hexdigest())
    # a whole request over the server limit gets a clear error page
    app2 = make_app({"MAX_CONTENT_LENGTH": 64 * 1024}, max_upload_mb=1)
    c2 = app2.test_client()
    login(c2, DOC_A)
    r = new_case(c2, P, [("big.png", big)])
    assert r.status_code == 413 and b"Upload too large" in r.data and b"at most 1 MB" in r.data
    assert b"Traceback" not in r.data


def test_analysis_job_runs_inline_and_the_result_page_shows_out_of_domain(app, client_for, pool):
    c = client_for("doc_a")
    cid = case_id_of(new_case(c, P, [("f.png", png_bytes(5))], note="night sweats"))
    st = c.get(f"/cases/{cid}/status.json").json
    assert st["status"] == "analysing" and st["images"][0]["job"] == "queued" and st["images"][0]["result"] is None
    assert b"Analysis in progress" in c.get(f"/cases/{cid}").data
    assert pool.run_one() is True and pool.run_one() is False
    st = c.get(f"/cases/{cid}/status.json").json
    assert st == {"case": cid, "status": "ready", "images": [{"id": st["images"][0]["id"], "job": "done",
                                                               "result": "out_of_domain"}]}
    page = c.get(f"/cases/{cid}").data.decode()
    assert "Out of domain: the images do not look like what this analyzer was trained on" in page
    assert "night sweats" in page and "Review and sign" in page and 'name="uncertainty_note"' in page
    a = q(app, select(Analysis.attempts, Analysis.worker, Analysis.model_version, Analysis.cell_count)
          .join(CaseImage).where(CaseImage.case_id == cid))
    assert a[0][0] == 1 and a[0][1] == "inline" and a[0][2] and a[0][3] is None


def test_in_domain_result_shows_label_and_overlays(app, client_for, pool, gate_off):
    c = client_for("doc_a")
    cid = analysed_case(app, c, 1)
    page = c.get(f"/cases/{cid}").data.decode()
    assert "Benign (hematogone)" in page and "Grad-CAM" in page
    img = q(app, select(CaseImage.id).where(CaseImage.case_id == cid))[0][0]
    for kind in ("original", "thumb", "cells", "heatmap", "heatmap-layer"):
        r = c.get(f"/cases/{cid}/images/{img}/{kind}.png")
        assert r.status_code == 200 and r.mimetype == "image/png" and r.data[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- sign-off
def selected_options(html: bytes, name: str) -> list[str]:
    select_html = re.search(rf'<select[^>]*name="{name}"[^>]*>(.*?)</select>', html.decode(), re.S).group(1)
    return re.findall(r'<option selected value="([^"]*)"', select_html) + \
        re.findall(r'<option value="([^"]*)" selected', select_html)


def test_out_of_domain_case_preselects_nothing_and_needs_a_choice_a_reason_and_a_note(app, client_for):
    c = client_for("doc_a")
    page = c.get(f"/cases/{CASE_A_ID}").data
    assert selected_options(page, "final_diagnosis") == [""]  # the placeholder, not the first label
    assert b"Choose a diagnosis" in page and b'value="Nondiagnostic"' in page and b"Non-diagnostic sample" in page
    assert b"The AI gave no diagnosis: choose one explicitly" in page
    r = sign(c, CASE_A_ID, uncertainty_note="n", override_reason="r")  # the form as it comes: nothing chosen
    assert r.status_code == 400 and field_errors(r.data, "final_diagnosis") == ["Choose a diagnosis."]
    r = sign(c, CASE_A_ID, final_diagnosis="Benign", uncertainty_note="reviewed manually, smear adequate")
    assert r.status_code == 400
    assert field_errors(r.data, "override_reason") == ["The AI gave no diagnosis: give the reason for yours."]
    r = sign(c, CASE_A_ID, final_diagnosis="Benign", override_reason="hematogones on manual review")
    assert r.status_code == 400
    assert field_errors(r.data, "uncertainty_note")[0].startswith("The AI result is not confident")
    r = sign(c, CASE_A_ID, final_diagnosis="Benign", confirm="")
    assert r.status_code == 400 and field_errors(r.data, "confirm") == ["Confirm that you reviewed the case."]
    r = sign(c, CASE_A_ID, final_diagnosis="Benign", uncertainty_note="reviewed manually, smear adequate",
             override_reason="hematogones on manual review")
    assert r.status_code == 302
    rv = q(app, select(Review.version, Review.ai_label, Review.ai_status, Review.agrees_with_ai,
                       Review.uncertainty_note, Review.override_reason).where(Review.case_id == CASE_A_ID))
    assert rv == [(1, None, "out_of_domain", False, "reviewed manually, smear adequate",
                   "hematogones on manual review")]
    page = c.get(f"/cases/{CASE_A_ID}").data.decode()
    assert "The AI gave no diagnosis (out of domain). Reason: hematogones on manual review" in page
    assert "(none)" not in page and "Overrides the AI result" not in page


def test_the_api_also_refuses_a_diagnosis_without_a_reason_when_the_ai_gave_none(app, tok):
    h = {"Authorization": f"Bearer {tok('doc_a')}"}
    c = app.test_client()
    r = c.post(f"/api/v1/cases/{CASE_A_ID}/sign", json={"final_diagnosis": "Benign", "uncertainty_note": "n"}, headers=h)
    assert r.status_code == 422 and r.json["error"]["field"] == "override_reason"
    r = c.post(f"/api/v1/cases/{CASE_A_ID}/sign", json={"final_diagnosis": "Nondiagnostic", "uncertainty_note": "n",
                                                        "override_reason": "stain too pale"}, headers=h)
    assert r.status_code == 200 and r.json["reviews"][0]["final_diagnosis"] == "Nondiagnostic"


def test_signing_a_page_older_than_the_latest_upload_is_refused(app, client_for, pool, tok):
    c = client_for("doc_a")
    page = c.get(f"/cases/{CASE_A_ID}").data.decode()
    seen = re.search(r'name="revision" type="hidden" value="(\d+)"', page).group(1)
    # another upload lands (and is analysed) while the doctor is still reading the page
    r = app.test_client().post(f"/api/v1/cases/{CASE_A_ID}/images", headers={"Authorization": f"Bearer {tok('doc_a')}"},
                               data={"images": (io.BytesIO(png_bytes(21)), "late.png")}, content_type=MULTIPART)
    assert r.status_code == 200 and r.json["case"]["revision"] == int(seen) + 1
    while pool.run_one():
        pass
    fields = dict(final_diagnosis="Nondiagnostic", override_reason="r", uncertainty_note="n", revision=seen)
    r = sign(c, CASE_A_ID, **fields)
    assert r.status_code == 400 and "The case changed while you were reviewing it" in r.data.decode()
    r = sign(c, CASE_A_ID, **dict(fields, confirm=""))  # refused by the form itself: the change is still said
    assert r.status_code == 400 and "The case changed while you were reviewing it" in r.data.decode()
    assert one(app, select(func.count(Review.id)).where(Review.case_id == CASE_A_ID)) == 0
    # the page shown with the refusal carries the new revision: signing it covers both images
    now = re.search(r'name="revision" type="hidden" value="(\d+)"', r.data.decode()).group(1)
    assert sign(c, CASE_A_ID, **dict(fields, revision=now)).status_code == 302
    api = app.test_client().post(f"/api/v1/cases/{CASE_A_ID}/sign", headers={"Authorization": f"Bearer {tok('doc_a')}"},
                                 json=dict(fields, revision=int(seen), amendment_reason="a"))
    assert api.status_code == 409 and api.json["error"]["code"] == "case_not_signable"


def test_a_blank_form_is_not_announced_as_invalid(client_for):
    page = client_for("doc_a").get(f"/cases/{CASE_A_ID}").data.decode()
    assert 'aria-invalid' not in page and '="None"' not in page
    assert 'aria-describedby="final_diagnosis-help"' in page  # the help text is read with the field


def test_sign_errors_are_summarised_at_the_top_with_links_to_the_fields(client_for):
    c = client_for("doc_a")
    html = sign(c, CASE_A_ID, final_diagnosis="Benign").data.decode()
    summary = re.search(r'<div class="error-summary" role="alert" tabindex="-1"[^>]*>(.*?)</div>', html, re.S)
    assert summary and html.index("error-summary") < html.index("AI result")  # above the case, not at the bottom
    assert '<a href="#override_reason">' in summary.group(1) and '<a href="#uncertainty_note">' in summary.group(1)
    assert 'aria-invalid="true"' in html


def test_uncertain_case_needs_an_uncertainty_note(app, client_for, gate_off):
    c = client_for("doc_a")
    cid = analysed_case(app, c, 0)  # this generated field gets a low-confidence label
    assert c.get(f"/cases/{cid}/status.json").json["images"][0]["result"] == "uncertain"
    assert "Uncertain: the model is not confident" in c.get(f"/cases/{cid}").data.decode()
    ai_label = one(app, select(Analysis.label).join(CaseImage).where(CaseImage.case_id == cid))
    r = sign(c, cid, final_diagnosis=ai_label)  # agreeing is not enough
    assert r.status_code == 400 and field_errors(r.data, "uncertainty_note")
    r = sign(c, cid, final_diagnosis=ai_label, uncertainty_note="morphology reviewed by hand")
    assert r.status_code == 302
    assert q(app, select(Review.ai_status, Review.agrees_with_ai).where(Review.case_id == cid)) == [("uncertain", True)]


def test_sign_override_agree_amend_and_report(app, client_for, pool, gate_off):
    c = client_for("doc_a")
    cid = analysed_case(app, c, 1)
    assert c.get(f"/cases/{cid}/status.json").json["images"][0]["result"] == "ok"
    ai_label = one(app, select(Analysis.label).join(CaseImage).where(CaseImage.case_id == cid))
    other = "Pre" if ai_label != "Pre" else "Early"

    # overriding the AI needs a reason; an unknown diagnosis is refused
    r = sign(c, cid, final_diagnosis=other)
    assert r.status_code == 400
    assert field_errors(r.data, "override_reason") == ["Give the reason for overriding the AI result."]
    assert sign(c, cid, final_diagnosis="Made-up").status_code == 400
    assert one(app, select(func.count(Review.id)).where(Review.case_id == cid)) == 0

    # agreeing with the AI and giving a reason for overriding it would read as a contradiction in the report
    r = sign(c, cid, final_diagnosis=ai_label, override_reason="stain too pale")
    assert r.status_code == 400 and field_errors(r.data, "override_reason") == [
        "Your diagnosis agrees with the AI result, so there is nothing to override: clear this box, or put the "
        "text under Comment."]
    assert "stain too pale" in r.data.decode()  # kept in the form: nothing typed is lost

    # agreeing with a confident result signs without further notes
    r = sign(c, cid, final_diagnosis=ai_label, comment="<b>typical</b> morphology")
    assert r.status_code == 302
    assert "Case signed (version 1)." in flashes(c.get(f"/cases/{cid}").data)
    v1 = q(app, select(Review.version, Review.final_diagnosis, Review.agrees_with_ai, Review.content_sha256)
           .where(Review.case_id == cid))
    assert v1[0][:3] == (1, ai_label, True) and re.fullmatch(r"[0-9a-f]{64}", v1[0][3])
    assert q(app, select(Case.status, Case.final_diagnosis).where(Case.id == cid)) == [("signed", ai_label)]
    page = c.get(f"/cases/{cid}").data.decode()
    assert "&lt;b&gt;typical&lt;/b&gt;" in page and "Add images" not in page and "Amend the diagnosis" in page

    # a signed case refuses new images
    r = upload(c, cid, [("late.png", png_bytes(6))], json=True)
    assert r.status_code == 409 and "signed" in r.json["error"]
    r = upload(c, cid, [("late.png", png_bytes(6))])
    assert r.status_code == 302 and any("This case is signed" in m for m in flashes(c.get(f"/cases/{cid}").data))
    assert one(app, select(func.count(CaseImage.id)).where(CaseImage.case_id == cid)) == 1

    # the report of a signed case: patient and diagnosis inside, byte-identical downloads
    r1, r2 = c.get(f"/cases/{cid}/report.pdf"), c.get(f"/cases/{cid}/report.pdf")
    assert r1.status_code == 200 and r1.mimetype == "application/pdf" and r1.data[:5] == b"%PDF-"
    assert f'filename="oncoscope-case-{cid}-v1.pdf"' in r1.headers["Content-Disposition"]
    assert r1.data == r2.data
    from pypdf import PdfReader

    text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(r1.data)).pages)
    assert "Doe" in text and "Jane" in text and PATIENT_A["mrn"] in text
    assert "Benign (hematogone)" in text if ai_label == "Benign" else ai_label in text

    # amending needs a reason, adds version 2 and keeps version 1 unchanged
    r = sign(c, cid, final_diagnosis=other, override_reason="blasts on second look")
    assert r.status_code == 400 and field_errors(r.data, "amendment_reason")
    r = sign(c, cid, final_diagnosis=other, override_reason="blasts on second look",
             amendment_reason="second review with haematologist")
    assert r.status_code == 302
    rows = q(app, select(Review.version, Review.final_diagnosis, Review.agrees_with_ai, Review.amendment_reason,
                         Review.content_sha256).where(Review.case_id == cid).order_by(Review.version))
    assert rows[0] == tuple(v1[0][:3]) + ("", v1[0][3])
    assert rows[1][:4] == (2, other, False, "second review with haematologist")
    assert re.fullmatch(r"[0-9a-f]{64}", rows[1][4]) and rows[1][4] != rows[0][4]
    assert one(app, select(Case.final_diagnosis).where(Case.id == cid)) == other
    page = c.get(f"/cases/{cid}").data.decode()
    names = {"Benign": "Benign (hematogone)"}
    assert "Earlier versions" in page and f"Version 1: {names.get(ai_label, ai_label)}, signed by" in page
    assert "Amended (version 2): second review with haematologist" in page
    r3 = c.get(f"/cases/{cid}/report.pdf")
    assert f'filename="oncoscope-case-{cid}-v2.pdf"' in r3.headers["Content-Disposition"] and r3.data != r1.data


def test_unsigned_case_report_is_a_draft(client_for):
    r = client_for("doc_a").get(f"/cases/{CASE_A_ID}/report.pdf")
    assert r.status_code == 200 and f"oncoscope-case-{CASE_A_ID}-draft.pdf" in r.headers["Content-Disposition"]


def test_signing_waits_for_pending_analyses(app, client_for):
    c = client_for("doc_a")
    cid = case_id_of(new_case(c, P, [("f.png", png_bytes(9))]))
    r = sign(c, cid, final_diagnosis="Benign", uncertainty_note="n")
    assert r.status_code == 400 and b"Wait until every image is analysed before signing." in r.data


# ----------------------------------------------------------------------------- failed jobs
def _job(app, cid):
    return q(app, select(Analysis.id, Analysis.job_status, Analysis.attempts, Analysis.last_error, CaseImage.id)
             .join(CaseImage).where(CaseImage.case_id == cid))[0]


def test_failed_job_is_retried_then_failed_then_requeued_by_hand(app, client_for, pool, monkeypatch):
    from oncoscope.analyzers import registry

    an = registry.get("smear-all")

    def boom(self, loaded):
        raise RuntimeError("analyzer exploded")

    monkeypatch.setattr(type(an), "analyze", boom)
    c = client_for("doc_a")
    cid = case_id_of(new_case(c, P, [("doomed.png", png_bytes(10))]))
    for attempt in (1, 2):
        assert pool.run_one() is True
        aid, status, attempts, err, _ = _job(app, cid)
        assert (status, attempts) == ("retried", attempt) and err.startswith("RuntimeError: analyzer exploded")
        assert pool.run_one() is False  # backing off: not due yet
        update_row(app, Analysis, aid, queued_at=utcnow() - dt.timedelta(seconds=1))
    assert pool.run_one() is True
    aid, status, attempts, err, img_id = _job(app, cid)
    assert (status, attempts) == ("failed", 3)
    assert one(app, select(Case.status).where(Case.id == cid)) == "ready"

    admin = client_for("admin")
    home = admin.get("/").data.decode()
    assert f'href="/cases/{cid}"' in home and "doomed.png" in home and "RuntimeError: analyzer exploded" in home
    assert "Traceback" not in home
    page = c.get(f"/cases/{cid}").data.decode()
    assert "The analysis failed after 3 attempts." in page and f"/cases/{cid}/images/{img_id}/retry" in page

    monkeypatch.undo()  # the analyzer works again
    r = c.post(f"/cases/{cid}/images/{img_id}/retry")
    assert r.status_code == 302
    assert _job(app, cid)[1:3] == ("retried", 0)
    assert one(app, select(Case.status).where(Case.id == cid)) == "analysing"
    assert pool.run_one() is True
    assert _job(app, cid)[1:3] == ("done", 1)
    assert one(app, select(Case.status).where(Case.id == cid)) == "ready"
    assert "doomed.png" not in admin.get("/").data.decode()  # no longer in the failed-jobs table


def test_retry_does_not_reopen_a_signed_case(app, client_for, pool, monkeypatch):
    from oncoscope.analyzers import registry

    monkeypatch.setattr(type(registry.get("smear-all")), "analyze", lambda self, loaded: 1 / 0)
    c = client_for("doc_a")
    cid = case_id_of(new_case(c, P, [("doomed.png", png_bytes(11))]))
    for _ in range(3):
        assert pool.run_one()
        update_row(app, Analysis, _job(app, cid)[0], queued_at=utcnow() - dt.timedelta(seconds=1))
    assert _job(app, cid)[1] == "failed"
    assert sign(c, cid, final_diagnosis="Nondiagnostic", uncertainty_note="analysis failed; slide unusable",
                override_reason="no analysis").status_code == 302
    monkeypatch.undo()
    r = c.post(f"/cases/{cid}/images/{_job(app, cid)[4]}/retry", follow_redirects=True)
    assert r.status_code == 200
    assert one(app, select(Case.status).where(Case.id == cid)) == "signed"
    assert _job(app, cid)[1] == "failed" and pool.run_one() is False
    assert upload(c, cid, [("late.png", png_bytes(12))], json=True).status_code == 409


# ----------------------------------------------------------------------------- hardening
def test_csrf_is_enforced_when_enabled(make_app):
    app = make_app({"WTF_CSRF_ENABLED": True})
    c = app.test_client()
    r = c.post("/login", data={"email": DOC_A.email, "password": DOC_A.password})
    assert r.status_code == 400 and b"Form expired" in r.data
    token = re.search(rb'name="csrf_token"[^>]*value="([^"]+)"', c.get("/login").data).group(1).decode()
    r = c.post("/login", data={"email": DOC_A.email, "password": DOC_A.password, "csrf_token": token})
    assert r.status_code == 302
    r = c.post(f"/cases/{CASE_A_ID}/sign", data={"final_diagnosis": "Benign", "confirm": "y",
                                                 "uncertainty_note": "x"})
    assert r.status_code == 400 and b"Form expired" in r.data
    assert one(app, select(func.count(Review.id))) == 0
    r = c.post("/logout")
    assert r.status_code == 400 and c.get("/patients/").status_code == 200
    token = re.search(rb'name="csrf_token"[^>]*value="([^"]+)"', c.get("/patients/").data).group(1).decode()
    assert c.post("/logout", data={"csrf_token": token}).status_code == 302
    assert c.get("/patients/").status_code == 302


@pytest.mark.parametrize("url,role", [("/login", None), ("/patients/", "doc_a"), (f"/cases/{CASE_A_ID}", "doc_a")])
def test_security_headers(client_for, url, role):
    r = client_for(role).get(url)
    assert r.status_code == 200
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Cache-Control"] == "no-store"
    set_cookie = r.headers.get("Set-Cookie", "")
    if set_cookie:
        assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie
    # no inline script or style the CSP would block
    assert not re.search(rb"<script(?![^>]*\bsrc=)", r.data) and b" style=" not in r.data


def test_patient_name_is_escaped(app, client_for):
    c = client_for("doc_a")
    evil = "<script>alert(1)</script>"
    r = new_patient(c, mrn="X-1", family_name=evil, given_name='"><img src=x onerror=alert(2)>',
                    notes="<iframe src=//evil.test>")
    pid = int(r.headers["Location"].rsplit("/", 1)[1])
    for url, args in ((r.headers["Location"], {}), ("/patients/", {}), ("/patients/", {"q": evil}),
                      (f"/patients/{pid}/edit", {})):
        body = c.get(url, query_string=args).data
        assert b"<script>alert(1)" not in body and b"<img src=x" not in body and b"<iframe" not in body, url
        assert b"&lt;script&gt;alert(1)&lt;/script&gt;" in body, url
    cid = case_id_of(new_case(c, pid, [("<svg onload=alert(3)>.png", png_bytes(1))], note="<b>note</b>"))
    for url in (f"/cases/{cid}", "/cases/", "/"):
        body = c.get(url).data
        assert b"<script>alert(1)" not in body and b"<svg onload" not in body and b"<b>note</b>" not in body, url


@pytest.mark.parametrize("nxt,expected", [
    ("//evil.com", "/"),
    ("//evil.com/patients/", "/"),
    ("https://evil.com", "/"),
    ("/\\evil.com", "/"),
    ("/\t/evil.com", "/"),  # browsers drop tabs and newlines: "/\t/x" would become "//x"
    ("/\n/evil.com", "/"),
    ("javascript:alert(1)", "/"),
    ("/patients/", "/patients/"),
    ("/cases/1?x=1", "/cases/1?x=1"),
])
def test_login_next_is_never_an_open_redirect(app, nxt, expected):
    r = app.test_client().post("/login", query_string={"next": nxt},
                               data={"email": DOC_A.email, "password": DOC_A.password})
    assert r.status_code == 302 and r.headers["Location"] == expected


DOWN_URL = "postgresql+psycopg://x@127.0.0.1:1/none"


def test_database_down_gives_503_pages_not_tracebacks(make_app, app):
    down = make_app(database_url=DOWN_URL)
    c = down.test_client()
    r = c.get("/healthz")
    assert r.status_code == 503 and r.json["database"] == "unavailable" and r.json["app"] == "ok"
    for r in (c.get("/login"), c.get("/"), c.get("/setup"),
              c.post("/login", data={"email": DOC_A.email, "password": DOC_A.password})):
        assert r.status_code == 503 and b"Database unavailable" in r.data and b"Traceback" not in r.data
    # a signed-in user (same instance secret, session made while the database was up)
    up = app.test_client()
    login(up, DOC_A)
    c.set_cookie("session", up.get_cookie("session").value)
    for url in ("/patients/", f"/cases/{CASE_A_ID}"):
        r = c.get(url)
        assert r.status_code == 503 and b"Database unavailable" in r.data and b"Traceback" not in r.data


# ----------------------------------------------------------------------------- settings


def test_lockout_message_does_not_reveal_which_emails_exist(app):
    from tests.web.conftest import DOC_A

    c = app.test_client()
    answers = []
    for email in (DOC_A.email, "nobody-here@clinic.test"):
        for _ in range(5):
            c.post("/login", data={"email": email, "password": "wrong-password-1"})
        answers.append(c.post("/login", data={"email": email, "password": "wrong-password-1"}).data.decode())
    assert all("Too many failed attempts" in t for t in answers), answers


def test_logout_invalidates_copied_session_cookie(app):
    from tests.web.conftest import DOC_A, login

    a = app.test_client()
    assert login(a, DOC_A).status_code == 302
    cookie = a.get_cookie("session")
    assert cookie is not None and a.get("/patients/").status_code == 200
    thief = app.test_client()
    thief.set_cookie("session", cookie.value)
    assert thief.get("/patients/").status_code == 200
    a.post("/logout")
    assert thief.get("/patients/").status_code == 302  # the copied cookie no longer works


def test_csrf_token_works_over_https_without_a_referer(make_app):
    """Every page says Referrer-Policy: no-referrer, so browsers send no Referer: over HTTPS the token
    alone must decide (flask-wtf's strict Referer check would refuse every form)."""
    app = make_app({"WTF_CSRF_ENABLED": True})
    c = app.test_client()
    page = c.get("/login", base_url="https://clinic.example")
    token = re.search(rb'name="csrf_token"[^>]*value="([^"]+)"', page.data).group(1).decode()
    r = c.post("/login", base_url="https://clinic.example",
               data={"email": DOC_A.email, "password": DOC_A.password, "csrf_token": token})
    assert r.status_code == 302
    r = c.post("/login", base_url="https://clinic.example", data={"email": DOC_A.email, "password": DOC_A.password})
    assert r.status_code == 400  # still no token, no entry


def test_a_stat_case_says_so_wherever_it_is_listed(app, client_for):
    c = client_for("doc_a")
    assert 'name="priority"' in c.get(f"/patients/{P}/cases/new").data.decode()
    r = c.post(f"/patients/{P}/cases/new", data={"analyzer_id": "smear-all", "priority": "stat"},
               content_type=MULTIPART)
    cid = case_id_of(r)
    assert one(app, select(Case.priority).where(Case.id == cid)) == "stat"
    for url in (f"/cases/{cid}", f"/patients/{P}", "/cases/"):
        assert 'class="badge prio-stat"' in c.get(url).data.decode(), url
    bad = c.post(f"/patients/{P}/cases/new", data={"analyzer_id": "smear-all", "priority": "urgent"},
                 content_type=MULTIPART)
    assert bad.status_code == 200 and "Not a valid choice" in bad.data.decode()
