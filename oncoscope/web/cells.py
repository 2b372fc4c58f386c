"""The cell gallery: every white cell of a case at one physical scale, verified or reclassified
with the keyboard; the live differential beside it. Thin views over ``store.cells``."""

from __future__ import annotations

from flask import Blueprint, Response, abort, flash, jsonify, redirect, render_template, request, url_for
from flask_login import login_required
from sqlalchemy import select

from ..analyzers import registry
from ..services import gallery
from ..store import access
from ..store import cases as case_store
from ..store import cells as cell_store
from ..store.models import CaseImage
from . import audit
from .api.serializers import cell_review_json, cells_json
from .case_page import case_or_404 as _case_or_404, consult_form
from .errors import error_response
from .forms import WbcCountForm
from .helpers import db, files, me, role_required, settings

bp = Blueprint("cells", __name__)

# the keys that give a class, in gallery order (1 = blast ... 0 = platelet)
KEYS = dict(zip("1234567890", cell_store.GALLERY_ORDER))


def _gallery_case(case_id: int, need: str | None = None):
    c = _case_or_404(case_id, need)
    if not case_store.classifies_cells(registry.installed(c.analyzer_id)):
        abort(404)
    return c


def _cells_payload(s, cells) -> list[dict]:
    """The API's ``Cell`` objects, each with where its picture is in its image's sprite."""
    return [{**d, "sprite_xy": gallery.position(cell.cell_index)} for d, cell in zip(cells_json(s, cells), cells)]


@bp.get("/cases/<int:case_id>/cells")
@login_required
def view(case_id: int):
    c = _gallery_case(case_id)
    s = db()
    cells = cell_store.list_cells(s, c, per_page=10**9).cells
    s.commit()  # rows made now for a case analysed before galleries existed
    audit.subject(resource=("case", c.id), cells=len(cells))
    review = cell_review_json(c, settings().blast_flag_pct)
    form = WbcCountForm(formdata=None)
    form.wbc_count.data = "" if c.wbc_count is None else f"{c.wbc_count:g}"
    payload, images = _with_images(c, _cells_payload(s, cells))
    may_ask = access.case_access(s, me(), c) == "full" and access.may(me(), "consult") and c.status != "cancelled"
    return render_template("cases/cells.html", case=c, cells=payload, review=review, images=images,
                           order=cell_store.GALLERY_ORDER, keys=KEYS, wbc_form=form, title=f"Case {c.id}: cells",
                           thumb_px=gallery.THUMB_PX, thumb_um=gallery.THUMB_UM, columns=gallery.COLUMNS,
                           consult_form=consult_form(c) if may_ask else None)


def _with_images(c, payload: list[dict]) -> tuple[list[dict], dict]:
    """The cells and, per image (not per cell: 500 cells would repeat the same two addresses 500
    times), where its sprite and its field are."""
    images = {i: {"sprite": url_for("cells.sprite", case_id=c.id, image_id=i),
                  "field": url_for("cases.image", case_id=c.id, image_id=i, kind="original")}
              for i in sorted({d["image_id"] for d in payload})}
    return payload, images


def thumbnails(s, c, cell_ids: list[int]) -> tuple[list[dict], dict]:
    """Some cells of a case as the gallery shows them (a consult's cells), with their images."""
    return _with_images(c, _cells_payload(s, cell_store.cells_by_id(s, c, cell_ids)))


@bp.get("/cases/<int:case_id>/images/<int:image_id>/gallery.jpg")
@login_required
def sprite(case_id: int, image_id: int):
    c = _gallery_case(case_id)
    img = db().scalar(select(CaseImage).where(CaseImage.id == image_id, CaseImage.case_id == c.id))
    if img is None or img.analysis is None or not img.analysis.cells:
        abort(404)
    data = gallery.ensure_sprite(files(), img, img.analysis)
    return Response(data, mimetype="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


def _json_error(exc: case_store.CaseError, status: int = 422):
    return error_response(status, "invalid", str(exc), exc.field)


def _changes(data) -> list[cell_store.Change] | None:
    """The body's changes, or None when it is not ``{"changes": [{"id", "class", "from"?}, ...]}``."""
    raw = data.get("changes") if isinstance(data, dict) else None
    if not isinstance(raw, list) or not 0 < len(raw) <= cell_store.MAX_BATCH:
        return None
    out = []
    for ch in raw:
        if not isinstance(ch, dict) or set(ch) - {"id", "class", "from"}:
            return None
        i, cls, seen = ch.get("id"), ch.get("class"), ch.get("from")
        if isinstance(i, bool) or not isinstance(i, int) or not 0 < i < 2**31 or not isinstance(cls, str) \
                or not (seen is None or isinstance(seen, str)):
            return None
        out.append(cell_store.Change(i, cls, seen))
    return out


@bp.post("/cases/<int:case_id>/cells")
@role_required("prepare")
def reclassify(case_id: int):
    c = _gallery_case(case_id, "prepare")
    changes = _changes(request.get_json(silent=True))
    if changes is None:
        return _json_error(case_store.CaseError(
            f"Send {{\"changes\": [{{\"id\": cell id, \"class\": class, \"from\": class shown}}, ...]}} with 1 to "
            f"{cell_store.MAX_BATCH} cells.", "changes"), 400)
    s = db()
    try:
        batch = cell_store.reclassify(s, c, me(), changes)
        s.commit()
    except case_store.CaseError as exc:
        s.rollback()
        return _json_error(exc, 409 if isinstance(exc, cell_store.CellConflict) else 422)
    audit.subject(cells=len(changes), batch=batch, changes=[[ch.cell_id, ch.cell_class] for ch in changes[:200]])
    return _changed(s, c, cell_store.cells_by_id(s, c, [ch.cell_id for ch in changes]), batch=batch)


def _changed(s, c, cells, **extra):
    """The changed cells and the new differential, also as the page's HTML (one template for both)."""
    review = cell_review_json(c, settings().blast_flag_pct)
    return jsonify({**extra, "cells": _cells_payload(s, cells), "cell_review": review,
                    "differential_html": render_template("cases/_differential.html", review=review)})


@bp.post("/cases/<int:case_id>/cells/undo")
@role_required("prepare")
def undo(case_id: int):
    c = _gallery_case(case_id, "prepare")
    s = db()
    try:
        cells = cell_store.undo_last(s, c, me())
        s.commit()
    except case_store.CaseError as exc:
        s.rollback()
        return _json_error(exc, 409)
    audit.subject(cells=len(cells))
    return _changed(s, c, cells)


@bp.post("/cases/<int:case_id>/wbc-count")
@role_required("prepare")
def wbc_count(case_id: int):
    c = _gallery_case(case_id, "prepare")
    form = WbcCountForm()
    if not form.validate_on_submit():
        abort(400)
    raw = (form.wbc_count.data or "").strip().replace(",", ".")
    s = db()
    try:
        value = float(raw) if raw else None
    except ValueError:
        flash("The WBC count must be a number (x10^9/L), e.g. 7.2.", "error")
        return redirect(url_for("cells.view", case_id=c.id))
    try:
        cell_store.set_wbc_count(s, c, value)
        s.commit()
    except case_store.CaseError as exc:
        s.rollback()
        flash(str(exc), "error")
    else:
        audit.subject(wbc_count=value)
        flash("WBC count saved." if value is not None else "WBC count cleared.", "ok")
    return redirect(url_for("cells.view", case_id=c.id))
