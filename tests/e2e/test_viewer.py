"""The case page's image viewer in Chromium (issue 16, item 6): click an image, zoom, pan, layers in step
(a smear's original, cell mask and heatmap), the heatmap's colour scale against render.py's map, and on a
DICOM radiograph with a known pixel spacing: window/level (sliders and right-drag), invert, and a distance
measured with the mouse and with the keyboard (100 px at 0.5 mm = 50.0 mm). Esc closes and gives focus back.
Screenshots go to test-artifacts/e2e/ (viewer-*.png), beside test_browser.py's.

The server and browser fixtures are test_browser.py's (a server of its own for this module)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.e2e.test_browser import (ARTIFACTS, SMEAR, XRAY_DIR, _create_case_and_wait, _sign_in,  # noqa: F401
                                    browser, create_account, first_run_setup, server, smear_file, xray_file)

pytestmark = pytest.mark.slow

MRN = "E2E-VIEW-1"
DOCTOR = ("viewer.doctor@clinic.test", "Viewer-pass-2026")


def snap(page, name: str) -> None:
    """The window as it is (the viewer is a full-window dialog: a full-page capture would add the page below)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"viewer-{name}.png"))


def _setup(page, server: str) -> None:
    """First-run setup, an administrator creates a doctor, who signs in and creates the patient."""
    first_run_setup(page, server)
    create_account(page, "Dr Ray Diologist", DOCTOR[0], "doctor", DOCTOR[1])
    page.click("text=Sign out")
    _sign_in(page, server, *DOCTOR)
    page.goto(server + "/patients/new")
    page.fill("#mrn", MRN)
    page.fill("#family_name", "Viewer")
    page.fill("#given_name", "Vera")
    page.fill("#birth_date", "1970-01-01")
    page.select_option("#sex", "female")
    page.click("main form[novalidate] button[type=submit]")
    page.wait_for_selector("h1:has-text('Viewer, Vera')")


def radiograph_dicom(tmp_path) -> tuple:
    """A CR DICOM of a test-split radiograph (a generated one without the dataset), Pixel Spacing 0.5 mm."""
    from tests.imaging.test_dicom import make_dicom, to_bytes

    grey = np.asarray(Image.open(xray_file(tmp_path)).convert("L"))
    p = tmp_path / "knee.dcm"
    p.write_bytes(to_bytes(make_dicom(np.ascontiguousarray(grey), modality="CR", patient_id=MRN,
                                      extra={"PixelSpacing": [0.5, 0.5]})))
    return p, grey.shape


def _open_viewer(page, selector: str) -> None:
    page.click(selector)
    page.wait_for_selector("dialog#image-viewer[open] .iv-stage[data-ready]")


def _stage(page, key: str) -> str:
    return page.get_attribute(".iv-stage", f"data-{key}") or ""


def _stage_centre(page) -> tuple[float, float]:
    b = page.locator(".iv-stage").bounding_box()
    return b["x"] + b["width"] / 2, b["y"] + b["height"] / 2


def _grey_pixel(page, x: int, y: int) -> int:
    return page.evaluate(f"document.querySelector('.iv-grey').getContext('2d').getImageData({x}, {y}, 1, 1).data[0]")


