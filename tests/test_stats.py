"""Tests of grapes_dask.stats against hand computations and independent references.

- eq. 1-5 (particle_sem, change_sem, population_stats, change_stats) on small arrays worked by
  hand, the numbers written out;
- eq. 6 (z_test) with the paper's numbers, against scipy.stats.norm, against the closed form
  with math.erfc (hypothesis) and against a simulation under the null hypothesis;
- radial_profile_stats / profile_matrix on ragged profiles with NaN layers;
- quantile_labels / quantile_groups: membership against a rank rule written out here with
  Python sorting and explicit index ranges (hypothesis), where and why pandas.qcut differs,
  statistics against a per-group loop in numpy, one case worked by hand;
- estimate_noise: against numpy + scipy.ndimage.distance_transform_edt on the whole (small)
  volume, on uneven chunks; on a phantom of known noise; region mode; errors.
"""

from __future__ import annotations

import dataclasses
import math

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from grapes_dask import columns as cols
from grapes_dask._errors import GrapesInputError
from grapes_dask.stats import (
    NoiseEstimate,
    PopulationStats,
    QuantileGroups,
    _spread_blocks,
    change_sem,
    change_stats,
    estimate_noise,
    particle_sem,
    population_stats,
    profile_matrix,
    quantile_groups,
    quantile_labels,
    radial_profile_stats,
    rank_order,
    z_test,
)

# --------------------------------------------------------------------------------------------
# eq. 1-5, by hand
# --------------------------------------------------------------------------------------------

VALUES = [10.0, 12.0, 14.0, 16.0]
N_VOXELS = [100, 400, 25, 100]
NOISE = 5.0
# eq. 1: 5/sqrt(100), 5/sqrt(400), 5/sqrt(25), 5/sqrt(100)
SEM_A = [0.5, 0.25, 1.0, 0.5]


def test_particle_sem_eq1_by_hand():
    np.testing.assert_allclose(particle_sem(N_VOXELS, NOISE), SEM_A, rtol=1e-15)
    # an empty ROI has no SEM; zero noise gives zero SEM
    out = particle_sem([0, 4], 2.0)
    assert math.isnan(out[0]) and out[1] == 1.0
    np.testing.assert_array_equal(particle_sem([4, 9], 0.0), [0.0, 0.0])


def test_change_sem_eq2_by_hand():
    # sqrt(0.5^2 + 1.2^2) = sqrt(0.25 + 1.44) = 1.3; sqrt(0.25^2 + 0) = 0.25; sqrt(0.5^2 + 0.5^2) = 0.70710678
    np.testing.assert_allclose(change_sem([0.5, 0.25, 0.5], [1.2, 0.0, 0.5]), [1.3, 0.25, 0.7071067811865476],
                               rtol=1e-15)


def test_population_stats_eq3_to_5_by_hand():
    r = population_stats(VALUES, SEM_A)
    # mean = (10 + 12 + 14 + 16) / 4 = 13
    # deviations -3, -1, 1, 3: sum of squares 20, sd = sqrt(20 / 3) = 2.581988897471611
    # eq. 4: SES = sd / sqrt(4) = 1.2909944487358056
    # eq. 3: SEM = sqrt((0.25 + 0.0625 + 1 + 0.25) / 4) = sqrt(0.390625) = 0.625
    # eq. 5: SE_tot = sqrt(20/12 + 0.390625) = sqrt(2.0572916...) = 1.4343262065048756
    assert r.n == 4
    assert r.mean == pytest.approx(13.0, rel=1e-15)
    assert r.sd == pytest.approx(2.581988897471611, rel=1e-14)
    assert r.ses == pytest.approx(1.2909944487358056, rel=1e-14)
    assert r.sem == pytest.approx(0.625, rel=1e-14)
    assert r.se_tot == pytest.approx(1.4343262065048756, rel=1e-14)
    # without SEMs: no measurement error, SE_tot = SES
    r0 = population_stats(VALUES)
    assert r0.sem == 0.0 and r0.se_tot == pytest.approx(1.2909944487358056, rel=1e-14)
    assert r.as_dict("delta_") == {"delta_" + k: getattr(r, k) for k in ("n", "mean", "sd", "ses", "sem", "se_tot")}


def test_population_stats_nan_and_small_samples():
    # a NaN value drops that particle and its SEM; a NaN SEM drops the value
    r = population_stats([10.0, np.nan, 14.0, 16.0], [0.5, 9.0, np.nan, 0.5])
    # kept: 10 and 16 with SEMs 0.5, 0.5: mean 13, sd sqrt(18) = 4.242640687119285, SES 3, SEM 0.5
    assert r.n == 2 and r.mean == 13.0
    assert r.sd == pytest.approx(4.242640687119285, rel=1e-14)
    assert r.ses == pytest.approx(3.0, rel=1e-14)
    assert r.sem == pytest.approx(0.5, rel=1e-14)
    assert r.se_tot == pytest.approx(math.sqrt(9.25), rel=1e-14)
    one = population_stats([7.0], [0.3])
    assert one.n == 1 and one.mean == 7.0 and math.isnan(one.sd) and math.isnan(one.ses) and math.isnan(one.se_tot)
    none = population_stats([np.nan, np.nan])
    assert none.n == 0 and math.isnan(none.mean) and math.isnan(none.sem)
    assert population_stats([]).n == 0


