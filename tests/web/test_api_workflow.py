"""The report workflow through the API: preliminary result, first reading, a blinded second reading,
consults (with a region), cancelling and the worklists; the same rules and one audit entry per
transition as the pages."""

from __future__ import annotations

from sqlalchemy import select

from oncoscope.store.models import AuditEvent, CaseImage, Review

from .conftest import ACCOUNTS, PATIENT_A_ID, REVIEWER, make_users, one, q, sessions_of
from .test_flows import analysed_case

P = PATIENT_A_ID


def _h(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _actions(app, after: int) -> list[str]:
    return [a for (a,) in q(app, select(AuditEvent.action).where(AuditEvent.seq > after).order_by(AuditEvent.seq))]


def _seq(app) -> int:
    return one(app, select(AuditEvent.seq).order_by(AuditEvent.seq.desc()).limit(1)) or 0


def _assign(app, *keys: str) -> None:
    from oncoscope.store import patients as patient_store
    from oncoscope.store.models import Patient

    with sessions_of(app)() as s:
        patient_store.set_doctors(s, s.get(Patient, P), [ACCOUNTS[k].id for k in keys])
        s.commit()


def test_preliminary_first_reading_blinded_second_reading_and_consult(app, client_for, tok, staff, gate_off):
    staff("tech")
    _assign(app, "doc_a", "doc_b", "tech")
    with sessions_of(app)() as s:
        make_users(s, (REVIEWER,))
    assert client_for("admin").post("/admin/workflow", data={"policy-smear-all": "always"}).status_code == 302
    c = app.test_client()
    tech, doc_a, doc_b, rev = (_h(tok(k)) for k in ("tech", "doc_a", "doc_b", "rev"))
    cid = analysed_case(app, client_for("tech"), 21)
    labels = next(a["labels"] for a in c.get("/api/v1/analyzers", headers=tech).json["items"] if a["id"] == "smear-all")
    wl = c.get("/api/v1/worklist?queue=prepare", headers=tech).json
    assert cid in [x["case_id"] for x in wl["items"]] and set(wl["counts"]) == {"prepare", "consults"}

    # technologist: a preliminary result, not a signature; an unknown class names the field
    assert c.post(f"/api/v1/cases/{cid}/sign", headers=tech, json={"final_diagnosis": labels[0]}).status_code == 403
    r = c.post(f"/api/v1/cases/{cid}/preliminary", headers=tech, json={"diagnosis": "no such class"})
    assert r.status_code == 422 and r.json["error"]["field"] == "diagnosis"
    seq = _seq(app)
    r = c.post(f"/api/v1/cases/{cid}/preliminary", headers=tech, json={"diagnosis": labels[0], "comment": "blasts?"})
    assert r.status_code == 200, r.json
    assert _actions(app, seq) == ["case.preliminary"]
    assert r.json["report_state"] == "preliminary" and r.json["readings"][0]["kind"] == "preliminary"
    stale = r.json["revision"] - 1
    r = c.post(f"/api/v1/cases/{cid}/preliminary", headers=tech, json={"diagnosis": labels[0], "revision": stale})
    assert r.status_code == 409

    # doctor A signs: the policy makes it the first reading
    r = c.post(f"/api/v1/cases/{cid}/sign", headers=doc_a, json={"final_diagnosis": labels[0],
               "override_reason": "by eye", "uncertainty_note": "by eye"})
    assert r.status_code == 200, r.json
    assert r.json["status"] == "second_read" and r.json["reviews"] == []
    assert [x["kind"] for x in r.json["readings"]] == ["preliminary", "first"]  # the first reader sees theirs

    # doctor B is blinded until committing: the case shows no first reading
    got = c.get(f"/api/v1/cases/{cid}", headers=doc_b).json
    assert [x["kind"] for x in got["readings"]] == ["preliminary"]
    assert cid in [x["case_id"] for x in c.get("/api/v1/worklist?queue=second-read", headers=doc_b).json["items"]]
    assert c.post(f"/api/v1/cases/{cid}/second-read", headers=doc_a, json={"diagnosis": labels[0]}).status_code == 409

    # doctor B asks the reviewer about a region; the reviewer answers; doctor B closes it
    image_id = one(app, select(CaseImage.id).where(CaseImage.case_id == cid))
    assert c.get(f"/api/v1/cases/{cid}", headers=rev).status_code == 404
    bad = c.post(f"/api/v1/cases/{cid}/consults", headers=doc_b,
                 json={"question": "Blast?", "image_id": image_id, "region": [0, 0, 10**6, 10]})
    assert bad.status_code == 422 and bad.json["error"]["field"] == "region"
    bad = c.post(f"/api/v1/cases/{cid}/consults", headers=doc_b, json={"question": "Blast?", "cell_ids": [999999]})
    assert bad.status_code == 422 and bad.json["error"]["field"] == "cell_ids"
    seq = _seq(app)
    r = c.post(f"/api/v1/cases/{cid}/consults", headers=doc_b, json={
        "consultant_id": ACCOUNTS["rev"].id, "question": "Blast or not?", "image_id": image_id,
        "region": [2, 3, 20, 10]})
    assert r.status_code == 201, r.json
    assert _actions(app, seq) == ["consult.ask"]
    k = r.json["id"]
    assert r.json["region"] == [2, 3, 20, 10] and r.json["status"] == "open"
    assert c.get(f"/api/v1/cases/{cid}", headers=rev).status_code == 200  # that case only
    assert c.get(f"/api/v1/patients/{P}", headers=rev).status_code == 404
    assert [x["consult_id"] for x in c.get("/api/v1/worklist?queue=consults", headers=rev).json["items"]] == [k]
    assert c.post(f"/api/v1/consults/{k}/messages", headers=tech, json={"body": "me too"}).status_code == 403
    seq = _seq(app)
    r = c.post(f"/api/v1/consults/{k}/messages", headers=rev, json={"body": "A myeloblast."})
    assert r.status_code == 200 and r.json["messages"][-1]["body"] == "A myeloblast."
    assert c.post(f"/api/v1/consults/{k}/close", headers=tech).status_code == 403
    assert c.post(f"/api/v1/consults/{k}/close", headers=doc_b).json["status"] == "closed"
    assert c.post(f"/api/v1/consults/{k}/close", headers=doc_b).status_code == 409
    assert _actions(app, seq) == ["consult.answer"] + ["consult.close"] * 3  # (refused, closed, refused)
    assert c.get(f"/api/v1/cases/{cid}", headers=rev).status_code == 404  # access ended

    # doctor B's own reading agrees: final, signed by A and confirmed by B; both readings now shown
    seq = _seq(app)
    r = c.post(f"/api/v1/cases/{cid}/second-read", headers=doc_b, json={"diagnosis": labels[0]})
    assert r.status_code == 200, r.json
    assert _actions(app, seq) == ["case.second_read"]
    assert r.json["report_state"] == "final" and [x["to"] for x in r.json["transitions"]] == [
        "preliminary", "second_read", "final"]
    assert q(app, select(Review.signed_by_id, Review.second_reader_id, Review.second_agrees)
             .where(Review.case_id == cid)) == [(ACCOUNTS["doc_a"].id, ACCOUNTS["doc_b"].id, True)]
    assert c.post(f"/api/v1/cases/{cid}/second-read", headers=doc_b, json={"diagnosis": labels[0]}).status_code == 409


def test_cancel_needs_a_reason_and_nothing_to_read(app, tok):
    c, doc_a = app.test_client(), _h(tok("doc_a"))
    r = c.post("/api/v1/cases/1/cancel", headers=doc_a, json={"reason": " "})
    assert r.status_code == 422 and r.json["error"]["field"] == "reason"
    r = c.post("/api/v1/cases/1/cancel", headers=doc_a, json={"reason": "smear unreadable"})
    assert r.status_code == 200 and r.json["report_state"] == "cancelled"
    assert r.json["cancel_reason"] == "smear unreadable"
    assert c.post("/api/v1/cases/1/cancel", headers=doc_a, json={"reason": "again"}).status_code == 409


def test_worklist_rejects_unknown_queues_and_sorts(app, tok):
    c, doc_a = app.test_client(), _h(tok("doc_a"))
    assert c.get("/api/v1/worklist", headers=doc_a).json["error"]["field"] == "queue"
    assert c.get("/api/v1/worklist?queue=everything", headers=doc_a).status_code == 400
    assert c.get("/api/v1/worklist?queue=verify&sort=random", headers=doc_a).json["error"]["field"] == "sort"
    got = c.get("/api/v1/worklist?queue=verify&sort=tat&per_page=5", headers=doc_a).json
    assert got["per_page"] == 5 and set(got["counts"]) == {"verify", "second-read", "consults"}
