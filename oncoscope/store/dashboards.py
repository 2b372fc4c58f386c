"""The administrator's dashboards: per analyzer and per ISO week (UTC, Monday first), how the AI's
calls fared with the people who signed the reports. Pure reads; nothing here knows Flask.

What is counted, and why:

* **signed**: first sign-offs (review version 1), so a case counts once, in the week it was first
  signed. **Amendments** (versions 2, 3, ...) are counted apart, in the week each was signed.
* **AI agreement**: among first sign-offs whose AI made a call (``ai_label`` set), the share the
  signer agreed with (``agrees_with_ai``). The first version, because it is the decision taken with
  the AI's call in front of the reader; an amendment corrects for what the AI never saw (a flow
  result, a biopsy) and would count a case twice. A case without an AI call is a referral, not a
  disagreement, so it is left out of the denominator.
* **override reasons**: the reasons of the first sign-offs that disagreed, normalised (case, runs
  of spaces, end punctuation), the ten most frequent over the whole period.
* **second-reader agreement**: reviews read twice (``second_reader_id`` set; only first sign-offs
  are): the share where the second reader's blinded diagnosis was the first reader's.
* **turnaround**: hours from the case's creation, and from when it became ready to read (its last
  analysis ended, ``ready_at``), to its first sign-off: median and 90th percentile.
* **referral rate**: the share of first sign-offs whose AI call, as the signer saw it
  (``ai_status``), was uncertain, out of domain or an error: the cases the AI handed to people.

One narrow SELECT of the period's reviews (and one of the disagreeing reasons), bucketed here in
Python: no backend's date functions, so SQLite, PostgreSQL and MariaDB give the same figures.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from .cases import visible_cases
from .models import Case, Review, User, utcnow

REFERRAL_STATUSES = ("uncertain", "out_of_domain", "error")
TOP_REASONS = 10
REASON_CHARS = 500  # a reason longer than this is grouped on its start (reasons are short in practice)


def quantile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default, a spreadsheet's
    PERCENTILE.INC), so an administrator can check a figure by hand."""
    if not values:
        return None
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def week_start(day: dt.date) -> dt.date:
    return day - dt.timedelta(days=day.weekday())


def week_label(monday: dt.date) -> str:
    year, week, _ = monday.isocalendar()
    return f"{year}-W{week:02d}"


@dataclass
class Week:
    """The counts of one week (or, as an analyzer's ``total``, of the whole period)."""

    start: dt.date
    label: str
    signed: int = 0
    amendments: int = 0
    ai_calls: int = 0
    agreed: int = 0
    second_reads: int = 0
    second_agreed: int = 0
    referrals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFERRAL_STATUSES, 0))
    hours_to_sign: list[float] = field(default_factory=list)  # case created -> first sign-off
    hours_ready_to_sign: list[float] = field(default_factory=list)  # ready to read -> first sign-off

    @property
    def agreement(self) -> float | None:
        return _share(self.agreed, self.ai_calls)

    @property
    def second_agreement(self) -> float | None:
        return _share(self.second_agreed, self.second_reads)

    @property
    def referred(self) -> int:
        return sum(self.referrals.values())

    @property
    def referral_rate(self) -> float | None:
        return _share(self.referred, self.signed)

    @property
    def median_hours_to_sign(self) -> float | None:
        return quantile(self.hours_to_sign, 0.5)

    def turnaround(self) -> dict[str, float | None]:
        return {"to_sign_median": quantile(self.hours_to_sign, 0.5), "to_sign_p90": quantile(self.hours_to_sign, 0.9),
                "ready_median": quantile(self.hours_ready_to_sign, 0.5),
                "ready_p90": quantile(self.hours_ready_to_sign, 0.9)}


@dataclass
class AnalyzerDashboard:
    analyzer_id: str
    weeks: list[Week]  # oldest first, every week of the period, empty ones too
    total: Week
    override_reasons: list[tuple[str, int]] = field(default_factory=list)  # (normalised reason, times)


def period(weeks: int, today: dt.date | None = None) -> tuple[dt.date, dt.date]:
    """The Monday ``weeks - 1`` weeks before this week's, and the Monday after this week (exclusive)."""
    this = week_start(today or utcnow().date())
    return this - dt.timedelta(weeks=weeks - 1), this + dt.timedelta(weeks=1)


def _in_scope(q: Select, user: User, since: dt.date, until: dt.date) -> Select:
    start, end = dt.datetime.combine(since, dt.time()), dt.datetime.combine(until, dt.time())
    q = q.join(Case, Case.id == Review.case_id).where(Review.signed_at >= start, Review.signed_at < end)
    if not user.is_admin:  # the page is the administrator's; the access rule still holds for anyone else
        q = q.where(Case.id.in_(visible_cases(user).with_only_columns(Case.id)))
    return q


def _hours(delta: dt.timedelta) -> float:
    return delta.total_seconds() / 3600