def test_change_stats_pairs_particles_by_hand():
    b = [9.0, 12.0, 11.0, 15.0]
    r = change_stats(VALUES, b, SEM_A, [1.2, 0.0, 0.0, 0.5])
    # per-particle changes b - a: -1, 0, -3, -1; mean -1.25
    # deviations 0.25, 1.25, -1.75, 0.25: squares sum 4.75; sd = sqrt(4.75/3) = 1.2583057392117916
    # SES = sd / 2 = 0.6291528696058958
    # eq. 2 per particle: 1.3, 0.25, 1.0, 0.70710678; squares 1.69, 0.0625, 1, 0.5 -> mean 0.813125
    # eq. 3: SEM = sqrt(0.813125) = 0.9017344398435717; eq. 5: sqrt(4.75/12 + 0.813125) = 1.0995264132040363
    assert r.n == 4 and r.mean == pytest.approx(-1.25, rel=1e-15)
    assert r.sd == pytest.approx(1.2583057392117916, rel=1e-14)
    assert r.ses == pytest.approx(0.6291528696058958, rel=1e-14)
    assert r.sem == pytest.approx(0.9017344398435717, rel=1e-14)
    assert r.se_tot == pytest.approx(1.0995264132040363, rel=1e-14)
    # pairing: the spread of the particles' own levels (sd 2.58 in a) does not enter the change's SES,
    # and swapping the order of one state's particles changes the result
    shuffled = change_stats(VALUES, [12.0, 9.0, 11.0, 15.0])
    assert shuffled.sd != pytest.approx(r.sd)
    # a particle missing in one state (NaN) leaves the change: -1, -3, -1 -> mean -5/3
    m = change_stats(VALUES, [9.0, np.nan, 11.0, 15.0])
    assert m.n == 3 and m.mean == pytest.approx(-5.0 / 3.0, rel=1e-14)


@pytest.mark.parametrize("call, words", [
    (lambda: particle_sem([1, 2], -1.0), "noise_sigma"),
    (lambda: particle_sem([1, 2], float("nan")), "noise_sigma"),
    (lambda: particle_sem([1, 2], "6"), "noise_sigma"),
    (lambda: particle_sem(["a", "b"], 1.0), "n_voxels"),
    (lambda: change_sem([1.0, 2.0], [1.0]), "sem_a"),
    (lambda: population_stats([1.0, 2.0], [0.1]), "one SEM per value"),
    (lambda: population_stats(["x"]), "values"),
    (lambda: change_stats([1.0, 2.0], [1.0]), "same particles"),
    (lambda: change_stats([1.0], [2.0], sem_a=[0.1]), "both sem_a and sem_b"),
    (lambda: change_stats([1.0], [2.0], [0.1, 0.2], [0.1, 0.2]), "one SEM per particle"),
])
def test_population_input_errors(call, words):
    with pytest.raises(GrapesInputError, match=words):
        call()


# --------------------------------------------------------------------------------------------
# eq. 6
# --------------------------------------------------------------------------------------------


def test_z_test_paper_numbers():
    # 4.0 V against pristine (paper section 3.2): (173.00 - 174.41) / sqrt(11.27^2/3650 + 11.08^2/3650)
    # = -1.41 / sqrt(249.7793 / 3650) = -1.41 / 0.2615964 = -5.38998
    r = z_test(173.00, 11.27, 3650, 174.41, 11.08, 3650)
    assert round(r.z, 2) == -5.39
    assert r.z == pytest.approx(-5.389982098627079, rel=1e-12)
    assert r.critical == -5.0 and r.reject is True and r.alternative == "less" and r.sigma == 5.0
    assert r.alpha == pytest.approx(norm.sf(5.0), rel=1e-12)  # 2.87e-7
    assert r.p == pytest.approx(norm.cdf(-5.389982098627079), rel=1e-9)
    assert r.p < 2.87e-7 < 2.9e-7
    # at 6 sigma the same change is not significant
    assert z_test(173.00, 11.27, 3650, 174.41, 11.08, 3650, sigma=6.0).reject is False


@pytest.mark.parametrize("alternative", ["less", "greater", "two-sided"])
@pytest.mark.parametrize("z_target", [-5.39, -1.2, 0.0, 2.5, 6.1])
def test_z_test_alternatives_against_scipy(alternative, z_target):
    # sample 1 of 100 with sd 10, sample 2 of 100 with sd 10: SE = sqrt(2) exactly; mean1 = z * SE
    se = math.sqrt(2.0)
    r = z_test(z_target * se, 10.0, 100, 0.0, 10.0, 100, alternative=alternative, sigma=2.0)
    assert r.z == pytest.approx(z_target, abs=1e-12)
    if alternative == "less":
        p, crit, alpha, rej = norm.cdf(z_target), -2.0, norm.sf(2.0), z_target < -2.0
    elif alternative == "greater":
        p, crit, alpha, rej = norm.sf(z_target), 2.0, norm.sf(2.0), z_target > 2.0
    else:
        p, crit, alpha, rej = 2 * norm.sf(abs(z_target)), 2.0, 2 * norm.sf(2.0), abs(z_target) > 2.0
    assert r.p == pytest.approx(p, rel=1e-9, abs=1e-300)
    assert r.critical == crit and r.alpha == pytest.approx(alpha, rel=1e-12) and r.reject is rej


def test_z_test_zero_standard_error():
    assert z_test(1.0, 0.0, 5, 2.0, 0.0, 5).z == -math.inf
    r = z_test(2.0, 0.0, 5, 2.0, 0.0, 5)
    assert r.z == 0.0 and r.p == 0.5 and r.reject is False


@settings(max_examples=200, deadline=None)
@given(m1=st.floats(-1e3, 1e3), m2=st.floats(-1e3, 1e3), s1=st.floats(0.01, 100), s2=st.floats(0.01, 100),
       n1=st.integers(1, 10_000), n2=st.integers(1, 10_000), sigma=st.floats(0.5, 6.0),
       alternative=st.sampled_from(["less", "greater", "two-sided"]))
