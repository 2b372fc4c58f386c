"""LIS orders over MLLP (``services/lis``) on a loopback port: an OML^O33 or ORM^O01 places a pending
case (accession, placer number, priority, analyzer), a repeat is answered AA without a second case,
bad orders get AE or AR with the reason, a cancellation cancels an untouched case; the study with the
order's accession is filed into it; the result goes back as ORU^R01 referencing the order."""

from __future__ import annotations

import datetime as dt
import socket
import socketserver
import threading

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from oncoscope.analyzers import registry, routing
from oncoscope.config import Settings
from oncoscope.reports.hl7v2 import send_mllp
from oncoscope.services import deliveries
from oncoscope.services.lis import LisListener
from oncoscope.store import cases as case_store
from oncoscope.store import receiving
from oncoscope.store.db import make_engine, make_session_factory
from oncoscope.store.files import FileStore
from oncoscope.store.models import Analysis, AuditEvent, Case, Delivery, Patient, SiteSetting, User
from tests.databases import migrated_sqlite
from tests.imaging.test_dicom import to_bytes

from .test_dicom_receiver import slice_


def oml(placer="ORD-1001", test="brain-mri^Brain MRI tumour screen", mrn="MRN-LIS-1", name="Hopper^Grace",
        birth="19061209", priority="S", control="NW", kind="OML^O33^OML_O33", msg_id="M1"):
    return "\r".join([
        f"MSH|^~\\&|LABSYS|HOSP|ONCOSCOPE|LAB|20261204101500||{kind}|{msg_id}|P|2.5.1",
        f"PID|1||{mrn}^^^HOSP^MR||{name}||{birth}|F",
        f"ORC|{control}|{placer}^LABSYS||||||||||1234^Curie^Marie",
        f"TQ1|1||||||||{priority}",
        f"OBR|1|{placer}^LABSYS||{test}||||||||||||||ACC-{placer}",
    ])


def exchange(port: int, message: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"\x0b" + message.encode() + b"\x1c\r")
        data = b""
        while not data.endswith(b"\x1c\r"):
            data += c.recv(65536)
    return data[1:-2].decode()


def msa(answer: str) -> list[str]:
    return next(s for s in answer.split("\r") if s.startswith("MSA")).split("|")


@pytest.fixture()
def lis(tmp_path):
    with migrated_sqlite(tmp_path) as s:
        s.add(Patient(mrn="MRN-KNOWN", family_name="Curie", given_name="Marie", birth_date=dt.date(1967, 11, 7)))
        s.add(User(email="doc@clinic.test", name="Dr Lee", role="doctor", password_hash="x"))
        s.commit()
    st = Settings.from_env(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                           lis_allowed_hosts=("127.0.0.1",)).prepare()
    sessions = make_session_factory(make_engine(st.database_url))
    server = LisListener(st, sessions, host="127.0.0.1", port=0).start()
    yield st, sessions, server
    server.shutdown()
    server.server_close()


def test_an_order_places_one_pending_case_and_a_repeat_places_none(lis):
    st, sessions, server = lis
    ack = send_mllp(oml(), "127.0.0.1", server.port)  # (raises unless AA)
    assert msa(ack)[1:3] == ["AA", "M1"]
    assert msa(send_mllp(oml(msg_id="M2"), "127.0.0.1", server.port))[1] == "AA"
    orm = oml(placer="ORD-2", kind="ORM^O01", test="BRAINMR^Brain MR", priority="R", msg_id="M3")
    assert msa(exchange(server.port, orm))[1] == "AE"  # test code not known without ONCOSCOPE_LIS_TESTS
    with sessions() as s:
        (case,) = s.scalars(select(Case)).all()
        assert (case.analyzer_id, case.priority, case.status) == ("brain-mri", "stat", "open")
        assert (case.accession_number, case.placer_order) == ("ACC-ORD-1001", "ORD-1001")
        assert case.placer_app == "LABSYS" and "Curie" in case.clinical_note
        assert case.patient.display_name == "Hopper, Grace" and case.patient.birth_date == dt.date(1906, 12, 9)
        entries = s.scalars(select(AuditEvent).where(AuditEvent.action == "lis.order").order_by(AuditEvent.seq)).all()
    assert [(e.outcome, e.details.get("created")) for e in entries] == [("success", True), ("success", False),
                                                                        ("rejected", None)]
    assert entries[0].channel == "hl7" and entries[0].patient_id == case.patient_id


