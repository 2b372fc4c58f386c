"""``oncoscope backup`` / ``restore``: the seeded world (users, patients, cases, analyses, images) is
backed up, restored into an empty instance (SQLite, and PostgreSQL / MariaDB when they answer) and
compared row by row and file by file; damaged archives and non-empty targets are refused. Archives
are signed (Ed25519): a forged archive with recomputed checksums, one signed by another key and an
unsigned one are refused. An archive made at an older schema revision is restored at that revision
and migrated; unknown revisions and rows that do not match theirs are refused; `--check-only`
creates nothing."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, func, inspect, select, text
from sqlalchemy.pool import NullPool

from oncoscope.cli import main
from oncoscope.store import audit as audit_store
from oncoscope.store import migrate, signing
from oncoscope.store.backup import BackupError, create_backup, restore_backup
from oncoscope.store.db import standalone_session
from oncoscope.store.models import Base, User

from ..web.conftest import _fast_hashing, seed_homes, sqlite_url  # noqa: F401 - fixtures
from .test_migrations import APP_TABLES, HEAD, _tables, db_url  # noqa: F401 - fixture (sqlite, postgresql, mariadb)


def dump(url: str) -> dict[str, list[tuple]]:
    eng = create_engine(url, poolclass=NullPool)
    try:
        with eng.connect() as c:
            return {t.name: [tuple(r) for r in c.execute(select(t).order_by(*t.primary_key.columns))]
                    for t in Base.metadata.sorted_tables}
    finally:
        eng.dispose()


def files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def write_archive(path: Path, content: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in content.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture()
def world(seed_homes, tmp_path):  # noqa: F811 - the imported fixture
    from ..web.conftest import copy_seed

    return copy_seed(seed_homes, "world", tmp_path / "world")


@pytest.fixture()
def key():
    return Ed25519PrivateKey.generate()


def test_backup_restore_round_trip(world, tmp_path, db_url, key):  # noqa: F811
    archive = tmp_path / "backup.tar.gz"
    src = sqlite_url(world)
    m = create_backup(src, world / "images", archive, key)
    assert m["tables"]["users"]["rows"] == 4 and m["tables"]["analyses"]["rows"] == 2 and m["images"]
    assert json.loads(members(archive)["manifest.sig"])["algorithm"] == "ed25519"
    target_images = tmp_path / "restored-images"
    restore_backup(db_url, target_images, archive, key.public_key())
    before, after = dump(src), dump(db_url)
    assert before == after and sum(len(v) for v in after.values()) > 10
    assert files(world / "images") == files(target_images)
    # a second restore onto the now non-empty instance is refused, and changes nothing
    with pytest.raises(BackupError, match="not empty|already holds data"):
        restore_backup(db_url, target_images, archive, key.public_key())
    assert dump(db_url) == after


def test_damaged_archive_is_refused_before_anything_is_written(world, tmp_path, key):
    archive = tmp_path / "b.tar.gz"
    create_backup(sqlite_url(world), world / "images", archive, key)
    content = members(archive)
    content["db/patients.jsonl"] = content["db/patients.jsonl"].replace(b"Doe", b"Eve")
    bad = write_archive(tmp_path / "bad.tar.gz", content)
    target = tmp_path / "t"
    target.mkdir()
    url = sqlite_url(target)
    with pytest.raises(BackupError, match="checksum mismatch for table patients"):
        restore_backup(url, target / "images", bad, key.public_key())
    assert not (target / "images").exists() and not (target / "oncoscope.db").exists()
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(BackupError, match="cannot read"):
        restore_backup(url, target / "images", tmp_path / "junk.tar.gz", key.public_key())
    with pytest.raises(BackupError, match="no trusted public key"):
        restore_backup(url, target / "images", archive)


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()


def _rows(content: dict[str, bytes], name: str) -> list[dict]:
    return [json.loads(x) for x in content[f"db/{name}.jsonl"].decode().splitlines() if x]


def _rewrite(content: dict[str, bytes], tables: dict[str, list | None], key=None, **manifest_changes) -> dict:
    """The archive with these table dumps replaced (None: left out), their manifest checksums
    recomputed, and re-signed with ``key`` when given."""
    out = dict(content)
    manifest = dict(json.loads(content["manifest.json"]), **manifest_changes)
    for name, data in tables.items():
        if data is None:
            del out[f"db/{name}.jsonl"], manifest["tables"][name]
            continue
        out[f"db/{name}.jsonl"] = _jsonl(data)
        manifest["tables"][name] = {"rows": len(data), "sha256": hashlib.sha256(out[f"db/{name}.jsonl"]).hexdigest()}
    out["manifest.json"] = json.dumps(manifest, indent=1, sort_keys=True).encode()
    if key is not None:
        out["manifest.sig"] = json.dumps(signing.sign(key, "backup manifest", out["manifest.json"])).encode()
    return out


def forge(content: dict[str, bytes], drop: range) -> dict[str, bytes]:
    """What an attacker holding the archive does: drop audit entries, make a doctor an admin, then
    recompute the hash chain, the head and every manifest checksum."""
    users = _rows(content, "users")
    next(u for u in users if u["role"] == "doctor")["role"] = "admin"
    events, prev = [], audit_store.GENESIS
    for e in (e for e in _rows(content, "audit_events") if e["seq"] not in drop):
        e.update(seq=len(events) + 1, prev_hash=prev)
        e["hash"] = prev = audit_store.entry_hash(prev, e)
        events.append(e)
    head = _rows(content, "audit_head")
    head[0].update(seq=len(events), hash=prev)
    return _rewrite(content, {"users": users, "audit_events": events, "audit_head": head})


def _audited_world(world: Path, n: int) -> None:
    with standalone_session(sqlite_url(world)) as s:
        for i in range(1, n + 1):
            audit_store.append(s, {"actor": "doc.a@clinic.test", "action": "patient.view", "outcome": "success",
                                   "resource_type": "patient", "resource_id": i, "patient_id": 1})


def test_forged_archive_with_recomputed_checksums_is_refused(world, tmp_path, db_url, key):  # noqa: F811
    """The review's attack: 8 of 20 audit entries removed, a doctor made admin, chain and manifest
    recomputed. Unkeyed checksums accepted that; the signature does not."""
    _audited_world(world, 20)
    archive = tmp_path / "real.tar.gz"
    create_backup(sqlite_url(world), world / "images", archive, key)
    forged = forge(members(archive), drop=range(5, 13))
    attacker = Ed25519PrivateKey.generate()
    variants = {
        "changed after it was signed": forged,
        "signed by another key": dict(forged, **{"manifest.sig": json.dumps(
            signing.sign(attacker, "backup manifest", forged["manifest.json"])).encode()}),
        "not signed": {k: v for k, v in forged.items() if k != "manifest.sig"},
    }
    target = tmp_path / "target-images"
    for message, content in variants.items():
        with pytest.raises(BackupError, match=message):
            restore_backup(db_url, target, write_archive(tmp_path / "forged.tar.gz", content), key.public_key())
        assert not target.exists() and not _tables(db_url) & APP_TABLES  # refused before anything was written
    # control: the forgery itself is consistent. Trusting the attacker's key it restores, and the
    # unkeyed chain calls the shortened trail intact
    restore_backup(db_url, target, write_archive(tmp_path / "forged.tar.gz", variants["signed by another key"]),
                   attacker.public_key())
    with standalone_session(db_url) as s:
        assert audit_store.verify(s).ok and audit_store.verify(s).entries == 12
        assert s.scalar(select(func.count()).select_from(User).where(User.role == "admin")) == 2


def test_signed_archive_with_a_path_outside_the_image_folder_is_still_refused(tmp_path, key):
    """Defence in depth: even an archive signed by the trusted key may not write outside the image folder."""
    payload = b"owned"
    manifest = json.dumps({"format": 2, "created": "2024-01-01T00:00:00+00:00", "alembic_revision": None,
                           "database_dialect": "sqlite", "tables": {},
                           "images": {"../outside/planted.txt": hashlib.sha256(payload).hexdigest()}}).encode()
    archive = write_archive(tmp_path / "evil.tar.gz", {
        "images/x": payload, "manifest.json": manifest,
        "manifest.sig": json.dumps(signing.sign(key, "backup manifest", manifest)).encode()})
    home = tmp_path / "home"
    (home / "images").mkdir(parents=True)
    with pytest.raises(BackupError, match="unexpected image path"):
        restore_backup(sqlite_url(home), home / "images", archive, key.public_key())
    assert not (home / "outside").exists() and not (home / "oncoscope.db").exists()


def test_signing_key_is_created_on_first_use_private_and_reused(tmp_path, monkeypatch):
    from oncoscope.config import Settings

    monkeypatch.delenv("ONCOSCOPE_SIGNING_KEY", raising=False)
    st = Settings.from_env(home=tmp_path / "home")
    assert not st.signing_key_file.exists()  # reading the settings writes no key
    with pytest.raises(signing.SignatureError, match="no trusted public key"):
        signing.trusted_key(None, st.signing_key_file)  # and checking a signature never makes one
    k = signing.signing_key(st.signing_key_file)
    assert st.signing_key_file.stat().st_mode & 0o777 == 0o600
    pub = signing.public_path(st.signing_key_file)
    assert pub.read_bytes() == signing.public_pem(k.public_key())
    again = signing.signing_key(st.signing_key_file)
    assert signing.key_id(again.public_key()) == signing.key_id(k.public_key())
    assert signing.key_id(signing.trusted_key(pub, tmp_path / "none")) == signing.key_id(k.public_key())


def _cli_env(monkeypatch, home: Path) -> None:
    monkeypatch.setenv("ONCOSCOPE_HOME", str(home))
    for name in ("DATABASE_URL", "ONCOSCOPE_SIGNING_KEY", "ONCOSCOPE_TRUSTED_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_cli_backup_and_restore(world, tmp_path, monkeypatch):
    """A restore on a new machine: it holds only the old instance's public key, named by ONCOSCOPE_TRUSTED_KEY."""
    archive = tmp_path / "cli.tar.gz"
    _cli_env(monkeypatch, world)
    r = CliRunner().invoke(main, ["backup", str(archive)])
    assert r.exit_code == 0 and "rows in" in r.output, r.output
    assert "created the signing key" in r.output and (world / "signing_key").stat().st_mode & 0o777 == 0o600
    manifest = json.loads(tarfile.open(archive).extractfile("manifest.json").read())
    assert manifest["alembic_revision"] and manifest["database_dialect"] == "sqlite"
    fresh = tmp_path / "fresh"
    monkeypatch.setenv("ONCOSCOPE_HOME", str(fresh))
    r = CliRunner().invoke(main, ["restore", str(archive)])
    assert r.exit_code != 0 and "no trusted public key" in r.output, r.output
    assert not (fresh / "signing_key").exists()  # checking never creates a key
    (tmp_path / "moved.pub").write_bytes((world / "signing_key.pub").read_bytes())
    monkeypatch.setenv("ONCOSCOPE_TRUSTED_KEY", str(tmp_path / "moved.pub"))
    r = CliRunner().invoke(main, ["restore", str(archive)])
    assert r.exit_code == 0 and "restored" in r.output, r.output
    restored, source = dump(sqlite_url(fresh)), dump(sqlite_url(world))
    # each instance's audit trail records its own side: the backup (written after the snapshot) and the restore
    assert [e[7] for e in source.pop("audit_events")] == ["backup.create"]
    assert [e[7] for e in restored.pop("audit_events")] == ["backup.restore"]
    restored.pop("audit_head"), source.pop("audit_head")
    assert restored == source
    r = CliRunner().invoke(main, ["restore", str(archive)])  # not empty any more
    assert r.exit_code != 0 and "not empty" in r.output


