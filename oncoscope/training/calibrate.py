"""Post-training calibration on the validation split, through the exported ONNX
models and the analyzer's own preprocessing (so what is calibrated is exactly
what is served):

* temperature scaling (minimise validation NLL), with per-class logit offsets
  for recipes trained with a class-weighted loss (``calibrate_bias``);
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

from ..analyzers import registry
from ..imaging.imageio import load_image
from ..ml.scores import gate_features, gate_probability, nearest_distance, softmax, whitening
from .data import Sample, load_manifest, manifest_samples, source_matches
from .recipes import RECIPES, data_root


def embed_split(analyzer, root: Path, samples, batch: int = 32, labelled: bool = True) -> dict[str, np.ndarray]:
    """Run the analyzer's classifier over samples: logits, OOD features, embedding and labels."""
    logits, oods, embs, ys = [], [], [], []
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        xs = [analyzer.preprocess(load_image(root / s.path).rgb)[0] for s in chunk]
        out = analyzer.run_network(np.concatenate(xs))
        logits.append(out["logits"])
        oods.append(out[OOD_INPUT])
        embs.append(out["embedding"])
        ys.extend(analyzer.labels.index(s.label) if labelled else -1 for s in chunk)
    return {"logits": np.concatenate(logits).astype(np.float64), "ood": np.concatenate(oods).astype(np.float64),
            "embedding": np.concatenate(embs).astype(np.float64), "y": np.array(ys)}


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    from scipy.optimize import minimize_scalar

    def nll(log_t):
        z = logits / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -lp[np.arange(len(y)), y].mean()

    r = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(r.x))


