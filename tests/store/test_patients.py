"""Patient store: the MRN character set, and search text taken literally (``%`` and ``_`` are not
wildcards) on every backend: SQLite always, PostgreSQL and MariaDB when their local test servers
answer (a scratch database each: tests/databases.py)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from oncoscope.store import cases as case_store
from oncoscope.store import patients as patient_store
from oncoscope.store.db import standalone_session
from oncoscope.store.models import Case, Patient, User



@pytest.mark.parametrize("mrn", ["MRN-A-0001", "0012345", "2023/000123", "AB 12.3_x", "a" * 64, "7"])
def test_valid_mrns(mrn):
    assert patient_store.mrn_problem(mrn) is None


@pytest.mark.parametrize("mrn,message", [
    ("B-001\\ZZ", "may contain only"), ("A|B", "may contain only"), ("A^B", "may contain only"),
    ("A~B", "may contain only"), ("A&B", "may contain only"), ("A=B", "may contain only"),
    ("A%B", "may contain only"), ("A\nB", "may contain only"), ("A\tB", "may contain only"),
    ("MRN-Ü-1", "may contain only"), ("１２３", "may contain only"), ("-123", "may contain only"),
    ("=1+1", "may contain only"), ("/etc", "may contain only"), ("a" * 65, "At most 64"), ("", "Enter"),
])
def test_invalid_mrns(mrn, message):
    assert message in patient_store.mrn_problem(mrn)


@pytest.fixture()
def session(any_db_url):
    with standalone_session(any_db_url) as s:
        yield s


def _world(s) -> tuple[User, dict[str, int]]:
    admin = User(email="admin@clinic.test", name="Admin", role="admin", password_hash="x")
    s.add(admin)
    s.flush()
    ids = {}
    for mrn, family in [("S_1", "Under_score"), ("SX1", "Underxscore"), ("P-1", "Fifty%Off"), ("P-2", "Fifty Off"),
                        ("SL-1", "Slash/Name"), ("SL-2", "SlashXName")]:
        p = Patient(mrn=mrn, family_name=family, given_name="")
        s.add(p)
        s.flush()
        s.add(Case(patient_id=p.id, analyzer_id="smear-all", created_by_id=admin.id))
        ids[family] = p.id
    s.commit()
    return admin, ids


def _found(page) -> set[str]:
    return {p.family_name for p in page.items} if page.items and isinstance(page.items[0], Patient) else \
        {c.patient.family_name for c in page.items}


@pytest.mark.parametrize("text,expected", [
    ("_", {"Under_score"}), ("r_s", {"Under_score"}), ("%", {"Fifty%Off"}), ("y%O", {"Fifty%Off"}),
    ("/", {"Slash/Name"}), ("h/N", {"Slash/Name"}),  # the escape character itself is literal too
    ("Under", {"Under_score", "Underxscore"}), ("  Fifty ", {"Fifty%Off", "Fifty Off"}),
])
def test_search_and_history_take_wildcards_literally(session, text, expected):
    admin, _ = _world(session)
    assert _found(patient_store.search(session, admin, text, 1, 100)) == expected
    assert _found(case_store.history(session, admin, text=text, per_page=100)) == expected


def test_mrn_prefix_search_is_literal(session):
    admin, _ = _world(session)
    assert _found(patient_store.search(session, admin, "S_", 1, 100)) == {"Under_score"}  # not SX1
    assert _found(patient_store.search(session, admin, "SX1", 1, 100)) == {"Underxscore"}
    assert _found(case_store.history(session, admin, text="S_1", per_page=100)) == {"Under_score"}  # exact MRN


def test_create_refuses_a_bad_mrn_and_pre_fill_lookup_is_exact(session):
    admin, ids = _world(session)
    with pytest.raises(patient_store.PatientError) as exc:
        patient_store.create(session, admin, {"mrn": "B-001\\ZZ", "family_name": "Doe"})
    assert exc.value.field == "mrn" and "may contain only" in str(exc.value)
    session.rollback()
    p = patient_store.create(session, admin, {"mrn": "  2023/0001 ", "family_name": "Doe"})
    assert p.mrn == "2023/0001"
    assert patient_store.get_visible_by_mrn(session, admin, "SX1").id == ids["Underxscore"]
    assert patient_store.get_visible_by_mrn(session, admin, "S") is None
    assert session.scalar(select(Patient.id).where(Patient.mrn == "S_1")) == ids["Under_score"]


def test_a_patient_stored_before_the_mrn_rule_stays_editable_and_is_listed(session):
    admin = User(email="admin@clinic.test", name="Admin", role="admin", password_hash="x")
    legacy = Patient(mrn="OLD\\7", family_name="Legacy")  # written before the rule existed
    session.add_all([admin, legacy])
    session.commit()
    assert patient_store.legacy_mrns(session) == [(legacy.id, "OLD\\7")]
    values = {"mrn": legacy.mrn, "family_name": "Legacy", "given_name": "Lee", "sex": "unknown", "notes": "x"}
    patient_store.update(session, legacy, values)  # the MRN unchanged: accepted as it is
    session.commit()
    assert legacy.given_name == "Lee"
    with pytest.raises(patient_store.PatientError, match="may contain only"):
        patient_store.update(session, legacy, dict(values, mrn="OLD|8"))  # a new bad MRN is refused
    session.rollback()
    patient_store.update(session, legacy, dict(values, mrn="OLD-7"))  # corrected
    session.commit()
    assert patient_store.legacy_mrns(session) == []


def test_search_finds_a_patient_however_people_type_the_name_or_birth_date(session):
    import datetime as dt

    admin = User(email="a2@clinic.test", name="Admin", role="admin", password_hash="x")
    session.add_all([admin, Patient(mrn="N-1", family_name="García López", given_name="María José",
                                    birth_date=dt.date(1980, 2, 3)),
                     Patient(mrn="N-2", family_name="Maria", given_name="Lopez", birth_date=dt.date(1990, 1, 1))])
    session.commit()
    mrns = lambda text: {p.mrn for p in patient_store.search(session, admin, text, 1, 100).items}  # noqa: E731
    assert mrns("García, María") == {"N-1"}  # "Family, Given"
    assert mrns("María García") == {"N-1"}  # "Given Family"
    assert mrns("maría josé garcía lópez") == {"N-1"}  # any case, every word somewhere in the name
    assert mrns("maria, lopez") >= {"N-2"}  # (MariaDB's collation may also find N-1 without its accents)
    assert mrns("1980-02-03") == {"N-1"} and mrns("03.02.1980") == {"N-1"} and mrns("01/01/1990") == {"N-2"}
    assert mrns("N-") == {"N-1", "N-2"} and mrns("N-2") == {"N-2"}
    assert mrns("García Smith") == set()  # every word must match
    assert _found(case_store.history(session, admin, text="García, María", per_page=100)) == set()  # no cases
