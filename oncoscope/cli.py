"""Command line: ``oncoscope serve|train|evaluate|predict|bench|data|db|users|backup|restore``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click



@click.group()
@click.version_option(package_name="oncoscope")
def main() -> None:
    """Oncoscope: AI decision support for cancer screening in medical images."""


# ----------------------------------------------------------------------------- data
@main.group()
def data() -> None:
    """Dataset tooling: audits and split manifests."""


@data.command("audit")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--subdir", default=None, help="Sub-folder holding the class folders (e.g. Original).")
@click.option("--threshold", default=10, show_default=True, help="Near-duplicate perceptual-hash distance (bits).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def data_audit(directory, subdir, threshold, as_json):
    """Report class counts, sizes, corrupt files, exact and near duplicates."""
    from .training.data import audit

    if subdir is None and (Path(directory) / "Original").is_dir():
        subdir = "Original"
    rep = audit(directory, subdir, threshold=threshold, progress=sys.stderr.isatty())
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
    from .training.data import make_split, save_manifest

    if subdir is None and (Path(directory) / "Original").is_dir():
        subdir = "Original"
    m = make_split(directory, subdir, val_frac=val_frac, test_frac=test_frac, run_length=run_length,
                   threshold=threshold, seed=seed, dataset_name=name, group_regex=group_regex)
    save_manifest(m, out_path)
    click.echo(json.dumps(m["counts"]))


# ----------------------------------------------------------------------------- train
@main.command()
@click.option("--analyzer", "analyzer_id", default="smear-all", show_default=True)
@click.option("--data", "data_root", default=None, help="Dataset folder (default: ../shared/datasets/<dataset>).")
@click.option("--stage", type=click.Choice(["all", "classifier", "calibrate", "segmenter", "export"]), default="all",
              show_default=True)
@click.option("--work", default="runs", show_default=True, help="Folder for checkpoints and logs.")
@click.option("--out", default=None, help="Model folder to write (default: the shipped oncoscope/models/<id>).")
@click.option("--epochs", default=None, type=int)
@click.option("--seed", default=0, show_default=True)
def train(analyzer_id, data_root, stage, work, out, epochs, seed):
    """Train an analyzer's models from scratch and export them to ONNX."""
    from .training import pipeline

    pipeline.run_training(analyzer_id, data_root=data_root, stage=stage, work=work, out=out, epochs=epochs, seed=seed,
                          command=" ".join(["oncoscope", *sys.argv[1:]]))


# ----------------------------------------------------------------------------- predict
def _expand(paths: tuple[str, ...]):
    """Yield files: directories recursively (image extensions only), files as given."""
    from .imaging.imageio import IMAGE_EXTENSIONS

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


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--analyzer", "analyzer_id", default="smear-all", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input, one per line (JSON Lines).")
@click.option("--model-dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Use models from this folder instead of the shipped ones.")
@click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False),
              help="Write one CSV row per image (research use). Resumable: paths already in the file are skipped.")
def predict(paths, analyzer_id, as_json, model_dir, csv_path):
    """Analyse images (files or directories, recursively) without a database."""
    from .analyzers import registry

    try:
        an = registry.get(analyzer_id, Path(model_dir) if model_dir else None)
    except (KeyError, FileNotFoundError) as exc:
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
    import csv

    from tqdm import tqdm

    cols = (["path", "status", "label", "confidence", "malignant", "malignant_probability", "cell_count", "ood_score"]
            + [f"p_{l}" for l in an.labels] + ["model_version", "model_sha256", "error"])
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
            row.update({f"p_{l}": rec["probabilities"].get(l) for l in an.labels})
            row["model_version"] = (rec.get("model") or {}).get("version")
            row["model_sha256"] = (rec.get("model") or {}).get("sha256")
            w.writerow(row)
            fh.flush()  # a crash loses at most the image in progress
    click.echo(f"{len(todo)} analysed, {len(files) - len(todo)} already in {out}", err=True)


