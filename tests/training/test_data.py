"""Tests for oncoscope.training.data on a small synthetic class-per-folder dataset built here.

The synthetic dataset (under ``<root>/Original/<class>/``) has three classes of smooth
random textures named like the real data (``WBC-Alpha-001.jpg``) and planted hazards:

* exact duplicates: Alpha-012 = Alpha-011 (same run), Beta-030 = Beta-007 (two runs);
* near-duplicates: Alpha-020 = Alpha-019 shifted 1 px and re-encoded (same run),
  Alpha-033 = Alpha-003 shifted 2/1 px (two runs), Gamma-025 = Gamma-024 re-encoded;
* a cross-class copy: Gamma-040 = Beta-015 (byte-identical);
* a corrupt file: Beta-040 (a JPEG cut in half);
* a nested PNG (Gamma/sub/WBC-Gamma-041.png), a file without a number
  (Beta/reference.bmp), and non-image / hidden clutter that must be ignored.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oncoscope.training.data import (SPLITS, audit, discover, file_number, load_manifest, make_split, manifest_samples,
                                     save_manifest, sha256_file, verify_manifest)
from oncoscope.imaging.imageio import load_image

SIZE, PAD = 96, 4
N_PER_CLASS = 40
CLASSES = ["Alpha", "Beta", "Gamma"]
SUBDIR = "Original"
RUN = 5  # run_length used for the synthetic splits: 8 runs per class
MIN_CORRELATION = 0.93


# --------------------------------------------------------------------------- synthetic images

def texture(seed: int) -> np.ndarray:
    """A smooth random colour texture with a little grain, padded by PAD px for shifting."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    side = SIZE + 2 * PAD
    big = np.asarray(low.resize((side, side), Image.BICUBIC), dtype=np.float64)
    big = big + rng.normal(0, 4, big.shape)
    return np.clip(big, 0, 255).astype(np.uint8)


def view(tex: np.ndarray, dx: int = 0, dy: int = 0) -> np.ndarray:
    return np.ascontiguousarray(tex[PAD + dy:PAD + dy + SIZE, PAD + dx:PAD + dx + SIZE])


def jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def seed_of(cls: str, n: int) -> int:
    return 1000 * (CLASSES.index(cls) + 1) + n


def rel(cls: str, n: int, ext: str = "jpg") -> str:
    return f"{cls}/WBC-{cls}-{n:03d}.{ext}"


EXACT_SETS = sorted([
    sorted([rel("Alpha", 11), rel("Alpha", 12)]),
    sorted([rel("Beta", 7), rel("Beta", 30)]),
    sorted([rel("Beta", 15), rel("Gamma", 40)]),
])
NEAR_ONLY = [
    sorted([rel("Alpha", 19), rel("Alpha", 20)]),
    sorted([rel("Alpha", 3), rel("Alpha", 33)]),
    sorted([rel("Gamma", 24), rel("Gamma", 25)]),
]
NEAR_GROUPS = sorted(EXACT_SETS + NEAR_ONLY)
CROSS_GROUPS = [sorted([rel("Beta", 15), rel("Gamma", 40)])]
CORRUPT = rel("Beta", 40)
NESTED = "Gamma/sub/WBC-Gamma-041.png"
UNNUMBERED = "Beta/reference.bmp"
EXPECTED_COUNTS = {"Alpha": 40, "Beta": 41, "Gamma": 41}


