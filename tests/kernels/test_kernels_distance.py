"""Core-restricted separable EDT against scipy's per-particle distance_transform_edt."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import ndimage

from grapes_dask.kernels.distance import edt_core, squared_edt_core


def assert_same(got, ref):
    """Equal to scipy up to one rounding: where several nearest voxels are equally far, scipy and
    we may pick different ones, whose float sums differ in the last bit."""
    np.testing.assert_allclose(got, ref, rtol=4.5e-16, atol=0)


def random_particles(shape, n, rmin, rmax, seed, ids=None):
    """Overlapping balls and ellipsoids; overlaps go to the nearest normalised centre."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.uint64)
    best = np.full(shape, np.inf)
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    ids = np.arange(1, n + 1) if ids is None else ids
    for i in range(n):
        c = rng.uniform(0, shape)
        r = rng.uniform(rmin, rmax, len(shape))
        d = sum(((g - cc) / rr) ** 2 for g, cc, rr in zip(grids, c, r))
        m = (d < 1) & (d < best)
        best[m] = d[m]
        lab[m] = ids[i]
    return lab


def reference_edt(lab, spacing, black_border=True):
    """scipy EDT of each particle's mask, one particle at a time (independent reference)."""
    out = np.zeros(lab.shape)
    for v in np.unique(lab[lab > 0]):
        m = lab == v
        if black_border:
            pad = np.pad(m, 1)
            d = ndimage.distance_transform_edt(pad, sampling=spacing)[(slice(1, -1),) * lab.ndim]
        else:
            d = ndimage.distance_transform_edt(m, sampling=spacing)
        out[m] = d[m]
    return out


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 0.7, 1.3), (0.4, 0.4, 0.4)])
def test_whole_volume_matches_scipy(spacing):
    lab = random_particles((30, 34, 28), 25, 3, 9, seed=1)
    got = edt_core(lab, spacing=spacing)
    assert_same(got, reference_edt(lab, spacing))


def test_no_black_border_matches_scipy():
    lab = random_particles((26, 30, 22), 20, 3, 8, seed=2)
    lab[:2] = 0  # keep some background so every particle reaches a boundary
    got = edt_core(lab, spacing=(1.0, 0.8, 1.1), border=False)
    ref = reference_edt(lab, (1.0, 0.8, 1.1), black_border=False)
    assert_same(got, ref)


def test_2d_matches_scipy():
    lab = random_particles((60, 50), 30, 3, 10, seed=3)
    assert_same(edt_core(lab, spacing=(0.9, 1.2)), reference_edt(lab, (0.9, 1.2)))


def test_sparse_uint64_ids_and_split_label():
    ids = np.array([2**40 + 5, 70000, 3, 2**63 + 1, 65536], dtype=np.uint64)
    lab = random_particles((24, 24, 24), 5, 4, 8, seed=4, ids=ids)
    lab[5:8, 5:8, 18:21] = 3  # label 3 in a second, separate blob
    assert_same(edt_core(lab), reference_edt(lab, (1, 1, 1)))


def inscribed_halo(lab, spacing):
    """Halo in voxels per axis from bounding boxes: d <= min_a s_a (extent_a + 1) / 2."""
    bound = 0.0
    for sl in ndimage.find_objects(lab.astype(np.int64)):
        if sl is None:
            continue
        ext = [s.stop - s.start for s in sl]
        bound = max(bound, min(sp * (e + 1) / 2 for sp, e in zip(spacing, ext)))
    return [int(np.ceil(bound / sp)) for sp in spacing]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    lo=st.tuples(*(st.integers(0, 20),) * 3),
    size=st.tuples(*(st.integers(1, 20),) * 3),
    aniso=st.sampled_from([(1.0, 1.0, 1.0), (1.0, 0.7, 1.3), (2.0, 1.0, 1.0)]),
)
def test_core_with_halo_is_exact(seed, lo, size, aniso):
    shape = (40, 40, 40)
    lab = random_particles(shape, 30, 3, 8, seed=seed)
    ref = reference_edt(lab, aniso)
    halo = inscribed_halo(lab, aniso)
    lo = np.minimum(lo, np.subtract(shape, 1))
    hi = np.minimum(np.add(lo, size), shape)
    r0 = np.maximum(lo - halo, 0)
    r1 = np.minimum(hi + np.array(halo), shape)
    region = lab[tuple(slice(a, b) for a, b in zip(r0, r1))]
    core = tuple(slice(a - b, c - b) for a, b, c in zip(lo, r0, hi))
    border = [x for a, b, n in zip(r0, r1, shape) for x in (a == 0, b == n)]
    got = edt_core(region, core=core, spacing=aniso, border=border)
    assert_same(got, ref[tuple(slice(a, b) for a, b in zip(lo, hi))])


def test_unit_spacing_is_exact_integer_squares():
    lab = random_particles((32, 32, 32), 20, 4, 10, seed=5)
    d2 = squared_edt_core(lab)
    assert np.array_equal(d2, np.round(d2))
    ref = reference_edt(lab, (1, 1, 1))
    assert np.array_equal(np.sqrt(d2), ref)  # bitwise


def test_exact_layer_ties_agree_with_scipy():
    # 5 x 0.7 == 3.5 in floating point, which squaring the spacing first (0.49 x 25) misses
    lab = np.zeros((1, 1, 13), np.uint8)
    lab[..., 1:12] = 1
    spacing = (10.0, 10.0, 0.7)
    d = edt_core(lab, spacing=spacing)
    ref = reference_edt(lab, spacing)
    np.testing.assert_array_equal(d, ref)
    assert d[0, 0, 5] == 3.5


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (0.7, 0.7, 0.7), (1.0, 0.7, 1.3)])
def test_distance_core_fast_route_matches_scipy(spacing):
    from grapes_dask.kernels.distance import distance_core

    lab = random_particles((36, 40, 32), 30, 3, 9, seed=11)
    ref = reference_edt(lab, spacing)
    d = distance_core(lab, spacing=spacing)
    if spacing[0] in (1.0, 0.5) and len(set(spacing)) == 1:
        np.testing.assert_array_equal(d, ref)  # s * sqrt(k) is exact for these
    else:
        assert_same(d, ref)
    # a core with a halo, borders on some sides only
    halo = inscribed_halo(lab, spacing)
    lo, hi = np.array([9, 12, 0]), np.array([27, 28, 32])
    r0, r1 = np.maximum(lo - halo, 0), np.minimum(hi + np.array(halo), lab.shape)
    region = lab[tuple(slice(a, b) for a, b in zip(r0, r1))]
    core = tuple(slice(a - b, c - b) for a, b, c in zip(lo, r0, hi))
    border = [x for a, b, n in zip(r0, r1, lab.shape) for x in (a == 0, b == n)]
    got = distance_core(region, core=core, spacing=spacing, border=border)
    assert_same(got, ref[tuple(slice(a, b) for a, b in zip(lo, hi))])