# ----------------------------------------------------------------------------- evaluate
@main.command()
@click.option("--analyzer", "analyzer_id", default="smear-all", show_default=True)
@click.option("--data", "data_root", default=None, help="Dataset folder (default: ../shared/datasets/<dataset>).")
@click.option("--model-dir", default=None, type=click.Path(file_okay=False),
              help="Model folder to evaluate and write the card into (default: the shipped one).")
@click.option("--bootstrap", default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the model card JSON.")
def evaluate(analyzer_id, data_root, model_dir, bootstrap, as_json):
    """Evaluate on the committed test split; write the model card, metrics and plots."""
    from .training.recipes import DEFAULT_DATASETS, RECIPES, model_dir as default_model_dir

    if analyzer_id not in RECIPES:
        raise click.ClickException(f"no evaluation recipe for {analyzer_id!r}")
    root = Path(data_root) if data_root else DEFAULT_DATASETS / RECIPES[analyzer_id]["dataset"]
    if not root.is_dir():
        raise click.ClickException(f"dataset not found at {root}; pass --data")
    out = Path(model_dir) if model_dir else default_model_dir(analyzer_id)
    if "segmented_subdir" in RECIPES[analyzer_id]:
        from .evaluation.smear import evaluate_smear

        card = evaluate_smear(out, root, n_boot=bootstrap, progress=sys.stderr.isatty())
    else:
        from .evaluation.classifier import evaluate_classifier

        card = evaluate_classifier(analyzer_id, out, root, n_boot=bootstrap, progress=sys.stderr.isatty())
    if as_json:
        click.echo(json.dumps(card, indent=1))
    else:
        for t in card["targets"]:
            click.echo(f"{'MET ' if t['met'] else 'MISS'} {t['target']}: {t['measured']} (goal {t['goal']})")
        click.echo(f"model card written to {out / 'model_card.md'}")


# ----------------------------------------------------------------------------- bench
@main.command()
@click.option("--analyzer", "analyzer_id", default="smear-all", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--runs", default=100, show_default=True, help="Timed analyses.")
@click.option("--baseline-runs", default=5, show_default=True, help="Timed runs of each baseline model.")
@click.option("--no-baselines", is_flag=True, help="Skip the VGG16/U-Net comparison (needs torch).")
@click.option("--threads", default=2, show_default=True)
@click.option("--data", "data_root", default=None)
@click.option("--web", "web", is_flag=True, help="Web benchmark: 10k patients / 50k analyses, 8 concurrent uploads.")
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
def bench(analyzer_id, as_json, runs, baseline_runs, no_baselines, threads, data_root, web, n_patients, n_analyses,
          load, users, faults, redis_url, scaled, duration, database_url):
    """Benchmark latency, memory and FLOPs against a Keras-style VGG16 + U-Net (or the web app with --web / --load)."""
    if load:
        from .bench.load import format_report, run_load

        say = None if as_json else (lambda m: click.echo(m, err=True))
        out = run_load(users=users, duration_s=duration, database_url=database_url, patients=n_patients,
                       analyses=n_analyses, progress=say, queue_url=redis_url if scaled else None)
        text = format_report(out)
        if faults:
            from .bench.faults import format_faults, run_faults

            out["faults"] = run_faults(database_url, redis_url, progress=say)
            text += "\n" + format_faults(out["faults"])
        click.echo(json.dumps(out) if as_json else text)
        return
    if web:
        from .bench.web import run_web_bench

        out = run_web_bench(n_patients, n_analyses, images=_bench_images(data_root))
        click.echo(json.dumps(out) if as_json else json.dumps(out, indent=1))
        return
    from .bench.model import run_bench
    from .training.recipes import DEFAULT_DATASETS, RECIPES

    root = Path(data_root) if data_root else (DEFAULT_DATASETS / RECIPES[analyzer_id]["dataset"]
                                              if analyzer_id in RECIPES else None)
    out = run_bench(analyzer_id, runs=runs, baseline_runs=baseline_runs, data_root=root, threads=threads,
                    include_baselines=not no_baselines)
    if as_json:
        click.echo(json.dumps(out))
    else:
        click.echo(json.dumps(out, indent=1))


def _bench_images(data_root) -> list[bytes] | None:
    """Real test-split smears for the upload benchmark when the dataset is present."""
    from .training.recipes import DEFAULT_DATASETS

    root = Path(data_root) if data_root else DEFAULT_DATASETS / "all-taleqani"
    files = sorted((root / "Original").rglob("*.jpg"))[::300][:8] if (root / "Original").is_dir() else []
    return [f.read_bytes() for f in files] or None


# ----------------------------------------------------------------------------- serve / db / users
@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--threads", default=8, show_default=True, type=int)
@click.option("--processes", default=None, type=int,
              help="Server processes sharing the port (default: ONCOSCOPE_WEB_PROCESSES, else 2 on a machine "
                   "with 2 or more cores). Python runs one thread at a time per process.")
def serve(host, port, threads, processes):
    """Serve the web application with waitress (a production WSGI server)."""
    from .config import Settings
    from .store import migrate
    from .web.serving import serve as run_server

    st = Settings.from_env().prepare()
    if migrate.current(st.database_url) is None:
        raise click.ClickException("the database has no schema yet: run `oncoscope db upgrade` first")
    if processes is None:
        processes = st.web_processes
    click.echo(f"oncoscope serving on http://{host}:{port}/ (instance {st.home}, {processes} process"
               f"{'es' if processes > 1 else ''} x {threads} threads)")
    run_server(st, host, port, threads, max(1, processes))


@main.command()
@click.option("--burst", is_flag=True, help="Exit when the queue is empty (for scripts and tests).")
@click.option("--reconcile-every", default=5.0, show_default=True,
              help="Seconds between reconciler rounds (stale leases re-queued, due retries and lost messages re-sent).")
def worker(burst, reconcile_every):
    """Run analyses from the Redis queue (scaled-out mode; needs ONCOSCOPE_QUEUE_URL)."""
    import logging

    from .config import Settings
    from .services.jobs import run_worker
    from .store import migrate

    st = Settings.from_env().prepare()
    if not st.queue_url:
        raise click.ClickException("set ONCOSCOPE_QUEUE_URL (e.g. redis://127.0.0.1:6379/0); without it "
                                   "`oncoscope serve` runs the analyses itself and needs no worker")
    if migrate.current(st.database_url) is None:
        raise click.ClickException("the database has no schema yet: run `oncoscope db upgrade` first")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    click.echo(f"oncoscope worker: queue {st.queue_url}, database {st.database_url.split('@')[-1]}, "
               f"images {st.images_dir}")
    run_worker(st, burst=burst, reconcile_every=reconcile_every)


@main.group()
def db():
    """Database schema migrations (Alembic)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision):
    """Create or upgrade the schema."""
    _migrate("upgrade", revision)


@db.command("downgrade")
@click.option("--revision", default="-1", show_default=True)
def db_downgrade(revision):
    """Step the schema back (default: one migration)."""
    _migrate("downgrade", revision)


def _migrate(direction: str, revision: str) -> None:
    from .config import Settings
    from .store import migrate

    st = Settings.from_env().prepare()
    getattr(migrate, direction)(st.database_url, revision)
    click.echo(f"database at revision {migrate.current(st.database_url)}")
    if direction == "upgrade":
        _warn_legacy_mrns(st.database_url)


def _warn_legacy_mrns(url: str) -> None:
    from .store.db import standalone_session
    from .store.patients import MRN_RULE, legacy_mrns

    with standalone_session(url) as s:
        bad = legacy_mrns(s)
    if bad:
        shown = ", ".join(f"#{pid} {mrn!r}" for pid, mrn in bad[:10]) + (" ..." if len(bad) > 10 else "")
        click.echo(f"WARNING: {len(bad)} patient(s) have an MRN outside the allowed set ({MRN_RULE}) "
                   f"and should be corrected on their patient page: {shown}. Exports escape them meanwhile.", err=True)


@db.command("current")
def db_current():
    from .config import Settings
    from .store import migrate

    click.echo(migrate.current(Settings.from_env().database_url) or "empty")


def _signing_key(st):
    """The instance's private key, created on first use; says so then, because its public half must be
    copied to wherever signatures are checked."""
    from .store import signing

    new = not st.signing_key_file.exists()
    try:
        key = signing.signing_key(st.signing_key_file)
    except signing.SignatureError as exc:
        raise click.ClickException(str(exc)) from None
    if new:
        click.echo(f"created the signing key {st.signing_key_file}; copy {signing.public_path(st.signing_key_file)} "
                   "(not the key itself) to wherever backups are restored or the audit trail is verified", err=True)
    return key


def _trusted_key(st, path):
    from .store import signing

    try:
        return signing.trusted_key(Path(path) if path else st.trusted_key_path, st.signing_key_file)
    except signing.SignatureError as exc:
        raise click.ClickException(str(exc)) from None


TRUSTED_KEY_HELP = ("Public key (PEM) the signatures must verify with (default: ONCOSCOPE_TRUSTED_KEY, else this "
                    "instance's own signing key).")


@main.command("public-key")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write it to this file.")
def public_key(out):
    """Print the public half of the instance's signing key (created on first use). Copy it to machines
    that restore backups or verify the audit trail, and name it there with ONCOSCOPE_TRUSTED_KEY."""
    from .config import Settings
    from .store import signing

    pem = signing.public_pem(_signing_key(Settings.from_env().prepare()).public_key())
    if out:
        Path(out).write_bytes(pem)
    else:
        click.echo(pem.decode(), nl=False)


@main.command()
@click.argument("archive", type=click.Path(dir_okay=False))
def backup(archive):
    """Back up the database and images into one .tar.gz archive signed with the instance's key."""
    from .config import Settings
    from .store import signing
    from .store.audit import record_system
    from .store.backup import BackupError, create_backup

    st = Settings.from_env().prepare()
    key = _signing_key(st)
    try:
        m = create_backup(st.database_url, st.images_dir, Path(archive), key)
    except BackupError as exc:
        raise click.ClickException(str(exc)) from None
    rows = sum(t["rows"] for t in m["tables"].values())
    record_system(st, "backup.create", archive=str(Path(archive).resolve()), rows=rows, images=len(m["images"]))
    click.echo(f"{archive}: {rows} rows in {len(m['tables'])} tables, {len(m['images'])} image files "
               f"(schema {m['alembic_revision']}), signed by key {signing.key_id(key.public_key())}")


@main.command()
@click.argument("archive", type=click.Path(exists=True, dir_okay=False))
@click.option("--trusted-key", type=click.Path(exists=True, dir_okay=False), default=None, help=TRUSTED_KEY_HELP)
@click.option("--check-only", is_flag=True, help="Only verify the signature and every checksum; write nothing.")
def restore(archive, trusted_key, check_only):
    """Restore a signed backup into an empty instance (the signature and every checksum are verified first)."""
    from .config import Settings
    from .store.backup import BackupError, check_backup, restore_backup

    st = Settings.from_env() if check_only else Settings.from_env().prepare()  # a backup host has no instance
    key = _trusted_key(st, trusted_key)
    try:
        if check_only:
            m, _ = check_backup(Path(archive), key)
            click.echo(f"{archive}: signature and checksums verified; nothing was written\n{_archive_summary(m)}\n"
                       "An older archive verifies as well as the newest: check that this is the backup you mean "
                       "to restore.")
            return
        m = restore_backup(st.database_url, st.images_dir, Path(archive), key)
    except BackupError as exc:
        raise click.ClickException(str(exc)) from None
    from .store.audit import record_system

    rows = sum(t["rows"] for t in m["tables"].values())
    record_system(st, "backup.restore", archive=str(Path(archive).resolve()), rows=rows, images=len(m["images"]),
                  created=m["created"], schema=m["alembic_revision"])
    click.echo(f"restored {rows} rows and {len(m['images'])} image files from {archive}\n{_archive_summary(m)}")


def _archive_summary(m: dict) -> str:
    """What an operator compares with the backup they mean, before restoring (an old signed archive is valid)."""
    rows = sum(t["rows"] for t in m["tables"].values())
    return (f"archive created {m['created']} ({_ago(m['created'])}), schema revision {m['alembic_revision']}, "
            f"{m.get('database_dialect')} database, {rows} rows, {len(m['images'])} image files")


def _ago(when: str) -> str:
    import datetime as dt

    t = dt.datetime.fromisoformat(when)
    hours = (dt.datetime.now(dt.timezone.utc) - (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc))) \
        .total_seconds() / 3600
    return f"{hours:.0f} hours ago" if hours < 48 else f"{hours / 24:.0f} days ago"


@main.group()
def users():
    """User accounts."""


@users.command("create")
@click.option("--email", required=True)
@click.option("--name", required=True)
@click.option("--role", type=click.Choice(["doctor", "admin"]), default="doctor", show_default=True)
@click.password_option(help="Password (prompted when omitted).")
def users_create(email, name, role, password):
    """Create a user account."""
    from .config import Settings
    from .store import users as user_store
    from .store.db import make_engine, make_session_factory, session_scope

    st = Settings.from_env().prepare()
    with session_scope(make_session_factory(make_engine(st.database_url))) as s:
        try:
            u = user_store.create_user(s, email, name, password, role)
        except user_store.AccountError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"created {u.role} {u.email}")
    from .store.audit import record_system

    record_system(st, "user.create_cli", email=email, role=role)


