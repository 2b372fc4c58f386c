"""SQLAlchemy 2 models. Portable across SQLite, PostgreSQL and MariaDB/MySQL:
explicit string lengths, JSON columns, naive UTC datetimes."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (JSON, Boolean, Date, DateTime, Float, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0)


class Base(DeclarativeBase):
    pass


# technologist: prepares (reclassifies cells, writes a preliminary result), never signs final;
# reviewer: reads the cases assigned to them and answers consults, changes nothing.
ROLES = ("admin", "doctor", "technologist", "reviewer")
JOB_STATUSES = ("queued", "running", "done", "failed", "retried")
# open/analysing/ready: being prepared; preliminary: a preliminary result is written; second_read:
# the first reader signed, a second doctor must confirm; signed: final (corrected once amended).
CASE_STATUSES = ("open", "analysing", "ready", "preliminary", "second_read", "signed", "cancelled")


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(255), unique=True, nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    role: Mapped[str] = mapped_column(String(20), nullable=False, default="doctor")
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    session_version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class PatientAccess(Base):
    """Which doctors may see a patient (assigned or shared by an admin or the creator)."""

    __tablename__ = "patient_access"
    __table_args__ = (Index("ix_patient_access_user", "user_id", "patient_id"),)

    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    granted_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (Index("ix_patients_family_given", "family_name", "given_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mrn: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    family_name: Mapped[str] = mapped_column(String(100), nullable=False)
    given_name: Mapped[str] = mapped_column(String(100), nullable=False, default="")
    birth_date: Mapped[dt.date | None] = mapped_column(Date, nullable=True)
    sex: Mapped[str] = mapped_column(String(16), nullable=False, default="unknown")
    notes: Mapped[str] = mapped_column(Text, nullable=False, default="")
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow, onupdate=utcnow)

    cases: Mapped[list["Case"]] = relationship(back_populates="patient", order_by="Case.created_at.desc()")
    doctors: Mapped[list[User]] = relationship(secondary="patient_access", viewonly=True)

    @property
    def display_name(self) -> str:
        return f"{self.family_name}, {self.given_name}".strip(", ")


class Case(Base):
    __tablename__ = "cases"
    __table_args__ = (Index("ix_cases_created", "created_at"), Index("ix_cases_status", "status"),
                      Index("ix_cases_worklist", "status", "priority", "created_at"),
                      UniqueConstraint("dicom_study_uid", name="uq_cases_dicom_study_uid"),
                      UniqueConstraint("placer_order", "placer_app", name="uq_cases_placer_order"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), nullable=False, index=True)
    analyzer_id: Mapped[str] = mapped_column(String(64), nullable=False)
    clinical_note: Mapped[str] = mapped_column(Text, nullable=False, default="")
    status: Mapped[str] = mapped_column(String(20), nullable=False, default="open")
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True, index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow, onupdate=utcnow)
    final_diagnosis: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    # Bumped by every change of the image set or the signature, always by a conditional UPDATE
    # (store/cases.py): a sign-off names the revision it reviewed, so an upload that lands in
    # between makes it fail instead of leaving a signed case with an unreviewed image.
    revision: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    # The white-cell count from the haematology analyser (x10^9/L), entered by a person: turns the
    # differential's percentages into absolute counts.
    wbc_count: Mapped[float | None] = mapped_column(Float, nullable=True)
    priority: Mapped[str] = mapped_column(String(10), nullable=False, default="routine", server_default="routine")
    # Kept by the worker when the last analysis ends (store/cases), so worklists sort on columns: the
    # AI's case call is positive (malignant, blasts present), and when the case became ready to read.
    ai_flag: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    ready_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    cancel_reason: Mapped[str] = mapped_column(Text, nullable=False, default="", server_default="")
    # Hospital integration (services/pacs, services/lis): the DICOM study a case was filed under by the
    # receiver (one case per study), and the order it fulfils (LIS accession and placer order number).
    dicom_study_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    placer_order: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # the placer number's namespace; "" (not NULL) when the LIS names none, so the unique key holds
    placer_app: Mapped[str] = mapped_column(String(64), nullable=False, default="", server_default="")
    order_info: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # the LIS order's sender, control id, orderer

    patient: Mapped[Patient] = relationship(back_populates="cases")
    images: Mapped[list["CaseImage"]] = relationship(back_populates="case", order_by="CaseImage.id")
    reviews: Mapped[list["Review"]] = relationship(back_populates="case", order_by="Review.version")
    readings: Mapped[list["Reading"]] = relationship(back_populates="case", order_by="Reading.id")
    transitions: Mapped[list["CaseTransition"]] = relationship(order_by="CaseTransition.id", viewonly=True)
    consults: Mapped[list["Consult"]] = relationship(back_populates="case", order_by="Consult.id")
    deliveries: Mapped[list["Delivery"]] = relationship(order_by="Delivery.id", viewonly=True)
    created_by: Mapped[User | None] = relationship()
    # read-only here: cells change through store/cells.py only
    cell_labels: Mapped[list["CellLabel"]] = relationship(
        viewonly=True, order_by="(CellLabel.analysis_id, CellLabel.cell_index)")

    @property
    def current_review(self) -> "Review | None":
        return self.reviews[-1] if self.reviews else None


class CaseImage(Base):
    """An uploaded image, stored by content hash; the user's file name is metadata only."""

    __tablename__ = "case_images"
    __table_args__ = (UniqueConstraint("case_id", "sha256", name="uq_case_image_sha"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), nullable=False, index=True)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    original_filename: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    content_type: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    width: Mapped[int] = mapped_column(Integer, nullable=False)
    height: Mapped[int] = mapped_column(Integer, nullable=False)
    size_bytes: Mapped[int] = mapped_column(Integer, nullable=False)
    uploaded_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    # DICOM uploads keep their identifiers (exports reuse the study UID)
    dicom_patient_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    dicom_study_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    dicom_series_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    dicom_sop_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # DICOM PixelSpacing (row, column) in mm, when the header gives it: the viewer measures in mm
    pixel_spacing: Mapped[list | None] = mapped_column(JSON, nullable=True)

    case: Mapped[Case] = relationship(back_populates="images")
    analysis: Mapped["Analysis | None"] = relationship(back_populates="image", uselist=False)


