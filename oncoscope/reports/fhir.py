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
from dataclasses import dataclass, field
from io import BytesIO

from fhir.resources.R4B.bundle import Bundle, BundleEntry
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.media import Media
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient as FhirPatient
from fhir.resources.R4B.practitioner import Practitioner
from PIL import Image

from ..imaging.imageio import load_image
from ..store.cases import label_names, signed_call
from .case_facts import case_analyzer, differential_rows, image_messages, is_done, reported_review, result_status

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


def original_pngs(case, store) -> dict[int, bytes]:
    """``CaseImage.id -> PNG bytes`` of each stored original (decoded, RGB), for ``case_bundle(images=...)``.

    Images whose original is missing from the file store are left out (their Media get no data)."""
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

    Raises ``ValueError("case is not signed")`` for a case without a signed review or a preliminary
    result (reported with status 'preliminary'; whether one may leave is the caller's decision).
    """
    review = reported_review(case)
    if review is None:
        raise ValueError("case is not signed")
    an = analyzer if analyzer is not None else case_analyzer(case)
    ctx = _Context(case, review, base_url, an, label_names(an))
    patient_url, patient = _patient(ctx)
    ctx.subject = _ref(patient_url, case.patient.display_name)
    practitioner_url, practitioner, signer_ref = _practitioner(ctx)
    devices = _Devices(ctx)
    media = [_media(ctx, i, img, (images or {}).get(img.id)) for i, img in enumerate(case.images, start=1)]
    class_refs = [_image_observations(ctx, i, img, url, title, devices)
                  for i, (img, (url, _, title)) in enumerate(zip(case.images, media), start=1)]
    aggregate_ref = _aggregate_observation(ctx, class_refs, devices)
    _final_diagnosis_observations(ctx, signer_ref, aggregate_ref)
    _differential_observations(ctx, signer_ref, aggregate_ref, devices)
    report = _diagnostic_report(ctx, pdf, signer_ref, media)
    return _bundle(ctx, [report, (patient_url, patient), (practitioner_url, practitioner), *devices.resources(ctx),
                         *((url, m) for url, m, _ in media), *ctx.observations])


# ----------------------------------------------------------------------------- shared pieces
def _ref(url: str, display: str | None = None) -> dict:
    return {"reference": url, **({"display": display} if display else {})}


def _id(url: str) -> str:
    """The resource id of a ``urn:uuid:`` full URL."""
    return url.rsplit(":", 1)[1]


def _obs_code(kind: str) -> dict:
    return {"coding": [{"system": OBS_SYSTEM, "code": kind, "display": OBS_DISPLAY[kind]}],
            "text": OBS_DISPLAY[kind]}


def _absent(code: str, text: str) -> dict:
    return {"coding": [{"system": DATA_ABSENT, "code": code}], "text": text}


def _prob_qty(p: float) -> dict:
    return {"value": round(float(p), 6), "unit": "1", "system": UCUM, "code": "1"}


@dataclass
class _Context:
    """What every resource of one bundle shares: the case and its signed review, the analyzer (None
    when it is gone), the label display names, the subject reference, and the Observations so far."""

    case: object
    review: object
    base_url: str
    analyzer: object
    names: dict[str, str]
    subject: dict = field(default_factory=dict)
    observations: list[tuple[str, Observation]] = field(default_factory=list)

    @property
    def analyzer_name(self) -> str:
        return self.analyzer.name if self.analyzer else self.case.analyzer_id

    @property
    def signed_at(self) -> str:
        return _instant(self.review.signed_at)

    def system(self, kind: str) -> str:
        """The identifier system of the bundle and of the report under ``base_url``."""
        return f"{self.base_url}{':' if self.base_url.startswith('urn:') else '/'}{kind}"

    def full_url(self, kind: str, index: int = 0) -> str:
        """Deterministic: uuid5 of (base_url, case, review version, resource kind, index)."""
        name = f"{self.base_url}/case/{self.case.id}/v{self.review.version}/{kind}/{index}"
        return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, name)}"

    def label_cc(self, label: str) -> dict:
        display = self.names.get(label, label)
        return {"coding": [{"system": label_system(self.case.analyzer_id), "code": label, "display": display}],
                "text": display}

    def observation(self, kind: str, index: int, status: str = "final", **fields) -> dict:
        """Add an Observation about the subject; returns its reference."""
        url = self.full_url(kind, index)
        self.observations.append((url, Observation(id=_id(url), status=status, code=_obs_code(kind),
                                                   subject=self.subject, **fields)))
        return _ref(url)


# ----------------------------------------------------------------------------- who and what
def _patient(ctx: _Context) -> tuple[str, FhirPatient]:
    p = ctx.case.patient
    url = ctx.full_url("patient")
    name = {"family": p.family_name, "text": p.display_name}
    if p.given_name:
        name["given"] = [p.given_name]
    return url, FhirPatient(
        id=_id(url),
        identifier=[{"use": "usual", "system": MRN_SYSTEM, "value": p.mrn}],
        name=[name],
        gender=p.sex if p.sex in GENDERS else "unknown",
        birthDate=p.birth_date.isoformat() if p.birth_date else None,
    )


def _practitioner(ctx: _Context) -> tuple[str, Practitioner, dict]:
    """The signing physician, and a reference to them."""
    signer = ctx.review.signed_by
    url = ctx.full_url("practitioner")
    practitioner = Practitioner(id=_id(url), identifier=[{"system": USER_SYSTEM, "value": str(signer.id)}],
                                name=[{"text": signer.name}])
    return url, practitioner, _ref(url, signer.name)


class _Devices:
    """One Device per model (version, sha256) that produced a stored result; the analyzer's own
    model when none did."""

    def __init__(self, ctx: _Context):
        an = ctx.analyzer
        self.default = (an.version if an else "", an.model_info.sha256 if an else "")
        self.models: list[tuple[str, str]] = []
        for img in ctx.case.images:
            if is_done(img.analysis) and self._model(img.analysis) not in self.models:
                self.models.append(self._model(img.analysis))
        if not self.models:
            self.models.append(self.default)
        self.urls = {m: ctx.full_url("device", k) for k, m in enumerate(self.models)}
        self.name = ctx.analyzer_name

    def _model(self, a) -> tuple[str, str]:
        return a.model_version or self.default[0], a.model_sha256 or self.default[1]

    def ref(self, a) -> dict:
        """The Device that made analysis ``a``; the first one for None (the case-level call)."""
        m = self._model(a) if a is not None else self.models[0]
        return _ref(self.urls.get(m, self.urls[self.models[0]]), self.name)

    def resources(self, ctx: _Context) -> list[tuple[str, Device]]:
        aid, an = ctx.case.analyzer_id, ctx.analyzer
        return [(url, Device(
            id=_id(url),
            status="active",
            identifier=[{"system": MODEL_SHA_SYSTEM, "value": m[1]}] if m[1] else None,
            deviceName=[{"name": self.name, "type": "model-name"}],
            type={"coding": [{"system": ANALYZER_SYSTEM, "code": aid, "display": self.name}], "text": aid},
            version=[{"value": m[0]}] if m[0] else None,
            note=[{"text": f"AI analyzer {aid} ({an.modality})" if an else f"AI analyzer {aid}"}],
        )) for m, url in self.urls.items()]


# ----------------------------------------------------------------------------- per image
def _media(ctx: _Context, i: int, img, data: bytes | None) -> tuple[str, Media, str]:
    """The Media of one image (with its PNG bytes when given), and its title."""
    title = f"Field {i} - {img.original_filename}" if img.original_filename else f"Field {i}"
    content = {"contentType": "image/png", "title": img.original_filename or title}
    if data is not None:
        content["data"] = base64.b64encode(data).decode("ascii")
        content["size"] = len(data)
    modality = ctx.analyzer.modality if ctx.analyzer else ""
    url = ctx.full_url("media", i)
    return url, Media(
        id=_id(url),
        identifier=[{"system": IMAGE_SHA_SYSTEM, "value": img.sha256}],
        status="completed",
        type={"coding": [{"system": MEDIA_TYPE, "code": "image", "display": "Image"}], "text": "Image"},
        modality=({"coding": [{"system": MODALITY_SYSTEM, "code": modality}], "text": modality}
                  if modality else None),
        subject=ctx.subject,
        createdDateTime=_instant(img.created_at),
        height=img.height,
        width=img.width,
        content=content,
    ), title


def _image_observations(ctx: _Context, i: int, img, media_url: str, title: str, devices: _Devices) -> dict:
    """The AI observations of one image: class, probabilities, cell count and status. Returns the
    reference of the class observation (the case-level call is derived from those)."""
    a = img.analysis
    done = is_done(a)
    common = {"derivedFrom": [_ref(media_url, title)], "device": devices.ref(a if done else None)}
    if done and a.finished_at:
        common.update(effectiveDateTime=_instant(a.finished_at), issued=_instant(a.finished_at))
    status = a.result_status if done else "error"
    if done and a.label:
        class_ref = ctx.observation("ai-class", i, valueCodeableConcept=ctx.label_cc(a.label), **common)
    else:
        why = ("out of domain: no class is given" if status == "out_of_domain"
               else "the analysis failed" if status == "error" else "no class")
        class_ref = ctx.observation("ai-class", i, dataAbsentReason=_absent(
            "not-applicable" if status == "out_of_domain" else "error", why), **common)
    if done and a.probabilities:
        ctx.observation("ai-probability", i, component=[
            {"code": ctx.label_cc(k), "valueQuantity": _prob_qty(v)} for k, v in a.probabilities.items()], **common)
    if done and a.cell_count is not None:
        ctx.observation("cell-count", i, valueInteger=int(a.cell_count), **common)
    msgs = image_messages(a)
    ctx.observation("ai-status", i, valueString=status, note=[{"text": m} for m in msgs if m] or None, **common)
    return class_ref


# ----------------------------------------------------------------------------- the case
def _aggregate_observation(ctx: _Context, class_refs: list[dict], devices: _Devices) -> dict:
    """The case-level AI call, as signed (the review keeps the label and status the doctor saw)."""
    agg = signed_call(ctx.case)
    an, review, signed_at = ctx.analyzer, ctx.review, ctx.signed_at
    ai_status = review.ai_status or agg.status
    components = [{"code": {"coding": [{"system": OBS_SYSTEM, "code": "ai-status",
                                        "display": OBS_DISPLAY["ai-status"]}], "text": "AI status"},
                   "valueString": ai_status}]
    components += [{"code": ctx.label_cc(k), "valueQuantity": _prob_qty(v)} for k, v in agg.probabilities.items()]
    fields = {"derivedFrom": class_refs, "device": devices.ref(None), "effectiveDateTime": signed_at,
              "issued": signed_at, "component": components,
              "note": [{"text": t} for t in (agg.text, an.interpretation(agg.label) if an else None) if t]}
    if review.ai_label:
        return ctx.observation("ai-aggregate", 0, valueCodeableConcept=ctx.label_cc(review.ai_label), **fields)
    return ctx.observation("ai-aggregate", 0, dataAbsentReason=_absent(
        "not-applicable" if ai_status == "out_of_domain" else "error", f"no AI call ({ai_status})"), **fields)


def report_status(version: int) -> str:
    """A preliminary result (version 0) is preliminary; a signed report is final; each amendment of it
    corrects it (FHIR's 'corrected', HL7's C)."""
    return result_status(version)


def _final_diagnosis_observations(ctx: _Context, signer_ref: dict, aggregate_ref: dict) -> None:
    """The doctor's diagnosis, and whether it agrees with the AI call."""
    review, version, signed_at = ctx.review, ctx.review.version, ctx.signed_at
    notes = [t for t in (review.comment, review.uncertainty_note and f"Uncertainty note: {review.uncertainty_note}",
                         review.amendment_reason and f"Amendment (version {version}): {review.amendment_reason}") if t]
    # an amendment corrects the reader's observations (the AI's stay as they were)
    doctor = {"performer": [signer_ref], "effectiveDateTime": signed_at, "issued": signed_at,
              "status": report_status(version)}
    final_ref = ctx.observation("final-diagnosis", 0, valueCodeableConcept=ctx.label_cc(review.final_diagnosis),
                                note=[{"text": t} for t in notes] or None, derivedFrom=[aggregate_ref], **doctor)
    # with no AI call there is nothing to agree with: not-applicable, never a "false" that reads as an override
    agreement = {"valueBoolean": bool(review.agrees_with_ai)} if review.ai_label else \
        {"dataAbsentReason": _absent("not-applicable", "no AI call to compare with")}
    reason = "Override reason" if review.ai_label else "Reason for the diagnosis (no AI call)"
    ctx.observation("ai-vs-final", 0, **agreement,
                    note=[{"text": f"{reason}: {review.override_reason}"}] if review.override_reason else None,
                    derivedFrom=[aggregate_ref, final_ref], **doctor)


LOINC = "http://loinc.org"
HIGH = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "H",
                    "display": "High"}], "text": "Blasts at or above the laboratory's flag"}


