"""Fixtures for the clinical web app tests.

Every test gets its own ONCOSCOPE home (SQLite database + image store) copied from a seed that is
built once per session:

* ``empty`` seed: database upgraded to head with Alembic, no users (first-run setup).
* ``world`` seed: the empty seed plus admin / doctor A / doctor B / a spare doctor, patient 1
  (assigned to doctor A) with case 1 holding one analysed generated image, and patient 2
  (assigned to doctor B) with case 2 holding one analysed image. Generated images are rightly
  rejected by the out-of-domain gate, so both analyses end ``out_of_domain`` (no overlays).

Copying a seed costs milliseconds, so tests stay isolated without re-running migrations and
analyses. Analyses run inline with ``WorkerPool.run_one()``; no worker threads are started.
Password hashing uses cheap argon2 parameters (test speed only; production parameters are not
changed).
"""

from __future__ import annotations

import io
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from PIL import Image

from oncoscope.config import Settings
from oncoscope.services.jobs import WorkerPool
from oncoscope.ml import synthetic
from oncoscope.store import migrate
from oncoscope.store import users as user_store
from oncoscope.store.db import make_engine, make_session_factory
from oncoscope.web import create_app

ENV_VARS = ("ONCOSCOPE_HOME", "DATABASE_URL", "ONCOSCOPE_SECRET_KEY", "ONCOSCOPE_MAX_UPLOAD_MB",
            "ONCOSCOPE_SESSION_IDLE_MINUTES", "ONCOSCOPE_LOGIN_MAX_FAILURES", "ONCOSCOPE_LOGIN_LOCK_MINUTES",
            "ONCOSCOPE_ANALYSIS_WORKERS", "ONCOSCOPE_CLINIC_NAME", "ONCOSCOPE_SECURE_COOKIES",
            "ONCOSCOPE_QUEUE_URL", "ONCOSCOPE_IMAGES_DIR", "ONCOSCOPE_JOB_LEASE_SECONDS", "ONCOSCOPE_JOB_TIMEOUT_SECONDS")


@dataclass(frozen=True)
class Account:
    key: str
    email: str
    name: str
    password: str
    role: str
    id: int = 0


# ids are deterministic: accounts are created in this order in a fresh database
ADMIN = Account("admin", "admin@clinic.test", "Ada Admin", "admin-pass-123!", "admin", 1)
DOC_A = Account("doc_a", "doctor.a@clinic.test", "Dr Alice A", "doctor-a-pass-123!", "doctor", 2)
DOC_B = Account("doc_b", "doctor.b@clinic.test", "Dr Bob B", "doctor-b-pass-123!", "doctor", 3)
SPARE = Account("spare", "spare@clinic.test", "Dr Spare S", "spare-pass-1234!", "doctor", 4)
# the preparing and the consulted roles (not in the seeded world; tests create them with make_users)
TECH = Account("tech", "tech@clinic.test", "Tom Tech", "tech-pass-12345!", "technologist", 5)
REVIEWER = Account("rev", "reviewer@clinic.test", "Dr Rita Reviewer", "reviewer-pass-123!", "reviewer", 6)
ACCOUNTS = {a.key: a for a in (ADMIN, DOC_A, DOC_B, SPARE, TECH, REVIEWER)}

PATIENT_A = {"mrn": "MRN-A-0001", "family_name": "Doe", "given_name": "Jane", "sex": "female",
             "birth_date": "1980-02-03", "notes": ""}
PATIENT_B = {"mrn": "MRN-B-0002", "family_name": "Roe", "given_name": "Richard", "sex": "male",
             "birth_date": "1975-06-07", "notes": ""}
PATIENT_A_ID, CASE_A_ID, IMAGE_A_ID = 1, 1, 1
PATIENT_B_ID, CASE_B_ID, IMAGE_B_ID = 2, 2, 2


def png_bytes(seed: int = 0) -> bytes:
    """A generated smear-like field encoded as PNG (comes out ``out_of_domain`` with the real gate)."""
    buf = io.BytesIO()
    Image.fromarray(synthetic.smear_like(seed)[0]).save(buf, "PNG")
    return buf.getvalue()


