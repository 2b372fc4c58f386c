"""Command line: ``oncoscope serve|worker|db|dicom|lis|train|evaluate|predict|bench|data|users|backup|restore|public-key|audit``.

One module per family of commands: ``data`` (dataset audits and splits), ``models`` (train and
evaluate: torch), ``predict`` (the shipped ONNX models, no torch), ``server`` (serve, worker),
``db`` (migrations), ``accounts`` (users), ``records`` (backup, restore, public-key, audit).
``bench`` lives in ``oncoscope.bench.command``, named here by string like a plugin's entry point:
nothing in the product imports the benchmarks, and the product works without them.
"""

from __future__ import annotations

import click

from .lazy import LazyGroup

# name -> ("module:command", the first sentence of its help, which `oncoscope --help` lists).
# Lazy on purpose, the one place the CLI loads code on demand: `oncoscope serve` must not import
# torch or the training code (2 s and a few hundred MB before the first request), and
# `oncoscope --help` must stay fast (it imports no command module at all).
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("oncoscope.cli.data:data", "Dataset tooling: audits and split manifests."),
    "train": ("oncoscope.cli.models:train", "Train an analyzer's models from scratch and export them to ONNX."),
    "evaluate": ("oncoscope.cli.models:evaluate",
                 "Evaluate on the committed test split; write the model card, metrics and plots."),
    "predict": ("oncoscope.cli.predict:predict",
                "Analyse images (files or directories, recursively) without a database."),
    "bench": ("oncoscope.bench.command:bench",
              "Benchmark latency, memory and FLOPs against a Keras-style VGG16 + U-Net (or the web app with "
              "--web / --load)."),
    "serve": ("oncoscope.cli.server:serve", "Serve the web application with waitress (a production WSGI server)."),
    "worker": ("oncoscope.cli.server:worker",
               "Run analyses from the Redis queue (scaled-out mode; needs ONCOSCOPE_QUEUE_URL)."),
    "db": ("oncoscope.cli.db:db", "Database schema migrations (Alembic)."),
    "dicom": ("oncoscope.cli.integration:dicom", "DICOM: receive images from modalities and PACS (C-STORE SCP)."),
    "lis": ("oncoscope.cli.integration:lis", "LIS: receive laboratory orders (HL7 v2 OML^O33 / ORM^O01 over MLLP)."),
    "export-reviewed": ("oncoscope.cli.reviewed:export_reviewed_cmd",
                        "Verified cells of signed cases as a training dataset (no patient identifiers)."),
    "users": ("oncoscope.cli.accounts:users", "User accounts."),
    "public-key": ("oncoscope.cli.records:public_key",
                   "Print the public half of the instance's signing key (created on first use)."),
    "backup": ("oncoscope.cli.records:backup",
               "Back up the database and images into one .tar.gz archive signed with the instance's key."),
    "restore": ("oncoscope.cli.records:restore",
                "Restore a signed backup into an empty instance (the signature and every checksum are verified "
                "first)."),
    "audit": ("oncoscope.cli.records:audit",
              "The audit trail: verify the hash chain, sign checkpoints of it, export entries."),
}


@click.group(cls=LazyGroup, lazy_commands=COMMANDS)
@click.version_option(package_name="oncoscope")
def main() -> None:
    """Oncoscope: AI decision support for cancer screening in medical images."""
