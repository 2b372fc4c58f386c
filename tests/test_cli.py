import io
import json
import subprocess
import sys
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


def test_console_script_installed():
    exe = Path(sys.executable).parent / "oncoscope"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for cmd in ("serve", "train", "evaluate", "predict", "bench", "data", "backup", "restore"):
        assert cmd in out.stdout


@pytest.mark.slow
def test_bench_json_without_baselines():
    res = CliRunner().invoke(main, ["bench", "--json", "--no-baselines", "--runs", "10"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["full_analysis"]["p50_ms"] > 0
    assert out["memory"]["peak_rss_mb"] > 0 and out["memory"]["torch_imported"] is False
    assert out["compute"]["classifier_gflops"] > 0 and out["compute"]["matmul_gflops_per_s"] > 0


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


def test_predict_awkward_images_never_crash(tmp_path):
    """Modes, EXIF rotation, tiny, giant and bomb inputs through the CLI contract."""
    from tests.ml.test_imageio import fake_png

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
    import csv

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


def test_db_upgrade_and_users_create(tmp_path, monkeypatch):
    monkeypatch.setenv("ONCOSCOPE_HOME", str(tmp_path / "inst"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    r = CliRunner().invoke(main, ["db", "upgrade"])
    assert r.exit_code == 0 and "database at revision" in r.output, r.output
    r = CliRunner().invoke(main, ["users", "create", "--email", "Lab@Clinic.test", "--name", "Lab Lead", "--role", "admin",
                                  "--password", "Strong-pass-2026"])
    assert r.exit_code == 0 and "created admin lab@clinic.test" in r.output, r.output
    r = CliRunner().invoke(main, ["users", "create", "--email", "lab@clinic.test", "--name", "Again",
                                  "--password", "Strong-pass-2026"])
    assert r.exit_code != 0 and "already exists" in r.output
    r = CliRunner().invoke(main, ["users", "create", "--email", "x@clinic.test", "--name", "Weak", "--password", "short"])
    assert r.exit_code != 0 and "at least 10" in r.output
    r = CliRunner().invoke(main, ["db", "downgrade"])
    assert r.exit_code == 0
    assert (tmp_path / "inst" / "secret_key").exists()


def test_users_token_prints_a_working_token_stored_and_audited_like_the_token_page(tmp_path, monkeypatch):
    from sqlalchemy import select

    from oncoscope.store.db import standalone_session
    from oncoscope.store.models import ApiToken, AuditEvent
    from oncoscope.web import create_app

    monkeypatch.setenv("ONCOSCOPE_HOME", str(tmp_path / "inst"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert CliRunner().invoke(main, ["db", "upgrade"]).exit_code == 0
    assert CliRunner().invoke(main, ["users", "create", "--email", "lis@clinic.test", "--name", "LIS bridge",
                                     "--password", "Strong-pass-2026"]).exit_code == 0
    r = CliRunner().invoke(main, ["users", "token", "--email", "LIS@clinic.test", "--days", "30",
                                      "--name", "LIS bridge"])
    assert r.exit_code == 0, r.output
    secret = r.stdout.strip()
    assert secret.startswith("osk_") and "shown only now" in r.stderr and secret not in r.stderr
    app = create_app({"TESTING": True}, start_workers=False)
    resp = app.test_client().get("/api/v1/patients", headers={"Authorization": f"Bearer {secret}"})
    assert resp.status_code == 200
    url = app.extensions["oncoscope"]["settings"].database_url
    app.extensions["oncoscope"]["engine"].dispose()
    with standalone_session(url) as s:
        t = s.scalar(select(ApiToken))
        assert t.name == "LIS bridge" and t.token_hash != secret and secret.split("_")[1] == t.prefix
        assert 29 <= (t.expires_at - t.created_at).days <= 30
        e = s.scalar(select(AuditEvent).where(AuditEvent.action == "auth.token_create"))
        assert (e.channel, e.resource_type, e.resource_id) == ("cli", "api_token", str(t.id))
        assert e.details["prefix"] == t.prefix and e.details["email"] == "lis@clinic.test"
        assert secret not in str(e.details)
    r = CliRunner().invoke(main, ["users", "token", "--email", "nobody@clinic.test"])
    assert r.exit_code != 0 and "No active account" in r.output


def test_db_upgrade_warns_about_mrns_from_before_the_mrn_rule(tmp_path, monkeypatch):
    from oncoscope.store.db import standalone_session
    from oncoscope.store.models import Patient

    monkeypatch.setenv("ONCOSCOPE_HOME", str(tmp_path / "inst"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    r = CliRunner().invoke(main, ["db", "upgrade"])
    assert r.exit_code == 0 and "WARNING" not in r.output
    with standalone_session(f"sqlite:///{tmp_path / 'inst' / 'oncoscope.db'}") as s:
        s.add(Patient(mrn="B-001\\ZZ", family_name="Old"))
        s.commit()
    r = CliRunner().invoke(main, ["db", "upgrade"])
    assert r.exit_code == 0 and "WARNING: 1 patient(s) have an MRN outside the allowed set" in r.stderr
    assert "'B-001\\\\ZZ'" in r.stderr


@pytest.mark.parametrize("where", ["read_only_folder", "folder_is_a_file"])
def test_signing_key_that_cannot_be_created_is_a_clear_error(tmp_path, monkeypatch, where):
    """ONCOSCOPE_SIGNING_KEY in a folder the service account cannot write (or under a file): a message
    naming the path and what to do, exit status 1, no traceback."""
    import os

    from oncoscope.store import signing

    parent = tmp_path / "keys"
    if where == "folder_is_a_file":
        parent.write_text("not a folder")
    else:
        parent.mkdir()
        parent.chmod(0o500)
        real_open = os.open

        def refuse(path, *a, **kw):  # what the kernel answers anyone but root
            if Path(path).parent == parent:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *a, **kw)

        if os.geteuid() == 0:  # root ignores the mode bits
            monkeypatch.setattr(signing.os, "open", refuse)
    key = parent / "signing_key"
    monkeypatch.setenv("ONCOSCOPE_HOME", str(tmp_path / "inst"))
    monkeypatch.setenv("ONCOSCOPE_SIGNING_KEY", str(key))
    r = CliRunner().invoke(main, ["public-key"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert f"cannot create the signing key {key}" in r.output and "ONCOSCOPE_SIGNING_KEY" in r.output, r.output
    assert "Traceback" not in r.output
