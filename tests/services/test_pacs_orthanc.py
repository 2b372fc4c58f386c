"""Against a real PACS (a private Orthanc, tests/orthanc.py): Orthanc C-STOREs a study into the
DICOM receiver, and an AE title not allowed is refused; DICOMweb query, retrieval and store-back
(services/dicomweb) round trip through it."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from oncoscope.store.models import Analysis, AuditEvent, Case, CaseImage
from tests.imaging.test_dicom import to_bytes
from tests.orthanc import Orthanc

from .test_dicom_receiver import instance, slice_  # noqa: F401 - fixture


@pytest.fixture()
def orthanc(tmp_path):
    o = Orthanc(tmp_path / "orthanc", aet="PACS").start()
    yield o
    o.stop()


def test_orthanc_stores_a_study_into_the_receiver(instance, orthanc):  # noqa: F811
    rx, sessions = instance
    orthanc.add_peer("oncoscope", "ONCOSCOPE", rx.port)
    study = generate_uid()
    for n in range(1, 4):
        orthanc.upload(to_bytes(slice_(study, patient_id="MRN-PACS-1", n=n)))
    (orthanc_study,) = orthanc.get("/studies")
    job = orthanc.post("/modalities/oncoscope/store", {"Resources": [orthanc_study], "Synchronous": True})
    assert job["InstancesCount"] == 3 and job["FailedInstancesCount"] == 0, job
    with sessions() as s:
        (case,) = s.scalars(select(Case)).all()
        assert case.dicom_study_uid == study and case.patient.mrn == "MRN-PACS-1"
        jobs = s.scalars(select(Analysis.job_status).join(CaseImage).where(CaseImage.case_id == case.id)).all()
        assert jobs == ["queued"] * 3


def test_an_orthanc_whose_ae_title_is_not_allowed_is_refused(instance, tmp_path):  # noqa: F811
    rx, sessions = instance
    stranger = Orthanc(tmp_path / "stranger", aet="STRANGER").start()
    try:
        stranger.add_peer("oncoscope", "ONCOSCOPE", rx.port)
        stranger.upload(to_bytes(slice_(generate_uid())))
        (sid,) = stranger.get("/studies")
        with pytest.raises(Exception):  # Orthanc answers an error: the association was rejected
            stranger.post("/modalities/oncoscope/store", {"Resources": [sid], "Synchronous": True})
    finally:
        stranger.stop()
    rx.stop()
    with sessions() as s:
        assert s.scalar(select(Case.id)) is None
        got = s.scalars(select(AuditEvent.outcome).where(AuditEvent.actor == "AE STRANGER")).all()
    assert got and set(got) == {"denied"}


def test_dicomweb_query_retrieve_and_store_round_trip(orthanc):
    from oncoscope.services import dicomweb
    from tests.orthanc import PASSWORD, USER

    pacs = dicomweb.Client(orthanc.dicomweb, user=USER, password=PASSWORD)
    study = generate_uid()
    sent = [slice_(study, patient_id="MRN-QIDO", n=n) for n in (1, 2)]
    for ds in sent:
        ds.SeriesInstanceUID = sent[0].SeriesInstanceUID
        orthanc.upload(to_bytes(ds))
    (found,) = pacs.studies(patient_id="MRN-QIDO")
    assert found.study_uid == study and found.patient_id == "MRN-QIDO" and "MR" in found.modalities
    assert pacs.studies(patient_id="MRN-NOBODY") == []
    (series,) = pacs.series(study)
    assert series.modality == "MR" and series.instance_count in (None, 2)
    files = list(pacs.retrieve_series(study, series.series_uid))
    assert sorted(pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID for f in files) == sorted(d.SOPInstanceUID
                                                                                           for d in sent)
    # STOW: a new instance in the same study is stored, and read back through WADO
    extra = slice_(study, patient_id="MRN-QIDO", n=3)
    got = pacs.store([to_bytes(extra)], study)
    assert got.stored and not got.failed
    assert len(list(pacs.retrieve_series(study, extra.SeriesInstanceUID))) == 1
    # wrong credentials and an unreachable PACS are said plainly
    with pytest.raises(dicomweb.DicomWebError, match="refused our credentials"):
        dicomweb.Client(orthanc.dicomweb, user=USER, password="wrong").studies()
    with pytest.raises(dicomweb.DicomWebError, match="cannot be reached"):
        dicomweb.Client("http://127.0.0.1:9/dicom-web", timeout=2).studies()


def test_a_final_report_is_stored_to_the_pacs_and_read_back(instance, orthanc):  # noqa: F811
    """The receiver files a study; the report is signed; the delivery pump STOWs the SR (and SEG, when
    there is a mask) into Orthanc; the SR is then found in the same study through QIDO and WADO."""
    import datetime as dt

    from oncoscope.analyzers import registry
    from oncoscope.services import deliveries, dicomweb
    from oncoscope.store import cases as case_store
    from oncoscope.store.models import Delivery, SiteSetting, User
    from tests.orthanc import PASSWORD, USER

    rx, sessions = instance
    study = generate_uid()
    orthanc.add_peer("oncoscope", "ONCOSCOPE", rx.port)
    orthanc.upload(to_bytes(slice_(study, patient_id="MRN-STOW")))
    (sid,) = orthanc.get("/studies")
    orthanc.post("/modalities/oncoscope/store", {"Resources": [sid], "Synchronous": True})
    with sessions() as s:
        s.add(User(email="doc@clinic.test", name="Dr Lee", role="doctor", password_hash="x"))
        s.merge(SiteSetting(key=deliveries.SINCE_KEY, value={"at": "2000-01-01T00:00:00"}))
        case = s.scalar(select(Case))
        a = case.images[0].analysis
        a.job_status, a.result_status, a.label, a.confidence = "done", "ok", "glioma", 0.9
        a.malignant, a.probabilities, a.finished_at = True, {"glioma": 0.9}, dt.datetime(2026, 12, 4)
        case.status = "ready"
        s.flush()
        labels = case_store.diagnosis_labels(registry.get("brain-mri"))
        case_store.sign(s, case, s.scalar(select(User)), "glioma", labels,
                        uncertainty_note="x", confirm_unverified=True)
        s.commit()
    st = rx.settings
    st.dicomweb_url, st.dicomweb_user, st.dicomweb_password = orthanc.dicomweb, USER, PASSWORD
    pump = deliveries.DeliveryPump(sessions, st, rx.files)
    assert pump.run_once() == 1
    with sessions() as s:
        (d,) = s.scalars(select(Delivery)).all()
        assert (d.kind, d.status) == ("dicom", "sent") and d.detail["stored"]
    pacs = dicomweb.Client(orthanc.dicomweb, user=USER, password=PASSWORD)
    series = {x.modality: x for x in pacs.series(study)}
    assert set(series) == {"MR", "SR"}  # the report went into the study of its images
    (sr,) = list(pacs.retrieve_series(study, series["SR"].series_uid))
    ds = pydicom.dcmread(io.BytesIO(sr))
    assert ds.PatientID == "MRN-STOW" and ds.CompletionFlag == "COMPLETE" and ds.VerificationFlag == "VERIFIED"
    # the PACS going away: the delivery waits and says why, then a person can send it again
    st.dicomweb_url = "http://127.0.0.1:9/dicom-web"
    with sessions() as s:
        d = s.scalar(select(Delivery))
        d.status, d.review_version = "pending", 1
        deliveries.attempt(s, st, rx.files, d)
        assert d.status == "pending" and d.attempts == 2 and "cannot be reached" in d.last_error
        s.rollback()
