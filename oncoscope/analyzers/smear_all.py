"""``smear-all``: acute lymphoblastic leukemia on peripheral blood smear fields.

The shared classifier pipeline (:mod:`.classification`) plus cell segmentation:
U-Net cell probability -> instance split and per-cell measurements.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..ml.cells import measure, postprocess
from .base import AnalysisResult, SessionPool
from .classification import ImageClassifierAnalyzer
from .config import Segmenter

SEG_MAX_SIDE = 448
# Pro-B / Pre-B / Early Pre-B are immunophenotypic categories: morphology suggests, flow cytometry decides.
SUBTYPE_NOTE = ("The B-ALL subtype is a morphological suggestion only; flow cytometry decides the immunophenotype. "
                "The white-cell differential (smear-differential) is the screening result.")


class SmearAllAnalyzer(ImageClassifierAnalyzer):
    id = "smear-all"
    counts_cells = True

    def __init__(self, model_dir: Path, threads: int = 2):
        super().__init__(model_dir, threads)
        seg_path = self.model_dir / "segmenter.onnx"
        self.segmenter = SessionPool(seg_path, threads) if seg_path.exists() else None
        seg = self.config.segmenter or Segmenter()  # no "segmenter" block: the defaults
        self.seg_threshold = seg.threshold
        self.seg_min_area = seg.min_area_px
        self.seg_min_distance = seg.min_distance_px

    def segment(self, x: np.ndarray) -> np.ndarray:
        return self.segmenter.run(x)["cell_probability"]

    def extend(self, res: AnalysisResult, x: np.ndarray, rgb: np.ndarray, geometry: dict, timings: dict) -> None:
        if res.label in self.malignant_labels:
            res.messages.append(SUBTYPE_NOTE)
        if self.segmenter is None:
            return
        top, left, side, h, w = geometry["top"], geometry["left"], geometry["side"], geometry["h"], geometry["w"]
        oh, ow, back = geometry["oh"], geometry["ow"], geometry["back"]
        t2 = time.perf_counter()
        prob = self.segment(x)[0]
        timings["segment"] = (time.perf_counter() - t2) * 1e3
        t3 = time.perf_counter()
        # Threshold the probability map at (up to) SEG_MAX_SIDE px rather than at model size:
        # boundaries follow the input more closely. Size parameters are defined at model size.
        res_px = min(side, SEG_MAX_SIDE)
        f = res_px / self.size
        prob_r = prob if res_px == self.size else np.asarray(
            Image.fromarray(prob.astype(np.float32), "F").resize((res_px, res_px), Image.BILINEAR))
        labels_small = postprocess(prob_r, self.seg_threshold, max(1, round(self.seg_min_area * f * f)),
                                   max(1, round(self.seg_min_distance * f)))
        scale = side / res_px
        big = labels_small if res_px == side else np.asarray(
            Image.fromarray(labels_small).resize((side, side), Image.NEAREST))
        res.mask = np.ascontiguousarray(big[top:top + h, left:left + w]).astype(np.int32)
        cells = measure(labels_small, (scale * back, scale * back))
        for c in cells:  # shift into original image coordinates
            x0, y0, x1, y1 = c.bbox
            d = c.to_dict()
            tb, lb = top * back, left * back
            d["bbox"] = [max(0, round(x0 - lb)), max(0, round(y0 - tb)), min(ow, round(x1 - lb)), min(oh, round(y1 - tb))]
            d["centroid"] = [round(c.centroid[0] - lb, 1), round(c.centroid[1] - tb, 1)]
            res.cells.append(d)
        timings["postprocess"] = (time.perf_counter() - t3) * 1e3
