"""What several reports read the same way from a case's stored rows: the case's analyzer, whether an
image's analysis is done, its status and messages as the case page shows them, the analysis that
names the model, the case-level AI call as one line of text, and the default disclaimer.

Each export still words what it writes in its own standard (HL7 writes ``failed`` where the PDF
writes ``error``); only the readings that are the same in several of them live here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..analyzers import registry

# Said by every report whose analyzer gives no disclaimer of its own.
DEFAULT_DISCLAIMER = "AI output is decision support only and must be confirmed by a qualified person."


def case_analyzer(case):
    """The analyzer the case was analysed with, or None when it is no longer installed."""
    return registry.installed(case.analyzer_id)


def is_done(analysis) -> bool:
    """The analysis finished with a stored result (it may still be out of domain)."""
    return analysis is not None and analysis.job_status == "done"


def image_status(analysis) -> str | None:
    """The result status of a done analysis; "error" for a failed job, "pending" otherwise."""
    if is_done(analysis):
        return analysis.result_status
    return "error" if analysis is not None and analysis.job_status == "failed" else "pending"


def image_messages(analysis) -> list:
    """The messages of a done analysis, else the first line of the last error (none when there is none)."""
    if is_done(analysis):
        return list(analysis.messages or [])
    return [analysis.last_error.splitlines()[0]] if analysis and analysis.last_error else []


def first_model_analysis(case):
    """The first of the case's analyses that names its model version (None when none does)."""
    return next((i.analysis for i in case.images if i.analysis is not None and i.analysis.model_version), None)


def ai_call_text(agg, names: dict[str, str]) -> str:
    """The case-level AI call (:func:`oncoscope.store.cases.aggregate`) as one line: "<class>: <how>"."""
    return (f"{names.get(agg.label, agg.label)}: " if agg.label else "") + agg.text


# The verified differential's LOINC codes: each "<cells>/100 leukocytes in Blood" (no method: the count
# is a person's verification of a pre-classification), nucleated red cells per 100 white cells by manual
# count. Checked against LOINC's own names (loinc.org) and laboratory code lists.
DIFFERENTIAL_LOINC = {
    "blast": ("26446-5", "Blasts/100 leukocytes in Blood"),
    "neutrophil": ("26511-6", "Neutrophils/100 leukocytes in Blood"),
    "lymphocyte": ("26478-8", "Lymphocytes/100 leukocytes in Blood"),
    "monocyte": ("26485-3", "Monocytes/100 leukocytes in Blood"),
    "eosinophil": ("26450-7", "Eosinophils/100 leukocytes in Blood"),
    "basophil": ("30180-4", "Basophils/100 leukocytes in Blood"),
    "immature_granulocyte": ("38518-7", "Immature granulocytes/100 leukocytes in Blood"),
    "erythroblast": ("18309-5", "Nucleated erythrocytes/100 leukocytes in Blood by Manual count"),
}


@dataclass(frozen=True)
class DifferentialRow:
    cell_class: str
    loinc: str
    display: str
    value: float
    unit: str  # UCUM
    count: int
    abnormal: bool  # blasts at or above the configured flag
    white_cells: int  # the denominator
    unidentified: int  # of which nobody could place


def differential_rows(review) -> list[DifferentialRow]:
    """The signed (verified) differential of a review, one row per reportable class; [] without one.
    Unidentified cells have no code: they are counted in the denominator and named in the report text."""
    d = getattr(review, "differential", None)
    if not d or not d.get("current", {}).get("white_cells"):
        return []
    cur = d["current"]
    rows = []
    for cls, (code, display) in DIFFERENTIAL_LOINC.items():
        if cls == "erythroblast":
            value, unit = cur.get("nrbc_per_100_wbc"), "/100{WBCs}"
        else:
            value, unit = cur["percentages"].get(cls), "%"
        if value is None:
            continue
        rows.append(DifferentialRow(cls, code, display, round(float(value), 1), unit, int(cur["differential"][cls]),
                                    cls == "blast" and bool(d.get("blast_flag")), int(cur["white_cells"]),
                                    int(cur["differential"].get("unidentified", 0))))
    return rows


# ----------------------------------------------------------------------------- the report's state
REPORT_STATUS_HL7 = {"preliminary": "P", "final": "F", "corrected": "C"}


@dataclass(frozen=True)
class PreliminaryResult:
    """A preliminary reading reported before a doctor signs (when the administrator releases them):
    read by the exports like a signed review, as version 0, whose status is 'preliminary'."""

    final_diagnosis: str
    signed_by: object
    signed_by_id: int
    signed_at: object
    comment: str
    ai_label: str | None
    ai_status: str | None
    ai_call: dict | None
    agrees_with_ai: bool
    version: int = 0
    override_reason: str = ""
    uncertainty_note: str = ""
    amendment_reason: str = ""
    differential: dict | None = None
    content_sha256: str = ""
    second_reader_id: int | None = None
    second_reader: object = None
    second_diagnosis: str | None = None
    second_agrees: bool | None = None
    second_read_at: object = None


def result_status(version: int) -> str:
    """'preliminary' (version 0: a preliminary result), 'final' (the first signed version) or 'corrected'."""
    return "preliminary" if version == 0 else "corrected" if version > 1 else "final"


def preliminary_result(case) -> PreliminaryResult | None:
    """The case's current preliminary reading as a report, or None (signed, or none written)."""
    if case.status != "preliminary":
        return None
    rows = [r for r in case.readings if r.kind == "preliminary" and r.current]
    if not rows:
        return None
    r = rows[-1]
    call = r.ai_call or {}
    return PreliminaryResult(final_diagnosis=r.diagnosis, signed_by=r.user, signed_by_id=r.user_id, signed_at=r.at,
                             comment=r.comment, ai_label=call.get("label"), ai_status=call.get("status"), ai_call=r.ai_call,
                             agrees_with_ai=call.get("label") == r.diagnosis)


def reported_review(case):
    """What an export reports: the signed review, else the preliminary result, else None."""
    return case.current_review if case.status == "signed" and case.current_review else preliminary_result(case)


def lifecycle(case) -> list[dict]:
    """The report's history (who moved it to which state, when, why), oldest first."""
    return [{"state": t.to_state, "at": t.at, "by": t.user.name if t.user else "", "note": t.note}
            for t in case.transitions]