class Analysis(Base):
    """One analyzer run on one image: the job state and, when done, the AI result."""

    __tablename__ = "analyses"
    __table_args__ = (Index("ix_analyses_job", "job_status", "queued_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("case_images.id", ondelete="CASCADE"), nullable=False, unique=True)
    analyzer_id: Mapped[str] = mapped_column(String(64), nullable=False)
    job_status: Mapped[str] = mapped_column(String(20), nullable=False, default="queued")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    queued_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # scaled-out mode: when the job was last handed to the queue (Redis); a job still queued long
    # after this is handed over again (a lost message costs a delay, never the job)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # result
    model_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    model_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    result_status: Mapped[str | None] = mapped_column(String(20), nullable=True)
    label: Mapped[str | None] = mapped_column(String(64), nullable=True)
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    malignant: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    malignant_probability: Mapped[float | None] = mapped_column(Float, nullable=True)
    probabilities: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    cell_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cells: Mapped[list | None] = mapped_column(JSON, nullable=True)
    microns_per_pixel: Mapped[float | None] = mapped_column(Float, nullable=True)  # the image's measured scale
    messages: Mapped[list | None] = mapped_column(JSON, nullable=True)
    timings_ms: Mapped[dict | None] = mapped_column(JSON, nullable=True)

    image: Mapped[CaseImage] = relationship(back_populates="analysis")


class Review(Base):
    """A signed diagnosis. Signing freezes the case; an amendment adds version n+1 and keeps n."""

    __tablename__ = "reviews"
    # signed_at: the dashboards count a period's sign-offs
    __table_args__ = (UniqueConstraint("case_id", "version", name="uq_review_version"),
                      Index("ix_reviews_signed_at", "signed_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), nullable=False, index=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    ai_label: Mapped[str | None] = mapped_column(String(64), nullable=True)
    ai_status: Mapped[str | None] = mapped_column(String(20), nullable=True)
    final_diagnosis: Mapped[str] = mapped_column(String(64), nullable=False)
    agrees_with_ai: Mapped[bool] = mapped_column(Boolean, nullable=False)
    override_reason: Mapped[str] = mapped_column(Text, nullable=False, default="")
    uncertainty_note: Mapped[str] = mapped_column(Text, nullable=False, default="")
    comment: Mapped[str] = mapped_column(Text, nullable=False, default="")
    amendment_reason: Mapped[str] = mapped_column(Text, nullable=False, default="")
    signed_by_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False)
    signed_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    content_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    # Cell-classifying analyzers: the differential as signed (AI and verified counts, cells left
    # unverified) -- frozen, so later reclassification for an amendment never changes this version.
    differential: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # The case's AI call as the signer saw it (label, status, probabilities, text, images used): a
    # report of this version says what was signed, whatever a later rule or model makes of the case.
    # None for reviews signed before it was kept (their reports recompute it).
    ai_call: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # Second reading (the analyzer's policy asked for one): who confirmed, their own blinded
    # diagnosis, and whether it was the first reader's.
    second_reader_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    second_diagnosis: Mapped[str | None] = mapped_column(String(64), nullable=True)
    second_agrees: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    second_read_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)

    case: Mapped[Case] = relationship(back_populates="reviews")
    signed_by: Mapped[User] = relationship(foreign_keys=[signed_by_id])
    second_reader: Mapped[User | None] = relationship(foreign_keys=[second_reader_id])


class Reading(Base):
    """A person's reading of a case that is not (yet) the signed report: a preliminary result, the
    first reading waiting for a second reader, and the second reader's blinded reading."""

    __tablename__ = "readings"
    __table_args__ = (Index("ix_readings_case", "case_id", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # preliminary | first | second
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False)
    diagnosis: Mapped[str] = mapped_column(String(64), nullable=False)
    comment: Mapped[str] = mapped_column(Text, nullable=False, default="")
    override_reason: Mapped[str] = mapped_column(Text, nullable=False, default="")
    uncertainty_note: Mapped[str] = mapped_column(Text, nullable=False, default="")
    revision: Mapped[int] = mapped_column(Integer, nullable=False)  # the case revision read
    ai_call: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    differential: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    # a reading stops counting when the case moves on without it (a newer preliminary, a discordance resolved)
    current: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)

    case: Mapped[Case] = relationship(back_populates="readings")
    user: Mapped[User] = relationship()


class CaseTransition(Base):
    """Who moved a case's report from one state to the next, and when (open -> preliminary -> final ->
    corrected, cancelled): the case page and the PDF header list them."""

    __tablename__ = "case_transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), nullable=False, index=True)
    from_state: Mapped[str] = mapped_column(String(20), nullable=False)
    to_state: Mapped[str] = mapped_column(String(20), nullable=False)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    note: Mapped[str] = mapped_column(Text, nullable=False, default="")

    user: Mapped[User | None] = relationship()


class Consult(Base):
    """A question on a case to a named colleague or to any reviewer, optionally about a region of one
    image or some cells. While open, the consultant may read that case (only that one)."""

    __tablename__ = "consults"
    __table_args__ = (Index("ix_consults_open", "status", "consultant_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), nullable=False, index=True)
    asked_by_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False)
    consultant_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)  # None: any reviewer
    question: Mapped[str] = mapped_column(Text, nullable=False)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("case_images.id", ondelete="SET NULL"), nullable=True)
    region: Mapped[list | None] = mapped_column(JSON, nullable=True)  # [x, y, w, h] in image pixels
    cell_ids: Mapped[list | None] = mapped_column(JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(10), nullable=False, default="open")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    closed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    closed_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)

    case: Mapped[Case] = relationship(back_populates="consults")
    asked_by: Mapped[User] = relationship(foreign_keys=[asked_by_id])
    consultant: Mapped[User | None] = relationship(foreign_keys=[consultant_id])
    messages: Mapped[list["ConsultMessage"]] = relationship(back_populates="consult", order_by="ConsultMessage.id")


