"""Tests for the ReportLab case report renderer (fast; images generated in-test)."""

from __future__ import annotations

import copy
import io
import re

import numpy as np
import pytest
from PIL import Image
from pypdf import PdfReader

from oncoscope.reports.pdf import render_case_report

from tests.reports.test_golden import golden  # noqa: F401 - fixture: fixed signed, non-diagnostic and draft cases

VALIDATION = (
    "Test split (n=417, slide-block held out): accuracy 100.0%, malignant sensitivity 100.0%, "
    "specificity 92.5%, ECE 0.010"
)
DISCLAIMER = (
    "AI output is decision support only. The final diagnosis is the responsibility of the signing physician."
)


def _png(seed: int, size: tuple[int, int] = (96, 72), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = 4 if mode == "RGBA" else 3
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def _image(i: int, status: str = "ok", messages: list[str] | None = None) -> dict:
    return {
        "title": f"Field {i} — WBC-{i:03d}.jpg",
        "original_png": _png(i),
        "cells_png": _png(100 + i, mode="RGBA"),
        "heatmap_png": _png(200 + i),
        "ai_label": "Malignant (Pro-B ALL)",
        "ai_status": status,
        "probabilities": {"Benign": 0.02, "Malignant (Pre-B ALL)": 0.13, "Malignant (Pro-B ALL)": 0.85},
        "cell_count": 17 + i,
        "messages": messages or [],
    }


def _data(n_images: int = 1, review: bool = True) -> dict:
    data = {
        "clinic": {"name": "Taleqani Hematology Lab", "address": "12 Example Street, Tehran"},
        "patient": {"name": "Jane Q. Doe", "mrn": "MRN-004217", "birth_date": "1980-02-29", "sex": "Female"},
        "case": {
            "id": 12,
            "created_at": "2026-11-21 14:02 UTC",
            "analyzer_name": "Blood smear (ALL)",
            "analyzer_id": "smear-all",
            "clinical_note": "Fatigue, bruising; CBC shows lymphocytosis.",
        },
        "model": {
            "id": "smear-all",
            "version": "1.3.0",
            "sha256": "ab12cd34ef56ab78cd90ef12ab34cd56ef78ab90cd12ef34ab56cd78ef90ab12",
            "validation_summary": VALIDATION,
        },
        "images": [_image(i) for i in range(1, n_images + 1)],
        "aggregate": {"ai_label": "Malignant (Pro-B ALL)", "ai_status": "ok", "text": "All fields agree."},
        "review": {
            "version": 2,
            "final_diagnosis": "B-lymphoblastic leukemia (Pro-B)",
            "agrees_with_ai": True,
            "override_reason": "",
            "uncertainty_note": "",
            "comment": "Confirm with flow cytometry.",
            "signed_by": "Dr. Sara Ahmadi",
            "signed_at": "2026-11-22 06:15 UTC",
            "amendment_reason": "Corrected subtype after second read.",
            "previous_versions": [
                {"version": 1, "final_diagnosis": "B-ALL (Pre-B)", "signed_by": "Dr. Sara Ahmadi",
                 "signed_at": "2026-11-21 18:40 UTC"},
            ],
        } if review else None,
        "disclaimer": DISCLAIMER,
        "generated_note": "Report for case 12, version 2",
    }
    return data


def _pages_text(pdf: bytes) -> list[str]:
    reader = PdfReader(io.BytesIO(pdf))
    return [page.extract_text() or "" for page in reader.pages]


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_signed_report_contains_key_facts():
    pdf = render_case_report(_data())
    assert pdf.startswith(b"%PDF-")
    pages = _pages_text(pdf)
    text = _flat("\n".join(pages))
    for needle in (
        "Jane Q. Doe", "MRN-004217", "B-lymphoblastic leukemia (Pro-B)", "Dr. Sara Ahmadi",
        "2026-11-22 06:15 UTC", "1.3.0", VALIDATION, "Page 1 of", DISCLAIMER,
        "Laboratory report", "Taleqani Hematology Lab", "ab12cd34ef56ab78",
        "Confirm with flow cytometry.", "Corrected subtype after second read.", "B-ALL (Pre-B)",
        "85.0%", "Field 1 — WBC-001.jpg",
    ):
        assert needle in text, needle
    # sha256 is shortened to 16 hex characters
    assert "ab12cd34ef56ab78cd" not in text
    assert "DRAFT" not in text


def test_draft_is_marked():
    text = _flat("\n".join(_pages_text(render_case_report(_data(review=False)))))
    assert "DRAFT" in text
    assert "NOT SIGNED" in text
    assert "Jane Q. Doe" in text


@pytest.mark.parametrize("status", ["uncertain", "out_of_domain", "error"])
def test_non_ok_image_shows_warning_and_messages(status):
    data = _data()
    data["images"][0] = _image(1, status=status, messages=["Top-2 margin 0.04 below threshold 0.10"])
    text = _flat("\n".join(_pages_text(render_case_report(data))))
    assert "WARNING" in text
    assert "Top-2 margin 0.04 below threshold 0.10" in text


def test_a_draft_printed_before_the_analyses_ended_says_so():
    data = _data(review=False)
    data["images"][0] = _image(1, status="pending", messages=[])
    text = _flat("\n".join(_pages_text(render_case_report(data))))
    assert "NOT YET ANALYSED" in text and "had not finished when this draft was printed" in text
    assert "Unrecognised" not in text


def test_missing_images_and_fields_are_tolerated():
    data = _data()
    img = data["images"][0]
    img.update(cells_png=None, heatmap_png=None, ai_label=None, cell_count=None, probabilities={})
    data["images"].append({**_image(2), "original_png": b"not a png"})
    data["patient"]["birth_date"] = None
    data["clinic"]["address"] = ""
    text = _flat("\n".join(_pages_text(render_case_report(data))))
    assert "not available" in text
    assert "could not be decoded" in text


def test_the_signed_diagnosis_is_on_the_first_page_however_many_images():
    """An 80-slice MR study put the physician's review on page 41 of 43 (a new-user walk, 2026-12-05)."""
    data = _data(n_images=12)
    pages = [_flat(t) for t in _pages_text(render_case_report(data))]
    assert len(pages) > 4
    first = pages[0]
    assert "Physician review" in first and data["review"]["final_diagnosis"] in first
    assert "Aggregate AI call" in first and "AI result per image" not in first


def test_many_images_paginate_with_correct_totals():
    pdf = render_case_report(_data(n_images=6))
    pages = _pages_text(pdf)
    n = len(pages)
    assert n > 1
    for i, page in enumerate(pages, start=1):
        assert f"Page {i} of {n}" in page
        assert "Laboratory report" in page
        assert "Case 12" in page


def test_long_comment_flows_over_pages():
    data = _data()
    data["review"]["comment"] = "\n".join(f"Line {i}: " + "word " * 30 for i in range(200))
    pages = _pages_text(render_case_report(data))
    assert len(pages) > 3
    assert "Line 199:" in _flat("\n".join(pages))


def test_output_is_byte_identical():
    data = _data(n_images=2)
    first = render_case_report(data)
    second = render_case_report(copy.deepcopy(data))
    assert first == second
    draft = _data(review=False)
    assert render_case_report(draft) == render_case_report(copy.deepcopy(draft))


def test_hostile_text_is_escaped_not_interpreted():
    data = _data()
    data["patient"]["name"] = "Zoë Ångström 李"
    data["review"]["comment"] = "<script>alert(1)</script> <b>bold?</b> Tom & Jerry &amp; co <para> </br"
    data["review"]["final_diagnosis"] = "ALL <unclosed & \"quoted\""
    data["case"]["clinical_note"] = "line1\nline2 <i>x</i>\x00\x07"
    data["images"][0]["title"] = "<font size=40>big</font>"
    data["images"][0]["messages"] = ["<b>not bold</b> & more"]
    data["images"][0]["ai_status"] = "uncertain"
    pdf = render_case_report(data)
    text = _flat("\n".join(_pages_text(pdf)))
    assert "<script>alert(1)</script>" in text
    assert "<b>bold?</b>" in text
    assert "Tom & Jerry &amp; co" in text
    assert 'ALL <unclosed & "quoted"' in text
    assert "<i>x</i>" in text
    assert "<font size=40>big</font>" in text
    assert "<b>not bold</b> & more" in text
    assert "Zoë" in text and "Ångström" in text  # CJK may not be drawable in Helvetica


def test_footer_total_matches_page_count_on_single_page():
    data = _data()
    data["images"] = []
    pdf = render_case_report(data)
    pages = _pages_text(pdf)
    n = len(pages)
    assert re.search(rf"Page 1 of {n}\b", pages[0])


def test_an_out_of_domain_image_shows_no_class_probabilities(tmp_path):
    """The model's class scores for an image it does not recognise are not a finding: the report
    must not print them (the case page does not either)."""
    import datetime as dt

    from pypdf import PdfReader

    from oncoscope.reports.case_report import case_report_pdf
    from oncoscope.store import migrate
    from oncoscope.store.db import make_engine, make_session_factory
    from oncoscope.store.files import FileStore
    from oncoscope.store.models import Analysis, Case, CaseImage, Patient

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    with make_session_factory(engine)() as s:
        p = Patient(mrn="OOD-1", family_name="Doe")
        s.add(p)
        s.flush()
        c = Case(patient_id=p.id, analyzer_id="smear-all", status="ready", created_at=dt.datetime(2026, 1, 1))
        s.add(c)
        s.flush()
        img = CaseImage(case_id=c.id, sha256="0" * 64, original_filename="x.png", width=64, height=64, size_bytes=1)
        s.add(img)
        s.flush()
        s.add(Analysis(image_id=img.id, analyzer_id="smear-all", job_status="done", result_status="out_of_domain",
                       probabilities={"Benign": 0.1, "Early": 0.2, "Pre": 0.3, "Pro": 0.4}, messages=["not a smear"]))
        s.flush()
        s.refresh(c)
        text = "".join(pg.extract_text() for pg in PdfReader(io.BytesIO(
            case_report_pdf(c, FileStore(tmp_path / "images"), "Clinic"))).pages)
    engine.dispose()
    assert "No class probabilities available." in text and "40.0%" not in text


# ----------------------------------------------------------------------------- appendix: about this diagnosis
ABOUT = [{"name": "Pro-B ALL", "role": "signed diagnosis", "summary": "Lymphoblasts of B-ALL <b>not bold</b>.",
          "confirmation": "Flow cytometry & bone marrow.", "referral": "Same-day discussion with haematology.",
          "references": [{"text": "Alaggio R, et al. Leukemia. 2022;36(7):1720–1748.",
                          "url": "https://doi.org/10.1038/s41375-022-01620-2"}, {"text": "A book \"quoted\"."}]}]


def _pdftotext(pdf: bytes, tmp_path) -> list[str]:
    """The pages' text as poppler's pdftotext reads it (pages split on form feeds)."""
    import shutil
    import subprocess

    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext (poppler-utils) not installed")
    path = tmp_path / "report.pdf"
    path.write_bytes(pdf)
    out = subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, check=True).stdout
    return [page for page in out.split("\f") if page.strip()]


