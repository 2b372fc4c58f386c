"""HL7 v2.5.1 result messages (ORU^R01) for signed cases, and MLLP transport.

``oru_r01(case, analyzer)`` turns a signed case into one ORU^R01 message: MSH, PID, OBR, the
report notes (NTE) and one OBX per finding. Per image (OBX-4 sub-ID = image index, 1-based):

* ``AI-STATUS``  ST   AI result status of the field (ok, uncertain, out_of_domain, error, pending, failed)
* ``AI-CLASS``   CWE  AI class of the field (analyzer label ^ display name ^ L)
* ``AI-PROB-<label>`` NM  probability of each class, units ``1`` (UCUM), range 0-1
* ``CELL-COUNT`` NM   number of segmented cells

For the case (no sub-ID): ``AI-CALL`` ST (the aggregate call as text), ``AI-CALL-STATUS`` ST,
``FINAL-DX`` CWE (the signed diagnosis; OBX-16 = signer) and ``AI-AGREE`` CWE (Y/N from HL7
table 0136, or ``NA`` when there was no AI call). AI-derived OBX carry the analyzer id and
model version in OBX-18. Results are final (``F``), or corrected (``C``) when the signed review is an
amendment (version > 1). Timestamps are the stored naive UTC values, formatted YYYYMMDDHHMMSS.

Every value that comes from users or data is escaped by :func:`escape` (``| ^ ~ \\ &`` -> ``\\F\\ \\S\\
\\R\\ \\E\\ \\T\\``), line breaks (CR, LF, and NEL / U+2028 / U+2029, which ``str.splitlines`` based
readers split on) become ``\\.br\\`` and other control characters (C0 and C1) are dropped, so no value
can break the segment structure or the MLLP framing.

``send_mllp(message, host, port)`` sends a message over MLLP and returns the ACK; ``ack_for(message)``
builds an original-mode ACK for a received message (for receivers and tests).
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import time

from ..store.cases import label_names, signed_call
from .case_facts import (REPORT_STATUS_HL7, DEFAULT_DISCLAIMER, ai_call_text, differential_rows, first_model_analysis,
                         is_done, reported_review, result_status)

__all__ = ["HL7SendError", "ack_for", "escape", "oru_r01", "send_mllp", "unescape"]

HL7_VERSION = "2.5.1"
ENCODING_CHARS = "^~\\&"
SEGMENT_SEP = "\r"
MLLP_START = b"\x0b"
MLLP_END = b"\x1c\x0d"

_SEX = {"female": "F", "male": "M", "other": "O", "unknown": "U"}
_NOTE_TYPES = {  # NTE-4 comment type (local codes)
    "comment": ("COMMENT", "Signing physician comment"),
    "override": ("OVERRIDE", "Reason for overriding the AI result"),
    "uncertainty": ("UNCERTAINTY", "Note on signing an uncertain AI result"),
    "amendment": ("AMENDMENT", "Reason for the amendment"),
    "disclaimer": ("DISCLAIMER", "Decision-support disclaimer"),
}
_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("~", "\\R\\"), ("&", "\\T\\"))
_LINE_BREAK = re.compile("\r\n|[\r\x85\u2028\u2029]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


# ----------------------------------------------------------------------------- encoding helpers
def escape(value) -> str:
    """Escape one data value for use inside a field, component or sub-component.

    Delimiters become escape sequences, line breaks (CR, LF, CRLF, NEL, U+2028, U+2029) become
    ``\\.br\\``, other control characters (tab becomes a space) are removed. ``None`` becomes "".
    """
    if value is None:
        return ""
    text = _LINE_BREAK.sub("\n", str(value)).replace("\t", " ")
    text = _CONTROL.sub("", text)
    for raw, esc in _ESCAPES:
        text = text.replace(raw, esc)
    return text.replace("\n", "\\.br\\")


def unescape(value: str) -> str:
    """Inverse of :func:`escape` for the sequences it writes (``\\.br\\`` -> newline)."""
    table = {"F": "|", "S": "^", "R": "~", "T": "&", "E": "\\", ".br": "\n"}
    return re.sub(r"\\(F|S|R|T|E|\.br)\\", lambda m: table[m.group(1)], value)


def _comp(*parts) -> str:
    """Components (each escaped) joined with ``^``, trailing empty components dropped."""
    return "^".join(escape(p) for p in parts).rstrip("^")


def _sub(*parts) -> str:
    """Sub-components (each escaped) joined with ``&``, trailing empty ones dropped."""
    return "&".join(escape(p) for p in parts).rstrip("&")


def _ts(t: dt.datetime | None) -> str:
    return t.strftime("%Y%m%d%H%M%S") if t else ""


def _nm(x: float) -> str:
    """HL7 NM: plain decimal, no exponent, at most 6 decimals."""
    s = f"{float(x):.6f}".rstrip("0").rstrip(".")
    return "0" if s in ("", "-0") else s


def _segment(name: str, fields: dict[int, str]) -> str:
    """``fields``: field number -> already encoded value. Trailing empty fields are dropped."""
    n = max((k for k, v in fields.items() if v), default=0)
    return "|".join([name] + [fields.get(i, "") for i in range(1, n + 1)])


def _msh(fields: dict[int, str]) -> str:
    """MSH numbered as in the standard: MSH-1 is the field separator, MSH-2 the encoding characters."""
    n = max((k for k, v in fields.items() if v), default=2)
    return "MSH|" + "|".join([ENCODING_CHARS] + [fields.get(i, "") for i in range(3, n + 1)])


# ----------------------------------------------------------------------------- ORU^R01
def oru_r01(case, analyzer, sending_app: str = "ONCOSCOPE", sending_facility: str = "LAB",
            receiving_app: str = "", receiving_facility: str = "", control_id: str | None = None) -> str:
    """HL7 v2.5.1 ORU^R01 for a signed case; segments separated by ``\\r`` (no trailing separator).

    ``analyzer`` is the case's analyzer (``registry.get(case.analyzer_id)``): it supplies the
    analyzer name, label display names, version and disclaimer. The control id defaults to
    ``OSC<case id>V<review version>`` so a re-send of the same report version has the same id.
    Raises ``ValueError`` when the case is not signed, the analyzer does not match the case or the
    given control id is unusable.
    """
    review = _signed_review(case, analyzer)
    control_id = _control_id(case, review, control_id)
    status = REPORT_STATUS_HL7[result_status(review.version)]
    names = label_names(analyzer)
    signer = _signer(review)
    # MSH: MSH-1 is the field separator itself, so MSH-2 is the first item after "MSH|".
    msh = {3: escape(sending_app), 4: escape(sending_facility), 5: escape(receiving_app),
           6: escape(receiving_facility), 7: _ts(review.signed_at), 9: "ORU^R01^ORU_R01", 10: control_id,
           11: "P", 12: HL7_VERSION}
    obx = _ObxGroup(analyzer, status, sending_app)
    for idx, img in enumerate(case.images, start=1):
        _image_obx(obx, str(idx), img.analysis, names)
    _case_obx(obx, case, review, names, signer)
    segments = [_msh(msh), _pid(case.patient, sending_facility), *_orc(case, sending_app, sending_facility),
                _obr(case, analyzer, review, status, signer, sending_app, sending_facility),
                *_nte_segments(review, analyzer), *obx.segments()]
    if any(ord(c) > 127 for seg in segments for c in seg):  # UTF-8 on the wire (send_mllp): MSH-18
        segments[0] = _msh({**msh, 18: "UNICODE UTF-8"})
    return SEGMENT_SEP.join(segments)


def _signed_review(case, analyzer):
    review = reported_review(case)
    if review is None:
        raise ValueError(f"case {case.id} is not signed; only signed cases (or released preliminary results) "
                         "can be sent as ORU^R01")
    if getattr(analyzer, "id", None) != case.analyzer_id:
        raise ValueError(f"analyzer {getattr(analyzer, 'id', None)!r} does not match the case's "
                         f"analyzer {case.analyzer_id!r}")
    return review


def _control_id(case, review, control_id: str | None) -> str:
    if control_id is None:
        control_id = f"OSC{case.id}V{review.version}"
    control_id = str(control_id)
    if not control_id or len(control_id) > 199 or escape(control_id) != control_id:
        raise ValueError("control_id must be non-empty text without HL7 delimiters or control characters")
    return control_id


def _signer(review) -> tuple[str, str]:
    """(user id, name) of the signing physician."""
    signer = review.signed_by
    return (str(signer.id) if signer is not None else str(review.signed_by_id),
            signer.name if signer is not None else "")


def _pid(patient, sending_facility: str) -> str:
    return _segment("PID", {
        1: "1",
        3: _comp(patient.mrn, "", "", sending_facility, "MR"),
        5: _comp(patient.family_name, patient.given_name),
        7: patient.birth_date.strftime("%Y%m%d") if patient.birth_date else "",
        8: _SEX.get(patient.sex, "U"),
    })


def _placer(case, sending_app: str) -> str:
    """The placer order number: the LIS order's own (with the LIS's namespace) when the case answers
    one, else the case id under our name."""
    if getattr(case, "placer_order", None):
        return _comp(case.placer_order, getattr(case, "placer_app", None) or "")
    return _comp(case.id, sending_app)


def _orc(case, sending_app: str, sending_facility: str) -> list[str]:
    """ORC (results answering a LIS order): RE, the order's placer number and ours as filler."""
    if not getattr(case, "placer_order", None):
        return []
    return [_segment("ORC", {1: "RE", 2: _placer(case, sending_app), 3: _comp(case.id, sending_facility), 5: "CM"})]


