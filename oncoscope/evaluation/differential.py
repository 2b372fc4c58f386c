"""Model card of ``smear-differential``: every figure through the served ONNX analyzer's decisions.

Cell figures use the cells the serving detector cut from each image (cached by training; for
single-cell sources the cell nearest the centre, or the image centre where the detector missed it:
the detection rate is reported beside them); whole fields run end to end through ``analyze``.

- cells of each source's test split (the shipped model), per class, with Wilson 95% intervals;
- leave one source out: models trained without a source (``oncoscope train --without SOURCE``) on
  every cell of that source, the estimate for a laboratory the model never saw;
- whole held-out all-taleqani fields: ``blasts_present`` on ALL fields versus hematogone fields;
- detection against raabin-fields boxes (test split; the detector's constants were set on its train
  split) and wbc-seg-tecom masks; the scale estimate per source;
- shortcut checks: grayscale, stain jitter, scale ±25%, JPEG quality 40.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..analyzers import registry
from ..ml import differential as D
from ..ml import metrics as M
from ..ml import wbc
from ..ml.synthetic import non_smear_images
from ..training.cells import CLASSES, CellCrops, cached_sources
from .classifier import check_targets
from ..training.data import MANIFEST_DIR, load_manifest
from .smear import colour_jitter_np

NORMAL = tuple(c for c in CLASSES if c != "blast")
FIVE = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")


def wilson(k: int, n: int) -> dict:
    """A proportion with its Wilson 95% interval, as the card writes it."""
    if n == 0:
        return {"value": None, "ci95": None, "n": 0}
    p, lo, hi = M.wilson(k, n)
    return {"value": round(p, 4), "ci95": [round(lo, 4), round(hi, 4)], "n": n}


def cell_calls(analyzer, crops: np.ndarray) -> tuple[list[str], np.ndarray, list[str]]:
    """Each crop's call as the analyzer makes it (cells unlike any trained cell are unidentified)."""
    logits, dist = analyzer.classify_crops(crops)
    probs, names = D.reported_probabilities(logits, analyzer.decision)
    calls = D.decide(probs, names, analyzer.decision)
    if analyzer.ood is not None:
        calls = [D.UNIDENTIFIED if d > analyzer.cells_cfg.ood_threshold else c for c, d in zip(calls, dist)]
    return calls, probs, names


def cell_metrics(calls: list[str], truth: np.ndarray) -> dict:
    """Blast safety, normal-cell figures and per-class sensitivity for cells with known classes.

    ``hematogone`` (every white cell of an all-taleqani benign field) and ``normal`` (all-idb2) are
    not-blast labels only: they count for blast specificity, never for class accuracy.
    """
    calls = np.asarray(calls)
    truth = np.asarray([str(t) for t in truth])
    out: dict = {"n": int(len(truth))}
    blast = truth == "blast"
    if blast.any():
        out["blasts_called_blast"] = wilson(int((calls[blast] == "blast").sum()), int(blast.sum()))
        out["blasts_blast_or_unidentified"] = wilson(int(np.isin(calls[blast], ["blast", D.UNIDENTIFIED]).sum()),
                                                     int(blast.sum()))
        out["blasts_confident_normal"] = wilson(int(np.isin(calls[blast], NORMAL).sum()), int(blast.sum()))
    normal = np.isin(truth, NORMAL) | np.isin(truth, ["normal", "hematogone"])
    if normal.any():
        out["normals_called_blast"] = wilson(int((calls[normal] == "blast").sum()), int(normal.sum()))
        out["normals_unidentified"] = wilson(int((calls[normal] == D.UNIDENTIFIED).sum()), int(normal.sum()))
    typed = np.isin(truth, NORMAL)
    answered = typed & np.isin(calls, CLASSES)
    if answered.any():
        out["accuracy_answered"] = wilson(int((calls[answered] == truth[answered]).sum()), int(answered.sum()))
        five = answered & np.isin(truth, FIVE)
        out["five_class_accuracy_answered"] = wilson(int((calls[five] == truth[five]).sum()), int(five.sum()))
        out["accuracy_all"] = wilson(int((calls[typed] == truth[typed]).sum()), int(typed.sum()))
    out["per_class_sensitivity"] = {c: wilson(int((calls[truth == c] == c).sum()), int((truth == c).sum()))
                                    for c in sorted(set(truth)) if c in CLASSES}
    out["called"] = {c: int((calls == c).sum()) for c in sorted(set(calls))}
    return out


