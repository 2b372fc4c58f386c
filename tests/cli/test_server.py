"""``oncoscope serve|worker`` start-up (oncoscope/cli/server.py) over ``migrate.schema_state``: an
empty database gets the schema, one behind this version is refused with the command that upgrades
it, one ahead of it (or with tables but no revision) is refused and left as it is. On SQLite,
PostgreSQL and MariaDB (scratch databases; a server that does not answer is skipped)."""

from __future__ import annotations

import pytest
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

import oncoscope.cli.server as server
from oncoscope.cli import main
from oncoscope.store import migrate
from oncoscope.store.models import Base

from ..databases import scratch_database

SCRIPT = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
HEAD = SCRIPT.get_current_head()
PREVIOUS = SCRIPT.get_revision(HEAD).down_revision
NEWER = "0123456789ab"  # a revision this version does not know


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'startup.db'}"
        return
    with scratch_database(request.param) as url:
        yield url


@pytest.fixture()
def started(tmp_path, monkeypatch):
    """What would have been served or worked on; waitress and the worker loop are not started."""
    calls = []
    monkeypatch.setattr(server, "run_server", lambda st, host, port, threads, processes: calls.append("serve"))
    monkeypatch.setattr(server, "run_worker", lambda st, burst, reconcile_every: calls.append("worker"))
    monkeypatch.setenv("ONCOSCOPE_HOME", str(tmp_path / "inst"))
    monkeypatch.setenv("ONCOSCOPE_QUEUE_URL", "redis://127.0.0.1:9/0")  # never reached: run_worker is replaced
    return calls


def run(command: str, url: str, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", url)
    return CliRunner().invoke(main, [command])


def _execute(url: str, sql: str) -> None:
    eng = create_engine(url, poolclass=NullPool)
    try:
        with eng.begin() as c:
            c.execute(text(sql))
    finally:
        eng.dispose()


def test_serve_creates_the_schema_of_an_empty_database_and_refuses_one_behind_or_ahead(db_url, started,
                                                                                       monkeypatch):
    assert migrate.schema_state(db_url) == migrate.SchemaState(migrate.EMPTY, None, HEAD)
    r = run("serve", db_url, monkeypatch)
    assert r.exit_code == 0, r.output
    assert f"the database was empty: created the schema (revision {HEAD})" in r.output
    assert "oncoscope serving on http://127.0.0.1:8000/" in r.output and started == ["serve"]
    assert migrate.schema_state(db_url) == migrate.SchemaState(migrate.CURRENT, HEAD, HEAD)
    r = run("serve", db_url, monkeypatch)  # the next start just serves
    assert r.exit_code == 0 and "created the schema" not in r.output and started == ["serve", "serve"]

    migrate.downgrade(db_url, PREVIOUS)  # as after installing a newer oncoscope
    assert migrate.schema_state(db_url) == migrate.SchemaState(migrate.BEHIND, PREVIOUS, HEAD)
    for command in ("serve", "worker"):
        r = run(command, db_url, monkeypatch)
        assert r.exit_code == 1 and "run `oncoscope db upgrade`" in r.output, r.output
        assert f"revision {PREVIOUS}, older than this version's {HEAD}" in r.output
    assert migrate.current(db_url) == PREVIOUS and started == ["serve", "serve"]  # nothing migrated, nothing run
    assert CliRunner().invoke(main, ["db", "upgrade"]).exit_code == 0  # the command it names
    assert run("serve", db_url, monkeypatch).exit_code == 0 and len(started) == 3

    _execute(db_url, f"UPDATE alembic_version SET version_num = '{NEWER}'")  # as after a newer oncoscope's upgrade
    assert migrate.schema_state(db_url) == migrate.SchemaState(migrate.AHEAD, NEWER, HEAD)
    for command in ("serve", "worker"):
        r = run(command, db_url, monkeypatch)
        assert r.exit_code == 1 and f"revision {NEWER}, which this version of oncoscope does not know" in r.output
        assert "db upgrade" not in r.output
    assert migrate.current(db_url) == NEWER and len(started) == 3


def test_a_fully_downgraded_database_is_empty_again(tmp_path, started, monkeypatch):
    url = f"sqlite:///{tmp_path / 'down.db'}"
    migrate.upgrade(url)
    migrate.downgrade(url, "base")  # leaves an empty alembic_version table behind
    assert migrate.schema_state(url).state == migrate.EMPTY
    r = run("serve", url, monkeypatch)
    assert r.exit_code == 0 and "created the schema" in r.output and migrate.current(url) == HEAD


def test_tables_without_a_revision_are_refused_and_left_alone(tmp_path, started, monkeypatch):
    url = f"sqlite:///{tmp_path / 'foreign.db'}"
    eng = create_engine(url, poolclass=NullPool)
    Base.metadata.create_all(eng)  # our tables, not made by the migrations
    eng.dispose()
    assert migrate.schema_state(url) == migrate.SchemaState(migrate.UNKNOWN, None, HEAD)
    for command in ("serve", "worker"):
        r = run(command, url, monkeypatch)
        assert r.exit_code == 1 and "no schema revision" in r.output, r.output
    assert migrate.current(url) is None and started == []


def test_other_tables_do_not_make_a_database_unknown(tmp_path, started, monkeypatch):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    _execute(url, "CREATE TABLE someone_elses (id INTEGER PRIMARY KEY)")
    assert migrate.schema_state(url).state == migrate.EMPTY
    assert run("serve", url, monkeypatch).exit_code == 0 and migrate.current(url) == HEAD


def test_worker_never_creates_the_schema(tmp_path, started, monkeypatch):
    url = f"sqlite:///{tmp_path / 'worker.db'}"
    r = run("worker", url, monkeypatch)
    assert r.exit_code == 1 and "the database has no schema yet: run `oncoscope db upgrade` first" in r.output
    assert migrate.schema_state(url).state == migrate.EMPTY and started == []
    migrate.upgrade(url)
    r = run("worker", url, monkeypatch)
    assert r.exit_code == 0 and "oncoscope worker: queue redis://127.0.0.1:9/0" in r.output and started == ["worker"]


def test_checking_a_sqlite_database_that_does_not_exist_creates_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'missing' / 'nothing.db'}"
    assert migrate.schema_state(url) == migrate.SchemaState(migrate.EMPTY, None, HEAD)
    assert migrate.current(url) is None
    assert not (tmp_path / "missing").exists()


def test_serve_on_a_fresh_instance_prepares_it(tmp_path, started, monkeypatch):
    """No DATABASE_URL: the instance folder, image store, secret key and SQLite schema are all made."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    r = CliRunner().invoke(main, ["serve", "--processes", "1"])
    assert r.exit_code == 0, r.output
    home = tmp_path / "inst"
    assert (home / "images").is_dir() and (home / "secret_key").exists()
    assert "alembic_version" in inspect(create_engine(f"sqlite:///{home / 'oncoscope.db'}")).get_table_names()
    assert "1 process x 8 threads" in r.output
