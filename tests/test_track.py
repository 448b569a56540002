"""Operando tracking (grapes_dask.track) on crafted volumes with hand-known answers."""

from __future__ import annotations

import math

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st
from scipy import ndimage
from scipy.stats import norm

from grapes_dask._errors import GrapesInputError
from grapes_dask.table import analyze_tables
from grapes_dask.track import REASONS, ChangeMap, Fraction, Tracking, neighbour_pairs, track

# --------------------------------------------------------------------------------------------
# the crafted scene: balls on a 48^3 grid, three states a (reference), b, c
# --------------------------------------------------------------------------------------------

SHAPE = (48, 48, 48)
N_OUT = 2  # exclude_outer_layers of the scene
SIGMA = {"a": 2.0, "b": 3.0, "c": 1.5}
# label -> (centre, squared radius): voxels at squared distance <= r2 from the centre
BALLS = {
    1: ((12, 12, 12), 16), 2: ((12, 12, 19), 9),  # touching; in state b, 1 swallows 2
    3: ((2, 36, 36), 16),  # cut by the volume border z = 0
    4: ((36, 10, 10), 1),  # 7 voxels, all in layer 1: an empty ROI with exclude_outer_layers=2
    6: ((30, 30, 24), 16),  # missing in state b
    # near 6, not touching: 1, 2 and 3 background voxels in between along an axis
    7: ((30, 30, 33), 9), 8: ((30, 30, 14), 10), 9: ((30, 41, 24), 11),
    10: ((42, 8, 40), 16), 11: ((42, 20, 40), 12), 12: ((42, 36, 40), 20),
    13: ((20, 36, 12), 14), 14: ((20, 10, 36), 25), 15: ((40, 40, 10), 18),
}


def scene_labels(state: str) -> np.ndarray:
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    lab = np.zeros(SHAPE, np.uint16)
    for L, (c, r2) in BALLS.items():
        lab[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r2] = L
    if state == "b":
        lab[lab == 2] = 1
        lab[lab == 6] = 0
    return lab


def grey_value(label: int, j: int) -> float:
    """Grey level of every voxel of a particle in state number j (background 50)."""
    return float(100 + 5 * label - (label % 4) * j - (3 * j if label % 5 == 0 else 0))


def scene_grey(lab: np.ndarray, j: int) -> np.ndarray:
    lut = np.array([50] + [grey_value(L, j) for L in range(1, int(lab.max()) + 1)], np.uint8)
    return lut[lab]


@pytest.fixture(scope="module")
def scene():
    """state -> (grey, labels, ParticleTables analysed with exclude_outer_layers=N_OUT)."""
    out = {}
    for j, s in enumerate("abc"):
        lab = scene_labels(s)
        grey = scene_grey(lab, j)
        out[s] = (grey, lab, analyze_tables(grey, lab, exclude_outer_layers=N_OUT))
    return out


@pytest.fixture(scope="module")
def tracked(scene):
    """The scene tracked from volumes, neighbour_gap=1, all particles left by the rules kept."""
    return track({s: (g, lab) for s, (g, lab, _) in scene.items()}, noise_sigma=SIGMA,
                 exclude_outer_layers=N_OUT, drop_smallest=0.0, neighbour_gap=1)


def from_tables(scene, **kw):
    kw = {"noise_sigma": SIGMA, "exclude_outer_layers": N_OUT, **kw}
    return track({s: (g, lab, t) for s, (g, lab, t) in scene.items()}, **kw)


def reasons(tr: Tracking) -> dict:
    per = tr.particles.drop_duplicates("label")
    return dict(zip(per["label"].astype(int), per["reason"]))


def min_distance(lab: np.ndarray, a: int, b: int) -> float:
    """Smallest Euclidean distance between voxel centres of labels a and b (whole volume)."""
    d = ndimage.distance_transform_edt(lab != a)
    m = lab == b
    return float(d[m].min()) if m.any() else math.inf


# --------------------------------------------------------------------------------------------
# the long table and the cleaning rules
# --------------------------------------------------------------------------------------------


def test_long_table_layout_and_values(tracked):
    p = tracked.particles
    labels = sorted(BALLS)
    assert tracked.states == ["a", "b", "c"] and tracked.reference == "a"
    assert len(p) == 3 * len(labels)
    assert p["label"].dtype == np.uint64
    assert isinstance(p["state"].dtype, pd.CategoricalDtype) and p["state"].cat.ordered
    assert list(p["state"].cat.categories) == ["a", "b", "c"]
    assert list(p["state"].astype(str)) == [s for s in "abc" for _ in labels]
    assert list(p["label"].astype(int)) == labels * 3
    assert list(p.columns) == ["label", "state", "roi_mean", "roi_voxels", "roi_sem", "delta", "delta_sem", "volume",
                               "centroid-0", "centroid-1", "centroid-2", "excluded", "reason"]
    assert p["roi_voxels"].dtype == np.int64
    # excluded/reason identical in every state row of a label
    assert (p.groupby("label")["reason"].nunique() == 1).all()
    assert (p.groupby("label")["excluded"].nunique() == 1).all()
    lab_a = scene_labels("a")
    for j, s in enumerate("abc"):
        rows = p[p["state"] == s].set_index(p[p["state"] == s]["label"].astype(int))
        for L in labels:
            r = rows.loc[L]
            missing = (s == "b" and L in (2, 6))
            if missing or L == 4:  # missing, or an empty ROI
                assert np.isnan(r["roi_mean"]) and np.isnan(r["roi_sem"]) and np.isnan(r["delta"])
                assert r["roi_voxels"] == 0
                continue
            # in state b label 1 holds 2's voxels: its roi_mean mixes both grey levels
            if not (s == "b" and L == 1):
                assert r["roi_mean"] == grey_value(L, j)
                assert r["delta"] == grey_value(L, j) - grey_value(L, 0)
            assert r["roi_voxels"] > 0
            assert r["roi_sem"] == pytest.approx(SIGMA[s] / math.sqrt(r["roi_voxels"]), rel=1e-12)
            ref = rows.loc[L] if s == "a" else p[(p["state"] == "a") & (p["label"] == L)].iloc[0]
            expect = 0.0 if s == "a" else math.hypot(ref["roi_sem"], r["roi_sem"])
            assert r["delta_sem"] == pytest.approx(expect, rel=1e-12)
            # reference volume and centroid (voxel indices) in every state's row
            assert r["volume"] == float((lab_a == L).sum())
            assert r["centroid-1"] == pytest.approx(np.argwhere(lab_a == L)[:, 1].mean())