def in_source(analyzer, sources: dict[str, CellCrops]) -> dict:
    out = {}
    for name, c in sources.items():
        sel = c.splits == "test"
        calls, _, _ = cell_calls(analyzer, c.crops[sel])
        out[name] = cell_metrics(calls, c.labels[sel])
    return out


def leave_one_source_out(runs: Path, sources: dict[str, CellCrops]) -> dict:
    """Each ``<runs>/smear-differential-without-X/model`` on every cell of X."""
    out = {}
    for name, c in sources.items():
        folder = Path(runs) / f"smear-differential-without-{name}" / "model"
        if not (folder / "config.json").exists():
            out[name] = {"missing": f"no model trained without {name} ({folder})"}
            continue
        an = registry.get("smear-differential", folder)
        fitted_on = an.config.to_dict()["cells"].get("fitted_on", "")
        if name in fitted_on:  # the folder name is not proof: the calibration records what it saw
            raise SystemExit(f"{folder} was fitted on {fitted_on!r}, which includes {name}")
        calls, _, _ = cell_calls(an, c.crops)
        out[name] = {"trained_without": name, **cell_metrics(calls, c.labels),
                     "cells_found_by_the_detector": round(float(c.detected.mean()), 4)}
    return out


def taleqani_fields(analyzer, datasets: Path, split: str = "test") -> dict:
    m = load_manifest(MANIFEST_DIR / "all-taleqani.json")
    root = datasets / "all-taleqani" / m.get("subdir", "Original")
    rows = []
    for rel, f in sorted(m["files"].items()):
        if f["split"] != split:
            continue
        r = analyzer.analyze(root / rel)
        rows.append((f["label"] != "Benign", r.malignant is True, r.status))
    all_f = [r for r in rows if r[0]]
    benign = [r for r in rows if not r[0]]
    answered = ("ok", "uncertain")
    return {
        "split": split,
        "all_fields_blasts_present": wilson(sum(r[1] for r in all_f), len(all_f)),
        # a benign field refused as out of domain or failed is not a correct "no blasts"
        "hematogone_fields_no_blasts": wilson(sum((not r[1]) and r[2] in answered for r in benign), len(benign)),
        "all_fields_confident_no_blasts": wilson(sum((not r[1]) and r[2] == "ok" for r in all_f), len(all_f)),
        "fields_uncertain": wilson(sum(r[2] == "uncertain" for r in rows), len(rows)),
        "fields_out_of_domain_or_error": wilson(sum(r[2] not in answered for r in rows), len(rows)),
    }


def non_smear(analyzer) -> dict:
    """Generated non-smear images (noise, text, photos, shapes...): refused, or at least no cell counted."""
    rows = [analyzer.analyze(img) for _, img in non_smear_images(n_per_kind=10)]
    return {"out_of_domain": wilson(sum(r.status == "out_of_domain" for r in rows), len(rows)),
            "no_white_cell_counted": wilson(sum(r.status == "out_of_domain" or not r.cells for r in rows), len(rows)),
            "called_blasts_present": wilson(sum(r.malignant is True for r in rows), len(rows))}


