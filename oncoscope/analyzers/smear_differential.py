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
from ..ml.scores import is_blank, nearest_distance, whitening
from .base import STATUS_OK, STATUS_OOD, STATUS_UNCERTAIN, AnalysisResult, Analyzer, SessionPool

GRAYSCALE_CHROMA = 4.0  # mean |R-G| + |G-B| under which an image has no stain colour at all
OOD_CELL_SHARE = 0.5  # an image where more than this share of the cells is unlike any trained cell is refused
BATCH = 64


class SmearDifferentialAnalyzer(Analyzer):
    id = "smear-differential"
    counts_cells = True
    makes_heatmap = False  # the evidence is each cell's class, shown cell by cell

    def __init__(self, model_dir: Path, threads: int = 2):
        super().__init__(model_dir)
        cells = self.config.cells
        if cells is None:
            raise self.config.error("cells", "missing (smear-differential classifies cells)")
        self.cells_cfg = cells
        self.decision = D.CellDecision(
            classes=cells.classes, served_as=dict(cells.served_as), temperature=cells.temperature,
            unidentified_below=cells.unidentified_below, blast_threshold=cells.blast_threshold,
            blast_borderline=cells.blast_borderline, normal_blast_rate=cells.normal_blast_rate,
            false_call_rate=cells.false_call_rate)
        self.session = SessionPool(self.model_dir / cells.classifier, threads)
        self.crop_px = self.config.preprocess.size
        self.mean = np.asarray(self.config.preprocess.mean, np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(self.config.preprocess.std, np.float32).reshape(1, 3, 1, 1)
        self.ood = self._load_ood()
        outputs = {o.name: o.shape for o in self.session.session.get_outputs()}
        width = outputs.get("logits", [None, None])[-1]  # read from the graph: no inference at start-up
        if width != len(cells.classes):  # checked once, at start-up, not in the middle of a request
            raise self.config.error("cells.classes", f"lists {len(cells.classes)} classes, but "
                                                     f"{cells.classifier} has {width} outputs")

    def _load_ood(self) -> dict | None:
        if self.cells_cfg.ood_stats is None:
            return None
        with np.load(self.model_dir / self.cells_cfg.ood_stats) as z:
            return whitening(z["means"], z["precision"])

    def classify_crops(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, S, S, 3) uint8 canonical crops -> (logits (N, K), Mahalanobis distance to the nearest
        trained class (N,), zeros without out-of-domain statistics)."""
        logits, dist = [], []
        for i in range(0, len(crops), BATCH):
            x = crops[i:i + BATCH].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
            out = self.session.run(np.ascontiguousarray((x - self.mean) / self.std))
            logits.append(out["logits"])
            dist.append(nearest_distance(out["embedding"], self.ood) if self.ood else np.zeros(len(x)))
        if not logits:
            return np.zeros((0, len(self.cells_cfg.classes)), np.float32), np.zeros(0)
        return np.concatenate(logits), np.concatenate(dist)

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
        return (f"New laboratory (leave one source out): blasts called blast or unidentified "
                f"{pct('all-idb2', 'blasts_blast_or_unidentified')} (all-idb2), "
                f"{pct('all-taleqani', 'blasts_blast_or_unidentified')} (all-taleqani); normal cells called blast "
                f"{pct('wbc-seg-tecom', 'normals_called_blast')} (wbc-seg-tecom). "
                f"Same-lab test (pbc): {pbc_text} accuracy on cells answered.")

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
            return self._refuse(res, why)
        det = wbc.detect(rgb)
        t1 = time.perf_counter()
        res.timings_ms["detect"] = (t1 - t0) * 1e3
        res.mask = det.labels
        if not det.cells:
            return self._no_cells(res, det)
        mpp = det.scale.microns_per_pixel
        crops = wbc.crop_cells(rgb, det.cells, mpp, self.crop_px, self.cells_cfg.field_um)
        t2 = time.perf_counter()
        res.timings_ms["crop"] = (t2 - t1) * 1e3
        logits, dist = self.classify_crops(crops)
        probs, names = D.reported_probabilities(logits, self.decision)
        classes = D.decide(probs, names, self.decision)
        unlike = dist > self.cells_cfg.ood_threshold if self.ood else np.zeros(len(classes), bool)
        classes = [D.UNIDENTIFIED if u else c for c, u in zip(classes, unlike)]
        res.timings_ms["classify"] = (time.perf_counter() - t2) * 1e3
        if unlike.mean() > OOD_CELL_SHARE:  # one odd object (a platelet, debris) beside a cell is not enough
            res.cells = [self._cell(c, cls, row, names, det.scale) for c, cls, row in zip(det.cells, classes, probs)]
            return self._refuse(res, f"{int(unlike.sum())} of {len(classes)} objects found do not look like any "
                                     "blood cell the model was trained on: this does not look like a stained blood "
                                     "smear at a usable magnification. No differential is given.")
        res.cells = [self._cell(c, cls, row, names, det.scale) for c, cls, row in zip(det.cells, classes, probs)]
        self._summarise(res, probs, names, det)
        res.timings_ms["total"] = (time.perf_counter() - t0) * 1e3
        return res

    def _refuse(self, res: AnalysisResult, why: str) -> AnalysisResult:
        res.status = STATUS_OOD
        res.messages.append(why)
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
        res.extra = {"microns_per_pixel": det.scale.microns_per_pixel or None, "scale_method": det.scale.method,
                     **D.summarise([], self.cells_cfg.count_target)}
        if det.scale.method != "red_cells":
            return self._refuse(res, "No blood cells were found (no white cells and no red cells): this does not "
                                     "look like a stained blood smear. No differential is given.")
        res.label, res.malignant = "no_blasts", False
        res.label_display = self.config.display_name("no_blasts")
        res.messages.append("No white cell in this field: nothing to count. Add more fields to reach the count "
                            f"target of {self.cells_cfg.count_target} white cells.")
        self._rejected(res, det)
        return res

    def _cell(self, c: wbc.Detection, cls: str, row: np.ndarray, names: list[str], scale: wbc.Scale) -> dict:
        # measurements only where the scale was measured (red cells, or given): with the white cell's own
        # size as the ruler, its diameter would be the assumption read back
        measured = scale.method in ("red_cells", "given")
        mpp = scale.microns_per_pixel
        area_um2 = c.area_px * mpp * mpp if measured else None
        finite = bool(np.isfinite(row).all())
        p_blast = float(row[names.index("blast")]) if finite and "blast" in names else None
        return {
            "class": cls,
            # an unidentified cell has no class to be sure of: its top probability would read as confidence
            "class_probability": round(float(row[names.index(cls)]), 4) if cls in names and finite else None,
            "probabilities": {n: round(float(p), 4) for n, p in zip(names, row)} if finite else {},
            "blast_probability": None if p_blast is None else round(p_blast, 4),
            "review": cls == D.UNIDENTIFIED or (p_blast is not None and p_blast >= self.decision.blast_borderline),
            "counted": not c.touches_border,
            "bbox": list(c.bbox),
            "centroid": [round(c.centroid[0], 1), round(c.centroid[1], 1)],
            "area_um2": None if area_um2 is None else round(area_um2, 1),
            "diameter_um": None if area_um2 is None else round(math.sqrt(4 * area_um2 / math.pi), 2),
            "circularity": round(c.circularity, 3),
            "touches_border": c.touches_border,
        }

    def _summarise(self, res: AnalysisResult, probs: np.ndarray, names: list[str], det: wbc.SmearDetections) -> None:
        cfg = self.cells_cfg
        # Cells cut by the image's edge are shown but not counted (CellaVision counts whole cells), unless
        # every cell is cut (a tight single-cell crop).
        if not any(c["counted"] for c in res.cells):
            for c in res.cells:
                c["counted"] = True  # the case's count reads the same flag, so both agree
        counted = [c for c in res.cells if c["counted"]]
        summary = D.summarise([c["class"] for c in counted], cfg.count_target)
        res.extra = {"microns_per_pixel": round(det.scale.microns_per_pixel, 4), "scale_method": det.scale.method,
                     **summary}
        call = D.blast_call(summary, self.decision)
        res.malignant = call.present
        res.label = "blasts_present" if res.malignant else "no_blasts"
        res.label_display = self.config.display_name(res.label)
        # The call rests on a count, not on one probability: each cell carries its own blast probability,
        # and no "probability of malignancy" is made up for the field (reports would print it as one).
        res.malignant_probability = None
        res.extra["blast_calls_needed"] = call.needed
        res.confidence = None  # no one confidence for many cells: each cell carries its own
        self._messages(res, summary, call, probs, names)
        self._rejected(res, det)
        if det.scale.method == "white_cell_size":
            res.messages.append("No red cells to measure the scale: cells were brought to size by their own "
                                "diameter, so their size is not reported.")

    def _messages(self, res: AnalysisResult, summary: dict, call: D.BlastCall, probs: np.ndarray,
                  names: list[str]) -> None:
        unidentified = summary["differential"][D.UNIDENTIFIED]
        near = D.borderline(probs, names, self.decision)
        if unidentified:
            res.messages.append(f"{unidentified} cell(s) could not be classified with confidence (unidentified): "
                                "review them.")
        if near:
            res.messages.append(f"{near} cell(s) have a borderline blast probability: review them.")
        if call.short:
            res.messages.append(f"{call.blasts} cell(s) pre-classified as blast, fewer than the {call.needed} that "
                                f"make a blasts-present call among {summary['white_cells']} white cells: review them.")
        if unidentified or near or call.short:
            res.status = STATUS_UNCERTAIN
        if summary["remaining_to_target"]:
            res.messages.append(f"{summary['white_cells']} white cell(s) counted; {summary['remaining_to_target']} "
                                f"more needed for a {self.cells_cfg.count_target}-cell differential.")

    def _rejected(self, res: AnalysisResult, det: wbc.SmearDetections) -> None:
        if det.rejected:
            res.status = STATUS_UNCERTAIN if res.status == STATUS_OK else res.status
            res.messages.append(f"{det.rejected} stained object(s) too large for one white cell (clumps, smudge "
                                "cells or overlapping cells) were not classified: review the field.")
