"""Alembic migrations on every supported backend: SQLite, PostgreSQL and MariaDB/MySQL.

For each backend: upgrade an empty database to head, check the tables (and that the migrated
schema matches the models), round-trip one row of every model through the ORM (JSON columns,
dates, booleans, unicode, constraints, cascades), downgrade one revision at a time down to
nothing, check the tables are gone, and upgrade again.

PostgreSQL and MariaDB: a scratch database on the local servers for each test (tests/databases.py;
override the servers with ONCOSCOPE_TEST_PG_URL / ONCOSCOPE_TEST_MYSQL_URL). A server that does not
answer within 3 s is skipped with a message, never failed.
"""

from __future__ import annotations

import datetime as dt

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, delete, func, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from oncoscope.store import migrate
from oncoscope.store.db import make_engine, make_session_factory
from oncoscope.store.models import (Analysis, Base, Case, CaseImage, LoginThrottle, Patient, PatientAccess, Review,
                                    User)

from ..databases import scratch_database

APP_TABLES = {t.name for t in Base.metadata.sorted_tables}
SCRIPT = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
HEAD = SCRIPT.get_current_head()


def _drop_everything(url: str) -> None:
    eng = create_engine(url, poolclass=NullPool)
    try:
        with eng.begin() as c:
            Base.metadata.drop_all(c)  # only those that exist, children first
            c.execute(text("DROP TABLE IF EXISTS alembic_version"))
        assert not (set(inspect(eng).get_table_names()) & (APP_TABLES | {"alembic_version"}))
    finally:
        eng.dispose()


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def db_url(request, tmp_path):
    """An empty database: SQLite in a temporary folder, or a scratch database of its own on the
    local PostgreSQL / MariaDB server (dropped afterwards; a server that does not answer: skipped)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
        return
    with scratch_database(request.param) as url:
        yield url


def _tables(url: str) -> set[str]:
    eng = create_engine(url, poolclass=NullPool)
    try:
        return set(inspect(eng).get_table_names())
    finally:
        eng.dispose()


def _indexes(url: str, table: str) -> set[str]:
    eng = create_engine(url, poolclass=NullPool)
    try:
        return {ix["name"] for ix in inspect(eng).get_indexes(table)}
    finally:
        eng.dispose()


def _schema_drift(url: str) -> list:
    """What autogenerate would still change: the migrations must build exactly the models."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    eng = create_engine(url, poolclass=NullPool)
    try:
        with eng.connect() as c:
            mc = MigrationContext.configure(c, opts={"compare_type": True})
            diff = compare_metadata(mc, Base.metadata)
    finally:
        eng.dispose()
    return diff


PROBS = {"Benign": 0.125, "Early": 0.5, "Pre": 0.25, "Pro": 0.125}  # exact in binary floating point
CELLS = [{"id": 1, "area_px": 412.5, "equivalent_diameter_px": 22.75, "circularity": 0.875, "bbox": [1, 2, 30, 40]},
         {"id": 2, "area_px": 380.0, "equivalent_diameter_px": 21.5, "circularity": 0.75, "bbox": [50, 60, 70, 80]}]
MESSAGES = ["Out of domain: “quoted” ünïcode ✓", "line\nbreak"]