def test_z_test_matches_the_closed_form(m1, m2, s1, s2, n1, n2, sigma, alternative):
    z = (m1 - m2) / math.sqrt(s1 * s1 / n1 + s2 * s2 / n2)
    # normal tail probabilities from math.erfc (no scipy)
    p = {"less": 0.5 * math.erfc(-z / math.sqrt(2)), "greater": 0.5 * math.erfc(z / math.sqrt(2)),
         "two-sided": math.erfc(abs(z) / math.sqrt(2))}[alternative]
    r = z_test(m1, s1, n1, m2, s2, n2, alternative=alternative, sigma=sigma)
    assert r.z == pytest.approx(z, rel=1e-12, abs=1e-12)
    assert r.p == pytest.approx(p, rel=1e-7, abs=1e-300)
    dist = abs(z) - sigma if alternative == "two-sided" else (z + sigma if alternative == "less" else sigma - z)
    assume(abs(dist) > 1e-9)  # not on the critical value itself
    expected = {"less": z < -sigma, "greater": z > sigma, "two-sided": abs(z) > sigma}[alternative]
    assert r.reject is expected


def test_z_test_p_value_is_uniform_under_the_null():
    # two samples of one normal population, the true sd given: z ~ N(0, 1) exactly, p ~ U(0, 1)
    rng = np.random.default_rng(12345)
    trials, n = 4000, 30
    a = rng.normal(100.0, 4.0, (trials, n)).mean(axis=1)
    b = rng.normal(100.0, 4.0, (trials, n)).mean(axis=1)
    for alternative in ("less", "greater", "two-sided"):
        p = np.array([z_test(x, 4.0, n, y, 4.0, n, alternative=alternative, sigma=1.0).p for x, y in zip(a, b)])
        ks = np.max(np.abs(np.sort(p) - (np.arange(trials) + 0.5) / trials))
        assert ks < 1.63 / math.sqrt(trials) + 1 / trials  # Kolmogorov-Smirnov at 1%
        # rejection rate at 1 sigma: norm.sf(1) = 0.1587 one-sided, 0.3173 two-sided, within 4 SE
        rate = np.mean([z_test(x, 4.0, n, y, 4.0, n, alternative=alternative, sigma=1.0).reject
                        for x, y in zip(a[:1000], b[:1000])])
        expect = norm.sf(1.0) * (2 if alternative == "two-sided" else 1)
        assert abs(rate - expect) < 4 * math.sqrt(expect * (1 - expect) / 1000)


@pytest.mark.parametrize("kwargs, words", [
    (dict(alternative="smaller"), "alternative"),
    (dict(sigma=0.0), "sigma"),
    (dict(sigma=float("nan")), "sigma"),
    (dict(n1=0), "n1"),
    (dict(n2=float("nan")), "n2"),
    (dict(sd1=-1.0), "standard deviations"),
    (dict(mean2=float("inf")), "mean2"),
    (dict(mean1="173"), "mean1"),
    (dict(n1=None), "n1"),
])
def test_z_test_input_errors(kwargs, words):
    args = dict(mean1=1.0, sd1=1.0, n1=10, mean2=2.0, sd2=1.0, n2=10)
    opts = {k: kwargs.pop(k) for k in ("alternative", "sigma") if k in kwargs}
    args.update(kwargs)
    with pytest.raises(GrapesInputError, match=words):
        z_test(**args, **opts)


# --------------------------------------------------------------------------------------------
# radial profiles
# --------------------------------------------------------------------------------------------

RAGGED = pd.DataFrame({"label": np.array([1, 2, 3], np.uint64),
                       "radial_layers_graylevel": [np.array([1.0, 2.0, 3.0]), np.array([3.0, 4.0]),
                                                   np.array([np.nan, 6.0, 9.0, 12.0])]})


def test_profile_matrix_pads_with_nan():
    m = profile_matrix(RAGGED, "radial_layers_graylevel")
    np.testing.assert_array_equal(m, [[1, 2, 3, np.nan], [3, 4, np.nan, np.nan], [np.nan, 6, 9, 12]])
    np.testing.assert_array_equal(profile_matrix(RAGGED, "radial_layers_graylevel", 2), [[1, 2], [3, 4], [np.nan, 6]])
    assert profile_matrix(RAGGED, "radial_layers_graylevel", 6).shape == (3, 6)
    # missing cells are empty profiles; lists work like arrays
    t = pd.DataFrame({"p": [None, [1.0, 2.0], np.nan]})
    np.testing.assert_array_equal(profile_matrix(t, "p"), [[np.nan, np.nan], [1, 2], [np.nan, np.nan]])
    assert profile_matrix(t.iloc[:0], "p").shape == (0, 0)


def test_radial_profile_stats_ragged_by_hand():
    layers, mean, se, n = radial_profile_stats(RAGGED, "radial_layers_graylevel")
    np.testing.assert_array_equal(layers, [1, 2, 3, 4])
    np.testing.assert_array_equal(n, [2, 3, 2, 1])
    # layer 1: 1, 3 (the NaN layer left out) -> mean 2, sd sqrt(2), se 1
    # layer 2: 2, 4, 6 -> mean 4, sd 2, se 2/sqrt(3); layer 3: 3, 9 -> mean 6, sd sqrt(18), se 3
    # layer 4: 12 alone -> mean 12, no se
    np.testing.assert_allclose(mean, [2.0, 4.0, 6.0, 12.0], rtol=1e-15)
    np.testing.assert_allclose(se[:3], [1.0, 2.0 / math.sqrt(3.0), 3.0], rtol=1e-14)
    assert math.isnan(se[3])
    layers, mean, se, n = radial_profile_stats(RAGGED, "radial_layers_graylevel", max_layer=6)
    np.testing.assert_array_equal(n, [2, 3, 2, 1, 0, 0])
    assert np.isnan(mean[4:]).all() and np.isnan(se[4:]).all()


def test_radial_profile_stats_one_particle_and_empty():
    layers, mean, se, n = radial_profile_stats(RAGGED.iloc[[1]], "radial_layers_graylevel")
    np.testing.assert_array_equal(layers, [1, 2])
    np.testing.assert_array_equal(mean, [3.0, 4.0])
    np.testing.assert_array_equal(n, [1, 1])
    assert np.isnan(se).all()
    layers, mean, se, n = radial_profile_stats(RAGGED.iloc[:0], "radial_layers_graylevel")
    assert len(layers) == len(mean) == len(se) == len(n) == 0


