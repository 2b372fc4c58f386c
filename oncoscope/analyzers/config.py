"""An analyzer's typed configuration, parsed and validated once from its model folder's ``config.json``.

A model travels with its config, as a timm model travels with its ``PretrainedCfg``: labels and which
of them are malignant, preprocessing, calibration and thresholds, cell segmentation and report wording.
Every default lives here, in the dataclasses below, and nowhere else.

:meth:`AnalyzerConfig.load` runs when an analyzer is built (process start-up). A missing, mistyped
or inconsistent key is an :class:`AnalyzerConfigError` naming the file and the key, e.g.
``.../config.json: key 'calibration.temperature': expected a number, got 'warm'``, so that a broken
model folder stops the start, never a request half-way through (the old raw-dict reads raised
``KeyError`` mid-request, and a typo such as ``uncertain_bellow`` silently became the default).

Unknown keys are refused for the same reason; keys that only document how a value was obtained
(``threshold_rule``, ``fitted_on``, the validation figures written by ``oncoscope train``) are
listed in each section's ``NOTES`` and kept, unparsed, in :meth:`AnalyzerConfig.to_dict`, which
returns the file as written (model cards print the calibration block from it).

Beside ``config.json``, an optional ``class_info.json`` describes each class for people (what it means,
what usually confirms it, when to refer, references: :class:`ClassInfo`). It is parsed and checked here
too, but it is not in the model digest: correcting a sentence does not make a new model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

from ..ml.differential import CELL_CLASSES
from ..vocab import NONDIAGNOSTIC, NONDIAGNOSTIC_INFO

CONFIG_FILE = "config.json"
CLASS_INFO_FILE = "class_info.json"  # what each class means, beside config.json (see ClassInfo)
TTA_MODES = ("hflip",)  # test-time augmentation the classifier pipeline knows


class AnalyzerConfigError(ValueError):
    """A model folder's ``config.json`` is missing a key, or a key has a wrong value."""

    def __init__(self, path: Path | str, key: str, problem: str):
        self.path, self.key, self.problem = Path(path), key, problem
        super().__init__(f"{path}: key {key!r}: {problem}")


_REQUIRED = object()


