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

from oncoscope.training.data import (SPLITS, audit, discover, file_number, hamming_matrix, load_manifest, make_split,
                                     manifest_samples, phash, save_manifest, sha256_file, verify_manifest)
from oncoscope.imaging.imageio import load_image

SIZE, PAD = 96, 4
N_PER_CLASS = 40
CLASSES = ["Alpha", "Beta", "Gamma"]
SUBDIR = "Original"
RUN = 5  # run_length used for the synthetic splits: 8 runs per class
THRESHOLD = 10


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
    return audit(dataset, SUBDIR, threshold=THRESHOLD)


@pytest.fixture(scope="module")
def manifest(dataset):
    return make_split(dataset, SUBDIR, run_length=RUN, threshold=THRESHOLD, seed=0)


def all_paths(root: Path) -> set[str]:
    return {s.path for s in discover(root, SUBDIR)[1]}


# --------------------------------------------------------------------------- small helpers

def test_file_number():
    assert file_number("Benign/WBC-Benign-001.jpg") == 1
    assert file_number("x/a12b034.png") == 34
    assert file_number("x/reference.bmp") is None


def test_hamming_matrix_matches_popcount():
    rng = random.Random(0)
    hashes = [rng.getrandbits(64) for _ in range(12)] + [0, 2**64 - 1]
    d = hamming_matrix(hashes)
    for i, a in enumerate(hashes):
        for j, b in enumerate(hashes):
            assert d[i, j] == bin(a ^ b).count("1")


def _hd(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def test_phash_shift_and_reencode_close():
    for seed in range(5):
        tex = texture(seed)
        h0 = phash(load_image(jpeg(view(tex))).rgb)
        assert _hd(h0, phash(view(tex))) <= 10  # raw vs JPEG
        for dx, dy in [(1, 0), (0, 1)]:
            h1 = phash(load_image(jpeg(view(tex, dx, dy), quality=85)).rgb)
            assert _hd(h0, h1) <= 10, (seed, dx, dy)


def test_phash_unrelated_far():
    base = phash(view(texture(100)))
    noise = np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    assert _hd(base, phash(noise)) > 20
    others = [_hd(base, phash(view(texture(s)))) for s in range(101, 111)]
    assert min(others) > THRESHOLD
    assert np.mean(others) > 20


def test_phash_is_64_bit_and_deterministic():
    rgb = view(texture(3))
    h = phash(rgb)
    assert 0 <= h < 2**64
    assert h == phash(rgb.copy())


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
    assert d["near_duplicate_threshold_bits"] == THRESHOLD
    json.dumps(d)  # serialisable
    text = report.to_text()
    assert CORRUPT in text
    assert "Cross-class duplicate groups: 1" in text


def test_audit_threshold_zero_keeps_exact_duplicates(dataset):
    # With threshold 0 only identical hashes join; the byte copies must still be grouped.
    strict = audit(dataset, SUBDIR, threshold=0)
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
    again = make_split(dataset, SUBDIR, run_length=RUN, threshold=THRESHOLD, seed=0)
    assert again == manifest
    assert json.dumps(again, sort_keys=True) == json.dumps(manifest, sort_keys=True)


def test_make_split_other_seed_keeps_rules(dataset, manifest):
    other = make_split(dataset, SUBDIR, run_length=RUN, threshold=THRESHOLD, seed=1)
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
@pytest.mark.parametrize("name,regex", [("bone-xray", r"^(.*?)\.rf\."), ("brain-mri", None)])
def test_committed_radiology_manifests_do_not_leak(name, regex):
    import re

    from oncoscope.training.data import MANIFEST_DIR, load_manifest, verify_manifest

    root = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / name
    if not root.is_dir():
        pytest.skip(f"dataset not found at {root} (needs ../shared/datasets/{name} next to the repo)")
    m = load_manifest(MANIFEST_DIR / f"{name}.json")
    assert verify_manifest(m, root, check_hashes=False) == []
    groups: dict = {}
    for path, v in m["files"].items():
        groups.setdefault(("g", v["group"]), set()).add(v["split"])
        if regex:
            groups.setdefault(("stem", re.search(regex, Path(path).name).group(1)), set()).add(v["split"])
    assert all(len(s) == 1 for s in groups.values())
