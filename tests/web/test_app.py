import io

import numpy as np
import pytest
from PIL import Image

from oncoscope.ml import synthetic
from oncoscope.web import create_app


@pytest.fixture()
def client():
    return create_app({"TESTING": True}).test_client()


def upload(client, data: bytes, name="x.png"):
    return client.post("/try/smear-all", data={"image": (io.BytesIO(data), name)}, content_type="multipart/form-data")


def test_healthz_reports_loaded_models(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json["analyzers"]["smear-all"] == "loaded"


def test_index_lists_analyzer_with_card_figures_and_security_headers(client):
    r = client.get("/")
    assert r.status_code == 200 and b"smear-all" in r.data and b"accuracy" in r.data
    assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Frame-Options"] == "DENY" and r.headers["X-Content-Type-Options"] == "nosniff"


def test_try_page_analyses_an_upload(client):
    buf = io.BytesIO()
    Image.fromarray(synthetic.smear_like(0)[0]).save(buf, "PNG")
    r = upload(client, buf.getvalue())
    assert r.status_code == 200
    assert b"sha256" in r.data and b"data:image/png;base64" in r.data


@pytest.mark.parametrize("data", [b"", b"%PDF-1.4 not an image", b"\x89PNG\r\n\x1a\n truncated"])
def test_try_page_bad_upload_clear_message(client, data):
    r = upload(client, data)
    assert r.status_code == 400 and b'class="error"' in r.data


def test_unknown_analyzer_404_without_stack_trace(client):
    r = client.get("/try/nope")
    assert r.status_code == 404 and b"Traceback" not in r.data
