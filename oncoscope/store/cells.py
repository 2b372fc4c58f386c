"""Cell review: every white cell of a case, the AI's class and the class a person gave it.

The rows are made when an analysis result is stored (``store.cases.cell_rows``); ``ensure_cells``
makes them for analyses stored before cell review existed. A change is a batch
(one keystroke may move many cells); the batch is the unit of undo, and undo reaches back only to
the last sign-off: what a signed review counted stays as it was signed (``Review.differential``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..ml.differential import REPORTED, UNIDENTIFIED, WBC_CLASSES, summarise
from ..analyzers import registry
from . import cases as case_store
from .cases import CaseError, lock_case
from .models import Analysis, Case, CaseImage, CellChange, CellLabel, Review, User, utcnow

GALLERY_ORDER = REPORTED  # blasts and unidentified first, then the normal classes, then the others
MAX_BATCH = 1000


@dataclass
class CellPage:
    cells: list[CellLabel]
    total: int
    page: int
    per_page: int


def _analyses(case: Case) -> list[Analysis]:
    return [i.analysis for i in case.images if i.analysis is not None and i.analysis.job_status == "done"
            and i.analysis.result_status in ("ok", "uncertain") and i.analysis.cells]


def ensure_cells(s: Session, case: Case) -> None:
    """Create the missing cell rows of the case's finished analyses: rows are made when a result is
    stored; this covers analyses stored before cell review existed (idempotent; safe in a race)."""
    have = set(s.execute(select(CellLabel.analysis_id).where(CellLabel.case_id == case.id).distinct()).scalars())
    todo = [a for a in _analyses(case) if a.id not in have]
    for a in todo:
        try:
            with s.begin_nested():
                s.add_all(case_store.cell_rows(a, case.id))
        except IntegrityError:  # another request made them first: theirs are the same rows
            pass
    if todo:
        s.flush()


def list_cells(s: Session, case: Case, cell_class: str | None = None, page: int = 1,
               per_page: int = 200) -> CellPage:
    """One page of the case's cells in gallery order (class, then image, then position in the image)."""
    ensure_cells(s, case)
    q = select(CellLabel).where(CellLabel.case_id == case.id)
    if cell_class:
        q = q.where(CellLabel.cell_class == cell_class)
    order = {c: k for k, c in enumerate(GALLERY_ORDER)}
    rows = list(s.scalars(q))  # ordered in Python: the clinical class order is not alphabetical
    rows.sort(key=lambda r: (order.get(r.cell_class, len(order)), r.analysis_id, r.cell_index))
    start = (max(1, page) - 1) * per_page
    return CellPage(rows[start:start + per_page], len(rows), max(1, page), per_page)


@dataclass(frozen=True)
class Change:
    cell_id: int
    cell_class: str
    expected: str | None = None  # the class the reviewer saw: refused when another change came first


def reclassify(s: Session, case: Case, user: User, changes: list[Change]) -> str:
    """Give cells a class (their current one: verified as they are). Returns the batch id.

    All or nothing: an unknown cell or class, or a cell another reviewer changed since this one saw
    it, refuses the whole batch. A signed case is changed only for an amendment (its signed review
    keeps the differential and the cell classes it signed). Bumps the case revision, so a sign-off
    made on an older view of the cells fails instead of signing what its signer did not see.
    """
    _changeable(case)
    if not changes:
        raise CaseError("No cells were given.", "cells")
    if len(changes) > MAX_BATCH:
        raise CaseError(f"At most {MAX_BATCH} cells can be changed at once.", "cells")
    bad = sorted({ch.cell_class for ch in changes if ch.cell_class not in GALLERY_ORDER})
    if bad:
        raise CaseError(f"Unknown cell class {bad[0]!r}; use one of: {', '.join(GALLERY_ORDER)}.", "class")
    lock_case(s, case)  # two reviewers moving the same cells: one after the other, each change recorded
    ids = [ch.cell_id for ch in changes]
    rows = {r.id: r for r in s.scalars(select(CellLabel).where(CellLabel.case_id == case.id,
                                                                CellLabel.id.in_(ids)))}
    missing = [i for i in ids if i not in rows]
    if missing:
        raise CaseError(f"Cell {missing[0]} is not a cell of this case.", "cells")
    stale = [ch for ch in changes if ch.expected is not None and rows[ch.cell_id].cell_class != ch.expected]
    if stale:
        raise CellConflict(f"Cell {stale[0].cell_id} was changed to {rows[stale[0].cell_id].cell_class!r} by someone "
                           "else since you loaded the page: reload the gallery. Nothing was changed.", "cells")
    batch, now = uuid.uuid4().hex, utcnow()
    for ch in {ch.cell_id: ch for ch in changes}.values():  # the last word on a cell listed twice wins
        r = rows[ch.cell_id]
        s.add(CellChange(case_id=case.id, cell_id=r.id, batch=batch, from_class=r.cell_class,
                         from_verified=r.verified, to_class=ch.cell_class, user_id=user.id, at=now, undone=False,
                         signed=False))
        r.cell_class, r.verified, r.changed_by_id, r.changed_at = ch.cell_class, True, user.id, now
    _bump(s, case)
    return batch


class CellConflict(CaseError):
    """Another reviewer changed the cell first."""


def _bump(s: Session, case: Case) -> None:
    s.execute(update(Case).where(Case.id == case.id).values(revision=Case.revision + 1, updated_at=utcnow())
              .execution_options(synchronize_session=False))
    s.flush()
    s.refresh(case, ["revision", "updated_at"])


