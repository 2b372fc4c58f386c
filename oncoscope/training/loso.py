"""Leave-one-source-out: what the models trained without a source answer on it, the referral band
fitted on those answers, and where their Grad-CAM points on images with tumour masks.

``oncoscope train --analyzer brain-mri --without tcga-lgg-flair/DU`` leaves ``<work>/brain-mri-without-
tcga-lgg-flair-DU/`` (its manifest, which names what was left out, and ``model/``). This module runs
each such model on every image of the source it never saw (all splits: none of them was used) and
keeps one record per image. The shipped model's *confident negative* threshold is fitted on the
records of images outside the test split, so the test split's figures stay untouched by it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..analyzers import registry
from ..imaging.imageio import load_image
from .data import load_manifest, sha256_file, source_matches
from .recipes import RECIPES, data_root, model_dir

MAX_CONFIDENT_MISS = 0.02  # of tumour images of a source left out of training (issue target)
FIT_MARGIN = 0.5  # fit to half the allowance: a new source differs from the ones we could leave out
POINTING_TOLERANCE_PX = 8
RECORD_VERSION = 2  # bump when a record gains fields: older caches are recomputed


def runs(analyzer_id: str, work: Path) -> list[tuple[list[str], Path]]:
    """(sources left out, model folder) of every finished leave-one-source-out run."""
    out = []
    for m in sorted(Path(work).glob(f"{analyzer_id}-without-*/manifest.json")):
        model = m.parent / "model"
        cfg = model / "config.json"
        if cfg.exists() and "calibration" in json.loads(cfg.read_text()):
            out.append((json.loads(m.read_text())["left_out"], model))
    return out


def mask_paths(analyzer_id: str) -> dict[str, Path]:
    """Manifest path -> tumour mask file, for the recipe's datasets that have masks."""
    spec = RECIPES[analyzer_id].get("masks")
    if not spec:
        return {}
    base = data_root(analyzer_id) / spec["dataset"]
    table = base / spec["csv"]
    if not table.exists():
        return {}
    with open(table, newline="") as fh:
        return {f"{spec['dataset']}/{row['path']}": base / row[spec["column"]]
                for row in csv.DictReader(fh) if row.get(spec["column"])}


def pointing(res, mask_file: Path, positive_calls) -> dict | None:
    """Does the heatmap's peak fall inside the tumour mask (or within a few pixels of it)? Only for
    a tumour call whose top class is a tumour: the heatmap then explains a tumour class (None
    otherwise; with a low threshold a slice can be called tumour with 'no tumour' on top)."""
    heatmap = res.heatmap
    if heatmap is None or not res.malignant or res.label not in positive_calls:
        return None
    mask = np.asarray(Image.open(mask_file).convert("L").resize(heatmap.shape[::-1], Image.NEAREST)) > 127
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    r = POINTING_TOLERANCE_PX
    near = mask[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1].any()
    return {"hit": bool(mask[y, x]), "near": bool(near)}


def _ood_parts(an, rgb: np.ndarray) -> tuple[float | None, float]:
    """The two out-of-domain checks apart, each over its own threshold (above 1: flagged): the
    Mahalanobis distance, which the fit may tighten, and the modality gate, which it leaves alone."""
    if an.ood_threshold is None:
        return None, 0.0
    x, _, _ = an.preprocess(rgb)
    out = an.classify_batch(x)
    distance = float(an.ood_score(out[an.ood_input])[0]) / an.ood_threshold
    gate = float(out["foreign_probability"][0]) / an.gate_threshold if an.gate_threshold else 0.0
    return distance, gate


def record(an, path: Path, rel: str, entry: dict, masks: dict[str, Path]) -> dict:
    rgb = load_image(path).rgb
    res = an.analyze(rgb)
    distance, gate = _ood_parts(an, rgb)
    mal = [i for i, l in enumerate(an.labels) if l in an.malignant_labels]
    net = res.network_probabilities
    probs = [float(net.get(l, np.nan)) for l in an.labels] if net else None
    out = {"path": rel, "source": entry.get("source"), "block": entry["block"], "label": entry["label"],
           "split": entry["split"],
           "status": res.status, "top": res.label, "probabilities": probs,
           "p_malignant": float(np.sum([probs[i] for i in mal])) if probs else None,
           "malignant_threshold": an.malignant_threshold, "ood_distance": distance, "ood_gate": gate}
    if rel in masks:
        out["pointing"] = pointing(res, masks[rel], an.positive_calls)
    return out


def held_out_predictions(analyzer_id: str, work: Path, refresh: bool = False) -> list[dict]:
    """Every leave-one-source-out model on the images of the source it never saw (cached in work)."""
    cache = Path(work) / f"{analyzer_id}-loso-predictions.json"
    found = runs(analyzer_id, work)
    manifest = load_manifest(RECIPES[analyzer_id]["manifest"])
    # the cache holds for these models on this split only
    key = {"record": RECORD_VERSION, "runs": [r[0] for r in found], "data_sha256": manifest["data_sha256"],
           "models": [sha256_file(m / "classifier.onnx") + sha256_file(m / "config.json") for _, m in found]}
    if cache.exists() and not refresh:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["records"]
    root, masks = data_root(analyzer_id), mask_paths(analyzer_id)
    records = []
    for left_out, model in found:
        an = registry.get(analyzer_id, model_dir=model)
        for rel, entry in sorted(manifest["files"].items()):
            if not entry.get("error") and source_matches(entry.get("source", manifest["dataset"]), left_out):
                records.append(dict(record(an, root / rel, rel, entry, masks), left_out="+".join(left_out)))
        registry.clear()
    cache.write_text(json.dumps({"key": key, "records": records}))
    return records