def test_radial_profile_stats_against_numpy_loop():
    rng = np.random.default_rng(3)
    profiles = [rng.normal(100, 10, rng.integers(0, 9)) for _ in range(40)]
    for p in profiles[::5]:
        if len(p):
            p[rng.integers(0, len(p))] = np.nan
    t = pd.DataFrame({"p": profiles})
    layers, mean, se, n = radial_profile_stats(t, "p")
    for j in range(len(layers)):
        vals = np.array([p[j] for p in profiles if len(p) > j and np.isfinite(p[j])])
        assert n[j] == len(vals)
        assert mean[j] == pytest.approx(vals.mean(), rel=1e-12)
        if len(vals) > 1:
            assert se[j] == pytest.approx(vals.std(ddof=1) / math.sqrt(len(vals)), rel=1e-12)


def test_plotting_uses_the_stats_function():
    from grapes_dask import plotting

    assert plotting.radial_profile_stats is radial_profile_stats


@pytest.mark.parametrize("call, words", [
    (lambda: radial_profile_stats(RAGGED, "nope"), "not a column"),
    (lambda: radial_profile_stats(RAGGED, "radial_layers_graylevel", max_layer=0), "max_layer"),
    (lambda: radial_profile_stats({"a": 1}, "a"), "DataFrame"),
    (lambda: profile_matrix(pd.DataFrame({"p": ["[1, 2]"]}), "p"), "read_table"),
    (lambda: profile_matrix(pd.DataFrame({"p": [np.ones((2, 2))]}), "p"), "one list"),
])
def test_profile_input_errors(call, words):
    with pytest.raises(GrapesInputError, match=words):
        call()


# --------------------------------------------------------------------------------------------
# quantile groups
# --------------------------------------------------------------------------------------------


def _hand_table():
    # volumes 1..8 in this row order; quartile edges of 1..8: 1, 2.75, 4.5, 6.25, 8
    vol = [5.0, 1.0, 3.0, 8.0, 2.0, 7.0, 4.0, 6.0]
    prof = [[50, 60], [10, 20, 30], [30, 40], [80, 90], [14, 24], [70, 80, 90], [40, 50], [60, np.nan]]
    return pd.DataFrame({
        "label": np.arange(1, 9, dtype=np.uint64),
        "volume": vol,
        "roi_mean": [100.0, 101.0, 102.0, 103.0, 105.0, 107.0, np.nan, 111.0],
        "touches_border": [False] * 8,
        "radial_layers_graylevel": [np.array(p, float) for p in prof],
    })


