"""End-to-end training recipes per analyzer: train -> calibrate -> segmenter -> export.

``oncoscope train --analyzer smear-all`` runs every stage; ``--stage`` runs one.
Each stage reads the previous stage's outputs from the work folder, so a long
run can be resumed or a single stage repeated.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .calibrate import calibrate, fit_type_domain
from .data import write_without
from . import loso
from .loso import write_referral_band
from .export import export_models
from .recipes import RECIPES, data_root as recipe_root, model_dir, write_config
from .segmentation import train_segmenter
from .train_classifier import TrainConfig, train

def run_training(analyzer_id: str, data_root: str | None, stage: str, work: str, out: str | None, epochs: int | None,
                 seed: int, command: str, without: list[str] | None = None) -> None:
    if analyzer_id not in RECIPES:
        raise SystemExit(f"no training recipe for analyzer {analyzer_id!r}; known: {', '.join(RECIPES)}")
    r = RECIPES[analyzer_id]
    root = recipe_root(analyzer_id, data_root)
    if not root.is_dir():
        raise SystemExit(f"dataset not found at {root}; pass --data")
    work_dir = Path(work) / analyzer_id
    out_dir = Path(out) if out else model_dir(analyzer_id)
    if without:  # a leave-one-source-out model: never the shipped folder
        work_dir = Path(work) / f"{analyzer_id}-without-{'+'.join(without).replace('/', '-')}"
        out_dir = Path(out) if out else work_dir / "model"
        work_dir.mkdir(parents=True, exist_ok=True)
        r = dict(r, manifest=write_without(r["manifest"], without, work_dir / "manifest.json"))
    work_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    all_stages = ["classifier", "segmenter", "export", "calibrate"]
    if "segmented_subdir" not in r:  # classification-only analyzers
        all_stages.remove("segmenter")
        if stage == "segmenter":
            raise SystemExit(f"analyzer {analyzer_id!r} has no segmenter")
    if r.get("typed_sources") and not without:
        all_stages.append("types")  # after calibrate, which rewrites the calibration it joins
    elif stage == "types":
        raise SystemExit(f"analyzer {analyzer_id!r} names no collections with types (recipe 'typed_sources')")
    if r.get("loso_sources") and loso.runs(analyzer_id, Path(work)) and not without:
        all_stages.append("referral")  # the band would be lost with the calibration it belongs to
    stages = all_stages if stage == "all" else [stage]
    if stage in ("loso", "referral") and not r.get("loso_sources"):
        raise SystemExit(f"analyzer {analyzer_id!r} names no sources to leave out (recipe 'loso_sources')")
    log = {}
    for st in stages:
        ts = time.time()
        if st == "loso":
            for source in r["loso_sources"]:
                run_training(analyzer_id, data_root, "all", work, None, epochs, seed, f"{command} [{source}]",
                             without=[source])
        elif st == "referral":
            print(json.dumps(write_referral_band(analyzer_id, Path(work), out_dir), indent=1))
        elif st == "classifier":
            cfg = TrainConfig(data_root=str(root), manifest=str(r["manifest"]), out_dir=str(work_dir / "classifier"),
                              subdir=r["subdir"], image_size=r["image_size"], epochs=epochs or r["epochs"], seed=seed,
                              **r.get("train", {}))
            train(cfg)
        elif st == "types":
            write_config(r, out_dir)  # the untyped call and its wording come with the static config
            print(json.dumps(fit_type_domain(analyzer_id, root, r, out_dir), indent=1))
        elif st == "calibrate":
            calibrate(analyzer_id, root, r, work_dir, out_dir)
            if stage == "calibrate" and r.get("typed_sources"):
                print("note: the calibration was rewritten without its type domain: run --stage types again")
        elif st == "segmenter":
            train_segmenter(root, r, work_dir / "segmenter", seed=seed)
        elif st == "export":
            export_models(work_dir, out_dir, r)
            write_config(r, out_dir)
        log[st] = round((time.time() - ts) / 60, 2)
    record_path = work_dir / "training_record.json"
    # one stage re-run on a shipped model (a fresh clone has no work folder) adds to its record
    earlier = record_path if record_path.exists() or stage == "all" else out_dir / "training_record.json"
    record = json.loads(earlier.read_text()) if earlier.exists() else {"stages": {}}
    record["stages"].update(log)
    record.setdefault("commands", []).append(command)
    record["dataset_root"] = str(root)
    record["total_minutes_last_run"] = round((time.time() - t0) / 60, 2)
    record["reproduce"] = f"oncoscope train --analyzer {analyzer_id}" + (f" --data {data_root}" if data_root else "")
    record_path.write_text(json.dumps(record, indent=1))
    (out_dir / "training_record.json").write_text(json.dumps(record, indent=1))
