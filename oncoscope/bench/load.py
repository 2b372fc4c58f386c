"""``oncoscope bench --load``: simulated doctors against the real server on loopback.

Target (issue): 50 concurrent simulated users (browse, search, upload, review) for 2 minutes
against ``oncoscope serve``: 0 errors, p95 page time <= 300 ms, every upload analysed.

1. ``prepare_instance``: a fresh instance folder, ``oncoscope db upgrade``, one doctor account per
   simulated user plus a large seeded history (``webbench.seed``: patients, cases, analyses).
2. ``Server``: the real ``oncoscope serve`` in a subprocess (waitress + analysis worker pool),
   started, health-checked, measured (peak RSS, CPU) and always stopped.
3. ``run_users``: one thread per user, each a small browser (own keep-alive connection and
   cookie jar): signs in through the CSRF form, then until the deadline picks actions from a
   weighted mix with think time between them: dashboard, patient list, search by name / MRN,
   patient page, new patient, new case with an upload (generated smear-like PNG, never dataset
   files), status polling like the page script, result page with its images, sign-off, history.
4. ``wait_for_analyses``: after the deadline, the database is asked (bounded wait) until every
   uploaded image has a finished analysis; uploads not analysed (or lost) count as errors.

The pieces are separate so fault scenarios (kill a worker, stop the database) can reuse them.
"""

from __future__ import annotations

import contextlib
import html as htmllib
import http.client
import http.cookies
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .web import DOCTOR_PASSWORD, _p, csrf_token, doctor_email, multipart_body, smear_images

PAGE, ASSET, LOGIN, POLL = "page", "asset", "login", "poll"  # request kinds; "page time" is over PAGE only

# Weighted action mix of one simulated doctor (method names of SimUser, prefix "act_").
DEFAULT_MIX = {
    "dashboard": 14, "patient_list": 12, "search_name": 10, "search_mrn": 8, "open_patient": 14,
    "history": 10, "open_case": 8, "new_patient": 4, "upload_case": 12, "review_pending": 8,
}
FAMILIES = ["Abbott", "Baptiste", "Castillo", "Dimitrov", "Eze", "Fischer", "Gupta", "Halvorsen", "Ito", "Jovanovic"]
GIVEN = ["Amal", "Bruno", "Carmen", "Dara", "Elif", "Femi", "Greta", "Hugo", "Irene", "Jamal"]


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


# ----------------------------------------------------------------------------- page parsing
_PATIENT_ROW = re.compile(r'<tr><td><a href="/patients/(\d+)">([^<]*)</a></td><td>([^<]*)</td>')
_CASE_LINK = re.compile(r'href="/cases/(\d+)"')
_IMG = re.compile(r'<img[^>]*\bsrc="(/cases/[^"]+)"')
_STATIC = re.compile(r'(?:href|src)="(/static/[^"]+)"')
_PAGES = re.compile(r"Page \d+ of (\d+)")
_SUBMISSION = re.compile(r'name="submission_id" value="([^"]+)"')
_SELECT = re.compile(r'<select[^>]*name="final_diagnosis"[^>]*>(.*?)</select>', re.S)
_OPTION = re.compile(r'<option([^>]*)value="([^"]*)"')
_CASE_STATUS = re.compile(r'data-case-status="([a-z_]+)"')
_REVISION = re.compile(r'name="revision" type="hidden" value="(\d+)"')


def unique_png(png: bytes, tag: str) -> bytes:
    """The same PNG with a text chunk added before IEND: other bytes, other sha256, same pixels
    (every upload is a new file for the store, as in real use), without re-encoding."""
    assert png[-12:-8] == b"\x00\x00\x00\x00" and png[-8:-4] == b"IEND", "not a PNG"
    data = b"tEXt" + b"oncoscope-load\x00" + tag.encode()
    chunk = len(data[4:]).to_bytes(4, "big") + data + zlib.crc32(data).to_bytes(4, "big")
    return png[:-12] + chunk + png[-12:]


# ----------------------------------------------------------------------------- one simulated doctor
@dataclass
class Shared:
    """What every simulated user reads: where the server is, when to stop, what to upload."""

    host: str
    port: int
    rec: Recorder
    deadline: float  # time.monotonic()
    stop: threading.Event
    images: list[bytes]
    think_s: tuple[float, float] = (0.5, 2.0)
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    poll_timeout_s: float = 120.0
    sign_after_upload: float = 0.75  # else the case waits on the dashboard for a later review


