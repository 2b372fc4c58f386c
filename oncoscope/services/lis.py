"""LIS orders over MLLP: ``oncoscope lis listen`` accepts HL7 v2 OML^O33 and ORM^O01 messages, places
or cancels the orders (store/orders) and answers each with an ACK: AA (done; a repeated order is
answered AA again), AE (understood but not placed: unknown test, patient conflict; ERR says why) or AR
(not an order message, or unreadable). Every message leaves one audit entry (channel ``hl7``).
Results go back as ORU^R01 referencing the order (services/deliveries)."""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import socketserver
import threading
import time

from ..reports.hl7v2 import escape
from ..store import orders
from ..store.audit import AuditLog
from ..store.patients import PatientError

log = logging.getLogger("oncoscope.services.lis")
START, END = b"\x0b", b"\x1c\r"
MAX_MESSAGE = 1024 * 1024
ORDER_TYPES = {("OML", "O33"), ("ORM", "O01")}
_ESCAPES = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}


# ----------------------------------------------------------------------------- parsing
class Message:
    """An HL7 v2 message as segments of fields (``seg["PID"][5]``: PID-5), components split on ``^``."""

    def __init__(self, text: str):
        segs = [s for s in text.replace("\n", "\r").split("\r") if s.strip()]
        if not segs or not segs[0].startswith("MSH") or len(segs[0]) < 8:
            raise ValueError("not an HL7 v2 message (no MSH segment)")
        self.field_sep = segs[0][3]
        self.segments: list[list[str]] = []
        for s in segs:
            fields = s.split(self.field_sep)
            if fields[0] == "MSH":  # MSH-1 is the separator itself: keep the standard numbering
                fields = ["MSH", self.field_sep] + fields[1:]
            self.segments.append(fields)

    def first(self, name: str) -> list[str] | None:
        return next((s for s in self.segments if s[0] == name), None)

    def get(self, name: str, field: int, component: int = 1, repetition: int = 0) -> str:
        seg = self.first(name)
        if seg is None or field >= len(seg):
            return ""
        reps = seg[field].split("~") if not (name == "MSH" and field == 2) else [seg[field]]
        if repetition >= len(reps):
            return ""
        parts = reps[repetition].split("^")
        return _unescape(parts[component - 1]) if component <= len(parts) else ""

    def repetitions(self, name: str, field: int) -> int:
        seg = self.first(name)
        return len(seg[field].split("~")) if seg is not None and field < len(seg) and seg[field] else 0


def _mrn(m: Message) -> str:
    """PID-3: the identifier whose type (PID-3.5) is MR, else the first one."""
    for r in range(m.repetitions("PID", 3)):
        if m.get("PID", 3, 5, r).upper() == "MR":
            return m.get("PID", 3, 1, r)
    return m.get("PID", 3)


def _unescape(v: str) -> str:
    out, i = [], 0
    while i < len(v):
        j = v.find("\\", i + 1) if v[i] == "\\" else -1
        if j > i and v[i + 1:j] in _ESCAPES:
            out.append(_ESCAPES[v[i + 1:j]])
            i = j + 1
        else:
            out.append(v[i])
            i += 1
    return "".join(out).strip()


def _date(v: str) -> str | None:
    try:
        return dt.datetime.strptime(v[:8], "%Y%m%d").date().isoformat() if len(v) >= 8 else None
    except ValueError:
        return None


