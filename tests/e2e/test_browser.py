"""End-to-end in Chromium: first-run setup -> admin creates a doctor -> doctor signs in -> creates a
patient -> uploads a smear -> sees the result -> overrides and signs -> downloads the PDF.
Screenshots are kept in test-artifacts/e2e/."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "e2e"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SMEAR = REPO.parent / "shared" / "datasets" / "all-taleqani" / "Original" / "Pre" / "WBC-Malignant-Pre-154.jpg"
XRAY_DIR = REPO.parent / "shared" / "datasets" / "bone-xray" / "cancer"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        pytest.skip("Chromium not installed (make test installs Debian's chromium)")
    pytest.importorskip("playwright")
    home = tmp_path_factory.mktemp("instance")
    base, proc = start_serve(home, ONCOSCOPE_HOME=str(home), ONCOSCOPE_ANALYSIS_WORKERS="1")
    yield base
    proc.terminate()
    proc.wait(10)


def start_serve(home: Path, *args: str, **env_vars: str) -> tuple[str, subprocess.Popen]:
    """A migrated instance served by `oncoscope serve` (``args``: more of its options), its log in
    ``home``; returns its address and process once it answers."""
    env = dict(os.environ, **env_vars)
    env.pop("DATABASE_URL", None)
    exe = str(Path(sys.executable).parent / "oncoscope")
    subprocess.run([exe, "db", "upgrade"], env=env, check=True, capture_output=True, timeout=120)
    port = _free_port()
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([exe, "serve", "--port", str(port), *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(base + "/healthz", timeout=1)
            return base, proc
        except Exception:  # noqa: BLE001
            time.sleep(0.25)
    proc.kill()
    pytest.fail("server did not start: " + (home / "server.log").read_text()[-2000:])


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
            "--disable-gpu", "--no-first-run"])
        yield b
        b.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def smear_file(tmp_path) -> Path:
    if SMEAR.exists():
        return SMEAR
    from oncoscope.ml.synthetic import smear_like

    p = tmp_path / "field.png"
    Image.fromarray(smear_like(0)[0]).save(p)
    return p


def xray_file(tmp_path) -> Path:
    """A test-split cancer radiograph when the dataset is present, else a generated one."""
    import json

    manifest = json.loads((REPO / "oncoscope" / "training" / "splits" / "bone-xray.json").read_text())
    test = sorted(p for p, v in manifest["files"].items() if v["split"] == "test" and v["label"] == "cancer")
    if XRAY_DIR.is_dir() and test:
        return XRAY_DIR.parent / test[len(test) // 2]
    from oncoscope.ml.synthetic import radiograph_like

    p = tmp_path / "knee.png"
    Image.fromarray(radiograph_like(0)).save(p)
    return p


def _create_case_and_wait(page, image: Path) -> None:
    """On the new-case form: attach the image, create the case, wait until its analysis is shown."""
    page.set_input_files("#images", str(image))
    page.click("main button[type=submit]")
    page.wait_for_selector("section.field-result .viewer img", timeout=60_000)  # the page reloads itself when done
    page.wait_for_load_state("networkidle")


def test_full_clinical_workflow(server, browser, tmp_path):
    ctx = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

    # 1. first-run setup
    first_run_setup(page, server, screenshot="01-setup")

    # 2. admin creates a doctor
    create_account(page, "Dr Hema Tologist", "doctor@clinic.test", "doctor", "Doctor-pass-2026")
    shot(page, "02-admin-users")
    page.goto(server + "/")
    shot(page, "03-admin-home")
    page.click("text=Sign out")

    # 3. doctor signs in
    page.fill("#email", "doctor@clinic.test")
    page.fill("#password", "Doctor-pass-2026")
    page.click("main button[type=submit]")
    page.wait_for_url(server + "/")
    shot(page, "04-doctor-home")

    # 4. creates a patient (first with a validation error shown next to the field)
    page.click("nav.mainnav >> text=Patients")
    page.click("text=New patient")
    page.fill("#mrn", "E2E-0001")
    page.click("main form[novalidate] button[type=submit]")
    assert page.locator("#family_name-err").is_visible()
    page.fill("#family_name", "Testpatient")
    page.fill("#given_name", "Maria")
    page.fill("#birth_date", "1975-04-12")
    page.select_option("#sex", "female")
    page.click("main form[novalidate] button[type=submit]")
    page.wait_for_selector("h1:has-text('Testpatient, Maria')")

    # 5. uploads a smear image to a new case
    page.click("text=New case")
    page.set_input_files("#images", str(smear_file(tmp_path)))
    shot(page, "05-new-case")
    page.click("main button[type=submit]")
    page.wait_for_selector("section.field-result .viewer img", timeout=60_000)  # page reloads itself when done
    page.wait_for_load_state("networkidle")
    shot(page, "06-case-result")
    assert page.locator("table.probs").is_visible() or page.locator(".banner.warn").is_visible()

    # 6. overrides the AI diagnosis and signs
    ai = page.locator("#final_diagnosis").input_value()
    options = [o for o in page.locator("#final_diagnosis option").evaluate_all("els => els.map(e => e.value)")]
    other = next(o for o in options if o not in (ai, "", "Nondiagnostic"))
    page.select_option("#final_diagnosis", other)
    page.fill("#override_reason", "Blast morphology reviewed at the microscope.")
    if page.locator("#uncertainty_note").count():
        page.fill("#uncertainty_note", "Reviewed despite the AI warning.")
    page.fill("#comment", "Flow cytometry requested.")
    page.check("#confirm")
    page.click("main button:text-is('Sign')")
    page.wait_for_selector("text=Case signed")
    shot(page, "07-signed")

    # 7. downloads the PDF
    with page.expect_download() as dl:
        page.click("text=Download PDF report")
    pdf = dl.value.path()
    from pypdf import PdfReader

    text = "".join(p.extract_text() for p in PdfReader(pdf).pages)
    assert "Testpatient" in text
    display = {"Benign": "Benign (hematogone)", "Early": "Early Pre-B ALL", "Pre": "Pre-B ALL", "Pro": "Pro-B ALL"}
    assert display[other] in text
    shutil.copy(pdf, ARTIFACTS / "08-report.pdf")
    page.goto(server + "/cases/")
    shot(page, "09-history")
    page.goto(server + "/patients/?q=Testp")
    assert page.locator("text=E2E-0001").is_visible()
    shot(page, "10-patients")

    # 8. the same patient, a bone radiograph: the same pages, with no cell panel
    page.click("main a:has-text('Testpatient')")
    page.wait_for_selector("h1:has-text('Testpatient, Maria')")
    page.click("text=New case")
    page.select_option("#analyzer_id", "bone-xray")
    _create_case_and_wait(page, xray_file(tmp_path))
    shot(page, "11-bone-xray-case")
    assert page.locator("section.field-result h2:has-text('Radiograph 1')").is_visible()
    assert page.locator("text=Cells:").count() == 0

    # 9. the administrator reads the audit trail: the doctor's views, uploads and sign-off are there
    page.click("text=Sign out")
    page.fill("#email", "admin@clinic.test")
    page.fill("#password", "Admin-pass-2026")
    page.click("main button[type=submit]")
    page.click("nav.mainnav >> text=Audit")
    page.fill("#actor", "doctor@clinic.test")
    page.click("main form.filters button[type=submit]")
    page.wait_for_selector("table.audit tbody tr")
    shot(page, "12-audit-trail")
    body = page.inner_text("table.audit")
    for action in ("auth.login", "case.create", "case.sign", "report.pdf", "image.download"):
        assert action in body, action
    assert "Doctor-pass-2026" not in page.content()
    assert not [e for e in errors if "Content Security Policy" in e], errors
    ctx.close()


ADMIN_ACCOUNT = ("Ada Admin", "admin@clinic.test", "Admin-pass-2026")


def first_run_setup(page, server: str, screenshot: str | None = None) -> None:
    """The first visit of a fresh instance: the setup page creates the administrator, who lands on
    the accounts page."""
    page.goto(server + "/")
    assert page.url.endswith("/setup")
    if screenshot:
        shot(page, screenshot)
    name, email, password = ADMIN_ACCOUNT
    page.fill("#name", name)
    page.fill("#email", email)
    page.fill("#password", password)
    page.fill("#confirm", password)
    page.click("main button[type=submit]")
    page.wait_for_url("**/admin/users")


def create_account(page, name: str, email: str, role: str, password: str) -> None:
    """On the administrator's accounts page: create one account and wait for the confirmation."""
    page.fill("#name", name)
    page.fill("#email", email)
    page.select_option("#role", role)
    page.fill("#password", password)
    page.click("main form[novalidate] button[type=submit]")
    page.wait_for_selector(f"text=Account created for {name}")  # waits: hashing is slow on a busy machine


