"""What every DICOM writer here shares: the VR rules every written value goes through
(:func:`dicom_value`), deterministic UIDs, coded concepts of the local coding scheme, DICOM
date/time text, the patient's name and sex, pinned creation times and Part-10 encoding.

The writers themselves are one module per DICOM object: :mod:`.dicom_sr` (Comprehensive SR of a
signed case) and :mod:`.dicom_seg` (Segmentation of a cell mask, with the Secondary Capture it
references for a non-DICOM source). Reading DICOM is :mod:`oncoscope.imaging.dicom`.

pydicom is imported inside the functions that use it: importing it costs start-up time (about
0.16 s), which a process that never writes DICOM does not pay.
"""

from __future__ import annotations

import datetime as dt
import io
import re
from importlib import metadata

from ..imaging.dicom import is_dicom_uid

# Root of the deterministic UIDs below (pydicom's generate_uid hashes these entropy sources).
UID_NAMESPACE = "oncoscope"
PRIVATE_SCHEME = "99ONCOSCOPE"
SEX_CODE = {"female": "F", "male": "M", "other": "O"}


class DicomExportError(ValueError):
    """The object cannot be exported to DICOM (e.g. the case is not signed)."""


# ----------------------------------------------------------------------------- identifiers
def derived_uid(*parts) -> str:
    """A UID that is a function of ``parts``: exporting the same thing twice names the same object."""
    from pydicom.uid import generate_uid

    return dicom_value(str(generate_uid(entropy_srcs=[UID_NAMESPACE, *(str(p) for p in parts)])), "UI")


def case_study_uid(case) -> str:
    """The deterministic Study Instance UID of a case that did not come from DICOM.

    Hashes the case id with its creation time and the patient's MRN, so two installations that
    both have a case 1 do not produce the same UID.
    """
    created = case.created_at.isoformat() if getattr(case, "created_at", None) else ""
    return derived_uid("study", case.id, created, case.patient.mrn if case.patient else "")


# ----------------------------------------------------------------------------- value representations
# PS3.5 6.2: in these VRs "\" separates values, and no control character (bar ESC, meaningless under
# ISO_IR 192) is allowed; lone surrogates cannot be encoded at all. Maximum lengths in characters.
_ONE_VALUE_MAX = {"LO": 64, "SH": 16, "UC": None}
_TEXT_MAX = {"ST": 1024, "LT": 10240, "UT": None}
_CONTROL = "\x00-\x1f\x7f-\x9f\ud800-\udfff"
_NOT_IN_ONE_VALUE = re.compile(f"[\\\\%{_CONTROL}]")
_PN_BREAKS = re.compile(f"[\\\\^={_CONTROL}]")
_NOT_IN_TEXT = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ud800-\udfff]")  # CR, LF, FF are allowed


def dicom_value(value, vr: str = "LO") -> str:
    """``value`` (stored or user text) as one value of a DICOM element of ``vr``: every text the
    DICOM writers write goes through here, so no value can split into several or leak into other components.

    * LO, SH, UC (identifiers, descriptions, codes): ``\\``, control characters and ``%`` itself are
      written as ``%XX`` (their UTF-8 bytes). Reversible, so two different MRNs never export as the
      same Patient ID (``B-001\\ZZ`` -> ``B-001%5CZZ``, one value).
    * PN: ``value`` holds the components (family, given, middle, prefix, suffix), or is one string
      (the family name). ``^ = \\`` and control characters would move text into another component,
      component group or value: they become spaces. ``Doe=Smith`` -> ``Doe Smith^``.
    * ST, LT, UT (free text): control characters other than CR, LF and FF are dropped (tab: space).
    * UI: returned as is when it is one valid UID (digits and dots, no leading zero in a component, at most
      64 characters); anything else raises :class:`DicomExportError`, since an altered UID names another object.

    Other values are cut to the VR's maximum length.
    """
    if vr == "UI":
        if not is_dicom_uid(value):
            raise DicomExportError(f"Not a valid DICOM UID: {str(value)[:80]!r}.")
        return str(value)
    if vr == "PN":
        return _person_name_value([value] if isinstance(value, str) or value is None else list(value))
    text = "" if value is None else str(value)
    if vr in _TEXT_MAX:
        return _NOT_IN_TEXT.sub("", text.replace("\t", " "))[:_TEXT_MAX[vr]]
    return _one_value(text, _ONE_VALUE_MAX[vr])  # KeyError: no rule written for that VR yet


def _one_value(text: str, limit: int | None) -> str:
    out, n = [], 0
    for ch in text:
        piece = ch
        if _NOT_IN_ONE_VALUE.match(ch):
            piece = "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
        if limit is not None and n + len(piece) > limit:
            break  # never half an escape
        out.append(piece)
        n += len(piece)
    return "".join(out)


def _person_name_value(components: list) -> str:
    parts = [" ".join(_PN_BREAKS.sub(" ", str(c or "")).split()) for c in components]
    while len(parts) > 2 and not parts[-1]:
        parts.pop()
    if not any(parts):
        return ""
    return "^".join(parts + [""] * (2 - len(parts)))[:64]  # "Doe^": a lone name is the family name


def patient_pn(patient) -> str:
    """The patient's name as one PN value (family ^ given)."""
    return dicom_value((patient.family_name, patient.given_name), "PN")


def dicom_date(d) -> str:
    """DA text, "" for None."""
    return d.strftime("%Y%m%d") if d else ""


def dicom_time(t) -> str:
    """TM text (whole seconds), "" for None."""
    return t.strftime("%H%M%S") if t else ""


def dicom_datetime(t) -> str:
    """DT text (whole seconds, no zone: the stored naive UTC), "" for None."""
    return t.strftime("%Y%m%d%H%M%S") if t else ""


# ----------------------------------------------------------------------------- coded concepts
def code(value: str, meaning: str, scheme: str = PRIVATE_SCHEME):
    """A pydicom ``Code``; by default in the local scheme that :func:`private_scheme_item` declares."""
    from pydicom.sr.coding import Code

    return Code(dicom_value(str(value)[:64], "UC"), scheme, dicom_value(meaning or str(value), "LO"))


def private_scheme_item():
    """The Coding Scheme Identification item for the local codes (:data:`PRIVATE_SCHEME`)."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "oncoscope local codes"
    item.CodingSchemeResponsibleOrganization = "oncoscope"
    return item


# ----------------------------------------------------------------------------- finishing a dataset
def pin_times(ds, when: dt.datetime) -> None:
    """Replace the wall-clock times highdicom writes by ``when`` (reproducible output)."""
    ds.ContentDate, ds.ContentTime = dicom_date(when), dicom_time(when)
    ds.InstanceCreationDate, ds.InstanceCreationTime = dicom_date(when), dicom_time(when)
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = dicom_datetime(when)


def to_part10(ds) -> bytes:
    """A pydicom Dataset (with file meta) as DICOM Part-10 file bytes."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def package_version() -> str:
    """The installed oncoscope version (Software Versions), "dev" when it is not installed."""
    try:
        return metadata.version("oncoscope")
    except Exception:  # noqa: BLE001
        return "dev"
