"""The audit trail: append, verify, search, export.

Every entry is hashed together with the previous entry's hash (a hash chain):
``hash = SHA-256(prev_hash + "\\n" + canonical JSON of the entry)``. Changing, removing or inserting
an entry breaks the chain from that point on, and the head row (last seq and hash) must match the
last entry, so cutting entries off the end is found too. ``verify`` recomputes the whole chain.

The chain has no key: someone with write access to the database can remove entries and recompute
every hash and the head, and the chain is consistent again. Signed checkpoints catch that. A
checkpoint is the head (seq, hash) at some time, signed with the instance's Ed25519 key
(store/signing.py), which the database never sees. ``verify`` with checkpoints requires every
entry named by one to still have the signed hash, so a chain rewritten before the latest
checkpoint fails. Each checkpoint also signs its place in the file (``index``) and the SHA-256 of
the previous checkpoint's signature (``prev``; zeros for the first), so checkpoints cannot be
removed from the start or the middle, or reordered, and an empty file is refused. Checkpoint
file (JSON)::

    {"format": 3, "checkpoints": [{"index": 0, "seq": 41, "hash": "<hex>", "at": "2025-01-31T02:30:00Z",
                                   "prev": "000...0", "signature": {"algorithm": "ed25519", ...}}, ...]}

The newest checkpoints can still be cut off the end (or an older copy put back) without a
signature failing: that needs write access to the application host, and ``audit verify`` prints
the newest checkpoint's entry and time so that an operator can notice it.

Appends lock the head row (``UPDATE audit_head SET seq = seq + 1`` first), which serialises writers
across threads, processes and machines on every supported database, so there is one chain in one
order. When the database cannot take an entry (it is down), the entry goes to a local spool file
(JSON Lines, fsync'd) and is appended, in order, the next time an append succeeds: nothing is lost.

No passwords, tokens or secrets are ever written: ``clean_details`` drops keys that look like one.
"""

from __future__ import annotations

import csv
import datetime as dt
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from . import signing
from .db import is_retryable, make_engine, make_session_factory
from .models import AuditEvent, AuditHead, utcnow
from .patients import Page

log = logging.getLogger("oncoscope.audit")

GENESIS = "0" * 64
# entries written outside web requests
SYSTEM_ACTIONS = ("backup.create", "backup.restore", "audit.verify", "audit.checkpoint", "audit.export_cli",
                  "user.create_cli", "user.update_cli",
                  # hospital integration: what other systems did (services/dicom_receiver, lis, deliveries)
                  "dicom.association", "lis.order", "lis.connection", "delivery.send")
OUTCOMES = ("success", "denied", "failure", "rejected", "error")
# the columns covered by the hash, in the order they are exported
HASHED = ("seq", "at", "actor_id", "actor", "actor_role", "channel", "action", "method", "path", "resource_type",
          "resource_id", "patient_id", "outcome", "status_code", "ip", "user_agent", "details")
LIMITS = {"actor": 255, "actor_role": 20, "channel": 8, "action": 64, "method": 8, "path": 500,
          "resource_type": 32, "resource_id": 64, "outcome": 16, "ip": 64, "user_agent": 255}
SECRET_WORDS = ("password", "passwd", "secret", "csrf", "authorization", "cookie", "api_key")
SECRET_KEYS = ("token", "access_token", "bearer", "session", "key")
TOKEN_RE = re.compile(r"osk_[0-9a-f]+_[A-Za-z0-9_\-]+")


def _text(value, limit: int) -> str:
    """A string every database stores and returns unchanged (so the hash survives the round trip);
    anything shaped like an API token is blanked out."""
    s = "" if value is None else str(value)
    s = TOKEN_RE.sub("osk_[redacted]", s)
    s = s.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    return s[:limit]


def clean_details(details: dict | None) -> dict:
    """JSON-safe, bounded, and free of anything that looks like a secret."""
    out: dict = {}
    for k, v in (details or {}).items():
        key = _text(k, 40)
        if any(w in key.lower() for w in SECRET_WORDS) or key.lower() in SECRET_KEYS:
            continue
        if isinstance(v, bool) or v is None or (isinstance(v, int) and abs(v) < 2**53):
            out[key] = v
        elif isinstance(v, (list, tuple)):
            out[key] = [x if isinstance(x, int) and not isinstance(x, bool) else _text(x, 100) for x in list(v)[:100]]
        else:
            out[key] = _text(v, 300)
        if len(out) >= 20:
            break
    return out


