"""Pass-2 kernel: layer_sums / combine_layers / finalize_layers against per-particle scipy EDT."""

from __future__ import annotations

import functools
from fractions import Fraction

import edt
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grapes_dask.kernels.layers import LAYER_COLUMNS, combine_layers, finalize_layers, layer_sums

from _kernel_reference import (
    SPACING2,
    SPACING3,
    chunk_grid,
    phantom2d,
    phantom3d,
    reference_layers,
    tree_combine,
)

HYP = settings(max_examples=10, deadline=None, database=None, derandomize=True)


def chunked_layers(lab, grey, dist, width, cuts, seed=0):
    parts = []
    for origin, core in chunk_grid(lab.shape, cuts):
        owned = tuple(slice(o, o + c) for o, c in zip(origin, core))
        parts.append(layer_sums(lab, grey, dist, layer_width=width, owned=owned))
    return tree_combine(parts, combine_layers, np.random.default_rng(seed))


def assert_layers_equal(table, ref):
    assert list(table.columns) == list(LAYER_COLUMNS)
    np.testing.assert_array_equal(table["label"], ref["label"].astype(np.uint64))
    np.testing.assert_array_equal(table["layer"], ref["layer"])
    np.testing.assert_array_equal(table["count"], ref["count"])
    np.testing.assert_allclose(table["mean"], ref["mean"], rtol=1e-12)
    np.testing.assert_allclose(table["std"], ref["std"], rtol=1e-9, atol=1e-9)


@functools.cache
def case3d(width):
    lab, grey = phantom3d(big_ids=True)
    ref, dist = reference_layers(lab, grey, SPACING3, width)
    whole = combine_layers([layer_sums(lab, grey, dist, layer_width=width)])
    return lab, grey, dist, ref, whole


@pytest.mark.parametrize("width", [1.0, 0.5, 1.7])
def test_whole_volume_matches_scipy_reference(width):
    lab, grey, dist, ref, whole = case3d(width)
    assert ref["layer"].max() >= {1.0: 4, 0.5: 8, 1.7: 2}[width]
    if width == 1.0:  # the phantom has exact ties (5 x 0.7 = 3.5): half-even decides them
        q = dist[lab > 0] / width
        assert ((q - np.floor(q)) == 0.5).sum() > 0
    assert_layers_equal(finalize_layers(whole), ref)


@HYP
@given(
    cuts=st.tuples(*[st.lists(st.integers(1, n - 1), max_size=3) for n in (36, 34, 32)]),
    seed=st.integers(0, 2**16),
)
def test_any_chunking_is_bitwise_identical(cuts, seed):
    lab, grey, dist, ref, whole = case3d(1.0)
    combined = chunked_layers(lab, grey, dist, 1.0, cuts, seed)
    pd.testing.assert_frame_equal(combined, whole, check_exact=True)
    assert_layers_equal(finalize_layers(combined), ref)


def test_2d_matches_scipy_reference():
    lab, grey = phantom2d()
    ref, dist = reference_layers(lab, grey, SPACING2, 1.0)
    combined = chunked_layers(lab, grey, dist, 1.0, ([17, 30], [9]))
    assert_layers_equal(finalize_layers(combined), ref)


def test_edt_float32_at_unit_spacing_reproduces_reference():
    """GRAPES semantics: round(edt.edt(labels)) with unit spacing, width 1."""
    lab, grey = phantom3d()
    ref, _ = reference_layers(lab, grey, (1.0, 1.0, 1.0), 1.0)
    dist = edt.edt(lab, black_border=True)
    combined = chunked_layers(lab, grey, dist, 1.0, ([12], [20], [7, 19]))
    assert_layers_equal(finalize_layers(combined), ref)