def test_quantile_groups_by_hand():
    t = _hand_table()
    r = quantile_groups(t, "volume", 4, profiles=("radial_layers_graylevel",))
    assert isinstance(r, QuantileGroups) and r.q == 4 and r.column == "volume"
    np.testing.assert_allclose(r.edges, [1.0, 2.75, 4.5, 6.25, 8.0], rtol=1e-15)
    # 8 values in 4 groups of 2 by rank: 1, 2 -> 1; 3, 4 -> 2; 5, 6 -> 3; 7, 8 -> 4
    assert r.groups.tolist() == [3, 1, 2, 4, 1, 4, 2, 3]
    p = r.profiles
    assert list(p.columns) == ["group", "layer"] + [f"radial_layers_graylevel-{s}" for s in ("mean", "std", "se", "n")]
    assert len(p) == 4 * 3  # q groups x the deepest layer (3)
    g1 = p[p.group == 1].set_index("layer")
    # group 1: volumes 1 and 2 -> profiles [10, 20, 30] and [14, 24]
    # layer 1: 10, 14 -> mean 12, std sqrt(8) = 2.8284271247461903, se 2, n 2; layer 2: 20, 24 likewise
    # layer 3: 30 alone -> mean 30, std/se NaN, n 1
    np.testing.assert_allclose(g1["radial_layers_graylevel-mean"], [12.0, 22.0, 30.0], rtol=1e-15)
    np.testing.assert_allclose(g1["radial_layers_graylevel-std"][:2], [2.8284271247461903] * 2, rtol=1e-14)
    np.testing.assert_allclose(g1["radial_layers_graylevel-se"][:2], [2.0, 2.0], rtol=1e-14)
    assert g1["radial_layers_graylevel-n"].tolist() == [2, 2, 1]
    assert np.isnan(g1.loc[3, "radial_layers_graylevel-std"])
    g3 = p[p.group == 3].set_index("layer")
    # group 3: volumes 5 and 6 -> [50, 60] and [60, NaN]: layer 1 mean 55, layer 2 only 60, layer 3 none
    assert g3["radial_layers_graylevel-n"].tolist() == [2, 1, 0]
    assert g3.loc[1, "radial_layers_graylevel-mean"] == 55.0 and g3.loc[2, "radial_layers_graylevel-mean"] == 60.0
    assert np.isnan(g3.loc[3, "radial_layers_graylevel-mean"])
    s = r.scalars
    assert s.index.name == "group" and s.index.tolist() == [1, 2, 3, 4]
    assert s["n"].tolist() == [2, 2, 2, 2]
    # lo, hi: each group's smallest and largest volume
    np.testing.assert_allclose(s["lo"], [1.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(s["hi"], [2.0, 4.0, 6.0, 8.0])
    # default columns: numeric, not label, not boolean
    assert "label-mean" not in s and "touches_border-mean" not in s and "volume-mean" in s
    # roi_mean: group 1 {101, 105}: mean 103, std sqrt(8), se 2, median 103
    #           group 2 {102, NaN}: n 1, mean 102, std NaN; group 4 {103, 107}: mean 105
    assert s.loc[1, "roi_mean-mean"] == 103.0 and s.loc[1, "roi_mean-median"] == 103.0
    assert s.loc[1, "roi_mean-std"] == pytest.approx(2.8284271247461903, rel=1e-14)
    assert s.loc[1, "roi_mean-se"] == pytest.approx(2.0, rel=1e-14)
    assert s.loc[2, "roi_mean-n"] == 1 and s.loc[2, "roi_mean-mean"] == 102.0 and np.isnan(s.loc[2, "roi_mean-std"])
    assert s.loc[4, "roi_mean-mean"] == 105.0
    # explicit columns, a boolean among them (a fraction)
    r2 = quantile_groups(t, "volume", 2, profiles=(), columns=["touches_border"])
    assert list(r2.scalars.columns) == ["n", "lo", "hi"] + [f"touches_border-{x}" for x in ("n", "mean", "std", "se",
                                                                                            "median")]
    assert r2.scalars["touches_border-mean"].tolist() == [0.0, 0.0]
    assert len(r2.profiles) == 0 and list(r2.profiles.columns) == ["group", "layer"]


def _rank_reference(values, q, ties):
    """Groups by the documented rank rule, written out with Python's sort and index ranges."""
    fin = [i for i, v in enumerate(values) if np.isfinite(v)]
    order = sorted(fin, key=lambda i: (values[i], ties[i], i))
    n = len(order)
    group = np.zeros(len(values), int)
    for g in range(1, q + 1):
        for r in range((g - 1) * n // q, g * n // q):  # floor((g-1) n / q) <= r < floor(g n / q)
            group[order[r]] = g
    return group


def test_quantile_labels_by_hand_and_against_qcut():
    # five distinct values, four groups: the rank rule gives sizes 1, 1, 1, 2 (group 1 = the floor(5/4) = 1
    # smallest, what drop_smallest=0.25 removes); pandas.qcut's edges 1, 2, 3, 4, 5 put 1 and 2 together
    # (right-closed), sizes 2, 1, 1, 1: the two rules differ without any tie whenever n is not a multiple of q
    v = [5.0, 1.0, 3.0, 8.0, 2.0]
    assert quantile_labels(v, 4).tolist() == [4, 1, 3, 4, 2]
    assert (pd.qcut(v, 4, labels=False) + 1).tolist() == [3, 1, 2, 4, 1]
    # ties split by label: the three 3s are labels 30, 10, 20 -> ranks 2, 3, 4 go to labels 10, 20, 30
    x = [3.0, 1.0, 3.0, 6.0, np.nan, 2.0, 3.0, 5.0, 4.0, np.inf]
    lab = [30, 1, 10, 60, 99, 2, 20, 50, 40, 98]
    g = quantile_labels(x, 2, ties=lab)
    # 8 finite values: ranks 0-3 (1, 2, 3@10, 3@20) -> group 1, ranks 4-7 (3@30, 4, 5, 6) -> group 2
    assert g.tolist() == [2, 1, 1, 2, 0, 1, 1, 2, 2, 0]
    assert rank_order(x, lab).tolist() == [1, 5, 2, 6, 0, 8, 7, 3]
    # without ties given: by position
    assert quantile_labels([2.0, 2.0, 2.0], 3).tolist() == [1, 2, 3]
    assert quantile_labels([np.nan, 1.0], 2).tolist() == [0, 2]  # fewer values than groups: group 1 empty
    with pytest.raises(GrapesInputError, match="q=0"):
        quantile_labels(v, 0)
    with pytest.raises(GrapesInputError, match="ties has 2"):
        quantile_labels(v, 2, ties=[1, 2])


@settings(max_examples=150, deadline=None)
@given(data=st.data(), n=st.integers(0, 60), q=st.integers(1, 12), n_distinct=st.integers(1, 8))
def test_quantile_rules_agree_everywhere(data, n, q, n_distinct):
    """quantile_labels, quantile_groups, the cleaning rule `smallest` (drop_smallest = 1/q) and
    Tracking.by_quantile's grouping give the groups of the rank rule, ties or not, n a multiple of
    q or not."""
    from grapes_dask.track import _clean

    seed = data.draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    values = rng.integers(0, n_distinct, n).astype(float) if data.draw(st.booleans()) else rng.normal(0, 1, n)
    if n:
        values[rng.random(n) < 0.1] = np.nan
    labels = rng.permutation(np.arange(1, n + 1) * 7).astype(np.uint64)
    ref = _rank_reference(values, q, labels.astype(int))
    got = quantile_labels(values, q, ties=labels)
    np.testing.assert_array_equal(got, ref)
    fin = np.isfinite(values)
    sizes = np.bincount(got[fin], minlength=q + 1)[1:]
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == fin.sum()
    # quantile_groups on a table with those labels
    t = pd.DataFrame({"label": labels, "v": values})
    if fin.sum() >= q:
        qg = quantile_groups(t, "v", q, profiles=(), columns=[])
        np.testing.assert_array_equal(qg.groups.fillna(0).to_numpy(int), ref)
    else:
        with pytest.raises(GrapesInputError, match="fewer than q"):
            quantile_groups(t, "v", q, profiles=(), columns=[])
    # the cleaning rule: among the finite (candidate) particles, floor(n / q) smallest = group 1
    m = int(fin.sum())
    present = np.ones((m, 2), bool)
    none = np.zeros((m, 2), bool)
    if q > 1:  # drop_smallest < 1
        flags, _ = _clean(labels[fin], present, none, none, np.zeros(m, bool), values[fin], 1.0 / q)
        np.testing.assert_array_equal(flags[:, 4], ref[fin] == 1)


def test_quantile_groups_ties_and_nan_rows():
    # 1, 2, 3, 3, 3, 4, 5, 6 in 2 groups by rank, ties by label: the 3s of labels 3 and 7 go to group 1, that of
    # label 1 to group 2
    t = pd.DataFrame({"label": np.array([8, 2, 3, 4, 5, 6, 7, 1, 9, 10], np.uint64),
                      "x": [3.0, 1.0, 3.0, 6.0, np.nan, 2.0, 3.0, 5.0, 4.0, np.inf]})
    r = quantile_groups(t, "x", 2, profiles=())
    np.testing.assert_array_equal(r.edges, [1.0, 3.0, 6.0])  # numpy.quantile, descriptive
    assert r.groups.fillna(0).tolist() == [2, 1, 1, 2, 0, 1, 1, 2, 2, 0]
    assert r.groups.isna().tolist() == [False] * 4 + [True] + [False] * 4 + [True]
    assert r.scalars["n"].tolist() == [4, 4]
    assert r.scalars["lo"].tolist() == [1.0, 3.0] and r.scalars["hi"].tolist() == [3.0, 6.0]


def test_quantile_groups_errors():
    t = _hand_table()
    with pytest.raises(GrapesInputError, match=r"2 finite .* lower q to at most 2"):
        quantile_groups(pd.DataFrame({"x": [1.0, 2.0, np.nan]}), "x", 3, profiles=())
    # one value repeated: groups by rank all the same, no error (pandas.qcut refuses)
    r = quantile_groups(pd.DataFrame({"x": [1.0] * 10 + [2.0, 3.0, 4.0]}), "x", 4, profiles=())
    assert r.scalars["n"].tolist() == [3, 3, 3, 4]
    with pytest.raises(GrapesInputError, match="q=0"):
        quantile_groups(t, "volume", 0)
    with pytest.raises(GrapesInputError, match="q=2.5"):
        quantile_groups(t, "volume", 2.5)
    with pytest.raises(GrapesInputError, match="not a column"):
        quantile_groups(t, "size", 4)
    with pytest.raises(GrapesInputError, match="profiles='radial_layers_graylevelnormed'"):
        quantile_groups(t, "volume", 4)  # the default profiles: this table has only one of them
    with pytest.raises(GrapesInputError, match="numeric"):
        quantile_groups(t, "radial_layers_graylevel", 4, profiles=())
    with pytest.raises(GrapesInputError, match="not numbers"):
        quantile_groups(t, "volume", 4, profiles=(), columns=["radial_layers_graylevel"])
    with pytest.raises(GrapesInputError, match="0 finite"):
        quantile_groups(pd.DataFrame({"x": [np.nan, np.nan]}), "x", 1, profiles=())


def _per_group_reference(values, profiles, scal, q, k):
    """Groups and their statistics written out with numpy loops (the test's own reference)."""
    fin = np.isfinite(values)
    edges = np.quantile(values[fin], np.linspace(0, 1, q + 1))
    group = _rank_reference(values, q, list(range(len(values))))
    group = np.where(group == 0, -1, group)
    rows = []
    for g in range(1, q + 1):
        members = np.flatnonzero(group == g)
        for j in range(k):
            vals = np.array([profiles[i][j] for i in members if len(profiles[i]) > j and np.isfinite(profiles[i][j])])
            sd = vals.std(ddof=1) if len(vals) > 1 else np.nan
            rows.append((g, j + 1, vals.mean() if len(vals) else np.nan, sd, sd / np.sqrt(len(vals)), len(vals)))
    sc = []
    for g in range(1, q + 1):
        v = scal[group == g]
        v = v[np.isfinite(v)]
        sd = v.std(ddof=1) if len(v) > 1 else np.nan
        sc.append((g, (group == g).sum(), len(v), v.mean() if len(v) else np.nan, sd, sd / np.sqrt(len(v)),
                   np.median(v) if len(v) else np.nan))
    return group, edges, rows, sc


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), n=st.integers(12, 80), q=st.sampled_from([1, 2, 3, 4, 10]),
       rounding=st.sampled_from([None, 0]))
def test_quantile_groups_against_numpy_loops(seed, n, q, rounding):
    rng = np.random.default_rng(seed)
    values = rng.gamma(2.0, 50.0, n)
    if rounding is not None:
        values = np.round(values / 20.0)  # many ties
    values[rng.random(n) < 0.1] = np.nan
    profiles = [rng.normal(100, 10, rng.integers(0, 7)) for _ in range(n)]
    for p in profiles:
        if len(p) and rng.random() < 0.3:
            p[rng.integers(0, len(p))] = np.nan
    scal = rng.normal(0, 1, n)
    scal[rng.random(n) < 0.1] = np.nan
    t = pd.DataFrame({"v": values, "s": scal, "radial_layers_graylevel": profiles})
    fin = np.isfinite(values)
    k = max([len(p) for p, f in zip(profiles, fin) if f], default=0)
    group, edges, rows, sc = _per_group_reference(values, profiles, scal, q, k)
    if fin.sum() < q:
        with pytest.raises(GrapesInputError, match="fewer than q"):
            quantile_groups(t, "v", q, profiles=("radial_layers_graylevel",), columns=["s"])
        return
    r = quantile_groups(t, "v", q, profiles=("radial_layers_graylevel",), columns=["s"])
    np.testing.assert_allclose(r.edges, edges, rtol=1e-15)
    np.testing.assert_array_equal(r.groups.fillna(-1).to_numpy(int), group)
    ref = pd.DataFrame(rows, columns=["group", "layer", "mean", "std", "se", "n"])
    P = "radial_layers_graylevel"
    np.testing.assert_array_equal(r.profiles[["group", "layer"]].to_numpy(), ref[["group", "layer"]].to_numpy())
    np.testing.assert_array_equal(r.profiles[f"{P}-n"], ref["n"])
    for s in ("mean", "std", "se"):
        np.testing.assert_allclose(r.profiles[f"{P}-{s}"], ref[s], rtol=1e-10, equal_nan=True)
    ref_s = pd.DataFrame(sc, columns=["group", "n", "s-n", "s-mean", "s-std", "s-se", "s-median"]).set_index("group")
    np.testing.assert_array_equal(r.scalars["n"], ref_s["n"])
    np.testing.assert_array_equal(r.scalars["s-n"], ref_s["s-n"])
    for s in ("s-mean", "s-std", "s-se", "s-median"):
        np.testing.assert_allclose(r.scalars[s], ref_s[s], rtol=1e-10, atol=1e-14, equal_nan=True)


def test_quantile_groups_deciles_max_layer():
    rng = np.random.default_rng(1)
    t = pd.DataFrame({"volume": rng.random(100), "radial_layers_graylevel": [rng.random(8) for _ in range(100)],
                      "radial_layers_graylevelnormed": [rng.random(8) for _ in range(100)],
                      "radial_layers_std": [rng.random(8) for _ in range(100)]})
    r = quantile_groups(t, "volume", 10, max_layer=3)
    assert r.scalars["n"].tolist() == [10] * 10
    assert len(r.profiles) == 30 and r.profiles["layer"].max() == 3
    for p in cols.GROUP_PROFILES:
        assert (r.profiles[f"{p}-n"] == 10).all()


# --------------------------------------------------------------------------------------------
# noise
# --------------------------------------------------------------------------------------------


def _reference_noise(grey, labels, margin):
    """numpy + scipy on the whole volume: label-0 voxels at Euclidean distance >= margin from particles."""
    d = ndi.distance_transform_edt(labels == 0)
    v = grey[(labels == 0) & (d >= margin)].astype(np.float64)
    v = v[np.isfinite(v)]
    return v.std(ddof=1), v.mean(), v.size


def _blobs(shape, seed, fill=0.25):
    rng = np.random.default_rng(seed)
    smooth = ndi.gaussian_filter(rng.random(shape), 2.0)
    lab, _ = ndi.label(smooth > np.quantile(smooth, 1 - fill))
    return lab.astype(np.uint32), rng


def _chunks(draw, n):
    """Uneven chunk sizes summing to n, some as small as 1."""
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=4)))
    b = [0, *cuts, n]
    return tuple(y - x for x, y in zip(b[:-1], b[1:]))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=st.integers(0, 1000), margin=st.sampled_from([0, 1, 2, 2.5, 3, 4]),
       ndim=st.sampled_from([2, 3]))
