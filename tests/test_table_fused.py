"""The default pass-2 route (fused EDT + layer sums) under random chunkings, regions and halos.

``_pass2_task`` takes the fused route (:func:`grapes_dask.kernels.fused_layer_sums`) for 3D
volumes with isotropic spacing and integer grey of at most 16 bits: the route most users run.
Here hypothesis draws

- small 3D label volumes (12-30 voxels per side) with a large particle (wider than the drawn
  region, so the halo matters), a particle overlapping it (touching), particles cut by the
  volume border, a box (flat faces: many distance ties), one label in two separate blobs, a
  single-voxel particle and a few random ellipsoids; ids sequential or sparse and large
  (65535, 65536, 2**33 + 7, 2**63 + 5, 2**64 - 1) in several label dtypes;
- uint8 / uint16 grey over the full range (and int16 with negative values, same route);
- isotropic spacing 1.0, 0.7 or 1.3, layer width 1.0, 1.3, 0.7 or 0.5, both border rules;
- dask arrays with uneven per-axis chunk tuples, and ``region_size`` from 1 to 16,

and compare the layers table with an independent in-memory reference (scipy's
``distance_transform_edt`` per particle, numpy, exact integer sums; no package code). Every run
checks that the fused kernel computed every region and that the regions did have halos, so the
tests cannot silently pass through another route.
"""

from __future__ import annotations

import threading
from fractions import Fraction
from typing import NamedTuple
from unittest import mock

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

import grapes_dask.kernels
from grapes_dask import analyze_tables
from grapes_dask.plan import block_edges
from test_table import assert_bitwise_equal  # same column-by-column, bit-for-bit comparison

SPARSE_IDS = (65535, 65536, 2**33 + 7, 2**40, 2**63 + 5, 2**64 - 1, 3, 2**33 + 8, 2**32 - 1, 2**32)
# no explain phase: it reruns a failing example a hundred times (minutes here)
SETTINGS = dict(deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------
# phantoms
# ---------------------------------------------------------------------------------------------


def _ellipsoid(shape, centre, radii):
    g = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((gi - c) / r) ** 2 for gi, c, r in zip(g, centre, radii)) <= 1.0


