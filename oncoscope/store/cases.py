"""Cases, uploaded images, analysis jobs and sign-off. Views call these; nothing here knows Flask."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import delete, exists, func, or_, select, update
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Session, joinedload, object_session

from ..analyzers import registry
from ..imaging.dicom import is_dicom_uid
from ..imaging.imageio import ImageLoadError, load_image
from ..ml.differential import REPORTED, blast_call, summarise
from ..vocab import NONDIAGNOSTIC, NONDIAGNOSTIC_NAME, PRIORITIES
from . import access
from .files import FileStore
from .models import (Analysis, Case, CaseImage, CaseTransition, CellLabel, DicomInboxItem, Patient, Reading, Review,
                     User, utcnow)
from .patients import Page
from .patients import matches as patient_matches
from .text import UNSTORABLE_MESSAGE, clean_filename, storable, unstorable



class CaseError(ValueError):
    """A refused change; ``errors`` lists every (field, message) found, the first as the message."""

    def __init__(self, message: str, field: str | None = None, errors: list[tuple[str | None, str]] | None = None):
        super().__init__(message)
        self.field = field
        self.errors = errors or [(field, message)]


# ----------------------------------------------------------------------------- access
class CaseGone(CaseError):
    """The case was deleted (an empty one) while this request held it."""


def visible_cases(user: User):
    """Cases the user may see (the one object-level rule, reused): every case for an admin, else the
    cases of their patients and those they are consulted on (store/access)."""
    if user.is_admin:
        return select(Case)
    return select(Case).where(or_(access.via_patient(user), access.consulted_on(user)))


def get_visible(s: Session, user: User, case_id: int) -> Case | None:
    return s.scalar(visible_cases(user).where(Case.id == case_id))


# ----------------------------------------------------------------------------- state changes
UNSIGNED = ("open", "analysing", "ready")
# a preliminary result does not freeze the case: new images send it back to analysis (and void the result)
UPLOADABLE = (*UNSIGNED, "preliminary")
PENDING = ("queued", "running", "retried")  # job states that keep a case 'analysing'

def report_state(case: Case) -> str:
    """The report's state, as pages, PDF, FHIR and HL7 name it (vocab.REPORT_STATE_NAMES), from the
    case's status and its review."""
    if case.status == "cancelled":
        return "cancelled"
    if case.status == "signed":
        return "corrected" if case.current_review is not None and case.current_review.version > 1 else "final"
    return "preliminary" if case.status in ("preliminary", "second_read") else "open"


def record_transition(s: Session, case: Case, user: User | None, from_state: str, to_state: str,
                      note: str = "") -> None:
    """One line of the case's report history (who moved it, when, why)."""
    s.add(CaseTransition(case_id=case.id, from_state=from_state, to_state=to_state,
                         user_id=user.id if user is not None else None, at=utcnow(), note=note[:2000]))


def not_uploadable(case: Case) -> str:
    """Why images cannot be added to the case in its state."""
    return {"second_read": "This case is waiting for its second reading: images cannot be added now.",
            "cancelled": "This case was cancelled: images cannot be added. Open a new case."}.get(
        case.status, SIGNED_NO_IMAGES)


def lock_case(s: Session, case: Case) -> None:
    """Reload the case row under a row lock (PostgreSQL, MariaDB; SQLite serialises writers anyway),
    so concurrent uploads and sign-offs of one case take turns, and forget its loaded images."""
    try:
        s.refresh(case, with_for_update=True)
    except InvalidRequestError:  # deleted (an empty case) since it was loaded
        raise CaseGone("This case no longer exists (it was deleted).") from None
    s.expire(case, ["images", "reviews"])


def advance(s: Session, case: Case, status: str, from_statuses: tuple[str, ...],
            revision: int | None = None, **values) -> bool:
    """Move the case to ``status`` and bump its revision, only if it is still in ``from_statuses``
    (and at ``revision`` when given), in one conditional UPDATE checked by its row count: the
    database, not this process's possibly stale copy, decides who wins a race."""
    cond = [Case.id == case.id, Case.status.in_(from_statuses)]
    if revision is not None:
        cond.append(Case.revision == revision)
    res = s.execute(update(Case).where(*cond).values(status=status, revision=Case.revision + 1,
                                                     updated_at=utcnow(), **values)
                    .execution_options(synchronize_session=False))
    if res.rowcount != 1:
        return False
    s.refresh(case, ["status", "revision", "updated_at", *values])
    return True


