"""Serving-time scores from a model's outputs (numpy only): calibrated class probabilities and the
modality gate. Calibration *fits* these in training/calibrate.py; serving only applies them, so the
formula lives here once and both sides use it."""

from __future__ import annotations

import numpy as np


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def gate_features(ood_features: np.ndarray, embedding: np.ndarray) -> np.ndarray:
    """What the modality gate reads: block-10 channel statistics and the pooled embedding."""
    return np.concatenate([ood_features, embedding], axis=1).astype(np.float64)


def gate_probability(features: np.ndarray, gate: dict) -> np.ndarray:
    """The modality gate's probability that each image belongs to another analyzer; (N,).
    ``gate``: gate_mean, gate_scale, gate_coef, gate_intercept (as stored in ood.npz)."""
    z = ((features - gate["gate_mean"]) / gate["gate_scale"]) @ gate["gate_coef"] + gate["gate_intercept"]
    return 1.0 / (1.0 + np.exp(-z))


def is_blank(rgb: np.ndarray, min_std: float) -> bool:
    """Nearly uniform: the grey level's spread is under ``min_std`` (there is nothing to analyse)."""
    step = max(1, max(rgb.shape[:2]) // 512)  # a sample is enough for a spread, and fast on large images
    return float(rgb[::step, ::step].reshape(-1, 3).mean(axis=1).std()) < min_std


def whitening(means: np.ndarray, precision: np.ndarray) -> dict[str, np.ndarray]:
    """What :func:`nearest_distance` needs from class means and a shared precision matrix P: the
    Cholesky factor L of P (P = L L^T) and the means in that whitened space."""
    whiten = np.linalg.cholesky(np.asarray(precision, np.float64))
    return {"whiten": whiten, "means": np.asarray(means, np.float64) @ whiten}


def nearest_distance(emb: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """Mahalanobis distance of each embedding to the nearest class mean; (N,).

    d^2 = (e - m)^T P (e - m) = |(e - m) L|^2: one BLAS matrix product per batch instead of a
    quadratic form per embedding and class (16 ms per 1280-wide embedding in numpy)."""
    z = np.asarray(emb, np.float64) @ w["whiten"]
    m = w["means"]
    d2 = (z * z).sum(axis=1)[:, None] - 2 * z @ m.T + (m * m).sum(axis=1)[None]
    return np.sqrt(np.maximum(d2.min(axis=1), 0.0))
