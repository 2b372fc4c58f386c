"""Home dashboards, health check, analyzer pages."""

from __future__ import annotations

from urllib.parse import urlencode

from flask import Blueprint, abort, g, jsonify, redirect, render_template, send_file, url_for
from flask_login import current_user, login_required
from sqlalchemy import func, select

from ..analyzers import registry
from ..services import deliveries
from ..store import access
from ..store import cases as case_store
from ..store import receiving
from ..store import worklists
from ..store.db import ping
from ..store.models import User, utcnow
from ..store.users import has_users
from ..vocab import REPORT_STATE_NAMES, TRANSITION_NAMES, percent
from . import audit
from .helpers import db, ext, me, settings

bp = Blueprint("main", __name__)

PLOTS = {"confusion_matrix.png", "roc.png", "reliability.png", "sample_overlays.png", "segmentation_disagreements.png"}


@bp.get("/healthz")
def healthz():
    status = {"app": "ok", "database": "ok" if ping(ext()["engine"]) else "unavailable", "analyzers": {}}
    ok = status["database"] == "ok"
    for aid in registry.available():
        try:
            registry.get(aid)
            status["analyzers"][aid] = "loaded"
        except Exception as exc:  # noqa: BLE001 - report, do not crash
            status["analyzers"][aid] = f"error: {exc.__class__.__name__}"
            ok = False
    ok = ok and bool(status["analyzers"])
    runner = ext().get("workers")
    if runner is not None and hasattr(runner, "queued"):
        # scaled out: uploads still succeed while Redis is away (jobs wait in the database), so a
        # missing queue is reported here but does not take this web server out of the load balancer
        try:
            status["queue"] = {"mode": "redis", "state": "ok", "waiting": runner.queued()}
        except Exception as exc:  # noqa: BLE001 - report, do not crash
            status["queue"] = {"mode": "redis", "state": f"unavailable: {exc.__class__.__name__}"}
    else:
        elsewhere = ext().get("workers_in")
        status["queue"] = {"mode": "in-process", "state": "ok" if runner is not None else
                           f"run by {elsewhere}" if elsewhere else "not started"}
    return jsonify(status), (200 if ok else 503)


@bp.get("/")
def home():
    if not has_users(db()):
        return redirect(url_for("auth.setup"))
    if not current_user.is_authenticated:
        audit.denied()
        return redirect(url_for("auth.login"))
    s, u = db(), me()
    counts = case_store.counts_by_status(s, u)
    pending = case_store.history(s, u, status="ready", per_page=10)
    recent = case_store.history(s, u, per_page=10)
    ctx = {"counts": counts, "pending": pending.items, "recent": recent.items, "title": "Home"}
    audit.subject(shown_cases=sorted({c.id for c in pending.items + recent.items}))
    if u.is_admin:
        ctx["n_users"] = s.scalar(select(func.count(User.id)).where(User.is_active.is_(True)))
        ctx["volume"] = case_store.volume_per_day(s, 14)
        ctx["failed"] = case_store.failed_jobs(s, 20)
        ctx["analyzers"] = [{"info": registry.get(a).describe(), "summary": registry.get(a).validation_summary(),
                             "plots": _plots(a, ("confusion_matrix.png", "roc.png", "reliability.png"))}
                            for a in registry.available()]
        return render_template("home_admin.html", **ctx)
    return render_template("home_doctor.html", **ctx)


@bp.get("/analyzers/<analyzer_id>")
@login_required
def analyzer(analyzer_id: str):
    if analyzer_id not in registry.available():
        abort(404)
    an = registry.get(analyzer_id)
    card = an.model_card
    plots = _plots(analyzer_id, sorted(PLOTS))
    return render_template("analyzer.html", info=an.describe(), card=card, plots=plots,
                           summary=an.validation_summary(), title=an.name,
                           classes=[(label, _class_name(an, label)) for label in an.described_classes])


@bp.get("/analyzers/<analyzer_id>/classes/<label>")
@login_required
def class_info(analyzer_id: str, label: str):
    """One class of an analyzer: what it means, what usually confirms it, when to refer (its class_info)."""
    if analyzer_id not in registry.available():
        abort(404)
    an = registry.get(analyzer_id)
    info = an.class_info(label)
    if info is None:
        abort(404)
    name = _class_name(an, label)
    return render_template("class_info.html", analyzer=an.describe(), label=label, name=name, info=info,
                           title=f"{name} · {an.name}")


