"""Phantoms, chunkings and independent reference computations for the kernel tests.

References use scikit-image / scipy / numpy on the whole volume only, never the kernels'
own helpers.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.measure import find_contours, marching_cubes, mesh_surface_area, regionprops

SPACING3 = (1.0, 0.7, 1.3)
SPACING2 = (0.7, 1.3)


def _ellipsoid(shape, center, radii):
    grids = np.indices(shape, dtype=np.float64)
    r = sum(((g - c) / a) ** 2 for g, c, a in zip(grids, center, radii))
    return r <= 1.0


def phantom3d(shape=(36, 34, 32), seed=0, big_ids=False):
    """Overlapping/touching spheres and ellipsoids, border-cut particles, a split label.

    Returns ``labels`` (uint32, or uint64 with ids around 2**40 when ``big_ids``) and
    ``uint16`` grey.
    """
    rng = np.random.default_rng(seed)
    base = 2**40 if big_ids else 70_000
    lab = np.zeros(shape, dtype=np.uint64 if big_ids else np.uint32)
    ids = [base + 17, 3, base + 123_456, 65_536, 12, base + 5, 99_999, 40]
    specs = [
        ((8, 9, 10), (6, 5, 7)),  # ellipsoid
        ((12, 14, 12), (5, 5, 5)),  # overlaps the first
        ((-1, 20, 16), (6, 7, 5)),  # cut by the low z border
        ((30, 30, 28), (7, 6, 8)),  # cut by the high borders
        ((20, 5, 26), (4, 3, 6)),
        ((26, 18, 6), (5, 6, 4)),
        ((18, 26, 20), (3, 4, 3)),
        ((4, 30, 2), (3, 3, 3)),  # corner-ish
    ]
    for lid, (c, r) in zip(ids, specs):
        jitter = rng.uniform(-0.4, 0.4, 3)
        lab[_ellipsoid(shape, np.add(c, jitter), r)] = lid
    # touching pair: two boxes sharing a face
    lab[28:33, 2:7, 10:14] = ids[1]
    lab[28:33, 7:11, 10:14] = base + 777
    # a label in two separate blobs
    lab[2:5, 2:5, 24:28] = ids[6]
    # a single voxel and a thin rod
    lab[15, 1, 1] = 7
    lab[10, 22:30, 30] = 8
    lab[9, 24:28, 29:32] = 12  # touches the rod from below (z faces)
    zz, yy, xx = np.indices(shape)
    grey = 20_000 + 300 * zz - 200 * yy + 100 * xx + rng.integers(0, 20_000, shape)
    return lab, grey.astype(np.uint16)


def phantom2d(shape=(48, 41), seed=1):
    """Disks and ellipses (uint32 labels, some > 65535), cut by borders, one split label."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, dtype=np.uint32)
    specs = [((10, 10), (7, 5)), ((14, 18), (5, 6)), ((-2, 30), (6, 8)), ((44, 38), (8, 7)),
             ((30, 12), (6, 9)), ((34, 28), (4, 4))]
    ids = [70_001, 4, 123_456, 9, 65_537, 300]
    for lid, (c, r) in zip(ids, specs):
        lab[_ellipsoid(shape, np.add(c, rng.uniform(-0.4, 0.4, 2)), r)] = lid
    lab[20:24, 30:33] = 9  # second blob of label 9
    lab[40, 2] = 11
    grey = rng.integers(0, 2**16, shape).astype(np.uint16)
    return lab, grey


# ---------------------------------------------------------------------------------------
# chunking
# ---------------------------------------------------------------------------------------


def chunk_grid(shape, cuts):
    """Chunk boxes ``(origin, core_shape)`` from sorted interior cut points per axis."""
    edges = [[0, *sorted(set(c)), n] for c, n in zip(cuts, shape)]
    per_axis = [list(zip(e[:-1], e[1:])) for e in edges]
    for box in itertools.product(*per_axis):
        yield tuple(a for a, _ in box), tuple(b - a for a, b in box)


def extended(array, origin, core, shape):
    """The chunk's owned block plus one voxel on the high side where the volume continues."""
    sl = tuple(slice(o, min(o + c + 1, n)) for o, c, n in zip(origin, core, shape))
    return array[sl]


def tree_combine(items, combine, rng):
    """Combine in a random order and grouping (tests associativity/commutativity)."""
    items = list(items)
    rng.shuffle(items)
    while len(items) > 1:
        k = int(rng.integers(2, 4))
        items = [combine(items[i : i + k]) for i in range(0, len(items), k)]
    return combine(items)


# ---------------------------------------------------------------------------------------
# reference per-label table
# ---------------------------------------------------------------------------------------


def reference_surface(mask, spacing):
    """skimage marching cubes / marching squares of the 1-padded mask, float64 throughout."""
    padded = np.pad(mask, 1).astype(np.float64)
    sp = np.asarray(spacing, dtype=np.float64)
    if mask.ndim == 3:
        verts, faces, _, _ = marching_cubes(padded, 0.5, spacing=tuple(spacing))
        if np.array_equal(sp, (1, 1, 1)):  # skimage keeps float32 at unit spacing
            verts = verts.astype(np.float64)
        return mesh_surface_area(verts, faces)
    total = 0.0
    for c in find_contours(padded, 0.5):
        total += np.sqrt(((np.diff(c, axis=0) * sp) ** 2).sum(axis=1)).sum()
    return total


