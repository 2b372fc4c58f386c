"""DICOM receiver: a C-STORE and C-ECHO SCP (pynetdicom) that files what modalities and PACS send
(store/receiving: patient by Patient ID, one case per study, analyzer by the routing table, queued
analyses; unrouted images to the DICOM inbox).

Only calling AE titles listed in ``ONCOSCOPE_DICOM_ALLOWED_AETS`` may associate; with none listed,
every association is refused (A-ASSOCIATE-RJ, "calling AE title not recognised"). Every association,
accepted or not, leaves one audit entry (channel ``dicom``) when its connection closes: who, from where,
what was stored, and every refused instance with its status.

Statuses (PS3.4 C.4.2.1.5 and PS3.7 C): 0x0000 filed, or kept in the inbox, or already held;
0x0122 an SOP class without pixel data (nothing to analyse); 0xA700 the database or disk failed (the
sender retries later); 0xA900 the dataset does not match the SOP class it was sent as, or lacks its
Study Instance UID; 0xC000 the image cannot be read; 0xC001 no usable Patient ID; 0xC002 the patient's
name or birth date contradict the stored patient; 0xC003 the study is filed under another patient.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from dataclasses import dataclass, field

from ..analyzers import routing
from ..imaging.imageio import ImageLoadError
from ..store import receiving
from ..store.audit import AuditLog

log = logging.getLogger("oncoscope.services.dicom_receiver")

STATUS = {
    "filed": 0x0000, "duplicate": 0x0000, "inbox": 0x0000,
    receiving.UNREADABLE: 0xC000, receiving.NO_PATIENT_ID: 0xC001, receiving.PATIENT_CONFLICT: 0xC002,
    receiving.STUDY_CONFLICT: 0xC003, receiving.NO_STUDY: 0xA900,
}
NOT_AN_IMAGE = 0x0122
MISMATCH = 0xA900
OUT_OF_RESOURCES = 0xA700
REFUSED_AE = 0xC004  # (defence in depth: the association itself is refused first)
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass
class _Association:
    """What one association did, for its audit entry."""

    calling: str
    called: str
    address: str
    accepted: bool = False
    refused_contexts: list[str] = field(default_factory=list)
    stored: int = 0
    inbox: int = 0
    duplicates: int = 0
    refusals: list[str] = field(default_factory=list)
    cases: set[int] = field(default_factory=set)
    patients: set[int] = field(default_factory=set)


class Thumbnails:
    """Thumbnails of filed images, made by one background thread after the C-STORE was answered: a
    received image is filed from its header (store/receiving), and its thumbnail would otherwise be made
    by its analysis (the analyses' time) or by the first page that shows it. Best effort: when the queue
    is full, or the process stops first, the analysis or the page makes it (the same bytes). The queue
    holds content hashes; the thread reads the stored file back."""

    def __init__(self, files, size: int = 1024):
        self.files = files
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="oncoscope-dicom-thumbnails", daemon=True)
        self._thread.start()

    def add(self, sha: str) -> None:
        try:
            self._queue.put_nowait(sha)
        except queue.Full:
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the thread after the thumbnail it is making; the rest are left to the analyses."""
        if self._thread is None:
            return
        self._stop.set()
        try:
            self._queue.put_nowait(None)  # (wakes a thread waiting on an empty queue)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            sha = self._queue.get()
            if sha is None:
                continue
            try:
                self.files.ensure_thumbnail(sha)
            except ImageLoadError as exc:  # its analysis reports it
                log.info("no thumbnail for received image %s: %s", sha[:12], exc)
            except Exception:  # noqa: BLE001 - the disk: the analysis or the page tries again
                log.exception("could not write the thumbnail of received image %s", sha[:12])


class Receiver:
    """The SCP. ``start()`` listens in the background (``stop()`` ends it); ``serve()`` blocks."""

    def __init__(self, settings, sessions, files, host: str = "0.0.0.0", port: int | None = None,
                 ae_title: str | None = None, on_filed=None, thumbnails: bool = True):
        self.settings, self.sessions, self.files = settings, sessions, files
        self.host, self.port = host, port if port is not None else settings.dicom_port
        self.ae_title = ae_title or settings.dicom_ae_title
        self.rules = routing.table(settings.dicom_routes)
        self.audit = AuditLog(sessions, settings.audit_spool)
        self.allowed = set(settings.dicom_allowed_aets)
        self._assocs: dict[int, _Association] = {}
        self._lock = threading.Lock()
        self.server = None
        self.on_filed = on_filed  # called after an image was filed (wakes the worker pools)
        # (off when the analyses run in this process: they write the thumbnail from the image they decode)
        self.thumbnails = Thumbnails(files) if thumbnails else None

    # ------------------------------------------------------------------ the application entity
    def _ae(self):
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        _acknowledge_at_once()
        ae = AE(ae_title=self.ae_title)
        syntaxes = _transfer_syntaxes()
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        # pynetdicom accepts every calling AE when its list is empty: an unguessable title refuses them all
        ae.require_calling_aet = sorted(self.allowed) or [secrets.token_hex(8).upper()]
        ae.require_called_aet = True
        ae.maximum_pdu_size = 0  # no limit on what we receive
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_CONN_OPEN, self._on_open), (evt.EVT_ACCEPTED, self._on_accepted),
                    (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_CONN_CLOSE, self._on_close)]
        return ae, handlers

    def start(self) -> None:
        ae, handlers = self._ae()
        self.server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        if self.thumbnails is not None:
            self.thumbnails.start()
        self.port = self.server.server_address[1]  # (port 0: the one the system chose)
        log.info("DICOM receiver %s listening on %s:%s; routes: %s", self.ae_title, self.host, self.port,
                 "; ".join(r.describe() for r in self.rules) or "(none: everything to the inbox)")

    def serve(self) -> None:
        self.start()
        try:
            threading.Event().wait()
        finally:
            self.stop()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        if self.thumbnails is not None:
            self.thumbnails.stop()

    # ------------------------------------------------------------------ events
    def _state(self, event) -> _Association:
        with self._lock:
            st = self._assocs.get(id(event.assoc))
            if st is None:
                rq = event.assoc.requestor
                st = _Association(calling=(rq.ae_title or "").strip(), called=(event.assoc.acceptor.ae_title or "").strip(),
                                  address=str(rq.address or ""))
                self._assocs[id(event.assoc)] = st
            return st

    def _on_open(self, event) -> None:
        self._state(event)

    def _on_accepted(self, event) -> None:
        st = self._state(event)
        st.calling = (event.assoc.requestor.ae_title or "").strip()
        st.accepted = True
        st.refused_contexts = [str(cx.abstract_syntax) for cx in event.assoc.rejected_contexts][:20]

    def _on_rejected(self, event) -> None:
        st = self._state(event)
        st.calling = (event.assoc.requestor.ae_title or "").strip()

    def _on_echo(self, event) -> int:
        return 0x0000

    def _on_store(self, event) -> int:
        st = self._state(event)
        if st.calling not in self.allowed:
            return self._refuse(st, REFUSED_AE, "calling AE title not allowed")
        sop_class = str(event.request.AffectedSOPClassUID or "")
        try:
            ds = event.dataset
            has_pixels = any(k in ds for k in PIXEL_KEYWORDS)
            own_class = str(ds.get("SOPClassUID", "") or "")
        except Exception as exc:  # noqa: BLE001 - a dataset pydicom cannot decode
            return self._refuse(st, 0xC000, f"the dataset cannot be decoded ({exc.__class__.__name__})")
        if own_class and own_class != sop_class:
            return self._refuse(st, MISMATCH, f"SOP Class UID {own_class} but sent as {sop_class}")
        if not has_pixels:
            return self._refuse(st, NOT_AN_IMAGE, f"SOP class {sop_class} carries no image to analyse")
        try:
            data = event.encoded_dataset()
            filed = receiving.receive(self.sessions, self.files, data, f"AE {st.calling}", self.rules,
                                      self.settings.max_upload_mb * 1024 * 1024,
                                      readers=self.settings.integration_readers)
        except Exception:  # noqa: BLE001 - database or disk: the sender keeps the image and retries
            log.exception("C-STORE from %s could not be filed", st.calling)
            return self._refuse(st, OUT_OF_RESOURCES, "the database or the image store failed")
        if filed.patient_id:
            st.patients.add(filed.patient_id)
        if filed.refused:
            return self._refuse(st, STATUS[filed.kind], filed.message)
        if filed.case_id:
            st.cases.add(filed.case_id)
        st.stored += filed.kind == "filed"
        if filed.kind == "filed":
            try:  # the image is filed: nothing after this may answer the sender that it failed
                if self.on_filed is not None:
                    self.on_filed()
                if self.thumbnails is not None:
                    self.thumbnails.add(filed.sha256)
            except Exception:  # noqa: BLE001 - the pools poll, the analysis writes the thumbnail
                log.exception("after filing an image from %s", st.calling)
        st.inbox += filed.kind == "inbox"
        st.duplicates += filed.kind == "duplicate"
        return 0x0000

    def _refuse(self, st: _Association, status: int, why: str) -> int:
        st.refusals.append(f"0x{status:04X} {why}"[:200])
        return status

    def _on_close(self, event) -> None:
        with self._lock:
            st = self._assocs.pop(id(event.assoc), None)
        if st is None:
            return
        kept = st.stored or st.inbox or st.duplicates
        outcome = ("denied" if not st.accepted
                   else "rejected" if (st.refusals or st.refused_contexts) and not kept else "success")
        self.audit.record_or_log(actor=f"AE {st.calling or '?'}", channel="dicom", action="dicom.association",
                                 outcome=outcome, ip=st.address, path=f"AE {st.called}",
                                 patient_id=next(iter(st.patients)) if len(st.patients) == 1 else None,
                                 details={"called_ae": st.called, "calling_ae": st.calling, "accepted": st.accepted,
                                          "stored": st.stored, "inbox": st.inbox, "duplicates": st.duplicates,
                                          "refused": st.refusals[:50], "refused_contexts": st.refused_contexts,
                                          "cases": sorted(st.cases)[:100], "patients": sorted(st.patients)[:100]})


