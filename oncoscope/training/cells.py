"""Single-cell training data for the ``smear-differential`` classifier, from every smear source.

Each source gives crops of one white cell each, cut by the same detector as at serving time
(:mod:`oncoscope.ml.wbc`) and brought to one physical scale (``CANON_MPP`` µm per pixel, a
``FIELD_UM`` µm window), so that the classifier sees cells, not cameras. Crops are cached as one
``.npz`` per source in a work folder (never in the repository).

Labels and what they are worth:

- ``pbc``: 8 normal classes from CellaVision DM96 crops (one centred cell each), split by image
  with near-duplicate groups kept together (``splits/pbc.json``).
- ``wbc-seg-tecom``: 5 classes, another lab and stain; the authors warn some labels were not
  reviewed by experts. Split by image (byte-identical copies together).
- ``all-taleqani``: labels per field (ALL patients versus hematogone patients), split by the same
  blocks of consecutive file numbers as ``smear-all`` (``splits/all-taleqani.json``). Every white
  cell of an ALL field is taken as ``blast`` and of a benign field as ``hematogone`` (weak labels:
  ALL fields also hold some normal cells; cleaned by size below).
- ``all-idb2``: centred crops, ``blast`` or ``normal`` (a normal white cell of unknown type), split by
  image. ``normal`` only counts as "not a blast" in evaluation.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..ml import wbc
from .data import MANIFEST_DIR, load_manifest

CANON_MPP = 0.4  # µm per pixel of every crop: near the coarsest source (all-taleqani, about 0.45)
FIELD_UM = 32.0  # crop window: a large monocyte (20 µm) with some context
CROP_PX = round(FIELD_UM / CANON_MPP)  # 80

# The reported vocabulary; ``unidentified`` is a decision (low confidence), not a trained class.
CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil", "immature_granulocyte",
           "erythroblast", "platelet", "blast")
# Trained only: benign lymphoid precursors of the hematogone patients; served as ``lymphocyte``
# (their probability is added to it) unless the card shows they separate from blasts.
TRAIN_ONLY = ("hematogone",)
TRAIN_CLASSES = CLASSES + TRAIN_ONLY
PBC_LABELS = {"ig": "immature_granulocyte"}
# Nucleus size (equivalent diameter, µm) a field cell must have to be taken with its field's label:
# smaller is a platelet, debris or a red-cell fragment; larger a clump.
FIELD_NUCLEUS_UM = (5.0, 16.0)


@dataclass
class CellCrops:
    source: str
    crops: np.ndarray  # (N, CROP_PX, CROP_PX, 3) uint8
    labels: np.ndarray  # (N,) str
    splits: np.ndarray  # (N,) "train" | "val" | "test"
    groups: np.ndarray  # (N,) str: cells of one image (or one block of fields) share a group
    paths: np.ndarray  # (N,) str: image the cell was cut from
    mpp: np.ndarray  # (N,) estimated µm per pixel of that image
    detected: np.ndarray  # (N,) bool: the detector found the cell (False: the image centre was used)

    def save(self, path: Path) -> None:
        np.savez_compressed(path, **{k: getattr(self, k) for k in self.__dataclass_fields__ if k != "source"},
                            source=self.source)

    @classmethod
    def load(cls, path: Path) -> "CellCrops":
        z = np.load(path, allow_pickle=False)
        return cls(source=str(z["source"]), **{k: z[k] for k in cls.__dataclass_fields__ if k != "source"})


def _hash_split(key: str, val: float = 0.15, test: float = 0.15) -> str:
    u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if u < test else "val" if u < test + val else "train"


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def centred_crop(rgb: np.ndarray) -> tuple[np.ndarray, float, bool]:
    """The cell nearest the centre of a single-cell image, at the canonical scale."""
    det = wbc.detect(rgb)
    h, w = rgb.shape[:2]
    mpp = det.scale.microns_per_pixel or wbc.WBC_DIAMETER_UM / (0.5 * min(h, w))
    near = [c for c in det.cells if math.hypot(c.centroid[0] - w / 2, c.centroid[1] - h / 2) < 0.25 * min(h, w)]
    if near:
        cell = min(near, key=lambda c: math.hypot(c.centroid[0] - w / 2, c.centroid[1] - h / 2))
    else:  # platelets and pale cells: the image centre, as the source framed it
        cell = wbc.Detection((0, 0, w, h), (w / 2, h / 2), 0.0, 0.0, 0.0, False)
    return wbc.crop_cells(rgb, [cell], mpp, CROP_PX, FIELD_UM)[0], mpp, bool(near)


def field_crops(rgb: np.ndarray) -> tuple[list[np.ndarray], float]:
    """Every whole white cell of a field whose nucleus size fits a white cell, at the canonical scale."""
    det = wbc.detect(rgb)
    mpp = det.scale.microns_per_pixel
    if not mpp:
        return [], 0.0
    whole = [c for c in det.cells if not c.touches_border
             and FIELD_NUCLEUS_UM[0] <= math.sqrt(4 * c.nucleus_area_px / math.pi) * mpp <= FIELD_NUCLEUS_UM[1]]
    out = list(wbc.crop_cells(rgb, whole, mpp, CROP_PX, FIELD_UM))
    return out, mpp


def _single_cell_source(name: str, items: list[tuple[Path, str, str, str]]) -> CellCrops:
    crops, mpps, found = [], [], []
    for path, *_ in items:
        crop, mpp, ok = centred_crop(_read(path))
        crops.append(crop)
        mpps.append(mpp)
        found.append(ok)
    return CellCrops(name, np.stack(crops), np.array([i[1] for i in items]), np.array([i[2] for i in items]),
                     np.array([i[3] for i in items]), np.array([str(i[0]) for i in items]), np.array(mpps),
                     np.array(found))


def pbc(root: Path) -> CellCrops:
    manifest = load_manifest(MANIFEST_DIR / "pbc.json")
    items = [(root / p, PBC_LABELS.get(f["label"], f["label"]), f["split"], f"pbc:{f['block']}")
             for p, f in sorted(manifest["files"].items())]
    return _single_cell_source("pbc", items)


def tecom(root: Path) -> CellCrops:
    items = []
    with open(root / "labels.csv") as fh:
        for row in csv.DictReader(fh):
            path = root / row["image"]
            sha = hashlib.sha256(path.read_bytes()).hexdigest()  # byte-identical copies share a split
            items.append((path, row["label"], _hash_split(sha), f"tecom:{sha[:12]}"))
    return _single_cell_source("wbc-seg-tecom", items)


def idb2(root: Path) -> CellCrops:
    items = []
    for label in ("blast", "normal"):
        for path in sorted((root / label).glob("*.jpg")):
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            items.append((path, label, _hash_split(sha), f"idb2:{sha[:12]}"))
    return _single_cell_source("all-idb2", items)


def taleqani(root: Path) -> CellCrops:
    manifest = load_manifest(MANIFEST_DIR / "all-taleqani.json")
    crops, labels, splits, groups, paths, mpps = [], [], [], [], [], []
    for rel, f in sorted(manifest["files"].items()):
        path = root / manifest.get("subdir", "Original") / rel
        cells, mpp = field_crops(_read(path))
        label = "hematogone" if f["label"] == "Benign" else "blast"
        for crop in cells:
            crops.append(crop)
            labels.append(label)
            splits.append(f["split"])
            groups.append(f"taleqani:{f['block']}")
            paths.append(str(path))
            mpps.append(mpp)
    n = len(crops)
    return CellCrops("all-taleqani", np.stack(crops), np.array(labels), np.array(splits), np.array(groups),
                     np.array(paths), np.array(mpps), np.ones(n, bool))


def reviewed(root: Path) -> CellCrops:
    """Cells verified in oncoscope's gallery (``oncoscope export-reviewed``): already canonical crops,
    labelled by the signer; split by case (its random group id)."""
    items = []
    with open(root / "labels.csv") as fh:
        for row in csv.DictReader(fh):
            if row["label"] in TRAIN_CLASSES:
                items.append((root / row["image"], row["label"], _hash_split(row["group"]), f"reviewed:{row['group']}"))
    crops = [np.asarray(Image.fromarray(_read(p)).resize((CROP_PX, CROP_PX), Image.BILINEAR)) for p, *_ in items]
    n = len(items)
    return CellCrops("oncoscope-reviewed", np.stack(crops) if n else np.zeros((0, CROP_PX, CROP_PX, 3), np.uint8),
                     np.array([i[1] for i in items]), np.array([i[2] for i in items]), np.array([i[3] for i in items]),
                     np.array([str(i[0]) for i in items]), np.full(n, CANON_MPP), np.ones(n, bool))


SOURCES = {"pbc": pbc, "wbc-seg-tecom": tecom, "all-taleqani": taleqani, "all-idb2": idb2,
           "oncoscope-reviewed": reviewed}
OPTIONAL = ("oncoscope-reviewed",)  # used when the folder exists (a clinic's own verified cells)


def build(datasets: Path, cache: Path, sources=tuple(SOURCES), force: bool = False) -> dict[str, CellCrops]:
    """Crops of every source (cached in ``cache``; delete a file to rebuild it)."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in sources:
        path = cache / f"cells-{name}.npz"
        if path.exists() and not force:
            out[name] = CellCrops.load(path)
            continue
        if name in OPTIONAL and not (datasets / name).is_dir():
            continue
        out[name] = SOURCES[name](datasets / name)
        out[name].save(path)
    return out


def cached_sources(cache: Path) -> dict[str, CellCrops]:
    """Every source already cut into ``cache`` (by :func:`build`), by name."""
    return {p.stem.removeprefix("cells-"): CellCrops.load(p) for p in sorted(Path(cache).glob("cells-*.npz"))}
