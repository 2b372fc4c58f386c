"""``oncoscope export-reviewed DIR``: verified cells of signed cases as a training dataset."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import Settings
from ..services.reviewed import export_reviewed
from ..store.db import standalone_session
from ..store.files import FileStore


@click.command("export-reviewed")
@click.argument("out_dir", type=click.Path(file_okay=False))
def export_reviewed_cmd(out_dir):
    """Verified cells of signed cases as a training dataset (no patient identifiers).

    Writes OUT_DIR/labels.csv and OUT_DIR/cells/: crops at the training scale with the class as signed, the AI
    class and the model version; `train --analyzer smear-differential` reads it as `oncoscope-reviewed`."""
    st = Settings.from_env()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise click.ClickException(f"{out} is not empty: export into a new folder")
    with standalone_session(st.database_url) as s:
        got = export_reviewed(s, FileStore(st.images_dir), out)
    click.echo(f"{got.cells} verified cells of {got.cases} signed cases written to {out}"
               + (f"; {got.skipped_unidentified} left unidentified and {got.skipped_unscaled} on images without a "
                  "measured scale were not exported" if got.skipped_unidentified or got.skipped_unscaled else ""))
