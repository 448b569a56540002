"""Pass-1 kernel: chunk_stats / combine_stats / finalize_stats vs skimage on the whole volume."""

from __future__ import annotations

import functools
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grapes_dask.kernels.reduce import (
    chunk_stats,
    combine_stats,
    contacts_table,
    finalize_stats,
    stats_columns,
)

from _kernel_reference import (
    SPACING2,
    SPACING3,
    assert_close_table,
    chunk_grid,
    extended,
    phantom2d,
    phantom3d,
    reference_stats,
    tree_combine,
)

HYP = settings(max_examples=12, deadline=None, database=None, derandomize=True)


def run_chunked(lab, grey, spacing, cuts, seed=0):
    """chunk_stats on every chunk of the grid, combined in a random tree."""
    parts = [
        chunk_stats(extended(lab, o, c, lab.shape), extended(grey, o, c, lab.shape),
                    origin=o, core_shape=c, volume_shape=lab.shape, spacing=spacing)
        for o, c in chunk_grid(lab.shape, cuts)
    ]
    return tree_combine(parts, combine_stats, np.random.default_rng(seed))


@functools.cache
def case3d(big_ids):
    lab, grey = phantom3d(big_ids=big_ids)
    ref, pairs = reference_stats(lab, grey, SPACING3)
    whole = run_chunked(lab, grey, SPACING3, ([], [], []))
    return lab, grey, ref, pairs, whole


@functools.cache
def case2d():
    lab, grey = phantom2d()
    ref, pairs = reference_stats(lab, grey, SPACING2)
    whole = run_chunked(lab, grey, SPACING2, ([], []))
    return lab, grey, ref, pairs, whole


def cuts_for(shape):
    return st.tuples(*[st.lists(st.integers(1, n - 1), max_size=3) for n in shape])


def check_against_reference(combined, ref, pairs):
    table = finalize_stats(combined)
    assert list(table.columns) == list(stats_columns(len(combined.spacing)))
    assert_close_table(table, ref)
    contacts = contacts_table(combined)
    got = {(int(a), int(b)): int(n) for a, b, n in contacts.itertuples(index=False)}
    assert got == pairs


@pytest.mark.parametrize("big_ids", [False, True])
def test_whole_volume_matches_skimage(big_ids):
    lab, grey, ref, pairs, whole = case3d(big_ids)
    assert len(ref) == 11
    assert ref["touches_border"].sum() >= 3
    assert len(pairs) >= 3
    check_against_reference(whole, ref, pairs)


@HYP
@given(cuts=cuts_for((36, 34, 32)), seed=st.integers(0, 2**16))
def test_any_chunking_3d_is_bitwise_identical_and_matches_skimage(cuts, seed):
    lab, grey, ref, pairs, whole = case3d(False)
    combined = run_chunked(lab, grey, SPACING3, cuts, seed)
    pd.testing.assert_frame_equal(combined.labels, whole.labels, check_exact=True)
    pd.testing.assert_frame_equal(combined.pairs, whole.pairs, check_exact=True)
    pd.testing.assert_frame_equal(finalize_stats(combined), finalize_stats(whole), check_exact=True)
    check_against_reference(combined, ref, pairs)


@HYP
@given(cuts=cuts_for((48, 41)), seed=st.integers(0, 2**16))
def test_any_chunking_2d(cuts, seed):
    lab, grey, ref, pairs, whole = case2d()
    combined = run_chunked(lab, grey, SPACING2, cuts, seed)
    pd.testing.assert_frame_equal(combined.labels, whole.labels, check_exact=True)
    check_against_reference(combined, ref, pairs)


def test_uint64_labels_near_2_40_chunked():
    lab, grey, ref, pairs, whole = case3d(True)
    assert lab.dtype == np.uint64 and lab.max() > 2**40
    combined = run_chunked(lab, grey, SPACING3, ([5, 17], [11], [20, 21]))
    pd.testing.assert_frame_equal(combined.labels, whole.labels, check_exact=True)
    check_against_reference(combined, ref, pairs)


def test_signed_label_dtype_same_result():
    lab, grey, _, _, whole = case3d(True)
    signed = run_chunked(lab.astype(np.int64), grey, SPACING3, ([9], [], [16]))
    pd.testing.assert_frame_equal(signed.labels, whole.labels, check_exact=True)


