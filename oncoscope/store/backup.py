"""``oncoscope backup`` / ``oncoscope restore``: database rows and image files in one signed archive.

The backup is logical (one JSON Lines file per table), so it restores on any supported database,
e.g. from SQLite into PostgreSQL. Rows are read in one read transaction (a consistent snapshot;
REPEATABLE READ on PostgreSQL and MariaDB). Images are content-addressed and never change once
written, so copying them after the snapshot can only add files no row refers to yet.

``manifest.json`` lists every table and image file with its SHA-256; ``manifest.sig`` is the
instance's Ed25519 signature of those exact bytes (store/signing.py). Checksums alone prove
nothing: whoever edits a table can recompute them. The signature cannot be recomputed without the
private key, which stays on the application host; a restore needs only the public key.

A restore checks the signature against the trusted public key, then every checksum, before it
writes anything. It refuses a database or image folder that already holds data.

Schema revisions. A backup is refused unless the database is at this oncoscope's newest Alembic
revision (``oncoscope db upgrade`` first), so the rows always have the schema the manifest names
(``alembic_revision``). A restore creates that schema (the archive's revision, not necessarily this
version's newest), inserts the rows in one transaction, copies the images, and then runs the
migrations up to this version's schema, exactly as ``oncoscope db upgrade`` would on a live
database: columns a later migration dropped go with that migration, added ones take its defaults,
and data moves the way the migration moves it. An archive whose revision this oncoscope does not
know (made by a newer version), that names none, or whose rows have columns its revision does not
have, is refused with a ``BackupError``.

A correctly signed archive stays valid: an older one restores as well as the newest. Whoever
restores checks its creation time (``restore --check-only`` prints it) against the backup they mean.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import tarfile
from pathlib import Path

from sqlalchemy import Date, DateTime, MetaData, func, inspect, select, text

from . import migrate, signing
from .db import make_engine
from .models import Base

FORMAT = 2  # 2: signed (manifest.sig); format 1 archives are unsigned and refused
PURPOSE = "backup manifest"


class BackupError(Exception):
    """The archive is unreadable, damaged, or the target is not empty."""


def _encode(value):
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    return value


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _current_schema(conn) -> str:
    """The database's schema revision, which must be this oncoscope's newest: rows are read with its
    models, and the manifest must name the schema they have."""
    revision, head = conn.execute(text("SELECT version_num FROM alembic_version")).scalar(), revisions()[0]
    if revision != head:
        raise BackupError(f"the database is at schema revision {revision}, not {head} (this oncoscope's): run "
                          "`oncoscope db upgrade` first")
    return revision


def create_backup(database_url: str, images_dir: Path, out: Path, key: signing.Ed25519PrivateKey) -> dict:
    """Write ``out`` (a .tar.gz), its manifest signed with ``key``, and return the manifest."""
    engine = make_engine(database_url)
    tables: dict[str, dict] = {}
    payload: dict[str, bytes] = {}
    try:
        with engine.connect() as conn:
            if engine.dialect.name in ("postgresql", "mysql", "mariadb"):
                conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
            elif engine.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN")  # pysqlite does not open a transaction for reads by itself
            revision = _current_schema(conn)
            for table in Base.metadata.sorted_tables:
                rows = conn.execute(select(table).order_by(*table.primary_key.columns)).mappings().all()
                data = "".join(json.dumps({k: _encode(v) for k, v in r.items()}, sort_keys=True) + "\n"
                               for r in rows).encode()
                payload[f"db/{table.name}.jsonl"] = data
                tables[table.name] = {"rows": len(rows), "sha256": _sha(data)}
            conn.rollback()
    finally:
        engine.dispose()
    images = {}
    root = Path(images_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")) if root.is_dir() else []
    manifest = {"format": FORMAT, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "alembic_revision": revision, "database_dialect": engine.dialect.name, "tables": tables,
                "images": images}
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    with tarfile.open(tmp, "w:gz") as tar:
        for name, data in payload.items():
            _add(tar, name, data)
        for p in files:
            data = p.read_bytes()
            rel = p.relative_to(root).as_posix()
            images[rel] = _sha(data)
            _add(tar, f"images/{rel}", data)
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        _add(tar, "manifest.json", body)
        _add(tar, "manifest.sig", json.dumps(signing.sign(key, PURPOSE, body)).encode())
    tmp.replace(out)  # a crash never leaves a half-written archive under the final name
    return manifest


def _check_signature(members: dict[str, bytes], trusted: signing.Ed25519PublicKey) -> None:
    try:
        sig = json.loads(members.get("manifest.sig", b"null"))
    except ValueError:
        sig = None  # reported as unsigned
    try:
        signing.check(trusted, PURPOSE, members["manifest.json"], sig, "the archive")
    except signing.SignatureError as exc:
        raise BackupError(str(exc)) from None


def check_backup(archive: Path, trusted: signing.Ed25519PublicKey | None) -> tuple[dict, dict[str, bytes]]:
    """The manifest and members of ``archive`` once its signature (by ``trusted``) and every
    checksum are verified; writes nothing, so a backup host can check archives with the public key."""
    if trusted is None:
        raise BackupError("no trusted public key given: only archives signed by a known key are accepted")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {}
            for m in tar.getmembers():
                if not m.isfile() or m.name.startswith("/") or ".." in Path(m.name).parts:
                    raise BackupError(f"unexpected entry in the archive: {m.name!r}")
                members[m.name] = tar.extractfile(m).read()
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise BackupError(f"cannot read {archive}: {exc}") from None
    if "manifest.json" not in members:
        raise BackupError("the archive has no manifest.json: not an oncoscope backup")
    _check_signature(members, trusted)  # before the manifest is even parsed
    manifest = json.loads(members["manifest.json"])
    if manifest.get("format") != FORMAT:
        raise BackupError(f"unsupported backup format {manifest.get('format')!r}")
    for name, t in manifest["tables"].items():
        if _sha(members.get(f"db/{name}.jsonl", b"")) != t["sha256"]:
            raise BackupError(f"checksum mismatch for table {name}: the archive is damaged")
    for rel, sha in manifest["images"].items():
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts or "\\" in rel:  # restore writes images_dir / rel
            raise BackupError(f"unexpected image path in the manifest: {rel!r}")
        if _sha(members.get(f"images/{rel}", b"")) != sha:
            raise BackupError(f"checksum mismatch for image file {rel}: the archive is damaged")
    return manifest, members


def revisions() -> list[str]:
    """This oncoscope's schema revisions, newest first (the migration history is linear)."""
    from alembic.script import ScriptDirectory

    return [r.revision for r in ScriptDirectory.from_config(migrate.alembic_config("sqlite://")).walk_revisions()]


