"""Repository hygiene: training runs and checkpoints stay out of the tree; shipped models stay in."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    return out.splitlines()


def test_no_training_runs_or_checkpoints_are_tracked():
    tracked = _tracked()
    assert not [f for f in tracked if f.endswith((".pt", ".pth", ".ckpt"))]
    assert not [f for f in tracked if f.split("/")[0].startswith("runs")]


def test_every_shipped_model_has_its_weights_config_and_card():
    tracked = set(_tracked())
    for model in ("smear-all", "bone-xray", "brain-mri"):
        for name in ("classifier.onnx", "config.json", "model_card.json", "model_card.md"):
            assert f"oncoscope/models/{model}/{name}" in tracked, (model, name)
    for name in ("cell_classifier.onnx", "config.json", "model_card.json", "model_card.md"):
        assert f"oncoscope/models/smear-differential/{name}" in tracked, name
