"""Per-source figures: confident errors counted as the card defines them, the referral band applied
to held-out answers, intervals present."""

import pytest

from oncoscope.evaluation import sources as S

MAL = {"glioma", "meningioma", "pituitary"}


def row(label, called, status="ok", top=None):
    return {"label": label, "called": called, "status": status, "top": top or label}


def test_call_figures_count_confident_errors():
    rows = ([row("glioma", True)] * 8 + [row("glioma", False)] + [row("glioma", False, "uncertain")]
            + [row("notumor", False)] * 9 + [row("notumor", True, "ok", "glioma")])
    f = S.call_figures(rows, MAL, MAL)
    assert f["sensitivity"]["rate"] == pytest.approx(0.8) and f["sensitivity"]["n"] == 10
    assert f["specificity"]["rate"] == pytest.approx(0.9)
    assert f["confident_misses"]["k"] == 1 and f["confident_misses"]["n"] == 10
    assert f["confident_false_alarms"]["k"] == 1
    assert f["referred"]["k"] == 1
    lo, hi = f["sensitivity"]["ci95"]
    assert lo < 0.8 < hi
    assert "accuracy" not in f  # one tumour type only: no 4-class accuracy for this source


def test_accuracy_only_for_sources_with_types():
    rows = [row("glioma", True), row("meningioma", True, top="glioma"), row("notumor", False)]
    assert S.call_figures(rows, MAL, MAL)["accuracy"]["k"] == 2


def test_left_out_applies_the_band_and_keeps_test_images_apart():
    recs = [{"label": "glioma", "p_malignant": p, "malignant_threshold": 0.4, "status": "ok", "top": "notumor",
             "split": split, "left_out": "tcga"} for p, split in [(0.05, "train"), (0.2, "test"), (0.9, "val")]]
    out = S.left_out(recs, MAL, MAL, band=0.1)["tcga"]
    assert out["all_images"]["confident_misses"]["k"] == 1  # 0.05 < band: stays ok, a confident miss
    assert out["all_images"]["referred"]["k"] == 1  # 0.2: inside the band, referred
    assert out["without_referral_band"]["confident_misses"]["k"] == 2
    assert out["test_images"]["n"] == 1 and out["test_images"]["confident_misses"]["k"] == 0
    assert out["pointing"] is None


def test_pointing_figures():
    pts = [{"hit": True, "near": True}] * 3 + [{"hit": False, "near": True}, None]
    f = S.pointing_figures(pts)
    assert f["slices"] == 5 and f["no_tumour_call"] == 1
    assert f["inside_mask"]["rate"] == 0.75 and f["within_8px"]["rate"] == 1.0
    assert S.pointing_figures([]) is None
