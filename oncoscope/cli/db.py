"""``oncoscope db upgrade|downgrade|current``: the schema migrations (Alembic)."""

from __future__ import annotations

import click

from ..config import Settings
from ..store import migrate
from ..store.db import standalone_session
from ..store.patients import MRN_RULE, legacy_mrns


@click.group()
def db():
    """Database schema migrations (Alembic)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision):
    """Create or upgrade the schema."""
    _migrate("upgrade", revision)


@db.command("downgrade")
@click.option("--revision", default="-1", show_default=True)
def db_downgrade(revision):
    """Step the schema back (default: one migration)."""
    _migrate("downgrade", revision)


def _migrate(direction: str, revision: str) -> None:
    st = Settings.from_env().prepare()
    getattr(migrate, direction)(st.database_url, revision)
    click.echo(f"database at revision {migrate.current(st.database_url)}")
    if direction == "upgrade":
        _warn_legacy_mrns(st.database_url)


def _warn_legacy_mrns(url: str) -> None:
    with standalone_session(url) as s:
        bad = legacy_mrns(s)
    if bad:
        shown = ", ".join(f"#{pid} {mrn!r}" for pid, mrn in bad[:10]) + (" ..." if len(bad) > 10 else "")
        click.echo(f"WARNING: {len(bad)} patient(s) have an MRN outside the allowed set ({MRN_RULE}) "
                   f"and should be corrected on their patient page: {shown}. Exports escape them meanwhile.", err=True)


@db.command("current")
def db_current():
    click.echo(migrate.current(Settings.from_env().database_url) or "empty")
