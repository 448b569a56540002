"""The fused anisotropic pass-2 route (:func:`grapes_dask.kernels.fused_layer_sums_aniso`).

Its distances must be those of the reference float route (``_sq_edt3``: float64 squared
distances with per-axis offsets summed like scipy) to the bit, so that voxels at exact
half-integer layer ties (5 x 0.7 = 3.5, quarter-voxel spacings) fall in the same layer, and its
layer partial must be the reference's ``layer_sums`` over ``sqrt(_sq_edt3)`` to the bit. The
distances are also checked against scipy's ``distance_transform_edt`` per particle (to one
rounding: where several nearest voxels are equally far, scipy may pick another one). Volumes,
cores, halos (uneven, and too thin on purpose: the restricted semantics must match too), border
flags, spacings and layer widths are drawn by hypothesis.
"""

from __future__ import annotations

import threading
from unittest import mock

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scipy import ndimage

import grapes_dask.kernels
from grapes_dask import analyze_tables
from grapes_dask.kernels import fused_layer_sums_aniso, layer_sums
from grapes_dask.kernels.distance import _aniso_lines, _sq_edt3, _sq_edt3_aniso

# half-integer ties: 5 x 0.7 == 3.5; quarter and half voxels give exact binary fractions
SPACINGS = [(1.0, 0.8, 0.8), (0.7, 1.0, 1.0), (1.0, 0.7, 0.7), (1.0, 0.5, 0.25), (0.25, 1.0, 0.5),
            (1.3, 0.7, 1.0), (2.0, 1.0, 0.5)]
WIDTHS = [1.0, 0.5, 1.0, 0.7, 1.3, 0.35]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def bits(a):
    return np.ascontiguousarray(a, np.float64).view(np.int64)


def phantom(shape, seed, label_dtype):
    """Ellipsoids (overlaps painted over: touching particles), boxes (flat faces: many exact
    ties), a one-voxel particle, a label in two blobs; ids shuffled."""
    rng = np.random.default_rng(seed)
    n = np.asarray(shape, float)
    lab = np.zeros(shape, np.int64)
    g = np.ogrid[tuple(slice(0, s) for s in shape)]
    nxt = 1
    for _ in range(rng.integers(1, 6)):
        c, r = rng.uniform(-1, n), rng.uniform(1.0, np.maximum(1.5, n / 2.5))
        lab[sum(((gi - ci) / ri) ** 2 for gi, ci, ri in zip(g, c, r)) <= 1] = nxt
        nxt += 1
    for _ in range(rng.integers(0, 3)):
        lo = rng.integers(0, n)
        lab[tuple(slice(a, a + int(e)) for a, e in zip(lo, rng.integers(1, 9, 3)))] = nxt
        nxt += 1
    lab[tuple(rng.integers(0, shape))] = nxt
    lab[:2, :2, :1] = nxt + 1
    lab[-1:, -2:, -2:] = nxt + 1
    ids = np.unique(lab[lab > 0])
    hi = np.iinfo(label_dtype).max if np.dtype(label_dtype).kind in "ui" else 2**31 - 1
    new = rng.choice(np.arange(1, min(hi, 10**6), dtype=np.int64), size=len(ids), replace=False)
    out = np.zeros(shape, np.int64)
    out[lab > 0] = new[np.searchsorted(ids, lab[lab > 0])]
    return out.astype(label_dtype)


@st.composite
def regions(draw):
    """A label volume, a region box in it and a core box in the region (any halo, uneven)."""
    shape = tuple(draw(st.integers(3, 22), label=f"side {a}") for a in range(3))
    lab = phantom(shape, draw(st.integers(0, 2**32 - 1), label="seed"),
                  draw(st.sampled_from(["uint16", "int32"]), label="label dtype"))
    r0, r1, c0, c1 = [], [], [], []
    for a, n in enumerate(shape):
        lo = draw(st.integers(0, n - 1), label=f"region lo {a}")
        hi = draw(st.integers(lo + 1, n), label=f"region hi {a}")
        clo = draw(st.integers(lo, hi - 1), label=f"core lo {a}")
        chi = draw(st.integers(clo + 1, hi), label=f"core hi {a}")
        r0.append(lo), r1.append(hi), c0.append(clo - lo), c1.append(chi - lo)
    region = lab[tuple(slice(a, b) for a, b in zip(r0, r1))]
    border = np.array(draw(st.lists(st.booleans(), min_size=6, max_size=6), label="border"), np.bool_)
    return region, np.array(c0, np.int64), np.array(c1, np.int64), border


def reference_partial(region, grey, c0, c1, spacing, border, width):
    """The route before this one: ``_sq_edt3``, numpy's sqrt, ``layer_sums``."""
    d = np.sqrt(_sq_edt3(np.ascontiguousarray(region), c0, c1, *spacing, border))
    core = tuple(slice(a, b) for a, b in zip(c0, c1))
    return d, layer_sums(region[core], grey, d, layer_width=width)


