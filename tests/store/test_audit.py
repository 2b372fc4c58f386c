"""Audit trail storage on every backend: the hash chain, append-only triggers, tamper detection,
concurrent writers, the spool used when the database is down, secret scrubbing, CSV export,
signed checkpoints (entries removed and the chain recomputed; forged, unsigned, other-key, emptied,
deleted or reordered checkpoint files; only --init starts one) and `oncoscope audit verify` /
`audit checkpoint`."""

from __future__ import annotations

import datetime as dt
import json
import threading

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.exc import DBAPIError

from oncoscope.store import audit as audit_store
from oncoscope.store import migrate, signing
from oncoscope.store.db import make_engine, make_session_factory
from oncoscope.store.models import AuditEvent, AuditHead

from .test_migrations import _drop_everything, db_url  # noqa: F401 - fixture (sqlite, postgresql, mariadb)


@pytest.fixture()
def trail(db_url):  # noqa: F811 - the imported fixture
    migrate.upgrade(db_url)
    engine = make_engine(db_url)
    yield make_session_factory(engine), engine
    engine.dispose()


def _event(i: int, **kw) -> dict:
    e = {"actor": f"user{i}@clinic.test", "actor_id": i, "actor_role": "doctor", "channel": "web",
         "action": "patient.view", "method": "GET", "path": f"/patients/{i}", "resource_type": "patient",
         "resource_id": i, "patient_id": i, "outcome": "success", "status_code": 200, "ip": "10.0.0.1",
         "user_agent": "pytest", "details": {"n": i, "ünïcode": "Zoë 🙂 <b>"}}
    e.update(kw)
    return e


def _append(factory, events) -> None:
    s = factory()
    try:
        for e in events:
            audit_store.append(s, e)
    finally:
        s.close()


def _in_session(factory, fn, *args, **kw):
    s = factory()
    try:
        return fn(s, *args, **kw)
    finally:
        s.close()


def _verify(factory, **kw):
    return _in_session(factory, audit_store.verify, **kw)


def _bypass_triggers(engine):
    """What an attacker with DDL rights does first; verify must still catch the edit."""
    with engine.begin() as c:
        if engine.dialect.name == "sqlite":
            c.execute(text("DROP TRIGGER audit_events_no_update"))
            c.execute(text("DROP TRIGGER audit_events_no_delete"))
        elif engine.dialect.name == "postgresql":
            c.execute(text("DROP TRIGGER audit_events_append_only ON audit_events"))
        else:
            c.execute(text("DROP TRIGGER audit_events_no_update"))
            c.execute(text("DROP TRIGGER audit_events_no_delete"))


def test_chain_round_trips_and_verifies(trail):
    factory, _ = trail
    rep = _verify(factory)
    assert rep.ok and rep.entries == 0 and rep.head_seq == 0
    _append(factory, [_event(i) for i in range(1, 26)])
    rep = _verify(factory)
    assert rep.ok, rep.problems
    assert (rep.entries, rep.head_seq) == (25, 25)
    s = factory()
    try:
        rows = list(s.scalars(select(AuditEvent).order_by(AuditEvent.seq)))
        assert [r.seq for r in rows] == list(range(1, 26))
        assert rows[0].prev_hash == audit_store.GENESIS
        assert all(b.prev_hash == a.hash for a, b in zip(rows, rows[1:]))
        assert rows[3].details == {"n": 4, "ünïcode": "Zoë 🙂 <b>"}
        assert rows[3].at.microsecond == 0
    finally:
        s.close()


def test_database_refuses_update_and_delete(trail):
    factory, engine = trail
    _append(factory, [_event(1), _event(2)])
    for stmt in (update(AuditEvent).where(AuditEvent.seq == 1).values(actor="someone.else@clinic.test"),
                 delete(AuditEvent).where(AuditEvent.seq == 2)):
        with pytest.raises(DBAPIError, match="append-only"):
            with engine.begin() as c:
                c.execute(stmt)
    assert _verify(factory).ok