class ConsultMessage(Base):
    __tablename__ = "consult_messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    consult_id: Mapped[int] = mapped_column(ForeignKey("consults.id", ondelete="CASCADE"), nullable=False, index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False)
    body: Mapped[str] = mapped_column(Text, nullable=False)
    at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)

    consult: Mapped[Consult] = relationship(back_populates="messages")
    user: Mapped[User] = relationship()


class AnalyzerPolicy(Base):
    """What the administrator set for one analyzer: when a second reader must confirm."""

    __tablename__ = "analyzer_policies"

    analyzer_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    second_reader: Mapped[str] = mapped_column(String(16), nullable=False, default="none")
    updated_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class SiteSetting(Base):
    """A setting the administrator changes in the app (not the environment): e.g. whether preliminary
    results may be released to the hospital system."""

    __tablename__ = "site_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict] = mapped_column(JSON, nullable=False)
    updated_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class DicomInboxItem(Base):
    """A DICOM instance received (C-STORE) or retrieved (WADO-RS) but not filed into a case: no routing
    rule matched it, or its study's case no longer takes images. Stored (the file is in the image
    store), shown in the DICOM inbox until a person files it under an analyzer or dismisses it."""

    __tablename__ = "dicom_inbox"
    __table_args__ = (Index("ix_dicom_inbox_open", "resolved_at", "study_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    source: Mapped[str] = mapped_column(String(64), nullable=False)  # "AE STORESCU" / "DICOMweb <host>"
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), nullable=True,
                                                   index=True)  # (none: a patient ID that could not be used)
    study_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    series_uid: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    sop_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    sop_class_uid: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    modality: Mapped[str] = mapped_column(String(16), nullable=False, default="")
    body_part: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    description: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False, default="")
    resolved_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    resolved_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    case_id: Mapped[int | None] = mapped_column(ForeignKey("cases.id", ondelete="SET NULL"), nullable=True)

    patient: Mapped[Patient | None] = relationship()


