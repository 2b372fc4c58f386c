"""HL7 v2.5.1 ORU^R01 for signed cases and MLLP transport (oncoscope.reports.hl7v2).

One migrated SQLite database per module (users created once with cheap argon2 parameters); each
test builds its own patient and case, with analyses written directly (no model inference). The
MLLP tests run a small in-process listener on 127.0.0.1 with sub-second timeouts.
"""

from __future__ import annotations

import datetime as dt
import itertools
import socket
import threading
import time

import pytest

hl7 = pytest.importorskip("hl7")

from oncoscope.reports.hl7v2 import HL7SendError, ack_for, escape, oru_r01, send_mllp, unescape  # noqa: E402

BR = {".br": "\n"}  # python-hl7 maps \.br\ to "\r" by default
_mrn = itertools.count(1)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def analyzer():
    from oncoscope.analyzers import registry

    if "smear-all" not in registry.available():
        pytest.fail("the shipped smear-all model is missing from oncoscope/models/smear-all")
    return registry.get("smear-all")


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    from argon2 import PasswordHasher

    from oncoscope.store import migrate
    from oncoscope.store import users as user_store
    from oncoscope.store.db import make_engine, make_session_factory

    mp = pytest.MonkeyPatch()
    mp.setattr(user_store, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    url = f"sqlite:///{tmp_path_factory.mktemp('hl7') / 'oncoscope.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    f = make_session_factory(engine)
    with f() as s:
        user_store.create_user(s, "doctor@clinic.test", "Dr Alice A", "doctor-pass-123!", "doctor")
        user_store.create_user(s, "other@clinic.test", "Dr Bob B", "doctor-pass-456!", "doctor")
        s.commit()
    yield f
    engine.dispose()
    mp.undo()


@pytest.fixture()
def db(factory):
    s = factory()
    yield s
    s.close()


def _user(s, email="doctor@clinic.test"):
    from oncoscope.store.models import User

    return s.query(User).filter_by(email=email).one()


PROBS = [{"Benign": 0.01, "Early": 0.02, "Pre": 0.07, "Pro": 0.9},
         {"Benign": 0.05, "Early": 0.05, "Pre": 0.1, "Pro": 0.8}]


def make_case(s, probs=PROBS, status="ok", patient=None, sign=True, **sign_kwargs):
    """A case with one done analysis per entry of ``probs`` (label = argmax), optionally signed."""
    from oncoscope.store import cases as case_store
    from oncoscope.store.models import Analysis, CaseImage, Patient

    user = _user(s)
    values = {"family_name": "Doe", "given_name": "Jane", "sex": "female", "birth_date": dt.date(1980, 2, 3),
              **(patient or {})}
    p = Patient(mrn=f"MRN-{next(_mrn):04d}", created_by_id=user.id, **values)
    s.add(p)
    s.flush()
    case = case_store.create_case(s, user, p, "smear-all", "fever")
    case.created_at = dt.datetime(2026, 3, 4, 8, 9, 10)
    for i, pr in enumerate(probs):
        img = CaseImage(case_id=case.id, sha256=f"{case.id:08d}{i:056d}", original_filename=f"f{i}.png",
                        content_type="PNG", width=100, height=100, size_bytes=1000, uploaded_by_id=user.id)
        s.add(img)
        s.flush()
        label = max(pr, key=pr.get)
        s.add(Analysis(image_id=img.id, analyzer_id="smear-all", job_status="done", attempts=1,
                       model_version="1.0.0", model_sha256="ab" * 32, result_status=status, label=label,
                       confidence=pr[label], malignant=label != "Benign", malignant_probability=1 - pr["Benign"],
                       probabilities=pr, cell_count=10 + i, cells=[], messages=[],
                       finished_at=dt.datetime(2026, 3, 4, 8, 10, i)))
    case.status = "ready"
    s.flush()
    s.refresh(case)
    if sign:
        from oncoscope.analyzers import registry

        labels = [k for k, _ in case_store.diagnosis_options(registry.get("smear-all"))]
        sign_kwargs.setdefault("final_diagnosis", "Pro")
        case_store.sign(s, case, user, valid_labels=labels, **sign_kwargs)
        case.reviews[-1].signed_at = dt.datetime(2026, 3, 5, 14, 15, 16)
    s.commit()
    return case


def F(seg, n, comp=None) -> str:
    """Field ``n`` (HL7 numbering) of a python-hl7 segment, or component ``comp`` of its first
    repetition; "" when absent (python-hl7 gives plain strings for simple or empty fields)."""
    try:
        v = seg(n)
    except IndexError:
        return ""
    if comp is None:
        return str(v)
    parts = str(v).split("~")[0].split("^")  # escaped data never holds a raw delimiter
    return parts[comp - 1] if comp <= len(parts) else ""


def obx_rows(msg):
    """[(code, sub_id, value_type, value, units, status, equipment)] with values unescaped."""
    out = []
    for seg in msg.segments("OBX"):
        out.append((F(seg, 3, 1), F(seg, 4), F(seg, 2), msg.unescape(F(seg, 5), BR),
                    F(seg, 6, 1), F(seg, 11), F(seg, 18)))
    return out


# ----------------------------------------------------------------------------- ORU^R01
def test_unsigned_case_is_refused(db, analyzer):
    case = make_case(db, sign=False)
    with pytest.raises(ValueError, match="not signed"):
        oru_r01(case, analyzer)


def test_oru_structure_header_patient_order(db, analyzer):
    case = make_case(db, patient={"family_name": "Doe", "given_name": "Jane"})
    text = oru_r01(case, analyzer, receiving_app="LIS", receiving_facility="HOSP")
    assert "\n" not in text and not text.endswith("\r")
    msg = hl7.parse(text)
    assert [F(s, 0) for s in msg][:3] == ["MSH", "PID", "OBR"]

    msh = msg.segment("MSH")
    assert F(msh, 2) == "^~\\&"
    assert [str(msh(i)) for i in (3, 4, 5, 6)] == ["ONCOSCOPE", "LAB", "LIS", "HOSP"]
    assert F(msh, 7) == "20260305141516"
    assert F(msh, 9) == "ORU^R01^ORU_R01"
    assert F(msh, 10) == f"OSC{case.id}V1"
    assert (F(msh, 11), F(msh, 12)) == ("P", "2.5.1")
    assert oru_r01(case, analyzer) == oru_r01(case, analyzer)  # deterministic
    assert str(hl7.parse(oru_r01(case, analyzer, control_id="X-1")).segment("MSH")(10)) == "X-1"

    pid = msg.segment("PID")
    assert F(pid, 3, 1) == case.patient.mrn
    assert F(pid, 3, 4) == "LAB" and F(pid, 3, 5) == "MR"
    assert (F(pid, 5, 1), F(pid, 5, 2)) == ("Doe", "Jane")
    assert (F(pid, 7), F(pid, 8)) == ("19800203", "F")

    obr = msg.segment("OBR")
    assert F(obr, 2, 1) == str(case.id) and F(obr, 3, 1) == str(case.id)
    assert F(obr, 4, 1) == "smear-all" and F(obr, 4, 2) == analyzer.name and F(obr, 4, 3) == "L"
    assert F(obr, 7) == "20260304080910"
    assert F(obr, 25) == "F"
    assert "Dr Alice A" in F(obr, 32)


def test_obx_values(db, analyzer):
    case = make_case(db)
    msg = hl7.parse(oru_r01(case, analyzer))
    rows = obx_rows(msg)
    # per image: status + class + 4 probabilities + cell count; then call, call status, final dx, agreement
    assert len(rows) == 2 * (1 + 1 + 4 + 1) + 4
    assert [F(s, 1) for s in msg.segments("OBX")] == [str(i) for i in range(1, len(rows) + 1)]
    assert all(r[5] == "F" for r in rows)
    for idx, probs in enumerate(PROBS, start=1):
        mine = [r for r in rows if r[1] == str(idx)]
        nm = {r[0]: float(r[3]) for r in mine if r[0].startswith("AI-PROB-")}
        assert nm == {f"AI-PROB-{k}": pytest.approx(v) for k, v in probs.items()}
        assert sum(nm.values()) == pytest.approx(1.0, abs=1e-6)
        assert all(r[2] == "NM" and r[4] == "1" for r in mine if r[0].startswith("AI-PROB-"))
        cls = next(r for r in mine if r[0] == "AI-CLASS")
        assert cls[2] == "CWE" and cls[3].split("^")[:2] == ["Pro", "Pro-B ALL"]
        assert next(r for r in mine if r[0] == "AI-STATUS")[2:4] == ("ST", "ok")
        assert next(r for r in mine if r[0] == "CELL-COUNT")[2:4] == ("NM", str(9 + idx))
        assert all(r[6] == "smear-all:1.0.0^ONCOSCOPE" for r in mine)
    case_level = {r[0]: r for r in rows if r[1] == ""}
    assert set(case_level) == {"AI-CALL", "AI-CALL-STATUS", "FINAL-DX", "AI-AGREE"}
    assert case_level["AI-CALL"][2] == "ST" and case_level["AI-CALL"][3].startswith("Pro-B ALL: 2 of 2 usable images (2 in all) positive for malignancy")
    assert case_level["AI-CALL-STATUS"][3] == "ok"
    assert case_level["FINAL-DX"][2] == "CWE" and case_level["FINAL-DX"][3] == "Pro^Pro-B ALL^L"
    assert case_level["AI-AGREE"][3] == "Y^Yes^HL70136"
    final = next(s for s in msg.segments("OBX") if F(s, 3, 1) == "FINAL-DX")
    assert "Dr Alice A" in F(final, 16) and F(final, 14) == "20260305141516"


def test_override_uncertainty_notes_and_disagreement(db, analyzer):
    case = make_case(db, status="uncertain", final_diagnosis="Benign", override_reason="Flow shows hematogones",
                     uncertainty_note="Poor staining", comment="See flow report")
    msg = hl7.parse(oru_r01(case, analyzer))
    notes = {F(n, 4, 1): msg.unescape(F(n, 3), BR) for n in msg.segments("NTE")}
    assert notes == {"COMMENT": "See flow report", "OVERRIDE": "Flow shows hematogones",
                     "UNCERTAINTY": "Poor staining", "DISCLAIMER": analyzer.report_wording["disclaimer"]}
    rows = {r[0]: r for r in obx_rows(msg) if r[1] == ""}
    assert rows["FINAL-DX"][3].startswith("Benign^Benign (hematogone)")
    assert rows["AI-AGREE"][3] == "N^No^HL70136"
    assert rows["AI-CALL-STATUS"][3] == "uncertain"


def test_amendment_is_corrected_result(db, analyzer):
    from oncoscope.store import cases as case_store

    case = make_case(db)
    labels = [k for k, _ in case_store.diagnosis_options(analyzer)]
    case_store.sign(db, case, _user(db), "Pre", labels, override_reason="Second look",
                    amendment_reason="Typo in first report")
    db.commit()
    text = oru_r01(case, analyzer)
    msg = hl7.parse(text)
    assert str(msg.segment("OBR")(25)) == "C"
    assert all(r[5] == "C" for r in obx_rows(msg))
    assert str(msg.segment("MSH")(10)) == f"OSC{case.id}V2"
    notes = {F(n, 4, 1): msg.unescape(F(n, 3), BR) for n in msg.segments("NTE")}
    assert notes["AMENDMENT"] == "Typo in first report" and notes["OVERRIDE"] == "Second look"


def test_free_text_is_escaped_and_round_trips(db, analyzer):
    nasty = "a|b^c~d\\e&f\nsecond line\r\nthird\x0bx\x1c"
    case = make_case(db, comment=nasty, patient={"family_name": "O'Brien|^&", "given_name": "Zoë~"})
    text = oru_r01(case, analyzer, sending_facility="LAB&1")
    assert "\x0b" not in text and "\x1c" not in text and "\n" not in text
    msg = hl7.parse(text)
    assert len(msg) == len(text.split("\r"))  # no extra segments from the comment's line breaks
    comment = next(n for n in msg.segments("NTE") if F(n, 4, 1) == "COMMENT")
    assert len(comment) == 5  # no extra fields
    assert msg.unescape(F(comment, 3), BR) == "a|b^c~d\\e&f\nsecond line\nthirdx"
    assert unescape(F(comment, 3)) == "a|b^c~d\\e&f\nsecond line\nthirdx"
    pid = msg.segment("PID")
    assert msg.unescape(F(pid, 5, 1)) == "O'Brien|^&" and msg.unescape(F(pid, 5, 2)) == "Zoë~"
    assert msg.unescape(F(pid, 3, 4)) == "LAB&1"
    assert str(msg.segment("MSH")(18)) == "UNICODE UTF-8"  # non-ASCII name declared
    assert escape("|^~\\&") == "\\F\\\\S\\\\R\\\\E\\\\T\\"


def test_identifiers_names_and_comments_stay_in_their_field(db, analyzer):
    """An MRN stored before MRNs were restricted, names and a comment holding every delimiter and the
    line breaks that str.splitlines-based readers split on: each value parses back whole, in its field."""
    mrn = "B-001\\ZZ|x^y~z&w\nq"
    family, given = "O'Brien|^~\\&\u2028X", "Ja\x85ne\u2029"
    comment = "a|b^c~d\\e&f\x85g\u2028h\u2029i\x9bj\rk"
    case = make_case(db, comment=comment, patient={"family_name": family, "given_name": given})
    case.patient.mrn = mrn
    db.commit()
    text = oru_r01(case, analyzer)
    assert text.splitlines() == text.split("\r")  # no reader finds extra segments
    msg = hl7.parse(text)
    pid = msg.segment("PID")
    assert len(pid) == 9 and len(str(pid(3)).split("^")) == 5 and len(str(pid(5)).split("^")) == 2
    assert msg.unescape(F(pid, 3, 1), BR) == mrn and F(pid, 3, 5) == "MR"
    assert msg.unescape(F(pid, 5, 1), BR) == "O'Brien|^~\\&\nX" and msg.unescape(F(pid, 5, 2), BR) == "Ja\nne\n"
    note = next(n for n in msg.segments("NTE") if F(n, 4, 1) == "COMMENT")
    assert len(note) == 5 and msg.unescape(F(note, 3), BR) == "a|b^c~d\\e&f\ng\nh\nij\nk"
    assert escape("\x85\u2028\u2029\x9b") == "\\.br\\\\.br\\\\.br\\"


def test_analyzer_mismatch_and_bad_control_id(db, analyzer):
    case = make_case(db)

    class Other:
        id = "other"

    with pytest.raises(ValueError, match="does not match"):
        oru_r01(case, Other())
    with pytest.raises(ValueError, match="control_id"):
        oru_r01(case, analyzer, control_id="a|b")


def test_ack_for():
    msg = "MSH|^~\\&|ONCOSCOPE|LAB|LIS|HOSP|20260305141516||ORU^R01^ORU_R01|C42|P|2.5.1\rPID|1"
    ack = hl7.parse(ack_for(msg))
    msh = ack.segment("MSH")
    assert [str(msh(i)) for i in (3, 4, 5, 6)] == ["LIS", "HOSP", "ONCOSCOPE", "LAB"]
    assert F(msh, 9) == "ACK^R01^ACK" and (F(msh, 11), F(msh, 12)) == ("P", "2.5.1")
    assert [str(x) for x in ack.segment("MSA")[1:3]] == ["AA", "C42"]
    err = hl7.parse(ack_for(msg, "AE", "bad | thing"))
    assert ack.unescape(str(err.segment("MSA")(3))) == "bad | thing"
    assert str(err.segment("ERR")(4)) == "E"


# ----------------------------------------------------------------------------- MLLP
class Listener:
    """MLLP listener on 127.0.0.1:0. ``script``: one action per received message (the last one
    repeats): "AA"/"AE"/"AR"/... reply with that ACK code, "close" hangs up without replying,
    "delay" waits (past the client's timeout) without replying, "garbage" replies with a non-HL7 frame."""

    def __init__(self, script):
        self.script = list(script)
        self.received: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.handlers: list[threading.Thread] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            t.start()
            self.handlers.append(t)

    def _handle(self, conn):
        with conn:
            conn.settimeout(2)
            buf = b""
            try:
                while b"\x1c\r" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
            except OSError:
                return
            if not buf.startswith(b"\x0b") or b"\x1c\r" not in buf:
                return
            text = buf[1:buf.index(b"\x1c\r")].decode("utf-8")
            with self.lock:
                self.received.append(text)
                action = self.script[min(len(self.received), len(self.script)) - 1]
            if action == "close":
                return
            if action == "delay":
                self.stop.wait(1.0)
                return
            reply = "not an ack" if action == "garbage" else ack_for(text, action, f"answer {action}")
            try:
                conn.sendall(b"\x0b" + reply.encode() + b"\x1c\r")
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.thread.join(2)
        for t in self.handlers:
            t.join(2)
        self.sock.close()


@pytest.fixture()
def listen():
    made = []

    def _make(*script):
        lst = Listener(script)
        made.append(lst)
        return lst

    yield _make
    for lst in made:
        lst.close()


MESSAGE = "MSH|^~\\&|ONCOSCOPE|LAB|LIS|HOSP|20260305141516||ORU^R01^ORU_R01|C42|P|2.5.1\rPID|1||M1^^^LAB^MR"
FAST = {"timeout": 0.3, "retries": 2, "backoff": 0.02}


def test_send_success_returns_aa(listen):
    lst = listen("AA")
    ack = send_mllp(MESSAGE, "127.0.0.1", lst.port, **FAST)
    assert str(hl7.parse(ack).segment("MSA")(1)) == "AA"
    assert str(hl7.parse(ack).segment("MSA")(2)) == "C42"
    assert lst.received == [MESSAGE]


def test_send_real_oru(listen, db, analyzer):
    case = make_case(db, comment="multi\nline | comment")
    text = oru_r01(case, analyzer)
    lst = listen("AA")
    send_mllp(text, "127.0.0.1", lst.port, **FAST)
    assert lst.received == [text]


def test_ae_is_retried_then_succeeds(listen):
    lst = listen("AE", "AA")
    ack = send_mllp(MESSAGE, "127.0.0.1", lst.port, **FAST)
    assert str(hl7.parse(ack).segment("MSA")(1)) == "AA"
    assert lst.received == [MESSAGE, MESSAGE]


def test_ae_every_time_raises_with_text(listen):
    lst = listen("AE")
    with pytest.raises(HL7SendError, match="answer AE") as ei:
        send_mllp(MESSAGE, "127.0.0.1", lst.port, **FAST)
    assert ei.value.code == "AE" and ei.value.attempts == 3
    assert len(lst.received) == 3


def test_ar_raises_without_retry(listen):
    lst = listen("AR")
    with pytest.raises(HL7SendError, match="rejected.*answer AR") as ei:
        send_mllp(MESSAGE, "127.0.0.1", lst.port, **FAST)
    assert ei.value.code == "AR" and ei.value.attempts == 1
    assert len(lst.received) == 1


def test_connection_refused_raises_after_retries():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t0 = time.monotonic()
    with pytest.raises(HL7SendError, match="after 3 attempts.*refused") as ei:
        send_mllp(MESSAGE, "127.0.0.1", port, **FAST)
    assert ei.value.code is None and ei.value.attempts == 3
    assert time.monotonic() - t0 >= 0.02 + 0.04  # backed off between attempts


def test_closed_without_reply_is_retried(listen):
    lst = listen("close", "AA")
    send_mllp(MESSAGE, "127.0.0.1", lst.port, **FAST)
    assert len(lst.received) == 2
    lst2 = listen("close")
    with pytest.raises(HL7SendError, match="closed the connection"):
        send_mllp(MESSAGE, "127.0.0.1", lst2.port, **{**FAST, "retries": 1})
    assert len(lst2.received) == 2


def test_timeout_is_handled(listen):
    lst = listen("delay")
    t0 = time.monotonic()
    with pytest.raises(HL7SendError, match="no ACK .* within 0.2 s"):
        send_mllp(MESSAGE, "127.0.0.1", lst.port, timeout=0.2, retries=1, backoff=0.01)
    assert time.monotonic() - t0 < 1.5


def test_timeout_then_success(listen):
    lst = listen("delay", "AA")
    ack = send_mllp(MESSAGE, "127.0.0.1", lst.port, timeout=0.2, retries=1, backoff=0.01)
    assert "MSA|AA|C42" in ack


def test_malformed_reply_is_retried(listen):
    lst = listen("garbage", "AA")
    assert "MSA|AA" in send_mllp(MESSAGE, "127.0.0.1", lst.port, **FAST)
    lst2 = listen("garbage")
    with pytest.raises(HL7SendError, match="malformed ACK"):
        send_mllp(MESSAGE, "127.0.0.1", lst2.port, **{**FAST, "retries": 0})
