"""Engine and session factory. One engine per app; sessions are short-lived (per request / per job)."""

from __future__ import annotations

from contextlib import contextmanager

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str) -> Engine:
    kwargs = {"pool_pre_ping": True, "future": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs.update(pool_size=10, max_overflow=20, pool_recycle=1800)
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, future=True)


@contextmanager
def session_scope(factory: sessionmaker[Session]):
    s = factory()
    try:
        yield s
        s.commit()
    except BaseException:
        s.rollback()
        raise
    finally:
        s.close()


def once_more_on_race(factory: sessionmaker[Session], work, retry_on: tuple = (IntegrityError,)):
    """``work(session)`` in a session of its own (it commits what it wants kept). When it meets
    ``retry_on`` (a unique key another writer filled at the same moment, by default), it is rolled
    back and run once more in a fresh session, which then finds the other writer's rows."""
    for attempt in (1, 2):
        s = factory()
        try:
            return work(s)
        except retry_on:
            s.rollback()
            if attempt == 2:
                raise
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()
    raise AssertionError("unreachable")


@contextmanager
def standalone_session(url: str):
    """A session on an engine of its own, for work outside the web app (commands, benches);
    the engine is disposed afterwards. Commits are the caller's."""
    engine = make_engine(url)
    s = make_session_factory(engine)()
    try:
        yield s
    finally:
        s.close()
        engine.dispose()


def is_retryable(exc: OperationalError) -> bool:
    """A deadlock or lock-wait timeout (MariaDB gap locks between racing inserts), or a PostgreSQL
    deadlock/serialization failure: the transaction was rolled back and may simply be run again."""
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "args", [None])[0] if orig is not None else None
    return code in (1213, 1205) or getattr(orig, "sqlstate", None) in ("40P01", "40001")


def ping(engine: Engine) -> bool:
    try:
        with engine.connect() as c:
            c.execute(text("SELECT 1"))
        return True
    except Exception:  # noqa: BLE001 - health check reports, never raises
        return False