def _class_name(an, label: str) -> str:
    """A diagnosis as people read it; a cell class (the differential's) named as one."""
    names = case_store.label_names(an)
    return names[label] if label in names else f"{label.replace('_', ' ').capitalize()} (cell class)"


@bp.app_template_global()
def class_page(analyzer_id: str, label: str | None) -> str | None:
    """The page about a diagnosis code or cell class, or None when its analyzer describes none."""
    an = registry.installed(analyzer_id)
    if an is None or an.class_info(label) is None:
        return None
    return url_for("main.class_info", analyzer_id=analyzer_id, label=label)


def _plots(analyzer_id: str, names) -> list[str]:
    """The plots of these names the analyzer's model folder holds (a cell classifier has no ROC)."""
    return [p for p in names if (registry.MODELS_DIR / analyzer_id / p).exists()]


@bp.get("/analyzers/<analyzer_id>/plots/<name>")
@login_required
def analyzer_plot(analyzer_id: str, name: str):
    if analyzer_id not in registry.available() or name not in PLOTS:
        abort(404)
    path = registry.MODELS_DIR / analyzer_id / name
    if not path.exists():
        abort(404)
    return send_file(path, mimetype="image/png", max_age=3600)


bp.add_app_template_filter(percent, "pct")


@bp.app_template_filter("age")
def age(v) -> str:
    """How long ago, as a worklist says it: minutes, hours or days (the exact time is in the title)."""
    if v is None:
        return "–"
    minutes = max(0, int((utcnow() - v).total_seconds() // 60))
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d}" if minutes < 48 * 60 else f"{minutes // 1440} d"


@bp.app_template_filter("dtfmt")
def dtfmt(v) -> str:
    return "–" if v is None else v.strftime("%Y-%m-%d %H:%M") + " UTC"


# globals, not context: the macros in macros.html (imported without context) use them too
@bp.app_template_global()
def label_name(analyzer_id: str, label: str | None) -> str:
    """A diagnosis code as people read it, whatever page shows it."""
    if not label:
        return "–"
    return case_store.label_names(registry.installed(analyzer_id)).get(label, label)


@bp.app_template_global()
def query_url(endpoint: str, args, **changes) -> str:
    """The page ``endpoint`` with the request's query arguments (changed as given) as a query string.
    Never as url_for keywords: a query argument named like one of url_for's own (``endpoint``,
    ``_external``, ``_scheme``) would break the page."""
    items = [(k, v) for k, v in (args.items(multi=True) if hasattr(args, "getlist") else args.items())
             if k not in changes and v not in ("", None)]
    items += [(k, v) for k, v in changes.items() if v not in ("", None)]
    return url_for(endpoint) + ("?" + urlencode(items) if items else "")


@bp.app_template_global()
def status_name(status: str | None) -> str:
    return (status or "–").replace("_", " ")


@bp.app_template_global()
def analyzer_name(analyzer_id: str) -> str:
    an = registry.installed(analyzer_id)
    return an.name if an else analyzer_id


@bp.app_context_processor
def _worklist_names() -> dict:
    return {"worklist_names": worklists.QUEUES}


@bp.app_template_global()
def worklist_counts() -> dict[str, int]:
    """The signed-in user's queues with how many cases wait in each (the navigation), once per request
    (the worklist page fills it in, reusing the count of the queue it shows)."""
    if "worklist_counts" not in g:
        g.worklist_counts = worklists.counts(db(), me())
    return g.worklist_counts


@bp.app_template_global()
def inbox_count() -> int:
    """Studies waiting in the DICOM inbox that the user may file (the navigation), once per request."""
    if "inbox_count" not in g:
        g.inbox_count = receiving.inbox_count(db(), me()) if access.may(me(), "edit") else 0
    return g.inbox_count


@bp.app_template_global()
def pacs_configured() -> bool:
    return bool(settings().dicomweb_url)


@bp.app_template_global()
def hl7_configured() -> bool:
    return bool(settings().hl7_host and settings().hl7_port)


@bp.app_template_global()
def delivery_name(kind: str) -> str:
    return deliveries.KIND_NAMES.get(kind, kind)


READINGS = {"preliminary": "Preliminary", "first": "First reading", "second": "Second reading"}


@bp.app_template_global()
def reading_name(kind: str) -> str:
    return READINGS.get(kind, kind)


@bp.app_template_global()
def transition_name(state: str) -> str:
    return TRANSITION_NAMES.get(state, state)


@bp.app_template_global()
def report_state_name(state: str) -> str:
    return REPORT_STATE_NAMES.get(state, state)
