"""Orders from the laboratory information system (services/lis parses the HL7 messages): a new
order becomes a pending case (no images yet) carrying the order's accession and placer number, its
priority and the analyzer its test code names; the worklists show it until the images arrive (a
study with that accession number is filed into it, store/receiving). A cancelled order cancels its
case while nothing was done on it. The same order sent twice is the same case."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ..analyzers import registry
from . import cases as case_store
from . import patients as patient_store
from .db import once_more_on_race
from .models import Case
from .text import storable


class OrderError(ValueError):
    """The order cannot be placed; ``reject`` (AR): the message itself is wrong, else (AE) its content.
    ``missing``: a required field or segment is absent (said so in the answer's error code)."""

    def __init__(self, message: str, reject: bool = False, missing: bool = False):
        super().__init__(message)
        self.reject, self.missing = reject, missing


@dataclass
class Order:
    control: str  # ORC-1: NW (new), CA (cancel)
    placer: str  # ORC-2 / OBR-2: the LIS's order number
    test_code: str  # OBR-4.1
    test_text: str  # OBR-4.2
    mrn: str
    family: str = ""
    given: str = ""
    birth_date: str | None = None
    sex: str = "unknown"
    accession: str = ""
    stat: bool = False
    placer_app: str = ""  # the placer number's namespace (ORC-2.2)
    sender: str = ""  # MSH-3^MSH-4
    control_id: str = ""  # MSH-10
    orderer: str = ""  # ORC-12 / OBR-16
    note: str = ""


def analyzer_for(test_code: str, test_text: str, table: str = "") -> str:
    """The analyzer an order's test names: ``ONCOSCOPE_LIS_TESTS`` (``CODE=analyzer;...``), else a code or
    text that is an analyzer's id."""
    mapping = {}
    for rule in (r for r in table.split(";") if "=" in r):
        code, _, aid = rule.partition("=")
        mapping[code.strip().upper()] = aid.strip()
    available = registry.available()
    for key in (test_code, test_text):
        aid = mapping.get((key or "").strip().upper()) or (key or "").strip().lower()
        if aid in available:
            return aid
    raise OrderError(f"The ordered test {test_code or test_text!r} is not an analysis oncoscope runs (tests: "
                     f"{', '.join(available)}, or ONCOSCOPE_LIS_TESTS).")


def _existing(s: Session, o: Order) -> Case | None:
    """The case of this order: its placer number within the placer's namespace (two LIS may number alike)."""
    return s.scalar(select(Case).where(Case.placer_order == storable(o.placer)[:64],
                                       Case.placer_app == storable(o.placer_app)[:64]))


def place(s: Session, o: Order, tests_table: str = "", readers: tuple[str, ...] = ()) -> tuple[Case, bool]:
    """A new order's pending case, and whether it was created now (False: the order was known)."""
    if not o.placer:
        raise OrderError("The order has no placer order number (ORC-2 or OBR-2).", reject=True, missing=True)
    known = _existing(s, o)
    if known is not None:
        if known.patient.mrn != o.mrn.strip():
            raise OrderError(f"Order {o.placer} is already placed for another patient (MRN {known.patient.mrn}).")
        return known, False
    analyzer_id = analyzer_for(o.test_code, o.test_text, tests_table)
    try:
        patient = patient_store.match_or_create(s, o.mrn, o.family, o.given, o.birth_date, o.sex,
                                                f"Created by a LIS order from {o.sender}.", readers)
    except patient_store.PatientError as exc:
        raise OrderError(str(exc)) from None
    note = f"Ordered by {o.sender or 'the LIS'}" + (f", {o.orderer}" if o.orderer else "") + "." + \
        (f" {o.note}" if o.note else "")
    case = case_store.create_case(s, None, patient, analyzer_id, storable(note)[:5000],
                                  "stat" if o.stat else "routine")
    case.accession_number = storable(o.accession or o.placer)[:64]
    case.placer_order, case.placer_app = storable(o.placer)[:64], storable(o.placer_app)[:64]
    case.order_info = {"sender": storable(o.sender)[:128], "control_id": storable(o.control_id)[:64],
                       "orderer": storable(o.orderer)[:128]}
    s.flush()  # the same order placed at once by another message: IntegrityError, retried by apply()
    return case, True


def apply(sessions: sessionmaker, o: Order, tests_table: str = "",
          readers: tuple[str, ...] = ()) -> tuple[int, int, str, bool]:
    """Place (NW) or cancel (CA) an order and commit: (case id, patient id, case status, created now);
    ``readers``: who is given a patient the order creates.
    A race with the same order or the same new patient arriving at once (a unique key) is retried once,
    which then finds the other's rows."""
    def work(s: Session) -> tuple[int, int, str, bool]:
        if o.control == "CA":
            case, created = cancel(s, o), False
        elif o.control == "NW":
            case, created = place(s, o, tests_table, readers)
        else:  # XO (change), SC (status): not applied; said so rather than acknowledged and dropped
            raise OrderError(f"Order control {o.control} is not handled here (NW and CA are); cancel the "
                             "order and place it again.")
        out = (case.id, case.patient_id, case.status, created)
        s.commit()
        return out

    return once_more_on_race(sessions, work)


def cancel(s: Session, o: Order) -> Case:
    """The LIS cancels an order: its case is cancelled while it holds no images and no reading (checked
    under the case's lock: a study filed meanwhile keeps the case)."""
    case = _existing(s, o)
    if case is None or case.patient.mrn != o.mrn.strip():
        raise OrderError(f"No order {o.placer} of patient {o.mrn} is known here.")
    if case.status == "cancelled":
        return case
    case_store.lock_case(s, case)
    s.refresh(case)
    reason = storable(f"Order cancelled by {o.sender or 'the LIS'}.")
    if case.images or not case_store.advance(s, case, "cancelled", from_statuses=("open",), cancel_reason=reason):
        raise OrderError(f"Order {o.placer} cannot be cancelled here: case #{case.id} already holds images or "
                         "a result; ask the laboratory.")
    case_store.record_transition(s, case, None, "open", "cancelled", reason)
    s.flush()
    return case
