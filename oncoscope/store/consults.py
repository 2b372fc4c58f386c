"""Consults (telediagnosis): a question on a case to a named colleague or to any reviewer, optionally
about a box on one image or some of its cells, answered in a thread. While a consult is open its
consultant may read that case, and only that case (store/access); closing it ends that access."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import access
from . import cases as case_store
from .cases import CaseError
from .models import Case, CaseImage, CellLabel, Consult, ConsultMessage, User, utcnow
from .text import UNSTORABLE_MESSAGE, unstorable

MAX_TEXT = 5000


def _text(text: str, field: str, what: str) -> str:
    text = (text or "").strip()
    if not text:
        raise CaseError(f"Write the {what}.", field)
    if unstorable(text):
        raise CaseError(f"The {what} {UNSTORABLE_MESSAGE}", field)
    return text[:MAX_TEXT]


def consultant_choices(s: Session, asker: User) -> list[User]:
    """Who can be asked by name: active doctors and reviewers other than the asker."""
    return list(s.scalars(select(User).where(User.role.in_(("doctor", "reviewer")), User.is_active.is_(True),
                                             User.id != asker.id).order_by(User.name)))


def _region(s: Session, case: Case, image_id: int | None, region) -> tuple[int | None, list | None]:
    if image_id is None:
        if region:
            raise CaseError("Choose the image the box is drawn on.", "image_id")
        return None, None
    img = s.scalar(select(CaseImage).where(CaseImage.id == image_id, CaseImage.case_id == case.id))
    if img is None:
        raise CaseError("That image is not part of this case.", "image_id")
    if not region:
        return img.id, None
    try:
        x, y, w, h = (int(round(float(v))) for v in region)
    except (TypeError, ValueError):
        raise CaseError("The box is four numbers: x, y, width, height (image pixels).", "region") from None
    if w < 1 or h < 1 or x < 0 or y < 0 or x + w > img.width or y + h > img.height:
        raise CaseError(f"The box must lie inside the image ({img.width}x{img.height} pixels).", "region")
    return img.id, [x, y, w, h]


def ask(s: Session, case: Case, asker: User, consultant_id: int | None, question: str, image_id: int | None = None,
        region=None, cell_ids: list[int] | None = None) -> Consult:
    access.require(s, asker, "consult", case)
    question = _text(question, "question", "question")
    if consultant_id is not None:
        if consultant_id not in {u.id for u in consultant_choices(s, asker)}:
            raise CaseError("Choose a colleague from the list (an active doctor or reviewer).", "consultant_id")
    image_id, box = _region(s, case, image_id, region)
    cells = sorted({int(c) for c in (cell_ids or [])})
    if cells:
        found = set(s.scalars(select(CellLabel.id).where(CellLabel.case_id == case.id, CellLabel.id.in_(cells))))
        if found != set(cells):
            raise CaseError("Some of the cells named are not cells of this case.", "cell_ids")
    c = Consult(case_id=case.id, asked_by_id=asker.id, consultant_id=consultant_id, question=question,
                image_id=image_id, region=box, cell_ids=cells or None, status="open", created_at=utcnow())
    s.add(c)
    s.flush()
    return c


def _takes_part(user: User, c: Consult) -> bool:
    """The user asked it, is its consultant (or a reviewer while it is open to all reviewers), or is
    an administrator."""
    return (user.id in (c.asked_by_id, c.consultant_id) or user.is_admin
            or (c.consultant_id is None and user.role == "reviewer" and c.status == "open"))


def get_visible(s: Session, user: User, consult_id: int) -> Consult | None:
    """A consult the user takes part in, or whose case they may fully see."""
    c = s.get(Consult, consult_id)
    if c is None or _takes_part(user, c):
        return c
    case = case_store.get_visible(s, user, c.case_id)
    return c if case is not None and access.case_access(s, user, case) == "full" else None


def shown_on(case: Case, user: User, full_access: bool) -> list[Consult]:
    """The case's consults its page lists for the user: all of them with full access to the case,
    else those the user takes part in (the same rule as ``get_visible``)."""
    return [c for c in case.consults if full_access or _takes_part(user, c)]


def may_answer(user: User, c: Consult) -> bool:
    return c.status == "open" and (user.id in (c.asked_by_id, c.consultant_id)
                                   or (c.consultant_id is None and user.role == "reviewer"))


def answer(s: Session, c: Consult, user: User, body: str) -> ConsultMessage:
    if c.status != "open":
        raise CaseError("This consult is closed.")
    if not may_answer(user, c):
        raise access.Forbidden("Only the person who asked and the consultant write in this consult.")
    m = ConsultMessage(consult_id=c.id, user_id=user.id, body=_text(body, "body", "answer"), at=utcnow())
    s.add(m)
    if c.consultant_id is None and user.role == "reviewer" and user.id != c.asked_by_id:
        c.consultant_id = user.id  # the first reviewer to answer takes the consult
    s.flush()
    return m


def may_close(user: User, c: Consult) -> bool:
    return user.id in (c.asked_by_id, c.consultant_id) or user.is_admin


def close(s: Session, c: Consult, user: User) -> None:
    """Close the consult (the asker, the consultant or an admin); the consultant's access ends."""
    if not may_close(user, c):
        raise access.Forbidden("Only the person who asked, the consultant or an administrator closes a consult.")
    if c.status != "open":
        raise CaseError("This consult is already closed.")
    c.status, c.closed_at, c.closed_by_id = "closed", utcnow(), user.id
    s.flush()


def for_me(user: User):
    """Open consults addressed to the user (by name, or to every reviewer)."""
    return select(Consult).where(access.addressed_to(user))
