"""``smear-all``: acute lymphoblastic leukemia on peripheral blood smear fields.

Pipeline (all ONNX Runtime + numpy, no torch):
pad to square with the background colour -> resize to the model size ->
classifier (logits, last feature map, embedding) -> temperature-scaled
probabilities -> out-of-domain score (Mahalanobis distance of the embedding to
the training classes) -> status -> U-Net cell probability -> instance split
and per-cell measurements -> Grad-CAM heatmap.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..ml import cam as cam_mod
from ..ml.cells import measure, postprocess
from .base import (STATUS_OK, STATUS_OOD, STATUS_UNCERTAIN, AnalysisResult, Analyzer, SessionPool)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def pad_to_square(rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad with the median border colour; returns the square image and the (top, left) offset."""
    h, w = rgb.shape[:2]
    if h == w:
        return rgb, (0, 0)
    s = max(h, w)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    colour = np.median(border, axis=0).astype(np.uint8)
    out = np.empty((s, s, 3), np.uint8)
    out[:] = colour
    top, left = (s - h) // 2, (s - w) // 2
    out[top:top + h, left:left + w] = rgb
    return out, (top, left)


MAX_WORKING_SIDE = 4096
SEG_MAX_SIDE = 448


class SmearAllAnalyzer(Analyzer):
    id = "smear-all"

    def __init__(self, model_dir: Path, threads: int = 2):
        super().__init__(model_dir)
        pre = self.config["preprocess"]
        self.size = int(pre["size"])
        self.mean = np.array(pre["mean"], np.float32).reshape(1, 3, 1, 1)
        self.std = np.array(pre["std"], np.float32).reshape(1, 3, 1, 1)
        self.classifier = SessionPool(self.model_dir / "classifier.onnx", threads)
        seg_path = self.model_dir / "segmenter.onnx"
        self.segmenter = SessionPool(seg_path, threads) if seg_path.exists() else None
        head = np.load(self.model_dir / "head.npz")
        self.head_weight = head["weight"]
        cal = self.config.get("calibration", {})
        self.temperature = float(cal.get("temperature", 1.0))
        self.uncertain_below = float(cal.get("uncertain_below", 0.0))
        self.malignant_threshold = float(cal.get("malignant_threshold", 0.5))
        ood = cal.get("ood")
        self.ood_threshold = None
        if ood:
            st = np.load(self.model_dir / ood["stats"])
            self.ood_means = st["means"].astype(np.float64)
            self.ood_precision = st["precision"].astype(np.float64)
            self.ood_threshold = float(ood["threshold"])
            self.ood_input = ood.get("input", "embedding")
        seg = self.config.get("segmenter", {})
        self.seg_threshold = float(seg.get("threshold", 0.5))
        self.seg_min_area = int(seg.get("min_area_px", 60))
        self.seg_min_distance = int(seg.get("min_distance_px", 9))
        self.blank_std = float(self.config.get("blank_image_std", 2.0))

    # -- pieces reused by evaluation -------------------------------------------------
    def preprocess(self, rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int], int]:
        sq, offset = pad_to_square(rgb)
        small = np.asarray(Image.fromarray(sq).resize((self.size, self.size), Image.BILINEAR), np.float32) / 255.0
        x = (small.transpose(2, 0, 1)[None] - self.mean) / self.std
        return np.ascontiguousarray(x, dtype=np.float32), offset, sq.shape[0]

    def ood_score(self, embedding: np.ndarray) -> np.ndarray:
        """Minimum Mahalanobis distance (shared covariance) to the reference means; (N,)."""
        e = embedding.astype(np.float64)
        d = e[:, None, :] - self.ood_means[None]  # (N, C, D)
        m = np.einsum("ncd,de,nce->nc", d, self.ood_precision, d)
        return np.sqrt(np.maximum(m.min(axis=1), 0.0))

    def classify_batch(self, x: np.ndarray) -> dict[str, np.ndarray]:
        out = self.classifier.run(x)
        out["probabilities"] = softmax(out["logits"].astype(np.float64) / self.temperature)
        if self.ood_threshold is not None:
            out["ood_score"] = self.ood_score(out[self.ood_input])
        return out

    def decide(self, probs: np.ndarray, ood_score: float | None) -> tuple[str, list[str], float, bool]:
        """Status and messages for one image from calibrated probabilities and OOD score."""
        msgs = []
        conf = float(probs.max())
        mal_idx = [i for i, l in enumerate(self.labels) if l in self.malignant_labels]
        p_mal = float(probs[mal_idx].sum())
        malignant = p_mal >= self.malignant_threshold
        label = self.labels[int(probs.argmax())]
        if ood_score is not None and self.ood_threshold is not None and ood_score > self.ood_threshold:
            msgs.append("This image does not look like a peripheral blood smear field the model was trained on "
                        f"(out-of-domain score {ood_score:.1f} > {self.ood_threshold:.1f}). No diagnosis is given.")
            return STATUS_OOD, msgs, p_mal, malignant
        status = STATUS_OK
        if conf < self.uncertain_below:
            status = STATUS_UNCERTAIN
            msgs.append(f"The model is unsure (top probability {conf:.0%} < {self.uncertain_below:.0%}): refer for review.")
        if (label in self.malignant_labels) != malignant:
            status = STATUS_UNCERTAIN
            msgs.append("The top class and the malignant/benign call disagree: refer for review.")
        return status, msgs, p_mal, malignant

    def segment(self, x: np.ndarray) -> np.ndarray:
        return self.segmenter.run(x)["cell_probability"]

    # -- the interface ---------------------------------------------------------------
    def _analyze_rgb(self, rgb: np.ndarray) -> AnalysisResult:
        t = {}
        t0 = time.perf_counter()
        oh, ow = rgb.shape[:2]
        res = AnalysisResult(analyzer_id=self.id, status=STATUS_OK, model=self.model_info, image_size=(ow, oh))
        # Very large fields are analysed at a working size (the networks see self.size px anyway);
        # masks/heatmaps are returned at that size and cell measurements in original pixels.
        back = 1.0
        if max(oh, ow) > MAX_WORKING_SIDE:
            back = max(oh, ow) / MAX_WORKING_SIDE
            rgb = np.asarray(Image.fromarray(rgb).resize((max(1, round(ow / back)), max(1, round(oh / back))),
                                                         Image.BILINEAR))
            res.messages.append(f"Large image: masks and heatmap are at {rgb.shape[1]}x{rgb.shape[0]} px; "
                                "cell measurements are in original pixels.")
        res.analysis_scale = back
        h, w = rgb.shape[:2]
        gray_std = float(rgb.reshape(-1, 3).mean(axis=1).std())
        if gray_std < self.blank_std:
            res.status = STATUS_OOD
            res.messages.append("The image is blank or nearly uniform: there is nothing to analyse.")
            return res
        x, (top, left), side = self.preprocess(rgb)
        t["preprocess"] = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        out = self.classify_batch(x)
        t["classify"] = (time.perf_counter() - t1) * 1e3
        probs = out["probabilities"][0]
        ood = float(out["ood_score"][0]) if "ood_score" in out else None
        status, msgs, p_mal, malignant = self.decide(probs, ood)
        res.status, res.ood_score = status, ood
        res.messages = msgs + res.messages
        res.probabilities = {l: float(p) for l, p in zip(self.labels, probs)}
        res.confidence = float(probs.max())
        if status == STATUS_OOD:
            res.timings_ms = t
            return res
        k = int(probs.argmax())
        res.label = self.labels[k]
        res.label_display = self.display_names.get(res.label, res.label)
        res.malignant, res.malignant_probability = malignant, p_mal
        if self.segmenter is not None:
            t2 = time.perf_counter()
            prob = self.segment(x)[0]
            t["segment"] = (time.perf_counter() - t2) * 1e3
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
            t["postprocess"] = (time.perf_counter() - t3) * 1e3
        t4 = time.perf_counter()
        hm = cam_mod.heatmap(out["features"][0], self.head_weight, k, self.size, self.size)
        hm_big = np.asarray(Image.fromarray(hm, "F").resize((side, side), Image.BILINEAR), np.float32)
        res.heatmap = np.clip(hm_big[top:top + h, left:left + w], 0.0, 1.0)
        t["heatmap"] = (time.perf_counter() - t4) * 1e3
        t["total"] = (time.perf_counter() - t0) * 1e3
        res.timings_ms = t
        return res
