"""``oncoscope train --analyzer smear-differential``: crops -> classifier -> calibration -> export.

Stages read each other's outputs from the work folder (``<work>/smear-differential[-without-X]``).
``without`` leaves whole sources out (leave-one-source-out runs for the model card).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from ..ml import differential as D
from . import classifier as C
from .cells import CANON_MPP, CLASSES, CROP_PX, FIELD_UM, TRAIN_CLASSES, CellCrops, build
from .export import export_classifier
from .recipes import MEAN, STD
from .train_cells import CellTrainConfig, load_cell_model, train_cells

ANALYZER = "smear-differential"
SERVED_AS = {"hematogone": "lymphocyte"}
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
def cell_logits(model, crops: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(crops), 128):
        out.append(model(C.normalise(C.to_tensor(torch.from_numpy(crops[i:i + 128])))).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(TRAIN_CLASSES)))


def _validation(cache: Path, without: list[str]) -> tuple[np.ndarray, np.ndarray]:
    crops, labels = [], []
    for name, c in _cached(cache).items():
        if name in without:
            continue
        sel = c.splits == "val"
        crops.append(c.crops[sel])
        labels += list(c.labels[sel])
    return np.concatenate(crops), np.array(labels)


def _cached(cache: Path) -> dict[str, CellCrops]:
    return {p.stem.removeprefix("cells-"): CellCrops.load(p) for p in sorted(Path(cache).glob("cells-*.npz"))}


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    def nll(log_t):
        p = D.softmax(logits, float(np.exp(log_t)))
        return -float(np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)))

    return float(np.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))


def calibrate(wd: Path, cache: Path, without: list[str]) -> dict:
    """Temperature, unidentified and blast thresholds from validation cells (never test cells)."""
    model = load_cell_model(wd / "classifier" / "best.pt")
    crops, labels = _validation(cache, without)
    logits = cell_logits(model, crops)
    idx = {c: i for i, c in enumerate(TRAIN_CLASSES)}
    known = np.isin(labels, TRAIN_CLASSES)
    t = fit_temperature(logits[known], np.array([idx[v] for v in labels[known]]))
    d = D.CellDecision(classes=TRAIN_CLASSES, served_as=SERVED_AS, temperature=t)
    probs, names = D.reported_probabilities(logits, d)
    served = np.array([SERVED_AS.get(v, v) for v in labels])
    pb = probs[:, names.index("blast")]
    is_blast = served == "blast"
    normal = np.isin(served, [c for c in CLASSES if c != "blast"]) | (labels == "normal")
    blast_t = float(np.quantile(pb[is_blast], 1 - BLAST_SENSITIVITY)) if is_blast.any() else 0.5
    border = float(np.quantile(pb[is_blast], 1 - BLAST_BORDERLINE_SENSITIVITY)) if is_blast.any() else 0.2
    border = min(border, blast_t)
    # unidentified: the lowest top-probability threshold giving TARGET accuracy on answered normal cells
    typed = np.isin(served, [c for c in CLASSES if c != "blast"])
    top = probs[typed].max(axis=1)
    right = np.array(names)[probs[typed].argmax(axis=1)] == served[typed]
    unident = 0.0
    for thr in np.linspace(0.3, 0.95, 66):
        answered = top >= thr
        if answered.mean() < 1 - MAX_UNIDENTIFIED:
            break
        unident = float(thr)
        if right[answered].mean() >= TARGET_ANSWERED_ACCURACY:
            break
    d = D.CellDecision(classes=TRAIN_CLASSES, served_as=SERVED_AS, temperature=t, unidentified_below=unident,
                       blast_threshold=blast_t, blast_borderline=border)
    calls = np.array(D.decide(probs, names, d))
    cal = {
        "temperature": round(t, 4), "unidentified_below": round(unident, 4),
        "blast_threshold": round(blast_t, 4), "blast_borderline": round(border, 4),
        "fitted_on": f"validation cells of {', '.join(sorted(set(_cached(cache)) - set(without)))}",
        "threshold_rules": (f"blast: {BLAST_SENSITIVITY:.0%} of validation blasts at or above; borderline: "
                            f"{BLAST_BORDERLINE_SENSITIVITY:.0%}; unidentified: lowest top probability giving "
                            f"{TARGET_ANSWERED_ACCURACY:.0%} accuracy on answered normal cells, at most "
                            f"{MAX_UNIDENTIFIED:.0%} unidentified"),
        "val": {"blast_called_blast": _frac(calls[is_blast] == "blast"),
                "blast_blast_or_unidentified": _frac(np.isin(calls[is_blast], ["blast", D.UNIDENTIFIED])),
                "normal_called_blast": _frac(calls[normal] == "blast"),
                "normal_unidentified": _frac(calls[normal] == D.UNIDENTIFIED),
                "n_blast": int(is_blast.sum()), "n_normal": int(normal.sum())},
    }
    (wd / "calibration.json").write_text(json.dumps(cal, indent=1))
    return cal


def _frac(mask: np.ndarray) -> float | None:
    return round(float(mask.mean()), 4) if mask.size else None


def export(wd: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model = load_cell_model(wd / "classifier" / "best.pt")
    export_classifier(model, out / "cell_classifier.onnx", CROP_PX)
    cal = json.loads((wd / "calibration.json").read_text())
    cfg = dict(CONFIG)
    cfg["preprocess"] = {"size": CROP_PX, "mean": list(MEAN), "std": list(STD)}
    cfg["files"] = ["cell_classifier.onnx"]
    cfg["cells"] = {"classifier": "cell_classifier.onnx", "classes": list(TRAIN_CLASSES), "served_as": SERVED_AS,
                    "microns_per_pixel": CANON_MPP, "field_um": FIELD_UM, "blasts_present_min": 1,
                    "count_target": 100, **cal}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
