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
_NOFF = np.int32(2**31 - 1)  # "no feature reachable"
_IBIG = np.int64(1) << 29  # integer route: "no boundary reachable" (d^2 below it: d < 23,170 voxels)
_FLAG = np.int64(1) << 30  # packed lines: "a new run of labels starts here"
_FMASK = _FLAG - 1


@njit(cache=True, nogil=True)
def _first_pass_line(lab, f, off, n, s, lo_border, hi_border):
    """Along one line: offset to the nearest end of the voxel's run of equal non-zero labels.

    Writes ``off[q]`` (signed voxel offset to the nearest voxel of another label, or
    ``_NOFF`` when none is reachable) and ``f[q] = (s * off)^2``.
    """
    i = 0
    while i < n:
        lv = lab[i]
        j = i + 1
        while j < n and lab[j] == lv:
            j += 1
        if lv == 0:
            for q in range(i, j):
                f[q] = 0.0
                off[q] = 0
        else:
            lb = i > 0 or lo_border
            rb = j < n or hi_border
            for q in range(i, j):
                kl = q - i + 1
                kr = j - q
                if lb and (not rb or kl <= kr):
                    off[q] = -kl
                    f[q] = (s * kl) * (s * kl)
                elif rb:
                    off[q] = kr
                    f[q] = (s * kr) * (s * kr)
                else:
                    off[q] = _NOFF
                    f[q] = _INF
        i = j


@njit(cache=True, nogil=True)
def _envelope_line(lab, f, arg, n, s2, lo_border, hi_border, v, z, fv):
    """Lower envelope of ``s2 (q - p)^2 + f[p]`` within each run of equal labels.

    Writes the minimising position ``arg[q]`` (``i - 1`` or ``j`` for the zero-height parabolas
    just outside the run ``[i, j)``, ``-2`` on background, ``_NOFF`` when nothing is reachable).
    """
    i = 0
    while i < n:
        lv = lab[i]
        j = i + 1
        while j < n and lab[j] == lv:
            j += 1
        if lv == 0:
            for q in range(i, j):
                arg[q] = -2
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
                arg[q] = _NOFF
        else:
            z[k + 1] = _INF
            m = 0
            for q in range(i, j):
                while z[m + 1] < q:
                    m += 1
                arg[q] = v[m]
        i = j


