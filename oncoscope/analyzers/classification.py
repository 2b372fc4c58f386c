"""Image classifiers behind the analyzer interface: everything an ONNX
EfficientNet-style classifier needs to be served, shared by every analyzer.

Pipeline (ONNX Runtime + numpy, no torch): [luminance, for grayscale models] ->
pad to square with the border colour (aspect preserved) -> resize to the model
size -> classifier (logits, last feature map, embedding, out-of-domain
features) -> temperature-scaled probabilities -> out-of-domain score
(Mahalanobis distance) -> status -> Grad-CAM heatmap. An analyzer with more to
do (the smear analyzer segments cells) adds it in :meth:`extend`.

Everything specific to an analyzer (labels, which are malignant, what its input
looks like, thresholds, report wording) comes from its ``config.json``, parsed
once into ``self.config`` (:class:`~.config.AnalyzerConfig`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..ml import cam as cam_mod
from ..vocab import percent
from ..ml.scores import gate_features, gate_probability, is_blank, nearest_distance, softmax, whitening
from ..imaging.imageio import pad_to_square, to_gray3
from .base import STATUS_OK, STATUS_OOD, STATUS_UNCERTAIN, AnalysisResult, Analyzer, SessionPool
from .config import ModalityGate, OutOfDomain, TypeDomain

MAX_WORKING_SIDE = 4096


class ImageClassifierAnalyzer(Analyzer):
    """A calibrated image classifier with out-of-domain detection and Grad-CAM."""

    counts_cells = False

    REQUIRED_FILES = ("classifier.onnx", "head.npz")

    def __init__(self, model_dir: Path, threads: int = 2):
        super().__init__(model_dir)
        cfg = self.config
        for name in self.REQUIRED_FILES:  # listed, so that the model digest covers them
            if name not in cfg.files:
                raise cfg.error("files", f"must list {name!r} (this analyzer loads it)")
        pre = cfg.preprocess
        self.size = pre.size
        self.gray = pre.grayscale
        self.mean = np.array(pre.mean, np.float32).reshape(1, 3, 1, 1)
        self.std = np.array(pre.std, np.float32).reshape(1, 3, 1, 1)
        # test-time augmentation: "hflip" averages the logits of the image and its mirror image
        # (radiographs and MR slices are read either way round); features, embedding and
        # out-of-domain statistics come from the image as given
        self.tta = pre.tta
        self.classifier = SessionPool(self.model_dir / "classifier.onnx", threads)
        head = np.load(self.model_dir / "head.npz")
        self.head_weight = head["weight"]
        cal = cfg.calibration
        self.temperature = cal.temperature
        # per-class logit offsets fitted with the temperature on validation (zeros when not fitted)
        self.class_bias = np.array(cal.class_bias, np.float64)
        self.uncertain_below = cal.uncertain_below
        self.malignant_threshold = cal.malignant_threshold
        self.confident_negative_below = cal.confident_negative_below
        self.ood_threshold = None
        self.gate_threshold = None
        if cal.ood is not None:
            self._load_ood(cal.ood)
        self.type_domain = None
        if cal.type_domain is not None:
            self._load_type_domain(cal.type_domain)
        self.blank_std = cfg.blank_image_std
        self.heatmap_weights = None  # the top class's row of the head, unless the map explains the call
        if cfg.heatmap == "positive_call":
            pos = [i for i, l in enumerate(self.labels) if l in self.malignant_labels]
            neg = [i for i, l in enumerate(self.labels) if l not in self.malignant_labels]
            if not pos or not neg:
                raise cfg.error("heatmap", "'positive_call' needs positive and negative labels")
            self.heatmap_weights = cam_mod.contrast_weights(self.head_weight, pos, neg)

    def _load_ood(self, ood: OutOfDomain) -> None:
        """Out-of-domain statistics (and the optional modality gate), checked against the network now."""
        outputs = self.classifier.output_names
        if ood.input not in outputs:
            raise self.config.error("calibration.ood.input",
                                    f"{ood.input!r} is not an output of classifier.onnx ({', '.join(outputs)})")
        if ood.gate is not None and "embedding" not in outputs:
            raise self.config.error("calibration.ood.gate", "the modality gate reads the 'embedding' output, which "
                                                            f"classifier.onnx lacks ({', '.join(outputs)})")
        st = np.load(self.model_dir / ood.stats)
        needed = OutOfDomain.ARRAYS + (ModalityGate.ARRAYS if ood.gate is not None else ())
        missing = [k for k in needed if k not in st.files]
        if missing:
            raise self.config.error("calibration.ood.stats", f"{ood.stats} lacks the arrays {', '.join(missing)}")
        self.ood_whitening = whitening(st["means"], st["precision"])
        self.ood_threshold = ood.threshold
        self.ood_input = ood.input
        # modality gate (optional): a linear classifier, this analyzer's images vs other analyzers'
        if ood.gate is not None:
            self.gate_threshold = ood.gate.threshold
            self.gate = {k: st[k].astype(np.float64) for k in ModalityGate.ARRAYS}

    def _load_type_domain(self, td: TypeDomain) -> None:
        if self.config.calibration.ood is None:
            raise self.config.error("calibration.type_domain", "is measured on the out-of-domain features: "
                                                               "calibration.ood is needed too")
        st = np.load(self.model_dir / td.stats)
        missing = [k for k in TypeDomain.ARRAYS if k not in st.files]
        if missing:
            raise self.config.error("calibration.type_domain.stats", f"{td.stats} lacks the arrays {', '.join(missing)}")
        self.type_domain = (st["type_mean"].astype(np.float64), st["type_precision"].astype(np.float64), td.threshold)
        self.type_whitening = whitening(st["type_mean"], st["type_precision"])

    # -- pieces reused by calibration and evaluation ---------------------------------
    def preprocess(self, rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int], int]:
        """Model input (1, 3, S, S), the (top, left) padding offset and the padded side."""
        if self.gray:
            rgb = to_gray3(rgb)
        sq, offset = pad_to_square(rgb)
        small = np.asarray(Image.fromarray(sq).resize((self.size, self.size), Image.BILINEAR), np.float32) / 255.0
        x = (small.transpose(2, 0, 1)[None] - self.mean) / self.std
        return np.ascontiguousarray(x, dtype=np.float32), offset, sq.shape[0]

    def ood_score(self, features: np.ndarray) -> np.ndarray:
        """Minimum Mahalanobis distance (shared covariance) to the reference means; (N,)."""
        return nearest_distance(features, self.ood_whitening)

    def type_distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance to the positive images of the collections with every type; (N,)."""
        return nearest_distance(features, self.type_whitening)

    def withhold_type(self, res: AnalysisResult, features: np.ndarray) -> None:
        """A positive call on an input unlike the typed collections keeps its call, loses its type: the
        label becomes the untyped call, the types' probabilities are summed into it (pages and reports
        show no type), and the network's own per-type probabilities are kept apart for evaluation."""
        if self.type_domain is None or res.label not in self.malignant_labels or not res.malignant:
            return  # no type shown, none to withhold
        dist = float(self.type_distance(features[None])[0])
        res.extra["type_distance"] = round(dist, 3)
        if dist <= self.type_domain[2]:
            return
        res.extra["network_probabilities"] = dict(res.probabilities)
        res.probabilities = untyped_probabilities(res.probabilities, self.malignant_labels, self.untyped_label)
        res.label, res.confidence = self.untyped_label, res.probabilities[self.untyped_label]
        res.label_display = self.config.display_name(self.untyped_label)
        res.messages.append(f"No {self.positive_term} type is suggested: this {self.input_description} is unlike "
                            f"the images the types were learned from (distance {dist:.1f} > "
                            f"{self.type_domain[2]:.1f}). The {self.positive_term} call stands.")

    def foreign_probability(self, out: dict[str, np.ndarray]) -> np.ndarray:
        """The modality gate's probability that each image belongs to another analyzer; (N,)."""
        return gate_probability(gate_features(out[self.ood_input], out["embedding"]), self.gate)

    def run_network(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The classifier's raw outputs (logits averaged over test-time augmentation, if any)."""
        out = self.classifier.run(x)
        if self.tta == "hflip":
            mirrored = self.classifier.run(np.ascontiguousarray(x[..., ::-1]))
            out["logits"] = (out["logits"] + mirrored["logits"]) / 2
        return out

    def classify_batch(self, x: np.ndarray) -> dict[str, np.ndarray]:
        out = self.run_network(x)
        out["probabilities"] = softmax(out["logits"].astype(np.float64) / self.temperature + self.class_bias)
        if self.ood_threshold is not None:
            out["ood_score"] = self.ood_score(out[self.ood_input])
            if self.gate_threshold is not None:
                # one out-of-domain score: above 1 means out of domain for either check
                p = self.foreign_probability(out)
                out["foreign_probability"] = p
                out["ood_score"] = np.maximum(out["ood_score"], self.ood_threshold * p / self.gate_threshold)
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
            msgs.append(f"This image does not look like a {self.input_description} the model was trained on "
                        f"(out-of-domain score {ood_score:.1f} > {self.ood_threshold:.1f}). No diagnosis is given.")
            return STATUS_OOD, msgs, p_mal, malignant
        status = STATUS_OK
        if conf < self.uncertain_below:
            status = STATUS_UNCERTAIN
            msgs.append(f"The model is unsure (top probability {conf:.0%} < {self.uncertain_below:.0%}): refer for review.")
        if (label in self.malignant_labels) != malignant:
            status = STATUS_UNCERTAIN
            msgs.append(f"The top class and the {self.positive_term} call disagree: refer for review.")
        elif not malignant and self.confident_negative_below is not None and p_mal >= self.confident_negative_below:
            status = STATUS_UNCERTAIN
            msgs.append(f"A {self.positive_term} is not ruled out with confidence (probability {percent(p_mal)}, "
                        f"ruled out only below {percent(self.confident_negative_below)}): refer for review.")
        return status, msgs, p_mal, malignant

    def extend(self, res: AnalysisResult, x: np.ndarray, rgb: np.ndarray, geometry: dict, timings: dict) -> None:
        """Hook for analyzers that do more than classify (called for in-domain images only)."""

    # -- the interface ---------------------------------------------------------------
    def _analyze_rgb(self, rgb: np.ndarray) -> AnalysisResult:
        t = {}
        t0 = time.perf_counter()
        oh, ow = rgb.shape[:2]
        res = AnalysisResult(analyzer_id=self.id, status=STATUS_OK, model=self.model_info, image_size=(ow, oh),
                             counts_cells=self.counts_cells)
        # Very large images are analysed at a working size (the network sees self.size px anyway);
        # masks/heatmaps are returned at that size and measurements in original pixels.
        back = 1.0
        if max(oh, ow) > MAX_WORKING_SIDE:
            back = max(oh, ow) / MAX_WORKING_SIDE
            rgb = np.asarray(Image.fromarray(rgb).resize((max(1, round(ow / back)), max(1, round(oh / back))),
                                                         Image.BILINEAR))
            res.messages.append(f"Large image: masks and heatmap are at {rgb.shape[1]}x{rgb.shape[0]} px"
                                + ("; cell measurements are in original pixels." if self.counts_cells else "."))
        res.analysis_scale = back
        h, w = rgb.shape[:2]
        if is_blank(rgb, self.blank_std):
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
        res.label_display = self.config.display_name(res.label)
        res.malignant, res.malignant_probability = malignant, p_mal
        if self.type_domain is not None:  # (ood_input exists only with an out-of-domain check)
            self.withhold_type(res, out[self.ood_input][0])
        geometry = {"top": top, "left": left, "side": side, "h": h, "w": w, "oh": oh, "ow": ow, "back": back}
        self.extend(res, x, rgb, geometry, t)
        t4 = time.perf_counter()
        # the call's map for a positive call; a negative call shows its top class (a contrast map,
        # min-max scaled, would paint faint tumour evidence at full colour under "no tumour")
        weights = self.heatmap_weights if malignant else None
        hm = cam_mod.heatmap(out["features"][0], self.head_weight, k, self.size, self.size, weights)
        hm_big = np.asarray(Image.fromarray(hm, "F").resize((side, side), Image.BILINEAR), np.float32)
        res.heatmap = np.clip(hm_big[top:top + h, left:left + w], 0.0, 1.0)
        t["heatmap"] = (time.perf_counter() - t4) * 1e3
        t["total"] = (time.perf_counter() - t0) * 1e3
        res.timings_ms = t
        return res


def untyped_probabilities(probabilities: dict[str, float], typed: set[str], untyped: str) -> dict[str, float]:
    """The probabilities of a call without a type: the typed classes summed into the untyped call."""
    return {untyped: float(sum(v for k, v in probabilities.items() if k in typed)),
            **{k: v for k, v in probabilities.items() if k not in typed}}
