"""``oncoscope backup`` / ``restore``: the seeded world (users, patients, cases, analyses, images) is
backed up, restored into an empty instance (SQLite, and PostgreSQL / MariaDB when they answer) and
compared row by row and file by file; damaged archives and non-empty targets are refused."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, select
from sqlalchemy.pool import NullPool

from oncoscope.cli import main
from oncoscope.store.backup import BackupError, create_backup, restore_backup
from oncoscope.store.models import Base

from ..web.conftest import _fast_hashing, seed_homes, sqlite_url  # noqa: F401 - fixtures
from .test_migrations import db_url  # noqa: F401 - fixture (sqlite, postgresql, mariadb)


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


@pytest.fixture()
def world(seed_homes, tmp_path):  # noqa: F811 - the imported fixture
    from ..web.conftest import copy_seed

    return copy_seed(seed_homes, "world", tmp_path / "world")


def test_backup_restore_round_trip(world, tmp_path, db_url):  # noqa: F811
    archive = tmp_path / "backup.tar.gz"
    src = sqlite_url(world)
    m = create_backup(src, world / "images", archive)
    assert m["tables"]["users"]["rows"] == 4 and m["tables"]["analyses"]["rows"] == 2 and m["images"]
    target_images = tmp_path / "restored-images"
    restore_backup(db_url, target_images, archive)
    before, after = dump(src), dump(db_url)
    assert before == after and sum(len(v) for v in after.values()) > 10
    assert files(world / "images") == files(target_images)
    # a second restore onto the now non-empty instance is refused, and changes nothing
    with pytest.raises(BackupError, match="not empty|already holds data"):
        restore_backup(db_url, target_images, archive)
    assert dump(db_url) == after


def test_damaged_archive_is_refused_before_anything_is_written(world, tmp_path):
    archive = tmp_path / "b.tar.gz"
    create_backup(sqlite_url(world), world / "images", archive)
    with tarfile.open(archive, "r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    members["db/patients.jsonl"] = members["db/patients.jsonl"].replace(b"Doe", b"Eve")
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    target = tmp_path / "t"
    target.mkdir()
    url = sqlite_url(target)
    with pytest.raises(BackupError, match="checksum mismatch for table patients"):
        restore_backup(url, target / "images", bad)
    assert not (target / "images").exists() and not (target / "oncoscope.db").exists()
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(BackupError, match="cannot read"):
        restore_backup(url, target / "images", tmp_path / "junk.tar.gz")


def test_cli_backup_and_restore(world, tmp_path, monkeypatch):
    archive = tmp_path / "cli.tar.gz"
    monkeypatch.setenv("ONCOSCOPE_HOME", str(world))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    r = CliRunner().invoke(main, ["backup", str(archive)])
    assert r.exit_code == 0 and "rows in" in r.output, r.output
    manifest = json.loads(tarfile.open(archive).extractfile("manifest.json").read())
    assert manifest["alembic_revision"] and manifest["database_dialect"] == "sqlite"
    fresh = tmp_path / "fresh"
    monkeypatch.setenv("ONCOSCOPE_HOME", str(fresh))
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