class SimUser:
    def __init__(self, idx: int, email: str, password: str, shared: Shared, seed: int = 0):
        self.idx, self.email, self.password, self.sh = idx, email, password, shared
        self.rng = random.Random(seed * 100_003 + idx)
        self.b = Browser(shared.host, shared.port, shared.rec, idx)
        self.patients: dict[int, tuple[str, str]] = {}  # id -> (display name, MRN)
        self.patient_pages = 1
        self.history_pages = 1
        self.cases_seen: list[int] = []
        self.pending: list[int] = []
        self.my_cases: set[int] = set()  # created in this run: their image files exist
        self.n_uploads = 0

    # -- control
    def done(self) -> bool:
        return self.sh.stop.is_set() or time.monotonic() >= self.sh.deadline

    def think(self, lo: float | None = None, hi: float | None = None) -> None:
        lo = self.sh.think_s[0] if lo is None else lo
        hi = self.sh.think_s[1] if hi is None else hi
        pause = self.rng.uniform(lo, hi)
        self.sh.stop.wait(max(0.0, min(pause, self.sh.deadline - time.monotonic())))

    def run(self, start_delay: float = 0.0) -> None:
        self.sh.stop.wait(start_delay)
        try:
            for attempt in range(3):
                if self.done():
                    return
                try:
                    self.login()
                    break
                except FlowAbort:
                    self.think(2, 4)
            else:
                return
            names = list(self.sh.mix)
            weights = [self.sh.mix[n] for n in names]
            while not self.done():
                action = self.rng.choices(names, weights)[0]
                try:
                    getattr(self, f"act_{action}")()
                except FlowAbort:
                    pass
                except Exception as exc:  # noqa: BLE001 - a bench bug or an unparsable page: count it, go on
                    self.sh.rec.error(f"{action}: client could not continue: {exc.__class__.__name__}: {exc}")
                self.think()
        finally:
            self.b.close()

    # -- helpers
    def page(self, name: str, path: str, **kw) -> Response:
        r = self.b.get(name, path, **kw)
        if r.headers.get("content-type", "").startswith("text/html"):
            self._learn(r.text)
        return r

    def _learn(self, html: str) -> None:
        for pid, name, mrn in _PATIENT_ROW.findall(html):
            self.patients[int(pid)] = (htmllib.unescape(name), htmllib.unescape(mrn))
        for cid in _CASE_LINK.findall(html)[:30]:
            self.cases_seen.append(int(cid))
        del self.cases_seen[:-200]
        for static in _STATIC.findall(html):  # stylesheet and script, once per browser
            if static not in self.b.cache:
                self.b.cache.add(static)
                self.b.get("static", static, kind=ASSET)

    def follow(self, r: Response, name: str) -> Response:
        return self.page(name, r.location or "/")

    def csrf(self, html: str) -> str:
        tok = csrf_token(html)
        if tok is None:
            raise ValueError("no CSRF token in the page")
        return tok

    def pick_patient(self) -> int:
        if not self.patients:
            self.act_patient_list()
        if not self.patients:
            raise ValueError("this doctor sees no patients")
        return self.rng.choice(list(self.patients))

    # -- actions
    def login(self) -> None:
        r = self.b.get("login_form", "/login")
        tok = self.csrf(r.text)
        r = self.b.post_form("login", "/login", {"csrf_token": tok, "email": self.email, "password": self.password},
                             kind=LOGIN)
        if r.location.startswith("/login"):
            self.sh.rec.error(f"login: {self.email} was sent back to the sign-in page")
            raise FlowAbort()
        self.dashboard_page(r.location or "/")

    def dashboard_page(self, path: str = "/") -> Response:
        r = self.page("dashboard", path)
        html = r.text
        pend, _, _recent = html.partition("Recent cases")
        self.pending = [int(c) for c in _CASE_LINK.findall(pend)]
        return r

    def act_dashboard(self) -> None:
        self.dashboard_page()

    def act_patient_list(self) -> None:
        page = self.rng.randint(1, self.patient_pages)
        r = self.page("patient_list", "/patients/" + (f"?page={page}" if page > 1 else ""))
        m = _PAGES.search(r.text)
        self.patient_pages = int(m.group(1)) if m else 1

    def _search(self, name: str, q: str) -> None:
        self.page(name, "/patients/?" + urllib.parse.urlencode({"q": q}))

    def act_search_name(self) -> None:
        display, _mrn = self.patients[self.pick_patient()]
        family = display.split(",")[0].strip()
        q = family if self.rng.random() < 0.5 else family[: self.rng.randint(3, max(3, len(family)))]
        self._search("patient_search_name", q)

    def act_search_mrn(self) -> None:
        _display, mrn = self.patients[self.pick_patient()]
        self._search("patient_search_mrn", mrn)

    def act_open_patient(self) -> None:
        self.page("patient_view", f"/patients/{self.pick_patient()}")

    def act_history(self) -> None:
        r = self.rng.random()
        if r < 0.6:
            page = self.rng.randint(1, self.history_pages)
            path = "/cases/" + (f"?page={page}" if page > 1 else "")
        elif r < 0.8:
            path = "/cases/?" + urllib.parse.urlencode({"status": self.rng.choice(["ready", "signed"])})
        else:
            display, _ = self.patients[self.pick_patient()]
            path = "/cases/?" + urllib.parse.urlencode({"q": display.split(",")[0].strip()})
        resp = self.page("history", path)
        if "?" not in path or "page=" in path:
            m = _PAGES.search(resp.text)
            self.history_pages = int(m.group(1)) if m else 1

    def act_open_case(self) -> None:
        if not self.cases_seen:
            self.act_history()
        if self.cases_seen:
            self.case_page(self.rng.choice(self.cases_seen))

    def act_new_patient(self) -> None:
        r = self.page("patient_new_form", "/patients/new")
        self.think()
        fields = {"csrf_token": self.csrf(r.text), "mrn": f"LD{self.idx}-{uuid.uuid4().hex[:8].upper()}",
                  "family_name": self.rng.choice(FAMILIES), "given_name": self.rng.choice(GIVEN),
                  "birth_date": f"{self.rng.randint(1935, 2015)}-{self.rng.randint(1, 12):02d}-{self.rng.randint(1, 28):02d}",
                  "sex": self.rng.choice(["female", "male", "other", "unknown"]), "notes": ""}
        r = self.b.post_form("patient_create", "/patients/new", fields)
        if not re.fullmatch(r"/patients/\d+", r.location):
            self.sh.rec.error(f"patient_create: redirected to {r.location!r}, not to the new patient")
            raise FlowAbort()
        self.patients[int(r.location.rsplit("/", 1)[1])] = (f"{fields['family_name']}, {fields['given_name']}",
                                                            fields["mrn"])
        self.follow(r, "patient_view")

    def act_upload_case(self) -> None:
        pid = self.pick_patient()
        self.page("patient_view", f"/patients/{pid}")
        self.think(0.2, 0.8)
        r = self.page("case_new_form", f"/patients/{pid}/cases/new")
        sub = _SUBMISSION.search(r.text)
        self.n_uploads += 1
        tag = f"u{self.idx}-{self.n_uploads}-{uuid.uuid4().hex[:8]}"
        image = unique_png(self.sh.images[self.rng.randrange(len(self.sh.images))], tag)
        body, ctype = multipart_body({"csrf_token": self.csrf(r.text), "submission_id": sub.group(1) if sub else tag,
                                      "analyzer_id": "smear-all", "clinical_note": "load test"},
                                     [("images", f"field-{tag}.png", image)])
        self.think(0.5, 1.5)  # choosing the file
        t_post = time.monotonic()
        r = self.b.request("case_upload", "POST", f"/patients/{pid}/cases/new", body=body, ctype=ctype,
                           expect=(302,))
        m = re.fullmatch(r"/cases/(\d+)", r.location)
        if not m:
            self.sh.rec.error(f"case_upload: redirected to {r.location!r}, not to the new case")
            raise FlowAbort()
        cid = int(m.group(1))
        self.my_cases.add(cid)
        self.sh.rec.uploads[cid] = {"user": self.idx, "t_post": t_post - self.sh.rec.t0, "t_result": None}
        html = self.case_page(cid, name="case_view").text
        if (st := _CASE_STATUS.search(html)) and st.group(1) == "analysing":
            if not self.poll(cid):
                return  # the run ended while waiting: the final check looks at this upload
            html = self.case_page(cid, name="case_view").text  # the page script reloads
        self.sh.rec.uploads[cid]["t_result"] = time.monotonic() - self.sh.rec.t0
        if self.rng.random() < self.sh.sign_after_upload:
            self.think()
            self.sign(cid, html)

    def poll(self, cid: int) -> bool:
        """Poll like the page script (0.7 s, then every second) until the case leaves 'analysing'."""
        t0 = time.monotonic()
        wait = 0.7
        while True:
            self.sh.stop.wait(wait)
            if self.done():
                return False
            if time.monotonic() - t0 > self.sh.poll_timeout_s:
                self.sh.rec.error(f"case_status: case {cid} still analysing after {self.sh.poll_timeout_s:.0f} s")
                raise FlowAbort()
            r = self.b.get("case_status", f"/cases/{cid}/status.json", kind=POLL, accept="application/json")
            if json.loads(r.body).get("status") != "analysing":
                return True
            wait = 1.0

    def case_page(self, cid: int, name: str = "case_view") -> Response:
        r = self.page(name, f"/cases/{cid}")
        if cid in self.my_cases:  # seeded cases have rows but no image files: only fetch what exists
            for src in dict.fromkeys(_IMG.findall(r.text)):
                src = htmllib.unescape(src)
                if src in self.b.cache:
                    continue
                self.b.cache.add(src)
                kind = src.rsplit("/", 1)[-1].removesuffix(".png")
                self.b.get(f"case_image_{kind}", src, kind=ASSET, accept="image/*")
        return r

    def act_review_pending(self) -> None:
        if not self.pending:
            self.dashboard_page()
        if not self.pending:
            return
        cid = self.pending.pop(0)
        html = self.case_page(cid).text
        self.think()
        self.sign(cid, html)

    def sign(self, cid: int, html: str) -> None:
        st = _CASE_STATUS.search(html)
        if not st or st.group(1) != "ready" or f'action="/cases/{cid}/sign"' not in html:
            return  # signed meanwhile / still analysing: nothing to sign
        sel = _SELECT.search(html)
        if sel is None:
            raise ValueError(f"case {cid}: no final diagnosis field on a ready case")
        options = [(v, "selected" in attrs) for attrs, v in _OPTION.findall(sel.group(1)) if v]  # not "Choose…"
        values = [v for v, _ in options]
        ai = next((v for v, chosen in options if chosen), None)
        revision = _REVISION.search(html)
        fields = {"csrf_token": self.csrf(html), "confirm": "y", "comment": "",
                  "revision": revision.group(1) if revision else ""}
        if ai is None:  # no AI label (out of domain / failed): non-diagnostic, with the required reason and note
            fields["final_diagnosis"] = "Nondiagnostic" if "Nondiagnostic" in values else values[0]
            fields["override_reason"] = "No AI call; slide reviewed at the microscope (load test)."
        elif self.rng.random() < 0.9:
            fields["final_diagnosis"] = ai  # agree with the AI
        else:
            fields["final_diagnosis"] = self.rng.choice([v for v in values if v != ai] or values)
            fields["override_reason"] = "Morphology reviewed at higher magnification (load test)."
        if 'name="uncertainty_note"' in html:
            fields["uncertainty_note"] = "Reviewed manually: the AI result is not confident (load test)."
        r = self.b.post_form("case_sign", f"/cases/{cid}/sign", fields)
        self.sh.rec.count("signed")
        self.follow(r, "case_view")