class Delivery(Base):
    """One result sent to a hospital system: the signed DICOM SR or SEG stored to the PACS (STOW-RS), or
    the ORU^R01 answering a LIS order. Retried with backoff until sent or given up; shown on the case."""

    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_due", "status", "next_attempt_at"),
                      UniqueConstraint("case_id", "review_version", "kind", "target", name="uq_delivery"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), nullable=False, index=True)
    review_version: Mapped[int] = mapped_column(Integer, nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # dicom-sr | dicom-seg | oru
    target: Mapped[str] = mapped_column(String(255), nullable=False)
    status: Mapped[str] = mapped_column(String(10), nullable=False, default="pending")  # pending | sent | failed
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, nullable=False, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    detail: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # what the peer answered (ACK, stored UIDs)


class CellLabel(Base):
    """One white cell of an analysed image: the AI's class and the class a person gave it."""

    __tablename__ = "cell_labels"
    __table_args__ = (UniqueConstraint("analysis_id", "cell_index", name="uq_cell_label"),
                      Index("ix_cell_labels_case_class", "case_id", "cell_class"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), nullable=False)
    analysis_id: Mapped[int] = mapped_column(ForeignKey("analyses.id", ondelete="CASCADE"), nullable=False)
    cell_index: Mapped[int] = mapped_column(Integer, nullable=False)  # position in Analysis.cells
    ai_class: Mapped[str] = mapped_column(String(32), nullable=False)
    ai_probability: Mapped[float | None] = mapped_column(Float, nullable=True)
    cell_class: Mapped[str] = mapped_column(String(32), nullable=False)  # current: the AI's until a person acts
    counted: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)  # False: cut by the image edge
    verified: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    changed_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    changed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)

    analysis: Mapped[Analysis] = relationship()
    changed_by: Mapped[User | None] = relationship()