def make_phantom(shape, seed, n_random, ids, label_dtype, big_on_face=False):
    """A label volume holding every case the fused route has to get right (see the module doc).

    Returns ``(labels, big_id)``: the labels in `label_dtype` and the id of the large particle.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    n = np.asarray(shape, float)
    lab = np.zeros(shape, np.int64)
    # the large particle, radii 30-45 % of the sides: wider than most drawn regions; in the
    # middle, or cut in half by a face (its deepest voxels on the border: with
    # black_border=False their distance is the full radius, the largest halo the plan must give)
    big_c = n / 2 + rng.uniform(-1.5, 1.5, 3)
    big_r = n * rng.uniform(0.3, 0.45, 3)
    if big_on_face:
        a = rng.integers(3)
        big_c[a] = rng.choice([0.0, n[a] - 1])
        big_r[a] = n[a] * rng.uniform(0.5, 0.8)
    lab[_ellipsoid(shape, big_c, big_r)] = 1
    # a sphere overlapping its surface (painted over it: the two touch along a curved face)
    u = rng.normal(size=3)
    u /= np.linalg.norm(u)
    lab[_ellipsoid(shape, big_c + u * big_r * 0.9, (3.5,) * 3)] = 2
    # cut by the volume border: centre on or just outside a face
    c = rng.uniform(0, n)
    axis = rng.integers(3)
    c[axis] = rng.choice([rng.uniform(-2, 1), rng.uniform(n[axis] - 2, n[axis] + 1)])
    lab[_ellipsoid(shape, c, rng.uniform(2.5, 5.0, 3))] = 3
    # a box (flat faces): many voxels at equal distances
    lo = rng.integers(0, n - 5)
    lab[tuple(slice(a, a + int(e)) for a, e in zip(lo, rng.integers(2, 8, 3)))] = 4
    nxt = 5
    for _ in range(n_random):  # painted in order: overlaps become touching particles
        lab[_ellipsoid(shape, rng.uniform(-1, n), rng.uniform(1.2, 4.5, 3))] = nxt
        nxt += 1
    # one label in two blobs in two corners, both cut by the border; not in opposite corners: a
    # box spanning every axis has no distance bound with black_border=False (the engine then
    # takes the unfused route with a whole-volume halo)
    lab[:2, :3, :2] = nxt
    lab[-2:, :2, -3:] = nxt
    nxt += 1
    # a single-voxel particle on background
    free = np.argwhere(lab == 0)
    if len(free):
        lab[tuple(free[rng.integers(len(free))])] = nxt
    present = np.unique(lab[lab > 0])
    if ids == "sparse":
        table = np.array(SPARSE_IDS + tuple(2**33 + 100 + 7 * i for i in range(len(present))), np.uint64)
        table = table[: len(present)][rng.permutation(len(present))]
    else:
        table = (1 + rng.permutation(len(present))).astype(np.uint64)
    out = np.zeros(shape, np.uint64)
    out[lab > 0] = table[np.searchsorted(present, lab[lab > 0])]
    assert present[0] == 1  # the large particle survives the painting
    return out.astype(label_dtype), int(table[0])


def make_grey(shape, dtype, mode, seed):
    rng = np.random.default_rng(seed + 1)
    info = np.iinfo(dtype)
    if mode == "extremes":  # largest sums of squares per voxel
        return rng.choice(np.array([info.min, info.max], dtype), size=shape)
    return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)


class Phantom(NamedTuple):
    """The drawn parameters of a phantom (a readable falsifying example); :meth:`build` makes it."""

    shape: tuple
    seed: int
    n_random: int
    ids: str
    label_dtype: str
    grey_dtype: str
    grey_mode: str
    big_on_face: bool

    def build(self):
        labels, big = make_phantom(self.shape, self.seed, self.n_random, self.ids, self.label_dtype,
                                   self.big_on_face)
        return make_grey(self.shape, np.dtype(self.grey_dtype), self.grey_mode, self.seed), labels, big


@st.composite
def phantoms(draw):
    ids, label_dtype = draw(st.sampled_from([("sequential", "uint8"), ("sequential", "uint16"),
                                             ("sequential", "int32"), ("sparse", "uint64")]))
    return Phantom(shape=tuple(draw(st.integers(12, 30)) for _ in range(3)), seed=draw(st.integers(0, 2**32 - 1)),
                   n_random=draw(st.integers(1, 5)), ids=ids, label_dtype=label_dtype,
                   grey_dtype=draw(st.sampled_from(["uint8", "uint16", "uint16", "int16"])),
                   grey_mode=draw(st.sampled_from(["uniform", "uniform", "extremes"])),
                   big_on_face=draw(st.booleans()))


def _axis_chunks(draw, n, label):
    """Uneven chunks along one axis: random cuts, or runs of 1-4 voxels."""
    if draw(st.booleans(), label=f"{label} tiny"):
        sizes = []
        while sum(sizes) < n:
            sizes.append(draw(st.integers(1, 4)))
        sizes[-1] -= sum(sizes) - n
        return tuple(s for s in sizes if s > 0)
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), min_size=1, max_size=4), label=f"{label} cuts"))
    edges = [0, *cuts, n]
    return tuple(b - a for a, b in zip(edges[:-1], edges[1:]))


@st.composite
def chunkings(draw, shape):
    """Per-axis uneven chunk tuples; tiny chunks on at most one axis (keeps the graph small)."""
    tiny = draw(st.sampled_from([None, 0, 1, 2]), label="tiny axis")
    out = []
    for a, n in enumerate(shape):
        if a == tiny:
            out.append(_axis_chunks(draw, n, f"axis {a}"))
        else:
            cuts = sorted(draw(st.sets(st.integers(1, n - 1), min_size=1, max_size=3), label=f"axis {a} cuts"))
            edges = [0, *cuts, n]
            out.append(tuple(b - a_ for a_, b in zip(edges[:-1], edges[1:])))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# reference: scipy EDT per particle, numpy, exact integer sums
# ---------------------------------------------------------------------------------------------


def ref_distance(mask, s, black_border):
    """Distance (spacing units, isotropic spacing `s`) of each voxel of `mask` to the nearest
    voxel not in it.

    scipy's ``distance_transform_edt`` measures the distance to the nearest zero element *of
    the array it is given*; it adds no implicit background outside the array. So:
    ``black_border=True``: pad the mask with one voxel of background (the outside counts as
    not-in-L); ``black_border=False``: the mask as it is (only voxels inside the volume that are
    not in L count). Extending the mask outward instead (``np.pad(mode='edge')``) would give the
    same distances: a copied voxel is never nearer to an inside voxel than its source.
    ``s`` times scipy's voxel distance ``sqrt(k)`` is the distance as DESIGN.md defines it for
    isotropic spacing.
    """
    if black_border:
        return s * ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
    return s * ndi.distance_transform_edt(mask)


def reference_layers(grey, labels, s, width, black_border, exclude=()):
    """Long layers table: label, layer, count, exact mean (integer sums), std (ddof 0).

    Each particle's EDT is taken on its bounding box grown by one voxel (clipped to the volume):
    the nearest voxel not in L always lies in that box (project any nearer candidate onto the
    box: the projection is outside the bounding box, so not in L, and no farther), and the box's
    sides on the volume border are the volume's.
    """
    rows = []
    ids = np.unique(labels[labels != 0])
    seq = np.where(labels == 0, 0, np.searchsorted(ids, labels) + 1)  # 1..m in id order
    for lid, box in zip(ids, ndi.find_objects(seq)):
        if int(lid) in exclude:
            continue
        box = tuple(slice(max(0, b.start - 1), min(n, b.stop + 1)) for b, n in zip(box, labels.shape))
        mask = labels[box] == lid
        # layers are `width` voxels thick whatever the isotropic voxel size `s`: the distance in voxels
        d = ref_distance(mask, 1.0, black_border)[mask]
        k = np.maximum(1, np.rint(d / width)).astype(np.int64)
        g = grey[box][mask].astype(np.int64)
        for layer in np.unique(k):
            sel = g[k == layer]
            # Python integers: exact sum, correctly rounded mean
            mean = float(Fraction(int(sel.sum()), sel.size))
            rows.append((int(lid), int(layer), sel.size, mean, sel.astype(np.float64).std()))
    out = pd.DataFrame(rows, columns=["label", "layer", "count", "mean", "std"])
    return out.astype({"label": np.uint64, "layer": np.int64, "count": np.int64})


def assert_layers_match(got, ref):
    got = got.reset_index(drop=True)
    assert list(got.columns) == ["label", "layer", "count", "mean", "std"]
    for c in ("label", "layer", "count"):
        np.testing.assert_array_equal(got[c].to_numpy(), ref[c].to_numpy(), err_msg=c)
        assert got[c].dtype == ref[c].dtype, c
    np.testing.assert_allclose(got["mean"].to_numpy(), ref["mean"].to_numpy(), rtol=1e-12, atol=0, err_msg="mean")
    np.testing.assert_allclose(got["std"].to_numpy(), ref["std"].to_numpy(), rtol=1e-12, atol=1e-9, err_msg="std")


# ---------------------------------------------------------------------------------------------
# the engine, watched: every pass-2 region must go through fused_layer_sums
# ---------------------------------------------------------------------------------------------


class FusedSpy:
    """Wraps ``grapes_dask.kernels.fused_layer_sums`` and records each region's halo."""

    def __init__(self):
        self.calls = []
        self.max_distances = []
        self._lock = threading.Lock()
        self._real = grapes_dask.kernels.fused_layer_sums

    def __call__(self, labels, grey, core, *args, **kwargs):
        halo = [(c.start, n - c.stop) for c, n in zip(core, labels.shape)]
        with self._lock:
            self.calls.append((tuple(grey.shape), halo))
            # args = (border, spacing, layer_width, keys, max_distance): the bound in voxels
            self.max_distances.append(args[4] / args[1])
        return self._real(labels, grey, core, *args, **kwargs)

    def max_halo(self):
        return max((max(max(h) for h in halo) for _, halo in self.calls), default=0)


