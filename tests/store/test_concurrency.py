"""Races between requests, on SQLite, PostgreSQL and MariaDB (servers that do not answer are skipped).

* A sign-off and an upload to the same case: a signed case never gains an image, a sign-off covers
  exactly the images it saw, and the case never ends signed-but-reopened.
* Concurrent wrong passwords: every attempt is counted before the (slow) password check, so at
  most the allowed number are ever checked and the account locks.
* Unknown and real addresses lock after the same number of attempts even when the attempts are
  spread over several server processes (the counts live in the database).
"""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
from argon2 import PasswordHasher
from sqlalchemy import select

from oncoscope.store import cases as case_store
from oncoscope.store import users as user_store
from oncoscope.store.db import make_engine, make_session_factory
from oncoscope.store.files import FileStore
from oncoscope.store.models import Analysis, Case, CaseImage, Patient, PatientAccess, User

from ..web.conftest import png_bytes

LABELS = ["Benign", "Early", "Pre", "Pro", case_store.NONDIAGNOSTIC]
PASSWORD = "right-password-42"


@pytest.fixture()
def factory(any_db_url):
    engine = make_engine(any_db_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture()
def fast_hashing(monkeypatch):
    cheap = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    monkeypatch.setattr(user_store, "_hasher", cheap)
    monkeypatch.setattr(user_store, "_DUMMY_HASH", cheap.hash("not-a-real-password-0000"))
    return cheap


def _ready_case(factory, tmp_path) -> tuple[int, int]:
    """A doctor and a case with one analysed image, ready to sign; returns (case id, user id)."""
    store = FileStore(tmp_path / "images")
    with factory() as s:
        u = User(email="doc@clinic.test", name="Dr Race", role="doctor", password_hash="x")
        p = Patient(mrn="RACE-1", family_name="Race")
        s.add_all([u, p])
        s.flush()
        s.add(PatientAccess(patient_id=p.id, user_id=u.id))
        c = case_store.create_case(s, u, p, "smear-all")
        out = case_store.add_images(s, store, c, u, [("first.png", png_bytes(0))], 10 * 2**20)
        s.commit()
        _analysed(s, out.added[0].analysis)
        s.commit()
        assert c.status == "ready"
        return c.id, u.id


def _analysed(s, a: Analysis) -> None:
    """The analysis done with a confident 'Benign' (no model run: the races are about the rows)."""
    a.job_status, a.result_status, a.label, a.confidence = "done", "ok", "Benign", 0.9
    a.probabilities = {"Benign": 0.9, "Early": 0.05, "Pre": 0.03, "Pro": 0.02}
    case_store._refresh_case_status(a.image.case)


class PausingStore(FileStore):
    """Stops the upload at its n-th image (1: before any row is written; 2: after the first image's
    rows), until the test lets it go."""

    def __init__(self, root, pause_at: int):
        super().__init__(root)
        self.pause_at, self.calls = pause_at, 0
        self.reached, self.go = threading.Event(), threading.Event()

    def put_original(self, data: bytes) -> str:
        self.calls += 1
        if self.calls == self.pause_at:
            self.reached.set()
            assert self.go.wait(60)
        return super().put_original(data)


def _assert_consistent(factory, case_id: int) -> None:
    """Whatever won, the stored case tells one story."""
    with factory() as s:
        c = s.get(Case, case_id)
        if not c.reviews:
            assert c.status in ("analysing", "ready")
            return
        r = c.current_review
        assert c.status == "signed" and c.final_diagnosis == r.final_diagnosis
        assert r.content_sha256 == case_store._review_hash(c, r), "the sign-off does not cover the case's images"
        assert all(i.analysis.job_status == "done" for i in c.images), "a signed case holds an unanalysed image"


@pytest.mark.parametrize("pause_at", [1, 2], ids=["sign-before-rows", "sign-after-rows"])
def test_upload_racing_a_sign_off_never_adds_an_image_to_a_signed_case(factory, tmp_path, pause_at):
    case_id, user_id = _ready_case(factory, tmp_path)
    store = PausingStore(tmp_path / "images", pause_at)
    outcome: dict[str, str] = {}

    def upload():
        with factory() as s:
            c, u = s.get(Case, case_id), s.get(User, user_id)
            try:
                out = case_store.add_images(s, store, c, u, [("a.png", png_bytes(1)), ("b.png", png_bytes(2))],
                                            10 * 2**20)
                case_store.commit_upload(s, store, out)
                outcome["upload"] = "ok"
            except case_store.CaseError as exc:
                s.rollback()
                outcome["upload"] = str(exc)

    def sign():
        with factory() as s:
            c, u = s.get(Case, case_id), s.get(User, user_id)
            try:
                case_store.sign(s, c, u, "Benign", LABELS)
                s.commit()
                outcome["sign"] = "ok"
            except case_store.CaseError as exc:
                s.rollback()
                outcome["sign"] = str(exc)

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert store.reached.wait(30)
    signer = threading.Thread(target=sign)
    signer.start()
    time.sleep(0.5)  # the sign-off runs (or waits on the upload's lock) while the upload is held
    store.go.set()
    uploader.join(60)
    signer.join(60)
    assert set(outcome) == {"upload", "sign"}
    assert [outcome["upload"], outcome["sign"]].count("ok") == 1, outcome
    if outcome["sign"] == "ok":
        assert outcome["upload"] == case_store.SIGNED_NO_IMAGES
        with factory() as s:  # nothing of the refused upload stayed
            assert s.scalar(select(CaseImage.id).where(CaseImage.case_id == case_id, CaseImage.id > 1)) is None
    _assert_consistent(factory, case_id)


def test_an_upload_holding_a_stale_copy_of_a_case_signed_meanwhile_is_refused(factory, tmp_path):
    case_id, user_id = _ready_case(factory, tmp_path)
    store = FileStore(tmp_path / "images")
    with factory() as uploading, factory() as signing:
        stale = uploading.get(Case, case_id)  # loaded while the case was still 'ready'
        assert stale.status == "ready"
        case_store.sign(signing, signing.get(Case, case_id), signing.get(User, user_id), "Benign", LABELS)
        signing.commit()
        with pytest.raises(case_store.CaseError, match="signed"):
            case_store.add_images(uploading, store, stale, uploading.get(User, user_id),
                                  [("late.png", png_bytes(3))], 10 * 2**20)
        uploading.rollback()
    with factory() as s:
        c = s.get(Case, case_id)
        assert (c.status, len(c.images), len(c.reviews)) == ("signed", 1, 1)
    _assert_consistent(factory, case_id)


def test_a_sign_off_names_the_revision_it_reviewed(factory, tmp_path):
    case_id, user_id = _ready_case(factory, tmp_path)
    with factory() as s:
        seen = s.get(Case, case_id).revision
    with factory() as s:  # an image arrives (and is analysed) after the doctor opened the case
        c, u = s.get(Case, case_id), s.get(User, user_id)
        out = case_store.add_images(s, FileStore(tmp_path / "images"), c, u, [("new.png", png_bytes(4))], 10 * 2**20)
        s.commit()
        _analysed(s, out.added[0].analysis)
        s.commit()
        assert c.status == "ready"
    with factory() as s:
        c, u = s.get(Case, case_id), s.get(User, user_id)
        with pytest.raises(case_store.CaseError) as err:
            case_store.sign(s, c, u, "Benign", LABELS, revision=seen)
        assert str(err.value) == case_store.CASE_CHANGED
        s.rollback()
        case_store.sign(s, c, u, "Benign", LABELS, revision=c.revision)  # the revision now on screen
        s.commit()
    _assert_consistent(factory, case_id)


def test_two_doctors_signing_at_once_make_one_version(factory, tmp_path):
    case_id, user_id = _ready_case(factory, tmp_path)
    with factory() as a, factory() as b:
        ca, cb = a.get(Case, case_id), b.get(Case, case_id)
        rev = ca.revision
        case_store.sign(a, ca, a.get(User, user_id), "Benign", LABELS, revision=rev)
        a.commit()
        with pytest.raises(case_store.CaseError) as err:
            case_store.sign(b, cb, b.get(User, user_id), "Pre", LABELS, override_reason="x", revision=rev)
        assert str(err.value) == case_store.CASE_CHANGED
        b.rollback()
    _assert_consistent(factory, case_id)


def _empty_case(factory, n: int) -> tuple[int, int]:
    with factory() as s:
        u = User(email=f"doc{n}@clinic.test", name="Dr Race", role="doctor", password_hash="x")
        p = Patient(mrn=f"RACE-E{n}", family_name="Race")
        s.add_all([u, p])
        s.flush()
        c = case_store.create_case(s, u, p, "smear-all")
        s.commit()
        return c.id, u.id


def test_deleting_an_empty_case_and_uploading_to_it_at_once_lose_nothing(factory, tmp_path):
    store = FileStore(tmp_path / "images")
    # the deletion first: the upload (holding the case it loaded before) is refused cleanly
    case_id, user_id = _empty_case(factory, 1)
    with factory() as uploading, factory() as deleting:
        stale = uploading.get(Case, case_id)
        case_store.delete_empty_case(deleting, deleting.get(Case, case_id))
        deleting.commit()
        with pytest.raises(case_store.CaseError, match="no longer exists"):
            case_store.add_images(uploading, store, stale, uploading.get(User, user_id), [("a.png", png_bytes(5))],
                                  10 * 2**20)
    # the upload first: the deletion (holding the empty case it loaded before) is refused, the image stays
    case_id, user_id = _empty_case(factory, 2)
    with factory() as uploading, factory() as deleting:
        stale = deleting.get(Case, case_id)
        assert not stale.images
        out = case_store.add_images(uploading, store, uploading.get(Case, case_id), uploading.get(User, user_id),
                                    [("b.png", png_bytes(6))], 10 * 2**20)
        case_store.commit_upload(uploading, store, out)
        with pytest.raises(case_store.CaseError, match="Only an empty case"):
            case_store.delete_empty_case(deleting, stale)
        deleting.rollback()
    with factory() as s:
        assert len(s.get(Case, case_id).images) == 1


# ----------------------------------------------------------------------------- sign-in throttling
class CountingHasher:
    """The real hasher, slowed to argon2's production pace, counting password checks."""

    def __init__(self, inner: PasswordHasher, delay: float):
        self.inner, self.delay, self.checks = inner, delay, 0
        self._lock = threading.Lock()

    def verify(self, hashed, password):
        with self._lock:
            self.checks += 1
        time.sleep(self.delay)
        return self.inner.verify(hashed, password)

    def hash(self, password):
        return self.inner.hash(password)

    def check_needs_rehash(self, hashed):
        return self.inner.check_needs_rehash(hashed)


def _account(factory, hasher) -> str:
    with factory() as s:
        u = user_store.create_user(s, "target@clinic.test", "Dr Target", PASSWORD)
        s.commit()
        return u.email


@pytest.mark.parametrize("email", ["target@clinic.test", "nobody@clinic.test"], ids=["real", "unknown"])
def test_forty_concurrent_wrong_passwords_check_at_most_five_and_lock(factory, fast_hashing, monkeypatch, email):
    _account(factory, fast_hashing)
    hasher = CountingHasher(fast_hashing, delay=0.2)
    monkeypatch.setattr(user_store, "_hasher", hasher)
    start = threading.Barrier(40)
    answers: list[str] = []

    def attempt():
        start.wait()
        with factory() as s:
            try:
                user_store.authenticate(s, email, "wrong-password-1", max_failures=5, lock_minutes=15)
                answers.append("signed in")
            except user_store.AccountError as exc:
                answers.append(str(exc))

    threads = [threading.Thread(target=attempt) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(answers) == 40 and "signed in" not in answers
    assert hasher.checks <= 5, f"{hasher.checks} passwords were checked concurrently"
    assert answers.count("Email or password is incorrect.") == hasher.checks
    with factory() as s:  # locked now, even with the right password
        with pytest.raises(user_store.AccountError, match="Too many failed attempts"):
            user_store.authenticate(s, email, PASSWORD, max_failures=5, lock_minutes=15)


def _attempts_in_another_process(url: str, email: str, n: int, out) -> None:
    engine = make_engine(url)
    try:
        s = make_session_factory(engine)()
        for _ in range(n):
            try:
                user_store.authenticate(s, email, "wrong-password-1", max_failures=5, lock_minutes=15)
                out.put("signed in")
            except user_store.AccountError as exc:
                out.put(str(exc))
        s.close()
    finally:
        engine.dispose()


def _answers_over_two_processes(url: str, email: str) -> list[str]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    answers = []
    for _ in range(2):  # one server process after the other, three attempts each
        p = ctx.Process(target=_attempts_in_another_process, args=(url, email, 3, out))
        p.start()
        answers += [out.get(timeout=120) for _ in range(3)]
        p.join(60)
    return answers


def test_unknown_and_real_addresses_lock_alike_across_server_processes(any_db_url, factory):
    with factory() as s:
        user_store.create_user(s, "real@clinic.test", "Dr Real", PASSWORD)
        s.commit()
    real = _answers_over_two_processes(any_db_url, "real@clinic.test")
    unknown = _answers_over_two_processes(any_db_url, "unknown@clinic.test")
    expected = ["Email or password is incorrect."] * 5 + ["Too many failed attempts. Try again in 15 minutes."]
    assert real == unknown == expected


def test_a_refused_upload_keeps_a_file_another_case_committed_meanwhile(factory, tmp_path):
    case_id, user_id = _ready_case(factory, tmp_path)
    store = FileStore(tmp_path / "images")
    shared, lonely = store.put_original(png_bytes(7)), store.put_original(png_bytes(8))
    with factory() as s:  # the other upload's row for the same bytes, committed
        s.add(CaseImage(case_id=case_id, sha256=shared, original_filename="other.png", width=1, height=1,
                        size_bytes=1, uploaded_by_id=user_id))
        s.commit()
    with factory() as s:
        case_store.discard_new_files(s, store, [shared, lonely])
    assert store.exists(shared) and not store.exists(lonely)


def test_a_job_ending_while_an_upload_is_in_flight_leaves_the_case_analysing(factory, tmp_path, monkeypatch):
    case_id, user_id = _ready_case(factory, tmp_path)
    with factory() as s:  # the first image's analysis is running again (a retry, say)
        a = s.scalars(select(Analysis).join(CaseImage).where(CaseImage.case_id == case_id)).one()
        a.job_status, analysis_id = "running", a.id
        s.execute(case_store.update(Case).where(Case.id == case_id).values(status="analysing"))
        s.commit()
    reached, go = threading.Event(), threading.Event()
    real = case_store._add_image_row

    def add_row_then_hold(*args):  # the upload holds the case (and its first new row) here
        real(*args)
        reached.set()
        assert go.wait(60)

    monkeypatch.setattr(case_store, "_add_image_row", add_row_then_hold)

    def upload():
        with factory() as s:
            out = case_store.add_images(s, FileStore(tmp_path / "images"), s.get(Case, case_id), s.get(User, user_id),
                                        [("a.png", png_bytes(1))], 10 * 2**20)
            case_store.commit_upload(s, FileStore(tmp_path / "images"), out)

    def finish_job():
        with factory() as s:
            _analysed(s, s.get(Analysis, analysis_id))
            s.commit()

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert reached.wait(30)
    worker = threading.Thread(target=finish_job)
    worker.start()
    time.sleep(0.5)  # the job's result is written (or waits) while the upload holds the case
    go.set()
    uploader.join(60)
    worker.join(60)
    with factory() as s:
        c = s.get(Case, case_id)
        jobs = sorted(i.analysis.job_status for i in c.images)
        assert jobs == ["done", "queued"] and c.status == "analysing", (c.status, jobs)


def test_two_workers_finishing_jobs_of_one_case_at_once_do_not_deadlock(factory, tmp_path):
    case_id, user_id = _ready_case(factory, tmp_path)
    with factory() as s:  # a second image; both jobs claimed by two workers
        c = s.get(Case, case_id)
        case_store.add_images(s, FileStore(tmp_path / "images"), c, s.get(User, user_id), [("b.png", png_bytes(9))],
                              10 * 2**20)
        for n, a in enumerate(i.analysis for i in c.images):
            a.job_status, a.worker, a.attempts = "running", f"w{n}", 1
        s.commit()
        jobs = [(i.analysis.id, f"w{n}") for n, i in enumerate(c.images)]
    start, errors = threading.Barrier(2), []

    def finish(analysis_id: int, worker: str) -> None:
        with factory() as s:
            a = s.get(Analysis, analysis_id)
            start.wait()
            try:
                assert case_store.still_holds(s, a, worker, 1)
                time.sleep(0.3)  # both would hold their job row here, before asking for the case
                _analysed(s, a)
                s.commit()
            except Exception as exc:  # noqa: BLE001 - a deadlock victim, say
                errors.append(repr(exc))

    threads = [threading.Thread(target=finish, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with factory() as s:
        c = s.get(Case, case_id)
        assert c.status == "ready" and {i.analysis.job_status for i in c.images} == {"done"}
