"""Analysis jobs: idempotent claims and fencing (any database), and the scaled-out deployment tested
for real: RQ with Redis at 127.0.0.1:6379, PostgreSQL at 127.0.0.1:5432, separate `oncoscope worker`
processes, a worker killed with SIGKILL mid-queue, Redis unreachable at upload time, and PostgreSQL
stopped during uploads (a private server, so nothing else on the machine is disturbed).

Tests that need Redis, PostgreSQL or the PostgreSQL server binaries skip with a message when those
do not answer or are missing."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from oncoscope.bench import faults as faultbench
from oncoscope.bench.processes import WorkerProcess, clear_queue, instance_env, redis_reachable, scratch_database
from oncoscope.services import jobs
from oncoscope.config import Settings
from oncoscope.store import cases as case_store
from oncoscope.store import migrate
from oncoscope.store.db import make_engine, make_session_factory
from oncoscope.store.files import FileStore
from oncoscope.store.models import Analysis

from ..databases import reachable

REDIS_URL = os.environ.get("ONCOSCOPE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PG_URL = os.environ.get("ONCOSCOPE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _pg_reachable() -> Exception | None:
    return reachable(PG_URL)


@pytest.fixture()
def redis_url():
    exc = redis_reachable(REDIS_URL)
    if exc is not None:
        pytest.skip(f"Redis at {REDIS_URL} does not answer ({exc.__class__.__name__}): scale-out tests skipped")
    clear_queue(REDIS_URL)
    yield REDIS_URL
    clear_queue(REDIS_URL)


@pytest.fixture()
def pg_url():
    exc = _pg_reachable()
    if exc is not None:
        pytest.skip(f"PostgreSQL at {PG_URL} does not answer ({exc.__class__.__name__}): scale-out tests skipped")
    with scratch_database(PG_URL) as url:
        yield url


@pytest.fixture()
def sqlite_instance(tmp_path):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    migrate.upgrade(url)
    st = Settings.from_env(home=tmp_path, database_url=url).prepare()
    engine = make_engine(url)
    yield st, make_session_factory(engine)
    engine.dispose()


def _rows(sessions, ids):
    s = sessions()
    try:
        return {a.id: a for a in s.scalars(select(Analysis).where(Analysis.id.in_(ids)))}
    finally:
        s.close()


def test_a_job_runs_once_however_often_it_is_delivered(sqlite_instance):
    st, sessions = sqlite_instance
    files = FileStore(st.images_dir)
    (aid,) = faultbench.queue_analyses(st, 1)
    assert jobs.execute(sessions, files, aid, "w1", 3) == "done"
    first = _rows(sessions, [aid])[aid]
    assert first.job_status == "done" and first.attempts == 1 and first.result_status
    for _ in range(3):  # the queue delivered the message again
        assert jobs.execute(sessions, files, aid, "w2", 3) == "skipped"
    again = _rows(sessions, [aid])[aid]
    assert (again.attempts, again.worker, again.finished_at) == (1, first.worker, first.finished_at)


def test_a_worker_whose_lease_ran_out_cannot_overwrite_the_new_owner(sqlite_instance):
    st, sessions = sqlite_instance
    files = FileStore(st.images_dir)
    (aid,) = faultbench.queue_analyses(st, 1)
    s1 = sessions()
    slow = case_store.claim_job(s1, aid, "slow-worker")  # claims, then stalls (GC pause, network split)
    assert slow is not None and slow.attempts == 1
    s = sessions()
    assert case_store.requeue_stale(s, older_than=dt.timedelta(seconds=-5)) == 1  # its lease is over
    s.close()
    assert jobs.execute(sessions, files, aid, "fast-worker", 3) == "done"
    assert jobs.run_claimed(s1, files, slow, "slow-worker", 3) == "superseded"
    s1.close()
    a = _rows(sessions, [aid])[aid]
    assert (a.job_status, a.worker, a.attempts) == ("done", "fast-worker", 2)


def test_failures_back_off_and_wait_for_their_turn(sqlite_instance, monkeypatch):
    st, sessions = sqlite_instance
    files = FileStore(st.images_dir)
    (aid,) = faultbench.queue_analyses(st, 1)

    def broken(*a, **kw):
        raise RuntimeError("model file unreadable")

    monkeypatch.setattr(jobs, "_analyse", broken)
    assert jobs.execute(sessions, files, aid, "w", 3) == "retried"
    a = _rows(sessions, [aid])[aid]
    assert a.queued_at > a.started_at and "model file unreadable" in a.last_error and a.enqueued_at is None
    s = sessions()
    try:
        assert case_store.due_for_dispatch(s, dt.timedelta(seconds=60)) == []  # backing off: not handed out
        assert case_store.claim_job(s, aid, "impatient") is None
    finally:
        s.close()


def test_lost_queue_messages_are_handed_out_again(sqlite_instance):
    st, sessions = sqlite_instance
    ids = faultbench.queue_analyses(st, 3)
    s = sessions()
    try:
        assert case_store.due_for_dispatch(s, dt.timedelta(seconds=60)) == ids
        case_store.mark_enqueued(s, ids)
        assert case_store.due_for_dispatch(s, dt.timedelta(seconds=60)) == []  # handed over recently
        assert case_store.due_for_dispatch(s, dt.timedelta(seconds=-1)) == ids  # presumed lost: again
    finally:
        s.close()


@pytest.mark.slow
def test_scaled_out_upload_to_result_through_redis_and_two_workers(redis_url, pg_url, tmp_path):
    from tests.web.conftest import png_bytes

    from oncoscope.store import tokens as token_store
    from oncoscope.store import users as user_store
    from oncoscope.web import create_app

    migrate.upgrade(pg_url)
    home = tmp_path / "home"
    st = Settings.from_env(home=home, database_url=pg_url, queue_url=redis_url, job_lease_seconds=20,
                           job_timeout_seconds=10)
    app = create_app({"TESTING": True}, settings=st, start_workers=True)
    ext = app.extensions["oncoscope"]
    assert isinstance(ext["workers"], jobs.QueueDispatcher)
    with ext["sessions"]() as s:
        u = user_store.create_user(s, "scale@clinic.test", "Scale", "scale-out-password-1")
        s.commit()
        _t, token = token_store.create(s, u, "t")
        s.commit()
    c = app.test_client()
    h = {"Authorization": f"Bearer {token}"}
    p = c.post("/api/v1/patients", json={"mrn": "SCALE-1", "family_name": "Scale"}, headers=h).get_json()
    case = c.post(f"/api/v1/patients/{p['id']}/cases", json={"analyzer_id": "smear-all"}, headers=h).get_json()
    r = c.post(f"/api/v1/cases/{case['id']}/images", headers=h, content_type="multipart/form-data",
               data={"images": [(io.BytesIO(png_bytes(i)), f"{i}.png") for i in range(4)]})
    assert r.status_code == 200 and len(r.get_json()["added"]) == 4, r.data[:300]
    health = c.get("/healthz").get_json()
    assert health["queue"]["mode"] == "redis" and health["queue"]["waiting"] == 4  # no worker yet: waiting in Redis
    # what Redis holds is JSON (an analysis id), never a pickle a worker would have to trust
    import zlib

    q = ext["workers"].queue
    for jid in q.job_ids:
        data = json.loads(zlib.decompress(q.connection.hget(f"rq:job:{jid}", "data")))
        assert data[0] == "oncoscope.services.jobs.rq_job" and isinstance(data[2][0], int), data
    env = instance_env(home, pg_url, {"ONCOSCOPE_QUEUE_URL": redis_url, "ONCOSCOPE_JOB_LEASE_SECONDS": 20,
                                      "ONCOSCOPE_JOB_TIMEOUT_SECONDS": 10})
    workers = [WorkerProcess(env, tmp_path / f"w{i}.log").start() for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            body = c.get(f"/api/v1/cases/{case['id']}", headers=h).get_json()
            if body["status"] == "ready":
                break
            assert all(w.proc.poll() is None for w in workers), workers[0].log_tail()
            time.sleep(0.3)
        assert body["status"] == "ready", body
        assert [(i["job_status"], i["attempts"]) for i in body["images"]] == [("done", 1)] * 4
    finally:
        for w in workers:
            w.stop()
    with ext["sessions"]() as s:
        rows = list(s.scalars(select(Analysis)))
    assert len(rows) == len({a.image_id for a in rows}) == 4  # one result per image
    assert {a.worker.split(":")[1] for a in rows} <= {str(w.pid) for w in workers}
    assert c.get("/healthz").get_json()["queue"]["waiting"] == 0
    ext["engine"].dispose()


def test_upload_is_kept_when_redis_is_unreachable_and_dispatched_later(redis_url, sqlite_instance, tmp_path):
    from tests.web.conftest import png_bytes

    from oncoscope.store import patients as patient_store
    from oncoscope.store import users as user_store
    from oncoscope.web import create_app

    st, sessions = sqlite_instance
    st.queue_url = "redis://127.0.0.1:1/0"  # nothing listens there
    app = create_app({"TESTING": True, "WTF_CSRF_ENABLED": False}, settings=st, start_workers=True)
    with sessions() as s:
        u = user_store.create_user(s, "q@clinic.test", "Q", "queue-password-123")
        p = patient_store.create(s, u, {"mrn": "Q-1", "family_name": "Queue"})
        s.commit()
        pid = p.id
    c = app.test_client()
    r = c.post("/login", data={"email": "q@clinic.test", "password": "queue-password-123"})
    assert r.status_code == 302
    r = c.post(f"/patients/{pid}/cases/new", data={"analyzer_id": "smear-all", "images": (io.BytesIO(png_bytes(1)), "a.png")},
               content_type="multipart/form-data")
    assert r.status_code == 302 and "/cases/" in r.headers["Location"]  # accepted: the job waits in the database
    assert c.get("/healthz").get_json()["queue"]["state"].startswith("unavailable")
    with sessions() as s:
        (a,) = s.scalars(select(Analysis)).all()
        assert a.job_status == "queued" and a.enqueued_at is None
    st.queue_url = redis_url  # Redis is back: a worker's reconciler hands the job over
    assert jobs.QueueDispatcher(sessions, st).reconcile() == {"requeued_stale": 0, "dispatched": 1}
    with sessions() as s:
        assert s.scalars(select(Analysis)).one().enqueued_at is not None
    app.extensions["oncoscope"]["engine"].dispose()


@pytest.mark.slow
def test_killing_a_worker_mid_queue_loses_nothing_and_duplicates_nothing(redis_url):
    if (exc := _pg_reachable()) is not None:
        pytest.skip(f"PostgreSQL at {PG_URL} does not answer ({exc.__class__.__name__})")
    rep = faultbench.kill_worker_scenario(n=40, database_url=PG_URL, redis_url=redis_url, lease_s=5)
    assert rep["targets_met"] == {"all_results": True, "no_duplicates": True, "killed_mid_job": True}, rep
    assert rep["results"] == 40 and rep["failed"] == 0 and rep["victim_attempts"] == 2


@pytest.mark.slow
def test_postgresql_stopped_during_uploads(tmp_path):
    if not sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")):
        pytest.skip("PostgreSQL server binaries (pg_ctl, initdb) are not installed: outage test skipped")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start a private PostgreSQL server")
    rep = faultbench.pg_outage_scenario(uploaders=2, before_s=3, outage_s=4, after_s=6)
    assert all(rep["targets_met"].values()), json.dumps(rep, indent=1, default=str)[:4000]
    assert rep["during_outage"] > 0 and rep["uploads_accepted"] > 0


def test_the_receiver_on_its_own_hands_its_jobs_to_redis(redis_url, sqlite_instance):
    """`oncoscope dicom listen` without workers, scaled out: what it queues goes to Redis at once."""
    st, sessions = sqlite_instance
    st.queue_url = redis_url
    ids = faultbench.queue_analyses(st, 2)
    notify = jobs.job_notifier(st, sessions)
    notify()  # (returns at once; a thread hands the jobs over)
    deadline = time.monotonic() + 10
    while jobs.QueueDispatcher(sessions, st).queued() < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert jobs.QueueDispatcher(sessions, st).queued() == 2
    assert all(a.enqueued_at is not None for a in _rows(sessions, ids).values())


def test_the_receiver_does_not_wait_for_redis_when_it_is_away(sqlite_instance):
    st, sessions = sqlite_instance
    st.queue_url = "redis://127.0.0.1:1/0"  # nothing listens there
    faultbench.queue_analyses(st, 1)
    notify = jobs.job_notifier(st, sessions)
    t0 = time.monotonic()
    for _ in range(20):  # twenty C-STOREs answered
        notify()
    assert time.monotonic() - t0 < 0.5
