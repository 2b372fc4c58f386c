"""Programmatic Alembic: ``oncoscope db upgrade|downgrade|current``, and :func:`schema_state`, which
tells ``oncoscope serve`` and ``oncoscope worker`` whether the database can be used as it is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, make_url
from sqlalchemy.pool import NullPool

from .models import Base

MIGRATIONS = Path(__file__).resolve().parent / "migrations"

# What schema_state() finds, against this version's migrations:
EMPTY = "empty"      # no revision and none of our tables: a new database, safe to create the schema in
CURRENT = "current"  # at this version's newest revision
BEHIND = "behind"    # at an older revision this version knows: `oncoscope db upgrade` brings it forward
AHEAD = "ahead"      # at a revision this version does not know (a newer oncoscope migrated it)
UNKNOWN = "unknown"  # our tables without an Alembic revision: not made by the migrations, never touched


@dataclass(frozen=True)
class SchemaState:
    state: str              # EMPTY, CURRENT, BEHIND, AHEAD or UNKNOWN
    revision: str | None    # the database's Alembic revision (None: none recorded)
    head: str               # this version's newest revision


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "-1") -> None:
    command.downgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    """The database's Alembic revision; None when it has none (or is a SQLite file not made yet)."""
    if _no_sqlite_file(url):
        return None
    eng = create_engine(url)
    try:
        with eng.connect() as c:
            return MigrationContext.configure(c).get_current_revision()
    finally:
        eng.dispose()


def schema_state(url: str) -> SchemaState:
    """Where the database at ``url`` stands against this version's migrations; reads only."""
    script = ScriptDirectory.from_config(alembic_config(url))
    head = script.get_current_head()
    if _no_sqlite_file(url):
        return SchemaState(EMPTY, None, head)
    eng = create_engine(url, poolclass=NullPool)
    try:
        with eng.connect() as c:
            revisions = MigrationContext.configure(c).get_current_heads()
            ours = set(inspect(c).get_table_names()) & set(Base.metadata.tables)
    finally:
        eng.dispose()
    if not revisions:  # (a full downgrade leaves an empty alembic_version table: still empty)
        return SchemaState(UNKNOWN if ours else EMPTY, None, head)
    revision = revisions[0] if len(revisions) == 1 else ",".join(revisions)
    known = {r.revision for r in script.walk_revisions()}
    if any(r not in known for r in revisions):
        return SchemaState(AHEAD, revision, head)
    return SchemaState(CURRENT if set(revisions) == set(script.get_heads()) else BEHIND, revision, head)


def _no_sqlite_file(url: str) -> bool:
    """A SQLite database whose file does not exist yet: empty, and a check must not create it (connecting would)."""
    u = make_url(url)
    path = u.database or ""
    return u.get_backend_name() == "sqlite" and path not in ("", ":memory:") and not path.startswith("file:") \
        and not Path(path).exists()


def revision(url: str, message: str) -> None:
    command.revision(alembic_config(url), message=message, autogenerate=True)
