"""``oncoscope bench --dicom``: does receiving a study over DICOM cost anything beyond its analyses?

Target (issue 17): a C-STORE of 100 MR slices of one study creates one case and all 100 analyses
within the time the analyses themselves take, +10%.

1. **Analyses alone**: the 100 slices are filed into a case first (untimed), then the worker pool
   (``--threads`` workers) is timed until every analysis is done.
2. **Received**: a fresh instance with the DICOM receiver and the same pool; timed from the start of
   the association (one C-STORE per slice, pynetdicom's SCU) until every analysis is done.
3. **A core for the receiver**: both of the above again with the pool held to all cores but one and
   the receiver (own process) and the sending modality on the last one, as on a machine whose
   analyses leave the receiver a core: how much receiving costs beyond its CPU, i.e. whether filing
   keeps pace with the analyses.

The slices are real brain MR images (the brain-mri dataset's test images, wrapped as MR DICOM with one
Study and Series UID) when ``../shared/datasets`` is present, else synthetic ones.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import func, select

from ..analyzers import registry
from ..config import Settings, datasets_dir
from ..services.dicom_receiver import Receiver
from ..services.jobs import WorkerPool
from ..store import cases as case_store
from ..store import migrate
from ..store import patients as patient_store
from ..store.db import make_engine, make_session_factory
from ..store.files import FileStore
from ..store.models import Analysis, Case

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def slices(n: int, root: Path | None = None) -> tuple[list[bytes], str]:
    """``n`` MR slices of one study as Part-10 bytes, and where their pixels came from."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    root = root or datasets_dir() / "brain-mri"
    files = sorted(root.rglob("Te-*.jpg"))[:n] if root.is_dir() else []
    source = f"{len(files)} brain-mri test images" if len(files) == n else "synthetic"
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        if source == "synthetic":
            yy, xx = np.mgrid[0:256, 0:256]
            grey = (128 + 100 * np.sin((xx + i) / 17.0) * np.cos(yy / 23.0)).clip(0, 255).astype(np.uint8)
        else:
            grey = np.asarray(Image.open(files[i]).convert("L"))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MR_STORAGE, generate_uid()
        meta.TransferSyntaxUID, meta.ImplementationClassUID = ExplicitVRLittleEndian, generate_uid()
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MR_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Mri", "MRN-BENCH-MR", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.AccessionNumber = study, series, ""
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.ReferringPhysicianName = "20261204", "120000", "1", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.BodyPartExamined = "MR", 1, i + 1, "BRAIN"
        ds.SeriesDescription = "T1 axial"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.Rows, ds.Columns = grey.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.ascontiguousarray(grey).tobytes()
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        out.append(buf.getvalue())
    return out, source


def _instance(home: Path, workers: int):
    st = Settings.from_env(home=home, database_url=f"sqlite:///{home / 'bench.db'}", analysis_workers=workers,
                           dicom_allowed_aets=("BENCHSCU",), dicom_port=0).prepare()
    migrate.upgrade(st.database_url)
    sessions = make_session_factory(make_engine(st.database_url))
    return st, sessions, FileStore(st.images_dir)


def _done(sessions) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(Analysis).where(Analysis.job_status.in_(("done", "failed"))))