@njit(cache=True, nogil=True)
def _sq_edt3(lab, c0, c1, sz, sy, sx, border):
    """Squared EDT on the core ``lab[c0[0]:c1[0], c0[1]:c1[1], c0[2]:c1[2]]`` of a 3D region.

    Besides the squared distance used for comparisons, every pass carries the voxel offsets
    to the nearest feature found so far, and the final value is summed from them in axis
    order, ``((s_z dz)^2 + (s_y dy)^2) + (s_x dx)^2``, exactly as scipy's
    ``distance_transform_edt`` does, so that distances (and layer ties) agree bitwise.
    """
    Z, Y, X = lab.shape
    cz, cy, cx = c1[0] - c0[0], c1[1] - c0[1], c1[2] - c0[2]
    n = max(Z, max(Y, X))
    v = np.empty(n + 2, np.int64)
    zb = np.empty(n + 3)
    fv = np.empty(n + 2)
    # pass 1 along x on every (z, y) row of the region, kept for the core's x columns
    f1 = np.empty((Z, Y, cx))
    ox1 = np.empty((Z, Y, cx), np.int32)
    row = np.empty(X)
    orow = np.empty(X, np.int32)
    for a in range(Z):
        for b in range(Y):
            _first_pass_line(lab[a, b], row, orow, X, sx, border[4], border[5])
            for c in range(cx):
                f1[a, b, c] = row[c0[2] + c]
                ox1[a, b, c] = orow[c0[2] + c]
    # pass 2 along y for the core's x columns, kept for the core's y rows
    f2 = np.empty((Z, cy, cx))
    oy2 = np.empty((Z, cy, cx), np.int32)
    ox2 = np.empty((Z, cy, cx), np.int32)
    lt = np.empty((_TILE, Y), lab.dtype)
    ft = np.empty((_TILE, Y))
    at = np.empty((_TILE, Y), np.int64)
    for a in range(Z):
        for t0 in range(0, cx, _TILE):
            w = min(_TILE, cx - t0)
            for b in range(Y):
                for t in range(w):
                    lt[t, b] = lab[a, b, c0[2] + t0 + t]
                    ft[t, b] = f1[a, b, t0 + t]
            for t in range(w):
                _envelope_line(lt[t], ft[t], at[t], Y, sy * sy, border[2], border[3], v, zb, fv)
            for b in range(cy):
                q = c0[1] + b
                for t in range(w):
                    p = at[t, q]
                    if p == -2:
                        dy, dx = 0, 0
                    elif p == _NOFF:
                        dy, dx = _NOFF, _NOFF
                    elif p < 0 or p >= Y or lt[t, p] != lt[t, q]:
                        dy, dx = p - q, 0
                    else:
                        dy, dx = p - q, ox1[a, p, t0 + t]
                    oy2[a, b, t0 + t] = dy
                    ox2[a, b, t0 + t] = dx
                    if dy == _NOFF or dx == _NOFF:
                        f2[a, b, t0 + t] = _INF
                    else:
                        f2[a, b, t0 + t] = (sy * dy) * (sy * dy) + (sx * dx) * (sx * dx)
    # pass 3 along z for the core's (y, x) columns
    out = np.empty((cz, cy, cx))
    lz = np.empty((_TILE, Z), lab.dtype)
    fz = np.empty((_TILE, Z))
    az = np.empty((_TILE, Z), np.int64)
    for b in range(cy):
        for t0 in range(0, cx, _TILE):
            w = min(_TILE, cx - t0)
            for a in range(Z):
                for t in range(w):
                    lz[t, a] = lab[a, c0[1] + b, c0[2] + t0 + t]
                    fz[t, a] = f2[a, b, t0 + t]
            for t in range(w):
                _envelope_line(lz[t], fz[t], az[t], Z, sz * sz, border[0], border[1], v, zb, fv)
            for a in range(cz):
                q = c0[0] + a
                for t in range(w):
                    p = az[t, q]
                    if p == -2:
                        out[a, b, t0 + t] = 0.0
                        continue
                    if p == _NOFF:
                        out[a, b, t0 + t] = _INF
                        continue
                    dz = p - q
                    if p < 0 or p >= Z or lz[t, p] != lz[t, q]:
                        dy, dx = 0, 0
                    else:
                        dy, dx = oy2[p, b, t0 + t], ox2[p, b, t0 + t]
                    if dy == _NOFF or dx == _NOFF:
                        out[a, b, t0 + t] = _INF
                    else:
                        out[a, b, t0 + t] = ((sz * dz) * (sz * dz) + (sy * dy) * (sy * dy)) + (sx * dx) * (sx * dx)
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



@njit(cache=True, nogil=True)
def _runs_first(L, out, n, lob, hib):
    """Integer squared distance along a line to the ends of runs of equal non-zero labels."""
    i = 0
    while i < n:
        lv = L[i]
        j = i + 1
        while j < n and L[j] == lv:
            j += 1
        if lv == 0:
            for q in range(i, j):
                out[q] = 0
        else:
            lb = i > 0 or lob
            rb = j < n or hib
            for q in range(i, j):
                kl = q - i + 1
                kr = j - q
                if lb and (not rb or kl <= kr):
                    out[q] = kl * kl
                elif rb:
                    out[q] = kr * kr
                else:
                    out[q] = _IBIG
        i = j


