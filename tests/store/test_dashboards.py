"""The administrator's dashboards (store/dashboards.py): every metric checked exactly on signed cases
written with known times and answers, on SQLite, PostgreSQL and MariaDB alike; the access rule for
anyone but an administrator; the long CSV. The page and the download are in tests/web."""

from __future__ import annotations

import csv
import datetime as dt
import io

import pytest

from oncoscope.store import dashboards as dash
from oncoscope.store.db import standalone_session
from oncoscope.store.models import Case, Patient, PatientAccess, Review, User

TODAY = dt.date(2025, 3, 12)  # a Wednesday of ISO week 2025-W11
WEEKS = ("2025-W09", "2025-W10", "2025-W11")


def T(day: str, hour: float = 0) -> dt.datetime:
    return dt.datetime.fromisoformat(f"2025-{day}") + dt.timedelta(hours=hour)


def _case(s, patient, analyzer, created, ready, *reviews) -> Case:
    c = Case(patient_id=patient.id, analyzer_id=analyzer, status="signed", created_at=created, ready_at=ready)
    s.add(c)
    s.flush()
    for version, r in enumerate(reviews, 1):
        s.add(Review(case_id=c.id, version=version, final_diagnosis="x", content_sha256="0" * 64,
                     signed_by_id=patient.created_by_id, **r))
    return c


def _review(signed_at, ai_label, ai_status, agrees, reason="", second=None, second_agrees=None) -> dict:
    return {"signed_at": signed_at, "ai_label": ai_label, "ai_status": ai_status, "agrees_with_ai": agrees,
            "override_reason": reason, "second_reader_id": second, "second_agrees": second_agrees}


def build(s) -> dict:
    doc = User(email="doc@clinic.test", name="Dr Doc", role="doctor", password_hash="x")
    second = User(email="two@clinic.test", name="Dr Two", role="doctor", password_hash="x")
    admin = User(email="admin@clinic.test", name="Ada", role="admin", password_hash="x")
    s.add_all([doc, second, admin])
    s.flush()
    pa = Patient(mrn="DASH-A", family_name="A", created_by_id=doc.id)
    pb = Patient(mrn="DASH-B", family_name="B", created_by_id=doc.id)
    s.add_all([pa, pb])
    s.flush()
    s.add(PatientAccess(patient_id=pb.id, user_id=doc.id))  # the doctor sees patient B only
    # week 11: four first sign-offs (one amended), two read twice
    _case(s, pa, "smear-all", T("03-10", 8), T("03-10", 9), _review(T("03-10", 10), "Pro", "ok", True))
    _case(s, pa, "smear-all", T("03-10"), T("03-10", 2),
          _review(T("03-11"), "Pre", "uncertain", False, "Poor  staining."),
          _review(T("03-12"), "Pre", "uncertain", True))  # the amendment: counted apart
    _case(s, pa, "smear-all", T("03-11"), None,
          _review(T("03-11", 6), None, "out_of_domain", False, "poor staining", second.id, True))
    _case(s, pa, "smear-all", T("03-11"), T("03-11", 1),
          _review(T("03-11", 13), "Benign", "ok", False, "Flow cytometry shows B-ALL", second.id, False))
    # week 9: one; before the period: one that never counts
    _case(s, pa, "smear-all", T("02-24"), T("02-24", 0.5), _review(T("02-25"), "Benign", "ok", True))
    _case(s, pa, "smear-all", T("02-20"), T("02-20", 1), _review(T("02-23", 23), "Pro", "error", False, "old"))
    # another analyzer, on the patient the doctor sees; and one no longer installed
    _case(s, pb, "bone-xray", T("03-03"), T("03-03", 1), _review(T("03-03", 5), "cancer", "ok", True))
    _case(s, pa, "gone-analyzer", T("03-04"), None, _review(T("03-04", 3), None, "error", False, "no model"))
    s.commit()
    return {"doc": doc, "admin": admin}


@pytest.fixture()
def world(any_db_url):
    with standalone_session(any_db_url) as s:
        yield s, build(s)


def test_every_metric_per_week_and_over_the_period(world):
    s, u = world
    boards = dash.dashboards(s, u["admin"], ["smear-all", "bone-xray", "brain-mri"], weeks=3, today=TODAY)
    assert [b.analyzer_id for b in boards] == ["smear-all", "bone-xray", "brain-mri", "gone-analyzer"]
    sa = boards[0]
    assert [w.label for w in sa.weeks] == list(WEEKS) and sa.weeks[0].start == dt.date(2025, 2, 24)
    w9, w10, w11 = sa.weeks
    assert (w11.signed, w11.amendments, w11.ai_calls, w11.agreed) == (4, 1, 3, 1)
    assert w11.agreement == pytest.approx(1 / 3)
    assert (w11.second_reads, w11.second_agreed, w11.second_agreement) == (2, 1, 0.5)
    assert w11.referrals == {"uncertain": 1, "out_of_domain": 1, "error": 0} and w11.referral_rate == 0.5
    t = w11.turnaround()  # to sign: 2, 24, 6, 13 h; ready to signed: 1, 22, 12 h (one never became ready)
    assert t == pytest.approx({"to_sign_median": 9.5, "to_sign_p90": 20.7, "ready_median": 12.0, "ready_p90": 20.0})
    assert (w10.signed, w10.amendments, w10.agreement, w10.referral_rate, w10.turnaround()["to_sign_median"]) == \
        (0, 0, None, None, None)
    assert (w9.signed, w9.agreement, w9.turnaround()["to_sign_p90"], w9.turnaround()["ready_median"]) == \
        (1, 1.0, 24.0, 23.5)
    tot = sa.total
    assert (tot.label, tot.signed, tot.amendments, tot.ai_calls, tot.agreed, tot.second_reads) == ("all", 5, 1, 4, 2, 2)
    assert tot.referral_rate == pytest.approx(0.4)
    assert tot.turnaround() == pytest.approx({"to_sign_median": 13.0, "to_sign_p90": 24.0,
                                              "ready_median": 17.0, "ready_p90": 23.05})
    # normalised: "Poor  staining." and "poor staining" are one reason; the amendment and the case
    # signed before the period give none
    assert sa.override_reasons == [("poor staining", 2), ("flow cytometry shows b-all", 1)]
    bone = boards[1]
    assert (bone.weeks[1].signed, bone.weeks[1].agreement, bone.total.turnaround()["to_sign_median"]) == (1, 1.0, 5.0)
    assert boards[2].total.signed == 0 and boards[2].override_reasons == []  # named, nothing signed
    assert boards[3].total.referrals["error"] == 1 and boards[3].total.ai_calls == 0


