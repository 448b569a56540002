"""End-to-end tests of the particle table (:mod:`grapes_dask.table`).

Every number of ``analyze`` / ``analyze_tables`` / ``particle_table`` is compared with a slow,
obvious in-memory reference written here from DESIGN.md ("Reference semantics"), independent of
the package's kernels and helpers:

- radial layers: per particle, scipy ``distance_transform_edt`` of its mask (zero-padded by one
  voxel when ``black_border=True``) with ``sampling=spacing`` (isotropic spacing ``s``: ``s``
  times the EDT in voxels, see :func:`_ref_distance`), layer ``max(1, rint(d / w))``;
  ``start_at="center"``: ``1 + rint(|x - centroid|_spacing / w)`` (centroid in voxel indices);
  per-layer count / mean / std (ddof 0) with numpy;
- shape and intensity: scikit-image ``regionprops_table`` with ``spacing``;
- surface area: ``marching_cubes`` + ``mesh_surface_area`` of the 1-padded mask (3D),
  ``find_contours`` perimeter of the 1-padded mask (2D);
- contacts, ``n_neighbours``, ``touches_border``, ROI, normalised profiles: numpy.

Chunkings are random (hypothesis), including chunks smaller than the particles and chunks of
1-3 voxels along one axis; integer grey must give bitwise identical tables across chunkings,
region sizes and schedulers.
"""

from __future__ import annotations

import functools

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi
from skimage.measure import find_contours, marching_cubes, mesh_surface_area, regionprops_table

from grapes_dask import io, synthetic
from grapes_dask._errors import GrapesInputError
from grapes_dask.plan import region_bytes
from grapes_dask.table import PROFILE_COLUMNS, analyze, analyze_tables, particle_table

SPACING3 = (1.0, 0.7, 1.3)  # finest axis 0.7: layers are counted in voxels of y
SPACING2 = (0.8, 1.1)
LIST_INT = ("radial_layers", "radial_layers_count")


# ---------------------------------------------------------------------------------------------
# phantoms
# ---------------------------------------------------------------------------------------------


def _far_label(labels, corner):
    """A label whose bounding box is far from `corner` (all of its voxels at >= 12 voxels)."""
    ids = np.unique(labels[labels > 0])
    idx = np.indices(labels.shape).reshape(labels.ndim, -1).T
    flat = labels.ravel()
    for lid in ids:
        pts = idx[flat == lid]
        if np.min(np.abs(pts - np.asarray(corner)).max(axis=1)) >= 12:
            return lid
    raise AssertionError("no label far enough from the corner")


@functools.lru_cache(maxsize=None)
def phantom3(grey_dtype="uint16"):
    """Packed 3D phantom, sparse uint32 ids (65535, 65536 and ids ~1e9), border-cut particles,
    one label in two separate blobs (the second one in a corner, cut by the border)."""
    grey, labels, _ = synthetic.phantom_numpy((26, 30, 28), seed=3, mean_radius=5.0, ids="sparse",
                                              label_dtype="uint32", grey_dtype=grey_dtype)
    labels = labels.copy()
    ids = np.unique(labels[labels > 0])
    labels[labels == ids[0]] = 65535
    labels[labels == ids[1]] = 65536
    split = _far_label(labels, (0, 0, 0))
    labels[0:3, 0:2, 0:4] = split
    assert ndi.label(labels == split)[1] >= 2
    grey.setflags(write=False)
    labels.setflags(write=False)
    return grey, labels


