"""The instance under test as processes: ``oncoscope serve`` and ``oncoscope worker`` in subprocesses,
their environment, a scratch database and the analysis queue.

Shared by the load run (``load.py``) and the fault scenarios (``faults.py``): each process runs in
its own process group with its output in a log file, and is stopped however the bench ends (a
``finally``, SIGTERM turned into ``SystemExit``, and on Linux a signal when the bench itself dies).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import psycopg
from rq import Queue
from rq.serializers import JSONSerializer
from sqlalchemy.engine import make_url

from ..services.jobs import QUEUE_NAME, redis_connection


# ----------------------------------------------------------------------------- environment
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def oncoscope_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "oncoscope"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "oncoscope.cli"]


def instance_env(home: Path, database_url: str | None, extra_env: dict | None = None) -> dict:
    env = dict(os.environ, ONCOSCOPE_HOME=str(home))
    env.pop("DATABASE_URL", None)
    if database_url:
        env["DATABASE_URL"] = database_url
    env.update({k: str(v) for k, v in (extra_env or {}).items()})
    return env


@contextlib.contextmanager
def scratch_database(database_url: str | None):
    """SQLite / None: as given. PostgreSQL: a fresh ``oncoscope_load_<random>`` database on the same
    server (never the one named in the URL), dropped afterwards."""
    if not database_url or not database_url.startswith("postgresql"):
        yield database_url
        return
    url = make_url(database_url)
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"oncoscope_load_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ----------------------------------------------------------------------------- the analysis queue
def redis_reachable(url: str) -> Exception | None:
    """None when Redis at ``url`` answers a ping, else why not."""
    try:
        redis_connection(url).ping()
        return None
    except Exception as exc:  # noqa: BLE001 - report why
        return exc


def clear_queue(redis_url: str) -> None:
    """Start from an empty queue: drop this queue's keys only (never FLUSHDB on a shared Redis)."""
    q = Queue(QUEUE_NAME, connection=redis_connection(redis_url), serializer=JSONSerializer)
    q.empty()
    for reg in (q.started_job_registry, q.failed_job_registry, q.finished_job_registry):
        for jid in reg.get_job_ids():
            with contextlib.suppress(Exception):
                reg.remove(jid, delete_job=True)


# ----------------------------------------------------------------------------- stopping whatever happens
def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the bench process dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort; stop() is the normal way
        pass


def _pdeathsig_ok() -> bool:
    # The signal follows the *thread* that started the child: only tie it to the main thread's life.
    return sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_as_exit():
    """While active (main thread only), SIGTERM raises SystemExit so ``finally`` blocks stop the server."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, _frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------- processes
class OncoscopeProcess:
    """An ``oncoscope`` command in a subprocess: own process group (so Ctrl-C reaches the bench,
    which stops it), output in a log file, ended when the bench dies. ``stop()`` is always safe to
    call again."""

    def __init__(self, env: dict, log_path: Path):
        self.env, self.log_path = env, Path(log_path)
        self.proc: subprocess.Popen | None = None
        self._log = None

    def _launch(self, args: list[str]) -> None:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*oncoscope_cmd(), *args], env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent if _pdeathsig_ok() else None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL to the whole group: no clean-up of any kind (what a crash or OOM kill does)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout_s: float = 15) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class WorkerProcess(OncoscopeProcess):
    """``oncoscope worker`` in a subprocess (log in the instance folder)."""

    def __init__(self, env: dict, log_path: Path, reconcile_every: float = 1.0):
        super().__init__(env, log_path)
        self.reconcile_every = reconcile_every

    def start(self) -> "WorkerProcess":
        self._launch(["worker", "--reconcile-every", str(self.reconcile_every)])
        return self


class Server(OncoscopeProcess):
    """``oncoscope serve`` on loopback (log in the instance folder). Use as a context manager, or
    call ``stop()``."""

    def __init__(self, env: dict, host: str = "127.0.0.1", port: int | None = None, threads: int | None = None,
                 log_path: Path | None = None):
        super().__init__(env, log_path or Path(env["ONCOSCOPE_HOME"]) / "server.log")
        self.host, self.port, self.threads = host, port or free_port(host), threads
        self.peak_rss_mb: float | None = None
        self.cpu_s: float | None = None

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 120) -> "Server":
        args = ["serve", "--host", self.host, "--port", str(self.port)]
        if self.threads:
            args += ["--threads", str(self.threads)]
        self._launch(args)
        t_end = time.monotonic() + timeout_s
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"oncoscope serve exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"oncoscope serve did not become healthy in {timeout_s:.0f} s: {self.log_tail()}")

    def sample(self) -> None:
        """Peak RSS (sum over the server's processes: ``serve`` forks one per core) and CPU time."""
        if not self.alive():
            return
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
            rss, cpu = 0.0, 0.0
            for p in procs:
                status = Path(f"/proc/{p.pid}/status").read_text()
                m = re.search(r"VmHWM:\s+(\d+) kB", status)
                rss += int(m.group(1)) / 1024 if m else 0.0
                t = p.cpu_times()
                cpu += t.user + t.system
            self.peak_rss_mb = round(max(rss, self.peak_rss_mb or 0.0), 1)
            self.cpu_s = round(cpu, 1)
            self.processes = len(procs)
        except Exception:  # noqa: BLE001 - measurement only, never fatal
            pass

    def stop(self, timeout_s: float = 15) -> None:
        self.sample()  # last reading before it goes
        super().stop(timeout_s)

    def log_problems(self, limit: int = 5) -> dict:
        """Tracebacks and waitress queue warnings in the server log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return {}
        lines = text.splitlines()
        tb = [i for i, l in enumerate(lines) if l.startswith("Traceback")]
        queue = [l for l in lines if "Task queue depth" in l]
        depths = [int(m.group(1)) for l in queue if (m := re.search(r"depth is (\d+)", l))]
        return {"tracebacks": len(tb),
                "first_tracebacks": ["\n".join(lines[i:i + 40])[-1500:] for i in tb[:limit]],
                "queue_depth_warnings": len(queue), "max_queue_depth": max(depths) if depths else 0}

    def __enter__(self) -> "Server":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