def _archive_revision(manifest: dict, known: list[str]) -> str:
    rev = manifest.get("alembic_revision")
    if rev is None:
        raise BackupError("the archive does not name the schema revision of its rows: it cannot be restored")
    if rev not in known:
        raise BackupError(f"the archive was made at schema revision {rev}, which this oncoscope does not know (a "
                          "newer version made it): restore it with that version of oncoscope or a later one")
    return rev


def _schema_at(database_url: str, rev: str, known: list[str]) -> None:
    """Bring the (empty) database to the archive's revision."""
    cur = migrate.current(database_url)
    if cur is not None and cur not in known:
        raise BackupError(f"the database is at schema revision {cur}, which this oncoscope does not know")
    if cur is not None and known.index(cur) < known.index(rev):
        migrate.downgrade(database_url, rev)  # already at a later schema (e.g. after `db upgrade`) but empty
    else:
        migrate.upgrade(database_url, rev)


def _tables_at(conn, manifest: dict, rev: str) -> list:
    """The archive's tables as the database has them at ``rev``, parents first. Columns the models
    still have take the models' types (JSON, dates): what the database reports for them varies."""
    extra = set(manifest["tables"]) - set(inspect(conn).get_table_names())
    if extra:
        raise BackupError(f"the archive has tables {sorted(extra)} that schema revision {rev} does not have: "
                          "it does not match the revision it names")
    meta = MetaData()
    meta.reflect(conn, only=list(manifest["tables"]))
    for table in meta.tables.values():
        model = Base.metadata.tables.get(table.name)
        for col in table.columns:
            if model is not None and col.name in model.c:
                col.type = model.c[col.name].type
    return [t for t in meta.sorted_tables if t.name in manifest["tables"]]


def _rows(table, data: bytes, rev: str) -> list[dict]:
    rows = [json.loads(line) for line in data.decode().splitlines() if line]
    unknown = set().union(*rows) - set(table.columns.keys())
    if unknown:
        raise BackupError(f"table {table.name} in the archive has columns {sorted(unknown)} that schema revision "
                          f"{rev} does not have: it does not match the revision it names")
    return [{k: _decode(table.columns[k], v) for k, v in r.items()} for r in rows]


def _decode(col, v):
    if v is not None and isinstance(col.type, DateTime):
        return dt.datetime.fromisoformat(v)
    if v is not None and isinstance(col.type, Date):
        return dt.date.fromisoformat(v)
    return v


def _insert(conn, manifest: dict, members: dict[str, bytes], rev: str) -> None:
    for table in _tables_at(conn, manifest, rev):
        rows = _rows(table, members[f"db/{table.name}.jsonl"], rev)
        if rows:
            conn.execute(table.insert(), rows)
        if conn.dialect.name == "postgresql" and "id" in table.columns and rows:
            conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                              f"(SELECT MAX(id) FROM {table.name}))"))


def _refuse_data(engine) -> None:
    with engine.connect() as conn:
        have = set(engine.dialect.get_table_names(conn))
        for table in Base.metadata.sorted_tables:
            if table.name in have and conn.execute(select(func.count()).select_from(table)).scalar():
                raise BackupError(f"the database already holds data (table {table.name}): restore needs an "
                                  "empty database")


def restore_backup(database_url: str, images_dir: Path, archive: Path,
                   trusted: signing.Ed25519PublicKey | None = None) -> dict:
    """Restore ``archive``, which ``trusted`` must have signed, into an empty database and image
    folder, at the archive's schema revision, then migrate it to this version's; returns the manifest."""
    manifest, members = check_backup(archive, trusted)  # signature and checksums before any write
    known = revisions()
    rev = _archive_revision(manifest, known)
    images_dir = Path(images_dir)
    if images_dir.is_dir() and any(images_dir.iterdir()):
        raise BackupError(f"the image folder {images_dir} is not empty: restore needs an empty instance")
    engine = make_engine(database_url)
    try:
        _refuse_data(engine)
        _schema_at(database_url, rev, known)
        with engine.begin() as conn:
            _insert(conn, manifest, members, rev)
    finally:
        engine.dispose()
    for rel in manifest["images"]:
        dest = images_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(members[f"images/{rel}"])
    migrate.upgrade(database_url, "head")  # the migrations carry the rows on, as on a live database
    return manifest
