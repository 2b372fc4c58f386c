"""``oncoscope public-key|backup|restore|audit`` (oncoscope/cli/records.py); the backup and audit
commands are exercised end to end in tests/store/test_backup.py and tests/store/test_audit.py."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from oncoscope.cli import main


@pytest.mark.parametrize("where", ["read_only_folder", "folder_is_a_file"])
def test_signing_key_that_cannot_be_created_is_a_clear_error(tmp_path, monkeypatch, where):
    """ONCOSCOPE_SIGNING_KEY in a folder the service account cannot write (or under a file): a message
    naming the path and what to do, exit status 1, no traceback."""
    import os

    from oncoscope.store import signing

    parent = tmp_path / "keys"
    if where == "folder_is_a_file":
        parent.write_text("not a folder")
    else:
        parent.mkdir()
        parent.chmod(0o500)
        real_open = os.open

        def refuse(path, *a, **kw):  # what the kernel answers anyone but root
            if Path(path).parent == parent:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *a, **kw)

        if os.geteuid() == 0:  # root ignores the mode bits
            monkeypatch.setattr(signing.os, "open", refuse)
    key = parent / "signing_key"
    monkeypatch.setenv("ONCOSCOPE_HOME", str(tmp_path / "inst"))
    monkeypatch.setenv("ONCOSCOPE_SIGNING_KEY", str(key))
    r = CliRunner().invoke(main, ["public-key"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert f"cannot create the signing key {key}" in r.output and "ONCOSCOPE_SIGNING_KEY" in r.output, r.output
    assert "Traceback" not in r.output