@pytest.mark.parametrize("tamper,first_bad", [
    ("alter", 3),      # an entry's content is changed
    ("delete_mid", 3),  # an entry is removed from the middle
    ("delete_tail", 4),  # the last entries are cut off (the head no longer matches)
    ("insert", 6),     # a forged entry is added at the end without updating the head
    ("rehash_one", 4),  # an entry is altered and its own hash recomputed: the next link breaks
])
def test_tampering_is_detected(trail, tamper, first_bad):
    factory, engine = trail
    _append(factory, [_event(i) for i in range(1, 6)])
    _bypass_triggers(engine)
    with engine.begin() as c:
        if tamper == "alter":
            c.execute(update(AuditEvent).where(AuditEvent.seq == 3).values(outcome="denied"))
        elif tamper == "delete_mid":
            c.execute(delete(AuditEvent).where(AuditEvent.seq == 3))
        elif tamper == "delete_tail":
            c.execute(delete(AuditEvent).where(AuditEvent.seq >= 4))
        elif tamper == "insert":
            last = c.execute(select(AuditEvent.hash).where(AuditEvent.seq == 5)).scalar_one()
            e = audit_store.normalise(_event(6))
            row = dict(e, seq=6, prev_hash=last)
            row["hash"] = audit_store.entry_hash(last, row)
            c.execute(AuditEvent.__table__.insert().values(**row))
        elif tamper == "rehash_one":
            ev = c.execute(select(AuditEvent.__table__).where(AuditEvent.seq == 3)).mappings().one()
            row = dict(ev, actor="forged@clinic.test")
            c.execute(update(AuditEvent).where(AuditEvent.seq == 3).values(
                actor=row["actor"], hash=audit_store.entry_hash(row["prev_hash"], row)))
    rep = _verify(factory)
    assert not rep.ok
    assert rep.first_bad_seq == first_bad, rep.problems
    if tamper == "delete_tail":
        assert any("head" in p for p in rep.problems)


def test_checkpoints_catch_a_rewritten_chain(trail):
    """Someone who rewrites every entry and the head keeps the chain consistent; a checkpoint
    (seq -> hash) recorded by an earlier verify, kept elsewhere, still catches it."""
    factory, engine = trail
    _append(factory, [_event(i) for i in range(1, 5)])
    rep = _verify(factory)
    checkpoints = {rep.head_seq: rep.head_hash}
    _bypass_triggers(engine)
    with engine.begin() as c:
        c.execute(delete(AuditEvent))
        c.execute(delete(AuditHead))
    _append(factory, [_event(i, actor="forged@clinic.test") for i in range(1, 5)])
    assert _verify(factory).ok  # internally consistent...
    rep = _verify(factory, checkpoints=checkpoints)
    assert not rep.ok and any("checkpoint" in p for p in rep.problems)  # ...but not the chain we saw


def _rewrite_without(factory, engine, drop) -> None:
    """An attacker with database rights removes entries and rebuilds a consistent chain and head."""
    _bypass_triggers(engine)
    with engine.begin() as c:
        kept = [dict(r) for r in c.execute(select(AuditEvent.__table__).order_by(AuditEvent.seq)).mappings()
                if r["seq"] not in drop]
        c.execute(delete(AuditEvent))
        c.execute(delete(AuditHead))
    _append(factory, [{k: e[k] for k in audit_store.HASHED if k != "seq"} for e in kept])


def test_signed_checkpoints_catch_entries_removed_and_the_chain_recomputed(trail, tmp_path):
    factory, engine = trail
    key = Ed25519PrivateKey.generate()
    cps = tmp_path / "checkpoints.json"
    _append(factory, [_event(i) for i in range(1, 11)])
    assert _in_session(factory, audit_store.checkpoint, cps, key, init=True).ok
    _append(factory, [_event(i) for i in range(11, 16)])
    assert _in_session(factory, audit_store.checkpoint, cps, key).ok
    assert [c["seq"] for c in json.loads(cps.read_text())["checkpoints"]] == [10, 15]
    assert _in_session(factory, audit_store.verify_signed, cps, key.public_key()).ok
    _rewrite_without(factory, engine, drop=range(3, 6))
    assert _verify(factory).ok and _verify(factory).entries == 12  # the unkeyed chain is consistent again
    rep = _in_session(factory, audit_store.verify_signed, cps, key.public_key())
    assert not rep.ok and rep.first_bad_seq == 10 and any("checkpoint" in p for p in rep.problems), rep.problems
    before = cps.read_bytes()
    assert not _in_session(factory, audit_store.checkpoint, cps, key).ok
    assert cps.read_bytes() == before  # a broken chain is never signed