def _obr(case, analyzer, review, status: str, signer: tuple[str, str], sending_app: str,
         sending_facility: str) -> str:
    accession = getattr(case, "accession_number", None)
    return _segment("OBR", {
        1: "1",
        2: _placer(case, sending_app),
        3: _comp(case.id, sending_facility),
        **({18: escape(accession)} if accession else {}),
        4: _comp(analyzer.id, analyzer.name, "L"),
        7: _ts(case.created_at),
        22: _ts(review.signed_at),
        25: status,
        32: _sub(*signer),
    })


def _nte_segments(review, analyzer) -> list[str]:
    """The report notes: the physician's texts, then the decision-support disclaimer."""
    notes = [("comment", review.comment), ("override", review.override_reason),
             ("uncertainty", review.uncertainty_note),
             ("amendment", review.amendment_reason if review.version > 1 else ""),
             ("disclaimer", analyzer.report_wording.get("disclaimer") or DEFAULT_DISCLAIMER)]
    notes = [(kind, text.strip()) for kind, text in notes if text and text.strip()]
    return [_segment("NTE", {1: str(n), 2: "L", 3: escape(text), 4: _comp(*_NOTE_TYPES[kind], "L")})
            for n, (kind, text) in enumerate(notes, start=1)]


class _ObxGroup:
    """The OBX segments of one message, in order. Every result carries the message's result status
    (OBX-11); AI-derived results name the analyzer and model version as equipment (OBX-18)."""

    def __init__(self, analyzer, status: str, sending_app: str):
        self.analyzer, self.status, self.sending_app = analyzer, status, sending_app
        self.rows: list[dict[int, str]] = []

    def add(self, value_type: str, code: str, text: str, value: str, sub_id: str = "", units: str = "",
            ref_range: str = "", when: dt.datetime | None = None, observer: str = "", equipment: str = "",
            system: str = "L", abnormal: str = "") -> None:
        self.rows.append({2: value_type, 3: _comp(code, text, system), 4: sub_id, 5: value, 6: units, 7: ref_range,
                          8: abnormal, 11: self.status, 14: _ts(when), 16: observer, 18: equipment})

    def equipment(self, version: str | None) -> str:
        return _comp(f"{self.analyzer.id}:{version or self.analyzer.version}", self.sending_app)

    def segments(self) -> list[str]:
        return [_segment("OBX", {1: str(n), **fields}) for n, fields in enumerate(self.rows, start=1)]


