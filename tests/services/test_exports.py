"""Exports as plain values (``oncoscope.services.exports``), without Flask: the signed-case rule,
file names and media types, the DICOM SEG lookups and the outcomes of sending HL7.

A migrated SQLite database is built once for the module; analyses are written as rows (no model
run), one image with a stored cell mask."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from PIL import Image

from oncoscope.reports.hl7v2 import HL7SendError
from oncoscope.services import exports
from oncoscope.store import cases as case_store
from oncoscope.store.files import FileStore
from oncoscope.store.models import Analysis, CaseImage, Patient, User
from oncoscope.vocab import EXPORT_NEEDS_SIGNATURE
from tests.databases import migrated_sqlite

AID = "smear-all"
CLINIC = "Test Clinic"
LABELS = ["Benign", "Early", "Pre", "Pro", "Nondiagnostic"]


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    home = tmp_path_factory.mktemp("exports")
    with migrated_sqlite(home) as s:
        user = User(email="doc@clinic.test", name="Dr Sara Ahmadi", role="doctor", password_hash="x")
        patient = Patient(mrn="MRN-EX-1", family_name="Doe", given_name="Jane", birth_date=dt.date(1980, 2, 3),
                          sex="female")
        s.add_all([user, patient])
        s.flush()
        yield s, FileStore(home / "images"), user, patient


def _case(world, *, signed: bool):
    s, files, user, patient = world
    case = case_store.create_case(s, user, patient, AID, "fever")
    for n in range(2):
        data = _png(n)
        sha = files.put_original(data)
        img = CaseImage(case_id=case.id, sha256=sha, original_filename=f"field{n}.png", content_type="PNG",
                        width=64, height=48, size_bytes=len(data), uploaded_by_id=user.id)
        s.add(img)
        s.flush()
        s.add(Analysis(image_id=img.id, analyzer_id=AID, job_status="done", attempts=1, result_status="ok",
                       label="Pre", confidence=0.8, malignant=True, malignant_probability=0.9,
                       probabilities={"Benign": 0.05, "Early": 0.1, "Pre": 0.8, "Pro": 0.05}, cell_count=1,
                       cells=[], messages=[], model_version="1.0.0", model_sha256="ab" * 32,
                       finished_at=dt.datetime(2026, 1, 2, 9, 30)))
        if n == 0:
            mask = np.zeros((48, 64), dtype=np.uint8)
            mask[10:20, 10:20] = 255
            files.put_png(sha, f"mask-{AID}", mask)
    case.status = "ready"
    s.flush()
    s.refresh(case)
    if signed:
        case_store.sign(s, case, user, "Pre", LABELS, comment="Blasts present.")
    s.commit()
    return case


@pytest.fixture(scope="module")
def signed(world):
    return _case(world, signed=True)


@pytest.fixture(scope="module")
def unsigned(world):
    return _case(world, signed=False)


def test_an_export_is_a_frozen_value():
    e = exports.Export(b"x", "text/plain", "x.txt")
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.body = b"y"


def test_only_a_signed_case_leaves_the_system(world, unsigned):
    _s, files, _u, _p = world
    for make in (lambda: exports.fhir_bundle(unsigned, files, CLINIC, "https://oncoscope.test"),
                 lambda: exports.hl7_message(unsigned),
                 lambda: exports.dicom_sr(unsigned, CLINIC),
                 lambda: exports.send_hl7(unsigned, "127.0.0.1", 2575)):
        with pytest.raises(exports.NotSigned) as exc:
            make()
        assert str(exc.value) == EXPORT_NEEDS_SIGNATURE == "Only signed cases can be exported."
        assert isinstance(exc.value, exports.ExportRefused)


def test_the_pdf_report_of_a_draft_says_draft_in_its_name(world, unsigned):
    _s, files, _u, _p = world
    e = exports.pdf_report(unsigned, files, CLINIC)
    assert (e.media_type, e.filename) == ("application/pdf", f"oncoscope-case-{unsigned.id}-draft.pdf")
    assert e.body.startswith(b"%PDF")
    assert exports.pdf_report(unsigned, files, CLINIC, version_in_name=False).filename == \
        f"oncoscope-case-{unsigned.id}.pdf"


def test_exports_of_a_signed_case_names_and_media_types(world, signed):
    _s, files, _u, _p = world
    cid = signed.id
    pdf = exports.pdf_report(signed, files, CLINIC)
    assert (pdf.media_type, pdf.filename) == ("application/pdf", f"oncoscope-case-{cid}-v1.pdf")

    fhir = exports.fhir_bundle(signed, files, CLINIC, "https://oncoscope.test")
    assert (fhir.media_type, fhir.filename) == ("application/fhir+json", f"oncoscope-case-{cid}-fhir.json")
    bundle = json.loads(fhir.body)
    assert bundle["resourceType"] == "Bundle" and fhir.body == json.dumps(bundle, sort_keys=True).encode()
    assert any(r["resource"]["resourceType"] == "Media" for r in bundle["entry"])  # the original images travel

    hl7 = exports.hl7_message(signed)
    assert (hl7.media_type, hl7.filename) == ("application/hl7-v2", f"oncoscope-case-{cid}.hl7")
    assert hl7.body.startswith(b"MSH|^~\\&|") and b"ORU^R01" in hl7.body

    sr = exports.dicom_sr(signed, CLINIC)
    assert (sr.media_type, sr.filename) == ("application/dicom", f"oncoscope-case-{cid}-sr.dcm")
    ds = pydicom.dcmread(io.BytesIO(sr.body))
    assert ds.Modality == "SR" and ds.PatientID == "MRN-EX-1" and ds.InstitutionName == CLINIC


def test_dicom_seg_of_an_image_with_a_mask(world, unsigned):
    _s, files, _u, _p = world
    with_mask, without_mask = unsigned.images
    seg = exports.dicom_seg(unsigned, with_mask.id, files)  # the model's output: no signature needed
    assert (seg.media_type, seg.filename) == \
        ("application/dicom", f"oncoscope-case-{unsigned.id}-image-{with_mask.id}-seg.dcm")
    assert pydicom.dcmread(io.BytesIO(seg.body)).Modality == "SEG"
    with pytest.raises(exports.NoMask, match="no cell mask"):
        exports.dicom_seg(unsigned, without_mask.id, files)
    with pytest.raises(exports.ImageNotInCase, match=f"No image 999999 in case {unsigned.id}."):
        exports.dicom_seg(unsigned, 999999, files)


def test_sending_hl7_reports_its_outcome(signed, monkeypatch):
    none = exports.send_hl7(signed, "", 0)
    assert none == exports.Hl7Delivery(exports.NO_DESTINATION) and not none.sent

    sent_to = []
    monkeypatch.setattr(exports, "send_mllp", lambda msg, host, port: sent_to.append((host, port)) or "MSH|ACK")
    ok = exports.send_hl7(signed, "hl7.test", 2575)
    assert ok == exports.Hl7Delivery(exports.SENT, "MSH|ACK") and ok.sent and sent_to == [("hl7.test", 2575)]

    def refuse(*_a):
        raise HL7SendError("AR: rejected", code="AR")

    monkeypatch.setattr(exports, "send_mllp", refuse)
    failed = exports.send_hl7(signed, "hl7.test", 2575)
    assert failed == exports.Hl7Delivery(exports.FAILED, "AR: rejected") and not failed.sent


def test_exports_know_no_web_framework():
    code = "import sys, oncoscope.services.exports; print(sorted({'flask', 'werkzeug'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
