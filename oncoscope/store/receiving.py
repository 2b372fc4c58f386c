"""Filing DICOM images that arrive without a person (C-STORE from a modality or PACS, WADO-RS
retrieval): the patient by Patient ID (created when new, refused when the stored patient's name or
birth date disagree), one case per study (or the LIS order the study's accession number names), the
analyzer from the routing table, one queued analysis per image. An image no rule routes, or whose
study's case is closed, is stored in the DICOM inbox instead, for a person to file or dismiss.

The same checks as an upload (``cases.add_images``: content, size, limits), the same records; no
protocol here (services/pacs maps the outcomes to DICOM statuses)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ..analyzers import routing
from ..imaging.dicom import read_header
from ..imaging.imageio import ImageLoadError, load_image
from . import cases as case_store
from . import patients as patient_store
from .db import once_more_on_race
from .files import FileStore
from .models import Case, DicomInboxItem, Patient, User, utcnow
from .text import clean_filename, storable

# refusals, by kind (services/pacs gives each its DICOM status)
UNREADABLE = "unreadable"
NO_PATIENT_ID = "no_patient_id"
PATIENT_CONFLICT = "patient_conflict"
STUDY_CONFLICT = "study_conflict"
NO_STUDY = "no_study"


@dataclass
class Filed:
    """What became of one instance: ``kind`` is filed, duplicate, inbox or one of the refusals."""

    kind: str
    message: str = ""
    patient_id: int | None = None
    case_id: int | None = None
    image_id: int | None = None
    inbox_id: int | None = None
    sha256: str = ""  # the stored file (filed)

    @property
    def refused(self) -> bool:
        return self.kind not in ("filed", "duplicate", "inbox")


class Refused(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


def receive(sessions: sessionmaker, store: FileStore, data: bytes, source: str, rules: list[routing.Rule],
            max_bytes: int, user: User | None = None, expected_mrn: str | None = None,
            note: str | None = None, readers: tuple[str, ...] = ()) -> Filed:
    """File one DICOM instance (Part 10 bytes) and commit. ``user``: the person who fetched it (None:
    sent to us); ``expected_mrn``: refuse an instance of another patient (a retrieval for a patient);
    ``readers``: who is given a patient this creates (``Settings.integration_readers``).
    A race with another association filing the same new patient or study (a unique key) is retried
    once, then finds the other's rows."""
    if len(data) > max_bytes:
        return Filed(UNREADABLE, f"Larger than the {max_bytes // (1024 * 1024)} MB limit.")
    try:  # an uncompressed single frame is checked from its header (fast); anything else is decoded
        header = read_header(data)
        meta = header.image if header is not None else load_image(data).dicom
    except ImageLoadError as exc:
        return Filed(UNREADABLE, str(exc))
    if meta is None:
        return Filed(UNREADABLE, "Not a DICOM image.")
    if expected_mrn is not None and (meta.patient_id or "").strip() != expected_mrn:
        return Filed(PATIENT_CONFLICT, f"An instance of another patient (not MRN {expected_mrn}) was not filed.")

    def work(s: Session) -> Filed:
        try:
            return _file(s, store, data, meta, header, source, rules, max_bytes, s.merge(user) if user else None,
                         note or f"Received over DICOM from {source}.", readers)
        except Refused as exc:
            s.rollback()
            return Filed(exc.kind, exc.message)

    # a concurrent association made the same patient or study, or the case was signed between our check
    # and its lock: once more, which then finds their rows (or files to the inbox)
    return once_more_on_race(sessions, work, (IntegrityError, case_store.CaseError))