def _image_obx(obx: _ObxGroup, sub: str, a, names: dict[str, str]) -> None:
    """One image (OBX-4 sub-ID): its AI status, and when done its class, probabilities and cell count."""
    if not is_done(a):
        st = "failed" if a is not None and a.job_status == "failed" else "pending"
        obx.add("ST", "AI-STATUS", "AI result status", escape(st), sub)
        return
    eq = obx.equipment(a.model_version)
    obx.add("ST", "AI-STATUS", "AI result status", escape(a.result_status or "error"), sub,
            when=a.finished_at, equipment=eq)
    if a.label:
        obx.add("CWE", "AI-CLASS", "AI class", _comp(a.label, names.get(a.label, a.label), "L"), sub,
                when=a.finished_at, equipment=eq)
    for label, p in (a.probabilities or {}).items():
        obx.add("NM", f"AI-PROB-{label}", f"AI probability: {names.get(label, label)}", _nm(p), sub,
                units=_comp("1", "", "UCUM"), ref_range="0-1", when=a.finished_at, equipment=eq)
    if a.cell_count is not None:
        obx.add("NM", "CELL-COUNT", "Cell count", _nm(a.cell_count), sub, units=_comp("{cells}", "", "UCUM"),
                when=a.finished_at, equipment=eq)


