"""Surface-area lookup tables against skimage marching cubes / marching squares."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import find_contours, marching_cubes, mesh_surface_area

from grapes_dask.kernels.surface import surface_area_lut


def windows_sum(mask, lut):
    """Sum of lut[config] over all 2x2(x2) windows of the 1-padded mask (numpy, whole array)."""
    m = np.pad(mask, 1).astype(np.int64)
    cfg = np.zeros(tuple(s - 1 for s in m.shape), np.int64)
    for corner in np.ndindex((2,) * mask.ndim):
        bit = sum(c << (mask.ndim - 1 - a) for a, c in enumerate(corner))
        sl = tuple(slice(c, c + s - 1) for c, s in zip(corner, m.shape))
        cfg += m[sl] << bit
    return lut[cfg].sum(), np.unique(cfg)


def random_masks(rng, ndim, count, max_side):
    for i in range(count):
        shape = tuple(rng.integers(1 if ndim == 2 else 2, max_side, ndim))
        if i % 3 == 0:  # noisy checkerboards: every ambiguous configuration
            mask = (np.indices(shape).sum(axis=0) % 2 == 0) ^ (rng.random(shape) < 0.15)
        else:
            mask = rng.random(shape) < rng.uniform(0.1, 0.9)
        if mask.any():
            yield mask


@pytest.mark.parametrize("spacing", [(1.0, 0.7, 1.3), (0.3, 2.0, 1.1)])
def test_lut_reproduces_marching_cubes_area(spacing):
    lut = surface_area_lut(spacing)
    assert lut.shape == (256,) and lut[0] == 0 and lut[255] == 0
    rng = np.random.default_rng(0)
    configs = set()
    for mask in random_masks(rng, 3, 300, 8):
        verts, faces, _, _ = marching_cubes(np.pad(mask, 1).astype(float), 0.5, spacing=spacing)
        ref = mesh_surface_area(verts, faces)
        got, cfg = windows_sum(mask, lut)
        configs.update(cfg.tolist())
        assert got == pytest.approx(ref, rel=1e-12)
    assert configs == set(range(256))  # every configuration, ambiguous ones included


def test_lut_unit_spacing():
    """skimage keeps float32 vertices at unit spacing; the table is float64-exact."""
    lut = surface_area_lut((1.0, 1.0, 1.0))
    rng = np.random.default_rng(1)
    for mask in random_masks(rng, 3, 60, 7):
        verts, faces, _, _ = marching_cubes(np.pad(mask, 1).astype(float), 0.5)
        got, _ = windows_sum(mask, lut)
        assert got == pytest.approx(mesh_surface_area(verts.astype(np.float64), faces), rel=1e-12)
        assert got == pytest.approx(mesh_surface_area(verts, faces), rel=1e-6)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.7, 1.3)])
def test_lut_2d_reproduces_find_contours_length(spacing):
    lut = surface_area_lut(spacing)
    assert lut.shape == (16,)
    rng = np.random.default_rng(2)
    configs = set()
    for mask in random_masks(rng, 2, 300, 10):
        ref = sum(
            np.sqrt(((np.diff(c, axis=0) * spacing) ** 2).sum(axis=1)).sum()
            for c in find_contours(np.pad(mask, 1).astype(float), 0.5)
        )
        got, cfg = windows_sum(mask, lut)
        configs.update(cfg.tolist())
        assert got == pytest.approx(ref, rel=1e-12)
    assert configs == set(range(16))


def test_lut_known_values():
    lut = surface_area_lut((2.0, 3.0, 5.0))
    # one corner cut: triangle through the midpoints of the three edges at corner 0
    a = np.array([1.0, 0, 0]), np.array([0, 1.5, 0]), np.array([0, 0, 2.5])
    expected = 0.5 * np.linalg.norm(np.cross(a[1] - a[0], a[2] - a[0]))
    assert lut[1] == pytest.approx(expected, rel=1e-15)
    # half cube split normal to z: a 3 x 5 rectangle
    assert lut[0b00001111] == pytest.approx(15.0, rel=1e-15)
    assert surface_area_lut((2.0, 3.0))[0b0011] == pytest.approx(3.0)  # horizontal contour
