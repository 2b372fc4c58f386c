"""Process and instance helpers shared by the load run and the fault scenarios (fast: nothing started)."""

from __future__ import annotations

import socket

from oncoscope.bench.processes import free_port, instance_env, scratch_database


def test_instance_env_never_inherits_a_database_url(monkeypatch, tmp_path):
    monkeypatch.setenv("DATABASE_URL", "postgresql://someone-elses-database")
    env = instance_env(tmp_path, None, {"ONCOSCOPE_JOB_LEASE_SECONDS": 20})
    assert "DATABASE_URL" not in env
    assert env["ONCOSCOPE_HOME"] == str(tmp_path) and env["ONCOSCOPE_JOB_LEASE_SECONDS"] == "20"
    assert instance_env(tmp_path, "sqlite:///x.db")["DATABASE_URL"] == "sqlite:///x.db"


def test_scratch_database_passes_sqlite_through():
    with scratch_database("sqlite:///x.db") as url:
        assert url == "sqlite:///x.db"
    with scratch_database(None) as url:
        assert url is None


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
