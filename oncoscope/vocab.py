"""Wording shared by every layer: how values are shown to people, the same on pages and in reports."""

from __future__ import annotations

# The diagnosis every analyzer offers besides its own labels: the sample cannot be judged.
NONDIAGNOSTIC = "Nondiagnostic"
NONDIAGNOSTIC_NAME = "Non-diagnostic sample"


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
