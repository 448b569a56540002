"""The pass-2 planner (grapes_dask.plan): blocks, distance bounds, the memory model and budget,
and plans that fit the budget without refusing ordinary particles.

References are independent of the planner: scipy's exact EDT per label for the distance bounds,
and the resident memory a real pass-2 task reaches for the memory model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy import ndimage as ndi

from grapes_dask import plan, synthetic
from grapes_dask._errors import GrapesInputError
from grapes_dask.plan import (SAFETY_FRACTION, TaskMemory, block_edges, inscribed_bound, memory_budget, pass1_blocks,
                              plan_fill_groups, plan_pass2, plan_regions, region_bytes, split_blocks)
from grapes_dask.table import analyze, analyze_tables

GiB = 1 << 30


# ---------------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------------


def _chunks(size, c):
    return tuple([c] * (size // c) + ([size % c] if size % c else []))


@pytest.mark.parametrize("size, chunk, target", [
    (512, 128, 400), (800, 128, 400), (1100, 64, 400), (1000, 100, 256), (37, 5, 12), (7, 7, 400), (300, 1, 64),
    (130, 128, 400),
])
def test_block_edges_whole_chunks_balanced(size, chunk, target):
    c = _chunks(size, chunk)
    (e,) = block_edges((c,), target)
    cedges = np.concatenate([[0], np.cumsum(c)])
    assert e[0] == 0 and e[-1] == size and np.all(np.diff(e) > 0)
    assert np.isin(e, cedges).all()  # on chunk edges
    n = max(1, round(size / target))
    assert len(e) - 1 == min(n, len(c)) or len(e) - 1 <= n  # as many as asked, unless chunks merge cuts
    if len(e) > 2:
        # balanced: no block further than a chunk from the even share
        assert np.abs(np.diff(e) - size / (len(e) - 1)).max() <= chunk


def test_block_edges_uneven_chunks():
    (e,) = block_edges(((2, 30, 28),), 2)
    assert list(e) == [0, 2, 32, 60]
    assert [list(x) for x in block_edges(((10,) * 8, (64,)), 20)] == [[0, 20, 40, 60, 80], [0, 64]]


def test_split_blocks_threads_and_fit():
    chunks = (_chunks(512, 128),) * 3
    edges = block_edges(chunks, 400)
    assert [len(e) - 1 for e in edges] == [1, 1, 1]
    two = split_blocks(chunks, edges, min_blocks=2)
    assert np.prod([len(e) - 1 for e in two]) == 2 and list(two[0]) == [0, 256, 512]
    # fit: cut the largest block until its voxels are under a bound, on chunk edges
    fit = split_blocks(chunks, edges, fits=lambda s: np.prod(s) <= 256 * 256 * 128)
    assert max(np.diff(e).max() for e in fit[:2]) <= 256 and all(np.isin(e, np.arange(0, 513, 128)).all() for e in fit)
    assert np.prod([np.diff(e).max() for e in fit]) <= 256 * 256 * 128
    # never below a chunk: an impossible fit stops at single chunks
    tiny = split_blocks(chunks, edges, fits=lambda s: False)
    assert all(list(e) == list(range(0, 513, 128)) for e in tiny)
    # uneven chunks: blocks of whole chunks
    odd = ((100, 100, 100, 37), (300,))
    got = split_blocks(odd, block_edges(odd, 400), min_blocks=3)
    assert all(np.isin(e, np.concatenate([[0], np.cumsum(c)])).all() for e, c in zip(got, odd))
    assert np.prod([len(e) - 1 for e in got]) >= 3


# ---------------------------------------------------------------------------------------------
# inscribed-radius bounds against scipy's EDT
# ---------------------------------------------------------------------------------------------


def _random_labels(shape, seed, n_seeds=12, background=0.35):
    """Voronoi cells of random seeds (convex, many touching the border), some cut to background,
    and a few noisy cells (holes, irregular shapes)."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 1, (n_seeds, len(shape))) * np.asarray(shape)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    d = ((grid[..., None, :] - pts) ** 2).sum(-1)
    lab = d.argmin(-1).astype(np.int32) + 1
    lab[rng.random(shape) < background * rng.random()] = 0
    lab[ndi.binary_erosion(lab > 0, iterations=1) == 0] *= rng.random(shape)[ndi.binary_erosion(lab > 0) == 0] < 0.7
    return lab


