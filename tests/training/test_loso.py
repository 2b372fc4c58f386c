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
    scale, below, info = loso.fit_referral(tumour + [rec("notumor", 0.01)] * 50, MAL, 0.4)
    assert scale == 1.0
    assert below == pytest.approx(0.02)  # at 0.02 only the 0.01 miss stays ok
    assert info["tumour_images"] == 100 and info["confident_misses_at_fit"] == 1


def test_band_ignores_test_images_and_referred_misses_and_stays_below_the_threshold():
    tumour = [rec("glioma", 0.9)] * 50
    tumour += [rec("glioma", 0.001, split="test")] * 20  # never seen by the fit
    tumour += [rec("glioma", 0.001, status="out_of_domain")] * 5  # already referred
    scale, below, info = loso.fit_referral(tumour, MAL, threshold=0.08)
    assert below == pytest.approx(0.08) and info["tumour_images"] == 55  # never above the shipped threshold


def test_band_is_fitted_on_whole_collections_left_out_when_there_are_any():
    inst = [dict(rec("glioma", 0.3), left_out="tcga/DU")] * 10  # would allow nothing below 0.3
    whole = [rec("glioma", 0.9)] * 100 + [rec("glioma", 0.05)]
    scale, below, info = loso.fit_referral(inst + whole, MAL, 0.4)
    assert info["sources"] == ["tcga"] and below == pytest.approx(0.4)


def test_out_of_domain_threshold_is_tightened_only_as_far_as_needed():
    # confidently missed tumours that sit at 0.75-0.84 of the distance threshold: a band cannot help
    misses = [dict(rec("glioma", 0.0001), ood_distance=0.75 + 0.01 * i) for i in range(10)]
    others = [dict(rec("glioma", 0.9), ood_distance=0.5)] * 90
    scale, below, info = loso.fit_referral(misses + others, MAL, 0.4)
    assert scale == pytest.approx(0.75)  # 0.75 is the largest scale that flags all but one (1% of 100)
    assert info["confident_misses_at_fit"] == 1 and info["ood_threshold_scale"] == scale


def test_no_rule_that_meets_the_allowance_is_an_error():
    with pytest.raises(SystemExit, match="no referral rule"):
        loso.fit_referral([dict(rec("glioma", 0.0001), ood_distance=0.1)] * 10, MAL, 0.4)


def test_band_needs_tumour_images():
    with pytest.raises(SystemExit, match="no leave-one-source-out records"):
        loso.fit_referral([rec("notumor", 0.1)], MAL, 0.4)


def res(hm, malignant=True, label="glioma"):
    return SimpleNamespace(heatmap=hm, malignant=malignant, label=label)


def test_pointing_game_reads_the_peak(tmp_path):
    mask = np.zeros((40, 80), np.uint8)  # not square: a swapped resize would miss
    mask[5:10, 60:70] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    hm = np.zeros((80, 160), np.float32)  # heatmaps come at the input size; masks are resized to it
    hm[15, 130] = 1.0
    m = tmp_path / "m.png"
    assert loso.pointing(res(hm), m, MAL) == {"hit": True, "near": True}
    hm[15, 130], hm[40, 130] = 0.0, 1.0  # 20 px below the mask (in heatmap pixels)
    assert loso.pointing(res(hm), m, MAL) == {"hit": False, "near": False}
    hm[40, 130], hm[24, 130] = 0.0, 1.0  # 5 px below it: near
    assert loso.pointing(res(hm), m, MAL) == {"hit": False, "near": True}
    assert loso.pointing(res(hm, malignant=False), m, MAL) is None
    assert loso.pointing(res(hm, label="notumor"), m, MAL) is None  # called tumour, 'no tumour' on top
    assert loso.pointing(res(None), m, MAL) is None


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


def test_the_rule_that_refers_the_fewest_validation_images_wins():
    misses = [dict(rec("glioma", 0.03), ood_distance=0.9)] * 5  # a band of 0.03 or a scale of 0.89 catches them
    others = [dict(rec("glioma", 0.9), ood_distance=0.5)] * 95
    far = [dict(rec("notumor", 0.001), ood_distance=0.95)] * 50  # in-domain images near the distance threshold
    near = [dict(rec("notumor", 0.05), ood_distance=0.2)] * 5  # ... and a few doubtful negatives
    scale, band, info = loso.fit_referral(misses + others, MAL, 0.4, validation=far + near)
    assert (scale, band) == (1.0, 0.03) and info["validation_referred"] == round(5 / 55, 4)