@njit(cache=True, nogil=True)
def _env_segment(f, fmask, big, i, j, lb, rb, out, lo, hi, v, z, fv):
    """Integer lower envelope of ``(q - p)^2 + f[p]`` over one run ``[i, j)`` of a line.

    ``lb``/``rb``: zero-height parabolas just outside the run (another label or a border).
    The value of ``f[p]`` is ``f[p] & fmask``; values ``>= big`` mean "no boundary reachable"
    and are left out. Writes ``out[q - lo]`` for ``lo <= q < hi`` only.
    """
    k = -1
    if lb:
        k = 0
        v[0] = i - 1
        fv[0] = 0
        z[0] = -1e300
    end = j + 1 if rb else j
    for p in range(i, end):
        fp = np.int64(0) if p == j else np.int64(f[p]) & fmask
        if fp >= big:
            continue
        s = 0.0
        while k >= 0:
            q = v[k]
            s = ((fp + p * p) - (fv[k] + q * q)) / (2.0 * (p - q))
            if s <= z[k]:
                k -= 1
            else:
                break
        k += 1
        v[k] = p
        fv[k] = fp
        z[k] = -1e300 if k == 0 else s
    if k < 0:
        for q in range(max(i, lo), min(j, hi)):
            out[q - lo] = _IBIG
    else:
        z[k + 1] = 1e300
        m = 0
        for q in range(max(i, lo), min(j, hi)):
            while z[m + 1] < q:
                m += 1
            d = q - v[m]
            out[q - lo] = d * d + fv[m]


@njit(cache=True, nogil=True)
def _runs_env(L, f, out, n, lob, hib, v, z, fv, lo, hi):
    """:func:`_env_segment` over every run of equal non-zero labels ``L`` meeting ``[lo, hi)``."""
    i = np.int64(0)
    while i < n:
        lv = L[i]
        j = i + 1
        while j < n and L[j] == lv:
            j += 1
        if j > lo and i < hi:
            if lv == 0:
                for q in range(max(i, lo), min(j, hi)):
                    out[q - lo] = 0
            else:
                _env_segment(f, np.int64(-1), _IBIG, i, j, i > 0 or lob, j < n or hib, out, lo, hi, v, z, fv)
        i = j


@njit(cache=True, nogil=True)
def _runs_env_packed(P, out, n, lob, hib, v, z, fv, lo, hi, pk):
    """Like :func:`_runs_env` on a packed line (see :func:`_packing`)."""
    bg, flag, fmask, big = pk
    i = np.int64(0)
    while i < n:
        j = i + 1
        if np.int64(P[i]) == bg:
            while j < n and np.int64(P[j]) == bg:
                j += 1
            if j > lo and i < hi:
                for q in range(max(i, lo), min(j, hi)):
                    out[q - lo] = 0
        else:
            while j < n and np.int64(P[j]) != bg and (np.int64(P[j]) & flag) == 0:
                j += 1
            if j > lo and i < hi:
                _env_segment(P, fmask, big, i, j, i > 0 or lob, j < n or hib, out, lo, hi, v, z, fv)
        i = j


def _packing(max_sq):
    """dtype and ``(background, run-start flag, value mask, unreachable)`` of packed lines.

    uint16 when every squared distance that matters is below 2**14 - 1 (distances under 127
    voxels): larger values only ever belong to parabolas that cannot be a core voxel's minimum,
    so they are stored as "unreachable". int32 otherwise.
    """
    if max_sq < (1 << 14) - 1:
        return np.uint16, (np.int64(0xFFFF), np.int64(1 << 14), np.int64((1 << 14) - 1), np.int64((1 << 14) - 1))
    return np.int32, (np.int64(-1), _FLAG, _FMASK, _IBIG)


