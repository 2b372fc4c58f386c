"""Where brain-mri suggests a tumour type: fitted on the typed collection's tumours, refitted here on
a trimmed manifest with the shipped network, written where the served analyzer reads it."""

from __future__ import annotations

import json
import shutil

import numpy as np

from oncoscope.analyzers import registry
from oncoscope.training.calibrate import fit_type_domain
from oncoscope.training.data import load_manifest
from oncoscope.training.recipes import RECIPES

from ..conftest import MODELS, dataset_dir


def _trimmed(tmp_path, per: dict[tuple[str, str], int]) -> dict:
    """The committed manifest cut to a few files per (split, source dataset)."""
    m = load_manifest(RECIPES["brain-mri"]["manifest"])
    m.pop("_path")
    files, seen = {}, {}
    for path, e in sorted(m["files"].items()):
        key = (e["split"], path.split("/")[0])
        if e["label"] != "notumor" and seen.get(key, 0) < per.get(key, 0):
            seen[key] = seen.get(key, 0) + 1
            files[path] = e
    m["files"] = files
    out = tmp_path / "manifest.json"
    out.write_text(json.dumps(m))
    return dict(RECIPES["brain-mri"], manifest=out)


def test_the_type_domain_is_fitted_on_the_typed_collection_and_served(tmp_path):
    dataset_dir("brain-mri", "glioma"), dataset_dir("tcga-lgg-flair")
    model = tmp_path / "model"
    shutil.copytree(MODELS / "brain-mri", model)
    recipe = _trimmed(tmp_path, {("train", "brain-mri"): 60, ("val", "brain-mri"): 30, ("val", "tcga-lgg-flair"): 10,
                                 ("train", "tcga-lgg-flair"): 10})
    section = fit_type_domain("brain-mri", dataset_dir("brain-mri").parent, recipe, model)
    # the reference is the typed collection's training tumours only (TCGA's training gliomas left out)
    assert section["reference_n"] == 60 and section["sources"] == ["brain-mri"]
    v = section["validation"]
    assert v["typed_images"] == 30 and v["other_images"] == 10 and v["typed_kept"] >= 0.95
    stats = np.load(model / "ood.npz")
    assert {"means", "precision", "type_mean", "type_precision"} <= set(stats.files)  # the OOD arrays kept
    an = registry.get("brain-mri", model_dir=model)
    assert an.type_domain[2] == section["threshold"]
    np.testing.assert_allclose(an.type_domain[0], stats["type_mean"].astype(np.float64))
