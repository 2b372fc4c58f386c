"""Reading an API request: the JSON body (validated against its schema), paging, and the records
the path names (404 when they do not exist or are not visible to the caller)."""

from __future__ import annotations

from flask import g, request

from ...store import access
from ...store import cases as case_store
from ...store import patients as patient_store
from .. import audit
from ..errors import ApiError
from ..helpers import db
from .schemas import SCHEMAS


def request_json():
    """The parsed JSON body, or None when there is none or it does not parse (nesting deeper than
    the parser goes, e.g. 100 000 '[', raises RecursionError rather than a ValueError)."""
    try:
        return request.get_json(silent=True)
    except RecursionError:
        return None


def json_body() -> dict:
    data = request_json()
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "Send a JSON object with Content-Type: application/json.")
    return data


def validate_fields(data: dict, schema_name: str) -> dict:
    """Strict validation against the documented schema: unknown fields, wrong types, lengths, enums."""
    return _check_object(data, SCHEMAS[schema_name])


def _check_object(data: dict, sch: dict, where: str = "") -> dict:
    props = sch["properties"]
    for k, v in data.items():
        if k not in props:
            raise ApiError(422, "unknown_field", f"Unknown field {where + k!r}.", where + k)
        _check_value(where + k, v, props[k])
    for k in sch.get("required", []):
        if k not in data:
            raise ApiError(422, "missing", f"{where + k} is required.", where + k)
    return data


def _check_value(k: str, v, spec: dict) -> None:
    types = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
    if v is None and "null" not in types:
        raise ApiError(422, "invalid", f"{k} may not be null.", k)
    if "boolean" in types and v is not None:
        if not isinstance(v, bool):
            raise ApiError(422, "invalid", f"{k} must be true or false.", k)
        return
    if "array" in types and v is not None:
        lo, hi = spec.get("minItems", 0), spec.get("maxItems", 10_000)
        if not isinstance(v, list) or not lo <= len(v) <= hi:
            raise ApiError(422, "invalid", f"{k} must be a list of {lo} to {hi} items.", k)
        for i, item in enumerate(v):
            if spec["items"]["type"] != "object":
                _check_value(f"{k}[{i}]", item, spec["items"])
            elif not isinstance(item, dict):
                raise ApiError(422, "invalid", f"{k}[{i}] must be an object.", k)
            else:
                _check_object(item, spec["items"], f"{k}[{i}].")
        return
    if "integer" in types and v is not None:
        if not isinstance(v, int) or isinstance(v, bool) or not spec["minimum"] <= v <= spec["maximum"]:
            raise ApiError(422, "invalid", f"{k} must be an integer from {spec['minimum']} to {spec['maximum']}.", k)
        return
    if v is not None and not isinstance(v, str):
        raise ApiError(422, "invalid", f"{k} must be a string.", k)
    if isinstance(v, str):
        if len(v) > spec.get("maxLength", 10_000):
            raise ApiError(422, "too_long", f"{k} is limited to {spec['maxLength']} characters.", k)
        if len(v) < spec.get("minLength", 0):
            raise ApiError(422, "invalid", f"{k} may not be empty.", k)
        if "enum" in spec and v not in spec["enum"]:
            raise ApiError(422, "invalid", f"{k} must be one of {', '.join(spec['enum'])}.", k)


def _int_arg(name: str, default: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ApiError(400, "invalid_parameter", f"{name} must be an integer.", name) from None
    if v < 1 or v > hi:
        raise ApiError(400, "invalid_parameter", f"{name} must be between 1 and {hi}.", name)
    return v


def page_args() -> tuple[int, int]:
    return _int_arg("page", 1, 100_000), _int_arg("per_page", 25, 100)


def patient_or_404(pid: int):
    p = patient_store.get_visible(db(), g.api_user, pid)
    if p is None:
        raise ApiError(404, "not_found", f"No patient {pid} visible to you.")
    audit.subject(patient_id=p.id)
    return p


def require_role(capability: str) -> None:
    """403 unless the user's role allows ``capability`` (store/access), before any lookup."""
    if not access.may(g.api_user, capability):
        raise ApiError(403, "forbidden", access.REFUSED[capability])


def case_or_404(cid: int, need: str | None = None):
    """The case if visible (else 404); with ``need``, full access for that capability (else 403)."""
    if need is not None:
        require_role(need)
    c = case_store.get_visible(db(), g.api_user, cid)
    if c is None:
        raise ApiError(404, "not_found", f"No case {cid} visible to you.")
    audit.subject(patient_id=c.patient_id)
    if need is not None:
        try:
            access.require(db(), g.api_user, need, c)
        except access.Forbidden as exc:
            raise ApiError(403, "forbidden", str(exc)) from None
    return c
