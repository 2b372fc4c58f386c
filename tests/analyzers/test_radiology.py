"""The shipped radiology analyzers (bone-xray, brain-mri), on images generated here.

Each test runs for both analyzers (the ``radiology_analyzer`` fixture is parametrised);
dataset-dependent checks are in ``test_radiology_dataset.py``.
"""

import io
import json

import numpy as np
import pytest
from PIL import Image

from oncoscope.analyzers import registry
from oncoscope.analyzers.base import STATUSES
from oncoscope.ml import synthetic
from oncoscope.imaging.imageio import load_image, pad_to_square

from ..imaging.test_dicom import make_dicom, to_bytes

EXPECTED = {
    "bone-xray": {"labels": ["cancer", "normal"], "malignant": ["cancer"], "dicom": "DX", "wrong_dicom": "CT"},
    "brain-mri": {"labels": ["glioma", "meningioma", "notumor", "pituitary"],
                  "malignant": ["glioma", "meningioma", "pituitary"], "dicom": "MR", "wrong_dicom": "CR"},
}


def test_registry_lists_all_three_analyzers():
    assert {"smear-all", "bone-xray", "brain-mri"} <= set(registry.available())


def test_analyzer_declares_its_contract(radiology_analyzer):
    an = radiology_analyzer
    exp = EXPECTED[an.id]
    d = an.describe()
    assert d["labels"] == exp["labels"]
    assert d["malignant_labels"] == exp["malignant"]
    assert d["modality"].startswith("radiology/")
    assert exp["dicom"] in d["dicom_modalities"] and exp["wrong_dicom"] not in d["dicom_modalities"]
    assert d["positive_term"] and d["input_description"]
    assert set(d["display_names"]) == set(exp["labels"]) | ({d["untyped_label"]} if d["untyped_label"] else set())
    wording = an.report_wording
    assert {"finding", "malignant", "benign", "disclaimer"} <= set(wording)
    positive = exp["malignant"][0]
    assert an.interpretation(positive) == wording["malignant"].format(label=an.display_names[positive])
    negative = next(l for l in exp["labels"] if l not in exp["malignant"])
    assert an.interpretation(negative) == wording["benign"] and an.interpretation(None) is None
    cal = an.config.calibration
    assert cal.temperature > 0 and 0 < cal.malignant_threshold <= 0.5
    assert an.ood_threshold is not None and an.gray
    assert registry.get(an.id) is an


def test_full_result_on_a_generated_non_square_image(radiology_geometry):
    an = radiology_geometry
    rgb = synthetic.radiograph_like(1, width=240, height=320)
    r = an.analyze(rgb)
    assert r.status in ("ok", "uncertain")
    assert set(r.probabilities) == set(an.labels)
    assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert r.label in an.labels and r.label_display == an.display_names[r.label]
    p_pos = sum(r.probabilities[l] for l in an.malignant_labels)
    assert r.malignant_probability == pytest.approx(p_pos, abs=1e-9)
    assert r.malignant == (p_pos >= an.malignant_threshold)
    # no segmentation: no cells, no mask, and no pretend "0 cells"
    assert r.cell_count is None and r.cells == [] and r.mask is None
    assert r.heatmap.shape == (320, 240) and 0.0 <= r.heatmap.min() and r.heatmap.max() <= 1.0
    d = r.to_dict()
    json.dumps(d)
    assert d["cell_count"] is None and d["analyzer"] == an.id
    assert {"label", "probabilities", "status", "cells", "error", "model"} <= set(d)


def test_colour_input_is_read_as_luminance(radiology_geometry):
    an = radiology_geometry
    gray = synthetic.radiograph_like(2)
    tinted = np.clip(gray.astype(int) + np.array([25, -10, -15]), 0, 255).astype(np.uint8)
    lum = np.asarray(Image.fromarray(tinted).convert("L"))
    a, b = an.analyze(tinted), an.analyze(np.repeat(lum[:, :, None], 3, axis=2))
    assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)


def test_aspect_ratio_is_preserved_by_padding(radiology_geometry):
    an = radiology_geometry
    tall = synthetic.radiograph_like(3, width=120, height=360)
    x, (top, left), side = an.preprocess(tall)
    assert x.shape == (1, 3, an.size, an.size) and (top, left, side) == (0, 120, 360)
    square, _ = pad_to_square(tall)
    x2, _, _ = an.preprocess(square)
    np.testing.assert_allclose(x, x2)
    # the padding is the border colour (dark), not stretched anatomy
    col = x[0, 0, :, 2]  # a column inside the left padding
    assert np.ptp(col) < 0.05


