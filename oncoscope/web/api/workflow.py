"""The report workflow over the API: preliminary result, second reading, cancelling, consults and the
worklists. The same store functions, rules and audit actions as the case page (web/workflow)."""

from __future__ import annotations

from flask import g, request

from ...analyzers import registry
from ...store import access
from ...store import cases as case_store
from ...store import consults as consult_store
from ...store import workflow
from ...store import worklists
from .. import audit
from ..errors import ApiError
from ..helpers import db
from .core import api, committed
from .inputs import case_or_404, json_body, page_args, validate_fields
from .schemas import PAGE_PARAMS
from .serializers import case_json, consult_json, worklist_item_json

WORKLIST_QUERY = [{"name": "queue", "in": "query", "required": True,
                   "schema": {"type": "string", "enum": list(worklists.QUEUES)}},
                  {"name": "sort", "in": "query", "required": False,
                   "schema": {"type": "string", "enum": list(worklists.SORTS)}}]
REFUSALS = (case_store.CaseError, access.Forbidden)
STATE_409 = {409: "The case is not in a state that allows this, or it changed since the given revision"}


def _labels(c) -> list[str]:
    return case_store.diagnosis_labels(registry.get(c.analyzer_id))


def _refused(exc: case_store.CaseError) -> ApiError:
    """The store's refusal: about the input (422, naming the body field) or the case's state (409)."""
    if isinstance(exc, access.Forbidden):
        return ApiError(403, "forbidden", str(exc))
    if exc.field is None:
        return ApiError(409, "case_state", str(exc))
    return ApiError(422, "invalid", str(exc), "diagnosis" if exc.field == "final_diagnosis" else exc.field)


# ----------------------------------------------------------------------------- transitions
@api("/cases/{case_id}/preliminary", "POST", summary="Write (or revise) the preliminary result of an analysed, "
     "unsigned case (technologist or doctor)", tag="workflow", response="Case", body="ReadingInput", errors=STATE_409)
def write_preliminary(case_id: int):
    c = case_or_404(case_id, "prepare")
    data = validate_fields(json_body(), "ReadingInput")
    with committed(REFUSALS, _refused) as s:
        workflow.write_preliminary(s, c, g.api_user, data["diagnosis"], _labels(c), data.get("comment", ""),
                                   revision=data.get("revision"))
    return case_json(c, g.api_user)


@api("/cases/{case_id}/second-read", "POST", summary="Give the second reading of a case waiting for one (blind: "
     "the first reading is shown only after this)", tag="workflow", response="Case", body="ReadingInput",
     errors=STATE_409)
def second_read(case_id: int):
    c = case_or_404(case_id, "sign")
    data = validate_fields(json_body(), "ReadingInput")
    with committed(REFUSALS, _refused) as s:
        review = workflow.second_read(s, c, g.api_user, data["diagnosis"], _labels(c), data.get("comment", ""),
                                      revision=data.get("revision"))
    audit.subject(agrees=review is not None)
    return case_json(c, g.api_user)


@api("/cases/{case_id}/cancel", "POST", summary="Cancel a case with nothing to read (no usable image), with a "
     "reason", tag="workflow", response="Case", body="CancelInput", errors=STATE_409)
def cancel_case(case_id: int):
    c = case_or_404(case_id, "edit")
    data = validate_fields(json_body(), "CancelInput")
    with committed(REFUSALS, _refused) as s:
        workflow.cancel(s, c, g.api_user, data["reason"])
    return case_json(c, g.api_user)


# ----------------------------------------------------------------------------- consults
@api("/cases/{case_id}/consults", "GET", summary="The case's consults the caller may see", tag="consults",
     response="ConsultList")
def list_consults(case_id: int):
    c = case_or_404(case_id)
    full = access.case_access(db(), g.api_user, c) == "full"
    return {"items": [consult_json(k) for k in consult_store.shown_on(c, g.api_user, full)]}


@api("/cases/{case_id}/consults", "POST", summary="Ask a colleague (by id) or any reviewer (no consultant_id) "
     "about the case, optionally about a box on one image or some of its cells", tag="consults",
     response="Consult", status=201, body="ConsultInput")
def ask_consult(case_id: int):
    c = case_or_404(case_id, "consult")
    data = validate_fields(json_body(), "ConsultInput")
    with committed(REFUSALS, _refused) as s:
        k = consult_store.ask(s, c, g.api_user, data.get("consultant_id"), data["question"], data.get("image_id"),
                              data.get("region"), data.get("cell_ids"))
    audit.subject(resource=("consult", k.id), consultant=k.consultant_id)
    return consult_json(k)


def _consult_or_404(consult_id: int):
    k = consult_store.get_visible(db(), g.api_user, consult_id)
    if k is None:
        raise ApiError(404, "not_found", f"No consult {consult_id} visible to you.")
    audit.subject(patient_id=k.case.patient_id, resource=("consult", k.id))
    return k


@api("/consults/{consult_id}", "GET", summary="A consult and its thread", tag="consults", response="Consult")
def get_consult(consult_id: int):
    return consult_json(_consult_or_404(consult_id))


@api("/consults/{consult_id}/messages", "POST", summary="Write in an open consult (the asker or the consultant; "
     "the first reviewer to answer a consult open to all reviewers takes it)", tag="consults", response="Consult",
     body="ConsultMessageInput", errors={409: "The consult is closed"})
def answer_consult(consult_id: int):
    k = _consult_or_404(consult_id)
    if k.status == "open" and not consult_store.may_answer(g.api_user, k):
        raise ApiError(403, "forbidden", "Only the person who asked and the consultant write in this consult.")
    data = validate_fields(json_body(), "ConsultMessageInput")
    with committed(REFUSALS, _refused) as s:
        consult_store.answer(s, k, g.api_user, data["body"])
    return consult_json(k)


@api("/consults/{consult_id}/close", "POST", summary="Close a consult (the asker, the consultant or an "
     "administrator); the consultant's access to the case ends", tag="consults", response="Consult",
     errors={409: "The consult is already closed"})
def close_consult(consult_id: int):
    k = _consult_or_404(consult_id)
    with committed(REFUSALS, _refused) as s:
        consult_store.close(s, k, g.api_user)
    return consult_json(k)


# ----------------------------------------------------------------------------- worklists
@api("/worklist", "GET", summary="One page of a worklist (to prepare, to verify, second read, consults for me) "
     "in the chosen order, with the caller's queue counts", tag="workflow", response="WorklistPage",
     query=WORKLIST_QUERY + PAGE_PARAMS)
def worklist():
    queue, sort = request.args.get("queue", ""), request.args.get("sort", "priority")
    if queue not in worklists.QUEUES:
        raise ApiError(400, "invalid_parameter", f"queue must be one of {', '.join(worklists.QUEUES)}.", "queue")
    if sort not in worklists.SORTS:
        raise ApiError(400, "invalid_parameter", f"sort must be one of {', '.join(worklists.SORTS)}.", "sort")
    page, per_page = page_args()
    s = db()
    got = worklists.queue_page(s, g.api_user, queue, sort, page, per_page)
    audit.subject(shown_cases=[x.case_id if queue == "consults" else x.id for x in got.items])
    return {"items": [worklist_item_json(x) for x in got.items], "page": got.page, "per_page": per_page,
            "pages": got.pages, "total": got.total, "counts": worklists.counts(s, g.api_user, known={queue: got.total})}
