"""The JSON schemas of the API: the OpenAPI document's ``components.schemas``, and what request
bodies are validated against (``inputs.validate_fields``)."""

from __future__ import annotations

from ...store import cells as cell_store
from ...store import patients as patient_store
from ...vocab import PRIORITIES


def obj(props: dict, required: list[str] | None = None, **kw) -> dict:
    d = {"type": "object", "properties": props, **kw}
    if required:
        d["required"] = required
    return d


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


STR, INT, NUM, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
NSTR = {"type": ["string", "null"]}
NINT = {"type": ["integer", "null"]}
NNUM = {"type": ["number", "null"]}
DATETIME = {"type": ["string", "null"], "format": "date-time"}
ID = {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}
# the store checks it (after trimming), so invalid MRNs get its message whatever the client validated
MRN_INPUT = {"type": "string", "minLength": 1, "maxLength": patient_store.MRN_MAX,
             "pattern": f"^{patient_store.MRN_PATTERN}$", "description": patient_store.MRN_RULE}
SEX = {"type": "string", "enum": ["female", "male", "other", "unknown"]}
PATIENT_FIELDS = {"mrn": MRN_INPUT,
                  "family_name": {"type": "string", "minLength": 1, "maxLength": 100},
                  "given_name": {"type": "string", "maxLength": 100},
                  "birth_date": {"type": ["string", "null"], "format": "date"},
                  "sex": SEX,
                  "notes": {"type": "string", "maxLength": 5000}}