def reference_pairs(lab):
    """Face contacts between different nonzero labels, by shifted comparisons."""
    counts = {}
    for ax in range(lab.ndim):
        a = np.moveaxis(lab, ax, 0)[:-1].ravel()
        b = np.moveaxis(lab, ax, 0)[1:].ravel()
        sel = (a != 0) & (b != 0) & (a != b)
        lo = np.minimum(a[sel], b[sel])
        hi = np.maximum(a[sel], b[sel])
        for p, n in zip(*np.unique(np.stack([lo, hi], 1), axis=0, return_counts=True)):
            counts[tuple(int(v) for v in p)] = counts.get(tuple(int(v) for v in p), 0) + int(n)
    return counts


def reference_stats(lab, grey, spacing):
    """The per-label table computed on the whole volume with skimage / numpy."""
    ids, compact = np.unique(lab, return_inverse=True)
    compact = compact.reshape(lab.shape).astype(np.int64)
    ndim = lab.ndim
    shape = np.array(lab.shape)
    pairs = reference_pairs(lab)
    rows = []
    props_sp = regionprops(compact, grey, spacing=spacing)
    props_px = {p.label: p for p in regionprops(compact)}
    for p in props_sp:
        lid = int(ids[p.label])
        mask = compact == p.label
        vals = grey[mask].astype(np.float64)
        coords = np.argwhere(mask)
        row = {
            "label": lid,
            "voxel_count": int(mask.sum()),
            ("volume" if ndim == 3 else "area"): p.area,
            ("equivalent_diameter_volume" if ndim == 3 else "equivalent_diameter_area"): p.equivalent_diameter_area,
            "intensity_min": vals.min(),
            "intensity_max": vals.max(),
            "intensity_mean": vals.mean(),
            "intensity_std": vals.std(),
            "axis_major_length": p.axis_major_length,
            "axis_minor_length": p.axis_minor_length,
            "touches_border": bool((coords == 0).any() or (coords == shape - 1).any()),
            "n_neighbours": sum(1 for k in pairs if lid in k),
        }
        for a, c in enumerate(props_px[p.label].centroid):
            row[f"centroid-{a}"] = c
        for a, b in enumerate(p.bbox):
            row[f"bbox-{a}"] = b
        for a, e in enumerate(p.inertia_tensor_eigvals):
            row[f"inertia_tensor_eigvals-{a}"] = e
        sl = tuple(slice(lo, hi) for lo, hi in zip(p.bbox[:ndim], p.bbox[ndim:]))
        area = reference_surface(mask[sl], spacing)
        if ndim == 3:
            row["surface_area"] = area
            row["sphericity"] = np.pi ** (1 / 3) * (6 * p.area) ** (2 / 3) / area
        else:  # scikit-image's 2D names; circularity as ImageJ's
            row["perimeter"] = area
            row["circularity"] = 4 * np.pi * p.area / area**2
        rows.append(row)
    return pd.DataFrame(rows), pairs


def reference_layers(lab, grey, spacing, width):
    """Per (label, layer) count / mean / std with scipy's EDT of each 0-padded particle.

    Also returns the assembled float64 distance map (each voxel: its own particle's EDT).
    """
    dist = np.zeros(lab.shape, dtype=np.float64)
    rows = []
    for lid in np.unique(lab[lab != 0]):
        mask = lab == lid
        d = ndi.distance_transform_edt(np.pad(mask, 1), sampling=spacing)
        d = d[(slice(1, -1),) * lab.ndim]
        dist[mask] = d[mask]
        k = np.maximum(1, np.round(d / width)).astype(np.int64)
        for layer in np.unique(k[mask]):
            vals = grey[mask & (k == layer)].astype(np.float64)
            rows.append((int(lid), int(layer), vals.size, vals.mean(), vals.std()))
    table = pd.DataFrame(rows, columns=["label", "layer", "count", "mean", "std"])
    return table, dist


def assert_close_table(got, ref, rtol=1e-9, atol_scale=1e-9):
    """Compare a kernel table with a reference table column by column (rows by label)."""
    got = got.set_index("label")
    ref = ref.copy()
    ref["label"] = ref["label"].astype(np.uint64)
    ref = ref.set_index("label").loc[got.index]
    assert list(got.index) == sorted(ref.index)
    for col in ref.columns:
        g = got[col].to_numpy()
        r = ref[col].to_numpy()
        if g.dtype == bool or np.issubdtype(g.dtype, np.integer):
            np.testing.assert_array_equal(g, r.astype(g.dtype), err_msg=col)
        else:
            scale = np.abs(r).max() if r.size else 1.0
            np.testing.assert_allclose(g, r.astype(np.float64), rtol=rtol,
                                       atol=atol_scale * scale, err_msg=col)
