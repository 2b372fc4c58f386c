"""End-to-end training recipes per analyzer: train -> calibrate -> segmenter -> export.

``oncoscope train --analyzer smear-all`` runs every stage; ``--stage`` runs one.
Each stage reads the previous stage's outputs from the work folder, so a long
run can be resumed or a single stage repeated.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .data import MANIFEST_DIR

PACKAGE_DIR = Path(__file__).resolve().parents[1]
REPO_DIR = PACKAGE_DIR.parent
DEFAULT_DATASETS = REPO_DIR.parent / "shared" / "datasets"

RECIPES = {
    "smear-all": {
        "dataset": "all-taleqani",
        "subdir": "Original",
        "segmented_subdir": "Segmented",
        "manifest": MANIFEST_DIR / "all-taleqani.json",
        "image_size": 192,
        "epochs": 14,
        "config": {
            "id": "smear-all",
            "name": "Peripheral blood smear: B-lineage acute lymphoblastic leukemia",
            "version": "1.0.0",
            "modality": "microscopy/peripheral-blood-smear",
            "labels": ["Benign", "Early", "Pre", "Pro"],
            "display_names": {"Benign": "Benign (hematogone)", "Early": "Early Pre-B ALL", "Pre": "Pre-B ALL",
                              "Pro": "Pro-B ALL"},
            "malignant_labels": ["Early", "Pre", "Pro"],
            "report_wording": {
                "finding": "Peripheral blood smear field, automated B-ALL pre-classification",
                "malignant": "Morphology suggestive of B-lineage acute lymphoblastic leukemia ({label}).",
                "benign": "No morphological evidence of B-ALL blasts; appearance of benign hematogones.",
                "disclaimer": "AI output is decision support only and must be confirmed by a qualified person "
                              "(flow cytometry is the reference standard).",
            },
            "segmenter": {"threshold": 0.5, "min_area_px": 60, "min_distance_px": 9},
            "blank_image_std": 2.0,
        },
    },
}


def model_dir(analyzer_id: str) -> Path:
    return PACKAGE_DIR / "models" / analyzer_id


def write_config(recipe: dict, out_dir: Path) -> None:
    """Static analyzer config (labels, wording, preprocessing); calibration is added later."""
    from .classifier import MEAN, STD

    cfg = dict(recipe["config"])
    cfg["preprocess"] = {"size": recipe["image_size"], "mean": list(MEAN), "std": list(STD), "resize": "bilinear",
                         "pad_to_square": "median border colour"}
    cfg["segmenter"] = dict(cfg["segmenter"], size=recipe["image_size"])
    cfg["files"] = ["classifier.onnx", "segmenter.onnx", "head.npz"]
    path = out_dir / "config.json"
    if path.exists():  # keep an existing calibration block until calibrate rewrites it
        old = json.loads(path.read_text())
        if "calibration" in old:
            cfg["calibration"] = old["calibration"]
            cfg["files"].append("ood.npz")
    path.write_text(json.dumps(cfg, indent=1))


def run_training(analyzer_id: str, data_root: str | None, stage: str, work: str, out: str | None, epochs: int | None,
                 seed: int, command: str) -> None:
    if analyzer_id not in RECIPES:
        raise SystemExit(f"no training recipe for analyzer {analyzer_id!r}; known: {', '.join(RECIPES)}")
    r = RECIPES[analyzer_id]
    root = Path(data_root) if data_root else DEFAULT_DATASETS / r["dataset"]
    if not root.is_dir():
        raise SystemExit(f"dataset not found at {root}; pass --data")
    work_dir = Path(work) / analyzer_id
    out_dir = Path(out) if out else model_dir(analyzer_id)
    work_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    stages = ["classifier", "segmenter", "export", "calibrate"] if stage == "all" else [stage]
    log = {}
    for st in stages:
        ts = time.time()
        if st == "classifier":
            from .train_classifier import TrainConfig, train

            cfg = TrainConfig(data_root=str(root), manifest=str(r["manifest"]), out_dir=str(work_dir / "classifier"),
                              subdir=r["subdir"], image_size=r["image_size"], epochs=epochs or r["epochs"], seed=seed)
            train(cfg)
        elif st == "calibrate":
            from .calibrate import calibrate_smear

            calibrate_smear(root, r, work_dir, out_dir)
        elif st == "segmenter":
            from .segmentation import train_segmenter

            train_segmenter(root, r, work_dir / "segmenter", seed=seed)
        elif st == "export":
            from .export import export_smear

            export_smear(work_dir, out_dir, r)
            write_config(r, out_dir)
        log[st] = round((time.time() - ts) / 60, 2)
    record_path = work_dir / "training_record.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"stages": {}}
    record["stages"].update(log)
    record.setdefault("commands", []).append(command)
    record["dataset_root"] = str(root)
    record["total_minutes_last_run"] = round((time.time() - t0) / 60, 2)
    record["reproduce"] = f"oncoscope train --analyzer {analyzer_id}" + (f" --data {data_root}" if data_root else "")
    record_path.write_text(json.dumps(record, indent=1))
    (out_dir / "training_record.json").write_text(json.dumps(record, indent=1))