def normalise(event: dict) -> dict:
    """Fill defaults and bound every field the way the table stores it."""
    e = {k: event.get(k) for k in HASHED if k not in ("seq",)}
    at = e["at"] or utcnow()
    if isinstance(at, str):
        at = dt.datetime.fromisoformat(at)
    e["at"] = at.replace(microsecond=0, tzinfo=None)
    for k, n in LIMITS.items():
        e[k] = _text(e.get(k), n)
    e["actor"] = e["actor"] or "anonymous"
    if e["outcome"] not in OUTCOMES:
        raise ValueError(f"unknown audit outcome {e['outcome']!r}")
    for k in ("actor_id", "patient_id", "status_code"):
        v = e.get(k)
        e[k] = int(v) if v is not None and str(v).lstrip("-").isdigit() and abs(int(v)) < 2**31 else None
    e["details"] = clean_details(e.get("details"))
    return e


def entry_hash(prev_hash: str, entry: dict) -> str:
    body = {k: entry[k] for k in HASHED}
    body["at"] = body["at"].isoformat() if isinstance(body["at"], dt.datetime) else body["at"]
    canon = json.dumps(body, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(f"{prev_hash}\n{canon}".encode()).hexdigest()


_HEAD = AuditHead.__table__
_EVENTS = AuditEvent.__table__


def append(s: Session, event: dict) -> dict:
    """Append one entry in its own transaction (commits) and return it. ``s`` must hold no other
    pending work."""
    return _append_normalised(s, normalise(event))


def _append_normalised(s: Session, e: dict) -> dict:
    """Core statements, not ORM objects: this runs once per audited request."""
    returning = s.get_bind().dialect.name in ("postgresql", "sqlite")  # MariaDB has no UPDATE ... RETURNING
    bump = update(_HEAD).where(_HEAD.c.id == 1).values(seq=_HEAD.c.seq + 1)
    for _ in range(10):
        try:
            if returning:
                head = s.execute(bump.returning(_HEAD.c.seq, _HEAD.c.hash)).first()
            else:
                head = s.execute(select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == 1)) \
                    .first() if s.execute(bump).rowcount else None
            if head is None:  # the very first entry; a racing twin gets IntegrityError and retries
                s.execute(insert(_HEAD).values(id=1, seq=1, hash=GENESIS))
                head = (1, GENESIS)
            seq, prev = head
            row = dict(e, seq=seq, prev_hash=prev)
            row["hash"] = entry_hash(prev, row)
            s.execute(insert(_EVENTS).values(**row))
            s.execute(update(_HEAD).where(_HEAD.c.id == 1).values(hash=row["hash"]))
            s.commit()
            return row
        except (IntegrityError, OperationalError) as exc:
            s.rollback()
            if isinstance(exc, OperationalError) and not is_retryable(exc):
                raise  # the database is down: the caller spools the entry
    raise RuntimeError("could not append to the audit trail (head row contention)")


