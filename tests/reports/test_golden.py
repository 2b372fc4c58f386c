"""Golden exports: the SHA-256 of every export of fixed cases (signed, amended, non-diagnostic,
draft, and one whose analyzer is no longer installed).

The digests were recorded on the code before the reports layer was split into one module per DICOM
object (issue 12); a refactor must keep every byte. Everything below is fixed: database rows with
set times and ids, generated images, deterministic DICOM sources. A Secondary Capture carries the
wall-clock creation time highdicom writes (no export pins it), so its date/time elements are set to
a fixed value before hashing; everything else is hashed as exported.

A digest that changes on purpose (a deliberate change of an export) is re-recorded with
``GOLDEN_PRINT=1 pytest tests/reports/test_golden.py -s``, which prints the current values;
``GOLDEN_DUMP=<folder>`` writes the exports there, to compare two versions with a diff tool.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from oncoscope.analyzers import registry
from oncoscope.reports.case_report import case_report_pdf
from oncoscope.reports.dicom_common import to_part10
from oncoscope.reports.dicom_seg import mask_to_seg, rgb_to_secondary_capture
from oncoscope.reports.dicom_sr import case_to_sr
from oncoscope.reports.fhir import case_bundle, original_pngs
from oncoscope.reports.hl7v2 import oru_r01
from oncoscope.store.files import FileStore
from oncoscope.store.models import Analysis, Case, CaseImage, Patient, Review, User

from tests.databases import migrated_sqlite
from tests.imaging.test_dicom import VL_MICROSCOPIC, VL_WSI, colour, make_dicom, to_bytes

AID = "smear-all"
CLINIC = "Golden Clinic <Lab & Co>"
BASE_URL = "https://oncoscope.example.org"
T0 = dt.datetime(2026, 2, 3, 8, 0, 0)


def _t(minutes: int) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def _probs(top: str, p: float) -> dict[str, float]:
    rest = round((1 - p) / 3, 6)
    return {k: (p if k == top else rest) for k in ("Benign", "Early", "Pre", "Pro")}


def _image(s, store: FileStore, case: Case, user: User, seed: int, name: str, minutes: int) -> CaseImage:
    rgb = colour(rows=48, cols=64, seed=seed)
    data = _png(rgb)
    sha = store.put_original(data)
    mask = np.zeros((48, 64), np.uint8)
    mask[8:20, 10:30] = 255
    mask[26:40, 36:58] = 255
    store.put_png(sha, f"cells-{AID}", rgb[::-1].copy())
    store.put_png(sha, f"heatmap-{AID}", rgb[:, ::-1].copy())
    store.put_png(sha, f"mask-{AID}", mask)
    img = CaseImage(case_id=case.id, sha256=sha, original_filename=name, content_type="PNG", width=64, height=48,
                    size_bytes=len(data), uploaded_by_id=user.id, created_at=_t(minutes))
    s.add(img)
    s.flush()
    return img


def _analysis(img: CaseImage, status: str, label: str | None, p: float, cells: int | None, minutes: int,
              analyzer, messages=(), job_status: str = "done", last_error: str | None = None) -> Analysis:
    done = job_status == "done"
    return Analysis(image_id=img.id, analyzer_id=AID, job_status=job_status, attempts=1, last_error=last_error,
                    queued_at=_t(minutes - 1), started_at=_t(minutes - 1), finished_at=_t(minutes),
                    model_version=analyzer.version if done else None,
                    model_sha256=analyzer.model_info.sha256 if done else None,
                    result_status=status if done else None, label=label, confidence=p if label else None,
                    malignant=(label != "Benign") if label else None,
                    malignant_probability=round(1 - _probs(label or "Pre", p)["Benign"], 6) if done else None,
                    probabilities=_probs(label or "Pre", p) if done else None, cell_count=cells, cells=[],
                    messages=list(messages) if done else None)


def _review(case: Case, user: User, version: int, minutes: int, **fields) -> Review:
    return Review(case_id=case.id, version=version, signed_by_id=user.id, signed_at=_t(minutes),
                  content_sha256=f"{version:02d}" * 32, **fields)


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    analyzer = registry.get(AID)
    home = tmp_path_factory.mktemp("golden")
    with migrated_sqlite(home) as s:
        yield _golden_world(s, FileStore(home / "images"), analyzer)


def _golden_world(s, store, analyzer) -> SimpleNamespace:
    user = User(email="gold@clinic.test", name="Dr Ana Åström-Ng", role="doctor", password_hash="x", created_at=T0)
    s.add(user)
    s.flush()
    patient = Patient(mrn="GOLD-0001", family_name="Núñez-Øresund", given_name="Zoë", sex="female",
                      birth_date=dt.date(1980, 2, 3), created_by_id=user.id, created_at=T0, updated_at=T0)
    other = Patient(mrn="GOLD|0002^x", family_name="O'Brien", given_name="", sex="unknown", created_by_id=user.id,
                    created_at=T0, updated_at=T0)
    s.add_all([patient, other])
    s.flush()

    # Case A: two usable fields (ok, uncertain) and one out of domain; signed, then amended (override).
    a = Case(patient_id=patient.id, analyzer_id=AID, clinical_note="Fever & fatigue; <check> \"CBC\"",
             status="signed", created_by_id=user.id, created_at=_t(1), updated_at=_t(1), final_diagnosis="Pro",
             revision=3)
    s.add(a)
    s.flush()
    for n, (status, label, p, cells, msgs) in enumerate([
            ("ok", "Pre", 0.91, 12, []),
            ("uncertain", "Pre", 0.55, 7, ["Low confidence: review the field."]),
            ("out_of_domain", None, 0.4, None, ["Not a blood smear | stain?"])]):
        img = _image(s, store, a, user, seed=n, name=f"field-{n}^a.png", minutes=2 + n)
        s.add(_analysis(img, status, label, p, cells, 10 + n, analyzer, msgs))
    s.flush()
    s.add(_review(a, user, 1, 30, ai_label="Pre", ai_status="uncertain", final_diagnosis="Pre", agrees_with_ai=True,
                  uncertainty_note="One field was out of domain.", comment="Confirm with flow cytometry.\nCall me."))
    s.add(_review(a, user, 2, 90, ai_label="Pre", ai_status="uncertain", final_diagnosis="Pro", agrees_with_ai=False,
                  override_reason="Blast morphology ~ Pro-B", uncertainty_note="Still uncertain.",
                  comment="Second read & flow.", amendment_reason="Flow cytometry result arrived."))

    # Case B: one failed field and one out of domain: no AI call; signed non-diagnostic.
    b = Case(patient_id=other.id, analyzer_id=AID, clinical_note="", status="signed", created_by_id=user.id,
             created_at=_t(100), updated_at=_t(100), final_diagnosis="Nondiagnostic", revision=2)
    s.add(b)
    s.flush()
    img = _image(s, store, b, user, seed=7, name="", minutes=101)
    s.add(_analysis(img, None, None, 0.0, None, 105, analyzer, job_status="failed",
                    last_error="ModelError: broken input\nTraceback ..."))
    img = _image(s, store, b, user, seed=8, name="slide.png", minutes=102)
    s.add(_analysis(img, "out_of_domain", None, 0.3, None, 106, analyzer, ["Not a smear"]))
    s.flush()
    s.add(_review(b, user, 1, 120, ai_label=None, ai_status="out_of_domain", final_diagnosis="Nondiagnostic",
                  agrees_with_ai=False, override_reason="Sample clotted.", uncertainty_note="No usable field."))

    # Case C: not signed yet (one field done, one still queued): the PDF is a draft.
    c = Case(patient_id=patient.id, analyzer_id=AID, clinical_note="Follow-up", status="analysing",
             created_by_id=user.id, created_at=_t(200), updated_at=_t(200), revision=2)
    s.add(c)
    s.flush()
    img = _image(s, store, c, user, seed=9, name="follow-up.png", minutes=201)
    s.add(_analysis(img, "ok", "Benign", 0.8, 30, 205, analyzer))
    img = _image(s, store, c, user, seed=10, name="later.png", minutes=202)
    s.add(_analysis(img, None, None, 0.0, None, 206, analyzer, job_status="queued"))

    # Case D: analysed by a model that is no longer installed; signed.
    d = Case(patient_id=other.id, analyzer_id="retired-model", clinical_note="Old case", status="signed",
             created_by_id=user.id, created_at=_t(300), updated_at=_t(300), final_diagnosis="Pre", revision=2)
    s.add(d)
    s.flush()
    img = _image(s, store, d, user, seed=11, name="old.png", minutes=301)
    s.add(_analysis(img, "ok", "Pre", 0.7, 4, 305, analyzer))
    s.flush()
    s.add(_review(d, user, 1, 320, ai_label="Pre", ai_status="ok", final_diagnosis="Pre", agrees_with_ai=True))
    s.commit()
    for case in (a, b, c, d):
        s.refresh(case)
    return SimpleNamespace(s=s, store=store, analyzer=analyzer, a=a, b=b, c=c, d=d)


def _fixed_times(ds: Dataset) -> Dataset:
    """The date/time elements highdicom fills from the wall clock, set to a fixed value."""
    for kw in ("InstanceCreationDate", "ContentDate", "SeriesDate", "StudyDate"):
        if kw in ds:
            setattr(ds, kw, "20000101")
    for kw in ("InstanceCreationTime", "ContentTime", "SeriesTime", "StudyTime"):
        if kw in ds:
            setattr(ds, kw, "000000")
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = "20000101000000"
    return ds


def _dicom_source(rgb: np.ndarray, **kwargs) -> Dataset:
    """A DICOM source with fixed UIDs (make_dicom draws random ones)."""
    ds = make_dicom(rgb, "RGB", **kwargs)
    root = "1.2.826.0.1.3680043.8.498.4242"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{root}.1", f"{root}.2"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{root}.3"
    ds.file_meta.ImplementationClassUID = f"{root}.4"
    if "FrameOfReferenceUID" in ds:
        ds.FrameOfReferenceUID = f"{root}.5"
    return ds


def _tiled_source() -> Dataset:
    full = colour(rows=50, cols=60, seed=9)
    padded = np.zeros((64, 64, 3), dtype=np.uint8)
    padded[:50, :60] = full
    tiles = np.stack([padded[r:r + 32, c:c + 32] for r in (0, 32) for c in (0, 32)])
    measures, origin, shared = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.0005, 0.0005], 0.001
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20.0, 40.0
    shared.PixelMeasuresSequence = [measures]
    return _dicom_source(tiles, frames=4, modality="SM", sop_class=VL_WSI, extra={
        "DimensionOrganizationType": "TILED_FULL", "TotalPixelMatrixRows": 50, "TotalPixelMatrixColumns": 60,
        "FrameOfReferenceUID": generate_uid(), "ImageOrientationSlide": [0, -1, 0, -1, 0, 0],
        "TotalPixelMatrixOriginSequence": [origin], "SharedFunctionalGroupsSequence": [shared],
        "ImageType": ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"], "TotalPixelMatrixFocalPlanes": 1,
        "NumberOfOpticalPaths": 1, "ContainerIdentifier": "SLIDE-1"})


def _exports(g) -> dict[str, bytes]:
    an, store = g.analyzer, g.store
    out: dict[str, bytes] = {}
    for key, case in (("a", g.a), ("b", g.b)):
        pdf = case_report_pdf(case, store, CLINIC)
        out[f"{key}.pdf"] = pdf
        bundle = case_bundle(case, pdf, base_url=BASE_URL, images=original_pngs(case, store))
        out[f"{key}.fhir.json"] = json.dumps(bundle, sort_keys=True).encode()
        out[f"{key}.fhir-as-built.json"] = json.dumps(bundle, ensure_ascii=False).encode()  # key order kept
        out[f"{key}.fhir-urn.json"] = json.dumps(case_bundle(case, pdf), sort_keys=True).encode()
        out[f"{key}.hl7"] = oru_r01(case, an).encode()
        out[f"{key}.hl7-custom"] = oru_r01(case, an, sending_app="APP", sending_facility="FAC", receiving_app="RIS",
                                           receiving_facility="HOSP", control_id="CTRL-1").encode()
        out[f"{key}.sr.dcm"] = case_to_sr(case, an, institution=CLINIC)
        out[f"{key}.sr-study.dcm"] = case_to_sr(case, None, study_uid="1.2.826.0.1.3680043.8.498.77")
    out["c.pdf"] = case_report_pdf(g.c, store, CLINIC)
    out["d.pdf"] = pdf = case_report_pdf(g.d, store, CLINIC)
    out["d.fhir.json"] = json.dumps(case_bundle(g.d, pdf, images=original_pngs(g.d, store)), sort_keys=True).encode()
    out["d.sr.dcm"] = case_to_sr(g.d)
    when = dt.datetime(2026, 2, 3, 9, 10, 11)
    mask = np.zeros((40, 48), np.int32)
    mask[5:15, 6:20] = 1
    mask[20:35, 25:40] = 2
    png = _png(colour(seed=11))
    out["seg-png.dcm"] = mask_to_seg(png, mask, case=g.a, model_id=AID, model_version="1.0.0", created_at=when)
    out["seg-rgb-half.dcm"] = mask_to_seg(colour(seed=12), mask[::2, ::2], created_at=when)
    src = _dicom_source(colour(seed=13), sop_class=VL_MICROSCOPIC, modality="SM")
    out["seg-dicom.dcm"] = mask_to_seg(to_bytes(src), mask, model_id=AID, model_version="1.0.0",
                                       segment_label="cell\\s", created_at=when)
    tiled = np.zeros((50, 60), np.int32)
    tiled[10:40, 5:55] = 3
    out["seg-tiled.dcm"] = mask_to_seg(to_bytes(_tiled_source()), tiled, created_at=when)
    out["sc-case.dcm"] = to_part10(_fixed_times(rgb_to_secondary_capture(colour(seed=14), case=g.b)))
    out["sc-plain.dcm"] = to_part10(_fixed_times(rgb_to_secondary_capture(
        colour(seed=15), patient_id="P\\9", patient_name="Doe^Jane=X", birth_date=dt.date(1990, 1, 2), sex="F")))
    return out


# PDFs (and the FHIR bundles, which embed them) re-recorded 2026-12-05, on purpose: the review and the AI
# call before the images, the accession, a queued image named "not yet analysed", "reason for
# overriding the AI result" as the form, SR and HL7 say it.
GOLDEN = {
    'a.pdf': '99d9228db5ec63e830e56c0fe6ad71e76c580e201361cd2f8a5cde65aae5a302',
    'a.fhir.json': '655e1f3d53b6ff5486f5becc31cdc2d280b0b1c6bc449312d849cd5ea040cf90',
    'a.fhir-as-built.json': 'd4a7375eaf0ba4886fa8066ed997987de075e4231b4c65effa6a0a914e32d020',
    'a.fhir-urn.json': '17d4322cf433cd06728ffe76a03b66f54b77a0df38a1f195faa480f5bc71df8d',
    'a.hl7': '8aa0486264fdaccfd0f6224fa763420d156e1e99fa59c10e0d12a714162f5830',
    'a.hl7-custom': '5cd296a31f961d3b31406fd24e6cea108856bdc496c917c3867235aaae6a48b4',
    'a.sr.dcm': '75c6aff3279115d3b26822eb914756d5d3944d47285d3e1eb930a504893d52c5',
    'a.sr-study.dcm': 'a26511e576112b1dbebb49d142c26b8660eaf779974e9c917c754c0595b7ad80',
    'b.pdf': '7e7f1553f3df940c92c1bcd2a9f765bf3878e48e50b13f034ffccd9b6e9e0f9a',
    'b.fhir.json': '0358c5afcd38c1c501ec4eb3c0da8b84dc7de53133dd580dddfef56ffa206b7e',
    'b.fhir-as-built.json': '009fafe264b85a63520412ffb38bca70580170bb75738a0eb415192dba79df49',
    'b.fhir-urn.json': '0770ba5f3c189d450157c75588cf47fd5fb662db3ff2b2d261e256ced36aff7f',
    'b.hl7': '8618460492686521ff9eb39fc276b623dd84cf22db6f1f4d8db1377644ddc76b',
    'b.hl7-custom': '81e0f1e920a55141ef8b00913c25c25751534612a1111d0faf6c3990f49a712b',
    'b.sr.dcm': 'bcf8b576c6b105b70c21cd5b798576abb246339640eb5a2cf773c9572c0cdf84',
    'b.sr-study.dcm': 'b12d81f4426f7728e58ffe269a51e34767604f8a4f5fb5f3c174848eb3b24fe2',
    'c.pdf': 'fc7b791db655ce554ab0b0a705bfa995cf3b95da9ebaf99043949c51fbf26ca5',
    'd.pdf': '5575e154488908d8fa864021164d677bb1acda90b189133596d0f20b93f8a476',
    'd.fhir.json': 'b27b09f475baf4322f2893a49891f6f177b158c77afc1ab8a57906eb6063d31f',
    'd.sr.dcm': 'ccb1f24a3d52c25aab9b07ad6426b7886861de0ec930af5f1db0249314cfbcef',
    'seg-png.dcm': '2fc79c639941b03dde8fd8a30e17b20735c1b2f626930327cf9811a4ec4d8cc7',
    'seg-rgb-half.dcm': '55cecc678d7ae9f10e5cfa9ab37c662cb40ac7fe7b39823d6b2d0da11b09339c',
    'seg-dicom.dcm': 'c90b1f713e3aaa8799e883d9d60a00a5ddf6e4ecef0562c8f1ec62f526c5e223',
    'seg-tiled.dcm': '0c0c21d3026cfd6f5f458dfbbbd67702bb7a9af9882df266eaa1c497e2084d09',
    'sc-case.dcm': '21fe8a979dd149adb9615a10128eed4dac7ca1c0af5d21cdb7f25e820811d387',
    'sc-plain.dcm': 'a486b68f8bc639a8eef738a541c1c716c41c0cf6d0d9df586721b07d7cc1b128',
}


def test_every_export_is_byte_for_byte_unchanged(golden):
    exports = _exports(golden)
    got = {k: hashlib.sha256(v).hexdigest() for k, v in exports.items()}
    if os.environ.get("GOLDEN_DUMP"):  # a folder to write the exports to, to compare them with a diff tool
        folder = Path(os.environ["GOLDEN_DUMP"])
        folder.mkdir(parents=True, exist_ok=True)
        for k, v in exports.items():
            (folder / k).write_bytes(v)
    if os.environ.get("GOLDEN_PRINT"):
        print("\nGOLDEN = {")
        for k, v in got.items():
            print(f"    {k!r}: {v!r},")
        print("}")
    changed = sorted(k for k in set(got) | set(GOLDEN) if got.get(k) != GOLDEN.get(k))
    assert not changed, f"exports changed: {changed}"


def test_exports_are_reproducible(golden):
    assert _exports(golden) == _exports(golden)
