"""The synthetic phantom generator, checked against independent computations (numpy, scipy)."""

import json

import dask
import numpy as np
import pandas as pd
import pytest
import zarr
from scipy import ndimage
from scipy.spatial.transform import Rotation

from grapes_dask import GrapesInputError
from grapes_dask import synthetic as S
from grapes_dask.io import open_volume

SHAPE = (40, 56, 64)
QUIET = dict(noise_sigma=0.0, rim_contrast=0.0)  # clean grey: only particles, pores and voids


def compute(*arrays):
    return dask.compute(*arrays, scheduler="threads")


@pytest.fixture(scope="module")
def truth():
    particles = S.make_particles(SHAPE, mean_radius=7.0, seed=3)
    return S.make_truth(particles, SHAPE, damage=1.0, seed=3)


@pytest.fixture(scope="module")
def volumes(truth):
    grey, labels = S.phantom_arrays(SHAPE, truth, chunks=32, seed=3)
    return compute(grey, labels)


def reference_labels(truth, shape):
    """Brute-force labels: smallest power distance r_eq^2 (s^2 - 1) among ellipsoids with s <= 1.

    Rotations from scipy (scalar-last quaternions), not from the module under test.
    """
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    best = np.full(shape, np.inf)
    lab = np.zeros(shape, dtype=np.uint64)
    for row in truth.itertuples():
        R = Rotation.from_quat([row.q1, row.q2, row.q3, row.q0]).as_matrix()
        d = np.stack([zz - row.z, yy - row.y, xx - row.x], axis=-1)
        body = d @ R  # coordinates along the body axes
        s2 = (body[..., 0] / row.a) ** 2 + (body[..., 1] / row.b) ** 2 + (body[..., 2] / row.c) ** 2
        w = row.r_eq**2 * (s2 - 1.0)
        take = (s2 <= 1.0) & (w < best)
        best[take] = w[take]
        lab[take] = row.label
    return lab


def normalised_distance(truth, shape):
    """Per voxel: s of the labelled particle (inf for pore), from the truth table."""
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    out = {}
    for row in truth.itertuples():
        R = Rotation.from_quat([row.q1, row.q2, row.q3, row.q0]).as_matrix()
        body = np.stack([zz - row.z, yy - row.y, xx - row.x], axis=-1) @ R
        out[row.label] = np.sqrt((body[..., 0] / row.a) ** 2 + (body[..., 1] / row.b) ** 2
                                 + (body[..., 2] / row.c) ** 2)
    return out


# ------------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------------


def test_bitwise_identical_across_chunkings(truth):
    t = S.make_truth(truth[truth.state == 0].drop(columns=["state", "damage", "cut", "drift_z", "drift_y",
                                                           "drift_x"]),
                     SHAPE, n_states=2, damage=[0.3, 0.9], drift=[[0, 0, 0], [0.4, -1.3, 2.0]])
    results = []
    for chunks in (64, (16, 24, 20), (40, 7, 64)):
        results.append(compute(*S.phantom_arrays(SHAPE, t, state=1, chunks=chunks, seed=5)))
    for grey, labels in results[1:]:
        assert np.array_equal(grey, results[0][0])
        assert np.array_equal(labels, results[0][1])
    # blurred too
    a = compute(S.phantom_arrays(SHAPE, t, chunks=32, seed=5, blur_sigma=1.0)[0])[0]
    b = compute(S.phantom_arrays(SHAPE, t, chunks=(20, 14, 16), seed=5, blur_sigma=1.0)[0])[0]
    assert np.array_equal(a, b)


def test_same_seed_same_phantom_other_seed_differs():
    g1, l1, t1 = S.phantom_numpy((32, 32, 32), mean_radius=5, seed=11, chunks=16)
    g2, l2, t2 = S.phantom_numpy((32, 32, 32), mean_radius=5, seed=11, chunks=32)
    g3, l3, t3 = S.phantom_numpy((32, 32, 32), mean_radius=5, seed=12, chunks=16)
    assert np.array_equal(g1, g2) and np.array_equal(l1, l2)
    pd.testing.assert_frame_equal(t1, t2)
    assert not np.array_equal(l1, l3) and not np.array_equal(g1, g3)


# ------------------------------------------------------------------------------------------------
# ground truth
# ------------------------------------------------------------------------------------------------


def test_labels_match_independent_rendering(truth, volumes):
    _, labels = volumes
    ref = reference_labels(truth[truth.state == 0], SHAPE)
    assert (labels == ref).mean() > 0.9995