class AuditLog:
    """Appends entries through short sessions of its own; falls back to a spool file when the
    database is unavailable and drains the spool, in order, on the next successful append."""

    def __init__(self, sessions: sessionmaker, spool: Path):
        self.sessions = sessions
        self.spool = Path(spool)
        self._lock = threading.Lock()

    def record(self, **event) -> bool:
        """True when the entry is in the database, False when it was spooled. Raises only when
        neither worked (the caller must then refuse to hand out the data)."""
        e = normalise(event)
        try:
            if self.spool.exists() and self.spool.stat().st_size:
                with self._lock:  # entries kept while the database was away go in first, in order
                    self._drain()
            s = self.sessions()
            try:
                _append_normalised(s, e)
            finally:
                s.close()
            return True
        except Exception as exc:  # noqa: BLE001 - any failure to reach the database: keep the entry on disk
            log.warning("audit database unavailable (%s: %s); entry spooled to %s", exc.__class__.__name__,
                        str(exc)[:200], self.spool)
            with self._lock:
                self._spool(e)
            return False

    def record_or_log(self, **event) -> bool:
        """``record`` for what other systems and background work did (no request to refuse): when
        neither the database nor the spool takes the entry, say so in the log and carry on."""
        try:
            return self.record(**event)
        except Exception:  # noqa: BLE001 - neither database nor spool
            log.exception("audit entry %s could not be written anywhere", event.get("action"))
            return False

    def _spool(self, e: dict) -> None:
        line = json.dumps(dict(e, at=e["at"].isoformat()), sort_keys=True) + "\n"
        fd = os.open(self.spool, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _drain(self) -> int:
        if not self.spool.exists() or self.spool.stat().st_size == 0:
            return 0  # (another thread drained it meanwhile)
        fd = os.open(self.spool, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = b""
            while chunk := os.read(fd, 1 << 20):
                data += chunk
            lines = [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
            s = self.sessions()
            try:
                for i, ln in enumerate(lines):
                    append(s, json.loads(ln))
                    # rewrite what is left after each entry, so a failure half-way never appends twice
                    rest = "".join(x + "\n" for x in lines[i + 1:]).encode()
                    os.lseek(fd, 0, os.SEEK_SET)
                    os.ftruncate(fd, 0)
                    os.write(fd, rest)
                    os.fsync(fd)
            finally:
                s.close()
            return len(lines)
        finally:
            os.close(fd)


def record_system(settings, action: str, outcome: str = "success", resource: tuple[str, object] | None = None,
                  **details) -> None:
    """An entry for work done outside a web request (command line), by the operating-system user."""
    import getpass
    import socket


    try:
        who = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        who = str(os.getuid())
    engine = make_engine(settings.database_url)
    try:
        AuditLog(make_session_factory(engine), settings.audit_spool).record(
            actor=f"cli:{who}@{socket.gethostname()}", channel="cli", action=action, outcome=outcome,
            resource_type=resource[0] if resource else "", resource_id=resource[1] if resource else "",
            details=details)
    finally:
        engine.dispose()


# ----------------------------------------------------------------------------- verification
@dataclass
class VerifyReport:
    ok: bool
    entries: int
    head_seq: int
    head_hash: str
    problems: list[str] = field(default_factory=list)
    first_bad_seq: int | None = None
    checkpoint: dict | None = None  # the newest signed checkpoint checked against: seq, at, count

    def to_dict(self) -> dict:
        return {"ok": self.ok, "entries": self.entries, "head_seq": self.head_seq, "head_hash": self.head_hash,
                "first_bad_seq": self.first_bad_seq, "problems": self.problems[:20],
                "latest_checkpoint": self.checkpoint}


def verify(s: Session, checkpoints: dict[int, str] | None = None, batch: int = 2000) -> VerifyReport:
    """Recompute the whole chain. ``checkpoints`` ({seq: hash} recorded earlier, e.g. by a previous
    verify) must still match: this catches a rewrite of the whole chain from some point on."""
    head = s.get(AuditHead, 1)
    problems: list[str] = []
    first_bad = None
    prev, expected_seq, n = GENESIS, 1, 0
    last_id = 0
    seen: dict[int, str] = {0: GENESIS}  # a checkpoint of the empty trail (entry 0) is the chain's start
    while True:
        rows = list(s.scalars(select(AuditEvent).where(AuditEvent.id > last_id).order_by(AuditEvent.id).limit(batch)))
        if not rows:
            break
        for ev in rows:
            last_id = ev.id
            n += 1
            entry = {k: getattr(ev, k) for k in HASHED}
            bad = None
            if ev.seq != expected_seq:
                bad = f"entry {ev.seq}: expected sequence number {expected_seq} (entries missing or reordered)"
            elif ev.prev_hash != prev:
                bad = f"entry {ev.seq}: does not follow the previous entry (chain broken)"
            elif entry_hash(prev, entry) != ev.hash:
                bad = f"entry {ev.seq}: content does not match its hash (altered)"
            if bad:
                problems.append(bad)
                first_bad = first_bad or min(ev.seq, expected_seq)
            prev, expected_seq = ev.hash, ev.seq + 1
            if checkpoints and ev.seq in checkpoints:
                seen[ev.seq] = ev.hash
    head_seq, head_hash = (head.seq, head.hash) if head else (0, GENESIS)
    if head_seq != expected_seq - 1 or head_hash != prev:
        problems.append(f"the head (entry {head_seq}) does not match the last entry ({expected_seq - 1}): "
                        "entries were removed from the end or the head was altered")
        first_bad = first_bad or min(head_seq, expected_seq - 1) + 1
    for seq, h in sorted((checkpoints or {}).items()):
        if seen.get(seq) != h:
            problems.append(f"checkpoint entry {seq} no longer has the hash recorded earlier (chain rewritten)")
            first_bad = min(first_bad or seq, seq)
    return VerifyReport(not problems, n, head_seq, head_hash, problems, first_bad)


# ----------------------------------------------------------------------------- signed checkpoints
CHECKPOINT_FORMAT = 3  # 1: unsigned {seq: hash}; 2: entries signed one by one, so any could be dropped unseen
CHECKPOINT_PURPOSE = "audit checkpoint"
INIT_HINT = "`oncoscope audit checkpoint --init FILE`"


class CheckpointError(Exception):
    """The checkpoint file is missing, unreadable, unsigned, not signed by the trusted key, emptied, or
    has checkpoints removed, inserted or reordered."""


def _checkpoint_body(cp: dict) -> bytes:
    return json.dumps({k: cp[k] for k in ("index", "seq", "hash", "at", "prev")}, sort_keys=True,
                      separators=(",", ":")).encode()


def _checkpoint_list(path: Path) -> list:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint file at {path}. If this instance has made checkpoints, the file was "
                              "deleted or moved: find out why and put the newest copy back. A new instance starts "
                              f"its file once with {INIT_HINT}") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the checkpoint file {path}: {exc}") from None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if fmt == 2:
        raise CheckpointError(f"{path} is a format 2 checkpoint file, whose checkpoints are not chained (any of them "
                              f"could be removed unseen): keep it for reference and start a new file with {INIT_HINT}")
    if fmt != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a signed checkpoint file (an unsigned one from an older oncoscope?): "
                              f"start a new file with {INIT_HINT}")
    if not isinstance(doc.get("checkpoints"), list) or not doc["checkpoints"]:
        raise CheckpointError(f"{path} holds no checkpoints, but a checkpoint file is never empty (--init signs the "
                              "first one): it was emptied")
    return doc["checkpoints"]


def read_checkpoints(path: Path, trusted: signing.Ed25519PublicKey) -> list[dict]:
    """The checkpoints in ``path``, oldest first, once every signature is checked. Each one signs its
    place in the file and the digest of the previous one's signature, so none can be removed,
    inserted or moved; only cutting off the newest ones goes unseen here (see docs/deployment.md)."""
    cps = _checkpoint_list(path)
    prev = GENESIS
    try:
        for i, cp in enumerate(cps):
            signing.check(trusted, CHECKPOINT_PURPOSE, _checkpoint_body(cp), cp.get("signature"),
                          f"checkpoint {i + 1} (entry {cp['seq']})")
            if cp["index"] != i or cp["prev"] != prev:
                raise CheckpointError(f"{path}: checkpoint {i + 1} was signed as number {cp['index'] + 1} after "
                                      "another one: checkpoints were removed, inserted or reordered")
            prev = signing.digest(cp["signature"])
    except signing.SignatureError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (KeyError, TypeError, AttributeError, ValueError):
        raise CheckpointError(f"{path}: malformed checkpoint entry") from None
    return cps


def _latest(cps: list[dict]) -> dict | None:
    """What `audit verify` prints so that an operator notices a file cut short or put back."""
    return {"seq": cps[-1]["seq"], "at": cps[-1]["at"], "count": len(cps)} if cps else None


def _verify_against(s: Session, cps: list[dict]) -> VerifyReport:
    rep = verify(s, {int(cp["seq"]): cp["hash"] for cp in cps})
    rep.checkpoint = _latest(cps)
    return rep


def verify_signed(s: Session, path: Path, trusted: signing.Ed25519PublicKey) -> VerifyReport:
    """``verify`` against the signed checkpoints in ``path`` (which must exist and hold at least one);
    the report names the newest checkpoint, so a file cut short shows an old one."""
    return _verify_against(s, read_checkpoints(path, trusted))


def checkpoint(s: Session, path: Path, key: signing.Ed25519PrivateKey, init: bool = False) -> VerifyReport:
    """Verify against the checkpoints in ``path``, then, when the chain is intact, append the head
    signed with ``key`` and chained to the previous checkpoint. A broken chain is never signed.
    Only ``init`` starts a file, and only where none exists: a deleted file is reported, never
    silently replaced by a new one that would vouch for whatever the chain is now."""
    path = Path(path)
    if init and (path.exists() or path.is_symlink()):
        raise CheckpointError(f"{path} already exists: --init only starts a new checkpoint file")
    cps = [] if init else read_checkpoints(path, key.public_key())
    rep = _verify_against(s, cps)
    if rep.ok:
        cps = _write_checkpoint(path, key, cps, rep)
        rep.checkpoint = _latest(cps)
    return rep


def _write_checkpoint(path: Path, key: signing.Ed25519PrivateKey, cps: list[dict], rep: VerifyReport) -> list[dict]:
    cp = {"index": len(cps), "seq": rep.head_seq, "hash": rep.head_hash,
          "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
          "prev": signing.digest(cps[-1]["signature"]) if cps else GENESIS}
    cp["signature"] = signing.sign(key, CHECKPOINT_PURPOSE, _checkpoint_body(cp))
    cps = [*cps, cp]
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_text(json.dumps({"format": CHECKPOINT_FORMAT, "checkpoints": cps}, indent=1))
        tmp.replace(path)  # a crash never leaves a half-written file that would fail every later verify
    except OSError as exc:
        raise CheckpointError(f"cannot write the checkpoint file {path}: {exc}") from None
    return cps


# ----------------------------------------------------------------------------- search and export
@dataclass
class AuditFilter:
    actor: str = ""
    action: str = ""
    outcome: str = ""
    patient_id: int | None = None
    resource: str = ""  # "case:12", "patient:3" or just an id
    ip: str = ""
    date_from: dt.date | None = None
    date_to: dt.date | None = None


def _query(f: AuditFilter):
    q = select(AuditEvent)
    if f.actor:
        q = q.where(AuditEvent.actor.contains(f.actor.strip(), autoescape=True))
    if f.action:
        q = q.where(AuditEvent.action.startswith(f.action.strip(), autoescape=True))
    if f.outcome:
        q = q.where(AuditEvent.outcome == f.outcome)
    if f.patient_id is not None:
        q = q.where(AuditEvent.patient_id == f.patient_id)
    if f.resource:
        kind, _, rid = f.resource.rpartition(":")
        q = q.where(AuditEvent.resource_id == rid.strip())
        if kind:
            q = q.where(AuditEvent.resource_type == kind.strip())
    if f.ip:
        q = q.where(AuditEvent.ip == f.ip)
    if f.date_from:
        q = q.where(AuditEvent.at >= dt.datetime.combine(f.date_from, dt.time()))
    if f.date_to:
        q = q.where(AuditEvent.at < dt.datetime.combine(f.date_to + dt.timedelta(days=1), dt.time()))
    return q


def count(s: Session, f: AuditFilter) -> int:
    return s.scalar(_query(f).with_only_columns(func.count(AuditEvent.id)).order_by(None))


def search(s: Session, f: AuditFilter, page: int = 1, per_page: int = 50):
    q = _query(f)
    total = count(s, f)
    pages = max(1, -(-total // per_page))
    page = min(max(1, page), pages)
    items = list(s.scalars(q.order_by(AuditEvent.seq.desc()).offset((page - 1) * per_page).limit(per_page)))
    return Page(items, page, pages, total)


CSV_COLUMNS = HASHED + ("prev_hash", "hash")


def _csv_cell(v) -> str:
    if isinstance(v, dt.datetime):
        return v.isoformat() + "Z"
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, ensure_ascii=False)
    s = "" if v is None else str(v)
    # spreadsheet formula injection: a cell starting with = + - @ is read as a formula
    return "'" + s if s[:1] in ("=", "+", "-", "@", "\t", "\r") else s


def export_csv(s: Session, f: AuditFilter, batch: int = 2000):
    """CSV text in chunks (oldest first), every column including both hashes."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    yield buf.getvalue()
    last = 0
    q = _query(f)
    while True:
        rows = list(s.scalars(q.where(AuditEvent.seq > last).order_by(AuditEvent.seq).limit(batch)))
        if not rows:
            return
        buf = io.StringIO()
        w = csv.writer(buf)
        for ev in rows:
            w.writerow([_csv_cell(getattr(ev, c)) for c in CSV_COLUMNS])
            last = ev.seq
        yield buf.getvalue()