@users.command("token")
@click.option("--email", required=True, help="The account the token acts as.")
@click.option("--days", type=click.IntRange(1, 3650), default=None, help="Expires after this many days (default: never).")
@click.option("--name", "label", default="command line", show_default=True, help="What uses it (shown on the token page).")
def users_token(email, days, label):
    """Print a new personal API token for an account (e.g. a service account for a LIS bridge).

    Stored and audited like a token made on the API tokens page: only its hash is kept, the owner
    sees and can revoke it there, and it is shown only this once."""
    from sqlalchemy import select

    from .config import Settings
    from .store import tokens as token_store
    from .store.audit import record_system
    from .store.db import standalone_session
    from .store.models import User
    from .store.users import normalise_email

    st = Settings.from_env().prepare()
    with standalone_session(st.database_url) as s:
        user = s.scalar(select(User).where(User.email == normalise_email(email)))
        if user is None or not user.is_active:
            raise click.ClickException(f"No active account with the address {email!r}.")
        t, secret = token_store.create(s, user, label, days)
        s.commit()
        made = {"label": t.name, "prefix": t.prefix, "email": user.email,
                "expires_at": t.expires_at.isoformat() if t.expires_at else None}
        token_id = t.id
    record_system(st, "auth.token_create", resource=("api_token", token_id), **made)
    click.echo(secret)
    click.echo(f"token {made['prefix']} ({made['label']}) for {made['email']}, "
               f"{'expires ' + made['expires_at'] if made['expires_at'] else 'no expiry'}: shown only now", err=True)


