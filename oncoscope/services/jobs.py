"""Analysis jobs: one idempotent job body, two ways to run it.

The ``analyses`` table is the source of truth for every job (job_status queued -> running -> done |
retried -> failed, attempts, lease start, worker). A job is *claimed* with one conditional UPDATE,
so however often it is delivered, only one worker runs a given attempt; the result is written only
while that claim is still current (fencing), onto the job's own row (one row per image), so a job
can never produce two results.

* **Default** (one machine, SQLite): ``WorkerPool``, threads inside ``oncoscope serve`` that claim
  the oldest due job.
* **Scaled** (``ONCOSCOPE_QUEUE_URL=redis://...``): the web app hands due jobs to an RQ queue in
  Redis and ``oncoscope worker`` processes, on any number of machines sharing the database
  (PostgreSQL) and the image directory, run them. Every worker also runs a *reconciler* every few
  seconds: jobs whose worker died (lease expired) are queued again; jobs that are due (a retry's
  backoff elapsed) or whose queue message was lost (Redis restarted) are handed to Redis again.
  Duplicate messages are harmless: the claim refuses them.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
import traceback
from pathlib import Path

from sqlalchemy.exc import InterfaceError, OperationalError

from ..analyzers import registry
from ..analyzers.render import heatmap_overlay, heatmap_rgba, mask_overlay
from . import gallery
from ..imaging.imageio import load_image
from ..store import cases as case_store
from ..store.db import make_engine, make_session_factory, session_scope
from ..store.files import FileStore

log = logging.getLogger("oncoscope.services.jobs")
QUEUE_NAME = "oncoscope-analyses"


def worker_name(suffix: str = "") -> str:
    return f"{socket.gethostname()}:{os.getpid()}{(':' + suffix) if suffix else ''}"[:100]


def load_analyzers() -> None:
    """Load every analyzer (ONNX sessions) now, not inside the first job."""
    for aid in registry.available():
        try:
            registry.get(aid)
        except Exception:  # noqa: BLE001 - reported by /healthz; jobs for it fail and are retried
            log.exception("could not load analyzer %s", aid)


def _analyse(files, a) -> object:
    """Run the analyzer on the job's image and write its overlays; returns the AnalysisResult."""
    img = a.image
    analyzer = registry.get(a.analyzer_id)
    loaded = load_image(files.path(img.sha256))
    if not files.exists(img.sha256, "thumb"):  # received over DICOM: filed without decoding (store/receiving)
        files.put_thumbnail(img.sha256, loaded.rgb)
    result = analyzer.analyze(loaded)
    # overlays are named by image and analyzer and are deterministic: a re-run rewrites the same bytes
    if result.mask is not None:
        files.put_png(img.sha256, f"cells-{a.analyzer_id}", mask_overlay(loaded.rgb, result.mask))
        # binary cell mask at the analysed size (DICOM SEG export)
        files.put_png(img.sha256, f"mask-{a.analyzer_id}", ((result.mask > 0) * 255).astype("uint8"))
    if result.cells and any("class" in c for c in result.cells):  # cells with a class: the review gallery
        try:
            files.put_derived(img.sha256, gallery.sprite_file(a),
                              gallery.cut_sprite(loaded.rgb, result.cells, result.extra.get("microns_per_pixel")))
        except Exception:  # noqa: BLE001 - the result stands; the gallery cuts the sprite when first asked
            log.exception("could not cut the gallery sprite of analysis %s", a.id)
    if result.heatmap is not None:
        files.put_png(img.sha256, f"heatmap-{a.analyzer_id}", heatmap_overlay(loaded.rgb, result.heatmap))
        files.put_png(img.sha256, f"heatmap-layer-{a.analyzer_id}", heatmap_rgba(result.heatmap))
    return result


