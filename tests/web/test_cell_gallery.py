"""The cell gallery: verify and reclassify cells (page and API), undo, the live differential, and
the verified differential frozen at sign-off."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image

from oncoscope.analyzers import registry
from oncoscope.ml.synthetic import smear_field

from .conftest import PATIENT_A_ID, pool_for
from .test_flows import MULTIPART, case_id_of, flashes, sign

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
AID = "smear-differential"
CELLS = [(90, 110, 12.0), (230, 90, 10.0), (330, 220, 13.0), (150, 250, 11.0)]


def png(arr) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


@pytest.fixture()
def case(app, client_for):
    if AID not in registry.available():
        pytest.skip(f"{AID} model not installed")
    c = client_for("doc_a")
    field = smear_field(31, 0.2, (420, 320), CELLS)[0]
    data = {"analyzer_id": AID, "clinical_note": "", "images": [(io.BytesIO(png(field)), "field.png")]}
    cid = case_id_of(c.post(f"/patients/{PATIENT_A_ID}/cases/new", data=data, content_type=MULTIPART))
    assert pool_for(app).run_one()
    return c, cid


def test_gallery_page_sprites_and_live_reclassification(case):
    c, cid = case
    page = c.get(f"/cases/{cid}/cells").data.decode()
    ids = [int(i) for i in re.findall(r'data-id="(\d+)"', page)]
    assert len(ids) >= 3, "the generated field's white cells are in the gallery"
    assert 'role="listbox"' in page and "gallery.js" in page and "0 of" in page
    sprite_url = re.search(r'&#34;sprite&#34;: &#34;([^&]+)&#34;', page).group(1)
    sprite = c.get(sprite_url)
    assert sprite.status_code == 200 and sprite.mimetype == "image/jpeg"
    assert Image.open(io.BytesIO(sprite.data)).size[0] == 16 * 96  # cut once, one physical scale
    assert "Review cells" in c.get(f"/cases/{cid}").data.decode()

    r = c.post(f"/cases/{cid}/cells", json={"changes": [{"id": ids[0], "class": "blast"},
                                                         {"id": ids[1], "class": "lymphocyte"}]})
    assert r.status_code == 200, r.data
    got = {x["id"]: x for x in r.json["cells"]}
    assert got[ids[0]]["class"] == "blast" and got[ids[0]]["verified"] and got[ids[0]]["changed_by"]
    review = r.json["cell_review"]
    assert review["verified"] == 2 and review["current"]["differential"]["blast"] >= 1
    assert "<table" in r.json["differential_html"]
    # verifying as shown: the class stays, the cell counts as verified
    same = c.post(f"/cases/{cid}/cells", json={"changes": [{"id": ids[2], "class": got[ids[1]]["class"]}]})
    assert same.json["cell_review"]["verified"] == 3

    # undo takes back the last batch only
    u = c.post(f"/cases/{cid}/cells/undo")
    assert u.status_code == 200 and u.json["cell_review"]["verified"] == 2
    # bad input refuses the whole batch and changes nothing
    bad = c.post(f"/cases/{cid}/cells", json={"changes": [{"id": ids[0], "class": "martian"}]})
    assert bad.status_code == 422 and "Unknown cell class" in bad.json["error"]["message"]
    other = c.post(f"/cases/{cid}/cells", json={"changes": [{"id": 10**6, "class": "blast"}]})
    assert other.status_code == 422
    assert c.post(f"/cases/{cid}/cells", json={"changes": "all"}).status_code == 400
    assert c.post(f"/cases/{cid}/cells", json={"changes": [{"id": ids[3], "class": "neutrophil"}]}).status_code == 200


def test_sign_freezes_the_verified_differential_and_asks_about_unverified_cells(app, case, tok):
    c, cid = case
    bearer = {"Authorization": f"Bearer {tok('doc_a')}"}
    api = app.test_client()
    listed = api.get(f"/api/v1/cases/{cid}/cells", headers=bearer).json
    ids = [x["id"] for x in listed["items"]]
    assert listed["total"] == len(ids) >= 3
    assert api.get(f"/api/v1/cases/{cid}/cells?class=martian", headers=bearer).status_code == 400
    r = api.patch(f"/api/v1/cases/{cid}/cells", headers=bearer,
                  json={"changes": [{"id": ids[0], "class": "blast"}, {"id": ids[1], "class": "monocyte"}]})
    assert r.status_code == 200, r.json
    blasts = api.get(f"/api/v1/cases/{cid}/cells?class=blast", headers=bearer).json
    assert ids[0] in [x["id"] for x in blasts["items"]]
    assert api.patch(f"/api/v1/cases/{cid}/cells", headers=bearer,
                     json={"changes": [{"id": ids[0], "class": "blast", "x": 1}]}).status_code == 422

    # unverified cells: the sign-off says so, and signs only with the explicit confirmation
    r = sign(c, cid, final_diagnosis="blasts_present", override_reason="blast seen on review",
             uncertainty_note="reviewed")
    assert r.status_code == 400 and b"not verified" in r.data
    r = sign(c, cid, final_diagnosis="blasts_present", override_reason="blast seen on review",
             uncertainty_note="reviewed", confirm_unverified="y")
    assert r.status_code == 302
    case_json = api.get(f"/api/v1/cases/{cid}", headers=bearer).json
    frozen = case_json["reviews"][-1]["differential"]
    assert frozen["verified"] == 2 and frozen["unverified"] == len(ids) - 2 - sum(
        not x["counted"] for x in listed["items"])
    assert frozen["current"]["differential"]["blast"] >= 1

    # after sign-off: undo cannot reach the signed changes; a new change is for an amendment
    assert api.post(f"/api/v1/cases/{cid}/cells/undo", headers=bearer).status_code == 409
    assert api.patch(f"/api/v1/cases/{cid}/cells", headers=bearer,
                     json={"changes": [{"id": ids[0], "class": "lymphocyte"}]}).status_code == 200
    again = api.get(f"/api/v1/cases/{cid}", headers=bearer).json
    assert again["reviews"][-1]["differential"] == frozen  # the signed version is unchanged
    assert again["cell_review"]["current"]["differential"]["blast"] == frozen["current"]["differential"]["blast"] - 1
    assert api.post(f"/api/v1/cases/{cid}/cells/undo", headers=bearer).status_code == 200


def test_wbc_count_gives_absolute_counts_and_refuses_nonsense(case):
    c, cid = case
    ids = [int(i) for i in re.findall(r'data-id="(\d+)"', c.get(f"/cases/{cid}/cells").data.decode())]
    c.post(f"/cases/{cid}/cells", json={"changes": [{"id": i, "class": "lymphocyte"} for i in ids]})
    assert c.post(f"/cases/{cid}/wbc-count", data={"wbc_count": "7,5"}).status_code == 302
    page = c.get(f"/cases/{cid}/cells").data.decode()
    assert "WBC count saved." in flashes(page.encode()) and "x10<sup>9</sup>/L</th>" in page
    counted = page.count('class="cell verified changed"') + page.count('class="cell verified"')
    assert counted and "<td>7.50</td>" in page  # every counted cell a lymphocyte: all 7.5 x10^9/L
    c.post(f"/cases/{cid}/wbc-count", data={"wbc_count": "-3"})
    assert "greater than 0 and below 1000" in c.get(f"/cases/{cid}/cells").data.decode()
    c.post(f"/cases/{cid}/wbc-count", data={"wbc_count": "many"})
    assert "must be a number" in c.get(f"/cases/{cid}/cells").data.decode()


def test_gallery_is_only_for_cell_classifying_cases_and_visible_cases(app, client_for, case):
    c, cid = case
    assert client_for("doc_b").get(f"/cases/{cid}/cells").status_code == 404  # not their patient
    assert client_for("doc_b").post(f"/cases/{cid}/cells", json={"changes": []}).status_code == 404


def test_verified_differential_in_pdf_fhir_and_hl7(app, case, tmp_path):
    import json as _json
    import subprocess

    c, cid = case
    ids = [int(i) for i in re.findall(r'data-id="(\d+)"', c.get(f"/cases/{cid}/cells").data.decode())]
    half = len(ids) // 2
    changes = [{"id": i, "class": "blast" if k < half else "lymphocyte"} for k, i in enumerate(ids)]
    assert c.post(f"/cases/{cid}/cells", json={"changes": changes}).status_code == 200
    r = sign(c, cid, final_diagnosis="blasts_present", override_reason="blasts on review", uncertainty_note="ok")
    assert r.status_code == 302, r.data[:300]

    bundle = _json.loads(c.get(f"/cases/{cid}/export/fhir").data)
    obs = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    loinc = {o["code"]["coding"][0]["code"]: o for o in obs if o["code"]["coding"][0]["system"] == "http://loinc.org"}
    assert {"26446-5", "26478-8", "26511-6", "26485-3", "26450-7", "30180-4", "38518-7"} <= set(loinc)
    blast = loinc["26446-5"]
    assert blast["valueQuantity"]["unit"] == "%" and blast["valueQuantity"]["system"] == "http://unitsofmeasure.org"
    assert blast["valueQuantity"]["value"] > 0 and blast["interpretation"][0]["coding"][0]["code"] == "H"
    assert loinc["26478-8"]["valueQuantity"]["value"] + blast["valueQuantity"]["value"] == pytest.approx(100, abs=0.2)
    report = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    assert len(report["result"]) == len(obs)

    hl7 = c.get(f"/cases/{cid}/export/hl7").data.decode()
    obx = [seg.split("|") for seg in hl7.split("\r") if seg.startswith("OBX")]
    coded = {f[3].split("^")[0]: f for f in obx if f[3].endswith("^LN")}
    assert "26446-5" in coded and coded["26446-5"][6].startswith("%") and coded["26446-5"][8] == "H"
    assert coded["26446-5"][16] and coded["26446-5"][18].startswith(AID)  # verifier and model
    assert coded["26478-8"][8] == ""

    pdf = c.get(f"/cases/{cid}/report.pdf").data
    path = tmp_path / "r.pdf"
    path.write_bytes(pdf)
    try:
        text = subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        pytest.skip("pdftotext (poppler-utils) not installed")
    assert "White-cell differential" in text and "Signed %" in text and "cells verified by the signer" in text
    assert "Blasts and unidentified cells" in text and "µm across (one physical scale)" in text


def test_export_reviewed_writes_a_dataset_train_reads_without_identifiers(app, case, tmp_path):
    import csv

    from oncoscope.services.reviewed import export_reviewed
    from oncoscope.training import cells as training_cells

    from .conftest import PATIENT_A, sessions_of

    c, cid = case
    ids = [int(i) for i in re.findall(r'data-id="(\d+)"', c.get(f"/cases/{cid}/cells").data.decode())]
    changes = [{"id": i, "class": "lymphocyte" if k % 2 else "blast"} for k, i in enumerate(ids[:-1])]
    assert c.post(f"/cases/{cid}/cells", json={"changes": changes}).status_code == 200
    s = sessions_of(app)()
    try:
        out = tmp_path / "oncoscope-reviewed"
        assert export_reviewed(s, app.extensions["oncoscope"]["files"], out).cells == 0  # nothing signed yet
    finally:
        s.close()
    assert sign(c, cid, final_diagnosis="blasts_present", override_reason="seen", uncertainty_note="ok",
                confirm_unverified="y").status_code == 302
    s = sessions_of(app)()
    try:
        out = tmp_path / "second"
        got = export_reviewed(s, app.extensions["oncoscope"]["files"], out)
    finally:
        s.close()
    rows = list(csv.DictReader(open(out / "labels.csv")))
    counted = len(changes)  # every changed cell is verified; the last one was left unverified
    assert 0 < got.cells == len(rows) <= counted and got.cases == 1
    assert {r["label"] for r in rows} <= {"blast", "lymphocyte"} and all(r["ai_class"] for r in rows)
    assert all(r["model_version"] and r["analyzer"] == AID for r in rows)
    text = (out / "labels.csv").read_text() + (out / "README.md").read_text()
    for ident in (PATIENT_A["mrn"], PATIENT_A["family_name"], "field.png"):
        assert ident not in text
    crop_px = registry.get(AID).crop_px  # the classifier's own crop size (its config)
    assert crop_px == training_cells.CROP_PX
    assert Image.open(out / rows[0]["image"]).size == (crop_px, crop_px)
    crops = training_cells.reviewed(out)  # the training code reads it as a source
    assert len(crops.labels) == len(rows) and crops.crops.shape[1:] == (training_cells.CROP_PX,) * 2 + (3,)
    assert len(set(crops.groups)) == 1  # one case: one group, never split across train and test


def test_conflicts_own_undo_revision_and_signed_classes(app, case, client_for, staff, tmp_path):
    """What two reviewers and an amendment must not do: overwrite each other silently, undo each
    other's work, or change what a signed version shows and exports."""
    from oncoscope.services.reviewed import export_reviewed

    from .conftest import sessions_of

    c, cid = case
    page = c.get(f"/cases/{cid}/cells").data.decode()
    ids = [int(i) for i in re.findall(r'data-id="(\d+)"', page)]
    shown = dict(zip(ids, re.findall(r'data-class="([a-z_]+)" data-ai', page)))
    rev0 = c.get(f"/cases/{cid}/status.json").json
    assert c.post(f"/cases/{cid}/cells", json={"changes": [{"id": ids[0], "class": "blast", "from": shown[ids[0]]}]}
                  ).status_code == 200
    # a second reviewer (a technologist) still showing the old class: refused, not overwritten
    staff("tech")
    stale = client_for("tech").post(f"/cases/{cid}/cells",
                                     json={"changes": [{"id": ids[0], "class": "monocyte", "from": shown[ids[0]]}]})
    assert stale.status_code == 409 and "someone else" in stale.json["error"]["message"]
    # nor can they undo the first reviewer's work
    assert client_for("tech").post(f"/cases/{cid}/cells/undo").status_code == 409
    for bad in ([{"id": True, "class": "blast"}], [{"id": 2**63, "class": "blast"}], [{"id": 1, "class": "x", "y": 1}]):
        assert c.post(f"/cases/{cid}/cells", json={"changes": bad}).status_code == 400
    # a cell change is a change of the case: a sign-off made on the older view fails
    r = sign(c, cid, final_diagnosis="blasts_present", override_reason="x", uncertainty_note="x",
             confirm_unverified="y", revision=str(0))
    assert r.status_code == 400 and b"changed while you were reviewing" in r.data
    assert sign(c, cid, final_diagnosis="blasts_present", override_reason="x", uncertainty_note="x",
                confirm_unverified="y").status_code == 302
    # an amendment's change does not reach what version 1 shows and exports
    assert c.post(f"/cases/{cid}/cells", json={"changes": [{"id": ids[0], "class": "lymphocyte"}]}).status_code == 200
    s = sessions_of(app)()
    try:
        export_reviewed(s, app.extensions["oncoscope"]["files"], tmp_path / "x")
    finally:
        s.close()
    labels = (tmp_path / "x" / "labels.csv").read_text()
    assert ",blast," in labels and ",lymphocyte," not in labels
    assert rev0["case"] == cid


