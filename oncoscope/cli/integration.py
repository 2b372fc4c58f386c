"""``oncoscope dicom listen`` (the DICOM receiver) and ``oncoscope lis listen`` (LIS orders over MLLP):
the hospital's systems sending to oncoscope. Both run until stopped (Ctrl-C, SIGTERM)."""

from __future__ import annotations

import logging

import click

from ..analyzers import routing
from ..config import Settings
from ..services.dicom_receiver import Receiver
from ..services.jobs import WorkerPool, job_notifier
from ..services.lis import LisListener
from ..store import patients as patient_store
from ..store.db import make_engine, make_session_factory
from ..store.files import FileStore
from .server import ready_schema


def _instance():
    st = Settings.from_env().prepare()
    ready_schema(st.database_url, create=False)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sessions = make_session_factory(make_engine(st.database_url))
    _say_who_reads(st, sessions)
    return st, sessions, FileStore(st.images_dir)


def _say_who_reads(st, sessions) -> None:
    """Warn when the patients this listener creates would reach nobody but the administrators."""
    if not st.integration_readers:
        click.echo("WARNING: ONCOSCOPE_INTEGRATION_READERS is empty: patients created from what arrives are seen "
                   "only by administrators until they assign staff on the patient page", err=True)
        return
    with sessions() as s:
        missing = patient_store.unmatched_readers(s, st.integration_readers)
    if missing:
        click.echo(f"WARNING: ONCOSCOPE_INTEGRATION_READERS names no active staff account for: {', '.join(missing)}",
                   err=True)


@click.group()
def dicom() -> None:
    """DICOM: receive images from modalities and PACS (C-STORE SCP)."""


@dicom.command("listen")
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=None, type=int, help="Default: ONCOSCOPE_DICOM_PORT (11112).")
@click.option("--ae-title", default=None, help="Default: ONCOSCOPE_DICOM_AE_TITLE (ONCOSCOPE).")
@click.option("--workers", default=0, show_default=True, type=int,
              help="Also run this many analysis threads here (0: `oncoscope serve` or `oncoscope worker` runs "
                   "the analyses the receiver queues).")
def listen(host, port, ae_title, workers):
    """Receive DICOM images (C-STORE, C-ECHO) from the AE titles in ONCOSCOPE_DICOM_ALLOWED_AETS."""
    st, sessions, files = _instance()
    try:
        routing.table(st.dicom_routes)
    except routing.RouteError as exc:
        raise click.ClickException(str(exc)) from None
    if not st.dicom_allowed_aets:
        click.echo("WARNING: ONCOSCOPE_DICOM_ALLOWED_AETS is empty: every association will be refused", err=True)
    pool = None
    if workers > 0:
        pool = WorkerPool(sessions, files, workers, st.job_max_attempts, st.job_lease_seconds, wake_dir=st.wake_dir)
        pool.start()
    receiver = Receiver(st, sessions, files, host=host, port=port, ae_title=ae_title,
                        on_filed=pool.notify if pool is not None else job_notifier(st, sessions),
                        thumbnails=pool is None)
    click.echo(f"oncoscope DICOM receiver {receiver.ae_title} on {host}:{receiver.port}; allowed calling AE "
               f"titles: {', '.join(st.dicom_allowed_aets) or '(none)'}")
    try:
        receiver.serve()
    except KeyboardInterrupt:
        pass
    finally:
        if pool is not None:
            pool.shutdown()


@click.group()
def lis() -> None:
    """LIS: receive laboratory orders (HL7 v2 OML^O33 / ORM^O01 over MLLP)."""


@lis.command("listen")
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=None, type=int, help="Default: ONCOSCOPE_LIS_PORT (2575).")
def lis_listen(host, port):
    """Place (and cancel) orders sent by the LIS; each message is answered with an ACK and audited."""
    st, sessions, _files = _instance()
    server = LisListener(st, sessions, host=host, port=port)
    click.echo(f"oncoscope LIS order listener on {host}:{server.port} (MLLP)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
