"""``oncoscope bench --web``: page speed on a large instance and concurrent uploads.

1. Seeds a fresh SQLite instance with 10,000 patients and 50,000 analyses (25,000 cases x 2
   images) and times patient search and case-history pages (server time, Flask test client).
2. Starts the real WSGI server (waitress) with the analysis worker pool and sends 8 concurrent
   uploads from 8 signed-in clients; every upload must be analysed, none lost; reports the
   upload-to-result time.
"""

from __future__ import annotations

import datetime as dt
import http.cookiejar
import io
import json
import random
import re
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np


DOCTOR_PASSWORD = "Bench-doctor-pass-1"
ADMIN_EMAIL, ADMIN_PASSWORD = "admin@bench.test", "Bench-admin-pass-1"
CSRF_RE = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')


def doctor_email(i: int) -> str:
    return f"doc{i}@bench.test"


def _p(values, q):
    return round(float(np.percentile(values, q)), 2)


def csrf_token(html: str) -> str | None:
    """The CSRF token of the first form in a page (every form of a session carries a valid one)."""
    m = CSRF_RE.search(html)
    return m.group(1) if m else None


def smear_images(n: int, fmt: str = "JPEG", first_seed: int = 0) -> list[bytes]:
    """``n`` generated smear-like fields (``oncoscope.ml.synthetic``), encoded as ``fmt``; never dataset files."""
    from PIL import Image

    from ..ml.synthetic import smear_like

    out = []
    for i in range(first_seed, first_seed + n):
        buf = io.BytesIO()
        Image.fromarray(smear_like(i)[0]).save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
        out.append(buf.getvalue())
    return out


def seed(settings, n_patients: int = 10_000, n_analyses: int = 50_000, seed: int = 0, n_doctors: int = 4) -> dict:
    """Bulk-load a large instance: one admin, ``n_doctors`` doctors (``doctor_email(i)`` /
    ``DOCTOR_PASSWORD``), patients assigned round-robin to the doctors, cases with analysed images
    (rows only: the image files do not exist)."""
    from sqlalchemy import insert, text

    from ..store import users as user_store
    from ..store.db import make_engine, make_session_factory, session_scope
    from ..store.models import Analysis, Case, CaseImage, Patient, PatientAccess

    rng = random.Random(seed)
    eng = make_engine(settings.database_url)
    sf = make_session_factory(eng)
    with session_scope(sf) as s:
        admin = user_store.create_user(s, ADMIN_EMAIL, "Bench Admin", ADMIN_PASSWORD, "admin")
        docs = [user_store.create_user(s, doctor_email(i), f"Doctor {i}", DOCTOR_PASSWORD, "doctor")
                for i in range(n_doctors)]
        admin_id, doc_ids = admin.id, [d.id for d in docs]
    families = ["Smith", "Garcia", "Nguyen", "Kowalski", "Okafor", "Rossi", "Haddad", "Schmidt", "Tanaka", "Silva",
                "Novak", "Ahmed", "Johansson", "Dubois", "Moreau", "Ivanova", "Kim", "Lopez", "Müller", "Singh"]
    given = ["Ana", "Ben", "Chloé", "Dmitri", "Eva", "Farid", "Grace", "Hiro", "Ines", "Jon", "Kaya", "Li", "Mia"]
    now = dt.datetime(2026, 11, 1)
    t0 = time.perf_counter()
    with eng.begin() as c:
        c.execute(insert(Patient), [{"id": i + 1, "mrn": f"MRN{i + 1:07d}", "family_name": f"{rng.choice(families)}{i % 97}",
                                     "given_name": rng.choice(given), "sex": rng.choice(["female", "male"]),
                                     "notes": "", "created_by_id": admin_id, "created_at": now, "updated_at": now}
                                    for i in range(n_patients)])
        c.execute(insert(PatientAccess), [{"patient_id": i + 1, "user_id": doc_ids[i % len(doc_ids)], "granted_at": now}
                                          for i in range(n_patients)])
        n_cases = n_analyses // 2
        statuses = ["ready", "signed", "signed", "signed"]
        labels = ["Benign", "Early", "Pre", "Pro"]
        cases = []
        for i in range(n_cases):
            st = rng.choice(statuses)
            cases.append({"id": i + 1, "patient_id": rng.randint(1, n_patients), "analyzer_id": "smear-all",
                          "clinical_note": "", "status": st,
                          "created_by_id": doc_ids[i % len(doc_ids)],
                          "created_at": now - dt.timedelta(minutes=13 * i), "updated_at": now,
                          "final_diagnosis": rng.choice(labels) if st == "signed" else None})
        c.execute(insert(Case), cases)
        imgs, ans = [], []
        for i in range(n_analyses):
            cid = i // 2 + 1
            imgs.append({"id": i + 1, "case_id": cid, "sha256": f"{i:064x}", "original_filename": f"f{i}.jpg",
                         "content_type": "JPEG", "width": 224, "height": 224, "size_bytes": 20000,
                         "uploaded_by_id": doc_ids[0], "created_at": now})
            lab = rng.choice(labels)
            ans.append({"id": i + 1, "image_id": i + 1, "analyzer_id": "smear-all", "job_status": "done", "attempts": 1,
                        "queued_at": now, "finished_at": now, "result_status": "ok", "label": lab, "confidence": 0.99,
                        "probabilities": {l: (0.97 if l == lab else 0.01) for l in labels}, "cell_count": 7,
                        "cells": [], "messages": [], "model_version": "1.0.0", "model_sha256": "0" * 64})
        for k in range(0, n_analyses, 5000):
            c.execute(insert(CaseImage), imgs[k:k + 5000])
            c.execute(insert(Analysis), ans[k:k + 5000])
        if eng.dialect.name == "postgresql":  # explicit ids do not advance the sequences: the app's inserts would collide
            for table in ("patients", "cases", "case_images", "analyses"):
                c.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                               f"(SELECT COALESCE(max(id), 1) FROM {table}))"))
    eng.dispose()
    return {"patients": n_patients, "cases": n_analyses // 2, "analyses": n_analyses,
            "seed_seconds": round(time.perf_counter() - t0, 1)}


