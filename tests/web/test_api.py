"""REST API: token authentication, object-level authorization, error shape, ETags, idempotency,
and the generated OpenAPI document."""

from __future__ import annotations

import datetime as dt
import io

import pytest

from oncoscope.store import tokens as token_store
from oncoscope.store.models import ApiToken, User
from tests.web.conftest import (ACCOUNTS, CASE_A_ID, PATIENT_A_ID, PATIENT_B_ID, png_bytes,
                                sessions_of)


def h(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def assert_error(r, status: int, code: str | None = None):
    assert r.status_code == status, (r.status_code, r.data[:300])
    body = r.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}
    if code:
        assert body["error"]["code"] == code


ROUTES = [
    ("GET", "/api/v1/patients"),
    ("GET", f"/api/v1/patients/{PATIENT_A_ID}"),
    ("GET", f"/api/v1/patients/{PATIENT_A_ID}/cases"),
    ("GET", f"/api/v1/cases/{CASE_A_ID}"),
    ("GET", f"/api/v1/cases/{CASE_A_ID}/report.pdf"),
    ("GET", "/api/v1/analyzers"),
]


@pytest.mark.parametrize("method,path", ROUTES)
def test_no_token_or_bad_token_is_401(app, method, path):
    c = app.test_client()
    assert_error(c.open(path, method=method), 401, "unauthenticated")
    assert_error(c.open(path, method=method, headers=h("osk_deadbeef_nope")), 401, "invalid_token")
    assert c.open(path, method=method).headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("method,path", ROUTES)
def test_owner_and_admin_allowed_other_doctor_gets_404(app, tok, method, path):
    c = app.test_client()
    assert c.open(path, method=method, headers=h(tok("doc_a"))).status_code == 200
    assert c.open(path, method=method, headers=h(tok("admin"))).status_code == 200
    r = c.open(path, method=method, headers=h(tok("doc_b")))
    if "patients/" in path or "cases/" in path:
        assert_error(r, 404, "not_found")
    else:
        assert r.status_code == 200


def test_revoked_and_expired_tokens_refused_and_last_used_recorded(app, tok):
    c = app.test_client()
    t = tok("doc_a")
    assert c.get("/api/v1/patients", headers=h(t)).status_code == 200
    s = sessions_of(app)()
    row = s.query(ApiToken).filter(ApiToken.name == "test-doc_a").one()
    assert row.last_used_at is not None and row.token_hash != t and t not in str(row.__dict__)
    token_store.revoke(s, s.get(User, ACCOUNTS["doc_a"].id), row.id)
    s.commit()
    assert_error(c.get("/api/v1/patients", headers=h(t)), 401, "invalid_token")
    t2 = tok("doc_a", expires_in_days=1)
    row2 = s.query(ApiToken).filter(ApiToken.revoked_at.is_(None)).one()
    row2.expires_at = dt.datetime(2000, 1, 1)
    s.commit()
    s.close()
    assert_error(c.get("/api/v1/patients", headers=h(t2)), 401, "invalid_token")


def test_doctor_list_only_shows_own_patients(app, tok):
    c = app.test_client()
    ids = {p["id"] for p in c.get("/api/v1/patients", headers=h(tok("doc_a"))).get_json()["items"]}
    assert PATIENT_A_ID in ids and PATIENT_B_ID not in ids
    ids = {p["id"] for p in c.get("/api/v1/patients", headers=h(tok("admin"))).get_json()["items"]}
    assert {PATIENT_A_ID, PATIENT_B_ID} <= ids


def test_create_patient_validation_and_conflict(app, tok):
    c = app.test_client()
    t = h(tok("doc_a"))
    assert_error(c.post("/api/v1/patients", json={"family_name": "X"}, headers=t), 422)
    r = c.post("/api/v1/patients", json={"mrn": "API-1", "family_name": "Apitest", "birth_date": "1990-01-02"}, headers=t)
    assert r.status_code == 201 and r.get_json()["birth_date"] == "1990-01-02"
    assert_error(c.post("/api/v1/patients", json={"mrn": "API-1", "family_name": "Again"}, headers=t), 409, "conflict")
    assert_error(c.post("/api/v1/patients", json={"mrn": "API-2", "family_name": "X", "evil": 1}, headers=t), 422,
                 "unknown_field")
    assert_error(c.post("/api/v1/patients", data="not json", headers=t), 400, "invalid_json")
    r = c.patch(f"/api/v1/patients/{r.get_json()['id']}", json={"given_name": "Zoë"}, headers=t)
    assert r.status_code == 200 and r.get_json()["given_name"] == "Zoë"


