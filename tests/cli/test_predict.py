"""``oncoscope predict`` (oncoscope/cli/predict.py): one record per input, whatever the input."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from oncoscope.cli import main
from oncoscope.ml import synthetic

REQUIRED = {"path", "label", "probabilities", "status", "cells", "error"}


@pytest.fixture()
def image_dir(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(synthetic.smear_like(0)[0]).save(tmp_path / "a" / "field1.jpg")
    Image.fromarray(synthetic.smear_like(1)[0]).save(tmp_path / "a" / "b" / "field2.png")
    Image.fromarray(synthetic.text(0)).save(tmp_path / "a" / "b" / "letter.png")
    (tmp_path / "a" / "empty.jpg").write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_text("not an image")  # not an image extension: skipped in directories
    (tmp_path / "a" / "fake.jpg").write_text("text pretending to be a jpeg")
    buf = io.BytesIO()
    Image.fromarray(synthetic.smear_like(2)[0]).save(buf, "JPEG")
    (tmp_path / "a" / "cut.jpg").write_bytes(buf.getvalue()[:3000])
    return tmp_path


def run_predict(*args):
    res = CliRunner().invoke(main, ["predict", "--json", *args])
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in res.output.strip().splitlines()]


def test_predict_directory_recursively_one_json_line_each(image_dir):
    recs = run_predict(str(image_dir / "a"))
    names = sorted(Path(r["path"]).name for r in recs)
    assert names == ["cut.jpg", "empty.jpg", "fake.jpg", "field1.jpg", "field2.png", "letter.png"]
    for r in recs:
        assert REQUIRED <= set(r)
        assert r["status"] in ("ok", "uncertain", "out_of_domain", "error")
    by = {Path(r["path"]).name: r for r in recs}
    for bad in ("cut.jpg", "empty.jpg", "fake.jpg"):
        assert by[bad]["status"] == "error" and by[bad]["error"] and by[bad]["label"] is None
    assert by["letter.png"]["status"] == "out_of_domain"
    good = by["field1.jpg"]
    assert set(good["probabilities"]) == {"Benign", "Early", "Pre", "Pro"}
    assert isinstance(good["cells"], list)


@pytest.mark.parametrize("analyzer_id,labels", [("bone-xray", {"cancer", "normal"}),
                                                ("brain-mri", {"glioma", "meningioma", "notumor", "pituitary"})])
def test_predict_radiology_same_contract(image_dir, analyzer_id, labels):
    Image.fromarray(synthetic.radiograph_like(0)).save(image_dir / "a" / "xray.png")
    recs = run_predict("--analyzer", analyzer_id, str(image_dir / "a"))
    by = {Path(r["path"]).name: r for r in recs}
    assert len(recs) == 7
    for r in recs:
        assert REQUIRED <= set(r) and r["status"] in ("ok", "uncertain", "out_of_domain", "error")
        assert r["cells"] == [] and r.get("cell_count") in (None, 0)
    for bad in ("cut.jpg", "empty.jpg", "fake.jpg"):
        assert by[bad]["status"] == "error" and by[bad]["error"]
    assert by["letter.png"]["status"] == "out_of_domain" and by["letter.png"]["label"] is None
    assert set(by["xray.png"]["probabilities"]) == labels
    assert by["xray.png"]["model"]["id"] == analyzer_id and by["xray.png"]["cell_count"] is None
    # the human-readable form does not invent a cell count
    res = CliRunner().invoke(main, ["predict", "--analyzer", analyzer_id, str(image_dir / "a" / "xray.png")])
    assert res.exit_code == 0 and "cells" not in res.output


def test_predict_missing_file_and_analyzer_option(tmp_path):
    (rec,) = run_predict("--analyzer", "smear-all", str(tmp_path / "nope.png"))
    assert rec["status"] == "error" and "Cannot read" in rec["error"]


def test_predict_unknown_analyzer(tmp_path):
    res = CliRunner().invoke(main, ["predict", "--analyzer", "nope", "--json", str(tmp_path)])
    assert res.exit_code != 0 and "unknown analyzer" in res.output


def test_predict_awkward_images_never_crash(tmp_path):
    """Modes, EXIF rotation, tiny, giant and bomb inputs through the CLI contract."""
    from tests.imaging.test_imageio import fake_png

    rgb = synthetic.smear_like(7)[0]
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb[:, :200]).save(tmp_path / "rotated.jpg", exif=exif)
    Image.fromarray(rgb[:10, :10]).save(tmp_path / "tiny.png")
    (tmp_path / "giant.png").write_bytes(fake_png(20000, 20000))
    (tmp_path / "bomb.png").write_bytes(fake_png(30000, 30000))
    recs = {Path(r["path"]).name: r for r in run_predict(str(tmp_path))}
    assert len(recs) == 8
    for name in ("cmyk.jpg", "rgba.png", "gray.png", "sixteen.png", "rotated.jpg"):
        assert recs[name]["status"] != "error", (name, recs[name]["error"])
    assert recs["rotated.jpg"]["image_size"] == [224, 200]  # EXIF orientation 6 applied
    assert recs["tiny.png"]["status"] == "error" and "10x10" in recs["tiny.png"]["error"]
    for name in ("giant.png", "bomb.png"):
        assert recs[name]["status"] == "error" and "megapixel" in recs[name]["error"]


def test_predict_csv_is_resumable(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        Image.fromarray(synthetic.smear_like(i)[0]).save(d / f"f{i}.png")
    (d / "bad.png").write_bytes(b"nope")
    out = tmp_path / "out.csv"
    res = CliRunner().invoke(main, ["predict", str(d), "--csv", str(out)])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 4 and {r["status"] for r in rows} <= {"ok", "uncertain", "out_of_domain", "error"}
    assert next(r for r in rows if r["path"].endswith("bad.png"))["error"]
    # resume: drop the last row as if interrupted, add a new image, run again
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n")
    Image.fromarray(synthetic.smear_like(9)[0]).save(d / "f9.png")
    res = CliRunner().invoke(main, ["predict", str(d), "--csv", str(out)])
    assert "2 analysed, 3 already" in res.output
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 5 and len({r["path"] for r in rows}) == 5
    assert set(rows[0]) >= {"path", "status", "label", "p_Benign", "p_Pro", "model_sha256"}


def test_predict_with_a_broken_model_folder_says_which_key(tmp_path):
    import shutil

    from oncoscope.analyzers.registry import MODELS_DIR

    folder = tmp_path / "model"
    shutil.copytree(MODELS_DIR / "bone-xray", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["calibration"]["class_bias"] = [0.0]
    (folder / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["predict", "--analyzer", "bone-xray", "--model-dir", str(folder), str(tmp_path)])
    assert r.exit_code != 0 and "calibration.class_bias" in r.output and "Traceback" not in r.output
