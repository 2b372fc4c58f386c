"""Assemble a case's report data (plain dict) and render it with :mod:`oncoscope.reports.pdf`.

Everything in the data comes from stored rows and stored image files, never from the wall clock,
so regenerating the report of a signed case gives the same content.
"""

from __future__ import annotations

from io import BytesIO

from PIL import Image

from ..imaging.imageio import load_image
from ..ml.wbc import THUMB_PX, THUMB_UM, stored_cell_crop
from ..store.cases import label_names, signed_call
from ..store.files import FileStore
from ..vocab import TRANSITION_NAMES
from .case_facts import (DEFAULT_DISCLAIMER, ai_call_text, case_analyzer, first_model_analysis, image_messages, lifecycle,
                         image_status, is_done)
from .pdf import render_case_report


def _fmt(t) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC") if t else ""


def _small_png(store: FileStore, sha: str, name: str, side: int = 512) -> bytes | None:
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
    an = case_analyzer(case)
    names = label_names(an)
    p = case.patient
    agg = signed_call(case)
    r = case.current_review
    a0 = first_model_analysis(case)
    wording = an.report_wording if an else {}
    return {
        "clinic": {"name": clinic_name, "address": ""},
        # microscopy is a laboratory report, imaging a radiology report (from the analyzer's modality)
        "report_kind": "Radiology report" if an and an.modality.startswith("radiology/") else "Laboratory report",
        "patient": {"name": p.display_name, "mrn": p.mrn,
                    "birth_date": p.birth_date.isoformat() if p.birth_date else None, "sex": p.sex},
        "case": {"id": case.id, "created_at": _fmt(case.created_at),
                 "analyzer_name": an.name if an else case.analyzer_id, "analyzer_id": case.analyzer_id,
                 "clinical_note": case.clinical_note, "finding": wording.get("finding"),
                 "accession": case.accession_number or "",
                 "placer_order": case.placer_order or ""},
        "model": {"id": case.analyzer_id, "version": a0.model_version if a0 else (an.version if an else ""),
                  "sha256": a0.model_sha256 if a0 else (an.model_info.sha256 if an else ""),
                  "validation_summary": an.validation_summary() if an else "No validation figures recorded."},
        "images": [_image_data(i, img, case.analyzer_id, an, names, store)
                   for i, img in enumerate(case.images, start=1)],
        "aggregate": {"ai_label": names.get(agg.label, agg.label) if agg.label else None, "ai_status": agg.status,
                      "interpretation": an.interpretation(agg.label) if an else None,
                      "text": ai_call_text(agg, names)},
        "review": _review_data(r, case, names) if r is not None else None,
        "differential": _differential_data(r, agg),
        "review_cells": _review_cells(case, store),
        "disclaimer": wording.get("disclaimer", DEFAULT_DISCLAIMER),
        "generated_note": f"Report for case {case.id}" + (f", version {r.version}" if r else " (draft)"),
        "lifecycle": _lifecycle_line(case),
        "about": _about(an, names, r.ai_label if r is not None else agg.label, r),
    }


def _lifecycle_line(case) -> str:
    """One line for the PDF header: the report's state now and who moved it there, when; the second
    reader who confirmed it; then the earlier states (the last move to each), newest first, so that a
    line too long for the page loses the oldest."""
    last: dict[str, dict] = {}
    for t in lifecycle(case):
        last.pop(t["state"], None)
        last[t["state"]] = t
    if not last:
        return ""
    moves = [f"{TRANSITION_NAMES.get(k, k)}: {t['by'] or 'system'} {_fmt(t['at'])}" for k, t in reversed(last.items())]
    confirmed = next((r for r in case.reviews if r.second_reader_id is not None), None)
    if confirmed is not None:
        who = confirmed.second_reader.name if confirmed.second_reader else str(confirmed.second_reader_id)
        moves.insert(1, f"second reader {who} ({'agreed' if confirmed.second_agrees else 'disagreed; consensus signed'})")
    return " · ".join(moves)


def _about(an, names: dict[str, str], ai_label: str | None, r) -> list[dict]:
    """The appendix: what the signed diagnosis means, what usually confirms it and when to refer (the
    analyzer's class information), and the same for the AI's call when it differs (a draft: the AI's call)."""
    if an is None:
        return []
    picks = []
    if r is not None:
        picks.append((r.final_diagnosis, "signed diagnosis, as the AI suggested" if r.final_diagnosis == ai_label
                      else "signed diagnosis"))
    if ai_label and (r is None or ai_label != r.final_diagnosis):
        picks.append((ai_label, "AI suggestion, not signed" if r is None
                      else "AI suggestion, not the signed diagnosis"))
    out = []
    for label, role in picks:
        info = an.class_info(label)
        if info is not None:
            out.append({"name": names.get(label, label), "role": role, "summary": info.summary,
                        "confirmation": info.confirmation, "referral": info.referral,
                        "references": [{"text": ref.text, "url": ref.url} for ref in info.references]})
    return out