def test_the_appendix_page_explains_the_diagnosis(tmp_path):
    plain = _pdftotext(render_case_report(_data()), tmp_path)
    pages = _pdftotext(render_case_report(dict(_data(), about=ABOUT)), tmp_path)
    assert len(pages) == len(plain) + 1 and "About this diagnosis" not in "".join(plain)
    last = _flat(pages[-1])
    assert "Appendix: About this diagnosis" in last and "Pro-B ALL (signed diagnosis)" in last
    for heading, text in (("What it means", "Lymphoblasts of B-ALL <b>not bold</b>."),
                          ("What usually confirms it", "Flow cytometry & bone marrow."),
                          ("When to refer", "Same-day discussion with haematology."), ("References", "")):
        assert f"{heading} {text}".strip() in last, heading
    assert "1. Alaggio R, et al. Leukemia. 2022;36(7):1720–1748. https://doi.org/10.1038/s41375-022-01620-2" in last
    assert '2. A book "quoted".' in last
    assert f"Page {len(pages)} of {len(pages)}" in last and "Case 12" in last  # the page furniture


def test_the_report_appendix_follows_the_signed_diagnosis(golden, tmp_path):
    """Signed and overriding the AI: both classes, the signed one first; signed non-diagnostic: the shared
    entry; a draft: the AI's call; an analyzer no longer installed: no appendix."""
    from oncoscope.reports.case_report import build_report_data, case_report_pdf

    an = golden.analyzer

    def about(case):
        return [(e["name"], e["role"]) for e in build_report_data(case, golden.store, "Clinic")["about"]]

    assert about(golden.a) == [("Pro-B ALL", "signed diagnosis"),
                               ("Pre-B ALL", "AI suggestion, not the signed diagnosis")]
    assert about(golden.b) == [("Non-diagnostic sample", "signed diagnosis")]
    assert about(golden.c) == [("Benign (hematogone)", "AI suggestion, not signed")]
    assert about(golden.d) == []
    last = _flat(_pdftotext(case_report_pdf(golden.a, golden.store, "Clinic"), tmp_path)[-1])
    pro, pre = an.class_info("Pro"), an.class_info("Pre")
    assert last.index("Pro-B ALL (signed diagnosis)") < last.index("Pre-B ALL (AI suggestion, not the signed")
    for info in (pro, pre):
        assert _flat(info.summary) in last and _flat(info.referral) in last
    assert all(_flat(r.text) in last for r in pro.references)
    d = "".join(_pdftotext(case_report_pdf(golden.d, golden.store, "Clinic"), tmp_path))
    assert "About this diagnosis" not in d
