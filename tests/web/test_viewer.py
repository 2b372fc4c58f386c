"""The case page's image viewer (issue 16, item 6): every analysed image carries what the viewer shows
(original, cell mask, heatmap, pixel spacing, modality), the dialog and its script are on the page, the
script is our own static file (no CDN), and a DICOM's pixel spacing travels from the upload to the page.
The viewer's behaviour in a browser is tested in tests/e2e/test_viewer.py."""

from __future__ import annotations

import html
import io
import re

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from oncoscope.analyzers import registry
from oncoscope.ml import synthetic
from oncoscope.store.models import CaseImage

from .conftest import CASE_A_ID, IMAGE_A_ID, PATIENT_A, PATIENT_A_ID, one, pool_for
from .test_flows import MULTIPART, case_id_of

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def viewer_attrs(page: str) -> list[dict]:
    """The data- attributes of each image's .viewer block."""
    out = []
    for tag in re.findall(r'<div class="viewer"[^>]*>', page):
        out.append({k: html.unescape(v) for k, v in re.findall(r'\sdata-([a-z-]+)="([^"]*)"', tag)})
    return out


def new_case(c, analyzer_id: str, name: str, data: bytes) -> int:
    r = c.post(f"/patients/{PATIENT_A_ID}/cases/new", data={"analyzer_id": analyzer_id, "clinical_note": "",
                                                             "images": [(io.BytesIO(data), name)]},
               content_type=MULTIPART)
    return case_id_of(r)


def radiograph_dicom(spacing=None, imager=None) -> bytes:
    from tests.imaging.test_dicom import make_dicom, to_bytes

    extra = {}
    if spacing:
        extra["PixelSpacing"] = spacing
    if imager:
        extra["ImagerPixelSpacing"] = imager
    grey = np.ascontiguousarray(synthetic.radiograph_like(5)[..., 0])
    return to_bytes(make_dicom(grey, modality="CR", patient_id=PATIENT_A["mrn"], extra=extra))


def png(arr) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


def test_case_page_carries_the_viewer(client_for):
    c = client_for("doc_a")
    page = c.get(f"/cases/{CASE_A_ID}").data.decode()
    assert '<dialog id="image-viewer"' in page and page.count('id="image-viewer"') == 1
    assert '<script src="/static/viewer.js" defer></script>' in page
    (v,) = viewer_attrs(page)
    assert v["viewer-image-id"] == str(IMAGE_A_ID)
    assert v["original"] == f"/cases/{CASE_A_ID}/images/{IMAGE_A_ID}/original.png"
    assert v["modality"] == registry.get("smear-all").modality and not v["modality"].startswith("radiology/")
    # the seed's analysis is out of domain: no label, so no heatmap; a PNG has no pixel spacing
    assert "heatmap" not in v and "spacing" not in v
    assert 'data-viewer-layer="original"' in page
    # the dialog's controls are labelled
    for label in ("Zoom in", "Zoom out", "Heatmap opacity", "Window width", "Window level (centre)",
                  "Close the viewer"):
        assert f'aria-label="{label}"' in page, label


def test_a_smear_with_cells_and_heatmap_offers_every_layer(app, client_for, gate_off):
    c = client_for("doc_a")
    cid = new_case(c, "smear-all", "field.png", png(synthetic.smear_like(4)[0]))
    assert pool_for(app).run_one()
    page = c.get(f"/cases/{cid}").data.decode()
    (v,) = viewer_attrs(page)
    image_id = v["viewer-image-id"]
    assert v["mask"] == f"/cases/{cid}/images/{image_id}/cells.png"
    assert v["heatmap"] == f"/cases/{cid}/images/{image_id}/heatmap-layer.png"
    for layer in ("original", "mask", "heatmap"):
        assert f'data-viewer-layer="{layer}"' in page
    for key in ("original", "mask", "heatmap"):  # every layer the viewer loads is there
        assert c.get(v[key]).status_code == 200, key


def test_dicom_pixel_spacing_reaches_the_page(app, client_for, monkeypatch):
    monkeypatch.setattr(registry.get("bone-xray"), "ood_threshold", None)  # a generated radiograph gets a label
    c = client_for("doc_a")
    cid = new_case(c, "bone-xray", "knee.dcm", radiograph_dicom(spacing=[0.5, 0.5]))
    assert pool_for(app).run_one()
    assert one(app, select(CaseImage.pixel_spacing).where(CaseImage.case_id == cid)) == [0.5, 0.5]
    page = c.get(f"/cases/{cid}").data.decode()
    (v,) = viewer_attrs(page)
    assert v["spacing"] == "0.5,0.5"
    assert v["modality"] == "radiology/x-ray"
    assert v["heatmap"].endswith("/heatmap-layer.png") and "mask" not in v  # radiology: no cell mask
    assert v["title"] == "Radiograph 1 · knee.dcm"

    # Imager Pixel Spacing when Pixel Spacing is absent; none at all, or nonsense: no spacing on the page
    for name, data, expected in (("imager.dcm", radiograph_dicom(imager=[0.2, 0.25]), [0.2, 0.25]),
                                 ("none.dcm", radiograph_dicom(), None),
                                 ("bad.dcm", radiograph_dicom(spacing=[0, 0.5]), None),
                                 ("plain.png", png(synthetic.radiograph_like(6)), None)):
        cid = new_case(c, "bone-xray", name, data)
        assert one(app, select(CaseImage.pixel_spacing).where(CaseImage.case_id == cid)) == expected, name
        assert pool_for(app).run_one()
        (v,) = viewer_attrs(c.get(f"/cases/{cid}").data.decode())
        assert v.get("spacing") == (",".join(map(str, expected)) if expected else None), name


def test_viewer_script_is_our_own_static_file(client_for):
    c = client_for("doc_a")
    r = c.get("/static/viewer.js")
    assert r.status_code == 200
    js = r.data.decode()
    assert "http://" not in js and "https://" not in js and "import " not in js  # vendored: nothing fetched
    # the colour scale is render.py's map, and window/level is the formula of the issue
    assert "1.5 - Math.abs(4 * v - c)" in js and "(v - lo) / W" in js
    css = c.get("/static/app.css").data.decode()
    assert "/* viewer" in css and "dialog.iv" in css
