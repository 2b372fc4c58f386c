"""The report's workflow in the store: roles, preliminary results, the second reader (blinded,
agreement recorded), settling a disagreement, cancelling, consult access, worklists."""

from __future__ import annotations

import pytest

from oncoscope.store import access, consults, workflow, worklists
from oncoscope.store import cases as case_store
from oncoscope.store.files import FileStore
from oncoscope.store.models import Analysis, Case, CaseTransition, Patient, PatientAccess, User
from oncoscope.vocab import NONDIAGNOSTIC
from tests.databases import migrated_sqlite
from tests.web.conftest import png_bytes

MB = 2**20
LABELS = ["Benign", "Early", "Pre", "Pro", NONDIAGNOSTIC]


@pytest.fixture()
def world(tmp_path):
    with migrated_sqlite(tmp_path) as s:
        people = {k: User(email=f"{k}@clinic.test", name=k.title(), role=r, password_hash="x") for k, r in (
            ("first", "doctor"), ("second", "doctor"), ("tech", "technologist"), ("rev", "reviewer"),
            ("outsider", "doctor"), ("admin", "admin"))}
        p = Patient(mrn="WF-1", family_name="Flow", given_name="Wanda")
        s.add_all([*people.values(), p])
        s.flush()
        for k in ("first", "second", "tech"):
            s.add(PatientAccess(patient_id=p.id, user_id=people[k].id))
        s.commit()
        yield s, people, p, FileStore(tmp_path / "images")


def _ready_case(s, people, p, files, label: str | None = "Pre", status: str = "ok", seed: int = 1) -> Case:
    c = case_store.create_case(s, people["tech"], p, "smear-all")
    a: Analysis = case_store.add_images(s, files, c, people["tech"], [("a.png", png_bytes(seed))], 10 * MB).added[0].analysis
    a.job_status, a.result_status, a.label = "done", status, label
    a.probabilities = {k: (0.9 if k == label else 0.1 / 3) for k in LABELS[:4]}
    c.status = "ready"
    s.commit()
    return c


def _states(s, c) -> list[tuple[str, str, str]]:
    rows = s.query(CaseTransition).filter_by(case_id=c.id).order_by(CaseTransition.id)
    return [(t.from_state, t.to_state, s.get(User, t.user_id).name if t.user_id else "") for t in rows]


def test_roles_allow_what_the_issue_says():
    role = lambda r: User(role=r)  # noqa: E731
    assert access.may(role("technologist"), "prepare") and not access.may(role("technologist"), "sign")
    assert not any(access.may(role("reviewer"), cap) for cap in access.CAPABILITIES)
    assert access.may(role("doctor"), "sign") and not access.may(role("admin"), "sign")
    assert access.may(role("admin"), "edit") and not access.may(role("admin"), "prepare")


def test_preliminary_then_final_with_who_and_when(world):
    s, people, p, files = world
    c = _ready_case(s, people, p, files)
    with pytest.raises(access.Forbidden):
        workflow.sign(s, c, people["tech"], "Pre", LABELS)
    workflow.write_preliminary(s, c, people["tech"], "Pre", LABELS, "looks like pre-B")
    s.commit()
    assert c.status == "preliminary" and case_store.report_state(c) == "preliminary"
    done = workflow.sign(s, c, people["first"], "Pre", LABELS)
    s.commit()
    assert done.review is not None and case_store.report_state(c) == "final"
    case_store.sign(s, c, people["first"], "Pro", LABELS, override_reason="more blasts on review",
                    amendment_reason="second look")
    s.commit()
    assert case_store.report_state(c) == "corrected"
    assert _states(s, c) == [("open", "preliminary", "Tech"), ("preliminary", "final", "First"),
                             ("final", "corrected", "First")]


