"""``oncoscope train|evaluate``: offline model work (torch for training; the test split for cards).

Kept apart from ``predict`` (cli/predict.py), which runs the shipped ONNX models without torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..evaluation.classifier import evaluate_classifier
from ..evaluation.differential import evaluate_differential
from ..evaluation.differential import write_card as write_differential_card
from ..evaluation.smear import evaluate_smear
from ..training import differential, pipeline
from ..training.cells import SOURCES
from ..training.recipes import DEFAULT_DATASETS, RECIPES
from ..training.recipes import data_root as recipe_data_root
from ..training.recipes import model_dir as default_model_dir


@click.command()
@click.option("--analyzer", "analyzer_id", default="smear-all", show_default=True)
@click.option("--data", "data_root", default=None, help="Dataset folder (default: ../shared/datasets/<dataset>).")
@click.option("--stage", type=click.Choice(["all", "crops", "classifier", "calibrate", "segmenter", "export", "loso",
                                           "referral", "types"]),
              default="all", show_default=True,
              help="crops: smear-differential only; segmenter: smear-all only; loso: one model per source the "
                   "recipe leaves out; referral: the referral band fitted on those models' answers; types: where "
                   "the type of a positive call is suggested (recipes naming typed_sources).")
@click.option("--work", default="runs", show_default=True, help="Folder for checkpoints and logs.")
@click.option("--out", default=None, help="Model folder to write (default: the shipped oncoscope/models/<id>).")
@click.option("--epochs", default=None, type=int)
@click.option("--seed", default=0, show_default=True)
@click.option("--without", multiple=True,
              help="Leave this source out of training (leave-one-source-out runs): a dataset of smear-differential "
                   "or a source in the analyzer's split manifest (e.g. tcga-lgg-flair/DU).")
def train(analyzer_id, data_root, stage, work, out, epochs, seed, without):
    """Train an analyzer's models from scratch and export them to ONNX."""
    command = " ".join(["oncoscope", *sys.argv[1:]])
    if analyzer_id == differential.ANALYZER:
        datasets = Path(data_root) if data_root else DEFAULT_DATASETS
        if not datasets.is_dir():
            raise SystemExit(f"datasets not found at {datasets}; pass --data (the folder holding pbc, all-taleqani...)")
        if stage == "segmenter":
            raise SystemExit(f"analyzer {analyzer_id!r} has no segmenter (cells are found by ml/wbc.py)")
        unknown = set(without) - set(SOURCES)
        if unknown:
            raise SystemExit(f"unknown source {', '.join(sorted(unknown))}; known: {', '.join(sorted(SOURCES))}")
        out_dir = Path(out) if out else (None if without else default_model_dir(analyzer_id))
        differential.run(datasets, Path(work), out_dir, stage, epochs, seed, list(without), command)
        return
    if stage == "crops":
        raise SystemExit("--stage crops is for --analyzer smear-differential")
    pipeline.run_training(analyzer_id, data_root=data_root, stage=stage, work=work, out=out, epochs=epochs, seed=seed,
                          command=command, without=list(without))


@click.command()
@click.option("--analyzer", "analyzer_id", default="smear-all", show_default=True)
@click.option("--data", "data_root", default=None, help="Dataset folder (default: ../shared/datasets/<dataset>).")
@click.option("--model-dir", default=None, type=click.Path(file_okay=False),
              help="Model folder to evaluate and write the card into (default: the shipped one).")
@click.option("--bootstrap", default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the model card JSON.")
@click.option("--work", default="runs", show_default=True,
              help="The training folder: leave-one-source-out models (smear-differential: also the cell crops).")
def evaluate(analyzer_id, data_root, model_dir, bootstrap, as_json, work):
    """Evaluate on the committed test split; write the model card, metrics and plots."""
    if analyzer_id == differential.ANALYZER:
        datasets = Path(data_root) if data_root else DEFAULT_DATASETS
        out = Path(model_dir) if model_dir else default_model_dir(analyzer_id)
        card = evaluate_differential(out, datasets, Path(work), Path(work) / "cell-crops")
        write_differential_card(card, out)
        click.echo(json.dumps(card, indent=1) if as_json else f"model card written to {out / 'model_card.md'}")
        return
    if analyzer_id not in RECIPES:
        raise click.ClickException(f"no evaluation recipe for {analyzer_id!r}")
    root = recipe_data_root(analyzer_id, data_root)
    if not root.is_dir():
        raise click.ClickException(f"dataset not found at {root}; pass --data")
    out = Path(model_dir) if model_dir else default_model_dir(analyzer_id)
    if "segmented_subdir" in RECIPES[analyzer_id]:
        card = evaluate_smear(out, root, n_boot=bootstrap, progress=sys.stderr.isatty())
    else:
        card = evaluate_classifier(analyzer_id, out, root, n_boot=bootstrap, progress=sys.stderr.isatty(),
                                   work=Path(work))
    if as_json:
        click.echo(json.dumps(card, indent=1))
    else:
        for t in card["targets"]:
            click.echo(f"{'MET ' if t['met'] else 'MISS'} {t['target']}: {t['measured']} (goal {t['goal']})")
        click.echo(f"model card written to {out / 'model_card.md'}")
