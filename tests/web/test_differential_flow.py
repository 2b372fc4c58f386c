"""A smear-differential case through the same pages, review, report and exports as every analyzer."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from oncoscope.analyzers import registry
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
    data = {"analyzer_id": AID, "clinical_note": "", "images": [(io.BytesIO(png(field)), "field.png")]}
    cid = case_id_of(c.post(f"/patients/{PATIENT_A_ID}/cases/new", data=data, content_type=MULTIPART))
    assert pool_for(app).run_one()
    page = c.get(f"/cases/{cid}").data.decode()
    assert "Cells: AI pre-classification (2)" in page and "Diameter (µm)" in page
    st = c.get(f"/cases/{cid}/status.json").json
    assert st["images"][0]["result"] in ("ok", "uncertain")
    assert c.get(f"/cases/{cid}/images/{st['images'][0]['id']}/cells.png").status_code == 200

    bearer = {"Authorization": f"Bearer {tok('doc_a')}"}
    img = app.test_client().get(f"/api/v1/cases/{cid}", headers=bearer).json["images"][0]
    assert img["cell_count"] == 2 and img["label"] in analyzer.labels
    assert {"class", "class_probability", "diameter_um"} <= set(img["cells"][0])

    r = sign(c, cid, final_diagnosis=img["label"], uncertainty_note="cells verified at the microscope")
    assert r.status_code == 302, r.data[:500]
    assert "Case signed (version 1)." in flashes(c.get(f"/cases/{cid}").data)
    assert c.get(f"/cases/{cid}/report.pdf").data[:4] == b"%PDF"
    bundle = json.loads(c.get(f"/cases/{cid}/export/fhir").data)
    assert any(e["resource"]["resourceType"] == "DiagnosticReport" for e in bundle["entry"])
    assert "OBX" in c.get(f"/cases/{cid}/export/hl7").data.decode()
    assert c.get(f"/cases/{cid}/export/dicom-sr").data[128:132] == b"DICM"
    assert c.get(f"/analyzers/{AID}").status_code == 200