@functools.lru_cache(maxsize=None)
def phantom3_big_ids():
    """The 3D phantom with uint64 ids around 2**40 (both sides of it)."""
    grey, labels = phantom3()
    ids = np.unique(labels[labels > 0])
    new = (2**40 - len(ids) // 2 + np.arange(len(ids))).astype(np.uint64)
    out = np.zeros(labels.shape, np.uint64)
    pos = np.searchsorted(ids, labels[labels > 0])
    out[labels > 0] = new[pos]
    out.setflags(write=False)
    return grey, out


@functools.lru_cache(maxsize=None)
def phantom2():
    """Packed 2D phantom, float32 grey, uint16 ids, one label in two blobs."""
    grey, labels, _ = synthetic.phantom_numpy((44, 50), seed=5, mean_radius=5.0, grey_dtype="float32")
    labels = labels.copy()
    split = _far_label(labels, (0, 0))
    labels[0:2, 0:3] = split
    assert ndi.label(labels == split)[1] >= 2
    grey.setflags(write=False)
    labels.setflags(write=False)
    return grey, labels


# ---------------------------------------------------------------------------------------------
# references (scipy / scikit-image / numpy on the whole volume; no package code)
# ---------------------------------------------------------------------------------------------


def _ref_distance(mask, spacing, black_border, isotropic_exact=True):
    """EDT of every voxel of `mask` to the nearest voxel not in it, in spacing units.

    Anisotropic spacing: scipy with ``sampling=spacing``. Isotropic spacing ``s``: ``s`` times
    scipy's EDT in voxels, i.e. ``s * sqrt(k)`` with the integer squared distance ``k`` exact,
    a value of the distance alone. scipy's ``sampling=`` computes ``sqrt(sum((s n_i)**2))``
    from the nearest feature it happens to pick, so two voxels at the same distance can get
    different floats: s = 1.3, offsets (5, 0, 0) and (3, 0, 4) give 6.5 and
    6.500000000000001, layers 6 and 7 at width 1 (half to even). DESIGN defines the layer by
    the distance, so the feature-independent value is the reference
    (``isotropic_exact=False`` gives scipy's ``sampling=`` value, to show the difference).
    """
    inner = (slice(1, -1),) * mask.ndim if black_border else ()
    padded = np.pad(mask, 1) if black_border else mask
    if isotropic_exact and len(set(spacing)) == 1:
        return spacing[0] * ndi.distance_transform_edt(padded)[inner]
    return ndi.distance_transform_edt(padded, sampling=spacing)[inner]


def _ref_perimeter_or_area(mask, spacing):
    padded = np.pad(mask, 1).astype(float)
    if mask.ndim == 3:
        verts, faces, _, _ = marching_cubes(padded, 0.5, spacing=spacing)
        # float32 vertices (unit spacing) are exact midpoints; sum the areas in float64
        return mesh_surface_area(verts.astype(np.float64), faces)
    total = 0.0
    for c in find_contours(padded, 0.5):
        total += np.sqrt((np.diff(c, axis=0) ** 2 * np.asarray(spacing) ** 2).sum(axis=1)).sum()
    return total


def ref_contacts(labels):
    """label_a < label_b, n_faces over 6-connected (4 in 2D) faces, by numpy."""
    found = []
    for a in range(labels.ndim):
        lo = np.moveaxis(labels, a, 0)[:-1].ravel()
        hi = np.moveaxis(labels, a, 0)[1:].ravel()
        m = (lo != 0) & (hi != 0) & (lo != hi)
        found.append(np.stack([np.minimum(lo[m], hi[m]), np.maximum(lo[m], hi[m])], axis=1))
    pairs = np.concatenate(found).astype(np.uint64)
    if len(pairs) == 0:
        return pd.DataFrame({"label_a": np.zeros(0, np.uint64), "label_b": np.zeros(0, np.uint64),
                             "n_faces": np.zeros(0, np.int64)})
    uniq, counts = np.unique(pairs, axis=0, return_counts=True)
    return pd.DataFrame({"label_a": uniq[:, 0], "label_b": uniq[:, 1], "n_faces": counts.astype(np.int64)})


def _normed(g, how, start_at="edge", roi_mean=np.nan):
    if how == "roi_mean":  # each layer against the mean grey of the ROI
        return g / roi_mean
    if how == "surface":  # divide by the surface layer: the first from the edge, the last from the centre
        with np.errstate(divide="ignore", invalid="ignore"):
            return g / (g[0] if start_at == "edge" else g[-1])
    rel = g - g[0]
    top = np.nanmax(rel) if np.isfinite(rel).any() else np.nan
    if not top > 0:
        return np.full(len(g), np.nan)
    return rel / top


def reference(grey, labels, spacing, *, layer_width=1.0, start_at="edge", black_border=True,
              normalise="radial_max", exclude_outer_layers=0, exclude_labels=()):
    """(particles, layers, contacts) by the obvious per-particle computations."""
    grey = np.asarray(grey)
    labels = np.asarray(labels)
    nd = labels.ndim
    ids = np.unique(labels[labels != 0]).astype(np.uint64)
    # regionprops on sequential labels (find_objects would allocate max_label entries)
    seq = np.searchsorted(ids, labels).astype(np.int64) + 1
    seq[labels == 0] = 0
    props = ["label", "area", "centroid", "bbox", "intensity_min", "intensity_max", "intensity_mean",
             "intensity_std", "inertia_tensor_eigvals", "axis_major_length", "axis_minor_length",
             "equivalent_diameter_area"]
    rp = pd.DataFrame(regionprops_table(seq, grey.astype(np.float64), spacing=spacing, properties=props))
    assert (rp["label"].to_numpy() == np.arange(1, len(ids) + 1)).all()
    t = pd.DataFrame({"label": ids})
    t["voxel_count"] = np.bincount(seq.ravel(), minlength=len(ids) + 1)[1:].astype(np.int64)
    size, boundary, diameter, shape = ("volume", "surface_area", "equivalent_diameter_volume", "sphericity") \
        if nd == 3 else ("area", "perimeter", "equivalent_diameter_area", "circularity")  # scikit-image's 2D names
    t[size] = rp["area"].to_numpy()
    for a in range(nd):
        t[f"centroid-{a}"] = rp[f"centroid-{a}"].to_numpy() / spacing[a]  # ours: voxel index units
    for a in range(2 * nd):
        t[f"bbox-{a}"] = rp[f"bbox-{a}"].to_numpy().astype(np.int64)
    t[diameter] = rp["equivalent_diameter_area"].to_numpy()
    for c in ("intensity_min", "intensity_max", "intensity_mean", "intensity_std"):
        t[c] = rp[c].to_numpy()
    t[boundary] = [_ref_perimeter_or_area(labels == lid, spacing) for lid in ids]
    if nd == 3:
        t[shape] = np.pi ** (1 / 3) * (6 * t[size]) ** (2 / 3) / t[boundary]
    else:
        t[shape] = 4 * np.pi * t[size] / t[boundary] ** 2
    for a in range(nd):
        t[f"inertia_tensor_eigvals-{a}"] = rp[f"inertia_tensor_eigvals-{a}"].to_numpy()
    t["axis_major_length"] = rp["axis_major_length"].to_numpy()
    t["axis_minor_length"] = rp["axis_minor_length"].to_numpy()
    faces = np.zeros(labels.shape, bool)
    for a in range(nd):
        sl = [slice(None)] * nd
        for end in (0, -1):
            sl[a] = end
            faces[tuple(sl)] = True
    t["touches_border"] = [bool(faces[labels == lid].any()) for lid in ids]
    contacts = ref_contacts(labels)
    both = np.concatenate([contacts["label_a"], contacts["label_b"]])
    t["n_neighbours"] = [int((both == lid).sum()) for lid in ids]

    # radial layers
    excl = set(int(x) for x in exclude_labels)
    prof = {c: [] for c in PROFILE_COLUMNS}
    roi = {"roi_voxels": [], "roi_mean": [], "roi_std": []}
    rows = []
    for lid in ids:
        if int(lid) in excl:
            prof["radial_layers"].append(np.zeros(0, np.int64))
            prof["radial_layers_count"].append(np.zeros(0, np.int64))
            for c in ("radial_layers_graylevel", "radial_layers_std", "radial_layers_graylevelnormed"):
                prof[c].append(np.zeros(0))
            roi["roi_voxels"].append(0)
            roi["roi_mean"].append(np.nan)
            roi["roi_std"].append(np.nan)
            continue
        mask = labels == lid
        g = grey[mask].astype(np.float64)
        # edge layers: the profile's with start_at="edge", the ROI's whatever start_at is
        # distances in voxels of the finest axis: a layer is layer_width voxels of min(spacing)
        fine = [s / min(spacing) for s in spacing]
        k_edge = np.maximum(1, np.rint(_ref_distance(mask, fine, black_border)[mask] / layer_width))
        if start_at == "center":
            idx = np.nonzero(mask)
            centre = [i.sum() / i.size for i in idx]
            d = np.sqrt(sum(((i - c) * s) ** 2 for i, c, s in zip(idx, centre, fine)))
            k = 1 + np.rint(d / layer_width)
        else:
            k = k_edge
        k = k.astype(np.int64)
        kmax = int(k.max())
        cnt = np.zeros(kmax, np.int64)
        mean = np.full(kmax, np.nan)
        std = np.full(kmax, np.nan)
        for layer in np.unique(k):
            sel = g[k == layer]
            cnt[layer - 1], mean[layer - 1], std[layer - 1] = sel.size, sel.mean(), sel.std()
            rows.append((lid, layer, sel.size, sel.mean(), sel.std()))
        prof["radial_layers"].append(np.arange(1, kmax + 1, dtype=np.int64))
        prof["radial_layers_count"].append(cnt)
        prof["radial_layers_graylevel"].append(mean)
        prof["radial_layers_std"].append(std)
        inner = g[k_edge > exclude_outer_layers]
        prof["radial_layers_graylevelnormed"].append(
            _normed(mean, normalise, start_at, inner.mean() if inner.size else np.nan))
        roi["roi_voxels"].append(inner.size)
        roi["roi_mean"].append(inner.mean() if inner.size else np.nan)
        roi["roi_std"].append(inner.std() if inner.size else np.nan)
    for c, v in prof.items():
        col = np.empty(len(ids), dtype=object)
        col[:] = v if len(v) else []
        t[c] = col
    for c, v in roi.items():
        t[c] = np.asarray(v, np.int64 if c == "roi_voxels" else np.float64)
    t["excluded"] = np.isin(ids, np.asarray(sorted(excl or []), np.uint64))
    layers = pd.DataFrame(rows, columns=["label", "layer", "count", "mean", "std"])
    layers = layers.astype({"label": np.uint64, "layer": np.int64, "count": np.int64})
    return t, layers, contacts


@functools.lru_cache(maxsize=None)
def cached_reference(which, **kwargs):
    grey, labels = PHANTOMS[which]()
    return reference(grey, labels, spacing_of(which), **kwargs)


PHANTOMS = {"3d": phantom3, "3d_u8": functools.partial(phantom3, "uint8"),
            "3d_f32": functools.partial(phantom3, "float32"), "3d_big": phantom3_big_ids, "2d": phantom2}


def spacing_of(which):
    return SPACING2 if which == "2d" else SPACING3


# ---------------------------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------------------------

# compared for equality (with their dtype); float columns within tolerances per column group
EXACT_COLUMNS = ("label", "voxel_count", "touches_border", "n_neighbours", "roi_voxels", "excluded")


def _close(name, a, b, rtol, atol):
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=rtol, atol=atol, err_msg=name,
                               equal_nan=True)