def test_a_consult_points_at_cells_picked_in_the_gallery(app, case, client_for):
    from sqlalchemy import select

    from oncoscope.store.models import AuditEvent, Consult

    from .conftest import ACCOUNTS, q

    c, cid = case
    page = c.get(f"/cases/{cid}/cells").data.decode()
    assert 'id="cell-consult"' in page and "thumbs.js" in page
    ids = [int(i) for i in re.findall(r'data-id="(\d+)"', page)][:2]
    ask = {"from": "cells", "consultant_id": str(ACCOUNTS["doc_b"].id), "question": "Blasts?"}
    # a malformed selection sends the doctor back to the gallery with the reason (audited as rejected)
    r = c.post(f"/cases/{cid}/consults", data={**ask, "cell_ids": "1,x"})
    assert r.status_code == 302 and r.headers["Location"].endswith(f"/cases/{cid}/cells")
    assert "Select the cells again" in " ".join(flashes(c.get(f"/cases/{cid}/cells").data))
    assert q(app, select(AuditEvent.outcome).where(AuditEvent.action == "consult.ask")) == [("rejected",)]
    r = c.post(f"/cases/{cid}/consults", data={**ask, "cell_ids": "999999"})  # not a cell of this case
    assert r.status_code == 302 and "not cells of this case" in " ".join(flashes(c.get(f"/cases/{cid}/cells").data))

    r = c.post(f"/cases/{cid}/consults", data={**ask, "cell_ids": ",".join(map(str, ids))})
    assert r.status_code == 302 and "/consults/" in r.headers["Location"]
    assert q(app, select(Consult.cell_ids)) == [(sorted(ids),)]
    # the consultant (doctor B, not assigned to the patient) sees the two cells and opens them in the gallery
    doc_b = client_for("doc_b")
    thread = doc_b.get(r.headers["Location"]).data.decode()
    assert "About 2 cells" in thread and thread.count('<a class="cell') == 2
    sprite = re.search(r'&#34;sprite&#34;: &#34;([^&]+)&#34;', thread).group(1)
    assert doc_b.get(sprite).status_code == 200
    assert doc_b.get(f"/cases/{cid}/cells").status_code == 200
    assert f'/cases/{cid}/cells#cell-{ids[0]}' in thread