@main.group()
def audit():
    """The audit trail: verify the hash chain, sign checkpoints of it, export entries."""


@audit.command("verify")
@click.option("--checkpoints", type=click.Path(dir_okay=False), default=None,
              help="Signed checkpoint file written by `oncoscope audit checkpoint`. Every signature and the order "
                   "of the checkpoints are checked, and every checkpointed entry must still have its signed hash "
                   "(catches a rewritten chain). The newest checkpoint is printed: compare it with the schedule.")
@click.option("--trusted-key", type=click.Path(exists=True, dir_okay=False), default=None, help=TRUSTED_KEY_HELP)
@click.option("--json", "as_json", is_flag=True)
def audit_verify(checkpoints, trusted_key, as_json):
    """Recompute the hash chain (writes nothing but its own audit entry); exit status 1 when any entry
    was altered, removed or inserted, or the checkpoint file is missing, empty, unsigned, signed by
    another key, or has checkpoints removed or reordered."""
    from .config import Settings
    from .store import audit as audit_store

    st = Settings.from_env().prepare()
    if checkpoints:
        key = _trusted_key(st, trusted_key)
        _audit_check(st, "audit.verify", lambda s: audit_store.verify_signed(s, Path(checkpoints), key), as_json)
    else:
        _audit_check(st, "audit.verify", audit_store.verify, as_json)
        if not as_json:
            click.echo("note: without --checkpoints only the unkeyed chain was checked; someone with write access "
                       "to the database can recompute it", err=True)