def assert_matches_reference(got: pd.DataFrame, ref: pd.DataFrame, *, float_grey=False):
    """Every column of the engine's table against the reference (same columns, same rows)."""
    assert list(got.columns) == list(ref.columns), (set(got.columns) ^ set(ref.columns))
    assert len(got) == len(ref)
    assert got["label"].dtype == np.uint64
    rt = 1e-9 if float_grey else 1e-12
    for c in ref.columns:
        g, r = got[c].to_numpy(), ref[c].to_numpy()
        if c in EXACT_COLUMNS or c.startswith("bbox-"):
            np.testing.assert_array_equal(g, r, err_msg=c)
            assert got[c].dtype == ref[c].dtype, c
        elif c in PROFILE_COLUMNS:
            for lab, gi, ri in zip(ref["label"], g, r):
                msg = f"{c} of label {lab}"
                assert gi.shape == ri.shape, (msg, gi, ri)
                if c in LIST_INT:
                    assert gi.dtype == np.int64, msg
                    np.testing.assert_array_equal(gi, ri, err_msg=msg)
                else:
                    _close(msg, gi, ri, rt, 1e-9 if float_grey else 1e-10)
        elif c.startswith("inertia") or c.startswith("axis_"):
            scale = np.nanmax(np.abs(r)) if len(r) else 1.0
            _close(c, g, r, 1e-10, 1e-12 * scale)
        elif c in ("surface_area", "sphericity", "perimeter", "circularity"):
            _close(c, g, r, 1e-12, 0)
        elif c.startswith("intensity_") or c.startswith("roi_"):
            _close(c, g, r, rt, 1e-9 if float_grey else 1e-10)
        else:  # volume, centroid, equivalent diameter
            _close(c, g, r, 1e-12, 0)


def assert_layers_match(got: pd.DataFrame, ref: pd.DataFrame, *, float_grey=False):
    assert list(got.columns) == ["label", "layer", "count", "mean", "std"]
    got = got.reset_index(drop=True)
    for c in ("label", "layer", "count"):
        np.testing.assert_array_equal(got[c].to_numpy(), ref[c].to_numpy(), err_msg=c)
        assert got[c].dtype == ref[c].dtype, c
    rt = 1e-9 if float_grey else 1e-12
    for c in ("mean", "std"):
        _close(c, got[c], ref[c], rt, 1e-10)