@pytest.mark.parametrize("case", ["right", "wrong"])
def test_dicom_modality_is_checked_before_the_network(radiology_analyzer, case):
    an = radiology_analyzer
    exp = EXPECTED[an.id]
    modality = exp["dicom"] if case == "right" else exp["wrong_dicom"]
    # a 12-bit image with a VOI window, as a modality would send it
    gray = synthetic.radiograph_like(4)[..., 0].astype(np.uint16) * 16
    ds = make_dicom(gray, bits_allocated=16, bits_stored=12, modality=modality,
                    extra={"WindowCenter": 2048, "WindowWidth": 4096})
    r = an.analyze(load_image(io.BytesIO(to_bytes(ds))))
    assert r.status in STATUSES and r.status != "error"
    if case == "wrong":
        assert r.status == "out_of_domain" and r.label is None and r.malignant is None
        assert f"modality {modality}" in r.messages[0]
    else:
        assert not any("DICOM modality" in m for m in r.messages)


BRAIN_SERIES = {  # what the DICOM header says -> the word the refusal names (None: read)
    "axial FLAIR": ({"SeriesDescription": "AX T2 FLAIR", "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
                     "BodyPartExamined": "HEAD"}, None),
    "coronal T1 post": ({"SeriesDescription": "COR T1 +C", "ImageOrientationPatient": [1, 0, 0, 0, 0, -1]}, None),
    "ADC map": ({"SeriesDescription": "ep2d_diff ADC", "ImageType": ["DERIVED", "PRIMARY", "ADC"]}, "ADC"),
    "diffusion by b-value": ({"SeriesDescription": "axial b1000", "DiffusionBValue": 1000}, "b-value 1000"),
    "localiser": ({"SeriesDescription": "localizer"}, "LOCALIZER"),
    "oblique slice": ({"ImageOrientationPatient": [1, 0, 0, 0, 0.7071, 0.7071]}, "oblique"),
    "knee": ({"BodyPartExamined": "KNEE"}, "KNEE"),
}


@pytest.mark.parametrize("case", list(BRAIN_SERIES))
def test_brain_series_the_model_never_saw_are_refused_by_their_header(case):
    """An MR file is not enough: diffusion maps, localisers, oblique slices and other body parts were
    never in training, and the header says so before the network is asked."""
    an = registry.get("brain-mri")
    tags, refused = BRAIN_SERIES[case]
    gray = synthetic.radiograph_like(5)[..., 0]
    ds = make_dicom(gray, modality="MR", extra=tags)
    r = an.analyze(load_image(io.BytesIO(to_bytes(ds))))
    if refused is None:
        assert r.status != "out_of_domain" or "not a kind" not in " ".join(r.messages)
        assert not any("No diagnosis is given" in m and "reads brain MR slices" in m for m in r.messages)
    else:
        assert r.status == "out_of_domain" and r.label is None and refused in r.messages[0], r.messages


def test_the_slice_plane_comes_from_the_orientation():
    gray = synthetic.radiograph_like(5)[..., 0]
    planes = {"axial": [1, 0, 0, 0, 1, 0], "coronal": [1, 0, 0, 0, 0, -1], "sagittal": [0, 1, 0, 0, 0, -1],
              "oblique": [1, 0, 0, 0, 0.7071, 0.7071], "": None}
    for plane, iop in planes.items():
        ds = make_dicom(gray, modality="MR", extra={"ImageOrientationPatient": iop} if iop else {})
        assert load_image(io.BytesIO(to_bytes(ds))).dicom.plane == plane


def test_blank_and_bad_input(radiology_analyzer):
    an = radiology_analyzer
    r = an.analyze(np.full((200, 200, 3), 17, np.uint8))
    assert r.status == "out_of_domain" and "blank" in r.messages[0]
    r = an.analyze(b"%PDF-1.4 not an image")
    assert r.status == "error" and r.error
    r = an.analyze(np.zeros((8, 8, 3), np.uint8))
    assert r.status == "error" and "16x16" in r.error


def test_model_card_describes_the_shipped_weights(radiology_analyzer):
    an = radiology_analyzer
    folder = registry.MODELS_DIR / an.id
    card = json.loads((folder / "model_card.json").read_text())
    assert card["analyzer"]["sha256"] == an.model_info.sha256, "model card is stale: re-run oncoscope evaluate"
    assert card["data"]["manifest"].endswith(f"{an.id}.json")
    assert card["training"]["commands"], "training command missing from the card"
    m = card["test"]["metrics"]
    assert {"accuracy", "ece", "macro_roc_auc", "per_class", "malignant_vs_benign"} <= set(m)
    assert set(m["per_class"]) == set(an.labels)
    for v in m["per_class"].values():
        assert {"sensitivity", "specificity", "roc_auc"} <= set(v)
    assert "accuracy" in card["test"]["ci95_cluster_bootstrap"]
    assert card["targets"] and all({"target", "goal", "measured", "met"} <= set(t) for t in card["targets"])
    for png_name in ("confusion_matrix.png", "roc.png", "reliability.png", "sample_overlays.png"):
        assert (folder / png_name).stat().st_size > 1000
    md = (folder / "model_card.md").read_text()
    assert an.model_info.sha256 in md and "## Targets" in md


def test_validation_summary_names_the_positive_call(radiology_analyzer):
    s = radiology_analyzer.validation_summary()
    assert radiology_analyzer.positive_term in s and "accuracy" in s
