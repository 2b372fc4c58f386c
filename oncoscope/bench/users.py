"""Simulated doctors for the load run: one thread each, each with its own small browser.

A doctor signs in through the CSRF form, then until the deadline picks actions from a weighted mix
with think time between them: dashboard, patient list, search by name / MRN, patient page, new
patient, new case with an upload (generated smear-like PNG, never dataset files), status polling
like the page script, result page with its images, sign-off, history.

One doctor is assembled from small pieces:

* ``DoctorSession``: the browser, the doctor's random choices and what the pages taught it
  (patients, cases, page counts, the dashboard's pending list); sign-in, dashboard and case page.
* ``BrowsingActions``: the read-only actions of the mix.
* ``CaseActions``: the actions that write: new patient, upload and wait for the result, sign-off.
* ``SimUser``: the loop that signs in and then runs the mix until the deadline.
"""

from __future__ import annotations

import html as htmllib
import json
import random
import re
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field

from .browser import ASSET, LOGIN, POLL, Browser, FlowAbort, Recorder, Response
from .fixtures import csrf_token, multipart_body, smear_images, unique_png

# Weighted action mix of one simulated doctor (method names of SimUser, prefix "act_").
DEFAULT_MIX = {
    "dashboard": 14, "patient_list": 12, "search_name": 10, "search_mrn": 8, "open_patient": 14,
    "history": 10, "open_case": 8, "new_patient": 4, "upload_case": 12, "review_pending": 8,
}
FAMILIES = ["Abbott", "Baptiste", "Castillo", "Dimitrov", "Eze", "Fischer", "Gupta", "Halvorsen", "Ito", "Jovanovic"]
GIVEN = ["Amal", "Bruno", "Carmen", "Dara", "Elif", "Femi", "Greta", "Hugo", "Irene", "Jamal"]

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


