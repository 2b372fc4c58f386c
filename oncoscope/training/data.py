"""Dataset tooling: class-per-folder datasets, audits, near-duplicate groups and
leak-free split manifests.

A *split manifest* is a JSON file that assigns every image of a dataset to
``train``, ``val`` or ``test``. It is committed to the repository and named by
every evaluation so figures can be traced to the exact images used.

Splitting rules (see ``make_split``):
* images that are copies of each other under flips, 90-degree rotations, crops and contrast
  changes (``near_duplicates``: correlation >= ``min_correlation``) are one *group* (union-find,
  across classes too) and never land on two sides;
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..imaging.imageio import IMAGE_EXTENSIONS, ImageLoadError, load_image, pad_to_square, resize_rgb, to_gray3
from .near_duplicates import DEFAULT_MIN_CORRELATION, HASH_NAME, UnionFind, groups_within, signature, similarity

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


def discover(root: str | os.PathLike, subdir: str | None = None,
             labels: dict[str, str] | None = None) -> tuple[list[str], list[Sample]]:
    """List a class-per-folder dataset: ``root[/subdir]/<class>/**/<image>``.

    ``labels``: folder -> class name; only those folders are read (others, e.g. masks, skipped).
    Returns (class names sorted, samples sorted by class then path).
    """
    base = Path(root) / subdir if subdir else Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {base}")
    folders = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if labels is not None:
        folders = [f for f in folders if f in labels]
    if not folders:
        raise ValueError(f"no class folders in {base}")
    samples: list[Sample] = []
    for c in folders:
        for dirpath, _dirs, files in os.walk(base / c):
            for f in files:
                if Path(f).suffix.lower() in IMAGE_EXTENSIONS:
                    rel = Path(dirpath, f).relative_to(base).as_posix()
                    samples.append(Sample(rel, labels[c] if labels else c))
    classes = sorted({s.label for s in samples}) if labels else folders
    samples.sort(key=lambda s: (s.label, file_number(s.path) or 0, s.path))
    return classes, samples


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ImageFacts:
    sample: Sample
    sha256: str
    size: tuple[int, int] | None
    mode: str | None
    signature: np.ndarray | None
    error: str | None = None


def scan(root: str | os.PathLike, subdir: str | None = None, progress: bool = False,
         labels: dict[str, str] | None = None) -> tuple[list[str], list[ImageFacts]]:
    classes, samples = discover(root, subdir, labels)
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
            facts.append(ImageFacts(s, digest, img.original_size, img.original_mode, signature(img.rgb)))
        except ImageLoadError as exc:
            facts.append(ImageFacts(s, digest, None, None, None, str(exc)))
    return classes, facts


def near_duplicate_groups(facts: list[ImageFacts], min_correlation: float) -> list[int]:
    """Group index for each image: exact duplicates, and copies under flips, 90-degree rotations,
    crops and contrast changes (see ``near_duplicates``), join."""
    n = len(facts)
    joined = np.eye(n, dtype=bool)
    by_sha: dict[str, int] = {}
    for i, f in enumerate(facts):
        first = by_sha.setdefault(f.sha256, i)
        joined[i, first] = joined[first, i] = True
    ok = [i for i, f in enumerate(facts) if f.signature is not None]
    if ok:
        sim = similarity(np.stack([facts[i].signature for i in ok]))
        joined[np.ix_(ok, ok)] |= sim >= min_correlation
    return groups_within(joined)


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
    min_correlation: float
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
            "near_duplicate_check": HASH_NAME,
            "near_duplicate_min_correlation": self.min_correlation,
            "near_duplicate_groups": self.near_duplicate_groups,
            "n_images_in_near_duplicate_groups": sum(len(g) for g in self.near_duplicate_groups),
            "cross_class_groups": self.cross_class_groups,
            **self.extra,
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
            f"Near-duplicate groups (copies under flips, rotations, crops, contrast; correlation >= "
            f"{self.min_correlation}): {len(self.near_duplicate_groups)} "
            f"groups, {d['n_images_in_near_duplicate_groups']} images"
        )
        for g in self.near_duplicate_groups[:10]:
            lines.append("  " + " ~ ".join(g[:6]) + (" ..." if len(g) > 6 else ""))
        lines.append(f"Cross-class duplicate groups: {len(self.cross_class_groups)}")
        for g in self.cross_class_groups[:20]:
            lines.append("  " + " ~ ".join(g[:6]))
        if leaks := self.extra.get("split_leaks"):
            lines.append(f"Split manifest: {leaks['groups_across_splits']} groups of copies straddle splits; "
                         f"{leaks['test_images_with_a_copy_in_train_or_val']} of {leaks['test_images']} test images "
                         "have a copy in train or val")
        return "\n".join(lines)


def audit(root: str | os.PathLike, subdir: str | None = None, min_correlation: float = DEFAULT_MIN_CORRELATION,
          progress: bool = False) -> AuditReport:
    classes, facts = scan(root, subdir, progress=progress)
    counts = Counter(f.sample.label for f in facts)
    sizes = Counter(f"{f.size[0]}x{f.size[1]}" for f in facts if f.size)
    modes = Counter(f.mode for f in facts if f.mode)
    corrupt = [{"path": f.sample.path, "error": f.error} for f in facts if f.error]
    by_sha: dict[str, list[str]] = defaultdict(list)
    for f in facts:
        by_sha[f.sha256].append(f.sample.path)
    exact = [sorted(v) for v in by_sha.values() if len(v) > 1]
    groups = near_duplicate_groups(facts, min_correlation)
    members: dict[int, list[ImageFacts]] = defaultdict(list)
    for g, f in zip(groups, facts):
        members[g].append(f)
    near = [sorted(f.sample.path for f in m) for m in members.values() if len(m) > 1]
    cross = [sorted(f.sample.path for f in m) for m in members.values() if len({f.sample.label for f in m}) > 1]
    return AuditReport(str(root), classes, dict(counts), dict(sizes), dict(modes), corrupt, sorted(exact),
                       sorted(near), sorted(cross), min_correlation)


@dataclass(frozen=True)
class SourceSpec:
    r"""One dataset folder in a split that joins several (``make_multi_split``).

    ``labels``: class folder -> class name (folders not named are skipped, e.g. ``masks``);
    ``group_regex``: files whose names give the same first capture group are one unit (a patient);
    ``source_regex``: its first group names the collection inside the dataset (e.g. the
    institution code in ``TCGA_CS_4941_...``); without it the dataset is one source.
    """
    dataset: str
    subdir: str | None = None
    labels: dict | None = None
    group_regex: str | None = None
    run_length: int = 0
    source_regex: str | None = None

    def source_of(self, path: str) -> str:
        if self.source_regex and (m := re.search(self.source_regex, Path(path).name)):
            return f"{self.dataset}/{m.group(1)}"
        return self.dataset


def _units(facts: list[ImageFacts], groups: list[int], run_length: int, group_regex: str | None) -> list[tuple]:
    """The unit each file is assigned with: (class, key), key a file-number run or its near-duplicate
    group; or ("", name group) across classes."""
    rx = re.compile(group_regex) if group_regex else None
    out: list[tuple] = []
    for f, g in zip(facts, groups):
        if rx is not None:
            m = rx.search(Path(f.sample.path).name)
            # not per class: one patient's tumour and tumour-free slices go together
            out.append(("", "k:" + (m.group(1) if m else f.sample.path)))
        elif run_length > 0 and f.sample.number is not None:
            out.append((f.sample.label, (f.sample.number - 1) // run_length))
        else:
            out.append((f.sample.label, f"g{g}"))
    return out


def _fractions(val_frac: float, test_frac: float) -> dict[str, float]:
    return {"test": test_frac, "val": val_frac, "train": 1.0 - val_frac - test_frac}


def _assign(facts: list[ImageFacts], unit_of: list[tuple], groups: list[int], sources: list[str],
            fractions: dict[str, float], seed: int) -> dict[str, dict]:
    """Files -> split. Units joined by a near-duplicate group form a *block*, assigned whole;
    blocks are dealt largest first to the split furthest below its share of the block's main
    (source, class), so every source is represented on every side."""
    units = sorted(set(unit_of), key=lambda u: (u[0], str(u[1])))
    uidx = {u: i for i, u in enumerate(units)}
    uf = UnionFind(len(units))
    first_unit_of_group: dict[int, int] = {}
    for u, g in zip(unit_of, groups):
        uf.union(first_unit_of_group.setdefault(g, uidx[u]), uidx[u])
    block_members: dict[int, list[int]] = defaultdict(list)
    for i, u in enumerate(unit_of):
        block_members[uf.find(uidx[u])].append(i)
    rng = np.random.default_rng(seed)
    order = list(block_members)
    rng.shuffle(order)
    order.sort(key=lambda b: -len(block_members[b]))  # stable: largest blocks first, random among equals
    strata = [(src, f.sample.label) for src, f in zip(sources, facts)]
    total = Counter(strata)
    filled = {s: Counter() for s in SPLITS}
    assignment: dict[int, str] = {}
    for b in order:
        idxs = block_members[b]
        here = Counter(strata[i] for i in idxs)
        main = here.most_common(1)[0][0]
        deficits = {s: fractions[s] * total[main] - filled[s][main] - len(idxs) / 2 for s in SPLITS}
        assignment[b] = split = max(SPLITS, key=lambda s: (deficits[s], s == "train"))
        filled[split].update(here)
    return {f.sample.path: {"label": f.sample.label, "split": assignment[uf.find(uidx[unit_of[i]])],
                            "sha256": f.sha256, "group": groups[i], "block": int(uf.find(uidx[unit_of[i]])),
                            "source": sources[i], "error": f.error}
            for i, f in enumerate(facts)}


def _manifest(name: str, subdir: str | None, classes: list[str], files: dict, groups: list[int], params: dict) -> dict:
    counts = {s: {c: 0 for c in classes} for s in SPLITS}
    for v in files.values():
        counts[v["split"]][v["label"]] += 1
    agg = hashlib.sha256("".join(f"{p}:{v['sha256']}\n" for p, v in sorted(files.items())).encode()).hexdigest()
    return {
        "dataset": name,
        "subdir": subdir,
        "classes": classes,
        "params": dict(params, near_duplicate_check=HASH_NAME),
        "counts": counts,
        "sources": dict(sorted(Counter(v["source"] for v in files.values()).items())),
        "n_near_duplicate_groups": sum(1 for k in Counter(groups).values() if k > 1),
        "data_sha256": agg,
        "files": files,
    }


def make_split(root: str | os.PathLike, subdir: str | None = None, *, val_frac: float = 0.15, test_frac: float = 0.15,
               run_length: int = 30, min_correlation: float = DEFAULT_MIN_CORRELATION, seed: int = 0,
               progress: bool = False, dataset_name: str | None = None, group_regex: str | None = None) -> dict:
    r"""Build a split manifest (a dict ready for JSON) as described in the module docstring.

    ``group_regex``: files whose names give the same first capture group are one unit (e.g.
    ``^(.*?)\.rf\.`` keeps every augmented copy of one radiograph together); ``run_length=0``
    turns the file-number runs off.
    """
    classes, facts = scan(root, subdir, progress=progress)
    groups = near_duplicate_groups(facts, min_correlation)
    name = dataset_name or Path(root).name
    files = _assign(facts, _units(facts, groups, run_length, group_regex), groups, [name] * len(facts),
                    _fractions(val_frac, test_frac), seed)
    params = {"val_frac": val_frac, "test_frac": test_frac, "run_length": run_length, "group_regex": group_regex,
              "min_correlation": min_correlation, "seed": seed}
    return _manifest(name, subdir, classes, files, groups, params)


def make_multi_split(datasets_root: str | os.PathLike, specs: list[SourceSpec], name: str, *,
                     val_frac: float = 0.15, test_frac: float = 0.15,
                     min_correlation: float = DEFAULT_MIN_CORRELATION, seed: int = 0) -> dict:
    """One manifest over several dataset folders (paths relative to ``datasets_root``): near
    duplicates are grouped across all of them, each file records its source."""
    facts: list[ImageFacts] = []
    sources: list[str] = []
    spec_of: list[SourceSpec] = []
    for spec in specs:
        base = Path(datasets_root) / spec.dataset
        _classes, part = scan(base, spec.subdir, labels=spec.labels)
        prefix = "/".join(x for x in (spec.dataset, spec.subdir) if x)
        for f in part:
            facts.append(ImageFacts(Sample(f"{prefix}/{f.sample.path}", f.sample.label), f.sha256, f.size, f.mode,
                                    f.signature, f.error))
            sources.append(spec.source_of(f.sample.path))
            spec_of.append(spec)
    groups = near_duplicate_groups(facts, min_correlation)
    unit_of = [None] * len(facts)
    for spec in specs:
        idx = [i for i, s in enumerate(spec_of) if s is spec]
        for i, u in zip(idx, _units([facts[i] for i in idx], [groups[i] for i in idx], spec.run_length,
                                    spec.group_regex)):
            unit_of[i] = (u[0], f"{spec.dataset}:{u[1]}")
    files = _assign(facts, unit_of, groups, sources, _fractions(val_frac, test_frac), seed)
    classes = sorted({f.sample.label for f in facts})
    params = {"val_frac": val_frac, "test_frac": test_frac, "min_correlation": min_correlation, "seed": seed,
              "sources": [asdict(s) for s in specs]}
    return _manifest(name, None, classes, files, groups, params)


def split_leaks(manifest: dict, root: str | os.PathLike, min_correlation: float = DEFAULT_MIN_CORRELATION) -> dict:
    """How far an existing manifest leaks by today's near-duplicate check: groups of copies that
    straddle splits, and test images with a copy in train or val."""
    base = Path(root) / manifest["subdir"] if manifest.get("subdir") else Path(root)
    paths = sorted(p for p, v in manifest["files"].items() if not v.get("error"))
    facts = [ImageFacts(Sample(p, manifest["files"][p]["label"]), manifest["files"][p]["sha256"], None, None,
                        signature(load_image(base / p).rgb)) for p in paths]
    groups = near_duplicate_groups(facts, min_correlation)
    sides: dict[int, set[str]] = defaultdict(set)
    for p, g in zip(paths, groups):
        sides[g].add(manifest["files"][p]["split"])
    leaky = {g for g, s in sides.items() if len(s) > 1}
    test = [g for p, g in zip(paths, groups) if manifest["files"][p]["split"] == "test"]
    return {"near_duplicate_check": HASH_NAME, "min_correlation": min_correlation,
            "groups_across_splits": len(leaky),
            "test_images": len(test),
            "test_images_with_a_copy_in_train_or_val": sum(g in leaky for g in test)}


def source_matches(source: str, names: list[str]) -> bool:
    """``tcga-lgg-flair`` names all its institutions; ``tcga-lgg-flair/DU`` one of them."""
    return any(source == n or source.startswith(n + "/") for n in names)


def write_without(manifest_path: str | os.PathLike, sources: list[str], out: Path) -> Path:
    """A copy of a manifest without the files of ``sources`` (for leave-one-source-out training)."""
    m = load_manifest(manifest_path)
    m.pop("_path")
    known = set(m.get("sources", {}))
    for name in sources:
        if not any(source_matches(k, [name]) for k in known):
            raise SystemExit(f"no source named {name} in {manifest_path}; known: {', '.join(sorted(known))}")
    # whole blocks: a copy of a left-out image filed under another source must not stay in training
    blocks = {v["block"] for v in m["files"].values() if source_matches(v.get("source", m["dataset"]), sources)}
    m["files"] = {p: v for p, v in m["files"].items() if v["block"] not in blocks}
    m["left_out"] = sources
    save_manifest(m, out)
    return out


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
