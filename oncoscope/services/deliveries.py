"""Results leaving on their own when a report is final or corrected: the signed DICOM SR and the cell
SEGs stored to the PACS (STOW-RS, ``ONCOSCOPE_DICOMWEB_URL``), and the ORU^R01 answering a LIS order
(MLLP, ``ONCOSCOPE_HL7_HOST``/``PORT``, referencing the order's placer and filler numbers).

A reconciler rather than a hook in every signing path: each round, every review signed since the
integration was switched on that lacks its delivery gets one (``plan``), then every due delivery is
tried (``send_due``); a failure waits 30 s, 1 min, 2 min ... (at most an hour) and, after
``ONCOSCOPE_DELIVERY_MAX_ATTEMPTS`` tries, is marked failed for a person to look at (the case page shows
every delivery and its last error, and can send it again). Runs in ``oncoscope serve`` (the first
process), beside the analysis workers."""

from __future__ import annotations

import datetime as dt
import logging
import threading

from sqlalchemy import and_, exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..store.audit import AuditLog
from ..store.models import Case, Delivery, Review, SiteSetting, utcnow
from ..store.db import session_scope
from . import exports
from .dicomweb import Client, DicomWebError

log = logging.getLogger("oncoscope.services.deliveries")
PACS, ORU = "dicom", "oru"
KIND_NAMES = {PACS: "DICOM SR (and cell SEGs) to the PACS", ORU: "HL7 ORU^R01 to the LIS"}
SINCE_KEY = "deliveries_since"
BACKOFF = dt.timedelta(seconds=30)
MAX_PAUSE = dt.timedelta(hours=1)


def targets(settings) -> dict[str, str]:
    """The destinations configured now: kind -> target name."""
    out = {}
    if settings.dicomweb_url and settings.dicomweb_store_on_final:
        out[PACS] = settings.dicomweb_url[:255]
    if settings.hl7_host and settings.hl7_port:
        out[ORU] = f"mllp://{settings.hl7_host}:{settings.hl7_port}"[:255]
    return out


def _since(s: Session) -> dt.datetime:
    """Reviews signed from this moment on are delivered (set the first time: switching the integration on
    does not send the whole history)."""
    row = s.get(SiteSetting, SINCE_KEY)
    if row is None:
        row = SiteSetting(key=SINCE_KEY, value={"at": utcnow().isoformat()})
        s.add(row)
        s.flush()
    return dt.datetime.fromisoformat(row.value["at"])


def plan(s: Session, settings) -> int:
    """Create the missing deliveries of reviews signed since the integration was switched on (another
    pump planning the same ones at once: the unique key keeps one, this round plans nothing more)."""
    destinations = targets(settings)
    if not destinations:
        return 0
    made, since = 0, _since(s)
    for kind, target in destinations.items():
        q = (select(Review.case_id, Review.version).join(Case, Case.id == Review.case_id)
             .where(Review.signed_at >= since, Case.status == "signed")
             .where(~exists().where(and_(Delivery.case_id == Review.case_id, Delivery.review_version == Review.version,
                                         Delivery.kind == kind, Delivery.target == target))))
        if kind == ORU:
            q = q.where(Case.placer_order.is_not(None))  # an answer to a LIS order
        for case_id, version in s.execute(q.limit(500)).all():
            s.add(Delivery(case_id=case_id, review_version=version, kind=kind, target=target))
            made += 1
    try:
        s.flush()
    except IntegrityError:  # another pump planned them at the same moment: theirs stand
        s.rollback()
        return 0
    return made


def send_due(s: Session, settings, files, limit: int = 20, audit: AuditLog | None = None) -> int:
    """Try every delivery that is due, each claimed first (several servers may run a pump: a claimed
    delivery is theirs for ``CLAIM`` and sent once), each committed; returns how many were sent. A
    delivery that fails in an unforeseen way is recorded as a failed try like any other, so it never
    blocks the ones behind it."""
    sent = 0
    due = s.scalars(select(Delivery.id).where(Delivery.status == "pending", Delivery.next_attempt_at <= utcnow())
                    .order_by(Delivery.next_attempt_at, Delivery.id).limit(limit)).all()
    for delivery_id in due:
        if not _claim(s, delivery_id):
            continue
        d = s.get(Delivery, delivery_id)
        try:
            ok = attempt(s, settings, files, d)
            s.commit()
        except Exception as exc:  # noqa: BLE001 - a broken export (analyzer removed, unreadable file): recorded
            s.rollback()
            log.exception("delivery %s failed unexpectedly", delivery_id)
            ok = False
            _failed(s.get(Delivery, delivery_id), settings, f"{exc.__class__.__name__}: {exc}", counted=False)
            s.commit()
        sent += ok
        if audit is not None:
            _audit(s, audit, s.get(Delivery, delivery_id), ok)
    return sent