def test_half_even_rounding_at_exact_ties():
    d = np.array([[0.25, 0.5, 1.5, 2.5, 3.5, 4.5, 0.75, 5.0000001, 1.4999999]])
    lab = np.full(d.shape, 3, np.uint32)
    grey = np.arange(d.size, dtype=np.uint16).reshape(d.shape)
    for width in (1.0, 0.5, 0.25):
        for dt in (np.float64, np.float32):
            table = layer_sums(lab, grey, d.astype(dt), layer_width=width)
            expected = np.maximum(1, np.round(d.astype(dt).astype(np.float64) / width))
            got_layers = np.repeat(table["layer"].to_numpy(), table["count"].to_numpy())
            assert sorted(got_layers) == sorted(expected.ravel().astype(int))
    t = finalize_layers(layer_sums(lab, grey, d, layer_width=1.0))
    # 0.25, 0.5 (-> 0), 0.75, 1.4999999 -> 1; 1.5, 2.5 -> 2; 3.5, 4.5 -> 4; 5.0000001 -> 5
    assert dict(zip(t["layer"], t["count"])) == {1: 4, 2: 2, 4: 2, 5: 1}


def test_owned_mask_and_only_labels():
    lab, grey, dist, ref, whole = case3d(1.0)
    owned = np.zeros(lab.shape, bool)
    owned[::2] = True
    parts = [
        layer_sums(lab, grey, dist, owned=owned),
        layer_sums(lab, grey, dist, owned=~owned),
    ]
    pd.testing.assert_frame_equal(combine_layers(parts), whole, check_exact=True)
    keep = np.unique(lab)[[2, 5]]
    only = layer_sums(lab, grey, dist, only_labels=keep)
    expected = whole[whole["label"].isin(keep)].reset_index(drop=True)
    pd.testing.assert_frame_equal(only, expected, check_exact=True)


def test_exact_int32_grey_extremes():
    rng = np.random.default_rng(7)
    lab = np.zeros((6, 7, 8), np.uint16)
    lab[1:5, 1:6, 1:7] = 5
    info = np.iinfo(np.int32)
    grey = rng.choice(np.array([info.min, info.max, -1, 0], np.int32), size=lab.shape)
    dist = edt.edt(lab, black_border=True)
    t = finalize_layers(layer_sums(lab, grey, dist))
    k = np.maximum(1, np.round(dist.astype(np.float64)))
    for layer, mean, std in zip(t["layer"], t["mean"], t["std"]):
        vals = [int(v) for v in grey[(lab == 5) & (k == layer)]]
        n, s, q = len(vals), sum(vals), sum(v * v for v in vals)
        assert mean == float(Fraction(s, n))
        assert std == np.sqrt(float(Fraction(n * q - s * s, n * n)))


def test_float_grey():
    lab, grey, dist, ref, _ = case3d(1.0)
    fgrey = grey.astype(np.float32) / np.float32(7.0) + np.float32(1000.0)
    fref = ref.copy()
    k = np.maximum(1, np.round(dist))
    for i, (lid, layer) in enumerate(zip(ref["label"], ref["layer"])):
        v = fgrey[(lab == lid) & (k == layer)].astype(np.float64)
        fref.loc[i, "mean"] = v.mean()
        fref.loc[i, "std"] = v.std()
    combined = chunked_layers(lab, fgrey, dist, 1.0, ([10, 25], [17], [3]))
    assert_layers_equal(finalize_layers(combined), fref)


def test_background_only_gives_typed_empty_tables():
    lab = np.zeros((4, 5, 6), np.uint16)
    grey = np.zeros(lab.shape, np.int32)
    p = layer_sums(lab, grey, np.zeros(lab.shape, np.float32))
    assert len(p) == 0
    assert list(p.columns) == ["label", "layer", "count", "grey_sum_hi", "grey_sum_lo",
                               "grey_sq_hi", "grey_sq_lo"]
    t = finalize_layers(combine_layers([p, p]))
    assert len(t) == 0
    assert dict(t.dtypes) == {c: np.dtype(d) for c, d in LAYER_COLUMNS.items()}


