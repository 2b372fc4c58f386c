"""Class activation maps from ONNX outputs (no torch needed at serving time).

For a head that is global-average-pooling followed by a linear layer,
``logit_c = sum_k w_ck * mean_ij A_k(i, j) + b_c``, so the Grad-CAM channel
weights (spatial mean of d logit_c / dA_k) are exactly ``w_ck / (H * W)``.
Grad-CAM is therefore ``relu(sum_k w_ck A_k) / (H * W)``; after min-max
normalisation it equals the CAM computed here. ``tests/ml/test_cam.py`` checks
this against MONAI's torch Grad-CAM on the same weights.
"""

from __future__ import annotations

import numpy as np


def cam(features: np.ndarray, head_weight: np.ndarray, class_idx: int | None = None,
        weights: np.ndarray | None = None) -> np.ndarray:
    """Raw Grad-CAM map (h, w) for one image: ``relu(sum_k w_ck A_k) / (h * w)``.

    ``features``: (C, h, w) last feature map; ``head_weight``: (n_classes, C). ``weights`` (C,), in
    place of a class's row: a contrast of classes (the map of a logit difference, by linearity).
    """
    c, h, w = features.shape
    vec = head_weight[class_idx] if weights is None else weights
    m = np.tensordot(vec.astype(np.float64), features.astype(np.float64), axes=(0, 0))
    return np.maximum(m, 0.0) / (h * w)


def contrast_weights(head_weight: np.ndarray, positive: list[int], negative: list[int]) -> np.ndarray:
    """Channel weights of "the positive classes against the negative ones" (mean logit of each group):
    a map of what speaks for the positive call, whichever of its classes is on top."""
    return head_weight[positive].mean(axis=0) - head_weight[negative].mean(axis=0)


def upsample_bilinear(m: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (same as torch ``align_corners=False``)."""
    in_h, in_w = m.shape

    def axis(n_out, n_in):
        x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        x = np.clip(x, 0, None)
        x0 = np.minimum(np.floor(x).astype(int), n_in - 1)
        x1 = np.minimum(x0 + 1, n_in - 1)
        return x0, x1, x - x0

    y0, y1, fy = axis(out_h, in_h)
    x0, x1, fx = axis(out_w, in_w)
    top = m[y0][:, x0] * (1 - fx) + m[y0][:, x1] * fx
    bot = m[y1][:, x0] * (1 - fx) + m[y1][:, x1] * fx
    return top * (1 - fy)[:, None] + bot * fy[:, None]


def normalise01(m: np.ndarray) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    if hi - lo < 1e-12:
        return np.zeros_like(m, dtype=np.float32)
    return ((m - lo) / (hi - lo)).astype(np.float32)


def heatmap(features: np.ndarray, head_weight: np.ndarray, class_idx: int | None, out_h: int, out_w: int,
            weights: np.ndarray | None = None) -> np.ndarray:
    """Grad-CAM heatmap in [0, 1] at (out_h, out_w): upsample, then min-max (as MONAI does)."""
    return normalise01(upsample_bilinear(cam(features, head_weight, class_idx, weights), out_h, out_w))