def _login(client, email, password):
    r = client.post("/login", data={"email": email, "password": password})
    assert r.status_code == 302, r.status_code


def time_pages(app, repeats: int = 60) -> dict:
    rng = random.Random(1)
    out = {}
    for who, email, pw in (("doctor", doctor_email(0), DOCTOR_PASSWORD), ("admin", ADMIN_EMAIL, ADMIN_PASSWORD)):
        client = app.test_client()
        _login(client, email, pw)
        pages = {
            "patient_search_name": lambda: f"/patients/?q=Garcia{rng.randint(0, 96)}",
            "patient_search_mrn": lambda: f"/patients/?q=MRN{rng.randint(1, 10_000):07d}",
            "patient_list_page": lambda: f"/patients/?page={rng.randint(1, 100)}",
            "history_all": lambda: f"/cases/?page={rng.randint(1, 50)}",
            "history_filtered": lambda: f"/cases/?status=signed&diagnosis={rng.choice(['Early', 'Pre'])}&from=2026-09-01",
            "history_patient": lambda: f"/cases/?q=Smith{rng.randint(0, 96)}",
        }
        for name, url in pages.items():
            client.get(url())  # warm
            times = []
            for _ in range(repeats):
                u = url()
                t0 = time.perf_counter()
                r = client.get(u)
                times.append((time.perf_counter() - t0) * 1e3)
                assert r.status_code == 200, (u, r.status_code)
            out[f"{who}:{name}"] = {"p50_ms": _p(times, 50), "p95_ms": _p(times, 95)}
    out["max_p95_ms"] = max(v["p95_ms"] for v in out.values() if isinstance(v, dict))
    return out


class _Client:
    def __init__(self, base):
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar),
                                                  _NoRedirect())

    def get(self, path):
        return self.opener.open(self.base + path, timeout=30)

    def post(self, path, data: bytes, ctype: str, accept="text/html"):
        req = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": ctype, "Accept": accept})
        try:
            return self.opener.open(req, timeout=30)
        except urllib.error.HTTPError as e:  # 302 arrives here with _NoRedirect
            return e

    def csrf(self, path):
        return csrf_token(self.get(path).read().decode())


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **kw):
        return None


