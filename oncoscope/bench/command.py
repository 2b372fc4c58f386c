"""``oncoscope bench``: the benchmarks' command.

The product's command line names it only by the string ``"oncoscope.bench.command:bench"`` (see
oncoscope/cli/__init__.py), as a plugin's entry point would: nothing in the product imports the
benchmarks, a deployment without ``oncoscope/bench/`` simply has no ``bench`` command.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..training.recipes import DEFAULT_DATASETS, RECIPES
from ..training.recipes import data_root as recipe_data_root
from .model import run_bench


@click.command()
@click.option("--analyzer", "analyzer_id", default="smear-all", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--runs", default=100, show_default=True, help="Timed analyses.")
@click.option("--baseline-runs", default=5, show_default=True, help="Timed runs of each baseline model.")
@click.option("--no-baselines", is_flag=True, help="Skip the VGG16/U-Net comparison (needs torch).")
@click.option("--threads", default=2, show_default=True)
@click.option("--data", "data_root", default=None)
@click.option("--web", "web", is_flag=True, help="Web benchmark: 10k patients / 50k analyses, 8 concurrent uploads.")
@click.option("--dicom", "dicom", is_flag=True,
              help="DICOM receiver: 100 MR slices by C-STORE versus their analyses alone (--runs slices).")
@click.option("--patients", "n_patients", default=10_000, show_default=True, help="--web/--load: patients to seed.")
@click.option("--analyses", "n_analyses", default=50_000, show_default=True, help="--web/--load: analyses to seed.")
@click.option("--load", "load", is_flag=True,
              help="Load test: simulated doctors (browse, search, upload, review) against `oncoscope serve`.")
@click.option("--users", default=50, show_default=True, help="--load: concurrent simulated users.")
@click.option("--faults/--no-faults", default=True, show_default=True,
              help="--load: then kill a worker mid-queue (Redis + PostgreSQL) and stop PostgreSQL during uploads.")
@click.option("--redis-url", default="redis://127.0.0.1:6379/0", show_default=True, help="--load: the queue (--scaled, --faults).")
@click.option("--scaled", is_flag=True, help="--load: analyses through Redis to separate `oncoscope worker` processes.")
@click.option("--duration", default=120.0, show_default=True, help="--load: seconds of load.")
@click.option("--database-url", default=None, help="--load: database (default: SQLite in a fresh instance; "
              "PostgreSQL gets its own scratch database, dropped afterwards).")
def bench(analyzer_id, as_json, runs, baseline_runs, no_baselines, threads, data_root, web, dicom, n_patients,
          n_analyses, load, users, faults, redis_url, scaled, duration, database_url):
    """Benchmark latency, memory and FLOPs against a Keras-style VGG16 + U-Net (or the web app with --web / --load)."""
    # The web and load benchmarks are imported only when asked for: they bring the web stack (Flask,
    # SQLAlchemy, waitress), which would otherwise count in the model benchmark's own peak memory figure.
    if load:
        from .faults import format_faults, run_faults
        from .load import format_report, run_load

        say = None if as_json else (lambda m: click.echo(m, err=True))
        out = run_load(users=users, duration_s=duration, database_url=database_url, patients=n_patients,
                       analyses=n_analyses, progress=say, queue_url=redis_url if scaled else None)
        text = format_report(out)
        if faults:
            out["faults"] = run_faults(database_url, redis_url, progress=say)
            text += "\n" + format_faults(out["faults"])
        click.echo(json.dumps(out) if as_json else text)
        return
    if dicom:
        from .dicom import run_dicom_bench  # (the receiver and the worker pool: only when asked for)

        out = run_dicom_bench(n=runs, workers=threads, repeats=3)
        click.echo(json.dumps(out) if as_json else json.dumps(out, indent=1))
        return
    if web:
        from .web import run_web_bench  # the web stack only when asked for (see above)

        out = run_web_bench(n_patients, n_analyses, images=_bench_images(data_root))
        click.echo(json.dumps(out) if as_json else json.dumps(out, indent=1))
        return
    if analyzer_id == "smear-differential":  # reads several datasets: the folder that holds them
        root = Path(data_root) if data_root else DEFAULT_DATASETS
    else:
        root = recipe_data_root(analyzer_id, data_root) if analyzer_id in RECIPES else None
    out = run_bench(analyzer_id, runs=runs, baseline_runs=baseline_runs, data_root=root, threads=threads,
                    include_baselines=not no_baselines)
    if as_json:
        click.echo(json.dumps(out))
    else:
        click.echo(json.dumps(out, indent=1))


def _bench_images(data_root) -> list[bytes] | None:
    """Real test-split smears for the upload benchmark when the dataset is present."""
    root = Path(data_root) if data_root else DEFAULT_DATASETS / "all-taleqani"
    files = sorted((root / "Original").rglob("*.jpg"))[::300][:8] if (root / "Original").is_dir() else []
    return [f.read_bytes() for f in files] or None
