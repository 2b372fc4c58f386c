"""The one interface every analyzer implements: ``analyze(image) -> AnalysisResult``.

An analyzer travels with its preprocessing, label names, which labels are
malignant, calibration and report wording (all in its model folder's
``config.json``, parsed once into an :class:`~.config.AnalyzerConfig`), like a
timm model travels with its pretrained config.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..imaging.imageio import ImageLoadError, LoadedImage, load_image
from .config import SHARED_CLASS_INFO, AnalyzerConfig, ClassInfo

STATUS_OK = "ok"
STATUS_UNCERTAIN = "uncertain"
STATUS_OOD = "out_of_domain"
STATUS_ERROR = "error"
STATUSES = (STATUS_OK, STATUS_UNCERTAIN, STATUS_OOD, STATUS_ERROR)


@dataclass(frozen=True)
class ModelInfo:
    id: str
    version: str
    sha256: str  # combined digest of the model files that produced the result

    def to_dict(self) -> dict:
        return {"id": self.id, "version": self.version, "sha256": self.sha256}


@dataclass
class AnalysisResult:
    analyzer_id: str
    status: str
    model: ModelInfo | None = None
    label: str | None = None
    label_display: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    confidence: float | None = None
    malignant: bool | None = None
    malignant_probability: float | None = None
    cells: list[dict] = field(default_factory=list)
    mask: np.ndarray | None = None  # instance labels (H, W) int32 at the input image size
    heatmap: np.ndarray | None = None  # Grad-CAM (H, W) float32 in [0, 1] at the input image size
    ood_score: float | None = None
    messages: list[str] = field(default_factory=list)
    error: str | None = None
    image_size: tuple[int, int] | None = None  # (width, height) of the input
    analysis_scale: float = 1.0  # input pixels per mask/heatmap pixel (1.0 unless the input was very large)
    timings_ms: dict[str, float] = field(default_factory=dict)
    counts_cells: bool = True  # False for analyzers without cell segmentation: cell_count is then None
    # Analyzer-specific results, output at the top level of to_dict() (a differential's counts, scale)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def network_probabilities(self) -> dict[str, float]:
        """One probability per network output (a call without a type shows them summed)."""
        return self.extra.get("network_probabilities") or self.probabilities

    @property
    def cell_count(self) -> int | None:
        return len(self.cells) if self.counts_cells else None

    def to_dict(self, include_arrays: bool = False) -> dict[str, Any]:
        d = {
            "analyzer": self.analyzer_id,
            "status": self.status,
            "label": self.label,
            "label_display": self.label_display,
            "probabilities": {k: round(float(v), 6) for k, v in self.probabilities.items()},
            "confidence": None if self.confidence is None else round(float(self.confidence), 6),
            "malignant": self.malignant,
            "malignant_probability": None if self.malignant_probability is None else round(float(self.malignant_probability), 6),
            "cell_count": self.cell_count,
            "cells": self.cells,
            "ood_score": None if self.ood_score is None else round(float(self.ood_score), 4),
            "messages": list(self.messages),
            "error": self.error,
            "image_size": list(self.image_size) if self.image_size else None,
            "analysis_scale": self.analysis_scale,
            "model": self.model.to_dict() if self.model else None,
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
        }
        for k, v in self.extra.items():
            d.setdefault(k, v)  # never shadows a common key
        if include_arrays:
            d["mask"] = self.mask
            d["heatmap"] = self.heatmap
        return d

    @classmethod
    def failed(cls, analyzer_id: str, message: str, model: ModelInfo | None = None,
               counts_cells: bool = True) -> "AnalysisResult":
        return cls(analyzer_id=analyzer_id, status=STATUS_ERROR, error=message, model=model, messages=[message],
                   counts_cells=counts_cells)


class Analyzer:
    """Base class. Subclasses implement :meth:`_analyze_rgb`."""

    id: str = ""
    counts_cells: bool = True  # whether results carry a cell count (analyzers that segment cells)
    makes_heatmap: bool = True  # whether results carry a Grad-CAM heatmap (pages show its panel)

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        # parsed and checked once, here: a broken config.json stops the start with an AnalyzerConfigError
        # naming the file and the key, never a KeyError in the middle of a request
        try:
            self.config: AnalyzerConfig = AnalyzerConfig.load(self.model_dir)
        except FileNotFoundError as exc:  # no config.json at all
            raise FileNotFoundError(f"analyzer {self.id}: {exc}") from None
        cfg = self.config
        if cfg.id is not None and cfg.id != self.id:
            raise cfg.error("id", f"is {cfg.id!r}, but this folder is being loaded as analyzer {self.id!r}")
        # The attributes below are what pages, reports and stores read (plain lists, sets and dicts,
        # as describe() returns them); their values come from the typed config only.
        self.name: str = cfg.name
        self.version: str = cfg.version
        self.modality: str = cfg.modality
        self.labels: list[str] = list(cfg.labels)
        self.display_names: dict[str, str] = dict(cfg.display_names)
        self.malignant_labels: set[str] = set(cfg.malignant_labels)  # network outputs that make the positive call
        # the untyped call (positive, its type withheld) is no network output: ``labels`` index the
        # probabilities; ``call_labels`` are every call a result or a reader can make, ``positive_calls``
        # the positive ones
        self.untyped_label: str | None = cfg.untyped_label
        self.call_labels: list[str] = self.labels + ([cfg.untyped_label] if cfg.untyped_label else [])
        self.positive_calls: set[str] = self.malignant_labels | ({cfg.untyped_label} if cfg.untyped_label else set())
        self.report_wording: dict[str, str] = cfg.report_wording.as_dict()
        # What the analyzer expects to see, what its positive call is called, and what an image is
        # called in its field (used in messages, pages and reports: no analyzer-specific text elsewhere).
        self.input_description: str = cfg.input_description
        self.positive_term: str = cfg.positive_term
        self.image_noun: str = cfg.image_noun
        # DICOM modalities accepted (empty: any); a DICOM file of another modality is out of domain.
        self.dicom_modalities: list[str] = list(cfg.dicom_modalities)
        self.model_info = ModelInfo(self.id, self.version, self._digest())

    def _digest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.config.files) + ["config.json"]:
            p = self.model_dir / name
            h.update(name.encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
        return h.hexdigest()

    @functools.cached_property
    def model_card(self) -> dict | None:
        """The evaluation card shipped beside the weights (read once per analyzer instance)."""
        path = self.model_dir / "model_card.json"
        return json.loads(path.read_text()) if path.exists() else None

    def validation_summary(self) -> str:
        """One line of the card's test figures, for pages, API and reports."""
        card = self.model_card
        if not card:
            return "No validation figures recorded."
        m = card["test"]["metrics"]
        mb = m["malignant_vs_benign"]
        held_out = card.get("data", {}).get("held_out", "slide blocks held out")
        term = "malignant" if self.positive_term == "malignancy" else self.positive_term
        return (f"Test split (n={m['n']}, {held_out}): accuracy {100 * m['accuracy']:.1f}%, "
                f"{term} sensitivity {100 * mb['sensitivity']:.1f}%, specificity {100 * mb['specificity']:.1f}%, "
                f"ECE {m['ece']:.3f}")

    def describe(self) -> dict:
        return {"id": self.id, "name": self.name, "version": self.version, "modality": self.modality,
                "labels": self.labels, "display_names": self.display_names,
                "malignant_labels": sorted(self.malignant_labels), "untyped_label": self.untyped_label,
                "positive_term": self.positive_term,
                "input_description": self.input_description, "dicom_modalities": self.dicom_modalities,
                "sha256": self.model_info.sha256}

    def interpretation(self, label: str | None) -> str | None:
        """The analyzer's report sentence for an AI label (its ``report_wording``), or None."""
        if label not in self.call_labels:
            return None
        wording = self.config.report_wording
        if label == self.untyped_label and wording.untyped:
            return wording.untyped
        template = wording.malignant if label in self.positive_calls else wording.benign
        return template.format(label=self.config.display_name(label)) if template else None

    def class_info(self, label: str | None) -> ClassInfo | None:
        """What a diagnosis code (or a reported cell class) means, what usually confirms it and when to
        refer, with references (the model folder's ``class_info.json``); None when nothing is written."""
        if label in SHARED_CLASS_INFO:
            return SHARED_CLASS_INFO[label]
        return self.config.class_info.get(label) if label else None

    @property
    def described_classes(self) -> list[str]:
        """The labels that have a class page: the call labels, reported cell classes, then the shared ones."""
        return list(self.config.class_info) + list(SHARED_CLASS_INFO) if self.config.class_info else []

    def dicom_mismatch(self, loaded: LoadedImage) -> str | None:
        """Why a DICOM file rules itself out for this analyzer by what it says it is (None when it does
        not): another modality, body part, slice plane or kind of series than the model was trained on."""
        meta = loaded.dicom
        if meta is None:
            return None
        reads = f"{self.name} reads {self.input_description}s"
        modality = getattr(meta, "modality", "")
        if modality and self.dicom_modalities and modality not in self.dicom_modalities:
            return (f"This DICOM file is modality {modality}; {reads} (DICOM modality "
                    f"{', '.join(self.dicom_modalities)}). No diagnosis is given.")
        checks = self.config.dicom_checks
        body_part = getattr(meta, "body_part", "")
        if body_part and checks.body_parts and body_part not in checks.body_parts:
            return (f"This DICOM file shows body part {body_part}; {reads} (body part "
                    f"{', '.join(checks.body_parts)}). No diagnosis is given.")
        plane = getattr(meta, "plane", "")
        if plane and checks.planes and plane not in checks.planes:
            return (f"This slice is {plane}; {reads} in the {', '.join(checks.planes)} planes only, as trained. "
                    "No diagnosis is given.")
        words = set(re.findall(r"[A-Z0-9]+", getattr(meta, "acquisition", "").upper()))
        refused = [w for w in checks.refused_words if w in words]
        b_value = getattr(meta, "b_value", None)
        if checks.refuse_diffusion and b_value:
            refused.append(f"b-value {b_value:g}")
        if refused:
            return (f"This series is not a kind the model was trained on ({', '.join(refused)}: "
                    f"'{getattr(meta, 'acquisition', '')}'); {reads}. No diagnosis is given.")
        return None

    def analyze(self, image) -> AnalysisResult:
        """``image``: path, bytes, file object, RGB uint8 array or LoadedImage. Never raises on bad input."""
        try:
            if isinstance(image, np.ndarray):
                return self._analyze_rgb(_array_to_rgb(image))
            loaded = image if isinstance(image, LoadedImage) else load_image(image)
        except ImageLoadError as exc:
            return AnalysisResult.failed(self.id, str(exc), self.model_info, self.counts_cells)
        why = self.dicom_mismatch(loaded)
        if why:
            h, w = loaded.rgb.shape[:2]
            return AnalysisResult(analyzer_id=self.id, status=STATUS_OOD, model=self.model_info, messages=[why],
                                  image_size=(w, h), counts_cells=self.counts_cells)
        return self._analyze_rgb(loaded.rgb)

    def _analyze_rgb(self, rgb: np.ndarray) -> AnalysisResult:  # pragma: no cover - abstract
        raise NotImplementedError


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ImageLoadError(f"Expected an (H, W, 3) image array, got shape {arr.shape}.")
    if arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        if a.max() <= 1.0:
            a = a * 255.0
        arr = np.clip(a, 0, 255).astype(np.uint8)
    if min(arr.shape[:2]) < 16:
        raise ImageLoadError(f"The image is {arr.shape[1]}x{arr.shape[0]} pixels; at least 16x16 is needed.")
    return np.ascontiguousarray(arr)


class SessionPool:
    """ONNX Runtime sessions loaded once per process; ``run`` is safe from many threads."""

    def __init__(self, path: Path, threads: int = 2):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # An analysis runs two or more networks in turn on a few cores: worker threads that keep
        # spinning after one network finishes take the cores the next network needs.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, {self.input_name: x})))
