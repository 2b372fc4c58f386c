"""Cases, uploaded images, analysis jobs and sign-off. Views call these; nothing here knows Flask."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, joinedload

from ..ml.imageio import ImageLoadError, load_image
from .files import FileStore
from .models import Analysis, Case, CaseImage, Patient, PatientAccess, Review, User, utcnow
from .patients import like_text
from .text import UNSTORABLE_MESSAGE, clean_filename, storable, unstorable

NONDIAGNOSTIC = "Nondiagnostic"


class CaseError(ValueError):
    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


# ----------------------------------------------------------------------------- access
def visible_cases(user: User):
    """Cases of patients the user may see (the one object-level rule, reused)."""
    if user.is_admin:
        return select(Case)
    # uncorrelated IN (see visible_patients): counts per status went from 13.6 to 0.3 ms on 25k cases
    return select(Case).where(Case.patient_id.in_(select(PatientAccess.patient_id)
                                                  .where(PatientAccess.user_id == user.id)))


def get_visible(s: Session, user: User, case_id: int) -> Case | None:
    return s.scalar(visible_cases(user).where(Case.id == case_id))


# ----------------------------------------------------------------------------- creation and uploads
def create_case(s: Session, user: User, patient: Patient, analyzer_id: str, note: str = "") -> Case:
    from ..analyzers import registry

    if analyzer_id not in registry.available():
        raise CaseError("Choose an analyzer from the list.", "analyzer_id")
    if unstorable(note):
        raise CaseError(f"The clinical note {UNSTORABLE_MESSAGE}", "clinical_note")
    c = Case(patient_id=patient.id, analyzer_id=analyzer_id, clinical_note=(note or "")[:5000], created_by_id=user.id)
    s.add(c)
    s.flush()
    return c


@dataclass
class UploadOutcome:
    added: list[CaseImage] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (file name, message)
    new_files: list[str] = field(default_factory=list)  # content hashes first written by this upload


def add_images(s: Session, store: FileStore, case: Case, user: User, uploads: list[tuple[str, bytes]],
               max_bytes: int) -> UploadOutcome:
    """Validate by content, store by hash, create one queued analysis per new image."""
    if case.status == "signed":
        raise CaseError("This case is signed; amend it to change the diagnosis. Images cannot be added.")
    out = UploadOutcome()
    try:
        for name, data in uploads:
            name = clean_filename(name)  # metadata only: the file is stored by content hash
            if len(data) > max_bytes:
                out.errors.append((name, f"larger than the {max_bytes // (1024 * 1024)} MB limit"))
                continue
            try:
                loaded = load_image(data)
            except ImageLoadError as exc:
                out.errors.append((name, str(exc)))
                continue
            meta = getattr(loaded, "dicom", None)
            if meta is not None and meta.patient_id and meta.patient_id.strip() != case.patient.mrn:
                out.errors.append((name, f"this DICOM belongs to patient ID {meta.patient_id!r}, not to "
                                         f"{case.patient.display_name} (MRN {case.patient.mrn}); nothing was added"))
                continue
            sha = hashlib.sha256(data).hexdigest()
            if s.scalar(select(CaseImage.id).where(CaseImage.case_id == case.id, CaseImage.sha256 == sha)):
                out.duplicates.append(name)
                continue
            if not store.exists(sha):
                out.new_files.append(sha)
            store.put_original(data)
            store.put_thumbnail(sha, loaded.rgb)
            img = CaseImage(case_id=case.id, sha256=sha, original_filename=name, content_type=loaded.format or "",
                            width=loaded.rgb.shape[1], height=loaded.rgb.shape[0], size_bytes=len(data),
                            uploaded_by_id=user.id)
            if meta is not None:  # identifiers as the file has them, less NUL (PostgreSQL refuses it in text)
                img.dicom_patient_id = storable(meta.patient_id)[:64] or None
                img.dicom_study_uid = storable(meta.study_uid)[:64] or None
                img.dicom_series_uid = storable(meta.series_uid)[:64] or None
                img.dicom_sop_uid = storable(meta.sop_instance_uid)[:64] or None
                img.modality = storable(meta.modality)[:16] or None
            s.add(img)
            s.flush()
            s.add(Analysis(image_id=img.id, analyzer_id=case.analyzer_id, job_status="queued"))
            out.added.append(img)
    except BaseException:
        for sha in out.new_files:  # nothing half-stored: the files of a failed upload go too
            store.discard(sha)
        raise
    if out.added:
        case.status = "analysing"
    return out


def commit_upload(s: Session, store: FileStore, outcome: UploadOutcome | None) -> None:
    """Commit an upload; when the commit fails (database down, constraint), remove the files this
    upload wrote first, so a refused upload leaves nothing behind, then re-raise."""
    try:
        s.commit()
    except BaseException:
        s.rollback()
        for sha in (outcome.new_files if outcome else []):
            store.discard(sha)
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
    job been handed to another worker.) Locks the row until commit where the database can."""
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
    a.messages = d["messages"]
    a.timings_ms = d["timings_ms"]
    a.job_status = "done"
    a.finished_at = utcnow()
    a.last_error = None
    _refresh_case_status(a.image.case)


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
    if a.job_status == "failed":
        a.job_status, a.attempts, a.queued_at, a.enqueued_at = "retried", 0, utcnow(), None
        a.image.case.status = "analysing"