def test_estimate_noise_against_whole_volume_edt(data, seed, margin, ndim):
    shape = (37, 41) if ndim == 2 else (14, 19, 23)
    labels, rng = _blobs(shape, seed)
    grey = rng.normal(80.0, 7.0, shape).astype(np.float32) + (labels > 0) * np.float32(60.0)
    chunks = tuple(_chunks(data.draw, n) for n in shape)
    sd, mean, n = _reference_noise(grey, labels, margin)
    r = estimate_noise(da.from_array(grey, chunks=chunks), da.from_array(labels, chunks=chunks), margin=margin,
                       mode="background")
    assert r.n_voxels == n
    assert r.sigma == pytest.approx(sd, rel=1e-10)
    assert r.mean == pytest.approx(mean, rel=1e-12)
    assert r.source == "background" and r.region is None and r.margin == float(margin)


def test_estimate_noise_grey_and_labels_chunked_differently_nan_grey():
    labels, rng = _blobs((30, 33, 35), 5)
    grey = rng.normal(20.0, 2.0, labels.shape)
    grey[0, :5, :5] = np.nan  # e.g. outside a reconstruction
    sd, mean, n = _reference_noise(grey, labels, 3)
    r = estimate_noise(da.from_array(grey, chunks=(7, 30, 9)), da.from_array(labels, chunks=(11, 8, 35)), mode="background")
    assert r.n_voxels == n and r.sigma == pytest.approx(sd, rel=1e-10) and r.mean == pytest.approx(mean, rel=1e-12)
    # numpy inputs, one chunk
    r2 = estimate_noise(grey, labels, margin=3, mode="background")
    assert r2.n_voxels == n and r2.sigma == pytest.approx(sd, rel=1e-10)


