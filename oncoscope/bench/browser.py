"""The client side of the load run: a small browser per simulated doctor and the recording of
every request it makes.

``Browser`` is one keep-alive HTTP/1.1 connection with a cookie jar, like one browser tab; every
request, answered or not, becomes a ``Sample`` in the shared ``Recorder``. A request that fails
raises ``FlowAbort`` after recording its error, so the simulated doctor drops the current action.
"""

from __future__ import annotations

import http.client
import http.cookies
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass

PAGE, ASSET, LOGIN, POLL = "page", "asset", "login", "poll"  # request kinds; "page time" is over PAGE only


# ----------------------------------------------------------------------------- recording
@dataclass
class Sample:
    t: float  # seconds since the run started
    user: int
    name: str  # request name (action), e.g. "patient_search_mrn"
    kind: str  # PAGE / ASSET / LOGIN / POLL
    method: str
    status: int  # 0: no answer (connection error / timeout)
    ms: float
    error: str | None = None


class Recorder:
    """Every request, every error (thread-safe) and the uploads the clients saw accepted."""

    def __init__(self, t0: float | None = None):
        self.t0 = t0 if t0 is not None else time.monotonic()
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self.uploads: dict[int, dict] = {}  # case id -> {"user", "t_post", "t_result"}
        self.signed = 0
        self.reconnects = 0
        self.ramp_s = 0.0  # sign-ins spread over the first seconds
        self.elapsed_s: float | None = None
        self._lock = threading.Lock()

    def add(self, sample: Sample) -> None:
        with self._lock:
            self.samples.append(sample)
            if sample.error:
                self.errors.append(sample.error)

    def error(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)

    def count(self, attr: str) -> None:
        with self._lock:
            setattr(self, attr, getattr(self, attr) + 1)


class FlowAbort(Exception):
    """The current action cannot go on (its error is already recorded)."""


# ----------------------------------------------------------------------------- a small browser
@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    @property
    def location(self) -> str:
        loc = self.headers.get("location", "")
        parts = urllib.parse.urlsplit(loc)
        return parts.path + (f"?{parts.query}" if parts.query else "")


class Browser:
    """One keep-alive HTTP/1.1 connection and one cookie jar; records every request.

    A request answered with a status outside ``expect``, or not answered at all, is recorded as an
    error and raises ``FlowAbort``.
    """

    def __init__(self, host: str, port: int, rec: Recorder, user: int, timeout: float = 30.0):
        self.host, self.port, self.rec, self.user, self.timeout = host, port, rec, user, timeout
        self.cookies: dict[str, str] = {}
        self.conn: http.client.HTTPConnection | None = None
        self.cache: set[str] = set()  # assets already fetched (the pages send Cache-Control: max-age)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _roundtrip(self, method: str, path: str, body: bytes | None, headers: dict) -> tuple[int, dict, bytes]:
        for attempt in (0, 1):
            fresh = self.conn is None
            if fresh:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers)
                r = self.conn.getresponse()
                data = r.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if fresh or attempt:
                    raise
                self.rec.count("reconnects")  # the server closed an idle keep-alive connection: a browser retries
                continue
            except BaseException:
                self.close()
                raise
            hdrs = {k.lower(): v for k, v in r.getheaders()}
            for raw in r.msg.get_all("Set-Cookie") or []:
                self._store_cookie(raw)
            if r.will_close:
                self.close()
            return r.status, hdrs, data
        raise AssertionError("unreachable")

    def _store_cookie(self, raw: str) -> None:
        c = http.cookies.SimpleCookie()
        try:
            c.load(raw)
        except http.cookies.CookieError:
            return
        for name, morsel in c.items():
            expired = morsel["max-age"] == "0" or "1970" in (morsel["expires"] or "")
            if expired or morsel.value == "":
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = morsel.value

    def request(self, name: str, method: str, path: str, *, kind: str = PAGE, body: bytes | None = None,
                ctype: str | None = None, accept: str = "text/html", expect=(200,)) -> Response:
        headers = {"Host": f"{self.host}:{self.port}", "Accept": accept, "User-Agent": "oncoscope-loadbench"}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if ctype:
            headers["Content-Type"] = ctype
        t = time.monotonic()
        try:
            status, hdrs, data = self._roundtrip(method, path, body, headers)
        except (OSError, http.client.HTTPException) as exc:
            ms = (time.monotonic() - t) * 1e3
            self.rec.add(Sample(t - self.rec.t0, self.user, name, kind, method, 0, ms,
                                f"{name}: {method} {path}: no answer after {ms:.0f} ms ({exc.__class__.__name__}: {exc})"))
            raise FlowAbort() from None
        ms = (time.monotonic() - t) * 1e3
        err = None
        if status not in expect:
            snippet = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", data[:3000].decode("utf-8", "replace")))[:160]
            err = f"{name}: {method} {path}: HTTP {status} (expected {'/'.join(map(str, expect))}) {snippet.strip()}"
        self.rec.add(Sample(t - self.rec.t0, self.user, name, kind, method, status, ms, err))
        if err:
            raise FlowAbort()
        return Response(status, hdrs, data)

    def get(self, name: str, path: str, **kw) -> Response:
        return self.request(name, "GET", path, **kw)

    def post_form(self, name: str, path: str, fields: dict, **kw) -> Response:
        kw.setdefault("expect", (302,))
        return self.request(name, "POST", path, body=urllib.parse.urlencode(fields).encode(),
                            ctype="application/x-www-form-urlencoded", **kw)