def test_fused_layer_sums_equals_distance_then_layer_sums():
    """The fused route (integer EDT + accumulation in one sweep) equals the two-step route, and on a
    whole volume with black border it equals the per-particle scipy reference."""
    from scipy import ndimage

    from grapes_dask.kernels.distance import distance_core
    from grapes_dask.kernels.layers import fused_layer_sums

    rng = np.random.default_rng(5)
    shape = (30, 34, 28)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    lab = np.zeros(shape, np.uint32)
    best = np.full(shape, np.inf)
    ids = rng.choice(np.arange(70_000, 90_000), 25, replace=False)
    for i in ids:
        c, r = rng.uniform(0, shape), rng.uniform(3, 8, 3)
        d = sum(((g - cc) / rr) ** 2 for g, cc, rr in zip(grids, c, r))
        m = (d < 1) & (d < best)
        best[m], lab[m] = d[m], i
    grey = rng.integers(0, 65536, shape).astype(np.uint16)
    keys = np.unique(lab[lab > 0]).astype(np.uint64)
    for s, w in ((1.0, 1.0), (0.5, 0.5), (0.7, 0.5), (1.3, 1.7)):
        core = (slice(4, 26), slice(6, 30), slice(0, 28))
        border = [False, False, False, False, True, True]
        two_step = layer_sums(lab[core], grey[core], distance_core(lab, core, (s,) * 3, border), layer_width=w)
        ck = np.unique(lab[core][lab[core] > 0]).astype(np.uint64)
        fused = fused_layer_sums(lab, grey[core], core, border, s, w, ck, 40.0)
        pd.testing.assert_frame_equal(fused, two_step)
        if s not in (1.0, 0.5):
            continue  # s * sqrt(k) and scipy's sum of (s n)^2 agree bitwise only for powers of two
        # whole volume, black border: per-particle scipy reference
        whole = tuple(slice(0, n) for n in shape)
        got = finalize_layers(fused_layer_sums(lab, grey, whole, [True] * 6, s, w, keys, 40.0))
        rows = []
        for v in keys:
            m = lab == v
            d = ndimage.distance_transform_edt(np.pad(m, 1), sampling=(s,) * 3)[1:-1, 1:-1, 1:-1][m]
            k = np.maximum(1, np.rint(d / w)).astype(int)
            for layer in np.unique(k):
                rows.append((v, layer, int((k == layer).sum()), grey[m][k == layer].astype(float).mean()))
        ref = pd.DataFrame(rows, columns=["label", "layer", "count", "mean"])
        np.testing.assert_array_equal(got["layer"].to_numpy(), ref["layer"].to_numpy())
        np.testing.assert_array_equal(got["count"].to_numpy(), ref["count"].to_numpy())
        np.testing.assert_allclose(got["mean"].to_numpy(), ref["mean"].to_numpy(), rtol=1e-12)
    with pytest.raises(RuntimeError, match="inconsistent"):
        fused_layer_sums(lab, grey, tuple(slice(0, n) for n in shape), [True] * 6, 1.0, 1.0, keys[:-1], 40.0)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.integers(0, 40), st.booleans())
def test_combine_of_one_frame_sorted_or_not_equals_the_sum_of_its_rows(seed, n, presorted):
    """One frame (the ROI's case): already sorted by (label, layer) it skips the sort, shuffled it
    does not; both equal sums computed row by row with Python integers."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(1, 4, (6, 6, 6)).astype(np.uint16)
    lab[rng.random(lab.shape) < 0.3] = 0
    grey = rng.integers(0, 2**16, lab.shape).astype(np.uint16)
    part = layer_sums(lab, grey, edt.edt(lab, black_border=True))
    rows = part.sample(frac=1, random_state=seed % 1000) if not presorted else part
    rows = rows.head(n).reset_index(drop=True) if n < len(rows) else rows
    rows = rows.assign(layer=np.int64(1))  # many rows per key, as _roi makes
    out = combine_layers([rows])
    assert list(out["label"]) == sorted(set(rows["label"]))
    for _, r in out.iterrows():
        sel = rows[rows["label"] == r["label"]]
        assert r["count"] == int(sel["count"].sum())
        total = sum((int(h) << 64) + int(lo) for h, lo in zip(sel["grey_sum_hi"], sel["grey_sum_lo"].astype(np.uint64)))
        assert (int(r["grey_sum_hi"]) << 64) + int(np.uint64(r["grey_sum_lo"])) == total