def assert_bitwise_equal(a: pd.DataFrame, b: pd.DataFrame):
    """Same columns, dtypes and every value to the bit (list columns element-wise)."""
    a, b = a.reset_index(drop=True), b.reset_index(drop=True)
    assert list(a.columns) == list(b.columns)
    assert (a.dtypes == b.dtypes).all()
    assert len(a) == len(b)
    for c in a.columns:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if x.dtype == object:
            for i, (xi, yi) in enumerate(zip(x, y)):
                xi, yi = np.asarray(xi), np.asarray(yi)
                assert xi.dtype == yi.dtype and xi.shape == yi.shape, (c, i)
                assert xi.tobytes() == yi.tobytes(), (c, i, xi, yi)
        else:
            assert x.tobytes() == y.tobytes(), c


def assert_close_tables(a: pd.DataFrame, b: pd.DataFrame, rtol=1e-9):
    """Float grey across chunkings: equal within `rtol` (integers exactly)."""
    assert list(a.columns) == list(b.columns)
    for c in a.columns:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if x.dtype == object:
            for xi, yi in zip(x, y):
                assert xi.shape == yi.shape, c
                _close(c, xi, yi, rtol, 1e-9)
        elif x.dtype.kind == "f":
            _close(c, x, y, rtol, 1e-9)
        else:
            np.testing.assert_array_equal(x, y, err_msg=c)


# ---------------------------------------------------------------------------------------------
# chunkings
# ---------------------------------------------------------------------------------------------


def _tiny(draw, n):
    sizes = []
    while sum(sizes) < n:
        sizes.append(draw(st.integers(1, 3)))
    sizes[-1] -= sum(sizes) - n
    return tuple(s for s in sizes if s > 0)


def _cuts(draw, n, max_cuts=3):
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=max_cuts)))
    edges = [0, *cuts, n]
    return tuple(b - a for a, b in zip(edges[:-1], edges[1:]))


@st.composite
def chunkings(draw, shape):
    """Uneven chunks per axis (random cuts), and on one axis (sometimes) chunks of 1-3 voxels;
    at most ~120 chunks (each costs tens of ms with its region: the file's time budget)."""
    tiny_axis = draw(st.sampled_from([None, *range(len(shape))]))
    max_cuts = 3 if tiny_axis is None else 1
    return tuple(_tiny(draw, n) if a == tiny_axis else _cuts(draw, n, max_cuts) for a, n in enumerate(shape))


def chunked(grey, labels, chunks):
    """Dask arrays with the given (uneven, dask-style) chunks: ``analyze`` keeps them."""
    return da.from_array(grey, chunks=chunks), da.from_array(labels, chunks=chunks)


# ---------------------------------------------------------------------------------------------
# 1. against the references, random chunkings
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def canonical(which, **kwargs):
    """The engine on one chunk per array (the baseline for chunk invariance)."""
    grey, labels = PHANTOMS[which]()
    return analyze(grey, labels, spacing=spacing_of(which), chunks=labels.shape, **kwargs)


def _random_run(data, which, region_sizes):
    """The engine on `which` with a drawn chunking, layer width, border rule and region size."""
    grey, labels = PHANTOMS[which]()
    chunks = data.draw(chunkings(labels.shape), label="chunks")
    kw = dict(layer_width=data.draw(st.sampled_from([1.0, 0.5, 1.7]), label="layer_width"),
              black_border=data.draw(st.booleans(), label="black_border"))
    region = data.draw(st.sampled_from(region_sizes), label="region_size")
    got = analyze(*chunked(grey, labels, chunks), spacing=spacing_of(which), region_size=region, **kw)
    return got, cached_reference(which, **kw)[0], canonical(which, **kw)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_3d_random_chunkings_match_reference(data):
    """uint16 grey, anisotropic spacing, sparse ids > 65535, border-cut and split labels."""
    got, ref, base = _random_run(data, "3d", [1, 6, 16, 256])
    assert_matches_reference(got, ref)
    assert_bitwise_equal(got, base)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_2d_random_chunkings_match_reference(data):
    """2D, float32 grey, anisotropic spacing, one label in two blobs."""
    got, ref, base = _random_run(data, "2d", [4, 64])
    assert "sphericity" not in got.columns and "volume" not in got.columns and "surface_area" not in got.columns
    assert {"area", "perimeter", "equivalent_diameter_area", "circularity"} <= set(got.columns)
    assert_matches_reference(got, ref, float_grey=True)
    assert_close_tables(got, base)


def test_phantoms_cover_the_cases():
    """The phantoms do hold what the tests claim: border-cut particles, a split label, ids above
    65535, touching particles, particles larger than the small chunks, exact layer ties."""
    for which in ("3d", "2d"):
        grey, labels = PHANTOMS[which]()
        ref, _, contacts = cached_reference(which)
        assert ref["touches_border"].any() and not ref["touches_border"].all()
        assert len(contacts) > 5
        assert ref["voxel_count"].max() > 100
        assert ref["radial_layers"].map(len).max() >= 3
    ref, _, _ = cached_reference("3d")
    assert {65535, 65536} <= set(ref["label"].tolist()) and ref["label"].max() > 2**20
    # an exact tie d / w = k + 1/2 (5 voxels of 0.7 along y), resolved half to even
    _, labels = phantom3()
    d = [_ref_distance(labels == lid, SPACING3, True)[labels == lid] for lid in ref["label"]]
    assert any((np.abs(x - 3.5) < 1e-12).any() for x in d)


