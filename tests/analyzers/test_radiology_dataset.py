"""Integration: the shipped radiology analyzers on their committed, grouped test splits (figures in the
model cards reproduce) and on each other's data (out-of-domain across analyzers).

Skips with a message when ../shared/datasets is absent."""

import json

import numpy as np
import pytest

from oncoscope.analyzers import registry
from oncoscope.ml import metrics as M
from oncoscope.training.data import load_manifest, manifest_samples
from oncoscope.evaluation.smear import _classify
from oncoscope.evaluation.classifier import foreign_test_files
from oncoscope.imaging.imageio import load_image
from oncoscope.training.recipes import RECIPES, data_root

from ..conftest import DATASETS, dataset_dir

pytestmark = [pytest.mark.dataset, pytest.mark.slow]


@pytest.mark.parametrize("analyzer_id", ["bone-xray", "brain-mri"])
def test_card_figures_reproduce_on_the_test_split(analyzer_id):
    dataset_dir(RECIPES[analyzer_id]["dataset"])
    root = data_root(analyzer_id)
    an = registry.get(analyzer_id)
    card = json.loads((registry.MODELS_DIR / analyzer_id / "model_card.json").read_text())
    manifest = load_manifest(RECIPES[analyzer_id]["manifest"])
    test = manifest_samples(manifest, "test")
    probs, ood = _classify(an, [load_image(root / s.path).rgb for s in test])
    y = np.array([an.labels.index(s.label) for s in test])
    mal = [an.labels.index(l) for l in sorted(an.malignant_labels)]
    fresh = M.classification_metrics(probs, y, an.labels, mal, an.malignant_threshold)
    old = card["test"]["metrics"]
    for k in ("accuracy", "macro_f1", "ece", "macro_roc_auc"):
        assert fresh[k] == pytest.approx(old[k], abs=1e-3), k
    for k in ("sensitivity", "specificity", "roc_auc"):
        assert fresh["malignant_vs_benign"][k] == pytest.approx(old["malignant_vs_benign"][k], abs=1e-3), k
    assert fresh["confusion_matrix"] == old["confusion_matrix"]
    assert float((ood > an.ood_threshold).mean()) == pytest.approx(card["out_of_domain"]["test_images_flagged"], abs=1e-3)


# (analyzer, whose images are sent to it): the cross-analyzer pairs, plus radiographs to brain-mri
PAIRS = [("bone-xray", "smear-all"), ("brain-mri", "smear-all"), ("smear-all", "bone-xray"),
         ("smear-all", "brain-mri"), ("bone-xray", "brain-mri"), ("brain-mri", "bone-xray")]


@pytest.mark.parametrize("analyzer_id,source", PAIRS, ids=[f"{s}->{a}" for a, s in PAIRS])
def test_images_sent_to_the_wrong_analyzer_are_flagged(analyzer_id, source):
    """On the other dataset's test split (the modality gates were fitted on training splits only)."""
    dataset_dir(RECIPES[source]["dataset"])
    an = registry.get(analyzer_id)
    files = foreign_test_files(source, DATASETS, 60, seed=1)
    flagged = [an.analyze(f).status == "out_of_domain" for f in files]
    assert len(files) == 60 and np.mean(flagged) >= 0.95, f"{source} -> {analyzer_id}: {np.mean(flagged):.0%} flagged"