# ----------------------------------------------------------------------------- creation and uploads
def create_case(s: Session, user: User | None, patient: Patient, analyzer_id: str, note: str = "",
                priority: str = "routine") -> Case:
    """A new open case (``user`` None: made by the DICOM receiver or a LIS order, not a person)."""
    if analyzer_id not in registry.available():
        raise CaseError("Choose an analyzer from the list.", "analyzer_id")
    if unstorable(note):
        raise CaseError(f"The clinical note {UNSTORABLE_MESSAGE}", "clinical_note")
    if priority not in PRIORITIES:
        raise CaseError(f"Choose a priority: {', '.join(PRIORITIES)}.", "priority")
    c = Case(patient_id=patient.id, analyzer_id=analyzer_id, clinical_note=(note or "")[:5000],
             created_by_id=user.id if user is not None else None,
             priority=priority)
    s.add(c)
    s.flush()
    return c


def delete_empty_case(s: Session, case: Case) -> None:
    """Remove a case that holds nothing (no image, no sign-off): e.g. one whose uploads all failed.
    One conditional DELETE, so an upload landing at the same moment keeps its case."""
    lock_case(s, case)
    gone = s.execute(delete(Case).where(Case.id == case.id, Case.status == "open",
                                        ~exists().where(CaseImage.case_id == Case.id),
                                        ~exists().where(Review.case_id == Case.id))
                     .execution_options(synchronize_session=False)).rowcount
    if not gone:
        raise CaseError("Only an empty case (no images, never signed) can be deleted.")
    s.expunge(case)


@dataclass
class UploadOutcome:
    added: list[CaseImage] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (file name, message)
    new_files: list[str] = field(default_factory=list)  # content hashes first written by this upload


SIGNED_NO_IMAGES = "This case is signed; amend it to change the diagnosis. Images cannot be added."


def add_images(s: Session, store: FileStore, case: Case, user: User | None, uploads: list[tuple[str, bytes]],
               max_bytes: int) -> UploadOutcome:
    """Validate by content, store by hash, create one queued analysis per new image.

    The slow part (decoding, thumbnails, files) runs first, without any lock. Then the case row is
    locked (where the database can) for the row writes only, and the final conditional UPDATE
    refuses the whole upload if a sign-off committed meanwhile: a signed case never gains images."""
    if case.status not in UPLOADABLE:
        raise CaseError(not_uploadable(case))
    out = UploadOutcome()
    try:
        ready = [r for r in (_store_file(store, case, name, data, max_bytes, out) for name, data in uploads) if r]
        _add_rows(s, case, user, [(name, data, _Facts(loaded.format or "", loaded.rgb.shape[1], loaded.rgb.shape[0],
                                                     loaded.dicom)) for name, data, loaded in ready], out)
    except BaseException:
        discard_new_files(s, store, out.new_files)
        raise
    return out


@dataclass
class _Facts:
    """What an image row records about the file: its format, size (pixels analysed) and DICOM metadata."""

    format: str
    width: int
    height: int
    dicom: object | None


def add_received(s: Session, store: FileStore, case: Case, user: User | None, name: str, data: bytes,
                 header) -> UploadOutcome:
    """A DICOM image the receiver checked from its header alone (``imaging.dicom.read_header``): stored
    and queued like an upload, without decoding it here (its analysis does; the worker writes its
    thumbnail). The same locking and refusals as :func:`add_images`."""
    if case.status not in UPLOADABLE:
        raise CaseError(not_uploadable(case))
    meta = header.image
    if meta.patient_id and meta.patient_id.strip() != case.patient.mrn:
        raise CaseError(f"this DICOM belongs to patient ID {meta.patient_id!r}, not to MRN {case.patient.mrn}")
    out = UploadOutcome()
    try:
        sha = hashlib.sha256(data).hexdigest()
        if not store.exists(sha):
            out.new_files.append(sha)
        store.put_original(data)
        _add_rows(s, case, user, [(clean_filename(name), data, _Facts("DICOM", header.width, header.height, meta))],
                  out)
    except BaseException:
        discard_new_files(s, store, out.new_files)
        raise
    return out


def _add_rows(s: Session, case: Case, user: User | None, ready: list, out: UploadOutcome) -> None:
    """The rows of stored files, under the case's lock; refused whole if the case was signed meanwhile."""
    lock_case(s, case)
    if case.status not in UPLOADABLE:
        raise CaseError(not_uploadable(case))
    for name, data, facts in ready:
        _add_image_row(s, case, user, name, data, facts, out)
    was = case.status
    if out.added and not advance(s, case, "analysing", from_statuses=UPLOADABLE):
        raise CaseError(not_uploadable(case))
    if out.added and was == "preliminary":
        void_preliminary(s, case, user, "new images added: the preliminary result no longer covers the case")