def test_new_images_void_a_preliminary_result(world):
    s, people, p, files = world
    c = _ready_case(s, people, p, files)
    workflow.write_preliminary(s, c, people["tech"], "Pre", LABELS)
    s.commit()
    case_store.add_images(s, files, c, people["tech"], [("b.png", png_bytes(5))], 10 * MB)
    s.commit()
    s.expire_all()
    assert c.status == "analysing" and workflow.current_reading(c, "preliminary") is None
    assert _states(s, c)[-1][:2] == ("preliminary", "open")


@pytest.mark.parametrize("policy,diagnosis,needed", [
    ("none", "Benign", False), ("always", "Pre", True), ("disagree", "Pre", False), ("disagree", "Benign", True),
    ("positive", "Benign", True),  # the AI called it positive (Pre is malignant)
])
def test_second_reader_policy(world, policy, diagnosis, needed):
    s, people, p, files = world
    c = _ready_case(s, people, p, files)
    workflow.set_second_reader_policy(s, people["admin"], "smear-all", policy)
    texts = {"override_reason": "reads benign"} if diagnosis != "Pre" else {}
    done = workflow.sign(s, c, people["first"], diagnosis, LABELS, **texts)
    s.commit()
    assert (done.review is None) is needed
    assert c.status == ("second_read" if needed else "signed")


def test_second_reader_is_blinded_and_agreement_makes_the_report_final(world):
    s, people, p, files = world
    c = _ready_case(s, people, p, files)
    workflow.set_second_reader_policy(s, people["admin"], "smear-all", "always")
    workflow.sign(s, c, people["first"], "Pre", LABELS, comment="clear blasts")
    s.commit()
    assert workflow.blinded(c, people["second"]) and not workflow.blinded(c, people["first"])
    with pytest.raises(case_store.CaseError, match="another doctor"):
        workflow.second_read(s, c, people["first"], "Pre", LABELS)
    with pytest.raises(access.Forbidden):
        workflow.second_read(s, c, people["tech"], "Pre", LABELS)
    review = workflow.second_read(s, c, people["second"], "Pre", LABELS)
    s.commit()
    assert review is not None and c.status == "signed" and case_store.report_state(c) == "final"
    assert (review.signed_by_id, review.second_reader_id, review.second_agrees) == (
        people["first"].id, people["second"].id, True)
    assert review.comment == "clear blasts" and review.content_sha256 == case_store._review_hash(c, review)
    assert _states(s, c)[-2:] == [("open", "second_read", "First"), ("second_read", "final", "Second")]
    with pytest.raises(case_store.CaseError, match="not waiting"):
        workflow.second_read(s, c, people["second"], "Pre", LABELS)


def test_a_disagreement_is_settled_by_one_of_the_two_readers(world):
    s, people, p, files = world
    c = _ready_case(s, people, p, files)
    workflow.set_second_reader_policy(s, people["admin"], "smear-all", "always")
    workflow.sign(s, c, people["first"], "Pre", LABELS)
    assert workflow.second_read(s, c, people["second"], "Pro", LABELS) is None
    s.commit()
    assert c.status == "second_read" and not workflow.blinded(c, people["second"])
    s.add(PatientAccess(patient_id=p.id, user_id=people["outsider"].id))
    with pytest.raises(case_store.CaseError, match="already given"):
        workflow.second_read(s, c, people["outsider"], "Pro", LABELS)
    with pytest.raises(case_store.CaseError, match="two readers"):
        workflow.sign(s, c, people["outsider"], "Pro", LABELS, override_reason="x")
    done = workflow.sign(s, c, people["second"], "Pro", LABELS, override_reason="consensus: promyelocytes")
    s.commit()
    r = done.review
    assert (r.final_diagnosis, r.second_diagnosis, r.second_agrees) == ("Pro", "Pro", False)
    assert c.status == "signed"