def test_cleaning_rules_with_reasons(tracked):
    got = reasons(tracked)
    expect = {L: "" for L in BALLS}
    expect.update({1: "neighbour", 2: "inconsistent", 3: "border", 4: "empty_roi", 6: "inconsistent",
                   7: "neighbour"})
    assert got == expect
    per = tracked.particles.drop_duplicates("label").set_index("label")
    assert list(per["excluded"]) == [bool(expect[int(L)]) for L in per.index]
    c = tracked.counts().set_index("reason")
    assert list(c.index) == [*REASONS, "kept"]
    assert c.loc["inconsistent", "n"] == 2 and c.loc["neighbour", "n"] == 2 and c.loc["border", "n"] == 1
    assert c.loc["empty_roi", "n"] == 1 and c.loc["smallest", "n"] == 0 and c.loc["kept", "n"] == 8
    assert c["n_first"].sum() == len(BALLS)


def test_all_reasons_that_apply_in_order(scene):
    """A label both inconsistent and touching the border carries both reasons, in order."""
    states = {}
    for j, s in enumerate("ab"):
        lab = scene_labels("a")
        lab[0:7, 18:26, 18:26] = 20 if s == "a" else 0  # a border particle missing in b
        states[s] = (scene_grey(lab, j), lab)
    tr = track(states, noise_sigma=1.0, exclude_outer_layers=N_OUT, drop_smallest=0.0, neighbour_gap=0)
    assert reasons(tr)[20] == "inconsistent;border"


@pytest.mark.parametrize("gap", [0, 1, 2, 3])
def test_neighbour_gap_against_edt_distances(scene, gap):
    tr = from_tables(scene, neighbour_gap=gap, drop_smallest=0.0)
    incons = [2, 6]
    neigh = set()
    for s in "abc":
        lab = scene[s][1]
        for a in incons:
            if not (lab == a).any():
                continue  # only in states where the inconsistent label exists
            for b in np.unique(lab):
                if b not in (0, a) and min_distance(lab, a, int(b)) <= gap + 1:
                    neigh.add(int(b))
    got = {L for L, r in reasons(tr).items() if "neighbour" in r.split(";")}
    assert got == neigh
    # the scene's design: 1 shares faces with 2; 7, 8, 9 are 1, 2, 3 voxels away from 6
    assert got == {0: {1}, 1: {1, 7}, 2: {1, 7, 8}, 3: {1, 7, 8, 9}}[gap]


def test_neighbour_rule_skipped_with_none(scene):
    tr = from_tables(scene, neighbour_gap=None, drop_smallest=0.0)
    assert not any("neighbour" in r for r in reasons(tr).values())
    assert tr.params["neighbour_gap"] is None


@pytest.mark.parametrize("frac", [0.25, 0.5])
def test_drop_smallest(scene, frac):
    base = from_tables(scene, drop_smallest=0.0)
    cand = sorted(L for L, r in reasons(base).items() if r == "")
    lab_a = scene["a"][1]
    counts = np.bincount(lab_a.ravel())
    k = int(math.floor(frac * len(cand)))
    smallest = sorted(cand, key=lambda L: (counts[L], L))[:k]
    tr = from_tables(scene, drop_smallest=frac)
    got = reasons(tr)
    assert sorted(L for L, r in got.items() if r == "smallest") == sorted(smallest)
    assert k >= 2
    # the other reasons are untouched, and no excluded particle is also "smallest"
    assert {L: r for L, r in got.items() if r != "smallest"} == {L: r for L, r in reasons(base).items()
                                                                 if L not in smallest}


