"""The typed analyzer config: every shipped config.json round-trips, and each class of mistake is an
AnalyzerConfigError naming the file and the key, raised when the analyzer is built."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from oncoscope.analyzers import registry
from oncoscope.analyzers.base import AnalysisResult
from oncoscope.analyzers.config import AnalyzerConfig, AnalyzerConfigError, Segmenter

SHIPPED = ["smear-all", "bone-xray", "brain-mri"]


def shipped_json(analyzer_id: str) -> dict:
    return json.loads((registry.MODELS_DIR / analyzer_id / "config.json").read_text())


# ----------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("analyzer_id", SHIPPED)
def test_shipped_config_round_trips(analyzer_id):
    folder = registry.MODELS_DIR / analyzer_id
    raw = shipped_json(analyzer_id)
    cfg = AnalyzerConfig.load(folder)
    assert cfg.to_dict() == raw
    assert AnalyzerConfig.from_dict(cfg.to_dict(), folder) == cfg
    assert cfg.path == folder / "config.json"

    assert cfg.id == raw["id"] == analyzer_id
    assert (cfg.name, cfg.version, cfg.modality) == (raw["name"], raw["version"], raw["modality"])
    assert list(cfg.labels) == raw["labels"]
    assert list(cfg.malignant_labels) == raw["malignant_labels"]
    assert dict(cfg.display_names) == raw["display_names"]
    assert list(cfg.files) == raw["files"]
    assert cfg.report_wording.as_dict() == raw["report_wording"]
    assert cfg.input_description == raw["input_description"] and cfg.image_noun == raw["image_noun"]
    assert cfg.positive_term == raw.get("positive_term", "malignancy")
    assert list(cfg.dicom_modalities) == raw.get("dicom_modalities", [])
    assert cfg.blank_image_std == raw["blank_image_std"]

    pre, raw_pre = cfg.preprocess, raw["preprocess"]
    assert pre.size == raw_pre["size"] and list(pre.mean) == raw_pre["mean"] and list(pre.std) == raw_pre["std"]
    assert pre.grayscale == raw_pre.get("grayscale", False) and pre.tta == raw_pre.get("tta")

    cal, raw_cal = cfg.calibration, raw["calibration"]
    assert cal.temperature == raw_cal["temperature"]
    assert list(cal.class_bias) == raw_cal.get("class_bias", [0.0] * len(raw["labels"]))
    assert cal.uncertain_below == raw_cal["uncertain_below"]
    assert cal.malignant_threshold == raw_cal["malignant_threshold"]
    ood, raw_ood = cal.ood, raw_cal["ood"]
    assert (ood.stats, ood.threshold, ood.input) == (raw_ood["stats"], raw_ood["threshold"], raw_ood["input"])
    if "gate" in raw_ood:
        assert ood.gate.threshold == raw_ood["gate"]["threshold"]
    else:
        assert ood.gate is None

    if "segmenter" in raw:
        seg = raw["segmenter"]
        assert cfg.segmenter == Segmenter(seg["threshold"], seg["min_area_px"], seg["min_distance_px"], seg["size"])
    else:
        assert cfg.segmenter is None


@pytest.mark.parametrize("analyzer_id", SHIPPED)
def test_the_analyzer_serves_its_typed_config(analyzer_id):
    an = registry.get(analyzer_id)
    cfg = an.config
    assert cfg == AnalyzerConfig.load(registry.MODELS_DIR / analyzer_id)
    assert an.temperature == cfg.calibration.temperature and an.size == cfg.preprocess.size
    assert an.labels == list(cfg.labels) and an.report_wording == cfg.report_wording.as_dict()


def test_defaults_live_in_the_config():
    """A config with only the required keys (as before the first calibration) gets the documented defaults."""
    folder = Path("/nonexistent")
    cfg = AnalyzerConfig.from_dict({"name": "n", "version": "1", "modality": "m", "labels": ["a", "b"], "files": [],
                                    "preprocess": {"size": 64, "mean": [0, 0, 0], "std": [1, 1, 1]}}, folder)
    cal = cfg.calibration
    assert (cal.temperature, cal.class_bias, cal.uncertain_below, cal.malignant_threshold, cal.ood) == \
        (1.0, (0.0, 0.0), 0.0, 0.5, None)
    assert (cfg.positive_term, cfg.input_description, cfg.image_noun, cfg.blank_image_std) == \
        ("malignancy", "image", "Image", 2.0)
    assert cfg.malignant_labels == () and cfg.dicom_modalities == () and cfg.segmenter is None
    assert cfg.report_wording.as_dict() == {} and cfg.display_name("a") == "a"
    assert not cfg.preprocess.grayscale and cfg.preprocess.tta is None
    assert Segmenter() == Segmenter(0.5, 60, 9, None)


# ----------------------------------------------------------------------------- errors
def model_folder(tmp_path: Path, edit, analyzer_id: str = "smear-all", real_files: bool = False) -> Path:
    """A copy of a shipped model folder whose config.json went through ``edit(cfg)``; the listed files
    are empty stand-ins unless ``real_files`` (links to the shipped ones)."""
    folder = tmp_path / analyzer_id
    folder.mkdir(parents=True)
    cfg = copy.deepcopy(shipped_json(analyzer_id))
    for name in cfg["files"]:
        if real_files:
            (folder / name).symlink_to(registry.MODELS_DIR / analyzer_id / name)
        else:
            (folder / name).write_bytes(b"")
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def assert_names(exc: AnalyzerConfigError, folder: Path, key: str, *words: str) -> None:
    msg = str(exc)
    assert isinstance(exc, ValueError)
    assert exc.key == key and exc.path == folder / "config.json"
    assert str(folder / "config.json") in msg and f"'{key}'" in msg, msg
    for w in words:
        assert w in msg, msg


def delete(path: str):
    def edit(cfg):
        *parents, last = path.split(".")
        for p in parents:
            cfg = cfg[p]
        del cfg[last]
    return edit


def put(path: str, value):
    def edit(cfg):
        *parents, last = path.split(".")
        for p in parents:
            cfg = cfg[p]
        cfg[last] = value
    return edit


CASES = {
    # a missing key
    "missing name": (delete("name"), "name", "missing"),
    "missing labels": (delete("labels"), "labels", "missing"),
    "missing files": (delete("files"), "files", "missing"),
    "missing preprocess": (delete("preprocess"), "preprocess", "missing"),
    "missing preprocess.size": (delete("preprocess.size"), "preprocess.size", "missing"),
    "missing ood threshold": (delete("calibration.ood.threshold"), "calibration.ood.threshold", "missing"),
    # a key of the wrong type (or out of range)
    "temperature as text": (put("calibration.temperature", "warm"), "calibration.temperature", "number", "'warm'"),
    "temperature zero": (put("calibration.temperature", 0), "calibration.temperature", "must be in"),
    "threshold above one": (put("calibration.malignant_threshold", 1.5), "calibration.malignant_threshold",
                            "must be in"),
    "referral band above the threshold": (put("calibration.confident_negative_below", 0.9),
                                          "calibration.confident_negative_below", "must be in"),
    "grayscale as text": (put("preprocess.grayscale", "yes"), "preprocess.grayscale", "true or false"),
    "size as float": (put("preprocess.size", 192.5), "preprocess.size", "integer"),
    "min area as bool": (put("segmenter.min_area_px", True), "segmenter.min_area_px", "integer"),
    "labels as text": (put("labels", "Benign"), "labels", "list of non-empty strings"),
    "calibration as list": (put("calibration", []), "calibration", "expected an object"),
    "unknown tta": (put("preprocess.tta", "vflip"), "preprocess.tta", "'vflip'", "hflip"),
    "bad wording template": (put("report_wording.malignant", "ALL ({lable})"), "report_wording.malignant",
                             "template"),
    "misspelt key": (put("calibration.uncertain_bellow", 0.9), "calibration.uncertain_bellow", "unknown key"),
    "segmenter size differs": (put("segmenter.size", 224), "segmenter.size", "preprocess.size"),
    # an unknown label
    "unknown malignant label": (put("malignant_labels", ["Early", "Blast"]), "malignant_labels",
                                "unknown label 'Blast'"),
    "unknown display name": (put("display_names.Blast", "Blast cell"), "display_names.Blast", "unknown label"),
    "repeated label": (put("labels", ["Benign", "Early", "Early", "Pro"]), "labels", "repeats 'Early'"),
    # a vector of the wrong length
    "class_bias too short": (put("calibration.class_bias", [0.0, 0.1, 0.2]), "calibration.class_bias",
                             "expected 4 values (one per label), got 3"),
    "mean of two channels": (put("preprocess.mean", [0.5, 0.5]), "preprocess.mean", "expected 3 values"),
    # a missing file
    "listed file absent": (put("files", ["classifier.onnx", "head.npz", "ood.npz", "segmenter.onnx", "extra.onnx"]),
                           "files", "'extra.onnx'"),
    "ood stats not listed": (put("files", ["classifier.onnx", "head.npz", "segmenter.onnx"]),
                             "calibration.ood.stats", "not listed in 'files'"),
    "file outside the folder": (put("files", ["../classifier.onnx"]), "files", "plain file name"),
    "unknown heatmap": (put("heatmap", "gradcam++"), "heatmap", "'gradcam++'", "positive_call"),
    "unknown slice plane": (put("dicom_checks", {"planes": ["transverse"]}), "dicom_checks.planes", "'transverse'"),
    "misspelt dicom check": (put("dicom_checks", {"plane": ["axial"]}), "dicom_checks.plane", "unknown key"),
    # the untyped call
    "untyped label is an output": (put("untyped_label", "Early"), "untyped_label", "network output"),
    "type domain without untyped call": (put("calibration.type_domain", {"stats": "ood.npz", "threshold": 3.0}),
                                         "calibration.type_domain", "untyped_label"),
    "type domain stats not listed": (put("calibration.type_domain", {"stats": "types.npz", "threshold": 3.0}),
                                     "calibration.type_domain.stats", "not listed in 'files'"),
    "type domain threshold zero": (put("calibration.type_domain", {"stats": "ood.npz", "threshold": 0}),
                                   "calibration.type_domain.threshold", "must be in"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_config_names_the_file_and_the_key(tmp_path, case):
    edit, key, *words = CASES[case]
    folder = model_folder(tmp_path, edit)
    with pytest.raises(AnalyzerConfigError) as err:
        AnalyzerConfig.load(folder)
    assert_names(err.value, folder, key, *words)


def test_the_error_comes_when_the_analyzer_is_built(tmp_path):
    folder = model_folder(tmp_path, delete("calibration.temperature"), real_files=True)
    registry.get("smear-all", model_dir=folder)  # the default applies: a missing temperature is allowed
    folder = model_folder(tmp_path / "b", put("calibration.class_bias", [1.0]), real_files=True)
    with pytest.raises(AnalyzerConfigError) as err:
        registry.get("smear-all", model_dir=folder)
    assert_names(err.value, folder, "calibration.class_bias", "one per label")


def test_invalid_json_names_the_file(tmp_path):
    folder = model_folder(tmp_path, lambda cfg: None)
    (folder / "config.json").write_text('{"name": ')
    with pytest.raises(AnalyzerConfigError) as err:
        AnalyzerConfig.load(folder)
    assert str(folder / "config.json") in str(err.value) and "not valid JSON" in str(err.value)


def test_checks_against_the_network_run_at_start_up(tmp_path):
    """What only the analyzer can check (the classifier's outputs, the files it loads) also fails at build."""
    folder = model_folder(tmp_path, put("calibration.ood.input", "ood_featurez"), "bone-xray", real_files=True)
    with pytest.raises(AnalyzerConfigError) as err:
        registry.get("bone-xray", model_dir=folder)
    assert_names(err.value, folder, "calibration.ood.input", "'ood_featurez'", "ood_features")
    folder = model_folder(tmp_path / "b", put("files", ["classifier.onnx", "ood.npz"]), "bone-xray", real_files=True)
    with pytest.raises(AnalyzerConfigError) as err:
        registry.get("bone-xray", model_dir=folder)
    assert_names(err.value, folder, "files", "'head.npz'")


def test_a_folder_loaded_as_another_analyzer_is_refused(tmp_path):
    folder = model_folder(tmp_path, lambda cfg: None, "brain-mri", real_files=True)
    with pytest.raises(AnalyzerConfigError) as err:
        registry.get("bone-xray", model_dir=folder)
    assert_names(err.value, folder, "id", "'brain-mri'", "'bone-xray'")


def test_a_folder_without_config_is_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        AnalyzerConfig.load(tmp_path)


def test_an_analyzer_without_config_says_which(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"analyzer smear-all: no config.json in {tmp_path}"):
        registry.get("smear-all", model_dir=tmp_path)


# ----------------------------------------------------------------------------- the cells section
def _both(threshold: float, borderline: float):
    def edit(cfg):
        cfg["cells"]["blast_threshold"], cfg["cells"]["blast_borderline"] = threshold, borderline
    return edit


def _classes(classes):
    def edit(cfg):
        cfg["cells"]["classes"], cfg["cells"]["served_as"] = classes, {}
    return edit


CELL_CASES = {
    "served as an unknown class": (put("cells.served_as", {"myelocyte": "lymphocyte"}), "cells.served_as.myelocyte",
                                   "unknown class"),
    "served as itself": (put("cells.served_as", {"hematogone": "hematogone"}), "cells.served_as.hematogone",
                         "not one of"),
    "borderline above the blast threshold": (_both(0.3, 0.6), "cells.blast_borderline", "must not exceed"),
    "classifier not listed": (put("files", []), "cells.classifier", "not listed in 'files'"),
    "temperature as text": (put("cells.temperature", "warm"), "cells.temperature", "number"),
    "count target zero": (put("cells.count_target", 0), "cells.count_target", "at least 1"),
    "misspelt key": (put("cells.unidentified_bellow", 0.5), "cells.unidentified_bellow", "unknown key"),
    "blasts served as another class": (put("cells.served_as", {"blast": "lymphocyte"}), "cells.served_as.blast",
                                       "always reported as blasts"),
    "a chain of served classes": (put("cells.served_as", {"hematogone": "lymphocyte", "lymphocyte": "monocyte"}),
                                  "cells.served_as.hematogone", "itself served as"),
    "no blast class": (_classes(["neutrophil", "lymphocyte"]), "cells.classes", "must include 'blast'"),
    "a class outside the vocabulary": (_classes(["blast", "smudge"]), "cells.classes", "'smudge'"),
    "ood threshold without stats": (delete("cells.ood_stats"), "cells.ood_stats", "go together"),
    "ood stats not listed": (put("files", ["cell_classifier.onnx"]), "cells.ood_stats", "not listed in 'files'"),
    "crop size disagrees": (put("preprocess.size", 96), "preprocess.size", "is 96", "80 px"),
}


@pytest.mark.parametrize("case", list(CELL_CASES))
def test_a_broken_cells_section_names_the_key(tmp_path, case):
    if "smear-differential" not in registry.available():
        pytest.skip("smear-differential model not installed")
    edit, key, *words = CELL_CASES[case]
    folder = model_folder(tmp_path, edit, "smear-differential")
    with pytest.raises(AnalyzerConfigError) as err:
        AnalyzerConfig.load(folder)
    assert_names(err.value, folder, key, *words)


def test_the_differential_analyzer_needs_a_cells_section(tmp_path):
    if "smear-differential" not in registry.available():
        pytest.skip("smear-differential model not installed")
    folder = model_folder(tmp_path, delete("cells"), "smear-differential", real_files=True)
    with pytest.raises(AnalyzerConfigError) as err:
        registry.get("smear-differential", model_dir=folder)
    assert_names(err.value, folder, "cells", "missing")


def test_a_differential_config_that_disagrees_with_its_network_fails_at_start_up(tmp_path):
    if "smear-differential" not in registry.available():
        pytest.skip("smear-differential model not installed")
    folder = model_folder(tmp_path, _classes(["blast", "neutrophil", "lymphocyte"]), "smear-differential",
                          real_files=True)
    with pytest.raises(AnalyzerConfigError) as err:
        registry.get("smear-differential", model_dir=folder)
    assert_names(err.value, folder, "cells.classes", "lists 3 classes", "10 outputs")


# ----------------------------------------------------------------------------- the referral band
def test_a_negative_inside_the_referral_band_is_referred():
    """Below the threshold the call is 'no tumour'; it stays ok only below confident_negative_below."""
    an = copy.copy(registry.get("brain-mri"))
    an.uncertain_below, an.malignant_threshold, an.confident_negative_below = 0.5, 0.4, 0.1
    labels = an.labels
    clear = np.array([0.02 if l != "notumor" else 0.94 for l in labels])  # P(tumour) 0.06
    doubtful = np.array([0.08 if l != "notumor" else 0.76 for l in labels])  # P(tumour) 0.24
    assert an.decide(clear, None)[0] == "ok"
    status, msgs, p_mal, malignant = an.decide(doubtful, None)
    assert (status, malignant) == ("uncertain", False) and p_mal == pytest.approx(0.24)
    assert any("not ruled out with confidence (probability 24.0%, ruled out only below 10.0%)" in m for m in msgs)
    an.confident_negative_below = None
    assert an.decide(doubtful, None)[0] == "ok"


# ----------------------------------------------------------------------------- the withheld type
def _tumour_result(an, top: str):
    probs = {l: (0.85 if l == top else 0.05) for l in an.labels}
    return AnalysisResult(analyzer_id=an.id, status="ok", label=top, label_display=an.config.display_name(top),
                          probabilities=dict(probs), confidence=0.85, malignant=top in an.malignant_labels,
                          malignant_probability=sum(p for l, p in probs.items() if l in an.malignant_labels))


def test_a_tumour_call_unlike_the_typed_collection_loses_its_type_not_its_call():
    an = copy.copy(registry.get("brain-mri"))
    assert an.type_domain is not None and an.untyped_label == "tumour" and "tumour" in an.positive_calls
    mean, precision, threshold = an.type_domain
    near, far = mean[0], mean[0] + 10 * threshold / np.sqrt(precision.diagonal())  # far along every axis
    res = _tumour_result(an, "meningioma")
    an.withhold_type(res, near)
    assert (res.label, res.confidence) == ("meningioma", 0.85) and res.extra["type_distance"] < threshold
    res = _tumour_result(an, "meningioma")
    before = dict(res.probabilities)
    an.withhold_type(res, far)
    assert (res.label, res.label_display, res.malignant) == ("tumour", "Brain tumour, type not suggested", True)
    assert res.probabilities == pytest.approx({"tumour": 0.95, "notumor": 0.05}) and res.confidence == pytest.approx(0.95)
    assert res.network_probabilities == before  # the network's own, per type, kept for evaluation
    assert any("No brain tumour type is suggested" in m and "call stands" in m for m in res.messages)
    assert an.interpretation("tumour").startswith("Appearance suggestive of an intracranial tumour; no type")
    clear = _tumour_result(an, "notumor")
    an.withhold_type(clear, far)
    assert clear.label == "notumor" and "type_distance" not in clear.extra  # no type shown, none withheld



def test_the_brain_heatmap_explains_the_tumour_call_not_the_type():
    an = registry.get("brain-mri")
    w, labels = an.head_weight, an.labels
    tumour = [labels.index(l) for l in ("glioma", "meningioma", "pituitary")]
    expected = w[tumour].mean(0) - w[labels.index("notumor")]
    np.testing.assert_allclose(an.heatmap_weights, expected)
    assert registry.get("bone-xray").heatmap_weights is None  # the top class, as before


def test_a_real_tumour_slice_served_without_its_type(brain_data):
    """End to end: with the type domain shrunk to nothing, a test-split glioma keeps its tumour call
    and is served without a type."""
    from oncoscope.training.data import load_manifest
    from oncoscope.training.recipes import RECIPES

    an = copy.copy(registry.get("brain-mri"))
    an.type_domain = (*an.type_domain[:2], 1e-9)
    m = load_manifest(RECIPES["brain-mri"]["manifest"])
    path = next(p for p, e in sorted(m["files"].items()) if e["split"] == "test" and e["label"] == "glioma"
                and p.startswith("brain-mri/"))
    res = an.analyze(brain_data.parent / path)
    assert res.malignant and res.label == "tumour" and set(res.probabilities) == {"tumour", "notumor"}
    assert set(res.network_probabilities) == set(an.labels) and res.extra["type_distance"] > 0
    assert res.to_dict()["label_display"] == "Brain tumour, type not suggested"


# ----------------------------------------------------------------------------- class information
def shipped_class_info(analyzer_id: str) -> dict:
    return json.loads((registry.MODELS_DIR / analyzer_id / "class_info.json").read_text())


@pytest.mark.parametrize("analyzer_id", registry.available())
def test_every_call_of_a_shipped_analyzer_is_described(analyzer_id):
    an = registry.get(analyzer_id)
    assert an.described_classes[-1] == "Nondiagnostic" and set(an.call_labels) <= set(an.described_classes)
    for label in an.call_labels + ["Nondiagnostic"]:
        info = an.class_info(label)
        assert info.summary and info.confirmation and info.referral, label
        assert all(r.text and (r.url is None or r.url.startswith("https://")) for r in info.references)
    assert all(info.references for info in an.config.class_info.values())
    assert an.class_info("no-such-class") is None and an.class_info(None) is None
    assert dict(an.config.class_info) == {k: an.class_info(k) for k in shipped_class_info(analyzer_id)}


def test_a_cell_class_may_be_described_by_the_differential_only():
    if "smear-differential" not in registry.available():
        pytest.skip("smear-differential model not installed")
    blast = registry.get("smear-differential").class_info("blast")
    assert "immature" in blast.summary and any("ICSH" in r.text for r in blast.references)
    assert registry.get("smear-all").class_info("blast") is None


def class_info_folder(tmp_path: Path, edit, analyzer_id: str = "bone-xray") -> Path:
    """A model folder (see ``model_folder``) with the shipped class_info.json after ``edit(info)``."""
    folder = model_folder(tmp_path, lambda cfg: None, analyzer_id)
    info = copy.deepcopy(shipped_class_info(analyzer_id))
    edit(info)
    (folder / "class_info.json").write_text(json.dumps(info))
    return folder


CLASS_INFO_CASES = {
    "a call label left out": (delete("normal"), "normal", "missing", "every call label"),
    "an unknown label": (put("osteoma", {}), "osteoma", "unknown label 'osteoma'", "cancer, normal"),
    "the shared label": (put("Nondiagnostic", {}), "Nondiagnostic", "shared by every analyzer"),
    "an entry as text": (put("cancer", "bad"), "cancer", "expected an object"),
    "a missing summary": (delete("cancer.summary"), "cancer.summary", "missing"),
    "an empty referral": (put("cancer.referral", ""), "cancer.referral", "non-empty string"),
    "a number as confirmation": (put("cancer.confirmation", 3), "cancer.confirmation", "non-empty string"),
    "a misspelt key": (put("cancer.refferal", "soon"), "cancer.refferal", "unknown key"),
    "no references": (put("cancer.references", []), "cancer.references", "non-empty list"),
    "references as text": (put("cancer.references", "WHO 2020"), "cancer.references", "non-empty list"),
    "a reference as text": (put("cancer.references", ["WHO 2020"]), "cancer.references[0]", "expected an object"),
    "a reference without text": (put("cancer.references", [{"url": "https://example.org"}]),
                                 "cancer.references[0].text", "missing"),
    "a reference link to a script": (put("cancer.references", [{"text": "x", "url": "javascript:alert(1)"}]),
                                     "cancer.references[0].url", "http(s) address"),
}


@pytest.mark.parametrize("case", list(CLASS_INFO_CASES))
def test_broken_class_info_names_its_file_and_key(tmp_path, case):
    edit, key, *words = CLASS_INFO_CASES[case]
    folder = class_info_folder(tmp_path, edit)
    with pytest.raises(AnalyzerConfigError) as err:
        AnalyzerConfig.load(folder)
    assert err.value.key == key and err.value.path == folder / "class_info.json", str(err.value)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_class_info_that_is_not_json_or_not_an_object(tmp_path):
    folder = class_info_folder(tmp_path, lambda info: None)
    (folder / "class_info.json").write_text('{"cancer": ')
    with pytest.raises(AnalyzerConfigError, match="not valid JSON"):
        AnalyzerConfig.load(folder)
    (folder / "class_info.json").write_text('["cancer"]')
    with pytest.raises(AnalyzerConfigError, match="expected an object") as err:
        AnalyzerConfig.load(folder)
    assert err.value.path == folder / "class_info.json"


def test_class_info_is_optional_and_outside_the_model_digest(tmp_path):
    """A folder without class_info.json has no class pages (only the shared non-diagnostic one is
    known); rewording a class page changes neither the config nor the model's digest."""
    bare = model_folder(tmp_path / "bare", lambda cfg: None, "bone-xray", real_files=True)
    an = registry.get("bone-xray", model_dir=bare)
    assert an.config.class_info == {} and an.described_classes == [] and an.class_info("cancer") is None
    assert an.class_info("Nondiagnostic") is not None
    reworded = model_folder(tmp_path / "reworded", lambda cfg: None, "bone-xray", real_files=True)
    info = shipped_class_info("bone-xray")
    info["cancer"]["summary"] = "Reworded."
    (reworded / "class_info.json").write_text(json.dumps(info))
    an2 = registry.get("bone-xray", model_dir=reworded)
    assert an2.class_info("cancer").summary == "Reworded." and an2.model_info.sha256 == an.model_info.sha256
    assert an2.config.to_dict() == an.config.to_dict()
