"""Leave-one-source-out: the referral band is fitted on held-out answers outside the test split and
keeps confident misses within the allowance; the pointing game reads the heatmap's peak."""

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from oncoscope.training import loso

MAL = {"glioma", "meningioma", "pituitary"}


def rec(label: str, p: float, split: str = "train", status: str = "ok", thr: float = 0.4) -> dict:
    return {"label": label, "p_malignant": p, "split": split, "status": status, "malignant_threshold": thr,
            "left_out": "tcga", "top": label}


def test_band_keeps_confident_misses_within_the_allowance():
    # 100 tumour images: 90 called, 10 missed at P = 0.01 ... 0.10; allowance 1% -> one miss may stay ok
    tumour = [rec("glioma", 0.9)] * 90 + [rec("glioma", 0.01 * (i + 1)) for i in range(10)]
    below, info = loso.fit_confident_negative(tumour + [rec("notumor", 0.01)] * 50, MAL)
    assert below == pytest.approx(0.02)  # at 0.02 only the 0.01 miss stays ok
    assert info["tumour_images"] == 100 and info["confident_misses_at_fit"] == 1


def test_band_ignores_test_images_and_referred_misses():
    tumour = [rec("glioma", 0.9)] * 50
    tumour += [rec("glioma", 0.001, split="test")] * 20  # never seen by the fit
    tumour += [rec("glioma", 0.001, status="out_of_domain")] * 5  # already referred
    below, info = loso.fit_confident_negative(tumour, MAL)
    assert below == pytest.approx(0.5) and info["tumour_images"] == 55


def test_band_needs_tumour_images():
    with pytest.raises(SystemExit, match="no leave-one-source-out records"):
        loso.fit_confident_negative([rec("notumor", 0.1)], MAL)


def test_pointing_game_reads_the_peak(tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 40:50] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    hm = np.zeros((128, 128), np.float32)  # heatmaps come at the input size; masks are resized to it
    hm[30, 90] = 1.0
    assert loso.pointing(SimpleNamespace(heatmap=hm, malignant=True), tmp_path / "m.png") == {"hit": True,
                                                                                              "near": True}
    hm[30, 90], hm[60, 90] = 0.0, 1.0  # 20 px below the mask (in heatmap pixels)
    assert loso.pointing(SimpleNamespace(heatmap=hm, malignant=True), tmp_path / "m.png") == {"hit": False,
                                                                                              "near": False}
    hm[60, 90], hm[44, 90] = 0.0, 1.0  # 5 px below it: near
    assert loso.pointing(SimpleNamespace(heatmap=hm, malignant=True), tmp_path / "m.png") == {"hit": False,
                                                                                              "near": True}
    assert loso.pointing(SimpleNamespace(heatmap=hm, malignant=False), tmp_path / "m.png") is None
    assert loso.pointing(SimpleNamespace(heatmap=None, malignant=True), tmp_path / "m.png") is None


def test_runs_lists_only_calibrated_models(tmp_path):
    import json

    done = tmp_path / "brain-mri-without-a" / "model"
    done.mkdir(parents=True)
    (done.parent / "manifest.json").write_text(json.dumps({"left_out": ["a"]}))
    (done / "config.json").write_text(json.dumps({"calibration": {}}))
    half = tmp_path / "brain-mri-without-b" / "model"
    half.mkdir(parents=True)
    (half.parent / "manifest.json").write_text(json.dumps({"left_out": ["b"]}))
    (half / "config.json").write_text(json.dumps({}))
    assert loso.runs("brain-mri", tmp_path) == [(["a"], done)]
