"""End-to-end in Chromium, the clinical workflow with several people:
technologist -> doctor (first reading) -> blinded second reader -> consult with a reviewer -> final
-> amendment (corrected). Screenshots are kept in test-artifacts/e2e/ (names wf-*)."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.e2e.test_browser import (  # noqa: F401  (pytest fixtures used by name)
    ARTIFACTS, _create_case_and_wait, _sign_in, browser, create_account, first_run_setup, server, shot,
    smear_file)

pytestmark = pytest.mark.slow

TECH = ("Tom Technologist", "tech@clinic.test", "Tech-pass-2026")
DOC1 = ("Dr Una First", "doc1@clinic.test", "Doc1-pass-2026")
DOC2 = ("Dr Dos Second", "doc2@clinic.test", "Doc2-pass-2026")
REVIEWER = ("Dr Rita Reviewer", "reviewer@clinic.test", "Review-pass-2026")
DOC1_COMMENT = "First reader's own comment: blasts in most fields."


def _login(browser, server, who, errors):
    ctx = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.on("console", lambda m: errors.append(f"{page.url}: {m.text[:80]}") if m.type == "error" else None)
    _sign_in(page, server, who[1], who[2])
    return page


def _options(page, selector: str) -> list[str]:
    return page.locator(selector + " option").evaluate_all("els => els.map(e => e.value)")


def _flash(page, text: str) -> None:
    page.wait_for_selector(f"text={text}")


def test_second_reader_consult_and_correction(server, browser, tmp_path):
    errors: list[str] = []
    problems: list[str] = []  # checked at the end, so that one finding does not hide the others

    # 1. first-run setup; the administrator creates the staff and asks for a second reader on smears
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    admin = ctx.new_page()
    admin.on("console", lambda m: errors.append(f"{admin.url}: {m.text[:80]}") if m.type == "error" else None)
    first_run_setup(admin, server)
    for (name, email, password), role in ((TECH, "technologist"), (DOC1, "doctor"), (DOC2, "doctor"),
                                          (REVIEWER, "reviewer")):
        admin.goto(server + "/admin/users")
        create_account(admin, name, email, role, password)
    admin.goto(server + "/admin/workflow")
    admin.select_option("select[name='policy-smear-all']", "always")
    admin.click("main button:text-is('Save')")
    _flash(admin, "Workflow settings saved.")
    assert admin.locator("select[name='policy-smear-all']").input_value() == "always"
    shot(admin, "wf-01-admin-workflow")

    # 2. the technologist registers the patient; the administrator gives the staff access
    tech = _login(browser, server, TECH, errors)
    tech.click("nav.mainnav >> text=Patients")
    tech.click("text=New patient")
    tech.fill("#mrn", "WF-0001")
    tech.fill("#family_name", "Workflow")
    tech.fill("#given_name", "Wanda")
    tech.fill("#birth_date", "1968-09-30")
    tech.select_option("#sex", "female")
    tech.click("main form[novalidate] button[type=submit]")
    tech.wait_for_selector("h1:has-text('Workflow, Wanda')")
    patient_url = tech.url
    admin.goto(patient_url)
    staff = {o["label"]: o["value"] for o in admin.locator("select[name=doctors] option").evaluate_all(
        "els => els.map(e => ({label: e.textContent.trim(), value: e.value}))")}
    chosen = [v for label, v in staff.items() if any(n in label for n in (TECH[0], DOC1[0], DOC2[0]))]
    assert len(chosen) == 3, staff
    admin.select_option("select[name=doctors]", chosen)
    admin.click("main button:text-is('Save access')")
    for n in (TECH[0], DOC1[0], DOC2[0]):
        admin.wait_for_selector(f"dd:has-text('{n}')")
    shot(admin, "wf-02-patient-access")

    # 3. the technologist creates a STAT smear case and writes the preliminary result
    tech.goto(patient_url)
    tech.click("text=New case")
    tech.select_option("#analyzer_id", "smear-all")
    tech.select_option("#priority", "stat")
    _create_case_and_wait(tech, smear_file(tmp_path))
    case_url = tech.url.split("?")[0]
    case_id = int(re.search(r"/cases/(\d+)", case_url).group(1))
    tech.click("nav.mainnav a[data-queue=prepare]")
    tech.wait_for_url("**/worklist/prepare**")
    shot(tech, "wf-03-prepare-worklist")
    tech.click(f"table[data-worklist] a:text-is('#{case_id}')")
    tech.wait_for_selector("section#preliminary")
    prelim = [o for o in _options(tech, "#preliminary select[name=diagnosis]") if o and o != "Nondiagnostic"]
    ai = tech.locator("#sign select[name=final_diagnosis]").input_value() if tech.locator("#sign").count() else ""
    dx1 = ai if ai in prelim else prelim[0]
    tech.select_option("#preliminary select[name=diagnosis]", dx1)
    tech.fill("#preliminary textarea[name=comment]", "Many blasts; please verify STAT.")
    tech.click("#preliminary button:text-is('Save preliminary result')")
    _flash(tech, "Preliminary result saved")
    shot(tech, "wf-04-preliminary-saved")

    # 4. doctor 1 verifies from the worklist and signs: the first reading, a second doctor must confirm
    doc1 = _login(browser, server, DOC1, errors)
    doc1.goto(server + "/worklist/verify")
    row = doc1.locator(f"table[data-worklist] tr:has(a:text-is('#{case_id}'))")
    assert "STAT" in row.inner_text()
    shot(doc1, "wf-05-verify-worklist")
    row.locator("a").first.click()
    doc1.wait_for_selector("section#sign")
    doc1.select_option("#sign select[name=final_diagnosis]", dx1)
    for name, text in (("override_reason", "Agrees with the technologist's preliminary result."),
                       ("uncertainty_note", "Reviewed all fields at the microscope.")):
        box = doc1.locator(f"#sign textarea[name={name}]")
        if box.count() and box.is_visible():
            box.fill(text)
    doc1.fill("#sign textarea[name=comment]", DOC1_COMMENT)
    doc1.check("#sign input[name=confirm]")
    doc1.click("#sign button:text-is('Sign')")
    _flash(doc1, "a second doctor to confirm")
    shot(doc1, "wf-06-first-reading")

    # 5. doctor 2 reads blinded and, before committing, asks the reviewer about a region
    doc2 = _login(browser, server, DOC2, errors)
    doc2.goto(server + "/worklist/second-read")
    shot(doc2, "wf-07-second-read-worklist")
    doc2.click(f"table[data-worklist] a:text-is('#{case_id}')")
    doc2.wait_for_selector("section#second-read button:text-is('Commit my reading')")
    assert doc2.locator("section.readings").count() == 0
    assert DOC1_COMMENT not in doc2.content()
    assert doc2.locator("#second-read select[name=diagnosis]").input_value() in ("", None)
    shot(doc2, "wf-08-second-read-blinded")
    doc2.click("#consults summary:text-is('Ask a colleague')")
    reviewer_opt = doc2.locator("select[name=consultant_id] option", has_text=REVIEWER[0]).get_attribute("value")
    doc2.select_option("select[name=consultant_id]", reviewer_opt)
    doc2.fill("#consults textarea[name=question]", "Are these blasts or reactive lymphocytes? See the box.")
    image_opts = [o for o in _options(doc2, "select[name=image_id]") if o and o != "0"]
    doc2.select_option("select[name=image_id]", image_opts[0])
    img = doc2.locator("div.region-picker .region-image:visible img")
    img.wait_for()
    img.scroll_into_view_if_needed()
    b = img.bounding_box()
    doc2.mouse.move(b["x"] + b["width"] * 0.30, b["y"] + b["height"] * 0.25)
    doc2.mouse.down()
    doc2.mouse.move(b["x"] + b["width"] * 0.45, b["y"] + b["height"] * 0.40, steps=5)
    doc2.mouse.move(b["x"] + b["width"] * 0.60, b["y"] + b["height"] * 0.55, steps=5)
    doc2.mouse.up()
    region = doc2.locator("input[name=region]").input_value()
    assert re.fullmatch(r"\d+,\d+,\d+,\d+", region), region
    shot(doc2, "wf-09-consult-form")
    doc2.click("#consults button:text-is('Send consult')")
    _flash(doc2, "Consult sent.")
    doc2.wait_for_url(re.compile(r".*/consults/\d+$"))
    consult_url = doc2.url
    drawn = doc2.locator("figure.region-view .box").bounding_box()
    if not drawn or drawn["width"] < 10 or drawn["height"] < 10:
        problems.append(f"consult page: the region box is not drawn around the region ({drawn})")
    shot(doc2, "wf-10-consult-with-box")

    # 6. the reviewer sees the consult in the navigation, answers; doctor 2 closes it
    rev = _login(browser, server, REVIEWER, errors)
    count = rev.locator("nav.mainnav a[data-queue=consults] .count")
    assert count.inner_text().strip() == "1"
    rev.click("nav.mainnav a[data-queue=consults]")
    rev.click("table[data-worklist] a")
    rev.wait_for_url(consult_url)
    rev.fill("textarea[name=body]", "Blasts: fine chromatin and nucleoli. I agree with ALL.")
    rev.click("main button:text-is('Send')")
    rev.wait_for_selector("article.message")
    shot(rev, "wf-11-consult-answered")
    doc2.goto(consult_url)
    assert "fine chromatin" in doc2.inner_text("main")
    doc2.click("main button:text-is('Close the consult')")
    _flash(doc2, "Consult closed")
    shot(doc2, "wf-12-consult-closed")

    # 7. doctor 2 commits the same diagnosis: the report is final
    doc2.goto(case_url)
    doc2.select_option("#second-read select[name=diagnosis]", dx1)
    doc2.fill("#second-read textarea[name=comment]", "Agree, after the consult.")
    doc2.check("#second-read input[name=confirm]")
    doc2.click("#second-read button:text-is('Commit my reading')")
    _flash(doc2, "the report is final")
    assert doc2.locator("h1 .badge", has_text="report final").is_visible()
    if not doc2.locator("#report-history").get_attribute("open"):
        doc2.click("#report-history summary")
    assert doc2.locator("section.readings").is_visible()
    assert DOC1_COMMENT in doc2.content()  # no longer blinded
    shot(doc2, "wf-13-final")

    # 8. doctor 1 amends: the report is corrected, and the PDF says so
    doc1.goto(case_url)
    doc1.wait_for_selector("#sign button:text-is('Sign amendment')")
    dx_options = [o for o in _options(doc1, "#sign select[name=final_diagnosis]") if o and o != "Nondiagnostic"]
    dx2 = next(o for o in dx_options if o != dx1)
    doc1.select_option("#sign select[name=final_diagnosis]", dx2)
    doc1.fill("#sign textarea[name=override_reason]", "Flow cytometry changed the subtype.")
    box = doc1.locator("#sign textarea[name=uncertainty_note]")
    if box.count() and box.is_visible() and not box.input_value():
        box.fill("Reviewed all fields at the microscope.")
    doc1.fill("#sign textarea[name=amendment_reason]", "Flow cytometry result arrived.")
    doc1.check("#sign input[name=confirm]")
    doc1.click("#sign button:text-is('Sign amendment')")
    _flash(doc1, "Case signed (version 2)")
    assert doc1.locator("h1 .badge", has_text="report corrected").is_visible()
    shot(doc1, "wf-14-corrected")
    with doc1.expect_download() as dl:
        doc1.click("text=Download PDF report")
    pdf = ARTIFACTS / "wf-15-corrected-report.pdf"
    dl.value.save_as(str(pdf))
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True,
                          check=True).stdout
    subprocess.run(["pdftoppm", "-png", "-r", "60", "-f", "1", "-l", "1", str(pdf), str(ARTIFACTS / "wf-15-report")],
                   check=True)
    # the header's workflow line (first lines of page 1, above the title): the report's state and the second reader
    header = " ".join(text.split("\f")[0].splitlines()[:4])
    if not ("Corrected" in header and "second reader" in header):
        problems.append(f"PDF header lacks 'Corrected' / 'second reader': {header!r}")
    problems += sorted({f"console: {e}" for e in errors if "Content Security Policy" in e})
    assert not problems, "\n".join(problems)
    for p in (admin, tech, doc1, doc2, rev):
        p.context.close()