def assert_frames_bitwise(a, b):
    a, b = a.reset_index(drop=True), b.reset_index(drop=True)
    assert list(a.columns) == list(b.columns)
    assert (a.dtypes == b.dtypes).all()
    assert len(a) == len(b)
    for c in a.columns:
        assert a[c].to_numpy().tobytes() == b[c].to_numpy().tobytes(), c


@settings(max_examples=150, **SETTINGS)
@given(reg=regions(), spacing=st.sampled_from(SPACINGS), width=st.sampled_from(WIDTHS),
       grey_dtype=st.sampled_from(["uint16", "int16"]), slack=st.floats(0.0, 5.0))
def test_fused_aniso_bitwise_equals_float_route(reg, spacing, width, grey_dtype, slack):
    """Drawn region, core, halo and borders: the contiguous-line EDT equals ``_sq_edt3`` to the bit,
    and the fused partial equals ``layer_sums`` over its square root to the bit (or, where some
    core voxel reaches no boundary, the fused route refuses)."""
    region, c0, c1, border = reg
    region = np.ascontiguousarray(region)
    ref_d2 = _sq_edt3(region, c0, c1, *spacing, border)
    D2, bg, unr = _aniso_lines(region.shape, c0, c1)
    got_d2 = _sq_edt3_aniso(region, c0, c1, *spacing, border, D2, bg, unr)
    assert bits(got_d2).tobytes() == bits(ref_d2).tobytes()
    core = tuple(slice(a, b) for a, b in zip(c0, c1))
    info = np.iinfo(grey_dtype)
    grey = np.random.default_rng(int(c0.sum() + 7 * c1.sum())).integers(
        info.min, int(info.max) + 1, size=tuple(c1 - c0)).astype(grey_dtype)
    d, ref = reference_partial(region, grey, c0, c1, spacing, border, width)
    lc = region[core]
    keys = np.unique(lc[lc != 0]).astype(np.uint64)
    inside = d[lc != 0]
    if not np.isfinite(inside).all():
        event("unreachable core voxels: the fused route refuses")
        with pytest.raises(RuntimeError, match="layer bound"):
            fused_layer_sums_aniso(region, grey, core, border, spacing, width, keys, 10.0)
        return
    q = inside / width
    event(f"exact half-integer ties: {bool((q == np.floor(q) + 0.5).any())}")
    max_distance = (inside.max() if inside.size else 0.0) + slack
    got = fused_layer_sums_aniso(region, grey, core, border, spacing, width, keys, max_distance)
    assert_frames_bitwise(got, ref)


def per_particle_scipy(lab, spacing, black_border):
    """scipy's EDT of each particle's mask, one particle at a time (the outside is not-in-L with
    `black_border`: pad with background)."""
    out = np.zeros(lab.shape)
    for v in np.unique(lab[lab > 0]):
        m = lab == v
        if black_border:
            d = ndimage.distance_transform_edt(np.pad(m, 1), sampling=spacing)[(slice(1, -1),) * 3]
        else:
            d = ndimage.distance_transform_edt(m, sampling=spacing)
        out[m] = d[m]
    return out


def inscribed_halo(lab, spacing, shape, black_border):
    """Halo per axis (voxels) from the labels' bounding boxes: d <= min_a s_a (extent_a + 1) / 2
    (with `black_border` False a box on the volume side reaches its far side: s_a extent_a)."""
    ids = np.unique(lab[lab > 0])
    bound = 0.0
    for sl in ndimage.find_objects(np.where(lab == 0, 0, np.searchsorted(ids, lab) + 1)):
        per = []
        for s, sp, n in zip(sl, spacing, shape):
            ext = s.stop - s.start
            on = (s.start == 0) + (s.stop == n)
            per.append(np.inf if (not black_border and on == 2) else
                       sp * ext if (not black_border and on == 1) else sp * (ext + 1) / 2)
        bound = max(bound, min(per))
    if not np.isfinite(bound):
        return list(shape)
    return [int(np.ceil(bound / sp)) for sp in spacing]


@settings(max_examples=40, **SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), spacing=st.sampled_from(SPACINGS), black_border=st.booleans(),
       shape=st.tuples(*(st.integers(6, 24),) * 3), data=st.data())
def test_aniso_distances_match_scipy_per_particle(seed, spacing, black_border, shape, data):
    """A core with a sufficient halo (from bounding boxes, as the planner does): the distances of the
    contiguous-line route equal scipy's per-particle EDT to one rounding, and bitwise wherever
    scipy's value is an exact half-integer multiple of the spacings' ties."""
    lab = phantom(shape, seed, "uint16")
    if not black_border:
        lab[0, 0, 0] = 0  # some voxel not in the label that spans the volume
    ref = per_particle_scipy(lab, spacing, black_border)
    halo = inscribed_halo(lab, spacing, shape, black_border)
    lo = np.array([data.draw(st.integers(0, n - 1), label=f"core lo {a}") for a, n in enumerate(shape)])
    hi = np.array([data.draw(st.integers(a + 1, n), label=f"core hi {i}") for i, (a, n) in enumerate(zip(lo, shape))])
    r0 = np.maximum(lo - halo, 0)
    r1 = np.minimum(hi + halo, shape)
    region = np.ascontiguousarray(lab[tuple(slice(a, b) for a, b in zip(r0, r1))])
    border = np.array([black_border and x for a, b, n in zip(r0, r1, shape) for x in (a == 0, b == n)], np.bool_)
    c0, c1 = lo - r0, hi - r0
    D2, bg, unr = _aniso_lines(region.shape, c0, c1)
    got = np.sqrt(_sq_edt3_aniso(region, c0, c1, *spacing, border, D2, bg, unr))
    want = ref[tuple(slice(a, b) for a, b in zip(lo, hi))]
    m = lab[tuple(slice(a, b) for a, b in zip(lo, hi))] != 0
    np.testing.assert_allclose(got[m], want[m], rtol=4.5e-16, atol=0)
    assert (got[~m] == 0).all()
    half = m & (np.floor(want) + 0.5 == want)
    event(f"half-integer distances: {bool(half.any())}")
    np.testing.assert_array_equal(got[half], want[half])


