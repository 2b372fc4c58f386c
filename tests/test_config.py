"""Settings: every environment variable read and validated in one place; reading creates nothing,
``prepare()`` makes the instance folder and its private secret key."""

from __future__ import annotations

import os
import stat

import pytest

from oncoscope.config import Settings, SettingsError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in ("ONCOSCOPE_HOME", "DATABASE_URL", "ONCOSCOPE_SECRET_KEY", "ONCOSCOPE_MAX_UPLOAD_MB"):
        monkeypatch.delenv(k, raising=False)


@pytest.mark.parametrize("key", ["changeme", "CHANGEME", "secret", "short-but-random-9f3", "x" * 31, ""])
def test_weak_secret_key_is_refused(tmp_path, monkeypatch, key):
    monkeypatch.setenv("ONCOSCOPE_SECRET_KEY", key)
    with pytest.raises(SettingsError, match="too weak"):
        Settings.from_env(home=tmp_path)
    assert not (tmp_path / "secret_key").exists()


def test_strong_secret_key_from_the_environment(tmp_path, monkeypatch):
    key = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822c"
    monkeypatch.setenv("ONCOSCOPE_SECRET_KEY", key)
    assert Settings.from_env(home=tmp_path).secret_key == key
    assert not (tmp_path / "secret_key").exists()


def test_generated_secret_key_file_is_private_and_reused(tmp_path):
    s1 = Settings.from_env(home=tmp_path).prepare()
    path = tmp_path / "secret_key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(s1.secret_key) >= 32 and path.read_text() == s1.secret_key
    mtime = path.stat().st_mtime_ns
    s2 = Settings.from_env(home=tmp_path).prepare()
    assert s2.secret_key == s1.secret_key and path.stat().st_mtime_ns == mtime
    assert Settings.from_env(home=tmp_path / "other").prepare().secret_key != s1.secret_key
    assert s1.secret_key not in repr(s1)


@pytest.mark.parametrize("given,expected", [
    ("postgres://u:p@db:5432/onc", "postgresql+psycopg://u:p@db:5432/onc"),
    ("postgresql://u:p@db/onc", "postgresql+psycopg://u:p@db/onc"),
    ("postgresql+psycopg://u@db/onc", "postgresql+psycopg://u@db/onc"),
    ("mysql://root@db/onc", "mysql+pymysql://root@db/onc"),
    ("mariadb://root@db/onc", "mysql+pymysql://root@db/onc"),
])
def test_database_url_is_normalised(tmp_path, monkeypatch, given, expected):
    monkeypatch.setenv("DATABASE_URL", given)
    assert Settings.from_env(home=tmp_path).database_url == expected
    monkeypatch.delenv("DATABASE_URL")
    assert Settings.from_env(home=tmp_path, database_url=given).database_url == expected


def test_reading_settings_creates_nothing_and_prepare_creates_the_instance(tmp_path):
    home = tmp_path / "new-instance"
    s = Settings.from_env(home=home)
    assert not home.exists() and s.secret_key == ""  # reading settings writes nothing
    s.prepare()
    assert s.images_dir.is_dir() and len(s.secret_key) >= 32 and (home / "secret_key").read_text() == s.secret_key
    assert Settings.from_env(home=home).secret_key == s.secret_key  # read back, not made again


def test_settings_defaults_and_bad_values(tmp_path, monkeypatch):
    s = Settings.from_env(home=tmp_path)
    assert s.database_url == f"sqlite:///{tmp_path.resolve() / 'oncoscope.db'}"
    monkeypatch.setenv("ONCOSCOPE_MAX_UPLOAD_MB", "lots")
    with pytest.raises(SettingsError, match="ONCOSCOPE_MAX_UPLOAD_MB must be an integer"):
        Settings.from_env(home=tmp_path)
    monkeypatch.delenv("ONCOSCOPE_MAX_UPLOAD_MB")
    with pytest.raises(SettingsError, match="unknown setting"):
        Settings.from_env(home=tmp_path, no_such_setting=1)


def test_hospital_integration_settings_are_read_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("ONCOSCOPE_DICOM_ALLOWED_AETS", " MODALITY1, PACS ,,")
    monkeypatch.setenv("ONCOSCOPE_DICOMWEB_URL", "https://pacs.example/dicom-web/")
    monkeypatch.setenv("ONCOSCOPE_DICOMWEB_PASSWORD", "not-in-repr")
    s = Settings.from_env(home=tmp_path)
    assert s.dicom_allowed_aets == ("MODALITY1", "PACS") and s.dicom_ae_title == "ONCOSCOPE"
    assert s.dicomweb_url == "https://pacs.example/dicom-web" and "not-in-repr" not in repr(s)
    monkeypatch.setenv("ONCOSCOPE_DICOM_ALLOWED_AETS", "A" * 17)
    with pytest.raises(SettingsError, match="AE title"):
        Settings.from_env(home=tmp_path)
    monkeypatch.delenv("ONCOSCOPE_DICOM_ALLOWED_AETS")
    monkeypatch.setenv("ONCOSCOPE_DICOMWEB_URL", "ftp://pacs")
    with pytest.raises(SettingsError, match="DICOMWEB_URL"):
        Settings.from_env(home=tmp_path)