def test_float_grey_within_1e9_across_chunkings():
    lab, grey, ref, pairs, _ = case3d(False)
    rng = np.random.default_rng(3)
    fgrey = (grey.astype(np.float32) * np.float32(1e-3) + rng.normal(0, 0.01, lab.shape)).astype(
        np.float32
    )
    fref = ref.copy()
    by_label = {}
    for lid in np.unique(lab[lab != 0]):
        v = fgrey[lab == lid].astype(np.float64)
        by_label[lid] = (v.min(), v.max(), v.mean(), v.std())
    for i, col in enumerate(["intensity_min", "intensity_max", "intensity_mean", "intensity_std"]):
        fref[col] = [by_label[lid][i] for lid in fref["label"]]
    tables = [
        finalize_stats(run_chunked(lab, fgrey, SPACING3, cuts, seed=s))
        for s, cuts in enumerate([([], [], []), ([7, 8, 30], [3], [11, 29]), ([18], [17], [16])])
    ]
    for t in tables:
        assert_close_table(t, fref, rtol=1e-9)


@pytest.mark.parametrize("dtype", [np.int32, np.uint32, np.int8])
def test_exact_integer_grey_extremes(dtype):
    """32-bit grey at the dtype's extremes: mean/std are the correctly rounded exact values."""
    info = np.iinfo(dtype)
    rng = np.random.default_rng(5)
    lab = np.zeros((9, 10, 11), np.uint16)
    lab[1:8, 2:9, 1:10] = 5
    lab[4:6, 4:6, 4:6] = 9
    grey = rng.choice(np.array([info.min, info.max, info.max - 1, 0], dtype=dtype), size=lab.shape)
    combined = run_chunked(lab, grey, (1.0, 1.0, 1.0), ([4], [3, 7], [5]))
    table = finalize_stats(combined).set_index("label")
    for lid in (5, 9):
        vals = [int(v) for v in grey[lab == lid]]
        n = len(vals)
        s = sum(vals)
        q = sum(v * v for v in vals)
        assert table.loc[lid, "intensity_mean"] == float(Fraction(s, n))
        var = Fraction(n * q - s * s, n * n)
        assert table.loc[lid, "intensity_std"] == np.sqrt(float(var))
        assert table.loc[lid, "intensity_min"] == min(vals)
        assert table.loc[lid, "intensity_max"] == max(vals)


def test_background_only_blocks_give_empty_partials():
    lab = np.zeros((6, 7, 8), np.uint32)
    grey = np.ones(lab.shape, np.uint16)
    p = chunk_stats(lab, grey, origin=(0, 0, 0), core_shape=lab.shape, volume_shape=lab.shape,
                    spacing=SPACING3)
    assert len(p.labels) == 0 and len(p.pairs) == 0
    table = finalize_stats(combine_stats([p, p]))
    assert len(table) == 0
    assert dict(table.dtypes) == {
        c: np.dtype(d) for c, d in stats_columns(3).items()
    }
    # an empty partial combines with a non-empty one
    lab2 = lab.copy()
    lab2[2:4, 2:4, 2:4] = 3
    q = chunk_stats(lab2, grey, origin=(0, 0, 0), core_shape=lab.shape, volume_shape=lab.shape,
                    spacing=SPACING3)
    pd.testing.assert_frame_equal(combine_stats([p, q, p]).labels, q.labels, check_exact=True)
    assert len(finalize_stats(combine_stats([p]), SPACING3)) == 0
    assert list(finalize_stats(combine_stats([p]), SPACING3).columns) == list(stats_columns(3))


def test_combine_raises_on_int64_overflow():
    lab = np.zeros((4, 4, 4), np.uint32)
    lab[3, 3, 3] = 1
    grey = np.zeros(lab.shape, np.uint16)
    p = chunk_stats(lab, grey, origin=(0, 0, 0), core_shape=lab.shape, volume_shape=lab.shape,
                    spacing=SPACING3)
    big = p.labels.copy()
    big["sum_00"] = np.int64(2**62)
    with pytest.raises(OverflowError, match="sum_00"):
        combine_stats([p._replace(labels=big)] * 2)


