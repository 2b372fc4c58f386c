"""The report's life after the AI: a preliminary result, the first reading, the second reader, the
final report, cancelling a case, and the settings the administrator keeps for them.

    open --(preliminary result: technologist or doctor)--> preliminary
    open | preliminary --(doctor signs; the analyzer's policy asks for a second reader)--> second_read
    second_read --(another doctor's blinded reading agrees)--> final
    second_read --(it disagrees: either reader signs the consensus)--> final
    open | preliminary --(doctor signs; no second reader needed)--> final --(amendment)--> corrected
    open (empty or failed) --(cancel, with a reason)--> cancelled

Every move is a ``CaseTransition`` (who, when, why); the web layer audits each request once.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import update
from sqlalchemy.orm import Session

from ..analyzers import registry
from ..vocab import SECOND_READER_POLICIES
from . import access
from . import cases as case_store
from . import cells as cell_store
from .cases import CASE_CHANGED, CaseError, advance, lock_case, record_transition, report_state
from .models import AnalyzerPolicy, Case, Reading, Review, SiteSetting, User, utcnow

RELEASE_PRELIMINARY = "release_preliminary"


# ----------------------------------------------------------------------------- settings
def second_reader_policy(s: Session, analyzer_id: str) -> str:
    row = s.get(AnalyzerPolicy, analyzer_id)
    return row.second_reader if row is not None else "none"


def policies(s: Session) -> dict[str, str]:
    return {a: second_reader_policy(s, a) for a in registry.available()}


def set_second_reader_policy(s: Session, user: User, analyzer_id: str, policy: str) -> None:
    if analyzer_id not in registry.available():
        raise CaseError("Unknown analyzer.", "analyzer_id")
    if policy not in SECOND_READER_POLICIES:
        raise CaseError(f"Choose a policy: {', '.join(SECOND_READER_POLICIES)}.", "second_reader")
    row = s.get(AnalyzerPolicy, analyzer_id) or AnalyzerPolicy(analyzer_id=analyzer_id)
    row.second_reader, row.updated_by_id, row.updated_at = policy, user.id, utcnow()
    s.add(row)


def preliminary_release_allowed(s: Session) -> bool:
    row = s.get(SiteSetting, RELEASE_PRELIMINARY)
    return bool(row is not None and row.value.get("allowed"))


def set_preliminary_release(s: Session, user: User, allowed: bool) -> None:
    row = s.get(SiteSetting, RELEASE_PRELIMINARY) or SiteSetting(key=RELEASE_PRELIMINARY)
    row.value, row.updated_by_id, row.updated_at = {"allowed": bool(allowed)}, user.id, utcnow()
    s.add(row)


def needs_second_reader(policy: str, case: Case, ai_label: str | None, diagnosis: str) -> bool:
    """Whether the analyzer's policy asks a second doctor to confirm this first reading."""
    if policy == "always":
        return True
    if policy == "disagree":
        return not case_store.agrees_with_ai(case, ai_label, diagnosis)
    if policy == "positive":
        an = registry.installed(case.analyzer_id)
        positive = an.positive_calls if an is not None else set()
        return ai_label in positive or diagnosis in positive
    return False


# ----------------------------------------------------------------------------- readings
def current_reading(case: Case, kind: str) -> Reading | None:
    rows = [r for r in case.readings if r.kind == kind and r.current]
    return rows[-1] if rows else None


def write_preliminary(s: Session, case: Case, user: User, diagnosis: str, valid_labels: list[str],
                      comment: str = "", revision: int | None = None) -> Reading:
    """A preliminary result (technologist or doctor): what the case shows before a doctor signs. A
    newer one replaces it; new images void it."""
    access.require(s, user, "prepare", case)
    lock_case(s, case)
    if revision is not None and revision != case.revision:
        raise CaseError(CASE_CHANGED)
    if case.status not in ("ready", "preliminary"):
        raise CaseError("A preliminary result is written once every image is analysed, before the case is signed.")
    if diagnosis not in valid_labels:
        raise CaseError("Choose a diagnosis from the list.", "final_diagnosis")
    texts = case_store.sign_texts(comment=comment)
    agg = case_store.aggregate(case)
    before = case.status
    if not advance(s, case, "preliminary", from_statuses=("ready", "preliminary"), revision=case.revision):
        raise CaseError(CASE_CHANGED)
    s.execute(update(Reading).where(Reading.case_id == case.id, Reading.kind == "preliminary")
              .values(current=False).execution_options(synchronize_session=False))
    r = Reading(case_id=case.id, kind="preliminary", user_id=user.id, diagnosis=diagnosis, revision=case.revision,
                ai_call=case_store.frozen_call(agg), at=utcnow(), current=True, **texts)
    s.add(r)
    record_transition(s, case, user, "open" if before == "ready" else "preliminary", "preliminary",
                      "revised" if before == "preliminary" else "")
    s.flush()
    s.expire(case, ["readings"])
    return r


