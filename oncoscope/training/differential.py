"""``oncoscope train --analyzer smear-differential``: crops -> classifier -> calibration -> export.

Stages read each other's outputs from the work folder (``<work>/smear-differential[-without-X]``).
``without`` leaves whole sources out (leave-one-source-out runs for the model card).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from ..ml import differential as D
from ..ml import metrics as M
from ..ml.scores import nearest_distance, softmax, whitening
from . import classifier as C
from .cells import CANON_MPP, CLASSES, CROP_PX, FIELD_UM, TRAIN_CLASSES, build, cached_sources
from .export import export_classifier
from .recipes import MEAN, STD
from .train_cells import CellTrainConfig, load_cell_model, train_cells

ANALYZER = "smear-differential"
SERVED_AS = {"hematogone": "lymphocyte"}
OOD_QUANTILE = 0.995  # validation cells (of the sources trained on) inside the out-of-domain distance
TARGET_ANSWERED_ACCURACY = 0.97  # cells answered (not unidentified) on validation
MAX_UNIDENTIFIED = 0.15  # ... unless that leaves more than this fraction unidentified
BLAST_SENSITIVITY = 0.95  # validation blasts at or above the blast threshold
BLAST_BORDERLINE_SENSITIVITY = 0.99  # validation blasts at or above the borderline (uncertain) level

CONFIG = {
    "id": ANALYZER,
    "name": "Blood smear white-cell differential (blast screening)",
    "version": "0.1.0",
    "modality": "microscopy/peripheral-blood-smear",
    "input_description": "Romanowsky-stained peripheral blood smear image (field or single-cell crop)",
    "image_noun": "Field",
    "labels": ["blasts_present", "no_blasts"],
    "display_names": {"blasts_present": "Blasts present", "no_blasts": "No blasts found"},
    "malignant_labels": ["blasts_present"],
    "positive_term": "blasts",
    "report_wording": {
        "finding": "Peripheral blood smear, automated white-cell differential (pre-classification)",
        "malignant": "Cells pre-classified as blasts were found; verify them in the cell gallery. Blast "
                     "morphology suggests acute leukemia; flow cytometry decides lineage and subtype.",
        "benign": "No cell was pre-classified as a blast in the images analysed.",
        "disclaimer": "AI pre-classification only: every cell must be verified by a qualified person.",
    },
    "blank_image_std": 2.0,
}


def work_dir(work: Path, without: list[str]) -> Path:
    return Path(work) / (ANALYZER + "".join(f"-without-{s}" for s in sorted(without)))


def run(datasets: Path, work: Path, out: Path | None, stage: str, epochs: int | None, seed: int,
        without: list[str], command: str) -> Path:
    wd = work_dir(work, without)
    wd.mkdir(parents=True, exist_ok=True)
    cache = Path(work) / "cell-crops"
    stages = ["crops", "classifier", "calibrate", "export"] if stage == "all" else [stage]
    t0 = time.time()
    for st in stages:
        if st == "crops":
            build(datasets, cache)
        elif st == "classifier":
            cfg = CellTrainConfig(datasets=str(datasets), cache=str(cache), out_dir=str(wd / "classifier"),
                                  without=list(without), seed=seed, **({"epochs": epochs} if epochs else {}))
            train_cells(cfg)
        elif st == "calibrate":
            calibrate(wd, cache, without)
        elif st == "export":
            export(wd, out or wd / "model")
    record = {"command": command, "without": without, "minutes": round((time.time() - t0) / 60, 1),
              "reproduce": f"oncoscope train --analyzer {ANALYZER}" + "".join(f" --without {s}" for s in without)}
    (wd / "training_record.json").write_text(json.dumps(record, indent=1))
    return wd


@torch.no_grad()
def cell_outputs(model, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, embedding) of canonical crops, as the exported network computes them."""
    logits, emb = [], []
    for i in range(0, len(crops), 128):
        f = model.feature_map(C.normalise(C.to_tensor(torch.from_numpy(crops[i:i + 128])))).mean(dim=(2, 3))
        emb.append(f.numpy())
        logits.append(model.head(f).numpy())
    if not logits:
        return np.zeros((0, len(TRAIN_CLASSES))), np.zeros((0, 1280))
    return np.concatenate(logits), np.concatenate(emb)