def _refresh_case_status(case: Case) -> None:
    if case.status == "signed":
        return
    states = [i.analysis.job_status for i in case.images if i.analysis is not None]
    case.status = "analysing" if any(st in ("queued", "running", "retried") for st in states) else "ready"


# ----------------------------------------------------------------------------- aggregate call
@dataclass
class Aggregate:
    label: str | None
    status: str
    probabilities: dict[str, float]
    n_used: int
    n_total: int
    text: str


def aggregate(case: Case) -> Aggregate:
    done = [i.analysis for i in case.images if i.analysis is not None and i.analysis.job_status == "done"]
    total = len(case.images)
    usable = [a for a in done if a.result_status in ("ok", "uncertain")]
    if not done:
        return Aggregate(None, "pending", {}, 0, total, "No analysed images yet.")
    if not usable:
        st = "out_of_domain" if any(a.result_status == "out_of_domain" for a in done) else "error"
        return Aggregate(None, st, {}, 0, total, "No image could be analysed as a valid image for this analyzer.")
    labels = list(usable[0].probabilities)
    mean = {k: float(np.mean([a.probabilities[k] for a in usable])) for k in labels}
    label = max(mean, key=mean.get)
    uncertain = any(a.result_status == "uncertain" for a in usable) or len({a.label for a in usable}) > 1 \
        or len(usable) < len(done)
    status = "uncertain" if uncertain else "ok"
    text = f"mean probability over {len(usable)} of {total} image{'s' if total > 1 else ''}"
    if len({a.label for a in usable}) > 1:
        text += " (images disagree)"
    return Aggregate(label, status, mean, len(usable), total, text + ".")


# ----------------------------------------------------------------------------- sign-off
def dicom_study_uid(case: Case) -> str | None:
    """The study UID of the case's DICOM images, when they came from one study."""
    uids = {i.dicom_study_uid for i in case.images if i.dicom_study_uid}
    return uids.pop() if len(uids) == 1 else None


def diagnosis_options(analyzer) -> list[tuple[str, str]]:
    return [(l, analyzer.display_names.get(l, l)) for l in analyzer.labels] + [(NONDIAGNOSTIC, "Non-diagnostic sample")]


def _review_hash(case: Case, r: Review) -> str:
    payload = {
        "case": case.id, "patient": case.patient_id, "version": r.version, "final": r.final_diagnosis,
        "agrees": r.agrees_with_ai, "ai": r.ai_label, "ai_status": r.ai_status, "override": r.override_reason,
        "note": r.uncertainty_note, "comment": r.comment, "amendment": r.amendment_reason,
        "signer": r.signed_by_id, "signed_at": r.signed_at.isoformat(),
        "analyses": [[i.sha256, i.analysis.label if i.analysis else None,
                      i.analysis.model_sha256 if i.analysis else None] for i in case.images],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def sign(s: Session, case: Case, user: User, final_diagnosis: str, valid_labels: list[str], comment: str = "",
         override_reason: str = "", uncertainty_note: str = "", amendment_reason: str = "") -> Review:
    if not case.images:
        raise CaseError("Upload at least one image before signing.")
    if any(i.analysis and i.analysis.job_status in ("queued", "running", "retried") for i in case.images):
        raise CaseError("Wait until every image is analysed before signing.")
    if final_diagnosis not in valid_labels:
        raise CaseError("Choose a diagnosis from the list.", "final_diagnosis")
    for k, v in (("override_reason", override_reason), ("uncertainty_note", uncertainty_note), ("comment", comment),
                 ("amendment_reason", amendment_reason)):
        if unstorable(v):
            raise CaseError(f"The text {UNSTORABLE_MESSAGE}", k)
    agg = aggregate(case)
    agrees = agg.label is not None and final_diagnosis == agg.label
    override_reason, uncertainty_note = (override_reason or "").strip(), (uncertainty_note or "").strip()
    comment, amendment_reason = (comment or "").strip(), (amendment_reason or "").strip()
    if not agrees and agg.label is not None and not override_reason:
        raise CaseError("Give the reason for overriding the AI result.", "override_reason")
    if agg.status != "ok" and not uncertainty_note:
        raise CaseError("The AI result is not confident (uncertain, out of domain or failed): "
                        "add an explicit note to sign anyway.", "uncertainty_note")
    previous = case.current_review
    if previous is not None and not amendment_reason:
        raise CaseError("This case is already signed: give the reason for the amendment.", "amendment_reason")
    r = Review(case_id=case.id, version=(previous.version + 1) if previous else 1, ai_label=agg.label,
               ai_status=agg.status, final_diagnosis=final_diagnosis, agrees_with_ai=agrees,
               override_reason=override_reason[:5000], uncertainty_note=uncertainty_note[:5000],
               comment=comment[:10000], amendment_reason=amendment_reason[:5000], signed_by_id=user.id,
               signed_at=utcnow(), content_sha256="")
    s.add(r)
    case.reviews.append(r)
    r.content_sha256 = _review_hash(case, r)
    case.status = "signed"
    case.final_diagnosis = final_diagnosis
    s.flush()
    return r


# ----------------------------------------------------------------------------- lists and dashboards
def history(s: Session, user: User, *, status: str = "", diagnosis: str = "", doctor_id: int | None = None,
            date_from: dt.date | None = None, date_to: dt.date | None = None, text: str = "", page: int = 1,
            per_page: int = 25):
    from .patients import Page

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
        t = like_text(text)
        matching = select(Patient.id).where(or_(Patient.mrn == t, Patient.family_name.like(f"%{t}%")))
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