def test_cli_refuses_unsigned_old_format_and_other_key_archives(world, tmp_path, monkeypatch):
    _cli_env(monkeypatch, world)
    archive = tmp_path / "a.tar.gz"
    assert CliRunner().invoke(main, ["backup", str(archive)]).exit_code == 0
    content = members(archive)
    del content["manifest.sig"]
    manifest = json.loads(content["manifest.json"])
    content["manifest.json"] = json.dumps(dict(manifest, format=1), indent=1, sort_keys=True).encode()
    old = write_archive(tmp_path / "old.tar.gz", content)  # what oncoscope wrote before signatures
    other = tmp_path / "other"
    _cli_env(monkeypatch, other)
    assert CliRunner().invoke(main, ["public-key"]).exit_code == 0  # this instance has a key of its own
    fresh = tmp_path / "fresh"
    _cli_env(monkeypatch, fresh)
    trusted = ["--trusted-key", str(world / "signing_key.pub")]
    for check_only in ([], ["--check-only"]):
        for path, trust, message in ((old, trusted, "the archive is not signed"),
                                     (archive, ["--trusted-key", str(other / "signing_key.pub")],
                                      "signed by another key")):
            r = CliRunner().invoke(main, ["restore", str(path), *trust, *check_only])
            assert r.exit_code == 1 and message in r.output, r.output
    r = CliRunner().invoke(main, ["restore", str(archive), *trusted, "--check-only"])  # what a backup host runs
    assert r.exit_code == 0 and "verified" in r.output, r.output
    assert not (fresh / "oncoscope.db").exists()
    r = CliRunner().invoke(main, ["restore", str(archive), *trusted])
    assert r.exit_code == 0, r.output


