"""A patient's cases side by side, one row of columns per analyzer (the patient page): what the AI
called in each case, what was signed, and the one number that follows the disease over time --
the blast percentage of a smear differential, else the AI's probability of the positive call."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, selectinload

from ..analyzers import registry
from ..vocab import percent
from .cases import aggregate, classifies_cells, report_state, visible_cases
from .models import Case, Patient, Review, User

SHOWN = 6  # cases per analyzer: more do not fit side by side


@dataclass
class HistoryCase:
    case_id: int
    created_at: dt.datetime
    status: str
    report_state: str
    ai_label: str | None
    ai_status: str
    # blast % (0-100) or P(positive call) (0-1), as the analyzer's ``AnalyzerHistory.key`` says
    value: float | None
    # where the value comes from: "verified" (the differential frozen at sign-off, every cell seen by a
    # person), "AI" (the cells as the AI classified them; a probability is always the AI's)
    value_from: str | None
    final_diagnosis: str | None
    signed_at: dt.datetime | None

    @property
    def trend(self) -> bool:
        """Whether the case belongs on the line (a cancelled case says nothing about the patient)."""
        return self.value is not None and self.status != "cancelled"


@dataclass
class AnalyzerHistory:
    analyzer_id: str
    key: str  # "blast_pct" | "probability"
    cases: list[HistoryCase]  # most recent first
    older: int = 0  # cases of this analyzer not shown (beyond SHOWN)
    positive_term: str = "malignancy"
    points: list[HistoryCase] = field(default_factory=list)  # the line: oldest first, those with a value

    def display(self, value: float | None) -> str:
        if value is None:
            return "–"
        return f"{value:.1f}%" if self.key == "blast_pct" else percent(value)


def patient_timeline(s: Session, user: User, patient: Patient, shown: int = SHOWN) -> list[AnalyzerHistory]:
    """Per analyzer the patient has cases of (the one of the latest case first), its ``shown`` most
    recent cases that ``user`` may see. Reads only; loads the images of unsigned cases alone (a
    signed case's call is in its review)."""
    q = (visible_cases(user).where(Case.patient_id == patient.id).options(selectinload(Case.reviews))
         .order_by(Case.created_at.desc(), Case.id.desc()))
    groups: dict[str, list[Case]] = {}
    for c in s.scalars(q):
        groups.setdefault(c.analyzer_id, []).append(c)
    out = []
    for aid, cases in groups.items():
        an = registry.installed(aid)
        entries = [_entry(an, c) for c in cases[:shown]]
        h = AnalyzerHistory(aid, "blast_pct" if classifies_cells(an) else "probability", entries,
                            len(cases) - len(entries), getattr(an, "positive_term", "malignancy"))
        h.points = [e for e in reversed(entries) if e.trend]
        out.append(h)
    return out


def _entry(an, c: Case) -> HistoryCase:
    r = c.current_review
    label, status, value, source = _differential_call(c, r) if classifies_cells(an) else _image_call(an, c, r)
    return HistoryCase(c.id, c.created_at, c.status, report_state(c), label, status, value, source,
                       c.final_diagnosis if r is not None else None, r.signed_at if r is not None else None)


def _differential_call(c: Case, r: Review | None):
    """The blast % a person verified at sign-off, else the AI's count."""
    if r is not None and r.differential:
        pct = ((r.differential.get("current") or {}).get("percentages") or {}).get("blast")
        return r.ai_label, r.ai_status or "ok", pct, "verified" if pct is not None else None
    agg = aggregate(c)
    pct = ((agg.differential or {}).get("percentages") or {}).get("blast")
    return agg.label, agg.status, pct, "AI" if pct is not None else None


def _image_call(an, c: Case, r: Review | None):
    """The AI's probability of the positive call: as the signer saw it, else as computed now."""
    if r is not None and r.ai_call is not None:
        label, status, probs = r.ai_call["label"], r.ai_call["status"], r.ai_call["probabilities"]
    else:
        agg = aggregate(c)
        label, status, probs = agg.label, agg.status, agg.probabilities
    if not probs or an is None:
        return label, status, None, None
    return label, status, float(sum(p for k, p in probs.items() if k in an.positive_calls)), "AI"