class _Section:
    """Typed reads from one JSON object; errors name the file and the dotted key."""

    def __init__(self, data: Any, path: Path, prefix: str = ""):
        self.path, self.prefix = path, prefix
        if not isinstance(data, dict):
            raise AnalyzerConfigError(path, prefix or "(top level)", f"expected an object, got {_show(data)}")
        self.data = data

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> AnalyzerConfigError:
        return AnalyzerConfigError(self.path, self.key(name), problem)

    def check_keys(self, known: frozenset[str]) -> None:
        for name in self.data:
            if name not in known:
                raise self.error(name, f"unknown key (known: {', '.join(sorted(known))})")

    def section(self, name: str, required: bool = False) -> "_Section | None":
        if name not in self.data:
            if required:
                raise self.error(name, "missing")
            return None
        return _Section(self.data[name], self.path, self.key(name))

    def _value(self, name: str, default: Any) -> tuple[bool, Any]:
        """(present, value): the value when the key is there, else the default (or a "missing" error)."""
        if name in self.data:
            return True, self.data[name]
        if default is _REQUIRED:
            raise self.error(name, "missing")
        return False, default

    def text(self, name: str, default: Any = _REQUIRED, choices: tuple[str, ...] | None = None) -> str | None:
        present, v = self._value(name, default)
        if not present:
            return v
        if not isinstance(v, str) or not v:
            raise self.error(name, f"expected a non-empty string, got {_show(v)}")
        if choices is not None and v not in choices:
            raise self.error(name, f"{v!r} is not one of: {', '.join(choices)}")
        return v

    def flag(self, name: str, default: bool) -> bool:
        present, v = self._value(name, default)
        if present and not isinstance(v, bool):
            raise self.error(name, f"expected true or false, got {_show(v)}")
        return v

    def integer(self, name: str, default: Any = _REQUIRED, minimum: int = 1) -> int | None:
        present, v = self._value(name, default)
        if not present:
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(name, f"expected an integer, got {_show(v)}")
        if v < minimum:
            raise self.error(name, f"must be at least {minimum}, got {v}")
        return v

    def number(self, name: str, default: Any = _REQUIRED, low: float = -math.inf, high: float = math.inf,
               low_open: bool = False) -> float:
        present, v = self._value(name, default)
        if not present:
            return v
        x = _number(v)
        if x is None:
            raise self.error(name, f"expected a number, got {_show(v)}")
        if x < low or x > high or (low_open and x == low):
            raise self.error(name, f"must be in {'(' if low_open else '['}{low:g}, {high:g}], got {v}")
        return x

    def numbers(self, name: str, length: int, default: Any = _REQUIRED, what: str = "") -> tuple[float, ...]:
        present, v = self._value(name, default)
        if not present:
            return v
        if not isinstance(v, list) or any(_number(x) is None for x in v):
            raise self.error(name, f"expected a list of numbers, got {_show(v)}")
        if len(v) != length:
            raise self.error(name, f"expected {length} values{what}, got {len(v)}")
        return tuple(float(x) for x in v)

    def texts(self, name: str, default: Any = _REQUIRED, labels: tuple[str, ...] | None = None,
              non_empty: bool = False) -> tuple[str, ...]:
        """A list of distinct strings; with ``labels``, each must be one of them."""
        present, v = self._value(name, default)
        if not present:
            return v
        if not isinstance(v, list) or any(not isinstance(x, str) or not x for x in v):
            raise self.error(name, f"expected a list of non-empty strings, got {_show(v)}")
        if non_empty and not v:
            raise self.error(name, "must not be empty")
        repeated = sorted({x for x in v if v.count(x) > 1})
        if repeated:
            raise self.error(name, f"repeats {', '.join(map(repr, repeated))}")
        unknown = [x for x in v if labels is not None and x not in labels]
        if unknown:
            raise self.error(name, f"unknown label {unknown[0]!r} (labels: {', '.join(labels)})")
        return tuple(v)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _show(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the network's input: [luminance] -> pad to square -> resize -> normalise."""

    size: int  # side of the square network input, px
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    grayscale: bool = False  # read colour input as luminance (radiology)
    tta: str | None = None  # test-time augmentation: None or "hflip" (logits of the image and its mirror)

    KEYS: ClassVar = frozenset({"size", "mean", "std", "grayscale", "tta"})
    NOTES: ClassVar = frozenset({"resize", "pad_to_square"})  # describe the fixed pipeline

    @classmethod
    def parse(cls, s: _Section) -> "Preprocess":
        s.check_keys(cls.KEYS | cls.NOTES)
        std = s.numbers("std", 3, what=" (one per RGB channel)")
        if min(std) <= 0:
            raise s.error("std", f"every value must be positive, got {list(std)}")
        return cls(size=s.integer("size", minimum=16), std=std,
                   mean=s.numbers("mean", 3, what=" (one per RGB channel)"),
                   grayscale=s.flag("grayscale", False), tta=s.text("tta", None, choices=TTA_MODES))


@dataclass(frozen=True)
class ModalityGate:
    """Linear classifier "this analyzer's images vs other analyzers'" (coefficients in the OOD stats file)."""

    threshold: float  # probability of belonging to another analyzer above which an image is out of domain

    KEYS: ClassVar = frozenset({"threshold"})
    NOTES: ClassVar = frozenset({"method", "negatives", "n_train", "threshold_rule", "val_own_flagged",
                                 "val_foreign_flagged"})
    ARRAYS: ClassVar = ("gate_mean", "gate_scale", "gate_coef", "gate_intercept")

    @classmethod
    def parse(cls, s: _Section) -> "ModalityGate":
        s.check_keys(cls.KEYS | cls.NOTES)
        return cls(threshold=s.number("threshold", low=0.0, high=1.0, low_open=True))


@dataclass(frozen=True)
class OutOfDomain:
    """Mahalanobis distance of a network output to the training classes' means."""

    stats: str  # file in the model folder with ``means`` and ``precision`` (and the gate's arrays)
    threshold: float  # distance above which an image is out of domain
    input: str = "embedding"  # which classifier output the distance is measured on
    gate: ModalityGate | None = None

    KEYS: ClassVar = frozenset({"stats", "threshold", "input", "gate"})
    NOTES: ClassVar = frozenset({"method", "threshold_rule", "validation_threshold"})
    ARRAYS: ClassVar = ("means", "precision")

    @classmethod
    def parse(cls, s: _Section) -> "OutOfDomain":
        s.check_keys(cls.KEYS | cls.NOTES)
        gate = s.section("gate")
        return cls(stats=s.text("stats"), threshold=s.number("threshold", low=0.0, low_open=True),
                   input=s.text("input", "embedding"), gate=ModalityGate.parse(gate) if gate else None)


@dataclass(frozen=True)
class TypeDomain:
    """Where the positive call's type is worth suggesting: Mahalanobis distance of the OOD features to
    the positive images of the collections that have every type. Farther than ``threshold``, the call
    stands but its type is withheld (the analyzer's ``untyped_label``)."""

    stats: str  # file in the model folder with ``type_mean`` and ``type_precision``
    threshold: float

    KEYS: ClassVar = frozenset({"stats", "threshold"})
    NOTES: ClassVar = frozenset({"method", "sources", "threshold_rule", "reference_n", "validation"})
    ARRAYS: ClassVar = ("type_mean", "type_precision")

    @classmethod
    def parse(cls, s: _Section) -> "TypeDomain":
        s.check_keys(cls.KEYS | cls.NOTES)
        return cls(stats=s.text("stats"), threshold=s.number("threshold", low=0.0, low_open=True))


@dataclass(frozen=True)
class Calibration:
    """Fitted on the validation split by ``oncoscope train``; absent before the first calibration."""

    class_bias: tuple[float, ...]  # per-class logit offsets (one per label; zeros when not fitted)
    temperature: float = 1.0  # probabilities = softmax(logits / temperature + class_bias)
    uncertain_below: float = 0.0  # top probability under which a result is "uncertain"
    malignant_threshold: float = 0.5  # P(malignant labels) at or above which the call is malignant
    # A negative call is "ok" only below this P(malignant labels); from here up to the threshold it is
    # referred. Fitted on sources left out of training, so that confident misses stay rare on a new one.
    confident_negative_below: float | None = None
    ood: OutOfDomain | None = None  # no out-of-domain check when absent
    type_domain: TypeDomain | None = None  # every positive call typed when absent

    KEYS: ClassVar = frozenset({"temperature", "class_bias", "uncertain_below", "malignant_threshold",
                                "confident_negative_below", "ood", "type_domain"})
    NOTES: ClassVar = frozenset({"malignant_threshold_rule", "fitted_on", "val_accuracy_uncalibrated",
                                 "val_malignant_sensitivity_at_threshold", "val_benign_specificity_at_threshold",
                                 "val_confident_fraction", "confident_negative_rule"})

    @classmethod
    def parse(cls, s: _Section | None, labels: tuple[str, ...]) -> "Calibration":
        if s is None:
            return cls(class_bias=(0.0,) * len(labels))
        s.check_keys(cls.KEYS | cls.NOTES)
        ood, types = s.section("ood"), s.section("type_domain")
        threshold = s.number("malignant_threshold", 0.5, 0.0, 1.0)
        return cls(class_bias=s.numbers("class_bias", len(labels), (0.0,) * len(labels), " (one per label)"),
                   temperature=s.number("temperature", 1.0, low=0.0, low_open=True),
                   uncertain_below=s.number("uncertain_below", 0.0, 0.0, 1.0),
                   malignant_threshold=threshold,
                   confident_negative_below=s.number("confident_negative_below", None, 0.0, threshold),
                   ood=OutOfDomain.parse(ood) if ood else None,
                   type_domain=TypeDomain.parse(types) if types else None)


@dataclass(frozen=True)
class Segmenter:
    """Cell segmentation post-processing; sizes are in pixels at the network input size."""

    threshold: float = 0.5  # cell probability threshold
    min_area_px: int = 60  # smaller components are dropped
    min_distance_px: int = 9  # minimum distance between two cells' centres when splitting touching cells
    size: int | None = None  # network input side (the segmenter shares the classifier's input)

    KEYS: ClassVar = frozenset({"threshold", "min_area_px", "min_distance_px", "size"})

    @classmethod
    def parse(cls, s: _Section, preprocess: Preprocess) -> "Segmenter":
        s.check_keys(cls.KEYS)
        size = s.integer("size", None, minimum=16)
        if size is not None and size != preprocess.size:
            raise s.error("size", f"is {size}, but the segmenter reads the classifier's input "
                                  f"(preprocess.size {preprocess.size})")
        return cls(threshold=s.number("threshold", 0.5, 0.0, 1.0), min_area_px=s.integer("min_area_px", 60),
                   min_distance_px=s.integer("min_distance_px", 9), size=size)


@dataclass(frozen=True)
class Cells:
    """Per-cell classification of detected white cells (``smear-differential``): the network, the
    canonical crop and the decision thresholds fitted on validation cells."""

    classifier: str  # ONNX file in the model folder: canonical crops -> logits (and embedding)
    classes: tuple[str, ...]  # the network's outputs, in order
    served_as: Mapping[str, str]  # a trained-only class -> the reported class it is added to
    microns_per_pixel: float = 0.4  # crop scale
    field_um: float = 32.0  # crop window
    temperature: float = 1.0
    unidentified_below: float = 0.5
    blast_threshold: float = 0.5
    blast_borderline: float = 0.2
    normal_blast_rate: float = 0.02  # validation normal cells called blast (upper bound)
    false_call_rate: float = 0.05  # normal images or cases allowed a blasts_present call by chance
    count_target: int = 100
    ood_stats: str | None = None  # file with the training cells' embedding means and precision
    ood_threshold: float | None = None  # Mahalanobis distance above which a cell is unlike any trained cell

    KEYS: ClassVar = frozenset({"classifier", "classes", "served_as", "microns_per_pixel", "field_um",
                                "temperature", "unidentified_below", "blast_threshold", "blast_borderline",
                                "normal_blast_rate", "false_call_rate", "count_target", "ood_stats",
                                "ood_threshold"})
    NOTES: ClassVar = frozenset({"fitted_on", "threshold_rules", "val"})
    REPORTED: ClassVar = CELL_CLASSES

    @classmethod
    def parse(cls, s: _Section) -> "Cells":
        s.check_keys(cls.KEYS | cls.NOTES)
        classes = s.texts("classes", non_empty=True)
        served_as = cls._served_as(s, classes)
        for c in classes:
            if c not in cls.REPORTED and c not in served_as:
                raise s.error("classes", f"{c!r} is neither reported ({', '.join(cls.REPORTED)}) nor served as one")
        if "blast" not in classes:
            raise s.error("classes", "must include 'blast' (the screening call counts blasts)")
        low = s.number("blast_borderline", 0.2, 0.0, 1.0)
        high = s.number("blast_threshold", 0.5, 0.0, 1.0)
        if low > high:
            raise s.error("blast_borderline", f"must not exceed blast_threshold ({high:g}), got {low:g}")
        stats, threshold = s.text("ood_stats", None), s.number("ood_threshold", None, low=0.0, low_open=True)
        if (stats is None) != (threshold is None):
            raise s.error("ood_threshold" if stats else "ood_stats", "ood_stats and ood_threshold go together")
        return cls(classifier=s.text("classifier"), classes=classes, served_as=MappingProxyType(served_as),
                   microns_per_pixel=s.number("microns_per_pixel", 0.4, 0.0, 5.0, low_open=True),
                   field_um=s.number("field_um", 32.0, 1.0, 200.0),
                   temperature=s.number("temperature", 1.0, low=0.0, low_open=True),
                   unidentified_below=s.number("unidentified_below", 0.5, 0.0, 1.0),
                   blast_threshold=high, blast_borderline=low,
                   normal_blast_rate=s.number("normal_blast_rate", 0.02, 0.0, 1.0),
                   false_call_rate=s.number("false_call_rate", 0.05, 0.0, 1.0, low_open=True),
                   count_target=s.integer("count_target", 100), ood_stats=stats, ood_threshold=threshold)

    @classmethod
    def _served_as(cls, s: _Section, classes: tuple[str, ...]) -> dict[str, str]:
        served = s.section("served_as")
        out: dict[str, str] = {}
        if served is None:
            return out
        for k in served.data:
            if k not in classes:
                raise served.error(k, f"unknown class {k!r} (classes: {', '.join(classes)})")
            if k == "blast":
                raise served.error(k, "blasts are always reported as blasts")
            out[k] = served.text(k, choices=tuple(c for c in classes if c != k and c in cls.REPORTED))
        for k, target in out.items():
            if target in out:
                raise served.error(k, f"is served as {target!r}, which is itself served as {out[target]!r}")
        return out


@dataclass(frozen=True)
class ReportWording:
    """Sentences for reports; ``malignant`` and ``benign`` may name the label as ``{label}``."""

    finding: str | None = None
    malignant: str | None = None
    benign: str | None = None
    disclaimer: str | None = None
    untyped: str | None = None  # a positive call whose type is withheld (the analyzer's untyped_label)

    KEYS: ClassVar = frozenset({"finding", "malignant", "benign", "disclaimer", "untyped"})

    @classmethod
    def parse(cls, s: _Section | None) -> "ReportWording":
        if s is None:
            return cls()
        s.check_keys(cls.KEYS)
        values = {k: s.text(k, None) for k in sorted(cls.KEYS)}
        for k in ("malignant", "benign"):
            try:
                (values[k] or "").format(label="x")
            except (KeyError, IndexError, ValueError) as exc:
                raise s.error(k, f"not a valid template (only {{label}} may be used): {exc!r}") from None
        return cls(**values)

    def as_dict(self) -> dict[str, str]:
        """The sentences given (absent ones left out, so callers' ``.get(key, default)`` still works)."""
        return {k: v for k, v in (("finding", self.finding), ("malignant", self.malignant),
                                  ("benign", self.benign), ("disclaimer", self.disclaimer),
                                  ("untyped", self.untyped)) if v is not None}


@dataclass(frozen=True)
class DicomChecks:
    """What a DICOM file must say about its acquisition for the model to read it (what it was trained
    on); a file that says otherwise is out of domain. A value the file does not state passes (plain
    image files state none: the out-of-domain score is their check)."""

    body_parts: tuple[str, ...] = ()  # Body Part Examined accepted (empty: any)
    planes: tuple[str, ...] = ()  # slice planes accepted (empty: any)
    refused_words: tuple[str, ...] = ()  # a word of these in the series' description, image type or
    # sequence rules it out (diffusion maps, angiography, localisers: series the model never saw)
    refuse_diffusion: bool = False  # a b-value above zero rules the series out

    KEYS: ClassVar = frozenset({"body_parts", "planes", "refused_words", "refuse_diffusion"})
    PLANES: ClassVar = ("axial", "coronal", "sagittal", "oblique")

    @classmethod
    def parse(cls, s: _Section) -> "DicomChecks":
        s.check_keys(cls.KEYS)
        return cls(body_parts=tuple(x.upper() for x in s.texts("body_parts", ())),
                   planes=s.texts("planes", (), labels=cls.PLANES),
                   refused_words=tuple(x.upper() for x in s.texts("refused_words", ())),
                   refuse_diffusion=s.flag("refuse_diffusion", False))


@dataclass(frozen=True)
class Reference:
    """A published source: how it is cited, and where it can be read (optional)."""

    text: str
    url: str | None = None

    KEYS: ClassVar = frozenset({"text", "url"})

    @classmethod
    def parse(cls, s: _Section) -> "Reference":
        s.check_keys(cls.KEYS)
        url = s.text("url", None)
        if url is not None and (not url.startswith(("https://", "http://")) or any(c.isspace() for c in url)):
            raise s.error("url", f"expected an http(s) address, got {url!r}")
        return cls(text=s.text("text"), url=url)


@dataclass(frozen=True)
class ClassInfo:
    """What a diagnosis means, what usually confirms it and when to refer, with references: the page a
    class links to (case page, analyzer page) and the PDF report's appendix. Written by people in the
    model folder's ``class_info.json`` (one entry per call label; a cell classifier's reported cell
    classes may have one too), which is not part of the model digest: correcting a sentence or a
    reference does not make a new model."""

    summary: str  # what it means, in plain words
    confirmation: str  # what usually confirms it
    referral: str  # when to refer, and how urgently
    references: tuple[Reference, ...]

    KEYS: ClassVar = frozenset({"summary", "confirmation", "referral", "references"})

    @classmethod
    def parse(cls, s: _Section) -> "ClassInfo":
        s.check_keys(cls.KEYS)
        _, refs = s._value("references", _REQUIRED)
        if not isinstance(refs, list) or not refs:
            raise s.error("references", f"expected a non-empty list of references, got {_show(refs)}")
        return cls(summary=s.text("summary"), confirmation=s.text("confirmation"), referral=s.text("referral"),
                   references=tuple(Reference.parse(_Section(r, s.path, f"{s.key('references')}[{i}]"))
                                    for i, r in enumerate(refs)))

    @classmethod
    def parse_file(cls, s: _Section, call_labels: tuple[str, ...],
                   cell_classes: tuple[str, ...] = ()) -> dict[str, "ClassInfo"]:
        """Every call label must have an entry; a reported cell class may; nothing else may."""
        known = call_labels + tuple(c for c in cell_classes if c not in call_labels)
        for label in s.data:
            if label == NONDIAGNOSTIC:
                raise s.error(label, f"{NONDIAGNOSTIC!r} is shared by every analyzer (oncoscope/vocab.py)")
            if label not in known:
                raise s.error(label, f"unknown label {label!r} (labels: {', '.join(known)})")
        for label in call_labels:
            if label not in s.data:
                raise s.error(label, "missing: every call label needs an entry")
        return {label: cls.parse(s.section(label)) for label in known if label in s.data}


# What a non-diagnostic sign-off means (every analyzer offers it; its wording lives in vocab.py).
SHARED_CLASS_INFO: Mapping[str, ClassInfo] = MappingProxyType({NONDIAGNOSTIC: ClassInfo(
    summary=NONDIAGNOSTIC_INFO["summary"], confirmation=NONDIAGNOSTIC_INFO["confirmation"],
    referral=NONDIAGNOSTIC_INFO["referral"],
    references=tuple(Reference(**r) for r in NONDIAGNOSTIC_INFO["references"]))})


def _read_class_info(folder: Path, call_labels: tuple[str, ...], cells: Cells | None) -> Mapping[str, ClassInfo]:
    """``folder/class_info.json`` parsed (empty when the folder has none)."""
    path = folder / CLASS_INFO_FILE
    if not path.is_file():
        return MappingProxyType({})
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnalyzerConfigError(path, "(file)", f"not valid JSON: {exc}") from None
    reported = tuple(c for c in cells.classes if c not in cells.served_as) if cells is not None else ()
    return MappingProxyType(ClassInfo.parse_file(_Section(data, path), call_labels, reported))


HEATMAPS = ("top_class", "positive_call")


# ----------------------------------------------------------------------------- the config
@dataclass(frozen=True)
class AnalyzerConfig:
    """Everything an analyzer needs from its model folder, typed; build it with :meth:`load`."""

    name: str
    version: str
    modality: str  # e.g. "radiology/mr", "microscopy/peripheral-blood-smear"
    labels: tuple[str, ...]  # in the order of the classifier's outputs
    preprocess: Preprocess
    files: tuple[str, ...]  # model files in the folder; with config.json they make the model digest
    calibration: Calibration
    id: str | None = None  # the analyzer that reads this folder
    display_names: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    malignant_labels: tuple[str, ...] = ()
    # a positive call without a type (not a network output): given when the input is unlike the
    # collections the types were learned from (calibration.type_domain)
    untyped_label: str | None = None
    positive_term: str = "malignancy"  # what the positive call is called
    input_description: str = "image"  # what the analyzer expects to see
    image_noun: str = "Image"  # what an image is called in its field
    dicom_modalities: tuple[str, ...] = ()  # DICOM modalities accepted (empty: any)
    dicom_checks: DicomChecks = DicomChecks()  # body part, plane and series a DICOM file must match
    # what the Grad-CAM heatmap explains: the top class, or the positive call against the negative
    # classes (one map for "tumour or not", whichever type is on top)
    heatmap: str = "top_class"
    report_wording: ReportWording = ReportWording()
    blank_image_std: float = 2.0  # grey-level spread under which an image is blank
    segmenter: Segmenter | None = None
    cells: Cells | None = None
    # label -> what it means, what confirms it, when to refer (class_info.json; empty without one)
    class_info: Mapping[str, ClassInfo] = field(default_factory=lambda: MappingProxyType({}))
    folder: Path | None = field(default=None, compare=False)
    source_json: str = field(default="{}", compare=False, repr=False)  # the file as written

    KEYS: ClassVar = frozenset({"id", "name", "version", "modality", "labels", "display_names", "malignant_labels",
                                "untyped_label", "positive_term", "input_description", "image_noun", "dicom_modalities",
                                "dicom_checks", "heatmap",
                                "report_wording", "blank_image_std", "preprocess", "files", "calibration",
                                "segmenter", "cells"})

    @classmethod
    def load(cls, folder: Path | str) -> "AnalyzerConfig":
        """Parse and check ``folder/config.json`` (and that the files it lists are there)."""
        folder = Path(folder)
        path = folder / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_FILE} in {folder}")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AnalyzerConfigError(path, "(file)", f"not valid JSON: {exc}") from None
        return cls.from_dict(data, folder)

    @classmethod
    def from_dict(cls, data: Any, folder: Path | str) -> "AnalyzerConfig":
        """Parse a config already read; errors name ``folder/config.json``; listed files must exist there.
        The folder's ``class_info.json``, when there is one, is read and checked here too."""
        folder = Path(folder)
        path = folder / CONFIG_FILE
        s = _Section(data, path)
        s.check_keys(cls.KEYS)
        labels = s.texts("labels", non_empty=True)
        untyped = s.text("untyped_label", None)
        if untyped in labels:
            raise s.error("untyped_label", f"{untyped!r} is a network output; the untyped call must be another code")
        names = s.section("display_names")
        display_names = {}
        if names is not None:
            for label in names.data:
                if label not in labels + ((untyped,) if untyped else ()):
                    raise names.error(label, f"unknown label {label!r} (labels: {', '.join(labels)})")
                display_names[label] = names.text(label)
        preprocess = Preprocess.parse(s.section("preprocess", required=True))
        segmenter = s.section("segmenter")
        cells = Cells.parse(section) if (section := s.section("cells")) else None
        cfg = cls(
            name=s.text("name"), version=s.text("version"), modality=s.text("modality"), labels=labels,
            preprocess=preprocess, files=s.texts("files"),
            calibration=Calibration.parse(s.section("calibration"), labels),
            id=s.text("id", None), display_names=MappingProxyType(display_names),
            malignant_labels=s.texts("malignant_labels", (), labels=labels), untyped_label=untyped,
            positive_term=s.text("positive_term", "malignancy"), input_description=s.text("input_description", "image"),
            image_noun=s.text("image_noun", "Image"), dicom_modalities=s.texts("dicom_modalities", ()),
            dicom_checks=DicomChecks.parse(checks) if (checks := s.section("dicom_checks")) else DicomChecks(),
            heatmap=s.text("heatmap", "top_class", choices=HEATMAPS),
            report_wording=ReportWording.parse(s.section("report_wording")),
            blank_image_std=s.number("blank_image_std", 2.0, low=0.0),
            segmenter=Segmenter.parse(segmenter, preprocess) if segmenter else None,
            cells=cells, class_info=_read_class_info(folder, labels + ((untyped,) if untyped else ()), cells),
            folder=folder, source_json=json.dumps(data))
        cfg._check_files(path)
        return cfg

    def _check_files(self, path: Path) -> None:
        for name in self.files:
            if Path(name).name != name:
                raise AnalyzerConfigError(path, "files", f"{name!r} is not a plain file name in the model folder")
            if not (self.folder / name).is_file():
                raise AnalyzerConfigError(path, "files", f"lists {name!r}, which is not in {self.folder}")
        for key in ("classifier", "ood_stats"):
            name = getattr(self.cells, key, None)
            if name is not None and name not in self.files:
                raise AnalyzerConfigError(path, f"cells.{key}",
                                          f"{name!r} is not listed in 'files' (the model digest must cover it)")
        if self.cells is not None and self.preprocess.size != round(self.cells.field_um / self.cells.microns_per_pixel):
            raise AnalyzerConfigError(path, "preprocess.size", f"is {self.preprocess.size}, but a "
                                      f"{self.cells.field_um:g} µm crop at {self.cells.microns_per_pixel:g} µm/px is "
                                      f"{round(self.cells.field_um / self.cells.microns_per_pixel)} px")
        for key, section in (("ood", self.calibration.ood), ("type_domain", self.calibration.type_domain)):
            if section is not None and section.stats not in self.files:
                raise AnalyzerConfigError(path, f"calibration.{key}.stats", f"{section.stats!r} is not listed in "
                                                                           "'files' (the model digest must cover it)")
        if self.calibration.type_domain is not None and not self.untyped_label:
            raise AnalyzerConfigError(path, "calibration.type_domain",
                                      "needs 'untyped_label', the call given when the type is withheld")

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / CONFIG_FILE

    def error(self, key: str, problem: str) -> AnalyzerConfigError:
        """An error about ``key`` of this config, for checks only the analyzer can make (network outputs)."""
        return AnalyzerConfigError(self.path or CONFIG_FILE, key, problem)

    def display_name(self, label: str) -> str:
        return self.display_names.get(label, label)

    def to_dict(self) -> dict[str, Any]:
        """The file as written, notes included (a fresh dict each call; key order kept for model cards)."""
        return json.loads(self.source_json)
