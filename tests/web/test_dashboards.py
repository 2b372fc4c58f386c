"""The administrator's dashboards page and its CSV download, on cases signed through the real sign-off.
The figures themselves are checked exactly in tests/store/test_dashboards.py; who may open the pages
in test_authz.py."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re

from sqlalchemy import select

from oncoscope.store.dashboards import CSV_COLUMNS, week_label, week_start
from oncoscope.store.models import AuditEvent, utcnow

from .conftest import CASE_A_ID, CASE_B_ID, sessions_of


def _sign_both(client_for) -> None:
    """Both seeded cases are out of domain (no AI call): each sign-off is a referral with a reason."""
    for who, case_id, reason in (("doc_a", CASE_A_ID, "Stain <b>too</b> pale."),
                                 ("doc_b", CASE_B_ID, "=HYPERLINK(\"http://x\")")):
        r = client_for(who).post(f"/cases/{case_id}/sign", data={
            "confirm": "y", "final_diagnosis": "Benign", "override_reason": reason,
            "uncertainty_note": "manual review"})
        assert r.status_code == 302, r.data[:300]


def test_the_page_shows_each_analyzer_per_week_with_sparklines(app, client_for):
    _sign_both(client_for)
    r = client_for("admin").get("/admin/dashboards?weeks=4")
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    this_week = week_label(week_start(utcnow().date()))
    section = html[html.index('id="dash-smear-all"'):]
    section = section[:section.index("</section>")]
    row = re.search(rf"<tr><th scope=\"row\">{this_week}</th>(.*?)</tr>", section, re.S).group(1)
    cells = [" ".join(re.sub(r"<[^>]+>", " ", c).split()) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
    # signed, amended, AI agreement (no AI call: nothing to measure), second reader, referred, hours
    assert cells[:5] == ["2", "0", "–", "–", "100% (2/2)"]
    assert section.count('<svg class="spark"') == 4
    assert len(re.findall(r"<tr><th scope=\"row\">\d{4}-W\d\d</th>", section)) == 4  # one row per week
    # the reasons, normalised, and escaped like every text a user typed
    assert "stain &lt;b&gt;too&lt;/b&gt; pale <span class=\"muted\">(1)</span>" in section
    assert "<b>too</b>" not in html
    # an analyzer with nothing signed still has its card, saying so
    assert 'id="dash-bone-xray"' in html and "Nothing signed in the last 4 weeks." in html
    assert 'href="/admin/dashboards.csv?weeks=4"' in html


def test_the_csv_download_has_one_row_per_analyzer_week_and_metric(app, client_for):
    _sign_both(client_for)
    r = client_for("admin").get("/admin/dashboards.csv?weeks=2")
    assert r.status_code == 200 and r.mimetype == "text/csv"
    disposition = r.headers["Content-Disposition"]
    assert re.match(r'attachment; filename="oncoscope-dashboards-2w-\d{8}-\d{6}\.csv"', disposition)
    rows = list(csv.reader(io.StringIO(r.get_data(as_text=True))))
    assert tuple(rows[0]) == CSV_COLUMNS
    got = {(a, w, m, k): v for a, w, _, m, k, v in rows[1:]}
    this_week = week_label(week_start(utcnow().date()))
    assert got[("smear-all", this_week, "signed", "")] == "2"
    assert got[("smear-all", this_week, "referrals", "out_of_domain")] == "2"
    assert got[("smear-all", this_week, "referral_rate", "")] == "1"
    assert got[("smear-all", "all", "override_reason", "stain <b>too</b> pale")] == "1"
    assert got[("smear-all", "all", "override_reason", "'=hyperlink(\"http://x\")")] == "1"  # not a formula
    last_week = week_label(week_start(utcnow().date()) - dt.timedelta(weeks=1))
    # nothing signed: its rows are there all the same, two weeks and the total
    assert {w for a, w, *_ in rows[1:] if a == "bone-xray"} == {last_week, this_week, "all"}


def test_the_period_is_bounded_and_both_pages_are_audited(app, client_for):
    admin = client_for("admin")
    for asked, shown in (("abc", 12), ("0", 1), ("5000", 104)):
        html = admin.get(f"/admin/dashboards?weeks={asked}").get_data(as_text=True)
        assert f'<option value="{shown}" selected>' in html, asked
    admin.get("/admin/dashboards.csv")
    with sessions_of(app)() as s:
        last = list(s.scalars(select(AuditEvent.action).order_by(AuditEvent.seq.desc()).limit(4)))
    assert last == ["dashboard.export", "dashboard.analytics", "dashboard.analytics", "dashboard.analytics"]


def test_only_administrators_see_the_link(client_for):
    assert 'href="/admin/dashboards"' in client_for("admin").get("/").get_data(as_text=True)
    doc = client_for("doc_a")
    assert 'href="/admin/dashboards"' not in doc.get("/").get_data(as_text=True)
    assert doc.get("/admin/dashboards").status_code == 403 and doc.get("/admin/dashboards.csv").status_code == 403