def _file(s: Session, store: FileStore, data: bytes, meta, header, source: str, rules, max_bytes: int,
          user: User | None, note: str, readers: tuple[str, ...]) -> Filed:
    patient = patient_for(s, meta, source, readers)
    if not meta.study_uid:
        raise Refused(NO_STUDY, "The instance has no valid Study Instance UID.")
    case = s.scalar(select(Case).where(Case.dicom_study_uid == meta.study_uid))
    if case is not None and case.patient_id != patient.id:
        raise Refused(STUDY_CONFLICT, f"Study {meta.study_uid} is filed under another patient, not MRN "
                                      f"{patient.mrn} (see the audit trail).")
    if case is None:
        case = _ordered_case(s, patient, meta)
    if case is None:
        analyzer_id = routing.route(rules, meta.modality, meta.body_part, meta.sop_class_uid or "")
        if analyzer_id is None:
            return _to_inbox(s, store, data, meta, source, patient, "No routing rule matches modality "
                             f"{meta.modality or '(none)'}, body part {meta.body_part or '(none)'}.")
        case = case_store.create_case(s, user, patient, analyzer_id, note)
        case.dicom_study_uid = meta.study_uid
        case.accession_number = storable(meta.accession_number)[:64] or None
        s.flush()  # (a concurrent association that made this study's case first: IntegrityError, retried)
    if case.status not in case_store.UPLOADABLE:
        return _to_inbox(s, store, data, meta, source, patient,
                         f"Case #{case.id} of this study takes no more images ({case.status}).", case)
    name = file_name(meta.modality, meta.sop_instance_uid or hashlib.sha256(data).hexdigest())
    if header is not None:
        out = case_store.add_received(s, store, case, user, name, data, header)
    else:
        out = case_store.add_images(s, store, case, user, [(name, data)], max_bytes)
    if out.errors:  # (nothing filed: the case this made, if any, is rolled back with it)
        case_store.discard_new_files(s, store, out.new_files)
        raise Refused(UNREADABLE, out.errors[0][1])
    case_store.commit_upload(s, store, out)
    if out.duplicates:
        return Filed("duplicate", "Already stored.", patient.id, case.id)
    return Filed("filed", "", patient.id, case.id, out.added[0].id, sha256=out.added[0].sha256)


def file_name(modality: str, sop_uid: str) -> str:
    """The name a received image is shown under: its modality and the end of its SOP Instance UID (the
    whole UID is kept on the image row)."""
    return f"{modality or 'DICOM'} …{sop_uid[-10:]}.dcm"


def patient_for(s: Session, meta, source: str, readers: tuple[str, ...] = ()) -> Patient:
    """The patient the DICOM Patient ID names (store/patients.match_or_create): found, or created from the
    file's patient module; refused when it cannot be an MRN, or contradicts the stored patient."""
    family, _, given = (meta.patient_name or "").partition(", ")
    try:
        return patient_store.match_or_create(s, meta.patient_id, family, given, meta.birth_date, meta.sex_word,
                                             f"Created by the DICOM receiver from {source}.", readers)
    except patient_store.PatientConflict as exc:
        raise Refused(PATIENT_CONFLICT, str(exc)) from None
    except patient_store.PatientError as exc:
        raise Refused(NO_PATIENT_ID, str(exc)) from None


def _ordered_case(s: Session, patient: Patient, meta) -> Case | None:
    """The patient's open case for the LIS order this study's accession number names, if any: it
    takes the study."""
    if not meta.accession_number:
        return None
    case = s.scalar(select(Case).where(Case.patient_id == patient.id, Case.accession_number == meta.accession_number,
                                       Case.dicom_study_uid.is_(None), Case.status.in_(case_store.UPLOADABLE))
                    .order_by(Case.id).limit(1))
    if case is None:
        return None
    taken = s.execute(update(Case).where(Case.id == case.id, Case.dicom_study_uid.is_(None))
                      .values(dicom_study_uid=meta.study_uid).execution_options(synchronize_session=False))
    if taken.rowcount != 1:  # another study with this accession took the order first: this one gets its own case
        s.expire(case)
        return None
    s.refresh(case)
    return case


def _to_inbox(s: Session, store: FileStore, data: bytes, meta, source: str, patient: Patient, reason: str,
              case: Case | None = None) -> Filed:
    sha = hashlib.sha256(data).hexdigest()
    sop = meta.sop_instance_uid or sha[:64]
    held = s.scalar(select(DicomInboxItem.id).where(DicomInboxItem.sop_uid == sop, DicomInboxItem.sha256 == sha,
                                                    DicomInboxItem.resolved_at.is_(None)))
    if held:
        s.commit()
        return Filed("duplicate", "Already in the DICOM inbox.", patient.id, inbox_id=held)
    new_file = not store.exists(sha)
    store.put_original(data)
    try:
        item = DicomInboxItem(source=source[:64], patient_id=patient.id, study_uid=meta.study_uid,
                              series_uid=meta.series_uid or "", sop_uid=sop, sop_class_uid=meta.sop_class_uid or "",
                              modality=storable(meta.modality)[:16], body_part=storable(meta.body_part)[:64],
                              description=storable(meta.description)[:255], sha256=sha, reason=reason,
                              case_id=case.id if case is not None else None)
        s.add(item)
        s.commit()
    except BaseException:
        s.rollback()
        if new_file:
            case_store.discard_new_files(s, store, [sha])
        raise
    return Filed("inbox", reason, patient.id, inbox_id=item.id)