def run_claimed(s, files, a, name: str, max_attempts: int) -> str:
    """Run a job this worker has claimed; record the result or the failure (with backoff)."""
    attempt = a.attempts
    try:
        result = _analyse(files, a)
    except Exception as exc:  # noqa: BLE001 - a failing job must not kill the worker
        s.rollback()
        if not case_store.still_holds(s, a, name, attempt):
            s.rollback()
            return "superseded"
        a = s.get(type(a), a.id)
        case_store.fail_job(s, a, f"{exc.__class__.__name__}: {exc}\n{traceback.format_exc(limit=3)}", max_attempts)
        s.commit()
        return a.job_status
    if not case_store.still_holds(s, a, name, attempt):
        s.rollback()  # our lease ran out and another worker owns the job now: its result stands
        log.warning("analysis %s: claim superseded, result discarded", a.id)
        return "superseded"
    case_store.store_result(s, a, result)
    s.commit()
    return "done"


def execute(sessions, files, analysis_id: int, name: str, max_attempts: int) -> str:
    """The whole job for one analysis id: claim it, run it, store. Safe to call any number of times."""
    s = sessions()
    try:
        a = case_store.claim_job(s, analysis_id, name)
        if a is None:
            return "skipped"  # already done, running elsewhere, not due yet, or gone
        return run_claimed(s, files, a, name, max_attempts)
    finally:
        s.close()


# ----------------------------------------------------------------------------- default: in-process pool
# A Unix socket's path has at most 107 bytes; longer, the pool does without (it polls).
_MAX_SOCKET_PATH = 100
IDLE_POLL_S = 0.5


def wake_pools(folder: Path) -> int:
    """Tell the worker pools listening in ``folder`` (``Settings.wake_dir``) that jobs were queued: one
    datagram each, never blocking. Returns how many were told. Without it a pool in another process
    notices new jobs at its next poll, up to half a second later, for every image of a study."""
    told = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for path in folder.glob("pool-*.sock"):
            try:
                sock.sendto(b"!", str(path))
                told += 1
            except ConnectionRefusedError:  # its process ended without removing it
                path.unlink(missing_ok=True)
            except OSError:  # (its queue is full: it has been told already) or removed meanwhile
                pass
    return told