@audit.command("checkpoint")
@click.argument("checkpoints", type=click.Path(dir_okay=False))
@click.option("--init", is_flag=True, help="Start CHECKPOINTS (refused when it exists). Run once, when the instance "
              "is installed: afterwards a missing file is an error, never silently started again.")
def audit_checkpoint(checkpoints, init):
    """Verify the chain against CHECKPOINTS, then append its head signed with the instance's key and
    chained to the previous checkpoint. Keep the file on the application host, not beside the backups."""
    from .config import Settings
    from .store import audit as audit_store

    st = Settings.from_env().prepare()
    key = _signing_key(st)
    rep = _audit_check(st, "audit.checkpoint", lambda s: audit_store.checkpoint(s, Path(checkpoints), key, init),
                       False)
    click.echo(f"signed checkpoint of entry #{rep.head_seq} added to {checkpoints}" if rep.head_seq
               else f"signed checkpoint of the empty audit trail (entry #0) added to {checkpoints}")


def _audit_check(st, action: str, run, as_json: bool):
    """Run one verification, audit it, print the report; exit 1 unless the trail is intact."""
    from .store import audit as audit_store
    from .store.db import standalone_session

    try:
        with standalone_session(st.database_url) as s:
            rep = run(s)
    except audit_store.CheckpointError as exc:
        audit_store.record_system(st, action, "failure", error=str(exc))
        raise click.ClickException(str(exc)) from None
    audit_store.record_system(st, action, "success" if rep.ok else "failure", entries=rep.entries,
                              first_bad_seq=rep.first_bad_seq, checkpoint_seq=(rep.checkpoint or {}).get("seq"))
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=2))
    elif rep.ok:
        click.echo(f"audit trail intact: {rep.entries} entries, head #{rep.head_seq} {rep.head_hash}")
    else:
        click.echo(f"AUDIT TRAIL BROKEN ({len(rep.problems)} problems; first at entry {rep.first_bad_seq}):", err=True)
        for p in rep.problems[:20]:
            click.echo(f"  {p}", err=True)
    if rep.checkpoint and not as_json:  # an older one than the schedule implies: the file was cut short or put back
        c = rep.checkpoint
        click.echo(f"newest signed checkpoint: entry #{c['seq']} at {c['at']} ({_ago(c['at'])}), "
                   f"{c['count']} in the file")
    if not rep.ok:
        sys.exit(1)
    return rep


@audit.command("export")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--since", default=None, help="first day (YYYY-MM-DD)")
@click.option("--until", default=None, help="last day (YYYY-MM-DD)")
def audit_export(out, since, until):
    """Write entries (oldest first, with their hashes) to a CSV file."""
    import datetime as dt

    from .config import Settings
    from .store import audit as audit_store
    from .store.db import standalone_session

    st = Settings.from_env().prepare()
    f = audit_store.AuditFilter(date_from=dt.date.fromisoformat(since) if since else None,
                                date_to=dt.date.fromisoformat(until) if until else None)
    with standalone_session(st.database_url) as s, open(out, "w", newline="", encoding="utf-8") as fh:
        n = audit_store.count(s, f)  # (rows, not lines: a detail may hold a line break)
        for chunk in audit_store.export_csv(s, f):
            fh.write(chunk)
    audit_store.record_system(st, "audit.export_cli", file=str(Path(out).resolve()), since=since, until=until)
    click.echo(f"{out}: {n} entries")


if __name__ == "__main__":  # pragma: no cover
    main()