SCHEMAS: dict[str, dict] = {
    "Error": obj({"error": obj({"code": STR, "message": STR, "field": NSTR}, ["code", "message", "field"])},
                 ["error"]),
    "Patient": obj({"id": INT, "mrn": STR, "family_name": STR, "given_name": STR,
                    "birth_date": {"type": ["string", "null"], "format": "date"},
                    "sex": SEX, "notes": STR,
                    "created_at": DATETIME, "updated_at": DATETIME},
                   ["id", "mrn", "family_name", "given_name", "birth_date", "sex"]),
    "PatientInput": obj(PATIENT_FIELDS, ["mrn", "family_name"], additionalProperties=False),
    "PatientPatch": obj(PATIENT_FIELDS, additionalProperties=False),
    "Analysis": obj({"image_id": INT, "filename": STR, "width": INT, "height": INT, "sha256": STR,
                     "job_status": {"type": "string", "enum": ["queued", "running", "done", "failed", "retried"]},
                     "attempts": INT, "result_status": NSTR, "label": NSTR, "confidence": NNUM,
                     "malignant": {"type": ["boolean", "null"]}, "malignant_probability": NNUM,
                     "probabilities": {"type": ["object", "null"], "additionalProperties": NUM},
                     "cell_count": NINT, "cells": {"type": ["array", "null"], "items": {"type": "object"}},
                     "messages": {"type": ["array", "null"], "items": STR},
                     "model_version": NSTR, "model_sha256": NSTR, "finished_at": DATETIME},
                    ["image_id", "job_status"]),
    "Review": obj({"version": INT, "final_diagnosis": STR, "agrees_with_ai": BOOL, "ai_label": NSTR,
                   "ai_status": NSTR, "override_reason": STR, "uncertainty_note": STR, "comment": STR,
                   "amendment_reason": STR, "signed_by": STR, "signed_at": DATETIME, "content_sha256": STR,
                   "differential": {"oneOf": [ref("CellReview"), {"type": "null"}],
                                    "description": "The differential as signed (cell-classifying analyzers)"}},
                  ["version", "final_diagnosis", "agrees_with_ai", "signed_by", "signed_at"]),
    "Case": obj({"id": INT, "patient_id": INT, "analyzer_id": STR, "status": STR, "revision": INT, "clinical_note": STR,
                 "report_state": {"type": "string", "enum": ["open", "preliminary", "final", "corrected", "cancelled"]},
                 "cancel_reason": STR, "ai_flag": {"type": ["boolean", "null"]},
                 "dicom_study_uid": NSTR, "accession_number": NSTR, "placer_order": NSTR,
                 "deliveries": {"type": "array", "items": ref("Delivery"),
                                "description": "Results sent on their own to the PACS and the LIS"},
                 "readings": {"type": "array", "items": ref("Reading"),
                              "description": "Current readings: the preliminary result; the first and second "
                                             "readings unless the caller is blinded (second reading pending)"},
                 "transitions": {"type": "array", "items": obj({"from": STR, "to": STR, "by": NSTR,
                                                               "at": DATETIME, "note": STR})},
                 "priority": {"type": "string", "enum": list(PRIORITIES)},
                 "created_at": DATETIME, "final_diagnosis": NSTR,
                 "aggregate": obj({"label": NSTR, "status": STR, "probabilities": {"type": "object"},
                                   "text": STR,
                                   "differential": {"type": ["object", "null"],
                                                    "description": "Cell-classifying analyzers: counts per class "
                                                                   "over all images (differential), white_cells, "
                                                                   "percentages, blast_fraction, count_target, "
                                                                   "remaining_to_target; null otherwise"}}),
                 "images": {"type": "array", "items": ref("Analysis")},
                 "reviews": {"type": "array", "items": ref("Review")},
                 "cell_review": {"oneOf": [ref("CellReview"), {"type": "null"}]}},
                ["id", "patient_id", "analyzer_id", "status", "revision", "images", "reviews"]),
    "CaseInput": obj({"analyzer_id": {"type": "string", "maxLength": 64},
                      "clinical_note": {"type": "string", "maxLength": 5000},
                      "priority": {"type": "string", "enum": list(PRIORITIES)}}, ["analyzer_id"],
                     additionalProperties=False),
    "SignInput": obj({"final_diagnosis": {"type": "string", "maxLength": 64},
                      "override_reason": {"type": "string", "maxLength": 5000,
                                          "description": "Required when the diagnosis differs from the AI result "
                                                         "(or the AI gave none); refused (422) when it agrees."},
                      "uncertainty_note": {"type": "string", "maxLength": 5000},
                      "comment": {"type": "string", "maxLength": 10000},
                      "amendment_reason": {"type": "string", "maxLength": 5000},
                      "confirm_unverified": {"type": "boolean", "description": "Sign although some cells are "
                                             "not verified (their AI class counts); recorded in the review."},
                      "revision": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1,
                                   "description": "The case revision the signer reviewed (from the Case). When "
                                                  "given, signing fails with 409 if images were added or the case "
                                                  "was signed since."}}, ["final_diagnosis"],
                     additionalProperties=False),
    "UploadResult": obj({"added": {"type": "array", "items": INT}, "duplicates": {"type": "array", "items": STR},
                         "errors": {"type": "array", "items": obj({"file": STR, "message": STR})},
                         "case": ref("Case")}, ["added", "duplicates", "errors"]),
    "Analyzer": obj({"id": STR, "name": STR, "version": STR, "modality": STR, "labels": {"type": "array", "items": STR},
                     "display_names": {"type": "object", "additionalProperties": STR},
                     "malignant_labels": {"type": "array", "items": STR}, "untyped_label": NSTR,
                     "positive_term": STR,
                     "input_description": STR, "dicom_modalities": {"type": "array", "items": STR}, "sha256": STR,
                     "validation_summary": STR}, ["id", "name", "version", "labels"]),
}


SUMMARY = obj({"differential": {"type": "object", "additionalProperties": INT}, "white_cells": INT,
               "percentages": {"type": "object", "additionalProperties": NNUM}, "nrbc_per_100_wbc": NNUM,
               "blast_fraction": NNUM, "count_target": INT, "remaining_to_target": INT})