def test_anyone_but_an_administrator_counts_only_the_cases_they_may_see(world):
    s, u = world
    boards = {b.analyzer_id: b for b in dash.dashboards(s, u["doc"], ["smear-all", "bone-xray"], weeks=3, today=TODAY)}
    assert set(boards) == {"smear-all", "bone-xray"}
    assert boards["smear-all"].total.signed == 0 and boards["smear-all"].override_reasons == []
    assert boards["bone-xray"].total.signed == 1


def test_a_week_is_monday_to_sunday_utc_and_the_period_ends_with_this_week(world):
    s, u = world
    since, until = dash.period(3, TODAY)
    assert (since, until) == (dt.date(2025, 2, 24), dt.date(2025, 3, 17))
    one = dash.dashboards(s, u["admin"], ["smear-all"], weeks=1, today=dt.date(2025, 3, 16))  # Sunday of W11
    assert [w.label for w in one[0].weeks] == ["2025-W11"] and one[0].total.signed == 4
    assert dash.week_label(dt.date(2024, 12, 30)) == "2025-W01"  # ISO: the week belongs to the year of its Thursday


def test_the_csv_is_one_row_per_analyzer_week_and_metric(world):
    s, u = world
    boards = dash.dashboards(s, u["admin"], ["smear-all"], weeks=3, today=TODAY)
    rows = list(csv.reader(io.StringIO(dash.dashboards_csv(boards))))
    assert tuple(rows[0]) == dash.CSV_COLUMNS
    got = {(r[0], r[1], r[3], r[4]): r[5] for r in rows[1:]}
    assert got[("smear-all", "2025-W11", "signed", "")] == "4"
    assert got[("smear-all", "2025-W11", "ai_agreement", "")] == "0.3333"
    assert got[("smear-all", "2025-W11", "referrals", "out_of_domain")] == "1"
    assert got[("smear-all", "2025-W11", "hours_to_sign", "p90")] == "20.7"
    assert got[("smear-all", "2025-W10", "ai_agreement", "")] == ""  # nothing to measure: empty, not 0
    assert got[("smear-all", "all", "override_reason", "poor staining")] == "2"
    assert got[("gone-analyzer", "all", "override_reason", "no model")] == "1"
    weeks_of = {r[1] for r in rows[1:] if r[0] == "smear-all"}
    assert weeks_of == {*WEEKS, "all"}


def test_override_reasons_are_the_ten_most_frequent_and_safe_in_a_spreadsheet(tmp_path):
    from tests.databases import migrated_sqlite

    with migrated_sqlite(tmp_path) as s:
        doc = User(email="d@clinic.test", name="D", role="doctor", password_hash="x")
        admin = User(email="a@clinic.test", name="A", role="admin", password_hash="x")
        s.add_all([doc, admin])
        s.flush()
        p = Patient(mrn="R-1", family_name="R", created_by_id=doc.id)
        s.add(p)
        s.flush()
        reasons = [f"reason {i:02d}" for i in range(12)] + ["=HYPERLINK(1)"] * 3 + ["reason 05"]
        for r in reasons:
            _case(s, p, "smear-all", T("03-10"), None, _review(T("03-10", 1), "Pro", "ok", False, r))
        s.commit()
        b = dash.dashboards(s, admin, ["smear-all"], weeks=1, today=TODAY)[0]
        assert b.override_reasons[:2] == [("=hyperlink(1)", 3), ("reason 05", 2)]
        assert len(b.override_reasons) == dash.TOP_REASONS and b.override_reasons[-1] == ("reason 08", 1)
        text = dash.dashboards_csv([b])
        assert "'=hyperlink(1)" in text and "\n=" not in text and ",=" not in text


def test_quantiles_interpolate_between_ranks_and_reasons_normalise():
    assert dash.quantile([], 0.5) is None
    assert dash.quantile([7.0], 0.9) == 7.0
    assert dash.quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert dash.quantile([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 0.9) == pytest.approx(9.1)
    assert dash.normalise_reason("  Poor\tstaining ;. ") == "poor staining"