@njit(cache=True, nogil=True)
def _iso_passes12(lab, c0, c1, border, v, zb, fv, P2, pk):
    """Passes along x and y of the integer route, a tile of z-planes at a time.

    Fills ``P2[b, c, a]`` (z contiguous for the last pass) for the core's (y, x) columns and
    every z of the region, packed as ``pk = (background, flag, mask, unreachable)`` says
    (:func:`_packing`): the background marker, else the squared distance of the first two
    passes (capped at ``unreachable``) with ``flag`` set where a new run of labels starts along
    z. Only a tile of planes of the first pass is ever held, and no label copy is kept.
    """
    bg, flag, fmask, big = pk
    Z, Y, X = lab.shape
    cy, cx = c1[1] - c0[1], c1[2] - c0[2]
    row = np.empty(X, np.int64)
    rows = np.empty((_TILE, cx), np.int64)
    T1 = np.empty((_TILE, cx, Y), np.int32)
    L1 = np.empty((_TILE, cx, Y), lab.dtype)
    prev = np.zeros((cx, cy), lab.dtype)
    tile2 = np.empty((_TILE, cy), np.int64)
    for a0 in range(0, Z, _TILE):
        w = min(_TILE, Z - a0)
        # pass 1 along x for the planes a0 .. a0 + w, stored (plane, x, y): y contiguous
        for t in range(w):
            a = a0 + t
            for b0 in range(0, Y, _TILE):
                wb = min(_TILE, Y - b0)
                for tb in range(wb):
                    _runs_first(lab[a, b0 + tb], row, X, border[4], border[5])
                    for c in range(cx):
                        rows[tb, c] = row[c0[2] + c]
                for c in range(cx):
                    for tb in range(wb):
                        T1[t, c, b0 + tb] = rows[tb, c]
                        L1[t, c, b0 + tb] = lab[a, b0 + tb, c0[2] + c]
        # pass 2 along y, packed into P2 with the run starts along z
        for c in range(cx):
            for t in range(w):
                _runs_env(L1[t, c], T1[t, c], tile2[t], Y, border[2], border[3], v, zb, fv, c0[1], c1[1])
            for b in range(cy):
                for t in range(w):
                    a = a0 + t
                    lv = L1[t, c, c0[1] + b]
                    if lv == 0:
                        P2[b, c, a] = bg
                    else:
                        before = L1[t - 1, c, c0[1] + b] if t > 0 else prev[c, b]
                        val = min(tile2[t, b], big)
                        if a == 0 or before != lv:
                            val = val | flag
                        P2[b, c, a] = val
                prev[c, b] = L1[w - 1, c, c0[1] + b]


@njit(cache=True, nogil=True)
def _iso_pass3_tile(P2, b, cc0, w, Z, c0, c1, border, v, zb, fv, tile3, pk):
    """Pass along z for the columns ``(b, cc0 .. cc0 + w)``: ``tile3[t, a]`` = squared distance."""
    for t in range(w):
        _runs_env_packed(P2[b, cc0 + t], tile3[t], Z, border[0], border[1], v, zb, fv, c0[0], c1[0], pk)


@njit(cache=True, nogil=True)
def _iso_scratch(shape):
    """Envelope buffers (positions, intersections, heights) for lines of up to max(shape)."""
    n = max(shape[0], max(shape[1], shape[2]))
    return np.empty(n + 2, np.int64), np.empty(n + 3), np.empty(n + 2, np.int64)


@njit(cache=True, nogil=True)
def _sq_edt3_iso(lab, c0, c1, border, P2, pk):
    """Integer squared EDT (voxel units) on the core, for isotropic spacing.

    Same passes as :func:`_sq_edt3` but in integers, with every line contiguous.
    """
    Z = lab.shape[0]
    cz, cy, cx = c1[0] - c0[0], c1[1] - c0[1], c1[2] - c0[2]
    v, zb, fv = _iso_scratch(lab.shape)
    _iso_passes12(lab, c0, c1, border, v, zb, fv, P2, pk)
    out = np.empty((cz, cy, cx), np.int32)
    tile3 = np.empty((_TILE, cz), np.int64)
    for b in range(cy):
        for cc0 in range(0, cx, _TILE):
            w = min(_TILE, cx - cc0)
            _iso_pass3_tile(P2, b, cc0, w, Z, c0, c1, border, v, zb, fv, tile3, pk)
            for a in range(cz):
                for t in range(w):
                    out[a, b, cc0 + t] = tile3[t, a]
    return out


def _packed_lines(shape, c0, c1, max_distance_voxels):
    """Array and packing of the last pass's lines for a region (see :func:`_packing`)."""
    dtype, pk = _packing(max_distance_voxels ** 2)
    return np.empty((int(c1[1] - c0[1]), int(c1[2] - c0[2]), int(shape[0])), dtype), pk


