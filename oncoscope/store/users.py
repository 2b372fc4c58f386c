"""Accounts: argon2 hashing, login throttling, session versioning."""

from __future__ import annotations

import datetime as dt
import hashlib
import math

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import and_, case, delete, func, or_, select, update
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from .db import is_retryable
from .models import ROLES, LoginThrottle, User, utcnow
from .text import UNSTORABLE_MESSAGE, unstorable

_hasher = PasswordHasher()
MIN_PASSWORD = 10
# Verify against this when the user does not exist, so timing does not reveal which emails exist.
_DUMMY_HASH = _hasher.hash("not-a-real-password-0000")


class AccountError(ValueError):
    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def password_problem(pw: str) -> str | None:
    if len(pw) < MIN_PASSWORD:
        return f"Use at least {MIN_PASSWORD} characters."
    if len(pw) > 256:
        return "Use at most 256 characters."
    if pw.lower() == pw and pw.isalpha():
        return "Mix letters with digits or symbols, or use a longer passphrase."
    return None


def normalise_email(email: str) -> str:
    return (email or "").strip().lower()


def sign_in_subject(s: Session, email: str) -> dict:
    """How a sign-in attempt names its account in the audit trail: the address of an existing
    account, else only a short hash of what was typed (which may be a password typed in the wrong box)."""
    key = normalise_email(email)
    user = s.scalar(select(User).where(User.email == key)) if key and not unstorable(key) else None
    if user is not None:
        return {"email": user.email, "account_id": user.id}
    return {"unknown_account": hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()[:16]}


def has_users(s: Session) -> bool:
    return s.scalar(select(func.count(User.id))) > 0


def create_user(s: Session, email: str, name: str, password: str, role: str = "doctor") -> User:
    if unstorable(email):
        raise AccountError(f"The email address {UNSTORABLE_MESSAGE}", "email")
    if unstorable(name):
        raise AccountError(f"The name {UNSTORABLE_MESSAGE}", "name")
    email = normalise_email(email)
    if "@" not in email or len(email) > 255:
        raise AccountError("Enter a valid email address.", "email")
    if not name.strip():
        raise AccountError("Enter a name.", "name")
    if role not in ROLES:
        raise AccountError("Unknown role.", "role")
    problem = password_problem(password)
    if problem:
        raise AccountError(problem, "password")
    if s.scalar(select(User.id).where(User.email == email)):
        raise AccountError("A user with this email already exists.", "email")
    u = User(email=email, name=name.strip()[:200], role=role, password_hash=_hasher.hash(password))
    s.add(u)
    s.flush()
    return u


def set_password(s: Session, user: User, password: str) -> None:
    problem = password_problem(password)
    if problem:
        raise AccountError(problem, "password")
    user.password_hash = _hasher.hash(password)
    user.session_version += 1  # logs out every existing session
    s.execute(delete(LoginThrottle).where(LoginThrottle.key == _throttle_key(user.email)))


# ----------------------------------------------------------------------------- sign-in throttling
# One row per address tried (hashed), real or not, in the database: every web process counts the
# same attempts, and an unknown address locks exactly like a real one. An attempt is counted, and
# the count committed, *before* the slow password check, so concurrent guesses cannot all slip in
# under the limit.
def _throttle_key(email: str) -> str:
    return hashlib.sha256(normalise_email(email).encode("utf-8", "replace")).hexdigest()


def _lock_message(until: dt.datetime, now: dt.datetime) -> AccountError:
    mins = max(1, math.ceil((until - now).total_seconds() / 60))
    return AccountError(f"Too many failed attempts. Try again in {mins} minute{'s' if mins > 1 else ''}.")


def _count_attempt(s: Session, key: str, now: dt.datetime, window: dt.timedelta) -> int:
    """Add one attempt for ``key`` atomically (one upsert) and return the count as stored. A count
    starts again after a lock has expired or after a window without attempts; it is never reset
    while locked, so attempts already past the lock check when the lock was set still count beyond
    the limit."""
    t = LoginThrottle.__table__
    expired = and_(t.c.locked_until.is_not(None), t.c.locked_until <= now)
    restart = or_(t.c.updated_at < now - window, expired)
    # MariaDB evaluates SET left to right: the CASEs must come before the columns they read change
    bump = [("attempts", case((restart, 1), else_=t.c.attempts + 1)),
            ("locked_until", case((expired, None), else_=t.c.locked_until)), ("updated_at", now)]
    dialect = s.get_bind().dialect.name
    new = {"key": key, "attempts": 1, "updated_at": now}
    if dialect == "mysql":
        stmt = mysql_insert(t).values(**new).on_duplicate_key_update(bump)
    else:
        stmt = (pg_insert if dialect == "postgresql" else sqlite_insert)(t).values(**new) \
            .on_conflict_do_update(index_elements=[t.c.key], set_=dict(bump))
    for _ in range(4):
        try:
            s.execute(stmt)
            break
        except OperationalError as exc:  # MariaDB: racing first inserts of one key may deadlock
            s.rollback()
            if not is_retryable(exc):
                raise
    else:
        s.execute(stmt)  # the last try: an error now is the caller's
    return s.scalar(select(t.c.attempts).where(t.c.key == key))


def prune_throttle(s: Session, window: dt.timedelta) -> int:
    """Forget addresses with no attempt within the window and no lock (keeps the table small)."""
    now = utcnow()
    res = s.execute(delete(LoginThrottle).where(
        LoginThrottle.updated_at < now - window,
        or_(LoginThrottle.locked_until.is_(None), LoginThrottle.locked_until < now)))
    return res.rowcount


def _lock(s: Session, key: str, now: dt.datetime, until: dt.datetime) -> None:
    """Lock from now on; a lock already running is not extended by the attempts it refuses."""
    s.execute(update(LoginThrottle).where(LoginThrottle.key == key, or_(LoginThrottle.locked_until.is_(None),
                                                                         LoginThrottle.locked_until <= now))
              .values(locked_until=until))
    s.commit()


def authenticate(s: Session, email: str, password: str, max_failures: int, lock_minutes: int) -> User:
    """Return the user or raise AccountError with a message that does not reveal which part was
    wrong, nor whether the address has an account, nor whether it is deactivated.

    Commits the session: the attempt must be visible to concurrent requests before the password
    is checked."""
    generic = AccountError("Email or password is incorrect.")
    key, now, window = _throttle_key(email), utcnow(), dt.timedelta(minutes=lock_minutes)
    locked = s.scalar(select(LoginThrottle.locked_until).where(LoginThrottle.key == key))
    if locked and locked > now:
        raise _lock_message(locked, now)
    attempts = _count_attempt(s, key, now, window)
    if attempts > max_failures:  # earlier attempts still in flight used the allowance up
        _lock(s, key, now, now + window)
        locked = s.scalar(select(LoginThrottle.locked_until).where(LoginThrottle.key == key))
        raise _lock_message(locked or now + window, now)
    s.commit()
    if attempts == 1:  # a new address (or a stale count) in the table: the moment to clear old rows
        prune_throttle(s, window)
        s.commit()
    norm = normalise_email(email)
    user = s.scalar(select(User).where(User.email == norm)) if not unstorable(norm) else None
    try:
        _hasher.verify(user.password_hash if user is not None else _DUMMY_HASH, password or "x")
        verified = user is not None and user.is_active  # a deactivated account answers like a wrong password
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        verified = False
    if not verified:
        if attempts >= max_failures:
            _lock(s, key, now, now + window)
        raise generic
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    s.execute(delete(LoginThrottle).where(LoginThrottle.key == key))
    user.last_login_at = now
    return user
