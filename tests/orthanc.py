"""A private Orthanc (Debian's ``orthanc`` and ``orthanc-dicomweb``) for the integration tests: its own
configuration, storage and free ports in a temporary folder, HTTP Basic authentication, started and
stopped by the test. Tests skip, saying why, where the packages are not installed (``make test``
installs them as root)."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "oncoscope", "orthanc-test-pass"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_orthanc() -> str:
    exe = shutil.which("Orthanc")
    if exe is None or not PLUGIN.exists():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (Debian packages orthanc and "
                    "orthanc-dicomweb; `make test` installs them when run as root)")
    return exe


class Orthanc:
    def __init__(self, folder: Path, aet: str = "ORTHANC"):
        self.folder, self.aet = Path(folder), aet
        self.http_port, self.dicom_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> "Orthanc":
        exe = require_orthanc()
        (self.folder / "db").mkdir(parents=True, exist_ok=True)
        cfg = {"Name": "oncoscope-test", "StorageDirectory": str(self.folder / "db"),
               "IndexDirectory": str(self.folder / "db"), "DicomAet": self.aet, "DicomPort": self.dicom_port,
               "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
               "RegisteredUsers": {USER: PASSWORD}, "Plugins": [str(PLUGIN)],
               "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full"},
               "DicomModalities": {}, "DicomScpTimeout": 10, "ConcurrentJobs": 2, "StableAge": 1}
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(cfg))
        self.log = open(self.folder / "orthanc.log", "wb")
        self.proc = subprocess.Popen([exe, str(path)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError):
                if self.proc.poll() is not None:
                    break
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not start: {(self.folder / 'orthanc.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
            self.log.close()

    def request(self, method: str, path: str, body: bytes | None = None, ctype: str = "application/json",
                accept: str | None = None):
        req = urllib.request.Request(self.url + path, data=body, method=method)
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
        if body is not None:
            req.add_header("Content-Type", ctype)
        if accept:
            req.add_header("Accept", accept)
        with urllib.request.urlopen(req, timeout=60) as r:
            data = r.read()
            return json.loads(data) if r.headers.get_content_type() == "application/json" and data else data

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, payload) -> object:
        return self.request("POST", path, json.dumps(payload).encode())

    def upload(self, data: bytes) -> dict:
        return self.request("POST", "/instances", data, "application/dicom")

    def add_peer(self, name: str, aet: str, port: int, host: str = "127.0.0.1") -> None:
        self.request("PUT", f"/modalities/{name}", json.dumps({"AET": aet, "Host": host, "Port": port}).encode())