def order_of(m: Message) -> orders.Order:
    """The order a message places or cancels (PID, ORC, OBR; priority from TQ1-9, ORC-7.6 or OBR-27.6)."""
    kind = (m.get("MSH", 9, 1), m.get("MSH", 9, 2))
    if kind not in ORDER_TYPES:
        raise orders.OrderError(f"{kind[0]}^{kind[1]} is not an order message (OML^O33 or ORM^O01 expected).",
                                reject=True)
    if m.first("PID") is None or m.first("OBR") is None:
        raise orders.OrderError("The order has no PID or no OBR segment.", reject=True, missing=True)
    priority = (m.get("TQ1", 9) or m.get("ORC", 7, 6) or m.get("OBR", 27, 6)).upper()
    return orders.Order(
        control=(m.get("ORC", 1) or "NW").upper(), placer=m.get("ORC", 2) or m.get("OBR", 2),
        placer_app=m.get("ORC", 2, 2) or m.get("OBR", 2, 2),
        test_code=m.get("OBR", 4, 1), test_text=m.get("OBR", 4, 2), mrn=_mrn(m),
        family=m.get("PID", 5, 1), given=m.get("PID", 5, 2), birth_date=_date(m.get("PID", 7)),
        sex={"F": "female", "M": "male", "O": "other"}.get(m.get("PID", 8).upper(), "unknown"),
        accession=m.get("OBR", 18) or m.get("ORC", 2), stat=priority in ("S", "A"),
        sender="^".join(x for x in (m.get("MSH", 3), m.get("MSH", 4)) if x), control_id=m.get("MSH", 10),
        orderer=" ".join(x for x in (m.get("ORC", 12, 3), m.get("ORC", 12, 2)) if x)
        or " ".join(x for x in (m.get("OBR", 16, 3), m.get("OBR", 16, 2)) if x),
        note=m.get("NTE", 3))


# HL7 table 0357 (message error condition codes) as used in ERR-3
ERR_UNSUPPORTED_TYPE = ("200", "Unsupported message type")
ERR_MISSING_FIELD = ("101", "Required field missing")
ERR_APPLICATION = ("207", "Application internal error")


def ack(m: Message | None, code: str, text: str = "", error: tuple[str, str] = ERR_APPLICATION,
        now: dt.datetime | None = None) -> str:
    """The ACK for ``m`` (AA, AE or AR), with an ERR segment saying why when not AA. Everything echoed
    from the message is escaped again: a sender cannot forge our acknowledgement's fields."""
    now = now or dt.datetime.now()
    stamp = now.strftime("%Y%m%d%H%M%S")
    sender = (escape(m.get("MSH", 3)), escape(m.get("MSH", 4))) if m else ("", "")
    trigger = escape(m.get("MSH", 9, 2)) if m else ""
    control = escape(m.get("MSH", 10)) if m else ""
    latin1 = m is not None and m.get("MSH", 18) == "8859/1"  # answered as it was asked
    segs = [f"MSH|^~\\&|ONCOSCOPE|LAB|{sender[0]}|{sender[1]}|{stamp}||ACK^{trigger}^ACK|ACK{secrets.token_hex(8)}"
            f"|P|2.5.1" + ("||||||8859/1" if latin1 else ""),
            f"MSA|{code}|{control}" + (f"|{escape(text[:80])}" if code != "AA" and text else "")]
    if code != "AA":  # (cut before escaping: an escape sequence is never cut in two)
        segs.append(f"ERR|||{error[0]}^{error[1]}^HL70357|E||||{escape(text[:500])}")
    return "\r".join(segs)


