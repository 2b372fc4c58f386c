"""Pulling images from the PACS into cases (QIDO-RS to find a patient's studies, WADO-RS to fetch the
series a person chose), filed like images the receiver gets (store/receiving), under the analyzer the
person chose. No Flask: the patient page and the API call these."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..analyzers import routing
from ..store import receiving
from .dicomweb import Client, DicomWebError, Study


@dataclass
class Retrieved:
    filed: int = 0
    duplicates: int = 0
    inbox: int = 0
    refused: list[str] = field(default_factory=list)
    case_ids: set[int] = field(default_factory=set)


def studies(settings, mrn: str) -> list[Study]:
    """The patient's studies in the PACS (with their series), newest first."""
    pacs = Client.from_settings(settings)
    # only studies whose Patient ID is exactly this MRN: a PACS may match loosely (wildcards, other issuers)
    found = sorted((st for st in pacs.studies(patient_id=mrn) if st.patient_id == mrn),
                   key=lambda st: (st.date, st.time), reverse=True)  # newest first
    for st in found:
        st.series = pacs.series(st.study_uid)
    return found


def retrieve(settings, sessions, files, user, patient_mrn: str, study_uid: str, series_uids: list[str],
             analyzer_id: str) -> Retrieved:
    """Fetch the chosen series of one of the patient's studies and file them into the study's case
    (its analyzer stays when the study already has one), else a new case analysed by ``analyzer_id``;
    instances of another patient are refused."""
    pacs = Client.from_settings(settings)
    rules = [routing.Rule(frozenset(), frozenset(), frozenset(), analyzer_id)]
    out = Retrieved()
    failures = []
    max_bytes = settings.max_upload_mb * 1024 * 1024
    for series_uid in series_uids:
        skipped: list[str] = []
        try:
            for data in pacs.retrieve_series(study_uid, series_uid, max_bytes, skipped):  # one at a time, filed
                _file(out, receiving.receive(sessions, files, data, f"DICOMweb {pacs.host}", rules, max_bytes,
                                             user=user, expected_mrn=patient_mrn,
                                             note=f"Retrieved from the PACS ({pacs.host}) by {user.name}."))
        except DicomWebError as exc:  # this series stops here; the others are still fetched
            failures.append(exc)
            out.refused.append(f"Series {series_uid}: {exc}")
        out.refused.extend(skipped)
    if failures and not (out.filed or out.duplicates or out.inbox):
        raise failures[0]
    return out


def _file(out: Retrieved, got) -> None:
    if got.refused:
        out.refused.append(got.message)
        return
    out.filed += got.kind == "filed"
    out.duplicates += got.kind == "duplicate"
    out.inbox += got.kind == "inbox"
    if got.case_id:
        out.case_ids.add(got.case_id)
