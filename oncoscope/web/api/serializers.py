"""Records as the API's JSON (the ``Patient`` and ``Case`` schemas)."""

from __future__ import annotations

import datetime as dt

from ...analyzers import registry
from flask import g
from sqlalchemy.orm import object_session

from ...store import cases as case_store
from ...store import cells as cell_store
from ...store import workflow
from ..helpers import settings


def iso(t):
    """A stored time (naive UTC) as ISO 8601 with its offset; a date as a date."""
    return t.replace(tzinfo=dt.timezone.utc).isoformat() if isinstance(t, dt.datetime) else (t.isoformat() if t else None)


def patient_json(p) -> dict:
    return {"id": p.id, "mrn": p.mrn, "family_name": p.family_name, "given_name": p.given_name,
            "birth_date": p.birth_date.isoformat() if p.birth_date else None, "sex": p.sex, "notes": p.notes,
            "created_at": iso(p.created_at), "updated_at": iso(p.updated_at)}


def analysis_json(i) -> dict:
    """One image and its analysis (``Analysis``); before the job row exists it reads as queued."""
    a = i.analysis
    return {"image_id": i.id, "filename": i.original_filename, "width": i.width, "height": i.height,
            "sha256": i.sha256, "job_status": a.job_status if a else "queued",
            "attempts": a.attempts if a else 0, "result_status": a.result_status if a else None,
            "label": a.label if a else None, "confidence": a.confidence if a else None,
            "malignant": a.malignant if a else None,
            "malignant_probability": a.malignant_probability if a else None,
            "probabilities": a.probabilities if a else None, "cell_count": a.cell_count if a else None,
            "cells": a.cells if a else None, "messages": a.messages if a else None,
            "model_version": a.model_version if a else None, "model_sha256": a.model_sha256 if a else None,
            "finished_at": iso(a.finished_at) if a else None}


def review_json(r) -> dict:
    return {"version": r.version, "final_diagnosis": r.final_diagnosis, "agrees_with_ai": r.agrees_with_ai,
            "ai_label": r.ai_label, "ai_status": r.ai_status, "override_reason": r.override_reason,
            "uncertainty_note": r.uncertainty_note, "comment": r.comment,
            "amendment_reason": r.amendment_reason, "signed_by": r.signed_by.name,
            "signed_at": iso(r.signed_at), "content_sha256": r.content_sha256, "differential": r.differential}


def reading_json(r) -> dict:
    return {"kind": r.kind, "diagnosis": r.diagnosis, "comment": r.comment, "by": r.user.name, "at": iso(r.at)}


def _readings(c, viewer) -> list[dict]:
    """The current readings the viewer may see: the preliminary result always; the first and second
    readings not while the viewer is blinded (anyone but the first reader, until the second reading
    is given)."""
    shown = []
    for kind in ("preliminary", "first", "second"):
        r = workflow.current_reading(c, kind)
        if r is None or (kind != "preliminary" and viewer is not None and workflow.blinded(c, viewer)):
            continue
        shown.append(reading_json(r))
    return shown


def case_json(c, viewer=None) -> dict:
    """A case (``Case``) as ``viewer`` (default: the API caller) may see it."""
    viewer = viewer if viewer is not None else g.get("api_user")
    agg = case_store.aggregate(c)
    return {"id": c.id, "patient_id": c.patient_id, "analyzer_id": c.analyzer_id, "status": c.status,
            "report_state": case_store.report_state(c), "cancel_reason": c.cancel_reason,
            "readings": _readings(c, viewer),
            "transitions": [{"from": t.from_state, "to": t.to_state, "by": t.user.name if t.user else None,
                             "at": iso(t.at), "note": t.note} for t in c.transitions],
            "revision": c.revision, "priority": c.priority, "ai_flag": c.ai_flag,
            "dicom_study_uid": c.dicom_study_uid, "accession_number": c.accession_number,
            "placer_order": c.placer_order, "deliveries": [delivery_json(d) for d in c.deliveries],
            "clinical_note": c.clinical_note, "created_at": iso(c.created_at), "final_diagnosis": c.final_diagnosis,
            "aggregate": {"label": agg.label, "status": agg.status, "probabilities": agg.probabilities,
                          "text": agg.text, "differential": agg.differential},
            "images": [analysis_json(i) for i in c.images],
            "reviews": [review_json(r) for r in c.reviews],
            "cell_review": cell_review_json(c, settings().blast_flag_pct)}


def cell_review_json(c, blast_flag_pct: float | None = None) -> dict | None:
    """The live differential (AI and current classes, verification progress); null for analyzers
    that do not classify cells."""
    an = registry.installed(c.analyzer_id)
    if not case_store.classifies_cells(an):
        return None
    return cell_store.differential(object_session(c), c, an.cells_cfg.count_target, blast_flag_pct)


def cell_json(cell, stored: dict, image_id: int) -> dict:
    """One cell of the gallery (``Cell``): its classes, who changed it, and where it is."""
    return {"id": cell.id, "image_id": image_id, "index": cell.cell_index, "ai_class": cell.ai_class,
            "ai_probability": cell.ai_probability, "class": cell.cell_class, "verified": cell.verified,
            "counted": cell.counted, "changed_by": cell.changed_by.name if cell.changed_by else None,
            "changed_at": iso(cell.changed_at), "bbox": stored.get("bbox"),
            "probabilities": stored.get("probabilities") or {}, "diameter_um": stored.get("diameter_um")}


def cells_json(s, cells) -> list[dict]:
    """``Cell`` objects of these rows (the API's and the gallery page's)."""
    out = []
    for cell in cells:
        image, stored = cell_store.cell_image(s, cell)
        out.append(cell_json(cell, stored, image.id))
    return out


def delivery_json(d) -> dict:
    return {"id": d.id, "kind": d.kind, "review_version": d.review_version, "target": d.target, "status": d.status,
            "attempts": d.attempts, "last_error": d.last_error, "next_attempt_at": iso(d.next_attempt_at),
            "sent_at": iso(d.sent_at)}


def consult_json(k) -> dict:
    """A consult and its thread (``Consult``)."""
    return {"id": k.id, "case_id": k.case_id, "asked_by": k.asked_by.name,
            "consultant": k.consultant.name if k.consultant else None, "consultant_id": k.consultant_id,
            "question": k.question, "image_id": k.image_id, "region": k.region, "cell_ids": k.cell_ids or [],
            "status": k.status, "created_at": iso(k.created_at), "closed_at": iso(k.closed_at),
            "messages": [{"by": m.user.name, "body": m.body, "at": iso(m.at)} for m in k.messages]}


def worklist_item_json(x) -> dict:
    """A worklist row: a case, or (consults queue) an open consult and its case."""
    consult, c = (x, x.case) if hasattr(x, "question") else (None, x)
    return {"case_id": c.id, "patient_id": c.patient_id, "patient": f"{c.patient.family_name}, {c.patient.given_name}",
            "mrn": c.patient.mrn, "analyzer_id": c.analyzer_id, "status": c.status, "priority": c.priority,
            "ai_flag": c.ai_flag, "created_at": iso(c.created_at), "ready_at": iso(c.ready_at),
            "consult_id": consult.id if consult else None, "question": consult.question if consult else None}
