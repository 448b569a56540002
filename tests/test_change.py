"""Analyses after the paper (grapes_dask.change) against hand computations and a phantom's truth.

The small trackings here are built by hand (a long table, per-state tables with profiles, the
noise per state), so that every expected number is computed in the test without the engine;
the end-to-end tests track a synthetic operando series whose damage is known.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given, settings, strategies as st
from scipy import stats as sps

from grapes_dask import change
from grapes_dask._errors import GrapesInputError
from grapes_dask.track import Tracking

# --------------------------------------------------------------------------------------------
# a tracking built by hand
# --------------------------------------------------------------------------------------------


def hand_tracking(means: dict, voxels: dict, sigma: dict, *, excluded=None, labels=None, columns=None,
                  profiles=None, ref_columns=None) -> Tracking:
    """A Tracking of `means[state]` (one value per particle), ROI voxels, noise per state.

    `profiles[state]` = (list of grey lists, list of count lists) per particle; `columns` extra
    columns of the long table (same in every state); `ref_columns` extra columns of the reference
    state's particle table.
    """
    states = list(means)
    n = len(next(iter(means.values())))
    labels = np.arange(1, n + 1, dtype=np.uint64) if labels is None else np.asarray(labels, np.uint64)
    excluded = np.zeros(n, bool) if excluded is None else np.asarray(excluded, bool)
    rows = []
    for s in states:
        rows.append(pd.DataFrame({"label": labels, "state": s, "roi_mean": np.asarray(means[s], float),
                                  "roi_voxels": np.asarray(voxels[s], np.int64), "excluded": excluded,
                                  "reason": np.where(excluded, "border", ""), **(columns or {})}))
    long = pd.concat(rows, ignore_index=True)
    long["state"] = pd.Categorical(long["state"], categories=states, ordered=True)
    tables = {}
    for s in states:
        t = pd.DataFrame({"label": labels, "roi_mean": np.asarray(means[s], float),
                          "roi_voxels": np.asarray(voxels[s], np.int64)})
        if profiles is not None:
            t["radial_layers_graylevel"] = [np.asarray(g, float) for g in profiles[s][0]]
            t["radial_layers_count"] = [np.asarray(c, np.int64) for c in profiles[s][1]]
        if s == states[0] and ref_columns:
            for k, v in ref_columns.items():
                t[k] = v
        tables[s] = t
    params = {"noise": {s: {"sigma": float(sigma[s]), "source": "given"} for s in states}}
    return Tracking(long, tables, params, states, states[0], {s: (None, None) for s in states})


# --------------------------------------------------------------------------------------------
# classify
# --------------------------------------------------------------------------------------------


def boundary_tracking():
    # sigma_a = 3, sigma_b = 4, one ROI voxel each: sem_delta = hypot(3, 4) = 5 exactly
    a = [100.0] * 8
    b = [85.0, 84.5, 115.0, 115.5, 100.0, 99.9, 90.0, 50.0]  # z = -3, -3.1, 3, 3.1, 0, -0.02, -2, (excluded)
    return hand_tracking({"a": a, "b": b}, {"a": [1] * 8, "b": [1] * 8}, {"a": 3.0, "b": 4.0},
                         excluded=[False] * 7 + [True])


def test_classify_at_the_k_boundaries():
    c = change.classify(boundary_tracking(), k=3.0)
    p = c.particles
    assert list(p.columns) == ["label", "state", "delta", "sem_delta", "z", "class"]
    assert list(p["label"].astype(int)) == [1, 2, 3, 4, 5, 6, 7]  # the excluded particle 8 is not classified
    assert np.all(p["sem_delta"] == 5.0)
    np.testing.assert_allclose(p["z"], [-3.0, -3.1, 3.0, 3.1, 0.0, -0.02, -2.0], rtol=1e-12, atol=1e-12)
    assert p["z"].iloc[0] == -3.0 and p["z"].iloc[2] == 3.0  # exactly on the boundary
    # |z| = k is unchanged; beyond it darker / brighter
    assert list(p["class"]) == ["unchanged", "darker", "unchanged", "brighter", "unchanged", "unchanged", "unchanged"]
    assert list(p["class"].cat.categories) == ["darker", "unchanged", "brighter"]
    # a lower k moves the boundary particles
    c2 = change.classify(boundary_tracking(), k=2.0)
    assert list(c2.particles["class"]) == ["darker", "darker", "brighter", "brighter", "unchanged", "unchanged",
                                           "unchanged"]
    c4 = change.classify(boundary_tracking(), k=3.2)
    assert set(c4.particles["class"]) == {"unchanged"}
    assert c.null_rate == pytest.approx(sps.norm.sf(3.0)) and c.null_rate == pytest.approx(0.0013499, rel=1e-4)


def test_classify_fractions_and_their_errors_by_hand():
    c = change.classify(boundary_tracking(), k=3.0)
    f = c.fractions.loc["b"]
    n = 7
    assert (f["n"], f["n_darker"], f["n_unchanged"], f["n_brighter"]) == (7, 1, 5, 1)
    assert f["darker"] == pytest.approx(1 / 7) and f["unchanged"] == pytest.approx(5 / 7)
    assert f["darker_se"] == pytest.approx(math.sqrt((1 / 7) * (6 / 7) / 7))
    # Wilson 95% by hand and by scipy's binomtest
    z = 1.959963984540054
    p = 1 / 7
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert f["darker_lo"] == pytest.approx(centre - half, rel=1e-9)
    assert f["darker_hi"] == pytest.approx(centre + half, rel=1e-9)
    ci = sps.binomtest(1, 7).proportion_ci(0.95, method="wilson")
    assert (f["darker_lo"], f["darker_hi"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
    # the paper's plain fraction counts every decrease: z = -3, -3.1, -0.02, -2
    assert f["n_plain_darker"] == 4 and f["plain_darker"] == pytest.approx(4 / 7)
    assert f["plain_darker_se"] == pytest.approx(math.sqrt(4 / 7 * 3 / 7 / 7))
    # and equals Tracking.fraction (fig. 9)
    fr = boundary_tracking().fraction("a", "b")
    assert (fr.n, fr.n_darker, fr.fraction, fr.se) == (7, 4, pytest.approx(f["plain_darker"]),
                                                       pytest.approx(f["plain_darker_se"]))
    # shares add up to one
    assert f["darker"] + f["unchanged"] + f["brighter"] == pytest.approx(1.0)


def test_wilson_interval_never_collapses_at_zero():
    lo, hi = change.wilson_interval([0, 5, 0], [100, 5, 0])
    assert lo[0] == 0.0 and hi[0] == pytest.approx(sps.binomtest(0, 100).proportion_ci(method="wilson").high)
    assert hi[1] == pytest.approx(1.0) and lo[1] < 1.0
    assert np.isnan(lo[2]) and np.isnan(hi[2])


def test_classify_uses_each_state_noise_and_roi_and_another_reference():
    means = {"a": [100.0, 100.0, 100.0], "b": [90.0, 100.0, 104.0], "c": [95.0, 97.0, 100.0]}
    voxels = {"a": [100, 25, 4], "b": [400, 25, 16], "c": [100, 100, 1]}
    sigma = {"a": 10.0, "b": 4.0, "c": 5.0}
    tr = hand_tracking(means, voxels, sigma)
    c = change.classify(tr, k=2.0)
    assert c.states == ["b", "c"] and c.reference == "a"
    p = c.particles.set_index(["state", "label"])
    for s in "bc":
        for i, L in enumerate([1, 2, 3]):
            sem = math.sqrt(sigma["a"] ** 2 / voxels["a"][i] + sigma[s] ** 2 / voxels[s][i])
            d = means[s][i] - means["a"][i]
            assert p.loc[(s, L), "sem_delta"] == pytest.approx(sem, rel=1e-12)
            assert p.loc[(s, L), "delta"] == d
            expect = "darker" if d / sem < -2 else "brighter" if d / sem > 2 else "unchanged"
            assert p.loc[(s, L), "class"] == expect
    # sem(b, 1) = sqrt(1 + 0.04) -> z = -9.8: darker; sem(b, 3) = sqrt(25 + 1) -> z = 0.78
    assert p.loc[("b", 1), "class"] == "darker" and p.loc[("b", 3), "class"] == "unchanged"
    # reference c, state b only: the changes against c
    c2 = change.classify(tr, k=2.0, reference="c", states="b")
    q = c2.particles.set_index("label")
    assert c2.states == ["b"] and c2.reference == "c"
    np.testing.assert_allclose(q["delta"], np.subtract(means["b"], means["c"]))
    np.testing.assert_allclose(q["sem_delta"], [math.sqrt(25 / 100 + 16 / 400), math.sqrt(25 / 100 + 16 / 25),
                                                math.sqrt(25 / 1 + 16 / 16)])
    # the Tracking method is the same function
    m = tr.classify(k=2.0, reference="c", states="b")
    pd.testing.assert_frame_equal(m.particles, c2.particles)
    pd.testing.assert_frame_equal(m.fractions, c2.fractions)


def test_classify_without_noise_goes_by_sign():
    tr = hand_tracking({"a": [1.0, 1.0, 1.0], "b": [0.5, 1.0, 1.5]}, {"a": [5, 5, 5], "b": [5, 5, 5]},
                       {"a": 0.0, "b": 0.0})
    p = change.classify(tr).particles
    assert list(p["class"]) == ["darker", "unchanged", "brighter"]
    assert list(p["z"]) == [-np.inf, 0.0, np.inf]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-50, 50), st.integers(1, 500), st.integers(1, 500)), min_size=1, max_size=30),
       st.floats(0.5, 10), st.floats(0.5, 10), st.floats(0.5, 5))
def test_classify_property(rows, sa, sb, k):
    deltas = np.array([r[0] for r in rows])
    na = np.array([r[1] for r in rows])
    nb = np.array([r[2] for r in rows])
    sem = np.sqrt(sa ** 2 / na + sb ** 2 / nb)
    assume(np.all(np.abs(np.abs(deltas / sem) - k) > 1e-9))
    tr = hand_tracking({"a": np.full(len(rows), 120.0), "b": 120.0 + deltas}, {"a": na, "b": nb},
                       {"a": sa, "b": sb})
    c = change.classify(tr, k=k)
    got = c.particles["class"].astype(str).to_numpy()
    d = (120.0 + deltas) - 120.0
    expect = np.where(d < -k * sem, "darker", np.where(d > k * sem, "brighter", "unchanged"))
    assert list(got) == list(expect)
    f = c.fractions.loc["b"]
    assert f["n_darker"] == (expect == "darker").sum() and f["n_brighter"] == (expect == "brighter").sum()
    assert f["n_plain_darker"] == (d < 0).sum()
    for cls in change.CLASSES:
        assert f[f"{cls}_lo"] <= f[cls] <= f[f"{cls}_hi"]


def test_classify_errors_name_the_input():
    tr = boundary_tracking()
    for bad in (0, -1.0, math.nan, "3", True, None):
        with pytest.raises(GrapesInputError, match="k="):
            change.classify(tr, k=bad)
    with pytest.raises(GrapesInputError, match="reference='x' is not among the states"):
        change.classify(tr, reference="x")
    with pytest.raises(GrapesInputError, match="state='z' is not among the states"):
        change.classify(tr, states=["z"])
    no_noise = Tracking(tr.particles, tr.tables, {"noise": {"a": {"sigma": 1.0}}}, tr.states, "a", {})
    with pytest.raises(GrapesInputError, match="no sigma for state 'b'"):
        change.classify(no_noise)
    with pytest.raises(GrapesInputError, match="tracking has no 'particles'"):
        change.classify(object())


# --------------------------------------------------------------------------------------------
# layer_changes
# --------------------------------------------------------------------------------------------

SIG_L = {"a": 6.0, "b": 4.0}
PROF = {
    "a": ([[160, 150, 140], [158, 149], [161, 151, 141, 131], [150, 150]],
          [[10, 5, 2], [8, 3], [12, 6, 3, 1], [4, 2]]),
    "b": ([[159, 147, 135], [158, 146, 999], [160, 149, 138, 125], [100, 100]],
          [[10, 5, 2], [8, 4, 1], [12, 6, 0, 1], [4, 2]]),  # particle 3 has no voxel in layer 3 at b
}


def layer_tracking():
    means = {"a": [150.0, 155.0, 146.0, 150.0], "b": [147.0, 152.0, 140.0, 100.0]}
    return hand_tracking(means, {"a": [5, 5, 5, 5], "b": [5, 5, 5, 5]}, SIG_L, profiles=PROF,
                         excluded=[False, False, False, True])


def hand_layer_stats(pairs):
    """pairs: list of (delta, sem) of one layer -> n, mean, sd, ses, sem (eq. 3), se_tot."""
    n = len(pairs)
    d = [p[0] for p in pairs]
    mean = sum(d) / n if n else math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else math.nan
    ses = sd / math.sqrt(n) if n > 1 else math.nan
    sem = math.sqrt(sum(p[1] ** 2 for p in pairs) / n) if n > 1 else math.nan
    return n, mean, sd, ses, sem, math.sqrt(ses ** 2 + sem ** 2)


def test_layer_changes_surface_alignment_by_hand():
    lc = change.layer_changes(layer_tracking())
    assert lc.align == "surface" and lc.reference == "a" and lc.states == ["b"]
    t = lc.table.set_index("layer")
    assert list(t.index) == [1, 2, 3, 4]
    kept = [0, 1, 2]  # particle 4 is excluded
    for layer in (1, 2, 3, 4):
        j = layer - 1
        pairs = []
        for i in kept:
            ga, ca = PROF["a"][0][i], PROF["a"][1][i]
            gb, cb = PROF["b"][0][i], PROF["b"][1][i]
            if j < len(ga) and j < len(gb) and ca[j] > 0 and cb[j] > 0:
                pairs.append((gb[j] - ga[j], math.sqrt(SIG_L["a"] ** 2 / ca[j] + SIG_L["b"] ** 2 / cb[j])))
        n, mean, sd, ses, sem, se_tot = hand_layer_stats(pairs)
        r = t.loc[layer]
        assert r["n"] == n
        for key, v in (("delta_mean", mean), ("delta_sd", sd), ("ses", ses), ("sem", sem), ("se_tot", se_tot)):
            if math.isnan(v):
                assert math.isnan(r[key]), (layer, key)
            else:
                assert r[key] == pytest.approx(v, rel=1e-12), (layer, key)
    # layer 1: changes -1, 0, -1; layer 3: only particle 1 (particle 2 has no layer 3 in a, 3 none at b)
    assert t.loc[1, "delta_mean"] == pytest.approx(-2 / 3)
    assert t.loc[1, "reference_mean"] == pytest.approx((160 + 158 + 161) / 3)
    assert t.loc[1, "state_mean"] == pytest.approx((159 + 158 + 160) / 3)
    assert t.loc[3, "n"] == 1 and t.loc[3, "delta_mean"] == -5 and math.isnan(t.loc[3, "ses"])
    assert t.loc[4, "n"] == 1 and t.loc[4, "delta_mean"] == -6
    # per particle rows
    per = lc.particles
    assert len(per) == 3 + 3 + 1 + 1
    r = per[(per["label"] == 2) & (per["layer"] == 2)].iloc[0]
    assert r["delta"] == -3 and r["sem"] == pytest.approx(math.sqrt(36 / 3 + 16 / 4))
    assert (r["count_reference"], r["count_state"]) == (3, 4)
    # exclude_outer_layers and max_layer
    t2 = change.layer_changes(layer_tracking(), exclude_outer_layers=1, max_layer=3).table
    assert list(t2["layer"]) == [2, 3]
    assert t2["delta_mean"].iloc[0] == pytest.approx(t.loc[2, "delta_mean"])


def test_layer_changes_relative_depth_bins_by_hand():
    for n_out, bins in ((0, 2), (1, 2), (0, 3)):
        lc = change.layer_changes(layer_tracking(), align="relative", bins=bins, exclude_outer_layers=n_out)
        t = lc.table.set_index("layer")
        assert list(t.index) == list(range(1, bins + 1))
        np.testing.assert_allclose(t["depth_lo"], np.arange(bins) / bins)
        np.testing.assert_allclose(t["depth_hi"], np.arange(1, bins + 1) / bins)
        # by hand: each kept particle's layers N+1..K (K from the reference counts) at depth
        # (j - N - 0.5) / (K - N), pooled by voxel weights; the layers present in both states
        per_bin = {b: [] for b in range(1, bins + 1)}
        for i in (0, 1, 2):
            ga, ca = PROF["a"][0][i], PROF["a"][1][i]
            gb, cb = PROF["b"][0][i], PROF["b"][1][i]
            K = len(ca)
            acc = {}
            for j in range(n_out + 1, K + 1):
                if j > len(cb) or ca[j - 1] == 0 or cb[j - 1] == 0:
                    continue
                depth = (j - n_out - 0.5) / (K - n_out)
                b = int(math.floor(depth * bins)) + 1
                s = acc.setdefault(b, [0.0, 0.0, 0.0, 0.0])
                s[0] += ca[j - 1] * ga[j - 1]
                s[1] += ca[j - 1]
                s[2] += cb[j - 1] * gb[j - 1]
                s[3] += cb[j - 1]
            for b, (sa, na, sb, nb) in acc.items():
                per_bin[b].append((sb / nb - sa / na, math.sqrt(SIG_L["a"] ** 2 / na + SIG_L["b"] ** 2 / nb)))
        for b, pairs in per_bin.items():
            n, mean, sd, ses, sem, _ = hand_layer_stats(pairs)
            assert t.loc[b, "n"] == n
            if n:
                assert t.loc[b, "delta_mean"] == pytest.approx(mean, rel=1e-12)
            if n > 1:
                assert t.loc[b, "ses"] == pytest.approx(ses, rel=1e-12)
                assert t.loc[b, "sem"] == pytest.approx(sem, rel=1e-12)
    # shell / core with N = 0: particle 1 (K = 3): layer 1 shell, layers 2-3 core
    t = change.layer_changes(layer_tracking(), align="relative").table.set_index("layer")
    core_1 = (5 * 147 + 2 * 135) / 7 - (5 * 150 + 2 * 140) / 7
    core_2 = 146 - 149
    core_3 = 125 - 131  # particle 3 (K = 4): layer 3 has no voxel at b, so its core is layer 4 alone
    assert t.loc[2, "delta_mean"] == pytest.approx((core_1 + core_2 + core_3) / 3)


def test_layer_changes_errors():
    tr = layer_tracking()
    with pytest.raises(GrapesInputError, match="align='middle'"):
        change.layer_changes(tr, align="middle")
    with pytest.raises(GrapesInputError, match="bins=0"):
        change.layer_changes(tr, align="relative", bins=0)
    with pytest.raises(GrapesInputError, match="exclude_outer_layers=-1"):
        change.layer_changes(tr, exclude_outer_layers=-1)
    with pytest.raises(GrapesInputError, match="exclude_outer_layers='2'"):
        change.layer_changes(tr, exclude_outer_layers="2")
    with pytest.raises(GrapesInputError, match="max_layer=1.5"):
        change.layer_changes(tr, max_layer=1.5)
    with pytest.raises(GrapesInputError, match="state='q'"):
        change.layer_changes(tr, states="q")
    bare = boundary_tracking()  # tables without profiles
    with pytest.raises(GrapesInputError, match="lacks .*radial_layers_graylevel"):
        change.layer_changes(bare)


# --------------------------------------------------------------------------------------------
# trajectories
# --------------------------------------------------------------------------------------------


def traj_tracking(n=40, seed=1):
    rng = np.random.default_rng(seed)
    a = rng.normal(150, 5, n)
    means = {"p": a, "c1": a + rng.normal(-2, 1, n), "c2": a + rng.normal(-5, 2, n), "d": a + rng.normal(-3, 2, n)}
    vox = {s: rng.integers(50, 500, n) for s in means}
    excl = np.zeros(n, bool)
    excl[[3, 7]] = True
    return hand_tracking(means, vox, {s: 6.0 for s in means}, excluded=excl, labels=np.arange(10, 10 + n) * 3), \
        means, excl


def test_trajectories_band_against_numpy():
    tr, means, excl = traj_tracking()
    tj = change.trajectories(tr, n=5, seed=3)
    assert tj.states == ["p", "c1", "c2", "d"] and tj.reference == "p"
    kept_labels = (np.arange(10, 50) * 3)[~excl]
    for s in tj.states:
        d = np.asarray(means[s])[~excl] - np.asarray(means["p"])[~excl]
        b = tj.band.loc[s]
        assert b["n"] == len(d)
        assert b["mean"] == pytest.approx(d.mean(), abs=1e-12)
        if s != "p":
            assert b["sd"] == pytest.approx(d.std(ddof=1), rel=1e-12)
            assert b["ses"] == pytest.approx(d.std(ddof=1) / math.sqrt(len(d)), rel=1e-12)
        for q in (0.05, 0.25, 0.5, 0.75, 0.95):
            assert b[f"q{100 * q:g}"] == pytest.approx(np.quantile(d, q), abs=1e-12)
        rows = tj.particles[tj.particles["state"] == s]
        np.testing.assert_array_equal(rows["label"].to_numpy(), kept_labels)
        np.testing.assert_allclose(rows["delta"], d, atol=1e-12)
    assert list(tj.band.columns) == ["n", "mean", "sd", "ses", "q5", "q25", "q50", "q75", "q95"]
    # the sample: n kept labels, sorted, reproducible, marked in the long table
    assert len(tj.sample) == 5 and np.all(np.isin(tj.sample, kept_labels)) and np.all(np.diff(tj.sample) > 0)
    again = change.trajectories(tr, n=5, seed=3)
    np.testing.assert_array_equal(again.sample, tj.sample)
    expect = np.sort(np.random.default_rng(3).choice(kept_labels, size=5, replace=False))
    np.testing.assert_array_equal(tj.sample, expect)
    assert set(tj.particles.loc[tj.particles["sampled"], "label"]) == set(tj.sample)
    assert len(change.trajectories(tr, n=1000).sample) == len(kept_labels)
    assert len(change.trajectories(tr, n=0).sample) == 0
    # reference rows: delta 0
    assert (tj.particles.loc[tj.particles["state"] == "p", ["delta", "sem_delta"]].to_numpy() == 0).all()
    # custom quantiles
    t2 = change.trajectories(tr, quantiles=(0.1, 0.9))
    assert list(t2.band.columns[-2:]) == ["q10", "q90"]
    with pytest.raises(GrapesInputError, match="quantiles="):
        change.trajectories(tr, quantiles=(0.5, 2))
    with pytest.raises(GrapesInputError, match="n=-1"):
        change.trajectories(tr, n=-1)
    with pytest.raises(GrapesInputError, match="n='5'"):
        change.trajectories(tr, n="5")


# --------------------------------------------------------------------------------------------
# trend
# --------------------------------------------------------------------------------------------


def test_linear_fit_by_hand_formula():
    # x = 0..3, y = 1, 3, 2, 5: Sxx = 5, Sxy = 5.5, slope = intercept = 1.1,
    # residuals -0.1, 0.8, -1.3, 0.6: SSR = 2.7, s^2 = 1.35, se(slope) = sqrt(1.35 / 5)
    f = change.linear_fit([0, 1, 2, 3], [1, 3, 2, 5])
    assert f.n == 4 and f.slope == pytest.approx(1.1) and f.intercept == pytest.approx(1.1)
    assert f.residual_sd == pytest.approx(math.sqrt(1.35))
    assert f.slope_se == pytest.approx(math.sqrt(0.27))
    assert f.intercept_se == pytest.approx(math.sqrt(1.35) * math.sqrt(1 / 4 + 1.5 ** 2 / 5))
    t = 4.302652729911275  # Student t, 2 degrees of freedom, 97.5%
    assert f.t_crit == pytest.approx(t, rel=1e-9)
    assert (f.ci_low, f.ci_high) == pytest.approx((1.1 - t * math.sqrt(0.27), 1.1 + t * math.sqrt(0.27)))
    assert f.r == pytest.approx(5.5 / math.sqrt(5 * 8.75))
    # the band: at the mean of x, half width t s / sqrt(n)
    lo, hi = f.band([1.5, 0.0])
    assert (hi[0] - lo[0]) / 2 == pytest.approx(t * math.sqrt(1.35) / 2)
    assert (hi[1] - lo[1]) / 2 == pytest.approx(t * math.sqrt(1.35) * math.sqrt(1 / 4 + 2.25 / 5))


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 60), st.integers(0, 10_000), st.floats(-2, 2), st.floats(0.1, 5))
def test_linear_fit_against_scipy_linregress(n, seed, slope, noise):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 100, n)
    y = 3.0 + slope * x + rng.normal(0, noise, n)
    assume(np.ptp(x) > 1e-6)
    f = change.linear_fit(x, y, confidence=0.9)
    ref = sps.linregress(x, y)
    assert f.slope == pytest.approx(ref.slope, rel=1e-9, abs=1e-12)
    assert f.intercept == pytest.approx(ref.intercept, rel=1e-9, abs=1e-9)
    assert f.slope_se == pytest.approx(ref.stderr, rel=1e-7, abs=1e-12)
    assert f.intercept_se == pytest.approx(ref.intercept_stderr, rel=1e-7, abs=1e-12)
    assert f.r == pytest.approx(ref.rvalue, rel=1e-9, abs=1e-12)
    assert f.p == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-12)
    t = sps.t.ppf(0.95, n - 2)
    assert f.ci_low == pytest.approx(ref.slope - t * ref.stderr, rel=1e-7, abs=1e-9)
    assert f.ci_high == pytest.approx(ref.slope + t * ref.stderr, rel=1e-7, abs=1e-9)


def test_trend_on_a_tracking_against_linregress():
    rng = np.random.default_rng(9)
    x = rng.uniform(0, 90, 30)
    sph = rng.uniform(0.7, 1.0, 30)
    tr, means, excl = traj_tracking(n=30)
    tr = hand_tracking({s: means[s] for s in means}, {s: np.full(30, 100) for s in means}, {s: 6.0 for s in means},
                       excluded=excl, labels=np.arange(10, 40) * 3, columns={"centroid-2": x},
                       ref_columns={"sphericity": sph})
    res = change.trend(tr, "centroid-2")
    assert res.states == ["c1", "c2", "d"] and res.covariate == "centroid-2"
    for s in res.states:
        d = (np.asarray(means[s]) - np.asarray(means["p"]))[~excl]
        ref = sps.linregress(x[~excl], d)
        f = res.fit(s)
        assert f.n == 28
        assert f.slope == pytest.approx(ref.slope, rel=1e-9)
        assert f.slope_se == pytest.approx(ref.stderr, rel=1e-9)
        assert res.table.loc[s, "slope"] == f.slope and res.table.loc[s, "ci_high"] == f.ci_high
    # a covariate of the reference particle table
    r2 = tr.trend("sphericity", state="c2")
    ref = sps.linregress(sph[~excl], (np.asarray(means["c2"]) - np.asarray(means["p"]))[~excl])
    assert r2.states == ["c2"] and r2.fit().slope == pytest.approx(ref.slope, rel=1e-9)
    assert r2.fit("c2").intercept == pytest.approx(ref.intercept, rel=1e-9)
    np.testing.assert_allclose(r2.data["x"], sph[~excl])
    with pytest.raises(GrapesInputError, match="state='c1' was not fitted"):
        r2.fit("c1")


def test_trend_errors():
    tr, means, excl = traj_tracking(n=30)
    with pytest.raises(GrapesInputError, match="covariate='depth' is neither"):
        change.trend(tr, "depth")
    tr2 = hand_tracking({"a": [1.0, 2, 3, 4], "b": [1.0, 1, 1, 1]}, {"a": [5] * 4, "b": [5] * 4},
                        {"a": 1.0, "b": 1.0}, columns={"centroid-2": [4.0] * 4, "kind": ["x", "y", "z", "w"]},
                        excluded=[False, False, False, False])
    with pytest.raises(GrapesInputError, match="takes one value"):
        change.trend(tr2, "centroid-2")
    with pytest.raises(GrapesInputError, match="does not hold numbers"):
        change.trend(tr2, "kind")
    tr3 = hand_tracking({"a": [1.0, 2, 3, 4], "b": [1.0, 1, 1, 1]}, {"a": [5] * 4, "b": [5] * 4},
                        {"a": 1.0, "b": 1.0}, columns={"centroid-2": [1.0, 2, 3, 4]},
                        excluded=[False, False, True, True])
    with pytest.raises(GrapesInputError, match="2 particle.* at least 3"):
        change.trend(tr3, "centroid-2")
    with pytest.raises(GrapesInputError, match="confidence=1.5"):
        change.linear_fit([1, 2, 3], [1, 2, 4], confidence=1.5)
    with pytest.raises(GrapesInputError, match="confidence='95%'"):
        change.trend(tr, "centroid-2", confidence="95%")


# --------------------------------------------------------------------------------------------
# end to end: a phantom series with known damage
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_tracking():
    """Three states of one 128^3 phantom: pristine, pristine again (only the noise differs), damaged."""
    import dask

    from grapes_dask.synthetic import phantom_numpy
    from grapes_dask.track import track

    with dask.config.set(scheduler="threads"):
        grey, labels, truth = phantom_numpy((128, 128, 128), n_states=3, seed=5, mean_radius=6.0,
                                            damage=[0.0, 0.0, 0.8], damage_gradient=0.5, damage_axis=2)
        tr = track({"p": (grey[0], labels[0]), "again": (grey[1], labels[1]), "charged": (grey[2], labels[2])},
                   noise_sigma=6.0, exclude_outer_layers=2, drop_smallest=0.0)
    return tr, truth


def test_noise_only_states_false_positives_and_plain_fraction(phantom_tracking):
    tr, _ = phantom_tracking
    c = tr.classify(k=3.0, states="again")
    f = c.fractions.loc["again"]
    assert f["n"] > 500
    # the noise-aware classification: near the normal tail (0.13% per side) ...
    assert f["darker"] <= 0.01 and f["brighter"] <= 0.01
    assert f["darker_lo"] <= c.null_rate  # the Wilson interval is compatible with the tail
    # ... while the paper's plain fraction is a coin flip
    assert abs(f["plain_darker"] - 0.5) < 4 * 0.5 / math.sqrt(f["n"])
    # eq. 2 describes the noise of the changes: z is standard normal
    z = c.particles["z"].to_numpy()
    assert 0.9 < z.std(ddof=1) < 1.1 and abs(z.mean()) < 4 / math.sqrt(len(z))


def test_damaged_state_recall_against_the_truth(phantom_tracking):
    tr, truth = phantom_tracking
    c = tr.classify(k=3.0, states="charged")
    p = c.particles.set_index(c.particles["label"].astype(np.int64))
    dmg = truth[truth["state"] == 2].set_index("label")["damage"].reindex(p.index).to_numpy()
    darker = (p["class"] == "darker").to_numpy()
    assert (p["class"] == "brighter").sum() == 0
    strong = dmg >= 0.3
    assert strong.sum() > 100 and darker[strong].mean() >= 0.95  # recall where the damage is large
    weak = dmg < 0.02
    assert darker[weak].mean() <= 0.05  # and (almost) no particle without damage called darker
    assert np.mean(dmg[darker] >= 0.1) >= 0.95  # precision: the darker ones are damaged
    # recall rises with the damage
    bins = np.digitize(dmg, [0.1, 0.2, 0.3])
    rec = [darker[bins == b].mean() for b in range(4)]
    assert rec == sorted(rec)


def test_phantom_layers_trajectories_trend(phantom_tracking):
    tr, truth = phantom_tracking
    # the core darkens more than the shell (the phantom's damage is in the core)
    rel = tr.layer_changes("charged", align="relative", bins=2, exclude_outer_layers=2).table.set_index("layer")
    assert rel.loc[2, "delta_mean"] < rel.loc[1, "delta_mean"] < 0
    assert rel.loc[1, "delta_mean"] - rel.loc[2, "delta_mean"] > 4 * math.hypot(rel.loc[1, "ses"], rel.loc[2, "ses"])
    # the noise-only state: every layer's mean change within 4 SES of zero
    surf = tr.layer_changes("again").table
    surf = surf[surf["n"] >= 20]
    assert len(surf) >= 4 and np.all(np.abs(surf["delta_mean"]) < 4 * surf["ses"])
    # the per-layer SES of a noise-only state is the per-layer measurement error over sqrt(n)
    ratio = surf["ses"] * np.sqrt(surf["n"]) / surf["sem"]
    assert np.all((ratio > 0.8) & (ratio < 1.2))
    # trajectories: the band of the damaged state lies below the noise-only one
    tj = tr.trajectories(n=10)
    assert tj.band.loc["charged", "q50"] < tj.band.loc["again", "q5"]
    # trend: damage falls along x (damage_gradient), so the change rises with x; none in the noise-only state
    t = tr.trend("centroid-2")
    assert t.fit("charged").ci_low > 0
    assert t.fit("again").ci_low < 0 < t.fit("again").ci_high


# --------------------------------------------------------------------------------------------
# figures and report sections
# --------------------------------------------------------------------------------------------


def test_plot_classification_bars_are_the_fractions():
    from matplotlib.figure import Figure

    from grapes_dask import change_plots as CP

    tr, means, excl = traj_tracking()
    c = change.classify(tr, k=2.0)
    fig = CP.plot_classification(c)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    heights = [r.get_height() for r in ax.patches]
    f = c.fractions
    expect = list(100 * f["darker"]) + list(100 * f["brighter"]) + list(100 * f["plain_darker"])
    np.testing.assert_allclose(heights, expect)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["c1", "c2", "d"]
    # on a given Axes
    fig2 = Figure()
    ax2 = fig2.add_subplot()
    assert CP.plot_classification(c, ax=ax2) is fig2
    with pytest.raises(GrapesInputError, match="classification has no"):
        CP.plot_classification(object())


def test_plot_layer_changes_trajectories_distributions_trend():
    from matplotlib.figure import Figure

    from grapes_dask import change_plots as CP

    lc = change.layer_changes(layer_tracking())
    fig = CP.plot_layer_changes(lc, min_particles=2)
    lines = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) > 1 and ln.get_marker() == "o"]
    assert len(lines) == 1
    np.testing.assert_allclose(lines[0].get_ydata(), lc.table.loc[lc.table["n"] >= 2, "delta_mean"])
    assert isinstance(CP.plot_layer_changes(change.layer_changes(layer_tracking(), align="relative")), Figure)
    with pytest.raises(GrapesInputError, match="error='sd'"):
        CP.plot_layer_changes(lc, error="sd")

    tr, means, excl = traj_tracking()
    tj = change.trajectories(tr, n=4)
    fig = CP.plot_trajectories(tj)
    ax = fig.axes[0]
    mean_line = [ln for ln in ax.get_lines() if ln.get_label() == "population mean"][0]
    np.testing.assert_allclose(mean_line.get_ydata(), tj.band["mean"])
    assert sum(1 for ln in ax.get_lines() if ln.get_linewidth() == 0.6) == 4  # one thin line per sampled particle
    fig = CP.plot_change_distributions(tj)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["c1", "c2", "d"]

    x = np.linspace(0, 10, 40)
    t = hand_tracking({"a": np.full(40, 100.0), "b": 100.0 - 0.5 * x + np.sin(x)}, {"a": np.full(40, 50),
                      "b": np.full(40, 50)}, {"a": 2.0, "b": 2.0}, columns={"centroid-2": x})
    res = change.trend(t)
    fig = CP.plot_trend(res)
    fit_line = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("slope")][0]
    np.testing.assert_allclose(fit_line.get_ydata(), res.fit().predict(fit_line.get_xdata()))
    assert f"{res.fit().slope:.3g}" in fit_line.get_label()


def test_change_sections_with_the_report_collector(tmp_path):
    from grapes_dask import change_plots as CP
    from grapes_dask.report import Section, _Collector, write_report

    tr, means, excl = traj_tracking()
    # profiles for the per-layer sections
    for s, t in tr.tables.items():
        t["radial_layers_graylevel"] = [np.array([160.0, 150.0]) + (means[s][i] - means["p"][i])
                                        for i in range(len(t))]
        t["radial_layers_count"] = [np.array([20, 10])] * len(t)
    tr.particles["centroid-2"] = np.tile(np.linspace(0, 50, 40), 4)
    figs = _Collector()
    secs = CP.change_sections(tr, figs, k=2.0)
    assert [s.title for s in secs] == ["Noise-aware change per particle", "Change per radial layer", "Trajectories",
                                       "Change against centroid-2"]
    assert all(isinstance(s, Section) for s in secs)
    assert sorted(figs.figures) == ["after_classification", "after_distributions", "after_layers",
                                    "after_trajectories", "after_trend"]
    assert figs.notes == []
    write_report(tmp_path / "r.html", title="after", sections=secs)
    html = (tmp_path / "r.html").read_text()
    assert "Noise-aware change per particle" in html and html.count("<img") == 5
    # what cannot be computed becomes a paragraph and a note, not an exception
    bare = boundary_tracking()  # no profiles, no centroid
    figs = _Collector()
    secs = CP.change_sections(bare, figs)
    assert len(secs) == 4 and len(figs.notes) == 2
    assert any("per-layer changes not computed" in n for n in figs.notes)
    assert any("trend against centroid-1 not computed" in n for n in figs.notes)


def test_no_kept_particle_gives_empty_results_not_crashes():
    from grapes_dask import change_plots as CP
    from grapes_dask.report import _Collector

    tr = hand_tracking({"a": [150.0, 155.0, 146.0, 150.0], "b": [147.0, 152.0, 140.0, 100.0]},
                       {"a": [5] * 4, "b": [5] * 4}, SIG_L, profiles=PROF, excluded=[True] * 4)
    f = change.classify(tr).fractions.loc["b"]
    assert f["n"] == 0 and np.isnan(f["darker"]) and np.isnan(f["darker_lo"]) and np.isnan(f["plain_darker"])
    assert len(change.layer_changes(tr).table) == 0
    rel = change.layer_changes(tr, align="relative").table
    assert list(rel["n"]) == [0, 0] and rel["delta_mean"].isna().all()
    tj = change.trajectories(tr)
    assert len(tj.sample) == 0 and (tj.band["n"] == 0).all()
    with pytest.raises(GrapesInputError, match="0 particle"):
        change.trend(tr, "roi_voxels")
    figs = _Collector()
    secs = CP.change_sections(tr, figs)
    assert len(secs) == 4 and len(figs.figures) == 4 and len(figs.notes) == 1  # the trend: no covariate
