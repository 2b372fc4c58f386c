"""A DICOMweb client for the PACS (PS3.18): find studies and series (QIDO-RS), fetch a series'
instances (WADO-RS, multipart/related), store our signed DICOM SR and SEG (STOW-RS). HTTP Basic or
Bearer authentication; TLS verified (against ``ONCOSCOPE_DICOMWEB_CA_FILE`` or the system's CAs)
when the URL is https. Standard library only: no HTTP client to pin."""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP

MAX_RESPONSE = 2 * 1024**3  # a series larger than this is refused, not read into memory
MULTIPART_MARGIN = 64 * 1024  # an instance's multipart headers and boundaries, beyond its own size limit
DICOM_JSON = "application/dicom+json"


def _size(n: int) -> str:
    return f"{n / 1024**3:.0f} GB" if n >= 1024**3 else f"{n / 1024**2:.0f} MB"


class DicomWebError(Exception):
    """The PACS could not be reached or refused; the message says which, for people."""


class TooLarge(DicomWebError):
    """An answer over the size it may have (refused before it was read whole)."""


@dataclass
class Study:
    study_uid: str
    date: str = ""
    time: str = ""
    description: str = ""
    accession: str = ""
    patient_id: str = ""
    patient_name: str = ""
    modalities: list[str] = field(default_factory=list)
    series_count: int | None = None
    instance_count: int | None = None
    series: list["Series"] = field(default_factory=list)  # (filled by services/pacs.studies)


@dataclass
class Series:
    series_uid: str
    modality: str = ""
    description: str = ""
    body_part: str = ""
    number: str = ""
    instance_count: int | None = None


@dataclass
class Stored:
    """What STOW-RS answered: the SOP instances the PACS stored and those it refused (with reasons)."""

    stored: list[str]
    failed: list[str]


def _value(item: dict, tag: str):
    v = (item.get(tag) or {}).get("Value") or []
    if not v:
        return ""
    first = v[0]
    if isinstance(first, dict):  # a person name
        return first.get("Alphabetic", "")
    return first


def _values(item: dict, tag: str) -> list:
    return list((item.get(tag) or {}).get("Value") or [])


def _int(item: dict, tag: str) -> int | None:
    v = _value(item, tag)
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


