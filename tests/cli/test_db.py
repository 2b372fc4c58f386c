"""``oncoscope db upgrade|downgrade|current`` (oncoscope/cli/db.py)."""

from click.testing import CliRunner

from oncoscope.cli import main
from oncoscope.store import migrate


def test_db_upgrade_warns_about_mrns_from_before_the_mrn_rule(tmp_path, monkeypatch):
    from oncoscope.store.db import standalone_session
    from oncoscope.store.models import Patient

    monkeypatch.setenv("ONCOSCOPE_HOME", str(tmp_path / "inst"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    r = CliRunner().invoke(main, ["db", "upgrade"])
    assert r.exit_code == 0 and "WARNING" not in r.output
    with standalone_session(f"sqlite:///{tmp_path / 'inst' / 'oncoscope.db'}") as s:
        s.add(Patient(mrn="B-001\\ZZ", family_name="Old"))
        s.commit()
    r = CliRunner().invoke(main, ["db", "upgrade"])
    assert r.exit_code == 0 and "WARNING: 1 patient(s) have an MRN outside the allowed set" in r.stderr
    assert "'B-001\\\\ZZ'" in r.stderr


def test_db_current_reads_only(tmp_path, monkeypatch):
    """`db current` names the revision, or "empty"; it only checks, so a new instance is not created."""
    monkeypatch.setenv("ONCOSCOPE_HOME", str(tmp_path / "inst"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    r = CliRunner().invoke(main, ["db", "current"])
    assert r.exit_code == 0 and r.output == "empty\n", r.output
    assert not (tmp_path / "inst").exists()
    assert CliRunner().invoke(main, ["db", "upgrade"]).exit_code == 0
    r = CliRunner().invoke(main, ["db", "current"])
    assert r.exit_code == 0 and r.output.strip() == migrate.current(f"sqlite:///{tmp_path / 'inst' / 'oncoscope.db'}")
    assert r.output.strip() not in ("", "empty")
