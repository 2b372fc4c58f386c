import numpy as np
import pytest

from oncoscope.ml.cells import clean_binary, dice, iou, measure, postprocess, split_touching


def disk(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_touching_cells_are_split_and_measured():
    m = disk((120, 160), 60, 50, 20) | disk((120, 160), 60, 86, 20)  # two discs touching (centres 36 px apart)
    labels = split_touching(m, min_distance=9)
    assert labels.max() == 2
    cells = measure(labels)
    assert len(cells) == 2
    for c in cells:
        assert c.area_px == pytest.approx(np.pi * 20 ** 2, rel=0.12)
        assert c.equivalent_diameter_px == pytest.approx(40, rel=0.07)
        assert 0.8 < c.circularity <= 1.0
        assert not c.touches_border


def test_isolated_cells_not_oversplit_and_border_flag():
    m = disk((100, 100), 30, 30, 15) | disk((100, 100), 75, 92, 12)
    labels = split_touching(m, min_distance=9)
    assert labels.max() == 2
    cells = measure(labels)
    assert sorted(c.touches_border for c in cells) == [False, True]


def test_measure_scales_to_original_pixels():
    labels = disk((50, 50), 25, 25, 10).astype(np.int32)
    (c,) = measure(labels, (2.0, 2.0))
    assert c.area_px == pytest.approx(np.pi * 100 * 4, rel=0.1)
    x0, y0, x1, y1 = c.bbox
    assert (x0, y0, x1, y1) == (30, 30, 72, 72)


def test_postprocess_removes_specks_and_fills_holes():
    prob = np.zeros((80, 80))
    prob[disk((80, 80), 40, 40, 15)] = 0.9
    prob[disk((80, 80), 40, 40, 4)] = 0.1  # hole
    prob[5:7, 5:7] = 0.99  # speck
    labels = postprocess(prob, 0.5, min_area=30, min_distance=9)
    assert labels.max() == 1
    assert labels[40, 40] == 1  # hole filled
    assert labels[5, 5] == 0


def test_empty_mask():
    assert postprocess(np.zeros((32, 32))).max() == 0
    assert measure(np.zeros((32, 32), np.int32)) == []
    assert not clean_binary(np.zeros((8, 8), bool), 5).any()


def test_dice_iou():
    a = np.zeros((10, 10), bool)
    b = a.copy()
    a[:5] = True
    b[:, :5] = True
    assert dice(a, b) == pytest.approx(0.5)
    assert iou(a, b) == pytest.approx(25 / 75)
    assert dice(np.zeros(4), np.zeros(4)) == 1.0


def _random_blobs(seed: int, shape=(160, 200), n=14) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.zeros(shape, bool)
    for _ in range(n):
        m |= disk(shape, rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(6, 24))
    m[rng.random(shape) < 0.01] = False  # pinholes, so there are holes to fill
    return m


@pytest.mark.parametrize("seed", range(6))
def test_fast_helpers_match_scipy_and_skimage(seed):
    """fill_holes / argmax_positions / split_touching replace slower library calls: same answers."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    from oncoscope.ml.cells import argmax_positions, fill_holes

    m = _random_blobs(seed)
    assert (fill_holes(m) == ndi.binary_fill_holes(m)).all()
    filled = fill_holes(m)
    dist = ndi.distance_transform_edt(filled)
    lab, n = ndi.label(filled)
    rr, cc = argmax_positions(dist, lab, np.arange(1, n + 1))
    assert dist[rr, cc].tolist() == ndi.maximum(dist, lab, np.arange(1, n + 1)).tolist()
    # The partition equals the skimage peak_local_max + watershed one (label numbers may differ).
    dist_s = ndi.gaussian_filter(dist, sigma=9 / 4)
    peaks = peak_local_max(dist_s, min_distance=9, labels=lab, exclude_border=False, threshold_abs=9 * 0.35)
    markers = np.zeros(m.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    for comp in sorted(set(range(1, n + 1)) - set(np.unique(lab[markers > 0]).tolist())):
        r, c = np.nonzero(lab == comp)
        k = int(np.argmax(dist[r, c]))
        markers[r[k], c[k]] = markers.max() + 1
    ref = watershed(-dist_s, markers, mask=filled)
    ours = split_touching(filled, min_distance=9)
    assert ours.max() == ref.max()
    assert len(np.unique(ours.astype(np.int64) * 10_000 + ref)) == ref.max() + 1
