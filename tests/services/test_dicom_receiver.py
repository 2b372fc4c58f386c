"""The DICOM receiver (``services/dicom_receiver``) over a real DICOM association on a loopback port,
sent with pynetdicom's SCU: allowed and refused AE titles, one case per study with its analyses
queued, every refusal with its status, unrouted images in the inbox, and one audit entry per
association."""

from __future__ import annotations

import datetime as dt
import logging
import time

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from oncoscope.config import Settings
from oncoscope.ml import synthetic
from oncoscope.services.dicom_receiver import Receiver
from oncoscope.store.db import make_engine, make_session_factory
from oncoscope.store.files import FileStore
from oncoscope.store.models import Analysis, AuditEvent, Case, CaseImage, DicomInboxItem, Patient
from tests.databases import migrated_sqlite
from tests.imaging.test_dicom import make_dicom, to_bytes

pynetdicom = pytest.importorskip("pynetdicom")
MR = "1.2.840.10008.5.1.4.1.1.4"
CT = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


@pytest.fixture()
def instance(tmp_path):
    with migrated_sqlite(tmp_path) as s:
        s.add(Patient(mrn="MRN-KNOWN", family_name="Curie", given_name="Marie", birth_date=dt.date(1967, 11, 7),
                      sex="female"))
        s.commit()
    st = Settings.from_env(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                           dicom_allowed_aets=("MODALITY1", "PACS"), dicom_port=0).prepare()
    sessions = make_session_factory(make_engine(st.database_url))
    rx = Receiver(st, sessions, FileStore(st.images_dir), host="127.0.0.1", port=0)
    rx.start()
    yield rx, sessions
    rx.stop()


def slice_(study: str, patient_id: str = "MRN-NEW-1", name: str = "Lovelace^Ada", modality: str = "MR",
           sop_class: str = MR, body_part: str = "BRAIN", n: int = 1, **extra):
    grey = np.ascontiguousarray(synthetic.radiograph_like(n)[..., 0])
    ds = make_dicom(grey, modality=modality, sop_class=sop_class, patient_id=patient_id, patient_name=name,
                    extra={"BodyPartExamined": body_part, **extra})
    ds.StudyInstanceUID = study
    ds.InstanceNumber = n
    return ds


def send(rx, datasets, calling="MODALITY1", contexts=(MR,)):
    """C-STORE each dataset in one association; the statuses (None: not sent)."""
    ae = pynetdicom.AE(ae_title=calling)
    for uid in contexts:
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="ONCOSCOPE")
    if not assoc.is_established:
        return "refused"
    out = []
    for ds in datasets:
        try:
            st = assoc.send_c_store(ds)
            out.append(int(st.Status) if "Status" in st else None)
        except ValueError:  # no accepted presentation context for its SOP class
            out.append(None)
    assoc.release()
    return out


def audits(sessions):
    with sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == "dicom.association")
                              .order_by(AuditEvent.seq)))


def test_only_allowed_ae_titles_associate_and_every_association_is_audited(instance):
    rx, sessions = instance
    ae = pynetdicom.AE(ae_title="MODALITY1")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="ONCOSCOPE")
    assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
    assoc.release()
    assert send(rx, [slice_(generate_uid())], calling="STRANGER") == "refused"
    wrong_called = pynetdicom.AE(ae_title="MODALITY1")
    wrong_called.add_requested_context(MR)
    assert not wrong_called.associate("127.0.0.1", rx.port, ae_title="SOMEONEELSE").is_established
    rx.stop()  # (the close events are handled before the server thread ends)
    got = [(e.actor, e.outcome, e.details["accepted"]) for e in audits(sessions)]
    assert got == [("AE MODALITY1", "success", True), ("AE STRANGER", "denied", False),
                   ("AE MODALITY1", "denied", False)]
    assert audits(sessions)[0].ip == "127.0.0.1" and audits(sessions)[0].channel == "dicom"


