"""The shipped smear-all analyzer, on images generated here (dataset tests are separate)."""

import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from oncoscope.analyzers import registry
from oncoscope.analyzers.base import AnalysisResult
from oncoscope.analyzers.smear_all import SUBTYPE_NOTE
from oncoscope.ml import synthetic


def png(arr) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


def test_registry_lists_and_caches(smear_analyzer):
    assert "smear-all" in registry.available()
    assert registry.get("smear-all") is smear_analyzer
    with pytest.raises(registry.UnknownAnalyzer, match="unknown analyzer 'nope'"):
        registry.get("nope")


def test_analyzer_declares_its_contract(smear_analyzer):
    d = smear_analyzer.describe()
    assert d["labels"] == ["Benign", "Early", "Pre", "Pro"]
    assert d["malignant_labels"] == ["Early", "Pre", "Pro"]
    assert d["display_names"]["Early"] == "Early Pre-B ALL"
    assert len(d["sha256"]) == 64
    assert smear_analyzer.config.calibration.temperature > 0
    assert smear_analyzer.ood_threshold is not None


def test_full_result_on_a_generated_field(geometry_analyzer):
    an = geometry_analyzer
    rgb, truth = synthetic.smear_like(3, size=224, n_wbc=3)
    r = an.analyze(rgb)
    assert isinstance(r, AnalysisResult)
    assert r.status in ("ok", "uncertain")
    assert set(r.probabilities) == set(an.labels)
    assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert r.model.version and len(r.model.sha256) == 64
    assert r.label in an.labels and r.label_display
    assert r.mask.shape == (224, 224) and r.mask.dtype == np.int32
    assert r.heatmap.shape == (224, 224) and 0.0 <= r.heatmap.min() and r.heatmap.max() <= 1.0
    assert r.cell_count == len(r.cells) == len(np.unique(r.mask[r.mask > 0]))
    for c in r.cells:
        assert {"area_px", "equivalent_diameter_px", "circularity", "bbox", "centroid"} <= set(c)
    d = r.to_dict()
    json.dumps(d)  # serialisable
    assert {"label", "probabilities", "status", "cells", "error", "model"} <= set(d)
    # a subtype is a morphological suggestion: flow cytometry decides, and the result says so
    assert (SUBTYPE_NOTE in r.messages) == (r.label in an.malignant_labels)


def test_non_square_images_map_back_to_input_coordinates(geometry_analyzer):
    rgb, _ = synthetic.smear_like(5, size=300, n_wbc=4)
    rgb = rgb[:200]  # 300 wide x 200 high
    r = geometry_analyzer.analyze(rgb)
    assert r.status in ("ok", "uncertain")
    assert r.mask.shape == (200, 300) and r.heatmap.shape == (200, 300)
    for c in r.cells:
        x0, y0, x1, y1 = c["bbox"]
        assert 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 200


@pytest.mark.parametrize("kind", ["noise", "flat", "text", "checkerboard", "photo"])
def test_generated_non_smears_are_out_of_domain(smear_analyzer, kind):
    flagged = [smear_analyzer.analyze(synthetic.GENERATORS[kind](1000 + i)).status == "out_of_domain" for i in range(5)]
    assert sum(flagged) >= 4, f"{kind}: only {sum(flagged)}/5 flagged"


def test_blank_image_is_out_of_domain_with_reason(smear_analyzer):
    r = smear_analyzer.analyze(np.full((64, 64, 3), 200, np.uint8))
    assert r.status == "out_of_domain" and r.label is None and "blank" in r.messages[0]


@pytest.mark.parametrize("payload, fragment", [
    (b"", "empty"),
    (b"not an image at all", "not a recognised image"),
    (png(np.zeros((10, 10, 3), np.uint8)), "at least"),
])
def test_bad_input_gives_error_status_not_exception(smear_analyzer, payload, fragment):
    r = smear_analyzer.analyze(payload)
    assert r.status == "error" and fragment in r.error and r.label is None


def test_truncated_upload(smear_analyzer):
    data = png(synthetic.smear_like(1)[0])
    r = smear_analyzer.analyze(data[: len(data) // 2])
    assert r.status == "error" and r.error


def test_same_answer_from_many_threads(geometry_analyzer):
    an = geometry_analyzer
    imgs = [synthetic.smear_like(i)[0] for i in range(6)]
    seq = [an.analyze(im) for im in imgs]
    with ThreadPoolExecutor(4) as ex:
        par = list(ex.map(an.analyze, imgs * 2))
    for a, b in zip(seq * 2, par):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)
        assert a.cell_count == b.cell_count and np.array_equal(a.mask, b.mask)


def test_model_card_describes_the_shipped_weights(smear_analyzer):
    card = json.loads((registry.MODELS_DIR / "smear-all" / "model_card.json").read_text())
    assert card["analyzer"]["sha256"] == smear_analyzer.model_info.sha256, "model card is stale: re-run oncoscope evaluate"
    assert card["data"]["manifest"].endswith("all-taleqani.json")
    assert card["training"]["commands"], "training command missing from the card"
    for png_name in ("confusion_matrix.png", "roc.png", "reliability.png", "sample_overlays.png"):
        assert (registry.MODELS_DIR / "smear-all" / png_name).stat().st_size > 1000


def test_serving_does_not_import_torch():
    code = ("import sys; from oncoscope.analyzers import registry; from oncoscope.ml import synthetic;"
            "r = registry.get('smear-all').analyze(synthetic.smear_like(0)[0]); print(r.status, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "False"


def test_very_large_image_is_analysed_at_working_size(geometry_analyzer):
    small = synthetic.smear_like(4, size=224, n_wbc=3)[0]
    big = np.asarray(Image.fromarray(small).resize((6000, 4000), Image.BILINEAR))
    r = geometry_analyzer.analyze(big)
    assert r.status in ("ok", "uncertain")
    assert r.image_size == (6000, 4000) and r.analysis_scale == pytest.approx(6000 / 4096)
    assert r.mask.shape == (2731, 4096) and r.heatmap.shape == (2731, 4096)
    assert r.cells, "expected the enlarged white cells to be found"
    for c in r.cells:
        x0, y0, x1, y1 = c["bbox"]
        assert 0 <= x0 < x1 <= 6000 and 0 <= y0 < y1 <= 4000
        assert c["area_px"] > 1000  # measured in original (enlarged) pixels
