"""FHIR R4B export of a signed case (``oncoscope.reports.fhir.case_bundle``).

A migrated SQLite instance is built once per module and copied per test; analyses are written as
rows directly (no model run), so these tests are fast.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import shutil

import numpy as np
import pytest
from argon2 import PasswordHasher
from PIL import Image

from fhir.resources.R4B.bundle import Bundle
from oncoscope.analyzers import registry
from oncoscope.reports.fhir import OBS_SYSTEM, case_bundle, label_system, original_pngs
from oncoscope.store import cases as case_store
from oncoscope.store import migrate
from oncoscope.store import users as user_store
from oncoscope.store.db import make_engine, make_session_factory
from oncoscope.store.files import FileStore
from oncoscope.store.models import Analysis, Case, CaseImage, Patient

AID = "smear-all"
PDF = b"%PDF-1.4\n% oncoscope test report \xe2\x9c\x93\n%%EOF\n"
FAMILY, GIVEN = "Núñez-Øresund", "Zoë 李"


def _png(seed: int, w: int = 40, h: int = 30) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def analyzer():
    assert AID in registry.available()
    return registry.get(AID)


@pytest.fixture(scope="module")
def seed_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("fhir-seed") / "oncoscope.db"
    migrate.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture()
def world(seed_db, tmp_path, monkeypatch, analyzer):
    """A session on a fresh copy of the migrated database, with a doctor and a patient."""
    monkeypatch.setattr(user_store, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    db = tmp_path / "oncoscope.db"
    shutil.copy(seed_db, db)
    engine = make_engine(f"sqlite:///{db}")
    s = make_session_factory(engine)()
    doctor = user_store.create_user(s, "doc@clinic.test", "Dr Ana Åström", "doctor-pass-123!", "doctor")
    patient = Patient(mrn="MRN-Ü-0001", family_name=FAMILY, given_name=GIVEN, sex="female",
                      birth_date=dt.date(1980, 2, 3), created_by_id=doctor.id)
    s.add(patient)
    s.flush()

    class W:
        pass

    w = W()
    w.s, w.doctor, w.patient, w.store = s, doctor, patient, FileStore(tmp_path / "images")
    w.valid = [k for k, _ in case_store.diagnosis_options(analyzer)]
    yield w
    s.close()
    engine.dispose()


def _probs(top: str, p: float = 0.91) -> dict[str, float]:
    rest = (1 - p) / 3
    return {k: round(p if k == top else rest, 6) for k in ("Benign", "Early", "Pre", "Pro")}


def make_case(w, analyzer, results=(("ok", "Pre", 12), ("ok", "Pre", 7))) -> tuple[Case, dict[int, bytes]]:
    """A case with one image + done Analysis per ``(result_status, label, cell_count)``."""
    case = case_store.create_case(w.s, w.doctor, w.patient, AID, "fever")
    pngs = {}
    for k, (status, label, cells) in enumerate(results):
        data = _png(k, 40 + k, 30)
        sha = w.store.put_original(data)
        img = CaseImage(case_id=case.id, sha256=sha, original_filename=f"field-{k}.png", content_type="PNG",
                        width=40 + k, height=30, size_bytes=len(data), uploaded_by_id=w.doctor.id)
        w.s.add(img)
        w.s.flush()
        ood = status == "out_of_domain"
        w.s.add(Analysis(image_id=img.id, analyzer_id=AID, job_status="done", attempts=1,
                         finished_at=dt.datetime(2024, 5, 6, 7, 8, 9), model_version=analyzer.version,
                         model_sha256=analyzer.model_info.sha256, result_status=status,
                         label=None if ood else label, probabilities=_probs(label),
                         confidence=0.91, cell_count=None if ood else cells,
                         messages=["not a smear"] if ood else []))
        pngs[img.id] = data
    case.status = "ready"
    w.s.flush()
    w.s.refresh(case)
    return case, pngs


def entries(bundle: dict, rtype: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def obs(bundle: dict, code: str) -> list[dict]:
    return [o for o in entries(bundle, "Observation")
            if any(c["system"] == OBS_SYSTEM and c["code"] == code for c in o["code"]["coding"])]


def by_url(bundle: dict) -> dict[str, dict]:
    return {e["fullUrl"]: e["resource"] for e in bundle["entry"]}


def test_signed_case_bundle_round_trips_and_links(world, analyzer):
    case, pngs = make_case(world, analyzer)
    r = case_store.sign(world.s, case, world.doctor, "Pre", world.valid, comment="Blasts present.")
    b = case_bundle(case, PDF, images=pngs)

    assert b["resourceType"] == "Bundle" and b["type"] == "collection"
    assert b["identifier"]["value"] == f"case-{case.id}-v1"
    assert b["timestamp"].startswith(r.signed_at.isoformat()) and b["timestamp"].endswith(("Z", "+00:00"))
    # validated by the R4B model and re-dumped identically
    again = json.loads(Bundle.model_validate(b).model_dump_json())
    assert again == b
    json.dumps(b)  # plain JSON-able
    assert sorted({e["resource"]["resourceType"] for e in b["entry"]}) == [
        "Device", "DiagnosticReport", "Media", "Observation", "Patient", "Practitioner"]
    assert all(e["fullUrl"].startswith("urn:uuid:") for e in b["entry"])
    assert len({e["fullUrl"] for e in b["entry"]}) == len(b["entry"])

    # every reference points at an entry of the bundle
    urls = by_url(b)

    def refs(x):
        if isinstance(x, dict):
            if isinstance(x.get("reference"), str):
                yield x["reference"]
            for v in x.values():
                yield from refs(v)
        elif isinstance(x, list):
            for v in x:
                yield from refs(v)

    assert all(u in urls for u in refs(b))

    (patient,) = entries(b, "Patient")
    assert patient["identifier"][0] == {"use": "usual", "system": "urn:oncoscope:mrn", "value": "MRN-Ü-0001"}
    assert patient["gender"] == "female" and patient["birthDate"] == "1980-02-03"

    (pr,) = entries(b, "Practitioner")
    assert pr["identifier"] == [{"system": "urn:oncoscope:user", "value": str(world.doctor.id)}]
    assert pr["name"][0]["text"] == "Dr Ana Åström"

    (dev,) = entries(b, "Device")
    assert dev["version"] == [{"value": analyzer.version}]
    assert dev["identifier"][0]["value"] == analyzer.model_info.sha256
    assert dev["deviceName"] == [{"name": analyzer.name, "type": "model-name"}]
    assert dev["type"]["text"] == AID

    media = entries(b, "Media")
    assert len(media) == 2
    for m, img in zip(media, case.images):
        assert m["status"] == "completed" and m["width"] == img.width and m["height"] == img.height
        assert m["content"]["contentType"] == "image/png"
        assert base64.b64decode(m["content"]["data"]) == pngs[img.id]
        assert urls[m["subject"]["reference"]]["resourceType"] == "Patient"

    # observations: all final, all about the patient; the AI ones made by the Device
    observations = entries(b, "Observation")
    assert all(o["status"] == "final" for o in observations)
    assert all(urls[o["subject"]["reference"]] is patient for o in observations)
    for code in ("ai-class", "ai-probability", "cell-count", "ai-status", "ai-aggregate"):
        for o in obs(b, code):
            assert urls[o["device"]["reference"]]["version"][0]["value"] == analyzer.version
    classes = obs(b, "ai-class")
    assert len(classes) == len(case.images) == 2
    for o, m in zip(classes, media):
        assert o["valueCodeableConcept"]["coding"][0] == {
            "system": label_system(AID), "code": "Pre", "display": analyzer.display_names["Pre"]}
        assert urls[o["derivedFrom"][0]["reference"]] is m
    probs = obs(b, "ai-probability")
    assert len(probs) == 2
    comp = {c["code"]["coding"][0]["code"]: c["valueQuantity"] for c in probs[0]["component"]}
    assert set(comp) == set(analyzer.labels)
    assert comp["Pre"] == {"value": 0.91, "unit": "1", "system": "http://unitsofmeasure.org", "code": "1"}
    assert all(0 <= q["value"] <= 1 for q in comp.values())
    assert [o["valueInteger"] for o in obs(b, "cell-count")] == [12, 7]
    assert [o["valueString"] for o in obs(b, "ai-status")] == ["ok", "ok"]
    (agg,) = obs(b, "ai-aggregate")
    assert agg["valueCodeableConcept"]["coding"][0]["code"] == "Pre"
    (final,) = obs(b, "final-diagnosis")
    assert final["valueCodeableConcept"]["coding"][0]["code"] == "Pre"
    assert final["performer"][0]["reference"] in urls and urls[final["performer"][0]["reference"]] is pr
    (vs,) = obs(b, "ai-vs-final")
    assert vs["valueBoolean"] is True and "note" not in vs

    (dr,) = entries(b, "DiagnosticReport")
    assert dr["status"] == "final"
    assert dr["code"]["text"] == analyzer.name
    assert dr["code"]["coding"][0] == {"system": "urn:oncoscope:report", "code": AID, "display": analyzer.name}
    assert dr["issued"] == b["timestamp"]
    assert dr["effectiveDateTime"].startswith(case.created_at.isoformat())
    assert urls[dr["performer"][0]["reference"]] is pr and urls[dr["resultsInterpreter"][0]["reference"]] is pr
    assert sorted(x["reference"] for x in dr["result"]) == sorted(
        e["fullUrl"] for e in b["entry"] if e["resource"]["resourceType"] == "Observation")
    assert [urls[x["link"]["reference"]] for x in dr["media"]] == media
    assert dr["conclusionCode"] == [{"coding": [{"system": label_system(AID), "code": "Pre",
                                                 "display": analyzer.display_names["Pre"]}],
                                     "text": analyzer.display_names["Pre"]}]
    assert dr["conclusion"].startswith(analyzer.display_names["Pre"]) and "Blasts present." in dr["conclusion"]
    (form,) = dr["presentedForm"]
    assert form["contentType"] == "application/pdf"
    assert form["title"] == f"oncoscope-case-{case.id}-v1.pdf"
    assert base64.b64decode(form["data"]) == PDF


def test_override_then_amendment(world, analyzer):
    case, pngs = make_case(world, analyzer)
    case_store.sign(world.s, case, world.doctor, "Pro", world.valid, override_reason="Nucleoli are prominent.")
    v1 = case_bundle(case, PDF)
    (vs,) = obs(v1, "ai-vs-final")
    assert vs["valueBoolean"] is False
    assert "Nucleoli are prominent." in vs["note"][0]["text"]
    (dr,) = entries(v1, "DiagnosticReport")
    assert dr["status"] == "final"
    assert dr["conclusionCode"][0]["coding"][0]["code"] == "Pro"
    assert obs(v1, "ai-aggregate")[0]["valueCodeableConcept"]["coding"][0]["code"] == "Pre"

    case_store.sign(world.s, case, world.doctor, "Pre", world.valid, amendment_reason="Second look agrees with AI.")
    world.s.commit()
    v2 = case_bundle(case, PDF + b"v2")
    assert Bundle.model_validate(v2) is not None
    (dr2,) = entries(v2, "DiagnosticReport")
    assert dr2["status"] == "corrected"
    assert dr2["conclusionCode"][0]["coding"][0]["code"] == "Pre"
    assert "Second look agrees with AI." in dr2["conclusion"]
    assert dr2["presentedForm"][0]["title"] == f"oncoscope-case-{case.id}-v2.pdf"
    assert base64.b64decode(dr2["presentedForm"][0]["data"]) == PDF + b"v2"
    assert v2["identifier"]["value"] == f"case-{case.id}-v2"
    assert obs(v2, "ai-vs-final")[0]["valueBoolean"] is True
    # the amendment corrects the reader's observations; the AI's stay final, as they were
    assert obs(v2, "final-diagnosis")[0]["status"] == obs(v2, "ai-vs-final")[0]["status"] == "corrected"
    assert obs(v2, "ai-aggregate")[0]["status"] == "final" and obs(v1, "final-diagnosis")[0]["status"] == "final"
    assert any("Second look" in n["text"] for n in obs(v2, "final-diagnosis")[0]["note"])
    # a new version gets new ids; the old one is unchanged
    assert not {e["fullUrl"] for e in v1["entry"]} & {e["fullUrl"] for e in v2["entry"]}


def test_export_is_deterministic(world, analyzer):
    case, pngs = make_case(world, analyzer)
    case_store.sign(world.s, case, world.doctor, "Pre", world.valid)
    world.s.commit()
    first = json.dumps(case_bundle(case, PDF, images=pngs), sort_keys=False)
    world.s.expire_all()  # reload every row from the database
    case = world.s.get(Case, case.id)
    second = json.dumps(case_bundle(case, PDF, images=pngs), sort_keys=False)
    assert first == second
    other = case_bundle(case, PDF, base_url="https://clinic.example/fhir", images=pngs)
    assert other["identifier"] == {"system": "https://clinic.example/fhir/bundle", "value": f"case-{case.id}-v1"}
    assert other["entry"][0]["fullUrl"] != json.loads(first)["entry"][0]["fullUrl"]


def test_unsigned_case_is_refused(world, analyzer):
    case, _ = make_case(world, analyzer)
    with pytest.raises(ValueError, match="case is not signed"):
        case_bundle(case, PDF)


def test_unicode_patient_name_survives(world, analyzer):
    case, _ = make_case(world, analyzer)
    case_store.sign(world.s, case, world.doctor, "Pre", world.valid)
    b = case_bundle(case, PDF)
    text = json.dumps(b, ensure_ascii=False)
    parsed = Bundle.model_validate_json(text.encode("utf-8"))
    (patient,) = entries(json.loads(parsed.model_dump_json()), "Patient")
    assert patient["name"][0]["family"] == FAMILY
    assert patient["name"][0]["given"] == [GIVEN]
    assert patient["name"][0]["text"] == f"{FAMILY}, {GIVEN}"


def _references(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from ([v] if k == "reference" else _references(v))
    elif isinstance(node, list):
        for v in node:
            yield from _references(v)


def test_hostile_identifiers_are_data_not_references(world, analyzer):
    """JSON carries any text, so the MRN and names go in verbatim; no reference is built from them
    (an MRN like "x/../Patient/2" must not point anywhere)."""
    mrn = "B-001\\ZZ|x^y/../Patient/2 #?&=%"  # a row stored before MRNs were restricted
    world.patient.mrn, world.patient.family_name, world.patient.given_name = mrn, "Doe=Smith^\\|", "Ja\nne"
    case, _ = make_case(world, analyzer)
    case_store.sign(world.s, case, world.doctor, "Pre", world.valid)
    b = json.loads(Bundle.model_validate(case_bundle(case, PDF)).model_dump_json())
    (patient,) = entries(b, "Patient")
    assert patient["identifier"][0]["value"] == mrn
    assert patient["name"][0]["family"] == "Doe=Smith^\\|" and patient["name"][0]["given"] == ["Ja\nne"]
    refs = list(_references(b))
    urls = {e["fullUrl"] for e in b["entry"]}
    assert refs and all(r.startswith("urn:uuid:") and r in urls for r in refs)


def test_without_image_bytes_and_out_of_domain_field(world, analyzer):
    case, _ = make_case(world, analyzer, results=(("ok", "Benign", 5), ("out_of_domain", "Pro", None)))
    case_store.sign(world.s, case, world.doctor, NONDIAG := "Nondiagnostic", world.valid,
                    override_reason="Too few fields.", uncertainty_note="One field is not a smear.")
    b = case_bundle(case, PDF)
    assert json.loads(Bundle.model_validate(b).model_dump_json()) == b
    media = entries(b, "Media")
    assert ["data" in m["content"] for m in media] == [False, False]
    assert [m["content"]["title"] for m in media] == ["field-0.png", "field-1.png"]
    classes = obs(b, "ai-class")
    assert len(classes) == 2  # one per image, the out-of-domain one with a data-absent reason
    assert classes[0]["valueCodeableConcept"]["coding"][0]["code"] == "Benign"
    assert "valueCodeableConcept" not in classes[1] and classes[1]["dataAbsentReason"]["coding"][0]["code"]
    assert [o["valueString"] for o in obs(b, "ai-status")] == ["ok", "out_of_domain"]
    assert len(obs(b, "cell-count")) == 1
    (agg,) = obs(b, "ai-aggregate")
    assert any(c.get("valueString") == "uncertain" for c in agg["component"])
    (dr,) = entries(b, "DiagnosticReport")
    assert dr["conclusionCode"][0]["coding"][0]["code"] == NONDIAG
    assert dr["conclusion"].startswith("Non-diagnostic sample")
    assert any("not a smear" in n["text"] for n in obs(b, "final-diagnosis")[0]["note"])


def test_no_ai_call_is_not_reported_as_a_disagreement(world, analyzer):
    case, _ = make_case(world, analyzer, results=(("out_of_domain", "Pro", None),))
    case_store.sign(world.s, case, world.doctor, "Benign", world.valid, override_reason="Hematogones at the scope.",
                    uncertainty_note="Not analysable by the AI.")
    b = case_bundle(case, PDF)
    assert json.loads(Bundle.model_validate(b).model_dump_json()) == b
    (vs,) = obs(b, "ai-vs-final")
    assert "valueBoolean" not in vs and vs["dataAbsentReason"]["coding"][0]["code"] == "not-applicable"
    assert vs["note"] == [{"text": "Reason for the diagnosis (no AI call): Hematogones at the scope."}]


def test_original_pngs_from_the_file_store(world, analyzer):
    case, pngs = make_case(world, analyzer)
    got = original_pngs(case, world.store)
    assert set(got) == set(pngs)
    for k, data in got.items():
        a = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        b = np.asarray(Image.open(io.BytesIO(pngs[k])).convert("RGB"))
        assert np.array_equal(a, b)
    assert hashlib.sha256(pngs[case.images[0].id]).hexdigest() == case.images[0].sha256


def test_embeds_the_real_signed_pdf_report(world, analyzer):
    from oncoscope.reports.case_report import case_report_pdf

    case, pngs = make_case(world, analyzer)
    case_store.sign(world.s, case, world.doctor, "Pre", world.valid)
    pdf = case_report_pdf(case, world.store, "Test Clinic")
    b = case_bundle(case, pdf, images=original_pngs(case, world.store))
    (dr,) = entries(b, "DiagnosticReport")
    data = base64.b64decode(dr["presentedForm"][0]["data"])
    assert data == pdf and data.startswith(b"%PDF")
    assert json.loads(Bundle.model_validate(b).model_dump_json()) == b
