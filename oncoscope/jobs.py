"""In-process analysis worker pool (default deployment: one machine, SQLite).

Jobs live in the ``analyses`` table (job_status queued -> running -> done | retried -> failed),
so nothing is lost when the process restarts: jobs left 'running' are picked up again.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import traceback

from sqlalchemy.orm import object_session

from .analyzers import registry
from .analyzers.render import heatmap_overlay, heatmap_rgba, mask_overlay
from .ml.imageio import load_image
from .store import cases as case_store
from .store.db import session_scope

log = logging.getLogger("oncoscope.jobs")


class WorkerPool:
    def __init__(self, session_factory, files, n_workers: int, max_attempts: int):
        self.sessions = session_factory
        self.files = files
        self.n = max(1, n_workers)
        self.max_attempts = max_attempts
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        # Load every analyzer (ONNX sessions) now, not inside the first user's job.
        for aid in registry.available():
            try:
                registry.get(aid)
            except Exception:  # noqa: BLE001 - reported by /healthz; jobs for it will fail and be retried
                log.exception("could not load analyzer %s", aid)
        try:
            with session_scope(self.sessions) as s:
                case_store.requeue_stale(s, older_than=datetime.timedelta(0))
        except Exception:  # noqa: BLE001 - database not migrated yet / down: workers start anyway and retry
            log.exception("could not requeue stale jobs at start-up")
        for i in range(self.n):
            t = threading.Thread(target=self._loop, name=f"oncoscope-worker-{i}", daemon=True)
            t.start()
            self.threads.append(t)

    def notify(self) -> None:
        self.wake.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        self.stop.set()
        self.wake.set()
        for t in self.threads:
            t.join(timeout)

    def _loop(self) -> None:
        name = f"{socket.gethostname()}:{os.getpid()}:{threading.current_thread().name}"
        while not self.stop.is_set():
            try:
                did = self.run_one(name)
            except Exception:  # noqa: BLE001 - e.g. database briefly down: wait and retry
                log.exception("worker loop error")
                did = False
            if not did:
                self.wake.wait(0.5)
                self.wake.clear()

    def run_one(self, name: str = "inline") -> bool:
        s = self.sessions()
        try:
            a = case_store.claim_next_job(s, name)
            if a is None:
                return False
            try:
                self._analyse(a)
                s.commit()
            except Exception as exc:  # noqa: BLE001 - a failing job must not kill the worker
                s.rollback()
                a = s.get(type(a), a.id)
                case_store.fail_job(s, a, f"{exc.__class__.__name__}: {exc}\n{traceback.format_exc(limit=3)}",
                                    self.max_attempts)
                s.commit()
            return True
        finally:
            s.close()

    def _analyse(self, a) -> None:
        img = a.image
        analyzer = registry.get(a.analyzer_id)
        loaded = load_image(self.files.path(img.sha256))
        result = analyzer.analyze(loaded)
        if result.mask is not None:
            self.files.put_png(img.sha256, f"cells-{a.analyzer_id}", mask_overlay(loaded.rgb, result.mask))
            # binary cell mask at the analysed size (DICOM SEG export)
            self.files.put_png(img.sha256, f"mask-{a.analyzer_id}", ((result.mask > 0) * 255).astype("uint8"))
        if result.heatmap is not None:
            self.files.put_png(img.sha256, f"heatmap-{a.analyzer_id}", heatmap_overlay(loaded.rgb, result.heatmap))
            self.files.put_png(img.sha256, f"heatmap-layer-{a.analyzer_id}", heatmap_rgba(result.heatmap))
        case_store.store_result(object_session(a), a, result)


def start_worker_pool(app) -> WorkerPool:
    ext = app.extensions["oncoscope"]
    st = ext["settings"]
    pool = WorkerPool(ext["sessions"], ext["files"], st.analysis_workers, st.job_max_attempts)
    pool.start()
    ext["workers"] = pool
    return pool
