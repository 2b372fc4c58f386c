"""Thin views over the analyzer registry (no ML here: analyzers do the work)."""

from __future__ import annotations

import base64
import json

from flask import Blueprint, abort, jsonify, render_template, request
from werkzeug.exceptions import RequestEntityTooLarge

from ..analyzers import registry
from ..analyzers.render import heatmap_overlay, mask_overlay, png_bytes
from ..ml.imageio import ImageLoadError, load_image

bp = Blueprint("main", __name__)


def _card(analyzer_id: str) -> dict | None:
    path = registry.MODELS_DIR / analyzer_id / "model_card.json"
    return json.loads(path.read_text()) if path.exists() else None


@bp.get("/healthz")
def healthz():
    status = {"app": "ok", "analyzers": {}}
    ok = True
    for aid in registry.available():
        try:
            registry.get(aid)
            status["analyzers"][aid] = "loaded"
        except Exception as exc:  # noqa: BLE001 - report, do not crash
            status["analyzers"][aid] = f"error: {exc.__class__.__name__}"
            ok = False
    return jsonify(status), (200 if ok and status["analyzers"] else 503)


@bp.get("/")
def index():
    analyzers = []
    for aid in registry.available():
        an = registry.get(aid)
        analyzers.append({"info": an.describe(), "card": _card(aid)})
    return render_template("index.html", analyzers=analyzers, title="Analyzers")


@bp.route("/try/<analyzer_id>", methods=["GET", "POST"])
def try_analyzer(analyzer_id: str):
    if analyzer_id not in registry.available():
        abort(404)
    an = registry.get(analyzer_id)
    result, images, error = None, None, None
    if request.method == "POST":
        f = request.files.get("image")
        if f is None or not f.filename:
            error = "Choose an image file to analyse."
        else:
            try:
                loaded = load_image(f.read())
            except ImageLoadError as exc:
                error = str(exc)
            else:
                result = an.analyze(loaded)
                if result.status == "error":
                    error = result.error
                else:
                    enc = lambda a: "data:image/png;base64," + base64.b64encode(png_bytes(a)).decode()  # noqa: E731
                    images = {"original": enc(loaded.rgb)}
                    if result.mask is not None:
                        images["cells"] = enc(mask_overlay(loaded.rgb, result.mask))
                    if result.heatmap is not None:
                        images["heatmap"] = enc(heatmap_overlay(loaded.rgb, result.heatmap))
    return render_template("try.html", analyzer=an.describe(), result=result, images=images, error=error,
                           title=f"Try {an.id}"), (400 if error else 200)


@bp.app_errorhandler(RequestEntityTooLarge)
def too_large(_exc):
    return render_template("error.html", title="File too large",
                           message="The upload is larger than the 25 MB limit."), 413


@bp.app_errorhandler(404)
def not_found(_exc):
    return render_template("error.html", title="Not found", message="There is nothing at this address."), 404


@bp.app_errorhandler(500)
def server_error(_exc):
    return render_template("error.html", title="Something went wrong",
                           message="The server could not complete the request. Nothing was stored."), 500
