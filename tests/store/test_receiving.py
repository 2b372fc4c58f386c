"""Filing received DICOM images (``store/receiving``) and LIS orders (``store/orders``) when several
associations or messages race, on SQLite, PostgreSQL and MariaDB (servers that do not answer are
skipped): one patient, one case per study, one case per order, every image filed once."""

from __future__ import annotations

import threading

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from oncoscope.analyzers import routing
from oncoscope.store import orders, receiving
from oncoscope.store.db import make_engine, make_session_factory
from oncoscope.store.files import FileStore
from oncoscope.store.models import Analysis, Case, CaseImage, Patient
from tests.imaging.test_dicom import to_bytes
from tests.services.test_dicom_receiver import slice_


@pytest.fixture()
def factory(any_db_url):
    engine = make_engine(any_db_url)
    yield make_session_factory(engine)
    engine.dispose()


def _together(n: int, work) -> list:
    """Run ``work(i)`` in ``n`` threads released at once; their results (or exceptions)."""
    gate, out = threading.Barrier(n), [None] * n

    def run(i):
        gate.wait()
        try:
            out[i] = work(i)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_associations_racing_on_one_new_study_make_one_patient_and_one_case(factory, tmp_path):
    store, study = FileStore(tmp_path / "images"), generate_uid()
    data = [to_bytes(slice_(study, patient_id="MRN-RACE-9", n=i + 1)) for i in range(4)]
    got = _together(4, lambda i: receiving.receive(factory, store, data[i], f"AE M{i}", routing.defaults(), 10**8))
    assert [g.kind for g in got] == ["filed"] * 4, got
    with factory() as s:
        assert s.scalar(select(func.count()).select_from(Patient)) == 1
        (case,) = s.scalars(select(Case)).all()
        assert case.dicom_study_uid == study and len(case.images) == 4
        assert s.scalar(select(func.count()).select_from(Analysis).join(CaseImage)
                        .where(CaseImage.case_id == case.id)) == 4
    again = receiving.receive(factory, store, data[0], "AE M0", routing.defaults(), 10**8)
    assert again.kind == "duplicate" and again.case_id == case.id


def test_the_same_order_sent_twice_at_once_is_one_case(factory):
    order = orders.Order(control="NW", placer="ORD-RACE", placer_app="LABSYS", test_code="brain-mri", test_text="",
                         mrn="MRN-ORDER-1", family="Hopper", given="Grace", sender="LABSYS^HOSP")

    got = _together(2, lambda _: orders.apply(factory, order))
    assert not any(isinstance(g, Exception) for g in got), got
    assert got[0][0] == got[1][0] and sorted(g[3] for g in got) == [False, True]
    with factory() as s:
        assert s.scalar(select(func.count()).select_from(Case)) == 1


def test_the_same_order_without_a_namespace_twice_at_once_for_a_known_patient_is_one_case(factory):
    """ORC-2.2 empty (common): the unique key still holds ('' is not NULL), and the race with a patient
    already on file (no race on the patient row) is settled by the retry."""
    with factory() as s:
        s.add(Patient(mrn="MRN-ORDER-2", family_name="Curie", given_name="Marie"))
        s.commit()
    order = orders.Order(control="NW", placer="ORD-NS", test_code="brain-mri", test_text="", mrn="MRN-ORDER-2",
                         family="Curie", sender="LABSYS")
    got = _together(3, lambda _: orders.apply(factory, order))
    assert not any(isinstance(g, Exception) for g in got), got
    assert len({g[0] for g in got}) == 1 and sum(g[3] for g in got) == 1