@pytest.mark.parametrize("which", ["3d_u8", "3d_f32", "3d_big"])
def test_grey_dtypes_and_big_ids(which):
    """uint8 and float32 grey; uint64 ids near 2**40; chunks smaller than the particles."""
    grey, labels = PHANTOMS[which]()
    flt = grey.dtype.kind == "f"
    ref, ref_layers, ref_contacts = cached_reference(which)
    res = analyze_tables(grey, labels, spacing=SPACING3, chunks=(7, 3, 11), region_size=14)
    assert_matches_reference(res.particles, ref, float_grey=flt)
    assert_layers_match(res.layers, ref_layers, float_grey=flt)
    pd.testing.assert_frame_equal(res.contacts.reset_index(drop=True), ref_contacts)
    other = analyze(grey, labels, spacing=SPACING3, chunks=(5, 16, 2), region_size=256)
    if flt:
        assert_close_tables(res.particles, other)
    else:
        assert_bitwise_equal(res.particles, other)
    if which == "3d_big":
        assert labels.dtype == np.uint64 and res.particles["label"].min() < 2**40 <= res.particles["label"].max()


@pytest.mark.parametrize("kw", [
    dict(start_at="center"),
    dict(start_at="center", layer_width=1.7, normalise="surface"),
    dict(normalise="surface", exclude_outer_layers=2),
    dict(layer_width=0.5, exclude_outer_layers=3, black_border=False),
    dict(start_at="center", exclude_outer_layers=2, normalise="roi_mean"),
    dict(normalise="roi_mean"),
    dict(start_at="center", layer_width=0.6, exclude_outer_layers=3, black_border=False),
])
def test_options_match_reference(kw):
    grey, labels = phantom3()
    ref, ref_layers, _ = cached_reference("3d", **kw)
    res = analyze_tables(grey, labels, spacing=SPACING3, chunks=(9, 4, 13), region_size=12, **kw)
    assert_matches_reference(res.particles, ref)
    assert_layers_match(res.layers, ref_layers)
    assert res.parameters["start_at"] == kw.get("start_at", "edge")


def test_center_2d_float():
    grey, labels = phantom2()
    ref, _, _ = cached_reference("2d", start_at="center", layer_width=0.5)
    got = analyze(grey, labels, spacing=SPACING2, chunks=(5, 3), start_at="center", layer_width=0.5)
    assert_matches_reference(got, ref, float_grey=True)


@pytest.mark.parametrize("which, spacing, width", [
    ("3d", (1.3, 1.3, 1.3), 1.0),
    ("3d", (1.3, 1.3, 1.3), 2.6),
    ("3d", (0.5, 0.5, 0.5), 0.75),
    ("2d", (1.3, 1.3), 1.0),
])
def test_isotropic_spacing(which, spacing, width):
    """Isotropic spacing: layers are `width` voxels thick whatever the voxel size, so the layer
    counts, profiles and ROI equal those of the same arrays at spacing 1 (to the bit), while the
    physical columns scale by s, s^2, s^3."""
    grey, labels = PHANTOMS[which]()
    flt = grey.dtype.kind == "f"
    ref, ref_layers, _ = reference(grey, labels, spacing, layer_width=width)
    res = analyze_tables(*chunked(grey, labels, (5,) * labels.ndim), spacing=spacing, layer_width=width)
    assert_layers_match(res.layers, ref_layers, float_grey=flt)
    assert_matches_reference(res.particles, ref, float_grey=flt)
    unit = analyze_tables(*chunked(grey, labels, (5,) * labels.ndim), spacing=1.0, layer_width=width)
    pd.testing.assert_frame_equal(res.layers, unit.layers)
    for c in PROFILE_COLUMNS + ("roi_voxels", "roi_mean", "roi_std", "label", "voxel_count"):
        for a, b in zip(res.particles[c], unit.particles[c]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=c)
    s, nd = spacing[0], labels.ndim
    size, boundary = ("volume", "surface_area") if nd == 3 else ("area", "perimeter")
    np.testing.assert_allclose(res.particles[size], unit.particles[size] * s ** nd, rtol=1e-13)
    np.testing.assert_allclose(res.particles[boundary], unit.particles[boundary] * s ** (nd - 1), rtol=1e-12)
    np.testing.assert_allclose(res.particles["axis_major_length"], unit.particles["axis_major_length"] * s,
                               rtol=1e-12)


def test_black_border_false_edges():
    """black_border=False: the EDT of a border-cut particle runs to the nearest non-L voxel
    inside the volume, so its outer voxels on the volume face are not layer 1 there."""
    grey, labels = phantom3()
    ref_true, _, _ = cached_reference("3d")
    ref_false, _, _ = cached_reference("3d", black_border=False)
    got = analyze(grey, labels, spacing=SPACING3, chunks=(4, 30, 9), black_border=False)
    assert_matches_reference(got, ref_false)
    cut = ref_true["touches_border"].to_numpy()
    differs = np.array([not np.array_equal(a, b)
                        for a, b in zip(ref_true["radial_layers_count"], ref_false["radial_layers_count"])])
    assert differs[cut].any() and not differs[~cut].any()


def test_handmade_edge_cases():
    """Single voxels, a one-voxel-thick plate on the border, a label that is two far blobs, a
    particle whose layer 1 is empty (layer_width < spacing), touching boxes."""
    lab = np.zeros((12, 13, 14), np.uint32)
    lab[0, :, :] = 70_000  # plate on the low z face
    lab[5, 5, 5] = 3
    lab[2:6, 8:12, 2:6] = 9
    lab[6:10, 8:12, 2:6] = 10  # touches 9 by 16 faces
    lab[9:12, 0:3, 11:14] = 9  # second blob of 9, in a corner
    lab[3:8, 1:4, 8:13] = 2**31
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 2**16, lab.shape).astype(np.uint16)
    for kw in (dict(), dict(layer_width=0.5), dict(black_border=False), dict(start_at="center")):
        ref, ref_layers, ref_contacts = reference(grey, lab, (1.0, 1.0, 1.0), **kw)
        for chunks in ((1, 13, 14), (5, 2, 3), (12, 13, 14)):
            res = analyze_tables(grey, lab, chunks=chunks, region_size=4, **kw)
            assert_matches_reference(res.particles, ref)
            assert_layers_match(res.layers, ref_layers)
            pd.testing.assert_frame_equal(res.contacts.reset_index(drop=True), ref_contacts)
    row = ref.set_index("label").loc[10]
    assert row["n_neighbours"] == 1
    assert ref_contacts.query("label_a == 9 and label_b == 10")["n_faces"].item() == 16