def sqlite_url(home: Path) -> str:
    return f"sqlite:///{home / 'oncoscope.db'}"


def make_users(s, accounts=(ADMIN, DOC_A, DOC_B, SPARE)) -> dict:
    """Create admin / doctor A / doctor B (/ spare doctor) with ``create_user``; returns key -> User."""
    out = {}
    for a in accounts:
        out[a.key] = user_store.create_user(s, a.email, a.name, a.password, a.role)
    s.commit()
    return out


def login(client, account_or_email, password: str | None = None, next_url: str | None = None):
    if isinstance(account_or_email, Account):
        email, password = account_or_email.email, password or account_or_email.password
    else:
        email = account_or_email
    url = "/login" + (f"?next={next_url}" if next_url else "")
    return client.post(url, data={"email": email, "password": password})


def flashes(html: bytes) -> list[str]:
    return [m.strip() for m in re.findall(r'<p class="flash [a-z]+">(.*?)</p>', html.decode(), re.S)]


def field_errors(html: bytes, field: str) -> list[str]:
    return re.findall(rf'<p class="error" id="{re.escape(field)}-err">(.*?)</p>', html.decode(), re.S)


def sessions_of(app):
    return app.extensions["oncoscope"]["sessions"]


def q(app, stmt):
    """Run a query in a fresh session (sees what the app committed)."""
    with sessions_of(app)() as s:
        return s.execute(stmt).all()


def one(app, stmt):
    with sessions_of(app)() as s:
        return s.scalar(stmt)


def files_of(app):
    return app.extensions["oncoscope"]["files"]


def pool_for(app) -> WorkerPool:
    st = app.extensions["oncoscope"]["settings"]
    return WorkerPool(sessions_of(app), files_of(app), 1, st.job_max_attempts)


# ----------------------------------------------------------------------------- environment
@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in ENV_VARS:
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="session")
def _fast_hashing():
    mp = pytest.MonkeyPatch()
    cheap = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    mp.setattr(user_store, "_hasher", cheap)
    mp.setattr(user_store, "_DUMMY_HASH", cheap.hash("not-a-real-password-0000"))
    yield
    mp.undo()


@pytest.fixture()
def gate_off(monkeypatch):
    """Switch the smear-all out-of-domain gate off, so generated images get a label and overlays."""
    from oncoscope.analyzers import registry

    monkeypatch.setattr(registry.get("smear-all"), "ood_threshold", None)


# ----------------------------------------------------------------------------- seeds
def _build_world(home: Path) -> None:
    from oncoscope.store import cases as case_store
    from oncoscope.store import patients as patient_store
    from oncoscope.store.files import FileStore

    st = Settings.from_env(home=home, database_url=sqlite_url(home)).prepare()
    engine = make_engine(st.database_url)
    try:
        factory = make_session_factory(engine)
        store = FileStore(st.images_dir)
        with factory() as s:
            u = make_users(s)
            pa = patient_store.create(s, u["doc_a"], PATIENT_A)  # creator gets access
            pb = patient_store.create(s, u["doc_b"], PATIENT_B)
            ca = case_store.create_case(s, u["doc_a"], pa, "smear-all", "fever, fatigue")
            case_store.add_images(s, store, ca, u["doc_a"], [("field-a.png", png_bytes(0))], 10 * 2**20)
            cb = case_store.create_case(s, u["doc_b"], pb, "smear-all", "")
            case_store.add_images(s, store, cb, u["doc_b"], [("field-b.png", png_bytes(2))], 10 * 2**20)
            s.commit()
            assert (u["admin"].id, u["doc_a"].id, u["doc_b"].id, u["spare"].id) == (1, 2, 3, 4)
            assert (pa.id, ca.id, pb.id, cb.id) == (PATIENT_A_ID, CASE_A_ID, PATIENT_B_ID, CASE_B_ID)
        pool = WorkerPool(factory, store, 1, 3)
        assert pool.run_one() and pool.run_one() and not pool.run_one()
        with factory() as s:
            from oncoscope.store.models import Analysis

            assert [a.result_status for a in s.query(Analysis).order_by(Analysis.id)] == ["out_of_domain"] * 2
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def seed_homes(tmp_path_factory, _fast_hashing) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seeds")
    empty = root / "empty"
    empty.mkdir()
    Settings.from_env(home=empty, database_url=sqlite_url(empty)).prepare()  # images/ and secret_key
    migrate.upgrade(sqlite_url(empty))
    world = root / "world"
    shutil.copytree(empty, world)
    _build_world(world)
    for home in (empty, world):  # WAL checkpointed on dispose; nothing but the db file should remain
        assert not (home / "oncoscope.db-wal").exists() or (home / "oncoscope.db-wal").stat().st_size == 0
    return {"empty": empty, "world": world}