@pytest.mark.parametrize("forgery,message", [
    ("edited", "changed after it was signed"),
    ("signed_by_attacker", "signed by another key"),
    ("signature_removed", r"checkpoint 1 \(entry 4\) is not signed"),
    ("old_unsigned_format", "not a signed checkpoint file"),
    ("deleted", "no checkpoint file"),
    ("emptied", "holds no checkpoints"),
    ("emptied_unchained_format", "not chained"),  # the outside review's forgery: no signature at all
])
def test_forged_unsigned_or_missing_checkpoint_file_is_refused(tmp_path, forgery, message):
    """The attacker removes an entry, recomputes the chain, and makes the checkpoint file match it
    (or empties it, deletes it); neither `verify` nor the next `checkpoint` accepts that."""
    factory, engine, key, cps = _checkpoint_world(tmp_path)
    attacker = Ed25519PrivateKey.generate()
    _append(factory, [_event(i) for i in range(1, 6)])
    assert _in_session(factory, audit_store.checkpoint, cps, key, init=True).ok
    _rewrite_without(factory, engine, drop={2})
    doc = json.loads(cps.read_text())
    cp = doc["checkpoints"][0]
    cp.update(seq=4, hash=_verify(factory).head_hash)
    if forgery == "signed_by_attacker":
        cp["signature"] = signing.sign(attacker, audit_store.CHECKPOINT_PURPOSE, audit_store._checkpoint_body(cp))
    elif forgery == "signature_removed":
        del cp["signature"]
    elif forgery == "old_unsigned_format":
        doc = {"4": cp["hash"]}
    elif forgery.startswith("emptied"):
        doc = {"format": 2 if forgery == "emptied_unchained_format" else 3, "checkpoints": []}
    cps.write_text(json.dumps(doc))
    if forgery == "deleted":
        cps.unlink()
    elif forgery == "signed_by_attacker":  # control: the forgery is consistent with the rewritten chain
        assert _in_session(factory, audit_store.verify_signed, cps, attacker.public_key()).ok
    with pytest.raises(audit_store.CheckpointError, match=message):
        _in_session(factory, audit_store.verify_signed, cps, key.public_key())
    before = cps.read_bytes() if cps.exists() else None
    with pytest.raises(audit_store.CheckpointError, match=message):  # the forged chain is never signed
        _in_session(factory, audit_store.checkpoint, cps, key)
    assert (cps.read_bytes() if cps.exists() else None) == before  # and a deleted file is not started again
    engine.dispose()