def run_fused(grey, labels, *, scheduler="threads", check_halo=True, plan_hook=None, **kw):
    """``analyze_tables`` with the spies in place; checks that the fused kernel computed every
    region the planner made (:func:`grapes_dask.plan.plan_pass2`) and that, with more than one
    region, some region had a halo. `plan_hook` may rewrite the planned regions."""
    import grapes_dask.table as table

    spy = FusedSpy()
    planned = []
    real_plan = table.plan_pass2

    def plan_spy(*args, **kwargs):
        bounds, tasks = real_plan(*args, **kwargs)
        if plan_hook is not None:
            tasks = plan_hook(tasks)
        planned[:] = tasks
        return bounds, tasks

    with mock.patch.object(grapes_dask.kernels, "fused_layer_sums", spy), \
            mock.patch.object(table, "plan_pass2", plan_spy), dask.config.set(scheduler=scheduler):
        res = analyze_tables(grey, labels, **kw)
    assert len(planned) >= 1 and len(spy.calls) == len(planned), (len(spy.calls), len(planned))
    assert sum(int(np.prod(sh)) for sh, _ in spy.calls) == int(np.prod(np.shape(labels)))  # cores tile the volume
    if check_halo and len(planned) > 1:
        assert spy.max_halo() > 0
    return res, spy


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