def undo_last(s: Session, case: Case, user: User) -> list[CellLabel]:
    """Undo this user's latest batch on the case since its last sign-off; returns the cells it restored.
    (Another reviewer's changes are theirs to undo.)"""
    _changeable(case)
    lock_case(s, case)
    q = select(CellChange).where(CellChange.case_id == case.id, CellChange.user_id == user.id,
                                 CellChange.undone.is_(False), CellChange.signed.is_(False))
    last = s.scalars(q.order_by(CellChange.id.desc()).limit(1)).first()
    if last is None:
        raise CaseError("Nothing of yours to undo (changes in a signed version cannot be undone).", "cells")
    done = list(s.scalars(select(CellChange).where(CellChange.batch == last.batch).order_by(CellChange.id.desc())))
    now = utcnow()
    for ch in done:
        cell = s.get(CellLabel, ch.cell_id)
        cell.cell_class, cell.verified = ch.from_class, ch.from_verified
        cell.changed_by_id, cell.changed_at = user.id, now
        ch.undone, ch.undone_by_id, ch.undone_at = True, user.id, now
    _bump(s, case)
    return cells_by_id(s, case, [ch.cell_id for ch in done])


def cells_by_id(s: Session, case: Case, ids: list[int]) -> list[CellLabel]:
    return list(s.scalars(select(CellLabel).where(CellLabel.case_id == case.id, CellLabel.id.in_(ids))
                          .order_by(CellLabel.id)))


def differential(s: Session, case: Case, count_target: int = 100, blast_flag_pct: float | None = None,
                 with_cells: bool = False) -> dict:
    """The live differential: the AI's and the current counts over the counted cells, how many are
    verified, AI-versus-person agreement on the verified ones, and absolute counts from the WBC count.
    ``with_cells`` adds every cell's class and verification (what a sign-off freezes). Reads only."""
    every = list(s.scalars(select(CellLabel).where(CellLabel.case_id == case.id)))
    rows = [r for r in every if r.counted]
    verified = [r for r in rows if r.verified]
    current = summarise([r.cell_class for r in rows], count_target)
    out = {
        "ai": summarise([r.ai_class for r in rows], count_target),
        "current": current,
        "cells": len(rows),
        "verified": len(verified),
        "unverified": len(rows) - len(verified),
        "reclassified": sum(r.cell_class != r.ai_class for r in verified),
        "agreement": (sum(r.cell_class == r.ai_class for r in verified) / len(verified)) if verified else None,
        "unidentified_left": current["differential"].get(UNIDENTIFIED, 0),
        "wbc_count": case.wbc_count,
        "absolute": None,
    }
    if case.wbc_count is not None and current["white_cells"]:
        # x10^9/L per class: the percentage of the case's count of white cells
        out["absolute"] = {c: round(case.wbc_count * current["differential"][c] / current["white_cells"], 3)
                           for c in WBC_CLASSES}
    pct = current["percentages"].get("blast")
    out["blast_flag"] = bool(blast_flag_pct is not None and pct is not None and pct >= blast_flag_pct)
    out["blast_flag_pct"] = blast_flag_pct
    if with_cells:
        out["cell_classes"] = {str(r.id): [r.cell_class, r.verified] for r in every}
    return out


def set_wbc_count(s: Session, case: Case, value: float | None) -> None:
    if value is not None and not (0 < value < 1000):
        raise CaseError("The white-cell count must be greater than 0 and below 1000 (x10^9/L).", "wbc_count")
    _changeable(case)
    lock_case(s, case)
    case.wbc_count = value
    s.flush()


def cell_image(s: Session, cell: CellLabel) -> tuple[CaseImage, dict]:
    """The image a cell is on and the cell as the analysis stored it (box, probabilities, size)."""
    a = s.get(Analysis, cell.analysis_id)
    return a.image, a.cells[cell.cell_index]


def sign(s: Session, case: Case, user: User, final_diagnosis: str, valid_labels: list[str], *,
         blast_flag_pct: float | None = None, confirm_unverified: bool = False, **texts) -> Review:
    """Sign a case; for a cell-classifying analyzer the live differential is frozen into the review."""
    review = case_store.sign(s, case, user, final_diagnosis, valid_labels,
                             differential=frozen_differential(s, case, blast_flag_pct),
                             confirm_unverified=confirm_unverified, **texts)
    mark_signed(s, case)
    return review


def frozen_differential(s: Session, case: Case, blast_flag_pct: float | None) -> dict | None:
    """The differential a reading of the case signs (every cell's class with it), or None for an
    analyzer that does not classify cells."""
    an = registry.installed(case.analyzer_id)
    if not case_store.classifies_cells(an):
        return None
    lock_case(s, case)  # first: a batch committing now is either in the frozen differential or refused
    ensure_cells(s, case)
    return differential(s, case, an.cells_cfg.count_target, blast_flag_pct, with_cells=True)


def mark_signed(s: Session, case: Case) -> None:
    """The case's cell changes are in a signed review: no longer undoable."""
    s.execute(update(CellChange).where(CellChange.case_id == case.id).values(signed=True))


FROZEN = {"second_read": "This case is waiting for its second reading: its cells are as the first reader signed them.",
          "cancelled": "This case was cancelled: its cells cannot be changed."}


def _changeable(case: Case) -> None:
    if case.status in FROZEN:
        raise CaseError(FROZEN[case.status], "cells")
