"""Cases in the store, without HTTP: creation, uploads (checked by content, stored by hash), the
aggregate AI call, what a sign-off still lacks, deleting an empty case, history filters. Races
between requests are in test_concurrency.py; the pages that use these in tests/web."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from oncoscope.analyzers import registry
from oncoscope.store import cases as case_store
from oncoscope.store.files import FileStore
from oncoscope.store.models import Analysis, Patient, PatientAccess, User
from oncoscope.vocab import NONDIAGNOSTIC
from tests.databases import migrated_sqlite
from tests.imaging.test_dicom import colour, make_dicom, to_bytes
from tests.web.conftest import png_bytes

MB = 2**20


@pytest.fixture()
def world(tmp_path):
    with migrated_sqlite(tmp_path) as s:
        u = User(email="doc@clinic.test", name="Dr Case", role="doctor", password_hash="x")
        other = User(email="other@clinic.test", name="Dr Other", role="doctor", password_hash="x")
        p = Patient(mrn="CASE-1", family_name="Case", given_name="Cara")
        s.add_all([u, other, p])
        s.flush()
        s.add(PatientAccess(patient_id=p.id, user_id=u.id))
        s.commit()
        yield s, u, other, p, FileStore(tmp_path / "images")


def _done(a: Analysis, status: str, label: str | None, top: float = 0.9) -> None:
    rest = (1 - top) / 3
    a.job_status, a.result_status, a.label = "done", status, label
    a.probabilities = {k: (top if k == label else rest) for k in ("Benign", "Early", "Pre", "Pro")}


def test_create_case_refuses_an_unknown_analyzer_and_unstorable_text(world):
    s, u, _, p, _ = world
    with pytest.raises(case_store.CaseError) as e:
        case_store.create_case(s, u, p, "no-such-analyzer")
    assert e.value.field == "analyzer_id"
    with pytest.raises(case_store.CaseError) as e:
        case_store.create_case(s, u, p, "smear-all", "fever\x00")
    assert e.value.field == "clinical_note"
    c = case_store.create_case(s, u, p, "smear-all", "fever")
    assert (c.status, c.revision, c.clinical_note) == ("open", 0, "fever")


def test_uploads_are_checked_by_content_stored_once_and_queued(world):
    s, u, _, p, files = world
    c = case_store.create_case(s, u, p, "smear-all")
    good = png_bytes(1)
    out = case_store.add_images(s, files, c, u, [("a.png", good), ("b.png", good), ("bad.png", b"junk"),
                                                 ("big.png", b"x" * (2 * MB))], 1 * MB)
    assert [i.original_filename for i in out.added] == ["a.png"] and out.duplicates == ["b.png"]
    assert [n for n, _ in out.errors] == ["bad.png", "big.png"] and "1 MB" in out.errors[1][1]
    assert c.status == "analysing" and c.revision == 1 and out.added[0].analysis.job_status == "queued"
    assert files.exists(out.added[0].sha256) and out.new_files == [out.added[0].sha256]
    again = case_store.add_images(s, files, c, u, [("a-again.png", good)], 1 * MB)
    assert again.duplicates == ["a-again.png"] and c.revision == 1  # nothing added: no new revision


def test_a_dicom_of_another_patient_is_refused(world):
    s, u, _, p, files = world
    c = case_store.create_case(s, u, p, "smear-all")
    ds = make_dicom(colour(64, 64), "RGB", patient_id="SOMEONE-ELSE")
    out = case_store.add_images(s, files, c, u, [("x.dcm", to_bytes(ds))], 10 * MB)
    assert not out.added and "SOMEONE-ELSE" in out.errors[0][1] and "CASE-1" in out.errors[0][1]
    ds = make_dicom(colour(64, 64), "RGB", patient_id="CASE-1")
    out = case_store.add_images(s, files, c, u, [("y.dcm", to_bytes(ds))], 10 * MB)
    img = out.added[0]
    assert img.dicom_patient_id == "CASE-1" and img.dicom_study_uid == ds.StudyInstanceUID
    assert case_store.dicom_study_uid(c) == ds.StudyInstanceUID


def test_the_aggregate_call_says_when_it_is_unsure(world):
    s, u, _, p, files = world
    c = case_store.create_case(s, u, p, "smear-all")
    out = case_store.add_images(s, files, c, u, [(f"{i}.png", png_bytes(i)) for i in (1, 2, 3)], 10 * MB)
    a1, a2, a3 = (i.analysis for i in out.added)
    assert case_store.aggregate(c).status == "pending"
    for a in (a1, a2, a3):
        _done(a, "out_of_domain", None)
    agg = case_store.aggregate(c)
    assert (agg.label, agg.status) == (None, "out_of_domain")
    _done(a1, "ok", "Pre")
    _done(a2, "ok", "Pre")
    agg = case_store.aggregate(c)
    assert (agg.label, agg.status) == ("Pre", "uncertain")  # one image of three unusable
    _done(a3, "ok", "Benign", top=0.95)
    agg = case_store.aggregate(c)
    assert agg.status == "uncertain" and re.search(r"\(the images disagree: 2 Pre-B\b.*, 1 Benign", agg.text), agg.text
    _done(a3, "ok", "Pre")
    agg = case_store.aggregate(c)
    assert (agg.label, agg.status, agg.n_used) == ("Pre", "ok", 3) and abs(sum(agg.probabilities.values()) - 1) < 1e-9


def test_one_suspicious_image_makes_the_case_suspicious(world):
    """Screening: one malignant-looking image among clear ones is not averaged away."""
    s, u, _, p, files = world
    c = case_store.create_case(s, u, p, "smear-all")
    out = case_store.add_images(s, files, c, u, [(f"{i}.png", png_bytes(i)) for i in range(1, 6)], 10 * MB)
    first, *rest = (i.analysis for i in out.added)
    for a in rest:
        _done(a, "ok", "Benign", top=0.97)
    _done(first, "ok", "Pro", top=0.7)
    agg = case_store.aggregate(c)
    assert (agg.label, agg.status) == ("Pro", "uncertain") and agg.probabilities["Pro"] == pytest.approx(0.7)
    assert "1 of 5 usable images" in agg.text and "images disagree" in agg.text
    _done(first, "ok", "Benign", top=0.9)  # all clear: the least clear image speaks for the case
    agg = case_store.aggregate(c)
    assert (agg.label, agg.status) == ("Benign", "ok") and agg.probabilities["Benign"] == pytest.approx(0.9)
    assert agg.text.startswith("0 of 5 usable images")


def test_sign_problems_lists_everything_at_once(world):
    s, u, _, p, files = world
    c = case_store.create_case(s, u, p, "smear-all")
    out = case_store.add_images(s, files, c, u, [("a.png", png_bytes(1))], 10 * MB)
    _done(out.added[0].analysis, "out_of_domain", None)
    labels = ["Benign", "Early", "Pre", "Pro", NONDIAGNOSTIC]
    problems = case_store.sign_problems(c, "", labels)
    assert [f for f, _ in problems] == ["final_diagnosis", "override_reason", "uncertainty_note"]
    assert "The AI gave no diagnosis" in dict(problems)["override_reason"]
    assert case_store.sign_problems(c, NONDIAGNOSTIC, labels, override_reason="pale stain",
                                    uncertainty_note="not a smear") == []


def test_only_an_empty_unsigned_case_can_be_deleted(world):
    s, u, _, p, files = world
    empty = case_store.create_case(s, u, p, "smear-all")
    full = case_store.create_case(s, u, p, "smear-all")
    case_store.add_images(s, files, full, u, [("a.png", png_bytes(1))], 10 * MB)
    s.commit()
    with pytest.raises(case_store.CaseError, match="Only an empty case"):
        case_store.delete_empty_case(s, full)
    s.rollback()
    case_store.delete_empty_case(s, empty)
    s.commit()
    assert [c.id for c in case_store.history(s, u, per_page=100).items] == [full.id]


def test_history_filters_and_visibility(world):
    s, u, other, p, files = world
    c1 = case_store.create_case(s, u, p, "smear-all")
    c2 = case_store.create_case(s, u, p, "bone-xray")
    c2.created_at = dt.datetime(2020, 1, 5)
    s.commit()
    assert case_store.history(s, other, per_page=100).total == 0  # not the other doctor's patient
    assert {c.id for c in case_store.history(s, u, per_page=100).items} == {c1.id, c2.id}
    assert [c.id for c in case_store.history(s, u, date_to=dt.date(2020, 1, 5), per_page=100).items] == [c2.id]
    assert [c.id for c in case_store.history(s, u, text="CASE-1", per_page=100).items] == [c1.id, c2.id]  # newest first
    assert case_store.counts_by_status(s, u) == {"open": 2}


def test_display_names_cover_non_diagnostic(world):
    an = registry.get("smear-all")
    names = case_store.label_names(an)
    assert names[NONDIAGNOSTIC] == "Non-diagnostic sample" and names["Benign"] == "Benign (hematogone)"
    assert case_store.label_names(None) == {NONDIAGNOSTIC: "Non-diagnostic sample"}
    assert [k for k, _ in case_store.diagnosis_options(an)][-1] == NONDIAGNOSTIC


def test_a_reader_can_sign_the_untyped_call():
    """brain-mri's 'tumour, type not suggested' is no network output, but a call a reader can make."""
    from oncoscope.analyzers import registry
    options = case_store.diagnosis_options(registry.get("brain-mri"))
    assert ("tumour", "Brain tumour, type not suggested") in options and options[-1][0] == NONDIAGNOSTIC


