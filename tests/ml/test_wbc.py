"""White-cell detection, scale estimate and crops on generated smears of known geometry."""

from __future__ import annotations

import numpy as np
import pytest

from oncoscope.ml import wbc
from oncoscope.ml.synthetic import smear_field


def _near(det, x, y, tol):
    return any(abs(c.centroid[0] - x) < tol and abs(c.centroid[1] - y) < tol for c in det.cells)


@pytest.mark.parametrize("mpp", [0.12, 0.2, 0.35, 0.5])
@pytest.mark.parametrize("stain", ["giemsa", "pale"])
def test_white_cells_found_and_scale_estimated_from_red_cells(mpp, stain):
    cells = [(90, 120, 12.0), (230, 80, 10.0), (240, 190, 14.0)]
    size = (int(320 * 0.2 / mpp) + 120, int(260 * 0.2 / mpp) + 100)
    cells = [(x * size[0] / 320, y * size[1] / 260, d) for x, y, d in cells]
    rgb, truth = smear_field(1, mpp, size, cells, stain)
    det = wbc.detect(rgb)
    assert det.scale.method == "red_cells"
    assert det.scale.microns_per_pixel == pytest.approx(mpp, rel=0.15)
    assert len(det.cells) == len(truth)
    for x, y, d in truth:
        assert _near(det, x, y, tol=0.3 * d / mpp)
    for c in det.cells:  # boxes cover the whole cell, not only the nucleus
        x0, y0, x1, y1 = c.bbox
        dia_um = (x1 - x0) * mpp
        assert 8 <= dia_um <= 16


def test_field_without_white_cells_has_none():
    rgb, _ = smear_field(2, 0.25, (300, 220), white_cells=[])
    det = wbc.detect(rgb)
    assert det.cells == []
    assert det.scale.method == "red_cells"


def test_single_cell_crop_without_red_cells_uses_the_cells_own_size():
    rgb, _ = smear_field(3, 0.2, (100, 100), white_cells=[(50, 50, 13.0)])
    rgb = rgb.copy()
    yy, xx = np.mgrid[:100, :100]
    far = (xx - 50) ** 2 + (yy - 50) ** 2 > (13.0 / 0.2 / 2 + 2) ** 2
    rgb[far] = (232, 214, 205)  # no red cells at all
    det = wbc.detect(rgb)
    assert det.scale.method == "white_cell_size"
    assert len(det.cells) == 1
    assert det.scale.microns_per_pixel == pytest.approx(0.2, rel=0.3)


def test_given_scale_is_used_and_blank_image_has_no_cells():
    rgb, _ = smear_field(4, 0.3, (200, 200))
    assert wbc.detect(rgb, microns_per_pixel=0.3).scale.method == "given"
    assert wbc.detect(np.full((64, 64, 3), 240, np.uint8)).cells == []


def test_large_field_is_detected_on_a_smaller_working_image_in_input_coordinates():
    rgb, truth = smear_field(5, 0.1, (1600, 1000), [(400, 500, 12.0), (1200, 300, 11.0)])
    det = wbc.detect(rgb)
    assert det.work_scale > 1
    assert det.labels.shape == rgb.shape[:2]
    assert det.scale.microns_per_pixel == pytest.approx(0.1, rel=0.15)
    assert len(det.cells) == 2 and _near(det, 400, 500, 20) and _near(det, 1200, 300, 20)


def test_huge_field_is_detected_in_tiles_each_cell_once():
    """Shrunk whole to 720 px, a 3000 px field at 0.2 µm/px has red cells 2 px wide; tiles keep them."""
    cells = [(x, y, 12.0) for x in range(170, 3000, 400) for y in range(170, 2400, 400)]  # some on tile seams
    rgb, truth = smear_field(7, 0.2, (3000, 2400), cells)
    det = wbc.detect(rgb)
    assert det.scale.method == "red_cells"
    assert det.scale.microns_per_pixel == pytest.approx(0.2, rel=0.15)
    assert det.labels.shape == rgb.shape[:2]
    assert len(det.cells) == len(truth)  # none missed, none found twice in an overlap
    for x, y, d in truth:
        assert _near(det, x, y, tol=0.3 * d / 0.2)
    assert set(np.unique(det.labels)) == set(range(len(det.cells) + 1))
    for k, c in enumerate(det.cells, start=1):  # each label outlines its own cell
        ys, xs = np.nonzero(det.labels == k)
        assert abs(xs.mean() - c.centroid[0]) < 5 and abs(ys.mean() - c.centroid[1]) < 5


