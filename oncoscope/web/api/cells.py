"""A case's white cells: the gallery's list, batch reclassification and undo (the same store
functions, rules and audit as the gallery page)."""

from __future__ import annotations

from flask import g, request

from ...analyzers import registry
from ...store import cases as case_store
from ...store import cells as cell_store
from .. import audit
from ..errors import ApiError
from ..helpers import db, settings
from .core import api, committed
from .inputs import _int_arg, case_or_404, json_body, validate_fields
from .schemas import CELL_CLASS
from .serializers import cell_review_json, cells_json

CELL_QUERY = [{"name": "class", "in": "query", "required": False, "schema": CELL_CLASS},
              {"name": "page", "in": "query", "required": False,
               "schema": {"type": "integer", "minimum": 1, "maximum": 100000}},
              {"name": "per_page", "in": "query", "required": False,
               "schema": {"type": "integer", "minimum": 1, "maximum": 500}}]


def _cell_classifying(case_id: int, need: str | None = None):
    c = case_or_404(case_id, need)
    if not case_store.classifies_cells(registry.installed(c.analyzer_id)):
        raise ApiError(409, "no_cells", f"Case {c.id}'s analyzer ({c.analyzer_id}) does not classify cells.")
    return c


def _refused(exc: case_store.CaseError) -> ApiError:
    if isinstance(exc, cell_store.CellConflict):
        return ApiError(409, "conflict", str(exc), exc.field)
    return ApiError(422, "invalid", str(exc), exc.field)


@api("/cases/{case_id}/cells", "GET", summary="The case's white cells in gallery order (blasts and unidentified "
     "first), filtered by current class", tag="cells", response="CellPage", query=CELL_QUERY,
     errors={409: "The case's analyzer does not classify cells"})
def list_cells(case_id: int):
    c = _cell_classifying(case_id)
    cls = request.args.get("class") or None
    if cls is not None and cls not in cell_store.GALLERY_ORDER:
        raise ApiError(400, "invalid_parameter", f"class must be one of {', '.join(cell_store.GALLERY_ORDER)}.", "class")
    page, per_page = _int_arg("page", 1, 100_000), _int_arg("per_page", 200, 500)
    s = db()
    got = cell_store.list_cells(s, c, cls, page, per_page)
    s.commit()  # the rows ensure_cells made for an older case
    return {"items": cells_json(s, got.cells), "page": got.page, "per_page": got.per_page,
            "pages": max(1, -(-got.total // per_page)), "total": got.total}


@api("/cases/{case_id}/cells", "PATCH", summary="Verify or reclassify cells (one batch: all or nothing, "
     "audited, undoable until sign-off)", tag="cells", response="CellChangeResult", body="CellPatch",
     errors={409: "The case's analyzer does not classify cells, or a cell's class is no longer the given 'from'"})
def reclassify_cells(case_id: int):
    c = _cell_classifying(case_id, "prepare")
    data = validate_fields(json_body(), "CellPatch")
    changes = [cell_store.Change(ch["id"], ch["class"], ch.get("from")) for ch in data["changes"]]
    with committed(case_store.CaseError, _refused) as s:
        batch = cell_store.reclassify(s, c, g.api_user, changes)
    audit.subject(cells=len(changes), batch=batch, changes=[[ch.cell_id, ch.cell_class] for ch in changes[:200]])
    cells = cell_store.cells_by_id(s, c, [ch.cell_id for ch in changes])
    return {"batch": batch, "cells": cells_json(s, cells), "cell_review": cell_review_json(c, settings().blast_flag_pct)}


@api("/cases/{case_id}/cells/undo", "POST", summary="Undo the case's latest cell change since its last sign-off",
     tag="cells", response="CellChangeResult",
     errors={409: "The case's analyzer does not classify cells, or there is nothing to undo"})
def undo_cells(case_id: int):
    c = _cell_classifying(case_id, "prepare")
    with committed(case_store.CaseError, _nothing_to_undo) as s:
        cells = cell_store.undo_last(s, c, g.api_user)
    audit.subject(cells=len(cells))
    return {"cells": cells_json(s, cells), "cell_review": cell_review_json(c, settings().blast_flag_pct)}


def _nothing_to_undo(exc: case_store.CaseError) -> ApiError:
    return ApiError(409, "nothing_to_undo", str(exc))