def test_truth_consistent_with_volumes(truth, volumes):
    _, labels = volumes
    t = truth[truth.state == 0]
    assert t["label"].is_unique and (t["label"] > 0).all()
    present = np.unique(labels)
    assert set(t["label"]) == set(present[present > 0].tolist())
    idx = t["label"].to_numpy()
    counts = ndimage.sum_labels(np.ones_like(labels), labels, idx)
    cents = np.array(ndimage.center_of_mass(np.ones_like(labels), labels, idx))
    whole = ~t["cut"].to_numpy()
    assert whole.sum() >= 10
    err = np.linalg.norm(cents - t[["z", "y", "x"]].to_numpy(), axis=1)
    assert np.all(err[whole] < 0.12 * t["r_eq"].to_numpy()[whole] + 0.5)
    # voxel count: never more than the ellipsoid, and close to it (overlaps are small)
    vol = t["volume"].to_numpy()
    ratio = counts[whole] / vol[whole]
    assert np.all(ratio < 1.08) and np.median(ratio) > 0.85
    # solid fraction near the requested packing
    assert 0.40 < (labels > 0).mean() < 0.60


def test_particles_touch_with_face_contacts(volumes):
    _, labels = volumes
    pairs = set()
    faces = 0
    for ax in range(3):
        a = np.moveaxis(labels, ax, 0)[:-1].ravel()
        b = np.moveaxis(labels, ax, 0)[1:].ravel()
        m = (a != b) & (a > 0) & (b > 0)
        faces += int(m.sum())
        pairs |= set(zip(np.minimum(a[m], b[m]).tolist(), np.maximum(a[m], b[m]).tolist()))
    n = len(np.unique(labels)) - 1
    assert len(pairs) >= n  # on average two contacts per particle or more
    assert faces >= 20 * len(pairs)  # contacts are faces, not single voxels


def test_shapes_radii_and_ids():
    p = S.make_particles((64, 64, 64), mean_radius=6, radius_spread=0.3, ellipsoid_fraction=0.5,
                         aspect_range=(1.5, 2.0), seed=1)
    ell = p[p.ellipsoid]
    assert 0.3 < p.ellipsoid.mean() < 0.7
    aspect = ell[["a", "b", "c"]].max(axis=1) / ell[["a", "b", "c"]].min(axis=1)
    assert aspect.between(1.5 - 1e-9, 2.0 + 1e-9).all()
    assert np.allclose(ell.a * ell.b * ell.c, ell.r_eq**3)
    assert np.allclose(np.linalg.norm(p[["q0", "q1", "q2", "q3"]], axis=1), 1)
    assert abs(p.r_eq.mean() / 6 - 1) < 0.1
    assert sorted(p.label) == list(range(1, len(p) + 1))
    q = S.make_particles((32, 32, 32), mean_radius=4, ids="sparse", max_id=2**40, seed=1)
    assert q.label.is_unique and q.label.max() > 2**32
    grey, labels = S.phantom_arrays((32, 32, 32), q, label_dtype="uint64", chunks=16)
    labels = labels.compute()
    assert labels.dtype == np.uint64 and set(np.unique(labels)[1:]) == set(q.label)
    with pytest.raises(GrapesInputError, match="label_dtype"):
        S.phantom_arrays((32, 32, 32), q, label_dtype="uint32")
    assert S.phantom_arrays((32, 32, 32), p.head(5), chunks=16)[1].dtype == np.uint16


def test_exact_number_of_particles():
    p = S.make_particles((48, 48, 48), mean_radius=5, n_particles=60, seed=2)
    assert len(p) == 60
    with pytest.raises(GrapesInputError, match="n_particles"):
        S.make_particles((48, 48, 48), mean_radius=5, n_particles=600)


# ------------------------------------------------------------------------------------------------
# grey model
# ------------------------------------------------------------------------------------------------


def core_means(grey, labels, truth, dist, core=0.45):
    out = {}
    for row in truth.itertuples():
        m = (labels == row.label) & (dist[row.label] < core)
        if m.sum() >= 8:
            out[row.label] = grey[m].mean()
    return pd.Series(out)