# ----------------------------------------------------------------------------- schema revisions
OLDER = "d7e8f9a0b1c2"  # the revision before e1f2a3b4c5d6 (see _as_older_schema)


def _as_older_schema(content: dict[str, bytes], key) -> dict[str, bytes]:
    """The archive an oncoscope at schema OLDER wrote: users still had the lockout counters that
    e1f2a3b4c5d6 dropped, and cases.revision, idempotency_records.patient_id and the login_throttle
    table did not exist yet (nor what f2a3b4c5d6e7 added: the cell review tables, cases.wbc_count,
    reviews.differential, analyses.microns_per_pixel; nor reviews.ai_call and cases.priority; nor the
    clinical workflow's tables and columns of c2d3e4f5a6b7, nor the hospital integration's of e4f5a6b7c8d9)."""
    users = _rows(content, "users")
    for u in users:
        u.update(failed_logins=0, locked_until=None)
    users[1].update(failed_logins=3, locked_until="2026-01-01T10:00:00")
    cases = [{k: v for k, v in c.items() if k not in ("revision", "wbc_count", "priority", "ai_flag", "ready_at", "cancel_reason",
                                                          "dicom_study_uid", "accession_number", "placer_order",
                                                          "placer_app", "order_info")}
             for c in _rows(content, "cases")]
    idem = [{k: v for k, v in r.items() if k != "patient_id"} for r in _rows(content, "idempotency_records")]
    reviews = [{k: v for k, v in r.items() if k not in ("differential", "ai_call", "second_reader_id", "second_diagnosis",
                                                          "second_agrees", "second_read_at")}
               for r in _rows(content, "reviews")]
    analyses = [{k: v for k, v in a.items() if k != "microns_per_pixel"} for a in _rows(content, "analyses")]
    images = [{k: v for k, v in i.items() if k != "pixel_spacing"} for i in _rows(content, "case_images")]
    new_tables = dict.fromkeys(("readings", "case_transitions", "consults", "consult_messages", "analyzer_policies",
                                "site_settings", "dicom_inbox", "deliveries"))
    return _rewrite(content, {"users": users, "cases": cases, "idempotency_records": idem, "login_throttle": None,
                              "reviews": reviews, "analyses": analyses, "cell_labels": None, "cell_changes": None,
                              "case_images": images, **new_tables},
                    key, alembic_revision=OLDER)