def distance_core(labels, core=None, spacing=None, border=True):
    """Exact multi-label EDT on the core of a region, by the fastest exact route.

    With isotropic spacing ``s`` every squared distance is ``s^2 k`` for an integer ``k``, which
    :func:`_sq_edt3_iso` computes in integers (with contiguous lines, about as fast per voxel as
    the ``edt`` library on the whole region, on far fewer voxels); the distance is then
    ``s * sqrt(k)`` in float64 (for unit spacing exactly what scipy's
    ``distance_transform_edt`` returns). With anisotropic spacing :func:`squared_edt_core`
    (float64, offsets summed like scipy) is used.

    Parameters are those of :func:`squared_edt_core`.

    Returns
    -------
    ndarray of float64, shape of the core
        Distance in spacing units (0 on background, ``inf`` where no boundary is reachable).
    """
    lab = np.asarray(labels)
    nd = lab.ndim
    sp = (1.0,) * nd if spacing is None else tuple(float(s) for s in spacing)
    if core is None:
        core = tuple(slice(0, n) for n in lab.shape)
    if len(set(sp)) != 1:
        return np.sqrt(squared_edt_core(lab, core, sp, border))
    b = np.array([bool(border)] * (2 * nd) if np.isscalar(border) else [bool(x) for x in border], np.bool_)
    c0 = np.array([s.indices(n)[0] for s, n in zip(core, lab.shape)], np.int64)
    c1 = np.array([s.indices(n)[1] for s, n in zip(core, lab.shape)], np.int64)
    if lab.dtype == np.bool_:
        lab = lab.view(np.uint8)
    lab3 = np.ascontiguousarray(lab)[None] if nd == 2 else np.ascontiguousarray(lab)
    if nd == 2:
        c0, c1, b = np.r_[0, c0], np.r_[1, c1], np.r_[False, False, b]
    k = _sq_edt3_iso(lab3, c0, c1, b, *_packed_lines(lab3.shape, c0, c1, np.inf))
    if nd == 2:
        k = k[0]
    d = np.sqrt(k.astype(np.float64))
    d[k >= _IBIG] = np.inf
    if sp[0] != 1.0:
        d *= sp[0]
    return d


# --------------------------------------------------------------------------------------------
# anisotropic route with contiguous lines (float64, offsets carried like _sq_edt3)
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _aniso_envelope(f, i, j, lb, rb, s2, v, z, fv):
    """Lower envelope of ``s2 (q - p)^2 + f[p]`` over one run ``[i, j)``, as :func:`_envelope_line`.

    The same parabolas (zero-height ones at ``i - 1`` / ``j`` when ``lb`` / ``rb``, none where
    ``f`` is ``inf``), the same float64 intersections and comparisons in the same order, so the
    minimiser of every position is the one :func:`_sq_edt3` picks. Leaves the positions in
    ``v[0..k]`` and the intersections in ``z[0..k+1]`` (``z[k + 1] = inf``); returns ``k``
    (-1 when nothing is reachable).
    """
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
    if k >= 0:
        z[k + 1] = _INF
    return k


@njit(cache=True, nogil=True)
def _aniso_scratch(shape):
    """Envelope buffers (positions, intersections, float heights) and a float line, for lines of
    up to max(shape)."""
    n = max(shape[0], max(shape[1], shape[2]))
    return np.empty(n + 2, np.int64), np.empty(n + 3), np.empty(n + 2), np.empty(n + 1)


@njit(cache=True, nogil=True)
def _aniso_first_offsets(lab, off, n, lo_border, hi_border):
    """The offsets of :func:`_first_pass_line` alone (its squared distances follow from them)."""
    i = 0
    while i < n:
        lv = lab[i]
        j = i + 1
        while j < n and lab[j] == lv:
            j += 1
        if lv == 0:
            for q in range(i, j):
                off[q] = 0
        else:
            lb = i > 0 or lo_border
            rb = j < n or hi_border
            for q in range(i, j):
                kl = q - i + 1
                kr = j - q
                if lb and (not rb or kl <= kr):
                    off[q] = -kl
                elif rb:
                    off[q] = kr
                else:
                    off[q] = _NOFF
        i = j