def _checkpoint_world(tmp_path):
    """A migrated SQLite trail, its session factory and engine, a signing key and a checkpoint path."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    return make_session_factory(engine), engine, Ed25519PrivateKey.generate(), tmp_path / "checkpoints.json"


def _three_checkpoints(tmp_path):
    factory, engine, key, cps = _checkpoint_world(tmp_path)
    for n in range(3):
        _append(factory, [_event(n * 3 + i) for i in (1, 2, 3)])
        assert _in_session(factory, audit_store.checkpoint, cps, key, init=n == 0).ok
    return factory, engine, key, cps


@pytest.mark.parametrize("edit", ["first_removed", "middle_removed", "swapped", "duplicated"])
def test_checkpoints_cannot_be_removed_inserted_or_reordered(tmp_path, edit):
    """Each checkpoint signs its place and the previous checkpoint's signature digest: a file with
    signed entries removed from the start or the middle, moved or repeated is refused."""
    factory, engine, key, cps = _three_checkpoints(tmp_path)
    doc = json.loads(cps.read_text())
    assert [c["seq"] for c in doc["checkpoints"]] == [3, 6, 9] and doc["format"] == 3
    assert _in_session(factory, audit_store.verify_signed, cps, key.public_key()).ok  # control
    one, two, three = doc["checkpoints"]
    doc["checkpoints"] = {"first_removed": [two, three], "middle_removed": [one, three], "swapped": [one, three, two],
                          "duplicated": [one, two, two, three]}[edit]
    cps.write_text(json.dumps(doc))
    with pytest.raises(audit_store.CheckpointError, match="removed, inserted or reordered"):
        _in_session(factory, audit_store.verify_signed, cps, key.public_key())
    engine.dispose()


def test_newest_checkpoint_is_reported_because_a_file_cut_short_still_verifies(tmp_path):
    """The documented limit: the newest checkpoints cut off the end leave a valid file. `verify`
    names the newest checkpoint it saw, so an operator can see it is older than the schedule."""
    factory, engine, key, cps = _three_checkpoints(tmp_path)
    rep = _in_session(factory, audit_store.verify_signed, cps, key.public_key())
    assert rep.checkpoint["seq"] == 9 and rep.checkpoint["count"] == 3 and rep.to_dict()["latest_checkpoint"]
    doc = json.loads(cps.read_text())
    doc["checkpoints"] = doc["checkpoints"][:1]
    cps.write_text(json.dumps(doc))
    rep = _in_session(factory, audit_store.verify_signed, cps, key.public_key())
    assert rep.ok and (rep.checkpoint["seq"], rep.checkpoint["count"]) == (3, 1)
    engine.dispose()


def test_only_init_starts_a_checkpoint_file(tmp_path):
    factory, engine, key, cps = _checkpoint_world(tmp_path)
    with pytest.raises(audit_store.CheckpointError, match="no checkpoint file.*--init"):
        _in_session(factory, audit_store.checkpoint, cps, key)
    assert not cps.exists()
    rep = _in_session(factory, audit_store.checkpoint, cps, key, init=True)  # at installation: the trail is empty
    assert rep.ok and rep.checkpoint == {"seq": 0, "at": rep.checkpoint["at"], "count": 1}
    before = cps.read_bytes()
    with pytest.raises(audit_store.CheckpointError, match="already exists"):
        _in_session(factory, audit_store.checkpoint, cps, key, init=True)
    assert cps.read_bytes() == before
    _append(factory, [_event(1), _event(2)])
    assert _in_session(factory, audit_store.checkpoint, cps, key).checkpoint["seq"] == 2
    assert _in_session(factory, audit_store.verify_signed, cps, key.public_key()).ok
    engine.dispose()


def test_concurrent_writers_form_one_chain(trail):
    factory, _ = trail
    errors = []

    def writer(k):
        try:
            _append(factory, [_event(k * 100 + i) for i in range(15)])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    rep = _verify(factory)
    assert rep.ok, rep.problems
    assert rep.entries == rep.head_seq == 60


def test_details_never_keep_secrets():
    d = audit_store.clean_details({"password": "hunter2", "new_password": "x", "csrf_token": "abc", "token": "t",
                                   "Authorization": "Bearer x", "email": "a@b.c",
                                   "note": "sent osk_0123abcd_Zm9vYmFyYmF6cXV4 by mistake", "n": 3,
                                   "nul": "a\x00b", "surrogate": "\udc80x", "big": "x" * 5000})
    assert set(d) == {"email", "note", "n", "nul", "surrogate", "big"}
    assert "Zm9vYmFy" not in d["note"] and "osk_[redacted]" in d["note"]
    assert "\x00" not in d["nul"] and len(d["big"]) == 300
    json.dumps(d).encode("utf-8")  # storable everywhere


def test_spool_when_the_database_is_down_then_drained_in_order(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    migrate.upgrade(url)
    good = make_session_factory(make_engine(url))
    down = make_session_factory(make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1"))
    spool = tmp_path / "audit-spool.jsonl"
    log = audit_store.AuditLog(good, spool)
    assert log.record(**_event(1))
    log.sessions = down
    assert log.record(**_event(2)) is False and log.record(**_event(3)) is False
    assert len(spool.read_text().splitlines()) == 2
    log.sessions = good
    assert log.record(**_event(4))
    assert spool.read_text() == ""
    s = good()
    try:
        assert [e.actor for e in s.scalars(select(AuditEvent).order_by(AuditEvent.seq))] == \
            [f"user{i}@clinic.test" for i in (1, 2, 3, 4)]
        assert audit_store.verify(s).ok
    finally:
        s.close()


def test_nowhere_to_write_raises(tmp_path):
    down = make_session_factory(make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1"))
    log = audit_store.AuditLog(down, tmp_path / "missing-dir" / "spool.jsonl")
    with pytest.raises(OSError):
        log.record(**_event(1))


def test_unknown_outcome_is_a_programming_error():
    with pytest.raises(ValueError):
        audit_store.normalise(_event(1, outcome="maybe"))


def test_csv_export_has_every_column_and_defuses_formulas(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    migrate.upgrade(url)
    factory = make_session_factory(make_engine(url))
    _append(factory, [_event(1, actor="=HYPERLINK(\"http://evil\")"), _event(2, ip="+1"), _event(3)])
    s = factory()
    try:
        text_ = "".join(audit_store.export_csv(s, audit_store.AuditFilter()))
        only_2 = "".join(audit_store.export_csv(s, audit_store.AuditFilter(patient_id=2)))
    finally:
        s.close()
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(text_)))
    assert list(rows[0]) == list(audit_store.CSV_COLUMNS)
    assert [r["seq"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["actor"].startswith("'=") and rows[1]["ip"] == "'+1"
    assert rows[2]["hash"] and json.loads(rows[2]["details"])["n"] == 3
    assert [r["seq"] for r in csv.DictReader(io.StringIO(only_2))] == ["2"]


def test_search_filters(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    migrate.upgrade(url)
    factory = make_session_factory(make_engine(url))
    _append(factory, [_event(1), _event(2, outcome="denied", action="case.view", resource_type="case",
                                         resource_id=7), _event(3, actor="other_100%@clinic.test")])
    s = factory()
    try:
        F = audit_store.AuditFilter
        assert audit_store.search(s, F()).total == 3
        assert [e.seq for e in audit_store.search(s, F(outcome="denied")).items] == [2]
        assert [e.seq for e in audit_store.search(s, F(action="case.")).items] == [2]
        assert [e.seq for e in audit_store.search(s, F(resource="case:7")).items] == [2]
        assert [e.seq for e in audit_store.search(s, F(actor="100%")).items] == [3]  # no LIKE wildcards
        assert audit_store.search(s, F(actor="_")).total == 1
        today = dt.datetime.now(dt.timezone.utc).date()
        assert audit_store.search(s, F(date_from=today, date_to=today)).total == 3
        assert audit_store.search(s, F(date_to=today - dt.timedelta(days=2))).total == 0
    finally:
        s.close()


def test_cli_verify_exit_status_and_checkpoints(tmp_path, monkeypatch):
    from oncoscope.cli import main

    home = tmp_path / "home"
    monkeypatch.setenv("ONCOSCOPE_HOME", str(home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    runner = CliRunner()
    assert runner.invoke(main, ["db", "upgrade"]).exit_code == 0
    r = runner.invoke(main, ["users", "create", "--email", "root@clinic.test", "--name", "Root", "--role", "admin",
                             "--password", "a long enough password"])
    assert r.exit_code == 0, r.output
    cps = tmp_path / "checkpoints.json"
    r = runner.invoke(main, ["audit", "checkpoint", str(cps)])
    assert r.exit_code == 1 and "--init" in r.output and not cps.exists(), r.output
    r = runner.invoke(main, ["audit", "checkpoint", "--init", str(cps)])
    assert r.exit_code == 0 and "intact" in r.output, r.output
    assert json.loads(cps.read_text())["checkpoints"]  # the head was recorded, signed
    r = runner.invoke(main, ["audit", "verify", "--json"])
    rep = json.loads(r.output)
    assert rep["ok"] and rep["entries"] == 3  # user.create_cli, the refused checkpoint, then the checkpoint itself
    r = runner.invoke(main, ["audit", "verify", "--checkpoints", str(cps), "--json"])
    assert json.loads(r.output)["latest_checkpoint"]["seq"] == 2, r.output  # the head before the checkpoint's entry
    out = tmp_path / "audit.csv"
    assert runner.invoke(main, ["audit", "export", str(out)]).exit_code == 0
    assert "user.create_cli" in out.read_text() and "a long enough password" not in out.read_text()
    eng = make_engine(f"sqlite:///{home / 'oncoscope.db'}")
    with eng.begin() as c:
        c.execute(text("DROP TRIGGER audit_events_no_update"))
        c.execute(text("UPDATE audit_events SET action = 'nothing.happened' WHERE seq = 1"))
    eng.dispose()
    r = runner.invoke(main, ["audit", "verify", "--checkpoints", str(cps)])
    assert r.exit_code == 1 and "entry 1" in r.output


def test_cli_signed_checkpoints_refuse_a_rewritten_chain_and_another_key(tmp_path, monkeypatch):
    from oncoscope.cli import main

    home = tmp_path / "home"
    monkeypatch.setenv("ONCOSCOPE_HOME", str(home))
    for name in ("DATABASE_URL", "ONCOSCOPE_SIGNING_KEY", "ONCOSCOPE_TRUSTED_KEY"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()
    assert runner.invoke(main, ["db", "upgrade"]).exit_code == 0
    for who in ("a", "b", "c"):
        assert runner.invoke(main, ["users", "create", "--email", f"{who}@clinic.test", "--name", who,
                                    "--password", "a long enough password"]).exit_code == 0
    cps = tmp_path / "checkpoints.json"
    r = runner.invoke(main, ["audit", "checkpoint", "--init", str(cps)])
    assert r.exit_code == 0 and "signed checkpoint of entry #3" in r.output, r.output
    r = runner.invoke(main, ["audit", "verify", "--checkpoints", str(cps)])
    assert r.exit_code == 0 and "intact" in r.output, r.output
    assert "newest signed checkpoint: entry #3 at 20" in r.output and "1 in the file" in r.output, r.output
    other = tmp_path / "other.pub"
    other.write_bytes(signing.public_pem(Ed25519PrivateKey.generate().public_key()))
    r = runner.invoke(main, ["audit", "verify", "--checkpoints", str(cps), "--trusted-key", str(other)])
    assert r.exit_code == 1 and "signed by another key" in r.output, r.output
    r = runner.invoke(main, ["audit", "verify", "--checkpoints", str(tmp_path / "gone.json")])
    assert r.exit_code == 1 and "no checkpoint file" in r.output, r.output
    engine = make_engine(f"sqlite:///{home / 'oncoscope.db'}")
    _rewrite_without(make_session_factory(engine), engine, drop={2})
    engine.dispose()
    assert runner.invoke(main, ["audit", "verify"]).exit_code == 0  # control: the unkeyed chain looks intact
    r = runner.invoke(main, ["audit", "verify", "--checkpoints", str(cps)])
    assert r.exit_code == 1 and "checkpoint entry 3" in r.output, r.output
    before = cps.read_bytes()
    assert runner.invoke(main, ["audit", "checkpoint", str(cps)]).exit_code == 1 and cps.read_bytes() == before


def test_backup_and_restore_are_audited_and_the_chain_survives(tmp_path, monkeypatch):
    from oncoscope.cli import main

    runner = CliRunner()
    src, dst = tmp_path / "src", tmp_path / "dst"
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("ONCOSCOPE_HOME", str(src))
    assert runner.invoke(main, ["db", "upgrade"]).exit_code == 0
    assert runner.invoke(main, ["users", "create", "--email", "a@clinic.test", "--name", "A",
                                "--password", "a long enough password"]).exit_code == 0
    r = runner.invoke(main, ["backup", str(tmp_path / "b.tar.gz")])
    assert r.exit_code == 0, r.output
    monkeypatch.setenv("ONCOSCOPE_HOME", str(dst))
    r = runner.invoke(main, ["restore", str(tmp_path / "b.tar.gz"), "--trusted-key", str(src / "signing_key.pub")])
    assert r.exit_code == 0, r.output
    eng = make_engine(f"sqlite:///{dst / 'oncoscope.db'}")
    s = make_session_factory(eng)()
    try:
        assert [e.action for e in s.scalars(select(AuditEvent).order_by(AuditEvent.seq))] == \
            ["user.create_cli", "backup.restore"]  # the backup's own entry is written after its snapshot
        assert audit_store.verify(s).ok
        assert s.scalar(select(func.count()).select_from(AuditHead)) == 1
    finally:
        s.close()
        eng.dispose()