@settings(max_examples=40, **SETTINGS)
@given(ph=phantoms(), data=st.data())
def test_fused_random_chunkings_match_reference(ph, data):
    """Drawn phantom, grey dtype, isotropic spacing, layer width, border rule, uneven dask chunks
    and region size 1-16: the layers table equals scipy's per-particle EDT reference (counts and
    layers exactly, means and stds to 1e-12), and the fused kernel computed every region."""
    grey, labels, big = ph.build()
    s = data.draw(st.sampled_from([1.0, 0.7, 1.3]), label="spacing")
    width = data.draw(st.sampled_from([1.0, 1.3, 0.7, 0.5]), label="layer_width")
    bb = data.draw(st.booleans(), label="black_border")
    chunks = data.draw(chunkings(labels.shape), label="chunks")
    region = data.draw(st.integers(1, 16), label="region_size")
    res, spy = run_fused(da.from_array(grey, chunks=chunks), da.from_array(labels, chunks=chunks),
                         spacing=s, layer_width=width,
                         black_border=bb, region_size=region)
    ref = reference_layers(grey, labels, s, width, bb)
    assert_layers_match(res.layers, ref)
    # the per-particle profile columns are the same numbers
    p = res.particles.set_index("label")
    for lid, grp in ref.groupby("label"):
        cnt = np.zeros(int(grp["layer"].max()), np.int64)
        cnt[grp["layer"].to_numpy() - 1] = grp["count"].to_numpy()
        np.testing.assert_array_equal(p.loc[lid, "radial_layers_count"], cnt)
    # how often the large particle spans several regions (its inner voxels then need the halo)
    where = np.argwhere(labels == labels.dtype.type(big))
    crossed = any(((e > lo) & (e <= hi)).any()
                  for e, lo, hi in zip(block_edges(chunks, region), where.min(axis=0), where.max(axis=0)))
    event(f"large particle spans several regions: {crossed}")


@settings(max_examples=10, **SETTINGS)
@given(ph=phantoms(), data=st.data())
def test_fused_bitwise_identical_across_chunkings_and_region_sizes(ph, data):
    """Same volume, two drawn chunkings and region sizes (a dask array with uneven chunks on the
    threaded scheduler; a numpy array read directly by the tasks with regular ``chunks=`` on the
    synchronous one): particle, layers and contacts tables identical to the bit."""
    grey, labels, _ = ph.build()
    s = data.draw(st.sampled_from([1.0, 0.7]), label="spacing")
    kw = dict(spacing=s, layer_width=data.draw(st.sampled_from([1.0, 1.3]), label="layer_width"),
              black_border=data.draw(st.booleans(), label="black_border"))
    chunks = data.draw(chunkings(labels.shape), label="chunks")
    r1 = data.draw(st.integers(1, 16), label="region_size 1")
    a, _ = run_fused(da.from_array(grey, chunks=chunks), da.from_array(labels, chunks=chunks),
                     region_size=r1, **kw)
    regular = tuple(data.draw(st.integers(6, 16), label=f"regular chunk {i}") for i in range(3))
    r2 = data.draw(st.integers(1, 16), label="region_size 2")
    dchunks = da.from_array(labels, chunks=regular).chunks
    b, _ = run_fused(grey, labels, chunks=regular, region_size=r2,
                     scheduler="sync", **kw)
    assert_bitwise_equal(a.particles, b.particles)
    assert_bitwise_equal(a.layers, b.layers)
    assert_bitwise_equal(a.contacts, b.contacts)


