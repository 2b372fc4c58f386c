"""Analysis jobs on one database (SQLite): a job runs once, a failing job backs off and ends
failed, a superseded claim's result is dropped, a dead worker's job is queued again, and a message
delivered twice runs nothing twice. The Redis / several-worker paths are in test_jobs_scaleout.py."""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
from sqlalchemy import update

from oncoscope.analyzers import registry
from oncoscope.services import jobs
from oncoscope.store import cases as case_store
from oncoscope.store import migrate
from oncoscope.store.db import make_engine, make_session_factory
from oncoscope.store.files import FileStore
from oncoscope.store.models import Analysis, Case, Patient, User, utcnow
from tests.web.conftest import png_bytes


@pytest.fixture()
def world(tmp_path):
    """A case with one queued analysis of a generated (out-of-domain) smear field."""
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    sessions, files = make_session_factory(engine), FileStore(tmp_path / "images")
    with sessions() as s:
        u = User(email="doc@clinic.test", name="Dr Jobs", role="doctor", password_hash="x")
        p = Patient(mrn="JOBS-1", family_name="Jobs")
        s.add_all([u, p])
        s.flush()
        c = case_store.create_case(s, u, p, "smear-all")
        out = case_store.add_images(s, files, c, u, [("f.png", png_bytes(3))], 10 * 2**20)
        s.commit()
        ids = {"case": c.id, "analysis": out.added[0].analysis.id}
    yield sessions, files, ids
    engine.dispose()


def _analysis(sessions, aid: int) -> Analysis:
    with sessions() as s:
        return s.get(Analysis, aid)


def test_a_queued_job_runs_once_and_the_case_becomes_ready(world):
    sessions, files, ids = world
    pool = jobs.WorkerPool(sessions, files, 1, 3)
    assert pool.run_one() is True and pool.run_one() is False
    a = _analysis(sessions, ids["analysis"])
    assert (a.job_status, a.attempts, a.result_status) == ("done", 1, "out_of_domain") and a.model_sha256
    with sessions() as s:
        assert s.get(Case, ids["case"]).status == "ready"
    # the queue may deliver a message again: nothing runs twice
    assert jobs.execute(sessions, files, ids["analysis"], "again", 3) == "skipped"
    assert _analysis(sessions, ids["analysis"]).attempts == 1


def test_a_failing_job_backs_off_then_ends_failed(world, monkeypatch):
    sessions, files, ids = world

    def boom(self, loaded):
        raise RuntimeError("model file damaged")

    monkeypatch.setattr(type(registry.get("smear-all")), "analyze", boom)
    pool = jobs.WorkerPool(sessions, files, 1, max_attempts=2)
    assert pool.run_one() is True
    a = _analysis(sessions, ids["analysis"])
    assert (a.job_status, a.attempts) == ("retried", 1) and a.last_error.startswith("RuntimeError: model file damaged")
    assert a.queued_at > utcnow()  # backoff: not due yet
    assert pool.run_one() is False
    with sessions() as s:
        s.execute(update(Analysis).values(queued_at=utcnow() - dt.timedelta(seconds=1)))
        s.commit()
    assert pool.run_one() is True
    a = _analysis(sessions, ids["analysis"])
    assert (a.job_status, a.attempts) == ("failed", 2)
    with sessions() as s:
        assert s.get(Case, ids["case"]).status == "ready"  # nothing pending: the failure is shown, signing allowed


def test_a_result_is_dropped_when_the_claim_was_taken_over(world):
    sessions, files, ids = world
    with sessions() as s:
        a = case_store.claim_job(s, ids["analysis"], "slow-worker")
        assert a is not None
        with sessions() as other:  # the lease ran out; another worker took the job
            other.execute(update(Analysis).values(worker="fast-worker", attempts=2))
            other.commit()
        assert jobs.run_claimed(s, files, a, "slow-worker", 3) == "superseded"
    assert _analysis(sessions, ids["analysis"]).job_status == "running"  # the new owner's claim stands