def multipart_body(fields: dict, files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type (``files``: (field, file name, bytes))."""
    b = uuid.uuid4().hex
    out = io.BytesIO()
    for k, v in fields.items():
        out.write(f"--{b}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode())
    for k, name, data in files:
        out.write(f"--{b}\r\nContent-Disposition: form-data; name=\"{k}\"; filename=\"{name}\"\r\n"
                  f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    out.write(f"--{b}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={b}"


def concurrent_uploads(settings, images: list[bytes], n_clients: int = 8) -> dict:
    from waitress.server import create_server

    from ..store import patients as patient_store
    from ..store import users as user_store
    from ..store.db import make_engine, make_session_factory, session_scope
    from ..web import create_app

    eng = make_engine(settings.database_url)
    with session_scope(make_session_factory(eng)) as s:
        for i in range(n_clients):
            u = user_store.create_user(s, f"up{i}@bench.test", f"Uploader {i}", "Upload-pass-2026", "doctor")
            patient_store.create(s, u, {"mrn": f"UP-{i}-{uuid.uuid4().hex[:6]}", "family_name": f"Upload{i}"})
    eng.dispose()
    app = create_app(settings=settings)
    server = create_server(app, host="127.0.0.1", port=0, threads=16)
    port = server.effective_port
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    base = f"http://127.0.0.1:{port}"
    results: list[dict] = [None] * n_clients  # type: ignore[list-item]
    barrier = threading.Barrier(n_clients)

    def client_run(i):
        c = _Client(base)
        tok = c.csrf("/login")
        c.post("/login", urllib.parse.urlencode({"email": f"up{i}@bench.test", "password": "Upload-pass-2026",
                                                 "csrf_token": tok}).encode(), "application/x-www-form-urlencoded")
        html = c.get("/patients/").read().decode()
        pid = re.search(r'href="/patients/(\d+)"', html).group(1)
        tok = c.csrf(f"/patients/{pid}/cases/new")
        body, ctype = multipart_body({"csrf_token": tok, "analyzer_id": "smear-all", "submission_id": uuid.uuid4().hex},
                                     [("images", f"field{i}.jpg", images[i % len(images)])])
        barrier.wait()
        t0 = time.perf_counter()
        r = c.post(f"/patients/{pid}/cases/new", body, ctype)
        t_posted = time.perf_counter() - t0
        loc = r.headers.get("Location", "")
        m = re.search(r"/cases/(\d+)", loc)
        if not m:
            results[i] = {"ok": False, "error": f"upload answered {r.status}"}
            return
        cid = m.group(1)
        while time.perf_counter() - t0 < 30:
            st = json.loads(c.get(f"/cases/{cid}/status.json").read())
            if st["status"] != "analysing" and all(im["job"] in ("done", "failed") for im in st["images"]):
                results[i] = {"ok": all(im["job"] == "done" for im in st["images"]) and len(st["images"]) == 1,
                              "seconds": time.perf_counter() - t0, "post_seconds": t_posted}
                return
            time.sleep(0.1)  # the browser polls every second; 0.1 s keeps the measurement fine-grained
        results[i] = {"ok": False, "error": "timeout"}

    threads = [threading.Thread(target=client_run, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.close()
    app.extensions["oncoscope"]["workers"].shutdown()
    times = [r["seconds"] for r in results if r and r.get("ok")]
    return {"clients": n_clients, "analysed": len(times), "lost_or_failed": n_clients - len(times),
            "upload_to_result_p50_s": round(float(np.percentile(times, 50)), 3) if times else None,
            "upload_to_result_p95_s": round(float(np.percentile(times, 95)), 3) if times else None,
            "upload_request_p95_s": round(float(np.percentile([r["post_seconds"] for r in results if r and r.get("ok")], 95)), 3)
            if times else None,
            "errors": [r.get("error") for r in results if r and not r.get("ok")]}


def run_web_bench(n_patients: int = 10_000, n_analyses: int = 50_000, images: list[bytes] | None = None) -> dict:
    from ..config import Settings
    from ..store import migrate
    from ..web import create_app

    with tempfile.TemporaryDirectory(prefix="oncoscope-bench-") as tmp:
        st = Settings.from_env(home=Path(tmp), database_url=f"sqlite:///{tmp}/bench.db").prepare()
        migrate.upgrade(st.database_url)
        seeded = seed(st, n_patients, n_analyses)
        # Page timing reads GET pages with the test client (sign-in POST without a CSRF round trip).
        app = create_app({"WTF_CSRF_ENABLED": False}, settings=st, start_workers=False)
        pages = time_pages(app)
        if images is None:
            images = smear_images(8, "JPEG")
        uploads = concurrent_uploads(st, images)
    return {"seeded": seeded, "pages_server_ms": pages, "concurrent_uploads": uploads,
            "targets": {"pages_p95_le_50ms": pages["max_p95_ms"] <= 50,
                        "uploads_all_analysed": uploads["lost_or_failed"] == 0,
                        "upload_to_result_p95_le_1_5s": (uploads["upload_to_result_p95_s"] or 99) <= 1.5}}