@pytest.mark.parametrize("target", ["no schema", "empty schema at head"])
def test_archive_made_at_an_older_schema_is_restored_and_migrated(world, tmp_path, db_url, key, target):  # noqa: F811
    """Restore creates the archive's schema, inserts the rows, then migrates them like `db upgrade`:
    the dropped columns go, the added ones take the migration's defaults. (A KeyError before.)"""
    archive = tmp_path / "new.tar.gz"
    create_backup(sqlite_url(world), world / "images", archive, key)
    old = write_archive(tmp_path / "old.tar.gz", _as_older_schema(members(archive), key))
    if target == "empty schema at head":
        migrate.upgrade(db_url)  # the operator ran `oncoscope db upgrade` first
    restore_backup(db_url, tmp_path / "images", old, key.public_key())
    assert migrate.current(db_url) == HEAD
    source, restored = dump(sqlite_url(world)), dump(db_url)
    names = list(Base.metadata.tables["cases"].columns.keys())
    rev = names.index("revision")
    assert all(c[rev] == 0 for c in restored["cases"])  # the migration's server default
    # (the worker's worklist columns stay empty until the case's next analysis)
    kept = [i for i, n in enumerate(names) if n not in ("revision", "ai_flag", "ready_at")]
    strip = lambda rows: [tuple(c[i] for i in kept) for c in rows]  # noqa: E731
    assert strip(restored.pop("cases")) == strip(source.pop("cases"))
    assert restored == source and files(world / "images") == files(tmp_path / "images")


