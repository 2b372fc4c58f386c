"""``oncoscope dicom listen`` (oncoscope/cli/integration.py): what the receiver is wired to. On its
own it tells the server's worker pools (or Redis) about what it files and writes the thumbnails;
with ``--workers`` its own pool is woken directly and the analyses write the thumbnails."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import oncoscope.cli.integration as integration
from oncoscope.cli import main
from oncoscope.services import jobs
from oncoscope.store import migrate


@pytest.fixture()
def wired(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    migrate.upgrade(url)
    monkeypatch.setenv("ONCOSCOPE_HOME", str(tmp_path / "inst"))
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("ONCOSCOPE_DICOM_ALLOWED_AETS", "PACS")
    got = {}

    class Receiver:  # (the real one listens on a port: here, what it was given is enough)
        def __init__(self, st, sessions, files, **kw):
            got.update(kw)
            self.ae_title, self.port = "ONCOSCOPE", 11112

        def serve(self):
            got["served"] = True

    class Pool:
        def __init__(self, *a, **kw):
            got["pool_wake_dir"] = kw.get("wake_dir")

        def start(self):
            pass

        def notify(self):
            pass

        def shutdown(self):
            got["pool_stopped"] = True

    monkeypatch.setattr(integration, "Receiver", Receiver)
    monkeypatch.setattr(integration, "WorkerPool", Pool)
    return got


def test_the_receiver_on_its_own_wakes_the_servers_pools_and_makes_thumbnails(wired, tmp_path):
    r = CliRunner().invoke(main, ["dicom", "listen", "--port", "0"])
    assert r.exit_code == 0, r.output
    assert wired["served"] and wired["thumbnails"] is True
    assert isinstance(wired["on_filed"], jobs.Coalesced)


def test_with_its_own_workers_the_receiver_wakes_them_and_leaves_thumbnails_to_them(wired, tmp_path):
    r = CliRunner().invoke(main, ["dicom", "listen", "--port", "0", "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert wired["thumbnails"] is False and wired["on_filed"].__name__ == "notify" and wired["pool_stopped"]
    assert wired["pool_wake_dir"] == tmp_path / "inst" / "run"


def test_the_listener_warns_when_its_patients_would_reach_only_administrators(wired, monkeypatch):
    r = CliRunner().invoke(main, ["dicom", "listen", "--port", "0"])
    assert "ONCOSCOPE_INTEGRATION_READERS is empty" in r.output
    monkeypatch.setenv("ONCOSCOPE_INTEGRATION_READERS", "Typo@clinic.test")
    r = CliRunner().invoke(main, ["dicom", "listen", "--port", "0"])
    assert "names no active staff account for: typo@clinic.test" in r.output and r.exit_code == 0