def _edt_max_per_label(lab, spacing, black_border):
    out = {}
    for L in np.unique(lab[lab > 0]):
        m = lab == L
        if black_border:
            d = ndi.distance_transform_edt(np.pad(m, 1), sampling=spacing)[tuple(slice(1, -1) for _ in m.shape)]
        elif m.all():
            d = np.full(m.shape, np.inf)
        else:
            d = ndi.distance_transform_edt(m, sampling=spacing)
        out[int(L)] = float(d[m].max())
    return out


@pytest.mark.parametrize("black_border", [True, False])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 0.8, 0.8), (0.5, 1.3, 0.7), (1.0, 0.6)])
@pytest.mark.parametrize("seed", range(4))
def test_inscribed_bound_bounds_the_edt(black_border, spacing, seed):
    shape = (13, 17, 11)[: len(spacing)] if len(spacing) == 3 else (23, 19)
    lab = _random_labels(shape, seed)
    if seed == 3:  # one label filling whole slabs: its box spans the volume along some axes
        lab[:, :4] = 40
    objs = ndi.find_objects(lab)
    ids = np.array([i + 1 for i, o in enumerate(objs) if o is not None])
    bmin = np.array([[s.start for s in objs[i - 1]] for i in ids])
    bmax = np.array([[s.stop for s in objs[i - 1]] for i in ids])
    bound = inscribed_bound(bmin, bmax, spacing, shape, black_border)
    ref = _edt_max_per_label(lab, spacing, black_border)
    for L, b in zip(ids, bound):
        assert ref[int(L)] <= b * (1 + 1e-12), (L, ref[int(L)], b)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 0.8, 0.8)])
def test_inscribed_bound_is_tight_for_boxes(spacing):
    """A solid box of odd sides reaches the bound exactly (its centre is (side + 1) / 2 voxels in)."""
    lab = np.zeros((21, 25, 23), np.int32)
    lab[2:9, 3:14, 4:15] = 1  # 7 x 11 x 11
    lab[10:19, 2:23, 1:22] = 2  # 9 x 21 x 21
    ref = _edt_max_per_label(lab, spacing, True)
    bound = inscribed_bound([[2, 3, 4], [10, 2, 1]], [[9, 14, 15], [19, 23, 22]], spacing, lab.shape)
    np.testing.assert_allclose(bound, [ref[1], ref[2]], rtol=1e-12)


def test_inscribed_bound_spanning_label():
    assert inscribed_bound([[0, 0]], [[5, 7]], (1.0, 1.0), (5, 7), black_border=False)[0] == np.inf
    assert inscribed_bound([[0, 0]], [[5, 7]], (1.0, 1.0), (5, 7), black_border=True)[0] == 3.0
    assert len(inscribed_bound(np.zeros((0, 3)), np.zeros((0, 3)), (1, 1, 1), (4, 4, 4))) == 0


# ---------------------------------------------------------------------------------------------
# the memory model against the measured peak of real pass-2 tasks
# ---------------------------------------------------------------------------------------------

