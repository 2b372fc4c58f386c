"""The DICOMweb client's transport without a PACS product: Bearer and Basic headers, TLS verified
against a given CA (a self-signed server is refused without it), multipart answers parsed by their
boundary, and a UID that is not one never reaches a URL."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from oncoscope.services import dicomweb

STUDY = [{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "00100020": {"vr": "LO", "Value": ["MRN-1"]},
          "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
          "00080061": {"vr": "CS", "Value": ["MR", "SR"]}, "00201208": {"vr": "IS", "Value": ["12"]}}]


class _Pacs(http.server.BaseHTTPRequestHandler):
    seen: list = []
    big: str = ""  # an instance answered with 200 KB (a size limit's test)

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).seen.append((self.path, self.headers.get("Authorization"), self.headers.get("Accept")))
        if self.headers.get("Authorization") not in ("Bearer t0ken", "Basic dXNlcjpwdw=="):
            self.send_response(401)
            self.end_headers()
            return
        if "/instances/" in self.path:  # one instance (WADO-RS)
            sop = self.path.rsplit("/", 1)[1].encode()
            payload = sop + (b"\0" * 200_000 if sop.decode() == type(self).big else b"")
            body = b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n" + payload + b"\r\n--XyZ--\r\n"
            self.send_response(200)
            self.send_header("Content-Type", 'multipart/related; type="application/dicom"; boundary=XyZ')
        elif "/instances?" in self.path:  # the series' instances (QIDO-RS)
            body = json.dumps([{"00080018": {"vr": "UI", "Value": [u]}} for u in ("1.1", "1.2")]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
        else:
            body = json.dumps(STUDY).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def _certificate(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return tmp_path / "cert.pem", tmp_path / "key.pem"


@pytest.fixture()
def https_pacs(tmp_path):
    cert, key = _certificate(tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Pacs)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Pacs.seen = []
    yield f"https://localhost:{server.server_address[1]}/dicom-web", cert
    server.shutdown()


def test_bearer_over_verified_tls_and_the_answers_parsed(https_pacs):
    url, ca = https_pacs
    pacs = dicomweb.Client(url, token="t0ken", ca_file=ca, timeout=5)
    (st,) = pacs.studies(patient_id="MRN-1")
    assert (st.study_uid, st.patient_name, st.modalities, st.instance_count) == ("1.2.3", "Doe^Jane", ["MR", "SR"], 12)
    assert list(pacs.retrieve_series("1.2.3", "1.2.3.4")) == [b"1.1", b"1.2"]  # one request per instance
    path, auth, accept = _Pacs.seen[0]
    assert path.startswith("/dicom-web/studies?") and "PatientID=MRN-1" in path and auth == "Bearer t0ken"
    assert accept == "application/dicom+json"
    basic = dicomweb.Client(url, user="user", password="pw", ca_file=ca, timeout=5)
    assert basic.studies() and _Pacs.seen[-1][1] == "Basic dXNlcjpwdw=="


def test_an_instance_over_the_size_limit_is_skipped_and_named_the_rest_still_come(https_pacs):
    url, ca = https_pacs
    pacs = dicomweb.Client(url, token="t0ken", ca_file=ca, timeout=5)
    _Pacs.big = "1.1"
    try:
        skipped: list[str] = []
        assert list(pacs.retrieve_series("1.2.3", "1.2.3.4", max_bytes=100_000, skipped=skipped)) == [b"1.2"]
        assert len(skipped) == 1 and skipped[0].startswith("Instance 1.1: The PACS answer is larger than")
        with pytest.raises(dicomweb.TooLarge):  # (no list to name it in: the series stops)
            list(pacs.retrieve_series("1.2.3", "1.2.3.4", max_bytes=100_000))
        assert len(list(pacs.retrieve_series("1.2.3", "1.2.3.4"))[0]) > 200_000  # no limit given: read
    finally:
        _Pacs.big = ""


def test_an_unknown_certificate_and_a_non_uid_are_refused(https_pacs):
    url, _ = https_pacs
    with pytest.raises(dicomweb.DicomWebError, match="TLS|cannot be reached"):
        dicomweb.Client(url, token="t0ken", timeout=5).studies()  # the system's CAs do not know it
    with pytest.raises(dicomweb.DicomWebError, match="not a DICOM UID"):
        list(dicomweb.Client(url, token="t0ken").retrieve_series("1.2/../../etc", "1"))
    with pytest.raises(dicomweb.DicomWebError, match="http:// or https://"):
        dicomweb.Client("file:///etc/passwd")
