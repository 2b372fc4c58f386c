"""``oncoscope bench --load`` in small: 3 simulated doctors for ~10 s against the real server (SQLite)."""

from __future__ import annotations

import pytest

from oncoscope.bench.fixtures import smear_images, unique_png
from oncoscope.bench.load import run_load
from oncoscope.bench.users import DEFAULT_MIX

pytestmark = pytest.mark.slow


def test_unique_png_keeps_pixels():
    import io

    from PIL import Image

    png = smear_images(1, "PNG")[0]
    a, b = unique_png(png, "a"), unique_png(png, "b")
    assert a != b != png
    assert Image.open(io.BytesIO(a)).tobytes() == Image.open(io.BytesIO(png)).tobytes()


def test_small_load_run(monkeypatch):
    for k in ("DATABASE_URL", "ONCOSCOPE_HOME"):
        monkeypatch.delenv(k, raising=False)
    mix = dict(DEFAULT_MIX, upload_case=30, review_pending=10)  # enough uploads in 10 s to check them
    rep = run_load(users=3, duration_s=10, think_s=(0.2, 0.6), patients=60, analyses=40, mix=mix,
                   analysis_wait_s=30)
    for key in ("users", "duration_s", "requests", "requests_per_s", "errors", "page_ms", "login_ms",
                "status_poll_ms", "asset_ms", "actions", "uploads", "uploads_analysed", "upload_to_result_s",
                "database", "server", "load_average", "targets_met"):
        assert key in rep, key
    assert rep["users"] == 3 and rep["database"]["dialect"] == "sqlite"
    assert rep["requests"] > 0
    assert rep["errors"]["count"] == 0, rep["errors"]
    assert rep["uploads"] > 0
    assert rep["uploads_analysed"] == rep["uploads"] == rep["uploads_accepted_by_clients"]
    assert {"dashboard", "case_upload", "case_view", "case_status", "login"} <= set(rep["actions"])
    assert rep["page_ms"]["p95"] is not None and rep["page_ms"]["count"] > 0
    assert rep["targets_met"]["errors_0"] and rep["targets_met"]["all_uploads_analysed"]


def test_small_scaled_out_load_run(monkeypatch):
    """The same flow with analyses going through Redis to two separate `oncoscope worker` processes."""
    from oncoscope.bench.processes import redis_reachable

    url = "redis://127.0.0.1:6379/15"
    if (exc := redis_reachable(url)) is not None:
        pytest.skip(f"Redis at {url} does not answer ({exc.__class__.__name__}): scaled-out load run skipped")
    for k in ("DATABASE_URL", "ONCOSCOPE_HOME", "ONCOSCOPE_QUEUE_URL"):
        monkeypatch.delenv(k, raising=False)
    mix = dict(DEFAULT_MIX, upload_case=30, review_pending=10)
    rep = run_load(users=3, duration_s=10, think_s=(0.2, 0.6), patients=60, analyses=40, mix=mix,
                   analysis_wait_s=60, queue_url=url, workers=2)
    assert rep["queue"] == {"mode": "redis", "url": url, "workers": 2}
    assert rep["errors"]["count"] == 0, rep["errors"]
    assert rep["uploads"] > 0 and rep["uploads_analysed"] == rep["uploads"] == rep["uploads_accepted_by_clients"]
