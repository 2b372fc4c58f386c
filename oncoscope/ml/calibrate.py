"""Post-training calibration on the validation split, through the exported ONNX
models and the analyzer's own preprocessing (so what is calibrated is exactly
what is served):

* temperature scaling (minimise validation NLL);
* out-of-domain detector: mean + Ledoit-Wolf covariance of the training images'
  ``ood_features`` (channel mean/std of an intermediate feature map); score =
  Mahalanobis distance; threshold = 99.5th percentile of validation smears;
* ``uncertain_below``: the lowest top-probability threshold at which validation
  predictions above it are >= 99% accurate;
* ``malignant_threshold``: the operating point on P(malignant): the lowest
  threshold (0.05-0.5) at which validation specificity is >= 98%, i.e. the
  most sensitive call that keeps false alarms on benign smears rare.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .data import load_manifest, manifest_samples
from .imageio import load_image


def embed_split(analyzer, root: Path, samples, batch: int = 32) -> dict[str, np.ndarray]:
    """Run the analyzer's classifier over samples; returns logits, embedding, labels."""
    logits, embs, ys = [], [], []
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        xs = [analyzer.preprocess(load_image(root / s.path).rgb)[0] for s in chunk]
        out = analyzer.classifier.run(np.concatenate(xs))
        logits.append(out["logits"])
        embs.append(out[OOD_INPUT])
        ys.extend(analyzer.labels.index(s.label) for s in chunk)
    return {"logits": np.concatenate(logits).astype(np.float64), "ood": np.concatenate(embs).astype(np.float64),
            "y": np.array(ys)}


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    from scipy.optimize import minimize_scalar

    def nll(log_t):
        z = logits / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -lp[np.arange(len(y)), y].mean()

    r = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(r.x))


OOD_INPUT = "ood_features"


def fit_ood(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One Gaussian (mean, Ledoit-Wolf precision) over all in-domain training images."""
    from sklearn.covariance import LedoitWolf

    mean = feats.mean(axis=0, keepdims=True)
    lw = LedoitWolf().fit(feats - mean)
    return mean, lw.precision_


def choose_uncertain(probs: np.ndarray, y: np.ndarray, target_acc: float = 0.99) -> float:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    for t in np.arange(0.40, 0.96, 0.01):
        sel = conf >= t
        if sel.sum() and correct[sel].mean() >= target_acc:
            return round(float(t), 2)
    return 0.95


def choose_malignant_threshold(p_mal: np.ndarray, is_mal: np.ndarray, min_spec: float = 0.98) -> float:
    for t in np.arange(0.05, 0.501, 0.01):
        if (p_mal[~is_mal] < t).mean() >= min_spec:
            return round(float(t), 2)
    return 0.5


def calibrate_smear(root: Path, recipe: dict, work_dir: Path, model_dir: Path) -> dict:
    from ..analyzers import registry
    from ..analyzers.smear_all import softmax

    manifest = load_manifest(recipe["manifest"])
    base = Path(root) / recipe["subdir"]
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("calibration", None)
    cfg_path.write_text(json.dumps(cfg, indent=1))
    an = registry.get("smear-all", model_dir=model_dir)
    tr = embed_split(an, base, manifest_samples(manifest, "train"))
    va = embed_split(an, base, manifest_samples(manifest, "val"))
    temp = fit_temperature(va["logits"], va["y"])
    means, precision = fit_ood(tr["ood"])
    np.savez_compressed(model_dir / "ood.npz", means=means.astype(np.float32), precision=precision.astype(np.float32))
    d = va["ood"][:, None, :] - means[None]
    va_scores = np.sqrt(np.einsum("ncd,de,nce->nc", d, precision, d).min(axis=1))
    ood_thr = float(np.quantile(va_scores, 0.995))
    probs = softmax(va["logits"] / temp)
    unc = choose_uncertain(probs, va["y"])
    mal_idx = [i for i, l in enumerate(an.labels) if l in an.malignant_labels]
    p_mal = probs[:, mal_idx].sum(axis=1)
    is_mal = np.isin(va["y"], mal_idx)
    mal_thr = choose_malignant_threshold(p_mal, is_mal)
    cal = {
        "temperature": round(temp, 4),
        "uncertain_below": unc,
        "malignant_threshold": mal_thr,
        "ood": {"method": "Mahalanobis distance (Ledoit-Wolf covariance) of the channel mean/std of MBConv block "
                          "10's feature map", "input": OOD_INPUT, "stats": "ood.npz", "threshold": round(ood_thr, 3),
                "threshold_rule": "99.5th percentile of validation smears"},
        "fitted_on": {"manifest": Path(recipe["manifest"]).name, "split": "val", "n": int(len(va["y"])),
                      "ood_reference_split": "train", "ood_reference_n": int(len(tr["y"]))},
        "val_accuracy_uncalibrated": float((va["logits"].argmax(1) == va["y"]).mean()),
        "val_malignant_sensitivity_at_threshold": float((p_mal[is_mal] >= mal_thr).mean()),
        "val_benign_specificity_at_threshold": float((p_mal[~is_mal] < mal_thr).mean()),
        "val_confident_fraction": float((probs.max(1) >= unc).mean()),
    }
    cfg["calibration"] = cal
    cfg["files"] = sorted(set(cfg.get("files", [])) | {"ood.npz"})
    cfg_path.write_text(json.dumps(cfg, indent=1))
    registry.clear()
    print(json.dumps(cal, indent=1))
    return cal