def test_a_case_never_reads_clear_over_a_positive_call(world):
    """brain-mri calls a slice positive from P(tumour) 0.08: with 'no tumour' on top, the case reads
    the call without a type; the probabilities are the lead slice's own."""
    s, u, _, p, files = world
    c = case_store.create_case(s, u, p, "brain-mri")
    out = case_store.add_images(s, files, c, u, [("a.png", png_bytes(1)), ("b.png", png_bytes(2))], 10 * MB)
    clear, doubtful = (i.analysis for i in out.added)
    for a, probs, called in ((clear, {"glioma": 0.01, "meningioma": 0.01, "notumor": 0.97, "pituitary": 0.01}, False),
                             (doubtful, {"glioma": 0.1, "meningioma": 0.03, "notumor": 0.85, "pituitary": 0.02}, True)):
        a.job_status, a.result_status, a.label, a.probabilities = "done", "uncertain" if called else "ok", "notumor", probs
        a.malignant, a.malignant_probability = called, 1 - probs["notumor"]
    agg = case_store.aggregate(c)
    assert (agg.label, agg.status) == ("tumour", "uncertain") and agg.probabilities["notumor"] == 0.85
    assert agg.text.startswith("1 of 2 usable images")


def test_naming_the_type_of_an_untyped_call_agrees_with_the_ai(world):
    s, u, _, p, files = world
    c = case_store.create_case(s, u, p, "brain-mri")
    assert case_store.agrees_with_ai(c, "tumour", "glioma") and case_store.agrees_with_ai(c, "tumour", "tumour")
    assert not case_store.agrees_with_ai(c, "tumour", "notumor") and not case_store.agrees_with_ai(c, "glioma", "tumour")
    assert not case_store.agrees_with_ai(c, None, "glioma")


