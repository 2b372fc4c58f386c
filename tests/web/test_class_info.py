"""Class pages: what each analyzer's classes mean, what usually confirms them and when to refer, linked
from the analyzer page and beside the AI result and the signed diagnosis on the case page."""

from __future__ import annotations

import pytest

from oncoscope.analyzers import registry
from oncoscope.ml import synthetic

from .conftest import pool_for
from .test_flows import case_id_of, sign
from .test_radiology_flow import new_case, png

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_every_described_class_has_its_page(client_for):
    c = client_for("doc_a")
    for aid in registry.available():
        an = registry.get(aid)
        assert an.described_classes
        analyzer_page = c.get(f"/analyzers/{aid}").data.decode()
        assert "About each class" in analyzer_page
        for label in an.described_classes:
            assert f'href="/analyzers/{aid}/classes/{label}"' in analyzer_page, (aid, label)
            r = c.get(f"/analyzers/{aid}/classes/{label}")
            assert r.status_code == 200, (aid, label)
            page = r.data.decode()
            info = an.class_info(label)
            for heading in ("What it means", "What usually confirms it", "When to refer", "References"):
                assert f"<h2>{heading}</h2>" in page
            assert an.name in page and "to be confirmed by a qualified person" in page
            for ref in info.references:
                if ref.url:
                    assert f'<a href="{ref.url}" rel="noopener noreferrer">' in page


def test_a_cell_class_page_and_unknown_classes(client_for):
    c = client_for("doc_b")
    if "smear-differential" in registry.available():
        page = c.get("/analyzers/smear-differential/classes/blast").data.decode()
        assert "<h1>Blast (cell class)</h1>" in page and "Auer rods" in page
        assert c.get("/analyzers/smear-differential/classes/neutrophil").status_code == 404  # not described
    page = c.get("/analyzers/brain-mri/classes/Nondiagnostic").data.decode()
    assert "<h1>Non-diagnostic sample</h1>" in page and "neither a negative nor a positive result" in page
    for path in ("/analyzers/brain-mri/classes/Glioma", "/analyzers/brain-mri/classes/%3Cscript%3E",
                 "/analyzers/smear-all/classes/blast", "/analyzers/nope/classes/glioma"):
        r = c.get(path)
        assert r.status_code == 404 and b"<script>" not in r.data, path


def test_the_case_page_links_the_ai_result_and_the_signed_diagnosis(app, client_for, tok, monkeypatch):
    an = registry.get("bone-xray")
    monkeypatch.setattr(an, "ood_threshold", None)  # a generated image gets a label (the real gate refuses it)
    c = client_for("doc_a")
    cid = case_id_of(new_case(c, "bone-xray", [("knee.png", png(synthetic.radiograph_like(5)))]))
    assert pool_for(app).run_one()
    page = c.get(f"/cases/{cid}").data.decode()
    bearer = {"Authorization": f"Bearer {tok('doc_a')}"}
    ai = app.test_client().get(f"/api/v1/cases/{cid}", headers=bearer).json["aggregate"]["label"]
    assert ai in an.call_labels
    assert f'<a class="about" href="/analyzers/bone-xray/classes/{ai}">About this result</a>' in page
    assert "About this diagnosis" not in page  # nothing signed yet
    other = next(label for label in an.call_labels if label != ai)
    r = sign(c, cid, final_diagnosis=other, override_reason="Read by a radiologist", uncertainty_note="n")
    assert r.status_code == 302, r.data[:500]
    page = c.get(f"/cases/{cid}").data.decode()
    assert f'<a class="about" href="/analyzers/bone-xray/classes/{other}">About this diagnosis</a>' in page
    assert c.get(f"/analyzers/bone-xray/classes/{other}").status_code == 200