def _count(w: Week, r) -> None:
    if r.version > 1:
        w.amendments += 1
    else:
        w.signed += 1
        if r.ai_label is not None:
            w.ai_calls += 1
            w.agreed += bool(r.agrees_with_ai)
        if r.ai_status in w.referrals:
            w.referrals[r.ai_status] += 1
        w.hours_to_sign.append(_hours(r.signed_at - r.created_at))
        if r.ready_at is not None:
            w.hours_ready_to_sign.append(_hours(r.signed_at - r.ready_at))
    if r.second_reader_id is not None:
        w.second_reads += 1
        w.second_agreed += bool(r.second_agrees)


def normalise_reason(text: str) -> str:
    """One spelling per reason: 'Poor  staining.' and 'poor staining' are the same reason."""
    return " ".join(text.split()).casefold().rstrip(".;,:!? ")


def dashboards(s: Session, user: User, analyzer_ids: tuple[str, ...] | list[str] = (), weeks: int = 12,
               today: dt.date | None = None) -> list[AnalyzerDashboard]:
    """One dashboard per analyzer: those named (shown even with nothing signed) and any other that
    has a review in the period (an analyzer since removed). Only cases ``user`` may see count."""
    since, until = period(weeks, today)
    boards: dict[str, AnalyzerDashboard] = {}

    def board(aid: str) -> AnalyzerDashboard:
        if aid not in boards:
            mondays = [since + dt.timedelta(weeks=i) for i in range(weeks)]
            boards[aid] = AnalyzerDashboard(aid, [Week(m, week_label(m)) for m in mondays], Week(since, "all"))
        return boards[aid]

    for aid in analyzer_ids:
        board(aid)
    rows = s.execute(_in_scope(select(
        Case.analyzer_id, Case.created_at, Case.ready_at, Review.version, Review.signed_at, Review.ai_label,
        Review.ai_status, Review.agrees_with_ai, Review.second_reader_id, Review.second_agrees), user, since, until))
    for r in rows:
        b = board(r.analyzer_id)
        for w in (b.weeks[(r.signed_at.date() - since).days // 7], b.total):
            _count(w, r)
    for aid, reasons in _override_reasons(s, user, since, until).items():
        board(aid).override_reasons = reasons
    order = {aid: i for i, aid in enumerate(analyzer_ids)}  # the named first, as named; then the others by id
    return sorted(boards.values(), key=lambda b: (order.get(b.analyzer_id, len(order)), b.analyzer_id))


def _override_reasons(s: Session, user: User, since: dt.date, until: dt.date) -> dict[str, list[tuple[str, int]]]:
    q = _in_scope(select(Case.analyzer_id, func.substr(Review.override_reason, 1, REASON_CHARS)), user, since, until)
    q = q.where(Review.version == 1, Review.agrees_with_ai.is_(False), Review.override_reason != "")
    counts: dict[str, Counter] = {}
    for aid, text in s.execute(q):
        reason = normalise_reason(text)
        if reason:
            counts.setdefault(aid, Counter())[reason] += 1
    # ties by the text, so the list (and the CSV) is the same on every backend and every run
    return {aid: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_REASONS] for aid, c in counts.items()}


# ----------------------------------------------------------------------------- CSV
CSV_COLUMNS = ("analyzer", "week", "week_start", "metric", "key", "value")


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}".rstrip("0").rstrip(".")
    s = str(v)
    # as the audit export does: a text starting with = + - @ would be read as a spreadsheet formula
    return "'" + s if isinstance(v, str) and s[:1] in ("=", "+", "-", "@", "\t", "\r") else s


def _metrics(w: Week):
    """(metric, key, value) rows of one week; rates are fractions (0..1), times in hours."""
    yield from (("signed", "", w.signed), ("amendments", "", w.amendments), ("ai_calls", "", w.ai_calls),
                ("ai_agreed", "", w.agreed), ("ai_agreement", "", w.agreement),
                ("second_reads", "", w.second_reads), ("second_agreed", "", w.second_agreed),
                ("second_agreement", "", w.second_agreement))
    yield from (("referrals", st, n) for st, n in w.referrals.items())
    yield ("referral_rate", "", w.referral_rate)
    t = w.turnaround()
    yield from (("hours_to_sign", "median", t["to_sign_median"]), ("hours_to_sign", "p90", t["to_sign_p90"]),
                ("hours_ready_to_sign", "median", t["ready_median"]), ("hours_ready_to_sign", "p90", t["ready_p90"]))


def dashboards_csv(boards: list[AnalyzerDashboard]) -> str:
    """Long ("tidy") CSV: one row per analyzer x week x metric (x key), ready for a pivot table.
    Columns: analyzer, week (ISO week, or "all" for the whole period), week_start (its Monday),
    metric, key (the referral status, median/p90, or the override reason), value (rates as
    fractions, times in hours, empty when there is nothing to measure). Override reasons are
    rows of the "all" week (metric override_reason, key the reason, value how often)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for b in boards:
        for week in (*b.weeks, b.total):
            for metric, key, value in _metrics(week):
                w.writerow([_cell(x) for x in (b.analyzer_id, week.label, week.start.isoformat(), metric, key, value)])
        for reason, n in b.override_reasons:
            row = (b.analyzer_id, "all", b.total.start.isoformat(), "override_reason", reason, n)
            w.writerow([_cell(x) for x in row])
    return buf.getvalue()
