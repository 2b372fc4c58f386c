"""Hospital integration on the pages: the DICOM inbox (file a study under an analyzer, dismiss one),
the PACS query and retrieval for a patient against a private Orthanc, and the deliveries on the case
page (waiting, failed, sent again)."""

from __future__ import annotations

import io

import pytest
from pydicom.uid import generate_uid
from pypdf import PdfReader
from sqlalchemy import select

from oncoscope.analyzers import routing
from oncoscope.store import receiving
from oncoscope.store.models import Analysis, AuditEvent, Case, CaseImage, Delivery, DicomInboxItem
from tests.imaging.test_dicom import to_bytes
from tests.orthanc import PASSWORD, USER, Orthanc
from tests.services.test_dicom_receiver import CT, slice_

from .conftest import DOC_A, PATIENT_A, PATIENT_A_ID, files_of, flashes, login, one, q, sessions_of

P = PATIENT_A_ID
SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
MRN, NAME = PATIENT_A["mrn"], "Doe^Jane"


def _receive(app, ds) -> receiving.Filed:
    return receiving.receive(sessions_of(app), files_of(app), to_bytes(ds), "AE MODALITY1", routing.defaults(),
                             10**8)


def test_an_unrouted_study_waits_in_the_inbox_until_a_person_files_it(app, client_for):
    study = generate_uid()  # secondary captures: no rule routes them, a smear analyzer can read them
    for n in (1, 2):
        got = _receive(app, slice_(study, patient_id=MRN, name=NAME, modality="OT", sop_class=SC, body_part="",
                                   n=n, PatientBirthDate="19800203"))
        assert got.kind == "inbox", got
    ct = generate_uid()
    _receive(app, slice_(ct, patient_id=MRN, name=NAME, modality="CT", sop_class=CT, PatientBirthDate="19800203"))
    c = client_for("doc_a")
    home = c.get("/").data.decode()
    assert 'data-queue="inbox"' in home and 'aria-label="2 studies waiting"' in home
    page = c.get("/inbox").data.decode()
    assert "No routing rule matches modality CT" in page and "Doe, Jane" in page
    assert "No installed analyzer reads CT images" in page and "data-confirm" in page  # nothing reads CT
    assert 'data-queue="inbox"' not in client_for("doc_b").get("/").data.decode()  # not doctor B's patient
    assert "Nothing waiting" in client_for("doc_b").get("/inbox").data.decode()

    r = c.post(f"/inbox/{study}/file", data={"analyzer_id": "smear-all"})
    assert r.status_code == 302 and "/cases/" in r.headers["Location"]
    cid = int(r.headers["Location"].rsplit("/", 1)[1])
    assert q(app, select(Case.analyzer_id, Case.dicom_study_uid, Case.patient_id).where(Case.id == cid)) == [
        ("smear-all", study, P)]
    jobs = q(app, select(Analysis.job_status).join(CaseImage).where(CaseImage.case_id == cid))
    assert jobs == [("queued",), ("queued",)]
    assert one(app, select(AuditEvent.action).order_by(AuditEvent.seq.desc()).limit(1)) == "dicom.inbox_file"
    assert c.post(f"/inbox/{study}/file", data={"analyzer_id": "smear-all"}).status_code == 404  # filed already

    # the CT: no analyzer reads it (refused even when posted by hand), an unknown one is named; dismissed
    r = c.post(f"/inbox/{ct}/file", data={"analyzer_id": "bone-xray"})
    assert r.status_code == 302 and "does not read CT brain images" in " ".join(flashes(c.get("/inbox").data))
    r = c.post(f"/inbox/{ct}/file", data={"analyzer_id": "nope"})
    assert r.status_code == 302 and "no analyzer &#39;nope&#39;" in " ".join(flashes(c.get("/inbox").data))
    assert c.post(f"/inbox/{ct}/dismiss").status_code == 302
    assert q(app, select(DicomInboxItem.resolved_at.is_not(None)).where(DicomInboxItem.study_uid == ct)) == [
        (True,)]
    assert "Nothing waiting" in c.get("/inbox").data.decode()


@pytest.fixture()
def orthanc(tmp_path):
    o = Orthanc(tmp_path / "orthanc").start()
    yield o
    o.stop()


