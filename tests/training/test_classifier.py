"""Radiology augmentation: shapes and ranges hold, a seed gives the same batch, and each option
does what it says (tone curves keep black black, film edges paint borders and a marker)."""

import numpy as np
import pytest
import torch

from oncoscope.training import classifier as C


def batch(n: int = 6, side: int = 64) -> torch.Tensor:
    rng = np.random.default_rng(0)
    x = np.zeros((n, side, side, 3), np.uint8)
    x[:, 8:-8, 8:-8] = rng.integers(40, 220, (n, side - 16, side - 16, 1), dtype=np.uint8)
    return torch.from_numpy(x)


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(C.STD).view(1, 3, 1, 1) + torch.tensor(C.MEAN).view(1, 3, 1, 1)


@pytest.mark.parametrize("options", [{}, {"tone_p": 1.0}, {"lowres_p": 1.0}, {"edges_p": 1.0},
                                     {"tone_p": 0.5, "lowres_p": 0.3, "edges_p": 0.5}])
def test_shape_range_and_seed(options):
    a = C.augment_radiology(batch(), torch.Generator().manual_seed(3), 48, 15.0, 0.3, **options)
    b = C.augment_radiology(batch(), torch.Generator().manual_seed(3), 48, 15.0, 0.3, **options)
    assert a.shape == (6, 3, 48, 48) and torch.equal(a, b)
    u = unnormalise(a)
    assert float(u.min()) >= -1e-5 and float(u.max()) <= 1 + 1e-5
    assert torch.allclose(u[:, 0], u[:, 1]) and torch.allclose(u[:, 1], u[:, 2])  # still grayscale


def test_tone_curves_change_contrast_but_keep_black():
    x = torch.linspace(0, 1, 64).repeat(4, 3, 64, 1)
    y = C._tone_curves(x, torch.Generator().manual_seed(0), p=1.0)
    assert torch.all(y[:, :, :, 0] == 0)  # the darkest value stays dark
    assert not torch.allclose(y, x)
    assert torch.equal(C._tone_curves(x, torch.Generator().manual_seed(0), p=0.0), x)


def test_lower_resolution_blurs_detail():
    x = torch.zeros(2, 3, 64, 64)
    x[:, :, ::2] = 1.0  # one-pixel stripes
    y = C._lower_resolution(x, torch.Generator().manual_seed(0), p=1.0)
    assert float(y.std()) < float(x.std())


def test_film_edges_paint_borders_and_a_marker():
    x = torch.full((8, 3, 100, 100), 0.5)
    y = C._film_edges(x, torch.Generator().manual_seed(1), p=1.0)
    changed = (y != x).any(dim=1)
    assert all(bool(changed[i].any()) for i in range(8))  # every image got a marker at least
    marker_rows = [torch.nonzero((y[i, 0] > 0.6).any(dim=1)).flatten() for i in range(8)]
    assert all(len(r) and (r.max() < 15 or r.min() >= 85) for r in marker_rows)  # in the top or bottom band