# ----------------------------------------------------------------------------- the users together
def run_users(host: str, port: int, accounts: list[tuple[str, str]], duration_s: float, *,
              think_s=(0.5, 2.0), seed: int = 0, images: list[bytes] | None = None, ramp_s: float | None = None,
              mix: dict | None = None, stop: threading.Event | None = None, rec: Recorder | None = None) -> Recorder:
    """One thread per account for ``duration_s`` (sign-ins spread over ``ramp_s``); returns the recording.
    ``stop`` ends the run early (Ctrl-C, a fault scenario)."""
    rec = rec or Recorder()
    stop = stop or threading.Event()
    images = images or smear_images(16, "PNG", first_seed=seed)
    # 50 doctors do not all sign in within the same few seconds: spread sign-ins over the first quarter
    ramp = min(30.0, duration_s / 4) if ramp_s is None else ramp_s
    rec.ramp_s = ramp
    sh = Shared(host, port, rec, rec.t0 + duration_s, stop, images, tuple(think_s), dict(mix or DEFAULT_MIX))
    users = [SimUser(i, email, pw, sh, seed) for i, (email, pw) in enumerate(accounts)]
    threads = [threading.Thread(target=u.run, args=(ramp * i / max(1, len(users)),), name=f"sim-user-{i}",
                                daemon=True) for i, u in enumerate(users)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():  # short joins: Ctrl-C reaches the main thread
                t.join(0.5)
                if time.monotonic() > sh.deadline + 90:
                    stop.set()
    except BaseException:
        stop.set()
        raise
    rec.elapsed_s = time.monotonic() - rec.t0
    return rec


# ----------------------------------------------------------------------------- instance and server
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


def mask_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@contextlib.contextmanager
def scratch_database(database_url: str | None):
    """SQLite / None: as given. PostgreSQL: a fresh ``oncoscope_load_<random>`` database on the same
    server (never the one named in the URL), dropped afterwards."""
    if not database_url or not database_url.startswith("postgresql"):
        yield database_url
        return
    import psycopg
    from sqlalchemy.engine import make_url

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


@dataclass
class Instance:
    home: Path
    database_url: str
    env: dict
    accounts: list[tuple[str, str]]
    seeded: dict
    first_run_image_id: int  # images above this id are uploads of the run
    first_run_case_id: int


def prepare_instance(home: Path, database_url: str | None = None, *, users: int = 50, patients: int = 10_000,
                     analyses: int = 50_000, seed: int = 0, extra_env: dict | None = None) -> Instance:
    """Migrate with ``oncoscope db upgrade`` and seed: one doctor account per simulated user, patients
    spread over them, a case history. Returns what the run and the final check need."""
    from sqlalchemy import func, select

    from ..config import Settings
    from ..store.db import make_engine
    from ..store.models import Case, CaseImage
    from .web import seed as seed_instance

    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    database_url = database_url or f"sqlite:///{home / 'oncoscope.db'}"  # never a DATABASE_URL from the environment
    env = instance_env(home, database_url, extra_env)
    p = subprocess.run([*oncoscope_cmd(), "db", "upgrade"], env=env, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"oncoscope db upgrade failed: {p.stdout[-1000:]}{p.stderr[-2000:]}")
    st = Settings.from_env(home=home, database_url=database_url).prepare()
    seeded = seed_instance(st, max(patients, users), analyses, seed=seed, n_doctors=users)
    eng = make_engine(st.database_url)
    try:
        with eng.connect() as c:
            img_max = c.scalar(select(func.coalesce(func.max(CaseImage.id), 0)))
            case_max = c.scalar(select(func.coalesce(func.max(Case.id), 0)))
    finally:
        eng.dispose()
    return Instance(home, st.database_url, env, [(doctor_email(i), DOCTOR_PASSWORD) for i in range(users)],
                    seeded, img_max, case_max)


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the bench process dies, even by SIGKILL."""
    try:
        import ctypes

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
            import psutil

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


def machine_cpu_s() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat (None elsewhere)."""
    try:
        vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return (sum(vals[:8]) - idle) / tick, sum(vals[:8]) / tick


def cpu_usage(before: dict, after: dict, seconds: float) -> dict:
    """Cores used during a run by the whole machine, the server and the bench's own process
    (``before``/``after``: {"machine": machine_cpu_s(), "server": cpu s, "bench": process_time})."""
    out = {"cpus": os.cpu_count()}
    if before.get("machine") and after.get("machine") and seconds > 0:
        out["machine_busy_cores"] = round((after["machine"][0] - before["machine"][0]) / seconds, 2)
    if before.get("server") is not None and after.get("server") is not None and seconds > 0:
        out["server_cores"] = round((after["server"] - before["server"]) / seconds, 2)
    if seconds > 0:
        out["bench_client_cores"] = round((after["bench"] - before["bench"]) / seconds, 2)
    if "machine_busy_cores" in out and "server_cores" in out:
        # everything else: the database server (PostgreSQL), other people's work, the bench itself
        out["other_cores"] = round(out["machine_busy_cores"] - out["server_cores"] - out["bench_client_cores"], 2)
    return out


# ----------------------------------------------------------------------------- final check
def wait_for_analyses(database_url: str, first_run_image_id: int, timeout_s: float = 120) -> dict:
    """Wait (bounded) until every image uploaded during the run has a finished analysis; report them."""
    from sqlalchemy import select

    from ..store.db import make_engine
    from ..store.models import Analysis, CaseImage

    eng = make_engine(database_url)
    t0 = time.monotonic()
    try:
        while True:
            with eng.connect() as c:
                rows = c.execute(select(CaseImage.id, CaseImage.case_id, CaseImage.created_at, Analysis.job_status,
                                        Analysis.result_status, Analysis.finished_at)
                                 .outerjoin(Analysis, Analysis.image_id == CaseImage.id)
                                 .where(CaseImage.id > first_run_image_id)).all()
            pending = [r for r in rows if r.job_status in ("queued", "running", "retried")]
            if not pending or time.monotonic() - t0 > timeout_s:
                break
            time.sleep(0.5)
    finally:
        eng.dispose()
    done = [r for r in rows if r.job_status == "done"]
    secs = [(r.finished_at - r.created_at).total_seconds() for r in done if r.finished_at and r.created_at]
    results: dict[str, int] = {}
    for r in done:
        results[r.result_status or "none"] = results.get(r.result_status or "none", 0) + 1
    return {"images": len(rows), "analysed": len(done), "pending": len(pending),
            "failed": sum(1 for r in rows if r.job_status == "failed"),
            "no_job": sum(1 for r in rows if r.job_status is None),
            "cases": sorted({r.case_id for r in rows}), "results": results,
            "waited_s": round(time.monotonic() - t0, 1),
            "upload_to_result_s": secs}


# ----------------------------------------------------------------------------- report
def _stats(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}
    return {"count": len(values), "p50": _p(values, 50), "p95": _p(values, 95), "p99": _p(values, 99),
            "max": round(max(values), 2)}


def summarize(rec: Recorder, check: dict, *, users: int, duration_s: float, database_url: str, server: Server | None,
              page_p95_target_ms: float = 300.0, extra: dict | None = None) -> dict:
    elapsed = rec.elapsed_s or max((s.t for s in rec.samples), default=0.0)
    by_kind: dict[str, list[float]] = {}
    by_name: dict[str, list[float]] = {}
    for s in rec.samples:
        if s.status:
            by_kind.setdefault(s.kind, []).append(s.ms)
            by_name.setdefault(s.name, []).append(s.ms)
    errors = list(rec.errors)
    client_cases = set(rec.uploads)
    db_cases = set(check["cases"])
    lost = sorted(client_cases - db_cases)
    if lost:
        errors.append(f"{len(lost)} accepted uploads have no image in the database (cases {lost[:10]})")
    not_analysed = check["images"] - check["analysed"]
    if not_analysed:
        errors.append(f"{not_analysed} uploaded images not analysed ({check['pending']} still pending after "
                      f"{check['waited_s']} s, {check['failed']} failed, {check['no_job']} without a job)")
    seen = [u["t_result"] - u["t_post"] for u in rec.uploads.values() if u["t_result"] is not None]
    page = _stats(by_kind.get(PAGE, []))
    ramp = rec.ramp_s
    steady = [s.ms for s in rec.samples if s.kind == PAGE and s.status and s.t >= ramp + 5]
    status_counts: dict[str, int] = {}
    for s in rec.samples:
        status_counts[str(s.status)] = status_counts.get(str(s.status), 0) + 1
    rep = {
        "users": users, "duration_s": duration_s, "elapsed_s": round(elapsed, 1),
        "database": {"dialect": database_url.split(":", 1)[0].split("+", 1)[0], "url": mask_url(database_url)},
        "requests": len(rec.samples), "requests_per_s": round(len(rec.samples) / elapsed, 1) if elapsed else None,
        "statuses": status_counts,
        "errors": {"count": len(errors), "first": errors[:10]},
        "page_ms": page,
        # without the sign-in ramp (all users signing in, argon2 on the server) and 5 s after it
        "page_ms_after_ramp": dict(_stats(steady), from_s=round(ramp + 5, 1)),
        "login_ms": _stats(by_kind.get(LOGIN, [])),
        "status_poll_ms": _stats(by_kind.get(POLL, [])),
        "asset_ms": _stats(by_kind.get(ASSET, [])),
        "actions": {n: {"count": len(v), "p50": _p(v, 50), "p95": _p(v, 95), "max": round(max(v), 1)}
                    for n, v in sorted(by_name.items())},
        "uploads": check["images"], "uploads_accepted_by_clients": len(client_cases),
        "uploads_analysed": check["analysed"], "analysis_results": check["results"],
        # as the doctor sees it: upload POST sent -> the status poll (0.7 s, then every 1 s, like the page) says done
        "upload_to_result_s": {k: v for k, v in _stats(seen).items() if k != "p99"},
        # server timestamps (1 s resolution): image row created -> analysis finished
        "upload_to_result_db_s": {k: v for k, v in _stats(check["upload_to_result_s"]).items() if k != "p99"},
        "signed": rec.signed, "keepalive_reconnects": rec.reconnects,
        "server": {"peak_rss_mb": server.peak_rss_mb if server else None, "cpu_s": server.cpu_s if server else None,
                   "cpu_ms_per_request": round(1e3 * server.cpu_s / len(rec.samples), 1)
                   if server and server.cpu_s and rec.samples else None,
                   **(server.log_problems() if server else {})},
        "load_average": None, "cpu_count": os.cpu_count(),
    }
    if extra:
        rep.update(extra)
    rep["targets_met"] = {
        "errors_0": len(errors) == 0,
        f"page_p95_le_{page_p95_target_ms:g}ms": page["p95"] is not None and page["p95"] <= page_p95_target_ms,
        "all_uploads_analysed": check["images"] == check["analysed"] and not lost and check["images"] > 0,
    }
    rep["all_targets_met"] = all(rep["targets_met"].values())
    return rep


# ----------------------------------------------------------------------------- the whole run
def run_load(users: int = 50, duration_s: float = 120, database_url: str | None = None, think_s=(0.5, 2.0),
             seed: int = 0, extra_env: dict | None = None, *, patients: int = 10_000, analyses: int = 50_000,
             server_threads: int | None = None, ramp_s: float | None = None, mix: dict | None = None,
             analysis_wait_s: float = 120, keep_home: bool = False, home: Path | None = None,
             progress=None, queue_url: str | None = None, workers: int = 2) -> dict:
    """Fresh instance + real server + ``users`` simulated doctors for ``duration_s``; returns the report.
    ``database_url``: None = SQLite in the instance; PostgreSQL gets its own scratch database.
    ``queue_url``: scaled-out mode: the server hands analyses to Redis and ``workers`` separate
    ``oncoscope worker`` processes run them."""
    say = progress or (lambda _msg: None)
    if queue_url:
        extra_env = dict(extra_env or {}, ONCOSCOPE_QUEUE_URL=queue_url)
    worker_procs: list = []
    tmp = None
    if home is None:
        tmp = tempfile.TemporaryDirectory(prefix="oncoscope-load-")
        home = Path(tmp.name)
    server = None
    try:
        with sigterm_as_exit(), scratch_database(database_url) as url:
            say(f"seeding {max(patients, users)} patients, {analyses} analyses, {users} doctors in {home}")
            inst = prepare_instance(home, url, users=users, patients=patients, analyses=analyses, seed=seed,
                                    extra_env=extra_env)
            images = smear_images(16, "PNG", first_seed=seed)
            server = Server(inst.env, threads=server_threads)
            say(f"starting oncoscope serve on {server.base}")
            server.start()
            if queue_url:
                from .faults import WorkerProcess, _clear_queue

                _clear_queue(queue_url)
                worker_procs = [WorkerProcess(inst.env, home / f"worker-{i}.log").start() for i in range(workers)]
                say(f"started {workers} oncoscope worker processes on {queue_url}")
            load_before = os.getloadavg()
            server.sample()
            cpu_before = {"machine": machine_cpu_s(), "server": server.cpu_s, "bench": time.process_time()}
            say(f"{users} users for {duration_s:g} s")
            rec = run_users(server.host, server.port, inst.accounts, duration_s, think_s=think_s, seed=seed,
                            images=images, ramp_s=ramp_s, mix=mix)
            load_after = os.getloadavg()
            server.sample()
            cpu_after = {"machine": machine_cpu_s(), "server": server.cpu_s, "bench": time.process_time()}
            say("waiting for the last analyses")
            check = wait_for_analyses(inst.database_url, inst.first_run_image_id, analysis_wait_s)
            server.sample()
            server.stop()
            for w in worker_procs:
                w.stop()
            rep = summarize(rec, check, users=users, duration_s=duration_s, database_url=inst.database_url,
                            server=server, extra={"think_s": list(think_s), "seeded": inst.seeded,
                                                  "cpu": cpu_usage(cpu_before, cpu_after, rec.elapsed_s)})
            if cpu_before["server"] is not None and cpu_after["server"] is not None and rec.samples:
                # during the run only (not start-up or the final wait)
                rep["server"]["cpu_ms_per_request"] = round(
                    1e3 * (cpu_after["server"] - cpu_before["server"]) / len(rec.samples), 1)
            rep["queue"] = {"mode": "redis", "url": queue_url, "workers": workers} if queue_url else \
                {"mode": "in-process"}
            rep["load_average"] = {"before": [round(x, 2) for x in load_before],
                                   "after": [round(x, 2) for x in load_after]}
            if keep_home:
                rep["home"] = str(home)
            return rep
    finally:
        if server is not None:
            server.stop()
        for w in worker_procs:
            w.stop()
        if tmp is not None and not keep_home:
            tmp.cleanup()


def format_report(rep: dict) -> str:
    """A readable summary of ``run_load``'s report."""
    def ms(d):
        return "–" if not d or d.get("p95") is None else f"p50 {d['p50']:.0f} / p95 {d['p95']:.0f} / max {d['max']:.0f} ms"

    cpu = rep.get("cpu") or {}
    lines = [
        f"{rep['users']} users for {rep['duration_s']:g} s on {rep['database']['dialect']} "
        f"({rep['requests']} requests, {rep['requests_per_s']} req/s; load average before "
        f"{rep['load_average']['before'][0] if rep.get('load_average') else '?'}, after "
        f"{rep['load_average']['after'][0] if rep.get('load_average') else '?'} on {rep['cpu_count']} CPUs)",
        f"CPU cores busy during the run: machine {cpu.get('machine_busy_cores')}, server {cpu.get('server_cores')}, "
        f"bench client {cpu.get('bench_client_cores')}, everything else {cpu.get('other_cores')}",
        f"pages:        {ms(rep['page_ms'])} (p99 {rep['page_ms']['p99']} ms); "
        f"after the sign-in ramp: {ms(rep['page_ms_after_ramp'])}",
        f"sign-in POST: {ms(rep['login_ms'])}",
        f"status polls: {ms(rep['status_poll_ms'])}",
        f"images:       {ms(rep['asset_ms'])}",
        f"uploads:      {rep['uploads']} ({rep['uploads_analysed']} analysed; {rep['analysis_results']}), "
        f"upload to result p50 {rep['upload_to_result_s']['p50']} s / p95 {rep['upload_to_result_s']['p95']} s; "
        f"{rep['signed']} cases signed",
        f"server:       peak RSS {rep['server'].get('peak_rss_mb')} MB, CPU {rep['server'].get('cpu_s')} s "
        f"({rep['server'].get('cpu_ms_per_request')} ms per request), "
        f"{rep['server'].get('tracebacks', 0)} tracebacks, max queue depth {rep['server'].get('max_queue_depth', 0)}",
        f"errors:       {rep['errors']['count']}",
    ]
    lines += [f"  - {e}" for e in rep["errors"]["first"]]
    lines.append("slowest requests (p95):")
    worst = sorted(rep["actions"].items(), key=lambda kv: -kv[1]["p95"])[:8]
    lines += [f"  {n:<24} n={v['count']:<5} p50 {v['p50']:>7.1f}  p95 {v['p95']:>7.1f}  max {v['max']:>7.1f} ms"
              for n, v in worst]
    lines += [f"{'MET ' if ok else 'MISS'} {k}" for k, ok in rep["targets_met"].items()]
    return "\n".join(lines)
