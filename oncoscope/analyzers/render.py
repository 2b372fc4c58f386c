"""Render analysis overlays (cell mask outlines, Grad-CAM heatmap) as RGB arrays / PNG bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage as ndi


def _jet(v: np.ndarray) -> np.ndarray:
    """A perceptually ordered blue-cyan-yellow-red map for values in [0, 1] -> (H, W, 3) uint8."""
    v = np.clip(v, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def heatmap_overlay(rgb: np.ndarray, heatmap: np.ndarray | None, opacity: float = 0.45) -> np.ndarray:
    if heatmap is None:
        return rgb
    colour = _jet(heatmap).astype(np.float32)
    a = (opacity * np.clip(heatmap, 0.15, 1.0))[..., None]
    return (rgb.astype(np.float32) * (1 - a) + colour * a).astype(np.uint8)


def mask_overlay(rgb: np.ndarray, labels: np.ndarray | None, colour=(0, 200, 90), fill_opacity: float = 0.25) -> np.ndarray:
    if labels is None:
        return rgb
    out = rgb.astype(np.float32).copy()
    fg = labels > 0
    out[fg] = out[fg] * (1 - fill_opacity) + np.array(colour, np.float32) * fill_opacity
    # outlines: pixels whose label differs from a neighbour
    edge = np.zeros_like(fg)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge &= ndi.binary_dilation(fg)
    out[edge] = colour
    return out.astype(np.uint8)


def heatmap_rgba(heatmap: np.ndarray) -> np.ndarray:
    """Transparent PNG layer (for an opacity slider in the UI)."""
    rgba = np.zeros(heatmap.shape + (4,), np.uint8)
    rgba[..., :3] = _jet(heatmap)
    rgba[..., 3] = (np.clip(heatmap, 0, 1) * 255).astype(np.uint8)
    return rgba


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", compress_level=1)  # speed over size for working images
    return buf.getvalue()
