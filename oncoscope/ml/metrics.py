"""Classification metrics with cluster-bootstrap confidence intervals (numpy only)."""

from __future__ import annotations

import math

import numpy as np


def confusion(y: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros((n, n), np.int64)
    np.add.at(m, (y, pred), 1)
    return m


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie handling); nan if one class is absent."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(score))
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(score: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    positive = positive.astype(bool)
    thr = np.unique(score)[::-1]
    tpr = [0.0] + [float((score[positive] >= t).mean()) for t in thr]
    fpr = [0.0] + [float((score[~positive] >= t).mean()) for t in thr]
    return np.array(fpr), np.array(tpr)


def ece(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> list[dict]:
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        out.append({"lo": float(lo), "hi": float(hi), "n": int(sel.sum()),
                    "confidence": float(conf[sel].mean()) if sel.any() else None,
                    "accuracy": float(correct[sel].mean()) if sel.any() else None})
    return out


def classification_metrics(probs: np.ndarray, y: np.ndarray, labels: list[str], malignant: list[int],
                           malignant_threshold: float = 0.5) -> dict:
    n = len(labels)
    pred = probs.argmax(axis=1)
    cm = confusion(y, pred, n)
    per = {}
    f1s = []
    for c in range(n):
        tp = cm[c, c]
        fn = cm[c].sum() - tp
        fp = cm[:, c].sum() - tp
        tn = cm.sum() - tp - fn - fp
        sens = tp / (tp + fn) if tp + fn else float("nan")
        spec = tn / (tn + fp) if tn + fp else float("nan")
        prec = tp / (tp + fp) if tp + fp else 0.0
        f1 = 2 * prec * sens / (prec + sens) if (prec + sens) else 0.0
        f1s.append(f1)
        per[labels[c]] = {"n": int(cm[c].sum()), "sensitivity": float(sens), "specificity": float(spec),
                          "precision": float(prec), "f1": float(f1), "roc_auc": roc_auc(probs[:, c], y == c)}
    p_mal = probs[:, malignant].sum(axis=1)
    is_mal = np.isin(y, malignant)
    call = p_mal >= malignant_threshold
    aucs = [v["roc_auc"] for v in per.values() if not np.isnan(v["roc_auc"])]
    return {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "macro_f1": float(np.mean(f1s)),
        "macro_roc_auc": float(np.mean(aucs)) if aucs else float("nan"),
        "ece": ece(probs, y),
        "per_class": per,
        "confusion_matrix": cm.tolist(),
        "malignant_vs_benign": {
            "threshold": malignant_threshold,
            "sensitivity": float(call[is_mal].mean()) if is_mal.any() else float("nan"),
            "specificity": float((~call[~is_mal]).mean()) if (~is_mal).any() else float("nan"),
            "roc_auc": roc_auc(p_mal, is_mal),
            "n_malignant": int(is_mal.sum()), "n_benign": int((~is_mal).sum()),
        },
    }


def _flat(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("n", "threshold"):
            out[key] = float(v)
    return out


def bootstrap_ci(probs: np.ndarray, y: np.ndarray, clusters: np.ndarray, labels: list[str], malignant: list[int],
                 malignant_threshold: float, n_boot: int = 1000, seed: int = 0) -> dict[str, list[float]]:
    """95% percentile intervals by resampling whole clusters (blocks of consecutive slides),
    because images of one slide are not independent."""
    rng = np.random.default_rng(seed)
    ids = np.unique(clusters)
    members = {c: np.nonzero(clusters == c)[0] for c in ids}
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        pick = rng.choice(ids, size=len(ids), replace=True)
        idx = np.concatenate([members[c] for c in pick])
        m = classification_metrics(probs[idx], y[idx], labels, malignant, malignant_threshold)
        m.pop("confusion_matrix")
        for k, v in _flat(m).items():
            samples.setdefault(k, []).append(v)
    return {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for k, v in samples.items()}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """A proportion k/n and its Wilson score interval (low, high); n must be positive."""
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return p, max(0.0, centre - half), min(1.0, centre + half)
