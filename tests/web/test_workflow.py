"""The report workflow through the pages: technologist -> doctor -> second reader (blinded) ->
consult -> final -> corrected, the worklists and their counts, preliminary release, cancelling,
and one audit entry per transition."""

from __future__ import annotations

import re

from sqlalchemy import select

from oncoscope.store.models import AuditEvent, Case, CaseImage, CaseTransition, Review, User

from .conftest import ACCOUNTS, PATIENT_A_ID, one, q, sessions_of
from .test_flows import analysed_case, field_errors, flashes, sign

P = PATIENT_A_ID


def _actions(app, after: int) -> list[str]:
    return [a for (a,) in q(app, select(AuditEvent.action).where(AuditEvent.seq > after).order_by(AuditEvent.seq))]


def _seq(app) -> int:
    return one(app, select(AuditEvent.seq).order_by(AuditEvent.seq.desc()).limit(1)) or 0


def _policy(client, **policies):
    data = {f"policy-{k.replace('_', '-')}": v for k, v in policies.items()}
    return client.post("/admin/workflow", data=data)


def test_technologist_doctor_second_reader_consult_final_corrected(app, client_for, staff, gate_off):
    staff("tech")
    tech, doc_a, doc_b, admin = (client_for(k) for k in ("tech", "doc_a", "doc_b", "admin"))
    with sessions_of(app)() as s:  # doctor B reads patient A's cases too (the second reader)
        from oncoscope.store import patients as patient_store
        from oncoscope.store.models import Patient

        patient_store.set_doctors(s, s.get(Patient, P), [ACCOUNTS[k].id for k in ("doc_a", "doc_b", "tech")])
        s.commit()
    assert _policy(admin, smear_all="always").status_code == 302
    cid = analysed_case(app, tech, 11)
    ai = one(app, select(Case.ai_flag).where(Case.id == cid))
    assert ai is not None  # the worklist's flag was kept when the analysis ended
    assert f'href="/cases/{cid}?wl=prepare"'.encode() in tech.get("/worklist/prepare").data

    # the technologist cannot sign, writes a preliminary result
    assert sign(tech, cid, final_diagnosis="Pre").status_code == 403
    seq = _seq(app)
    r = tech.post(f"/cases/{cid}/preliminary", data={"diagnosis": "Pre", "comment": "many blasts?"})
    assert r.status_code == 302
    assert _actions(app, seq) == ["case.preliminary"]
    page = doc_a.get(f"/cases/{cid}?wl=verify").data.decode()
    assert "Preliminary" in page and "many blasts?" in page
    assert re.search(r'<option selected value="Pre">|<option value="Pre" selected', page)  # pre-filled
    assert f'/cases/{cid}?wl=verify'.encode() in doc_a.get("/worklist/verify").data

    # doctor A signs: the policy makes it the first reading
    seq = _seq(app)
    r = sign(doc_a, cid, final_diagnosis="Pre", override_reason="reviewed by eye", uncertainty_note="reviewed by eye")
    assert r.status_code == 302, re.findall(r'<p class="error"[^>]*>(.*?)</p>', r.data.decode())
    assert _actions(app, seq) == ["case.sign"]
    assert "second doctor" in " ".join(flashes(doc_a.get(f"/cases/{cid}").data))
    assert one(app, select(Case.status).where(Case.id == cid)) == "second_read"
    assert one(app, select(Review.id).where(Review.case_id == cid)) is None

    # doctor B reads blind: the first reading is not on the page
    blind = doc_b.get(f"/cases/{cid}").data.decode()
    assert "Second reading" in blind and "Commit my reading" in blind and "reviewed by eye" not in blind
    assert 'id="readings-h"' not in blind
    assert f"/cases/{cid}?wl=second-read".encode() in doc_b.get("/worklist/second-read").data
    assert f"/cases/{cid}?wl=second-read".encode() not in doc_a.get("/worklist/second-read").data

    # doctor B asks a reviewer about a region, the reviewer answers, doctor B closes it
    with sessions_of(app)() as s:
        from tests.web.conftest import REVIEWER, make_users

        make_users(s, (REVIEWER,))
    rev = client_for("rev")
    assert rev.get(f"/cases/{cid}").status_code == 404  # not yet consulted
    image_id = one(app, select(CaseImage.id).where(CaseImage.case_id == cid))
    seq = _seq(app)
    r = doc_b.post(f"/cases/{cid}/consults", data={"consultant_id": str(ACCOUNTS["rev"].id), "question": "Blast or not?",
                                                  "image_id": str(image_id), "region": "10,10,40,30"})
    assert r.status_code == 302, r.data[:3000]
    assert _actions(app, seq) == ["consult.ask"]
    consult_url = r.headers["Location"]
    assert rev.get(f"/cases/{cid}").status_code == 200 and b"You were consulted" in rev.get(f"/cases/{cid}").data
    assert rev.get(f"/patients/{P}").status_code == 404  # the case only
    assert sign(rev, cid, final_diagnosis="Pre").status_code == 403
    assert "/consults/".encode() in rev.get("/worklist/consults").data
    seq = _seq(app)
    assert rev.post(f"{consult_url}/messages", data={"body": "A myeloblast."}).status_code == 302
    assert _actions(app, seq) == ["consult.answer"]
    assert b"A myeloblast." in doc_b.get(consult_url).data
    seq = _seq(app)
    assert doc_b.post(f"{consult_url}/close").status_code == 302
    assert _actions(app, seq) == ["consult.close"]
    assert rev.get(f"/cases/{cid}").status_code == 404  # access ended with the consult

    # doctor B commits the same reading: final, signed by A, confirmed by B
    seq = _seq(app)
    r = doc_b.post(f"/cases/{cid}/second-read", data={"diagnosis": "Pre", "confirm": "y"})
    assert r.status_code == 302
    assert _actions(app, seq) == ["case.second_read"]
    row = q(app, select(Review.version, Review.signed_by_id, Review.second_reader_id, Review.second_agrees)
            .where(Review.case_id == cid))
    assert row == [(1, ACCOUNTS["doc_a"].id, ACCOUNTS["doc_b"].id, True)]
    page = doc_a.get(f"/cases/{cid}").data.decode()
    assert "report final" in page and "Report history" in page

    # an amendment corrects it; the exports say so
    seq = _seq(app)
    r = sign(doc_a, cid, final_diagnosis="Pro", uncertainty_note="x",  # (as the AI said: no override reason)
             amendment_reason="re-read after the consult")
    assert r.status_code == 302
    assert _actions(app, seq) == ["case.sign"]
    hl7 = doc_a.get(f"/cases/{cid}/export/hl7").data.decode()
    obr = next(seg for seg in hl7.split("\r") if seg.startswith("OBR"))
    assert obr.split("|")[25] == "C"
    states = [t for (t,) in q(app, select(CaseTransition.to_state).where(CaseTransition.case_id == cid).order_by(CaseTransition.id))]
    assert states == ["preliminary", "second_read", "final", "corrected"]