_QUICKACK_LOCK = threading.Lock()


def _acknowledge_at_once() -> None:
    """Acknowledge every TCP segment at once (Linux TCP_QUICKACK, re-armed after each read, as the kernel
    drops it). Senders leave Nagle's algorithm on (DCMTK in Orthanc, pynetdicom): the last segment of
    each instance then waits for our delayed ACK, 40 ms, which made every C-STORE take 45 ms instead of
    4 ms (measured with Orthanc sending 512x512 MR slices). Installed once in the process."""
    import socket

    from pynetdicom import transport

    quickack = getattr(socket, "TCP_QUICKACK", None)
    with _QUICKACK_LOCK:
        if quickack is None or getattr(transport.AssociationSocket.recv, "_oncoscope", False):
            return
        plain = transport.AssociationSocket.recv

        def recv(self, nr_bytes: int) -> bytearray:
            data = plain(self, nr_bytes)
            try:
                self.socket.setsockopt(socket.IPPROTO_TCP, quickack, 1)
            except (OSError, AttributeError):  # closed meanwhile, or not a TCP socket
                pass
            return data

        recv._oncoscope = True
        transport.AssociationSocket.recv = recv


def _transfer_syntaxes() -> list[str]:
    """Uncompressed and the compressed syntaxes the image reader decodes (pydicom with its plugins)."""
    from pydicom.uid import AllTransferSyntaxes

    return list(AllTransferSyntaxes)