def test_estimate_noise_phantom_known_sigma(tmp_path):
    from grapes_dask.synthetic import phantom_numpy

    grey, labels, _ = phantom_numpy((48, 48, 48), seed=2, noise_sigma=6.0, blur_sigma=0.0)
    r = estimate_noise(da.from_array(grey, chunks=20), da.from_array(labels, chunks=20), margin=3)
    # the pore space is flat (level 40) plus Gaussian noise of sigma 6 (rounded to uint8: +1/12 variance)
    assert r.sigma == pytest.approx(6.0, rel=0.03)
    assert r.mean == pytest.approx(40.0, abs=0.5)
    assert r.n_voxels > 10_000
    # the same from a file
    path = tmp_path / "grey.npy"
    np.save(path, grey)
    lpath = tmp_path / "labels.npy"
    np.save(lpath, labels)
    r2 = estimate_noise(str(path), str(lpath), margin=3)
    assert r2.sigma == pytest.approx(r.sigma, rel=1e-12) and r2.n_voxels == r.n_voxels


def test_estimate_noise_region():
    rng = np.random.default_rng(9)
    grey = rng.normal(0.0, 1.0, (20, 30, 40)).astype(np.float32)
    grey[:6] = rng.normal(1000.0, 3.0, (6, 30, 40))  # empty space above the sample: a different level and noise
    g = da.from_array(grey, chunks=(4, 7, 11))
    ref = grey[1:5, 2:29, 0:40].astype(np.float64)
    boxes = [((1, 5), (2, 29), (0, 40)), (slice(1, 5), slice(2, 29), slice(None)), [(1, 5), (2, 29), (None, None)]]
    for region in boxes:
        r = estimate_noise(g, region=region)
        assert r.source == "region" and r.region == ((1, 5), (2, 29), (0, 40)) and r.margin is None
        assert r.n_voxels == ref.size
        assert r.sigma == pytest.approx(ref.std(ddof=1), rel=1e-10)
        assert r.mean == pytest.approx(ref.mean(), rel=1e-12)
    assert 2.8 < r.sigma < 3.2
    d = r.as_dict()
    assert d["noise_sigma"] == r.sigma and d["noise_source"] == "region" and d["noise_region"] == [[1, 5], [2, 29],
                                                                                                 [0, 40]]
    # 2D
    r2 = estimate_noise(grey[3], region=((0, 30), (10, 20)))
    assert r2.sigma == pytest.approx(grey[3, :, 10:20].astype(np.float64).std(ddof=1), rel=1e-10)