def test_preliminary_result_leaves_only_when_the_admin_releases_it(app, client_for, staff, gate_off):
    staff("tech")
    tech, doc_a, admin = client_for("tech"), client_for("doc_a"), client_for("admin")
    cid = analysed_case(app, tech, 12)
    assert tech.post(f"/cases/{cid}/preliminary", data={"diagnosis": "Early"}).status_code == 302
    assert doc_a.get(f"/cases/{cid}/export/hl7").status_code == 302  # refused: back to the case
    assert admin.post("/admin/workflow", data={"release_preliminary": "y"}).status_code == 302
    r = doc_a.get(f"/cases/{cid}/export/hl7")
    assert r.status_code == 200
    segs = r.data.decode().split("\r")
    obr = next(seg for seg in segs if seg.startswith("OBR"))
    assert obr.split("|")[25] == "P"
    assert all(seg.split("|")[11] == "P" for seg in segs if seg.startswith("OBX"))
    fhir = doc_a.get(f"/cases/{cid}/export/fhir").json
    report = next(e["resource"] for e in fhir["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    assert report["status"] == "preliminary"
    assert doc_a.get(f"/cases/{cid}/export/dicom-sr").status_code == 302  # the SR is for signed reports


def test_cancel_needs_a_reason_and_an_empty_or_failed_case(app, client_for):
    c = client_for("doc_a")
    r = c.post("/cases/1/cancel", data={"reason": ""})
    assert r.status_code == 400
    seq = _seq(app)
    r = c.post("/cases/1/cancel", data={"reason": "smear unreadable; redrawn"})  # out of domain: nothing to read
    assert r.status_code == 302
    assert _actions(app, seq) == ["case.cancel"]
    assert q(app, select(Case.status, Case.cancel_reason).where(Case.id == 1)) == [("cancelled",
                                                                                   "smear unreadable; redrawn")]
    page = c.get("/cases/1").data.decode()
    assert "Cancelled: smear unreadable; redrawn" in page and "Add images" not in page
    assert b"#1" not in c.get("/worklist/verify").data


def test_nav_shows_the_users_queues_with_counts(app, client_for, staff):
    staff("tech")
    nav = lambda html: dict(re.findall(rb'data-queue="([a-z-]+)">[^<]*<span class="count[^"]*" aria-label="(\d+) waiting"', html))  # noqa: E731
    assert nav(client_for("doc_a").get("/").data) == {b"verify": b"1", b"second-read": b"0", b"consults": b"0"}
    assert nav(client_for("tech").get("/").data) == {b"prepare": b"1", b"consults": b"0"}


def test_worklist_sorts_and_rejects_unknown_queues(app, client_for):
    c = client_for("doc_a")
    for sort in ("priority", "ai", "age", "tat", "nonsense"):
        assert c.get(f"/worklist/verify?sort={sort}").status_code == 200
    assert c.get("/worklist/everything").status_code == 404


def test_admin_workflow_settings_refuse_unknown_policies(app, client_for):
    admin = client_for("admin")
    r = _policy(admin, smear_all="sometimes")
    assert r.status_code == 200 and "Choose a policy" in " ".join(flashes(r.data))
    assert _policy(admin, smear_all="positive").status_code == 302
    assert b'value="positive" selected' in admin.get("/admin/workflow").data
    assert one(app, select(User.role).where(User.id == ACCOUNTS["admin"].id)) == "admin"