# ----------------------------------------------------------------------------- handling
class OrderDesk:
    """Places or cancels the order of one message, audits it, and gives the ACK."""

    def __init__(self, settings, sessions):
        self.settings, self.sessions = settings, sessions
        self.audit = AuditLog(sessions, settings.audit_spool)
        self.tests_table = settings.lis_tests

    def handle(self, raw: bytes, peer: str = "") -> str:
        try:
            m = Message(_decode(raw))
        except ValueError as exc:
            self._audit(peer, None, "rejected", str(exc), None)
            return ack(None, "AR", str(exc), ERR_UNSUPPORTED_TYPE)
        try:
            o = order_of(m)
            case_id, patient_id, status, created = orders.apply(self.sessions, o, self.tests_table,
                                                                self.settings.integration_readers)
        except (orders.OrderError, PatientError) as exc:
            code = "AR" if getattr(exc, "reject", False) else "AE"
            self._audit(peer, m, "rejected", str(exc), None)
            error = (ERR_MISSING_FIELD if getattr(exc, "missing", False)
                     else ERR_UNSUPPORTED_TYPE if code == "AR" else ERR_APPLICATION)
            return ack(m, code, str(exc), error)
        except Exception as exc:  # noqa: BLE001 - the database is away: AE, the LIS sends it again
            log.exception("LIS order could not be placed")
            self._audit(peer, m, "error", f"{exc.__class__.__name__}", None)
            return ack(m, "AE", "The order could not be stored now; send it again later.")
        self._audit(peer, m, "success", "", patient_id, case=case_id, created=created, status=status,
                    placer=o.placer)
        return ack(m, "AA")

    def _audit(self, peer: str, m: Message | None, outcome: str, why: str, patient_id, **details) -> None:
        self.audit.record_or_log(actor=f"LIS {m.get('MSH', 3) if m else '?'}", channel="hl7", action="lis.order",
                                 outcome=outcome, ip=peer, patient_id=patient_id,
                                 resource_type="case" if details.get("case") else "",
                                 resource_id=details.get("case") or "",
                                 details={"message": f"{m.get('MSH', 9, 1)}^{m.get('MSH', 9, 2)}" if m else "",
                                          "control_id": m.get("MSH", 10) if m else "", "why": why, **details})


def charset(raw: bytes) -> str:
    """The message's encoding: Latin-1 when MSH-18 is 8859/1 (or the bytes are not UTF-8), else UTF-8."""
    head = raw.replace(b"\n", b"\r").split(b"\r", 1)[0].split(b"|")
    if len(head) > 17 and head[17].strip() == b"8859/1":
        return "latin-1"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "latin-1"
    return "utf-8"


def _decode(raw: bytes) -> str:
    """The message's text, so that a name's accents survive (a replacement character would not match
    the stored patient)."""
    return raw.decode(charset(raw))


def frames(buffer: bytearray) -> list[bytes]:
    """Take the complete MLLP frames out of ``buffer`` (what follows the last one stays)."""
    out = []
    while True:
        start = buffer.find(START)
        end = buffer.find(END, start + 1)
        if start < 0 or end < 0:
            if start > 0:
                del buffer[:start]  # bytes before a frame: noise
            return out
        out.append(bytes(buffer[start + 1:end]))
        del buffer[:end + len(END)]


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        desk: OrderDesk = self.server.desk  # type: ignore[attr-defined]
        self.request.settimeout(300)
        buffer = bytearray()
        peer = self.client_address[0]
        while True:
            try:
                chunk = self.request.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            if len(buffer) > MAX_MESSAGE:
                self.request.sendall(START + ack(None, "AR", "Message larger than 1 MB.").encode() + END)
                return
            for message in frames(buffer):  # the answer in the message's own encoding
                self.request.sendall(START + desk.handle(message, peer).encode(charset(message), "replace") + END)


class LisListener(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, settings, sessions, host: str = "0.0.0.0", port: int | None = None):
        super().__init__((host, settings.lis_port if port is None else port), _Handler)
        self.desk = OrderDesk(settings, sessions)
        self.allowed = set(settings.lis_allowed_hosts)
        self._refused: dict[str, float] = {}

    def verify_request(self, request, client_address) -> bool:
        """Only the addresses in ONCOSCOPE_LIS_ALLOWED_HOSTS may send orders (none listed: nobody); a
        refused connection is closed unanswered and audited."""
        if client_address[0] in self.allowed:
            return True
        last = self._refused.get(client_address[0], 0.0)
        self._refused[client_address[0]] = time.monotonic()
        if time.monotonic() - last < 60:  # a scanner or a health check: one entry a minute per address
            return False
        self.desk.audit.record_or_log(actor=f"host {client_address[0]}", channel="hl7", action="lis.connection",
                                      outcome="denied", ip=client_address[0],
                                      details={"why": "address not in ONCOSCOPE_LIS_ALLOWED_HOSTS"})
        return False

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> "LisListener":
        threading.Thread(target=self.serve_forever, name="oncoscope-lis", daemon=True).start()
        return self
