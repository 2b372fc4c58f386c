"""The API blueprint and its one way to declare a route: ``@api(...)`` registers the Flask route
and its OpenAPI operation together, so the code and the document cannot drift apart. Every route
passes the same guards (bearer token, Idempotency-Key replay) and encodes its answer the same way
(sorted JSON with a weak ETag for GETs)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import wraps

from flask import Blueprint, Response, request
from sqlalchemy.orm import Session

from ..errors import ApiError, error_response
from ..helpers import db
from ..security import csrf
from .guards import authenticate, idempotent
from .schemas import ID, obj, ref

bp = Blueprint("api", __name__, url_prefix="/api/v1")
csrf.exempt(bp)

PATHS: dict[str, dict] = {}  # the OpenAPI "paths", filled by @api in declaration order


@bp.errorhandler(ApiError)
def _api_error(e: ApiError):
    return error_response(e.status, e.code, e.message, e.field)


def _err(desc: str) -> dict:
    return {"description": desc, "content": {"application/json": {"schema": ref("Error")}}}


IDEMPOTENCY_KEY = {"name": "Idempotency-Key", "in": "header", "required": False,
                   "schema": {"type": "string", "maxLength": 128},
                   "description": "Retries with the same key replay the first answer instead of acting twice."}
UPLOAD_BODY = {"required": True, "content": {"multipart/form-data": {"schema": obj(
    {"images": {"type": "array", "items": {"type": "string", "contentMediaType": "application/octet-stream"}}},
    ["images"])}}}
UPLOAD_422 = {"description": "No image could be used (per-file reasons in errors), or no files / a reused "
                             "Idempotency-Key (Error shape)",
              "content": {"application/json": {"schema": {"oneOf": [ref("UploadResult"), ref("Error")]}}}}


@dataclass(frozen=True)
class Route:
    """One declared operation: what ``@api(...)`` was given."""

    path: str  # OpenAPI style: /cases/{case_id}
    method: str
    summary: str
    tag: str
    response: str | None = None  # the schema of the success answer
    status: int = 200
    body: str | None = None  # the schema of the JSON body
    multipart: bool = False
    query: list[dict] = field(default_factory=list)
    media: str = "application/json"
    idempotent_key: bool = False
    public: bool = False
    errors: dict[int, str] = field(default_factory=dict)

    def path_names(self) -> list[str]:
        return [seg[1:-1] for seg in self.path.split("/") if seg.startswith("{")]

    def flask_path(self) -> str:
        out = self.path
        for name in self.path_names():
            out = out.replace(f"{{{name}}}", f"<int:{name}>")
        return out

    def parameters(self) -> list[dict]:
        params = [{"name": n, "in": "path", "required": True, "schema": dict(ID)} for n in self.path_names()]
        params += self.query
        if self.idempotent_key:
            params.append(IDEMPOTENCY_KEY)
        return params

    def responses(self) -> dict:
        r = {}
        if not self.public:
            r["401"] = _err("Missing, invalid, revoked or expired token")
            if self.method != "GET":
                r["403"] = _err("The user's role does not allow this, or the user was only consulted on the case")
        if self.path_names():
            r["404"] = _err("Not found, or not visible to this user")
        if self.body:
            r["422"] = _err("Validation error (see error.field)")
            r["400"] = _err("The body is not a JSON object")
        if self.query:
            r["400"] = _err("Invalid query parameter (see error.field)")
        if self.idempotent_key:
            r.setdefault("400", _err("Invalid Idempotency-Key"))
            r.setdefault("422", _err("Idempotency-Key reused for a different request"))
        r.update({str(code): _err(desc) for code, desc in self.errors.items()})
        if self.multipart:
            r["409"] = _err("The case is signed")
            r["422"] = UPLOAD_422
        ok = {"description": "OK"}
        if self.media != "application/json":
            ok["content"] = {self.media: {"schema": {"type": "string"}}}
        elif self.response:
            ok["content"] = {"application/json": {"schema": ref(self.response)}}
        if self.media == "application/json" and self.method == "GET":
            r["304"] = {"description": "Not modified (If-None-Match)"}
        r[str(self.status)] = ok
        return r

    def operation(self, operation_id: str) -> dict:
        """The OpenAPI operation object."""
        op = {"summary": self.summary, "tags": [self.tag], "operationId": operation_id,
              "parameters": self.parameters(), "responses": self.responses()}
        if not self.public:
            op["security"] = [{"bearer": []}]
        if self.body:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(self.body)}}}
        if self.multipart:
            op["requestBody"] = UPLOAD_BODY
        return op


def api(path: str, method: str, **declared):
    """Register a Flask route and its OpenAPI operation in one place (``declared``: see ``Route``).
    The view's name is the endpoint (``api.<name>``) and the operationId."""
    route = Route(path, method, **declared)

    def deco(fn):
        PATHS.setdefault(path, {})[method.lower()] = route.operation(fn.__name__)

        @wraps(fn)
        def wrapper(*a, **kw):
            if not route.public:
                authenticate()
            if route.idempotent_key and request.headers.get("Idempotency-Key"):
                return idempotent(lambda: _finish(fn(*a, **kw), route))
            return _finish(fn(*a, **kw), route)

        bp.add_url_rule(route.flask_path(), endpoint=fn.__name__, view_func=wrapper, methods=[method])
        return fn

    return deco


def _finish(result, route: Route):
    """A handler's dict as sorted JSON with the declared status; a GET gets a weak ETag (and 304)."""
    if isinstance(result, Response) or route.media != "application/json":
        return result
    body = json.dumps(result, sort_keys=True, default=str)
    resp = Response(body, status=route.status, mimetype="application/json")
    if request.method == "GET":
        etag = hashlib.sha256(body.encode()).hexdigest()[:32]
        resp.set_etag(etag, weak=True)
        if request.if_none_match and request.if_none_match.contains_weak(etag):
            return Response(status=304, headers={"ETag": resp.headers["ETag"]})
    return resp


@contextmanager
def committed(refusal: type[Exception], answer: Callable[[Exception], ApiError]) -> Iterator[Session]:
    """The request's session for a store write, committed at the end; when the store refuses
    (``refusal``), the write is rolled back and the client gets ``answer(exc)``."""
    s = db()
    try:
        yield s
        s.commit()
    except refusal as exc:
        s.rollback()
        raise answer(exc) from None