class CellChange(Base):
    """Each verification or reclassification of a cell, in batches (one keystroke, one batch): the
    undo history before sign-off and the per-cell record of who changed what."""

    __tablename__ = "cell_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), nullable=False, index=True)
    cell_id: Mapped[int] = mapped_column(ForeignKey("cell_labels.id", ondelete="CASCADE"), nullable=False, index=True)
    batch: Mapped[str] = mapped_column(String(32), nullable=False, index=True)
    from_class: Mapped[str] = mapped_column(String(32), nullable=False)
    from_verified: Mapped[bool] = mapped_column(Boolean, nullable=False)
    to_class: Mapped[str] = mapped_column(String(32), nullable=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False)
    at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    undone: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    undone_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    undone_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    signed: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)  # in a signed review: not undoable


class LoginThrottle(Base):
    """Sign-in attempts per e-mail address (hashed), for real and unknown accounts alike, so every
    web process shares one count and a lock does not reveal which addresses have an account."""

    __tablename__ = "login_throttle"
    __table_args__ = (Index("ix_login_throttle_updated", "updated_at"),)

    key: Mapped[str] = mapped_column(String(64), primary_key=True)  # SHA-256 of the normalised address
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    locked_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class ApiToken(Base):
    """Personal API token. Only a SHA-256 of the secret is stored; the secret is shown once."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    prefix: Mapped[str] = mapped_column(String(16), nullable=False)
    token_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)

    user: Mapped[User] = relationship()


class IdempotencyRecord(Base):
    """The stored answer to a request sent with an Idempotency-Key, replayed on retries."""

    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("user_id", "key", name="uq_idempotency_user_key"),
                      Index("ix_idempotency_created", "created_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    key: Mapped[str] = mapped_column(String(128), nullable=False)
    request_fingerprint: Mapped[str] = mapped_column(String(64), nullable=False)
    status_code: Mapped[int] = mapped_column(Integer, nullable=False)
    response: Mapped[dict] = mapped_column(JSON, nullable=False)
    # the patient whose data the stored answer shows: a replay re-checks access to it
    patient_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class AuditEvent(Base):
    """One entry of the append-only audit trail (who, what, which record, when, from where, outcome).

    Each entry carries the SHA-256 of its content chained to the previous entry's hash, so a changed,
    removed or inserted entry breaks the chain (``oncoscope audit verify``). The database refuses
    UPDATE and DELETE on this table (triggers created by the migration). No foreign keys: entries
    outlive the users and records they mention."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_at", "at"), Index("ix_audit_actor", "actor"),
                      Index("ix_audit_patient", "patient_id"), Index("ix_audit_action", "action"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, nullable=False, unique=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False)
    actor_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    actor: Mapped[str] = mapped_column(String(255), nullable=False)
    actor_role: Mapped[str] = mapped_column(String(20), nullable=False, default="")
    channel: Mapped[str] = mapped_column(String(8), nullable=False)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    method: Mapped[str] = mapped_column(String(8), nullable=False, default="")
    path: Mapped[str] = mapped_column(String(500), nullable=False, default="")
    resource_type: Mapped[str] = mapped_column(String(32), nullable=False, default="")
    resource_id: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    patient_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    outcome: Mapped[str] = mapped_column(String(16), nullable=False)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ip: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    user_agent: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    details: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False)


class AuditHead(Base):
    """The chain's head (one row): last sequence number and hash. Appending locks this row, so
    entries from every web process and worker form one chain in one order."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False)
