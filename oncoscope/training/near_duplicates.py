"""Near-duplicate detection that sees the copies dataset builders make: flips, 90-degree rotations,
crops, padding and contrast or gamma changes.

A plain perceptual hash misses a mirrored copy (its DCT signs flip), and a gamma change moves the
median it thresholds against. So each image is first made independent of those edits, then hashed
in every orientation:

* the uniform border (black padding, film margins) is trimmed, so padding and most crops that only
  remove background do not matter;
* grey levels are replaced by their rank (histogram equalisation), which any monotonic intensity
  change (contrast, brightness, gamma, window/level) leaves unchanged;
* a 16x16 thumbnail is taken of the 8 flips/rotations of the whole image and of its central 80%
  (a tighter crop of the same scan).

Two images are near duplicates when some variant of one correlates with the other's upright
thumbnail at ``min_correlation`` or more (either way round). A 64-bit hash was tried first: on brain
MR slices, which all look alike at that resolution, any threshold that joined the copies also chained
thousands of distinct scans into one group.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HASH_NAME = "equalised-thumbnail-16-dihedral-crop-correlation"
SIDE = 16  # thumbnail side: coarse enough to forgive re-encoding and small shifts
ANGLES = (0.0, -7.0, 7.0, -14.0, 14.0)  # small tilts on top of the right angles (degrees)
CENTRAL_CROP = 0.8
N_VARIANTS = 8 * 2 * len(ANGLES)  # orientations x (whole, central 80 %) x tilts
DEFAULT_MIN_CORRELATION = 0.93
QUANTUM = 8
_BORDER_TOLERANCE = 24  # grey levels: how far from the border colour still counts as border
_CONTENT_SHARE = 0.03  # a row or column with fewer content pixels is border (compression ringing, specks)


def trim_border(gray: np.ndarray) -> np.ndarray:
    """The image without rows and columns that are all (nearly) the border's colour."""
    edge = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    fill = np.median(edge)
    content = np.abs(gray.astype(np.int16) - fill) > _BORDER_TOLERANCE
    rows = np.flatnonzero(content.mean(1) > _CONTENT_SHARE)
    cols = np.flatnonzero(content.mean(0) > _CONTENT_SHARE)
    if len(rows) < 8 or len(cols) < 8:  # blank or nearly blank: keep it whole
        return gray
    return gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def equalise(gray: np.ndarray) -> np.ndarray:
    """Mean rank of each grey level, in [0, 1]: unchanged by any increasing intensity mapping."""
    _values, inverse, counts = np.unique(gray, return_inverse=True, return_counts=True)
    below = np.cumsum(counts) - counts
    mean_rank = (below + (counts - 1) / 2.0) / max(1, gray.size - 1)
    return mean_rank[inverse].reshape(gray.shape)


def _thumbnail(gray: np.ndarray) -> np.ndarray:
    # Ranked after shrinking (averages of many pixels) and in steps of 8 grey levels: otherwise the
    # compression noise of a flat dark background spreads over many ranks.
    small = Image.fromarray(gray).resize((SIDE, SIDE), Image.BOX)
    return equalise(np.asarray(small, dtype=np.uint8) // QUANTUM)


def _unit(v: np.ndarray) -> np.ndarray:
    v = v - v.mean(axis=-1, keepdims=True)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.where(n > 0, n, 1)).astype(np.float32)


def signature(rgb: np.ndarray) -> np.ndarray:
    """(N_VARIANTS, SIDE*SIDE) float32 unit vectors; row 0 is the upright whole image."""
    gray = trim_border(np.asarray(Image.fromarray(rgb).convert("L")))
    h, w = gray.shape
    dy, dx = int(round(h * (1 - CENTRAL_CROP) / 2)), int(round(w * (1 - CENTRAL_CROP) / 2))
    out = []
    views = [gray, gray[dy:h - dy, dx:w - dx]]
    for angle in ANGLES[1:]:
        tilted = Image.fromarray(gray).rotate(angle, Image.BILINEAR, fillcolor=int(np.median(gray)))
        t = np.asarray(tilted)
        views.append(t[dy:h - dy, dx:w - dx])  # the centre: no filled corners
        views.append(t)
    for view in views:
        a = _thumbnail(np.ascontiguousarray(view))
        for k in range(4):
            r = np.rot90(a, k)
            out += [r.ravel(), r[:, ::-1].ravel()]
    return _unit(np.stack(out))


def similarity(signatures: np.ndarray, chunk: int = 128) -> np.ndarray:
    """(N, N) float32: the highest correlation between any variant of one image and the other's
    upright thumbnail, either way round. ``signatures`` is (N, N_VARIANTS, SIDE*SIDE)."""
    n = len(signatures)
    upright = signatures[:, 0]  # (N, D)
    sim = np.empty((n, n), dtype=np.float32)
    for s in range(0, n, chunk):
        block = signatures[s:s + chunk]  # (c, V, D)
        sim[s:s + chunk] = (block @ upright.T).max(axis=1)
    return np.maximum(sim, sim.T)


class UnionFind:
    """Disjoint sets over 0..n-1; a set is named by its smallest member."""

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


def groups_within(similar: np.ndarray) -> list[int]:
    """Connected components of a boolean (N, N) relation, numbered in order of first member."""
    uf = UnionFind(len(similar))
    ii, jj = np.nonzero(np.triu(similar, k=1))
    for a, b in zip(ii.tolist(), jj.tolist()):
        uf.union(a, b)
    remap: dict[int, int] = {}
    return [remap.setdefault(uf.find(i), len(remap)) for i in range(len(similar))]