def fit_temperature_and_bias(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Temperature plus one offset per class (minimise validation NLL).

    The offsets undo the prior shift of a class-weighted loss (trained as if the classes were
    balanced; served on the validation class mix); the first class's offset is fixed at 0."""
    from scipy.optimize import minimize

    k = logits.shape[1]

    def nll(params):
        z = logits / np.exp(params[0])
        z = z + np.concatenate([[0.0], params[1:]])
        z = z - z.max(axis=1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -lp[np.arange(len(y)), y].mean()

    t0 = np.log(fit_temperature(logits, y))
    r = minimize(nll, np.concatenate([[t0], np.zeros(k - 1)]), method="L-BFGS-B",
                 bounds=[(np.log(0.05), np.log(20.0))] + [(-10.0, 10.0)] * (k - 1))
    return float(np.exp(r.x[0])), np.concatenate([[0.0], r.x[1:]])


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


def choose_sensitive_threshold(p_mal: np.ndarray, is_mal: np.ndarray, min_sens: float) -> float:
    """The highest threshold (0.05-0.5) at which validation sensitivity is still >= ``min_sens``
    (screening: a missed cancer costs more than a referral)."""
    best = 0.05
    for t in np.arange(0.05, 0.501, 0.01):
        if (p_mal[is_mal] >= t).mean() >= min_sens:
            best = round(float(t), 2)
    return best


def _foreign_samples(name: str, split: str, n: int, seed: int = 0):
    """Up to ``n`` images of another analyzer's dataset split (root, samples)."""
    r = RECIPES[name]
    root = data_root(name)
    base = root / r["subdir"] if r.get("subdir") else root
    if not base.is_dir():
        raise SystemExit(f"the modality gate is fitted against {name}'s training images, expected at {base}")
    samples = manifest_samples(load_manifest(r["manifest"]), split)
    if len(samples) > n:
        idx = np.random.default_rng(seed).choice(len(samples), n, replace=False)
        samples = [samples[i] for i in sorted(idx)]
    return base, samples


def fit_gate(an, tr: dict, va: dict, negatives: list[str], n_train: int = 600, n_val: int = 200) -> tuple[dict, dict]:
    """Modality gate: logistic regression, own training images against other analyzers' *training*
    images (never their test images, on which it is evaluated). Threshold: 99.5th percentile of
    the foreign probability on own validation images."""
    from sklearn.linear_model import LogisticRegression

    neg_tr, neg_va = [], {}
    for name in negatives:
        base, samples = _foreign_samples(name, "train", n_train)
        e = embed_split(an, base, samples, labelled=False)
        neg_tr.append(gate_features(e["ood"], e["embedding"]))
        base, samples = _foreign_samples(name, "val", n_val, seed=1)
        e = embed_split(an, base, samples, labelled=False)
        neg_va[name] = gate_features(e["ood"], e["embedding"])
    pos = gate_features(tr["ood"], tr["embedding"])
    x = np.concatenate([pos, *neg_tr])
    y = np.concatenate([np.zeros(len(pos)), np.ones(len(x) - len(pos))])
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    clf = LogisticRegression(C=0.05, class_weight="balanced", max_iter=2000).fit((x - mean) / scale, y)
    coef, intercept = clf.coef_[0], float(clf.intercept_[0])
    fitted = {"gate_mean": mean, "gate_scale": scale, "gate_coef": coef, "gate_intercept": intercept}
    own_val = gate_probability(gate_features(va["ood"], va["embedding"]), fitted)
    thr = float(min(0.99, max(0.5, np.quantile(own_val, 0.995))))
    stats = {"gate_mean": mean.astype(np.float32), "gate_scale": scale.astype(np.float32),
             "gate_coef": coef.astype(np.float32), "gate_intercept": np.float32(intercept)}
    info = {"method": "logistic regression on block-10 channel statistics + pooled embedding: own training images "
                      "against other analyzers' training images", "negatives": negatives,
            "n_train": {"own": int(len(pos)), "foreign": int(len(x) - len(pos))},
            "threshold": round(thr, 4), "threshold_rule": "99.5th percentile (at least 0.5) of own validation images",
            "val_own_flagged": float((own_val > thr).mean()),
            "val_foreign_flagged": {k: float((gate_probability(v, fitted) > thr).mean()) for k, v in neg_va.items()}}
    return stats, info


def calibrate(analyzer_id: str, root: Path, recipe: dict, work_dir: Path, model_dir: Path) -> dict:
    manifest = load_manifest(recipe["manifest"])
    base = Path(root) / recipe["subdir"] if recipe.get("subdir") else Path(root)
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("calibration", None)
    cfg_path.write_text(json.dumps(cfg, indent=1))
    an = registry.get(analyzer_id, model_dir=model_dir)
    tr = embed_split(an, base, manifest_samples(manifest, "train"))
    va = embed_split(an, base, manifest_samples(manifest, "val"))
    bias = None
    if recipe.get("calibrate_bias"):
        temp, bias = fit_temperature_and_bias(va["logits"], va["y"])
    else:
        temp = fit_temperature(va["logits"], va["y"])
    means, precision = fit_ood(tr["ood"])
    gate_stats, gate_info = fit_gate(an, tr, va, recipe["ood_gate_negatives"]) if recipe.get("ood_gate_negatives") \
        else ({}, None)
    np.savez_compressed(model_dir / "ood.npz", means=means.astype(np.float32), precision=precision.astype(np.float32),
                        **gate_stats)
    va_scores = nearest_distance(va["ood"], whitening(means, precision))
    ood_thr = float(np.quantile(va_scores, 0.995))
    probs = softmax(va["logits"] / temp + (bias if bias is not None else 0.0))
    unc = choose_uncertain(probs, va["y"])
    mal_idx = [i for i, l in enumerate(an.labels) if l in an.malignant_labels]
    p_mal = probs[:, mal_idx].sum(axis=1)
    is_mal = np.isin(va["y"], mal_idx)
    rule = recipe.get("operating_point", {"rule": "specificity", "min": 0.98})
    if rule["rule"] == "sensitivity":
        mal_thr = choose_sensitive_threshold(p_mal, is_mal, rule["min"])
        rule_text = (f"highest threshold (0.05-0.5) with validation {an.positive_term} sensitivity >= {rule['min']}")
    else:
        mal_thr = choose_malignant_threshold(p_mal, is_mal, rule["min"])
        rule_text = f"lowest threshold (0.05-0.5) with validation specificity >= {rule['min']}"
    noun = recipe.get("val_noun", "images")
    cal = {
        "temperature": round(temp, 4),
        **({"class_bias": [round(float(b), 4) for b in bias]} if bias is not None else {}),
        "uncertain_below": unc,
        "malignant_threshold": mal_thr,
        **({"malignant_threshold_rule": rule_text} if "operating_point" in recipe else {}),
        "ood": {"method": "Mahalanobis distance (Ledoit-Wolf covariance) of the channel mean/std of MBConv block "
                          "10's feature map", "input": OOD_INPUT, "stats": "ood.npz", "threshold": round(ood_thr, 3),
                "threshold_rule": f"99.5th percentile of validation {noun}",
                **({"gate": gate_info} if gate_info else {})},
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


def _positives(manifest: dict, split: str, malignant: set[str], sources: list[str], inside: bool) -> list[Sample]:
    """The split's positive images from (or, ``inside`` False, not from) the named sources."""
    files = manifest["files"]
    return [smp for smp in manifest_samples(manifest, split) if smp.label in malignant
            and source_matches(files[smp.path].get("source", manifest["dataset"]), sources) == inside]


def fit_type_domain(analyzer_id: str, root: Path, recipe: dict, model_dir: Path) -> dict:
    """Where the shipped model's type is worth suggesting: one Gaussian over the OOD features of the
    positive training images of the collections that have every type (``typed_sources``); the
    threshold is the 99th percentile of their validation images, so about 1 in 100 of them loses its
    type. Written into ``ood.npz`` and the config's ``calibration.type_domain``."""
    if "ood" not in json.loads((model_dir / "config.json").read_text()).get("calibration", {}):
        raise SystemExit(f"{model_dir} has no out-of-domain calibration, which the type domain is measured on: "
                         "run --stage calibrate first")
    manifest = load_manifest(recipe["manifest"])
    base = Path(root) / recipe["subdir"] if recipe.get("subdir") else Path(root)
    an = registry.get(analyzer_id, model_dir=model_dir)
    typed = list(recipe["typed_sources"])
    mal = an.malignant_labels
    tr = embed_split(an, base, _positives(manifest, "train", mal, typed, True))
    va = embed_split(an, base, _positives(manifest, "val", mal, typed, True))
    others = _positives(manifest, "val", mal, typed, False)
    mean, precision = fit_ood(tr["ood"])
    reference = whitening(mean, precision)
    d_va = nearest_distance(va["ood"], reference)
    threshold = float(np.quantile(d_va, 0.99))
    kept = d_va <= threshold
    right = (va["logits"] / an.temperature + an.class_bias).argmax(1) == va["y"]  # the served, calibrated class
    validation = {"typed_images": int(len(d_va)), "typed_kept": round(float(kept.mean()), 4),
                  "type_accuracy_kept": round(float(right[kept].mean()), 4),
                  "type_accuracy_all": round(float(right.mean()), 4)}
    if others:
        d_other = nearest_distance(embed_split(an, base, others)["ood"], reference)
        validation.update(other_images=len(others), other_withheld=round(float((d_other > threshold).mean()), 4))
    stats_path = model_dir / "ood.npz"
    arrays = dict(np.load(stats_path)) if stats_path.exists() else {}  # a refit replaces its own arrays only
    arrays.update(type_mean=mean.astype(np.float32), type_precision=precision.astype(np.float32))
    np.savez_compressed(stats_path, **arrays)
    section = {"method": "Mahalanobis distance (Ledoit-Wolf covariance) of the out-of-domain features to the positive "
                         "training images of the collections with every type",
               "stats": "ood.npz", "threshold": round(threshold, 3), "sources": typed,
               "threshold_rule": "99th percentile of those collections' positive validation images",
               "reference_n": int(len(tr["y"])), "validation": validation}
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("calibration", {})["type_domain"] = section
    cfg_path.write_text(json.dumps(cfg, indent=1))
    registry.clear()
    return section