@dataclass
class SignOutcome:
    review: Review | None  # the final (or corrected) report, when signing made one
    reading: Reading | None  # the first reading, when a second reader must confirm it first


def sign(s: Session, case: Case, user: User, final_diagnosis: str, valid_labels: list[str], *,
         blast_flag_pct: float | None = None, **fields) -> SignOutcome:
    """A doctor signs: the final report, or (when the analyzer's policy asks for it on a first sign-off)
    the first reading, which waits for a second doctor. A case waiting for its second reading is
    signed here only to settle a disagreement, by one of its two readers."""
    access.require(s, user, "sign", case)
    if case.status == "second_read":
        return SignOutcome(_settle(s, case, user, final_diagnosis, valid_labels, blast_flag_pct, **fields), None)
    if case.status == "cancelled":
        raise CaseError("This case was cancelled; it cannot be signed.")
    policy = second_reader_policy(s, case.analyzer_id)
    if case.current_review is None and needs_second_reader(policy, case, case_store.aggregate(case).label,
                                                           final_diagnosis):
        return SignOutcome(None, _first_reading(s, case, user, final_diagnosis, valid_labels, blast_flag_pct, **fields))
    return SignOutcome(cell_store.sign(s, case, user, final_diagnosis, valid_labels, blast_flag_pct=blast_flag_pct,
                                       **fields), None)


def _first_reading(s: Session, case: Case, user: User, diagnosis: str, valid_labels: list[str],
                   blast_flag_pct: float | None, *, revision: int | None = None, confirm_unverified: bool = False,
                   amendment_reason: str = "", **texts) -> Reading:
    lock_case(s, case)
    if revision is not None and revision != case.revision:
        raise CaseError(CASE_CHANGED)
    frozen = cell_store.frozen_differential(s, case, blast_flag_pct)
    texts = case_store.sign_texts(**texts)
    agg = case_store.aggregate(case)
    problems = case_store.sign_problems(case, diagnosis, valid_labels, agg=agg, differential=frozen,
                                        confirm_unverified=confirm_unverified, **texts)
    if (waiting := case_store.not_ready_to_sign(case)) is not None:
        problems.insert(0, (None, waiting))
    if problems:
        raise CaseError(problems[0][1], problems[0][0], problems)
    before = report_state(case)
    if not advance(s, case, "second_read", from_statuses=("ready", "preliminary"), revision=case.revision):
        raise CaseError(CASE_CHANGED)
    r = Reading(case_id=case.id, kind="first", user_id=user.id, diagnosis=diagnosis, revision=case.revision,
                ai_call=case_store.frozen_call(agg), differential=frozen, at=utcnow(), current=True, **texts)
    s.add(r)
    record_transition(s, case, user, before, "second_read", "awaiting a second reader")
    s.flush()
    s.expire(case, ["readings"])
    return r


def blinded(case: Case, user: User) -> bool:
    """The user is to give the second reading and has not yet: the first reading is hidden from them."""
    if case.status != "second_read":
        return False
    first = current_reading(case, "first")
    return first is not None and first.user_id != user.id and current_reading(case, "second") is None