def _wait(sessions, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _done(sessions) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {_done(sessions)} of {n} analyses finished in {timeout:.0f} s")
        time.sleep(0.02)


def pin_process(cpus: set[int]) -> None:
    """Every thread of this process (the pool's, ONNX Runtime's) onto ``cpus``; threads started later
    inherit it."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that ended meanwhile
            pass


def analyses_alone(data: list[bytes], workers: int, timeout: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        st, sessions, files = _instance(Path(tmp), workers)
        with sessions() as s:
            p = patient_store.match_or_create(s, "MRN-BENCH-MR", "Bench", "Mri")
            case = case_store.create_case(s, None, p, "brain-mri")
            out = case_store.add_images(s, files, case, None, [(f"{i}.dcm", d) for i, d in enumerate(data)], 10**9)
            case_store.commit_upload(s, files, out)
        pool = WorkerPool(sessions, files, workers, st.job_max_attempts)
        t0 = time.perf_counter()
        pool.start()  # (loads the analyzers first: warm them before timing, see run_dicom_bench)
        try:
            _wait(sessions, len(data), timeout)
            return time.perf_counter() - t0
        finally:
            pool.shutdown()


def send_folder(folder: str, port: int, calling: str = "BENCHSCU", called: str = "ONCOSCOPE") -> None:
    """The sending modality (run in its own process): C-STORE every file of ``folder`` in one association;
    prints the wall-clock start and the number of successes."""
    from pynetdicom import AE

    paths = sorted(Path(folder).glob("*.dcm"))
    ae = AE(ae_title=calling)
    ae.add_requested_context(MR_STORAGE, "1.2.840.10008.1.2.1")
    start = time.time()
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    ok = sum(int(assoc.send_c_store(p).Status) == 0 for p in paths)
    assoc.release()
    print(f"{start} {ok} {time.time() - start}")


def received(data: list[bytes], workers: int, timeout: float, separate: bool = False,
             receiver_cpus: set[int] | None = None) -> dict:
    """The modality in a process of its own; the receiver and the worker pool in this process
    (``oncoscope dicom listen --workers``), or (``separate``) the receiver in its own process
    (``oncoscope dicom listen``) and the pool in this one, as ``oncoscope serve`` runs it;
    ``receiver_cpus``: the receiver's and the modality's processes held to those cores."""
    import socket
    import subprocess
    import sys

    def pinned(proc):  # (just started: one thread, which the threads it starts inherit this from)
        if receiver_cpus:
            os.sched_setaffinity(proc.pid, receiver_cpus)
        return proc

    with tempfile.TemporaryDirectory() as tmp:
        st, sessions, files = _instance(Path(tmp), workers)
        folder = Path(tmp) / "study"
        folder.mkdir()
        for i, d in enumerate(data):
            (folder / f"{i:04d}.dcm").write_bytes(d)
        pool = WorkerPool(sessions, files, workers, st.job_max_attempts, wake_dir=st.wake_dir)  # as serve has it
        pool.start()
        listener, rx = None, None
        if separate:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            env = dict(os.environ, ONCOSCOPE_HOME=str(st.home), DATABASE_URL=st.database_url,
                       ONCOSCOPE_DICOM_ALLOWED_AETS="BENCHSCU")
            listener = pinned(subprocess.Popen([sys.executable, "-m", "oncoscope.cli", "dicom", "listen", "--host",
                                                "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))
            _wait_port(port, timeout)
        else:
            rx = Receiver(st, sessions, files, host="127.0.0.1", port=0, on_filed=pool.notify,
                          thumbnails=False)  # (as `dicom listen --workers`)
            rx.start()
            port = rx.port
        try:
            sender = pinned(subprocess.Popen([sys.executable, "-c", "import sys; from oncoscope.bench.dicom import "
                                              "send_folder; send_folder(sys.argv[1], int(sys.argv[2]))", str(folder),
                                              str(port)], stdout=subprocess.PIPE, text=True))
            printed, _ = sender.communicate(timeout=timeout)
            if sender.returncode != 0:
                raise RuntimeError(f"the sending modality failed (exit {sender.returncode})")
            out = printed.split()
            start, ok, sent = float(out[0]), int(out[1]), float(out[2])
            _wait(sessions, len(data), timeout)
            total = time.time() - start
        finally:
            if rx is not None:
                rx.stop()
            if listener is not None:
                listener.terminate()
                listener.wait(10)
            pool.shutdown()
        with sessions() as s:
            cases = s.scalar(select(func.count()).select_from(Case))
            done = s.scalar(select(func.count()).select_from(Analysis).where(Analysis.job_status == "done"))
        return {"total_s": total, "c_store_s": sent, "statuses_ok": ok, "cases": cases, "analyses_done": done}


def _wait_port(port: int, timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"the DICOM listener did not open port {port}")


def run_dicom_bench(n: int = 100, workers: int = 2, repeats: int = 2, timeout: float = 900) -> dict:
    registry.get("brain-mri")  # ONNX sessions loaded once, before anything is timed
    data, source = slices(n)
    cpus = sorted(os.sched_getaffinity(0))
    analyses_alone(data[:20], workers, timeout)  # warm-up, untimed: first-use costs would fall on one run
    alone, got, apart, alone_pinned, own_core = [], [], [], [], []
    for _ in range(repeats):  # interleaved, so drift on the machine hits every scenario the same
        alone.append(analyses_alone(data, workers, timeout))
        got.append(received(data, workers, timeout))
        apart.append(received(data, workers, timeout, separate=True))
        if len(cpus) > 1:
            pin_process(set(cpus[:-1]))
            try:
                alone_pinned.append(analyses_alone(data, workers, timeout))
                own_core.append(received(data, workers, timeout, separate=True, receiver_cpus={cpus[-1]}))
            finally:
                pin_process(set(cpus))
    out = {"slices": n, "source": source, "workers": workers, "repeats": repeats, "cpus": len(cpus),
           "analyses_alone_s": [round(x, 2) for x in alone], "target_ratio": 1.10}
    scenarios = [("in_process", got, alone), ("separate_receiver", apart, alone)]
    if own_core:
        out["analyses_alone_without_last_cpu_s"] = [round(x, 2) for x in alone_pinned]
        scenarios.append(("receiver_on_own_cpu", own_core, alone_pinned))
    for name, runs, base in scenarios:
        best = min(runs, key=lambda r: r["total_s"])
        out[name] = {"received_s": [round(r["total_s"], 2) for r in runs],
                     "c_store_s": [round(r["c_store_s"], 2) for r in runs],
                     "ratio_median": round(float(np.median([r["total_s"] for r in runs]) / np.median(base)), 3),
                     "cases": best["cases"], "analyses_done": best["analyses_done"], "statuses_ok": best["statuses_ok"]}
    return out