def test_pagination_bounds(app, tok):
    c = app.test_client()
    t = h(tok("admin"))
    r = c.get("/api/v1/patients?per_page=1&page=2", headers=t).get_json()
    assert r["page"] == 2 and r["per_page"] == 1 and len(r["items"]) == 1 and r["total"] >= 2
    assert_error(c.get("/api/v1/patients?per_page=1000", headers=t), 400, "invalid_parameter")
    assert_error(c.get("/api/v1/patients?page=x", headers=t), 400, "invalid_parameter")


def test_etag_and_if_none_match(app, tok):
    c = app.test_client()
    t = h(tok("doc_a"))
    r = c.get(f"/api/v1/cases/{CASE_A_ID}", headers=t)
    etag = r.headers["ETag"]
    assert c.get(f"/api/v1/cases/{CASE_A_ID}", headers=dict(t, **{"If-None-Match": etag})).status_code == 304
    c.patch(f"/api/v1/patients/{PATIENT_A_ID}", json={"notes": "changed"}, headers=t)
    r2 = c.get(f"/api/v1/patients/{PATIENT_A_ID}", headers=dict(t, **{"If-None-Match": etag}))
    assert r2.status_code == 200


def test_idempotent_upload_never_duplicates(app, tok):
    c = app.test_client()
    t = h(tok("doc_a"))
    cid = c.post(f"/api/v1/patients/{PATIENT_A_ID}/cases", json={"analyzer_id": "smear-all"}, headers=t).get_json()["id"]
    data = png_bytes(7)
    hk = dict(t, **{"Idempotency-Key": "upload-1"})

    def send(key_headers):
        return c.post(f"/api/v1/cases/{cid}/images", data={"images": (io.BytesIO(data), "f.png")},
                      headers=key_headers, content_type="multipart/form-data")

    first, again = send(hk), send(hk)
    assert first.status_code == 200 and again.status_code == 200
    assert again.headers.get("Idempotent-Replayed") == "true" and again.get_json() == first.get_json()
    case = c.get(f"/api/v1/cases/{cid}", headers=t).get_json()
    assert len(case["images"]) == 1
    # the same key for a different request is refused
    other = c.post(f"/api/v1/cases/{cid}/images", data={"images": (io.BytesIO(png_bytes(8)), "g.png")},
                   headers=hk, content_type="multipart/form-data")
    assert_error(other, 422, "idempotency_key_reused")
    # without a key, the same image is still not stored twice (content hash)
    r = send(t)
    assert r.get_json()["duplicates"] == ["f.png"]


def test_upload_errors_and_signed_case(app, tok, pool):
    c = app.test_client()
    t = h(tok("doc_a"))
    cid = c.post(f"/api/v1/patients/{PATIENT_A_ID}/cases", json={"analyzer_id": "smear-all"}, headers=t).get_json()["id"]
    assert_error(c.post(f"/api/v1/cases/{cid}/images", data={}, headers=t, content_type="multipart/form-data"), 422)
    r = c.post(f"/api/v1/cases/{cid}/images", data={"images": (io.BytesIO(b"junk"), "x.jpg")}, headers=t,
               content_type="multipart/form-data")
    assert r.status_code == 422 and r.get_json()["errors"][0]["file"] == "x.jpg"
    c.post(f"/api/v1/cases/{cid}/images", data={"images": (io.BytesIO(png_bytes(3)), "ok.png")}, headers=t,
           content_type="multipart/form-data")
    while pool.run_one():
        pass
    case = c.get(f"/api/v1/cases/{cid}", headers=t).get_json()
    assert case["status"] == "ready" and case["images"][0]["job_status"] == "done"
    # generated images are out of domain: signing needs a note
    assert_error(c.post(f"/api/v1/cases/{cid}/sign", json={"final_diagnosis": "Benign"}, headers=t), 422)
    r = c.post(f"/api/v1/cases/{cid}/sign", json={"final_diagnosis": "Nondiagnostic", "override_reason": "no AI call",
                                                 "uncertainty_note": "not a smear"}, headers=t)
    assert r.status_code == 200 and r.get_json()["status"] == "signed"
    r = c.post(f"/api/v1/cases/{cid}/images", data={"images": (io.BytesIO(png_bytes(4)), "late.png")}, headers=t,
               content_type="multipart/form-data")
    assert_error(r, 409, "case_signed")


