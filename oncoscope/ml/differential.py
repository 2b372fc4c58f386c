"""White-cell differential arithmetic: per-cell probabilities -> classes -> counts, percentages, blasts.

Pure numpy, shared by the ``smear-differential`` analyzer (one image), the case summary (all images
of a case) and the evaluation, so that the three cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scores import softmax

UNIDENTIFIED = "unidentified"
# Counted in the differential (the denominator of every percentage), in report order.
WBC_CLASSES = ("blast", UNIDENTIFIED, "neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil",
               "immature_granulocyte")
# Reported beside it, not in the denominator: nucleated red cells per 100 white cells, platelets not counted.
OTHER_CLASSES = ("erythroblast", "platelet")
REPORTED = WBC_CLASSES + OTHER_CLASSES
CELL_CLASSES = tuple(c for c in REPORTED if c != UNIDENTIFIED)  # what a network may output and report


@dataclass(frozen=True)
class CellDecision:
    """How a cell's class and a blast call are decided (thresholds fixed on validation data)."""

    classes: tuple[str, ...]  # network outputs, in order
    served_as: dict  # a trained-only class -> the reported class its probability is added to
    temperature: float = 1.0
    unidentified_below: float = 0.5  # top probability under which a cell is ``unidentified``
    blast_threshold: float = 0.5  # P(blast) at or above which a cell counts as a blast
    blast_borderline: float = 0.2  # P(blast) from here up to the threshold makes the image uncertain
    normal_blast_rate: float = 0.02  # validation normal cells called blast (upper 95% bound)
    false_call_rate: float = 0.05  # normal images or cases allowed a blasts_present call by chance


def reported_probabilities(logits: np.ndarray, d: CellDecision) -> tuple[np.ndarray, list[str]]:
    """(N, K) probabilities over the reported classes the network knows (trained-only ones merged).
    A row with a non-finite logit has no probabilities (NaN): :func:`decide` calls it unidentified."""
    logits = np.asarray(logits, np.float64)
    p = softmax(logits / d.temperature) if logits.size else logits
    p[~np.isfinite(logits).all(axis=1)] = np.nan
    names = [c for c in d.classes if c not in d.served_as]
    out = np.zeros((p.shape[0], len(names)))
    for j, c in enumerate(d.classes):
        out[:, names.index(d.served_as.get(c, c))] += p[:, j]
    return out, names


def decide(probs: np.ndarray, names: list[str], d: CellDecision) -> list[str]:
    """Each cell's class: a blast at or above the blast threshold (sensitivity first), otherwise the
    top class when confident enough, otherwise ``unidentified``."""
    b = names.index("blast") if "blast" in names else None
    out = []
    for row in probs:
        if not np.isfinite(row).all():
            out.append(UNIDENTIFIED)  # a broken output is never a confident class
        elif b is not None and row[b] >= d.blast_threshold:
            out.append("blast")
        elif row.max() < d.unidentified_below or (b is not None and int(row.argmax()) == b):
            out.append(UNIDENTIFIED)  # a blast below the threshold is never a confident normal cell
        else:
            out.append(names[int(row.argmax())])
    return out


def borderline(probs: np.ndarray, names: list[str], d: CellDecision) -> int:
    """Cells whose blast probability is close below the threshold."""
    if "blast" not in names:
        return 0
    pb = probs[:, names.index("blast")]
    return int(((pb >= d.blast_borderline) & (pb < d.blast_threshold)).sum())


def blasts_needed(white_cells: int, d: CellDecision) -> int:
    """Blast calls needed among ``white_cells`` for ``blasts_present``: the smallest k such that a
    sample of normal cells, each called blast with probability ``normal_blast_rate``, reaches k with
    probability at most ``false_call_rate`` (binomial tail). One false blast in 100 normal cells is
    expected at a 1% rate, so one blast call alone cannot mark a 100-cell differential."""
    p, n = min(max(d.normal_blast_rate, 1e-6), 0.5), max(int(white_cells), 1)
    tail, k = 1.0, 0  # P(X >= k), starting at k = 0
    pmf = (1 - p) ** n  # P(X = 0)
    while tail > d.false_call_rate and k < n:
        tail -= pmf
        k += 1
        pmf *= (n - k + 1) / k * p / (1 - p)  # P(X = k) from P(X = k - 1)
    return max(1, k)


@dataclass(frozen=True)
class BlastCall:
    """The blasts-present call on a set of counted cells (one image or a whole case)."""

    blasts: int  # cells called blast
    needed: int  # blast calls that make the call (see :func:`blasts_needed`)

    @property
    def present(self) -> bool:
        return self.blasts >= self.needed

    @property
    def short(self) -> bool:
        """Some blast calls, too few for the call: a person must look."""
        return 0 < self.blasts < self.needed


def blast_call(summary: dict, d: CellDecision) -> BlastCall:
    """The call on a :func:`summarise` result."""
    return BlastCall(summary["differential"]["blast"], blasts_needed(max(summary["white_cells"], 1), d))


def summarise(classes: list[str], count_target: int = 100) -> dict:
    """Counts, percentages of the white-cell total, blast fraction and progress to the count target."""
    counts = {c: 0 for c in REPORTED}
    for c in classes:
        counts[c] = counts.get(c, 0) + 1
    total = sum(counts[c] for c in WBC_CLASSES)
    pct = {c: (100.0 * counts[c] / total if total else None) for c in WBC_CLASSES}
    return {
        "differential": counts,
        "white_cells": total,
        "percentages": pct,
        "nrbc_per_100_wbc": 100.0 * counts["erythroblast"] / total if total else None,
        "blast_fraction": counts["blast"] / total if total else None,
        "count_target": count_target,
        "remaining_to_target": max(0, count_target - total),
    }