_MEASURE = textwrap.dedent(r"""
    import gc, json, sys
    import numpy as np
    from scipy import ndimage as ndi
    from grapes_dask import plan, table

    def status():
        d = {}
        for line in open("/proc/self/status"):
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                d[k] = int(v.split()[0]) * 1024
        return d

    class Store:  # every read allocates its block, as a read from a file does
        def __init__(self, a):
            self.a = a
        def __getitem__(self, sl):
            return np.array(self.a[sl])

    path, case = sys.argv[1], sys.argv[2]
    lab, grey = np.load(path + "/labels.npy"), np.load(path + "/grey.npy")
    if "grey32" in case:
        grey = grey.astype(np.uint32)
    spacing = (1.0, 0.8, 0.8) if "aniso" in case else (1.0, 1.0, 1.0)
    center, fill = "center" in case, "fill" in case
    ids = np.unique(lab)[1:].astype(np.uint64)
    objs = ndi.find_objects(lab)
    bmin = np.array([[s.start for s in objs[int(i) - 1]] for i in ids])
    bmax = np.array([[s.stop for s in objs[int(i) - 1]] for i in ids])
    bounds = plan.inscribed_bound(bmin, bmax, spacing, lab.shape)
    exclude = ids[np.argsort(-bounds)[:3]] if "exclude" in case else np.zeros(0, np.uint64)
    bounds[np.isin(ids, exclude)] = 0
    n = lab.shape[0]
    side = 160
    lo = (n - side) // 2
    core = tuple(slice(lo, lo + side) for _ in range(3))
    meets = np.all((bmax > lo) & (bmin < lo + side), axis=1) & ~np.isin(ids, exclude)
    keys, b = ids[meets], float(bounds[meets].max())
    h = np.zeros(3, int) if center else np.ceil(b / np.asarray(spacing) - 1e-9).astype(int)
    reg = plan._region((0, 0, 0), [lo] * 3, [lo + side] * 3, h, lab.shape, keys, b)
    border = (False,) * 6
    mem = plan.TaskMemory(lab.dtype.itemsize, grey.dtype.itemsize, 3, spacing, grey.dtype.kind, center, 1.0,
                          bool(len(exclude)))
    centre_table = (ids, np.array(ndi.center_of_mass(np.ones_like(lab), lab, ids))) if center else None
    L, G = Store(lab), Store(grey)
    if fill:
        own = np.all((bmin >= lo) & (bmin < lo + side), axis=1) & ~np.isin(ids, exclude)
        blo, bhi = np.maximum(bmin[own].min(axis=0) - 1, 0), np.minimum(bmax[own].max(axis=0) + 1, n)
        box = tuple(slice(int(a), int(c)) for a, c in zip(blo, bhi))
        model = mem.fill(bhi - blo, int(own.sum()), float(bounds[own].max()))
        def run(small=False):
            bx = tuple(slice(s.start, s.start + 12) for s in box) if small else box
            return table._fill_holes_task(L, bx, G, bx, border, spacing, 1.0, exclude, ids[own], center,
                                          tuple(s.start for s in bx), centre_table, None)
    else:
        model = mem.region(reg.outer_shape, reg.core_shape, len(keys), b)
        def run(small=False):
            if small:
                c = tuple(slice(s.start, s.start + 8) for s in core)
                o = tuple(slice(s.start - 4, s.stop + 4) for s in c)
                return table._pass2_task(L, o, G, c, (slice(4, 12),) * 3, border, spacing, 1.0, exclude, center,
                                         (0, 0, 0), centre_table, keys, b)
            return table._pass2_task(L, reg.outer, G, reg.core, reg.core_in_outer, border, spacing, 1.0, exclude,
                                     center, tuple(s.start for s in core), centre_table, keys, b)
    run(small=True)  # load the compiled kernels first
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark VmHWM to the current RSS
        f.write("5")
    before = status()["VmRSS"]
    run()
    print(json.dumps(dict(peak=status()["VmHWM"] - before, model=model, route=mem.route(b, fill=fill))))
""")


@pytest.fixture(scope="module")
def phantom224(tmp_path_factory):
    d = tmp_path_factory.mktemp("phantom224")
    grey, lab, _ = synthetic.phantom_numpy((224, 224, 224), seed=1)
    np.save(d / "grey.npy", grey)
    np.save(d / "labels.npy", lab)
    return d