def test_damage_darkens_particle_cores():
    shape = (48, 48, 48)
    particles = S.make_particles(shape, mean_radius=8, seed=4)
    particles.loc[::3, "susceptibility"] = 0.0  # a third of the particles stay pristine
    truth = S.make_truth(particles, shape, damage=1.0)
    grey, labels = compute(*S.phantom_arrays(shape, truth, chunks=48, grey_dtype="float32", **QUIET))
    dist = normalised_distance(truth, shape)
    cm = core_means(grey, labels, truth, dist)
    dmg = truth.set_index("label").loc[cm.index, "damage"]
    undamaged = cm[dmg < 0.05]
    damaged = cm[dmg > 0.5]
    level = S.GreyModel(dtype="float32").resolved().particle_level
    assert len(damaged) >= 5 and len(undamaged) >= 5
    assert np.allclose(cm[dmg == 0], level)
    assert damaged.max() < level - 0.005 and damaged.mean() < undamaged.mean() - 0.02
    # monotone: mean core grey falls from tercile to tercile of damage
    hit = dmg[dmg > 0]
    terc = pd.qcut(hit, 3, labels=False)
    means = cm[hit.index].groupby(terc).mean()
    assert means.is_monotonic_decreasing
    # the core is darker than the outer shell of the same particle
    shell = {}
    for row in truth.itertuples():
        m = (labels == row.label) & (dist[row.label] > 0.85)
        shell[row.label] = grey[m].mean()
    shell = pd.Series(shell)[damaged.index]
    assert (damaged < shell).all()


def test_rim_on_pore_side_only():
    shape = (40, 40, 40)
    g, labels, truth = S.phantom_numpy(shape, mean_radius=7, seed=6, chunks=20, grey_dtype="float32",
                                       noise_sigma=0.0, damage=0.0, rim_contrast=0.1, rim_width=2.0)
    level = S.GreyModel(dtype="float32").resolved().particle_level
    d = ndimage.distance_transform_edt(labels > 0)
    inner = (slice(4, -4),) * 3  # scipy sees no pore beyond the border; the phantom does
    d, g, lab = d[inner], g[inner], labels[inner]
    solid = lab > 0
    expect = level + 0.1 * np.clip(1 - (d - 1) / 2.0, 0, 1)
    assert np.allclose(g[solid], expect[solid], atol=1e-6)
    # contact faces between particles without pore nearby carry no rim
    contact = solid & (d > 3)
    assert np.allclose(g[contact], level)


def test_noise_is_gaussian_with_given_sigma():
    g, labels, _ = S.phantom_numpy((48, 48, 48), mean_radius=6, seed=7, grey_dtype="float32",
                                   noise_sigma=0.05, rim_contrast=0.0, damage=0.0)
    clean, _, _ = S.phantom_numpy((48, 48, 48), mean_radius=6, seed=7, grey_dtype="float32",
                                  noise_sigma=0.0, rim_contrast=0.0, damage=0.0)
    n = (g - clean).ravel()
    assert abs(n.mean()) < 0.002 and abs(n.std() / 0.05 - 1) < 0.02
    assert abs(np.mean(np.abs(n) < 0.05) - 0.6827) < 0.01
    assert abs(np.corrcoef(n[:-1], n[1:])[0, 1]) < 0.02


def test_uint8_and_uint16_levels():
    g8, lab, _ = S.phantom_numpy((32, 32, 32), mean_radius=5, seed=8, noise_sigma=0, rim_contrast=0, damage=0)
    g16, _, _ = S.phantom_numpy((32, 32, 32), mean_radius=5, seed=8, noise_sigma=0, rim_contrast=0, damage=0,
                                grey_dtype="uint16")
    assert g8.dtype == np.uint8 and g16.dtype == np.uint16
    assert set(np.unique(g8)) == {40, 150} and set(np.unique(g16)) == {40 * 257, 150 * 257}
    assert np.array_equal(g8 == 150, lab > 0)


def test_blur_equals_gaussian_filter_of_whole_volume(truth):
    opts = dict(grey_dtype="float32", noise_sigma=0.0)
    sharp = compute(S.phantom_arrays(SHAPE, truth, chunks=16, seed=2, **opts)[0])[0]
    for sigma, chunks in ((0.8, 16), (1.5, (40, 5, 24))):  # radius 3 and 6 (> chunk side 5)
        blurred = compute(S.phantom_arrays(SHAPE, truth, chunks=chunks, seed=2, blur_sigma=sigma, **opts)[0])[0]
        ref = ndimage.gaussian_filter(sharp, sigma, mode="reflect", truncate=4.0)
        assert np.array_equal(blurred, ref)