# ----------------------------------------------------------------------------- the inbox
@dataclass
class InboxStudy:
    study_uid: str
    patient: Patient | None
    count: int
    modality: str
    body_part: str
    description: str
    source: str
    received_at: object
    reason: str


def _visible(user: User):
    q = select(DicomInboxItem).where(DicomInboxItem.resolved_at.is_(None))
    if user.is_admin:
        return q
    return q.where(DicomInboxItem.patient_id.in_(patient_store.visible_patients(user).with_only_columns(Patient.id)))


def inbox(s: Session, user: User, limit: int = 200) -> list[InboxStudy]:
    """The open inbox as studies (newest first), those of patients the user may see."""
    items = list(s.scalars(_visible(user).order_by(DicomInboxItem.received_at.desc(), DicomInboxItem.id.desc())
                           .limit(5000)))
    studies: dict[str, InboxStudy] = {}
    for i in items:
        st = studies.get(i.study_uid)
        if st is None:
            studies[i.study_uid] = InboxStudy(i.study_uid, i.patient, 1, i.modality, i.body_part, i.description,
                                              i.source, i.received_at, i.reason)
        else:
            st.count += 1
    return list(studies.values())[:limit]


def inbox_count(s: Session, user: User) -> int:
    sub = _visible(user).with_only_columns(DicomInboxItem.study_uid).distinct().subquery()
    return s.scalar(select(func.count()).select_from(sub))


def _study_items(s: Session, user: User, study_uid: str) -> list[DicomInboxItem]:
    items = list(s.scalars(_visible(user).where(DicomInboxItem.study_uid == study_uid).order_by(DicomInboxItem.id)))
    if not items:
        raise case_store.CaseGone("Nothing of this study is waiting in the DICOM inbox (filed or dismissed meanwhile).")
    return items


def file_study(s: Session, store: FileStore, user: User, study_uid: str, analyzer_id: str, max_bytes: int) -> Case:
    """A person files an inbox study under an analyzer: the study's case (when it still takes images)
    or a new one; its images are analysed. Refused (CaseError) when the analyzer does not read the
    study's modality. The caller commits with ``cases.commit_upload``."""
    items = _study_items(s, user, study_uid)
    if not routing.can_read(analyzer_id, items[0].modality, items[0].body_part):
        part = f" {items[0].body_part.lower()}" if items[0].body_part else ""
        raise case_store.CaseError(f"{routing.analyzer_config(analyzer_id).name} does not read "
                                   f"{items[0].modality or 'these'}{part} images.")
    patient = s.get(Patient, items[0].patient_id) if items[0].patient_id else None
    if patient is None:
        raise case_store.CaseError("These images name no usable patient; they can only be dismissed.")
    case = s.scalar(select(Case).where(Case.dicom_study_uid == study_uid, Case.patient_id == patient.id))
    if case is None or case.status not in case_store.UPLOADABLE or case.analyzer_id != analyzer_id:
        case = case_store.create_case(s, user, patient, analyzer_id, f"Filed from the DICOM inbox by {user.name}.")
        if s.scalar(select(Case.id).where(Case.dicom_study_uid == study_uid)) is None:
            case.dicom_study_uid = study_uid
            s.flush()
    uploads = [(f"{n:04d} {file_name(i.modality, i.sop_uid)}", store.path(i.sha256).read_bytes())
               for n, i in enumerate(items)]
    out = case_store.add_images(s, store, case, user, uploads, max_bytes)
    if out.errors and not out.added and not out.duplicates:
        raise case_store.CaseError(f"None of the images could be filed: {out.errors[0][1]}")
    refused = {name for name, _ in out.errors}
    _resolve([i for (name, _), i in zip(uploads, items) if clean_filename(name) not in refused], user, case)
    s.flush()
    return case


def dismiss(s: Session, user: User, study_uid: str) -> int:
    """Take a study out of the inbox without analysing it (the files stay with the audit's record)."""
    items = _study_items(s, user, study_uid)
    _resolve(items, user, None)
    s.flush()
    return len(items)


def _resolve(items: list[DicomInboxItem], user: User, case: Case | None) -> None:
    now = utcnow()
    for i in items:
        i.resolved_at, i.resolved_by_id = now, user.id
        if case is not None:
            i.case_id = case.id
