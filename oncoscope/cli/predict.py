"""``oncoscope predict``: analyse image files with the shipped models, without a database.

The contract is one record per input, whatever happens (:func:`predict_record`): a line of text,
a JSON Lines object (``--json``) or a CSV row (``--csv``, resumable)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import click
from tqdm import tqdm

from ..analyzers import registry
from ..analyzers.config import AnalyzerConfigError
from ..imaging.imageio import IMAGE_EXTENSIONS


def _expand(paths: tuple[str, ...]):
    """Yield files: directories recursively (image extensions only), files as given."""
    for p in paths:
        path = Path(p)
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    yield str(f)
        else:
            yield p


def predict_record(analyzer, path: str) -> dict:
    """One output record of the predict contract; never raises."""
    try:
        res = analyzer.analyze(path)
        d = res.to_dict()
    except Exception as exc:  # noqa: BLE001 - the contract is one line per input, whatever happens
        d = {"status": "error", "error": f"internal error: {exc.__class__.__name__}: {exc}", "label": None,
             "probabilities": {}, "cells": [], "cell_count": 0}
    rec = {"path": path, "label": d.get("label"), "probabilities": d.get("probabilities", {}), "status": d["status"],
           "cells": d.get("cells", []), "error": d.get("error")}
    rec.update({k: v for k, v in d.items() if k not in rec})
    return rec


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--analyzer", "analyzer_id", default="smear-all", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input, one per line (JSON Lines).")
@click.option("--model-dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Use models from this folder instead of the shipped ones.")
@click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False),
              help="Write one CSV row per image (research use). Resumable: paths already in the file are skipped.")
def predict(paths, analyzer_id, as_json, model_dir, csv_path):
    """Analyse images (files or directories, recursively) without a database."""
    try:
        an = registry.get(analyzer_id, Path(model_dir) if model_dir else None)
    except (KeyError, FileNotFoundError, AnalyzerConfigError) as exc:  # unknown id, no or a broken model folder
        raise click.ClickException(str(exc)) from None
    if csv_path:
        _predict_csv(an, list(_expand(paths)), Path(csv_path))
        return
    for path in _expand(paths):
        rec = predict_record(an, path)
        if as_json:
            click.echo(json.dumps(rec))
        else:
            if rec["status"] == "error":
                click.echo(f"{path}: ERROR {rec['error']}")
            else:
                probs = ", ".join(f"{k} {v:.3f}" for k, v in rec["probabilities"].items())
                cells = f"; {rec['cell_count']} cells" if rec.get("cell_count") is not None else ""
                click.echo(f"{path}: {rec['label']} [{rec['status']}] {probs}{cells}")


def _predict_csv(an, files: list[str], out: Path) -> None:
    cols = (["path", "status", "label", "confidence", "malignant", "malignant_probability", "cell_count", "ood_score"]
            + [f"p_{l}" for l in an.call_labels] + ["model_version", "model_sha256", "error"])
    done: set[str] = set()
    if out.exists() and out.stat().st_size:
        with open(out, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames != cols:
                raise click.ClickException(f"{out} has different columns (another analyzer?); use a new file")
            done = {row["path"] for row in reader}
    todo = [f for f in files if f not in done]
    new_file = not out.exists() or out.stat().st_size == 0
    with open(out, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        if new_file:
            w.writeheader()
        for path in tqdm(todo, desc="analysing", unit="img", disable=not sys.stderr.isatty()):
            rec = predict_record(an, path)
            row = {k: rec.get(k) for k in cols if not k.startswith("p_")}
            row.update({f"p_{l}": rec["probabilities"].get(l) for l in an.call_labels})
            row["model_version"] = (rec.get("model") or {}).get("version")
            row["model_sha256"] = (rec.get("model") or {}).get("sha256")
            w.writerow(row)
            fh.flush()  # a crash loses at most the image in progress
    click.echo(f"{len(todo)} analysed, {len(files) - len(todo)} already in {out}", err=True)
