"""End-to-end with a real PACS: a private Orthanc C-STOREs an MR study and a CT study into
`oncoscope dicom listen`; the doctor finds the MR case analysed and the CT in the DICOM inbox,
retrieves another study from the PACS page (QIDO-RS / WADO-RS), signs, and the signed SR is stored
back into Orthanc (STOW-RS) and shown as sent on the case page. Screenshots in test-artifacts/e2e/
(names int-*)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from oncoscope.bench.dicom import slices
from tests.e2e.test_browser import (  # noqa: F401  (pytest fixtures used by name)
    CHROMIUM, _free_port, _sign_in, browser, create_account, first_run_setup, shot, start_serve)
from tests.orthanc import PASSWORD, USER, Orthanc

pytestmark = pytest.mark.slow
DOC = ("Dr Paula Pacs", "pacs.doctor@clinic.test", "Pacs-pass-2026")
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _study(n: int, modality: str = "MR") -> list[bytes]:
    """``n`` slices of a new study of the benchmark patient (MRN-BENCH-MR, Bench^Mri)."""
    data, _ = slices(n)
    study, series = generate_uid(), generate_uid()
    out = []
    for d in data:
        ds = pydicom.dcmread(io.BytesIO(d))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if modality == "CT":
            ds.Modality, ds.BodyPartExamined, ds.SeriesDescription = "CT", "CHEST", "CT chest"
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CT_STORAGE
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        pytest.skip("Chromium not installed (make test installs Debian's chromium)")
    pytest.importorskip("playwright")
    home = tmp_path_factory.mktemp("pacs-instance")
    orthanc = Orthanc(home / "orthanc", aet="PACS").start()
    env = {"ONCOSCOPE_HOME": str(home / "oncoscope"), "ONCOSCOPE_ANALYSIS_WORKERS": "1",
           "ONCOSCOPE_DICOMWEB_URL": orthanc.dicomweb, "ONCOSCOPE_DICOMWEB_USER": USER,
           "ONCOSCOPE_DICOMWEB_PASSWORD": PASSWORD, "ONCOSCOPE_DICOM_ALLOWED_AETS": "PACS"}
    base, serve = start_serve(home, "--processes", "1", **env)
    dicom_port = _free_port()
    listener = subprocess.Popen([str(Path(sys.executable).parent / "oncoscope"), "dicom", "listen", "--host",
                                 "127.0.0.1", "--port", str(dicom_port)], env=dict(os.environ, **env),
                                stdout=open(home / "dicom.log", "w"), stderr=subprocess.STDOUT)
    procs = [serve, listener]
    for _ in range(120):  # the listener's port opens once its imports are done
        try:
            socket.create_connection(("127.0.0.1", dicom_port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.25)
    orthanc.add_peer("oncoscope", "ONCOSCOPE", dicom_port)
    yield base, orthanc, home
    for p in procs:
        p.terminate()
        p.wait(10)
    orthanc.stop()


def test_pacs_to_oncoscope_and_back(site, browser):
    server, orthanc, home = site
    errors: list[str] = []
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    admin = ctx.new_page()
    admin.on("console", lambda m: errors.append(f"{admin.url}: {m.text[:80]}") if m.type == "error" else None)
    first_run_setup(admin, server)
    create_account(admin, *DOC[:2], "doctor", DOC[2])
    admin.goto(server + "/patients/new")
    admin.fill("#mrn", "MRN-BENCH-MR")
    admin.fill("#family_name", "Bench")
    admin.fill("#given_name", "Mri")
    admin.fill("#birth_date", "1970-01-01")
    admin.click("main form[novalidate] button[type=submit]")
    admin.wait_for_selector("h1:has-text('Bench, Mri')")
    patient_url = admin.url
    doc_value = admin.locator("select[name=doctors] option", has_text=DOC[0]).get_attribute("value")
    admin.select_option("select[name=doctors]", [doc_value])
    admin.click("main button:text-is('Save access')")
    admin.wait_for_selector(f"dd:has-text('{DOC[0]}')")

    # the PACS sends an MR study (routed to brain-mri) and a CT study (no rule: the inbox)
    mr, ct, later = _study(3), _study(1, "CT"), _study(2)
    for d in mr + ct + later:
        orthanc.upload(d)
    sent = [_orthanc_id(orthanc, pydicom.dcmread(io.BytesIO(d[0])).StudyInstanceUID) for d in (mr, ct)]
    job = orthanc.post("/modalities/oncoscope/store", {"Resources": sent, "Synchronous": True})
    assert job["FailedInstancesCount"] == 0, (job, (home / "dicom.log").read_text()[-2000:])

    doc = ctx.browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    doc.on("console", lambda m: errors.append(f"{doc.url}: {m.text[:80]}") if m.type == "error" else None)
    _sign_in(doc, server, DOC[1], DOC[2])
    assert doc.locator("nav.mainnav a[data-queue=inbox]").inner_text().replace("\n", " ").startswith("DICOM inbox")
    doc.goto(server + "/worklist/verify")
    for _ in range(120):  # the receiver queued the analyses; `oncoscope serve` runs them
        if doc.locator("table[data-worklist] tbody tr a").count():
            break
        time.sleep(0.5)
        doc.reload()
    doc.locator("table[data-worklist] tbody tr a").first.click()
    doc.wait_for_selector("section.field-result .viewer img", timeout=60_000)
    page_text = doc.locator("main").inner_text()
    assert "DICOM study" in page_text and "Received over DICOM from AE PACS" in page_text
    case_url = doc.url
    shot(doc, "int-01-received-case")

    doc.goto(server + "/inbox")
    assert "No routing rule matches modality CT" in doc.locator("main").inner_text()
    shot(doc, "int-02-inbox")
    doc.once("dialog", lambda d: d.accept())  # "Dismiss these 1 image(s)? ..."
    doc.click("main button:text-is('Dismiss')")
    doc.wait_for_selector("text=Nothing waiting")

    doc.goto(patient_url)
    doc.click("a:text-is('Studies in the PACS')")
    doc.wait_for_selector("h1:has-text('Studies in the PACS')")
    assert doc.locator("main section.card").count() == 3  # MR, CT and the study not yet sent
    shot(doc, "int-03-pacs")
    later_uid = pydicom.dcmread(io.BytesIO(later[0])).StudyInstanceUID
    card = doc.locator(f"main section.card:has(input[value='{later_uid}'])")
    assert card.locator("select[name=analyzer_id]").input_value() == "brain-mri"  # the routing table suggests it
    card.locator("button:text-is('Retrieve and analyse')").click()
    doc.wait_for_selector("text=Retrieved 2 new images")

    # sign the received case: the SR goes back to the PACS on its own
    doc.goto(case_url)
    doc.wait_for_selector("section#sign")
    ai = doc.locator("#sign select[name=final_diagnosis]").input_value()
    options = doc.locator("#sign select[name=final_diagnosis] option").evaluate_all("els => els.map(e => e.value)")
    doc.select_option("#sign select[name=final_diagnosis]", ai or [o for o in options if o][0])
    # as a doctor does: sign, and give the reason for overriding only if the form says it is needed
    for name in ("uncertainty_note", "override_reason"):
        box = doc.locator(f"#sign textarea[name={name}]")
        if name == "uncertainty_note" and box.count() and box.is_visible():
            box.fill("Read on the full series at the workstation.")
        elif name == "override_reason":
            if not doc.locator("text=Give the reason for overriding the AI result").count():
                break
            box.fill("Read on the full series at the workstation.")
        confirm = doc.locator("#sign input[name=confirm]")
        if confirm.count():
            confirm.check()
        doc.click("#sign button:text-is('Sign')")
        doc.wait_for_load_state()
    doc.wait_for_selector("text=Case signed")
    for _ in range(60):  # the delivery pump runs every few seconds
        doc.goto(case_url)
        if doc.locator("#deliveries .badge:text-is('sent')").count():
            break
        time.sleep(0.5)
    assert doc.locator("#deliveries .badge:text-is('sent')").count() == 1, doc.locator("main").inner_text()[-1500:]
    doc.locator("#deliveries").scroll_into_view_if_needed()
    shot(doc, "int-04-delivered")
    mr_study = pydicom.dcmread(io.BytesIO(mr[0])).StudyInstanceUID
    series = orthanc.get(f"/studies/{_orthanc_id(orthanc, mr_study)}/series")
    modalities = {s["MainDicomTags"].get("Modality") for s in series}
    assert modalities == {"MR", "SR"}
    assert not errors, errors


def _orthanc_id(orthanc, study_uid: str) -> str:
    """Orthanc's own id of a study."""
    (hit,) = orthanc.request("POST", "/tools/lookup", study_uid.encode(), "text/plain")
    return hit["ID"]
