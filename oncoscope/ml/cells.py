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


def clean_binary(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Fill holes and drop components smaller than ``min_area`` pixels."""
    m = ndi.binary_fill_holes(mask.astype(bool))
    lab, n = ndi.label(m)
    if n == 0:
        return m
    sizes = ndi.sum(m, lab, index=np.arange(1, n + 1))
    keep = np.zeros(n + 1, bool)
    keep[1:] = sizes >= min_area
    return keep[lab]


def split_touching(mask: np.ndarray, min_distance: int) -> np.ndarray:
    """Label a binary mask, splitting touching round cells by a distance-transform watershed."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    dist = ndi.distance_transform_edt(mask)
    # Smooth the distance map so one cell gives one peak.
    dist_s = ndi.gaussian_filter(dist, sigma=max(1.0, min_distance / 4))
    lab_cc, _ = ndi.label(mask)
    peaks = peak_local_max(dist_s, min_distance=min_distance, labels=lab_cc, exclude_border=False,
                           threshold_abs=max(1.0, min_distance * 0.35))
    markers = np.zeros(mask.shape, np.int32)
    for i, (r, c) in enumerate(peaks, start=1):
        markers[r, c] = i
    # Components without any peak still need a marker.
    missing = set(range(1, lab_cc.max() + 1)) - set(np.unique(lab_cc[markers > 0]).tolist())
    nxt = len(peaks) + 1
    for comp in sorted(missing):
        rr, cc = np.nonzero(lab_cc == comp)
        k = int(np.argmax(dist[rr, cc]))
        markers[rr[k], cc[k]] = nxt
        nxt += 1
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