# ---------------------------------------------------------------------------------------------
# 2. chunk invariance, schedulers, input kinds, the Dask DataFrame
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster, distributed.Client(cluster) as c:
        yield c


def test_chunk_invariance_bitwise_and_distributed(client):
    """Integer grey: bitwise identical tables over chunkings, region sizes and schedulers."""
    grey, labels = phantom3()
    base = analyze_tables(grey, labels, spacing=SPACING3, chunks=labels.shape)
    runs = [
        dict(chunks=(13, 15, 14), region_size=13),
        dict(chunks=(2, 30, 28), region_size=2),
        dict(chunks=(8, 8, 8), region_size=16),
        dict(chunks=(5, 7, 3), region_size=1000),
        dict(chunks=(11, 6, 9), region_size=6, client=client),
        dict(chunks=labels.shape, client=client),
    ]
    for kw in runs:
        res = analyze_tables(grey, labels, spacing=SPACING3, **kw)
        assert_bitwise_equal(res.particles, base.particles)
        assert_bitwise_equal(res.layers, base.layers)
        assert_bitwise_equal(res.contacts, base.contacts)
    assert_matches_reference(base.particles, cached_reference("3d")[0])


def test_float_grey_distributed_close(client):
    grey, labels = phantom3("float32")
    a = analyze(grey, labels, spacing=SPACING3, chunks=(6, 5, 7), client=client)
    b = canonical("3d_f32")
    assert_close_tables(a, b)


def test_inputs_as_zarr_paths_and_dask_arrays(tmp_path, client):
    """make_phantom Zarr stores (spacing from their metadata), io.convert of .npy, dask arrays;
    Zarr paths on distributed workers (the tasks open the stores themselves)."""
    ph = synthetic.make_phantom(tmp_path / "ph", shape=(20, 22, 18), seed=7, chunks=(7, 8, 6), mean_radius=4.0,
                                ids="sparse", grey_dtype="uint16", spacing=SPACING3)
    grey_d, labels_d = ph.open()
    grey, labels = np.asarray(grey_d), np.asarray(labels_d)
    ref, ref_layers, ref_contacts = reference(grey, labels, SPACING3)
    from_paths = analyze_tables(str(ph.grey[0]), ph.labels[0])  # spacing read from the labels store
    assert from_paths.parameters["spacing"] == list(SPACING3)
    assert_matches_reference(from_paths.particles, ref)
    assert_layers_match(from_paths.layers, ref_layers)
    pd.testing.assert_frame_equal(from_paths.contacts.reset_index(drop=True), ref_contacts)

    np.save(tmp_path / "grey.npy", grey)
    np.save(tmp_path / "labels.npy", labels)
    gz = io.convert(tmp_path / "grey.npy", tmp_path / "grey.zarr", chunks=(5, 11, 9), spacing=SPACING3)
    lz = io.convert(tmp_path / "labels.npy", tmp_path / "labels.zarr", chunks=(5, 11, 9), spacing=SPACING3)
    runs = [
        analyze(gz, lz),
        analyze(gz, lz, client=client),
        analyze(gz, labels, spacing=SPACING3),  # a path and an array
        analyze(da.from_array(grey, chunks=(4, 9, 18)), da.from_array(labels, chunks=(6, 22, 5)),
                spacing=SPACING3),  # different chunks: grey is rechunked to the labels'
        analyze(grey_d, labels_d, spacing=SPACING3),
    ]
    for got in runs:
        assert_bitwise_equal(got, from_paths.particles)


def test_big_endian_inputs(tmp_path):
    """Big-endian arrays and .npy files (read directly by the tasks) give the same table."""
    grey, labels = phantom3()
    np.save(tmp_path / "grey.npy", grey.astype(">u2"))
    np.save(tmp_path / "labels.npy", labels.astype(">u4"))
    kw = dict(spacing=SPACING3, chunks=(9, 10, 11))
    expect = analyze(grey, labels, **kw)
    assert_matches_reference(expect, cached_reference("3d")[0])
    for g, lab in ((grey.astype(">u2"), labels.astype(">u4")), (tmp_path / "grey.npy", tmp_path / "labels.npy")):
        assert_bitwise_equal(analyze(g, lab, **kw), expect)


def test_particle_table_is_a_dask_dataframe():
    grey, labels = phantom3()
    kw = dict(spacing=SPACING3, chunks=(9, 10, 7), exclude_outer_layers=1)
    ddf = particle_table(grey, labels, **kw)
    assert isinstance(ddf, dd.DataFrame)
    expect = analyze(grey, labels, **kw)
    assert list(ddf.columns) == list(expect.columns)
    assert (ddf.dtypes == expect.dtypes).all()
    got = ddf.compute(scheduler="sync")
    assert_bitwise_equal(got.reset_index(drop=True), expect)
    assert_matches_reference(got.reset_index(drop=True), cached_reference("3d", exclude_outer_layers=1)[0])