def _roundtrip(url: str) -> None:
    engine = make_engine(url)  # the app's engine (SQLite: foreign keys on)
    factory = make_session_factory(engine)
    try:
        with factory() as s:
            u = User(email="rt@clinic.test", name="Zoë Round-Trip", role="doctor", password_hash="$argon2id$" + "x" * 87)
            s.add(LoginThrottle(key="ab" * 32, attempts=3, locked_until=dt.datetime(2026, 1, 2, 3, 4, 5),
                                updated_at=dt.datetime(2026, 1, 2, 3, 0, 0)))
            p = Patient(mrn="RT-0001", family_name="Øster-Łukasz", given_name="Ana", birth_date=dt.date(1950, 12, 31),
                        sex="female", notes="line one\nline two")
            s.add_all([u, p])
            s.flush()
            p.created_by_id = u.id
            s.add(PatientAccess(patient_id=p.id, user_id=u.id))
            c = Case(patient_id=p.id, analyzer_id="smear-all", clinical_note="fever", created_by_id=u.id,
                     status="signed", final_diagnosis="Benign")
            img = CaseImage(case=c, sha256="ab" * 32, original_filename="field 1.png", content_type="PNG", width=224,
                            height=200, size_bytes=86_710, uploaded_by_id=u.id)
            a = Analysis(image=img, analyzer_id="smear-all", job_status="done", attempts=1, result_status="ok",
                         label="Benign", confidence=0.875, malignant=False, malignant_probability=0.0625,
                         probabilities=PROBS, cell_count=2, cells=CELLS, messages=MESSAGES,
                         timings_ms={"total": 12.5, "segment": 4.25}, model_version="1.0.0", model_sha256="ef" * 32)
            r = Review(case=c, version=1, ai_label="Benign", ai_status="ok", final_diagnosis="Benign", agrees_with_ai=True,
                       comment="<b>kept as text</b>", signed_by_id=u.id, content_sha256="cd" * 32)
            s.add_all([c, img, a, r])
            s.commit()
            ids = {"user": u.id, "patient": p.id, "case": c.id, "image": img.id, "analysis": a.id, "review": r.id}

        with factory() as s:  # a new session: values come from the database, not the identity map
            u = s.get(User, ids["user"])
            assert (u.email, u.name, u.role, u.is_active, u.session_version) == \
                ("rt@clinic.test", "Zoë Round-Trip", "doctor", True, 1)
            assert isinstance(u.created_at, dt.datetime)
            t = s.get(LoginThrottle, "ab" * 32)
            assert (t.attempts, t.locked_until) == (3, dt.datetime(2026, 1, 2, 3, 4, 5))
            p = s.get(Patient, ids["patient"])
            assert (p.family_name, p.birth_date, p.notes, p.created_by_id) == \
                ("Øster-Łukasz", dt.date(1950, 12, 31), "line one\nline two", u.id)
            assert [d.id for d in p.doctors] == [u.id] and [c.id for c in p.cases] == [ids["case"]]
            c = s.get(Case, ids["case"])
            assert (c.status, c.final_diagnosis, c.patient.mrn, c.revision) == ("signed", "Benign", "RT-0001", 0)
            assert [i.id for i in c.images] == [ids["image"]] and c.current_review.id == ids["review"]
            a = c.images[0].analysis
            assert a.id == ids["analysis"]
            assert a.probabilities == PROBS and a.cells == CELLS and a.messages == MESSAGES
            assert a.timings_ms == {"total": 12.5, "segment": 4.25}
            assert a.malignant is False and a.confidence == 0.875 and a.malignant_probability == 0.0625
            assert (a.cell_count, a.job_status, a.model_sha256) == (2, "done", "ef" * 32)
            r = c.current_review
            assert r.agrees_with_ai is True and r.comment == "<b>kept as text</b>" and r.signed_by.email == u.email
            assert (r.override_reason, r.uncertainty_note, r.amendment_reason) == ("", "", "")

        # constraints: MRN unique, one image per content hash per case, one review per version
        for row in (lambda: Patient(mrn="RT-0001", family_name="Dup"),
                    lambda: CaseImage(case_id=ids["case"], sha256="ab" * 32, width=1, height=1, size_bytes=1),
                    lambda: Review(case_id=ids["case"], version=1, final_diagnosis="Pre", agrees_with_ai=False,
                                   signed_by_id=ids["user"], content_sha256="0" * 64)):
            with factory() as s:
                s.add(row())
                with pytest.raises(IntegrityError):
                    s.commit()

        # ON DELETE CASCADE from a patient down to access rows, cases, images, analyses and reviews
        with factory() as s:
            s.execute(delete(Patient).where(Patient.id == ids["patient"]))
            s.commit()
            for model in (PatientAccess, Case, CaseImage, Analysis, Review):
                assert s.scalar(select(func.count()).select_from(model)) == 0, model.__name__
            assert s.get(User, ids["user"]) is not None
            s.execute(delete(User))
            s.execute(delete(LoginThrottle))
            s.commit()
    finally:
        engine.dispose()


def test_upgrade_roundtrip_downgrade_upgrade(db_url):
    assert not (_tables(db_url) & APP_TABLES)
    migrate.upgrade(db_url)
    assert migrate.current(db_url) == HEAD
    assert APP_TABLES | {"alembic_version"} <= _tables(db_url)
    assert _schema_drift(db_url) == []
    _roundtrip(db_url)

    # down one revision at a time: each step lands on its parent revision
    rev = SCRIPT.get_revision(HEAD)
    while rev is not None:
        before = _indexes(db_url, "patient_access") if "patient_access" in _tables(db_url) else set()
        migrate.downgrade(db_url)  # "-1"
        assert migrate.current(db_url) == rev.down_revision
        if rev.revision == "74f0fd37c2b6":  # index patient access by user
            assert "ix_patient_access_user" in before
            assert "ix_patient_access_user" not in _indexes(db_url, "patient_access")
        rev = SCRIPT.get_revision(rev.down_revision) if rev.down_revision else None
    assert migrate.current(db_url) is None
    assert not (_tables(db_url) & APP_TABLES), _tables(db_url)

    # and back up: the same schema again, usable
    migrate.upgrade(db_url)
    assert migrate.current(db_url) == HEAD
    assert APP_TABLES <= _tables(db_url) and _schema_drift(db_url) == []
    _roundtrip(db_url)


def test_one_step_down_and_up_from_head(db_url):
    migrate.upgrade(db_url)
    previous = SCRIPT.get_revision(HEAD).down_revision
    migrate.downgrade(db_url)
    assert migrate.current(db_url) == previous
    if previous is None:
        assert not (_tables(db_url) & APP_TABLES)
    migrate.upgrade(db_url)
    assert migrate.current(db_url) == HEAD and _schema_drift(db_url) == []