@njit(cache=True, nogil=True)
def _aniso_passes12(lab, c0, c1, sy, sx, border, v, zb, fv, fl, D2, bg, unr):
    """Passes along x and y of the anisotropic route, a tile of z-planes at a time.

    Fills ``D2[b, c, a, :]`` (z contiguous) for the core's (y, x) columns and every z of the
    region with the offsets :func:`_sq_edt3` carries after its second pass: ``D2[..., 0]`` the
    y offset (``bg`` on background, ``unr`` where nothing is reachable), ``D2[..., 1]`` twice the
    x offset plus 1 where a new run of labels starts along z. The squared distances of the first
    two passes, ``(sx dx)^2`` and ``(sy dy)^2 + (sx dx)^2``, are recomputed from the offsets
    bitwise as :func:`_sq_edt3` forms them. Only a tile of planes of the first pass (its offsets)
    is held, and no label copy.
    """
    Z, Y, X = lab.shape
    cy, cx = c1[1] - c0[1], c1[2] - c0[2]
    lo, hi = c0[1], c1[1]
    sy2 = sy * sy
    orow = np.empty(X, np.int64)
    rows = np.empty((_TILE, cx), np.int64)
    T1 = np.empty((_TILE, cx, Y), np.int32)
    L1 = np.empty((_TILE, cx, Y), lab.dtype)
    prev = np.zeros((cx, cy), lab.dtype)
    tdy = np.empty((_TILE, cy), np.int64)
    tdx = np.empty((_TILE, cy), np.int64)
    for a0 in range(0, Z, _TILE):
        w = min(_TILE, Z - a0)
        # pass 1 along x for the planes a0 .. a0 + w, offsets stored (plane, x, y): y contiguous
        for t in range(w):
            a = a0 + t
            for b0 in range(0, Y, _TILE):
                wb = min(_TILE, Y - b0)
                for tb in range(wb):
                    _aniso_first_offsets(lab[a, b0 + tb], orow, X, border[4], border[5])
                    for c in range(cx):
                        rows[tb, c] = orow[c0[2] + c]
                for c in range(cx):
                    for tb in range(wb):
                        T1[t, c, b0 + tb] = rows[tb, c]
                        L1[t, c, b0 + tb] = lab[a, b0 + tb, c0[2] + c]
        # pass 2 along y on the core's x columns, for the core's y rows
        for c in range(cx):
            for t in range(w):
                L = L1[t, c]
                O = T1[t, c]
                i = 0
                while i < Y:
                    lv = L[i]
                    j = i + 1
                    while j < Y and L[j] == lv:
                        j += 1
                    if j > lo and i < hi and lv != 0:
                        for p in range(i, j):
                            o = O[p]
                            fl[p] = _INF if o == _NOFF else (sx * o) * (sx * o)
                        k = _aniso_envelope(fl, i, j, i > 0 or border[2], j < Y or border[3], sy2, v, zb, fv)
                        if k < 0:
                            for q in range(max(i, lo), min(j, hi)):
                                tdy[t, q - lo] = unr
                                tdx[t, q - lo] = 0
                        else:
                            m = 0
                            for q in range(max(i, lo), min(j, hi)):
                                while zb[m + 1] < q:
                                    m += 1
                                p = v[m]
                                tdy[t, q - lo] = p - q
                                tdx[t, q - lo] = 0 if p < i or p >= j else O[p]
                    i = j
            for b in range(cy):
                for t in range(w):
                    a = a0 + t
                    lv = L1[t, c, lo + b]
                    if lv == 0:
                        D2[b, c, a, 0] = bg
                        D2[b, c, a, 1] = 0
                    else:
                        before = L1[t - 1, c, lo + b] if t > 0 else prev[c, b]
                        D2[b, c, a, 0] = tdy[t, b]
                        D2[b, c, a, 1] = 2 * tdx[t, b] + (1 if (a == 0 or before != lv) else 0)
                prev[c, b] = L1[w - 1, c, lo + b]