def build_dataset(root: Path) -> Path:
    base = root / SUBDIR
    files: dict[str, bytes] = {}
    for cls in CLASSES:
        for n in range(1, N_PER_CLASS + 1):
            files[rel(cls, n)] = jpeg(view(texture(seed_of(cls, n))))
    # exact duplicates (byte copies)
    files[rel("Alpha", 12)] = files[rel("Alpha", 11)]
    files[rel("Beta", 30)] = files[rel("Beta", 7)]
    files[rel("Gamma", 40)] = files[rel("Beta", 15)]  # cross-class
    # near-duplicates: shifted and/or re-encoded
    files[rel("Alpha", 20)] = jpeg(view(texture(seed_of("Alpha", 19)), 1, 0), quality=85)
    files[rel("Alpha", 33)] = jpeg(view(texture(seed_of("Alpha", 3)), 2, 1), quality=90)
    files[rel("Gamma", 25)] = jpeg(view(texture(seed_of("Gamma", 24))), quality=70)
    # corrupt
    files[CORRUPT] = files[CORRUPT][: len(files[CORRUPT]) // 2]
    # nested PNG and an unnumbered BMP
    buf = io.BytesIO()
    Image.fromarray(view(texture(7001))).save(buf, "PNG")
    files[NESTED] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(view(texture(7002))).save(buf, "BMP")
    files[UNNUMBERED] = buf.getvalue()
    for r, data in files.items():
        p = base / r
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    # clutter that discover must ignore
    (base / "Alpha" / "notes.txt").write_text("not an image")
    (base / ".thumbs").mkdir()
    (base / ".thumbs" / "WBC-Alpha-001.jpg").write_bytes(files[rel("Alpha", 1)])
    (base / "README.md").write_text("synthetic")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def report(dataset):
    return audit(dataset, SUBDIR, min_correlation=MIN_CORRELATION)


@pytest.fixture(scope="module")
def manifest(dataset):
    return make_split(dataset, SUBDIR, run_length=RUN, min_correlation=MIN_CORRELATION, seed=0)


def all_paths(root: Path) -> set[str]:
    return {s.path for s in discover(root, SUBDIR)[1]}


# --------------------------------------------------------------------------- small helpers

def test_file_number():
    assert file_number("Benign/WBC-Benign-001.jpg") == 1
    assert file_number("x/a12b034.png") == 34
    assert file_number("x/reference.bmp") is None


# --------------------------------------------------------------------------- discover

def test_discover(dataset):
    classes, samples = discover(dataset, SUBDIR)
    assert classes == CLASSES
    assert Counter(s.label for s in samples) == EXPECTED_COUNTS
    paths = [s.path for s in samples]
    assert len(paths) == len(set(paths))
    assert NESTED in paths and UNNUMBERED in paths and CORRUPT in paths
    assert not any(p.endswith(".txt") or p.startswith(".") or "README" in p for p in paths)
    for s in samples:
        assert s.path.split("/")[0] == s.label
        assert (dataset / SUBDIR / s.path).is_file()
    # sorted by class, then file number
    keys = [(s.label, s.number or 0) for s in samples]
    assert keys == sorted(keys)
    # root/subdir and root joined give the same answer
    assert discover(dataset / SUBDIR) == (classes, samples)


def test_discover_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        discover(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError):
        discover(tmp_path / "empty")


# --------------------------------------------------------------------------- audit

def test_audit_counts_and_corrupt(report):
    assert report.classes == CLASSES
    assert report.counts == EXPECTED_COUNTS
    assert [c["path"] for c in report.corrupt] == [CORRUPT]
    assert report.corrupt[0]["error"]
    assert report.sizes == {f"{SIZE}x{SIZE}": sum(EXPECTED_COUNTS.values()) - 1}
    assert report.modes == {"RGB": sum(EXPECTED_COUNTS.values()) - 1}


def test_audit_duplicates(report):
    assert report.exact_duplicate_sets == EXACT_SETS
    assert report.near_duplicate_groups == NEAR_GROUPS
    assert report.cross_class_groups == CROSS_GROUPS


def test_audit_report_outputs(report):
    d = report.to_dict()
    assert d["total"] == sum(EXPECTED_COUNTS.values())
    assert d["n_exact_duplicate_files"] == 3
    assert d["n_images_in_near_duplicate_groups"] == 12
    assert d["near_duplicate_min_correlation"] == MIN_CORRELATION
    json.dumps(d)  # serialisable
    text = report.to_text()
    assert CORRUPT in text
    assert "Cross-class duplicate groups: 1" in text


def test_audit_strictest_check_keeps_exact_duplicates(dataset):
    # Above a correlation of 1 no two images are similar enough; the byte copies must still be grouped.
    strict = audit(dataset, SUBDIR, min_correlation=1.01)
    for s in EXACT_SETS:
        assert any(set(s) <= set(g) for g in strict.near_duplicate_groups)


# --------------------------------------------------------------------------- make_split

def test_manifest_assigns_every_file(dataset, manifest):
    assert set(manifest["files"]) == all_paths(dataset)
    assert manifest["classes"] == CLASSES
    assert manifest["subdir"] == SUBDIR
    assert manifest["params"]["run_length"] == RUN
    assert manifest["params"]["seed"] == 0
    for p, v in manifest["files"].items():
        assert v["split"] in SPLITS
        assert v["label"] == p.split("/")[0]
        assert v["sha256"] == sha256_file(dataset / SUBDIR / p)
    assert manifest["files"][CORRUPT]["error"]
    assert all(v["error"] is None for p, v in manifest["files"].items() if p != CORRUPT)


def _split_of(manifest, paths) -> set[str]:
    return {manifest["files"][p]["split"] for p in paths}


def test_manifest_no_duplicate_group_spans_splits(manifest):
    for group in NEAR_GROUPS:
        assert len(_split_of(manifest, group)) == 1, group
    by_group = defaultdict(set)
    for v in manifest["files"].values():
        by_group[v["group"]].add(v["split"])
    assert all(len(s) == 1 for s in by_group.values())
    # the planted groups are the manifest's groups
    gid = {p: v["group"] for p, v in manifest["files"].items()}
    members = defaultdict(set)
    for p, g in gid.items():
        members[g].add(p)
    assert sorted(sorted(m) for m in members.values() if len(m) > 1) == NEAR_GROUPS
    assert manifest["n_near_duplicate_groups"] == len(NEAR_GROUPS)


def test_manifest_runs_share_a_split(manifest):
    by_run = defaultdict(set)
    for p, v in manifest["files"].items():
        n = file_number(p)
        if n is not None:
            by_run[(v["label"], (n - 1) // RUN)].add(v["split"])
    assert len(by_run) == 3 * (N_PER_CLASS // RUN) + 1  # + the nested Gamma-041
    assert all(len(s) == 1 for s in by_run.values())
    # blocks are assigned whole
    by_block = defaultdict(set)
    for v in manifest["files"].values():
        by_block[v["block"]].add(v["split"])
    assert all(len(s) == 1 for s in by_block.values())


def test_manifest_fractions(manifest):
    counts = Counter((v["split"], v["label"]) for v in manifest["files"].values())
    assert manifest["counts"] == {s: {c: counts[(s, c)] for c in CLASSES} for s in SPLITS}
    for c in CLASSES:
        total = EXPECTED_COUNTS[c]
        for s, frac in [("train", 0.70), ("val", 0.15), ("test", 0.15)]:
            got = counts[(s, c)]
            assert got > 0, (s, c)
            # blocks are whole runs of 5 (or 10 when a duplicate joins two runs)
            assert abs(got - frac * total) <= 2 * RUN + 1, (s, c, got)


def test_manifest_samples_skip_errors(manifest):
    listed = {s.path for split in SPLITS for s in manifest_samples(manifest, split)}
    assert listed == set(manifest["files"]) - {CORRUPT}
    for split in SPLITS:
        assert all(manifest["files"][s.path]["split"] == split for s in manifest_samples(manifest, split))


def test_make_split_deterministic(dataset, manifest):
    again = make_split(dataset, SUBDIR, run_length=RUN, min_correlation=MIN_CORRELATION, seed=0)
    assert again == manifest
    assert json.dumps(again, sort_keys=True) == json.dumps(manifest, sort_keys=True)


def test_make_split_other_seed_keeps_rules(dataset, manifest):
    other = make_split(dataset, SUBDIR, run_length=RUN, min_correlation=MIN_CORRELATION, seed=1)
    assert other["data_sha256"] == manifest["data_sha256"]
    assert set(other["files"]) == set(manifest["files"])
    for group in NEAR_GROUPS:
        assert len(_split_of(other, group)) == 1


def test_manifest_round_trip(tmp_path, manifest):
    path = tmp_path / "nested" / "m.json"
    save_manifest(manifest, path)
    loaded = load_manifest(path)
    assert loaded.pop("_path") == str(path)
    assert loaded == manifest


def test_verify_manifest(dataset, manifest, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    assert verify_manifest(manifest, copy) == []
    changed, missing = rel("Alpha", 5), rel("Gamma", 9)
    with open(copy / SUBDIR / changed, "ab") as fh:
        fh.write(b"\0")
    (copy / SUBDIR / missing).unlink()
    assert sorted(verify_manifest(manifest, copy)) == sorted([f"changed: {changed}", f"missing: {missing}"])
    assert verify_manifest(manifest, copy, check_hashes=False) == [f"missing: {missing}"]


# --------------------------------------------------------------------------- the real dataset

REPO = Path(__file__).resolve().parents[2]
REAL_ROOT = REPO.parent / "shared" / "datasets" / "all-taleqani"
REAL_MANIFEST = REPO / "oncoscope" / "training" / "splits" / "all-taleqani.json"


@pytest.mark.dataset
def test_committed_manifest_matches_dataset():
    if not REAL_ROOT.is_dir():
        pytest.skip(f"dataset not found at {REAL_ROOT} (needs ../shared/datasets/all-taleqani next to the repo)")
    m = load_manifest(REAL_MANIFEST)
    files = m["files"]
    base = REAL_ROOT / m["subdir"] if m.get("subdir") else REAL_ROOT

    # every listed file exists, and the folder holds no file the manifest lacks
    assert verify_manifest(m, REAL_ROOT, check_hashes=False) == []
    classes, samples = discover(REAL_ROOT, m.get("subdir"))
    assert classes == m["classes"]
    assert {s.path for s in samples} == set(files)

    # content: a fixed random sample of 50 files has the recorded sha256
    sample = random.Random(0).sample(sorted(files), min(50, len(files)))
    changed = [p for p in sample if sha256_file(base / p) != files[p]["sha256"]]
    assert not changed, f"content differs from the manifest: {changed[:5]}"

    # leakage rules
    by_group, by_run = defaultdict(set), defaultdict(set)
    run_length = m["params"]["run_length"]
    for p, v in files.items():
        assert v["split"] in SPLITS
        by_group[v["group"]].add(v["split"])
        n = file_number(p)
        if n is not None:
            by_run[(v["label"], (n - 1) // run_length)].add(v["split"])
    spanning = {g: s for g, s in by_group.items() if len(s) > 1}
    assert not spanning, f"near-duplicate groups spanning splits: {list(spanning)[:5]}"
    assert all(len(s) == 1 for s in by_run.values())

    # counts per split/class
    counts = Counter((v["split"], v["label"]) for v in files.values())
    assert m["counts"] == {s: {c: counts[(s, c)] for c in m["classes"]} for s in SPLITS}


def test_group_regex_keeps_augmented_copies_together(tmp_path):
    """Roboflow-style names: every `<stem>.rf.<hash>` copy of one radiograph stays on one side."""
    from PIL import Image as _Image

    from oncoscope.training.data import make_split

    rng = np.random.default_rng(0)
    for cls in ("cancer", "normal"):
        (tmp_path / cls).mkdir()
        for stem in range(12):
            for copy in range(3):  # different pixels per copy (rotated/augmented), same source stem
                arr = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                _Image.fromarray(arr).save(tmp_path / cls / f"{cls}{stem}_jpg.rf.{rng.integers(1e9):x}.jpg")
    m = make_split(tmp_path, run_length=0, group_regex=r"^(.*?)\.rf\.", val_frac=0.2, test_frac=0.2, seed=1)
    sides: dict[str, set] = {}
    for path, v in m["files"].items():
        stem = Path(path).name.split(".rf.")[0]
        sides.setdefault(stem, set()).add(v["split"])
    assert len(sides) == 24 and all(len(s) == 1 for s in sides.values())
    assert {v["split"] for v in m["files"].values()} == {"train", "val", "test"}
    assert m["params"]["group_regex"] == r"^(.*?)\.rf\."


@pytest.mark.dataset
@pytest.mark.slow
@pytest.mark.parametrize("analyzer_id", ["bone-xray", "brain-mri"])
def test_committed_radiology_manifests_do_not_leak(analyzer_id):
    """Recomputed with today's check: no copy (flip, rotation, crop, contrast) and no patient or
    radiograph stem on two sides, every source on every side."""
    import re

    from oncoscope.training.data import load_manifest, split_leaks, verify_manifest
    from oncoscope.training.recipes import DEFAULT_DATASETS, RECIPES, data_root

    if not (DEFAULT_DATASETS / RECIPES[analyzer_id]["dataset"]).is_dir():
        pytest.skip(f"dataset not found under {DEFAULT_DATASETS} (needs ../shared/datasets next to the repo)")
    root = data_root(analyzer_id)
    m = load_manifest(RECIPES[analyzer_id]["manifest"])
    assert verify_manifest(m, root, check_hashes=False) == []
    rules = [(r"", m["params"].get("group_regex"))] + [
        (src["dataset"] + "/", src["group_regex"]) for src in m["params"].get("sources", []) if src["group_regex"]]
    sides: dict = defaultdict(set)
    for path, v in m["files"].items():
        sides[("group", v["group"])].add(v["split"])
        for prefix, regex in rules:
            if regex and path.startswith(prefix):
                sides[(prefix, re.search(regex, Path(path).name).group(1))].add(v["split"])
    assert all(len(s) == 1 for s in sides.values())
    for src in m["sources"]:
        if m["sources"][src] >= 20:
            assert {v["split"] for v in m["files"].values() if v["source"] == src} == set(SPLITS), src
    leaks = split_leaks(m, root, m["params"]["min_correlation"])
    assert leaks["groups_across_splits"] == 0 and leaks["test_images_with_a_copy_in_train_or_val"] == 0


# --------------------------------------------------------------------------- several datasets in one split

def _write_scan_like(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(texture(seed)).save(path)


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory) -> Path:
    """`kaggle/<class>/` plus `tcga/{tumour,no_tumour,masks}/` with 3 slices per patient and class,
    patients of two institutions (AA, BB) in the file names."""
    root = tmp_path_factory.mktemp("datasets")
    for i, cls in enumerate(["glioma", "notumor"]):
        for n in range(30):
            _write_scan_like(root / "kaggle" / cls / f"k-{n:03d}.png", 500 + 100 * i + n)
    for p in range(12):
        inst = "AA" if p % 2 else "BB"
        for cls in ("tumour", "no_tumour", "masks"):
            for s in range(3):
                _write_scan_like(root / "tcga" / cls / f"TCGA_{inst}_{p:04d}_2000_{s}.png", 900 + 10 * p + s
                                 + {"tumour": 0, "no_tumour": 3, "masks": 6}[cls] * 1000)
    return root


def test_multi_split_groups_patients_and_records_sources(two_datasets, tmp_path):
    from oncoscope.training.data import SourceSpec, make_multi_split, write_without

    specs = [SourceSpec("kaggle"),
             SourceSpec("tcga", labels={"tumour": "glioma", "no_tumour": "notumor"},
                        group_regex=r"^(TCGA_[A-Z]+_\d+)_", source_regex=r"^TCGA_([A-Z]+)_")]
    m = make_multi_split(two_datasets, specs, "brain", seed=0)
    files = m["files"]
    assert not any("/masks/" in p for p in files)  # folders without a label are not images of the split
    assert m["classes"] == ["glioma", "notumor"]
    assert m["sources"] == {"kaggle": 60, "tcga/AA": 36, "tcga/BB": 36}
    assert files["tcga/tumour/TCGA_AA_0001_2000_0.png"]["label"] == "glioma"
    sides = defaultdict(set)
    for p, v in files.items():
        if p.startswith("tcga/"):
            sides[Path(p).name[:12]].add(v["split"])  # tumour and tumour-free slices of a patient together
    assert len(sides) == 12 and all(len(s) == 1 for s in sides.values())
    assert {v["split"] for v in files.values() if v["source"] == "kaggle"} == set(SPLITS)
    assert verify_manifest(m, two_datasets) == []
    save_manifest(m, tmp_path / "m.json")
    out = write_without(tmp_path / "m.json", ["tcga/AA"], tmp_path / "w.json")
    left = load_manifest(out)
    assert left["left_out"] == ["tcga/AA"]
    assert {v["source"] for v in left["files"].values()} == {"kaggle", "tcga/BB"}
    assert set(load_manifest(write_without(tmp_path / "m.json", ["tcga"], tmp_path / "w2.json"))["files"]) == \
        {p for p in files if p.startswith("kaggle/")}
    with pytest.raises(SystemExit, match="no source named"):
        write_without(tmp_path / "m.json", ["elsewhere"], tmp_path / "w3.json")


def test_split_leaks_reports_copies_across_sides(dataset, manifest):
    from oncoscope.training.data import split_leaks

    assert split_leaks(manifest, dataset, MIN_CORRELATION)["groups_across_splits"] == 0
    forged = json.loads(json.dumps(manifest))
    a, b = NEAR_ONLY[0]
    forged["files"][a]["split"], forged["files"][b]["split"] = "train", "test"
    leaks = split_leaks(forged, dataset, MIN_CORRELATION)
    assert leaks["groups_across_splits"] == 1 and leaks["test_images_with_a_copy_in_train_or_val"] == 1
