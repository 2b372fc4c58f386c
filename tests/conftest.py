"""Shared fixtures. Dataset-dependent tests skip with a clear message when ../shared is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from oncoscope.config import datasets_dir

REPO = Path(__file__).resolve().parents[1]
DATASETS = datasets_dir()
ALL_DATA = DATASETS / "all-taleqani"
MODELS = REPO / "oncoscope" / "models"


@pytest.fixture(scope="session")
def all_data() -> Path:
    if not (ALL_DATA / "Original").is_dir():
        pytest.skip(f"ALL dataset not found at {ALL_DATA} (set ONCOSCOPE_DATA or place ../shared/datasets)")
    return ALL_DATA


@pytest.fixture(scope="session")
def smear_analyzer():
    from oncoscope.analyzers import registry

    if "smear-all" not in registry.available():
        pytest.fail("the shipped smear-all model is missing from oncoscope/models/smear-all")
    return registry.get("smear-all")


@pytest.fixture(scope="session")
def geometry_analyzer():
    """A separate smear-all instance with the out-of-domain gate off, so pipeline geometry
    (masks, heatmaps, coordinates) is exercised on generated images, which the real gate
    rightly rejects as not being blood smears."""
    from oncoscope.analyzers import registry

    an = registry.get("smear-all", model_dir=MODELS / "smear-all")
    an.ood_threshold = None
    return an


def dataset_dir(name: str, probe: str | None = None) -> Path:
    """A dataset folder, or skip with a message saying where it was looked for."""
    folder = DATASETS / name
    if not (folder / (probe or "")).is_dir():
        pytest.skip(f"{name} dataset not found at {folder} (set ONCOSCOPE_DATA or place ../shared/datasets)")
    return folder


@pytest.fixture(scope="session")
def bone_data() -> Path:
    return dataset_dir("bone-xray", "cancer")


@pytest.fixture(scope="session")
def brain_data() -> Path:
    return dataset_dir("brain-mri", "glioma")


@pytest.fixture(scope="session", params=["bone-xray", "brain-mri"])
def radiology_analyzer(request):
    from oncoscope.analyzers import registry

    if request.param not in registry.available():
        pytest.fail(f"the shipped {request.param} model is missing from oncoscope/models/{request.param}")
    return registry.get(request.param)


@pytest.fixture(scope="session")
def radiology_geometry(radiology_analyzer):
    """The same analyzer with the out-of-domain gate off (generated images are rightly out of domain)."""
    from oncoscope.analyzers import registry

    an = registry.get(radiology_analyzer.id, model_dir=MODELS / radiology_analyzer.id)
    an.ood_threshold = None
    return an


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def any_db_url(request, tmp_path):
    """A private, migrated database on each supported backend (servers that do not answer: skipped)."""
    from oncoscope.store import migrate

    from .databases import scratch_database

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'scratch.db'}"
        migrate.upgrade(url)
        yield url
        return
    with scratch_database(request.param) as url:
        migrate.upgrade(url)
        yield url
