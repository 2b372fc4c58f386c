"""Assemble a case's report data (plain dict) and render it with :mod:`oncoscope.reports.pdf`.

Everything in the data comes from stored rows and stored image files, never from the wall clock,
so regenerating the report of a signed case gives the same content.
"""

from __future__ import annotations

from ..analyzers import registry
from ..imaging.imageio import load_image
from ..store.cases import aggregate, label_names
from ..store.files import FileStore


def _fmt(t) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC") if t else ""


def _small_png(store: FileStore, sha: str, name: str, side: int = 512) -> bytes | None:
    from io import BytesIO

    from PIL import Image

    path = store.path(sha, name)
    if not path.exists():
        return None
    img = Image.open(path) if name != "original" else Image.fromarray(load_image(path).rgb)
    img = img.convert("RGB")
    img.thumbnail((side, side))
    buf = BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def build_report_data(case, store: FileStore, clinic_name: str) -> dict:
    an = registry.get(case.analyzer_id) if case.analyzer_id in registry.available() else None
    names = label_names(an)
    p = case.patient
    images = []
    for i, img in enumerate(case.images, start=1):
        a = img.analysis
        done = a is not None and a.job_status == "done"
        images.append({
            "title": f"{an.image_noun if an else 'Image'} {i} - {img.original_filename}",
            "original_png": _small_png(store, img.sha256, "original"),
            "cells_png": _small_png(store, img.sha256, f"cells-{case.analyzer_id}") if done else None,
            "heatmap_png": _small_png(store, img.sha256, f"heatmap-{case.analyzer_id}") if done else None,
            "ai_label": names.get(a.label, a.label) if done and a.label else None,
            "ai_status": (a.result_status if done else ("error" if a and a.job_status == "failed" else "pending")),
            # an out-of-domain image's class probabilities mean nothing: not printed, as on the case page
            "probabilities": {names.get(k, k): v for k, v in (a.probabilities or {}).items()}
            if done and a.result_status != "out_of_domain" else {},
            "cell_count": a.cell_count if done else None,
            "counts_cells": an.counts_cells if an else True,
            "messages": list(a.messages or []) if done else ([a.last_error.splitlines()[0]] if a and a.last_error else []),
        })
    agg = aggregate(case)
    review = None
    r = case.current_review
    if r is not None:
        review = {
            "version": r.version, "final_diagnosis": names.get(r.final_diagnosis, r.final_diagnosis),
            "agrees_with_ai": r.agrees_with_ai if r.ai_label else None, "override_reason": r.override_reason,
            "uncertainty_note": r.uncertainty_note, "comment": r.comment, "signed_by": r.signed_by.name,
            "signed_at": _fmt(r.signed_at), "amendment_reason": r.amendment_reason,
            "previous_versions": [{"version": o.version, "final_diagnosis": names.get(o.final_diagnosis, o.final_diagnosis),
                                   "signed_by": o.signed_by.name, "signed_at": _fmt(o.signed_at)}
                                  for o in case.reviews[:-1]],
        }
    a0 = next((i.analysis for i in case.images if i.analysis and i.analysis.model_version), None)
    wording = an.report_wording if an else {}
    return {
        "clinic": {"name": clinic_name, "address": ""},
        # microscopy is a laboratory report, imaging a radiology report (from the analyzer's modality)
        "report_kind": "Radiology report" if an and an.modality.startswith("radiology/") else "Laboratory report",
        "patient": {"name": p.display_name, "mrn": p.mrn, "birth_date": p.birth_date.isoformat() if p.birth_date else None,
                    "sex": p.sex},
        "case": {"id": case.id, "created_at": _fmt(case.created_at), "analyzer_name": an.name if an else case.analyzer_id,
                 "analyzer_id": case.analyzer_id, "clinical_note": case.clinical_note,
                 "finding": wording.get("finding")},
        "model": {"id": case.analyzer_id, "version": a0.model_version if a0 else (an.version if an else ""),
                  "sha256": a0.model_sha256 if a0 else (an.model_info.sha256 if an else ""),
                  "validation_summary": an.validation_summary() if an else "No validation figures recorded."},
        "images": images,
        "aggregate": {"ai_label": names.get(agg.label, agg.label) if agg.label else None, "ai_status": agg.status,
                      "interpretation": an.interpretation(agg.label) if an else None,
                      "text": (f"{names.get(agg.label, agg.label)}: " if agg.label else "") + agg.text},
        "review": review,
        "disclaimer": wording.get("disclaimer", "AI output is decision support only and must be confirmed by a "
                                               "qualified person."),
        "generated_note": f"Report for case {case.id}" + (f", version {r.version}" if r else " (draft)"),
    }


def case_report_pdf(case, store: FileStore, clinic_name: str) -> bytes:
    from .pdf import render_case_report

    return render_case_report(build_report_data(case, store, clinic_name))