def test_test_codes_map_through_the_table_and_bad_orders_say_why(lis, monkeypatch):
    st, sessions, server = lis
    server.desk.tests_table = "BRAINMR=brain-mri"
    orm = oml(placer="ORD-2", kind="ORM^O01", test="BRAINMR^Brain MR", priority="R", msg_id="M3")
    assert msa(exchange(server.port, orm))[1] == "AA"
    clash = exchange(server.port, oml(placer="ORD-3", mrn="MRN-KNOWN", name="Other^Person"))
    assert msa(clash)[1] == "AE" and "family name" in clash and clash.split("\r")[2].startswith("ERR")
    assert msa(exchange(server.port, oml(placer="ORD-4", kind="ADT^A01")))[1] == "AR"
    assert msa(exchange(server.port, "garbage without an MSH"))[1] == "AR"
    assert msa(exchange(server.port, oml(placer="")))[1] == "AR"
    with sessions() as s:
        (case,) = s.scalars(select(Case)).all()
        assert case.priority == "routine" and case.analyzer_id == "brain-mri"


def test_a_cancelled_order_cancels_its_untouched_case(lis):
    st, sessions, server = lis
    send_mllp(oml(), "127.0.0.1", server.port)
    assert msa(exchange(server.port, oml(control="CA", msg_id="M9")))[1] == "AA"
    with sessions() as s:
        (case,) = s.scalars(select(Case)).all()
        assert case.status == "cancelled" and "LABSYS" in case.cancel_reason
    assert msa(exchange(server.port, oml(placer="ORD-UNKNOWN", control="CA")))[1] == "AE"


class _HisAck(socketserver.BaseRequestHandler):
    """The hospital system receiving results: records each message, answers AA."""

    def handle(self):
        data = b""
        while not data.endswith(b"\x1c\r"):
            chunk = self.request.recv(65536)
            if not chunk:
                return
            data += chunk
        text = data[1:-2].decode()
        self.server.got.append(text)
        control = text.split("\r")[0].split("|")[9]
        self.request.sendall(b"\x0b" + f"MSH|^~\\&|HIS|HOSP|ONCOSCOPE|LAB|20260101||ACK|A1|P|2.5.1\rMSA|AA|{control}"
                             .encode() + b"\x1c\r")


def test_the_ordered_study_fills_the_case_and_the_result_answers_the_order(lis, tmp_path):
    st, sessions, server = lis
    send_mllp(oml(), "127.0.0.1", server.port)
    files = FileStore(st.images_dir)
    ds = slice_(generate_uid(), patient_id="MRN-LIS-1", name="Hopper^Grace", AccessionNumber="ACC-ORD-1001",
                PatientBirthDate="19061209")
    got = receiving.receive(sessions, files, to_bytes(ds), "AE MODALITY1", routing.defaults(), 10**8)
    assert got.kind == "filed"
    with sessions() as s:
        (case,) = s.scalars(select(Case)).all()
        assert case.id == got.case_id and case.dicom_study_uid == ds.StudyInstanceUID and len(case.images) == 1
        a = s.scalar(select(Analysis))
        a.job_status, a.result_status, a.label, a.confidence = "done", "ok", "glioma", 0.9
        a.malignant, a.probabilities, a.finished_at = True, {"glioma": 0.9}, dt.datetime(2026, 12, 4)
        case.status = "ready"
        s.flush()
        labels = case_store.diagnosis_labels(registry.get("brain-mri"))
        case_store.sign(s, case, s.scalar(select(User)), "glioma", labels, uncertainty_note="x",
                        confirm_unverified=True)
        s.commit()
    his = socketserver.TCPServer(("127.0.0.1", 0), _HisAck)
    his.got = []
    threading.Thread(target=his.serve_forever, daemon=True).start()
    try:
        st.hl7_host, st.hl7_port = "127.0.0.1", his.server_address[1]
        with sessions() as s:
            s.execute(Delivery.__table__.delete())
            s.merge(SiteSetting(key=deliveries.SINCE_KEY, value={"at": "2000-01-01T00:00:00"}))
            s.commit()
        pump = deliveries.DeliveryPump(sessions, st, files)
        assert pump.run_once() == 1
        assert pump.run_once() == 0  # sent once
    finally:
        his.shutdown()
        his.server_close()
    (oru,) = his.got
    segs = {seg.split("|")[0]: seg.split("|") for seg in oru.split("\r")}
    assert segs["MSH"][8].startswith("ORU^R01")
    assert segs["ORC"][1] == "RE" and segs["ORC"][2] == "ORD-1001^LABSYS"
    assert segs["OBR"][2] == "ORD-1001^LABSYS" and segs["OBR"][18] == "ACC-ORD-1001"
    with sessions() as s:
        (d,) = s.scalars(select(Delivery)).all()
        assert (d.kind, d.status, d.attempts) == ("oru", "sent", 1) and "MSA|AA" in d.detail["ack"]


