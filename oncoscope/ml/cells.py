"""Cell mask post-processing and per-cell measurements (numpy/scipy/scikit-image only).

Used at serving time, so it must not import torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi


@dataclass(frozen=True)
class Cell:
    id: int
    area_px: float
    equivalent_diameter_px: float
    circularity: float
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in original image pixels
    centroid: tuple[float, float]  # x, y
    touches_border: bool

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bbox"] = list(self.bbox)
        d["centroid"] = [round(v, 1) for v in self.centroid]
        for k in ("area_px", "equivalent_diameter_px", "circularity"):
            d[k] = round(float(d[k]), 3)
        return d


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions that do not reach the image edge (as ``ndi.binary_fill_holes``, 3x faster)."""
    bg, n = ndi.label(~mask)
    edge = np.unique(np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]]))
    hole = np.ones(n + 1, bool)
    hole[edge] = False
    hole[0] = False
    return mask | hole[bg]


def clean_binary(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Fill holes and drop components smaller than ``min_area`` pixels."""
    m = fill_holes(mask.astype(bool))
    lab, n = ndi.label(m)
    if n == 0:
        return m
    keep = np.bincount(lab.ravel(), minlength=n + 1) >= min_area
    keep[0] = False
    return keep[lab]


def argmax_positions(values: np.ndarray, labels: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the largest value of each label in ``index``; ties go to the first in raster order.

    ``ndi.maximum_position`` does the same with a Python loop per label (6 ms for a dozen cells).
    """
    flat = labels.ravel()
    sel = np.flatnonzero(np.isin(flat, index))
    order = sel[np.lexsort((-values.ravel()[sel], flat[sel]))]
    _, first = np.unique(flat[order], return_index=True)
    return np.unravel_index(order[first], labels.shape)


def split_touching(mask: np.ndarray, min_distance: int) -> np.ndarray:
    """Label a binary mask, splitting touching round cells by a distance-transform watershed."""
    from skimage.segmentation import watershed

    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    dist = ndi.distance_transform_edt(mask)
    # Smooth the distance map so one cell gives one peak.
    dist_s = ndi.gaussian_filter(dist, sigma=max(1.0, min_distance / 4))
    lab_cc, n = ndi.label(mask)
    # Markers: maxima of the smoothed distance over a (2 min_distance + 1) window, one per plateau
    # (what skimage's peak_local_max finds here, without its per-label Python loop).
    window_max = ndi.maximum_filter(dist_s, size=2 * min_distance + 1, mode="constant")
    peak = (dist_s == window_max) & mask & (dist_s > max(1.0, min_distance * 0.35))
    plateaus, n_peaks = ndi.label(peak, structure=np.ones((3, 3), bool))
    markers = np.zeros(mask.shape, np.int32)
    if n_peaks:
        markers[argmax_positions(dist_s, plateaus, np.arange(1, n_peaks + 1))] = np.arange(1, n_peaks + 1)
    # Components without any peak still need a marker: their deepest pixel.
    has_marker = np.zeros(n + 1, bool)
    has_marker[lab_cc[markers > 0]] = True
    missing = np.flatnonzero(~has_marker[1:]) + 1
    if missing.size:
        markers[argmax_positions(dist, lab_cc, missing)] = np.arange(n_peaks + 1, n_peaks + 1 + missing.size)
    return watershed(-dist_s, markers, mask=mask).astype(np.int32)


def measure(labels: np.ndarray, scale_xy: tuple[float, float] = (1.0, 1.0)) -> list[Cell]:
    """Per-cell measurements; ``scale_xy`` converts label-grid pixels to original pixels."""
    from skimage.measure import regionprops

    sx, sy = scale_xy
    area_scale = sx * sy
    h, w = labels.shape
    cells = []
    for i, rp in enumerate(regionprops(labels), start=1):
        area = rp.area * area_scale
        perim = max(rp.perimeter * math.sqrt(area_scale), 1e-6)
        circ = min(1.0, 4 * math.pi * area / (perim * perim))
        r0, c0, r1, c1 = rp.bbox
        cy, cx = rp.centroid
        cells.append(Cell(
            id=i,
            area_px=area,
            equivalent_diameter_px=math.sqrt(4 * area / math.pi),
            circularity=circ,
            bbox=(int(round(c0 * sx)), int(round(r0 * sy)), int(round(c1 * sx)), int(round(r1 * sy))),
            centroid=(cx * sx, cy * sy),
            touches_border=bool(r0 == 0 or c0 == 0 or r1 == h or c1 == w),
        ))
    return cells


def postprocess(prob: np.ndarray, threshold: float = 0.5, min_area: int = 60, min_distance: int = 9) -> np.ndarray:
    """Probability map (H, W) -> instance label image (H, W) int32."""
    mask = clean_binary(prob >= threshold, min_area)
    return split_touching(mask, min_distance)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    u = (a | b).sum()
    return 1.0 if u == 0 else float((a & b).sum() / u)
