"""``smear-differential``: find, measure and classify every white cell of a smear image from any lab.

Detection and physical scale come from :mod:`oncoscope.ml.wbc` (no training, so no laboratory's
look is learned); each cell is cut at one physical scale and classified by a network trained on
several laboratories; cells the network cannot place go to ``unidentified``, and an image with an
unidentified cell or a borderline blast is ``uncertain`` (referred), as on CellaVision.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from ..ml import differential as D
from ..ml import wbc
from ..ml.scores import is_blank
from .base import STATUS_OK, STATUS_OOD, STATUS_UNCERTAIN, AnalysisResult, Analyzer, SessionPool

GRAYSCALE_CHROMA = 4.0  # mean |R-G| + |G-B| under which an image has no stain colour at all
BATCH = 64


class SmearDifferentialAnalyzer(Analyzer):
    id = "smear-differential"
    counts_cells = True

    def __init__(self, model_dir: Path, threads: int = 2):
        super().__init__(model_dir)
        cells = self.config.cells
        if cells is None:
            raise self.config.error("cells", "missing (smear-differential classifies cells)")
        self.cells_cfg = cells
        self.decision = D.CellDecision(classes=cells.classes, served_as=dict(cells.served_as),
                                       temperature=cells.temperature, unidentified_below=cells.unidentified_below,
                                       blast_threshold=cells.blast_threshold, blast_borderline=cells.blast_borderline)
        self.session = SessionPool(self.model_dir / cells.classifier, threads)
        self.crop_px = self.config.preprocess.size
        self.mean = np.asarray(self.config.preprocess.mean, np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(self.config.preprocess.std, np.float32).reshape(1, 3, 1, 1)

    def validation_summary(self) -> str:
        """One line of the card's figures for a laboratory the model never saw (leave one source out)."""
        card = self.model_card
        if not card:
            return "No validation figures recorded."
        loso = card.get("leave_one_source_out", {})

        def pct(source: str, key: str) -> str:
            v = (loso.get(source, {}).get(key) or {}).get("value")
            return "n/a" if v is None else f"{100 * v:.1f}%"

        pbc = ((card.get("test_in_source", {}).get("pbc") or {}).get("accuracy_answered") or {}).get("value")
        pbc_text = "n/a" if pbc is None else f"{100 * pbc:.1f}%"
        idb2 = pct("all-idb2", "blasts_blast_or_unidentified")
        taleqani = pct("all-taleqani", "blasts_blast_or_unidentified")
        tecom = pct("wbc-seg-tecom", "normals_called_blast")
        return (f"New laboratory (leave one source out): blasts called blast or unidentified {idb2} (all-idb2), "
                f"{taleqani} (all-taleqani); normal cells called blast {tecom} (wbc-seg-tecom). "
                f"Same-lab test (pbc): {pbc_text} accuracy on cells answered.")

    def classify_crops(self, crops: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 canonical crops -> (N, K) logits."""
        out = []
        for i in range(0, len(crops), BATCH):
            x = crops[i:i + BATCH].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
            out.append(self.session.run(np.ascontiguousarray((x - self.mean) / self.std))["logits"])
        return np.concatenate(out) if out else np.zeros((0, len(self.cells_cfg.classes)), np.float32)

    def analyze(self, image) -> AnalysisResult:
        """As every analyzer, plus the differential's keys on every result (null where nothing was counted)."""
        res = super().analyze(image)
        for key, empty in (("microns_per_pixel", None), ("scale_method", None), ("differential", {}),
                           ("blast_fraction", None), ("white_cells", 0)):
            res.extra.setdefault(key, empty)
        return res

    def _analyze_rgb(self, rgb: np.ndarray) -> AnalysisResult:
        t0 = time.perf_counter()
        h, w = rgb.shape[:2]
        res = AnalysisResult(analyzer_id=self.id, status=STATUS_OK, model=self.model_info, image_size=(w, h))
        why = self._not_a_smear(rgb)
        if why:
            res.status = STATUS_OOD
            res.messages.append(why)
            return res
        det = wbc.detect(rgb)
        t1 = time.perf_counter()
        res.timings_ms["detect"] = (t1 - t0) * 1e3
        if not det.cells:
            return self._no_cells(res, det)
        mpp = det.scale.microns_per_pixel
        crops = np.stack([wbc.crop_cell(rgb, c, mpp, self.crop_px, self.cells_cfg.field_um) for c in det.cells])
        t2 = time.perf_counter()
        res.timings_ms["crop"] = (t2 - t1) * 1e3
        probs, names = D.reported_probabilities(self.classify_crops(crops), self.decision)
        classes = D.decide(probs, names, self.decision)
        res.timings_ms["classify"] = (time.perf_counter() - t2) * 1e3
        res.cells = [self._cell(c, cls, row, names, mpp) for c, cls, row in zip(det.cells, classes, probs)]
        res.mask = det.labels
        self._summarise(res, classes, probs, names, det)
        res.timings_ms["total"] = (time.perf_counter() - t0) * 1e3
        return res

    def _not_a_smear(self, rgb: np.ndarray) -> str | None:
        if is_blank(rgb, self.config.blank_image_std):
            return "The image is blank or nearly uniform: there is nothing to analyse."
        small = rgb[:: max(1, rgb.shape[0] // 256), :: max(1, rgb.shape[1] // 256)].astype(np.int16)
        chroma = float(np.mean(np.abs(small[..., 0] - small[..., 1]) + np.abs(small[..., 1] - small[..., 2])))
        if chroma < GRAYSCALE_CHROMA:
            return ("The image has no stain colour (grayscale); this analyzer reads Romanowsky-stained "
                    "blood smear images. No differential is given.")
        return None

    def _no_cells(self, res: AnalysisResult, det: wbc.SmearDetections) -> AnalysisResult:
        res.mask = det.labels
        res.extra = {"microns_per_pixel": det.scale.microns_per_pixel or None, "scale_method": det.scale.method,
                     **D.summarise([], self.cells_cfg.count_target)}
        if det.scale.method != "red_cells":
            res.status = STATUS_OOD
            res.messages.append("No blood cells were found (no white cells and no red cells): this does not look "
                                "like a stained blood smear. No differential is given.")
            return res
        res.label, res.malignant = "no_blasts", False
        res.label_display = self.config.display_name("no_blasts")
        res.messages.append("No white cell in this field: nothing to count. Add more fields to reach the count "
                            f"target of {self.cells_cfg.count_target} white cells.")
        return res

    def _cell(self, c: wbc.Detection, cls: str, row: np.ndarray, names: list[str], mpp: float) -> dict:
        area_um2 = c.area_px * mpp * mpp
        return {
            "class": cls,
            "class_probability": round(float(row[names.index(cls)]) if cls in names else float(row.max()), 4),
            "probabilities": {n: round(float(p), 4) for n, p in zip(names, row)},
            "bbox": list(c.bbox),
            "centroid": [round(c.centroid[0], 1), round(c.centroid[1], 1)],
            "area_um2": round(area_um2, 1),
            "diameter_um": round(math.sqrt(4 * area_um2 / math.pi), 2),
            "circularity": round(c.circularity, 3),
            "touches_border": c.touches_border,
        }

    def _summarise(self, res: AnalysisResult, classes: list[str], probs: np.ndarray, names: list[str],
                   det: wbc.SmearDetections) -> None:
        cfg = self.cells_cfg
        summary = D.summarise(classes, cfg.count_target)
        res.extra = {"microns_per_pixel": round(det.scale.microns_per_pixel, 4), "scale_method": det.scale.method,
                     **summary}
        n_blast = summary["differential"]["blast"]
        pb = probs[:, names.index("blast")] if "blast" in names else np.zeros(len(classes))
        res.malignant = n_blast >= cfg.blasts_present_min
        res.label = "blasts_present" if res.malignant else "no_blasts"
        res.label_display = self.config.display_name(res.label)
        res.malignant_probability = float(pb.max()) if len(pb) else 0.0
        res.confidence = float(np.mean(probs.max(axis=1))) if len(probs) else None
        res.probabilities = {"blasts_present": res.malignant_probability,
                             "no_blasts": 1.0 - res.malignant_probability}
        unidentified = summary["differential"][D.UNIDENTIFIED]
        near = D.borderline(probs, names, self.decision)
        if unidentified:
            res.messages.append(f"{unidentified} cell(s) could not be classified with confidence (unidentified): "
                                "review them.")
        if near:
            res.messages.append(f"{near} cell(s) have a borderline blast probability: review them.")
        if unidentified or near:
            res.status = STATUS_UNCERTAIN
        if summary["remaining_to_target"]:
            res.messages.append(f"{summary['white_cells']} white cell(s) counted; {summary['remaining_to_target']} more "
                                f"needed for a {cfg.count_target}-cell differential.")
