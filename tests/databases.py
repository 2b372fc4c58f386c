"""The database servers the suite runs against besides SQLite, and private scratch databases on them.

PostgreSQL and MariaDB are the local servers of the test machine (override with
ONCOSCOPE_TEST_PG_URL / ONCOSCOPE_TEST_MYSQL_URL). A scratch database is created for one test and
dropped afterwards, so tests that run at the same time (or a crashed earlier run) never share
rows. A server that does not answer within 3 s is skipped with a message, never failed."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

SERVERS = {
    "postgresql": ("PostgreSQL", os.environ.get("ONCOSCOPE_TEST_PG_URL",
                                                "postgresql+psycopg://postgres@127.0.0.1:5432/test")),
    "mariadb": ("MariaDB", os.environ.get("ONCOSCOPE_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")),
}


def reachable(url: str) -> Exception | None:
    eng = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 3})
    try:
        with eng.connect() as c:
            c.execute(text("SELECT 1"))
        return None
    except Exception as exc:  # noqa: BLE001 - any failure to connect means: skip
        return exc
    finally:
        eng.dispose()


@contextmanager
def scratch_database(server: str):
    """A fresh empty database on ``server`` ("postgresql" / "mariadb"), dropped afterwards; skips the
    test with a message when the server does not answer."""
    name, url = SERVERS[server]
    problem = reachable(url)
    if problem is not None:
        pytest.skip(f"{name} not reachable at {url}: skipped ({problem.__class__.__name__})")
    db = f"oncoscope_t_{uuid.uuid4().hex[:10]}"
    quote = '"' if server == "postgresql" else "`"
    admin = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f"CREATE DATABASE {quote}{db}{quote}"))
        yield make_url(url).set(database=db).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            force = " WITH (FORCE)" if server == "postgresql" else ""
            c.execute(text(f"DROP DATABASE IF EXISTS {quote}{db}{quote}{force}"))
        admin.dispose()


@contextmanager
def migrated_sqlite(folder):
    """A session on a new SQLite database in ``folder``, migrated to head (closed afterwards)."""
    from oncoscope.store import migrate
    from oncoscope.store.db import standalone_session

    url = f"sqlite:///{folder / 'db.sqlite'}"
    migrate.upgrade(url)
    with standalone_session(url) as s:
        yield s
