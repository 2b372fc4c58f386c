"""What the benchmarks set up and send: accounts, a large seeded history, generated images, form
bodies. Shared by the page-speed bench (``web.py``), the load run and the fault scenarios.

Images are always generated (``oncoscope.ml.synthetic``), never dataset files; seeded analyses are
database rows only, their image files do not exist.
"""

from __future__ import annotations

import datetime as dt
import io
import random
import re
import time
import uuid
import zlib

import numpy as np
from PIL import Image
from sqlalchemy import insert, text

from ..ml.synthetic import smear_like
from ..store import users as user_store
from ..store.db import make_engine, make_session_factory, session_scope
from ..store.models import Analysis, Case, CaseImage, Patient, PatientAccess, Reading

DOCTOR_PASSWORD = "Bench-doctor-pass-1"
ADMIN_EMAIL, ADMIN_PASSWORD = "admin@bench.test", "Bench-admin-pass-1"
CSRF_RE = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')


def doctor_email(i: int) -> str:
    return f"doc{i}@bench.test"


def percentile(values, q) -> float:
    return round(float(np.percentile(values, q)), 2)


# ----------------------------------------------------------------------------- a large instance
def seed_instance(settings, n_patients: int = 10_000, n_analyses: int = 50_000, seed: int = 0,
                  n_doctors: int = 4) -> dict:
    """Bulk-load a large instance: one admin, ``n_doctors`` doctors (``doctor_email(i)`` /
    ``DOCTOR_PASSWORD``), patients assigned round-robin to the doctors, cases with analysed images
    (rows only: the image files do not exist)."""
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
        # a working lab: most cases signed, the rest spread over the worklists' states
        statuses = ["ready", "preliminary", "second_read", "signed", "signed", "signed", "signed", "signed"]
        labels = ["Benign", "Early", "Pre", "Pro"]
        cases = []
        for i in range(n_cases):
            st = rng.choice(statuses)
            cases.append({"id": i + 1, "patient_id": rng.randint(1, n_patients), "analyzer_id": "smear-all",
                          "clinical_note": "", "status": st, "priority": "stat" if i % 9 == 0 else "routine",
                          "ai_flag": rng.random() < 0.3, "ready_at": now - dt.timedelta(minutes=13 * i - 5),
                          "created_by_id": doc_ids[i % len(doc_ids)],
                          "created_at": now - dt.timedelta(minutes=13 * i), "updated_at": now,
                          "final_diagnosis": rng.choice(labels) if st == "signed" else None})
        c.execute(insert(Case), cases)
        firsts = [{"case_id": k["id"], "kind": "first", "user_id": doc_ids[(k["id"] + 1) % len(doc_ids)],
                   "diagnosis": rng.choice(labels), "comment": "", "override_reason": "", "uncertainty_note": "",
                   "revision": 0, "at": now, "current": True} for k in cases if k["status"] == "second_read"]
        if firsts:  # cases waiting for a second reader have their first reading, by another doctor
            c.execute(insert(Reading), firsts)
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


# ----------------------------------------------------------------------------- generated images
def smear_images(n: int, fmt: str = "JPEG", first_seed: int = 0) -> list[bytes]:
    """``n`` generated smear-like fields (``oncoscope.ml.synthetic``), encoded as ``fmt``; never dataset files."""
    out = []
    for i in range(first_seed, first_seed + n):
        buf = io.BytesIO()
        Image.fromarray(smear_like(i)[0]).save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
        out.append(buf.getvalue())
    return out


def generated_pngs(n: int, seed: int = 0, side: int = 192) -> list[bytes]:
    """Distinct smear-like PNGs (generated; never dataset images)."""
    out = []
    for i in range(n):
        rgb = np.array(smear_like(seed * 100_000 + i % 50, side)[0], dtype="uint8")
        rgb[0, 0] = [i % 256, (i // 256) % 256, 7]  # distinct content -> distinct image
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def unique_png(png: bytes, tag: str) -> bytes:
    """The same PNG with a text chunk added before IEND: other bytes, other sha256, same pixels
    (every upload is a new file for the store, as in real use), without re-encoding."""
    assert png[-12:-8] == b"\x00\x00\x00\x00" and png[-8:-4] == b"IEND", "not a PNG"
    data = b"tEXt" + b"oncoscope-load\x00" + tag.encode()
    chunk = len(data[4:]).to_bytes(4, "big") + data + zlib.crc32(data).to_bytes(4, "big")
    return png[:-12] + chunk + png[-12:]


# ----------------------------------------------------------------------------- forms
def csrf_token(html: str) -> str | None:
    """The CSRF token of the first form in a page (every form of a session carries a valid one)."""
    m = CSRF_RE.search(html)
    return m.group(1) if m else None


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