def _differential_observations(ctx: _Context, signer_ref: dict, aggregate_ref: dict, devices: _Devices) -> None:
    """The verified differential: one LOINC-coded Observation per class, in % (UCUM) of white cells."""
    signed_at = ctx.signed_at
    first = next((i.analysis for i in ctx.case.images if is_done(i.analysis)), None)
    for k, row in enumerate(differential_rows(ctx.review)):
        url = ctx.full_url("differential", k)
        code = {"coding": [{"system": LOINC, "code": row.loinc, "display": row.display}], "text": row.display}
        ctx.observations.append((url, Observation(
            id=_id(url), status="final", code=code, subject=ctx.subject,
            category=[{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                   "code": "laboratory"}]}],
            valueQuantity={"value": row.value, "unit": row.unit, "system": UCUM, "code": row.unit},
            interpretation=[HIGH] if row.abnormal else None, performer=[signer_ref],
            device=devices.ref(first), effectiveDateTime=signed_at, issued=signed_at, derivedFrom=[aggregate_ref],
            note=[{"text": f"{row.count} of {row.white_cells} white cells ({row.unidentified} left unidentified, "
                           "counted in the denominator): pre-classified by the AI (device), verified by the "
                           "performer"}])))


def _conclusion(ctx: _Context) -> str:
    review = ctx.review
    conclusion = ctx.names.get(review.final_diagnosis, review.final_diagnosis) + "."
    if review.comment:
        conclusion += f" {review.comment}"
    if review.amendment_reason:
        conclusion += f" Amended (version {review.version}): {review.amendment_reason}"
    return conclusion