def test_unknown_paths_and_methods_are_json(app, tok):
    c = app.test_client()
    t = h(tok("doc_a"))
    assert_error(c.get("/api/v1/nothing-here", headers=t), 404, "not_found")
    assert_error(c.put(f"/api/v1/cases/{CASE_A_ID}", headers=t), 405, "method_not_allowed")
    assert_error(c.get("/api/v1/cases/999999", headers=t), 404, "not_found")


def test_openapi_document_matches_routes(app):
    c = app.test_client()
    doc = c.get("/api/v1/openapi.json").get_json()
    assert doc["openapi"].startswith("3.1")
    rules = {(r.rule.replace("<int:", "{").replace(">", "}"), m) for r in app.url_map.iter_rules()
             if r.rule.startswith("/api/v1/") and r.endpoint not in ("api.openapi_json", "api.docs")
             for m in r.methods - {"HEAD", "OPTIONS"}}
    documented = {("/api/v1" + p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
    assert rules == documented
    for p, ops in doc["paths"].items():
        for m, op in ops.items():
            for resp in op["responses"].values():
                for media in resp.get("content", {}).values():
                    ref = media["schema"].get("$ref")
                    if ref:
                        assert ref.split("/")[-1] in doc["components"]["schemas"]
    assert c.get("/api/v1/docs").status_code == 200


def test_csrf_not_required_for_api_but_token_is(app, tok):
    app.config["WTF_CSRF_ENABLED"] = True
    c = app.test_client()
    r = c.post("/api/v1/patients", json={"mrn": "CSRF-1", "family_name": "Token"}, headers=h(tok("doc_a")))
    assert r.status_code == 201


def test_fhir_and_hl7_exports_of_a_signed_case(app, tok, pool):
    from fhir.resources.R4B.bundle import Bundle

    c = app.test_client()
    t = h(tok("doc_a"))
    assert_error(c.get(f"/api/v1/cases/{CASE_A_ID}/fhir", headers=t), 409, "not_signed")
    r = c.post(f"/api/v1/cases/{CASE_A_ID}/sign", json={"final_diagnosis": "Nondiagnostic", "override_reason": "x",
                                                        "uncertainty_note": "generated test image"}, headers=t)
    assert r.status_code == 200, r.get_json()
    r = c.get(f"/api/v1/cases/{CASE_A_ID}/fhir", headers=t)
    assert r.status_code == 200 and r.mimetype == "application/fhir+json"
    bundle = Bundle.model_validate(r.get_json())
    kinds = {e.resource.get_resource_type() for e in bundle.entry}
    assert {"DiagnosticReport", "Patient", "Observation", "Media", "Device"} <= kinds
    msg = c.get(f"/api/v1/cases/{CASE_A_ID}/hl7", headers=t).get_data(as_text=True)
    assert msg.startswith("MSH|^~\\&|") and "ORU^R01" in msg
    assert c.get(f"/api/v1/cases/{CASE_A_ID}/fhir", headers=h(tok("doc_b"))).status_code == 404


def _mllp_listener(code="AA"):
    """A one-connection-at-a-time MLLP server answering every message with an ACK."""
    import socket
    import threading

    from oncoscope.reports.hl7v2 import ack_for

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(10)
    received = []

    def run():
        try:
            while True:
                conn, _ = srv.accept()
                with conn:
                    buf = b""
                    while b"\x1c\r" not in buf:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        buf += chunk
                    msg = buf.strip(b"\x0b").split(b"\x1c")[0].decode()
                    received.append(msg)
                    conn.sendall(b"\x0b" + ack_for(msg, code).encode() + b"\x1c\r")
        except OSError:
            pass

    threading.Thread(target=run, daemon=True).start()
    return srv, received


def test_dicom_sr_seg_and_hl7_send(make_app, tok, gate_off):
    import pydicom

    srv, received = _mllp_listener()
    try:
        app = make_app(hl7_host="127.0.0.1", hl7_port=srv.getsockname()[1])
        from oncoscope.services.jobs import WorkerPool

        ext = app.extensions["oncoscope"]
        pool = WorkerPool(ext["sessions"], ext["files"], 1, 3)
        c = app.test_client()
        s = sessions_of(app)()
        t, secret = token_store.create(s, s.get(User, ACCOUNTS["doc_a"].id), "t")
        s.commit()
        s.close()
        hh = h(secret)
        cid = c.post(f"/api/v1/patients/{PATIENT_A_ID}/cases", json={"analyzer_id": "smear-all"}, headers=hh).get_json()["id"]
        up = c.post(f"/api/v1/cases/{cid}/images", data={"images": (io.BytesIO(png_bytes(11)), "f.png")}, headers=hh,
                    content_type="multipart/form-data").get_json()
        while pool.run_one():
            pass
        case = c.get(f"/api/v1/cases/{cid}", headers=hh).get_json()
        assert case["images"][0]["cell_count"] is not None  # gate off: segmented
        assert_error(c.get(f"/api/v1/cases/{cid}/dicom-sr", headers=hh), 409, "not_signed")
        label = case["aggregate"]["label"]
        body = {"final_diagnosis": label}
        if case["aggregate"]["status"] != "ok":
            body["uncertainty_note"] = "test"
        assert c.post(f"/api/v1/cases/{cid}/sign", json=body, headers=hh).status_code == 200
        sr = c.get(f"/api/v1/cases/{cid}/dicom-sr", headers=hh)
        ds = pydicom.dcmread(io.BytesIO(sr.data))
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and ds.PatientID == "MRN-A-0001"
        seg = c.get(f"/api/v1/cases/{cid}/images/{up['added'][0]}/dicom-seg", headers=hh)
        assert seg.status_code == 200
        sds = pydicom.dcmread(io.BytesIO(seg.data))
        assert sds.Modality == "SEG"
        r = c.post(f"/api/v1/cases/{cid}/hl7/send", headers=hh)
        assert r.status_code == 200 and r.get_json()["sent"] is True
        assert len(received) == 1 and received[0].startswith("MSH|") and "ORU^R01" in received[0]
        # a second app without a destination refuses clearly
        app2 = make_app()
        s2 = sessions_of(app2)()
        _t2, secret2 = token_store.create(s2, s2.get(User, ACCOUNTS["doc_a"].id), "t2")
        s2.commit()
        s2.close()
        assert_error(app2.test_client().post(f"/api/v1/cases/{cid}/hl7/send", headers=h(secret2)), 409,
                     "hl7_not_configured")
    finally:
        srv.close()


def _dicom_bytes(patient_id: str, name: str = "Doe^Jane") -> bytes:
    from tests.imaging.test_dicom import colour, make_dicom, to_bytes

    ds = make_dicom(colour(64, 64), "RGB")
    ds.PatientID = patient_id
    ds.PatientName = name
    ds.PatientBirthDate = "19800203"
    ds.PatientSex = "F"
    return to_bytes(ds)


def test_dicom_upload_keeps_uids_and_refuses_another_patients_file(app, tok):
    c = app.test_client()
    t = h(tok("doc_a"))
    cid = c.post(f"/api/v1/patients/{PATIENT_A_ID}/cases", json={"analyzer_id": "smear-all"}, headers=t).get_json()["id"]
    other = c.post(f"/api/v1/cases/{cid}/images", data={"images": (io.BytesIO(_dicom_bytes("SOMEONE-ELSE")), "x.dcm")},
                   headers=t, content_type="multipart/form-data")
    assert other.status_code == 422 and "belongs to patient ID 'SOMEONE-ELSE'" in other.get_json()["errors"][0]["message"]
    ok = c.post(f"/api/v1/cases/{cid}/images", data={"images": (io.BytesIO(_dicom_bytes("MRN-A-0001")), "y.dcm")},
                headers=t, content_type="multipart/form-data")
    assert ok.status_code == 200 and len(ok.get_json()["added"]) == 1
    s = sessions_of(app)()
    from oncoscope.store.models import CaseImage

    img = s.get(CaseImage, ok.get_json()["added"][0])
    assert img.content_type == "DICOM" and img.dicom_study_uid and img.dicom_patient_id == "MRN-A-0001"
    s.close()


def test_new_patient_prefilled_from_dicom(app):
    from tests.web.conftest import DOC_A, login

    app.config["WTF_CSRF_ENABLED"] = False
    c = app.test_client()
    login(c, DOC_A)
    r = c.post("/patients/from-dicom", data={"dicom": (io.BytesIO(_dicom_bytes("NEW-777", "Kowalski^Anna")), "a.dcm")},
               content_type="multipart/form-data")
    assert r.status_code == 200
    html = r.data.decode()
    assert 'value="NEW-777"' in html and 'value="Kowalski"' in html and 'value="Anna"' in html
    assert 'value="1980-02-03"' in html
    r = c.post("/patients/from-dicom", data={"dicom": (io.BytesIO(png_bytes(1)), "a.png")},
               content_type="multipart/form-data")
    assert r.status_code == 302


@pytest.mark.parametrize("path", ["/patients/9223372036854775808", "/cases/99999999999999999999",
                                  "/cases/1/images/9223372036854775808/original.png"])
def test_ids_beyond_the_database_range_are_404_not_500(app, path):
    from tests.web.conftest import DOC_A, login

    c = app.test_client()
    login(c, DOC_A)
    assert c.get(path).status_code == 404


def test_idempotency_fingerprint_survives_nameless_form_fields(app, tok):
    c = app.test_client()
    t = dict(h(tok("doc_a")), **{"Idempotency-Key": "odd-form"})
    body = (b'--B\r\nContent-Disposition: form-data; name="\\\\"\r\n\r\nx\r\n'
            b'--B\r\nContent-Disposition: form-data; name="a"\r\n\r\ny\r\n'
            b'--B\r\nContent-Disposition: form-data; name="images"; filename="f.png"\r\n\r\n' + png_bytes(5) +
            b'\r\n--B--\r\n')
    r = c.post(f"/api/v1/cases/{CASE_A_ID}/images", data=body, headers=t, content_type="multipart/form-data; boundary=B")
    assert r.status_code < 500


def test_history_retry_and_assignment_endpoints(app, tok, pool, monkeypatch):
    from oncoscope.analyzers import registry

    c = app.test_client()
    doc, admin = h(tok("doc_a")), h(tok("admin"))
    r = c.get("/api/v1/cases?status=ready", headers=doc).get_json()
    assert all(x["status"] == "ready" for x in r["items"]) and {"page", "total"} <= set(r)
    assert_error(c.get("/api/v1/cases?from=yesterday", headers=doc), 400, "invalid_parameter")
    assert {x["id"] for x in c.get("/api/v1/cases", headers=h(tok("doc_b"))).get_json()["items"]}.isdisjoint({CASE_A_ID})
    # a failing analyzer -> failed job -> retry via the API
    cid = c.post(f"/api/v1/patients/{PATIENT_A_ID}/cases", json={"analyzer_id": "smear-all"}, headers=doc).get_json()["id"]
    iid = c.post(f"/api/v1/cases/{cid}/images", data={"images": (io.BytesIO(png_bytes(21)), "f.png")}, headers=doc,
                 content_type="multipart/form-data").get_json()["added"][0]
    an = registry.get("smear-all")
    monkeypatch.setattr(an, "analyze", lambda *_a, **_k: (_ for _ in ()).throw(RuntimeError("boom")))
    s = sessions_of(app)()
    from oncoscope.store.models import Analysis

    for _ in range(3):
        pool.run_one()
        a = s.query(Analysis).filter_by(image_id=iid).one()
        s.refresh(a)
        a.queued_at = dt.datetime(2000, 1, 1)
        s.commit()
    s.close()
    monkeypatch.undo()
    assert c.get(f"/api/v1/cases/{cid}", headers=doc).get_json()["images"][0]["job_status"] == "failed"
    r = c.post(f"/api/v1/cases/{cid}/images/{iid}/retry", headers=doc)
    assert r.status_code == 200 and r.get_json()["images"][0]["job_status"] == "retried"
    assert_error(c.post(f"/api/v1/cases/{cid}/images/{iid}/retry", headers=doc), 409, "not_failed")
    # assignment: admin only, and it changes what doctor B sees
    assert_error(c.put(f"/api/v1/patients/{PATIENT_A_ID}/doctors", json={"doctor_ids": [3]}, headers=doc), 403)
    r = c.put(f"/api/v1/patients/{PATIENT_A_ID}/doctors", json={"doctor_ids": [2, 3]}, headers=admin)
    assert r.status_code == 200 and r.get_json()["doctor_ids"] == [2, 3]
    assert c.get(f"/api/v1/patients/{PATIENT_A_ID}", headers=h(tok("doc_b"))).status_code == 200
    assert_error(c.put(f"/api/v1/patients/{PATIENT_A_ID}/doctors", json={"doctor_ids": ["x"]}, headers=admin), 422)


def test_an_idempotent_replay_rechecks_access_and_records_expire(app, tok):
    from sqlalchemy import update

    from oncoscope.store.models import IdempotencyRecord

    c = app.test_client()
    doc, admin = h(tok("doc_a")), h(tok("admin"))
    hk = dict(doc, **{"Idempotency-Key": "new-patient-1"})
    body = {"mrn": "IDEM-0001", "family_name": "Replay"}
    first = c.post("/api/v1/patients", json=body, headers=hk)
    assert first.status_code == 201
    pid = first.get_json()["id"]
    assert c.post("/api/v1/patients", json=body, headers=hk).headers.get("Idempotent-Replayed") == "true"
    # the administrator gives the patient to another doctor: the replay no longer shows it
    assert c.put(f"/api/v1/patients/{pid}/doctors", json={"doctor_ids": [ACCOUNTS["doc_b"].id]},
                 headers=admin).status_code == 200
    assert_error(c.get(f"/api/v1/patients/{pid}", headers=doc), 404)
    replay = c.post("/api/v1/patients", json=body, headers=hk)
    assert_error(replay, 404, "not_found")
    assert b"IDEM-0001" not in replay.data and b"Replay" not in replay.data
    # after the retention time a record is gone: the key may be used again
    with sessions_of(app)() as s:
        s.execute(update(IdempotencyRecord).values(created_at=dt.datetime(2000, 1, 1)))
        s.commit()
    again = c.post("/api/v1/patients", json={"mrn": "IDEM-0002", "family_name": "Later"}, headers=hk)
    assert again.status_code == 201 and "Idempotent-Replayed" not in again.headers
    with sessions_of(app)() as s:
        assert s.query(IdempotencyRecord).count() == 1  # the expired record was removed


def test_a_case_is_created_with_its_priority(app, tok):
    c = app.test_client()
    t = h(tok("doc_a"))
    made = c.post(f"/api/v1/patients/{PATIENT_A_ID}/cases", json={"analyzer_id": "smear-all", "priority": "stat"},
                  headers=t)
    assert made.status_code == 201 and made.get_json()["priority"] == "stat"
    assert c.get(f"/api/v1/cases/{made.get_json()['id']}", headers=t).get_json()["priority"] == "stat"
    bad = c.post(f"/api/v1/patients/{PATIENT_A_ID}/cases", json={"analyzer_id": "smear-all", "priority": "urgent"},
                 headers=t)
    assert bad.status_code == 422 and "priority" in bad.get_data(as_text=True)
    page = c.get(f"/cases/{made.get_json()['id']}")  # (the API client is not signed in: the page redirects)
    assert page.status_code == 302


# Every API route x the technologist (assigned to patient A) and the reviewer (consulted on case A by
# doctor A, no patient): the status an empty or harmless request gets. 403: the role may never do it
# (refused before any lookup); a consulted reviewer reads the case, not its patient.
STAFF_API = {  # (method, path): (tech, rev)
    ("GET", "/api/v1/analyzers"): (200, 200),
    ("GET", "/api/v1/patients"): (200, 200),
    ("POST", "/api/v1/patients"): (422, 403),
    ("GET", f"/api/v1/patients/{PATIENT_A_ID}"): (200, 404),
    ("PATCH", f"/api/v1/patients/{PATIENT_A_ID}"): (200, 403),  # nothing to change
    ("PUT", f"/api/v1/patients/{PATIENT_A_ID}/doctors"): (403, 403),
    ("GET", f"/api/v1/patients/{PATIENT_A_ID}/cases"): (200, 404),
    ("POST", f"/api/v1/patients/{PATIENT_A_ID}/cases"): (422, 403),
    ("GET", "/api/v1/cases"): (200, 200),
    ("GET", f"/api/v1/cases/{CASE_A_ID}"): (200, 200),
    ("DELETE", f"/api/v1/cases/{CASE_A_ID}"): (409, 403),
    ("POST", f"/api/v1/cases/{CASE_A_ID}/images"): (422, 403),
    ("POST", f"/api/v1/cases/{CASE_A_ID}/images/1/retry"): (409, 403),
    ("POST", f"/api/v1/cases/{CASE_A_ID}/sign"): (403, 403),
    ("GET", f"/api/v1/cases/{CASE_A_ID}/cells"): (409, 409),
    ("PATCH", f"/api/v1/cases/{CASE_A_ID}/cells"): (409, 403),
    ("POST", f"/api/v1/cases/{CASE_A_ID}/cells/undo"): (409, 403),
    ("GET", f"/api/v1/cases/{CASE_A_ID}/report.pdf"): (200, 200),
    ("GET", f"/api/v1/cases/{CASE_A_ID}/fhir"): (409, 409),
    ("GET", f"/api/v1/cases/{CASE_A_ID}/hl7"): (409, 409),
    ("GET", f"/api/v1/cases/{CASE_A_ID}/dicom-sr"): (409, 409),
    ("GET", f"/api/v1/cases/{CASE_A_ID}/images/1/dicom-seg"): (409, 409),
    ("POST", f"/api/v1/cases/{CASE_A_ID}/hl7/send"): (409, 403),
    ("POST", f"/api/v1/cases/{CASE_A_ID}/preliminary"): (422, 403),  # (no diagnosis sent)
    ("POST", f"/api/v1/cases/{CASE_A_ID}/second-read"): (403, 403),
    ("POST", f"/api/v1/cases/{CASE_A_ID}/cancel"): (422, 403),  # (no reason sent)
    ("GET", f"/api/v1/cases/{CASE_A_ID}/consults"): (200, 200),
    ("POST", f"/api/v1/cases/{CASE_A_ID}/consults"): (422, 403),  # (no question sent)
    ("GET", "/api/v1/consults/1"): (200, 200),
    ("POST", "/api/v1/consults/1/messages"): (403, 422),  # the technologist takes no part in it
    ("GET", "/api/v1/worklist?queue=consults"): (200, 200),
    ("GET", f"/api/v1/patients/{PATIENT_A_ID}/pacs/studies"): (409, 403),  # no PACS configured
    ("POST", f"/api/v1/patients/{PATIENT_A_ID}/pacs/retrieve"): (422, 403),
    ("GET", "/api/v1/dicom-inbox"): (200, 403),
    ("POST", f"/api/v1/cases/{CASE_A_ID}/deliveries/1/retry"): (404, 403),
    ("POST", "/api/v1/consults/1/close"): (403, 200),  # last: the reviewer's access ends here
}


def test_api_routes_for_the_technologist_and_the_reviewer(app, tok, staff):
    import re

    staff("tech")
    with sessions_of(app)() as s:
        from oncoscope.store import consults
        from oncoscope.store.models import Case

        from .conftest import REVIEWER, make_users

        rev = make_users(s, (REVIEWER,))["rev"]
        consults.ask(s, s.get(Case, CASE_A_ID), s.get(User, ACCOUNTS["doc_a"].id), rev.id, "Blast?")
        s.commit()
    rules = {(m, re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", r.rule)) for r in app.url_map.iter_rules()
             if r.rule.startswith("/api/v1/") and r.endpoint not in ("api.openapi_json", "api.docs")
             for m in r.methods & {"GET", "POST", "PATCH", "PUT", "DELETE"}}
    covered = {(m, re.sub(r"/\d+", "/{id}", p.split("?")[0])) for m, p in STAFF_API}
    assert {(m, re.sub(r"\{[^}]+\}", "{id}", p)) for m, p in rules} == covered
    c = app.test_client()
    tokens = {"tech": tok("tech"), "rev": tok("rev")}
    for (method, path), expected in STAFF_API.items():
        for who, want in zip(("tech", "rev"), expected):
            r = c.open(path, method=method, headers=h(tokens[who]), json={} if method in ("POST", "PATCH", "PUT") else None)
            assert r.status_code == want, f"{who} {method} {path}: {r.status_code} {r.data[:200]}"
