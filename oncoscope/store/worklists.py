"""Worklists: the queues people work from (to prepare, to verify, second read, consults for me), sorted
on indexed columns so a page stays fast with tens of thousands of cases, and their counts for the
navigation."""

from __future__ import annotations


from sqlalchemy import and_, case as sql_case, exists, func, or_, select
from sqlalchemy.orm import Session, aliased, joinedload

from .cases import visible_cases
from .consults import for_me
from .models import Case, Consult, Reading, User
from .patients import Page

QUEUES = {
    "prepare": "To prepare",
    "verify": "To verify",
    "second-read": "Second read",
    "consults": "Consults for me",
}
# which queues a role works from (the navigation shows these, with counts)
ROLE_QUEUES = {
    "technologist": ("prepare", "consults"),
    "doctor": ("verify", "second-read", "consults"),
    "reviewer": ("consults",),
    "admin": ("prepare", "verify"),
}
SORTS = {"priority": "Priority (STAT, AI flag, oldest)", "ai": "AI flag first", "age": "Oldest first",
         "tat": "Longest waiting since ready"}


def _stat_first():
    return sql_case((Case.priority == "stat", 0), else_=1)


def _flag_first():
    return sql_case((Case.ai_flag.is_(True), 0), else_=1)


ORDER = {
    "priority": lambda: (_stat_first(), _flag_first(), Case.created_at, Case.id),
    "ai": lambda: (_flag_first(), _stat_first(), Case.created_at, Case.id),
    "age": lambda: (Case.created_at, Case.id),
    "tat": lambda: (sql_case((Case.ready_at.is_(None), 1), else_=0), Case.ready_at, Case.id),
}


def _second_read_for(user: User):
    """Cases waiting for a second reading the user can give (not their own first reading), or whose
    readings disagree and the user is one of the two readers."""
    first, second = aliased(Reading), aliased(Reading)
    has_first_by_other = exists().where(first.case_id == Case.id, first.kind == "first", first.current.is_(True),
                                        first.user_id != user.id)
    no_second = ~exists().where(second.case_id == Case.id, second.kind == "second", second.current.is_(True))
    mine = exists().where(first.case_id == Case.id, first.kind.in_(("first", "second")), first.current.is_(True),
                          first.user_id == user.id)
    return and_(Case.status == "second_read", or_(and_(has_first_by_other, no_second),
                                                  and_(~no_second, mine)))


def _cases(user: User, queue: str):
    q = visible_cases(user)
    if queue == "prepare":
        return q.where(Case.status.in_(("open", "analysing", "ready")))
    if queue == "verify":
        return q.where(Case.status.in_(("ready", "preliminary")))
    return q.where(_second_read_for(user))


def queue_page(s: Session, user: User, queue: str, sort: str = "priority", page: int = 1, per_page: int = 25) -> Page:
    """One page of a queue: cases (prepare, verify, second-read) or open consults (consults)."""
    total = _count(s, user, queue)
    if queue == "consults":
        q = (for_me(user).join(Case, Case.id == Consult.case_id).order_by(*_consult_order())
             .options(joinedload(Consult.case).joinedload(Case.patient), joinedload(Consult.asked_by)))
    else:
        q = _cases(user, queue).options(joinedload(Case.patient)).order_by(*ORDER.get(sort, ORDER["priority"])())
    pages = max(1, -(-total // per_page))
    page = min(max(1, page), pages)
    items = list(s.scalars(q.offset((page - 1) * per_page).limit(per_page)).unique())
    return Page(items, page, pages, total)


def _count(s: Session, user: User, queue: str) -> int:
    if queue == "consults":
        return s.scalar(select(func.count()).select_from(for_me(user).subquery()))
    return s.scalar(_cases(user, queue).with_only_columns(func.count(Case.id)).order_by(None))


def _consult_order():
    return _stat_first(), Consult.created_at


def counts(s: Session, user: User, known: dict[str, int] | None = None) -> dict[str, int]:
    """The counts the navigation shows for the user's queues (``known``: counts already taken, e.g.
    by the queue page on screen)."""
    known = known or {}
    return {name: known[name] if name in known else _count(s, user, name) for name in ROLE_QUEUES.get(user.role, ())}


def next_case(s: Session, user: User, queue: str, current_id: int, sort: str = "priority") -> int | None:
    """The first case of the queue (in its order) other than the one being read: the key "n"."""
    if queue == "consults":
        q = for_me(user).join(Case, Case.id == Consult.case_id).where(Consult.case_id != current_id)
        return s.scalar(q.with_only_columns(Consult.case_id).order_by(*_consult_order()).limit(1))
    q = _cases(user, queue).where(Case.id != current_id).order_by(*ORDER.get(sort, ORDER["priority"])())
    return s.scalar(q.with_only_columns(Case.id).limit(1))
