import numpy as np
import pytest

from oncoscope.ml import metrics as M


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s = rng.random(60).round(1)  # ties on purpose
    pos = rng.random(60) < 0.4
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in s[pos] for b in s[~pos]]
    assert M.roc_auc(s, pos) == pytest.approx(np.mean(pairs))
    assert np.isnan(M.roc_auc(s, np.ones(60, bool)))


def test_perfect_and_confused_classification():
    labels = ["B", "E", "P", "R"]
    y = np.array([0, 1, 2, 3, 0, 1])
    probs = np.eye(4)[y] * 0.9 + 0.025
    m = M.classification_metrics(probs, y, labels, [1, 2, 3])
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0
    assert m["malignant_vs_benign"]["sensitivity"] == 1.0
    assert m["malignant_vs_benign"]["specificity"] == 1.0
    probs2 = probs.copy()
    probs2[0] = [0.1, 0.7, 0.1, 0.1]  # a benign called Early
    m2 = M.classification_metrics(probs2, y, labels, [1, 2, 3])
    assert m2["accuracy"] == pytest.approx(5 / 6)
    assert m2["malignant_vs_benign"]["specificity"] == pytest.approx(0.5)
    assert m2["per_class"]["B"]["sensitivity"] == pytest.approx(0.5)
    assert m2["confusion_matrix"][0][1] == 1


def test_ece_zero_when_confidence_equals_accuracy_and_large_when_overconfident():
    y = np.array([0] * 8 + [1] * 2)
    probs = np.tile([0.8, 0.2], (10, 1))  # 80% confident, 80% right
    assert M.ece(probs, y) == pytest.approx(0.0, abs=1e-9)
    over = np.tile([0.99, 0.01], (10, 1))
    assert M.ece(over, y) == pytest.approx(0.19, abs=1e-6)


def test_cluster_bootstrap_interval_contains_point_estimate():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 200)
    probs = np.full((200, 4), 0.1)
    probs[np.arange(200), np.where(rng.random(200) < 0.9, y, (y + 1) % 4)] = 0.7
    clusters = np.arange(200) // 10
    ci = M.bootstrap_ci(probs, y, clusters, list("abcd"), [1, 2, 3], 0.5, n_boot=200)
    acc = M.classification_metrics(probs, y, list("abcd"), [1, 2, 3])["accuracy"]
    lo, hi = ci["accuracy"]
    assert lo <= acc <= hi and hi - lo < 0.2
