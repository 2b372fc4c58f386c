"""Patients in the web app and the API: the MRN character set at input, the DICOM "Read patient
data" pre-fill followed by Save (as a browser submits it), and search text taken literally."""

from __future__ import annotations

import io
from html.parser import HTMLParser

import numpy as np
import pytest
from sqlalchemy import func, select

from oncoscope.store.models import Patient

from .conftest import PATIENT_A, PATIENT_A_ID, field_errors, flashes, one

MRN_MESSAGE = "The MRN may contain only letters A-Z, digits, spaces and - . _ / (starting with a letter or digit)."


class _Forms(HTMLParser):
    """The forms of a page as a browser would submit them: action and successful controls."""

    def __init__(self):
        super().__init__()
        self.forms, self._select, self._textarea = [], None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.forms.append({"action": a.get("action"), "fields": {}})
        elif tag == "input" and self.forms and a.get("type") not in ("file", "submit", "checkbox"):
            self.forms[-1]["fields"][a["name"]] = a.get("value") or ""
        elif tag == "select":
            self._select = a["name"]
        elif tag == "option" and self._select and "selected" in a:
            self.forms[-1]["fields"][self._select] = a["value"]
        elif tag == "textarea":
            self._textarea = a["name"]
            self.forms[-1]["fields"][a["name"]] = ""

    def handle_endtag(self, tag):
        self._select = None if tag == "select" else self._select
        self._textarea = None if tag == "textarea" else self._textarea

    def handle_data(self, data):
        if self._textarea:
            self.forms[-1]["fields"][self._textarea] += data.removeprefix("\n")


def patient_form(html: bytes) -> dict:
    parser = _Forms()
    parser.feed(html.decode())
    return next(f for f in parser.forms if "mrn" in f["fields"])


def browser_submit(c, page_url: str, form: dict, **edits):
    """POST the form where a browser would: its action, or the page's own URL when it has none."""
    return c.post(form["action"] or page_url, data={**form["fields"], **edits})


def dicom_file(patient_id: str, patient_name: str = "Curie^Marie", birth: str = "19671107", sex: str = "F") -> bytes:
    from tests.imaging.test_dicom import make_dicom, to_bytes

    ds = make_dicom(np.random.default_rng(3).integers(0, 256, (32, 32), dtype=np.uint8),
                    patient_name=patient_name, patient_id=patient_id)
    ds.PatientBirthDate, ds.PatientSex = birth, sex
    return to_bytes(ds)


def read_patient_data(c, data: bytes):
    return c.post("/patients/from-dicom", data={"dicom": (io.BytesIO(data), "scan.dcm")},
                  content_type="multipart/form-data")


def patient_row(app, mrn: str):
    with app.extensions["oncoscope"]["sessions"]() as s:
        p = s.scalar(select(Patient).where(Patient.mrn == mrn))
        return p and (p.mrn, p.family_name, p.given_name, p.birth_date.isoformat() if p.birth_date else None, p.sex,
                      p.notes)


# ----------------------------------------------------------------------------- DICOM pre-fill, then Save
def test_save_after_a_dicom_pre_fill_creates_the_patient_with_the_edited_values(app, client_for):
    c = client_for("doc_a")
    r = read_patient_data(c, dicom_file("DCM-77"))
    assert r.status_code == 200 and "Pre-filled from the DICOM file" in " ".join(flashes(r.data))
    form = patient_form(r.data)
    assert {k: form["fields"][k] for k in ("mrn", "family_name", "given_name", "birth_date", "sex")} == {
        "mrn": "DCM-77", "family_name": "Curie", "given_name": "Marie", "birth_date": "1967-11-07", "sex": "female"}
    r = browser_submit(c, "/patients/from-dicom", form, given_name="Marie S.", notes="from the PACS")
    assert patient_row(app, "DCM-77") == ("DCM-77", "Curie", "Marie S.", "1967-11-07", "female", "from the PACS")
    pid = one(app, select(Patient.id).where(Patient.mrn == "DCM-77"))
    assert r.status_code == 302 and r.headers["Location"] == f"/patients/{pid}"
    assert form["action"] == "/patients/new"  # was missing: Save went to from-dicom, without the file


def test_a_multi_valued_dicom_patient_id_is_explained_and_can_be_corrected(app, client_for):
    c = client_for("doc_a")
    r = read_patient_data(c, dicom_file("B-001\\ZZ"))
    assert r.status_code == 200
    (err,) = field_errors(r.data, "mrn")
    assert err.startswith("The Patient ID in this DICOM file cannot be used as the MRN.") and MRN_MESSAGE in err
    form = patient_form(r.data)
    assert one(app, select(func.count(Patient.id))) == 2  # nothing stored by reading
    r = browser_submit(c, "/patients/from-dicom", form)  # saved unchanged: refused again, nothing stored
    assert r.status_code == 200 and field_errors(r.data, "mrn") == [MRN_MESSAGE]
    assert one(app, select(func.count(Patient.id))) == 2
    r = browser_submit(c, "/patients/from-dicom", patient_form(r.data), mrn="B-001")
    assert r.status_code == 302 and patient_row(app, "B-001")[:3] == ("B-001", "Curie", "Marie")


