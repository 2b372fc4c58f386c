"""``oncoscope serve|worker``: run the instance.

Both check the schema first (:func:`ready_schema`). ``serve`` creates it in a brand-new, empty
database, as ``make run`` does; a database behind this version is refused with the command that
upgrades it (a migration of a live clinical database is a deliberate step, after a backup); one
ahead of it (a newer oncoscope migrated it) or with tables but no revision is refused outright."""

from __future__ import annotations

import logging

import click

from ..config import Settings
from ..services.jobs import run_worker
from ..store import migrate
from ..web.serving import serve as run_server

NO_SCHEMA = "the database has no schema yet: run `oncoscope db upgrade` first"


def ready_schema(url: str, *, create: bool) -> None:
    """Return when the database is at this version's schema (creating it when empty and ``create``);
    otherwise stop with what to do."""
    s = migrate.schema_state(url)
    if s.state == migrate.CURRENT:
        return
    if s.state == migrate.EMPTY:
        if not create:
            raise click.ClickException(NO_SCHEMA)
        migrate.upgrade(url, "head")
        click.echo(f"the database was empty: created the schema (revision {migrate.current(url)})")
        return
    if s.state == migrate.BEHIND:
        raise click.ClickException(
            f"the database schema is at revision {s.revision}, older than this version's {s.head}: back it up "
            "(`oncoscope backup FILE.tar.gz`), then run `oncoscope db upgrade`")
    if s.state == migrate.AHEAD:
        raise click.ClickException(
            f"the database schema is at revision {s.revision}, which this version of oncoscope does not know (a "
            f"newer version migrated it; this one's newest is {s.head}): run that newer version, or restore a backup "
            "made with this one")
    raise click.ClickException(
        "the database has oncoscope tables but no schema revision (they were not made by `oncoscope db upgrade`): "
        "point DATABASE_URL at an empty database, or restore a backup into one")


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--threads", default=8, show_default=True, type=int)
@click.option("--processes", default=None, type=int,
              help="Server processes sharing the port (default: ONCOSCOPE_WEB_PROCESSES, else 2 on a machine "
                   "with 2 or more cores). Python runs one thread at a time per process.")
def serve(host, port, threads, processes):
    """Serve the web application with waitress (a production WSGI server)."""
    st = Settings.from_env().prepare()
    ready_schema(st.database_url, create=True)
    if processes is None:
        processes = st.web_processes
    click.echo(f"oncoscope serving on http://{host}:{port}/ (instance {st.home}, {processes} process"
               f"{'es' if processes > 1 else ''} x {threads} threads)")
    run_server(st, host, port, threads, max(1, processes))


@click.command()
@click.option("--burst", is_flag=True, help="Exit when the queue is empty (for scripts and tests).")
@click.option("--reconcile-every", default=5.0, show_default=True,
              help="Seconds between reconciler rounds (stale leases re-queued, due retries and lost messages re-sent).")
def worker(burst, reconcile_every):
    """Run analyses from the Redis queue (scaled-out mode; needs ONCOSCOPE_QUEUE_URL)."""
    st = Settings.from_env().prepare()
    if not st.queue_url:
        raise click.ClickException("set ONCOSCOPE_QUEUE_URL (e.g. redis://127.0.0.1:6379/0); without it "
                                   "`oncoscope serve` runs the analyses itself and needs no worker")
    # a worker never creates the schema: `oncoscope serve` or `oncoscope db upgrade` does, once
    ready_schema(st.database_url, create=False)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    click.echo(f"oncoscope worker: queue {st.queue_url}, database {st.database_url.split('@')[-1]}, "
               f"images {st.images_dir}")
    run_worker(st, burst=burst, reconcile_every=reconcile_every)