def _case_obx(obx: _ObxGroup, case, review, names: dict[str, str], signer: tuple[str, str]) -> None:
    """The case (no sub-ID): the AI call and its status, the signed diagnosis and the agreement."""
    agg = signed_call(case)
    first = first_model_analysis(case)
    eq = obx.equipment(first.model_version if first else None)
    obx.add("ST", "AI-CALL", "AI aggregate call", escape(ai_call_text(agg, names)), equipment=eq)
    obx.add("ST", "AI-CALL-STATUS", "AI aggregate status", escape(review.ai_status or agg.status), equipment=eq)
    observer = _comp(*signer)
    obx.add("CWE", "FINAL-DX", "Final diagnosis",
            _comp(review.final_diagnosis, names.get(review.final_diagnosis, review.final_diagnosis), "L"),
            when=review.signed_at, observer=observer)
    obx.add("CWE", "AI-AGREE", "Final diagnosis agrees with AI call", _agreement(review), when=review.signed_at,
            observer=observer)
    # the verified differential: LOINC-coded, the verifier as observer, the model as equipment
    rows = differential_rows(review)
    for row in rows:
        obx.add("NM", row.loinc, row.display, _nm(row.value), units=_comp(row.unit, "", "UCUM"),
                when=review.signed_at, observer=observer, equipment=eq, system="LN", abnormal="H" if row.abnormal else "")
    if rows:  # cells nobody could place: counted in the denominator, no code of their own
        obx.add("NM", "CELLS-UNIDENTIFIED", "White cells left unidentified (in the denominator)",
                _nm(rows[0].unidentified), units=_comp("{cells}", "", "UCUM"),
                when=review.signed_at, observer=observer, equipment=eq)


def _agreement(review) -> str:
    """Y/N (HL7 table 0136), or NA when there was no AI call to agree with."""
    if review.ai_label is None:
        return _comp("NA", "Not applicable (no AI call)", "L")
    if review.agrees_with_ai:
        return _comp("Y", "Yes", "HL70136")
    return _comp("N", "No", "HL70136")


# ----------------------------------------------------------------------------- ACK
def _segments(message: str) -> list[str]:
    text = message.strip("\x0b\x1c\r\n ")
    return [s for s in re.split(r"\r\n|\r|\n", text) if s]


def _split_msh(seg: str) -> list[str]:
    """MSH fields indexed like HL7 (index 1 = field separator, 2 = encoding characters, ...)."""
    if not seg.startswith("MSH") or len(seg) < 8:
        raise ValueError("the message does not start with an MSH segment")
    sep = seg[3]
    parts = seg.split(sep)
    return ["MSH", sep] + parts[1:]


def ack_for(message: str, code: str = "AA", text: str = "") -> str:
    """An original-mode ACK for ``message``: MSH (sender/receiver swapped, type ``ACK^<trigger>^ACK``,
    processing id and version copied), MSA (code, the message's control id, escaped text) and, for
    error codes, an ERR segment. Raises ``ValueError`` for an unusable message or code."""
    if code not in ("AA", "AE", "AR", "CA", "CE", "CR"):
        raise ValueError(f"unknown acknowledgement code {code!r}")
    segs = _segments(message)
    if not segs:
        raise ValueError("empty message")
    f = _split_msh(segs[0])
    get = lambda i: f[i] if i < len(f) else ""  # noqa: E731
    comp = f[2][0] if f[2] else "^"
    trigger = get(9).split(comp)[1] if comp in get(9) else ""
    control = get(10)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d%H%M%S")
    msh = {3: get(5), 4: get(6), 5: get(3), 6: get(4), 7: now,
           9: f"ACK^{trigger}^ACK" if trigger else "ACK", 10: f"ACK{control}"[:199],
           11: get(11) or "P", 12: get(12) or HL7_VERSION}
    out = [_msh(msh),
           _segment("MSA", {1: code, 2: control, 3: escape(text)})]
    if code not in ("AA", "CA"):
        out.append(_segment("ERR", {3: "207^Application internal error^HL70357", 4: "E", 8: escape(text)}))
    return SEGMENT_SEP.join(out)


# ----------------------------------------------------------------------------- MLLP
class HL7SendError(RuntimeError):
    """Sending failed. ``code``: the MSA-1 code when the receiver answered with an error, else None;
    ``ack``: the raw ACK when there was one; ``attempts``: how many sends were tried."""

    def __init__(self, message: str, code: str | None = None, ack: str | None = None, attempts: int = 0):
        super().__init__(message)
        self.code = code
        self.ack = ack
        self.attempts = attempts