def _audit(s: Session, audit: AuditLog, d: Delivery, ok: bool) -> None:
    """One entry per try: what left for where, or why not."""
    case = s.get(Case, d.case_id)
    audit.record_or_log(actor="oncoscope deliveries", channel="system", action="delivery.send",
                        outcome="success" if ok else "failure", resource_type="case", resource_id=d.case_id,
                        patient_id=case.patient_id if case else None,
                        details={"kind": d.kind, "target": d.target, "version": d.review_version, "try": d.attempts,
                                 "status": d.status, "error": d.last_error[:300]})


CLAIM = dt.timedelta(minutes=5)  # longer than any one send (urllib and MLLP time out sooner)


def _claim(s: Session, delivery_id: int) -> bool:
    """Take a due delivery for this pump (a conditional UPDATE: one pump wins); a crash mid-send leaves
    it due again when the claim runs out."""
    now = utcnow()
    won = s.execute(update(Delivery).where(Delivery.id == delivery_id, Delivery.status == "pending",
                                           Delivery.next_attempt_at <= now)
                    .values(next_attempt_at=now + CLAIM).execution_options(synchronize_session=False)).rowcount
    s.commit()
    return won == 1


def _failed(d: Delivery, settings, why: str, counted: bool = True) -> None:
    """Record a failed try: the reason, the pause before the next one, or failed for good."""
    if not counted:
        d.attempts += 1
    d.last_error = why[:2000]
    if d.attempts >= settings.delivery_max_attempts:
        d.status = "failed"
    else:
        d.next_attempt_at = utcnow() + min(BACKOFF * 2 ** (d.attempts - 1), MAX_PAUSE)


def attempt(s: Session, settings, files, d: Delivery) -> bool:
    """Send one delivery now; record the answer or the failure (with the next pause)."""
    case = s.get(Case, d.case_id)
    d.attempts += 1
    try:
        if case.current_review is None or case.current_review.version != d.review_version:
            d.status, d.last_error = "failed", "A newer version of the report replaced this one; it is sent instead."
            return False
        d.detail = _send(settings, files, case, d)
    except (DicomWebError, exports.ExportRefused, exports.HL7SendError, OSError) as exc:
        _failed(d, settings, str(exc))
        log.warning("delivery %s (%s, case %s) failed: %s", d.id, d.kind, d.case_id, d.last_error[:200])
        return False
    d.status, d.sent_at, d.last_error = "sent", utcnow(), ""
    return True


def _send(settings, files, case: Case, d: Delivery) -> dict:
    if d.kind == PACS:
        parts = [exports.dicom_sr(case, settings.clinic_name).body]
        for img in case.images:
            try:
                parts.append(exports.dicom_seg(case, img.id, files).body)
            except exports.NoMask:
                continue
        got = Client.from_settings(settings).store(parts)
        if got.failed:
            raise DicomWebError(f"The PACS refused {len(got.failed)} of {len(parts)} objects: {'; '.join(got.failed)}")
        return {"stored": got.stored}
    out = exports.send_hl7(case, settings.hl7_host, settings.hl7_port)
    if not out.sent:
        raise exports.HL7SendError(out.detail or "No HL7 destination is configured.")
    return {"ack": out.detail[:500]}


def send_again(s: Session, d: Delivery) -> None:
    """A person asks for another round of tries of a delivery that failed for good. (A waiting one is
    left alone: a pump may be sending it at this moment, and pulling its time forward would let a
    second pump send it twice.)"""
    if d.status == "sent":
        raise ValueError("This delivery was already sent.")
    if d.status != "failed":
        raise ValueError(f"This delivery is waiting for its next try ({d.next_attempt_at:%Y-%m-%d %H:%M} UTC).")
    d.status, d.next_attempt_at, d.attempts = "pending", utcnow(), 0


class DeliveryPump:
    """Plans and sends deliveries every few seconds in a thread (``notify`` wakes it at once)."""

    def __init__(self, sessions, settings, files, every: float = 5.0):
        self.sessions, self.settings, self.files, self.every = sessions, settings, files, every
        self.audit = AuditLog(sessions, settings.audit_spool)
        self.wake, self.stop_event = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._loop, name="oncoscope-deliveries", daemon=True)

    def start(self) -> "DeliveryPump":
        self.thread.start()
        return self

    def notify(self) -> None:
        self.wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        self.wake.set()
        self.thread.join(timeout)

    def run_once(self) -> int:
        with session_scope(self.sessions) as s:
            plan(s, self.settings)
        s = self.sessions()
        try:
            return send_due(s, self.settings, self.files, audit=self.audit)
        finally:
            s.close()

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the database is away, say: try again next round
                log.exception("delivery round failed")
            self.wake.wait(self.every)
            self.wake.clear()


def start_delivery_pump(app) -> DeliveryPump | None:
    """The app's pump, when a destination is configured."""
    ext = app.extensions["oncoscope"]
    if not targets(ext["settings"]):
        return None
    pump = DeliveryPump(ext["sessions"], ext["settings"], ext["files"]).start()
    ext["deliveries"] = pump
    return pump
