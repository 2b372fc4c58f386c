"""``oncoscope data audit|split``: dataset audits and group-aware split manifests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..training.data import audit, load_manifest, make_split, save_manifest, split_leaks
from ..training.near_duplicates import DEFAULT_MIN_CORRELATION
from ..training.recipes import RECIPES, recipe_split


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
@click.option("--min-correlation", default=DEFAULT_MIN_CORRELATION, show_default=True,
              help="Near duplicates: correlation of equalised thumbnails under flips, rotations and crops.")
@click.option("--manifest", "manifest_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Also report which of this split manifest's copies straddle train, val and test.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def data_audit(directory, subdir, min_correlation, manifest_path, as_json):
    """Report class counts, sizes, corrupt files, exact and near duplicates (flipped, rotated,
    cropped and contrast-changed copies included)."""
    rep = audit(directory, _default_subdir(directory, subdir), min_correlation=min_correlation,
                progress=sys.stderr.isatty())
    if manifest_path:
        manifest = load_manifest(manifest_path)
        # a split over several datasets names its files from the folder that holds them
        root = Path(directory).parent if manifest["params"].get("sources") else directory
        rep.extra["split_leaks"] = split_leaks(manifest, root, min_correlation)
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
@click.option("--min-correlation", default=DEFAULT_MIN_CORRELATION, show_default=True)
@click.option("--seed", default=0, show_default=True)
def data_split(directory, out_path, subdir, name, val_frac, test_frac, run_length, group_regex, min_correlation, seed):
    """Write a group- and block-aware train/val/test split manifest."""
    m = make_split(directory, _default_subdir(directory, subdir), val_frac=val_frac, test_frac=test_frac,
                   run_length=run_length, min_correlation=min_correlation, seed=seed, dataset_name=name,
                   group_regex=group_regex)
    save_manifest(m, out_path)
    click.echo(json.dumps(m["counts"]))


@data.command("resplit")
@click.option("--analyzer", "analyzer_id", required=True, help="Analyzer whose recipe names the split rules.")
@click.option("--datasets", default=None, type=click.Path(exists=True, file_okay=False),
              help="Folder holding the datasets (default: ../shared/datasets or ONCOSCOPE_DATASETS).")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Manifest to write (default: the recipe's committed manifest).")
def data_resplit(analyzer_id, datasets, out_path):
    """Rewrite an analyzer's split manifest from its recipe (sources, grouping, thresholds)."""
    if analyzer_id not in RECIPES:
        raise click.ClickException(f"no recipe for {analyzer_id!r}; known: {', '.join(RECIPES)}")
    m = recipe_split(analyzer_id, datasets)
    save_manifest(m, out_path or RECIPES[analyzer_id]["manifest"])
    click.echo(json.dumps({"counts": m["counts"], "sources": m["sources"]}))
