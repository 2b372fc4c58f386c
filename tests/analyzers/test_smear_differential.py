"""smear-differential through the shipped model: generated smears of known geometry and bad input."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from oncoscope.analyzers import registry
from oncoscope.cli import main as cli
from oncoscope.ml import differential as D
from oncoscope.ml.synthetic import photo, smear_field

CELL_KEYS = {"class", "class_probability", "probabilities", "bbox", "area_um2", "diameter_um", "circularity"}
LINE_KEYS = {"path", "status", "label", "malignant", "microns_per_pixel", "differential", "blast_fraction", "cells"}


@pytest.fixture(scope="module")
def analyzer():
    if "smear-differential" not in registry.available():
        pytest.skip("smear-differential model not installed (oncoscope/models/smear-differential)")
    return registry.get("smear-differential")


def test_field_gives_one_record_per_white_cell_with_physical_measurements(analyzer):
    rgb, truth = smear_field(11, 0.2, (420, 320), [(120, 150, 12.0), (300, 120, 10.0)])
    res = analyzer.analyze(rgb)
    d = res.to_dict()
    assert res.status in ("ok", "uncertain")
    assert len(d["cells"]) == 2
    assert d["microns_per_pixel"] == pytest.approx(0.2, rel=0.15)
    for cell in d["cells"]:
        assert CELL_KEYS <= set(cell)
        assert cell["class"] in D.REPORTED
        assert sum(cell["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
        assert 7 <= cell["diameter_um"] <= 16
        x0, y0, x1, y1 = cell["bbox"]
        assert 0 <= x0 < x1 <= 420 and 0 <= y0 < y1 <= 320
    assert sum(d["differential"].values()) == 2
    assert d["label"] in ("blasts_present", "no_blasts")
    assert d["malignant"] == (d["label"] == "blasts_present")
    if res.status == "ok":  # uncertain exactly when a cell is unidentified or a blast call is borderline
        assert d["differential"]["unidentified"] == 0


def test_field_without_white_cells_is_ok_with_zero_cells_and_a_message(analyzer):
    rgb, _ = smear_field(12, 0.25, (300, 240), white_cells=[])
    res = analyzer.analyze(rgb)
    assert res.status == "ok" and res.cells == [] and res.label == "no_blasts"
    assert any("No white cell" in m for m in res.messages)
    assert res.to_dict()["white_cells"] == 0


@pytest.mark.parametrize("make, status", [
    (lambda: np.full((200, 200, 3), 230, np.uint8), "out_of_domain"),  # blank
    (lambda: np.repeat(photo(3)[..., :1], 3, axis=2), "out_of_domain"),  # grayscale photograph
    (lambda: np.zeros((8, 8, 3), np.uint8), "error"),  # too small
])
def test_non_smear_input_is_refused_not_counted(analyzer, make, status):
    res = analyzer.analyze(make())
    assert res.status == status
    assert res.cells == []
    assert res.messages


def test_corrupt_bytes_are_an_error_with_every_contract_key(analyzer):
    d = analyzer.analyze(b"\x89PNG\r\n\x1a\nnot really").to_dict()
    assert d["status"] == "error" and d["error"]
    assert {"microns_per_pixel", "differential", "blast_fraction", "cells"} <= set(d)


def test_predict_json_contract(analyzer, tmp_path):
    rgb, _ = smear_field(13, 0.2, (400, 300), [(130, 150, 12.0)])
    good = tmp_path / "field.png"
    Image.fromarray(rgb).save(good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    result = CliRunner().invoke(cli, ["predict", "--analyzer", "smear-differential", "--json", str(good), str(bad)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [line["path"] for line in lines] == [str(good), str(bad)]
    for line in lines:
        assert LINE_KEYS <= set(line)
    assert lines[0]["status"] in ("ok", "uncertain") and len(lines[0]["cells"]) == 1
    assert CELL_KEYS <= set(lines[0]["cells"][0])
    assert lines[1]["status"] == "error"


def test_single_cell_crop_gives_the_centred_cell(analyzer):
    rgb, _ = smear_field(14, 0.2, (180, 180), [(90, 90, 12.0)])
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    res = analyzer.analyze(buf.getvalue())
    assert len(res.cells) >= 1
    centred = min(res.cells, key=lambda c: abs((c["bbox"][0] + c["bbox"][2]) / 2 - 90))
    assert abs((centred["bbox"][0] + centred["bbox"][2]) / 2 - 90) < 15


# ----------------------------------------------------------------------------- decisions, with set outputs
def _with_outputs(analyzer, monkeypatch, rows, distance=0.0):
    """The analyzer with its network replaced by fixed per-cell probabilities (network classes order)."""
    classes = list(analyzer.cells_cfg.classes)

    def fake(crops):
        n = len(crops)
        p = np.full((n, len(classes)), 1e-6)
        for i in range(n):
            for name, v in rows[i % len(rows)].items():
                p[i, classes.index(name)] = v
        dist = np.resize(np.asarray(distance, float), n)  # one distance for all, or one per cell, repeated
        return np.log(p) * analyzer.cells_cfg.temperature, dist

    monkeypatch.setattr(analyzer, "classify_crops", fake)
    return analyzer


FIELD = [(100, 100, 12.0), (260, 100, 11.0), (100, 220, 12.0), (260, 220, 10.0)]


def _field():
    return smear_field(31, 0.2, (380, 320), FIELD)[0]


def test_confident_normal_cells_are_ok_and_no_blasts(analyzer, monkeypatch):
    an = _with_outputs(analyzer, monkeypatch, [{"neutrophil": 0.999}])
    res = an.analyze(_field())
    assert (res.status, res.label, res.malignant) == ("ok", "no_blasts", False)
    assert res.to_dict()["differential"]["neutrophil"] == 4


def test_enough_blast_calls_make_blasts_present(analyzer, monkeypatch):
    an = _with_outputs(analyzer, monkeypatch, [{"blast": 0.999}])
    res = an.analyze(_field())
    assert res.label == "blasts_present" and res.malignant is True
    assert res.malignant_probability is None and res.confidence is None  # the call is a count
    assert all(c["class"] == "blast" and c["review"] for c in res.cells)


def test_one_blast_among_normals_below_the_call_is_uncertain_not_no_blasts_ok(analyzer, monkeypatch):
    needed = D.blasts_needed(4, analyzer.decision)
    if needed < 2:
        pytest.skip("at this model's false-blast rate one blast call among 4 cells is already a call")
    an = _with_outputs(analyzer, monkeypatch, [{"blast": 0.999}, {"neutrophil": 0.999}, {"neutrophil": 0.999},
                                               {"neutrophil": 0.999}])
    res = an.analyze(_field())
    assert res.label == "no_blasts" and res.status == "uncertain"
    assert any("fewer than the" in m for m in res.messages)


def test_a_borderline_blast_or_an_unsure_cell_makes_the_image_uncertain(analyzer, monkeypatch):
    d = analyzer.decision
    mid = (d.blast_borderline + d.blast_threshold) / 2
    an = _with_outputs(analyzer, monkeypatch, [{"lymphocyte": 1 - mid, "blast": mid}])
    res = an.analyze(_field())
    assert res.status == "uncertain" and any("borderline" in m for m in res.messages)
    assert all(c["review"] and c["class"] != "blast" for c in res.cells)
    an = _with_outputs(analyzer, monkeypatch, [{"lymphocyte": 0.4, "monocyte": 0.4, "neutrophil": 0.2}])
    res = an.analyze(_field())
    assert res.status == "uncertain" and res.cells[0]["class"] == "unidentified"
    assert res.cells[0]["class_probability"] is None  # no class to be sure of


def test_cells_unlike_any_trained_cell_make_the_image_out_of_domain(analyzer, monkeypatch):
    if analyzer.ood is None:
        pytest.skip("this model has no out-of-domain statistics")
    an = _with_outputs(analyzer, monkeypatch, [{"neutrophil": 0.999}], distance=analyzer.cells_cfg.ood_threshold * 2)
    res = an.analyze(_field())
    assert res.status == "out_of_domain" and res.label is None


def test_random_noise_is_not_a_smear(analyzer):
    rng = np.random.default_rng(0)
    res = analyzer.analyze(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8))
    assert res.status == "out_of_domain" and res.malignant is not True


def test_half_the_objects_unlike_trained_cells_is_referred_not_refused(analyzer, monkeypatch):
    if analyzer.ood is None:
        pytest.skip("this model has no out-of-domain statistics")
    far = analyzer.cells_cfg.ood_threshold * 2
    an = _with_outputs(analyzer, monkeypatch, [{"neutrophil": 0.999}], distance=[far, 0.0])
    res = an.analyze(_field())
    assert res.status == "uncertain"  # two odd objects beside two cells: review them, the field stays
    assert [c["class"] for c in res.cells].count("unidentified") == 2


def test_cells_all_cut_by_the_edge_are_counted_on_the_image_and_its_flag(analyzer, monkeypatch):
    an = _with_outputs(analyzer, monkeypatch, [{"lymphocyte": 0.999}])
    rgb = smear_field(32, 0.2, (200, 160), [(6, 80, 12.0)])[0]  # one cell, cut by the left edge
    res = an.analyze(rgb)
    assert res.cells and all(c["touches_border"] for c in res.cells)
    assert all(c["counted"] for c in res.cells)  # the case's count reads this flag: both agree
    assert res.to_dict()["white_cells"] == len(res.cells)