def test_analyze_tables_layers_and_contacts_3d_2d():
    for which, chunks, flt in (("3d", (6, 9, 5), False), ("2d", (7, 2), True)):
        grey, labels = PHANTOMS[which]()
        res = analyze_tables(grey, labels, spacing=spacing_of(which), chunks=chunks, layer_width=1.7)
        ref, ref_layers, ref_contacts = cached_reference(which, layer_width=1.7)
        assert_layers_match(res.layers, ref_layers, float_grey=flt)
        pd.testing.assert_frame_equal(res.contacts.reset_index(drop=True), ref_contacts)
        assert_matches_reference(res.particles, ref, float_grey=flt)
        assert res.parameters["layer_width"] == 1.7
        assert res.particles.attrs["grapes_dask"]["spacing"] == list(spacing_of(which))


# ---------------------------------------------------------------------------------------------
# 3. bad input, empty input, the memory limit
# ---------------------------------------------------------------------------------------------


def _small():
    lab = np.zeros((6, 7, 8), np.int32)
    lab[1:4, 2:5, 2:6] = 5
    lab[4:6, 0:2, 0:3] = 2
    grey = np.arange(lab.size, dtype=np.uint16).reshape(lab.shape)
    return grey, lab


def test_bad_labels_and_shapes():
    grey, lab = _small()
    with pytest.raises(GrapesInputError, match="integers"):
        analyze(grey, lab.astype(np.float32))
    neg = lab.copy()
    neg[0, 6, 7] = -1
    with pytest.raises(GrapesInputError, match="negative"):
        analyze(grey, neg, chunks=3)
    with pytest.raises(GrapesInputError, match="shape"):
        analyze(grey[:, :, :-1], lab)
    with pytest.raises(GrapesInputError, match="shape"):
        analyze(grey[0], lab)
    with pytest.raises(GrapesInputError, match="empty"):
        analyze(np.zeros((0, 4, 4), np.uint8), np.zeros((0, 4, 4), np.uint32))
    with pytest.raises(GrapesInputError, match="empty"):
        analyze(np.zeros((3, 0), np.uint8), np.zeros((3, 0), np.uint32))


def test_nan_grey():
    grey, lab = _small()
    g = grey.astype(np.float32)
    g[lab == 0] = np.nan  # NaN outside the particles is allowed
    got = analyze(g, lab, chunks=(2, 3, 4))
    ref, _, _ = reference(g, lab, (1.0, 1.0, 1.0))
    assert_matches_reference(got, ref, float_grey=True)
    g[2, 3, 3] = np.nan  # inside label 5
    with pytest.raises(GrapesInputError, match="NaN"):
        analyze(g, lab, chunks=(2, 3, 4))


@pytest.mark.parametrize("kw, match", [
    (dict(start_at="middle"), "start_at"),
    (dict(normalise="max"), "normalise"),
    (dict(layer_width=0), "layer_width"),
    (dict(layer_width=-0.5), "layer_width"),
    (dict(layer_width=float("nan")), "layer_width"),
    (dict(spacing=(1.0, 1.0)), "spacing"),
    (dict(spacing=(1.0, 1.0, 1.0, 1.0)), "spacing"),
    (dict(spacing=(1.0, 0.0, 1.0)), "spacing"),
    (dict(exclude_outer_layers=-1), "exclude_outer_layers"),
    (dict(exclude_labels=[-3]), "exclude_labels"),
    (dict(exclude_labels=[0]), "exclude_labels"),
    (dict(exclude_labels=["a"]), "exclude_labels"),
    (dict(region_size=0), "region_size"),
])
def test_bad_parameters(kw, match):
    grey, lab = _small()
    with pytest.raises(GrapesInputError, match=match):
        analyze(grey, lab, **kw)


def test_label_filling_the_volume_needs_black_border():
    lab = np.full((6, 7, 8), 5, np.uint16)
    grey = np.arange(lab.size, dtype=np.uint16).reshape(lab.shape)
    with pytest.raises(GrapesInputError, match="fills the whole volume.*black_border=True"):
        analyze(grey, lab, black_border=False)
    t = analyze(grey, lab)  # with a black border the distance is to the volume's outside
    assert list(t["radial_layers_count"][0]) == [int(v) for v in np.bincount(
        np.minimum.reduce(np.meshgrid(*[np.minimum(np.arange(n) + 1, n - np.arange(n)) for n in lab.shape],
                                      indexing="ij")).ravel())[1:]]


@pytest.mark.parametrize("shape", [(9, 10, 11), (9, 10)])
def test_no_particles_gives_typed_empty_table(shape):
    grey = np.ones(shape, np.uint16)
    labels = np.zeros(shape, np.uint32)
    res = analyze_tables(grey, labels, chunks=4)
    # the columns and dtypes of a table with particles
    lab = labels.copy()
    lab[(1,) * len(shape)] = 4
    full = analyze(grey, lab)
    t = res.particles
    assert len(t) == 0
    assert list(t.columns) == list(full.columns)
    assert t.dtypes.to_dict() == full.dtypes.to_dict()
    assert len(res.layers) == 0 and list(res.layers.columns) == ["label", "layer", "count", "mean", "std"]
    assert len(res.contacts) == 0 and res.contacts["label_a"].dtype == np.uint64
    ddf = particle_table(grey, labels, chunks=4)
    assert len(ddf.compute()) == 0 and list(ddf.columns) == list(full.columns)


