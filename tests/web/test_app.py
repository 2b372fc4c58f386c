"""App-level basics: health check, analyzer pages with the model card figures, error pages.

(The earlier anonymous ``/try/<analyzer>`` page was replaced by the clinical workflow; uploads
are covered by test_flows.py.)"""

import pytest


@pytest.fixture()
def client(client_for):
    return client_for("doc_a")


def test_healthz_reports_loaded_models(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json["analyzers"]["smear-all"] == "loaded" and r.json["database"] == "ok"


def test_analyzer_page_lists_card_figures_and_security_headers(client):
    r = client.get("/analyzers/smear-all")
    assert r.status_code == 200 and b"smear-all" in r.data and b"accuracy" in r.data
    assert b"/analyzers/smear-all/plots/roc.png" in r.data
    assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Frame-Options"] == "DENY" and r.headers["X-Content-Type-Options"] == "nosniff"
    plot = client.get("/analyzers/smear-all/plots/roc.png")
    assert plot.status_code == 200 and plot.mimetype == "image/png"


def test_admin_home_summarises_the_analyzer(client_for):
    r = client_for("admin").get("/")
    assert r.status_code == 200 and b"malignant sensitivity" in r.data


@pytest.mark.parametrize("url", ["/analyzers/nope", "/try/smear-all", "/nowhere"])
def test_unknown_pages_404_without_stack_trace(client, url):
    r = client.get(url)
    assert r.status_code == 404 and b"Not found" in r.data and b"Traceback" not in r.data
