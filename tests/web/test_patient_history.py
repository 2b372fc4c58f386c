"""The patient page's history by analyzer (store/history.py): the patient's cases of each analyzer side
by side, latest first, with the blast % (smear differential) or the AI's probability of the positive
call, and a line of it over time. Cases are written with the ORM (known values, no analysis run)."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from oncoscope.analyzers import registry
from oncoscope.store import history
from oncoscope.store.models import Analysis, Case, CaseImage, Patient, Review, User

from .conftest import ACCOUNTS, CASE_A_ID, PATIENT_A_ID, PATIENT_B_ID


def analyzer_name(aid: str) -> str:
    return registry.get(aid).name


def _case(s, analyzer, day, status="ready", analysis=None, review=None, final=None) -> Case:
    c = Case(patient_id=PATIENT_A_ID, analyzer_id=analyzer, status=status, created_at=dt.datetime(2025, *day),
             final_diagnosis=final)
    s.add(c)
    s.flush()
    if analysis is not None:
        img = CaseImage(case_id=c.id, sha256=f"{c.id:064d}", width=8, height=8, size_bytes=1)
        s.add(img)
        s.flush()
        s.add(Analysis(image_id=img.id, analyzer_id=analyzer, job_status="done", **analysis))
    if review is not None:
        s.add(Review(case_id=c.id, version=1, final_diagnosis=final, agrees_with_ai=True,
                     signed_by_id=ACCOUNTS["doc_a"].id, signed_at=c.created_at + dt.timedelta(hours=2),
                     content_sha256="0" * 64, **review))
    return c


def _cells(blasts: int, others: int) -> list[dict]:
    return [{"class": "blast"}] * blasts + [{"class": "neutrophil"}] * others + [{"class": "blast", "counted": False}]


@pytest.fixture()
def cases(db):
    """Patient A: three smear-differential cases (signed 35 %, AI 20 %, cancelled), two bone-xray
    cases (signed at 80 %, unsigned at 30 %) and six more smear-all cases beside the seeded one."""
    ids = {
        "d_signed": _case(db, "smear-differential", (1, 10), "signed", final="blasts_present", review={
            "ai_label": "blasts_present", "ai_status": "ok",
            "differential": {"current": {"percentages": {"blast": 35.0, "neutrophil": 65.0}}}}),
        "d_ai": _case(db, "smear-differential", (2, 10), analysis={"result_status": "ok", "cells": _cells(2, 8)}),
        "d_cancelled": _case(db, "smear-differential", (3, 10), "cancelled",
                             analysis={"result_status": "ok", "cells": _cells(9, 1)}),
        "b_signed": _case(db, "bone-xray", (1, 5), "signed", final="normal", review={
            "ai_label": "cancer", "ai_status": "uncertain", "ai_call": {
                "label": "cancer", "status": "uncertain", "probabilities": {"cancer": 0.8, "normal": 0.2},
                "text": "", "n_used": 1, "n_total": 1}}),
        "b_ai": _case(db, "bone-xray", (2, 5), analysis={
            "result_status": "ok", "label": "normal", "malignant": False, "malignant_probability": 0.3,
            "probabilities": {"cancer": 0.3, "normal": 0.7}}),
    }
    for month in range(1, 7):
        _case(db, "smear-all", (month, 1))
    db.commit()
    return {k: c.id for k, c in ids.items()}


def test_the_timeline_groups_cases_by_analyzer_latest_first(db, cases):
    admin = db.get(User, ACCOUNTS["admin"].id)
    by = {h.analyzer_id: h for h in history.patient_timeline(db, admin, db.get(Patient, PATIENT_A_ID))}
    # the analyzer of the latest case first (the seeded smear-all case was created today)
    assert list(by) == ["smear-all", "smear-differential", "bone-xray"]
    sa = by["smear-all"]
    assert sa.cases[0].case_id == CASE_A_ID and len(sa.cases) == history.SHOWN and sa.older == 1
    assert sa.cases[0].ai_status == "out_of_domain" and sa.cases[0].value is None and sa.points == []
    d = by["smear-differential"]
    assert d.key == "blast_pct"
    assert [(e.case_id, e.value, e.value_from, e.report_state) for e in d.cases] == [
        (cases["d_cancelled"], 90.0, "AI", "cancelled"), (cases["d_ai"], 20.0, "AI", "open"),
        (cases["d_signed"], 35.0, "verified", "final")]
    assert [e.case_id for e in d.points] == [cases["d_signed"], cases["d_ai"]]  # oldest first, not the cancelled
    assert d.cases[1].ai_label == "blasts_present"  # 2 of 10 white cells: the AI's call, computed as the case page does
    assert (d.cases[2].final_diagnosis, d.cases[2].signed_at) == ("blasts_present", dt.datetime(2025, 1, 10, 2))
    b = by["bone-xray"]
    assert b.key == "probability" and b.positive_term
    assert [(e.ai_label, e.ai_status, e.value, e.final_diagnosis) for e in b.cases] == [
        ("normal", "ok", pytest.approx(0.3), None), ("cancer", "uncertain", pytest.approx(0.8), "normal")]
    assert [b.display(e.value) for e in b.cases] == ["30.0%", "80.0%"] and d.display(20.0) == "20.0%"


def test_only_cases_the_user_may_see(db, cases):
    doc_b = db.get(User, ACCOUNTS["doc_b"].id)
    assert history.patient_timeline(db, doc_b, db.get(Patient, PATIENT_A_ID)) == []
    own = history.patient_timeline(db, doc_b, db.get(Patient, PATIENT_B_ID))
    assert [(h.analyzer_id, len(h.cases)) for h in own] == [("smear-all", 1)]


def test_the_patient_page_compares_the_cases_side_by_side(client_for, cases):
    r = client_for("doc_a").get(f"/patients/{PATIENT_A_ID}")
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    sec = html[html.index("<h2>History by analyzer</h2>"):html.index("<h2>Timeline</h2>")]
    articles = dict(re.findall(r'<article class="history-analyzer">\s*<h3>(.*?)</h3>(.*?)</article>', sec, re.S))
    diff, bone = articles[analyzer_name("smear-differential")], articles[analyzer_name("bone-xray")]
    heads = re.findall(r'<th scope="col"><a href="/cases/(\d+)">', diff)
    assert heads == [str(cases[k]) for k in ("d_cancelled", "d_ai", "d_signed")]
    assert "<strong>35.0%</strong> <span class=\"muted\">verified</span>" in diff
    assert "<strong>20.0%</strong> <span class=\"muted\">AI</span>" in diff
    svg = re.search(r'<svg class="trend".*?</svg>', diff, re.S).group(0)
    assert svg.count("<circle") == 2 and "2025-01-10" in svg and "2025-02-10" in svg and "flag 1.0%" in svg
    assert "P(" in bone and "<strong>80.0%</strong>" in bone and "not signed" in bone
    assert "1 older case of this analyzer" in sec