def _store_file(store: FileStore, case: Case, name: str, data: bytes, max_bytes: int, out: UploadOutcome):
    """Check one uploaded file and store it with its thumbnail; (name, data, loaded) or None (reason in out)."""
    name = clean_filename(name)  # metadata only: the file is stored by content hash
    if len(data) > max_bytes:
        out.errors.append((name, f"larger than the {max_bytes // (1024 * 1024)} MB limit"))
        return None
    try:
        loaded = load_image(data)
    except ImageLoadError as exc:
        out.errors.append((name, str(exc)))
        return None
    meta = loaded.dicom
    if meta is not None and meta.patient_id and meta.patient_id.strip() != case.patient.mrn:
        out.errors.append((name, f"this DICOM belongs to patient ID {meta.patient_id!r}, not to "
                                 f"{case.patient.display_name} (MRN {case.patient.mrn}); nothing was added"))
        return None
    sha = hashlib.sha256(data).hexdigest()
    if not store.exists(sha):
        out.new_files.append(sha)
    store.put_original(data)
    store.put_thumbnail(sha, loaded.rgb)
    return name, data, loaded


def _add_image_row(s: Session, case: Case, user: User | None, name: str, data: bytes, facts: _Facts,
                   out: UploadOutcome) -> None:
    sha = hashlib.sha256(data).hexdigest()
    same = CaseImage.sha256 == sha
    sop = storable(getattr(facts.dicom, "sop_instance_uid", None))[:64]
    if sop:  # the same DICOM instance sent again transcoded (other bytes) is still the same image
        same = or_(same, CaseImage.dicom_sop_uid == sop)
    if s.scalar(select(CaseImage.id).where(CaseImage.case_id == case.id, same).limit(1)):
        out.duplicates.append(name)
        return
    img = CaseImage(case_id=case.id, sha256=sha, original_filename=name, content_type=facts.format,
                    width=facts.width, height=facts.height, size_bytes=len(data),
                    uploaded_by_id=user.id if user is not None else None)
    meta = facts.dicom
    if meta is not None:  # identifiers as the file has them, less NUL (PostgreSQL refuses it in text)
        img.dicom_patient_id = storable(meta.patient_id)[:64] or None
        img.dicom_study_uid = storable(meta.study_uid)[:64] or None
        img.dicom_series_uid = storable(meta.series_uid)[:64] or None
        img.dicom_sop_uid = storable(meta.sop_instance_uid)[:64] or None
        img.modality = storable(meta.modality)[:16] or None
        img.pixel_spacing = list(meta.pixel_spacing) if meta.pixel_spacing else None  # [row, col] mm, or unknown
    s.add(img)
    s.flush()
    s.add(Analysis(image_id=img.id, analyzer_id=case.analyzer_id, job_status="queued"))
    out.added.append(img)


def discard_new_files(s: Session, store: FileStore, shas: list[str]) -> None:
    """Remove the files a refused upload wrote first, so it leaves nothing behind; except a file that
    a concurrent upload of the same bytes (to another case) has committed a reference to meanwhile."""
    if not shas:
        return
    try:
        s.rollback()
        kept = set(s.scalars(select(CaseImage.sha256).where(CaseImage.sha256.in_(shas))))
        kept |= set(s.scalars(select(DicomInboxItem.sha256).where(DicomInboxItem.sha256.in_(shas))))
    except Exception:  # noqa: BLE001 - the database is away: it took no new reference either
        kept = set()
    for sha in shas:
        if sha not in kept:
            store.discard(sha)


def commit_upload(s: Session, store: FileStore, outcome: UploadOutcome | None) -> None:
    """Commit an upload; when the commit fails (database down, constraint), remove the files this
    upload wrote first, so a refused upload leaves nothing behind, then re-raise."""
    try:
        s.commit()
    except BaseException:
        s.rollback()
        discard_new_files(s, store, outcome.new_files if outcome else [])
        raise


# ----------------------------------------------------------------------------- jobs
def claim_next_job(s: Session, worker: str) -> Analysis | None:
    """Atomically take the oldest due job (optimistic update, safe with several workers)."""
    now = utcnow()
    for _ in range(5):
        cand = s.scalar(select(Analysis.id).where(Analysis.job_status.in_(("queued", "retried")),
                                                  Analysis.queued_at <= now)
                        .order_by(Analysis.queued_at, Analysis.id).limit(1))
        if cand is None:
            return None
        res = s.execute(update(Analysis).where(Analysis.id == cand, Analysis.job_status.in_(("queued", "retried")))
                        .values(job_status="running", started_at=now, worker=worker[:100],
                                attempts=Analysis.attempts + 1))
        s.commit()
        if res.rowcount == 1:
            return s.get(Analysis, cand)
    return None