CELL_CLASS = {"type": "string", "enum": list(cell_store.GALLERY_ORDER)}
SCHEMAS["CellReview"] = obj({
    "ai": SUMMARY, "current": SUMMARY, "cells": INT, "verified": INT, "unverified": INT, "reclassified": INT,
    "agreement": {**NNUM, "description": "Share of the verified cells whose class is the AI's"},
    "unidentified_left": INT, "wbc_count": {**NNUM, "description": "x10^9/L, entered by a person"},
    "absolute": {"type": ["object", "null"], "additionalProperties": NUM, "description": "x10^9/L per class"},
    "blast_flag": BOOL, "blast_flag_pct": NNUM,
    "cell_classes": {"type": "object", "description": "In a signed review: cell id -> [class, verified] as signed"}},
    ["ai", "current", "cells", "verified", "unverified"])
SCHEMAS["Cell"] = obj({"id": INT, "image_id": INT, "index": INT, "ai_class": STR, "ai_probability": NNUM,
                       "class": STR, "verified": BOOL, "counted": BOOL, "changed_by": NSTR, "changed_at": DATETIME,
                       "bbox": {"type": ["array", "null"], "items": INT}, "probabilities": {"type": "object"},
                       "diameter_um": NNUM},
                      ["id", "image_id", "index", "ai_class", "class", "verified", "counted"])
SCHEMAS["CellPatch"] = obj({"changes": {"type": "array", "minItems": 1, "maxItems": cell_store.MAX_BATCH,
                                        "items": obj({"id": ID, "class": CELL_CLASS,
                                                      "from": {**CELL_CLASS, "description": "The class the client "
                                                               "showed: refused (409) if the cell has another now"}},
                                                     ["id", "class"], additionalProperties=False),
                                        "description": "Each cell gets this class and is marked verified "
                                                       "(its own class: verified as the AI said)."}},
                           ["changes"], additionalProperties=False)
SCHEMAS["CellChangeResult"] = obj({"batch": STR, "cells": {"type": "array", "items": ref("Cell")},
                                   "cell_review": ref("CellReview")}, ["cells", "cell_review"])


REVISION = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1,
            "description": "The case revision the reader saw: 409 if the case changed since"}
SCHEMAS["Reading"] = obj({"kind": {"type": "string", "enum": ["preliminary", "first", "second"]}, "diagnosis": STR,
                          "comment": STR, "by": STR, "at": DATETIME}, ["kind", "diagnosis", "by", "at"])
SCHEMAS["ReadingInput"] = obj({"diagnosis": {"type": "string", "minLength": 1, "maxLength": 64},
                               "comment": {"type": "string", "maxLength": 10000}, "revision": REVISION},
                              ["diagnosis"], additionalProperties=False)
SCHEMAS["CancelInput"] = obj({"reason": {"type": "string", "minLength": 1, "maxLength": 2000}}, ["reason"],
                             additionalProperties=False)
SCHEMAS["ConsultInput"] = obj({
    "consultant_id": {**ID, "description": "An active doctor or reviewer; omit to ask every reviewer"},
    "question": {"type": "string", "minLength": 1, "maxLength": 5000},
    "image_id": {**ID, "description": "The image the question (and region) is about"},
    "region": {"type": "array", "minItems": 4, "maxItems": 4, "items": {"type": "integer", "minimum": 0,
                                                                        "maximum": 2**31 - 1},
               "description": "[x, y, width, height] in image pixels"},
    "cell_ids": {"type": "array", "maxItems": 200, "items": ID, "description": "Cells of this case (Cell.id)"}},
    ["question"], additionalProperties=False)
SCHEMAS["ConsultMessageInput"] = obj({"body": {"type": "string", "minLength": 1, "maxLength": 5000}}, ["body"],
                                     additionalProperties=False)
SCHEMAS["Consult"] = obj({"id": INT, "case_id": INT, "asked_by": STR, "consultant": NSTR, "consultant_id": NINT,
                          "question": STR, "image_id": NINT, "region": {"type": ["array", "null"], "items": INT},
                          "cell_ids": {"type": "array", "items": INT},
                          "status": {"type": "string", "enum": ["open", "closed"]}, "created_at": DATETIME,
                          "closed_at": DATETIME,
                          "messages": {"type": "array", "items": obj({"by": STR, "body": STR, "at": DATETIME})}},
                         ["id", "case_id", "question", "status", "messages"])