# ------------------------------------------------------------------------------------------------
# operando states
# ------------------------------------------------------------------------------------------------


def test_operando_states():
    shape = (64, 64, 64)
    particles = S.make_particles(shape, mean_radius=7, seed=9)
    drift = [[0, 0, 0], [0, 1, 0], [1, 0, -2], [0.5, -0.25, 0.0]]
    truth = S.make_truth(particles, shape, n_states=4, damage=1.0, drift=drift)
    assert truth.groupby("state")["damage"].mean().tolist() == pytest.approx(
        (particles.susceptibility.mean() * np.array([0, 0.5, 1.0, 0.6])).tolist())
    out = [compute(*S.phantom_arrays(shape, truth, state=s, chunks=32, grey_dtype="float32", **QUIET))
           for s in range(4)]
    labs = [set(np.unique(lab)) for _, lab in out]
    assert all(lab == labs[0] for lab in labs)
    t0 = truth[truth.state == 0].set_index("label")
    whole = [lab for lab in t0.index if not truth[truth.label == lab].cut.any()]
    assert len(whole) >= 10
    c = [np.array(ndimage.center_of_mass(np.ones_like(lab), lab, whole)) for _, lab in out]
    for s in range(1, 4):
        moved = (c[s] - c[0]).mean(axis=0)
        assert np.allclose(moved, drift[s], atol=0.15)
    # per-particle core grey falls as the damage rises, rises again on healing (whole-voxel drift:
    # the voids of a lower damage are a subset of those of a higher damage)
    cm = []
    for s in range(3):
        ts = truth[truth.state == s]
        cm.append(core_means(out[s][0], out[s][1], ts, normalised_distance(ts, shape)))
    cm = pd.DataFrame(cm).T.loc[whole]
    dmg = truth.pivot(index="label", columns="state", values="damage").loc[whole]
    assert (cm[1] <= cm[0] + 1e-6).all() and (cm[2] <= cm[1] + 1e-6).all()
    assert (cm[2] < cm[0])[dmg[2] > 0.3].all()
    g_heal = out[3][0][out[3][1] > 0].mean()
    assert out[2][0][out[2][1] > 0].mean() < g_heal < out[0][0][out[0][1] > 0].mean()


def test_damage_gradient_along_axis():
    shape = (32, 64, 64)
    p = S.make_particles(shape, mean_radius=5, seed=10)
    t = S.make_truth(p, shape, damage=1.0, damage_gradient=1.0, damage_axis=2)
    ratio = t.damage / t.susceptibility
    assert np.corrcoef(ratio, t.x)[0, 1] < -0.99


# ------------------------------------------------------------------------------------------------
# 2D
# ------------------------------------------------------------------------------------------------


def test_two_dimensional_phantom():
    g, lab, t = S.phantom_numpy((96, 128), mean_radius=8, seed=1, chunks=(32, 40), damage=1.0)
    g2, lab2, _ = S.phantom_numpy((96, 128), mean_radius=8, seed=1, chunks=128, damage=1.0)
    assert g.shape == lab.shape == (96, 128)
    assert np.array_equal(g, g2) and np.array_equal(lab, lab2)
    assert set(t.label) == set(np.unique(lab)[1:].tolist())
    assert {"y", "x", "a", "b", "angle"} <= set(t.columns) and "z" not in t
    assert 0.4 < (lab > 0).mean() < 0.7
    opts = dict(mean_radius=8, seed=1, chunks=(32, 40), grey_dtype="float32", noise_sigma=0.0)
    sharp = S.phantom_numpy((96, 128), **opts)[0]
    blurred = S.phantom_numpy((96, 128), blur_sigma=1.2, **opts)[0]
    assert np.array_equal(blurred, ndimage.gaussian_filter(sharp, 1.2, mode="reflect", truncate=4.0))


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------


