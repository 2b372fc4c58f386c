"""``oncoscope data audit|split`` (oncoscope/cli/data.py)."""

import json

from click.testing import CliRunner
from PIL import Image

from oncoscope.cli import main
from oncoscope.ml import synthetic


def test_data_audit_and_split_on_generated_dataset(tmp_path):
    for c in ("A", "B"):
        (tmp_path / c).mkdir()
        for i in range(1, 13):
            Image.fromarray(synthetic.photo(i + (100 if c == "B" else 0))).save(tmp_path / c / f"img-{c}-{i:03d}.jpg")
    res = CliRunner().invoke(main, ["data", "audit", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["counts"] == {"A": 12, "B": 12}
    out = tmp_path / "split.json"
    res = CliRunner().invoke(main, ["data", "split", str(tmp_path), "--out", str(out), "--run-length", "4"])
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    assert len(m["files"]) == 24 and {v["split"] for v in m["files"].values()} <= {"train", "val", "test"}
