"""``oncoscope data audit|split``: dataset audits and group-aware split manifests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..training.data import audit, make_split, save_manifest


@click.group()
def data() -> None:
    """Dataset tooling: audits and split manifests."""


def _default_subdir(directory: str, subdir: str | None) -> str | None:
    """The datasets ship their class folders under ``Original/``; use it when present."""
    if subdir is None and (Path(directory) / "Original").is_dir():
        return "Original"
    return subdir


@data.command("audit")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--subdir", default=None, help="Sub-folder holding the class folders (e.g. Original).")
@click.option("--threshold", default=10, show_default=True, help="Near-duplicate perceptual-hash distance (bits).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def data_audit(directory, subdir, threshold, as_json):
    """Report class counts, sizes, corrupt files, exact and near duplicates."""
    rep = audit(directory, _default_subdir(directory, subdir), threshold=threshold, progress=sys.stderr.isatty())
    click.echo(json.dumps(rep.to_dict(), indent=1) if as_json else rep.to_text())


@data.command("split")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Manifest JSON to write.")
@click.option("--subdir", default=None)
@click.option("--name", default=None, help="Dataset name recorded in the manifest.")
@click.option("--val", "val_frac", default=0.15, show_default=True)
@click.option("--test", "test_frac", default=0.15, show_default=True)
@click.option("--run-length", default=30, show_default=True,
              help="Contiguous file numbers held out together (0: off).")
@click.option("--group-regex", default=None,
              help=r"Files whose names share this regex's first group stay together, e.g. '^(.*?)\.rf\.'.")
@click.option("--threshold", default=10, show_default=True)
@click.option("--seed", default=0, show_default=True)
def data_split(directory, out_path, subdir, name, val_frac, test_frac, run_length, group_regex, threshold, seed):
    """Write a group- and block-aware train/val/test split manifest."""
    m = make_split(directory, _default_subdir(directory, subdir), val_frac=val_frac, test_frac=test_frac,
                   run_length=run_length, threshold=threshold, seed=seed, dataset_name=name, group_regex=group_regex)
    save_manifest(m, out_path)
    click.echo(json.dumps(m["counts"]))