def test_only_an_empty_or_failed_case_is_cancelled_with_a_reason(world):
    s, people, p, files = world
    usable = _ready_case(s, people, p, files)
    with pytest.raises(case_store.CaseError, match="usable results"):
        workflow.cancel(s, usable, people["tech"], "duplicate order")
    failed = _ready_case(s, people, p, files, label=None, status="out_of_domain", seed=3)
    with pytest.raises(case_store.CaseError, match="reason") as e:
        workflow.cancel(s, failed, people["tech"], "  ")
    assert e.value.field == "reason"
    with pytest.raises(access.Forbidden):
        workflow.cancel(s, failed, people["rev"], "no")
    workflow.cancel(s, failed, people["tech"], "smear unreadable, redrawn as case 9")
    s.commit()
    assert failed.status == "cancelled" and failed.cancel_reason.startswith("smear unreadable")
    with pytest.raises(case_store.CaseError):
        case_store.add_images(s, files, failed, people["tech"], [("c.png", png_bytes(7))], 10 * MB)
    assert _states(s, failed) == [("open", "cancelled", "Tech")]


def test_a_consult_opens_that_case_only_until_it_is_closed(world):
    s, people, p, files = world
    c = _ready_case(s, people, p, files)
    other = _ready_case(s, people, p, files, seed=4)
    outsider = people["outsider"]
    assert case_store.get_visible(s, outsider, c.id) is None
    with pytest.raises(case_store.CaseError, match="inside the image"):
        consults.ask(s, c, people["first"], outsider.id, "Blast?", c.images[0].id, [0, 0, 10_000, 5])
    k = consults.ask(s, c, people["first"], outsider.id, "Blast?", c.images[0].id, [10, 12, 30, 40])
    s.commit()
    assert case_store.get_visible(s, outsider, c.id) is not None
    assert case_store.get_visible(s, outsider, other.id) is None
    assert access.case_access(s, outsider, c) == "consult"
    with pytest.raises(access.Forbidden, match="consulted"):
        access.require(s, outsider, "sign", c)
    consults.answer(s, k, outsider, "Yes, a myeloblast with Auer rods.")
    with pytest.raises(access.Forbidden):
        consults.close(s, k, people["tech"])
    consults.close(s, k, people["first"])
    s.commit()
    assert case_store.get_visible(s, outsider, c.id) is None


def test_a_consult_to_any_reviewer_is_taken_by_the_first_to_answer(world):
    s, people, p, files = world
    c = _ready_case(s, people, p, files)
    k = consults.ask(s, c, people["tech"], None, "Smudge cell or blast?")
    s.commit()
    assert case_store.get_visible(s, people["rev"], c.id) is not None
    assert case_store.get_visible(s, people["outsider"], c.id) is None  # a doctor is not 'any reviewer'
    consults.answer(s, k, people["rev"], "Smudge cell.")
    assert k.consultant_id == people["rev"].id


def test_worklists_sort_stat_and_ai_flag_first_and_count(world):
    s, people, p, files = world
    routine = _ready_case(s, people, p, files, seed=1)
    stat = _ready_case(s, people, p, files, seed=2)
    flagged = _ready_case(s, people, p, files, seed=3)
    stat.priority, flagged.ai_flag, routine.ai_flag, stat.ai_flag = "stat", True, False, False
    s.commit()
    page = worklists.queue_page(s, people["first"], "verify")
    assert [c.id for c in page.items] == [stat.id, flagged.id, routine.id]
    assert [c.id for c in worklists.queue_page(s, people["first"], "verify", "ai").items][0] == flagged.id
    assert [c.id for c in worklists.queue_page(s, people["first"], "verify", "age").items] == [
        routine.id, stat.id, flagged.id]
    assert worklists.counts(s, people["first"]) == {"verify": 3, "second-read": 0, "consults": 0}
    assert worklists.counts(s, people["tech"]) == {"prepare": 3, "consults": 0}
    assert worklists.next_case(s, people["first"], "verify", stat.id) == flagged.id
    workflow.set_second_reader_policy(s, people["admin"], "smear-all", "always")
    workflow.sign(s, c := routine, people["first"], "Pre", LABELS)
    s.commit()
    assert worklists.counts(s, people["second"])["second-read"] == 1
    assert worklists.counts(s, people["first"])["second-read"] == 0  # not one's own first reading
    assert c.status == "second_read"