def test_nobody_may_store_when_no_ae_title_is_allowed(tmp_path):
    with migrated_sqlite(tmp_path):
        pass
    st = Settings.from_env(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}").prepare()
    assert st.dicom_allowed_aets == ()
    sessions = make_session_factory(make_engine(st.database_url))
    rx = Receiver(st, sessions, FileStore(st.images_dir), host="127.0.0.1", port=0)
    rx.start()
    try:
        for calling in ("ONCOSCOPE", "ANY", ""):
            assert send(rx, [slice_(generate_uid())], calling=calling or "X") == "refused"
    finally:
        rx.stop()
    assert [e.outcome for e in audits(sessions)] == ["denied"] * 3


def test_a_study_becomes_one_case_with_one_queued_analysis_per_slice(instance):
    rx, sessions = instance
    study = generate_uid()
    assert send(rx, [slice_(study, n=i) for i in range(1, 6)]) == [0] * 5
    assert send(rx, [slice_(study, n=6)], calling="PACS") == [0]  # another sender, same study: same case
    with sessions() as s:
        (case,) = s.scalars(select(Case)).all()
        assert (case.analyzer_id, case.dicom_study_uid, case.status) == ("brain-mri", study, "analysing")
        assert case.patient.mrn == "MRN-NEW-1" and case.patient.display_name == "Lovelace, Ada"
        assert case.created_by_id is None and "MODALITY1" in case.clinical_note
        jobs = s.scalars(select(Analysis.job_status).join(CaseImage).where(CaseImage.case_id == case.id)).all()
        assert jobs == ["queued"] * 6
        assert {i.dicom_study_uid for i in case.images} == {study} and all(i.modality == "MR" for i in case.images)
    rx.stop()  # (waits for the thumbnails still queued)
    first = audits(sessions)[0]
    assert first.details["stored"] == 5 and first.details["cases"] == [case.id] and first.patient_id == case.patient_id
    # filed from the header, not analysed yet: the receiver made every thumbnail after answering
    with sessions() as s:
        shas = s.scalars(select(CaseImage.sha256)).all()
    assert len(shas) == 6 and all(rx.files.exists(sha, "thumb") for sha in shas)


def test_a_thumbnail_that_cannot_be_made_is_left_to_the_analysis(tmp_path, caplog):
    """Full queue: dropped, not waited for; an unreadable image: logged, the thread goes on; stop does
    not wait for the rest of the queue."""
    from oncoscope.services.dicom_receiver import Thumbnails

    caplog.set_level(logging.INFO, logger="oncoscope.services.dicom_receiver")
    files = FileStore(tmp_path / "images")
    thumbs = Thumbnails(files, size=1)
    good = files.put_original(to_bytes(slice_(generate_uid())))
    bad = files.put_original(b"DICM but not really")
    thumbs.add(bad)
    thumbs.add(good)  # (the queue holds one: dropped, the C-STORE is not held up)
    thumbs.start()
    thumbs.add(good)
    deadline = time.monotonic() + 10
    while not files.exists(good, "thumb") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert files.exists(good, "thumb")
    assert "no thumbnail for received image" in caplog.text
    later = [files.put_original(to_bytes(slice_(generate_uid(), n=i))) for i in range(2, 6)]
    thumbs = Thumbnails(files, size=10)
    thumbs.start()
    for sha in later:
        thumbs.add(sha)
    thumbs.stop()
    assert thumbs._thread is None and not all(files.exists(sha, "thumb") for sha in later)