def test_a_signed_case_reports_the_ai_call_it_was_signed_with(world):
    """Reports state the call the signer saw, even after a later rule or re-analysis changes what the
    case's images make of it now; the review's hash covers it."""
    s, u, _, p, files = world
    c = case_store.create_case(s, u, p, "smear-all")
    out = case_store.add_images(s, files, c, u, [("a.png", png_bytes(1))], 10 * MB)
    a = out.added[0].analysis
    _done(a, "ok", "Pre")
    c.status = "ready"
    s.commit()
    r = case_store.sign(s, c, u, "Pre", ["Benign", "Early", "Pre", "Pro", NONDIAGNOSTIC])
    assert r.ai_call["label"] == "Pre" and r.ai_call["text"] == case_store.aggregate(c).text and r.agrees_with_ai
    _done(a, "ok", "Benign", top=0.97)  # what a re-analysis under another model would now say
    assert case_store.aggregate(c).label == "Benign"
    frozen = case_store.signed_call(c)
    assert (frozen.label, frozen.status, frozen.probabilities["Pre"]) == ("Pre", "ok", pytest.approx(0.9))
    before = r.content_sha256
    r.ai_call = dict(r.ai_call, label="Benign")
    assert case_store._review_hash(c, r) != before  # a changed stored call no longer verifies


def test_a_case_is_created_stat_or_routine(world):
    s, u, _, p, _ = world
    assert case_store.create_case(s, u, p, "smear-all").priority == "routine"
    assert case_store.create_case(s, u, p, "smear-all", priority="stat").priority == "stat"
    with pytest.raises(case_store.CaseError) as e:
        case_store.create_case(s, u, p, "smear-all", priority="urgent")
    assert e.value.field == "priority" and "stat, routine" in str(e.value)