def detection(datasets: Path) -> dict:
    tp = fp = fn = 0
    root = datasets / "raabin-fields"
    mpps = []
    for img in sorted((root / "images" / "test").glob("*.jpg")):
        rgb = np.asarray(Image.open(img).convert("RGB"))
        h, w = rgb.shape[:2]
        boxes = []
        for line in (root / "labels" / "test" / (img.stem + ".txt")).read_text().split("\n"):
            if line.strip() and line.split()[0] == "0":
                _, cx, cy, bw, bh = map(float, line.split())
                boxes.append(((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h))
        det = wbc.detect(rgb)
        mpps.append(det.scale.microns_per_pixel)
        used: set[int] = set()
        for c in det.cells:
            x, y = c.centroid
            hit = [i for i, b in enumerate(boxes) if b[0] <= x <= b[2] and b[1] <= y <= b[3] and i not in used]
            if hit:
                used.add(hit[0])
                tp += 1
            else:
                fp += 1
        fn += len(boxes) - len(used)
    return {"raabin_test": {"recall": wilson(tp, tp + fn), "precision": wilson(tp, tp + fp),
                            "microns_per_pixel_median": round(float(np.median(mpps)), 4),
                            "expected_microns_per_pixel": "about 0.12 (575 px originals at 100x, halved)"},
            "tecom": _tecom_masks(datasets / "wbc-seg-tecom")}


def _tecom_masks(root: Path) -> dict:
    ious, found = [], 0
    paths = sorted((root / "images").glob("*.png"))
    for p in paths:
        rgb = np.asarray(Image.open(p).convert("RGB"))
        truth = np.asarray(Image.open(root / "masks" / p.name)) > 0
        det = wbc.detect(rgb)
        best = 0.0
        for k in range(1, int(det.labels.max()) + 1):
            m = det.labels == k
            best = max(best, float((m & truth).sum() / max(1, (m | truth).sum())))
        ious.append(best)
        found += best >= 0.5
    return {"cell_found_iou_0_5": wilson(found, len(paths)), "median_iou": round(float(np.median(ious)), 4)}


def shortcuts(analyzer, sources: dict[str, CellCrops], n: int = 300, seed: int = 0) -> dict:
    """Agreement of each cell's call with and without a perturbation (test cells of pbc and all-taleqani)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in ("pbc", "all-taleqani"):
        c = sources.get(name)
        if c is None:
            continue
        idx = np.nonzero(c.splits == "test")[0]
        idx = rng.choice(idx, min(n, len(idx)), replace=False)
        base, _, _ = cell_calls(analyzer, c.crops[idx])
        res = {}
        for what, fn in _PERTURB.items():
            pert = np.stack([fn(x, rng) for x in c.crops[idx]])
            calls, _, _ = cell_calls(analyzer, pert)
            res[what] = {"same_call": round(float(np.mean(np.array(calls) == np.array(base))), 4),
                         "called_blast": round(float(np.mean(np.array(calls) == "blast")), 4)}
        res["none"] = {"called_blast": round(float(np.mean(np.array(base) == "blast")), 4)}
        out[name] = res
    return out


def _gray(x, rng):
    g = (x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def _scale(f):
    def fn(x, rng):
        s = x.shape[0]
        big = Image.fromarray(x).resize((round(s * f), round(s * f)), Image.BILINEAR)
        if f > 1:
            o = (big.size[0] - s) // 2
            return np.asarray(big.crop((o, o, o + s, o + s)))
        canvas = Image.new("RGB", (s, s), tuple(int(v) for v in np.median(x.reshape(-1, 3), axis=0)))
        canvas.paste(big, ((s - big.size[0]) // 2, (s - big.size[1]) // 2))
        return np.asarray(canvas)
    return fn


def _jpeg(x, rng):
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, "JPEG", quality=40)
    return np.asarray(Image.open(buf).convert("RGB"))


_PERTURB = {"grayscale": _gray, "stain_jitter": lambda x, rng: colour_jitter_np(x, rng, 1.5),
            "scale_0.75": _scale(0.75), "scale_1.25": _scale(1.25), "jpeg_q40": _jpeg}


def evaluate_differential(model_dir: Path, datasets: Path, runs: Path, cache: Path) -> dict:
    t0 = time.time()
    analyzer = registry.get("smear-differential", model_dir)
    sources = cached_sources(cache)
    card = {
        "analyzer": "smear-differential", "model": analyzer.model_info.to_dict(),
        "calibration": analyzer.config.to_dict()["cells"],
        "test_in_source": in_source(analyzer, sources),
        "leave_one_source_out": leave_one_source_out(runs, sources),
        "taleqani_fields": taleqani_fields(analyzer, datasets),
        "detection": detection(datasets),
        "scale_by_source": {k: (round(float(np.median(c.mpp[c.mpp > 0])), 4) if (c.mpp > 0).any() else None)
                            for k, c in sources.items()},
        "cells_found_by_the_detector": {k: round(float(c.detected.mean()), 4) for k, c in sources.items()},
        "non_smear_images": non_smear(analyzer),
        "shortcuts": shortcuts(analyzer, sources),
    }
    loso_tal = Path(runs) / "smear-differential-without-all-taleqani" / "model"
    if (loso_tal / "config.json").exists():
        card["taleqani_fields_without_taleqani"] = taleqani_fields(registry.get("smear-differential", loso_tal), datasets)
    card["minutes"] = round((time.time() - t0) / 60, 1)
    return card


CITATIONS = {
    "pbc": "Acevedo A. et al., A dataset of microscopic peripheral blood cell images for development of automatic "
           "recognition systems, Data in Brief 30 (2020) 105474 (CC BY 4.0); Hospital Clinic of Barcelona, "
           "CellaVision DM96, half resolution copy.",
    "wbc-seg-tecom": "Zheng X. et al., Fast and robust segmentation of white blood cell images by self-supervised "
                     "learning, Micron 107 (2018) 55-71; images from Jiangxi Tecom Science Corporation (GPL-3.0 "
                     "repository, research use; some class labels not expert-reviewed).",
    "raabin-fields": "Gan L., Li X., TXL-PBC (arXiv:2407.13214, MIT) boxes on Raabin-WBC images: Kouzehkanan Z.M. "
                     "et al., Scientific Reports 12, 1123 (2022). Detection evaluation only.",
    "all-taleqani": "Aria M., Ghaderzadeh M. et al., Acute Lymphoblastic Leukemia (ALL) image dataset (Kaggle 2021); "
                    "Ghaderzadeh et al., Int J Intell Syst 37(8):5113-5133, 2022. Labels per field.",
    "all-idb2": "Labati R.D., Piuri V., Scotti F., ALL-IDB: the acute lymphoblastic leukemia image database for "
                "image processing, IEEE ICIP 2011 (research and evaluation use; not for redistribution).",
}

# (what, path in the card, comparison, goal)
TARGETS = [
    ("New blast lab: blasts called blast or unidentified (all-idb2 left out)",
     "leave_one_source_out.all-idb2.blasts_blast_or_unidentified.value", ">=", 0.95),
    ("New blast lab: blasts called blast (all-idb2 left out)",
     "leave_one_source_out.all-idb2.blasts_called_blast.value", ">=", 0.80),
    ("New blast lab: blasts called blast or unidentified (all-taleqani left out)",
     "leave_one_source_out.all-taleqani.blasts_blast_or_unidentified.value", ">=", 0.95),
    ("New blast lab: blasts called blast (all-taleqani left out)",
     "leave_one_source_out.all-taleqani.blasts_called_blast.value", ">=", 0.80),
    ("New normal lab: normal cells called blast (wbc-seg-tecom left out)",
     "leave_one_source_out.wbc-seg-tecom.normals_called_blast.value", "<=", 0.03),
    ("New normal lab: normal cells unidentified (wbc-seg-tecom left out)",
     "leave_one_source_out.wbc-seg-tecom.normals_unidentified.value", "<=", 0.15),
    ("New normal lab: 5-class accuracy on answered cells (wbc-seg-tecom left out)",
     "leave_one_source_out.wbc-seg-tecom.five_class_accuracy_answered.value", ">=", 0.85),
    ("New blast lab: its normal cells called blast (all-idb2 left out)",
     "leave_one_source_out.all-idb2.normals_called_blast.value", "<=", 0.03),
    ("New blast lab: its hematogone-field cells called blast (all-taleqani left out)",
     "leave_one_source_out.all-taleqani.normals_called_blast.value", "<=", 0.03),
    ("In-source (pbc test) 8-class accuracy on answered cells", "test_in_source.pbc.accuracy_answered.value", ">=", 0.97),
    ("Held-out all-taleqani ALL fields: blasts_present", "taleqani_fields.all_fields_blasts_present.value", ">=", 0.99),
    ("Held-out all-taleqani hematogone fields: no blasts", "taleqani_fields.hematogone_fields_no_blasts.value", ">=", 0.95),
    ("Detection recall (raabin-fields test)", "detection.raabin_test.recall.value", ">=", 0.97),
    ("Detection precision (raabin-fields test)", "detection.raabin_test.precision.value", ">=", 0.95),
]


def targets(card: dict) -> list[dict]:
    """The targets of issue 13 against the card (a leave-one-source-out model not trained is missed)."""
    return check_targets(card, TARGETS, missing_ok=True)


def _pct(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "-"
    lo, hi = m["ci95"]
    return f"{100 * m['value']:.1f}% ({100 * lo:.0f}-{100 * hi:.0f}, n={m['n']})"


def card_markdown(card: dict) -> str:
    return "\n".join(_md_intro(card) + _md_targets(card) + _md_loso(card) + _md_in_source(card) + _md_fields(card)
                     + _md_detection(card) + _md_tail(card))


def _md_intro(card: dict) -> list[str]:
    cal = card["calibration"]
    return [
        "# Model card: smear-differential (white-cell differential, blast screening)", "",
        f"Model {card['model']['version']}, sha256 {card['model']['sha256'][:16]}. Decision support only: every "
        "cell must be verified by a qualified person. Blast morphology screens for acute leukemia; flow "
        "cytometry decides lineage and subtype.", "",
        "## How it works",
        "White cells are found without a trained network (stain colour relative to each image's background; "
        "`oncoscope/ml/wbc.py`), the scale comes from the red cells' diameter (7.5 µm) or the white cell's own "
        f"size, each cell is cut at {cal['microns_per_pixel']} µm/px ({cal['field_um']:.0f} µm window) and "
        "classified by EfficientNet-Lite0 fine-tuned end to end on four laboratories' cells with strong "
        "stain, blur, resolution, grayscale and framing augmentation. `hematogone` is trained (benign "
        "lymphoid precursors of the all-taleqani hematogone patients) and reported as `lymphocyte`. A cell "
        "whose embedding is far from every trained class (Mahalanobis distance above "
        f"{cal.get('ood_threshold')}) is `unidentified`; an image where most cells are is out of domain. An image "
        "or case is `blasts_present` when its blast calls exceed what its normal cells would give by chance "
        f"(binomial tail at a {cal.get('normal_blast_rate')} per-cell false-blast rate, at most "
        f"{cal.get('false_call_rate')} of normal samples called); fewer blast calls than that make it uncertain.", "",
    ]


def _md_targets(card: dict) -> list[str]:
    lines = ["## Targets", "", "| target | measured | goal | |", "|---|---|---|---|"]
    for t in targets(card):
        v = "-" if t["measured"] is None else f"{t['measured']:.3f}"
        lines.append(f"| {t['target']} | {v} | {t['goal']} | {'met' if t['met'] else '**missed**'} |")
    return lines


def _md_loso(card: dict) -> list[str]:
    lines = ["", "## Leave one source out (the estimate for a new laboratory)", "",
             "Each row: a model trained without that source, tested on all its cells.", "",
             "| left out | cells | blasts called blast | blasts blast or unidentified | blasts confident normal "
             "| normals called blast | normals unidentified | 5-class acc. answered |", "|---|---|---|---|---|---|---|---|"]
    for name, m in card["leave_one_source_out"].items():
        if "missing" in m:
            lines.append(f"| {name} | not trained | | | | | | |")
            continue
        lines.append(f"| {name} | {m['n']} | {_pct(m.get('blasts_called_blast'))} | "
                     f"{_pct(m.get('blasts_blast_or_unidentified'))} | {_pct(m.get('blasts_confident_normal'))} | "
                     f"{_pct(m.get('normals_called_blast'))} | {_pct(m.get('normals_unidentified'))} | "
                     f"{_pct(m.get('five_class_accuracy_answered'))} |")
    return lines


def _md_in_source(card: dict) -> list[str]:
    lines = ["", "## Test split of each source (shipped model, sources seen in training)", "",
             "| source | cells | accuracy answered | blasts called blast | blasts confident normal | "
             "normals called blast | normals unidentified |", "|---|---|---|---|---|---|---|"]
    for name, m in card["test_in_source"].items():
        lines.append(f"| {name} | {m['n']} | {_pct(m.get('accuracy_answered'))} | {_pct(m.get('blasts_called_blast'))} "
                     f"| {_pct(m.get('blasts_confident_normal'))} | {_pct(m.get('normals_called_blast'))} | "
                     f"{_pct(m.get('normals_unidentified'))} |")
    return lines


def _md_fields(card: dict) -> list[str]:
    f = card["taleqani_fields"]
    lines = ["", "## Whole fields (held-out all-taleqani blocks)", "",
              f"ALL fields called `blasts_present`: {_pct(f['all_fields_blasts_present'])}; hematogone fields "
              f"`no_blasts`: {_pct(f['hematogone_fields_no_blasts'])}; ALL fields answered `no_blasts` with status "
              f"ok (confident misses): {_pct(f['all_fields_confident_no_blasts'])}; fields uncertain: "
              f"{_pct(f['fields_uncertain'])}."]
    if "taleqani_fields_without_taleqani" in card:
        g = card["taleqani_fields_without_taleqani"]
        lines.append(f"Model trained without all-taleqani: ALL fields `blasts_present` "
                     f"{_pct(g['all_fields_blasts_present'])}; hematogone fields `no_blasts` "
                     f"{_pct(g['hematogone_fields_no_blasts'])}.")
    return lines


def _md_detection(card: dict) -> list[str]:
    d = card["detection"]
    lines = ["", "## Detection and scale", "",
              f"raabin-fields test split (boxes; never used to set the detector): recall "
              f"{_pct(d['raabin_test']['recall'])}, precision {_pct(d['raabin_test']['precision'])}. wbc-seg-tecom "
              f"masks: cell found with IoU >= 0.5 in {_pct(d['tecom']['cell_found_iou_0_5'])}, median IoU "
              f"{d['tecom']['median_iou']}.", "",
              "Median estimated µm per pixel: " + ", ".join(f"{k} {v}" for k, v in card["scale_by_source"].items())
              + " (pbc is documented as about 0.2; raabin-fields about 0.12).", "",
              "## Shortcut checks (same call with and without the change; test cells)", ""]
    for name, res in card["shortcuts"].items():
        lines.append(f"- {name}: " + "; ".join(f"{k} same {100 * v['same_call']:.0f}% (blast {100 * v['called_blast']:.0f}%)"
                                               for k, v in res.items() if k != "none")
                     + f"; unperturbed blast calls {100 * res['none']['called_blast']:.0f}%")
    return lines


def _md_tail(card: dict) -> list[str]:
    cal = card["calibration"]
    return ["", "## Calibration (validation cells only)", "", "```", json.dumps(cal, indent=1), "```", "",
              "## Data, splits and how to reproduce", "",
              "- Splits: pbc by image with near-duplicate groups together (`oncoscope/training/splits/pbc.json`); "
              "all-taleqani by blocks of consecutive file numbers, the same split as smear-all "
              "(`oncoscope/training/splits/all-taleqani.json`); wbc-seg-tecom and all-idb2 by image, byte-identical "
              "copies together (a hash of the file's SHA-256); raabin-fields: its own train/val/test folders.",
              "- Train: `oncoscope train --analyzer smear-differential` (6 epochs, about 8 minutes on 2 CPU cores); "
              "leave-one-source-out models: `oncoscope train --analyzer smear-differential --without SOURCE` for "
              "all-idb2, all-taleqani and wbc-seg-tecom (pbc cannot be left out: it alone has six of the classes).",
              "- Card: `oncoscope evaluate --analyzer smear-differential` (about 10 minutes).", ""] + [
              f"- `{k}`: {v}" for k, v in CITATIONS.items()] + [
              "", "## Limitations", "",
              "- **Blasts do not transfer between the two blast laboratories**: trained without one, the model calls "
              "almost none of that laboratory's blasts `blast` and answers about half of them as a confident normal "
              "class (leave-one-source-out rows above). Until a third blast source is added, treat the blast call "
              "as validated only for images like all-taleqani and all-idb2, and verify every cell.",
              "- Blasts come from two laboratories only, both lymphoblasts (ALL); myeloblasts are not represented.",
              "- all-taleqani labels are per field: every white cell of an ALL field is taken as a blast, so some "
              "normal cells of those fields are counted as blasts in training and testing.",
              "- all-idb2 `normal` cells have no type, and all-taleqani benign-field cells are weak labels: both count "
              "only as \"not a blast\", never for class accuracy.",
              "- Cell figures use cached crops cut by the serving detector, not a fresh end-to-end run; intervals are "
              "Wilson intervals per cell and ignore that cells of one field or patient are correlated (too narrow).",
              "- The detector constants, checkpoint, temperature and thresholds were all chosen on the sources "
              "trained on; leave-one-source-out runs refit them without the left-out source, but the detector was "
              "looked at on every source.",
              "- The detector is fitted by hand on the raabin-fields train split and checked on its test split; "
              "smudge cells, clumps and overlapping cells are not separated.",
              "- No patient identifiers in any source: splits group near-duplicates and blocks of consecutive "
              "files, not patients.", ""]


def write_card(card: dict, model_dir: Path) -> None:
    card["targets"] = targets(card)
    (model_dir / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")
    (model_dir / "model_card.md").write_text(card_markdown(card))