def fit_ood(emb: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Class means and the shared (pooled within-class) precision of the training cells' embeddings."""
    classes = [c for c in TRAIN_CLASSES if (labels == c).any()]
    means = np.stack([emb[labels == c].mean(axis=0) for c in classes])
    centred = np.concatenate([emb[labels == c] - m for c, m in zip(classes, means)])
    cov = np.cov(centred, rowvar=False) + 1e-3 * np.eye(emb.shape[1])
    return {"means": means.astype(np.float32), "precision": np.linalg.inv(cov).astype(np.float32)}


def _split(cache: Path, without: list[str], split: str, per_class: int | None = None,
           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Crops and labels of one split of every source trained on (at most ``per_class`` per class)."""
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for name, c in cached_sources(cache).items():
        if name in without:
            continue
        idx = np.nonzero(c.splits == split)[0]
        if per_class is not None:
            idx = np.concatenate([rng.permutation(idx[c.labels[idx] == lab])[:per_class]
                                  for lab in np.unique(c.labels[idx])] or [idx[:0]])
        crops.append(c.crops[idx])
        labels += list(c.labels[idx])
    if not labels:
        raise SystemExit(f"no {split} cells left once {', '.join(without)} are left out")
    return np.concatenate(crops), np.array(labels)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    def nll(log_t):
        p = softmax(logits / float(np.exp(log_t)))
        return -float(np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)))

    return float(np.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))


def calibrate(wd: Path, cache: Path, without: list[str]) -> dict:
    """Temperature, thresholds and out-of-domain statistics from training and validation cells
    (never test cells); written to ``calibration.json`` and ``ood_cells.npz`` in the work folder."""
    model = load_cell_model(wd / "classifier" / "best.pt")
    tr_crops, tr_labels = _split(cache, without, "train", per_class=600)
    _, tr_emb = cell_outputs(model, tr_crops)
    keep = np.isin(tr_labels, TRAIN_CLASSES)
    stats = fit_ood(tr_emb[keep], tr_labels[keep])
    np.savez(wd / "ood_cells.npz", **stats)
    crops, labels = _split(cache, without, "val")
    logits, emb = cell_outputs(model, crops)
    idx = {c: i for i, c in enumerate(TRAIN_CLASSES)}
    known = np.isin(labels, TRAIN_CLASSES)
    t = fit_temperature(logits[known], np.array([idx[v] for v in labels[known]]))
    d = D.CellDecision(classes=TRAIN_CLASSES, served_as=SERVED_AS, temperature=t)
    probs, names = D.reported_probabilities(logits, d)
    served = np.array([SERVED_AS.get(v, v) for v in labels])
    is_blast = served == "blast"
    normal = np.isin(served, [c for c in CLASSES if c != "blast"]) | (labels == "normal")
    blast_t, border = _blast_thresholds(probs[:, names.index("blast")], is_blast)
    unident = _unidentified_threshold(probs, names, served)
    # the distance exactly as serving computes it (from the float32 statistics it loads)
    ood_t = float(np.quantile(nearest_distance(emb, whitening(stats["means"], stats["precision"])), OOD_QUANTILE))
    d = D.CellDecision(classes=TRAIN_CLASSES, served_as=SERVED_AS, temperature=t, unidentified_below=unident,
                       blast_threshold=blast_t, blast_borderline=border)
    calls = np.array(D.decide(probs, names, d))
    k, n = int((calls[normal] == "blast").sum()), int(normal.sum())
    cal = {
        "temperature": round(t, 4), "unidentified_below": round(unident, 4),
        "blast_threshold": round(blast_t, 4), "blast_borderline": round(border, 4),
        "normal_blast_rate": round(_upper95(k, n), 4), "false_call_rate": 0.05,
        "ood_stats": "ood_cells.npz", "ood_threshold": round(ood_t, 3),
        "fitted_on": f"training and validation cells of {', '.join(sorted(set(cached_sources(cache)) - set(without)))}",
        "threshold_rules": (f"blast: {BLAST_SENSITIVITY:.0%} of validation blasts at or above; borderline: "
                            f"{BLAST_BORDERLINE_SENSITIVITY:.0%}; unidentified: lowest top probability giving "
                            f"{TARGET_ANSWERED_ACCURACY:.0%} accuracy on answered normal cells, at most "
                            f"{MAX_UNIDENTIFIED:.0%} unidentified; normal_blast_rate: upper 95% Wilson bound of "
                            f"validation normal cells called blast; out of domain: {OOD_QUANTILE:.1%} of validation "
                            "cells within the Mahalanobis distance to the nearest training class"),
        "val": {"blast_called_blast": _frac(calls[is_blast] == "blast"),
                "blast_blast_or_unidentified": _frac(np.isin(calls[is_blast], ["blast", D.UNIDENTIFIED])),
                "normal_called_blast": _frac(calls[normal] == "blast"),
                "normal_unidentified": _frac(calls[normal] == D.UNIDENTIFIED),
                "n_blast": int(is_blast.sum()), "n_normal": n},
    }
    (wd / "calibration.json").write_text(json.dumps(cal, indent=1))
    return cal


def _blast_thresholds(pb: np.ndarray, is_blast: np.ndarray) -> tuple[float, float]:
    if not is_blast.any():  # no blasts trained on: nothing to place the threshold by
        return 0.5, 0.2
    blast_t = float(np.quantile(pb[is_blast], 1 - BLAST_SENSITIVITY))
    return blast_t, min(blast_t, float(np.quantile(pb[is_blast], 1 - BLAST_BORDERLINE_SENSITIVITY)))


def _unidentified_threshold(probs: np.ndarray, names: list[str], served: np.ndarray) -> float:
    """The lowest top-probability threshold giving the target accuracy on answered normal cells, within
    the unidentified budget (0.5 when there are no typed normal cells to measure it on)."""
    typed = np.isin(served, [c for c in CLASSES if c != "blast"])
    if not typed.any():
        return 0.5
    top = probs[typed].max(axis=1)
    right = np.array(names)[probs[typed].argmax(axis=1)] == served[typed]
    best = 0.5
    for thr in np.linspace(0.3, 0.95, 66):
        answered = top >= thr
        if answered.mean() < 1 - MAX_UNIDENTIFIED:
            break
        best = float(thr)
        if right[answered].mean() >= TARGET_ANSWERED_ACCURACY:
            break
    return best


def _upper95(k: int, n: int) -> float:
    return M.wilson(k, n)[2] if n else 0.05  # no normal cells to measure it on: a cautious 5%


def _frac(mask: np.ndarray) -> float | None:
    return round(float(mask.mean()), 4) if mask.size else None


def export(wd: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model = load_cell_model(wd / "classifier" / "best.pt")
    export_classifier(model, out / "cell_classifier.onnx", CROP_PX)
    cal = json.loads((wd / "calibration.json").read_text())
    cfg = dict(CONFIG)
    cfg["preprocess"] = {"size": CROP_PX, "mean": list(MEAN), "std": list(STD)}
    shutil.copy(wd / "ood_cells.npz", out / "ood_cells.npz")
    cfg["files"] = ["cell_classifier.onnx", "ood_cells.npz"]
    cfg["cells"] = {"classifier": "cell_classifier.onnx", "classes": list(TRAIN_CLASSES), "served_as": SERVED_AS,
                    "microns_per_pixel": CANON_MPP, "field_um": FIELD_UM, "count_target": 100, **cal}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