def test_memory_limit_names_the_label_and_exclude_labels_works():
    """A big "binder" label (inscribed radius ~15 voxels) widens the halo of every region it
    meets; small particles (radius ~1.5) need a halo of 2. A memory limit between the two
    stops the run before pass 2, names the binder and suggests exclude_labels; excluding it
    then works: its row stays with excluded=True, pass-1 properties and empty profiles."""
    shape = (40, 40, 40)
    binder = 4_000_000_007
    labels = np.zeros(shape, np.uint64)
    labels[5:35, 5:35, 5:35] = binder
    rng = np.random.default_rng(4)
    lid = 1
    for z in range(0, 40, 4):
        for y in range(0, 40, 4):
            for x in (0, 36):  # cubes of 3 voxels along the x faces, some touching the binder
                labels[z:z + 3, y:y + 3, x + (x == 0) * 2:x + 3 + (x == 0) * 2] = lid
                lid += 1
    grey = rng.integers(0, 4096, shape).astype(np.uint16)
    kw = dict(chunks=8, region_size=8)
    # small regions need < 75 kB above a task's fixed overhead, the binder's > 290 kB (plan.region_bytes)
    limit = region_bytes((1, 1, 1), (1, 1, 1), 8, 2) + 150_000
    with pytest.raises(GrapesInputError, match=rf"(?s)\b{binder}\b.*exclude_labels=\[{binder}\]"):
        analyze(grey, labels, memory_limit=limit, **kw)
    got = analyze(grey, labels, memory_limit=limit, exclude_labels=[binder], **kw)
    ref, _, _ = reference(grey, labels, (1.0, 1.0, 1.0), exclude_labels=[binder])
    assert_matches_reference(got, ref)
    row = got.set_index("label").loc[binder]
    assert row["excluded"] and len(row["radial_layers"]) == 0 and row["roi_voxels"] == 0
    assert row["voxel_count"] == 30**3 and row["n_neighbours"] > 0  # pass-1 properties kept
    assert got["excluded"].sum() == 1
    # the limit is not hit without the binder: it is the binder that is named, not the size
    analyze(grey, np.where(labels == binder, 0, labels), memory_limit=limit, **kw)


def test_graph_grows_with_blocks_not_labels(monkeypatch):
    """Tasks are per block or region: 8 or 2,000 particles in the same volume, same graph size."""
    import dask

    import grapes_dask.table as table

    sizes = []
    real = table._compute

    def counting(*objs, **kw):
        sizes.append(len(dict(dask.delayed(list(objs)).__dask_graph__())))
        return real(*objs, **kw)

    monkeypatch.setattr(table, "_compute", counting)
    shape = (48, 48, 48)
    few = np.zeros(shape, np.uint32)
    few[4:20, 4:20, 4:20] = 1
    few[28:44, 28:44, 28:44] = 2
    many = (np.arange(np.prod(shape)) // 50 + 1).reshape(shape).astype(np.uint32)  # ~2,200 labels
    grey = np.ones(shape, np.uint8)
    for lab in (few, many):
        analyze(grey, lab, chunks=16, region_size=16)
    n_few, n_many = sizes[:2], sizes[2:]
    assert n_few == n_many, (n_few, n_many)
    assert n_few[0] > 27  # the graph was counted (at least one task per block)
    assert n_few[0] < 10 * 27  # a handful of tasks per block (27 blocks)


def _carved_phantom():
    from grapes_dask import synthetic

    grey, lab, _ = synthetic.phantom_numpy((44, 48, 40), seed=4, mean_radius=7.0)
    lab = lab.astype(np.uint32)
    for i, L in enumerate(np.unique(lab[lab > 0])[::3]):
        c = np.argwhere(lab == L).mean(axis=0).round().astype(int)
        r = 1 if i % 2 else 2  # cavities of 7-27 and 33-125 voxels
        sub = lab[tuple(slice(max(0, x - r), x + r + 1) for x in c)]
        sub[sub == L] = 0
    # a cavity open to the volume border is not a hole
    lab[0:3, 20:23, 20:23] = np.where(lab[0:3, 20:23, 20:23] > 0, 0, lab[0:3, 20:23, 20:23])
    return grey, lab


def _filled_reference(grey, lab, L, max_size=None):
    """scipy: fill the holes of L's zero-padded mask, EDT of the filled mask, layer counts/means."""
    pad = np.pad(lab == L, 1)
    cav = ndi.binary_fill_holes(pad) & ~pad
    if max_size is not None:
        comp, n = ndi.label(cav)
        sizes = np.bincount(comp.ravel())
        cav &= (sizes <= max_size)[comp]
    f = pad | cav
    k = np.maximum(1, np.rint(ndi.distance_transform_edt(f)[f])).astype(int)
    g = np.pad(grey, 1)[f].astype(float)
    counts = np.bincount(k, minlength=k.max() + 1)[1:]
    return counts, np.array([g[k == i].mean() if c else np.nan for i, c in zip(range(1, k.max() + 1), counts)])


@pytest.mark.parametrize("max_hole_size", [None, 30])
def test_fill_holes_matches_scipy_fill_and_edt(max_hole_size):
    grey, lab = _carved_phantom()
    plain = analyze(grey, lab)
    tables = [analyze(grey, lab, chunks=c, region_size=r, fill_holes=True, max_hole_size=max_hole_size)
              for c, r in (((44, 48, 40), 400), ((13, 17, 11), 20))]
    changed = 0
    for _, row in tables[0].iterrows():
        counts, means = _filled_reference(grey, lab, row["label"], max_hole_size)
        np.testing.assert_array_equal(row["radial_layers_count"], counts)
        np.testing.assert_allclose(row["radial_layers_graylevel"], means, rtol=1e-12)
        before = plain.loc[plain["label"] == row["label"], "radial_layers_count"].iloc[0]
        changed += not np.array_equal(before, counts)
    assert changed >= 5  # the cavities did change profiles
    for c in tables[0].columns:  # chunk invariance with ownership regions too
        a, b = tables[0][c], tables[1][c]
        if a.dtype == object:
            assert all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a, b)), c
        else:
            pd.testing.assert_series_equal(a, b, check_names=False)
    # pass-1 properties describe the labels as given
    pd.testing.assert_series_equal(tables[0]["voxel_count"], plain["voxel_count"])


def test_max_hole_size_must_be_positive():
    grey, lab = _small()
    with pytest.raises(GrapesInputError, match="max_hole_size"):
        analyze(grey, lab, fill_holes=True, max_hole_size=0)
