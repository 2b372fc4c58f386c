"""Personal API tokens: ``osk_<prefix>_<secret>``; only the SHA-256 is stored."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import ApiToken, User, utcnow
from .text import storable

PREFIX = "osk_"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create(s: Session, user: User, name: str, expires_in_days: int | None = None) -> tuple[ApiToken, str]:
    name = storable(name).strip()[:100] or "API token"
    prefix = secrets.token_hex(4)
    token = f"{PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    t = ApiToken(user_id=user.id, name=name, prefix=prefix, token_hash=_hash(token),
                 expires_at=utcnow() + dt.timedelta(days=expires_in_days) if expires_in_days else None)
    s.add(t)
    s.flush()
    return t, token


def verify(s: Session, token: str) -> ApiToken | None:
    """The live token for this secret (not revoked, not expired, active user), else None."""
    if not token or not token.startswith(PREFIX) or len(token) > 200:
        return None
    t = s.scalar(select(ApiToken).where(ApiToken.token_hash == _hash(token)))
    now = utcnow()
    if t is None or t.revoked_at is not None or (t.expires_at and t.expires_at <= now) or not t.user.is_active:
        return None
    if t.last_used_at is None or (now - t.last_used_at).total_seconds() > 60:
        t.last_used_at = now  # coarse, to avoid a write per request
    return t


def for_user(s: Session, user: User) -> list[ApiToken]:
    return list(s.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.created_at.desc())))


def revoke(s: Session, user: User, token_id: int) -> bool:
    t = s.get(ApiToken, token_id)
    if t is None or t.user_id != user.id or t.revoked_at is not None:
        return False
    t.revoked_at = utcnow()
    return True