def test_pacs_query_and_retrieval_from_the_patient_page(make_app, client_for, orthanc):
    app = make_app(dicomweb_url=orthanc.dicomweb, dicomweb_user=USER, dicomweb_password=PASSWORD)
    study = generate_uid()
    series = slice_(study, patient_id=MRN, name=NAME, PatientBirthDate="19800203", SeriesDescription="T1 axial")
    for n in (1, 2):
        ds = slice_(study, patient_id=MRN, name=NAME, n=n, PatientBirthDate="19800203", SeriesDescription="T1 axial")
        ds.SeriesInstanceUID = series.SeriesInstanceUID
        orthanc.upload(to_bytes(ds))
    orthanc.upload(to_bytes(slice_(generate_uid(), patient_id="MRN-SOMEONE-ELSE")))
    c = app.test_client()
    assert login(c, DOC_A).status_code == 302
    assert b"Studies in the PACS" in c.get(f"/patients/{P}").data
    page = c.get(f"/patients/{P}/pacs").data.decode()
    assert "T1 axial" in page and study in page and "MRN-SOMEONE-ELSE" not in page
    r = c.post(f"/patients/{P}/pacs/retrieve", data={"study_uid": study, "series_uid": series.SeriesInstanceUID,
                                                    "analyzer_id": "brain-mri"})
    assert r.status_code == 302 and "/cases/" in r.headers["Location"], flashes(c.get(f"/patients/{P}").data)
    cid = int(r.headers["Location"].rsplit("/", 1)[1])
    with sessions_of(app)() as s:
        case = s.get(Case, cid)
        assert case.patient_id == P and case.dicom_study_uid == study and len(case.images) == 2
        assert case.created_by_id is not None  # the doctor who retrieved it
    again = c.post(f"/patients/{P}/pacs/retrieve", data={"study_uid": study, "series_uid": series.SeriesInstanceUID,
                                                        "analyzer_id": "brain-mri"})
    assert "2 already here" in " ".join(flashes(c.get(again.headers["Location"]).data))
    # the PACS gone: the page says so, nothing breaks
    orthanc.stop()
    assert "cannot be reached" in c.get(f"/patients/{P}/pacs").data.decode()


def test_deliveries_show_on_the_case_page_and_can_be_sent_again(app, client_for):
    with sessions_of(app)() as s:
        s.add(Delivery(case_id=1, review_version=1, kind="dicom", target="https://pacs.example/dicom-web",
                       status="failed", attempts=8, last_error="The PACS answered HTTP 500"))
        s.commit()
    c = client_for("doc_a")
    page = c.get("/cases/1").data.decode()
    assert "Sent to hospital systems" in page and "HTTP 500" in page and "Send again now" in page
    assert c.post("/cases/1/deliveries/1/retry").status_code == 302
    assert q(app, select(Delivery.status, Delivery.attempts)) == [("pending", 0)]
    assert client_for("doc_b").post("/cases/1/deliveries/1/retry").status_code == 404


def test_pacs_over_the_api(make_app, tok, orthanc):
    app = make_app(dicomweb_url=orthanc.dicomweb, dicomweb_user=USER, dicomweb_password=PASSWORD)
    study = generate_uid()
    ds = slice_(study, patient_id=MRN, name=NAME, PatientBirthDate="19800203")
    orthanc.upload(to_bytes(ds))
    c = app.test_client()
    h = {"Authorization": f"Bearer {tok('doc_a')}"}
    (st,) = c.get(f"/api/v1/patients/{P}/pacs/studies", headers=h).json["items"]
    assert st["study_uid"] == study and st["series"][0]["series_uid"] == ds.SeriesInstanceUID
    bad = c.post(f"/api/v1/patients/{P}/pacs/retrieve", headers=h,
                 json={"study_uid": "01.2", "series_uids": [ds.SeriesInstanceUID], "analyzer_id": "brain-mri"})
    assert bad.status_code == 422 and bad.json["error"]["field"] == "study_uid"
    r = c.post(f"/api/v1/patients/{P}/pacs/retrieve", headers=h,
               json={"study_uid": study, "series_uids": [ds.SeriesInstanceUID], "analyzer_id": "brain-mri"})
    assert r.status_code == 200 and r.json["filed"] == 1 and len(r.json["case_ids"]) == 1
    case = c.get(f"/api/v1/cases/{r.json['case_ids'][0]}", headers=h).json
    assert case["dicom_study_uid"] == study and case["deliveries"] == []
    orthanc.stop()
    assert c.get(f"/api/v1/patients/{P}/pacs/studies", headers=h).status_code == 502


def test_a_received_study_shows_its_accession_on_the_case_page(app, client_for):
    """How clinicians name an exam: by its accession number, not the Study Instance UID alone."""
    study = generate_uid()
    got = _receive(app, slice_(study, patient_id=MRN, name=NAME, AccessionNumber="ACC-2026-0042",
                               PatientBirthDate="19800203"))
    assert got.kind == "filed", got
    c = client_for("doc_a")
    page = c.get(f"/cases/{got.case_id}").data.decode()
    assert "Accession <strong>ACC-2026-0042</strong> · DICOM study" in page and study in page
    assert "AI result so far" in page and "provisional" in page  # (its analysis is still queued)
    pdf = c.get(f"/cases/{got.case_id}/report.pdf")
    assert pdf.status_code == 200
    first = PdfReader(io.BytesIO(pdf.data)).pages[0].extract_text()
    assert "Accession" in first and "ACC-2026-0042" in first


def test_a_study_of_many_slices_gets_an_index_to_find_them(app, client_for):
    study = generate_uid()
    for n in range(1, 14):
        got = _receive(app, slice_(study, patient_id=MRN, name=NAME, n=n, PatientBirthDate="19800203"))
        assert got.kind == "filed", got
    page = client_for("doc_a").get(f"/cases/{got.case_id}").data.decode()
    assert "13 slices at a glance" in page
    index = page[page.index('id="images-index"'):page.index("</section>", page.index('id="images-index"'))]
    ids = q(app, select(CaseImage.id).where(CaseImage.case_id == got.case_id).order_by(CaseImage.id))
    assert [f'href="#image-{i}"' in index for (i,) in ids] == [True] * 13
    assert 'loading="lazy"' in page  # (thirteen slices do not fetch every image at once)