def test_fused_exclude_labels_and_border_cases():
    """Fixed cases through the fused route: the large particle excluded (its rows vanish; the
    other particles' distances do not change, a voxel not in L stays not in L), uint16 grey at
    65535 everywhere (largest sums of squares), region_size 1 with one-voxel chunks on one axis."""
    labels, big = make_phantom((20, 17, 23), 11, 4, "sparse", "uint64")
    grey = np.full(labels.shape, 65535, np.uint16)
    chunks = ((1,) * 20, (8, 9), (3, 20))
    for bb in (True, False):
        res, spy = run_fused(da.from_array(grey, chunks=chunks), da.from_array(labels, chunks=chunks),
                             spacing=0.7, layer_width=1.0,
                             black_border=bb, region_size=1, exclude_labels=[big])
        assert spy.max_halo() >= 3
        assert_layers_match(res.layers, reference_layers(grey, labels, 0.7, 1.0, bb, exclude={big}))
        assert big not in set(res.layers["label"].tolist())


def test_reference_is_sensitive_to_the_halo():
    """The comparison would catch a missing halo: with the plan's halos removed the fused route
    gives other layers for the large particle (or refuses), so the tests above do test the halo."""
    from dataclasses import replace

    labels, _ = make_phantom((24, 22, 26), 5, 3, "sequential", "uint16")
    grey = make_grey(labels.shape, np.dtype(np.uint16), "uniform", 5)
    chunks = ((6, 6, 6, 6), (5, 6, 11), (7, 7, 12))

    def no_halo(tasks):
        return [replace(t, outer=t.core,
                        border=tuple(x for c, n in zip(t.core, labels.shape) for x in (c.start == 0, c.stop == n)))
                for t in tasks]

    ref = reference_layers(grey, labels, 1.0, 1.0, True)
    try:
        res, spy = run_fused(da.from_array(grey, chunks=chunks), da.from_array(labels, chunks=chunks),
                             plan_hook=no_halo, check_halo=False, spacing=1.0, region_size=6)
    except RuntimeError as e:  # the kernel's own consistency check: layers beyond the bound
        assert "layer bound" in str(e)
        return
    assert spy.max_halo() == 0
    with pytest.raises(AssertionError):
        assert_layers_match(res.layers, ref)


def test_fused_int32_packed_lines():
    """A distance bound of >= 127 voxels switches the fused kernel's last-pass lines from uint16 to
    int32 packing (the random phantoms never reach it): a 128^3 volume, ``black_border=False``, a
    label in two corner blobs whose box spans [0, 127) on every axis (bound 127 voxels), a
    ball of radius 22 and smaller particles, uint16 grey, uneven chunks, several regions."""
    shape = (128, 128, 128)
    rng = np.random.default_rng(7)
    lab = np.zeros(shape, np.uint32)
    lab[_ellipsoid(shape, (60, 70, 64), (22, 22, 22))] = 2**31 + 1
    for i in range(12):
        lab[_ellipsoid(shape, rng.uniform(0, 128, 3), rng.uniform(2, 8, 3))] = 10 + i
    lab[:3, :4, :3] = 5
    lab[124:127, 122:127, 125:127] = 5
    grey = make_grey(shape, np.dtype(np.uint16), "uniform", 7)
    chunks = ((40, 50, 38), (64, 64), (30, 60, 38))
    res, spy = run_fused(da.from_array(grey, chunks=chunks), da.from_array(lab, chunks=chunks),
                         spacing=1.0, layer_width=1.0,
                         black_border=False, region_size=64)
    assert max(np.ceil(md) + 1 for md in spy.max_distances) >= 128  # (bound + 1)^2 >= 2**14 - 1: int32 lines
    assert_layers_match(res.layers, reference_layers(grey, lab, 1.0, 1.0, False))
