"""Integration: re-evaluate the shipped model on the committed test split; the card's figures reproduce."""

import json

import numpy as np
import pytest

from oncoscope.analyzers import registry

pytestmark = [pytest.mark.dataset, pytest.mark.slow]


@pytest.fixture(scope="module")
def card():
    return json.loads((registry.MODELS_DIR / "smear-all" / "model_card.json").read_text())


@pytest.fixture(scope="module")
def fresh(all_data):
    from oncoscope.evaluation.smear import evaluate_smear

    return evaluate_smear(registry.MODELS_DIR / "smear-all", all_data, n_boot=50, progress=False, write=False)


def test_model_card_figures_reproduce(card, fresh):
    a, b = card["test"]["metrics"], fresh["test"]["metrics"]
    for k in ("accuracy", "macro_f1", "ece", "macro_roc_auc"):
        assert b[k] == pytest.approx(a[k], abs=1e-3), k
    for k in ("sensitivity", "specificity", "roc_auc"):
        assert b["malignant_vs_benign"][k] == pytest.approx(a["malignant_vs_benign"][k], abs=1e-3), k
    assert b["confusion_matrix"] == a["confusion_matrix"]
    assert fresh["segmentation"]["dice"] == pytest.approx(card["segmentation"]["dice"], abs=1e-3)
    assert fresh["shortcuts"]["scale_bar_masked"]["accuracy"] == pytest.approx(
        card["shortcuts"]["scale_bar_masked"]["accuracy"], abs=1e-3)
    assert fresh["out_of_domain"]["test_smears_flagged"] == pytest.approx(
        card["out_of_domain"]["test_smears_flagged"], abs=1e-3)
    for src, v in card["out_of_domain"]["sources"].items():
        if "flagged" in v:
            assert fresh["out_of_domain"]["sources"][src]["flagged"] == pytest.approx(v["flagged"], abs=1e-3), src


def test_card_names_its_manifest_and_data_checksum(card, fresh):
    assert card["data"]["manifest"] == fresh["data"]["manifest"]
    assert card["data"]["data_sha256"] == fresh["data"]["data_sha256"]


def test_real_smears_get_cells(smear_analyzer, all_data):
    from oncoscope.training.data import load_manifest, manifest_samples, MANIFEST_DIR

    test = manifest_samples(load_manifest(MANIFEST_DIR / "all-taleqani.json"), "test")
    picks = [s for s in test if s.label in ("Benign", "Early", "Pre")][::40]
    counts = [smear_analyzer.analyze(all_data / "Original" / s.path).cell_count for s in picks]
    assert np.mean(np.array(counts) > 0) >= 0.9