class _Retryable(Exception):
    def __init__(self, message: str, code: str | None = None, ack: str | None = None):
        super().__init__(message)
        self.code = code
        self.ack = ack


def _exchange(payload: bytes, host: str, port: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(payload)
            buf = b""
            while MLLP_END not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout()
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    raise _Retryable("the receiver closed the connection without a complete MLLP reply"
                                     + (" (partial data received)" if buf else ""))
                buf += chunk
                if len(buf) > 16 * 2**20:
                    raise _Retryable("the receiver's reply is too large")
    except ConnectionRefusedError:
        raise _Retryable(f"connection refused by {host}:{port}") from None
    except (socket.timeout, TimeoutError):
        raise _Retryable(f"no ACK from {host}:{port} within {timeout:g} s") from None
    except OSError as exc:
        raise _Retryable(f"network error talking to {host}:{port}: {exc}") from None
    start = buf.find(MLLP_START)
    if start < 0 or start > buf.find(MLLP_END):
        raise _Retryable("malformed MLLP reply (no start block)")
    return buf[start + 1:buf.find(MLLP_END)].decode("utf-8", errors="replace")


def _parse_ack(ack: str, control_id: str) -> tuple[str, str]:
    """(MSA-1, text) of an ACK; raises _Retryable when it is not a usable ACK for this message."""
    segs = _segments(ack)
    try:
        sep = _split_msh(segs[0])[1] if segs else ""
    except ValueError:
        sep = ""
    if not sep:
        raise _Retryable("malformed ACK (no MSH segment)", ack=ack)
    msa = next((s.split(sep) for s in segs if s.startswith("MSA" + sep)), None)
    if msa is None or len(msa) < 2 or msa[1] not in ("AA", "AE", "AR", "CA", "CE", "CR"):
        raise _Retryable("malformed ACK (no MSA segment with a valid acknowledgement code)", ack=ack)
    if control_id and len(msa) > 2 and msa[2] and msa[2] != control_id:
        raise _Retryable(f"ACK is for message {msa[2]!r}, not {control_id!r}", ack=ack)
    text = unescape(msa[3]) if len(msa) > 3 else ""
    if not text:  # v2.5 moved the error text to ERR-8
        err = next((s.split(sep) for s in segs if s.startswith("ERR" + sep)), None)
        if err is not None and len(err) > 8:
            text = unescape(err[8])
    return msa[1], text


def send_mllp(message: str, host: str, port: int, timeout: float = 10, retries: int = 3,
              backoff: float = 0.5) -> str:
    """Send one message over MLLP (``0x0B`` message ``0x1C 0x0D``, UTF-8) and return the ACK text.

    A fresh connection per attempt; ``timeout`` bounds connect + send + wait for the ACK. MSA-1
    AA/CA returns the ACK. AR/CR (rejected) raise :class:`HL7SendError` at once; AE/CE (error) and
    connection refused, timeouts, a closed connection or a malformed ACK are retried up to
    ``retries`` more times with exponential backoff (``backoff``, ``2*backoff``, ...), then raise
    :class:`HL7SendError` with the last problem (MSA-3 text for AE/CE).
    """
    segs = _segments(message)
    if not segs:
        raise ValueError("empty message")
    f = _split_msh(segs[0])
    control_id = f[10] if len(f) > 10 else ""
    payload = MLLP_START + SEGMENT_SEP.join(segs).encode("utf-8") + MLLP_END
    attempts = max(0, int(retries)) + 1
    last: _Retryable | None = None
    for attempt in range(1, attempts + 1):
        try:
            ack = _exchange(payload, host, port, timeout)
            code, text = _parse_ack(ack, control_id)
            if code in ("AA", "CA"):
                return ack
            if code in ("AR", "CR"):
                raise HL7SendError(f"message {control_id} rejected by {host}:{port} ({code}): "
                                   f"{text or 'no reason given'}", code=code, ack=ack, attempts=attempt)
            raise _Retryable(f"message {control_id} not accepted by {host}:{port} ({code}): "
                             f"{text or 'no reason given'}", code=code, ack=ack)
        except _Retryable as exc:
            last = exc
            if attempt < attempts:
                time.sleep(backoff * 2 ** (attempt - 1))
    raise HL7SendError(f"sending HL7 message {control_id} to {host}:{port} failed after {attempts} "
                       f"attempt{'s' if attempts > 1 else ''}: {last}", code=last.code, ack=last.ack,
                       attempts=attempts)
