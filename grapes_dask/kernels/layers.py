"""Pass 2: per (label, radial layer) grey-level sums from a precomputed distance map.

Reference semantics (docs/design.md): the radial layer of a voxel of particle L at Euclidean
distance ``d`` from the nearest voxel not in L is ``k = max(1, round_half_even(d /
layer_width))``; per layer we report voxel count, mean and std (ddof 0) of grey.

The division ``d / layer_width`` is done in float64 (``dist`` is promoted first) and rounded
half to even (``numpy.rint``), so ``d / w == 2.5`` gives layer 2 and ``3.5`` gives 4.

Precision of ``dist`` matters at exact ties. With unit spacing and width 1 there are none
(``sqrt(n)`` is never ``k + 1/2``), so ``edt.edt`` (float32) reproduces GRAPES exactly. With
anisotropic spacing ties occur: 5 voxels of 0.7 is 3.5, which scipy's
``distance_transform_edt`` returns exactly (it computes ``sqrt(sum((n_i * s_i)**2))``) and which
rounds to layer 4; ``edt.edt`` gives 3.4999998 (float32) and a float64 ``s_i**2 * n_i**2``
gives 3.4999999999999996, both layer 3 (in a test ellipsoid 12 of ~1000 voxels moved). This
kernel uses ``dist`` as given; matching the scipy reference at ties needs the distances
rounded the way scipy rounds them.

Partial table format (returned by :func:`layer_sums` and :func:`combine_layers`)
------------------------------------------------------------------------------
pandas.DataFrame, one row per (label, layer) met, sorted by (label, layer):

=========================  =========  ==========  =======================================
column                     dtype      combine     meaning
=========================  =========  ==========  =======================================
label                      uint64     key         label id
layer                      int64      key         1 .. K, from the surface inward
count                      int64      sum         voxels
grey_sum_hi, grey_sum_lo   int64,u64  128-bit     exact sum of grey (integer grey)
grey_sq_hi, grey_sq_lo     u64, u64   128-bit     exact sum of grey**2 (integer grey)
grey_mean, grey_m2         float64    Chan merge  (float grey) mean, sum of squared deviations
=========================  =========  ==========  =======================================
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from numba import njit

from . import _accum as acc
from .distance import (
    _IBIG,
    _TILE,
    _aniso_lines,
    _aniso_pass3_tile,
    _aniso_passes12,
    _aniso_scratch,
    _iso_pass3_tile,
    _iso_passes12,
    _iso_scratch,
    _packed_lines,
)

U64 = np.uint64


def _layer_dtypes(kind):
    cols = {"label": np.uint64, "layer": np.int64, "count": np.int64}
    cols.update(acc.grey_dtypes(kind))
    return cols


#: Columns and dtypes of the table :func:`finalize_layers` returns.
LAYER_COLUMNS = {
    "label": np.uint64,
    "layer": np.int64,
    "count": np.int64,
    "mean": np.float64,
    "std": np.float64,
}


@njit(cache=True, nogil=True)
def _layer(d, width, shift):
    k = np.int64(np.rint(np.float64(d) / width)) + shift
    return k if k > 1 else np.int64(1)


@njit(cache=True, nogil=True)
def _layer_pass(lab, grey, dist, mask, use_mask, width, shift, grey_float, keys, vals, kmax,
                first, offset, cnt, s_hi, s_acc, fsum, fseen):
    """One pass over the selected voxels.

    ``first``: only record the deepest layer of each label in ``kmax``. Otherwise accumulate
    into row ``offset[label index] + layer - 1``: ``cnt``, ``s_hi`` / ``s_acc[r] =
    (grey_sum_lo, grey_sq_hi, grey_sq_lo)`` (integer grey) or ``fsum[r] = (shift, S, Q)``.
    """
    last = U64(0)
    idx = np.int64(-1)
    for z in range(lab.shape[0]):
        for y in range(lab.shape[1]):
            for x in range(lab.shape[2]):
                v = U64(lab[z, y, x])
                if v == 0 or (use_mask and not mask[z, y, x]):
                    continue
                if v != last:
                    idx = acc.lookup(keys, vals, v)
                    last = v
                if idx < 0:
                    continue
                k = _layer(dist[z, y, x], width, shift)
                if first:
                    kmax[idx] = max(kmax[idx], k)
                    continue
                r = offset[idx] + k - 1
                cnt[r] += 1
                if grey_float:
                    g = np.float64(grey[z, y, x])
                    if not fseen[r]:
                        fseen[r] = True
                        fsum[r, 0] = g
                    d = g - fsum[r, 0]
                    fsum[r, 1] += d
                    fsum[r, 2] += d * d
                else:
                    gi = np.int64(grey[z, y, x])
                    s_hi[r], s_acc[r, 0], s_acc[r, 1], s_acc[r, 2] = acc.add_grey(
                        s_hi[r], s_acc[r, 0], s_acc[r, 1], s_acc[r, 2], gi
                    )


def _as3d(a):
    return a[None] if a.ndim == 2 else a


def layer_sums(labels, grey, dist, *, layer_width=1.0, owned=None, only_labels=None, from_center=False):
    """Per (label, layer) voxel count and exact grey sums over the owned voxels (pass 2).

    Parameters
    ----------
    labels : ndarray of integer, shape (Z, Y, X) or (Y, X)
        Labels of the region (0 = background; any integer dtype, read as uint64).
    grey : ndarray, same shape
        Grey levels: integer of at most 32 bits (exact sums) or float (float64 sums).
    dist : ndarray of float, same shape
        Euclidean distance of each voxel to the nearest voxel not in its label, in the
        length unit of ``layer_width`` (e.g. ``edt.edt(labels, anisotropy=spacing,
        black_border=True)`` computed by the caller on a large enough region).
    layer_width : float, optional
        Width of one layer (length unit); layer ``k = max(1, rint(dist / layer_width))``.
    owned : tuple of slice, or ndarray of bool, optional
        The voxels this call accounts for: slices into the arrays (the chunk's own voxels
        inside a haloed region) or a boolean mask of the arrays' shape. Default: all.
    only_labels : array_like of int, optional
        Count only these labels (e.g. the labels a region owns). Default: all nonzero.
    from_center : bool, optional
        `dist` is the distance from the particle's centroid (``start_at="center"``): layer
        ``k = 1 + rint(dist / layer_width)``, so layer 1 holds the voxels within half a layer
        width of the centroid. Default: `dist` is the distance to the surface and
        ``k = max(1, rint(dist / layer_width))``.

    Returns
    -------
    pandas.DataFrame
        The partial table described in the module docstring; typed and empty when no owned
        voxel carries a (selected) label.
    """
    if not (labels.shape == grey.shape == dist.shape) or labels.ndim not in (2, 3):
        raise ValueError(
            f"labels, grey and dist must be 2D or 3D arrays of one shape, got {labels.shape}, "
            f"{grey.shape} and {dist.shape}"
        )
    width = float(layer_width)
    if not width > 0:
        raise ValueError(f"layer_width must be > 0, got {layer_width}")
    kind = acc.grey_kind_of(grey.dtype)
    lab, grey, dist = acc.as_unsigned(labels), acc.grey_array(grey), dist
    mask = np.zeros((1, 1, 1), dtype=bool)
    use_mask = False
    if isinstance(owned, tuple):
        lab, grey, dist = lab[owned], grey[owned], dist[owned]
    elif owned is not None:
        owned = np.asarray(owned, dtype=bool)
        if owned.shape != labels.shape:
            raise ValueError(f"owned mask shape {owned.shape} != labels shape {labels.shape}")
        mask, use_mask = _as3d(owned), True
    lab, grey, dist = _as3d(lab), _as3d(grey), _as3d(dist)

    keys, vals = acc.new_table(1024)
    keys, vals = acc.collect_keys(lab, mask, use_mask, keys, vals)
    uniq = acc.table_keys(keys)
    if only_labels is not None:
        uniq = np.intersect1d(uniq, np.asarray(only_labels).astype(np.uint64))
    dtypes = _layer_dtypes(kind)
    if uniq.size == 0:
        return acc.empty_frame(dtypes)
    keys, vals = acc.index_table(uniq)
    kmax = np.zeros(uniq.size, dtype=np.int64)
    args = (lab, grey, dist, mask, use_mask, width, np.int64(1 if from_center else 0), kind == "float", keys,
            vals, kmax)
    none = np.zeros(0, np.int64)
    _layer_pass(*args, True, none, none, none, np.zeros((0, 3), np.uint64),
                np.zeros((0, 3)), np.zeros(0, bool))
    offset = np.concatenate([[0], np.cumsum(kmax)[:-1]]).astype(np.int64)
    rows = int(kmax.sum())
    cnt = np.zeros(rows, np.int64)
    s_hi = np.zeros(rows, np.int64)
    s_acc = np.zeros((rows, 3), np.uint64)
    fsum = np.zeros((rows, 3), np.float64)
    _layer_pass(*args, False, offset, cnt, s_hi, s_acc, fsum, np.zeros(rows, bool))
    out = {
        "label": np.repeat(uniq, kmax),
        "layer": np.arange(rows, dtype=np.int64) - np.repeat(offset, kmax) + 1,
        "count": cnt,
    }
    if kind == "int":
        out.update(grey_sum_hi=s_hi, grey_sum_lo=s_acc[:, 0], grey_sq_hi=s_acc[:, 1],
                   grey_sq_lo=s_acc[:, 2])
    else:
        out["grey_mean"], out["grey_m2"] = acc.shifted_to_mean_m2(cnt, fsum)
    keep = cnt > 0
    return pd.DataFrame({c: np.asarray(out[c], dtype=d)[keep] for c, d in dtypes.items()})


def combine_layers(partials):
    """Merge partial tables of :func:`layer_sums` exactly (sums by (label, layer)).

    Parameters
    ----------
    partials : sequence of pandas.DataFrame
        Partials over disjoint sets of voxels, same grey kind.

    Returns
    -------
    pandas.DataFrame
        Same format, one row per (label, layer).
    """
    partials = list(partials)
    if not partials:
        raise ValueError("combine_layers: no partials given")
    kind = acc.grey_kind(partials[0].columns)
    rules = {"count": "sum", **acc.grey_rules(kind)}
    return acc.combine_frames(partials, ["label", "layer"], rules, "layer sums")


def finalize_layers(combined):
    """The long layers table.

    Parameters
    ----------
    combined : pandas.DataFrame
        :func:`combine_layers` over all owned voxels of the volume.

    Returns
    -------
    pandas.DataFrame
        ``label`` (uint64), ``layer`` (int64), ``count`` (int64), ``mean``, ``std`` (float64,
        ddof 0; for integer grey the correctly rounded values of the exact sums). Sorted by
        (label, layer); layers with no voxel are absent. Typed and empty without rows.
    """
    if len(combined) == 0:
        return acc.empty_frame(LAYER_COLUMNS)
    mean, std = acc.grey_mean_std(combined)
    out = {
        "label": combined["label"].to_numpy(),
        "layer": combined["layer"].to_numpy(),
        "count": combined["count"].to_numpy(),
        "mean": mean,
        "std": std,
    }
    return pd.DataFrame({c: np.asarray(out[c], dtype=d) for c, d in LAYER_COLUMNS.items()})


# --------------------------------------------------------------------------------------------
# fused route: last EDT pass and layer sums in one sweep (isotropic spacing, grey <= 16 bits)
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _key_index(keys, lv):
    """Position of ``lv`` in the sorted ``keys`` (binary search); -1 when absent."""
    lo, hi = 0, keys.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if keys[mid] < lv:
            lo = mid + 1
        else:
            hi = mid
    return lo if lo < keys.shape[0] and keys[lo] == lv else -1


@njit(cache=True, nogil=True)
def _fused_iso_kernel(lab, grey, c0, c1, border, keys, s, width, kcap, cnt, gsum, gsq, P2, pk):
    """Core EDT (integer route) with its last pass accumulating per (label index, layer).

    ``cnt``, ``gsum``, ``gsq``: int64 arrays of shape ``(len(keys), kcap)``. Returns the number
    of voxels whose label was not in ``keys`` or whose layer was >= ``kcap`` (0 when consistent).
    """
    Z = lab.shape[0]
    cz, cy, cx = c1[0] - c0[0], c1[1] - c0[1], c1[2] - c0[2]
    v, zb, fv = _iso_scratch(lab.shape)
    _iso_passes12(lab, c0, c1, border, v, zb, fv, P2, pk)
    tile3 = np.empty((_TILE, cz), np.int64)
    bad = 0
    last = U64(0)
    idx = -1
    for b in range(cy):
        for cc0 in range(0, cx, _TILE):
            w = min(_TILE, cx - cc0)
            _iso_pass3_tile(P2, b, cc0, w, Z, c0, c1, border, v, zb, fv, tile3, pk)
            for a in range(cz):
                for t in range(w):
                    lv = U64(lab[c0[0] + a, c0[1] + b, c0[2] + cc0 + t])
                    if lv == 0:
                        continue
                    if lv != last:
                        idx = _key_index(keys, lv)
                        last = lv
                    k2 = tile3[t, a]
                    if idx < 0 or k2 >= _IBIG:
                        bad += 1
                        continue
                    d = np.sqrt(np.float64(k2))
                    if s != 1.0:
                        d = d * s
                    k = _layer(d, width, 0)
                    if k >= kcap:
                        bad += 1
                        continue
                    g = np.int64(grey[a, b, cc0 + t])
                    cnt[idx, k] += 1
                    gsum[idx, k] += g
                    gsq[idx, k] += g * g
    return bad


def fused_layer_sums(labels, grey, core, border, spacing, layer_width, keys, max_distance):
    """Pass-2 partial of a region in one sweep: core EDT and per-(label, layer) sums, fused.

    For isotropic spacing and integer grey of at most 16 bits (the sums of squares of one region
    then fit int64); the result equals ``layer_sums(labels[core], grey, distance_core(labels,
    core, spacing, border), layer_width=layer_width)`` without the float distance array.

    Parameters
    ----------
    labels : ndarray of integer, shape (Z, Y, X)
        Labels of the region (core plus halo); 0 is background.
    grey : ndarray of integer (<= 16 bits), shape of the core
        Grey levels of the core.
    core : tuple of slice
        The core inside `labels`.
    border : sequence of 6 bool
        Whether each region side is a boundary (volume side with ``black_border``).
    spacing : float
        The isotropic voxel size.
    layer_width : float
        Layer width (spacing units).
    keys : ndarray of uint64, sorted
        Every nonzero label of the core.
    max_distance : float
        Upper bound of any core voxel's distance (spacing units), e.g. the largest inscribed-radius
        bound of `keys`; sizes the accumulators.

    Returns
    -------
    pandas.DataFrame
        The layer partial of :func:`layer_sums` (integer grey columns).
    """
    lab = np.ascontiguousarray(acc.as_unsigned(labels)) if labels.dtype.kind == "i" else np.ascontiguousarray(labels)
    if lab.ndim != 3 or grey.ndim != 3:
        raise ValueError("fused_layer_sums takes 3D regions")
    c0 = np.array([s_.start for s_ in core], np.int64)
    c1 = np.array([s_.stop for s_ in core], np.int64)
    keys = np.asarray(keys, np.uint64)
    width = float(layer_width)
    kcap = int(np.floor(max_distance / width)) + 3
    cnt = np.zeros((len(keys), kcap), np.int64)
    gsum = np.zeros((len(keys), kcap), np.int64)
    gsq = np.zeros((len(keys), kcap), np.int64)
    # the packed lines only need to represent squared distances up to the bound (in voxels)
    P2, pk = _packed_lines(lab.shape, c0, c1, np.ceil(max_distance / float(spacing)) + 1)
    bad = _fused_iso_kernel(lab, grey, c0, c1, np.asarray(border, np.bool_), keys, float(spacing), width, kcap,
                            cnt, gsum, gsq, P2, pk)
    if bad:
        raise RuntimeError(f"fused_layer_sums: {bad} voxels outside the given labels or layer bound "
                           "(the plan's label lists or distance bounds are inconsistent)")
    li, kk = np.nonzero(cnt)
    sums = gsum[li, kk]
    dtypes = _layer_dtypes("int")
    out = {
        "label": keys[li], "layer": kk.astype(np.int64), "count": cnt[li, kk],
        "grey_sum_hi": np.where(sums < 0, -1, 0).astype(np.int64), "grey_sum_lo": sums.astype(np.uint64),
        "grey_sq_hi": np.zeros(len(li), np.uint64), "grey_sq_lo": gsq[li, kk].astype(np.uint64),
    }
    return pd.DataFrame({c: np.asarray(out[c], dtype=d) for c, d in dtypes.items()})


# --------------------------------------------------------------------------------------------
# fused route for anisotropic spacing (float64 with offsets, grey <= 16 bits)
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _fused_aniso_kernel(lab, grey, c0, c1, border, sz, sy, sx, keys, width, kcap, cnt, gsum, gsq, D2, bg, unr):
    """Core EDT (anisotropic route, bitwise :func:`~grapes_dask.kernels.distance._sq_edt3`) with
    its last pass accumulating per (label index, layer), as :func:`_fused_iso_kernel`.

    Returns the number of voxels whose label was not in ``keys``, whose distance was not finite
    or whose layer was >= ``kcap`` (0 when consistent).
    """
    Z = lab.shape[0]
    cz, cy, cx = c1[0] - c0[0], c1[1] - c0[1], c1[2] - c0[2]
    v, zb, fv, fl = _aniso_scratch(lab.shape)
    _aniso_passes12(lab, c0, c1, sy, sx, border, v, zb, fv, fl, D2, bg, unr)
    tile3 = np.empty((_TILE, cz))
    bad = 0
    last = U64(0)
    idx = -1
    for b in range(cy):
        for cc0 in range(0, cx, _TILE):
            w = min(_TILE, cx - cc0)
            _aniso_pass3_tile(D2, b, cc0, w, Z, c0, c1, sz, sy, sx, border, v, zb, fv, fl, tile3, bg, unr)
            for a in range(cz):
                for t in range(w):
                    lv = U64(lab[c0[0] + a, c0[1] + b, c0[2] + cc0 + t])
                    if lv == 0:
                        continue
                    if lv != last:
                        idx = _key_index(keys, lv)
                        last = lv
                    d2 = tile3[t, a]
                    if idx < 0 or not d2 < np.inf:
                        bad += 1
                        continue
                    k = _layer(np.sqrt(d2), width, 0)
                    if k >= kcap:
                        bad += 1
                        continue
                    g = np.int64(grey[a, b, cc0 + t])
                    cnt[idx, k] += 1
                    gsum[idx, k] += g
                    gsq[idx, k] += g * g
    return bad


def fused_layer_sums_aniso(labels, grey, core, border, spacing, layer_width, keys, max_distance):
    """Pass-2 partial of a region in one sweep for anisotropic spacing: core EDT and layer sums, fused.

    For 3D regions and integer grey of at most 16 bits; the result equals ``layer_sums(labels[core],
    grey, distance_core(labels, core, spacing, border), layer_width=layer_width)`` to the bit
    (every distance is the one :func:`~grapes_dask.kernels.distance.squared_edt_core` gives, summed
    from per-axis offsets like scipy's ``distance_transform_edt``), without the float distance
    array and with every line contiguous.

    Parameters
    ----------
    labels : ndarray of integer, shape (Z, Y, X)
        Labels of the region (core plus halo); 0 is background.
    grey : ndarray of integer (<= 16 bits), shape of the core
        Grey levels of the core.
    core : tuple of slice
        The core inside `labels`.
    border : sequence of 6 bool
        Whether each region side is a boundary (volume side with ``black_border``).
    spacing : sequence of 3 float
        Voxel size per axis (z, y, x), length units.
    layer_width : float
        Layer width (length units).
    keys : ndarray of uint64, sorted
        Every nonzero label of the core.
    max_distance : float
        Upper bound of any core voxel's distance (length units), e.g. the largest inscribed-radius
        bound of `keys`; sizes the accumulators.

    Returns
    -------
    pandas.DataFrame
        The layer partial of :func:`layer_sums` (integer grey columns).
    """
    lab = np.ascontiguousarray(acc.as_unsigned(labels)) if labels.dtype.kind == "i" else np.ascontiguousarray(labels)
    if lab.ndim != 3 or grey.ndim != 3:
        raise ValueError("fused_layer_sums_aniso takes 3D regions")
    if lab.dtype == np.bool_:
        lab = lab.view(np.uint8)
    sz, sy, sx = (float(s_) for s_ in spacing)
    c0 = np.array([s_.start for s_ in core], np.int64)
    c1 = np.array([s_.stop for s_ in core], np.int64)
    keys = np.asarray(keys, np.uint64)
    width = float(layer_width)
    kcap = int(np.floor(max_distance / width)) + 3
    cnt = np.zeros((len(keys), kcap), np.int64)
    gsum = np.zeros((len(keys), kcap), np.int64)
    gsq = np.zeros((len(keys), kcap), np.int64)
    D2, bg, unr = _aniso_lines(lab.shape, c0, c1)
    bad = _fused_aniso_kernel(lab, grey, c0, c1, np.asarray(border, np.bool_), sz, sy, sx, keys, width, kcap,
                              cnt, gsum, gsq, D2, bg, unr)
    if bad:
        raise RuntimeError(f"fused_layer_sums_aniso: {bad} voxels outside the given labels or layer bound "
                           "(the plan's label lists or distance bounds are inconsistent)")
    return _fused_partial(keys, cnt, gsum, gsq)


def _fused_partial(keys, cnt, gsum, gsq):
    """The integer-grey layer partial of the accumulators of a fused kernel."""
    li, kk = np.nonzero(cnt)
    sums = gsum[li, kk]
    dtypes = _layer_dtypes("int")
    out = {
        "label": keys[li], "layer": kk.astype(np.int64), "count": cnt[li, kk],
        "grey_sum_hi": np.where(sums < 0, -1, 0).astype(np.int64), "grey_sum_lo": sums.astype(np.uint64),
        "grey_sq_hi": np.zeros(len(li), np.uint64), "grey_sq_lo": gsq[li, kk].astype(np.uint64),
    }
    return pd.DataFrame({c: np.asarray(out[c], dtype=d) for c, d in dtypes.items()})