SCHEMAS["ConsultList"] = obj({"items": {"type": "array", "items": ref("Consult")}}, ["items"])
UID = {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^(0|[1-9][0-9]*)(\\.(0|[1-9][0-9]*))*$"}
SCHEMAS["PacsStudyList"] = obj({"items": {"type": "array", "items": obj({
    "study_uid": STR, "date": STR, "description": STR, "accession": STR,
    "modalities": {"type": "array", "items": STR},
    "series": {"type": "array", "items": obj({"series_uid": STR, "modality": STR, "description": STR,
                                              "body_part": STR, "instance_count": NINT})}})}}, ["items"])
SCHEMAS["RetrieveInput"] = obj({"study_uid": UID, "series_uids": {"type": "array", "minItems": 1, "maxItems": 50,
                                                                  "items": UID},
                                "analyzer_id": {"type": "string", "maxLength": 64}},
                               ["study_uid", "series_uids", "analyzer_id"], additionalProperties=False)
SCHEMAS["RetrieveResult"] = obj({"filed": INT, "duplicates": INT, "inbox": INT, "refused": {"type": "array", "items": STR},
                                 "case_ids": {"type": "array", "items": INT}},
                                ["filed", "duplicates", "inbox", "refused", "case_ids"])
SCHEMAS["InboxList"] = obj({"items": {"type": "array", "items": obj({
    "study_uid": STR, "patient_id": NINT, "instances": INT, "modality": STR, "body_part": STR, "description": STR,
    "source": STR, "received_at": DATETIME, "reason": STR})}}, ["items"])
SCHEMAS["Delivery"] = obj({"id": INT, "kind": {"type": "string", "enum": ["dicom", "oru"]}, "review_version": INT,
                           "target": STR, "status": {"type": "string", "enum": ["pending", "sent", "failed"]},
                           "attempts": INT, "last_error": STR, "next_attempt_at": DATETIME, "sent_at": DATETIME},
                          ["id", "kind", "status"])
SCHEMAS["WorklistItem"] = obj({"case_id": INT, "patient_id": INT, "patient": STR, "mrn": STR, "analyzer_id": STR,
                               "status": STR, "priority": STR, "ai_flag": {"type": ["boolean", "null"]},
                               "created_at": DATETIME, "ready_at": DATETIME, "consult_id": NINT,
                               "question": NSTR}, ["case_id", "patient_id", "status", "priority"])


def page_schema(item: str) -> dict:
    return obj({"items": {"type": "array", "items": ref(item)}, "page": INT,
                "per_page": INT, "pages": INT, "total": INT}, ["items", "page", "per_page", "pages", "total"])


SCHEMAS["PatientPage"] = page_schema("Patient")
SCHEMAS["CasePage"] = page_schema("Case")
SCHEMAS["CellPage"] = page_schema("Cell")
SCHEMAS["WorklistPage"] = page_schema("WorklistItem")
SCHEMAS["WorklistPage"]["properties"]["counts"] = {"type": "object", "additionalProperties": INT,
                                                   "description": "The caller's queues and how many wait in each"}
SCHEMAS["DoctorList"] = obj({"doctor_ids": {"type": "array", "maxItems": 1000, "items": ID}},
                            ["doctor_ids"], additionalProperties=False)
SCHEMAS["Hl7SendResult"] = obj({"sent": BOOL, "ack": STR}, ["sent", "ack"])
SCHEMAS["AnalyzerList"] = obj({"items": {"type": "array", "items": ref("Analyzer")}}, ["items"])

# query parameters
PAGE_PARAMS = [{"name": "page", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 100000}},
               {"name": "per_page", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 100}}]