class Client:
    def __init__(self, base_url: str, *, user: str = "", password: str = "", token: str = "",
                 ca_file=None, timeout: float = 30.0):
        if not base_url.startswith(("http://", "https://")):
            raise DicomWebError("The DICOMweb address must start with http:// or https://.")
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self.auth = (f"Bearer {token}" if token else
                     "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode() if user else "")
        self.context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None) \
            if self.base.startswith("https://") else None
        # no redirects: urllib would carry our Authorization header to wherever it points (another host,
        # or from https to http)
        self.opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=self.context), _NoRedirect)

    @classmethod
    def from_settings(cls, settings) -> "Client":
        if not settings.dicomweb_url:
            raise DicomWebError("No PACS is configured (ONCOSCOPE_DICOMWEB_URL).")
        return cls(settings.dicomweb_url, user=settings.dicomweb_user, password=settings.dicomweb_password,
                   token=settings.dicomweb_token, ca_file=settings.dicomweb_ca_file)

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.base).netloc

    # ------------------------------------------------------------------ transport
    def _call(self, method: str, path: str, *, accept: str, body: bytes | None = None,
              ctype: str | None = None, limit: int = MAX_RESPONSE) -> tuple[bytes, str]:
        req = urllib.request.Request(self.base + path, data=body, method=method)
        req.add_header("Accept", accept)
        if self.auth:
            req.add_header("Authorization", self.auth)
        if ctype:
            req.add_header("Content-Type", ctype)
        try:
            with self.opener.open(req, timeout=self.timeout) as r:
                data = r.read(limit + 1)
                if len(data) > limit:
                    raise TooLarge(f"The PACS answer is larger than {_size(limit)}; "
                                   + ("retrieve fewer series at a time." if limit == MAX_RESPONSE else
                                      "an image may have at most that here (ONCOSCOPE_MAX_UPLOAD_MB), so it "
                                      "was not retrieved."))
                return data, r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise DicomWebError(f"The PACS refused our credentials (HTTP {exc.code}).") from None
            if exc.code == 404 and method == "GET":
                return b"", ""
            if 300 <= exc.code < 400:
                raise DicomWebError(f"The PACS redirected to {exc.headers.get('Location', '?')}; set "
                                    "ONCOSCOPE_DICOMWEB_URL to the final address.") from None
            detail = exc.read(2000).decode("utf-8", "replace").strip()
            raise DicomWebError(f"The PACS answered HTTP {exc.code} {exc.reason}"
                                + (f": {detail[:300]}" if detail else "")) from None
        except ssl.SSLError as exc:
            raise DicomWebError(f"TLS with the PACS failed: {exc.reason or exc}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DicomWebError(f"The PACS at {self.host} cannot be reached ({reason}).") from None

    def _json(self, path: str) -> list[dict]:
        data, _ = self._call("GET", path, accept=DICOM_JSON)
        if not data.strip():
            return []
        try:
            out = json.loads(data)
        except ValueError:
            raise DicomWebError("The PACS answered something that is not DICOM JSON.") from None
        if not isinstance(out, list):
            raise DicomWebError("The PACS answered something that is not a list of DICOM JSON objects.")
        return out

    # ------------------------------------------------------------------ QIDO-RS
    def studies(self, *, patient_id: str = "", accession: str = "", limit: int = 50) -> list[Study]:
        q = {"limit": str(limit), "includefield": "00080030,00081030,00080061,00201206,00201208"}
        if patient_id:
            q["PatientID"] = patient_id
        if accession:
            q["AccessionNumber"] = accession
        rows = self._json("/studies?" + urllib.parse.urlencode(q))
        return [Study(study_uid=_value(r, "0020000D"), date=_value(r, "00080020"), time=str(_value(r, "00080030")),
                      description=_value(r, "00081030"),
                      accession=_value(r, "00080050"), patient_id=_value(r, "00100020"),
                      patient_name=_value(r, "00100010"), modalities=[str(m) for m in _values(r, "00080061")],
                      series_count=_int(r, "00201206"), instance_count=_int(r, "00201208"))
                for r in rows if _value(r, "0020000D")]

    def series(self, study_uid: str) -> list[Series]:
        rows = self._json(f"/studies/{_uid(study_uid)}/series?includefield=0008103E,00180015,00201209")
        return [Series(series_uid=_value(r, "0020000E"), modality=_value(r, "00080060"),
                       description=_value(r, "0008103E"), body_part=_value(r, "00180015"),
                       number=str(_value(r, "00200011")), instance_count=_int(r, "00201209"))
                for r in rows if _value(r, "0020000E")]

    # ------------------------------------------------------------------ WADO-RS
    def instances(self, study_uid: str, series_uid: str) -> list[str]:
        """The SOP Instance UIDs of a series (QIDO-RS)."""
        rows = self._json(f"/studies/{_uid(study_uid)}/series/{_uid(series_uid)}/instances?includefield=00080018")
        return [_value(r, "00080018") for r in rows if _value(r, "00080018")]

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str, max_bytes: int | None = None) -> bytes:
        """One instance as a Part-10 file; ``max_bytes``: refused (TooLarge) beyond it, before it is read whole."""
        data, ctype = self._call("GET", f"/studies/{_uid(study_uid)}/series/{_uid(series_uid)}/instances/"
                                        f"{_uid(sop_uid)}",
                                 accept='multipart/related; type="application/dicom"; transfer-syntax=*',
                                 limit=MAX_RESPONSE if max_bytes is None else max_bytes + MULTIPART_MARGIN)
        if not data:
            raise DicomWebError(f"The PACS has no instance {sop_uid} in series {series_uid}.")
        return parse_multipart(data, ctype)[0]

    def retrieve_series(self, study_uid: str, series_uid: str, max_bytes: int | None = None,
                        skipped: list[str] | None = None):
        """The series' instances as Part-10 files, one request each (a series of any size is held one
        instance at a time); the whole series in one request when the PACS does not list its instances.
        An instance over ``max_bytes`` is not read: it is named in ``skipped`` and the rest still come
        (without ``skipped``, TooLarge stops the series)."""
        sops = self.instances(study_uid, series_uid)
        listed = next((se.instance_count for se in self.series(study_uid) if se.series_uid == series_uid), None)
        if not sops or (listed is not None and len(sops) < listed):  # a PACS that pages or caps its lists
            data, ctype = self._call("GET", f"/studies/{_uid(study_uid)}/series/{_uid(series_uid)}",
                                     accept='multipart/related; type="application/dicom"; transfer-syntax=*')
            if not data:
                raise DicomWebError(f"The PACS has no series {series_uid} in study {study_uid}.")
            yield from parse_multipart(data, ctype)
            return
        for sop in sops:
            try:
                data = self.retrieve_instance(study_uid, series_uid, sop, max_bytes)
            except TooLarge as exc:
                if skipped is None:
                    raise
                skipped.append(f"Instance {sop}: {exc}")
                continue
            yield data

    # ------------------------------------------------------------------ STOW-RS
    def store(self, instances: list[bytes], study_uid: str | None = None) -> Stored:
        boundary = "oncoscope-" + secrets.token_hex(12)
        body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
                        for part in instances) + b"--" + boundary.encode() + b"--\r\n"
        path = f"/studies/{_uid(study_uid)}" if study_uid else "/studies"
        data, _ = self._call("POST", path, accept=DICOM_JSON, body=body,
                             ctype=f'multipart/related; type="application/dicom"; boundary={boundary}')
        try:
            answer = json.loads(data) if data.strip() else {}
        except ValueError:
            answer = {}
        stored = [_value(x, "00081155") for x in _values(answer, "00081199")]
        failed = [f"{_value(x, '00081155')} (reason {_value(x, '00081197')})" for x in _values(answer, "00081198")]
        if not stored and not failed:
            raise DicomWebError("The PACS did not say which instances it stored.")
        return Stored(stored, failed)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # the 3xx answer surfaces as an HTTPError, said plainly by Client._call


def _uid(uid: str | None) -> str:
    if not uid or not all(c.isdigit() or c == "." for c in uid) or len(uid) > 64:
        raise DicomWebError(f"{uid!r} is not a DICOM UID.")
    return uid


def parse_multipart(data: bytes, ctype: str) -> list[bytes]:
    """The parts of a multipart/related answer (the DICOM files), by the boundary its header names."""
    if "multipart/related" not in ctype.lower():
        raise DicomWebError(f"The PACS answered {ctype or 'no content type'}, not multipart/related.")
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + data)
    parts = [p.get_payload(decode=True) for p in msg.iter_parts()] if msg.is_multipart() else []
    parts = [p for p in parts if p]
    if not parts:
        raise DicomWebError("The PACS answer holds no DICOM instances.")
    return parts