def copy_seed(seed_homes, which: str, dest: Path) -> Path:
    shutil.copytree(seed_homes[which], dest)
    return dest


class AppFactory:
    """Builds apps on one home; disposes their engines at teardown."""

    def __init__(self, home: Path):
        self.home = home
        self.apps = []

    def __call__(self, config: dict | None = None, database_url: str | None = None, **settings_overrides):
        st = Settings.from_env(home=self.home, database_url=database_url or sqlite_url(self.home),
                               **settings_overrides)
        cfg = {"TESTING": True, "WTF_CSRF_ENABLED": False}
        cfg.update(config or {})
        app = create_app(cfg, settings=st, start_workers=False)
        self.apps.append(app)
        return app

    def close(self):
        for app in self.apps:
            app.extensions["oncoscope"]["engine"].dispose()


@pytest.fixture()
def world_home(seed_homes, tmp_path) -> Path:
    return copy_seed(seed_homes, "world", tmp_path / "home")


@pytest.fixture()
def empty_home(seed_homes, tmp_path) -> Path:
    return copy_seed(seed_homes, "empty", tmp_path / "home")


@pytest.fixture()
def make_app(world_home):
    """Factory: ``make_app(config=None, **settings_overrides)`` -> Flask app on a fresh copy of the world."""
    f = AppFactory(world_home)
    yield f
    f.close()


@pytest.fixture()
def make_empty_app(empty_home):
    f = AppFactory(empty_home)
    yield f
    f.close()


@pytest.fixture()
def app(make_app):
    return make_app()


@pytest.fixture()
def pool(app) -> WorkerPool:
    return pool_for(app)


@pytest.fixture()
def db(app):
    """An ORM session on the test app's database (closed at teardown)."""
    s = sessions_of(app)()
    yield s
    s.close()


@pytest.fixture()
def client_for(app):
    """``client_for("doc_a")`` -> a test client signed in as that account (``None`` -> anonymous)."""

    def _make(key: str | None = None):
        c = app.test_client()
        if key is not None:
            r = login(c, ACCOUNTS[key])
            assert r.status_code == 302, r.data[:500]
        return c

    return _make


@pytest.fixture()
def staff(app):
    """staff("tech") -> the technologist (or reviewer "rev") account created and assigned to patient A."""

    def _make(key: str):
        from oncoscope.store import patients as patient_store
        from oncoscope.store.models import Patient, PatientAccess

        with sessions_of(app)() as s:
            made = make_users(s, (ACCOUNTS[key],))[key]
            current = [a.user_id for a in s.query(PatientAccess).filter_by(patient_id=PATIENT_A_ID)]
            patient_store.set_doctors(s, s.get(Patient, PATIENT_A_ID), current + [made.id])
            s.commit()
        return ACCOUNTS[key]

    return _make


@pytest.fixture()
def tok(app):
    """tok("doc_a") -> a fresh bearer token for that account."""
    made = {}

    def _make(key: str, **kw) -> str:
        s = sessions_of(app)()
        try:
            from oncoscope.store import tokens as token_store
            from oncoscope.store.models import User

            u = s.get(User, ACCOUNTS[key].id)
            t, secret = token_store.create(s, u, f"test-{key}", **kw)
            s.commit()
            made[secret] = t.id
            return secret
        finally:
            s.close()

    return _make