# ----------------------------------------------------------------------------- what a doctor types
def new_patient_fields(rng: random.Random, idx: int, token: str) -> dict:
    """The new-patient form of doctor ``idx``: a unique MRN, a random name, birth date and sex."""
    return {"csrf_token": token, "mrn": f"LD{idx}-{uuid.uuid4().hex[:8].upper()}",
            "family_name": rng.choice(FAMILIES), "given_name": rng.choice(GIVEN),
            "birth_date": f"{rng.randint(1935, 2015)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            "sex": rng.choice(["female", "male", "other", "unknown"]), "notes": ""}


def diagnosis_fields(select_html: str, rng: random.Random) -> dict:
    """The final diagnosis on a ready case (``select_html``: the options of its field): agree with
    the AI 9 times in 10, else override with a reason; no AI label (out of domain / failed):
    non-diagnostic, with the required reason."""
    options = [(v, "selected" in attrs) for attrs, v in _OPTION.findall(select_html) if v]  # not "Choose…"
    values = [v for v, _ in options]
    ai = next((v for v, chosen in options if chosen), None)
    if ai is None:
        return {"final_diagnosis": "Nondiagnostic" if "Nondiagnostic" in values else values[0],
                "override_reason": "No AI call; slide reviewed at the microscope (load test)."}
    if rng.random() < 0.9:
        return {"final_diagnosis": ai}
    return {"final_diagnosis": rng.choice([v for v in values if v != ai] or values),
            "override_reason": "Morphology reviewed at higher magnification (load test)."}


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


class DoctorSession:
    """A doctor's browser and what its pages taught it; the pages every action passes through."""

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

    def done(self) -> bool:
        return self.sh.stop.is_set() or time.monotonic() >= self.sh.deadline

    def think(self, lo: float | None = None, hi: float | None = None) -> None:
        lo = self.sh.think_s[0] if lo is None else lo
        hi = self.sh.think_s[1] if hi is None else hi
        pause = self.rng.uniform(lo, hi)
        self.sh.stop.wait(max(0.0, min(pause, self.sh.deadline - time.monotonic())))

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
        pend, _, _recent = r.text.partition("Recent cases")
        self.pending = [int(c) for c in _CASE_LINK.findall(pend)]
        return r

    def patient_list_page(self) -> None:
        page = self.rng.randint(1, self.patient_pages)
        r = self.page("patient_list", "/patients/" + (f"?page={page}" if page > 1 else ""))
        m = _PAGES.search(r.text)
        self.patient_pages = int(m.group(1)) if m else 1

    def pick_patient(self) -> int:
        if not self.patients:
            self.patient_list_page()
        if not self.patients:
            raise ValueError("this doctor sees no patients")
        return self.rng.choice(list(self.patients))

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


class BrowsingActions(DoctorSession):
    """The read-only actions of the mix."""

    def act_dashboard(self) -> None:
        self.dashboard_page()

    def act_patient_list(self) -> None:
        self.patient_list_page()

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


class CaseActions(DoctorSession):
    """The actions that write: a new patient, an upload followed to its result, a sign-off."""

    def act_new_patient(self) -> None:
        r = self.page("patient_new_form", "/patients/new")
        self.think()
        fields = new_patient_fields(self.rng, self.idx, self.csrf(r.text))
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
        cid = self.upload(pid)
        html = self.await_result(cid)
        if html is None:
            return  # the run ended while waiting: the final check looks at this upload
        if self.rng.random() < self.sh.sign_after_upload:
            self.think()
            self.sign(cid, html)

    def upload(self, pid: int) -> int:
        """A new case for ``pid`` with one generated image; returns its id, recorded as an upload."""
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
        return cid

    def await_result(self, cid: int) -> str | None:
        """The case page once its analysis is in (polled like the page script); None if the run ended first."""
        html = self.case_page(cid, name="case_view").text
        if (st := _CASE_STATUS.search(html)) and st.group(1) == "analysing":
            if not self.poll(cid):
                return None
            html = self.case_page(cid, name="case_view").text  # the page script reloads
        self.sh.rec.uploads[cid]["t_result"] = time.monotonic() - self.sh.rec.t0
        return html

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
        revision = _REVISION.search(html)
        fields = {"csrf_token": self.csrf(html), "confirm": "y", "comment": "",
                  "revision": revision.group(1) if revision else ""}
        fields.update(diagnosis_fields(sel.group(1), self.rng))
        if 'name="uncertainty_note"' in html:
            fields["uncertainty_note"] = "Reviewed manually: the AI result is not confident (load test)."
        r = self.b.post_form("case_sign", f"/cases/{cid}/sign", fields)
        self.sh.rec.count("signed")
        self.follow(r, "case_view")


class SimUser(BrowsingActions, CaseActions):
    """One simulated doctor: signs in, then runs the mix (``act_<name>``) until the deadline."""

    def run(self, start_delay: float = 0.0) -> None:
        self.sh.stop.wait(start_delay)
        try:
            if self.sign_in():
                self.act_until_done()
        finally:
            self.b.close()

    def sign_in(self) -> bool:
        """Up to three tries, 2-4 s apart; False when all fail or the run ends first."""
        for _attempt in range(3):
            if self.done():
                return False
            try:
                self.login()
                return True
            except FlowAbort:
                self.think(2, 4)
        return False

    def act_until_done(self) -> None:
        names = list(self.sh.mix)
        weights = [self.sh.mix[n] for n in names]
        while not self.done():
            self.act(self.rng.choices(names, weights)[0])
            self.think()

    def act(self, action: str) -> None:
        """One action of the mix; a failed one is already recorded, a client bug is recorded here."""
        try:
            getattr(self, f"act_{action}")()
        except FlowAbort:
            pass
        except Exception as exc:  # noqa: BLE001 - a bench bug or an unparsable page: count it, go on
            self.sh.rec.error(f"{action}: client could not continue: {exc.__class__.__name__}: {exc}")


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
