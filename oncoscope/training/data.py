"""Dataset tooling: class-per-folder datasets, audits, near-duplicate groups and
leak-free split manifests.

A *split manifest* is a JSON file that assigns every image of a dataset to
``train``, ``val`` or ``test``. It is committed to the repository and named by
every evaluation so figures can be traced to the exact images used.

Splitting rules (see ``make_split``):
* images whose perceptual hashes are within ``near_dup_threshold`` bits are one
  *group* (union-find, across classes too) and never land on two sides;
* within a class, file numbers are cut into contiguous *runs* of
  ``run_length`` numbers (consecutive numbers come from one slide, the closest
  proxy for a patient the release allows); a run is assigned whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..imaging.imageio import IMAGE_EXTENSIONS, ImageLoadError, load_image, pad_to_square, resize_rgb, to_gray3

SPLITS = ("train", "val", "test")
MANIFEST_DIR = Path(__file__).resolve().parent / "splits"


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the dataset root, POSIX separators
    label: str

    @property
    def number(self) -> int | None:
        return file_number(self.path)


def file_number(path: str) -> int | None:
    m = re.search(r"(\d+)(?!.*\d)", Path(path).stem)
    return int(m.group(1)) if m else None


def discover(root: str | os.PathLike, subdir: str | None = None) -> tuple[list[str], list[Sample]]:
    """List a class-per-folder dataset: ``root[/subdir]/<class>/**/<image>``.

    Returns (class names sorted, samples sorted by class then path).
    """
    base = Path(root) / subdir if subdir else Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {base}")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"no class folders in {base}")
    samples: list[Sample] = []
    for c in classes:
        for dirpath, _dirs, files in os.walk(base / c):
            for f in files:
                if Path(f).suffix.lower() in IMAGE_EXTENSIONS:
                    rel = Path(dirpath, f).relative_to(base).as_posix()
                    samples.append(Sample(rel, c))
    samples.sort(key=lambda s: (s.label, file_number(s.path) or 0, s.path))
    return classes, samples


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def phash(rgb: np.ndarray) -> int:
    """64-bit perceptual hash (DCT of a 32x32 grayscale thumbnail, 8x8 low band)."""
    gray = Image.fromarray(rgb).convert("L").resize((32, 32), Image.LANCZOS)
    a = np.asarray(gray, dtype=np.float64)
    d = _DCT32 @ a @ _DCT32.T
    low = d[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming_matrix(hashes: list[int]) -> np.ndarray:
    arr = np.array(hashes, dtype=np.uint64)
    x = arr[:, None] ^ arr[None, :]
    # popcount of uint64 via byte view
    b = x.view(np.uint8).reshape(len(hashes), len(hashes), 8)
    return np.unpackbits(b, axis=2).sum(axis=2).astype(np.int16)


class _UnionFind:
    def __init__(self, n: int):
        self.p = list(range(n))

    def find(self, a: int) -> int:
        while self.p[a] != a:
            self.p[a] = self.p[self.p[a]]
            a = self.p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.p[max(ra, rb)] = min(ra, rb)


@dataclass
class ImageFacts:
    sample: Sample
    sha256: str
    size: tuple[int, int] | None
    mode: str | None
    phash: int | None
    error: str | None = None


def scan(root: str | os.PathLike, subdir: str | None = None, progress: bool = False) -> tuple[list[str], list[ImageFacts]]:
    classes, samples = discover(root, subdir)
    base = Path(root) / subdir if subdir else Path(root)
    facts: list[ImageFacts] = []
    it = samples
    if progress:
        from tqdm import tqdm

        it = tqdm(samples, desc="scanning", unit="img")
    for s in it:
        p = base / s.path
        digest = sha256_file(p)
        try:
            img = load_image(p)
            facts.append(ImageFacts(s, digest, img.original_size, img.original_mode, phash(img.rgb)))
        except ImageLoadError as exc:
            facts.append(ImageFacts(s, digest, None, None, None, str(exc)))
    return classes, facts


def near_duplicate_groups(facts: list[ImageFacts], threshold: int) -> list[int]:
    """Group index for each image; exact duplicates and phash distance <= threshold join."""
    n = len(facts)
    uf = _UnionFind(n)
    by_sha: dict[str, int] = {}
    for i, f in enumerate(facts):
        if f.sha256 in by_sha:
            uf.union(by_sha[f.sha256], i)
        else:
            by_sha[f.sha256] = i
    ok = [i for i, f in enumerate(facts) if f.phash is not None]
    if ok:
        d = hamming_matrix([facts[i].phash for i in ok])
        ii, jj = np.nonzero(np.triu(d <= threshold, k=1))
        for a, b in zip(ii.tolist(), jj.tolist()):
            uf.union(ok[a], ok[b])
    roots = [uf.find(i) for i in range(n)]
    remap: dict[int, int] = {}
    return [remap.setdefault(r, len(remap)) for r in roots]


@dataclass
class AuditReport:
    root: str
    classes: list[str]
    counts: dict[str, int]
    sizes: dict[str, int]
    modes: dict[str, int]
    corrupt: list[dict]
    exact_duplicate_sets: list[list[str]]
    near_duplicate_groups: list[list[str]]
    cross_class_groups: list[list[str]]
    threshold: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "classes": self.classes,
            "counts": self.counts,
            "total": sum(self.counts.values()),
            "sizes": self.sizes,
            "modes": self.modes,
            "corrupt": self.corrupt,
            "exact_duplicate_sets": self.exact_duplicate_sets,
            "n_exact_duplicate_files": sum(len(s) - 1 for s in self.exact_duplicate_sets),
            "near_duplicate_threshold_bits": self.threshold,
            "near_duplicate_groups": self.near_duplicate_groups,
            "n_images_in_near_duplicate_groups": sum(len(g) for g in self.near_duplicate_groups),
            "cross_class_groups": self.cross_class_groups,
        }

    def to_text(self) -> str:
        d = self.to_dict()
        lines = [f"Dataset: {self.root}", f"Images: {d['total']} in {len(self.classes)} classes"]
        for c in self.classes:
            lines.append(f"  {c:<12} {self.counts.get(c, 0):>6}")
        lines.append("Sizes: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.sizes.items(), key=lambda kv: -kv[1])[:5]))
        lines.append("Modes: " + ", ".join(f"{k} x{v}" for k, v in self.modes.items()))
        lines.append(f"Corrupt/unreadable: {len(self.corrupt)}")
        for c in self.corrupt[:20]:
            lines.append(f"  {c['path']}: {c['error']}")
        lines.append(f"Exact duplicate sets: {len(self.exact_duplicate_sets)} ({d['n_exact_duplicate_files']} redundant files)")
        for s in self.exact_duplicate_sets[:10]:
            lines.append("  " + " = ".join(s))
        lines.append(
            f"Near-duplicate groups (phash distance <= {self.threshold} bits): {len(self.near_duplicate_groups)} "
            f"groups, {d['n_images_in_near_duplicate_groups']} images"
        )
        for g in self.near_duplicate_groups[:10]:
            lines.append("  " + " ~ ".join(g[:6]) + (" ..." if len(g) > 6 else ""))
        lines.append(f"Cross-class duplicate groups: {len(self.cross_class_groups)}")
        for g in self.cross_class_groups[:20]:
            lines.append("  " + " ~ ".join(g[:6]))
        return "\n".join(lines)


def audit(root: str | os.PathLike, subdir: str | None = None, threshold: int = 10, progress: bool = False) -> AuditReport:
    classes, facts = scan(root, subdir, progress=progress)
    counts = Counter(f.sample.label for f in facts)
    sizes = Counter(f"{f.size[0]}x{f.size[1]}" for f in facts if f.size)
    modes = Counter(f.mode for f in facts if f.mode)
    corrupt = [{"path": f.sample.path, "error": f.error} for f in facts if f.error]
    by_sha: dict[str, list[str]] = defaultdict(list)
    for f in facts:
        by_sha[f.sha256].append(f.sample.path)
    exact = [sorted(v) for v in by_sha.values() if len(v) > 1]
    groups = near_duplicate_groups(facts, threshold)
    members: dict[int, list[ImageFacts]] = defaultdict(list)
    for g, f in zip(groups, facts):
        members[g].append(f)
    near = [sorted(f.sample.path for f in m) for m in members.values() if len(m) > 1]
    cross = [sorted(f.sample.path for f in m) for m in members.values() if len({f.sample.label for f in m}) > 1]
    return AuditReport(str(root), classes, dict(counts), dict(sizes), dict(modes), corrupt, sorted(exact),
                       sorted(near), sorted(cross), threshold)


def make_split(root: str | os.PathLike, subdir: str | None = None, *, val_frac: float = 0.15, test_frac: float = 0.15,
               run_length: int = 30, threshold: int = 10, seed: int = 0, progress: bool = False,
               dataset_name: str | None = None, group_regex: str | None = None) -> dict:
    r"""Build a split manifest (a dict ready for JSON) as described in the module docstring.

    ``group_regex``: files whose names give the same first capture group are one unit (e.g.
    ``^(.*?)\.rf\.`` keeps every augmented copy of one radiograph together); ``run_length=0``
    turns the file-number runs off.
    """
    classes, facts = scan(root, subdir, progress=progress)
    groups = near_duplicate_groups(facts, threshold)
    # Units: (class, run of file numbers). Files without a number form their own unit per group.
    unit_of: list[tuple] = []
    rx = re.compile(group_regex) if group_regex else None
    for f, g in zip(facts, groups):
        if rx is not None:
            m = rx.search(Path(f.sample.path).name)
            unit_of.append((f.sample.label, "k:" + (m.group(1) if m else f.sample.path)))
            continue
        n = f.sample.number
        if run_length > 0 and n is not None:
            unit_of.append((f.sample.label, (n - 1) // run_length))
        else:
            unit_of.append((f.sample.label, f"g{g}"))
    units = sorted(set(unit_of), key=lambda u: (u[0], str(u[1])))
    uidx = {u: i for i, u in enumerate(units)}
    uf = _UnionFind(len(units))
    first_unit_of_group: dict[int, int] = {}
    for u, g in zip(unit_of, groups):
        if g in first_unit_of_group:
            uf.union(first_unit_of_group[g], uidx[u])
        else:
            first_unit_of_group[g] = uidx[u]
    # Blocks = connected units; assign whole blocks.
    block_members: dict[int, list[int]] = defaultdict(list)
    for i, u in enumerate(unit_of):
        block_members[uf.find(uidx[u])].append(i)
    rng = np.random.default_rng(seed)
    order = list(block_members)
    rng.shuffle(order)
    order.sort(key=lambda b: -len(block_members[b]))  # stable: largest blocks first, random among equals
    # Greedy quota filling: each block goes to the split with the largest absolute
    # deficit (target count - assigned count) for the block's dominant class.
    targets = {"test": test_frac, "val": val_frac, "train": 1.0 - val_frac - test_frac}
    per_class_total = Counter(f.sample.label for f in facts)
    filled = {s: Counter() for s in SPLITS}
    assignment: dict[int, str] = {}
    for b in order:
        idxs = block_members[b]
        cls_counts = Counter(facts[i].sample.label for i in idxs)
        main_cls = cls_counts.most_common(1)[0][0]
        deficits = {s: targets[s] * per_class_total[main_cls] - filled[s][main_cls] - len(idxs) / 2 for s in SPLITS}
        split = max(SPLITS, key=lambda s: (deficits[s], s == "train"))
        assignment[b] = split
        for c, k in cls_counts.items():
            filled[split][c] += k
    files = {}
    for i, f in enumerate(facts):
        b = uf.find(uidx[unit_of[i]])
        files[f.sample.path] = {
            "label": f.sample.label,
            "split": assignment[b],
            "sha256": f.sha256,
            "group": groups[i],
            "block": int(b),
            "error": f.error,
        }
    counts = {s: {c: filled[s][c] for c in classes} for s in SPLITS}
    agg = hashlib.sha256("".join(f"{p}:{v['sha256']}\n" for p, v in sorted(files.items())).encode()).hexdigest()
    return {
        "dataset": dataset_name or Path(root).name,
        "subdir": subdir,
        "classes": classes,
        "params": {"val_frac": val_frac, "test_frac": test_frac, "run_length": run_length, "group_regex": group_regex,
                   "near_dup_threshold_bits": threshold, "seed": seed, "hash": "phash-dct-64"},
        "counts": counts,
        "n_near_duplicate_groups": sum(1 for k in Counter(groups).values() if k > 1),
        "data_sha256": agg,
        "files": files,
    }


def save_manifest(manifest: dict, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.write("\n")


def load_manifest(path: str | os.PathLike) -> dict:
    with open(path) as fh:
        m = json.load(fh)
    m["_path"] = str(path)
    return m


def manifest_samples(manifest: dict, split: str) -> list[Sample]:
    return [Sample(p, v["label"]) for p, v in sorted(manifest["files"].items())
            if v["split"] == split and not v.get("error")]


def verify_manifest(manifest: dict, root: str | os.PathLike, check_hashes: bool = True) -> list[str]:
    """Return a list of problems (missing files, changed content) — empty when the data matches."""
    base = Path(root) / manifest["subdir"] if manifest.get("subdir") else Path(root)
    problems = []
    for p, v in manifest["files"].items():
        fp = base / p
        if not fp.exists():
            problems.append(f"missing: {p}")
        elif check_hashes and sha256_file(fp) != v["sha256"]:
            problems.append(f"changed: {p}")
    return problems


def load_arrays(root: str | os.PathLike, samples: list[Sample], classes: list[str], size: int | None = None,
                subdir: str | None = None, pad: bool = False, gray: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Load samples into a uint8 (N, H, W, 3) array and int64 labels (images resized to ``size``).

    ``gray``: luminance replicated to 3 channels; ``pad``: pad to square first (aspect preserved).
    """
    base = Path(root) / subdir if subdir else Path(root)
    xs, ys = [], []
    for s in samples:
        rgb = load_image(base / s.path).rgb
        if gray:
            rgb = to_gray3(rgb)
        if pad:
            rgb = pad_to_square(rgb)[0]
        if size:
            rgb = resize_rgb(rgb, size)
        xs.append(rgb)
        ys.append(classes.index(s.label))
    return np.stack(xs), np.array(ys, dtype=np.int64)