def test_exact_ties_fall_in_scipys_layer():
    """5 voxels of 0.7 is 3.5 in scipy's float sum (layer 4, half to even), 3.4999999999999996 if
    the spacing were squared first (layer 3): a bar along x of a (1, 1, 0.7) volume, fused."""
    lab = np.zeros((3, 3, 13), np.uint16)
    lab[1, 1, 1:12] = 9
    grey = np.arange(lab.size, dtype=np.uint16).reshape(lab.shape)
    spacing = (10.0, 10.0, 0.7)
    core = (slice(0, 3), slice(0, 3), slice(0, 13))
    d = per_particle_scipy(lab, spacing, True)
    assert (d == 3.5).any()
    got = fused_layer_sums_aniso(lab, grey, core, (True,) * 6, spacing, 1.0, np.array([9], np.uint64), 10.0)
    m = lab == 9
    k = np.maximum(1, np.rint(d[m] / 1.0)).astype(np.int64)
    np.testing.assert_array_equal(got["layer"].to_numpy(), np.unique(k))
    np.testing.assert_array_equal(got["count"].to_numpy(), np.bincount(k)[np.unique(k)])
    assert 4 in got["layer"].to_numpy()


# ---------------------------------------------------------------------------------------------
# the engine: anisotropic spacing goes through the fused route, the same under any chunking
# ---------------------------------------------------------------------------------------------


class Spy:
    def __init__(self):
        self.calls = 0
        self.lock = threading.Lock()
        self.real = grapes_dask.kernels.fused_layer_sums_aniso

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.calls += 1
        return self.real(*args, **kwargs)


def run(grey, labels, **kw):
    spy = Spy()
    with mock.patch.object(grapes_dask.kernels, "fused_layer_sums_aniso", spy):
        res = analyze_tables(grey, labels, **kw)
    return res, spy.calls


def assert_tables_bitwise(a, b):
    for name in ("particles", "layers", "contacts"):
        x, y = getattr(a, name).reset_index(drop=True), getattr(b, name).reset_index(drop=True)
        assert list(x.columns) == list(y.columns), name
        for c in x.columns:
            u, v = x[c].to_numpy(), y[c].to_numpy()
            assert u.dtype == v.dtype, (name, c)
            if u.dtype == object:
                assert all(np.asarray(p).tobytes() == np.asarray(q).tobytes() for p, q in zip(u, v)), (name, c)
            else:
                assert u.tobytes() == v.tobytes(), (name, c)


@pytest.mark.parametrize("spacing, width, black_border", [
    ((1.0, 0.8, 0.8), 1.0, True),
    ((1.0, 0.5, 0.25), 0.5, False),
    ((0.7, 1.0, 0.7), 1.3, True),
])
def test_analyze_aniso_chunkings_identical_and_equal_to_float_route(spacing, width, black_border):
    """``analyze_tables`` with anisotropic spacing and uint16 grey takes the fused route in every
    region; two chunkings (uneven dask chunks on threads, regular chunks of a numpy array on the
    synchronous scheduler) give identical tables, and the layers equal those of the float route
    (taken for uint32 grey: ``distance_core`` then ``layer_sums``) to the bit."""
    labels = phantom((30, 34, 28), 3, "uint16")
    grey = np.random.default_rng(3).integers(0, 65536, size=labels.shape).astype(np.uint16)
    kw = dict(spacing=spacing, layer_width=width, black_border=black_border)
    ch = ((7, 11, 12), (10, 5, 19), (13, 15))
    a, na = run(da.from_array(grey, chunks=ch), da.from_array(labels, chunks=ch), region_size=8, **kw)
    with dask.config.set(scheduler="sync"):
        b, nb = run(grey, labels, chunks=(9, 9, 9), region_size=12, **kw)
        c, nc = run(grey.astype(np.uint32), labels, chunks=(9, 9, 9), region_size=12, **kw)
    assert na > 1 and nb > 1 and nc == 0
    assert_tables_bitwise(a, b)
    x, y = a.layers.reset_index(drop=True), c.layers.reset_index(drop=True)
    pd.testing.assert_frame_equal(x, y, check_exact=True)
    assert all(x[k].to_numpy().tobytes() == y[k].to_numpy().tobytes() for k in x.columns)
