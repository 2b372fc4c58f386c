"""``oncoscope users create|token`` (oncoscope/cli/accounts.py)."""

from click.testing import CliRunner

from oncoscope.cli import main


def test_db_upgrade_and_users_create(tmp_path, monkeypatch):
    monkeypatch.setenv("ONCOSCOPE_HOME", str(tmp_path / "inst"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    r = CliRunner().invoke(main, ["db", "upgrade"])
    assert r.exit_code == 0 and "database at revision" in r.output, r.output
    r = CliRunner().invoke(main, ["users", "create", "--email", "Lab@Clinic.test", "--name", "Lab Lead", "--role", "admin",
                                  "--password", "Strong-pass-2026"])
    assert r.exit_code == 0 and "created admin lab@clinic.test" in r.output, r.output
    r = CliRunner().invoke(main, ["users", "create", "--email", "lab@clinic.test", "--name", "Again",
                                  "--password", "Strong-pass-2026"])
    assert r.exit_code != 0 and "already exists" in r.output
    r = CliRunner().invoke(main, ["users", "create", "--email", "x@clinic.test", "--name", "Weak", "--password", "short"])
    assert r.exit_code != 0 and "at least 10" in r.output
    r = CliRunner().invoke(main, ["db", "downgrade"])
    assert r.exit_code == 0
    assert (tmp_path / "inst" / "secret_key").exists()


def test_users_token_prints_a_working_token_stored_and_audited_like_the_token_page(tmp_path, monkeypatch):
    from sqlalchemy import select

    from oncoscope.store.db import standalone_session
    from oncoscope.store.models import ApiToken, AuditEvent
    from oncoscope.web import create_app

    monkeypatch.setenv("ONCOSCOPE_HOME", str(tmp_path / "inst"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert CliRunner().invoke(main, ["db", "upgrade"]).exit_code == 0
    assert CliRunner().invoke(main, ["users", "create", "--email", "lis@clinic.test", "--name", "LIS bridge",
                                     "--password", "Strong-pass-2026"]).exit_code == 0
    r = CliRunner().invoke(main, ["users", "token", "--email", "LIS@clinic.test", "--days", "30",
                                      "--name", "LIS bridge"])
    assert r.exit_code == 0, r.output
    secret = r.stdout.strip()
    assert secret.startswith("osk_") and "shown only now" in r.stderr and secret not in r.stderr
    app = create_app({"TESTING": True}, start_workers=False)
    resp = app.test_client().get("/api/v1/patients", headers={"Authorization": f"Bearer {secret}"})
    assert resp.status_code == 200
    url = app.extensions["oncoscope"]["settings"].database_url
    app.extensions["oncoscope"]["engine"].dispose()
    with standalone_session(url) as s:
        t = s.scalar(select(ApiToken))
        assert t.name == "LIS bridge" and t.token_hash != secret and secret.split("_")[1] == t.prefix
        assert 29 <= (t.expires_at - t.created_at).days <= 30
        e = s.scalar(select(AuditEvent).where(AuditEvent.action == "auth.token_create"))
        assert (e.channel, e.resource_type, e.resource_id) == ("cli", "api_token", str(t.id))
        assert e.details["prefix"] == t.prefix and e.details["email"] == "lis@clinic.test"
        assert secret not in str(e.details)
    r = CliRunner().invoke(main, ["users", "token", "--email", "nobody@clinic.test"])
    assert r.exit_code != 0 and "No active account" in r.output