class Coalesced:
    """``fn`` run by a background thread after a call, once for however many calls came meanwhile:
    the caller (a C-STORE being answered) never waits for Redis (2 s when it is away) or a socket."""

    def __init__(self, fn):
        self.fn = fn
        self._due = threading.Event()
        threading.Thread(target=self._run, name="oncoscope-job-notifier", daemon=True).start()

    def __call__(self) -> None:
        self._due.set()

    def _run(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            try:
                self.fn()
            except Exception:  # noqa: BLE001 - the jobs are safe in the database; the next call tries again
                log.exception("could not tell the workers about new jobs")


def job_notifier(settings, sessions) -> Coalesced:
    """What a process that queues analyses without running them (``oncoscope dicom listen`` alone) calls
    after each commit: Redis gets the jobs when the app is scaled out, else this machine's pools wake."""
    if settings.queue_url:
        return Coalesced(QueueDispatcher(sessions, settings).notify)
    return Coalesced(lambda: wake_pools(settings.wake_dir))


class WorkerPool:
    def __init__(self, session_factory, files, n_workers: int, max_attempts: int, lease_seconds: int = 300,
                 wake_dir: Path | None = None):
        self.sessions = session_factory
        self.files = files
        self.n = max(1, n_workers)
        self.max_attempts = max_attempts
        self.lease = datetime.timedelta(seconds=lease_seconds)
        self._last_sweep = 0.0
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.wake_dir = wake_dir
        self._socket: socket.socket | None = None
        self._socket_path: Path | None = None

    def start(self) -> None:
        load_analyzers()
        if self.wake_dir is not None:
            self._listen_for_wakes(self.wake_dir)
        try:
            with session_scope(self.sessions) as s:
                # one process owns every job here, so anything left 'running' belonged to a dead process
                case_store.requeue_stale(s, older_than=datetime.timedelta(0))
        except Exception:  # noqa: BLE001 - database not migrated yet / down: workers start anyway and retry
            log.exception("could not requeue stale jobs at start-up")
        for i in range(self.n):
            t = threading.Thread(target=self._loop, args=(i == 0,), name=f"oncoscope-worker-{i}", daemon=True)
            t.start()
            self.threads.append(t)

    def notify(self) -> None:
        self.wake.set()

    def _listen_for_wakes(self, folder: Path) -> None:
        """A datagram socket in ``folder`` that other processes' :func:`wake_pools` write to."""
        path = folder / f"pool-{os.getpid()}-{id(self):x}.sock"
        if len(os.fsencode(str(path))) > _MAX_SOCKET_PATH:
            log.warning("worker pool: %s is too long a path for a socket; jobs queued by other processes "
                        "start within %.1f s instead of at once", path, IDLE_POLL_S)
            return
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            wake_pools(folder)  # (removes the sockets of pools that ended without removing theirs)
            path.unlink(missing_ok=True)  # (a dead process's, whose pid this one now has)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(path))
        except OSError as exc:
            log.warning("worker pool: cannot listen at %s (%s); jobs queued by other processes start within "
                        "%.1f s instead of at once", path, exc, IDLE_POLL_S)
            return
        sock.settimeout(1.0)  # (shutdown writes to it; this only bounds a missed write)
        self._socket, self._socket_path = sock, path

        def listen():
            while not self.stop.is_set():
                try:
                    sock.recv(64)
                    self.wake.set()
                except TimeoutError:
                    continue
                except OSError:  # closed by shutdown
                    return

        t = threading.Thread(target=listen, name="oncoscope-worker-wake", daemon=True)
        t.start()
        self.threads.append(t)

    def shutdown(self, timeout: float = 5.0) -> None:
        self.stop.set()
        self.wake.set()
        if self._socket is not None:
            try:  # ends the listener's wait; then no more wakes from others
                self._socket.sendto(b"!", str(self._socket_path))
            except OSError:
                pass
            self._socket_path.unlink(missing_ok=True)
        for t in self.threads:
            t.join(timeout)
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _sweep(self) -> None:
        """A job whose result could not be written (the database went away mid-job) stays 'running';
        once its lease has run out it is queued again."""
        if time.monotonic() - self._last_sweep < min(30.0, self.lease.total_seconds() / 2):
            return
        self._last_sweep = time.monotonic()
        with session_scope(self.sessions) as s:
            if case_store.requeue_stale(s, older_than=self.lease):
                log.warning("re-queued analyses whose lease ran out")

    def _loop(self, first: bool = False) -> None:
        name = worker_name(threading.current_thread().name)
        while not self.stop.is_set():
            try:
                if first:
                    self._sweep()
                did = self.run_one(name)
            except (OperationalError, InterfaceError) as exc:  # the database is away: one line, wait, retry
                log.warning("analysis worker: database unavailable (%s); retrying", exc.__class__.__name__)
                did = False
            except Exception:  # noqa: BLE001 - anything else: keep the traceback, keep the worker alive
                log.exception("worker loop error")
                did = False
            if not did:
                self.wake.wait(IDLE_POLL_S)
                self.wake.clear()

    def run_one(self, name: str = "inline") -> bool:
        s = self.sessions()
        try:
            a = case_store.claim_next_job(s, name)
            if a is None:
                return False
            run_claimed(s, self.files, a, name, self.max_attempts)
            return True
        finally:
            s.close()


# ----------------------------------------------------------------------------- scaled: RQ + Redis
def redis_connection(url: str):
    from redis import Redis

    return Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30)