def test_a_dead_workers_job_is_queued_again_after_its_lease(world):
    sessions, files, ids = world
    with sessions() as s:
        assert case_store.claim_job(s, ids["analysis"], "died") is not None
        assert case_store.requeue_stale(s, older_than=dt.timedelta(minutes=5)) == 0  # still within its lease
        s.execute(update(Analysis).values(started_at=utcnow() - dt.timedelta(minutes=6)))
        s.commit()
        assert case_store.requeue_stale(s, older_than=dt.timedelta(minutes=5)) == 1
    assert _analysis(sessions, ids["analysis"]).job_status == "retried"
    assert jobs.WorkerPool(sessions, files, 1, 3).run_one() is True
    assert _analysis(sessions, ids["analysis"]).job_status == "done"


def _queue_another(sessions, files) -> int:
    """A second case with a queued analysis, committed without telling any pool (as another process does)."""
    with sessions() as s:
        u, p = s.query(User).one(), s.query(Patient).one()
        c = case_store.create_case(s, u, p, "smear-all")
        out = case_store.add_images(s, files, c, u, [("g.png", png_bytes(4))], 10 * 2**20)
        s.commit()
        return out.added[0].analysis.id


def _wait_done(sessions, aid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if _analysis(sessions, aid).job_status == "done":
            return True
        time.sleep(0.05)
    return False


@pytest.fixture()
def short_dir():
    """A folder with a short path: a Unix socket's path has at most 107 bytes, pytest's may be longer."""
    folder = Path(tempfile.mkdtemp(prefix="wk", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_an_idle_pool_starts_a_job_another_process_queued_when_told(world, monkeypatch, short_dir):
    sessions, files, ids = world
    monkeypatch.setattr(jobs, "IDLE_POLL_S", 60.0)  # without the wake-up it would wait a minute
    wake_dir = short_dir
    pool = jobs.WorkerPool(sessions, files, 1, 3, wake_dir=wake_dir)
    pool.start()
    try:
        assert _wait_done(sessions, ids["analysis"], 30)  # the job queued before it started
        time.sleep(0.2)  # idle now, waiting
        aid = _queue_another(sessions, files)
        assert jobs.wake_pools(wake_dir) == 1
        assert _wait_done(sessions, aid, 20)
    finally:
        pool.shutdown()
    assert not list(wake_dir.glob("pool-*.sock")) and not any(t.is_alive() for t in pool.threads)
    assert jobs.wake_pools(wake_dir) == 0


def test_a_dead_pools_socket_is_removed_and_a_too_long_path_only_polls(world, tmp_path, caplog, short_dir):
    sessions, files, _ids = world
    wake_dir = short_dir
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dead:
        dead.bind(str(wake_dir / "pool-1-dead.sock"))
    assert jobs.wake_pools(wake_dir) == 0 and not (wake_dir / "pool-1-dead.sock").exists()

    deep = tmp_path / ("x" * 120)
    pool = jobs.WorkerPool(sessions, files, 1, 3, wake_dir=deep)
    pool._listen_for_wakes(deep)
    assert pool._socket is None and "too long a path for a socket" in caplog.text


def test_the_receiver_alone_wakes_the_pools_without_waiting(short_dir):
    """(Redis, when scaled out: tests/services/test_jobs_scaleout.py)"""
    from oncoscope.config import Settings

    st = Settings.from_env(home=short_dir, database_url=f"sqlite:///{short_dir / 'n.db'}")
    st.wake_dir.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as pool_socket:
        pool_socket.bind(str(st.wake_dir / "pool-2-x.sock"))
        pool_socket.settimeout(5)
        notify = jobs.job_notifier(st, None)
        for _ in range(50):  # fifty images filed in a burst: the pool is told, at most a few times
            notify()
        assert pool_socket.recv(8) == b"!"
        pool_socket.settimeout(0.3)
        extra = 0
        try:
            while True:
                pool_socket.recv(8)
                extra += 1
        except TimeoutError:
            pass
        assert extra < 10
