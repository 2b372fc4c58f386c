"""Deliveries (``services/deliveries``): planned once per signed report version, claimed by one pump
(several servers may run one), a delivery that fails in an unforeseen way recorded like any failed
try without blocking the others, and given up after the configured number of tries."""

from __future__ import annotations

import datetime as dt
import socketserver
import threading

import pytest
from sqlalchemy import select

from oncoscope.config import Settings
from oncoscope.services import deliveries
from oncoscope.store import cases as case_store
from oncoscope.store.db import make_engine, make_session_factory
from oncoscope.store.files import FileStore
from oncoscope.store.models import Analysis, Case, CaseImage, Delivery, Patient, SiteSetting, User
from tests.databases import migrated_sqlite

from .test_lis import _HisAck

LABELS = ["Benign", "Early", "Pre", "Pro", "Nondiagnostic"]


@pytest.fixture()
def site(tmp_path):
    his = socketserver.TCPServer(("127.0.0.1", 0), _HisAck)
    his.got = []
    threading.Thread(target=his.serve_forever, daemon=True).start()
    with migrated_sqlite(tmp_path) as s:
        user = User(email="doc@clinic.test", name="Dr Lee", role="doctor", password_hash="x")
        patient = Patient(mrn="MRN-DEL-1", family_name="Doe", given_name="Jane", birth_date=dt.date(1980, 2, 3))
        s.add_all([user, patient, SiteSetting(key=deliveries.SINCE_KEY, value={"at": "2000-01-01T00:00:00"})])
        s.flush()
        for n in range(2):
            case = case_store.create_case(s, user, patient, "smear-all")
            case.placer_order, case.placer_app = f"ORD-{n}", "LABSYS"
            img = CaseImage(case_id=case.id, sha256=f"{n:064x}", original_filename="f.png", content_type="PNG",
                            width=64, height=48, size_bytes=1)
            s.add(img)
            s.flush()
            s.add(Analysis(image_id=img.id, analyzer_id="smear-all", job_status="done", attempts=1,
                           result_status="ok", label="Pre", confidence=0.8, malignant=True,
                           probabilities={"Pre": 0.8, "Benign": 0.2}, finished_at=dt.datetime(2026, 1, 2)))
            case.status = "ready"
            s.flush()
            s.refresh(case)
            case_store.sign(s, case, user, "Pre", LABELS, comment="Blasts.")
        s.commit()
    st = Settings.from_env(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                           hl7_host="127.0.0.1", hl7_port=his.server_address[1], delivery_max_attempts=2).prepare()
    yield st, make_session_factory(make_engine(st.database_url)), FileStore(st.images_dir), his
    his.shutdown()
    his.server_close()


def test_a_broken_delivery_is_recorded_and_does_not_block_the_next(site):
    st, sessions, files, his = site
    with sessions() as s:
        s.get(Case, 1).analyzer_id = "an-analyzer-removed-since"  # its report can no longer be built
        s.commit()
    pump = deliveries.DeliveryPump(sessions, st, files)
    assert pump.run_once() == 1
    with sessions() as s:
        rows = {d.case_id: d for d in s.scalars(select(Delivery))}
        assert rows[2].status == "sent" and rows[2].kind == "oru"
        assert rows[1].status == "pending" and rows[1].attempts == 1 and "removed" in rows[1].last_error
        rows[1].next_attempt_at = dt.datetime(2000, 1, 1)
        s.commit()
    assert len(his.got) == 1 and "ORD-1^LABSYS" in his.got[0]
    pump.run_once()
    with sessions() as s:
        d = s.get(Delivery, rows[1].id)
        assert (d.status, d.attempts) == ("failed", 2)  # delivery_max_attempts=2: given up, for a person
        deliveries.send_again(s, d)
        assert (d.status, d.attempts) == ("pending", 0)
        with pytest.raises(ValueError, match="already sent"):
            deliveries.send_again(s, s.get(Delivery, rows[2].id))


def test_one_pump_claims_a_delivery_and_planning_twice_plans_once(site):
    st, sessions, files, his = site
    with sessions() as s:
        assert deliveries.plan(s, st) == 2 and deliveries.plan(s, st) == 0
        s.commit()
        first = s.scalar(select(Delivery.id).order_by(Delivery.id))
    with sessions() as a, sessions() as b:
        assert deliveries._claim(a, first) is True
        assert deliveries._claim(b, first) is False  # the other server's pump leaves it alone


def test_every_try_is_audited(site):
    from oncoscope.store.models import AuditEvent

    st, sessions, files, his = site
    deliveries.DeliveryPump(sessions, st, files).run_once()
    with sessions() as s:
        got = s.scalars(select(AuditEvent).where(AuditEvent.action == "delivery.send")).all()
    assert sorted((e.outcome, e.details["kind"]) for e in got) == [("success", "oru"), ("success", "oru")]
    assert {e.resource_id for e in got} == {"1", "2"} and all(e.patient_id for e in got)
