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
    f = S.call_figures(rows, MAL)
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
    assert S.call_figures(rows, MAL)["accuracy"]["k"] == 2


def test_left_out_applies_the_band_and_keeps_test_images_apart():
    recs = [{"label": "glioma", "p_malignant": p, "malignant_threshold": 0.4, "status": "ok", "top": "notumor",
             "split": split, "left_out": "tcga"} for p, split in [(0.05, "train"), (0.2, "test"), (0.9, "val")]]
    out = S.left_out(recs, MAL, band=0.1)["tcga"]
    recs[0]["ood_distance"] = 0.8  # within the validation threshold, beyond a 0.7 scale
    tightened = S.left_out(recs, MAL, band=0.1, scale=0.7)["tcga"]
    assert tightened["all_images"]["confident_misses"]["k"] == 0 and tightened["all_images"]["out_of_domain"]["k"] == 1
    assert out["all_images"]["confident_misses"]["k"] == 1  # 0.05 < band: stays ok, a confident miss
    assert out["all_images"]["referred"]["k"] == 1  # 0.2: inside the band, referred
    assert out["without_referral_rule"]["confident_misses"]["k"] == 2
    assert out["test_images"]["n"] == 1 and out["test_images"]["confident_misses"]["k"] == 0
    assert out["pointing"] is None


def test_pointing_figures():
    pts = [{"hit": True, "near": True}] * 3 + [{"hit": False, "near": True}, None]
    f = S.pointing_figures(pts)
    assert f["slices"] == 5 and f["no_tumour_call"] == 1
    assert f["inside_mask"]["rate"] == 0.75 and f["within_8px"]["rate"] == 1.0
    assert S.pointing_figures([]) is None


def test_per_source_and_card_text():
    from types import SimpleNamespace

    import numpy as np

    labels = ["glioma", "meningioma", "notumor", "pituitary"]
    test = [SimpleNamespace(path=f"f{i}", label=l) for i, l in enumerate(["glioma", "notumor", "glioma", "meningioma"])]
    files = {"f0": {"source": "tcga/DU", "block": 1}, "f1": {"source": "tcga/DU", "block": 1},
             "f2": {"source": "kaggle", "block": 2}, "f3": {"source": "kaggle", "block": 3}}
    probs = np.array([[0.9, 0, 0.1, 0], [0.05, 0, 0.95, 0], [0.01, 0, 0.99, 0], [0.1, 0.8, 0.1, 0]])
    served = [labels[int(np.argmax(p))] for p in probs]
    served[3] = "tumour"  # f3's type withheld: the served call differs from the network's top class
    an = SimpleNamespace(labels=labels, malignant_labels=["glioma", "meningioma", "pituitary"], untyped_label="tumour",
                         positive_calls={"glioma", "meningioma", "pituitary", "tumour"})
    ev = SimpleNamespace(an=an, probs=probs, mal=[0, 1, 3], thr=0.08, test=test,
                         manifest={"files": files, "dataset": "x"}, st=np.array(["ok", "uncertain", "ok", "ok"]),
                         results=[SimpleNamespace(label=l) for l in served])
    out = S.per_source(ev)
    assert out["tcga/DU"]["type_suggestion"]["typed"]["k"] == 1 and out["tcga/DU"]["type_suggestion"]["type_right"]["k"] == 1
    kaggle_types = out["kaggle"]["type_suggestion"]  # f2 called no tumour; f3 called tumour without a type
    assert kaggle_types["tumour_calls"] == 1 and kaggle_types["typed"]["k"] == 0 and kaggle_types["type_right"] is None
    assert out["tcga/DU"]["blocks"] == 1 and out["tcga/DU"]["n"] == 2
    assert out["kaggle"]["confident_misses"]["k"] == 1  # f2: glioma at P(tumour) 0.01, ok
    assert out["kaggle"]["accuracy"]["k"] == 1  # two tumour types in kaggle: accuracy shown
    card = {"sources": out, "calibration": {"confident_negative_below": 0.02},
            "leave_one_source_out": {"tcga": {"blocks": 5, "all_images": out["kaggle"], "test_images": out["kaggle"],
                                              "without_referral_rule": out["kaggle"], "pointing": None}},
            "localisation": {"slices": 3, "no_tumour_call": 1,
                             "inside_mask": {"k": 1, "n": 2, "rate": 0.5, "ci95": [0.1, 0.9]},
                             "within_8px": {"k": 2, "n": 2, "rate": 1.0, "ci95": [0.3, 1.0]}}}
    text = "\n".join(S.source_markdown(card, "brain tumour"))
    assert "## Per source (test split)" in text and "| tcga/DU | 2 (1) |" in text
    assert "P(brain tumour) < 0.02" in text and "| tcga | 2 (5) |" in text
    assert "| shipped model, test split | 3 | 1 | 50.0% (10-90; 1/2) | 100.0% (30-100; 2/2) |" in text
    assert "## Tumour type suggestion (test split)" in text and "| kaggle | 1 | 0.0% (" in text
    assert S.source_markdown({}, "x") == []


def test_a_class_from_one_collection_is_named_in_the_card():
    m = {"dataset": "kaggle", "files": {
        "a": {"label": "glioma", "source": "kaggle"}, "b": {"label": "glioma", "source": "tcga/DU"},
        "c": {"label": "meningioma", "source": "kaggle"}, "d": {"label": "notumor", "source": "tcga/HT"},
        "e": {"label": "notumor"}, "f": {"label": "pituitary", "source": "kaggle", "error": "unreadable"}}}
    sources = S.class_sources(m)
    assert sources == {"glioma": ["kaggle", "tcga"], "meningioma": ["kaggle"], "notumor": ["kaggle", "tcga"]}
    line = S.class_sources_line(sources, {"meningioma": "Meningioma"})
    assert "**From one collection only: Meningioma**" in line
    one = S.class_sources_line({"cancer": ["bone"], "normal": ["bone"]}, {})
    assert "every class comes from one collection (bone)" in one
    assert "only" not in S.class_sources_line({"x": ["a", "b"]}, {})