def claim_job(s: Session, analysis_id: int, worker: str) -> Analysis | None:
    """Atomically take one given job if it is due and nobody holds it (the queue may deliver a
    message twice, or after the job was done: then this returns None and nothing happens)."""
    now = utcnow()
    res = s.execute(update(Analysis).where(Analysis.id == analysis_id,
                                           Analysis.job_status.in_(("queued", "retried")), Analysis.queued_at <= now)
                    .values(job_status="running", started_at=now, worker=worker[:100],
                            attempts=Analysis.attempts + 1))
    s.commit()
    return s.get(Analysis, analysis_id) if res.rowcount == 1 else None


def still_holds(s: Session, a: Analysis, worker: str, attempt: int) -> bool:
    """Fencing: is this worker's claim still the current one? (Its lease may have expired and the
    job been handed to another worker.) Locks the case row, then the job row, until commit where the
    database can: every writer of a case takes the case row first (uploads, sign-offs, results),
    so two workers finishing jobs of one case cannot deadlock."""
    case_id = s.scalar(select(CaseImage.case_id).where(CaseImage.id == a.image_id))
    s.execute(select(Case.id).where(Case.id == case_id).with_for_update())
    row = s.execute(select(Analysis.job_status, Analysis.worker, Analysis.attempts)
                    .where(Analysis.id == a.id).with_for_update()).one_or_none()
    return row is not None and tuple(row) == ("running", worker[:100], attempt)


def requeue_stale(s: Session, older_than: dt.timedelta = dt.timedelta(minutes=5)) -> int:
    """Jobs left 'running' by a worker that died (its lease ran out) are queued again."""
    res = s.execute(update(Analysis).where(Analysis.job_status == "running",
                                           Analysis.started_at < utcnow() - older_than)
                    .values(job_status="retried", worker=None, queued_at=utcnow(), enqueued_at=None))
    s.commit()
    return res.rowcount


def due_for_dispatch(s: Session, redeliver_after: dt.timedelta, limit: int = 500) -> list[int]:
    """Due jobs that were never handed to the queue, or handed over so long ago that the message
    must have been lost (e.g. Redis restarted without persistence)."""
    now = utcnow()
    q = (select(Analysis.id).where(Analysis.job_status.in_(("queued", "retried")), Analysis.queued_at <= now,
                                   or_(Analysis.enqueued_at.is_(None), Analysis.enqueued_at < now - redeliver_after))
         .order_by(Analysis.queued_at, Analysis.id).limit(limit))
    return list(s.scalars(q))


def mark_enqueued(s: Session, ids: list[int]) -> None:
    if ids:
        s.execute(update(Analysis).where(Analysis.id.in_(ids)).values(enqueued_at=utcnow()))
        s.commit()


def store_result(s: Session, a: Analysis, result) -> None:
    d = result.to_dict()
    a.model_version = d["model"]["version"] if d.get("model") else None
    a.model_sha256 = d["model"]["sha256"] if d.get("model") else None
    a.result_status = d["status"]
    a.label = d["label"]
    a.confidence = d["confidence"]
    a.malignant = d["malignant"]
    a.malignant_probability = d["malignant_probability"]
    a.probabilities = d["probabilities"]
    a.cell_count = d["cell_count"] if d["status"] not in ("out_of_domain", "error") else None
    a.cells = d["cells"]
    # only a measured scale (red cells, or given): exports cut training crops with it
    a.microns_per_pixel = d.get("microns_per_pixel") if d.get("scale_method") in ("red_cells", "given") else None
    a.messages = d["messages"]
    a.timings_ms = d["timings_ms"]
    a.job_status = "done"
    a.finished_at = utcnow()
    a.last_error = None
    if a.result_status in ("ok", "uncertain") and not s.scalar(
            select(CellLabel.id).where(CellLabel.analysis_id == a.id).limit(1)):
        s.add_all(cell_rows(a, a.image.case_id))
    _refresh_case_status(a.image.case)


def cell_rows(a: Analysis, case_id: int) -> list[CellLabel]:
    """The review rows of an analysis's classified cells (made once, when its result is stored)."""
    return [CellLabel(case_id=case_id, analysis_id=a.id, cell_index=k, ai_class=c["class"],
                      ai_probability=c.get("class_probability"), cell_class=c["class"],
                      counted=bool(c.get("counted", True)), verified=False)
            for k, c in enumerate(a.cells or []) if isinstance(c, dict) and c.get("class") in REPORTED
            and c.get("bbox")]


def fail_job(s: Session, a: Analysis, message: str, max_attempts: int) -> None:
    a.last_error = message[:2000]
    if a.attempts < max_attempts:
        a.job_status = "retried"
        a.queued_at = utcnow() + dt.timedelta(seconds=2 ** a.attempts)  # backoff
        a.enqueued_at = None
    else:
        a.job_status = "failed"
        a.finished_at = utcnow()
        _refresh_case_status(a.image.case)