def test_pre_fill_of_a_known_mrn_opens_that_patient_even_when_others_share_its_prefix(app, client_for):
    c = client_for("doc_a")
    for mrn, family in (("A1", "Zed"), ("A10", "Alpha")):  # search order would put A10 first
        assert c.post("/patients/new", data={"mrn": mrn, "family_name": family, "sex": "unknown"}).status_code == 302
    pid = one(app, select(Patient.id).where(Patient.mrn == "A1"))
    r = read_patient_data(c, dicom_file("A1"))
    assert r.status_code == 302 and r.headers["Location"] == f"/patients/{pid}"
    r = read_patient_data(c, dicom_file(PATIENT_A["mrn"]))
    assert r.status_code == 302 and r.headers["Location"] == f"/patients/{PATIENT_A_ID}"


# ----------------------------------------------------------------------------- MRN at input
BAD_MRNS = ["B-001\\ZZ", "A|B", "A^B", "A~B", "A&B", "Doe=1", "50%", "MRN\n2", "MRN-Ü-1", "-1", "=HYPERLINK(1)"]


@pytest.mark.parametrize("mrn", BAD_MRNS)
def test_web_form_refuses_a_bad_mrn_with_a_clear_message(app, client_for, mrn):
    c = client_for("doc_a")
    r = c.post("/patients/new", data={"mrn": mrn, "family_name": "Doe", "sex": "unknown"})
    assert r.status_code == 200 and field_errors(r.data, "mrn") == [MRN_MESSAGE]
    r = c.post(f"/patients/{PATIENT_A_ID}/edit", data={**PATIENT_A, "mrn": mrn})
    assert r.status_code == 200 and field_errors(r.data, "mrn") == [MRN_MESSAGE]
    assert one(app, select(func.count(Patient.id))) == 2 and patient_row(app, PATIENT_A["mrn"])


@pytest.mark.parametrize("mrn", BAD_MRNS)
def test_api_refuses_a_bad_mrn_with_a_clear_message(app, tok, mrn):
    c, h = app.test_client(), {"Authorization": f"Bearer {tok('doc_a')}"}
    for r in (c.post("/api/v1/patients", json={"mrn": mrn, "family_name": "Doe"}, headers=h),
              c.patch(f"/api/v1/patients/{PATIENT_A_ID}", json={"mrn": mrn}, headers=h)):
        assert r.status_code == 422
        assert r.get_json()["error"] == {"code": "invalid", "message": MRN_MESSAGE, "field": "mrn"}
    assert one(app, select(func.count(Patient.id))) == 2 and patient_row(app, PATIENT_A["mrn"])


@pytest.mark.parametrize("mrn", ["0012345", "2023/000123", "AB 12.3_x", "mrn-a.b"])
def test_real_world_mrns_are_accepted_and_the_rule_is_documented(app, client_for, tok, mrn):
    c = client_for("doc_a")
    page = c.get("/patients/new").data.decode()
    assert "letters A-Z, digits, spaces and - . _ / (starting with a letter or digit)" in page
    assert c.post("/patients/new", data={"mrn": mrn, "family_name": "Doe", "sex": "unknown"}).status_code == 302
    api = app.test_client()
    h = {"Authorization": f"Bearer {tok('doc_a')}"}
    r = api.post("/api/v1/patients", json={"mrn": f"{mrn}-API", "family_name": "Doe"}, headers=h)
    assert r.status_code == 201 and r.get_json()["mrn"] == f"{mrn}-API"
    spec = api.get("/api/v1/openapi.json", headers=h).get_json()["components"]["schemas"]
    for name in ("PatientInput", "PatientPatch"):
        mrn_schema = spec[name]["properties"]["mrn"]
        assert mrn_schema["pattern"] == "^[A-Za-z0-9][A-Za-z0-9 ._/-]*$" and mrn_schema["maxLength"] == 64
        assert "letters A-Z" in mrn_schema["description"]


# ----------------------------------------------------------------------------- search
def test_percent_and_underscore_are_not_wildcards_in_searches(app, client_for):
    c = client_for("doc_a")
    for mrn, family in (("W_1", "Under_score"), ("WX1", "Underxscore"), ("W-3", "Fifty%Off")):
        assert c.post("/patients/new", data={"mrn": mrn, "family_name": family, "sex": "unknown"}).status_code == 302
    assert "Fifty%Off" in c.get("/patients/?q=%25").data.decode()
    assert "Under_score" not in c.get("/patients/?q=%25").data.decode()  # "%" was "everything"
    page = c.get("/patients/?q=W_").data.decode()
    assert "Under_score" in page and "Underxscore" not in page
    assert "Doe" not in c.get("/cases/?q=%25").data.decode()  # history: patient A's case is not a match
