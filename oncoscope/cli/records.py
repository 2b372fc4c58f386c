"""``oncoscope public-key|backup|restore|audit``: signed backups and the audit trail.

Commands that write prepare the instance (``Settings.prepare()``); ``restore --check-only`` runs
on a backup host that has no instance and creates nothing."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import click

from ..config import Settings
from ..store import audit as audit_store
from ..store import signing
from ..store.backup import BackupError, check_backup, create_backup, restore_backup
from ..store.db import standalone_session

TRUSTED_KEY_HELP = ("Public key (PEM) the signatures must verify with (default: ONCOSCOPE_TRUSTED_KEY, else this "
                    "instance's own signing key).")


def _signing_key(st):
    """The instance's private key, created on first use; says so then, because its public half must be
    copied to wherever signatures are checked."""
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
    try:
        return signing.trusted_key(Path(path) if path else st.trusted_key_path, st.signing_key_file)
    except signing.SignatureError as exc:
        raise click.ClickException(str(exc)) from None


def _ago(when: str) -> str:
    t = dt.datetime.fromisoformat(when)
    hours = (dt.datetime.now(dt.timezone.utc) - (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc))) \
        .total_seconds() / 3600
    return f"{hours:.0f} hours ago" if hours < 48 else f"{hours / 24:.0f} days ago"


# ----------------------------------------------------------------------------- keys and backups
@click.command("public-key")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write it to this file.")
def public_key(out):
    """Print the public half of the instance's signing key (created on first use). Copy it to machines
    that restore backups or verify the audit trail, and name it there with ONCOSCOPE_TRUSTED_KEY."""
    pem = signing.public_pem(_signing_key(Settings.from_env().prepare()).public_key())
    if out:
        Path(out).write_bytes(pem)
    else:
        click.echo(pem.decode(), nl=False)


@click.command()
@click.argument("archive", type=click.Path(dir_okay=False))
def backup(archive):
    """Back up the database and images into one .tar.gz archive signed with the instance's key."""
    st = Settings.from_env().prepare()
    key = _signing_key(st)
    try:
        m = create_backup(st.database_url, st.images_dir, Path(archive), key)
    except BackupError as exc:
        raise click.ClickException(str(exc)) from None
    rows = sum(t["rows"] for t in m["tables"].values())
    audit_store.record_system(st, "backup.create", archive=str(Path(archive).resolve()), rows=rows,
                              images=len(m["images"]))
    click.echo(f"{archive}: {rows} rows in {len(m['tables'])} tables, {len(m['images'])} image files "
               f"(schema {m['alembic_revision']}), signed by key {signing.key_id(key.public_key())}")


@click.command()
@click.argument("archive", type=click.Path(exists=True, dir_okay=False))
@click.option("--trusted-key", type=click.Path(exists=True, dir_okay=False), default=None, help=TRUSTED_KEY_HELP)
@click.option("--check-only", is_flag=True, help="Only verify the signature and every checksum; write nothing.")
def restore(archive, trusted_key, check_only):
    """Restore a signed backup into an empty instance (the signature and every checksum are verified first)."""
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
    rows = sum(t["rows"] for t in m["tables"].values())
    audit_store.record_system(st, "backup.restore", archive=str(Path(archive).resolve()), rows=rows,
                              images=len(m["images"]), created=m["created"], schema=m["alembic_revision"])
    click.echo(f"restored {rows} rows and {len(m['images'])} image files from {archive}\n{_archive_summary(m)}")


def _archive_summary(m: dict) -> str:
    """What an operator compares with the backup they mean, before restoring (an old signed archive is valid)."""
    rows = sum(t["rows"] for t in m["tables"].values())
    return (f"archive created {m['created']} ({_ago(m['created'])}), schema revision {m['alembic_revision']}, "
            f"{m.get('database_dialect')} database, {rows} rows, {len(m['images'])} image files")


# ----------------------------------------------------------------------------- the audit trail
@click.group()
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
    st = Settings.from_env().prepare()
    key = _signing_key(st)
    rep = _audit_check(st, "audit.checkpoint", lambda s: audit_store.checkpoint(s, Path(checkpoints), key, init),
                       False)
    click.echo(f"signed checkpoint of entry #{rep.head_seq} added to {checkpoints}" if rep.head_seq
               else f"signed checkpoint of the empty audit trail (entry #0) added to {checkpoints}")


def _audit_check(st, action: str, run, as_json: bool):
    """Run one verification, audit it, print the report; exit 1 unless the trail is intact."""
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
    st = Settings.from_env().prepare()
    f = audit_store.AuditFilter(date_from=dt.date.fromisoformat(since) if since else None,
                                date_to=dt.date.fromisoformat(until) if until else None)
    with standalone_session(st.database_url) as s, open(out, "w", newline="", encoding="utf-8") as fh:
        n = audit_store.count(s, f)  # (rows, not lines: a detail may hold a line break)
        for chunk in audit_store.export_csv(s, f):
            fh.write(chunk)
    audit_store.record_system(st, "audit.export_cli", file=str(Path(out).resolve()), since=since, until=until)
    click.echo(f"{out}: {n} entries")