def retry_failed(s: Session, a: Analysis) -> None:
    """Queue a failed analysis again; refused once the case is signed (it would reopen it)."""
    if a.job_status != "failed":
        return
    case = a.image.case
    was = case.status
    if not advance(s, case, "analysing", from_statuses=UPLOADABLE):
        raise CaseError("This case is signed, cancelled or waiting for its second reading; its analyses cannot be "
                        "re-run. Amend it or open a new case.")
    if was == "preliminary":
        void_preliminary(s, case, None, "an analysis was re-run: the preliminary result no longer covers the case")
    a.job_status, a.attempts, a.queued_at, a.enqueued_at = "retried", 0, utcnow(), None


def void_preliminary(s: Session, case: Case, user: User | None, why: str) -> None:
    """The case changed under its preliminary result: the result stops counting, the report is open again."""
    s.execute(update(Reading).where(Reading.case_id == case.id, Reading.kind == "preliminary")
              .values(current=False).execution_options(synchronize_session=False))
    record_transition(s, case, user, "preliminary", "open", why)


def _refresh_case_status(case: Case) -> None:
    """After a job ends: 'ready' once nothing is pending. The case row is locked first, so an upload
    in flight commits before the pending jobs are counted (afresh, not from this worker's copy), and
    the UPDATE is conditional, so a sign-off that committed meanwhile is never undone."""
    s = object_session(case)
    s.execute(select(Case.id).where(Case.id == case.id).with_for_update())  # (already held by a worker)
    # a locking read: MariaDB's plain reads would use this transaction's older snapshot
    states = s.scalars(select(Analysis.job_status).join(CaseImage, CaseImage.id == Analysis.image_id)
                       .where(CaseImage.case_id == case.id).with_for_update(read=True))
    pending = any(st in PENDING for st in states)
    values = {"status": "analysing" if pending else "ready"}
    if not pending:  # the worklists' columns: when the case became ready to read, and the AI's flag
        s.expire(case, ["images"])
        agg = aggregate(case)
        an = registry.installed(case.analyzer_id)
        values.update(ready_at=utcnow(), ai_flag=bool(an is not None and agg.label in an.positive_calls))
    s.execute(update(Case).where(Case.id == case.id, Case.status.in_(UNSIGNED))
              .values(**values).execution_options(synchronize_session=False))
    s.refresh(case, list(values))


# ----------------------------------------------------------------------------- aggregate call
@dataclass
class Aggregate:
    label: str | None
    status: str
    probabilities: dict[str, float]
    n_used: int
    n_total: int
    text: str
    differential: dict | None = None  # counts over every cell of every image (cell-classifying analyzers)


def frozen_call(agg: Aggregate) -> dict:
    return {"label": agg.label, "status": agg.status, "probabilities": agg.probabilities, "text": agg.text,
            "n_used": agg.n_used, "n_total": agg.n_total}


def signed_call(case: Case) -> Aggregate:
    """The AI call a report of the case states: as its current review was signed, else as computed
    now (unsigned cases, and reviews signed before the call was kept). The cell differential is
    always today's (a signed one is frozen in the review's own ``differential``)."""
    live = aggregate(case)
    r = case.current_review
    if r is None or r.ai_call is None:
        return live
    c = r.ai_call
    return Aggregate(c["label"], c["status"], c["probabilities"], c["n_used"], c["n_total"], c["text"], live.differential)


def classifies_cells(analyzer) -> bool:
    """The analyzer gives each white cell a class (a differential), not only an image label."""
    return getattr(analyzer, "decision", None) is not None


def aggregate(case: Case) -> Aggregate:
    done = [i.analysis for i in case.images if i.analysis is not None and i.analysis.job_status == "done"]
    total = len(case.images)
    usable = [a for a in done if a.result_status in ("ok", "uncertain")]
    if not done:
        return Aggregate(None, "pending", {}, 0, total, "No analysed images yet.")
    if not usable:
        st = "out_of_domain" if any(a.result_status == "out_of_domain" for a in done) else "error"
        return Aggregate(None, st, {}, 0, total, "No image could be analysed as a valid image for this analyzer.")
    an = registry.installed(case.analyzer_id)
    if classifies_cells(an):
        return _differential_call(an, usable, len(done), total)
    return _image_call(an, usable, len(done), total)


def _suspicion(an, a: Analysis) -> float:
    """P(positive call) of one image: as stored, or summed from its probabilities for rows kept
    without it."""
    if a.malignant_probability is not None:
        return float(a.malignant_probability)
    positive = an.positive_calls if an is not None else set()
    return float(sum(p for k, p in (a.probabilities or {}).items() if k in positive))


