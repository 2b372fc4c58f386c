"""A smear-differential case through the same pages, review, report and exports as every analyzer."""

from __future__ import annotations

import io
import re
import json

import pytest
from PIL import Image

from oncoscope.analyzers import registry
from oncoscope.ml import differential as D
from oncoscope.ml.synthetic import smear_field

from .conftest import PATIENT_A_ID, pool_for
from .test_flows import MULTIPART, case_id_of, flashes, sign

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
AID = "smear-differential"


def png(arr) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


@pytest.fixture()
def analyzer():
    if AID not in registry.available():
        pytest.skip(f"{AID} model not installed")
    return registry.get(AID)


def test_differential_case_end_to_end(app, client_for, tok, analyzer):
    c = client_for("doc_a")
    assert AID in c.get(f"/patients/{PATIENT_A_ID}/cases/new").data.decode()
    field = smear_field(21, 0.2, (420, 320), [(120, 150, 12.0), (300, 120, 10.0)])[0]
    empty = smear_field(22, 0.2, (420, 320), white_cells=[])[0]  # a field with red cells only
    data = {"analyzer_id": AID, "clinical_note": "",
            "images": [(io.BytesIO(png(field)), "field.png"), (io.BytesIO(png(empty)), "empty.png")]}
    cid = case_id_of(c.post(f"/patients/{PATIENT_A_ID}/cases/new", data=data, content_type=MULTIPART))
    assert pool_for(app).run_one() and pool_for(app).run_one()
    page = c.get(f"/cases/{cid}").data.decode()
    assert "Cells: AI pre-classification (2)" in page and "Diameter (µm)" in page
    st = c.get(f"/cases/{cid}/status.json").json
    assert st["images"][0]["result"] in ("ok", "uncertain") and st["images"][1]["result"] == "ok"
    assert c.get(f"/cases/{cid}/images/{st['images'][0]['id']}/cells.png").status_code == 200

    bearer = {"Authorization": f"Bearer {tok('doc_a')}"}
    case = app.test_client().get(f"/api/v1/cases/{cid}", headers=bearer).json
    img = case["images"][0]
    assert img["cell_count"] == 2 and img["label"] in analyzer.labels
    diff = case["aggregate"]["differential"]
    assert diff["white_cells"] + diff["differential"]["platelet"] + diff["differential"]["erythroblast"] == 2
    n, blasts = diff["white_cells"], diff["differential"]["blast"]
    needed = D.blasts_needed(max(n, 1), analyzer.decision)
    assert case["aggregate"]["label"] == (None if n == 0 else "blasts_present" if blasts >= needed else "no_blasts")
    # the case is called on all its cells, over both fields (platelets and nucleated red cells not counted)
    assert f"{n} white cells in 2 of 2 images" in page
    assert f"{100 - n} more needed for a 100-cell differential" in page
    assert "AI pre-classified differential" in page
    assert "Grad-CAM" not in page  # this analyzer makes no heatmap: no broken panel
    assert "probability of blasts" not in page and "(–)" not in page  # a count is not a probability
    assert f'href="/analyzers/{AID}"' in page  # its validation and limits one click away
    assert {"class", "class_probability", "diameter_um"} <= set(img["cells"][0])

    # one click must not accept what the AI itself refers: an uncertain result pre-selects nothing
    preselected = re.search(r'<option selected value="(blasts_present|no_blasts)"|<option value="(blasts_present|no_blasts)" '
                            r'selected', page)
    assert bool(preselected) == (case["aggregate"]["status"] == "ok" and case["aggregate"]["label"] is not None)
    extra = {} if case["aggregate"]["label"] else {"override_reason": "no white cell counted by the AI; counted by hand"}
    r = sign(c, cid, final_diagnosis=case["aggregate"]["label"] or "no_blasts",
             uncertainty_note="cells verified at the microscope", confirm_unverified="y", **extra)
    assert r.status_code == 302, re.findall(rb"(?:error|invalid)[^<]{0,200}", r.data)[:5]
    assert "Case signed (version 1)." in flashes(c.get(f"/cases/{cid}").data)
    assert c.get(f"/cases/{cid}/report.pdf").data[:4] == b"%PDF"
    bundle = json.loads(c.get(f"/cases/{cid}/export/fhir").data)
    assert any(e["resource"]["resourceType"] == "DiagnosticReport" for e in bundle["entry"])
    assert "OBX" in c.get(f"/cases/{cid}/export/hl7").data.decode()
    assert c.get(f"/cases/{cid}/export/dicom-sr").data[128:132] == b"DICM"
    assert c.get(f"/analyzers/{AID}").status_code == 200
