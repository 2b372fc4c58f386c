"""Settings from the environment (one place for every configurable value; nothing else reads
``os.environ``). Reading them creates nothing: :meth:`Settings.prepare` makes the instance folder,
image store and secret key, as the explicit first step of whatever runs the instance.

* ``ONCOSCOPE_HOME``: instance folder (SQLite file, images, secret key); default ``./instance``.
* ``DATABASE_URL``: SQLAlchemy URL; default SQLite in the instance folder.
* ``ONCOSCOPE_SECRET_KEY``: optional; otherwise a key is generated once per instance and kept
  in ``<home>/secret_key`` (mode 0600). Weak or well-known keys are refused. Several web servers
  behind one load balancer must share it.
* ``ONCOSCOPE_IMAGES_DIR``: image store; default ``<home>/images``. Scaled out, a directory every
  web server and worker mounts (NFS, CephFS, ...).
* ``ONCOSCOPE_SIGNING_KEY``: the Ed25519 private key (PEM) that signs backups and audit
  checkpoints; default ``<home>/signing_key``, generated (mode 0600, with ``signing_key.pub``
  beside it) the first time something is signed. Never copy it to a backup host.
* ``ONCOSCOPE_TRUSTED_KEY``: the public key (PEM) that restores and ``oncoscope audit verify``
  accept signatures from; default the public half of this instance's own signing key. Set it on a
  new machine to the old instance's ``signing_key.pub``.
* ``ONCOSCOPE_TRUSTED_PROXIES``: how many reverse proxies stand in front of the web server
  (default 0). With 1 (the TLS proxy the deployment requires), the client address and scheme are
  taken from the last ``X-Forwarded-For`` / ``X-Forwarded-Proto`` entry that proxy added; with 0 those
  headers are ignored, so nobody can forge the address the audit trail records.
* ``ONCOSCOPE_IDEMPOTENCY_HOURS``: how long an API answer sent with an ``Idempotency-Key`` is kept for
  replays (default 24).
* ``ONCOSCOPE_SECURE_COOKIES``: ``1`` behind HTTPS (the session cookie gets the Secure flag); default 0.
* ``ONCOSCOPE_MAX_UPLOAD_MB`` (25, per image), ``ONCOSCOPE_SESSION_IDLE_MINUTES`` (30),
  ``ONCOSCOPE_LOGIN_MAX_FAILURES`` / ``ONCOSCOPE_LOGIN_LOCK_MINUTES`` (5 / 15), ``ONCOSCOPE_CLINIC_NAME``
  (report header), ``ONCOSCOPE_HL7_HOST`` / ``ONCOSCOPE_HL7_PORT`` (MLLP destination; unset: none).
* ``ONCOSCOPE_BLAST_FLAG_PCT`` (1.0): a differential with at least this many blasts per 100 white
  cells is flagged (highlighted in the gallery and the PDF, abnormal flag ``H`` in HL7); any blast in
  peripheral blood is abnormal, so the default is low.
* ``ONCOSCOPE_ANALYSIS_WORKERS`` (2): in-process analysis threads; ``ONCOSCOPE_WEB_PROCESSES``
  (min(2, cores)): ``oncoscope serve`` processes sharing the port.
* ``ONCOSCOPE_DATA``: the datasets folder for training, evaluation and the dataset tests; default
  ``../shared/datasets`` beside the repository (:func:`datasets_dir`).
* ``ONCOSCOPE_QUEUE_URL``: ``redis://host:6379/0`` switches analyses from the in-process worker pool
  to an RQ queue run by ``oncoscope worker`` processes. ``ONCOSCOPE_JOB_LEASE_SECONDS`` (default
  300): a job running longer is presumed to have lost its worker and is run again.
  ``ONCOSCOPE_JOB_TIMEOUT_SECONDS`` (default 120): a single analysis is stopped after this.
* Hospital integration. DICOM receiver (``oncoscope dicom listen``): ``ONCOSCOPE_DICOM_AE_TITLE``
  (ONCOSCOPE), ``ONCOSCOPE_DICOM_PORT`` (11112), ``ONCOSCOPE_DICOM_ALLOWED_AETS`` (comma-separated calling
  AE titles that may store; unset or empty refuses every association), ``ONCOSCOPE_DICOM_ROUTES`` (the
  routing table, see ``analyzers/routing.py``; unset: from the analyzers' configs). PACS over DICOMweb:
  ``ONCOSCOPE_DICOMWEB_URL`` (the base of QIDO-RS/WADO-RS/STOW-RS, e.g.
  ``https://pacs.example/dicom-web``; unset: no PACS), ``ONCOSCOPE_DICOMWEB_USER`` /
  ``ONCOSCOPE_DICOMWEB_PASSWORD`` (HTTP Basic) or ``ONCOSCOPE_DICOMWEB_TOKEN`` (Bearer),
  ``ONCOSCOPE_DICOMWEB_CA_FILE`` (the CA bundle that verifies an https PACS; default the system's),
  ``ONCOSCOPE_DICOMWEB_STORE_ON_FINAL`` (1: store the signed SR and SEG to the PACS when a report is
  final or corrected). LIS orders (``oncoscope lis listen``): ``ONCOSCOPE_LIS_PORT`` (2575),
  ``ONCOSCOPE_LIS_TESTS`` (``CODE=analyzer;...``: which analyzer an order's test code means; an analyzer's
  id is always understood), ``ONCOSCOPE_LIS_ALLOWED_HOSTS`` (comma-separated addresses that may send
  orders; unset or empty refuses every connection); results go back to ``ONCOSCOPE_HL7_HOST`` / ``ONCOSCOPE_HL7_PORT``. ``ONCOSCOPE_DELIVERY_MAX_ATTEMPTS`` (8): a
  result that could not be delivered is retried with growing pauses, then marked failed.
  ``ONCOSCOPE_INTEGRATION_READERS``: comma-separated e-mail addresses of the accounts given access to
  every patient that the DICOM receiver or a LIS order creates (unset: only administrators see such
  patients until they assign staff on the patient page).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

WEAK_KEYS = {"", "dev", "secret", "changeme", "change-me", "default", "development", "test", "password", "flask"}


class SettingsError(RuntimeError):
    pass


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None


def _path(name: str) -> Path | None:
    raw = os.environ.get(name)
    return Path(raw).resolve() if raw else None


def _secret_key(home: Path) -> str:
    """The key from the environment, else the instance's key file; "" when neither exists yet
    (:meth:`Settings.prepare` makes one)."""
    env = os.environ.get("ONCOSCOPE_SECRET_KEY")
    if env is not None:
        if env.strip().lower() in WEAK_KEYS or len(env) < 32:
            raise SettingsError("ONCOSCOPE_SECRET_KEY is too weak: use at least 32 random characters "
                                "(or unset it to let oncoscope generate one)")
        return env
    path = home / "secret_key"
    key = path.read_text().strip() if path.exists() else ""
    return key if len(key) >= 32 else ""


def _new_secret_key(home: Path) -> str:
    key = secrets.token_hex(32)
    fd = os.open(home / "secret_key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    return key


def datasets_dir() -> Path:
    """Where training, evaluation and the dataset tests find the datasets (``ONCOSCOPE_DATA``)."""
    return _path("ONCOSCOPE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "datasets"


@dataclass
class Settings:
    home: Path
    database_url: str
    secret_key: str = field(repr=False)
    max_upload_mb: int = 25
    session_idle_minutes: int = 30
    login_max_failures: int = 5
    login_lock_minutes: int = 15
    analysis_workers: int = 2
    job_max_attempts: int = 3
    clinic_name: str = "Oncoscope clinic"
    page_size: int = 25
    hl7_host: str = ""
    hl7_port: int = 0
    blast_flag_pct: float = 1.0
    queue_url: str = ""
    job_lease_seconds: int = 300
    job_timeout_seconds: int = 120
    images_path: Path | None = None
    signing_key_path: Path | None = None
    trusted_key_path: Path | None = None
    trusted_proxies: int = 0
    idempotency_hours: int = 24
    secure_cookies: bool = False
    web_processes: int = 2
    dicom_ae_title: str = "ONCOSCOPE"
    dicom_port: int = 11112
    dicom_allowed_aets: tuple[str, ...] = ()
    integration_readers: tuple[str, ...] = ()
    dicom_routes: str = ""
    dicomweb_url: str = ""
    dicomweb_user: str = ""
    dicomweb_password: str = field(default="", repr=False)
    dicomweb_token: str = field(default="", repr=False)
    dicomweb_ca_file: Path | None = None
    dicomweb_store_on_final: bool = True
    lis_port: int = 2575
    lis_tests: str = ""
    lis_allowed_hosts: tuple[str, ...] = ()
    delivery_max_attempts: int = 8

    @property
    def images_dir(self) -> Path:
        return self.images_path or self.home / "images"

    @property
    def signing_key_file(self) -> Path:
        """Created on first use by store/signing.py, not here: merely reading settings writes no key."""
        return self.signing_key_path or self.home / "signing_key"

    @property
    def audit_spool(self) -> Path:
        """Audit entries kept here while the database does not answer (see store/audit.py)."""
        return self.home / "audit-spool.jsonl"

    @property
    def wake_dir(self) -> Path:
        """Where this machine's worker pools listen for "new jobs" from processes that queue analyses
        without running them (services/jobs.wake_pools)."""
        return self.home / "run"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def prepare(self) -> "Settings":
        """Create the instance folder, the image store and the secret key (mode 0600) where missing:
        the explicit first step of anything that runs the instance (``create_app``, the commands that
        write). Reading settings (:meth:`from_env`) never writes anything."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        if not self.secret_key:
            self.secret_key = _new_secret_key(self.home)
        return self

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """Settings from the environment (and ``overrides``), validated; nothing is created."""
        home = Path(overrides.pop("home", None) or os.environ.get("ONCOSCOPE_HOME") or Path.cwd() / "instance").resolve()
        url = overrides.pop("database_url", None) or os.environ.get("DATABASE_URL") or f"sqlite:///{home / 'oncoscope.db'}"
        if url.startswith("postgres://"):
            url = "postgresql+psycopg://" + url[len("postgres://"):]
        elif url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://"):]
        elif url.startswith("mysql://") or url.startswith("mariadb://"):
            url = "mysql+pymysql://" + url.split("://", 1)[1]
        s = cls(
            home=home,
            database_url=url,
            secret_key=overrides.pop("secret_key", None) or _secret_key(home),
            max_upload_mb=_int("ONCOSCOPE_MAX_UPLOAD_MB", 25),
            session_idle_minutes=_int("ONCOSCOPE_SESSION_IDLE_MINUTES", 30),
            login_max_failures=_int("ONCOSCOPE_LOGIN_MAX_FAILURES", 5),
            login_lock_minutes=_int("ONCOSCOPE_LOGIN_LOCK_MINUTES", 15),
            analysis_workers=_int("ONCOSCOPE_ANALYSIS_WORKERS", 2),
            clinic_name=os.environ.get("ONCOSCOPE_CLINIC_NAME", "Oncoscope clinic"),
            hl7_host=os.environ.get("ONCOSCOPE_HL7_HOST", ""),
            hl7_port=_int("ONCOSCOPE_HL7_PORT", 0),
            blast_flag_pct=_float("ONCOSCOPE_BLAST_FLAG_PCT", 1.0),
            queue_url=os.environ.get("ONCOSCOPE_QUEUE_URL", ""),
            job_lease_seconds=_int("ONCOSCOPE_JOB_LEASE_SECONDS", 300),
            job_timeout_seconds=_int("ONCOSCOPE_JOB_TIMEOUT_SECONDS", 120),
            images_path=_path("ONCOSCOPE_IMAGES_DIR"),
            signing_key_path=_path("ONCOSCOPE_SIGNING_KEY"),
            trusted_key_path=_path("ONCOSCOPE_TRUSTED_KEY"),
            trusted_proxies=_int("ONCOSCOPE_TRUSTED_PROXIES", 0),
            idempotency_hours=_int("ONCOSCOPE_IDEMPOTENCY_HOURS", 24),
            secure_cookies=os.environ.get("ONCOSCOPE_SECURE_COOKIES", "0").lower() in ("1", "true", "yes"),
            web_processes=_int("ONCOSCOPE_WEB_PROCESSES", min(2, os.cpu_count() or 1)),
            dicom_ae_title=os.environ.get("ONCOSCOPE_DICOM_AE_TITLE", "ONCOSCOPE").strip(),
            dicom_port=_int("ONCOSCOPE_DICOM_PORT", 11112),
            dicom_allowed_aets=tuple(a.strip() for a in os.environ.get("ONCOSCOPE_DICOM_ALLOWED_AETS", "").split(",")
                                     if a.strip()),
            dicom_routes=os.environ.get("ONCOSCOPE_DICOM_ROUTES", ""),
            integration_readers=tuple(a.strip().lower() for a in os.environ.get("ONCOSCOPE_INTEGRATION_READERS", "")
                                      .split(",") if a.strip()),
            dicomweb_url=os.environ.get("ONCOSCOPE_DICOMWEB_URL", "").rstrip("/"),
            dicomweb_user=os.environ.get("ONCOSCOPE_DICOMWEB_USER", ""),
            dicomweb_password=os.environ.get("ONCOSCOPE_DICOMWEB_PASSWORD", ""),
            dicomweb_token=os.environ.get("ONCOSCOPE_DICOMWEB_TOKEN", ""),
            dicomweb_ca_file=_path("ONCOSCOPE_DICOMWEB_CA_FILE"),
            dicomweb_store_on_final=os.environ.get("ONCOSCOPE_DICOMWEB_STORE_ON_FINAL", "1").lower() in ("1", "true",
                                                                                                      "yes"),
            lis_port=_int("ONCOSCOPE_LIS_PORT", 2575),
            lis_tests=os.environ.get("ONCOSCOPE_LIS_TESTS", ""),
            lis_allowed_hosts=tuple(h.strip() for h in os.environ.get("ONCOSCOPE_LIS_ALLOWED_HOSTS", "").split(",")
                                    if h.strip()),
            delivery_max_attempts=_int("ONCOSCOPE_DELIVERY_MAX_ATTEMPTS", 8),
        )
        for k, v in overrides.items():
            if not hasattr(s, k):
                raise SettingsError(f"unknown setting {k!r}")
            setattr(s, k, v)
        if s.queue_url and not s.queue_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError("ONCOSCOPE_QUEUE_URL must be a Redis URL (redis://host:6379/0)")
        if not 0 <= s.trusted_proxies <= 5:
            raise SettingsError("ONCOSCOPE_TRUSTED_PROXIES must be between 0 and 5")
        if s.idempotency_hours < 1:
            raise SettingsError("ONCOSCOPE_IDEMPOTENCY_HOURS must be at least 1")
        for title in (s.dicom_ae_title, *s.dicom_allowed_aets):
            if not 0 < len(title) <= 16 or "\\" in title or not title.isprintable():
                raise SettingsError(f"AE title {title!r}: 1 to 16 printable characters, no backslash "
                                    "(ONCOSCOPE_DICOM_AE_TITLE, ONCOSCOPE_DICOM_ALLOWED_AETS)")
        if s.dicomweb_url and not s.dicomweb_url.startswith(("http://", "https://")):
            raise SettingsError("ONCOSCOPE_DICOMWEB_URL must be an http:// or https:// URL")
        if s.job_timeout_seconds >= s.job_lease_seconds:
            raise SettingsError("ONCOSCOPE_JOB_LEASE_SECONDS must be longer than ONCOSCOPE_JOB_TIMEOUT_SECONDS")
        return s