def _called_positive(an, a: Analysis) -> bool:
    return a.malignant if a.malignant is not None else _suspicion(an, a) >= getattr(an, "malignant_threshold", 0.5)


def _case_label(an, lead: Analysis) -> str | None:
    """The lead image's label, unless its top class contradicts its own positive call (a low
    threshold calls a slice positive with 'no tumour' on top): then the positive call without a type,
    or the likeliest positive class, so that the case never reads 'no tumour' over a tumour call."""
    if an is None or not _called_positive(an, lead) or lead.label in an.positive_calls:
        return lead.label
    if an.untyped_label:
        return an.untyped_label
    probs = lead.probabilities or {}
    return max(an.malignant_labels, key=lambda k: probs.get(k, 0.0))


def _image_call(an, usable: list, n_done: int, total: int) -> Aggregate:
    """A screening case is as positive as its most suspicious image: one tumour slice among twenty
    clear ones is a tumour case, which a mean over the slices would call clear. The case takes that
    image's probabilities and call; it is unsure when any image is, when the images disagree or
    when some could not be used."""
    lead = max(usable, key=lambda a: _suspicion(an, a))
    positive = sum(1 for a in usable if _called_positive(an, a))
    disagree = len({a.label for a in usable}) > 1
    status = "uncertain" if (any(a.result_status == "uncertain" for a in usable) or disagree
                             or len(usable) < n_done) else "ok"
    term = getattr(an, "positive_term", "malignancy")
    noun = f"image{'s' if total > 1 else ''}"
    text = (f"{positive} of {len(usable)} usable {noun} ({total} in all) positive for {term}; "
            f"the case follows the most suspicious image")
    if disagree:  # say on what: "positive" may hold for all while the suggested types differ
        names = label_names(an) if an is not None else {}
        counts = Counter(a.label for a in usable).most_common()
        text += " (the images disagree: " + ", ".join(f"{n} {names.get(k, k)}" for k, n in counts) + ")"
    return Aggregate(_case_label(an, lead), status, dict(lead.probabilities or {}), len(usable), total, text + ".")


def _differential_call(an, usable: list, n_done: int, total: int) -> Aggregate:
    """A case of cell-classifying images is called on all its cells together: blasts are present when
    the case holds more blast calls than its normal cells would make by chance, however they are
    spread over its fields."""
    classes = [c["class"] for a in usable for c in (a.cells or [])
               if isinstance(c, dict) and "class" in c and c.get("counted", True)]
    summary = summarise(classes, an.cells_cfg.count_target)
    n, call = summary["white_cells"], blast_call(summary, an.decision)
    text = (f"{n} white cells in {len(usable)} of {total} image{'s' if total > 1 else ''}; {call.blasts} "
            f"pre-classified as blast ({call.needed} make a blasts-present call)")
    if summary["remaining_to_target"]:
        text += f"; {summary['remaining_to_target']} more needed for a {an.cells_cfg.count_target}-cell differential"
    # the per-image probabilities do not add up to a case call; the count does. No white cell at all is
    # no answer, and a blast count short of the call is for a person to look at.
    label = None if n == 0 else "blasts_present" if call.present else "no_blasts"
    status = "uncertain" if (any(a.result_status == "uncertain" for a in usable) or len(usable) < n_done
                             or n == 0 or call.short) else "ok"
    return Aggregate(label, status, {}, len(usable), total, text + ".", summary)


# ----------------------------------------------------------------------------- sign-off
def dicom_study_uid(case: Case) -> str | None:
    """The study UID of the case's DICOM images, when they came from one study (and it is a valid
    UID: rows stored before UIDs were checked may hold another text, and exports then make their own)."""
    uids = {i.dicom_study_uid for i in case.images if i.dicom_study_uid}
    return uids.pop() if len(uids) == 1 and is_dicom_uid(next(iter(uids))) else None


def label_names(analyzer) -> dict[str, str]:
    """Code -> what people read, for every diagnosis a case can carry (the analyzer may be gone)."""
    return {**(dict(analyzer.display_names) if analyzer is not None else {}), NONDIAGNOSTIC: NONDIAGNOSTIC_NAME}


def diagnosis_options(analyzer) -> list[tuple[str, str]]:
    names = label_names(analyzer)
    return [(l, names.get(l, l)) for l in analyzer.call_labels] + [(NONDIAGNOSTIC, NONDIAGNOSTIC_NAME)]


def diagnosis_labels(analyzer) -> list[str]:
    """The diagnoses a reading may name (the keys of :func:`diagnosis_options`)."""
    return [k for k, _ in diagnosis_options(analyzer)]


