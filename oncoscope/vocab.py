"""Wording shared by every layer: how values are shown to people, the same on pages and in reports."""

from __future__ import annotations

# The diagnosis every analyzer offers besides its own labels: the sample cannot be judged.
NONDIAGNOSTIC = "Nondiagnostic"
NONDIAGNOSTIC_NAME = "Non-diagnostic sample"
# What it means, for the class pages and the PDF appendix (the analyzers' own classes are described
# in their model folders' class_info.json; this one entry is shared by all of them).
NONDIAGNOSTIC_INFO = {
    "summary": "The person signing judged that these images cannot support a diagnosis, for example because "
               "of poor staining, focus or exposure, too few cells, artefacts, or the wrong kind of image. It "
               "is neither a negative nor a positive result.",
    "confirmation": "Nothing is confirmed yet: an adequate new sample or study is needed (a fresh, well-made "
                    "blood film, or a bone marrow examination where indicated; for imaging, a repeat or a more "
                    "suitable study as advised by a radiologist).",
    "referral": "Arrange the repeat promptly and do not treat the case as normal. If the clinical picture "
                "suggests a malignancy (for example unexplained cytopenias, bruising or bleeding, a growing bone "
                "lesion, or new neurological signs), refer as that picture warrants without waiting for the repeat.",
    "references": [{"text": "National Institute for Health and Care Excellence. Suspected cancer: recognition and "
                            "referral. NICE guideline NG12; 2015, with later updates.",
                    "url": "https://www.nice.org.uk/guidance/ng12"}],
}


def percent(p: float | None) -> str:
    """A model probability for people: never "100.0%" or "0.0%", which a model cannot know."""
    if p is None:
        return "–"
    v = 100 * float(p)
    return ">99.9%" if v > 99.9 else "<0.1%" if v < 0.1 else f"{v:.1f}%"


# How urgent a case is, set when it is created (worklists put STAT first).
PRIORITIES = {"stat": "STAT", "routine": "Routine"}


# Exports of a case (services/exports.py raises with the first; the case page's send button says the second).
EXPORT_NEEDS_SIGNATURE = "Only signed cases can be exported."
SEND_NEEDS_SIGNATURE = "Only signed cases can be sent."


# When a second doctor must confirm a first reading before the report is final (set per analyzer).
SECOND_READER_POLICIES = {
    "none": "No second reader",
    "disagree": "When the first reader overrides the AI",
    "positive": "When the AI or the first reader calls it positive (malignant, blasts)",
    "always": "Always",
}

# The report's states, as people read them (store/cases.report_state).
REPORT_STATE_NAMES = {"open": "Open", "preliminary": "Preliminary", "final": "Final", "corrected": "Corrected",
                      "cancelled": "Cancelled"}
# A move of the report, by the state it went to (the case page's report history, the PDF header).
TRANSITION_NAMES = {"preliminary": "Preliminary result", "second_read": "First reading", "final": "Final",
                    "corrected": "Corrected", "cancelled": "Cancelled", "open": "Reopened"}