def _clear_refs_works():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _clear_refs_works(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
@pytest.mark.parametrize("case, route, slack", [
    ("fused", "fused", 1.35),
    ("grey32", "integer", 1.35),
    ("aniso", "fused_aniso", 1.35),
    ("aniso-grey32", "float", 1.35),
    ("center", "center", 1.35),
    ("fill", "integer", 1.35),
    ("fill-aniso", "float", 1.45),
    ("fused-exclude", "fused", 2.3),  # numpy.isin's worst case (every label in the excluded ids' range)
])
def test_region_bytes_bounds_the_measured_peak(phantom224, case, route, slack):
    """region_bytes against the peak resident memory of one real pass-2 task (core 160^3 plus its halo,
    or a fill_holes box of ~190^3, in a 224^3 phantom), measured in a fresh process after the kernels
    are loaded: the high-water mark VmHWM, reset through /proc/self/clear_refs, minus the RSS before
    the task. RSS counts everything the task touches: numpy buffers, Numba's NRT arrays, the reads,
    the pandas partial and allocator slack. The estimate must be above it, and not far above."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(phantom224), case], capture_output=True, text=True,
                         env={**os.environ}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["route"] == route
    peak, model = got["peak"], got["model"]
    assert peak > 30 << 20  # a real measurement, well above the noise of the interpreter
    assert peak <= model <= slack * peak + plan._OVERHEAD, (case, peak / 2**20, model / 2**20)


def test_region_bytes_shapes_and_routes():
    """Monotone in the region, the halo costs mostly in the labels, 2D is one plane of 3D."""
    a = region_bytes((300, 300, 300), (256, 256, 256), 2, 1, route="fused", max_bound=20)
    b = region_bytes((400, 400, 400), (256, 256, 256), 2, 1, route="fused", max_bound=20)
    c = region_bytes((400, 400, 400), (256, 256, 256), 2, 1, route="fused", max_bound=200)  # int32 lines
    assert a < b < c
    for route in ("integer", "float", "center"):
        assert region_bytes((300, 300, 300), (256, 256, 256), 2, 1, route=route) > a
    # the anisotropic fused route: int16 y and x offsets per line element, far below the float route
    fa = region_bytes((300, 300, 300), (256, 256, 256), 2, 1, route="fused_aniso", max_bound=20)
    assert a < fa < region_bytes((300, 300, 300), (256, 256, 256), 2, 1, route="float") / 3
    assert region_bytes((40, 50), (30, 40), 4, 2) == region_bytes((1, 40, 50), (1, 30, 40), 4, 2)
    assert region_bytes((9, 9, 9), (5, 5, 5), 2, 1, route="fused", n_labels=10**5, max_bound=50) > \
        region_bytes((9, 9, 9), (5, 5, 5), 2, 1, route="fused") + 10**5 * 50 * 24
    with pytest.raises(ValueError, match="route"):
        region_bytes((9, 9, 9), (5, 5, 5), 2, 1, route="edt")


# ---------------------------------------------------------------------------------------------
# the budget
# ---------------------------------------------------------------------------------------------


class _FakeClient:
    def __init__(self, workers):
        self.workers = workers

    def scheduler_info(self, **kw):
        return {"workers": {f"tcp://w{i}": w for i, w in enumerate(self.workers)}}


def test_memory_budget_rules(monkeypatch):
    monkeypatch.setattr(plan, "_machine_memory", lambda: 24 * GiB)
    monkeypatch.setattr(plan, "_local_threads", lambda: 2)
    monkeypatch.setattr(plan, "_default_client", lambda: None)
    # no client: the machine's memory per core, times the safety fraction
    budget, threads, how = memory_budget(None)
    assert (budget, threads) == (int(12 * GiB * SAFETY_FRACTION), 2) and "machine" in how
    # given: bytes or a size string, unchanged
    assert memory_budget(3 * GiB)[0] == 3 * GiB
    assert memory_budget("4GiB")[0] == 4 * GiB and memory_budget("500 MB")[0] == 500 * 10**6
    for bad in ("lots", -1, 0, "0B", [1], float("nan"), True):
        with pytest.raises(GrapesInputError, match="memory_limit"):
            memory_budget(bad)
    # a client: the smallest limit per thread over its workers, threads summed
    c = _FakeClient([{"memory_limit": 8 * GiB, "nthreads": 2}, {"memory_limit": 6 * GiB, "nthreads": 1},
                     {"memory_limit": 16 * GiB, "nthreads": 8}])
    budget, threads, how = memory_budget(None, c)
    assert budget == int(2 * GiB * SAFETY_FRACTION) and threads == 11 and "16.00 GiB / 8" in how
    # workers without a limit: the machine's share per thread of the cluster
    budget, threads, _ = memory_budget(None, _FakeClient([{"memory_limit": 0, "nthreads": 4}]))
    assert (budget, threads) == (int(6 * GiB * SAFETY_FRACTION), 4)
    assert memory_budget("1GiB", c) == (GiB, 11, "memory_limit")


def test_budget_follows_a_real_cluster_and_is_recorded():
    distributed = pytest.importorskip("distributed")
    grey, lab, _ = synthetic.phantom_numpy((40, 40, 40), seed=3)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, memory_limit="1GiB",
                                  dashboard_address=None, silence_logs=40) as cluster, distributed.Client(cluster) as c:
        res = analyze_tables(grey, lab, client=c)
    p = res.parameters
    assert p["memory_limit"] == int(GiB / 2 * SAFETY_FRACTION)
    assert "worker memory limit" in p["memory_limit_source"] and "2 thread" in p["memory_limit_source"]
    assert res.particles.attrs["grapes_dask"]["memory_limit"] == p["memory_limit"]
    t = analyze(grey, lab, memory_limit="300MiB")
    assert t.attrs["grapes_dask"]["memory_limit"] == 300 << 20
    assert t.attrs["grapes_dask"]["memory_limit_source"] == "memory_limit"


# ---------------------------------------------------------------------------------------------
# plans: split where needed, refuse only what cannot fit
# ---------------------------------------------------------------------------------------------


def _boxes(particles, shape):
    """Voxel boxes of the phantom's particles (their ellipsoids, clipped; a superset of the label)."""
    axes, R = synthetic._geometry(particles, False)
    ext = np.sqrt(np.einsum("nij,nj->ni", R ** 2, axes ** 2))
    c = particles[["z", "y", "x"]].to_numpy(float)
    lo = np.clip(np.ceil(c - ext), 0, np.asarray(shape) - 1).astype(np.int64)
    hi = np.clip(np.floor(c + ext) + 1, lo + 1, np.asarray(shape)).astype(np.int64)
    return lo, hi


def _block_labels(edges, labels, lo, hi):
    out = {}
    for idx in np.ndindex(*[len(e) - 1 for e in edges]):
        blo = np.array([e[i] for e, i in zip(edges, idx)])
        bhi = np.array([e[i + 1] for e, i in zip(edges, idx)])
        out[idx] = labels[np.all((hi > blo) & (lo < bhi), axis=1)]
    return out


def _plan(shape, chunk, particles, budget, *, spacing=(1.0, 1.0, 1.0), fill=False, threads=2, exclude=None,
          grey_itemsize=1, label_itemsize=None):
    chunks = tuple(_chunks(n, chunk) for n in shape)
    labels = particles["label"].to_numpy().astype(np.uint64)
    lo, hi = _boxes(particles, shape)
    label_itemsize = label_itemsize or (2 if labels.max() < 2**16 else 4)
    read = 2 * chunk ** 3 * (label_itemsize + grey_itemsize)
    edges = pass1_blocks(chunks, 400, budget=budget, threads=threads, label_itemsize=label_itemsize,
                         grey_itemsize=grey_itemsize, read_bytes=read)
    mem = TaskMemory(label_itemsize, grey_itemsize, 3, spacing, "u", False, 1.0, exclude is not None, read)
    bounds, tasks = plan_pass2(edges, _block_labels(edges, labels, lo, hi), labels, lo, hi, shape, spacing=spacing,
                               budget=budget, memory=mem, exclude=exclude, fill_holes=fill, chunks=chunks)
    return edges, labels, lo, hi, bounds, tasks


def _check_regions(shape, edges, labels, lo, hi, bounds, regions, budget, spacing):
    total = 0
    for reg in regions:
        assert reg.nbytes <= budget
        clo = np.array([s.start for s in reg.core])
        chi = np.array([s.stop for s in reg.core])
        total += int(np.prod(chi - clo))
        meets = np.all((hi > clo) & (lo < chi), axis=1)
        need = np.ceil(bounds[meets].max() / np.asarray(spacing) - 1e-9) if meets.any() else np.zeros(3)
        for a, (c, o) in enumerate(zip(reg.core, reg.outer)):  # the halo covers every label met, or the volume
            assert c.start - o.start >= min(need[a], c.start) and o.stop - c.stop >= min(need[a], shape[a] - c.stop)
        assert set(labels[meets & (bounds > 0)].tolist()) <= set(reg.labels.tolist())
    assert total == int(np.prod(shape))  # the cores tile the volume (they tile each block by construction)


def _check_groups(shape, labels, lo, hi, groups, budget, keep):
    owned = np.concatenate([g.owned for g in groups]) if groups else np.zeros(0, int)
    assert sorted(owned.tolist()) == np.flatnonzero(keep).tolist()  # each particle in exactly one task
    for g in groups:
        assert g.nbytes <= budget
        blo = np.array([s.start for s in g.box])
        bhi = np.array([s.stop for s in g.box])
        assert np.all(lo[g.owned] >= blo) and np.all(hi[g.owned] <= bhi)


_SIDES = list(range(200, 1101, 100))
_PARTICLES = {}


def _particles(n):
    if n not in _PARTICLES:
        _PARTICLES[n] = synthetic.make_particles((n, n, n), seed=n)
    return _PARTICLES[n]


@pytest.mark.parametrize("budget", [int(12 * GiB * SAFETY_FRACTION), 2 * GiB], ids=["24GiB-2cores", "2GiB"])
@pytest.mark.parametrize("side", _SIDES)
def test_sweep_default_options_never_refuse(side, budget):
    """Volumes of 200^3 to 1100^3 voxels of the package's phantoms (packed particles, mean radius 18,
    up to twice that, ellipsoids up to aspect 1.8), in several chunkings, with the default budget of a
    2-core 24 GiB machine and with 2 GiB: the halo route, the fill_holes route and anisotropic spacing
    plan without refusal, every task within the budget, the cores tiling the volume, each particle owned
    once. Only the particle boxes are made, not the volumes."""
    shape = (side,) * 3
    particles = _particles(side)
    for chunk in (64, 128, 200):
        for spacing in ((1.0, 1.0, 1.0), (1.0, 0.8, 0.8)):
            edges, labels, lo, hi, bounds, regions = _plan(shape, chunk, particles, budget, spacing=spacing)
            _check_regions(shape, edges, labels, lo, hi, bounds, regions, budget, spacing)
            assert len(regions) < 2 * (side / 64) ** 3 + 16  # a handful of tasks per 256^3, not per label
        *_, groups = _plan(shape, chunk, particles, budget, fill=True)
        _check_groups(shape, labels, lo, hi, groups, budget, np.ones(len(labels), bool))
        assert len(groups) < 2 * (side / 64) ** 3 + 16


def test_budget_splits_only_the_regions_over_it():
    """One large particle among small ones: only the blocks near it are cut, and its regions get
    smaller; the far blocks stay whole."""
    shape = (256, 256, 256)
    chunks = tuple(_chunks(n, 64) for n in shape)
    # small particles on a lattice, and one big box of side 110 (halo 56) inside the first block
    g = np.arange(8, 256, 24)
    lo = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    hi = lo + 12
    big = len(lo)
    lo = np.vstack([lo, [[10, 10, 10]]])
    hi = np.vstack([hi, [[120, 120, 120]]])
    labels = np.arange(1, len(lo) + 1, dtype=np.uint64)
    edges = block_edges(chunks, 128)
    bl = _block_labels(edges, labels, lo, hi)
    bounds = inscribed_bound(lo, hi, (1, 1, 1), shape)
    mem = TaskMemory(2, 1, 3, (1.0, 1.0, 1.0))
    whole = plan_regions(edges, bl, labels, bounds, (1, 1, 1), shape, bbox_min=lo, bbox_max=hi, budget=10 * GiB,
                         memory=mem, chunks=chunks)
    assert len(whole) == 8
    need = sorted(r.nbytes for r in whole)
    budget = (need[-1] + need[0]) // 2  # below the big particle's regions, above the far block's
    regs = plan_regions(edges, bl, labels, bounds, (1, 1, 1), shape, bbox_min=lo, bbox_max=hi, budget=budget,
                        memory=mem, chunks=chunks)
    assert len(regs) > 8 and all(r.nbytes <= budget for r in regs)
    for r in regs:  # only the block of the big particle was cut
        assert (r.core_shape == (128, 128, 128)) == (r.index != (0, 0, 0))
    assert sum(r.index == (0, 0, 0) for r in regs) > 1
    # a budget below the big particle's smallest region names it, with both fixes
    h = int(np.ceil(bounds[big]))
    small = mem.region((16 + 2 * h,) * 3, (16,) * 3, 1, float(bounds[big])) - 1
    with pytest.raises(GrapesInputError, match=rf"\[{big + 1}\].*exclude_labels=\[{big + 1}\].*memory_limit") as e:
        plan_regions(edges, bl, labels, bounds, (1, 1, 1), shape, bbox_min=lo, bbox_max=hi, budget=small, memory=mem,
                     chunks=chunks)
    assert f"--exclude-labels {big + 1}" in e.value.render("cli") and "--memory-limit" in e.value.render("cli")
    # a budget too small for anything says so, without blaming a particle
    with pytest.raises(GrapesInputError, match="too small even for a region") as e:
        plan_regions(edges, {}, labels, bounds, (1, 1, 1), shape, bbox_min=lo, bbox_max=hi, budget=1000, memory=mem)
    assert "exclude_labels" not in str(e.value)


def test_fill_groups_split_down_to_one_particle():
    shape = (300, 300, 300)
    rng = np.random.default_rng(0)
    lo = rng.integers(0, 260, (400, 3))
    hi = lo + rng.integers(5, 40, (400, 3))
    lo[7], hi[7] = [20, 20, 20], [220, 220, 220]  # one large particle
    keep = np.ones(400, bool)
    keep[11] = False
    labels = np.arange(1000, 1400, dtype=np.uint64)
    edges = block_edges((_chunks(300, 100),) * 3, 300)
    mem = TaskMemory(2, 1, 3, (1.0, 1.0, 1.0))
    one = plan_fill_groups(edges, lo, hi, keep, shape, budget=100 * GiB, memory=mem, labels=labels)
    assert len(one) == 1
    budget = mem.fill((202, 202, 202), 1) + 1000  # the large particle's box, padded by one voxel
    groups = plan_fill_groups(edges, lo, hi, keep, shape, budget=budget, memory=mem, labels=labels)
    _check_groups(shape, labels, lo, hi, groups, budget, keep)
    assert len(groups) > 1
    # labels sharing one low corner are split by position
    lo2, hi2 = np.zeros((6, 3), int), np.full((6, 3), 100)
    g2 = plan_fill_groups([np.array([0, 300])] * 3, lo2, hi2, np.ones(6, bool), shape, budget=mem.fill((101,) * 3, 2),
                          memory=mem, labels=labels[:6])
    assert max(len(g.owned) for g in g2) == 2 and sum(len(g.owned) for g in g2) == 6
    # a particle whose own box does not fit is named, after the labels already excluded
    with pytest.raises(GrapesInputError, match=r"particle 1007 .*exclude_labels=\[1011, 1007\]") as e:
        plan_fill_groups(edges, lo, hi, keep, shape, budget=budget - 1001, memory=mem, labels=labels)
    assert "--exclude-labels 1011,1007" in e.value.render("cli")


# ---------------------------------------------------------------------------------------------
# end to end: split regions give the same table
# ---------------------------------------------------------------------------------------------


def _same(a, b):
    assert list(a.columns) == list(b.columns)
    for c in a.columns:
        if a[c].dtype == object:
            assert all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a[c], b[c])), c
        else:
            np.testing.assert_array_equal(a[c].to_numpy(), b[c].to_numpy(), err_msg=c)