class QueueDispatcher:
    """Hands due jobs from the database to the RQ queue (web app and reconciler share it)."""

    def __init__(self, sessions, settings):
        from rq import Queue
        from rq.serializers import JSONSerializer  # job data is a plain id: no pickles to trust in Redis

        self.sessions = sessions
        self.settings = settings
        self.redis = redis_connection(settings.queue_url)
        self.queue = Queue(QUEUE_NAME, connection=self.redis, serializer=JSONSerializer)
        self.redeliver_after = datetime.timedelta(seconds=settings.job_lease_seconds)

    def dispatch_due(self) -> int:
        """Enqueue every due job not already handed over; returns how many were enqueued."""
        s = self.sessions()
        try:
            ids = case_store.due_for_dispatch(s, self.redeliver_after)
            if not ids:
                return 0
            with self.redis.pipeline() as pipe:
                for aid in ids:
                    self.queue.enqueue_call("oncoscope.services.jobs.rq_job", args=(aid,), timeout=self.settings.job_timeout_seconds,
                                            result_ttl=300, failure_ttl=7 * 86400, pipeline=pipe,
                                            description=f"analysis {aid}")
                pipe.execute()
            case_store.mark_enqueued(s, ids)  # after Redis took them: a crash in between only re-sends
            return len(ids)
        finally:
            s.close()

    def notify(self) -> None:
        """Called by the web app after a commit that queued jobs. If Redis does not answer, the jobs
        wait in the database and a worker's reconciler hands them over when it can."""
        try:
            self.dispatch_due()
        except Exception as exc:  # noqa: BLE001 - the upload itself succeeded and is safe in the database
            log.warning("could not hand jobs to the queue now (%s); the reconciler will", exc.__class__.__name__)

    def queued(self) -> int:
        return self.queue.count

    def reconcile(self) -> dict:
        s = self.sessions()
        try:
            stale = case_store.requeue_stale(s, older_than=self.redeliver_after)
        finally:
            s.close()
        return {"requeued_stale": stale, "dispatched": self.dispatch_due()}


# the `oncoscope worker` process's context (RQ calls rq_job by name inside the worker process)
_WORKER: dict = {}


def rq_job(analysis_id: int) -> str:
    w = _WORKER
    return execute(w["sessions"], w["files"], analysis_id, w["name"], w["max_attempts"])


def run_worker(settings, burst: bool = False, reconcile_every: float = 5.0) -> None:
    """`oncoscope worker`: an RQ worker (no fork per job: the analyzers stay loaded) plus the reconciler."""
    from rq import SimpleWorker

    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    _WORKER.update(sessions=sessions, files=FileStore(settings.images_dir), name=worker_name("rq"),
                   max_attempts=settings.job_max_attempts)
    load_analyzers()
    dispatcher = QueueDispatcher(sessions, settings)
    stop = threading.Event()

    def reconciler():
        while not stop.wait(reconcile_every):
            try:
                out = dispatcher.reconcile()
                if out["requeued_stale"] or out["dispatched"]:
                    log.info("reconciler: %s", out)
            except Exception as exc:  # noqa: BLE001 - database or Redis briefly down: try again next round
                log.warning("reconciler: %s: %s", exc.__class__.__name__, exc)

    try:
        dispatcher.reconcile()
    except Exception as exc:  # noqa: BLE001
        log.warning("reconciler at start-up: %s: %s", exc.__class__.__name__, exc)
    t = threading.Thread(target=reconciler, name="oncoscope-reconciler", daemon=True)
    t.start()
    try:
        SimpleWorker([dispatcher.queue], connection=dispatcher.redis, serializer=dispatcher.queue.serializer,
                     name=f"{_WORKER['name']}".replace(":", "-")).work(burst=burst, logging_level="WARNING")
    finally:
        stop.set()
        engine.dispose()


def start_worker_pool(app):
    """The app's job runner: the in-process pool by default, or the queue dispatcher when scaled out."""
    ext = app.extensions["oncoscope"]
    st = ext["settings"]
    if st.queue_url:
        runner = QueueDispatcher(ext["sessions"], st)
        runner.notify()  # jobs left from before (or queued while Redis was away)
    else:
        runner = WorkerPool(ext["sessions"], ext["files"], st.analysis_workers, st.job_max_attempts,
                            st.job_lease_seconds, wake_dir=st.wake_dir)
        runner.start()
    ext["workers"] = runner
    return runner
