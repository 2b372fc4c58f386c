"""Differential arithmetic: probabilities -> classes -> counts, percentages and blast calls."""

from __future__ import annotations

import numpy as np
import pytest

from oncoscope.ml import differential as D

CLASSES = ("neutrophil", "lymphocyte", "blast", "platelet", "hematogone")
DEC = D.CellDecision(classes=CLASSES, served_as={"hematogone": "lymphocyte"}, unidentified_below=0.6,
                     blast_threshold=0.4, blast_borderline=0.15)


def _logits(*rows):
    return np.log(np.asarray(rows, float) + 1e-9)


def test_trained_only_class_is_added_to_the_class_it_is_served_as():
    probs, names = D.reported_probabilities(_logits([0.1, 0.3, 0.1, 0.1, 0.4]), DEC)
    assert names == ["neutrophil", "lymphocyte", "blast", "platelet"]
    assert probs[0, 1] == pytest.approx(0.7)
    assert probs.sum() == pytest.approx(1.0)


def test_decisions_blast_first_then_confident_class_else_unidentified():
    probs, names = D.reported_probabilities(_logits(
        [0.5, 0.05, 0.45, 0.0, 0.0],   # blast probability above its threshold wins over the top class
        [0.9, 0.05, 0.05, 0.0, 0.0],   # a confident neutrophil
        [0.5, 0.45, 0.05, 0.0, 0.0],   # top class below the confidence threshold
        [0.35, 0.3, 0.35, 0.0, 0.0],   # blast on top but under the blast threshold: never a normal class
    ), DEC)
    assert D.decide(probs, names, DEC) == ["blast", "neutrophil", "unidentified", "unidentified"]
    assert D.borderline(probs, names, DEC) == 1


def test_temperature_flattens_probabilities():
    logits = np.log(np.array([[0.9, 0.04, 0.04, 0.01, 0.01]]))
    sharp, _ = D.reported_probabilities(logits, DEC)
    flat, _ = D.reported_probabilities(logits, D.CellDecision(classes=CLASSES, served_as={"hematogone": "lymphocyte"},
                                                              temperature=2.0))
    assert flat[0, 0] < sharp[0, 0]


def test_summary_counts_percentages_and_target():
    classes = ["neutrophil"] * 6 + ["lymphocyte"] * 2 + ["blast"] + ["unidentified"] + ["platelet"] * 3 + ["erythroblast"] * 2
    s = D.summarise(classes, count_target=100)
    assert s["white_cells"] == 10  # platelets and nucleated red cells are not in the denominator
    assert s["differential"]["neutrophil"] == 6 and s["differential"]["platelet"] == 3
    assert s["percentages"]["neutrophil"] == pytest.approx(60.0)
    assert sum(v for v in s["percentages"].values()) == pytest.approx(100.0)
    assert s["blast_fraction"] == pytest.approx(0.1)
    assert s["nrbc_per_100_wbc"] == pytest.approx(20.0)
    assert s["remaining_to_target"] == 90


def test_empty_summary_has_no_percentages():
    s = D.summarise([], 200)
    assert s["white_cells"] == 0 and s["blast_fraction"] is None and s["remaining_to_target"] == 200
    assert all(v is None for v in s["percentages"].values())


def test_a_non_finite_output_is_unidentified_never_a_class():
    probs, names = D.reported_probabilities(np.array([[np.nan, 1.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0]]), DEC)
    assert np.isnan(probs[0]).all()
    assert D.decide(probs, names, DEC) == ["unidentified", "neutrophil"]
    assert D.borderline(probs, names, DEC) == 0


@pytest.mark.parametrize("rate, n, needed", [(0.02, 1, 1), (0.02, 100, 6), (0.02, 200, 8), (0.001, 10, 1), (0.001, 100, 2),
                                             (0.05, 100, 10)])
def test_blast_calls_needed_follow_the_binomial_tail(rate, n, needed):
    d = D.CellDecision(classes=CLASSES, served_as={}, normal_blast_rate=rate, false_call_rate=0.05)
    k = D.blasts_needed(n, d)
    assert k == needed
    from scipy.stats import binom

    assert binom.sf(k - 1, n, rate) <= 0.05  # k calls among normal cells: rare enough
    if k > 1:
        assert binom.sf(k - 2, n, rate) > 0.05  # one fewer would not be
