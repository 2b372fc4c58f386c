"""Accounts: argon2 hashing, login throttling, session versioning."""

from __future__ import annotations

import datetime as dt
import math

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .models import ROLES, User, utcnow
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
    import hashlib

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
    user.failed_logins = 0
    user.locked_until = None


# Failed attempts for emails that have no account, so they are throttled (and answered) exactly
# like real accounts and the lock message does not reveal which emails exist. Per process, bounded.
_unknown_failures: dict[str, tuple[int, dt.datetime | None]] = {}
_UNKNOWN_CAP = 10_000


def _lock_message(until: dt.datetime, now: dt.datetime) -> AccountError:
    mins = max(1, math.ceil((until - now).total_seconds() / 60))
    return AccountError(f"Too many failed attempts. Try again in {mins} minute{'s' if mins > 1 else ''}.")


def authenticate(s: Session, email: str, password: str, max_failures: int, lock_minutes: int) -> User:
    """Return the user or raise AccountError with a message that does not reveal which part was wrong."""
    generic = AccountError("Email or password is incorrect.")
    key = normalise_email(email)
    user = s.scalar(select(User).where(User.email == key)) if not unstorable(key) else None  # no such account
    now = utcnow()
    if user is None:
        count, until = _unknown_failures.get(key, (0, None))
        if until and until > now:
            raise _lock_message(until, now)
        try:
            _hasher.verify(_DUMMY_HASH, password or "x")
        except VerificationError:
            pass
        count += 1
        if len(_unknown_failures) >= _UNKNOWN_CAP:
            _unknown_failures.clear()
        _unknown_failures[key] = (0, now + dt.timedelta(minutes=lock_minutes)) if count >= max_failures else (count, None)
        raise generic
    if user.locked_until and user.locked_until > now:
        raise _lock_message(user.locked_until, now)
    try:
        _hasher.verify(user.password_hash, password or "")
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        user.failed_logins += 1
        if user.failed_logins >= max_failures:
            user.locked_until = now + dt.timedelta(minutes=lock_minutes)
            user.failed_logins = 0
        raise generic from None
    if not user.is_active:
        raise AccountError("This account is deactivated. Ask your administrator.")
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    user.failed_logins = 0
    user.locked_until = None
    user.last_login_at = now
    return user
