"""A bone X-ray and a brain MR case through the same pages, review, report and exports as smears:
nothing in the web layer is specific to one analyzer."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from oncoscope.analyzers import registry
from oncoscope.ml import synthetic

from .conftest import PATIENT_A_ID, pool_for
from .test_flows import MULTIPART, case_id_of, flashes, sign

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def png(arr) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


def new_case(c, analyzer_id, files):
    data = {"analyzer_id": analyzer_id, "clinical_note": "",
            "images": [(io.BytesIO(b), name) for name, b in files]}
    return c.post(f"/patients/{PATIENT_A_ID}/cases/new", data=data, content_type=MULTIPART)


@pytest.mark.parametrize("analyzer_id", ["bone-xray", "brain-mri"])
def test_radiology_case_end_to_end(app, client_for, tok, monkeypatch, analyzer_id):
    an = registry.get(analyzer_id)
    monkeypatch.setattr(an, "ood_threshold", None)  # generated images get a label (the real gate refuses them)
    c = client_for("doc_a")
    assert analyzer_id in c.get(f"/patients/{PATIENT_A_ID}/cases/new").data.decode()
    cid = case_id_of(new_case(c, analyzer_id, [("knee.png", png(synthetic.radiograph_like(5)))]))
    assert pool_for(app).run_one()
    page = c.get(f"/cases/{cid}").data.decode()
    noun = an.image_noun
    assert f"{noun} 1" in page and f"Grad-CAM heatmap {noun.lower()} 1" in page
    assert "Cells:" not in page and "Per-cell" not in page and "DICOM SEG" not in page
    assert f"probability of {an.positive_term}" in page
    st = c.get(f"/cases/{cid}/status.json").json
    assert st["images"][0]["result"] in ("ok", "uncertain")
    for kind in ("heatmap", "heatmap-layer", "original", "thumb"):
        assert c.get(f"/cases/{cid}/images/{st['images'][0]['id']}/{kind}.png").status_code == 200
    assert c.get(f"/cases/{cid}/images/{st['images'][0]['id']}/cells.png").status_code == 404

    # the API gives the same result, with no pretend cell count
    bearer = {"Authorization": f"Bearer {tok('doc_a')}"}
    api_case = app.test_client().get(f"/api/v1/cases/{cid}", headers=bearer).json
    img = api_case["images"][0]
    assert img["cell_count"] is None and img["label"] in an.labels

    # the analyzer's own report wording for the case's call is shown (the case's call: a slice called
    # positive with 'no tumour' on top makes a positive case)
    label = api_case["aggregate"]["label"]
    assert label in an.call_labels
    sentence = an.interpretation(label)
    assert sentence and sentence.replace("'", "&#39;") in page
    # sign with the AI's label (an uncertain result needs a note)
    r = sign(c, cid, final_diagnosis=label, uncertainty_note="reviewed by a radiologist")
    assert r.status_code == 302, r.data[:500]
    assert "Case signed (version 1)." in flashes(c.get(f"/cases/{cid}").data)

    from pypdf import PdfReader

    pdf = c.get(f"/cases/{cid}/report.pdf")
    text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf.data)).pages)
    assert f"{noun} 1" in text and "Cells detected" not in text and "Radiology report" in text
    flat = " ".join(text.split())
    assert sentence[:40] in flat and an.report_wording["finding"][:40] in flat
    assert an.display_names[label] in text
    assert an.report_wording["disclaimer"].split(";")[0][:40] in " ".join(text.split())

    bundle = json.loads(c.get(f"/cases/{cid}/export/fhir").data)
    codes = [cd["code"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
             for cd in e["resource"]["code"]["coding"]]
    notes = [n["text"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
             for n in e["resource"].get("note") or []]
    assert sentence in notes
    assert "cell-count" not in codes and "ai-aggregate" in codes
    hl7 = c.get(f"/cases/{cid}/export/hl7").data.decode()
    assert "CELL-COUNT" not in hl7 and "OBX" in hl7
    sr = c.get(f"/cases/{cid}/export/dicom-sr")
    assert sr.status_code == 200 and sr.data[128:132] == b"DICM"


def test_analyzer_pages_and_api_list_all_analyzers(app, client_for, tok):
    c = client_for("doc_a")
    bearer = {"Authorization": f"Bearer {tok('doc_a')}"}
    items = {a["id"]: a for a in app.test_client().get("/api/v1/analyzers", headers=bearer).json["items"]}
    assert {"smear-all", "bone-xray", "brain-mri"} <= set(items)
    assert items["brain-mri"]["positive_term"] == "brain tumour"
    assert "MR" in items["brain-mri"]["dicom_modalities"]
    for aid in ("bone-xray", "brain-mri"):
        page = c.get(f"/analyzers/{aid}").data.decode()
        assert registry.get(aid).name in page and "Targets" in page


@pytest.mark.parametrize("analyzer_id", ["bone-xray", "brain-mri"])
def test_smear_uploaded_to_a_radiology_analyzer_is_out_of_domain(app, client_for, analyzer_id):
    c = client_for("doc_a")
    smear = synthetic.smear_like(11, size=320)[0]
    cid = case_id_of(new_case(c, analyzer_id, [("smear.png", png(smear))]))
    assert pool_for(app).run_one()
    st = c.get(f"/cases/{cid}/status.json").json
    assert st["images"][0]["result"] == "out_of_domain"
    page = c.get(f"/cases/{cid}").data.decode()
    assert registry.get(analyzer_id).input_description in page