@pytest.mark.parametrize("kw, split", [
    ({}, False), (dict(spacing=(1.0, 0.8, 0.8)), True), (dict(grey="uint32"), True), (dict(fill_holes=True), True),
    (dict(fill_holes=True, spacing=(1.0, 0.8, 0.8)), True), (dict(start_at="center"), True),
    (dict(exclude_labels=[5, 9]), True), (dict(black_border=False, spacing=(0.9, 1.0, 1.1)), True),
])
def test_small_budget_splits_below_the_chunk_and_tables_stay_exact(monkeypatch, kw, split):
    """A budget that holds one 80^3 chunk in pass 1 but forces pass-2 regions (and fill_holes groups)
    smaller than the chunk: the same table, bit for bit, as one region for the whole volume."""
    import grapes_dask.table as table

    kw = dict(kw)
    grey, lab, _ = synthetic.phantom_numpy((80, 80, 80), seed=2, mean_radius=6.0)
    grey = grey.astype(kw.pop("grey", "uint8"))
    ref = analyze_tables(grey, lab, chunks=80, memory_limit="8GiB", **kw)
    tasks = []
    real = table.plan_pass2

    def spy(*a, **k):
        out = real(*a, **k)
        tasks.extend(out[1])
        return out

    monkeypatch.setattr(table, "plan_pass2", spy)
    budget = plan.pass1_bytes((80, 80, 80), lab.dtype.itemsize, grey.dtype.itemsize) + 100_000
    small = analyze_tables(grey, lab, chunks=80, memory_limit=budget, **kw)
    assert small.parameters["memory_limit"] == budget
    _same(ref.particles, small.particles)
    assert all(t.nbytes <= budget for t in tasks)
    if split:
        assert len(tasks) > 1
        if not kw.get("fill_holes"):
            assert max(np.prod(t.core_shape) for t in tasks) < 80 ** 3


def test_budget_too_small_is_a_clear_error():
    """No raw numpy error for a region without labels: the message says the budget is too small."""
    grey = np.zeros((64, 64, 64), np.uint8)
    lab = np.zeros((64, 64, 64), np.uint16)
    lab[60:, 60:, 60:] = 3
    with pytest.raises(GrapesInputError, match=r"pass 1.*chunks=32.*memory_limit"):
        analyze(grey, lab, chunks=64, memory_limit=plan._OVERHEAD // 2)
    with pytest.raises(GrapesInputError, match="too small even for a region"):
        plan_regions([np.array([0, 64])] * 3, {}, np.zeros(0, np.uint64), np.zeros(0), (1, 1, 1), (64, 64, 64),
                     bbox_min=np.zeros((0, 3)), bbox_max=np.zeros((0, 3)), budget=1000, memory=TaskMemory(2, 1, 3, (1,) * 3))
