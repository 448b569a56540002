"""The ROI leaves out the outer, surface-side layers whatever ``start_at`` is, and the
normalisations of the radial profiles (``normalise="roi_mean"``, :func:`normalise_profiles`).

References: the ROI is written here from scipy's ``distance_transform_edt`` of each particle's
mask (zero-padded by one voxel: outside the volume is outside the particle), layer
``max(1, rint(d / w))`` with ``d`` in voxels of the finest axis; the normalised profiles are computed by hand on hand-made profiles.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from grapes_dask._errors import GrapesInputError
from grapes_dask.table import analyze, normalise_profiles

RIM = 200
CORE = 100


def two_rimmed_spheres(shape=(36, 60, 36), radius=14.0):
    """Two touching balls (labels 3 and 8) whose outer two edge layers are bright (a phase-contrast rim)."""
    z, y, x = np.indices(shape)
    c = np.array(shape, float) / 2 - 0.5
    lab = np.zeros(shape, np.uint16)
    for lid, cy in ((3, c[1] - radius + 0.3), (8, c[1] + radius - 0.3)):
        ball = (z - c[0]) ** 2 + (y - cy) ** 2 + (x - c[2]) ** 2 < radius ** 2
        lab[ball & (lab == 0)] = lid
    return lab


def edge_layers_ref(lab, spacing=(1.0, 1.0, 1.0), width=1.0):
    """Edge layer of every voxel (0 on background): per label, scipy's EDT of the padded mask, in
    voxels of the finest axis (a layer is `width` such voxels thick)."""
    k = np.zeros(lab.shape, np.int64)
    fine = [s / min(spacing) for s in spacing]
    for lid in np.unique(lab[lab > 0]):
        mask = lab == lid
        d = ndi.distance_transform_edt(np.pad(mask, 1), sampling=fine)[(slice(1, -1),) * lab.ndim]
        k[mask] = np.maximum(1, np.rint(d[mask] / width)).astype(np.int64)
    return k


def rimmed_grey(lab, k, dtype, seed=0):
    rng = np.random.default_rng(seed)
    grey = np.where(k <= 2, RIM, CORE) + rng.integers(-20, 21, size=lab.shape)
    grey[lab == 0] = 0
    return grey.astype(dtype)


@pytest.mark.parametrize("start_at", ["edge", "center"])
@pytest.mark.parametrize("dtype, spacing, fill_holes", [
    (np.uint8, (1.0, 1.0, 1.0), False),  # fused EDT and layer sums
    (np.float32, (1.0, 1.0, 1.0), False),  # integer EDT, float grey
    (np.uint16, (1.0, 0.8, 0.9), False),  # anisotropic: float EDT
    (np.uint16, (1.0, 1.0, 1.0), True),  # ownership groups
])
def test_outer_layers_leave_the_rim_out_whatever_start_at(start_at, dtype, spacing, fill_holes):
    lab = two_rimmed_spheres()
    k = edge_layers_ref(lab, spacing)
    grey = rimmed_grey(lab, k, dtype)
    n_outer = 5
    # small chunks and regions: each ball spans several regions, so the EDT needs halos
    t = analyze(grey, lab, spacing=spacing, chunks=12, region_size=12, start_at=start_at,
                exclude_outer_layers=n_outer, fill_holes=fill_holes)
    assert list(t["label"]) == [3, 8]
    for _, row in t.iterrows():
        mask = lab == row["label"]
        inner = grey[mask & (k > n_outer)].astype(np.float64)
        assert row["roi_voxels"] == inner.size and inner.size < mask.sum() // 2
        np.testing.assert_allclose(row["roi_mean"], inner.mean(), rtol=1e-12)
        np.testing.assert_allclose(row["roi_std"], inner.std(), rtol=1e-9)
        assert abs(row["roi_mean"] - CORE) < 3  # the rim (200) is out
        # the profile keeps its own layers: from the centre with start_at="center"
        cnt = row["radial_layers_count"]
        assert cnt.sum() == mask.sum()
        rim_end = np.nanargmax(row["radial_layers_graylevel"])
        assert (rim_end >= len(cnt) - 3) if start_at == "center" else (rim_end <= 1)


def test_centre_start_with_exclusion_is_planned_within_the_budget(monkeypatch):
    """The planner sizes the centre-and-edge tasks (both distances) and splits them to fit."""
    import grapes_dask.table as table_mod

    lab = two_rimmed_spheres()
    k = edge_layers_ref(lab)
    grey = rimmed_grey(lab, k, np.uint8)
    planned = []
    real = table_mod.plan_pass2

    def spy(*args, **kwargs):
        bounds, tasks = real(*args, **kwargs)
        planned.append((kwargs["memory"], kwargs["budget"], tasks))
        return bounds, tasks

    monkeypatch.setattr(table_mod, "plan_pass2", spy)
    t = analyze(grey, lab, start_at="center", exclude_outer_layers=5, memory_limit="17MiB")
    memory, budget, tasks = planned[-1]
    assert not memory.center  # halo regions: the EDT needs them
    assert len(tasks) > 1 and all(0 < r.nbytes <= budget for r in tasks)
    # each estimate holds the edge route's and the centre route's work on the core
    r = tasks[0]
    edge_only = table_mod.TaskMemory(1, 1, 3, (1.0, 1.0, 1.0)).region(r.outer_shape, r.core_shape, len(r.labels),
                                                                     r.bound)
    assert r.nbytes >= edge_only + 41 * int(np.prod(r.core_shape))
    for _, row in t.iterrows():
        assert row["roi_voxels"] == ((lab == row["label"]) & (k > 5)).sum()


def test_centre_start_without_exclusion_keeps_every_voxel():
    lab = two_rimmed_spheres((30, 48, 30), 11.0)
    k = edge_layers_ref(lab)
    grey = rimmed_grey(lab, k, np.uint8)
    t = analyze(grey, lab, chunks=10, start_at="center")
    for _, row in t.iterrows():
        mask = lab == row["label"]
        assert row["roi_voxels"] == mask.sum()
        np.testing.assert_allclose(row["roi_mean"], grey[mask].mean(), rtol=1e-12)


def test_centre_start_with_exclusion_needs_a_boundary():
    lab = np.full((6, 7, 8), 5, np.uint16)
    grey = np.arange(lab.size, dtype=np.uint16).reshape(lab.shape)
    analyze(grey, lab, start_at="center", black_border=False)  # no EDT needed: fine
    with pytest.raises(GrapesInputError, match="fills the whole volume"):
        analyze(grey, lab, start_at="center", black_border=False, exclude_outer_layers=1)


def test_centre_start_with_exclusion_as_a_dask_frame():
    from grapes_dask.table import particle_table

    lab = two_rimmed_spheres((30, 48, 30), 11.0)
    k = edge_layers_ref(lab)
    grey = rimmed_grey(lab, k, np.uint8)
    got = particle_table(grey, lab, chunks=10, start_at="center", exclude_outer_layers=3).compute()
    want = [grey[(lab == lid) & (k > 3)].mean() for lid in (3, 8)]
    np.testing.assert_allclose(got["roi_mean"].to_numpy(), want, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# normalisations
# --------------------------------------------------------------------------------------------


def hand_table(start_at="edge", n_outer=1):
    """Three hand-made profiles: a bright rim, a profile rising inward, one with an empty layer."""
    t = pd.DataFrame({"label": np.array([1, 2, 4], np.uint64)})
    counts = [np.array([10, 20, 30]), np.array([4, 8, 2]), np.array([6, 0, 3, 1])]
    means = [np.array([200.0, 100.0, 130.0]), np.array([50.0, 75.0, 100.0]),
             np.array([80.0, np.nan, 40.0, 40.0])]
    t["radial_layers"] = [np.arange(1, len(c) + 1) for c in counts]
    t["radial_layers_count"] = [c.astype(np.int64) for c in counts]
    t["radial_layers_graylevel"] = means
    t["radial_layers_graylevelnormed"] = [np.full(len(c), np.nan) for c in counts]
    t["roi_mean"] = [118.0, 80.0, 40.0]  # layers > 1, by hand: (20*100 + 30*130)/50, (8*75 + 2*100)/10, 40
    t.attrs["grapes_dask"] = {"start_at": start_at, "exclude_outer_layers": n_outer, "normalise": "radial_max",
                              "spacing": [1.0, 1.0, 1.0]}
    return t


def assert_profiles(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == np.float64
        np.testing.assert_allclose(g, w, rtol=1e-15, atol=0, equal_nan=True)


def test_roi_mean_normalisation_by_hand():
    t = hand_table()
    before = [p.copy() for p in t["radial_layers_graylevelnormed"]]
    got = normalise_profiles(t, "roi_mean")
    assert_profiles(got["radial_layers_graylevelnormed"], [
        [200 / 118, 100 / 118, 130 / 118], [50 / 80, 75 / 80, 100 / 80], [2.0, np.nan, 1.0, 1.0]])
    assert got.attrs["grapes_dask"]["normalise"] == "roi_mean"
    assert "normalise_exclude_outer_layers" not in got.attrs["grapes_dask"]
    # the input is untouched, attrs included
    assert_profiles(t["radial_layers_graylevelnormed"], before)
    assert t.attrs["grapes_dask"]["normalise"] == "radial_max"
    # another ROI: from the profiles, layers > 0 (all) and > 2
    got0 = normalise_profiles(t, "roi_mean", exclude_outer_layers=0)
    all_means = [(10 * 200 + 20 * 100 + 30 * 130) / 60, (4 * 50 + 8 * 75 + 2 * 100) / 14, (6 * 80 + 3 * 40 + 40) / 10]
    assert_profiles(got0["radial_layers_graylevelnormed"],
                    [np.asarray(m) / a for m, a in zip(t["radial_layers_graylevel"], all_means)])
    assert got0.attrs["grapes_dask"]["normalise_exclude_outer_layers"] == 0
    got2 = normalise_profiles(t, "roi_mean", exclude_outer_layers=2)
    assert_profiles(got2["radial_layers_graylevelnormed"],
                    [np.array([200, 100, 130]) / 130, np.array([50, 75, 100]) / 100, [2.0, np.nan, 1.0, 1.0]])
    # the table's own number uses its roi_mean column (here consistent with the profiles)
    assert_profiles(normalise_profiles(t, "roi_mean", exclude_outer_layers=1)["radial_layers_graylevelnormed"],
                    got["radial_layers_graylevelnormed"])
    # an ROI deeper than every layer: NaN
    assert np.isnan(normalise_profiles(t, "roi_mean", exclude_outer_layers=9)["radial_layers_graylevelnormed"][0]).all()


def test_radial_max_and_surface_by_hand():
    t = hand_table()
    rm = normalise_profiles(t, "radial_max")["radial_layers_graylevelnormed"]
    # bright rim: nothing brighter than layer 1 -> NaN (GRAPES' meaning); rising: (g - 50) / 50
    assert_profiles(rm, [[np.nan] * 3, [0.0, 0.5, 1.0], [np.nan] * 4])
    sf = normalise_profiles(t, "surface")["radial_layers_graylevelnormed"]
    assert_profiles(sf, [[1.0, 0.5, 0.65], [1.0, 1.5, 2.0], [1.0, np.nan, 0.5, 0.5]])
    # from the centre, the surface is the last layer
    tc = hand_table("center")
    sc = normalise_profiles(tc, "surface")["radial_layers_graylevelnormed"]
    assert_profiles(sc, [[200 / 130, 100 / 130, 1.0], [0.5, 0.75, 1.0], [2.0, np.nan, 1.0, 1.0]])
    # start_at given overrides the table's
    assert_profiles(normalise_profiles(tc, "surface", start_at="edge")["radial_layers_graylevelnormed"], sf)


def test_missing_profile_and_index_are_kept():
    t = hand_table().set_index("label")
    t.loc[2, "radial_layers_graylevel"] = None
    got = normalise_profiles(t, "roi_mean")
    assert got["radial_layers_graylevelnormed"].loc[2] is None
    assert list(got.index) == [1, 2, 4]


def test_normalise_profiles_errors():
    t = hand_table()
    with pytest.raises(GrapesInputError, match="how='max'"):
        normalise_profiles(t, "max")
    with pytest.raises(GrapesInputError, match="exclude_outer_layers"):
        normalise_profiles(t, "surface", exclude_outer_layers=2)
    with pytest.raises(GrapesInputError, match="exclude_outer_layers=-1"):
        normalise_profiles(t, "roi_mean", exclude_outer_layers=-1)
    bare = t.copy()
    bare.attrs = {}
    with pytest.raises(GrapesInputError, match="start_at"):
        normalise_profiles(bare, "surface")
    with pytest.raises(GrapesInputError, match="start_at"):
        normalise_profiles(bare, "roi_mean", exclude_outer_layers=2)
    normalise_profiles(bare, "roi_mean")  # its roi_mean column needs no start_at
    with pytest.raises(GrapesInputError, match="start_at='center'"):
        normalise_profiles(hand_table("center"), "roi_mean", exclude_outer_layers=2)
    with pytest.raises(GrapesInputError, match="roi_mean"):
        normalise_profiles(t.drop(columns="roi_mean"), "roi_mean")
    with pytest.raises(GrapesInputError, match="radial_layers_graylevel"):
        normalise_profiles(t.drop(columns="radial_layers_graylevel"), "radial_max")
    with pytest.raises(GrapesInputError, match="pandas DataFrame"):
        normalise_profiles({"a": 1}, "radial_max")


def test_analyze_roi_mean_is_defined_where_radial_max_is_not():
    """On a bright-rim phantom radial_max is NaN for every particle; roi_mean is finite and the
    same as normalise_profiles on the radial_max table."""
    lab = two_rimmed_spheres((30, 48, 30), 11.0)
    k = edge_layers_ref(lab)
    grey = np.where(k <= 2, RIM, CORE).astype(np.uint8) * (lab > 0)  # no noise: the rim is the brightest
    t = analyze(grey, lab, chunks=10, exclude_outer_layers=3)
    assert all(np.isnan(p).all() for p in t["radial_layers_graylevelnormed"])
    r = analyze(grey, lab, chunks=10, exclude_outer_layers=3, normalise="roi_mean")
    assert r.attrs["grapes_dask"]["normalise"] == "roi_mean"
    for p, g in zip(r["radial_layers_graylevelnormed"], r["radial_layers_graylevel"]):
        np.testing.assert_array_equal(p, g / CORE)  # ROI mean is exactly 100
        assert p[0] == 2.0 and p[-1] == 1.0
    again = normalise_profiles(t, "roi_mean")
    for a, b in zip(again["radial_layers_graylevelnormed"], r["radial_layers_graylevelnormed"]):
        np.testing.assert_array_equal(a, b)
    # only the normalisation changed in the parameters
    assert again.attrs["grapes_dask"] == {**t.attrs["grapes_dask"], "normalise": "roi_mean"}