@njit(cache=True, nogil=True)
def _aniso_pass3_tile(D2, b, cc0, w, Z, c0, c1, sz, sy, sx, border, v, zb, fv, fl, tile3, bg, unr):
    """Pass along z for the columns ``(b, cc0 .. cc0 + w)``: ``tile3[t, a]`` = squared distance of
    core plane ``a`` (0 on background, ``inf`` where nothing is reachable), summed from the
    offsets ``((sz dz)^2 + (sy dy)^2) + (sx dx)^2`` as :func:`_sq_edt3` does."""
    lo, hi = c0[0], c1[0]
    sz2 = sz * sz
    for t in range(w):
        Ln = D2[b, cc0 + t]
        i = 0
        while i < Z:
            j = i + 1
            if Ln[i, 0] == bg:
                while j < Z and Ln[j, 0] == bg:
                    j += 1
                for q in range(max(i, lo), min(j, hi)):
                    tile3[t, q - lo] = 0.0
                i = j
                continue
            while j < Z and Ln[j, 0] != bg and (Ln[j, 1] & 1) == 0:
                j += 1
            if j > lo and i < hi:
                for p in range(i, j):
                    dy = Ln[p, 0]
                    if dy == unr:
                        fl[p] = _INF
                    else:
                        dx = Ln[p, 1] >> 1
                        fl[p] = (sy * dy) * (sy * dy) + (sx * dx) * (sx * dx)
                k = _aniso_envelope(fl, i, j, i > 0 or border[0], j < Z or border[1], sz2, v, zb, fv)
                if k < 0:
                    for q in range(max(i, lo), min(j, hi)):
                        tile3[t, q - lo] = _INF
                else:
                    m = 0
                    for q in range(max(i, lo), min(j, hi)):
                        while zb[m + 1] < q:
                            m += 1
                        p = v[m]
                        dz = p - q
                        if p < i or p >= j:
                            dy, dx = 0, 0
                        else:
                            dy, dx = Ln[p, 0], Ln[p, 1] >> 1
                        tile3[t, q - lo] = ((sz * dz) * (sz * dz) + (sy * dy) * (sy * dy)) + (sx * dx) * (sx * dx)
            i = j


def _aniso_lines(shape, c0, c1):
    """The anisotropic route's last-pass lines ``D2[b, c, a, (y offset, x offset and run start)]``
    and their markers ``(background, unreachable)``: int16 for regions under 16,000 voxels a side,
    else int32."""
    dtype = np.int16 if max(shape) < 16000 else np.int32
    lo = np.iinfo(dtype).min
    cy, cx, Z = int(c1[1] - c0[1]), int(c1[2] - c0[2]), int(shape[0])
    return np.empty((cy, cx, Z, 2), dtype), np.int64(lo), np.int64(lo + 1)


@njit(cache=True, nogil=True)
def _sq_edt3_aniso(lab, c0, c1, sz, sy, sx, border, D2, bg, unr):
    """:func:`_sq_edt3` with every line contiguous (same values to the bit; 3D only)."""
    Z = lab.shape[0]
    cz, cy, cx = c1[0] - c0[0], c1[1] - c0[1], c1[2] - c0[2]
    v, zb, fv, fl = _aniso_scratch(lab.shape)
    _aniso_passes12(lab, c0, c1, sy, sx, border, v, zb, fv, fl, D2, bg, unr)
    out = np.empty((cz, cy, cx))
    tile3 = np.empty((_TILE, cz))
    for b in range(cy):
        for cc0 in range(0, cx, _TILE):
            w = min(_TILE, cx - cc0)
            _aniso_pass3_tile(D2, b, cc0, w, Z, c0, c1, sz, sy, sx, border, v, zb, fv, fl, tile3, bg, unr)
            for a in range(cz):
                for t in range(w):
                    out[a, b, cc0 + t] = tile3[t, a]
    return out
