"""``export-reviewed``: the verified cells of signed cases as a training dataset.

Each cell is cut from its original image at its classifier's canonical scale (the window and
resolution its model config names, the same as the training crops), with the AI's class, the class
the signer verified and the model that classified it. Nothing identifies a patient: no names, MRNs, dates, file names or case numbers;
cells of one case share a random group id (kept together when the dataset is split).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import secrets
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..analyzers import registry
from ..imaging.imageio import load_image
from ..ml.differential import UNIDENTIFIED
from ..ml.wbc import stored_cell_crop
from ..store.models import Analysis, Case, CellLabel

COLUMNS = ["image", "label", "ai_class", "analyzer", "model_version", "model_sha256", "group"]


def _crop_scale(analyzer_id: str) -> tuple[float, float, int] | None:
    """(µm per pixel, window µm, pixels) of the analyzer's cell crops, from its model config (what its
    training cut and its serving reads); None when it is not installed or does not classify cells."""
    an = registry.installed(analyzer_id)
    cfg = getattr(an, "cells_cfg", None)
    return None if cfg is None else (cfg.microns_per_pixel, cfg.field_um, an.crop_px)


@dataclass
class ReviewedExport:
    cells: int
    cases: int
    skipped_unscaled: int
    skipped_unidentified: int


def export_reviewed(s: Session, files, out: Path) -> ReviewedExport:
    """Write ``out/labels.csv`` and ``out/cells/*.png``: every verified, counted cell of every signed case
    (cells whose image had no measured scale cannot be cut at the canonical scale and are skipped)."""
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    rows, cases, unscaled, unidentified = [], set(), 0, 0
    q = (select(CellLabel, Analysis).join(Analysis, Analysis.id == CellLabel.analysis_id)
         .join(Case, Case.id == CellLabel.case_id)
         .where(Case.status == "signed", CellLabel.counted.is_(True))
         .order_by(CellLabel.case_id, CellLabel.analysis_id, CellLabel.cell_index))
    groups: dict[int, str] = {}
    rgb_cache: tuple[int, object] | None = None
    signed_as: dict[int, dict] = {}
    scales: dict[str, tuple[float, float, int]] = {}
    for cell, a in s.execute(q):
        # the class as the latest signed version froze it (later changes belong to an unsigned amendment)
        if cell.case_id not in signed_as:
            review = s.get(Case, cell.case_id).current_review
            signed_as[cell.case_id] = ((review.differential or {}).get("cell_classes") or {}) if review else {}
        label, verified = signed_as[cell.case_id].get(str(cell.id), (None, False))
        if not verified or label is None:
            continue
        if label == UNIDENTIFIED:
            unidentified += 1
            continue
        stored = a.cells[cell.cell_index] if a.cells and cell.cell_index < len(a.cells) else {}
        scale = _crop_scale(a.analyzer_id)
        if not a.microns_per_pixel or not stored.get("bbox") or scale is None:
            unscaled += 1
            continue
        scales[a.analyzer_id] = scale
        if rgb_cache is None or rgb_cache[0] != a.id:
            rgb_cache = (a.id, load_image(files.path(a.image.sha256)).rgb)
        crop = stored_cell_crop(rgb_cache[1], stored, a.microns_per_pixel, scale[2], scale[1])
        buf = io.BytesIO()
        Image.fromarray(crop).save(buf, "PNG")
        name = f"cells/{hashlib.sha256(buf.getvalue()).hexdigest()[:20]}.png"
        (out / name).write_bytes(buf.getvalue())
        group = groups.setdefault(cell.case_id, secrets.token_hex(6))
        cases.add(cell.case_id)
        rows.append([name, label, cell.ai_class, a.analyzer_id, a.model_version or "", a.model_sha256 or "",
                     group])
    with open(out / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        w.writerows(rows)
    (out / "README.md").write_text(
        f"# oncoscope-reviewed\n\nVerified white cells of signed cases, exported "
        f"{dt.date.today().isoformat()}: {len(rows)} cells of {len(cases)} cases, each cut as its classifier reads "
        "cells (" + "; ".join(f"{aid}: {px} px at {mpp:g} µm/px, {um:g} µm window" for aid, (mpp, um, px)
                              in sorted(scales.items())) + "). `labels.csv`: image, label (the class the signer verified), "
        "ai_class, analyzer, model_version, model_sha256, group (one random id per case; split by it).\n\n"
        "No patient identifiers. Put this folder beside the other datasets as `oncoscope-reviewed` and "
        "`oncoscope train --analyzer smear-differential` uses it.\n")
    return ReviewedExport(len(rows), len(cases), unscaled, unidentified)
