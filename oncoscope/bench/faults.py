"""Fault scenarios for ``oncoscope bench --load`` (and the scale-out tests).

* ``kill_worker_scenario``: scaled-out mode (RQ + Redis + PostgreSQL). N analyses are queued, an
  ``oncoscope worker`` process is killed with SIGKILL while it holds a job, a new worker is started:
  every analysis must end with exactly one result, none lost, none analysed into two results.
* ``pg_outage_scenario``: a private PostgreSQL server (its own data directory and port, so nothing
  else on the machine is disturbed) is stopped in the middle of uploads through the API and started
  again: while it is down every answer must be a clear 503, nothing may be stored half-way (no image
  row without its analysis or file, no file without its row), and uploads must work again when it
  returns, with every accepted image analysed and the audit trail intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from sqlalchemy import func, select

from ..config import Settings
from ..services.jobs import QueueDispatcher
from ..store import audit as audit_store
from ..store import cases as case_store
from ..store import migrate
from ..store import patients as patient_store
from ..store import tokens as token_store
from ..store import users as user_store
from ..store.db import make_engine, make_session_factory, standalone_session
from ..store.files import FileStore
from ..store.models import Analysis, CaseImage
from .fixtures import generated_pngs, multipart_body
from .processes import (Server, WorkerProcess, clear_queue, free_port, instance_env, redis_reachable,
                        scratch_database)

PG_BIN = Path("/usr/lib/postgresql")


# ----------------------------------------------------------------------------- building blocks
def queue_analyses(settings, n: int, seed: int = 0) -> list[int]:
    """A doctor, a patient and one case holding ``n`` new images: ``n`` queued analyses (ids)."""
    with standalone_session(settings.database_url) as s:
        tag = uuid.uuid4().hex[:8]
        u = user_store.create_user(s, f"fault-{tag}@clinic.test", "Fault Bench", "fault-bench-password-1")
        p = patient_store.create(s, u, {"mrn": f"FAULT-{tag}", "family_name": "Fault", "given_name": "Bench"})
        c = case_store.create_case(s, u, p, "smear-all")
        out = case_store.add_images(s, FileStore(settings.images_dir), c, u,
                                    [(f"f{i}.png", b) for i, b in enumerate(generated_pngs(n, seed))], 50 * 2**20)
        s.commit()
        ids = [i.id for i in out.added]
        return list(s.scalars(select(Analysis.id).where(Analysis.image_id.in_(ids)).order_by(Analysis.id)))


def analysis_rows(database_url: str, ids: list[int]) -> list[dict]:
    engine = make_engine(database_url)
    try:
        with engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(
                select(Analysis.id, Analysis.image_id, Analysis.job_status, Analysis.result_status, Analysis.attempts,
                       Analysis.worker).where(Analysis.id.in_(ids)))]
    finally:
        engine.dispose()


# ----------------------------------------------------------------------------- scenario 1: kill a worker
def kill_worker_scenario(n: int = 100, database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/test",
                         redis_url: str = "redis://127.0.0.1:6379/0", lease_s: int = 6, timeout_s: float = 300,
                         kill_after: float = 0.3) -> dict:
    if (exc := redis_reachable(redis_url)) is not None:
        raise RuntimeError(f"Redis at {redis_url} does not answer: {exc}")
    t0 = time.monotonic()
    with scratch_database(database_url) as url, tempfile.TemporaryDirectory(prefix="oncoscope-kill-") as tmp:
        home = Path(tmp)
        env = instance_env(home, url, {"ONCOSCOPE_QUEUE_URL": redis_url, "ONCOSCOPE_JOB_LEASE_SECONDS": lease_s,
                                       "ONCOSCOPE_JOB_TIMEOUT_SECONDS": max(1, lease_s - 2)})
        migrate.upgrade(url)
        st = Settings.from_env(home=home, database_url=url, queue_url=redis_url, job_lease_seconds=lease_s,
                               job_timeout_seconds=max(1, lease_s - 2)).prepare()
        ids = queue_analyses(st, n)
        clear_queue(redis_url)
        engine = make_engine(url)
        try:
            dispatched = QueueDispatcher(make_session_factory(engine), st).dispatch_due()
        finally:
            engine.dispose()
        killed: list[WorkerProcess] = []
        second = None
        try:
            deadline = time.monotonic() + timeout_s
            # a kill that lands between two jobs (each takes tens of milliseconds) tests nothing: the
            # worker is replaced and killed again, up to KILL_ATTEMPTS times, until it dies holding one
            for _ in range(KILL_ATTEMPTS):
                killed.append(WorkerProcess(env, home / f"worker-1-{len(killed)}.log").start())
                victim_job, done_at_kill, held = _kill_while_running(killed[-1], url, ids, n * kill_after, deadline)
                if held:
                    break
            victim_state = next(r for r in analysis_rows(url, [victim_job]))
            killed_at = time.monotonic()
            second = WorkerProcess(env, home / "worker-2.log").start()
            while time.monotonic() < deadline:
                rows = analysis_rows(url, ids)
                if all(r["job_status"] in ("done", "failed") for r in rows):
                    break
                time.sleep(0.25)
            recovered_s = time.monotonic() - killed_at
            rows = analysis_rows(url, ids)
        finally:
            for w in killed:
                w.stop()
            if second is not None:
                second.stop()
        victim_final = next(r for r in rows if r["id"] == victim_job)
        done = [r for r in rows if r["job_status"] == "done"]
        rep = {
            "scenario": "kill a worker mid-queue", "analyses": n, "dispatched": dispatched,
            "done_when_killed": done_at_kill, "killed_while_running_job": victim_job, "kills": len(killed),
            "victim_state_after_kill": victim_state["job_status"], "victim_attempts": victim_final["attempts"],
            "results": len(done), "failed": sum(r["job_status"] == "failed" for r in rows),
            "result_rows_per_image": max((sum(1 for r in rows if r["image_id"] == x["image_id"]) for x in rows),
                                         default=0),
            "distinct_images": len({r["image_id"] for r in rows}),
            "rerun_after_kill": sum(r["attempts"] > 1 for r in rows),
            "recovery_s": round(recovered_s, 1), "lease_s": lease_s, "total_s": round(time.monotonic() - t0, 1),
            "database": "postgresql", "queue": "rq+redis",
        }
        rep["targets_met"] = {"all_results": rep["results"] == n, "no_duplicates":
                              rep["result_rows_per_image"] == 1 and rep["distinct_images"] == n,
                              "killed_mid_job": rep["victim_state_after_kill"] == "running"}
        return rep


KILL_ATTEMPTS = 5


def _kill_while_running(worker: "WorkerProcess", url: str, ids: list[int], done_before: float,
                        deadline: float) -> tuple[int, int, bool]:
    """Kill the worker once enough is done, and name the job it held at that moment.

    The job seen running a moment before the kill can finish in between (a job takes tens of
    milliseconds), so the victim is read after the kill: a row still `running` under the dead
    worker's pid is the one it was holding. Killed between two jobs, the victim is the job last
    seen, and the third value (held) is False.
    """
    while time.monotonic() < deadline:
        rows = analysis_rows(url, ids)
        done = sum(r["job_status"] == "done" for r in rows)
        mine = [r for r in rows if r["job_status"] == "running" and f":{worker.pid}:" in (r["worker"] or "")]
        if done >= done_before and mine:
            worker.kill()
            held = [r for r in analysis_rows(url, ids)
                    if r["job_status"] == "running" and f":{worker.pid}:" in (r["worker"] or "")]
            return (held or mine)[0]["id"], done, bool(held)
        if worker.proc.poll() is not None:
            raise RuntimeError(f"worker exited early: {worker.log_tail()}")
        time.sleep(0.01)
    raise RuntimeError(f"the worker made no progress: {worker.log_tail()}")


# ----------------------------------------------------------------------------- scenario 2: stop PostgreSQL
class PrivatePostgres:
    """A throwaway PostgreSQL server: own data directory, port and socket directory."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.port = free_port()
        versions = sorted(PG_BIN.glob("*/bin/pg_ctl"))
        if not versions:
            raise RuntimeError("PostgreSQL server binaries (pg_ctl, initdb) not found under /usr/lib/postgresql")
        self.bin = versions[-1].parent

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {p.stdout[-800:]}{p.stderr[-800:]}")

    def init(self) -> "PrivatePostgres":
        self.root.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.sock, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        return self

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "postgres.log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self, mode: str = "immediate") -> None:
        """``immediate``: the server is gone at once, connections cut (like a crash or a pulled cable)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"


def _api(base: str, method: str, path: str, token: str, body=None, files=None, key: str | None = None,
         timeout: float = 30) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"}
    data = None
    if files is not None:
        data, ctype = multipart_body({}, files)
        headers["Content-Type"] = ctype
    elif body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if key:
        headers["Idempotency-Key"] = key
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"raw": raw[:200].decode(errors="replace")}


def _api_token(database_url: str) -> str:
    """An uploader account and its API token."""
    engine = make_engine(database_url)
    with make_session_factory(engine)() as s:
        u = user_store.create_user(s, "uploader@clinic.test", "Uploader", "uploader-password-123")
        s.commit()
        _t, token = token_store.create(s, u, "fault bench")
        s.commit()
    engine.dispose()
    return token


def _upload_once(base: str, token: str, images: list[bytes], k: int, i: int) -> tuple[str, int, str]:
    """A patient, a case and an image through the API: the last step tried, its status and error code."""
    step = "patient"
    try:
        code, body = _api(base, "POST", "/api/v1/patients", token,
                          {"mrn": f"PG-{k}-{i}", "family_name": "Outage", "given_name": f"N{i}"}, key=f"p-{k}-{i}")
        if code == 201:
            step = "case"
            code, body = _api(base, "POST", f"/api/v1/patients/{body['id']}/cases", token,
                              {"analyzer_id": "smear-all"}, key=f"c-{k}-{i}")
        if code == 201:
            step = "upload"
            code, body = _api(base, "POST", f"/api/v1/cases/{body['id']}/images", token,
                              files=[("images", f"u{i}.png", images[i % len(images)])], key=f"u-{k}-{i}")
        err = (body.get("error") or {}).get("code", "") if isinstance(body, dict) else ""
    except Exception as exc:  # noqa: BLE001 - a connection error is a failure to report
        code, err = -1, f"{exc.__class__.__name__}: {exc}"
    return step, code, err


def _uploads_through_outage(base: str, token: str, images: list[bytes], pg: PrivatePostgres, uploaders: int,
                            before_s: float, outage_s: float, after_s: float) -> tuple[list, float, float]:
    """``uploaders`` threads upload while PostgreSQL is up, stopped, started again. Returns the log
    ((t, step, status, error code) per upload) and when the outage began and ended (s)."""
    log: list[tuple[float, str, int, str]] = []
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(10**6))
    t0 = time.monotonic()

    def uploader(k: int):
        while not stop.is_set():
            step, code, err = _upload_once(base, token, images, k, next(counter))
            with lock:
                log.append((time.monotonic() - t0, step, code, err))
            time.sleep(0.05)

    threads = [threading.Thread(target=uploader, args=(k,), daemon=True) for k in range(uploaders)]
    for t in threads:
        t.start()
    time.sleep(before_s)
    t_down = time.monotonic() - t0
    pg.stop("immediate")
    time.sleep(outage_s)
    t_up = time.monotonic() - t0
    pg.start()
    time.sleep(after_s)
    stop.set()
    for t in threads:
        t.join(60)
    return log, t_down, t_up


def _server_problems(server: Server) -> dict:
    problems = server.log_problems()
    text = server.log_tail(10**7)
    i = text.find("audit entry could not be written")
    problems["audit_failure"] = text[i:i + 4000] if i >= 0 else ""
    return problems


def _settled_database(database_url: str, base: str, token: str, timeout_s: float) -> dict:
    """Once every accepted image is analysed (bounded wait): what the database holds, and the audit chain."""
    engine = make_engine(database_url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            with engine.connect() as c:
                pending = c.scalar(select(func.count(Analysis.id)).where(
                    Analysis.job_status.in_(("queued", "running", "retried"))))
            if not pending:
                break
            time.sleep(0.5)
        with engine.connect() as c:
            out = {"images": c.scalar(select(func.count(CaseImage.id))),
                   "analyses": c.scalar(select(func.count(Analysis.id))),
                   "done": c.scalar(select(func.count(Analysis.id)).where(Analysis.job_status == "done")),
                   "orphan_images": c.scalar(select(func.count(CaseImage.id)).where(
                       ~CaseImage.id.in_(select(Analysis.image_id)))),
                   "shas": set(c.scalars(select(CaseImage.sha256)))}
        # one more request drains any audit entries spooled during the outage
        _api(base, "GET", "/api/v1/analyzers", token)
        with make_session_factory(engine)() as s:
            out["audit"] = audit_store.verify(s)
    finally:
        engine.dispose()
    return out


def _outage_report(log: list, t_down: float, t_up: float, db: dict, files_on_disk: set, spool: Path,
                   problems: dict, uploaders: int, outage_s: float) -> dict:
    during = [e for e in log if t_down + 0.5 < e[0] < t_up]
    before = [e for e in log if e[0] < t_down]
    after = [e for e in log if e[0] > t_up]
    ok_after = [e for e in after if e[2] in (200, 201) and e[1] == "upload"]
    bad_during = [e for e in during if not (e[2] == 503 and e[3] == "database_unavailable")]
    unexpected = [e for e in log if e[2] not in (200, 201, 503) or (e[2] == 503 and e[3] != "database_unavailable")]
    first_ok_after = min((e[0] for e in ok_after), default=None)
    n_images, n_analyses, n_done, orphan_images = db["images"], db["analyses"], db["done"], db["orphan_images"]
    shas, audit = db["shas"], db["audit"]
    rep = {
        "scenario": "stop PostgreSQL during uploads", "uploaders": uploaders,
        "requests": len(log), "before": len(before), "during_outage": len(during), "after": len(after),
        "during_503_database_unavailable": sum(1 for e in during if e[2] == 503), "during_other": len(bad_during),
        "unexpected_answers": len(unexpected), "unexpected_examples": unexpected[:5],
        "uploads_accepted": sum(1 for e in log if e[1] == "upload" and e[2] in (200, 201)),
        "recovery_s": round(first_ok_after - t_up, 1) if first_ok_after is not None else None,
        "images": n_images, "analyses": n_analyses, "analysed": n_done,
        "image_rows_without_analysis": orphan_images,
        "files_without_row": len(files_on_disk - shas), "rows_without_file": len(shas - files_on_disk),
        "audit_chain_ok": audit.ok, "audit_entries": audit.entries,
        "audit_spool_left": spool.exists() and spool.stat().st_size > 0,
        "outage_s": outage_s, "server_tracebacks": problems.get("tracebacks", 0),
        "server_first_tracebacks": problems.get("first_tracebacks", [])[:2],
        "audit_failure": problems.get("audit_failure", "")[-3000:],
    }
    rep["targets_met"] = {
        "clear_503_during_outage": rep["during_503_database_unavailable"] > 0 and rep["during_other"] == 0,
        "no_partial_records": orphan_images == 0 and rep["files_without_row"] == 0 and rep["rows_without_file"] == 0
        and n_images == n_analyses,
        "recovered": rep["recovery_s"] is not None and n_done == n_analyses,
        "audit_intact": audit.ok and not rep["audit_spool_left"],
        "no_other_errors": rep["unexpected_answers"] == 0,
    }
    return rep


def pg_outage_scenario(uploaders: int = 4, before_s: float = 6, outage_s: float = 8, after_s: float = 10,
                       timeout_s: float = 180) -> dict:
    with tempfile.TemporaryDirectory(prefix="oncoscope-pgdown-") as tmp:
        root = Path(tmp)
        if os.geteuid() == 0:
            os.chmod(root, 0o755)
        pg = PrivatePostgres(root / "pg").init()
        pg.start()
        home = root / "home"
        try:
            migrate.upgrade(pg.url)
            st = Settings.from_env(home=home, database_url=pg.url).prepare()
            token = _api_token(pg.url)
            env = instance_env(home, pg.url, {"ONCOSCOPE_JOB_LEASE_SECONDS": 20, "ONCOSCOPE_JOB_TIMEOUT_SECONDS": 10})
            images = generated_pngs(400, seed=11)
            with Server(env) as server:
                log, t_down, t_up = _uploads_through_outage(server.base, token, images, pg, uploaders,
                                                            before_s, outage_s, after_s)
                problems = _server_problems(server)
                db = _settled_database(pg.url, server.base, token, timeout_s)
            files_on_disk = {p.name for p in st.images_dir.glob("*/*/*") if p.is_dir()}
            spool = st.audit_spool
        finally:
            with contextlib.suppress(Exception):
                pg.stop("fast")
        return _outage_report(log, t_down, t_up, db, files_on_disk, spool, problems, uploaders, outage_s)


# ----------------------------------------------------------------------------- both, for the CLI
def run_faults(database_url: str | None = None, redis_url: str = "redis://127.0.0.1:6379/0", n: int = 100,
               progress=None) -> dict:
    """Both scenarios; one that cannot run here (no Redis, no PostgreSQL) says why instead."""
    say = progress or (lambda _m: None)
    pg = database_url if database_url and database_url.startswith("postgresql") \
        else "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    out: dict = {}
    say(f"fault 1/2: {n} queued analyses, a worker killed with SIGKILL mid-queue, then restarted ...")
    try:
        out["kill_worker"] = kill_worker_scenario(n=n, database_url=pg, redis_url=redis_url)
    except Exception as exc:  # noqa: BLE001 - reported, the other scenario still runs
        out["kill_worker"] = {"skipped": f"{exc.__class__.__name__}: {exc}"[:500]}
    say("fault 2/2: PostgreSQL stopped during uploads, then started again ...")
    try:
        out["postgres_outage"] = pg_outage_scenario()
    except Exception as exc:  # noqa: BLE001
        out["postgres_outage"] = {"skipped": f"{exc.__class__.__name__}: {exc}"[:500]}
    return out


def format_faults(rep: dict) -> str:
    lines = []
    k = rep.get("kill_worker", {})
    if "skipped" in k:
        lines.append(f"kill a worker: not run ({k['skipped']})")
    else:
        lines.append(f"kill a worker: {k['results']}/{k['analyses']} results, {k['result_rows_per_image']} per image, "
                     f"killed after {k['done_when_killed']} (job {k['killed_while_running_job']} was "
                     f"{k['victim_state_after_kill']}, re-run: attempts {k['victim_attempts']}), "
                     f"all done {k['recovery_s']} s after the kill; targets {k['targets_met']}")
    p = rep.get("postgres_outage", {})
    if "skipped" in p:
        lines.append(f"stop PostgreSQL: not run ({p['skipped']})")
    else:
        lines.append(f"stop PostgreSQL ({p['outage_s']} s): {p['during_outage']} requests during the outage, "
                     f"{p['during_503_database_unavailable']} answered 503 database_unavailable, {p['during_other']} "
                     f"otherwise; uploads working again {p['recovery_s']} s after restart; {p['images']} images, "
                     f"{p['analysed']} analysed, {p['image_rows_without_analysis']} rows without analysis, "
                     f"{p['files_without_row']} files without row; audit chain ok {p['audit_chain_ok']}; "
                     f"targets {p['targets_met']}")
    return "\n".join(lines)