def second_read(s: Session, case: Case, user: User, diagnosis: str, valid_labels: list[str], comment: str = "",
                revision: int | None = None) -> Review | None:
    """The second reader's own reading, given blind. When it is the first reader's diagnosis, the report
    is final (signed by the first reader, confirmed by the second); when not, both readings are shown
    to both readers and one of them signs the consensus (``sign``). Returns the final review, if any."""
    access.require(s, user, "sign", case)
    lock_case(s, case)
    if case.status != "second_read":
        raise CaseError("This case is not waiting for a second reading.")
    if revision is not None and revision != case.revision:
        raise CaseError(CASE_CHANGED)
    first = current_reading(case, "first")
    if first is None or current_reading(case, "second") is not None:
        raise CaseError("The second reading of this case was already given.")
    if first.user_id == user.id:
        raise CaseError("The second reader must be another doctor than the first reader.")
    if diagnosis not in valid_labels:
        raise CaseError("Choose a diagnosis from the list.", "final_diagnosis")
    texts = case_store.sign_texts(comment=comment)
    second = Reading(case_id=case.id, kind="second", user_id=user.id, diagnosis=diagnosis, revision=case.revision,
                     at=utcnow(), current=True, **texts)
    s.add(second)
    s.flush()
    s.expire(case, ["readings"])
    if diagnosis != first.diagnosis:
        record_transition(s, case, user, "second_read", "second_read", "second reading disagrees: the two readers "
                          "settle the diagnosis")
        case_store.advance(s, case, "second_read", from_statuses=("second_read",))  # (revision: pages re-read)
        return None
    return _final_from_first(s, case, user, first, second)


def _second_fields(second: Reading, agrees: bool) -> dict:
    return {"second_reader_id": second.user_id, "second_diagnosis": second.diagnosis, "second_agrees": agrees,
            "second_read_at": second.at}


def _final_from_first(s: Session, case: Case, user: User, first: Reading, second: Reading) -> Review:
    """The first reading becomes the final report, confirmed by the second reader."""
    signer = s.get(User, first.user_id)
    an = registry.installed(case.analyzer_id)
    labels = case_store.diagnosis_labels(an) if an is not None else [first.diagnosis]
    review = case_store.sign(s, case, signer, first.diagnosis, labels, comment=first.comment,
                             override_reason=first.override_reason, uncertainty_note=first.uncertainty_note,
                             differential=first.differential, confirm_unverified=True,
                             second=_second_fields(second, True), moved_by=user,
                             transition_note="confirmed by the second reader")
    cell_store.mark_signed(s, case)
    return review


def _settle(s: Session, case: Case, user: User, diagnosis: str, valid_labels: list[str],
            blast_flag_pct: float | None, **fields) -> Review:
    first, second = current_reading(case, "first"), current_reading(case, "second")
    if first is None or second is None:
        raise CaseError("This case is waiting for its second reading; the second reader gives it first.")
    if user.id not in (first.user_id, second.user_id):
        raise CaseError("Only the two readers of this case settle its diagnosis.")
    return cell_store.sign(s, case, user, diagnosis, valid_labels, blast_flag_pct=blast_flag_pct,
                           second=_second_fields(second, False), transition_note="consensus of the two readers",
                           **fields)


# ----------------------------------------------------------------------------- cancelling
def cancel(s: Session, case: Case, user: User, reason: str) -> None:
    """Cancel a case that holds nothing to read (no image, or none analysed into a usable result),
    with a reason; it leaves the worklists and stays on the record."""
    access.require(s, user, "edit", case)
    reason = (reason or "").strip()
    if not reason:
        raise CaseError("Give the reason for cancelling the case.", "reason")
    if case_store.unstorable(reason):
        raise CaseError(f"The reason {case_store.UNSTORABLE_MESSAGE}", "reason")
    lock_case(s, case)
    if case.status not in case_store.UNSIGNED:
        raise CaseError("Only a case that is not yet read (no preliminary result, not signed) can be cancelled.")
    analyses = [i.analysis for i in case.images if i.analysis is not None]
    if any(a.job_status in case_store.PENDING for a in analyses):
        raise CaseError("Images of this case are still being analysed: wait for them, then cancel if they fail.")
    if any(a.job_status == "done" and a.result_status in ("ok", "uncertain") for a in analyses):
        raise CaseError("This case has usable results: read it (a non-diagnostic sample is a diagnosis too) "
                        "instead of cancelling it.")
    if not advance(s, case, "cancelled", from_statuses=case_store.UNSIGNED, cancel_reason=reason[:2000]):
        raise CaseError(CASE_CHANGED)
    record_transition(s, case, user, "open", "cancelled", reason)