def _diagnostic_report(ctx: _Context, pdf: bytes, signer_ref: dict,
                       media: list[tuple[str, Media, str]]) -> tuple[str, DiagnosticReport]:
    """The report that links every Observation and Media, and carries the signed PDF."""
    case, version, signed_at, name = ctx.case, ctx.review.version, ctx.signed_at, ctx.analyzer_name
    url = ctx.full_url("report")
    return url, DiagnosticReport(
        id=_id(url),
        identifier=[{"system": ctx.system("report"), "value": f"case-{case.id}-v{version}"}],
        status=report_status(version),
        code={"coding": [{"system": REPORT_SYSTEM, "code": case.analyzer_id, "display": name}], "text": name},
        subject=ctx.subject,
        effectiveDateTime=_instant(case.created_at),
        issued=signed_at,
        performer=[signer_ref],
        resultsInterpreter=[signer_ref],
        result=[_ref(u) for u, _ in ctx.observations],
        media=[{"comment": title, "link": _ref(u)} for u, _, title in media],
        conclusion=_conclusion(ctx),
        conclusionCode=[ctx.label_cc(ctx.review.final_diagnosis)],
        presentedForm=[{"contentType": "application/pdf", "data": base64.b64encode(pdf).decode("ascii"),
                        "title": f"oncoscope-case-{case.id}-v{version}.pdf", "creation": signed_at}],
    )


def _bundle(ctx: _Context, entries: list[tuple[str, object]]) -> dict:
    url = ctx.full_url("bundle")
    bundle = Bundle(
        id=_id(url),
        identifier={"system": ctx.system("bundle"), "value": f"case-{ctx.case.id}-v{ctx.review.version}"},
        type="collection",
        timestamp=ctx.signed_at,
        entry=[BundleEntry(fullUrl=u, resource=res) for u, res in entries],
    )
    return json.loads(bundle.model_dump_json())