def test_make_phantom_round_trip(tmp_path):
    out = tmp_path / "ph"
    ph = S.make_phantom(out, shape=(32, 40, 48), n_states=2, seed=4, chunks=16, mean_radius=6,
                        spacing=(0.5, 0.325, 0.325), unit="micrometer", drift=0.7)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["grey_s0.zarr", "grey_s1.zarr", "labels_s0.zarr", "labels_s1.zarr", "phantom.json",
                     "truth.csv"]
    assert [p.name for p in ph.paths()][:2] == ["grey_s0.zarr", "labels_s0.zarr"]
    truth = pd.read_csv(ph.truth_path)
    assert len(truth) == len(ph.truth) and set(truth.state) == {0, 1}
    assert np.allclose(truth[["z", "y", "x", "damage"]], ph.truth[["z", "y", "x", "damage"]])
    params = json.loads(ph.params_path.read_text())
    assert params["seed"] == 4 and params["parameters"]["shape"] == [32, 40, 48] and "version" in params
    for s in range(2):
        grey, labels = S.phantom_arrays((32, 40, 48), ph.truth, state=s, chunks=16, seed=4)
        g, lab = compute(grey, labels)
        assert np.array_equal(open_volume(ph.grey[s]).compute(), g)
        assert np.array_equal(open_volume(ph.labels[s]).compute(), lab)
        z = zarr.open_array(str(ph.grey[s]), mode="r")
        assert z.chunks == (16, 16, 16) and z.dtype == np.uint8
        assert z.attrs["spacing"] == [0.5, 0.325, 0.325] and z.attrs["unit"] == "micrometer"
        assert z.attrs["grapes_dask"]["state"] == s and z.attrs["grapes_dask"]["seed"] == 4
    # existing outputs: refused without overwrite, replaced with it
    with pytest.raises(GrapesInputError, match="overwrite"):
        S.make_phantom(out, shape=(32, 40, 48), n_states=2, seed=4, chunks=16, mean_radius=6)
    ph2 = S.make_phantom(out, shape=(32, 40, 48), n_states=2, seed=5, chunks=16, mean_radius=6, overwrite=True)
    assert json.loads(ph2.params_path.read_text())["seed"] == 5
    one = S.make_phantom(out, shape=(24, 24, 24), mean_radius=4, chunks=12, overwrite=True)
    assert sorted(p.name for p in one.paths()) == ["grey.zarr", "labels.zarr", "phantom.json", "truth.csv"]
    assert sorted(p.name for p in out.iterdir()) == ["grey.zarr", "labels.zarr", "phantom.json", "truth.csv"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(shape=(0, 10, 10)), "shape"),
    (dict(shape=(-5, 10, 10)), "shape"),
    (dict(shape=(10, 10, 10, 10)), "shape"),
    (dict(mean_radius=-1), "mean_radius"),
    (dict(mean_radius=1.0), "mean_radius"),
    (dict(n_particles=10_000), "n_particles"),
    (dict(n_particles=0), "n_particles"),
    (dict(packing_fraction=0.9), "packing_fraction"),
    (dict(radius_spread=-0.1), "radius_spread"),
    (dict(aspect_range=(2.0, 1.0)), "aspect_range"),
    (dict(ellipsoid_fraction=1.5), "ellipsoid_fraction"),
    (dict(ids="random"), "ids"),
    (dict(n_states=0), "n_states"),
    (dict(damage=1.5), "damage"),
    (dict(n_states=2, damage=[0.1, 0.2, 0.3]), "damage"),
    (dict(drift=[[0, 0]]), "drift"),
    (dict(noise_sigma=-1), "noise_sigma"),
    (dict(blur_sigma=-1), "blur_sigma"),
    (dict(supersample=9), "supersample"),
    (dict(grey_dtype="int8"), "dtype"),
    (dict(label_dtype="float32"), "label_dtype"),
    (dict(chunks=0), "chunks"),
    (dict(spacing=(1, 1)), "spacing"),
    (dict(colour="red"), "colour"),
])
def test_bad_parameters_raise(tmp_path, kwargs, match):
    kw = dict(shape=(24, 24, 24), mean_radius=4)
    kw.update(kwargs)
    with pytest.raises(GrapesInputError, match=match):
        S.make_phantom(tmp_path / "x", **kw)
    assert not (tmp_path / "x" / "truth.csv").exists()


def test_particles_argument(tmp_path):
    big = S.make_particles((48, 48, 48), mean_radius=5)
    with pytest.raises(GrapesInputError, match="outside"):
        S.make_phantom(tmp_path / "a", shape=(24, 24, 24), particles=big)
    with pytest.raises(GrapesInputError, match="particles="):
        S.make_phantom(tmp_path / "b", shape=(48, 48, 48), particles=big, mean_radius=4)
    ph = S.make_phantom(tmp_path / "c", shape=(48, 48, 48), particles=big, chunks=24, damage=0.5)
    assert np.array_equal(ph.truth["label"], big["label"])
