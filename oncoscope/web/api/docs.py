"""The OpenAPI 3.1 document (``/openapi.json``, built from the ``@api`` declarations) and the
human-readable page made from it (``/docs``)."""

from __future__ import annotations

from flask import jsonify, render_template
from markupsafe import Markup, escape

from ... import __version__
from .core import PATHS, bp
from .schemas import SCHEMAS

# The order of the paths in the document and on the docs page: as first published (when the API was
# one module declaring them in this order). Paths declared since follow in declaration order.
PUBLISHED_ORDER = ("/analyzers", "/patients", "/patients/{patient_id}", "/patients/{patient_id}/cases", "/cases",
                   "/cases/{case_id}/images/{image_id}/retry", "/patients/{patient_id}/doctors", "/cases/{case_id}",
                   "/cases/{case_id}/images", "/cases/{case_id}/sign")


def _paths() -> dict:
    rank = {p: i for i, p in enumerate(PUBLISHED_ORDER)}
    return dict(sorted(PATHS.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def openapi_document() -> dict:
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {"title": "oncoscope API", "version": __version__,
                 "description": "Patients, cases, AI analyses, sign-off and reports. Authenticate with a personal "
                                "API token created on the account page: `Authorization: Bearer <token>`. Errors have "
                                "the shape `{\"error\": {\"code\", \"message\", \"field\"}}`."},
        "servers": [{"url": "/api/v1"}],
        "paths": _paths(),
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "Personal API token (osk_...)"}}},
    }


@bp.get("/openapi.json")
def openapi_json():
    return jsonify(openapi_document())


@bp.app_template_filter("backticks")
def _backticks(text: str):
    """`code` spans -> <code>, everything else escaped (for the docs page)."""
    parts = str(text).split("`")
    return Markup("".join(f"<code>{escape(p)}</code>" if i % 2 else str(escape(p)) for i, p in enumerate(parts)))


@bp.get("/docs")
def docs():
    return render_template("api_docs.html", spec=openapi_document(), title="API documentation")