def test_estimate_noise_max_voxels():
    # 4 x 4 x 4 chunks of 10^3 voxels, at most 8000 voxels: 2 blocks per axis, at (0.5, 1.5) * 4 / 2 -> 1, 3
    assert [list(a) for a in _spread_blocks(((10,) * 4,) * 3, 8000)] == [[1, 3]] * 3
    # uneven: 3 chunks (5, 30, 5) on one axis, 400 voxels in all
    assert [list(a) for a in _spread_blocks(((5, 30, 5), (10,)), 400)] == [[0, 1, 2], [0]]
    # 2 of 3 blocks at (0.5, 1.5) * 3 / 2 = 0.75, 2.25 -> 0, 2: (5 + 5) * 10 = 100 voxels
    assert [list(a) for a in _spread_blocks(((5, 30, 5), (10,)), 399)] == [[0, 2], [0]]
    rng = np.random.default_rng(4)
    grey = rng.normal(10.0, 2.0, (40, 40, 40))
    r = estimate_noise(da.from_array(grey, chunks=10), region=(slice(None),) * 3, max_voxels=8000)
    # blocks (1, 3) per axis: 8 whole chunks
    sel = np.concatenate([grey[a * 10:a * 10 + 10, b * 10:b * 10 + 10, c * 10:c * 10 + 10].ravel()
                          for a in (1, 3) for b in (1, 3) for c in (1, 3)])
    assert r.n_voxels == 8000
    assert r.sigma == pytest.approx(sel.std(ddof=1), rel=1e-10)
    # fewer voxels than one chunk: one chunk
    assert estimate_noise(da.from_array(grey, chunks=10), region=(slice(None),) * 3, max_voxels=10).n_voxels == 1000


def test_estimate_noise_on_a_cluster():
    from distributed import Client

    labels, rng = _blobs((20, 22, 24), 1)
    grey = rng.normal(5.0, 1.0, labels.shape)
    sd, _, n = _reference_noise(grey, labels, 2)
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as client:
        r = estimate_noise(da.from_array(grey, chunks=9), da.from_array(labels, chunks=9), margin=2, client=client,
                           mode="background")
    assert r.n_voxels == n and r.sigma == pytest.approx(sd, rel=1e-10)


def test_estimate_noise_errors():
    grey = np.zeros((10, 12, 14), np.uint8)
    labels = np.ones((10, 12, 14), np.uint16)
    labels[0, 0, :3] = 0
    with pytest.raises(GrapesInputError, match="same shape"):
        estimate_noise(grey, labels[:9])
    with pytest.raises(GrapesInputError, match="give labels .* or a region"):
        estimate_noise(grey)
    with pytest.raises(GrapesInputError, match="outside the volume"):
        estimate_noise(grey, region=((0, 11), (0, 5), (0, 5)))
    with pytest.raises(GrapesInputError, match="outside the volume"):
        estimate_noise(grey, region=((-2, 5), (0, 5), (0, 5)))
    with pytest.raises(GrapesInputError, match="empty"):
        estimate_noise(grey, region=((3, 3), (0, 5), (0, 5)))
    with pytest.raises(GrapesInputError, match="2 axes"):
        estimate_noise(grey, region=((0, 5), (0, 5)))
    with pytest.raises(GrapesInputError, match="step"):
        estimate_noise(grey, region=(slice(0, 5, 2), slice(None), slice(None)))
    with pytest.raises(GrapesInputError, match="one voxel"):
        estimate_noise(grey, region=((0, 1), (0, 1), (0, 1)))
    with pytest.raises(GrapesInputError, match="margin"):
        estimate_noise(grey, labels, margin=-1)
    with pytest.raises(GrapesInputError, match="max_voxels"):
        estimate_noise(grey, labels, max_voxels=1)
    # three background voxels, each next to a particle: none at distance >= 3
    with pytest.raises(GrapesInputError, match=r"0 background voxel.*margin=3 .*lower margin"):
        estimate_noise(grey, labels, margin=3)
    assert estimate_noise(grey, labels, margin=1).n_voxels == 3
    g = np.full((4, 4), np.nan)
    with pytest.raises(GrapesInputError, match="0 finite grey"):
        estimate_noise(g, region=((0, 4), (0, 4)))


def test_noise_estimate_is_a_frozen_result():
    r = NoiseEstimate(sigma=1.0, mean=0.0, n_voxels=10, source="region", region=((0, 1),), margin=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.sigma = 2.0


# --------------------------------------------------------------------------------------------
# column names
# --------------------------------------------------------------------------------------------


def test_columns_are_the_table_and_stats_names():
    from grapes_dask import table

    assert cols.PROFILE_COLUMNS is table.PROFILE_COLUMNS and cols.ROI_COLUMNS is table.ROI_COLUMNS
    assert cols.POPULATION_FIELDS == tuple(f.name for f in dataclasses.fields(PopulationStats))
    assert set(cols.GROUP_PROFILES) <= set(cols.PROFILE_COLUMNS)
    # the track summary holds every PopulationStats field, for the state and (but n) for its change
    assert set(cols.SUMMARY_COLUMNS) == set(cols.POPULATION_FIELDS) | {"delta_" + f for f in cols.POPULATION_FIELDS[1:]}