def test_core_shape_must_match_block():
    lab = np.zeros((5, 5, 5), np.uint8)
    with pytest.raises(ValueError, match="core_shape"):
        chunk_stats(lab, lab, origin=(0, 0, 0), core_shape=(5, 5, 5), volume_shape=(10, 5, 5),
                    spacing=SPACING3)


def test_finalize_spacing_must_match():
    lab = np.ones((3, 3, 3), np.uint32)
    p = chunk_stats(lab, lab.astype(np.uint16), origin=(0, 0, 0), core_shape=lab.shape,
                    volume_shape=lab.shape, spacing=SPACING3)
    with pytest.raises(ValueError, match="spacing"):
        finalize_stats(p, (1.0, 1.0, 1.0))


@pytest.mark.parametrize("dtype", [np.float16, bool])
def test_float16_and_bool_grey(dtype):
    lab = np.zeros((5, 6, 7), np.uint32)
    lab[1:3, 1:4, 2:6] = 4
    grey = (np.arange(lab.size).reshape(lab.shape) % 3).astype(dtype)
    table = finalize_stats(chunk_stats(lab, grey, origin=(0, 0, 0), core_shape=lab.shape,
                                       volume_shape=lab.shape, spacing=SPACING3))
    vals = grey[lab == 4].astype(np.float64)
    assert table["intensity_mean"].item() == pytest.approx(vals.mean(), rel=1e-12)
    assert table["intensity_std"].item() == pytest.approx(vals.std(), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), big=st.booleans())
def test_grey_mean_std_fast_rows_equal_exact_rationals(seed, big):
    """Rows whose sums fit in 2**53 take a float64 route; every row must equal the correctly
    rounded exact rationals S / n and sqrt((n Q - S**2) / n**2), computed with Python integers."""
    from grapes_dask.kernels._accum import grey_mean_std

    rng = np.random.default_rng(seed)
    rows = 300
    n = rng.integers(1, (1 << 28) if big else 5000, rows)
    grey_max = 65535 if big else 255
    # sums of n real grey values: S = n * mean-ish, Q >= S**2 / n (a genuine variance)
    s = [int(k) * int(rng.integers(0, grey_max + 1)) for k in n]
    q = [si * si // int(k) + int(k) * int(rng.integers(0, grey_max)) for si, k in zip(s, n)]
    if big:
        s[::7] = [-v for v in s[::7]]  # signed grey: negative sums take the exact route
    hi_s = np.array([v >> 64 for v in s], np.int64)
    lo_s = np.array([v & ((1 << 64) - 1) for v in s], np.uint64)
    hi_q = np.array([v >> 64 for v in q], np.uint64)
    lo_q = np.array([v & ((1 << 64) - 1) for v in q], np.uint64)
    frame = pd.DataFrame({"count": n, "grey_sum_hi": hi_s, "grey_sum_lo": lo_s, "grey_sq_hi": hi_q,
                          "grey_sq_lo": lo_q})
    mean, std = grey_mean_std(frame)
    for i in range(rows):
        k = int(n[i])
        assert mean[i] == float(Fraction(s[i], k))
        assert std[i] == np.sqrt(float(Fraction(k * q[i] - s[i] * s[i], k * k)))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([10, 2**20, 2**40, 2**62]))
def test_int64_ratios_equal_exact_rationals(seed, scale):
    """Centroids and moment covariances: the float64 route where the integers allow it, Python
    integers elsewhere; every value is the correctly rounded exact rational."""
    from grapes_dask.kernels._accum import covariance_ratio, ratio_i64

    rng = np.random.default_rng(seed)
    rows = 200
    n = rng.integers(1, min(scale, 2**62), rows, dtype=np.int64)
    s_a = rng.integers(-min(scale, 2**62), min(scale, 2**62), rows, dtype=np.int64)
    s_b = rng.integers(-min(scale, 2**62), min(scale, 2**62), rows, dtype=np.int64)
    s_ab = rng.integers(-min(scale, 2**62), min(scale, 2**62), rows, dtype=np.int64)
    got = ratio_i64(s_a, n)
    cov = covariance_ratio(n, s_ab, s_a, s_b)
    for i in range(rows):
        k, a, b, ab = int(n[i]), int(s_a[i]), int(s_b[i]), int(s_ab[i])
        assert got[i] == float(Fraction(a, k))
        assert cov[i] == float(Fraction(k * ab - a * b, k * k))
