"""The copy check behind `data audit` and `data split`: it must see the copies dataset builders make
(flips, right-angle rotations, small tilts, crops, padding, contrast and gamma, re-encoding) and keep
distinct scans apart. Generated scan-like images here; the real brain-mri copies when ../shared is there."""

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from oncoscope.training.near_duplicates import (DEFAULT_MIN_CORRELATION, N_VARIANTS, SIDE, equalise,
                                                groups_within, signature, similarity, trim_border)

from ..conftest import dataset_dir


def scan(seed: int, size: int = 200) -> np.ndarray:
    """A head-like slice: a bright ellipse with lobes of texture on a black background, off-centre
    blobs so that no flip or rotation maps it onto itself."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    head = (xx / 0.42) ** 2 + (yy / 0.36) ** 2 < 1
    low = np.asarray(Image.fromarray(rng.integers(0, 255, (6, 6), dtype=np.uint8)).resize((size, size),
                                                                                           Image.BICUBIC), float)
    img = np.where(head, 60 + 0.6 * low, 0.0)
    for _ in range(3):
        cy, cx, r = rng.uniform(-0.25, 0.25), rng.uniform(-0.3, 0.3), rng.uniform(0.04, 0.1)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(180, 250)
    return np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def jpeg(rgb: np.ndarray, quality: int = 80) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def gamma(rgb: np.ndarray, g: float) -> np.ndarray:
    return (255 * (rgb / 255.0) ** g).astype(np.uint8)


COPIES = {
    "mirror": lambda a: a[:, ::-1],
    "upside down": lambda a: a[::-1],
    "rotated 90": lambda a: np.rot90(a),
    "rotated 270": lambda a: np.rot90(a, 3),
    "transposed": lambda a: np.ascontiguousarray(a.transpose(1, 0, 2)),
    "gamma 0.5": lambda a: gamma(a, 0.5),
    "gamma 2": lambda a: gamma(a, 2.0),
    "contrast halved": lambda a: (a * 0.5 + 40).astype(np.uint8),
    "padded": lambda a: np.pad(a, ((30, 30), (10, 10), (0, 0))),
    "cropped 85%": lambda a: a[15:-15, 15:-15],
    "content cropped 10% a side": lambda a: np.ascontiguousarray(a[40:-40, 37:-37]),
    "tilted 10 deg": lambda a: np.asarray(Image.fromarray(a).rotate(10, Image.BILINEAR)),
    "jpeg q60": lambda a: jpeg(a, 60),
    "shrunk to 120 px": lambda a: np.asarray(Image.fromarray(a).resize((120, 120), Image.BILINEAR)),
    "mirror + gamma + jpeg": lambda a: jpeg(gamma(a[:, ::-1], 1.6), 70),
}


def _sim(a: np.ndarray, b: np.ndarray) -> float:
    return float(similarity(np.stack([signature(a), signature(b)]))[0, 1])


@pytest.mark.parametrize("edit", list(COPIES))
def test_copies_are_seen(edit):
    for seed in range(4):
        a = scan(seed)
        assert _sim(a, COPIES[edit](a)) >= DEFAULT_MIN_CORRELATION, (edit, seed)


def test_distinct_scans_stay_apart():
    sigs = np.stack([signature(scan(s)) for s in range(30)])
    sim = similarity(sigs)
    off = sim[~np.eye(len(sim), dtype=bool)]
    assert off.max() < DEFAULT_MIN_CORRELATION
    assert groups_within(sim >= DEFAULT_MIN_CORRELATION) == list(range(30))


def test_signature_shape_and_symmetry():
    s = signature(scan(0))
    assert s.shape == (N_VARIANTS, SIDE * SIDE) and s.dtype == np.float32
    assert np.allclose(np.linalg.norm(s, axis=1), 1, atol=1e-5)
    sigs = np.stack([signature(scan(i)) for i in range(3)] + [signature(scan(0)[:, ::-1])])
    sim = similarity(sigs)
    assert np.allclose(sim, sim.T) and sim[0, 3] > 0.99


def test_equalise_ignores_monotonic_intensity_changes():
    g = np.random.default_rng(0).integers(0, 200, (20, 20)).astype(np.uint8)
    assert np.allclose(equalise(g), equalise((g.astype(float) ** 1.3 / 200 ** 0.3 + 20).astype(np.uint8)), atol=0.02)
    assert equalise(np.zeros((4, 4), np.uint8)).tolist() == [[0.5] * 4] * 4


def test_trim_border_removes_padding_and_keeps_blank_images():
    a = np.zeros((50, 60), np.uint8)
    a[10:30, 5:40] = 200
    assert trim_border(a).shape == (20, 35)
    blank = np.full((10, 10), 7, np.uint8)
    assert trim_border(blank).shape == (10, 10)


def test_groups_within_chains_and_numbers_in_order():
    rel = np.zeros((5, 5), bool)
    rel[0, 3] = rel[3, 4] = True
    assert groups_within(rel | rel.T) == [0, 1, 2, 0, 0]


@pytest.mark.dataset
def test_brain_mri_no_tumour_copies_are_found():
    """The dataset README: about 590 of the 700 `notumor` images are flipped, rotated or contrast-changed
    copies of about 175 scans (a perceptual hash saw few of them)."""
    from oncoscope.training.data import audit

    report = audit(dataset_dir("brain-mri"), min_correlation=0.9)
    in_groups = Counter(p.split("/")[0] for g in report.near_duplicate_groups for p in g)
    assert 560 <= in_groups["notumor"] <= 650
    singles = report.counts["notumor"] - in_groups["notumor"]
    scans = singles + sum(1 for g in report.near_duplicate_groups if g[0].startswith("notumor/"))
    assert 150 <= scans <= 220