def _image_data(i: int, img, analyzer_id: str, an, names: dict[str, str], store: FileStore) -> dict:
    a = img.analysis
    done = is_done(a)
    return {
        "title": f"{an.image_noun if an else 'Image'} {i} - {img.original_filename}",
        "original_png": _small_png(store, img.sha256, "original"),
        "cells_png": _small_png(store, img.sha256, f"cells-{analyzer_id}") if done else None,
        "heatmap_png": _small_png(store, img.sha256, f"heatmap-{analyzer_id}") if done else None,
        "ai_label": names.get(a.label, a.label) if done and a.label else None,
        "ai_status": image_status(a),
        # an out-of-domain image's class probabilities mean nothing: not printed, as on the case page
        "probabilities": {names.get(k, k): v for k, v in (a.probabilities or {}).items()}
        if done and a.result_status != "out_of_domain" else {},
        "cell_count": a.cell_count if done else None,
        "counts_cells": an.counts_cells if an else True,
        "messages": image_messages(a),
    }


REVIEW_CLASSES = ("blast", "unidentified")  # the cells a report shows as pictures
MAX_REVIEW_CELLS = 60


def _review_cells(case, store: FileStore) -> dict | None:
    """Pictures of the blasts and unidentified cells, with the classes the report's version signed
    (the live classes for a draft): cells changed later for an amendment do not show here."""
    r = case.current_review
    frozen = (r.differential or {}).get("cell_classes") if r is not None else None
    def state(c):  # noqa: E306 - (class, verified) as signed, or as it is now for a draft
        return tuple(frozen.get(str(c.id), (None, False))) if frozen is not None else (c.cell_class, c.verified)
    picked = [(c, *state(c)) for c in case.cell_labels if c.counted and state(c)[0] in REVIEW_CLASSES]
    if not picked:
        return None
    out, rgb = [], {}
    for c, cls, verified in picked[:MAX_REVIEW_CELLS]:
        a = c.analysis
        if not (a.cells and c.cell_index < len(a.cells) and a.cells[c.cell_index].get("bbox")):
            continue
        if a.id not in rgb:
            rgb = {a.id: load_image(store.path(a.image.sha256)).rgb}  # cells come image by image
        crop = stored_cell_crop(rgb[a.id], a.cells[c.cell_index], a.microns_per_pixel, THUMB_PX, THUMB_UM)
        buf = BytesIO()
        Image.fromarray(crop).save(buf, "PNG")
        out.append({"png": buf.getvalue(), "label": cls.replace("_", " "), "ai": c.ai_class.replace("_", " "),
                    "verified": verified})
    return {"total": len(picked), "cells": out, "window_um": THUMB_UM}


def _differential_data(r, agg) -> dict | None:
    """The differential table: AI and verified counts as signed; before sign-off only the AI's."""
    frozen = getattr(r, "differential", None) if r is not None else None
    ai = frozen["ai"] if frozen else agg.differential
    if not ai:
        return None
    cur = frozen["current"] if frozen else None
    rows = [{"class": k.replace("_", " "), "ai": n, "ai_pct": ai["percentages"].get(k),
             "verified": cur["differential"][k] if cur else None, "verified_pct": cur["percentages"].get(k) if cur else None,
             "flag": bool(k == "blast" and frozen and frozen.get("blast_flag"))}
            for k, n in ai["differential"].items()]
    out = {"rows": rows, "ai_white_cells": ai["white_cells"], "signed": bool(frozen)}
    if frozen:
        out.update(white_cells=cur["white_cells"], verified=frozen["verified"], cells=frozen["cells"],
                   unverified=frozen["unverified"], agreement=frozen.get("agreement"),
                   blast_flag_pct=frozen.get("blast_flag_pct"), wbc_count=frozen.get("wbc_count"),
                   absolute=frozen.get("absolute"), count_target=cur["count_target"],
                   nrbc=cur.get("nrbc_per_100_wbc"))
    return out


def _review_data(r, case, names: dict[str, str]) -> dict:
    """The signed review ``r`` (the current one), with the versions it superseded."""
    return {
        "version": r.version, "final_diagnosis": names.get(r.final_diagnosis, r.final_diagnosis),
        "agrees_with_ai": r.agrees_with_ai if r.ai_label else None, "override_reason": r.override_reason,
        "uncertainty_note": r.uncertainty_note, "comment": r.comment, "signed_by": r.signed_by.name,
        "signed_at": _fmt(r.signed_at), "amendment_reason": r.amendment_reason,
        "previous_versions": [{"version": o.version, "final_diagnosis": names.get(o.final_diagnosis, o.final_diagnosis),
                               "signed_by": o.signed_by.name, "signed_at": _fmt(o.signed_at)}
                              for o in case.reviews[:-1]],
    }


def case_report_pdf(case, store: FileStore, clinic_name: str) -> bytes:
    return render_case_report(build_report_data(case, store, clinic_name))
