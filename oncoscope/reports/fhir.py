"""Export a signed case as a FHIR R4 (4.3, "R4B") ``Bundle`` of type ``collection``.

The bundle holds the Patient, the signing Practitioner, one Device per model (version, sha256) that
analysed the case's images, one Media per image, the Observations (per-image AI class, class
probabilities, cell count and status; the case-level AI call; the doctor's final diagnosis; whether it
agrees with the AI) and a DiagnosticReport that links them all and carries the signed PDF report.

Like the PDF report, everything comes from stored rows (and the image bytes the caller passes), never
from the wall clock: the ``fullUrl`` / resource ids are uuid5 of (base_url, case, review version,
resource kind, index), so two exports of the same signed version are byte-for-byte identical, and an
amendment (version n+1) gets a new, distinct set of ids.

Resources are built with the ``fhir.resources.R4B`` classes, which validate on construction; the
returned value is a plain JSON-able ``dict``.

Local code systems (no LOINC/SNOMED mapping is claimed):

* ``urn:oncoscope:observation``: what an Observation is (``ai-class``, ``ai-probability``,
  ``cell-count``, ``ai-status``, ``ai-aggregate``, ``final-diagnosis``, ``ai-vs-final``);
* ``urn:oncoscope:<analyzer id>:label``: the analyzer's labels, plus ``Nondiagnostic``;
* ``urn:oncoscope:report``: the report kind, code = analyzer id.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from io import BytesIO

from fhir.resources.R4B.bundle import Bundle, BundleEntry
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.media import Media
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient as FhirPatient
from fhir.resources.R4B.practitioner import Practitioner

from ..store.cases import aggregate, label_names

OBS_SYSTEM = "urn:oncoscope:observation"
REPORT_SYSTEM = "urn:oncoscope:report"
MRN_SYSTEM = "urn:oncoscope:mrn"
USER_SYSTEM = "urn:oncoscope:user"
CASE_SYSTEM = "urn:oncoscope:case"
ANALYZER_SYSTEM = "urn:oncoscope:analyzer"
MODEL_SHA_SYSTEM = "urn:oncoscope:model-sha256"
IMAGE_SHA_SYSTEM = "urn:oncoscope:image-sha256"
MODALITY_SYSTEM = "urn:oncoscope:modality"
UCUM = "http://unitsofmeasure.org"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
MEDIA_TYPE = "http://terminology.hl7.org/CodeSystem/media-type"

OBS_DISPLAY = {
    "ai-class": "AI class of the image",
    "ai-probability": "AI class probabilities of the image",
    "cell-count": "Cells detected in the image",
    "ai-status": "AI result status",
    "ai-aggregate": "AI call for the case",
    "final-diagnosis": "Final diagnosis",
    "ai-vs-final": "Final diagnosis agrees with the AI call",
}
GENDERS = ("female", "male", "other", "unknown")


def label_system(analyzer_id: str) -> str:
    return f"urn:oncoscope:{analyzer_id}:label"


def _instant(t: dt.datetime) -> str:
    """FHIR instants need a zone; the database stores naive UTC."""
    t = t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)
    return t.isoformat()


def _analyzer(case, analyzer):
    if analyzer is not None:
        return analyzer
    from ..analyzers import registry

    return registry.get(case.analyzer_id) if case.analyzer_id in registry.available() else None


def original_pngs(case, store) -> dict[int, bytes]:
    """``CaseImage.id -> PNG bytes`` of each stored original (decoded, RGB), for ``case_bundle(images=...)``.

    Images whose original is missing from the file store are left out (their Media get no data)."""
    from PIL import Image

    from ..imaging.imageio import load_image

    out = {}
    for img in case.images:
        path = store.path(img.sha256, "original")
        if not path.exists():
            continue
        buf = BytesIO()
        Image.fromarray(load_image(path).rgb).save(buf, "PNG")
        out[img.id] = buf.getvalue()
    return out


def case_bundle(case, pdf: bytes, base_url: str = "urn:oncoscope", images: dict[int, bytes] | None = None,
                analyzer=None) -> dict:
    """FHIR R4B ``Bundle`` (type ``collection``, JSON-able dict) of the current signed version of ``case``.

    ``pdf``: the signed PDF report (:func:`oncoscope.reports.case_report.case_report_pdf`), embedded as
    the DiagnosticReport's ``presentedForm``. ``base_url``: namespace of the bundle identifier and of
    the deterministic resource uuids. ``images``: optional ``CaseImage.id -> PNG bytes`` (see
    :func:`original_pngs`); images without bytes get a Media without ``data``, titled with the
    original file name. ``analyzer``: the case's analyzer object (default: looked up in the registry;
    only its name, version, labels, display names and modality are read).

    Raises ``ValueError("case is not signed")`` for a case without a signed review.
    """
    review = case.current_review
    if case.status != "signed" or review is None:
        raise ValueError("case is not signed")
    images = images or {}
    an = _analyzer(case, analyzer)
    aid = case.analyzer_id
    names = label_names(an)
    an_name = an.name if an else aid
    lsys = label_system(aid)
    version = review.version
    signed_at = _instant(review.signed_at)
    sep = ":" if base_url.startswith("urn:") else "/"

    def full_url(kind: str, index: int = 0) -> str:
        name = f"{base_url}/case/{case.id}/v{version}/{kind}/{index}"
        return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, name)}"

    def ref(url: str, display: str | None = None) -> dict:
        return {"reference": url, **({"display": display} if display else {})}

    def label_cc(label: str) -> dict:
        return {"coding": [{"system": lsys, "code": label, "display": names.get(label, label)}],
                "text": names.get(label, label)}

    def obs_code(kind: str) -> dict:
        return {"coding": [{"system": OBS_SYSTEM, "code": kind, "display": OBS_DISPLAY[kind]}],
                "text": OBS_DISPLAY[kind]}

    def absent(code: str, text: str) -> dict:
        return {"coding": [{"system": DATA_ABSENT, "code": code}], "text": text}

    def prob_qty(p: float) -> dict:
        return {"value": round(float(p), 6), "unit": "1", "system": UCUM, "code": "1"}

    # --- Patient
    p = case.patient
    patient_url = full_url("patient")
    name = {"family": p.family_name, "text": p.display_name}
    if p.given_name:
        name["given"] = [p.given_name]
    patient = FhirPatient(
        id=patient_url.rsplit(":", 1)[1],
        identifier=[{"use": "usual", "system": MRN_SYSTEM, "value": p.mrn}],
        name=[name],
        gender=p.sex if p.sex in GENDERS else "unknown",
        birthDate=p.birth_date.isoformat() if p.birth_date else None,
    )
    subject = ref(patient_url, p.display_name)

    # --- Practitioner (signer)
    signer = review.signed_by
    practitioner_url = full_url("practitioner")
    practitioner = Practitioner(
        id=practitioner_url.rsplit(":", 1)[1],
        identifier=[{"system": USER_SYSTEM, "value": str(signer.id)}],
        name=[{"text": signer.name}],
    )
    signer_ref = ref(practitioner_url, signer.name)

    # --- Devices: one per model (version, sha256) that produced a stored result
    default_model = (an.version if an else "", an.model_info.sha256 if an else "")
    models: list[tuple[str, str]] = []
    for img in case.images:
        a = img.analysis
        if a is not None and a.job_status == "done":
            m = (a.model_version or default_model[0], a.model_sha256 or default_model[1])
            if m not in models:
                models.append(m)
    if not models:
        models.append(default_model)
    device_urls = {m: full_url("device", k) for k, m in enumerate(models)}
    devices = []
    for m, url in device_urls.items():
        devices.append((url, Device(
            id=url.rsplit(":", 1)[1],
            status="active",
            identifier=[{"system": MODEL_SHA_SYSTEM, "value": m[1]}] if m[1] else None,
            deviceName=[{"name": an_name, "type": "model-name"}],
            type={"coding": [{"system": ANALYZER_SYSTEM, "code": aid, "display": an_name}], "text": aid},
            version=[{"value": m[0]}] if m[0] else None,
            note=[{"text": f"AI analyzer {aid} ({an.modality})" if an else f"AI analyzer {aid}"}],
        )))

    def device_ref(a) -> dict:
        m = (a.model_version or default_model[0], a.model_sha256 or default_model[1]) if a is not None else models[0]
        return ref(device_urls.get(m, device_urls[models[0]]), an_name)

    # --- Media, one per image, and the per-image AI observations
    media: list[tuple[str, Media]] = []
    media_titles: list[str] = []
    observations: list[tuple[str, Observation]] = []
    class_refs: list[dict] = []
    modality = an.modality if an else ""

    def observation(kind: str, index: int, **fields) -> dict:
        url = full_url(kind, index)
        observations.append((url, Observation(id=url.rsplit(":", 1)[1], status="final", code=obs_code(kind),
                                              subject=subject, **fields)))
        return ref(url)

    for i, img in enumerate(case.images, start=1):
        title = f"Field {i} - {img.original_filename}" if img.original_filename else f"Field {i}"
        content = {"contentType": "image/png", "title": img.original_filename or title}
        data = images.get(img.id)
        if data is not None:
            content["data"] = base64.b64encode(data).decode("ascii")
            content["size"] = len(data)
        media_url = full_url("media", i)
        media_titles.append(title)
        media.append((media_url, Media(
            id=media_url.rsplit(":", 1)[1],
            identifier=[{"system": IMAGE_SHA_SYSTEM, "value": img.sha256}],
            status="completed",
            type={"coding": [{"system": MEDIA_TYPE, "code": "image", "display": "Image"}], "text": "Image"},
            modality=({"coding": [{"system": MODALITY_SYSTEM, "code": modality}], "text": modality}
                      if modality else None),
            subject=subject,
            createdDateTime=_instant(img.created_at),
            height=img.height,
            width=img.width,
            content=content,
        )))
        a = img.analysis
        done = a is not None and a.job_status == "done"
        common = {"derivedFrom": [ref(media_url, title)], "device": device_ref(a if done else None)}
        if done and a.finished_at:
            common.update(effectiveDateTime=_instant(a.finished_at), issued=_instant(a.finished_at))
        status = a.result_status if done else "error"
        if done and a.label:
            class_refs.append(observation("ai-class", i, valueCodeableConcept=label_cc(a.label), **common))
        else:
            why = ("out of domain: no class is given" if status == "out_of_domain"
                   else "the analysis failed" if status == "error" else "no class")
            class_refs.append(observation("ai-class", i, dataAbsentReason=absent(
                "not-applicable" if status == "out_of_domain" else "error", why), **common))
        if done and a.probabilities:
            observation("ai-probability", i, component=[
                {"code": label_cc(k), "valueQuantity": prob_qty(v)} for k, v in a.probabilities.items()], **common)
        if done and a.cell_count is not None:
            observation("cell-count", i, valueInteger=int(a.cell_count), **common)
        msgs = list(a.messages or []) if done else ([a.last_error.splitlines()[0]] if a and a.last_error else [])
        observation("ai-status", i, valueString=status, note=[{"text": m} for m in msgs if m] or None, **common)

    # --- case-level AI call, as signed (the review keeps the label and status the doctor saw)
    agg = aggregate(case)
    ai_status = review.ai_status or agg.status
    agg_fields = {"derivedFrom": class_refs, "device": device_ref(None), "effectiveDateTime": signed_at,
                  "issued": signed_at,
                  "note": [{"text": t} for t in (agg.text, an.interpretation(agg.label) if an else None) if t]}
    agg_components = [{"code": {"coding": [{"system": OBS_SYSTEM, "code": "ai-status",
                                            "display": OBS_DISPLAY["ai-status"]}], "text": "AI status"},
                       "valueString": ai_status}]
    agg_components += [{"code": label_cc(k), "valueQuantity": prob_qty(v)} for k, v in agg.probabilities.items()]
    if review.ai_label:
        aggregate_ref = observation("ai-aggregate", 0, valueCodeableConcept=label_cc(review.ai_label),
                                    component=agg_components, **agg_fields)
    else:
        aggregate_ref = observation("ai-aggregate", 0, dataAbsentReason=absent(
            "not-applicable" if ai_status == "out_of_domain" else "error", f"no AI call ({ai_status})"),
            component=agg_components, **agg_fields)

    # --- the doctor's diagnosis and its relation to the AI call
    final = review.final_diagnosis
    final_display = names.get(final, final)
    notes = [t for t in (review.comment, review.uncertainty_note and f"Uncertainty note: {review.uncertainty_note}",
                         review.amendment_reason and f"Amendment (version {version}): {review.amendment_reason}") if t]
    doctor = {"performer": [signer_ref], "effectiveDateTime": signed_at, "issued": signed_at}
    final_ref = observation("final-diagnosis", 0, valueCodeableConcept=label_cc(final),
                            note=[{"text": t} for t in notes] or None, derivedFrom=[aggregate_ref], **doctor)
    # with no AI call there is nothing to agree with: not-applicable, never a "false" that reads as an override
    agreement = {"valueBoolean": bool(review.agrees_with_ai)} if review.ai_label else \
        {"dataAbsentReason": absent("not-applicable", "no AI call to compare with")}
    reason = "Override reason" if review.ai_label else "Reason for the diagnosis (no AI call)"
    observation("ai-vs-final", 0, **agreement,
                note=[{"text": f"{reason}: {review.override_reason}"}] if review.override_reason else None,
                derivedFrom=[aggregate_ref, final_ref], **doctor)

    # --- DiagnosticReport
    conclusion = final_display + "."
    if review.comment:
        conclusion += f" {review.comment}"
    if review.amendment_reason:
        conclusion += f" Amended (version {version}): {review.amendment_reason}"
    report_url = full_url("report")
    report = DiagnosticReport(
        id=report_url.rsplit(":", 1)[1],
        identifier=[{"system": f"{base_url}{sep}report", "value": f"case-{case.id}-v{version}"}],
        status="amended" if version > 1 else "final",
        code={"coding": [{"system": REPORT_SYSTEM, "code": aid, "display": an_name}], "text": an_name},
        subject=subject,
        effectiveDateTime=_instant(case.created_at),
        issued=signed_at,
        performer=[signer_ref],
        resultsInterpreter=[signer_ref],
        result=[ref(url) for url, _ in observations],
        media=[{"comment": t, "link": ref(url)} for t, (url, _) in zip(media_titles, media)],
        conclusion=conclusion,
        conclusionCode=[label_cc(final)],
        presentedForm=[{"contentType": "application/pdf", "data": base64.b64encode(pdf).decode("ascii"),
                        "title": f"oncoscope-case-{case.id}-v{version}.pdf", "creation": signed_at}],
    )

    entries = [(report_url, report), (patient_url, patient), (practitioner_url, practitioner), *devices,
               *media, *observations]
    bundle_url = full_url("bundle")
    bundle = Bundle(
        id=bundle_url.rsplit(":", 1)[1],
        identifier={"system": f"{base_url}{sep}bundle", "value": f"case-{case.id}-v{version}"},
        type="collection",
        timestamp=signed_at,
        entry=[BundleEntry(fullUrl=url, resource=res) for url, res in entries],
    )
    return json.loads(bundle.model_dump_json())