def _review_hash(case: Case, r: Review) -> str:
    payload = {
        "case": case.id, "patient": case.patient_id, "version": r.version, "final": r.final_diagnosis,
        "agrees": r.agrees_with_ai, "ai": r.ai_label, "ai_status": r.ai_status, "override": r.override_reason,
        "note": r.uncertainty_note, "comment": r.comment, "amendment": r.amendment_reason,
        "signer": r.signed_by_id, "signed_at": r.signed_at.isoformat(),
        **({"differential": r.differential} if r.differential is not None else {}),
        **({"ai_call": r.ai_call} if r.ai_call is not None else {}),
        **({"second": [r.second_reader_id, r.second_diagnosis, r.second_agrees,
                       r.second_read_at.isoformat() if r.second_read_at else None]}
           if r.second_reader_id is not None else {}),
        "analyses": [[i.sha256, i.analysis.label if i.analysis else None,
                      i.analysis.model_sha256 if i.analysis else None] for i in case.images],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


SIGNABLE = ("ready", "preliminary", "second_read", "signed")

CASE_CHANGED = ("The case changed while you were reviewing it (an image was added, or someone else signed it). "
                "Nothing was signed: review it again.")


def agrees_with_ai(case: Case, ai_label: str | None, final_diagnosis: str) -> bool:
    """The reader's diagnosis is the AI's call, or adds a type to a positive call given without one
    (the AI claimed no type: naming one is no override)."""
    if ai_label is None:
        return False
    if final_diagnosis == ai_label:
        return True
    an = registry.installed(case.analyzer_id)
    return an is not None and ai_label == an.untyped_label and final_diagnosis in an.malignant_labels


def sign(s: Session, case: Case, user: User, final_diagnosis: str, valid_labels: list[str], comment: str = "",
         override_reason: str = "", uncertainty_note: str = "", amendment_reason: str = "",
         revision: int | None = None, differential: dict | None = None, confirm_unverified: bool = False,
         second: dict | None = None, moved_by: User | None = None, transition_note: str | None = None) -> Review:
    """Sign (or amend) the diagnosis of exactly the images the signer reviewed: ``revision`` is the
    case revision the signer saw (None: the one read now). The review's hash covers that image set.
    ``differential`` (cell-classifying analyzers, from store.cells) is frozen with the review; cells
    left unverified need ``confirm_unverified``. ``second``: the second reading that confirmed it
    (store/workflow decides when one is needed). The report history names ``moved_by`` (default: the
    signer; the second reader who made the report final) and ``transition_note`` (default: the
    amendment's reason)."""
    lock_case(s, case)
    if revision is not None and revision != case.revision:
        raise CaseError(CASE_CHANGED)
    if (waiting := not_ready_to_sign(case)) is not None:
        raise CaseError(waiting)
    texts = sign_texts(override_reason=override_reason, uncertainty_note=uncertainty_note, comment=comment,
                        amendment_reason=amendment_reason)
    agg = aggregate(case)
    agrees = agrees_with_ai(case, agg.label, final_diagnosis)
    previous = case.current_review
    problems = sign_problems(case, final_diagnosis, valid_labels, agg=agg, differential=differential,
                             confirm_unverified=confirm_unverified, **texts)
    if problems:  # all of them at once: the signer fixes the form in one pass
        raise CaseError(problems[0][1], problems[0][0], problems)
    before = "second_read" if case.status == "second_read" else report_state(case)
    if not advance(s, case, "signed", from_statuses=SIGNABLE, revision=case.revision,
                   final_diagnosis=final_diagnosis):
        raise CaseError(CASE_CHANGED)
    r = Review(case_id=case.id, version=(previous.version + 1) if previous else 1, ai_label=agg.label,
               ai_status=agg.status, final_diagnosis=final_diagnosis, agrees_with_ai=agrees, signed_by_id=user.id,
               signed_at=utcnow(), content_sha256="", differential=differential, ai_call=frozen_call(agg),
               **(second or {}), **texts)
    s.add(r)
    case.reviews.append(r)
    r.content_sha256 = _review_hash(case, r)
    record_transition(s, case, moved_by or user, before, report_state(case),
                      texts["amendment_reason"] if transition_note is None else transition_note)
    s.flush()
    return r


def sign_problems(case: Case, final_diagnosis: str, valid_labels: list[str], override_reason: str = "",
                  uncertainty_note: str = "", amendment_reason: str = "", agg: Aggregate | None = None,
                  differential: dict | None = None, confirm_unverified: bool = False,
                  **_other) -> list[tuple[str, str]]:
    """What a sign-off of ``case`` with these answers still lacks, as (field, message) pairs."""
    agg = agg or aggregate(case)
    d = differential or {}
    pending = [f"{n} cell{'s' if n != 1 else ''} {what}" for n, what in (
        (d.get("unverified", 0), "not verified"), (d.get("unidentified_left", 0), "still unidentified")) if n]
    agrees = agrees_with_ai(case, agg.label, final_diagnosis)
    return [(f, msg) for f, msg, bad in (
        ("final_diagnosis", "Choose a diagnosis from the list.", final_diagnosis not in valid_labels),
        ("override_reason", "Give the reason for overriding the AI result." if agg.label is not None else
         "The AI gave no diagnosis: give the reason for yours.", not agrees and not (override_reason or "").strip()),
        # (a report would read "agrees with the AI result; reason for overriding it: ...")
        ("override_reason", "Your diagnosis agrees with the AI result, so there is nothing to override: clear "
         "this box, or put the text under Comment.", agrees and bool((override_reason or "").strip())),
        ("uncertainty_note", "The AI result is not confident (uncertain, out of domain or failed): add an explicit "
         "note to sign anyway.", agg.status != "ok" and not (uncertainty_note or "").strip()),
        ("amendment_reason", "This case is already signed: give the reason for the amendment.",
         case.current_review is not None and not (amendment_reason or "").strip()),
        ("confirm_unverified", f"{' and '.join(pending)}: review them in the cell gallery, or confirm that you "
         "sign with them as they are.", bool(pending) and not confirm_unverified)) if bad]


def not_ready_to_sign(case: Case) -> str | None:
    """Why no reading of the case can be signed yet (no image, analyses still running), or None."""
    if not case.images:
        return "Upload at least one image before signing."
    if any(i.analysis and i.analysis.job_status in PENDING for i in case.images):
        return "Wait until every image is analysed before signing."
    return None


def sign_texts(**texts: str) -> dict[str, str]:
    """A sign-off's free texts, checked (storable) and trimmed to their limits."""
    limits = {"override_reason": 5000, "uncertainty_note": 5000, "comment": 10000, "amendment_reason": 5000}
    for k, v in texts.items():
        if unstorable(v):
            raise CaseError(f"The text {UNSTORABLE_MESSAGE}", k)
    return {k: (v or "").strip()[:limits[k]] for k, v in texts.items()}


# ----------------------------------------------------------------------------- lists and dashboards
def history(s: Session, user: User, *, status: str = "", diagnosis: str = "", doctor_id: int | None = None,
            date_from: dt.date | None = None, date_to: dt.date | None = None, text: str = "", page: int = 1,
            per_page: int = 25):
    q = visible_cases(user)
    if status:
        q = q.where(Case.status == status)
    if diagnosis:
        q = q.where(Case.final_diagnosis == diagnosis)
    if doctor_id:
        q = q.where(Case.created_by_id == doctor_id)
    if date_from:
        q = q.where(Case.created_at >= dt.datetime.combine(date_from, dt.time()))
    if date_to and date_to < dt.date.max:  # (up to 9999-12-31 is no bound: the day after does not exist)
        q = q.where(Case.created_at < dt.datetime.combine(date_to + dt.timedelta(days=1), dt.time()))
    if text:
        matching = select(Patient.id).where(patient_matches(text))
        q = q.where(Case.patient_id.in_(matching))
    total = s.scalar(q.with_only_columns(func.count(Case.id)).order_by(None))
    pages = max(1, -(-total // per_page))
    page = min(max(1, page), pages)
    items = list(s.scalars(q.options(joinedload(Case.patient)).order_by(Case.created_at.desc(), Case.id.desc())
                           .offset((page - 1) * per_page).limit(per_page)))
    return Page(items, page, pages, total)


def counts_by_status(s: Session, user: User) -> dict[str, int]:
    q = visible_cases(user).with_only_columns(Case.status, func.count(Case.id)).group_by(Case.status)
    return {k: v for k, v in s.execute(q)}


def volume_per_day(s: Session, days: int = 14) -> list[tuple[str, int]]:
    since = utcnow() - dt.timedelta(days=days - 1)
    rows = s.scalars(select(Case.created_at).where(Case.created_at >= since.replace(hour=0, minute=0, second=0)))
    counts: dict[str, int] = {}
    for t in rows:
        counts[t.date().isoformat()] = counts.get(t.date().isoformat(), 0) + 1
    out = []
    for i in range(days):
        d = (since + dt.timedelta(days=i)).date().isoformat()
        out.append((d, counts.get(d, 0)))
    return out


def failed_jobs(s: Session, limit: int = 50) -> list[Analysis]:
    return list(s.scalars(select(Analysis).where(Analysis.job_status == "failed")
                          .order_by(Analysis.finished_at.desc()).limit(limit)))