def test_tiles_cover_the_image_and_each_centre_has_one_owner():
    starts = wbc._tile_starts(3000, 1440, 150)
    assert starts[0] == 0 and starts[-1] + 1440 == 3000
    assert all(b - a <= 1440 - 150 for a, b in zip(starts, starts[1:]))
    cuts = wbc._owner_cuts(starts, 1440, 3000)
    assert cuts[0] == 0 and cuts[-1] == 3000 and cuts == sorted(cuts)
    for i, a in enumerate(starts):  # a tile owns only centres at least half an overlap inside it
        assert cuts[i] >= a and cuts[i + 1] <= a + 1440


def test_crop_is_centred_at_one_physical_scale():
    for mpp in (0.1, 0.4):
        rgb, truth = smear_field(6, mpp, (int(60 / mpp), int(50 / mpp)), [(30 / mpp, 25 / mpp, 12.0)])
        det = wbc.detect(rgb)
        crop = wbc.crop_cell(rgb, det.cells[0], det.scale.microns_per_pixel, out_px=80, field_um=32.0)
        assert crop.shape == (80, 80, 3)
        purple = crop[..., 2].astype(int) - crop[..., 1].astype(int)
        ys, xs = np.nonzero(purple > 60)
        assert abs(xs.mean() - 40) < 4 and abs(ys.mean() - 40) < 4
        # 12 µm cell, nucleus 7.2 µm -> about 18 px wide at 0.4 µm/px whatever the source scale
        assert 13 <= xs.max() - xs.min() <= 23


def test_crop_at_the_image_edge_is_padded_with_the_background_and_stays_centred():
    rgb, _ = smear_field(7, 0.25, (200, 200), [(15, 100, 12.0)])
    det = wbc.detect(rgb)
    cell = min(det.cells, key=lambda c: c.centroid[0])
    crop = wbc.crop_cell(rgb, cell, 0.25, out_px=64, field_um=32.0)
    assert crop.shape == (64, 64, 3)
    outside = crop[:, :4].reshape(-1, 3).astype(int)  # left of the image's edge: background, no streaks
    assert np.abs(outside - wbc.background_colour(rgb).astype(int)).max() <= 2
    purple = crop[..., 2].astype(int) - crop[..., 1].astype(int)
    ys, xs = np.nonzero(purple > 60)
    assert abs(xs.mean() - 32) < 4 and abs(ys.mean() - 32) < 4


@pytest.mark.parametrize("bad", [0.0, -0.2, float("nan"), float("inf")])
def test_a_bad_scale_is_refused_with_a_clear_message(bad):
    rgb, _ = smear_field(8, 0.25, (120, 120), [(60, 60, 12.0)])
    with pytest.raises(ValueError, match="microns_per_pixel must be a positive number"):
        wbc.detect(rgb, microns_per_pixel=bad)
    det = wbc.detect(rgb)
    with pytest.raises(ValueError, match="microns_per_pixel"):
        wbc.crop_cell(rgb, det.cells[0], bad, 80, 32.0)


def test_an_absurd_scale_cannot_allocate_a_huge_crop():
    rgb, _ = smear_field(9, 0.25, (160, 160), [(80, 80, 12.0)])
    det = wbc.detect(rgb)
    crop = wbc.crop_cell(rgb, det.cells[0], 1e-6, 80, 32.0)  # a window of 32 m: bounded to the image's size
    assert crop.shape == (80, 80, 3)


def test_thin_images_map_each_axis_back_on_its_own():
    rgb, _ = smear_field(10, 0.1, (2400, 300), [(600, 150, 12.0), (1800, 150, 12.0)])
    det = wbc.detect(rgb)
    assert det.work_scale > 1
    assert len(det.cells) == 2 and _near(det, 600, 150, 15) and _near(det, 1800, 150, 15)
    for c in det.cells:
        assert 0 <= c.bbox[1] < c.bbox[3] <= 300


def test_a_clump_too_large_for_one_cell_is_counted_as_rejected():
    cells = [(80, 150, 12.0), (190, 70, 11.0), (190, 240, 10.0), (340, 150, 50.0)]  # and a 50 µm purple mass
    rgb, _ = smear_field(11, 0.25, (460, 310), cells)
    det = wbc.detect(rgb)
    assert det.scale.method == "red_cells"
    assert det.rejected == 1 and len(det.cells) == 3 and not _near(det, 340, 150, 30)