def test_smallest_rule_is_group_1_of_by_quantile(scene):
    """drop_smallest = 1/q removes exactly group 1 of by_quantile("volume", q) of the particles
    the other rules keep (one rule for both), for q = 2, 4, 8 (8 candidates: sizes exact and not)."""
    base = from_tables(scene, drop_smallest=0.0)
    ref = base.particles[(base.particles["state"] == "a") & ~base.particles["excluded"]]
    vol = dict(zip(ref["label"].astype(int), ref["volume"]))
    order = sorted(vol, key=lambda L: (vol[L], L))  # by volume, ties by label: the documented rule
    n = len(order)
    for q in (2, 4, 8, 3):
        byq = base.by_quantile("volume", q, state="b").set_index("group")
        smallest = order[: n // q]
        tr = from_tables(scene, drop_smallest=1.0 / q)
        got = sorted(L for L, r in reasons(tr).items() if r == "smallest")
        assert got == sorted(smallest)
        assert byq.loc[1, "n"] == len(smallest) == n // q
        assert (byq.loc[1, "lo"], byq.loc[1, "hi"]) == (min(vol[L] for L in smallest), max(vol[L] for L in smallest))
        sizes = [int(byq.loc[g, "n"]) for g in range(1, q + 1)]
        assert sizes == [g * n // q - (g - 1) * n // q for g in range(1, q + 1)]


def test_tables_input_gives_the_same_result(scene, tracked, tmp_path):
    from grapes_dask.output import write_table

    kw = dict(noise_sigma=SIGMA, exclude_outer_layers=N_OUT, drop_smallest=0.0, neighbour_gap=0)
    from_vol = track({s: (g, lab) for s, (g, lab, _) in scene.items()}, **kw)
    # ParticleTables (with contacts: gap 0 needs no label volume), DataFrames, files
    write_table(scene["c"][2].particles, tmp_path / "c.parquet")
    given = {"a": scene["a"][2], "b": (None, scene["b"][1], scene["b"][2].particles),
             "c": (None, scene["c"][1], str(tmp_path / "c.parquet"))}
    from_tab = track(given, **kw)
    pd.testing.assert_frame_equal(from_vol.particles, from_tab.particles)
    assert from_tab.params["neighbour_method"]["a"] == "contacts table"
    assert from_vol.params["neighbour_method"]["a"] == "contacts table"
    # the tables of a tracking, passed back in, give the same result again (they record the shape)
    again = track({s: (None, scene[s][1], t) for s, t in from_vol.tables.items()}, **kw)
    pd.testing.assert_frame_equal(from_vol.particles, again.particles)
    assert from_vol.tables["a"].attrs["grapes_dask"]["shape"] == list(SHAPE)
    # and gap 1 from volumes equals gap 1 from (grey, labels, table)
    pd.testing.assert_frame_equal(tracked.particles, from_tables(scene, drop_smallest=0.0).particles)


# --------------------------------------------------------------------------------------------
# statistics against hand / numpy computations on the long table
# --------------------------------------------------------------------------------------------


def kept_wide(tr, col):
    p = tr.particles[~tr.particles["excluded"]]
    w = p.pivot(index="label", columns="state", values=col)
    w.columns = [str(c) for c in w.columns]
    return w


def test_summary_against_numpy(tracked):
    s = tracked.summary()
    assert list(s.index) == ["a", "b", "c"] and s.index.name == "state"
    assert list(s.columns) == ["n", "mean", "sd", "sem", "ses", "se_tot", "delta_mean", "delta_sd", "delta_sem",
                               "delta_ses", "delta_se_tot"]
    m, nv = kept_wide(tracked, "roi_mean"), kept_wide(tracked, "roi_voxels")
    kept = sorted(m.index.astype(int))
    assert kept == [8, 9, 10, 11, 12, 13, 14, 15]
    for j, st_ in enumerate("abc"):
        v = np.array([grey_value(L, j) for L in kept])
        assert np.allclose(m[st_].to_numpy(), v)
        n = len(v)
        sem = math.sqrt(np.mean(SIGMA[st_] ** 2 / nv[st_].to_numpy(float)))
        ses = v.std(ddof=1) / math.sqrt(n)
        r = s.loc[st_]
        assert r["n"] == n
        assert r["mean"] == pytest.approx(v.mean()) and r["sd"] == pytest.approx(v.std(ddof=1))
        assert r["sem"] == pytest.approx(sem) and r["ses"] == pytest.approx(ses)
        assert r["se_tot"] == pytest.approx(math.hypot(ses, sem))
        if st_ == "a":
            assert list(r[["delta_mean", "delta_sd", "delta_sem", "delta_ses", "delta_se_tot"]]) == [0.0] * 5
            continue
        d = v - np.array([grey_value(L, 0) for L in kept])
        dsem = math.sqrt(np.mean(SIGMA["a"] ** 2 / nv["a"].to_numpy(float) + SIGMA[st_] ** 2 / nv[st_].to_numpy(float)))
        assert r["delta_mean"] == pytest.approx(d.mean()) and r["delta_sd"] == pytest.approx(d.std(ddof=1))
        assert r["delta_sem"] == pytest.approx(dsem)
        assert r["delta_ses"] == pytest.approx(d.std(ddof=1) / math.sqrt(n))
        assert r["delta_se_tot"] == pytest.approx(math.hypot(d.std(ddof=1) / math.sqrt(n), dsem))


def test_by_quantile_against_numpy(tracked):
    q = 3
    out = tracked.by_quantile("centroid-2", q=q)
    assert list(out.columns) == ["group", "lo", "hi", "state", "n", "delta_mean", "delta_sd", "delta_sem",
                                 "delta_ses", "delta_se_tot", "mean", "se_tot"]
    assert list(out["group"]) == [1, 1, 2, 2, 3, 3] and list(out["state"]) == ["b", "c"] * 3
    m, sem = kept_wide(tracked, "roi_mean"), kept_wide(tracked, "roi_sem")
    ref = tracked.particles[(tracked.particles["state"] == "a") & ~tracked.particles["excluded"]]
    x = ref.set_index("label")["centroid-2"]
    order = sorted(x.index, key=lambda L: (x[L], L))
    n = len(order)
    assert n == 8
    sizes = [g * n // q - (g - 1) * n // q for g in range(1, q + 1)]  # floor(g n / q) - floor((g-1) n / q)
    start = 0
    for g, size in enumerate(sizes, start=1):
        grp = order[start:start + size]
        start += size
        for st_ in "bc":
            r = out[(out["group"] == g) & (out["state"] == st_)].iloc[0]
            d = m.loc[grp, st_].to_numpy() - m.loc[grp, "a"].to_numpy()
            ds = np.sqrt(sem.loc[grp, st_].to_numpy() ** 2 + sem.loc[grp, "a"].to_numpy() ** 2)
            ses = d.std(ddof=1) / math.sqrt(size)
            assert r["n"] == size
            assert (r["lo"], r["hi"]) == (x[grp].min(), x[grp].max())
            assert r["delta_mean"] == pytest.approx(d.mean())
            assert r["delta_sd"] == pytest.approx(d.std(ddof=1), abs=1e-12)
            assert r["delta_sem"] == pytest.approx(math.sqrt(np.mean(ds ** 2)))
            assert r["delta_se_tot"] == pytest.approx(math.hypot(ses, math.sqrt(np.mean(ds ** 2))))
            v = m.loc[grp, st_].to_numpy()
            assert r["mean"] == pytest.approx(v.mean())
            assert r["se_tot"] == pytest.approx(math.hypot(v.std(ddof=1) / math.sqrt(size),
                                                           math.sqrt(np.mean(sem.loc[grp, st_].to_numpy() ** 2))))
    one = tracked.by_quantile("volume", q=2, state="c")
    assert list(one["state"]) == ["c", "c"] and one["lo"].iloc[1] >= one["hi"].iloc[0]


def test_fraction_by_hand(tracked):
    f = tracked.fraction("a", "b")
    assert isinstance(f, Fraction)
    kept = [8, 9, 10, 11, 12, 13, 14, 15]
    darker = sum(grey_value(L, 1) < grey_value(L, 0) for L in kept)
    assert (f.n, f.n_darker) == (8, darker) and 0 < darker < 8
    assert f.fraction == darker / 8
    assert f.se == pytest.approx(math.sqrt(f.fraction * (1 - f.fraction) / 8))
    back = tracked.fraction("b", "a")
    assert back.n_darker == sum(grey_value(L, 0) < grey_value(L, 1) for L in kept)
    with pytest.raises(GrapesInputError, match="state_b='x'"):
        tracked.fraction("a", "x")


def test_z_tests_by_hand(tracked):
    z = tracked.z_tests(alternative="less", sigma=2.0)
    assert list(z.columns) == ["against", "state_a", "state_b", "n_a", "n_b", "mean_a", "mean_b", "z", "p", "critical",
                               "reject", "sigma", "testable"]
    # against the reference a first, then consecutive states
    pairs = [("reference", 0, 1), ("reference", 0, 2), ("previous", 0, 1), ("previous", 1, 2)]
    assert list(zip(z["against"], z["state_a"], z["state_b"])) == [(k, "abc"[a], "abc"[b]) for k, a, b in pairs]
    kept = [8, 9, 10, 11, 12, 13, 14, 15]
    for i, (_, a, b) in enumerate(pairs):
        va = np.array([grey_value(L, a) for L in kept])
        vb = np.array([grey_value(L, b) for L in kept])
        zz = (vb.mean() - va.mean()) / math.sqrt(vb.var(ddof=1) / 8 + va.var(ddof=1) / 8)
        assert z["z"].iloc[i] == pytest.approx(zz)
        assert z["p"].iloc[i] == pytest.approx(norm.cdf(zz))
        assert z["critical"].iloc[i] == -2.0 and z["reject"].iloc[i] == bool(norm.cdf(zz) < norm.sf(2.0))
        assert z["n_a"].iloc[i] == z["n_b"].iloc[i] == 8 and bool(z["testable"].iloc[i])
        assert z["mean_a"].iloc[i] == pytest.approx(va.mean()) and z["mean_b"].iloc[i] == pytest.approx(vb.mean())
    ref = tracked.z_tests(sigma=2.0, against="reference")
    prev = tracked.z_tests(sigma=2.0, against="previous")
    pd.testing.assert_frame_equal(pd.concat([ref, prev], ignore_index=True), z.assign(sigma=2.0))
    assert set(ref["against"]) == {"reference"} and set(prev["against"]) == {"previous"}
    with pytest.raises(GrapesInputError, match="against='x'"):
        tracked.z_tests(against="x")


def _one_kept(scene, **kw):
    """The scene with everything but one particle excluded by `smallest`, the warning caught."""
    from grapes_dask import GrapesInputWarning

    with pytest.warns(GrapesInputWarning) as rec:
        tr = from_tables(scene, **kw)
    return tr, rec


def test_too_few_kept_warns_naming_the_rule(scene):
    from grapes_dask import GrapesInputWarning

    # 8 candidates, drop_smallest 0.9 keeps 8 - floor(7.2) = 1
    tr, rec = _one_kept(scene, drop_smallest=0.9)
    msg = str(rec[0].message)
    assert "cleaning kept 1 of 14 particles" in msg and "rule 'smallest' removed 7" in msg
    assert "lower drop_smallest (now 0.9)" in msg
    assert rec[0].message.error.render("cli").count("--drop-smallest") == 1
    # the z-tests of one particle are not testable: NaN, <NA>, never a False that reads "no change"
    z = tr.z_tests()
    assert not z["testable"].any() and z["z"].isna().all() and z["reject"].isna().all()
    assert (z["n_a"] == 1).all() and (z["n_b"] == 1).all()
    s = tr.summary()
    assert (s["n"] == 1).all() and s["se_tot"].isna().all()
    # no particle with a ROI: empty_roi removes all, the fix is exclude_outer_layers
    g = {k: v[0] for k, v in scene.items()}
    lab = {k: v[1] for k, v in scene.items()}
    with pytest.warns(GrapesInputWarning) as rec:
        tr = track({k: (g[k], lab[k]) for k in scene}, noise_sigma=SIGMA, exclude_outer_layers=6, drop_smallest=0.0)
    msg = str(rec[0].message)
    n_empty = int((tr.counts().set_index("reason").loc["empty_roi", "n"]))
    assert n_empty == 14  # every particle: none has a voxel deeper than 6 layers
    assert "cleaning kept 0 of 14 particles" in msg and f"rule 'empty_roi' removed {n_empty}" in msg
    assert "lower exclude_outer_layers (now 6)" in msg
    assert "--exclude-outer-layers" in rec[0].message.error.render("cli")
    assert tr.counts().set_index("reason").loc["kept", "n"] == 0


def test_few_kept_warns(scene):
    from grapes_dask.track import FEW_KEPT, FewParticlesWarning

    # 14 particles; 8 left by the other rules; drop_smallest 0.8 keeps 8 - floor(6.4) = 2 (14%): no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr = from_tables(scene, drop_smallest=0.8)
    assert tr.counts().set_index("reason").loc["kept", "n"] == 2 and 2 >= FEW_KEPT * 14
    # the rule's threshold, called directly: 2 of 30 kept (6.7%) warns
    from grapes_dask.track import _check_kept

    flags = np.zeros((30, 5), bool)
    flags[:28, 2] = True
    with pytest.warns(FewParticlesWarning, match=r"kept only 2 of 30 particles \(6.7%\): rule 'border' removed 28"):
        _check_kept(flags, flags.any(axis=1), 5, 0.25, 1)


def test_params_record_noise_and_analysis(tracked):
    p = tracked.params
    assert p["noise"] == {s: {"sigma": SIGMA[s], "source": "given"} for s in "abc"}
    assert p["exclude_outer_layers"] == N_OUT and p["drop_smallest"] == 0.0 and p["neighbour_gap"] == 1
    assert p["spacing"] == [1.0, 1.0, 1.0] and p["shape"] == list(SHAPE)
    assert p["analysis"]["exclude_outer_layers"] == N_OUT and "version" in p and "created" in p
    assert p["neighbour_method"] == {"a": "chunk search", "b": "none needed", "c": "chunk search"}
    assert set(tracked.tables) == {"a", "b", "c"}
    assert tracked.particles.attrs["grapes_dask"]["reference"] == "a"


def test_noise_estimated_when_not_given(scene):
    from grapes_dask import stats

    if not hasattr(stats, "estimate_noise"):
        pytest.skip("grapes_dask.stats.estimate_noise is not available")
    rng = np.random.default_rng(1)
    states = {}
    for s in "ab":
        g, lab, _ = scene[s]
        states[s] = ((g + rng.normal(0, 4.0, g.shape)).astype(np.float32), lab)
    tr = track(states, exclude_outer_layers=N_OUT, drop_smallest=0.0)
    for s in "ab":
        assert tr.params["noise"][s]["sigma"] == pytest.approx(4.0, rel=0.1)
        assert tr.params["noise"][s]["source"] != "given"


def test_noise_estimate_plumbing(scene, monkeypatch):
    """Without noise_sigma, each state's sigma comes from stats.estimate_noise (here a stand-in
    computing the background's std with numpy) and its source is recorded."""
    from dataclasses import dataclass

    from grapes_dask import stats

    @dataclass(frozen=True)
    class Estimate:
        sigma: float
        source: str

    calls = []

    def fake(grey, labels=None, *, region=None, margin=3, client=None):
        g, lab = np.asarray(grey.array), np.asarray(labels.array)
        calls.append(region)
        return Estimate(float(g[lab == 0].std()), "stand-in: background")

    monkeypatch.setattr(stats, "estimate_noise", fake, raising=False)
    rng = np.random.default_rng(2)
    states = {}
    for s, noise in zip("ab", (2.0, 5.0)):
        g, lab, _ = scene[s]
        states[s] = ((g + rng.normal(0, noise, g.shape)).astype(np.float32), lab)
    tr = track(states, exclude_outer_layers=N_OUT, drop_smallest=0.0, noise_sigma={"a": 7.0, "b": None},
               noise_region={"b": (slice(0, 4), slice(0, 48), slice(0, 48))})
    assert calls == [(slice(0, 4), slice(0, 48), slice(0, 48))]
    g, lab = states["b"]
    sigma_b = float(g[lab == 0].std())
    assert tr.params["noise"]["a"] == {"sigma": 7.0, "source": "given"}
    assert tr.params["noise"]["b"] == {"sigma": sigma_b, "source": "stand-in: background"}
    rows = tr.particles[(tr.particles["state"] == "b") & (tr.particles["roi_voxels"] > 0)]
    assert np.allclose(rows["roi_sem"], sigma_b / np.sqrt(rows["roi_voxels"]))


def test_two_dimensional_states():
    yy, xx = np.mgrid[:60, :60]

    def state(dy, drop):
        lab = np.zeros((60, 60), np.uint8)
        for L, (c, r) in enumerate([((15, 15), 6), ((15, 30), 5), ((40, 40), 9), ((45, 12), 6)], start=1):
            if L != drop:
                lab[(yy - c[0] - dy) ** 2 + (xx - c[1]) ** 2 <= r * r] = L
        return np.where(lab > 0, 100.0 + 10 * lab, 50.0).astype(np.float32), lab

    tr = track({"p": state(0, 0), "q": state(0, 2), "r": state(1, 0)}, noise_sigma=1.0, exclude_outer_layers=2,
               drop_smallest=0.0, neighbour_gap=3)
    assert [c for c in tr.particles.columns if c.startswith("centroid")] == ["centroid-0", "centroid-1"]
    lab = state(0, 0)[1]
    # 1 and 2 are 3 pixels apart: a neighbour of the inconsistent 2 with gap 3
    assert min_distance(lab, 2, 1) == 4.0
    assert reasons(tr) == {1: "neighbour", 2: "inconsistent", 3: "", 4: ""}
    assert tr.particles.loc[tr.particles["label"] == 3, "volume"].iloc[0] == (lab == 3).sum()  # the area
    cm = tr.change_map(3, "r", margin=4)
    assert np.allclose(cm.shift, (-1.0, 0.0), atol=0.05) and np.nanmax(np.abs(cm.delta)) < 1e-3


# --------------------------------------------------------------------------------------------
# change map
# --------------------------------------------------------------------------------------------


def _soft_particle(shape, centre, radius, dark):
    """Grey of a soft-edged ball (interior 150, background 50) with a Gaussian dark core."""
    grids = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    r2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
    r = np.sqrt(r2)
    grey = 50 + 100 / (1 + np.exp(-(radius - r) / 0.7))
    return grey - dark * np.exp(-r2 / (2 * 3.0 ** 2))


def test_change_map_recovers_shift_and_darkening():
    shape = (40, 40, 40)
    c = np.array([20.0, 20.0, 20.0])
    t = np.array([0.6, -1.3, 2.0])  # sub-voxel and whole-voxel parts
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")

    def ball(centre):
        return (sum((g - x) ** 2 for g, x in zip(grids, centre)) <= 64).astype(np.uint8)

    grey_a = _soft_particle(shape, c, 8.0, 0.0).astype(np.float32)
    grey_b = _soft_particle(shape, c + t, 8.0, 30.0).astype(np.float32)
    from grapes_dask import GrapesInputWarning

    with pytest.warns(GrapesInputWarning, match="the states hold 1 particle"):  # one particle: no statistic
        tr = track({"pristine": (grey_a, ball(c)), "charged": (grey_b, ball(np.round(c + t)))}, noise_sigma=1.0,
                   exclude_outer_layers=3, drop_smallest=0.0)
    cm = tr.change_map(1, "charged", margin=5, sigma=1.0)
    assert isinstance(cm, ChangeMap) and cm.delta.dtype == np.float32 and cm.reference == "pristine"
    assert np.allclose(cm.shift, -t, atol=0.1)
    assert cm.origin == (7, 7, 7) and cm.delta.shape == (27, 27, 27) and cm.spacing == (1.0, 1.0, 1.0)
    # the mask: the reference particle without its outer 3 layers (engine layers from the EDT)
    inside = ball(c)[7:34, 7:34, 7:34].astype(bool)
    d = ndimage.distance_transform_edt(inside)
    assert np.array_equal(cm.mask, inside & (np.maximum(1, np.round(d)) > 3))
    assert np.isnan(cm.delta[~cm.mask]).all() and np.isfinite(cm.delta[cm.mask]).all()
    # the change: the dark core, smoothed by the Gaussian (variance 9 + 1), peak -30 (9/10)^1.5
    local = [g[7:34, 7:34, 7:34] for g in grids]
    r2 = sum((g - x) ** 2 for g, x in zip(local, c))
    expect = -30 * (9 / 10) ** 1.5 * np.exp(-r2 / (2 * 10.0))
    err = cm.delta[cm.mask] - expect[cm.mask]
    assert np.abs(err).max() < 3.0
    centre = tuple(int(x) - 7 for x in c)
    assert cm.delta[centre] < -22
    # no change where nothing changed: the pristine state against itself
    same = tr.change_map(1, "pristine")
    assert np.allclose(same.shift, 0) and np.nanmax(np.abs(same.delta)) < 1e-3


@pytest.mark.parametrize("margin", [0, 1, 3, 40])
def test_change_map_mask_at_any_margin_equals_whole_volume_edt(tracked, scene, margin):
    """The mask of change_map is the particle's voxels deeper than N layers, with distances as in
    the whole volume: scipy's EDT of the whole (uncropped) particle mask, the volume's outside
    counting as outside; margin=0 (the crop edge cutting the particle's faces) included."""
    lab = scene["a"][1]
    for label in (10, 12, 14):
        whole = np.pad(lab == label, 1)  # the volume's outside is outside the particle
        d = ndimage.distance_transform_edt(whole)[1:-1, 1:-1, 1:-1]
        for n_out in (0, 1, 2):
            cm = tracked.change_map(label, "b", margin=margin, sigma=0.0, exclude_outer_layers=n_out)
            box = tuple(slice(o, o + n) for o, n in zip(cm.origin, cm.mask.shape))
            expect = (lab[box] == label) & (np.maximum(1, np.round(d[box])) > n_out)
            # where the shifted crop has data (the scene does not move: everywhere)
            assert np.allclose(cm.shift, 0)
            np.testing.assert_array_equal(cm.mask, expect)
        # a face voxel of the particle is at distance 1: layer 1, masked with n_out = 1
        cm0 = tracked.change_map(label, "b", margin=0, sigma=0.0, exclude_outer_layers=0)
        face = tuple(int(np.flatnonzero((lab == label).any(axis=tuple(b for b in range(3) if b != a)))[0])
                     for a in range(3))
        assert cm0.origin == tuple(face)  # margin 0: the box starts at the particle's first voxel per axis
        cm1 = tracked.change_map(label, "b", margin=0, sigma=0.0, exclude_outer_layers=1)
        first = np.argwhere(cm0.mask)[0]
        assert first[0] == 0 and d[tuple(first + np.array(cm0.origin))] == 1.0
        assert not cm1.mask[tuple(first)]


def test_change_map_errors(tracked, scene):
    with pytest.raises(GrapesInputError, match="label=99"):
        tracked.change_map(99, "b")
    with pytest.raises(GrapesInputError, match="state='z'"):
        tracked.change_map(10, "z")
    tr = track({s: t for s, (_, _, t) in scene.items()}, noise_sigma=1.0, exclude_outer_layers=N_OUT,
               neighbour_gap=0)
    with pytest.raises(GrapesInputError, match="grey volume of the reference"):
        tr.change_map(10, "b")


# --------------------------------------------------------------------------------------------
# bad inputs: clear errors before any compute
# --------------------------------------------------------------------------------------------


def _boom(shape, dtype):
    """A lazy volume whose computation fails: any compute before the check shows."""
    def fail():
        raise RuntimeError("computed")

    return da.from_delayed(dask.delayed(fail)(), shape=shape, dtype=dtype)


def test_errors_before_any_compute(scene, tracked):
    g, lab = _boom(SHAPE, np.uint8), _boom(SHAPE, np.uint16)
    small = (_boom((40, 48, 48), np.uint8), _boom((40, 48, 48), np.uint16))
    kw = dict(noise_sigma=1.0, exclude_outer_layers=N_OUT)
    with pytest.raises(GrapesInputError, match="at least 2"):
        track({"a": (g, lab)}, **kw)
    with pytest.raises(GrapesInputError, match=r"reference='x' is not among the states \['a', 'b'\]"):
        track({"a": (g, lab), "b": (g, lab)}, reference="x", **kw)
    with pytest.raises(GrapesInputError, match=r"'a' and 'b' have different shapes, \(48, 48, 48\) and \(40, 48, 48\)"):
        track({"a": (g, lab), "b": small}, **kw)
    # a tracking's tables record their shape
    with pytest.raises(GrapesInputError, match="different shapes"):
        track({"a": tracked.tables["a"], "b": small}, **kw)
    # a table from analyze records its shape too
    with pytest.raises(GrapesInputError, match=r"different shapes, \(48, 48, 48\) and \(40, 48, 48\)"):
        track({"a": scene["a"][2], "b": small}, **kw)
    # a table of an older version records none: its particles' boxes must fit in the others' shape
    old = scene["a"][2].particles.copy()
    old.attrs["grapes_dask"] = {k: v for k, v in old.attrs["grapes_dask"].items() if k != "shape"}
    with pytest.raises(GrapesInputError, match=r"particles up to \(47, 45, 45\).*outside the shape \(40, 48, 48\)"):
        track({"a": old, "b": small}, **kw)
    # another exclude_outer_layers than the table's
    with pytest.raises(GrapesInputError, match="exclude_outer_layers=2 but track uses exclude_outer_layers=5"):
        track({"a": scene["a"][2], "b": (g, lab)}, noise_sigma=1.0, exclude_outer_layers=5)
    # tables from different parameters
    other = analyze_tables(scene["b"][0], scene["b"][1], exclude_outer_layers=N_OUT, layer_width=2.0)
    with pytest.raises(GrapesInputError, match="different layer_width"):
        track({"a": scene["a"][2], "b": other}, neighbour_gap=None, **kw)
    with pytest.raises(GrapesInputError, match="layer_width=2.0, but the states analysed here use layer_width=1.0"):
        track({"a": (g, lab), "b": other}, **kw)
    with pytest.raises(GrapesInputError, match="spacing"):
        track({"a": scene["a"][2], "b": (g, lab)}, spacing=2.0, **kw)
    # labels needed by the neighbour rule: b lacks 6, so a's labels are needed
    with pytest.raises(GrapesInputError, match=r"state 'a' is given as a table without its label volume.*"
                                               r"neighbour_gap=None"):
        track({"a": scene["a"][2].particles, "b": scene["b"][2]}, **kw)
    # ... unless gap 0 and its contacts are given (ParticleTables)
    track({"a": scene["a"][2], "b": scene["b"][2]}, neighbour_gap=0, **kw)
    # noise to estimate without the grey volume
    with pytest.raises(GrapesInputError, match="noise of state 'a' is to be estimated but its grey volume"):
        track({"a": scene["a"][2], "b": scene["b"][2]}, neighbour_gap=0, exclude_outer_layers=N_OUT)
    with pytest.raises(GrapesInputError, match="noise of state 'b' is to be estimated but its grey volume"):
        track({"a": scene["a"][2], "b": scene["b"][2]}, neighbour_gap=0, noise_sigma={"a": 1.0, "b": None},
              exclude_outer_layers=N_OUT)
    for bad in ({"a": 1.0, "b": 1.0, "zz": 1.0}, -1.0, {"a": 1.0, "b": "x"}):
        with pytest.raises(GrapesInputError, match="noise_sigma"):
            track({"a": (g, lab), "b": (g, lab)}, noise_sigma=bad, exclude_outer_layers=N_OUT)
    for opt, val in (("drop_smallest", 1.0), ("neighbour_gap", -1), ("neighbour_gap", 1.5),
                     ("exclude_outer_layers", -2)):
        with pytest.raises(GrapesInputError, match=opt):
            track({"a": (g, lab), "b": (g, lab)}, **{**kw, opt: val})
    with pytest.raises(GrapesInputError, match="'bogus' is not an analysis option"):
        track({"a": (g, lab), "b": (g, lab)}, bogus=1, **kw)
    with pytest.raises(GrapesInputError, match="state 'b' is a int"):
        track({"a": (g, lab), "b": 3}, **kw)
    with pytest.raises(GrapesInputError, match="no analysis parameters"):
        track({"a": (g, lab), "b": pd.DataFrame({"label": [1]})}, **kw)


# --------------------------------------------------------------------------------------------
# the out-of-core neighbour search
# --------------------------------------------------------------------------------------------


def _reference_pairs(lab: np.ndarray, targets, gap: int) -> set:
    """Whole-volume numpy/scipy reference: labels within distance gap + 1 of each target."""
    out = set()
    for a in targets:
        if not (lab == a).any():
            continue
        d = ndimage.distance_transform_edt(lab != a)
        near = np.unique(lab[(d <= gap + 1) & (lab != 0) & (lab != a)])
        out |= {(int(a), int(b)) for b in near}
    return out


def _blobs(shape, seed, thr=0.0, n_seeds=60):
    """Foreground blobs cut into touching cells (nearest of random seeds): faces, corners and gaps."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    seeds = np.zeros(shape, np.uint32)
    seeds[tuple(rng.integers(0, n, n_seeds) for n in shape)] = np.arange(1, n_seeds + 1)
    idx = ndimage.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
    return np.where(smooth > thr * smooth.std(), seeds[tuple(idx)], 0).astype(np.uint32)


@pytest.mark.parametrize("gap", [0, 1, 2, 3])
def test_neighbour_search_uneven_chunks_equals_whole_volume(gap):
    lab = _blobs((32, 32, 32), seed=3)
    targets = np.unique(lab)[1::3]
    arr = da.from_array(lab, chunks=((5, 11, 16), (9, 9, 14), (20, 12)))
    got = neighbour_pairs(arr, targets, gap)
    assert list(got.columns) == ["label", "neighbour"] and got["label"].dtype == np.uint64
    ref = _reference_pairs(lab, targets, gap)
    assert set(zip(got["label"].astype(int), got["neighbour"].astype(int))) == ref
    assert len(ref) > 10
    # chunks given explicitly (also uneven in the number of blocks per axis) agree too
    got2 = neighbour_pairs(lab, targets, gap, chunks=(7, 32, 13))
    assert got2.equals(got)


def test_neighbour_search_reads_a_zarr_store_by_block(tmp_path):
    from grapes_dask.io import write_zarr

    lab = _blobs((24, 24, 24), seed=7)
    path = write_zarr(da.from_array(lab, chunks=(8, 12, 24)), tmp_path / "labels.zarr")
    targets = np.unique(lab)[1::4]
    got = neighbour_pairs(str(path), targets, 2)
    assert set(zip(got["label"].astype(int), got["neighbour"].astype(int))) == _reference_pairs(lab, targets, 2)


def test_neighbour_search_gap0_equals_contacts_table():
    lab = _blobs((32, 32, 32), seed=5)
    grey = np.full(lab.shape, 7, np.uint8)
    contacts = analyze_tables(grey, lab, check_labels=False).contacts
    assert len(contacts) > 5
    all_labels = np.unique(lab)[1:]
    got = neighbour_pairs(da.from_array(lab, chunks=(10, 13, 32)), all_labels, 0)
    pairs = {(int(a), int(b)) for a, b in zip(got["label"], got["neighbour"])}
    want = {(int(a), int(b)) for a, b in zip(contacts["label_a"], contacts["label_b"])}
    assert pairs == want | {(b, a) for a, b in want}


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), gap=st.integers(0, 3), cy=st.integers(3, 14), cx=st.integers(3, 12))
def test_neighbour_search_2d_property(seed, gap, cy, cx):
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 6, size=(14, 12)) * (rng.random((14, 12)) < 0.25)
    targets = [1, 2]
    got = neighbour_pairs(da.from_array(lab, chunks=(cy, cx)), targets, gap)
    assert set(zip(got["label"].astype(int), got["neighbour"].astype(int))) == _reference_pairs(lab, targets, gap)