def _sign_in(page, server: str, email: str, password: str) -> None:
    page.goto(server + "/login")
    page.fill("#email", email)
    page.fill("#password", password)
    page.click("main button[type=submit]")
    page.wait_for_url(server + "/")


def _no_sideways_scroll(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_review_findings_in_the_browser(server, browser, tmp_path):
    """The findings of the outside review, as a user meets them (runs after the workflow above,
    which created the doctor and patient E2E-0001): a DICOM pre-fill that saves, a case the AI
    gave no diagnosis with nothing pre-selected and errors summarised at the top with focus, an
    amendment that starts from the signed texts, and a phone-width page without sideways scrolling."""
    from tests.web.test_patients import dicom_file

    ctx = browser.new_context(viewport={"width": 390, "height": 844})
    page = ctx.new_page()
    _sign_in(page, server, "doctor@clinic.test", "Doctor-pass-2026")

    # DICOM pre-fill, edited, then saved: the values arrive
    page.goto(server + "/patients/new")
    dcm = tmp_path / "scan.dcm"
    dcm.write_bytes(dicom_file("E2E-DCM-1", "Curie^Marie"))
    page.set_input_files("input[type=file]", str(dcm))
    page.click("text=Read patient data")
    assert page.locator("#mrn").input_value() == "E2E-DCM-1"
    page.fill("#given_name", "Maria Sklodowska")
    page.click("main form[novalidate] button[type=submit]")
    page.wait_for_selector("h1:has-text('Curie, Maria Sklodowska')")

    # a case whose only image is not a smear: no AI label, nothing pre-selected
    page.click("text=New case")
    long_name = "field-" + "x" * 120 + ".png"
    from oncoscope.ml.synthetic import smear_like

    Image.fromarray(smear_like(3)[0]).save(tmp_path / long_name)
    _create_case_and_wait(page, tmp_path / long_name)
    assert page.locator("#final_diagnosis").input_value() == ""
    assert _no_sideways_scroll(page), "the case page scrolls sideways at 390 px"
    shot(page, "13-no-ai-label-390px")
    page.check("#confirm")
    page.click("main button:text-is('Sign')")
    page.wait_for_selector(".error-summary")
    assert page.evaluate("document.activeElement.classList.contains('error-summary')")
    summary = page.inner_text(".error-summary")
    assert "Choose a diagnosis" in summary and "give the reason for yours" in summary
    shot(page, "14-sign-errors-summary")
    page.select_option("#final_diagnosis", "Nondiagnostic")
    page.fill("#override_reason", "Field not interpretable.")
    page.fill("#uncertainty_note", "Not a smear according to the AI.")
    page.check("#confirm")
    page.click("main button:text-is('Sign')")
    page.wait_for_selector("text=Case signed")
    assert page.locator("text=The AI gave no diagnosis (out of domain)").is_visible()
    # the signed diagnosis is the first thing on the page, not below the images
    assert page.locator("section.signed").bounding_box()["y"] < page.locator("section.field-result").bounding_box()["y"]

    # amending starts from the signed texts
    assert page.locator("#override_reason").input_value() == "Field not interpretable."
    assert page.locator("#uncertainty_note").input_value() == "Not a smear according to the AI."
    page.fill("#amendment_reason", "Second look.")
    page.check("#confirm")
    page.click("main button:text-is('Sign amendment')")
    page.wait_for_selector("text=Case signed (version 2)")
    page.click("text=Earlier versions")
    assert page.locator("text=Version 1: Non-diagnostic sample").is_visible()
    assert page.locator("text=Amended (version 2): Second look.").is_visible()
    assert _no_sideways_scroll(page)
    shot(page, "15-amended-390px")
    for url in ("/", "/cases/", "/patients/"):
        page.goto(server + url)
        assert _no_sideways_scroll(page), url
    ctx.close()


def _many_cell_fields(tmp_path, n_fields: int = 4, first: int = 0) -> list[Path]:
    """Generated smear fields with 32 white cells each (known geometry; the detector finds them)."""
    from oncoscope.ml.synthetic import smear_field

    paths = []
    for k in range(first, first + n_fields):
        cells = [(110 + 160 * (i % 8), 110 + 170 * (i // 8), 11.0 + (i % 3)) for i in range(32)]
        rgb = smear_field(40 + k, 0.2, (1330, 780), cells)[0]
        p = tmp_path / f"field-{k}.png"
        Image.fromarray(rgb).save(p)
        paths.append(p)
    return paths


def test_technologist_verifies_100_cells_with_the_keyboard(server, browser, tmp_path):
    """The gallery as a technologist uses it all day: 100 cells verified with the keyboard alone,
    one reclassified with a number key, a range moved with shift+arrows, an undo; the time and the
    round trips are recorded (issue 14: under 2 minutes, round trip p95 under 100 ms)."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    page = ctx.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    _sign_in(page, server, "doctor@clinic.test", "Doctor-pass-2026")
    page.goto(server + "/patients/?q=E2E-0001")
    page.click("main a:has-text('Testpatient')")
    page.click("text=New case")
    page.select_option("#analyzer_id", "smear-differential")
    page.set_input_files("#images", [str(p) for p in _many_cell_fields(tmp_path)])
    page.click("main button[type=submit]")
    page.wait_for_selector("text=Review cells", timeout=120_000)
    page.click("text=Review cells")
    page.wait_for_selector("#gallery .cell")
    n = page.locator("#gallery .cell").count()
    assert n >= 100, f"only {n} cells in the gallery"
    shot(page, "16-gallery")

    page.focus("#gallery")
    verified = page.locator("#gallery .cell.verified")
    round_trips = []
    t0 = time.perf_counter()
    for k in range(100):
        page.keyboard.press("Enter")
        verified.nth(k).wait_for()  # (no wait_for_function: the page's CSP forbids evaluating strings)
        round_trips.append(int(page.get_attribute("#gallery", "data-last-ms") or 0))
    seconds = time.perf_counter() - t0
    assert verified.count() >= 100
    p95 = sorted(round_trips)[94]
    (ARTIFACTS / "gallery-timing.txt").write_text(
        f"100 cells verified with the keyboard in {seconds:.1f} s; round trip p50 "
        f"{sorted(round_trips)[49]} ms, p95 {p95} ms, max {max(round_trips)} ms\n")
    assert seconds < 120, seconds
    for _ in range(3):  # typed faster than the saves: the keys wait their turn, none is lost
        page.keyboard.press("Enter")
    verified.nth(102).wait_for()

    # a number key reclassifies the focused cell (1 = blast), shift+arrows select a range, u undoes
    page.keyboard.press("1")
    page.wait_for_selector("#gallery .cell.changed")
    assert "Blasts" in page.inner_text("#differential") or "blast" in page.inner_text("#differential")
    page.keyboard.press("Shift+ArrowRight")
    page.keyboard.press("Shift+ArrowRight")
    assert page.locator("#gallery .cell[aria-selected=true]").count() >= 2
    page.keyboard.press("u")
    page.locator("#gallery .cell.changed").wait_for(state="detached")  # the reclassification is undone
    shot(page, "17-gallery-verified")
    assert not [e for e in errors if "Content Security Policy" in e or "TypeError" in e], errors

    # a 500-cell case: more fields into the same case, then the gallery opens and answers a key
    page.click("text=Back to the case and sign-off")
    page.set_input_files("#more-images", [str(p) for p in _many_cell_fields(tmp_path, 12, first=4)])
    page.click("main form.upload button[type=submit]")
    page.wait_for_selector("#case-status[data-case-status=analysing]", state="attached", timeout=60_000)
    page.wait_for_selector("#case-status[data-case-status=ready]", state="attached", timeout=240_000)
    page.wait_for_load_state("networkidle")  # the case page's own 16 images have arrived
    t0 = time.perf_counter()
    page.click("text=Review cells")
    page.wait_for_load_state("load")
    opened = time.perf_counter() - t0
    total = page.locator("#gallery .cell").count()
    assert total >= 500, total
    page.locator("#gallery .cell").last.click()  # an unverified cell of the new fields
    page.keyboard.press("Enter")
    verified.nth(100).wait_for()
    interactive = time.perf_counter() - t0
    with open(ARTIFACTS / "gallery-timing.txt", "a") as fh:
        fh.write(f"{total}-cell gallery: page loaded {opened:.2f} s after the click (thumbnails lazy, per sprite), "
                 f"a cell at the end of the gallery verified {interactive:.2f} s after the click\n")
    assert opened < 2, opened  # the target is 1 s; a margin for a busy 2-core machine

    # sign with the unverified cells confirmed; the PDF carries the differential and the cell pictures
    page.click("text=Back to the case and sign-off")
    page.select_option("#final_diagnosis", "no_blasts")
    if page.locator("#uncertainty_note").count():
        page.fill("#uncertainty_note", "Reviewed in the gallery.")

    def sign():
        page.check("#confirm_unverified")
        page.check("#confirm")
        page.click("main button:text-is('Sign')")
        page.wait_for_load_state()

    # the case's call follows the cells verified above, so it may or may not agree with "no blasts" (or be
    # none): a reason is given only when the form asks for one (one that agrees with the AI is refused)
    sign()
    if page.locator("#override_reason").get_attribute("aria-invalid") == "true":
        page.fill("#override_reason", "Verified differential shows no blasts.")
        sign()
    page.wait_for_selector("text=Case signed")
    with page.expect_download() as dl:
        page.click("text=Download PDF report")
    shutil.copy(dl.value.path(), ARTIFACTS / "18-differential-report.pdf")
    assert not [e for e in errors if "Content Security Policy" in e or "TypeError" in e], errors
    ctx.close()