def called(r: dict) -> bool:
    """The record's positive call (at its own model's threshold)."""
    return r["p_malignant"] is not None and r["p_malignant"] >= r["malignant_threshold"]


def status_under(r: dict, band: float | None, scale: float) -> str:
    """The record's status had its model applied the referral rule: the out-of-domain distance
    threshold ``scale`` times its fitted value, and a negative ok only below ``band`` (None: no band).
    The offline twin of ``ImageClassifierAnalyzer.decide``, on stored answers."""
    if r["status"] != "out_of_domain" and r.get("ood_distance") is not None and r["ood_distance"] > scale:
        return "out_of_domain"
    if r["status"] == "ok" and band is not None and not called(r) and r["p_malignant"] >= band:
        return "uncertain"
    return r["status"]


def _is_miss(r: dict, malignant: set[str], below: float, scale: float = 1.0) -> bool:
    """A tumour image answered 'no tumour' with status ok, had the band started at ``below``."""
    return r["label"] in malignant and not called(r) and status_under(r, below, scale) == "ok"


SCALES = np.round(np.arange(1.0, 0.295, -0.01), 2)  # out-of-domain threshold x 1.0 ... 0.3
BANDS_STEP = 0.001


def fit_referral(records: list[dict], malignant: set[str], threshold: float,
                 validation: list[dict] | None = None) -> tuple[float, float, dict]:
    """The out-of-domain threshold scale and the band (at most the shipped ``threshold``) that keep
    confident misses at most FIT_MARGIN x MAX_CONFIDENT_MISS of the left-out tumour images and, among
    those, refer the fewest of the shipped model's own ``validation`` images (without them: the
    largest scale, then the highest band).

    Fitted on the non-test images of whole collections left out (the closest stand-in for a new
    hospital; a left-out institution still had its collection's look in training), falling back to
    every run when no whole collection was left out. Returns (scale, band, information)."""
    fit = [r for r in records if r["split"] != "test"]
    whole = [r for r in fit if "/" not in r["left_out"]]
    fit = whole or fit
    tumour = [r for r in fit if r["label"] in malignant]
    if not tumour:
        raise SystemExit("no leave-one-source-out records with tumour images to fit the referral band on")
    allowed = FIT_MARGIN * MAX_CONFIDENT_MISS * len(tumour)
    bands = np.round(np.arange(BANDS_STEP, threshold + 1e-9, BANDS_STEP), 3)
    options = []  # (validation referral, -scale, scale, band)
    for scale in SCALES:
        passing = [float(b) for b in bands if sum(_is_miss(r, malignant, b, scale) for r in tumour) <= allowed]
        if passing:
            band = max(passing)  # within a scale, a higher band only refers fewer
            cost = float(np.mean([status_under(r, band, scale) != "ok" for r in validation])) if validation else 0.0
            options.append((cost, -scale, float(scale), band))
            if not validation:
                break
    if not options:
        raise SystemExit(f"no referral rule keeps confident misses within {FIT_MARGIN * MAX_CONFIDENT_MISS:.0%} of "
                         f"{len(tumour)} left-out tumour images")
    cost, _, scale, band = min(options)
    info = {"fitted_on": "leave-one-source-out models on the non-test images of the "
                         + ("collections" if whole else "sources") + " they never saw",
            "sources": sorted({r["left_out"] for r in fit}), "tumour_images": len(tumour),
            "rule": f"confident misses <= {FIT_MARGIN * MAX_CONFIDENT_MISS:.0%} of those tumour images; among the "
                    "rules that meet it, the one referring the fewest of the shipped model's validation images",
            "ood_threshold_scale": scale,
            "confident_misses_at_fit": sum(_is_miss(r, malignant, band, scale) for r in tumour),
            "left_out_referred_at_fit": round(float(np.mean([status_under(r, band, scale) != "ok" for r in fit])), 4),
            **({"validation_referred": round(cost, 4), "validation_images": len(validation)} if validation else {})}
    return scale, band, info


def own_validation(analyzer_id: str, out_dir: Path) -> list[dict]:
    """The model's answers on its own validation split (what the referral rule costs in daily use)."""
    manifest = load_manifest(RECIPES[analyzer_id]["manifest"])
    an = registry.get(analyzer_id, model_dir=out_dir)
    root = data_root(analyzer_id)
    out = [record(an, root / rel, rel, entry, {}) for rel, entry in sorted(manifest["files"].items())
           if entry["split"] == "val" and not entry.get("error")]
    registry.clear()
    return out


def write_referral_band(analyzer_id: str, work: Path, out_dir: Path | None = None) -> dict:
    """Fit the band on the held-out predictions and write it into the model's calibration."""
    out_dir = Path(out_dir) if out_dir else model_dir(analyzer_id)
    records = held_out_predictions(analyzer_id, work)
    malignant = set(RECIPES[analyzer_id]["config"]["malignant_labels"])
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if "calibration" not in cfg:
        raise SystemExit(f"{cfg_path} is not calibrated yet: run --stage calibrate first")
    cal = cfg["calibration"]
    validation = own_validation(analyzer_id, out_dir)
    scale, below, info = fit_referral(records, malignant, cal["malignant_threshold"], validation)
    ood = cal["ood"]
    ood.setdefault("validation_threshold", ood["threshold"])  # refitting starts from the validation value
    ood["threshold"] = round(ood["validation_threshold"] * scale, 3)
    ood["threshold_rule"] = (f"99.5th percentile of validation images ({ood['validation_threshold']}) x {scale}, "
                             "the scale fitted on collections left out of training (see confident_negative_rule)")
    cal["confident_negative_below"] = below
    cal["confident_negative_rule"] = info
    cfg_path.write_text(json.dumps(cfg, indent=1))
    registry.clear()
    return {"confident_negative_below": below, **info}