def test_the_integration_readers_see_a_received_study_of_a_new_patient(instance):
    from oncoscope.store import patients as patient_store
    from oncoscope.store.models import User

    rx, sessions = instance
    with sessions() as s:
        s.add_all([User(email="reader@clinic.test", name="Dr Reader", role="doctor", password_hash="x"),
                   User(email="boss@clinic.test", name="Admin", role="admin", password_hash="x"),
                   User(email="left@clinic.test", name="Dr Left", role="doctor", password_hash="x", is_active=False)])
        s.commit()
    rx.settings.integration_readers = ("reader@clinic.test", "boss@clinic.test", "left@clinic.test")
    assert send(rx, [slice_(generate_uid(), patient_id="MRN-NEW-9")]) == [0]
    with sessions() as s:
        reader = s.scalar(select(User).where(User.email == "reader@clinic.test"))
        (case,) = s.scalars(select(Case)).all()
        assert [p.mrn for p in s.scalars(patient_store.visible_patients(reader))] == ["MRN-NEW-9"]
        assert [u.email for u in case.patient.doctors] == ["reader@clinic.test"]  # (not the admin, not a leaver)


def test_bad_input_is_refused_with_its_status_and_audited(instance, tmp_path, monkeypatch):
    rx, sessions = instance
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)  # a file goes as its meta says
    study = generate_uid()
    no_id = slice_(study, patient_id="")
    clash = slice_(generate_uid(), patient_id="MRN-KNOWN", name="Someone^Else")
    corrupt = slice_(generate_uid())
    corrupt.PixelData = b"\x00" * 10  # far too short for its rows and columns
    sr = make_dicom(None, sop_class=BASIC_TEXT_SR, modality="SR", patient_id="MRN-KNOWN", patient_name="Curie^Marie")
    # a file whose meta says MR (so it goes on the MR context) and whose dataset says CT (same length)
    raw = to_bytes(slice_(generate_uid()))
    body = raw.index(MR.encode(), raw.index(MR.encode()) + 1)
    mismatch_file = tmp_path / "mismatch.dcm"
    mismatch_file.write_bytes(raw[:body] + CT.encode() + raw[body + len(CT):])
    unknown = slice_(generate_uid(), sop_class="1.2.826.0.1.3680043.9.9999.1")
    statuses = send(rx, [no_id, clash, corrupt, sr, mismatch_file, unknown], contexts=(MR, BASIC_TEXT_SR,
                                                                                   "1.2.826.0.1.3680043.9.9999.1"))
    assert statuses == [0xC001, 0xC002, 0xC000, 0x0122, 0xA900, None]
    with sessions() as s:
        assert s.scalar(select(Case.id)) is None and s.scalar(select(DicomInboxItem.id)) is None
        known = s.scalar(select(Patient).where(Patient.mrn == "MRN-KNOWN"))
        assert known.family_name == "Curie"  # untouched
    rx.stop()
    (entry,) = audits(sessions)
    assert entry.outcome == "rejected" and entry.details["stored"] == 0
    assert [r[:6] for r in entry.details["refused"]] == ["0xC001", "0xC002", "0xC000", "0x0122", "0xA900"]
    assert entry.details["refused_contexts"] == ["1.2.826.0.1.3680043.9.9999.1"]


def test_unrouted_images_wait_in_the_inbox_and_duplicates_are_not_filed_twice(instance):
    rx, sessions = instance
    ct = slice_(generate_uid(), modality="CT", sop_class=CT, body_part="CHEST")
    assert send(rx, [ct, ct], contexts=(CT,)) == [0, 0]
    mr = slice_(generate_uid())
    assert send(rx, [mr, mr]) == [0, 0]
    with sessions() as s:
        (item,) = s.scalars(select(DicomInboxItem)).all()
        assert item.modality == "CT" and "No routing rule" in item.reason and item.patient.mrn == "MRN-NEW-1"
        assert s.scalar(select(Case.id).where(Case.dicom_study_uid == ct.StudyInstanceUID)) is None
        assert len(s.scalars(select(CaseImage)).all()) == 1
    rx.stop()
    assert [(e.details["stored"], e.details["inbox"], e.details["duplicates"]) for e in audits(sessions)] == [
        (0, 1, 1), (1, 0, 1)]
