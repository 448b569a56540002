"""Numba kernels of the out-of-core watershed (:mod:`grapes_dask.segmentation`): pure functions on
numpy blocks, no dask inside.

The watershed is defined locally so that a block computed with enough halo gives exactly what
the whole volume gives:

- every foreground voxel points to its steepest-ascent neighbour among its 26 foreground
  neighbours, comparing ``(S, global flat index)`` so that the order is strict (no plateaus);
  a voxel with no higher neighbour is a *root* (a regional maximum of the smoothed distance map
  ``S``), and a *seed* voxel (seeded mode) is a root of its own;
- a voxel's *basin* is the root its ascent path reaches (tobogganing). A path that reaches the
  cut face of the region (where a neighbour outside the region could be higher) is *unresolved*:
  the caller retries with a larger halo, so a result is never a guess;
- basins that touch are joined by an edge whose *saddle* is the largest ``min(S(p), S(q))`` over
  their touching voxel pairs (26-neighbourhood); each pair is owned by the block holding its
  first voxel, so the per-block edge lists combine by maximum into the global graph.

Keys: a root's key is its global flat index + 1 (positive, unique in the volume, independent of
the chunking); a seed voxel's key is minus its seed label.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["steepest_ascent", "resolve_basins", "basin_edges", "ball_offsets", "roots_are_ball_max", "merge_basins"]

_BG = np.int32(-3)  # background voxel
_UNKNOWN = np.int32(-1)  # parent not computable in this region (on a cut face)
_UNSEEN = np.int32(-2)


@njit(cache=True, nogil=True)
def _higher(sa, ia, sb, ib):
    """True when (sa, ia) > (sb, ib) in the strict order of the watershed."""
    return sa > sb or (sa == sb and ia > ib)


@njit(cache=True, nogil=True)
def steepest_ascent(S, fg, seed, origin, full, cut):
    """Steepest-ascent parent of every foreground voxel of a region.

    Parameters
    ----------
    S : ndarray of float32, shape (Z, Y, X)
        Smoothed distance map of the region.
    fg : ndarray of uint8, shape (Z, Y, X)
        Foreground mask.
    seed : ndarray of int64, shape (Z, Y, X) or (1, 1, 1)
        Seed labels (0: no seed); a (1, 1, 1) array means no seeds.
    origin : ndarray of int64, shape (3,)
        Position of the region's first voxel in the volume.
    full : ndarray of int64, shape (3,)
        Shape of the volume.
    cut : ndarray of bool, shape (6,)
        Whether each region side (low z, high z, low y, high y, low x, high x) lies inside the
        volume (a cut) rather than on the volume border.

    Returns
    -------
    ndarray of int32, shape (Z, Y, X)
        Flat index (in the region) of the parent; the voxel itself for a root or a seed;
        -1 on a cut face (unknown); -3 on background.
    """
    nz, ny, nx = S.shape
    has_seed = seed.shape[0] == nz and seed.shape[1] == ny and seed.shape[2] == nx
    par = np.empty((nz, ny, nx), np.int32)
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                p = (z * ny + y) * nx + x
                if fg[z, y, x] == 0:
                    par[z, y, x] = _BG
                    continue
                if has_seed and seed[z, y, x] != 0:
                    par[z, y, x] = p
                    continue
                if ((z == 0 and cut[0]) or (z == nz - 1 and cut[1]) or (y == 0 and cut[2])
                        or (y == ny - 1 and cut[3]) or (x == 0 and cut[4]) or (x == nx - 1 and cut[5])):
                    par[z, y, x] = _UNKNOWN
                    continue
                # window-flat and global-flat indices are both raster orders: they order voxels alike
                bs = S[z, y, x]
                best = p
                for dz in range(-1, 2):
                    zz = z + dz
                    if zz < 0 or zz >= nz:
                        continue
                    for dy in range(-1, 2):
                        yy = y + dy
                        if yy < 0 or yy >= ny:
                            continue
                        for dx in range(-1, 2):
                            xx = x + dx
                            if xx < 0 or xx >= nx or (dz == 0 and dy == 0 and dx == 0):
                                continue
                            if fg[zz, yy, xx] == 0:
                                continue
                            s = S[zz, yy, xx]
                            q = (zz * ny + yy) * nx + xx
                            if s > bs or (s == bs and q > best):
                                bs = s
                                best = q
                par[z, y, x] = best
    return par


@njit(cache=True, nogil=True)
def resolve_basins(par, seed, lo, hi, c0, c1, origin, full):
    """Basin key of every foreground voxel of the box ``lo:hi`` of a region, and the number of
    voxels of its core ``c0:c1`` (inside the box) in each basin.

    Parameters
    ----------
    par : ndarray of int32, shape (Z, Y, X)
        Parents from :func:`steepest_ascent`.
    seed : ndarray of int64
        As for :func:`steepest_ascent`.
    lo, hi : ndarray of int64, shape (3,)
        The box, in region voxels.
    c0, c1 : ndarray of int64, shape (3,)
        The core, in region voxels (inside the box).
    origin, full : ndarray of int64, shape (3,)
        As for :func:`steepest_ascent`.

    Returns
    -------
    keys : ndarray of int64, shape ``hi - lo``
        Root key (global flat index + 1), minus the seed label for a seeded basin, 0 on
        background.
    unresolved : int
        Number of foreground voxels of the box whose path reaches a cut face (their key is 0).
    roots : ndarray of int64, shape (R,)
        Region-flat index of each root reached from the core.
    counts : ndarray of int64, shape (R,)
        Core voxels of each of those basins.
    """
    nz, ny, nx = par.shape
    has_seed = seed.shape[0] == nz and seed.shape[1] == ny and seed.shape[2] == nx
    flat = par.ravel()
    n = flat.size
    res = np.full(n, _UNSEEN, np.int32)
    cnt = np.zeros(n, np.int32)
    stack = np.empty(64, np.int32)
    keys = np.zeros((hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]), np.int64)
    FY = full[1]
    FX = full[2]
    unresolved = 0
    for z in range(lo[0], hi[0]):
        for y in range(lo[1], hi[1]):
            for x in range(lo[2], hi[2]):
                v = (z * ny + y) * nx + x
                if flat[v] == _BG:
                    continue
                top = 0
                u = v
                while res[u] == _UNSEEN and flat[u] != u and flat[u] >= 0:
                    if top == stack.size:
                        grown = np.empty(stack.size * 2, np.int32)
                        grown[:top] = stack[:top]
                        stack = grown
                    stack[top] = u
                    top += 1
                    u = flat[u]
                if res[u] != _UNSEEN:
                    r = res[u]
                elif flat[u] == u:
                    r = u
                else:
                    r = _UNKNOWN
                res[u] = r
                for k in range(top):
                    res[stack[k]] = r
                if r < 0:
                    unresolved += 1
                    continue
                if c0[0] <= z < c1[0] and c0[1] <= y < c1[1] and c0[2] <= x < c1[2]:
                    cnt[r] += 1
                rz = r // (ny * nx)
                ry = (r // nx) % ny
                rx = r % nx
                if has_seed and seed[rz, ry, rx] != 0:
                    keys[z - lo[0], y - lo[1], x - lo[2]] = -seed[rz, ry, rx]
                else:
                    keys[z - lo[0], y - lo[1], x - lo[2]] = (
                        ((origin[0] + rz) * FY + (origin[1] + ry)) * FX + (origin[2] + rx) + 1)
    m = 0
    for i in range(n):
        if cnt[i] > 0:
            m += 1
    roots = np.empty(m, np.int64)
    counts = np.empty(m, np.int64)
    m = 0
    for i in range(n):
        if cnt[i] > 0:
            roots[m] = i
            counts[m] = cnt[i]
            m += 1
    return keys, unresolved, roots, counts


@njit(cache=True, nogil=True)
def _edge_pass(K, S, c0, c1, a, b, sd, write):
    """The touching voxel pairs of the core: counted, and written to `a, b, sd` when `write`."""
    nz, ny, nx = K.shape
    n = 0
    for z in range(c0[0], c1[0]):
        for y in range(c0[1], c1[1]):
            for x in range(c0[2], c1[2]):
                ka = K[z, y, x]
                if ka == 0:
                    continue
                for o in range(13):
                    dz = 1 if o < 9 else 0
                    dy = (o // 3) - 1 if o < 9 else (1 if o < 12 else 0)
                    dx = (o % 3) - 1 if o < 12 else 1
                    zz = z + dz
                    yy = y + dy
                    xx = x + dx
                    if zz >= nz or yy < 0 or yy >= ny or xx < 0 or xx >= nx:
                        continue
                    kb = K[zz, yy, xx]
                    if kb == 0 or kb == ka:
                        continue
                    if write:
                        a[n] = min(ka, kb)
                        b[n] = max(ka, kb)
                        sd[n] = min(S[z, y, x], S[zz, yy, xx])
                    n += 1
    return n


@njit(cache=True, nogil=True)
def basin_edges(K, S, c0, c1):
    """Touching pairs of basins owned by the core ``c0:c1`` of a key array, with their saddle.

    Parameters
    ----------
    K : ndarray of int64, shape (Z, Y, X)
        Basin keys of the core and one voxel around it (0: background or outside the volume).
    S : ndarray of float32, shape (Z, Y, X)
        Smoothed distance map on the same box.
    c0, c1 : ndarray of int64, shape (3,)
        The core inside `K`.

    Returns
    -------
    a, b : ndarray of int64, shape (E,)
        Keys of each touching voxel pair, ``a < b`` (one row per pair of voxels: the caller
        reduces them by pair).
    saddle : ndarray of float32, shape (E,)
        ``min(S(p), S(q))`` of the voxel pair.

    Notes
    -----
    A pair of 26-neighbours ``p, q = p + o`` belongs to the block that holds ``p``, for the 13
    offsets ``o`` that come after ``(0, 0, 0)`` in raster order, so every pair of the volume is
    listed by exactly one block.
    """
    none_i = np.empty(0, np.int64)
    n = _edge_pass(K, S, c0, c1, none_i, none_i, np.empty(0, np.float32), False)
    a = np.empty(n, np.int64)
    b = np.empty(n, np.int64)
    sd = np.empty(n, np.float32)
    _edge_pass(K, S, c0, c1, a, b, sd, True)
    return a, b, sd


def ball_offsets(radius, spacing):
    """Voxel offsets of the ball of `radius` (spacing units) around a voxel, the centre excluded.

    Returns an int64 array of shape (M, 3).
    """
    sp = np.asarray(spacing, float)
    r = np.floor(radius / sp + 1e-9).astype(int)
    g = np.mgrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1, -r[2]:r[2] + 1].reshape(3, -1).T
    d2 = ((g * sp) ** 2).sum(1)
    keep = (d2 <= radius * radius + 1e-9) & (d2 > 0)
    return np.ascontiguousarray(g[keep], dtype=np.int64)


@njit(cache=True, nogil=True)
def roots_are_ball_max(S, fg, roots, offsets, origin, full):
    """Whether each root is the highest voxel (strict order) of its ball of foreground voxels.

    Parameters
    ----------
    S, fg : ndarray, shape (Z, Y, X)
        As for :func:`steepest_ascent`.
    roots : ndarray of int64, shape (R, 3)
        Root positions in the region; their balls must lie in the region or end at the volume
        border.
    offsets : ndarray of int64, shape (M, 3)
        From :func:`ball_offsets`.
    origin, full : ndarray of int64, shape (3,)

    Returns
    -------
    ndarray of bool, shape (R,)
    """
    nz, ny, nx = S.shape
    FY = full[1]
    FX = full[2]
    out = np.ones(roots.shape[0], np.bool_)
    for k in range(roots.shape[0]):
        z = roots[k, 0]
        y = roots[k, 1]
        x = roots[k, 2]
        s0 = S[z, y, x]
        i0 = ((origin[0] + z) * FY + (origin[1] + y)) * FX + (origin[2] + x)
        for m in range(offsets.shape[0]):
            zz = z + offsets[m, 0]
            yy = y + offsets[m, 1]
            xx = x + offsets[m, 2]
            if zz < 0 or zz >= nz or yy < 0 or yy >= ny or xx < 0 or xx >= nx:
                continue
            if fg[zz, yy, xx] == 0:
                continue
            i = ((origin[0] + zz) * FY + (origin[1] + yy)) * FX + (origin[2] + xx)
            if _higher(S[zz, yy, xx], i, s0, i0):
                out[k] = False
                break
    return out


@njit(cache=True, nogil=True)
def _find(parent, a):
    r = a
    while parent[r] != r:
        r = parent[r]
    while parent[a] != r:
        nxt = parent[a]
        parent[a] = r
        a = nxt
    return r


@njit(cache=True, nogil=True)
def merge_basins(n, ea, eb, saddle, peak, marked, dynamics, h):
    """Union-find merge of basins along their edges, highest saddle first.

    Parameters
    ----------
    n : int
        Number of basins (nodes ``0..n-1``), numbered in the strict order of their roots
        (a higher node index is a higher root at equal peak).
    ea, eb : ndarray of int64, shape (E,)
        Node indices of each edge, sorted by decreasing saddle (ties in a fixed order).
    saddle : ndarray of float64, shape (E,)
        Saddle of each edge, in the same order.
    peak : ndarray of float64, shape (n,)
        Height of each basin's root (``inf`` for seeds).
    marked : ndarray of bool, shape (n,)
        Basins that are markers from the start (local maxima within the footprint, or seeds).
    dynamics : bool
        True: an unmarked basin becomes a marker when its dynamics (peak - saddle where it first
        meets a higher region) is at least `h` (h-maxima markers), and joins that region
        otherwise. False: only the given markers count; an unmarked region joins the region it
        meets first.
    h : float
        Dynamics threshold, spacing units (with `dynamics`).

    Returns
    -------
    ndarray of int64, shape (n,)
        Representative node of each basin's final region (the node of its highest root).

    Notes
    -----
    This is Kruskal's algorithm on the basin graph with two markers never joined: the
    minimum-spanning-forest form of the marker-controlled watershed (flooding from the markers,
    each region taken by the marker whose flood reaches it over the highest pass).
    """
    parent = np.arange(n)
    top = np.arange(n)  # per representative: node of the region's highest root
    mk = marked.copy()
    for e in range(ea.size):
        ra = _find(parent, ea[e])
        rb = _find(parent, eb[e])
        if ra == rb:
            continue
        ta = top[ra]
        tb = top[rb]
        if peak[ta] > peak[tb] or (peak[ta] == peak[tb] and ta > tb):
            hi, lo = ra, rb
        else:
            hi, lo = rb, ra
        if mk[hi] and mk[lo]:
            continue
        if dynamics:
            if mk[lo] or peak[top[lo]] - saddle[e] >= h:
                # the lower region is significant, and so is the higher one (its dynamics
                # is at least as large): both stay
                mk[lo] = True
                mk[hi] = True
                continue
            keep, gone = hi, lo
        elif mk[lo] and not mk[hi]:
            keep, gone = lo, hi  # the unmarked region is flooded from the marked one
        else:
            keep, gone = hi, lo
        parent[gone] = keep
        if peak[top[gone]] > peak[top[keep]] or (peak[top[gone]] == peak[top[keep]] and top[gone] > top[keep]):
            top[keep] = top[gone]
        mk[keep] = mk[keep] or mk[gone]
    out = np.empty(n, np.int64)
    for i in range(n):
        out[i] = top[_find(parent, i)]
    return out
