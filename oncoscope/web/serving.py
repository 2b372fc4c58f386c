"""``oncoscope serve``: waitress, in one or several processes sharing one listening socket.

Python runs one thread at a time per process, so one process uses about one core however many
waitress threads it has. With ``processes > 1`` the socket is bound once, then that many
processes are forked; each builds its own app (database engine, analyzers) *after* the fork and
accepts connections from the shared socket (the kernel spreads them). Only the first process runs
the in-process analysis pool: jobs are claimed atomically in the database, so one pool is simply
the least contention. In scale-out mode (``ONCOSCOPE_QUEUE_URL``) no process analyses anything.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

from waitress import serve as waitress_serve

from . import create_app


def serve(settings, host: str, port: int, threads: int, processes: int = 1) -> None:
    body_limit = settings.max_upload_mb * 1024 * 1024 * 20
    if processes <= 1:
        waitress_serve(create_app(settings=settings), host=host, port=port, threads=threads,
                       max_request_body_size=body_limit)
        return
    sock = _listen(host, port)
    children = [_fork_server(settings, sock, first=(i == 0), threads=threads, body_limit=body_limit)
                for i in range(processes)]
    sock.close()
    sys.exit(_supervise(children))


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


def _fork_server(settings, sock: socket.socket, *, first: bool, threads: int, body_limit: int) -> int:
    """Fork one server process on the shared socket; returns its pid (the child never returns)."""
    pid = os.fork()
    if pid:
        return pid
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # child: a whole app of its own
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        app = create_app(settings=settings, start_workers=first)
        if not first:
            app.extensions["oncoscope"]["workers_in"] = "the first server process"
        waitress_serve(app, sockets=[sock], threads=threads, max_request_body_size=body_limit, ident="oncoscope")
    finally:
        os._exit(0)


def _supervise(children: list[int]) -> int:
    """Wait for the server processes; if one dies the server is broken: stop the others too."""
    stopping = []

    def stop(signum, _frame):
        stopping.append(signum)
        for c in children:
            try:
                os.kill(c, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    while children:
        try:
            pid, st = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid in children:
            children.remove(pid)
            if st != 0 and children and not stopping:
                print(f"oncoscope serve: process {pid} exited ({st}); stopping the others", file=sys.stderr)
                status = 1
                stop(signal.SIGTERM, None)
    return status
