"""Integration: the shipped smear-differential model re-evaluated on data from ../shared reproduces its card
(the parts that run in seconds: another lab's test cells, detection against boxes and masks)."""

from __future__ import annotations

import json

import pytest

from oncoscope.analyzers import registry

from ..conftest import dataset_dir

pytestmark = [pytest.mark.dataset]
AID = "smear-differential"


@pytest.fixture(scope="module")
def card():
    path = registry.MODELS_DIR / AID / "model_card.json"
    if not path.exists():
        pytest.fail(f"{path} is missing: run oncoscope evaluate --analyzer {AID}")
    return json.loads(path.read_text())


def test_card_is_for_the_shipped_weights(card):
    assert card["model"]["sha256"] == registry.get(AID).model_info.sha256, "stale card: re-run oncoscope evaluate"


def test_another_labs_test_cells_reproduce(card):
    from oncoscope.evaluation.differential import in_source
    from oncoscope.training.cells import tecom

    fresh = in_source(registry.get(AID), {"wbc-seg-tecom": tecom(dataset_dir("wbc-seg-tecom"))})["wbc-seg-tecom"]
    assert fresh == card["test_in_source"]["wbc-seg-tecom"]


def test_detection_figures_reproduce(card):
    from oncoscope.evaluation.differential import detection

    dataset_dir("raabin-fields")
    fresh = detection(dataset_dir("wbc-seg-tecom").parent)
    assert fresh == card["detection"]


def test_every_target_is_in_the_card_with_its_verdict(card):
    from oncoscope.evaluation.differential import TARGETS, targets

    assert [t["target"] for t in card["targets"]] == [t[0] for t in TARGETS]
    assert card["targets"] == targets(card)
