"""Exact multi-label Euclidean distance transform of a region's core, with a halo.

The EDT of a voxel of particle ``L`` is the distance to the nearest voxel not in ``L``
(voxels outside the volume count as not-in-``L`` when ``black_border``). It is separable:
with ``f`` the squared distance after the passes along the later axes,

    d^2(z, y, x) = min_{z'} [ s_z^2 (z - z')^2 + min_{y'} [ s_y^2 (y - y')^2 + f_x(z', y', x) ] ]

and, because a voxel of another label is at distance 0 from itself, each 1D pass only has to
look within the run ("segment") of equal labels that holds the voxel, with zero-height parabolas
just outside the run (Felzenszwalb & Huttenlocher's lower envelope, restricted to segments).

For a region = core + halo, the minimiser of a core voxel lies within its own distance ``d`` of
it along every axis, and ``d`` never exceeds the particle's inscribed radius. So if the halo is at
least that radius (in voxels along each axis), computing

1. the pass along the last axis on every line of the region that can reach the core,
2. the pass along the middle axis only for the core's columns of the last axis,
3. the pass along the first axis only for the core's (middle, last) columns,

gives the exact squared EDT on the core while working on much less than the whole region
(a full-region EDT costs ``(1 + 2h/C)^3``; this costs about ``(1 + 2h/C)^2`` for the first two
passes and ``1 + 2h/C`` for the last). Region edges that lie inside the volume are not
boundaries (values there may be too large, never too small; the halo makes them irrelevant);
edges on the volume border are boundaries when ``black_border``.

Everything here is Numba on numpy blocks; no dask.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["squared_edt_core", "edt_core"]

_TILE = 16
_INF = np.inf


@njit(cache=True, nogil=True)
def _first_pass_line(lab, out, n, s2, lo_border, hi_border):
    """Squared distance along one line to the ends of each run of equal non-zero labels."""
    i = 0
    while i < n:
        lv = lab[i]
        j = i + 1
        while j < n and lab[j] == lv:
            j += 1
        if lv == 0:
            for q in range(i, j):
                out[q] = 0.0
        else:
            lb = i > 0 or lo_border
            rb = j < n or hi_border
            for q in range(i, j):
                d = _INF
                if lb:
                    k = q - i + 1
                    d = s2 * (k * k)
                if rb:
                    k = j - q
                    d2 = s2 * (k * k)
                    if d2 < d:
                        d = d2
                out[q] = d
        i = j


@njit(cache=True, nogil=True)
def _envelope_line(lab, f, out, n, s2, lo_border, hi_border, v, z, fv):
    """Lower envelope of ``s2 (q - p)^2 + f[p]`` within each run of equal labels (in place ok)."""
    i = 0
    while i < n:
        lv = lab[i]
        j = i + 1
        while j < n and lab[j] == lv:
            j += 1
        if lv == 0:
            for q in range(i, j):
                out[q] = 0.0
            i = j
            continue
        lb = i > 0 or lo_border
        rb = j < n or hi_border
        k = -1
        if lb:
            k = 0
            v[0] = i - 1
            fv[0] = 0.0
            z[0] = -_INF
        end = j + 1 if rb else j
        for p in range(i, end):
            fp = 0.0 if p == j else f[p]
            if fp == _INF:
                continue
            s = 0.0
            while k >= 0:
                q = v[k]
                s = ((fp + s2 * (p * p)) - (fv[k] + s2 * (q * q))) / (2.0 * s2 * (p - q))
                if s <= z[k]:
                    k -= 1
                else:
                    break
            k += 1
            v[k] = p
            fv[k] = fp
            z[k] = -_INF if k == 0 else s
        if k < 0:
            for q in range(i, j):
                out[q] = _INF
        else:
            z[k + 1] = _INF
            m = 0
            for q in range(i, j):
                while z[m + 1] < q:
                    m += 1
                d = q - v[m]
                out[q] = s2 * (d * d) + fv[m]
        i = j


@njit(cache=True, nogil=True)
def _sq_edt3(lab, c0, c1, sz, sy, sx, border):
    """Squared EDT on the core ``lab[c0[0]:c1[0], c0[1]:c1[1], c0[2]:c1[2]]`` of a 3D region."""
    Z, Y, X = lab.shape
    cz, cy, cx = c1[0] - c0[0], c1[1] - c0[1], c1[2] - c0[2]
    n = max(Z, max(Y, X))
    v = np.empty(n + 2, np.int64)
    zb = np.empty(n + 3)
    fv = np.empty(n + 2)
    # pass 1 along x on every (z, y) row of the region, kept for the core's x columns
    f1 = np.empty((Z, Y, cx))
    row = np.empty(X)
    for a in range(Z):
        for b in range(Y):
            _first_pass_line(lab[a, b], row, X, sx * sx, border[4], border[5])
            for c in range(cx):
                f1[a, b, c] = row[c0[2] + c]
    # pass 2 along y for the core's x columns, kept for the core's y rows
    f2 = np.empty((Z, cy, cx))
    lt = np.empty((_TILE, Y), lab.dtype)
    ft = np.empty((_TILE, Y))
    for a in range(Z):
        for t0 in range(0, cx, _TILE):
            w = min(_TILE, cx - t0)
            for b in range(Y):
                for t in range(w):
                    lt[t, b] = lab[a, b, c0[2] + t0 + t]
                    ft[t, b] = f1[a, b, t0 + t]
            for t in range(w):
                _envelope_line(lt[t], ft[t], ft[t], Y, sy * sy, border[2], border[3], v, zb, fv)
            for b in range(cy):
                for t in range(w):
                    f2[a, b, t0 + t] = ft[t, c0[1] + b]
    # pass 3 along z for the core's (y, x) columns
    out = np.empty((cz, cy, cx))
    lz = np.empty((_TILE, Z), lab.dtype)
    fz = np.empty((_TILE, Z))
    for b in range(cy):
        for t0 in range(0, cx, _TILE):
            w = min(_TILE, cx - t0)
            for a in range(Z):
                for t in range(w):
                    lz[t, a] = lab[a, c0[1] + b, c0[2] + t0 + t]
                    fz[t, a] = f2[a, b, t0 + t]
            for t in range(w):
                _envelope_line(lz[t], fz[t], fz[t], Z, sz * sz, border[0], border[1], v, zb, fv)
            for a in range(cz):
                for t in range(w):
                    out[a, b, t0 + t] = fz[t, c0[0] + a]
    return out


def squared_edt_core(labels, core=None, spacing=None, border=True):
    """Exact squared multi-label EDT on the core of a region.

    Parameters
    ----------
    labels : ndarray of int, shape (Z, Y, X) or (Y, X)
        Labels of the region (core plus halo); 0 is background.
    core : tuple of slice, optional
        The core inside `labels` (default: all of it). Its distances are exact when the halo on
        each side is at least the largest inscribed radius (in voxels of that axis) of the
        labels meeting the core, or the side lies on a volume border.
    spacing : sequence of float, optional
        Voxel size per axis (default 1).
    border : bool or sequence of 2*ndim bool
        Whether each region side (low, high per axis) is a boundary (a volume side with
        ``black_border=True``). One bool applies to every side.

    Returns
    -------
    ndarray of float64, shape of the core
        Squared distance to the nearest voxel of another label, in squared spacing units;
        0 on background; ``inf`` where no boundary is reachable (only when no side is a border).
    """
    lab = np.asarray(labels)
    nd = lab.ndim
    if nd not in (2, 3):
        raise ValueError(f"labels must be 2D or 3D, got {nd}D")
    if core is None:
        core = tuple(slice(0, n) for n in lab.shape)
    c0 = np.array([s.indices(n)[0] for s, n in zip(core, lab.shape)], np.int64)
    c1 = np.array([s.indices(n)[1] for s, n in zip(core, lab.shape)], np.int64)
    sp = (1.0,) * nd if spacing is None else tuple(float(s) for s in spacing)
    b = np.array([bool(border)] * (2 * nd) if np.isscalar(border) else [bool(x) for x in border], np.bool_)
    if lab.dtype == np.bool_:
        lab = lab.view(np.uint8)
    if nd == 2:
        # a 2D image is a single-plane 3D region whose z sides are not borders
        out = _sq_edt3(lab[None], np.r_[0, c0], np.r_[1, c1], 1.0, sp[0], sp[1],
                       np.r_[False, False, b])
        return out[0]
    return _sq_edt3(np.ascontiguousarray(lab), c0, c1, sp[0], sp[1], sp[2], b)


def edt_core(labels, core=None, spacing=None, border=True):
    """Exact multi-label EDT on the core of a region (square root of :func:`squared_edt_core`)."""
    return np.sqrt(squared_edt_core(labels, core, spacing, border))