def test_only_listed_hosts_may_send_orders_and_acks_echo_nothing_raw(lis):
    st, sessions, server = lis
    server.allowed = set()  # as with ONCOSCOPE_LIS_ALLOWED_HOSTS unset
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as c:
        c.sendall(b"\x0b" + oml().encode() + b"\x1c\r")
        assert c.recv(100) == b""  # closed unanswered
    server.allowed = {"127.0.0.1"}
    forged = exchange(server.port, oml(msg_id="C1\\F\\AR", test="nope^Unknown"))
    msh, msa_seg, err = forged.split("\r")
    assert msa_seg.split("|")[:3] == ["MSA", "AE", "C1\\F\\AR"]  # the delimiter stays escaped
    assert err.startswith("ERR|||207^Application internal error^HL70357|E")
    wrong = exchange(server.port, oml(kind="ADT^A01"))
    assert "200^Unsupported message type" in wrong
    assert msa(exchange(server.port, oml(control="XO", placer="ORD-9")))[1] == "AE"
    with sessions() as s:
        assert s.scalars(select(AuditEvent.outcome).where(AuditEvent.action == "lis.connection")).all() == ["denied"]
        assert s.scalar(select(Case.id)) is None


def test_the_mrn_is_the_identifier_of_type_mr_and_latin1_names_survive(lis):
    st, sessions, server = lis
    msg = oml(mrn="123-45-6789^^^SSA^SS~MRN-LIS-7^^^HOSP^MR", name="Müller^Jürgen")
    msg = msg.replace("|P|2.5.1", "|P|2.5.1||||||8859/1", 1)  # MSH-18
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as c:
        c.sendall(b"\x0b" + msg.encode("latin-1") + b"\x1c\r")
        answer = c.recv(65536)[1:-2].decode("latin-1")
    assert "MSA|AA" in answer and answer.split("\r")[0].split("|")[17] == "8859/1"  # MSH-18, as asked
    with sessions() as s:
        p = s.scalar(select(Case)).patient
        assert (p.mrn, p.family_name, p.given_name) == ("MRN-LIS-7", "Müller", "Jürgen")


def test_a_patient_an_order_creates_is_given_to_the_integration_readers(lis):
    """ONCOSCOPE_INTEGRATION_READERS: listed staff see the new patient; an unknown address is skipped."""
    from oncoscope.store import patients as patient_store
    from oncoscope.store.models import PatientAccess

    st, sessions, server = lis
    st.integration_readers = ("doc@clinic.test", "nobody@clinic.test")
    assert msa(exchange(server.port, oml()))[1] == "AA"
    known = oml(placer="ORD-2", mrn="MRN-KNOWN", name="Curie^Marie", birth="19671107")
    assert msa(exchange(server.port, known))[1] == "AA"
    with sessions() as s:
        doc = s.scalar(select(User).where(User.email == "doc@clinic.test"))
        new = s.scalar(select(Patient).where(Patient.mrn == "MRN-LIS-1"))
        assert s.scalars(select(PatientAccess.user_id).where(PatientAccess.patient_id == new.id)).all() == [doc.id]
        assert patient_store.get_visible(s, doc, new.id) is not None
        known = s.scalar(select(Patient).where(Patient.mrn == "MRN-KNOWN"))  # (an existing patient keeps its staff)
        assert patient_store.get_visible(s, doc, known.id) is None
        assert patient_store.unmatched_readers(s, st.integration_readers) == ["nobody@clinic.test"]
