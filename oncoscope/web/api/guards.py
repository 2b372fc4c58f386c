"""What every API request passes around its handler: the bearer token (``authenticate``) and, for
routes that accept an Idempotency-Key, the replay of the first answer to a retried request."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

from flask import Response, g, request
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from ...store import patients as patient_store
from ...store import tokens as token_store
from ...store.models import IdempotencyRecord, utcnow
from .. import audit
from ..errors import ApiError
from ..helpers import db, settings
from .inputs import request_json


def authenticate() -> None:
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer "):
        raise ApiError(401, "unauthenticated", "Send a personal API token: 'Authorization: Bearer <token>'.")
    t = token_store.verify(db(), auth[7:].strip())
    if t is None:
        raise ApiError(401, "invalid_token", "The token is invalid, revoked or expired.")
    db().commit()
    g.api_user = t.user


def idempotent(run):
    """Replay the stored answer to a retried request, once the caller may still see what it shows;
    else ``run()`` and store its answer under the key."""
    key = request.headers["Idempotency-Key"]
    if len(key) > 128 or not key.strip():
        raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key must be 1-128 characters.", "Idempotency-Key")
    fp = _fingerprint()
    expired = utcnow() - dt.timedelta(hours=settings().idempotency_hours)
    rec = db().scalar(select(IdempotencyRecord).where(IdempotencyRecord.user_id == g.api_user.id,
                                                      IdempotencyRecord.key == key,
                                                      IdempotencyRecord.created_at >= expired))
    if rec is not None:
        return _replay(rec, fp)
    resp = run()
    if resp.status_code < 500:
        _store(key, fp, resp, expired)
    return resp


def _replay(rec: IdempotencyRecord, fp: str) -> Response:
    if rec.request_fingerprint != fp:
        raise ApiError(422, "idempotency_key_reused", "This Idempotency-Key was used for a different request.",
                       "Idempotency-Key")
    if rec.patient_id is not None:  # access may have been removed since the first answer
        audit.subject(patient_id=rec.patient_id)
        if patient_store.get_visible(db(), g.api_user, rec.patient_id) is None:
            raise ApiError(404, "not_found", "What this request created is no longer visible to you.")
    resp = Response(json.dumps(rec.response, sort_keys=True), status=rec.status_code, mimetype="application/json")
    resp.headers["Idempotent-Replayed"] = "true"
    return resp


def _store(key: str, fp: str, resp: Response, expired) -> None:
    s = db()
    try:
        s.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at < expired))
        s.add(IdempotencyRecord(user_id=g.api_user.id, key=key, request_fingerprint=fp,
                                status_code=resp.status_code, response=json.loads(resp.get_data() or b"null"),
                                patient_id=audit.touched_patient()))
        s.commit()
    except IntegrityError:  # a concurrent retry stored it first: its answer stands
        s.rollback()


def _fingerprint() -> str:
    """What the request asks for, independent of transport details (multipart boundaries, key order)."""
    h = hashlib.sha256(f"{request.method} {request.path}\n".encode())
    if request.files:
        for field, f in sorted(request.files.items(multi=True), key=lambda kv: (kv[0] or "", kv[1].filename or "")):
            pos = f.stream.tell()
            h.update(f"{field}:{f.filename}:".encode() + hashlib.sha256(f.stream.read()).digest())
            f.stream.seek(pos)
        for k, v in sorted(request.form.items(multi=True), key=lambda kv: (kv[0] or "", kv[1] or "")):
            h.update(f"{k}={v}\n".encode())
    else:
        data = request_json()
        h.update(json.dumps(data, sort_keys=True).encode() if data is not None else request.get_data())
    return h.hexdigest()