def test_viewer_zoom_pan_layers_window_level_and_distance(server, browser, tmp_path):
    ctx = browser.new_context(viewport={"width": 1366, "height": 768})
    page = ctx.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append("page error: " + str(e)))
    _setup(page, server)

    # ---------------------------------------------------------------- a smear: original, cell mask, heatmap
    page.click("text=New case")
    page.select_option("#analyzer_id", "smear-all")
    _create_case_and_wait(page, smear_file(tmp_path))
    viewer = page.locator("section.field-result .viewer").first
    has_heat = viewer.get_attribute("data-heatmap") is not None
    if SMEAR.exists():  # the real smear is in the analyzer's domain: it gets a call, cells and a heatmap
        assert has_heat and viewer.get_attribute("data-mask") is not None
    if viewer.get_attribute("data-mask"):
        _open_viewer(page, "figure[data-viewer-layer=mask] img")
        assert page.locator(".iv-mask").is_visible() and page.locator("input[data-layer=mask]").is_checked()
        assert page.locator(".iv-radiology").is_hidden()  # microscopy: no window/level
        if has_heat:
            page.check("input[data-layer=heatmap]")
            assert page.locator(".iv-heat").is_visible()
            # the layers are one stack under one transform: zoomed, they still cover the same box
            cx, cy = _stage_centre(page)
            page.mouse.move(cx, cy)
            page.mouse.wheel(0, -600)
            boxes = [page.locator(sel).bounding_box() for sel in (".iv-original", ".iv-mask", ".iv-heat")]
            assert all(abs(b[k] - boxes[0][k]) < 0.5 for b in boxes for k in ("x", "y", "width", "height")), boxes
            # the colour scale is render.py's map, low to high
            from oncoscope.analyzers.render import _jet

            expected = _jet(np.array([0.0, 128 / 255, 1.0]))
            got = [page.evaluate(f"Array.from(document.getElementById('iv-scale').getContext('2d')"
                                 f".getImageData({x}, 5, 1, 1).data.slice(0, 3))") for x in (0, 128, 255)]
            assert np.array_equal(np.array(got), expected), (got, expected)
        snap(page, "01-smear-layers-1366")
        page.keyboard.press("Escape")
        assert page.locator("dialog#image-viewer[open]").count() == 0

    # ---------------------------------------------------------------- a DICOM radiograph, 0.5 mm pixels
    page.goto(server + "/patients/?q=" + MRN)
    page.click("main a:has-text('Viewer')")
    page.click("text=New case")
    page.select_option("#analyzer_id", "bone-xray")
    dcm, (rows, cols) = radiograph_dicom(tmp_path)
    _create_case_and_wait(page, dcm)
    viewer = page.locator("section.field-result .viewer").first
    assert viewer.get_attribute("data-spacing") == "0.5,0.5"
    page.locator("section.field-result").first.scroll_into_view_if_needed()
    snap(page, "00-radiograph-case-page")
    has_heat = viewer.get_attribute("data-heatmap") is not None
    if XRAY_DIR.is_dir():
        assert has_heat, "a test-split radiograph should get a call and a heatmap"
    opener = "figure[data-viewer-layer=heatmap] img.layer" if has_heat else "figure[data-viewer-layer=original] img"
    _open_viewer(page, opener)
    assert page.locator("#iv-title").inner_text() == "Radiograph 1 · knee.dcm"
    assert page.locator(".iv-grey").is_visible() and page.locator(".iv-original").is_hidden()  # W/L canvas
    assert page.evaluate("[document.querySelector('.iv-grey').width, document.querySelector('.iv-grey').height]") \
        == [cols, rows]  # native resolution
    snap(page, "02-radiograph-fit-1366")

    # zoom: buttons, wheel, keys, 1:1
    fit_zoom = float(_stage(page, "zoom"))
    page.click("[data-iv=zoom-in]")
    assert float(_stage(page, "zoom")) == pytest.approx(fit_zoom * 1.25)
    page.keyboard.press("-")
    assert float(_stage(page, "zoom")) == pytest.approx(fit_zoom)
    cx, cy = _stage_centre(page)
    page.mouse.move(cx, cy)
    page.mouse.wheel(0, -400)
    assert float(_stage(page, "zoom")) > fit_zoom * 1.5
    page.click("[data-iv=native]")
    assert float(_stage(page, "zoom")) == 1.0
    assert page.locator("#iv-zoom-level").inner_text() == "100%"

    # pan: a drag moves the image with the pointer; arrow keys move the view
    before = [int(v) for v in _stage(page, "pan").split(",")]
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + 40, cy + 30, steps=4)
    page.mouse.up()
    after = [int(v) for v in _stage(page, "pan").split(",")]
    assert (after[0] - before[0], after[1] - before[1]) == (40, 30), (before, after)
    page.focus(".iv-stage")
    page.keyboard.press("ArrowRight")
    assert int(_stage(page, "pan").split(",")[0]) <= after[0]

    # heatmap on and off, with its legend
    if has_heat:
        assert page.locator(".iv-heat").is_visible() and page.locator("#iv-legend").is_visible()
        page.uncheck("input[data-layer=heatmap]")
        assert page.locator(".iv-heat").is_hidden()
        page.keyboard.press("h")  # focus is on the checkbox: the key still toggles the layer
        assert page.locator(".iv-heat").is_visible()
        page.fill("#iv-opacity", "30")
        assert page.evaluate("getComputedStyle(document.querySelector('.iv-heat')).opacity") == "0.3"
        page.uncheck("input[data-layer=heatmap]")

    # window / level: a narrow window raises the contrast: output = clamp((v - (L - W/2)) / W) * 255
    y, x = rows // 2, cols // 2
    v0 = _grey_pixel(page, x, y)
    assert abs(v0 - int(grey_at(dcm, y, x))) <= 1  # the identity at first
    page.fill("#iv-window", "100")
    page.fill("#iv-level", "100")
    page.wait_for_selector(".iv-stage[data-window='100/100']", state="attached")  # redrawn (next frame)
    expected = round(min(1, max(0, (v0 - 50) / 100)) * 255)
    assert abs(_grey_pixel(page, x, y) - expected) <= 1
    page.check("#iv-invert")
    page.wait_for_selector(".iv-stage[data-window='100/100/inverted']", state="attached")
    assert abs(_grey_pixel(page, x, y) - (255 - expected)) <= 1
    page.uncheck("#iv-invert")
    # right-drag: sideways widens the window, down raises the level
    page.mouse.move(cx, cy)
    page.mouse.down(button="right")
    page.mouse.move(cx + 60, cy + 40, steps=4)
    page.mouse.up(button="right")
    page.wait_for_selector(".iv-stage[data-window='160/120']", state="attached")
    assert page.locator("#iv-window-value").inner_text() == "160"

    # distance: two clicks 100 screen pixels apart at 1:1 are 100 image pixels: 50.0 mm at 0.5 mm
    page.click("[data-iv=fit]")
    page.click("[data-iv=native]")
    page.click("[data-iv=measure]")
    assert page.get_attribute("[data-iv=measure]", "aria-pressed") == "true"
    page.mouse.click(cx - 50, cy)
    page.mouse.click(cx + 50, cy)
    assert page.inner_text("#iv-distance") == "Distance: 50.0 mm (100.0 px)"
    assert page.locator(".iv-ruler").is_visible()
    snap(page, "03-radiograph-window-level-distance-1366")
    # the same with the keyboard: Enter at the cross, two arrow presses (50 px each at 1:1), Enter
    page.focus(".iv-stage")
    page.keyboard.press("Enter")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")
    assert page.inner_text("#iv-distance") == "Distance: 50.0 mm (100.0 px)"

    # the page's own shortcut keys (workflow.js: n next case, a agree, s sign) never see a key typed in the viewer
    page.evaluate("window.keysSeen = 0; document.addEventListener('keydown', () => window.keysSeen++)")
    for key in ("n", "a", "s", "o"):
        page.keyboard.press(key)
    assert page.evaluate("window.keysSeen") == 0 and page.locator("dialog#image-viewer[open]").count() == 1

    # reset, then Esc closes and focus is back on the image that opened it
    page.click("[data-iv=reset]")
    page.wait_for_selector(".iv-stage[data-window='255/127.5']", state="attached")
    assert page.inner_text("#iv-distance") == "" and page.locator(".iv-ruler").is_hidden()
    assert float(_stage(page, "zoom")) == pytest.approx(fit_zoom)
    page.keyboard.press("Escape")
    assert page.locator("dialog#image-viewer[open]").count() == 0
    assert page.evaluate("document.activeElement.closest('figure')?.dataset.viewerLayer") == \
        ("heatmap" if has_heat else "original")

    # the keyboard opens it too
    page.focus("figure[data-viewer-layer=original] img")
    page.keyboard.press("Enter")
    page.wait_for_selector("dialog#image-viewer[open] .iv-stage[data-ready]")
    page.keyboard.press("Escape")

    # a radiograph without a pixel spacing (a PNG): the distance is in pixels, and the viewer says why
    page.goto(server + "/patients/?q=" + MRN)
    page.click("main a:has-text('Viewer')")
    page.click("text=New case")
    page.select_option("#analyzer_id", "bone-xray")
    png = tmp_path / "knee.png"
    Image.fromarray(read_grey(dcm)).save(png)
    _create_case_and_wait(page, png)
    assert page.locator("section.field-result .viewer").first.get_attribute("data-spacing") is None
    _open_viewer(page, "figure[data-viewer-layer=original] img")
    assert "No pixel spacing is known" in page.inner_text("#iv-spacing")
    page.click("[data-iv=native]")
    page.keyboard.press("m")
    page.mouse.click(cx, cy - 30)
    page.mouse.click(cx, cy + 30)
    assert page.inner_text("#iv-distance") == "Distance: 60.0 px (no pixel spacing known: not in mm)"
    page.keyboard.press("Escape")

    # a narrow window: the controls go below the image, nothing is cut off sideways
    page.set_viewport_size({"width": 390, "height": 844})
    _open_viewer(page, "figure[data-viewer-layer=original] img")
    side, stage = page.locator(".iv-side").bounding_box(), page.locator(".iv-stage").bounding_box()
    assert side["y"] >= stage["y"] + stage["height"] - 1 and side["width"] <= 390
    assert page.evaluate("document.querySelector('.iv-bar').scrollWidth <= 390")
    snap(page, "04-radiograph-390px")
    page.keyboard.press("Escape")
    assert not [e for e in errors if "Content Security Policy" in e or "page error" in e or "TypeError" in e], errors
    ctx.close()


def read_grey(dcm) -> np.ndarray:
    from oncoscope.imaging.dicom import read_dicom

    return read_dicom(dcm.read_bytes()).rgb[..., 0]


def grey_at(dcm, y: int, x: int) -> int:
    return int(read_grey(dcm)[y, x])