@pytest.mark.parametrize("change,message", [
    pytest.param({"alembic_revision": "ffffffffffff"}, "does not know", id="revision_of_a_newer_oncoscope"),
    pytest.param({"alembic_revision": None}, "does not name the schema revision", id="no_revision"),
    pytest.param({"users_columns": True}, r"table users in the archive has columns \['failed_logins', 'locked_until'\]",
                 id="columns_the_revision_does_not_have"),
    pytest.param({"alembic_revision": OLDER},
                 r"has tables \['analyzer_policies', 'case_transitions', 'cell_changes', 'cell_labels', "
                 r"'consult_messages', 'consults', 'deliveries', 'dicom_inbox', 'login_throttle', 'readings', "
                 r"'site_settings'\] that schema "
                 r"revision d7e8f9a0b1c2",
                 id="table_the_revision_does_not_have"),
])
def test_archive_that_does_not_match_a_known_schema_revision_is_refused(world, tmp_path, key, change, message):
    """Never a KeyError: a revision from a newer oncoscope, none at all, or rows that are not those of
    the revision the archive names."""
    archive = tmp_path / "a.tar.gz"
    create_backup(sqlite_url(world), world / "images", archive, key)
    content = members(archive)
    tables = {}
    if change.pop("users_columns", False):  # what an older oncoscope's users look like, labelled as today's
        tables["users"] = [dict(u, failed_logins=0, locked_until=None) for u in _rows(content, "users")]
    bad = write_archive(tmp_path / "bad.tar.gz", _rewrite(content, tables, key, **change))
    home = tmp_path / "home"
    home.mkdir()
    with pytest.raises(BackupError, match=message):
        restore_backup(sqlite_url(home), home / "images", bad, key.public_key())
    assert not (home / "images").exists() and _rows_in(sqlite_url(home)) == 0


def _rows_in(url: str) -> int:
    """Rows in the app's tables, whatever the schema revision."""
    eng = create_engine(url, poolclass=NullPool)
    try:
        with eng.connect() as c:
            return sum(c.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar()
                       for t in inspect(c).get_table_names() if t != "alembic_version")
    finally:
        eng.dispose()


def test_backup_refuses_a_database_at_another_schema_revision(tmp_path, key):
    url = sqlite_url(tmp_path)
    migrate.upgrade(url, OLDER)
    with pytest.raises(BackupError, match=f"schema revision {OLDER}, not {HEAD}.*oncoscope db upgrade"):
        create_backup(url, tmp_path / "images", tmp_path / "b.tar.gz", key)
    assert not list(tmp_path.glob("b.tar.gz*"))


def test_check_only_writes_nothing_and_shows_when_the_archive_was_made(world, tmp_path, monkeypatch):
    """A backup host has no instance: checking an archive creates no folder, secret key or image
    folder. The creation time and schema are printed: an older signed archive verifies too."""
    _cli_env(monkeypatch, world)
    archive = tmp_path / "a.tar.gz"
    assert CliRunner().invoke(main, ["backup", str(archive)]).exit_code == 0
    manifest = json.loads(members(archive)["manifest.json"])
    host = tmp_path / "backup-host"
    _cli_env(monkeypatch, host)
    monkeypatch.setenv("ONCOSCOPE_TRUSTED_KEY", str(world / "signing_key.pub"))
    r = CliRunner().invoke(main, ["restore", "--check-only", str(archive)])
    assert r.exit_code == 0 and "nothing was written" in r.output, r.output
    assert f"archive created {manifest['created']} (0 hours ago), schema revision {HEAD}" in r.output, r.output
    assert "older archive verifies" in r.output
    assert not host.exists()
