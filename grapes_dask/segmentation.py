"""Out-of-core segmentation of a grey volume into particles (the paper's section 2.2).

Stages (each bounded in memory by a few blocks; intermediates are Zarr arrays in a work folder):

1. **threshold**: Otsu's threshold of the whole histogram (integer grey levels up to 16 bits)
   or of a fixed strided sample (other dtypes), unless one is given; a threshold that leaves no
   foreground, or no background, is refused here, before the heavy stages;
2. **mask**: ``grey > threshold``, binary closing then opening with balls (the paper's
   "erosion and dilation" that close holes and remove islands), blockwise with the overlap they
   need; cavities enclosed by foreground are filled by labelling the background
   (:func:`dask_image.ndmeasure.label`, whose face-merging table is small: background pieces
   only);
3. **distance map**: exact Euclidean distance to the background per block
   (:func:`grapes_dask.kernels.distance.distance_core`) with a halo that grows until every
   distance in the block is certified exact, then Gaussian smoothing (`smoothing`) with its own
   margin: the stored map ``S`` equals the whole-volume computation voxel for voxel;
4. **basins**: every foreground voxel climbs to its steepest-ascent 26-neighbour of ``S``
   (ties broken by the global voxel index) until a regional maximum (a *root*) or, with
   `seeds`, a seed voxel; a path that would leave the block's window makes the window grow;
   each block also lists its basins' sizes and peaks and the touching basin pairs with their
   saddle heights (partial reductions combined by key);
5. **markers and merging** (client, one row per basin): Kruskal's algorithm on the basin graph,
   highest saddle first, never joining two markers. Markers are the basins whose peak
   *dynamics* is at least `h` (``markers="dynamics"``, h-maxima), the maxima that are the
   highest point within `min_distance` (``markers="local_max"``, like scikit-image's
   ``peak_local_max``), or the seeds (``seeds=``: reference labels, each particle keeps its
   id and a basin that no seed reaches stays unlabelled);
6. **labels**: basins mapped to particle ids (numbered in raster order of their peaks, or the
   seed labels) and written to the output Zarr with the parameters, threshold and counts as
   provenance; particles smaller than `min_size` voxels are removed (islands).

Every stage gives the same voxels whatever the chunking, because each block's result is either
certified exact for its core or recomputed with a larger window; the tests check this against
the single-block run and against scipy / scikit-image references.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from ._errors import GrapesInputError
from .kernels import watershed as _ws

__all__ = ["segment", "Segmentation", "otsu_threshold", "check_seeds"]

_MAX_HALO = 512  # voxels: a window that would need more is an error (threshold or smoothing wrong)


@dataclass(frozen=True)
class Segmentation:
    """Result of :func:`segment`.

    Attributes
    ----------
    labels : numpy.ndarray or dask.array.Array
        Particle labels, shape of the grey volume (uint32, or the seeds' dtype); 0 is
        background. A dask array reading `path` when an output was written, else numpy.
    path : pathlib.Path or None
        The written Zarr array.
    threshold : float
        Grey level used: foreground is ``grey > threshold`` (``<`` with `invert`).
    n_particles : int
        Number of particles in `labels`.
    n_basins : int
        Number of basins before merging (regional maxima of the smoothed distance map, plus
        seed labels).
    n_removed : int
        Particles removed for having fewer than `min_size` voxels.
    unlabelled_voxels : int
        Foreground voxels left at 0: in removed particles, or (with seeds) in basins that no
        seed reaches.
    params : dict
        Every parameter, as used (spacing, smoothing in voxels, halos, chunking).
    timings : dict
        Seconds per stage.
    """

    labels: Any
    path: Path | None
    threshold: float
    n_particles: int
    n_basins: int
    n_removed: int
    unlabelled_voxels: int
    params: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# stage 1: threshold
# --------------------------------------------------------------------------------------------


def _histogram_block(b, minlength, offset):
    return np.bincount((np.asarray(b).ravel().astype(np.int64) - offset), minlength=minlength)


def _grey_histogram(arr: da.Array):
    """Exact histogram of integer grey levels (<= 16 bits), lazily: (counts, level of bin 0)."""
    info = np.iinfo(arr.dtype)
    n = int(info.max) - int(info.min) + 1
    parts = [dask.delayed(_histogram_block, pure=True)(b, n, int(info.min)) for b in arr.to_delayed().ravel()]
    while len(parts) > 1:  # a tree of sums, 8 at a time
        parts = [dask.delayed(sum, pure=True)(parts[i:i + 8]) for i in range(0, len(parts), 8)]
    return parts[0], int(info.min)


def _sample(arr: da.Array, target: float = 2.0e7) -> da.Array:
    step = max(1, math.ceil((arr.size / target) ** (1.0 / arr.ndim)))
    return arr[tuple(slice(None, None, step) for _ in range(arr.ndim))]


def otsu_threshold(grey, *, compute=dask.compute) -> float:
    """Otsu's threshold of a grey volume, out of core.

    Parameters
    ----------
    grey : array-like or path
        Anything :func:`grapes_dask.io.resolve_volume` opens.

    Returns
    -------
    float
        Threshold in grey levels: Otsu's between-class variance is largest for
        ``grey > threshold``. From the exact histogram for integer grey levels of up to 16
        bits; otherwise from a fixed strided sample of about 2x10^7 voxels (the same voxels
        whatever the chunking).
    """
    from skimage.filters import threshold_otsu

    from .io import resolve_volume

    arr = resolve_volume(grey).array
    if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2:
        parts, lo = _grey_histogram(arr)
        (parts,) = compute(parts)
        return _otsu_from_hist(parts, lo)
    (s,) = compute(_sample(arr))
    s = s[np.isfinite(s)]
    if s.size == 0 or s.min() == s.max():
        raise GrapesInputError("the grey volume is constant (or not finite): no threshold separates particles from "
                               "the background; check the input")
    return float(threshold_otsu(s))


def _otsu_from_hist(counts: np.ndarray, lo: int) -> float:
    from skimage.filters import threshold_otsu

    nz = np.flatnonzero(counts)
    if nz.size < 2:
        raise GrapesInputError("the grey volume has a single grey level: no threshold separates particles from the "
                               "background; check the input")
    c = counts[nz[0]:nz[-1] + 1]
    centres = np.arange(nz[0], nz[-1] + 1) + lo
    return float(threshold_otsu(hist=(c, centres)))


# --------------------------------------------------------------------------------------------
# stage 2: mask
# --------------------------------------------------------------------------------------------


def _ball(r: int) -> np.ndarray:
    g = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return (g ** 2).sum(0) <= r * r


def _morphology(block: np.ndarray, closing: int, opening: int) -> np.ndarray:
    """Closing then opening of a padded block (the caller trims ``2 * (closing + opening)``)."""
    from scipy import ndimage as ndi

    m = block.astype(bool)
    if closing:
        b = _ball(closing)
        m = ndi.binary_dilation(m, b)
        m = ndi.binary_erosion(m, b, border_value=1)
    if opening:
        b = _ball(opening)
        m = ndi.binary_erosion(m, b, border_value=1)
        m = ndi.binary_dilation(m, b)
    return m


def _mask(grey: da.Array, threshold: float, invert: bool, closing: int, opening: int) -> da.Array:
    """Threshold, closing, opening (lazy, blockwise with the overlap the balls need)."""
    fg = grey < threshold if invert else grey > threshold
    d = 2 * (closing + opening)
    if d:
        axes = [i for i in range(fg.ndim) if fg.shape[i] > 1]  # a 2D image is one plane: no depth along z
        if any(min(fg.chunks[i]) < d for i in axes):
            fg = fg.rechunk({i: max(d, max(fg.chunks[i])) for i in axes})
        depth = {i: (d if i in axes else 0) for i in range(fg.ndim)}
        fg = fg.map_overlap(_morphology, depth=depth, boundary="nearest", dtype=bool, closing=closing,
                            opening=opening)
    return fg


def _bg_pieces_task(fg0_path: str, lo, hi, shape, pieces_path: str):
    """Background pieces of one block (6-connected, numbered 1..n in the block), stored; returns
    the pieces that touch a face of the volume."""
    import cc3d
    import zarr

    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    bg = np.asarray(zarr.open_array(fg0_path, mode="r")[sl]) == 0
    lab = cc3d.connected_components(bg, connectivity=6, out_dtype=np.uint32)
    zarr.open_array(pieces_path, mode="r+")[sl] = lab
    border = []
    for ax in range(3):
        if lo[ax] == 0:
            border.append(np.take(lab, 0, axis=ax).ravel())
        if hi[ax] == shape[ax]:
            border.append(np.take(lab, -1, axis=ax).ravel())
    b = np.unique(np.concatenate(border)) if border else np.zeros(0, np.uint32)
    return b[b != 0], int(lab.max()) if lab.size else 0


def _face_pairs_task(pieces_path: str, ax: int, at: int, lo, hi):
    """Pairs of background pieces that meet across the block face at ``at`` along axis `ax`."""
    import zarr

    z = zarr.open_array(pieces_path, mode="r")
    a_sl = [slice(a, b) for a, b in zip(lo, hi)]
    b_sl = list(a_sl)
    a_sl[ax] = slice(at - 1, at)
    b_sl[ax] = slice(at, at + 1)
    a = np.asarray(z[tuple(a_sl)]).ravel()
    b = np.asarray(z[tuple(b_sl)]).ravel()
    both = (a != 0) & (b != 0)
    if not both.any():
        return np.zeros((0, 2), np.uint32)
    return np.unique(np.stack([a[both], b[both]], 1), axis=0)


def _fill_task(fg0_path: str, lo, hi, pieces_path: str, holes: np.ndarray):
    import zarr

    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    fg = np.asarray(zarr.open_array(fg0_path, mode="r")[sl]) != 0
    if holes.size:
        fg |= np.isin(np.asarray(zarr.open_array(pieces_path, mode="r")[sl]), holes)
    return fg.astype(np.uint8)


def _fill_holes(work: Path, fg0_path: Path, shape, ch, run) -> Path:
    """Fill the background cavities of the stored mask that no 6-connected background path links
    to a face of the volume.

    1. each block's background pieces (cc3d, 6-connected), stored with per-block numbers, and
       those that touch a volume face;
    2. for every face between two blocks, the pairs of pieces that meet across it;
    3. (client) union-find of the pieces, one node per (block, piece): the pieces joined to a
       volume face are open, the others are cavities;
    4. each block's mask or-ed with its cavities, stored.
    """
    import zarr
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pieces = work / "bg_pieces.zarr"
    zarr.create_array(str(pieces), shape=shape, chunks=tuple(c[0] for c in ch), dtype="uint32", fill_value=0,
                      overwrite=True)
    blocks = list(_blocks(shape, ch))
    nb = [len(c) for c in ch]
    res = run(*[dask.delayed(_bg_pieces_task, pure=True)(str(fg0_path), lo, hi, shape, str(pieces))
                for _, lo, hi in blocks], desc="segment: background pieces")
    border = [r[0] for r in res]
    counts = [r[1] for r in res]
    base = np.r_[0, np.cumsum(np.asarray(counts, np.int64))]
    flat_index = {idx: k for k, (idx, _, _) in enumerate(blocks)}
    face_tasks, face_blocks = [], []
    for idx, lo, hi in blocks:
        for ax in range(3):
            if idx[ax] + 1 < nb[ax]:
                nidx = tuple(i + (1 if a == ax else 0) for a, i in enumerate(idx))
                flo = list(lo)
                fhi = list(hi)
                fhi[ax] = hi[ax] + 1
                face_tasks.append(dask.delayed(_face_pairs_task, pure=True)(str(pieces), ax, hi[ax], flo, fhi))
                face_blocks.append((flat_index[idx], flat_index[nidx]))
    pairs = run(*face_tasks, desc="segment: piece faces") if face_tasks else []
    n = int(base[-1])
    src = [np.zeros(0, np.int64)]
    dst = [np.zeros(0, np.int64)]
    for (ka, kb), pr in zip(face_blocks, pairs):
        src.append(base[ka] + pr[:, 0].astype(np.int64) - 1)
        dst.append(base[kb] + pr[:, 1].astype(np.int64) - 1)
    src, dst = np.concatenate(src), np.concatenate(dst)
    g = coo_matrix((np.ones(src.size, np.int8), (src, dst)), shape=(n, n))
    _, comp = connected_components(g, directed=False)
    open_ = np.zeros(comp.max() + 1 if n else 0, bool)
    for k, b in enumerate(border):
        open_[comp[base[k] + b.astype(np.int64) - 1]] = True
    is_hole = ~open_[comp] if n else np.zeros(0, bool)
    out = work / "fg.zarr"
    holes_of = [np.flatnonzero(is_hole[base[k]:base[k + 1]]).astype(np.uint32) + 1 for k in range(len(blocks))]
    name = "grapes-seg-fill-" + dask.base.tokenize(str(fg0_path), shape, ch, n)
    dsk = {(name,) + idx: (_fill_task, str(fg0_path), lo, hi, str(pieces), holes_of[k])
           for k, (idx, lo, hi) in enumerate(blocks)}
    filled = da.Array(dsk, name, chunks=ch, dtype=np.uint8)
    run(da.to_zarr(filled, str(out), overwrite=True, compute=False), desc="segment: fill holes")
    return out


# --------------------------------------------------------------------------------------------
# stage 3: smoothed distance map
# --------------------------------------------------------------------------------------------


def _gauss_radius(sigma_vox) -> np.ndarray:
    # scipy's gaussian_filter1d radius: int(truncate * sd + 0.5), truncate 4
    return np.array([int(4.0 * s + 0.5) if s > 0 else 0 for s in sigma_vox], np.int64)


def _window(lo, hi, shape, pad_lo, pad_hi):
    wlo = np.maximum(np.asarray(lo) - pad_lo, 0)
    whi = np.minimum(np.asarray(hi) + pad_hi, shape)
    return wlo, whi


def _distance_task(fg_path: str, lo, hi, shape, spacing, sigma_vox, halo0):
    """Smoothed distance map on the block ``lo:hi``, exact: the halo grows until certified."""
    import zarr

    from .kernels.distance import distance_core

    fgz = zarr.open_array(fg_path, mode="r")
    shape = np.asarray(shape)
    lo, hi = np.asarray(lo), np.asarray(hi)
    g = _gauss_radius(sigma_vox)
    sp = np.asarray(spacing, float)
    h = np.asarray(halo0, np.int64)
    while True:
        ilo, ihi = _window(lo, hi, shape, g, g)  # the box whose distances the smoothing reads
        wlo, whi = _window(ilo, ihi, shape, h, h)
        win = np.asarray(fgz[tuple(slice(a, b) for a, b in zip(wlo, whi))]).astype(np.uint8)
        inner = tuple(slice(a - w, b - w) for a, b, w in zip(ilo, ihi, wlo))
        d = distance_core(win, core=inner, spacing=tuple(sp), border=False)
        need = _halo_needed(d, sp)
        cut_lo, cut_hi = wlo > 0, whi < shape
        room = np.minimum(np.where(cut_lo, ilo - wlo, 1 << 40), np.where(cut_hi, whi - ihi, 1 << 40))
        if np.all(need <= room):
            break
        if np.any(need > _MAX_HALO):
            raise GrapesInputError(
                "a foreground region is too thick for the distance map (inscribed radius beyond "
                f"{_MAX_HALO} voxels near voxel {tuple(int(v) for v in lo)}): the {{threshold}} probably "
                "leaves the background as foreground; check it (or invert=True for dark particles)",
                threshold=None,
            )
        h = np.maximum(h + 16, need + 4)
    if any(s > 0 for s in sigma_vox):
        from scipy import ndimage as ndi

        d = ndi.gaussian_filter(d, sigma_vox, mode="nearest", truncate=4.0)
    core = tuple(slice(a - i, b - i) for a, b, i in zip(lo, hi, ilo))
    S = d[core].astype(np.float32)
    S[win[tuple(slice(a - w, b - w) for a, b, w in zip(lo, hi, wlo))] == 0] = 0
    return S


def _halo_needed(d: np.ndarray, sp: np.ndarray) -> np.ndarray:
    m = float(d.max()) if d.size else 0.0
    if not np.isfinite(m):
        return np.full(sp.shape, 1 << 30, np.int64)
    return np.ceil(m / sp - 1e-9).astype(np.int64) + 1


# --------------------------------------------------------------------------------------------
# stage 4: basins
# --------------------------------------------------------------------------------------------


def _basin_task(paths: dict, lo, hi, shape, halo0, ball, basins_path):
    """Basin keys of the block ``lo:hi`` (written to the basins store) and its partials."""
    import zarr

    Sz = zarr.open_array(paths["S"], mode="r")
    fgz = zarr.open_array(paths["fg"], mode="r")
    sdz = zarr.open_array(paths["seeds"], mode="r") if paths.get("seeds") else None
    shape = np.asarray(shape, np.int64)
    lo, hi = np.asarray(lo, np.int64), np.asarray(hi, np.int64)
    rb = int(np.abs(ball).max()) if ball.size else 0
    h = np.maximum(np.asarray(halo0, np.int64), rb + 1)
    # the key box: the core and one voxel around it (edges reach one voxel out)
    klo, khi = _window(lo, hi, shape, 1, 1)
    while True:
        wlo, whi = _window(klo, khi, shape, h, h)
        sl = tuple(slice(a, b) for a, b in zip(wlo, whi))
        S = np.ascontiguousarray(Sz[sl], dtype=np.float32)
        fg = np.ascontiguousarray(fgz[sl], dtype=np.uint8)
        seed = np.ascontiguousarray(sdz[sl], dtype=np.int64) if sdz is not None else np.zeros((1, 1, 1), np.int64)
        cut = np.array([wlo[0] > 0, whi[0] < shape[0], wlo[1] > 0, whi[1] < shape[1], wlo[2] > 0,
                        whi[2] < shape[2]])
        par = _ws.steepest_ascent(S, fg, seed, wlo, shape, cut)
        K, unresolved, roots, counts = _ws.resolve_basins(par, seed, klo - wlo, khi - wlo, lo - wlo, hi - wlo, wlo,
                                                          shape)
        if unresolved == 0:
            break
        if np.any(h * 2 > _MAX_HALO):
            raise GrapesInputError(
                f"an ascent path of the distance map runs beyond {_MAX_HALO} voxels near voxel "
                f"{tuple(int(v) for v in lo)}: the foreground is probably one slab; check the {{threshold}}",
                threshold=None)
        h = h * 2
    del par
    c0, c1 = lo - klo, hi - klo
    Sk = S[tuple(slice(a - w, b - w) for a, b, w in zip(klo, khi, wlo))]
    ea, eb, es = _ws.basin_edges(K, np.ascontiguousarray(Sk), c0, c1)
    ea, eb, es = _reduce_edges(ea, eb, es)
    Kc = K[tuple(slice(a, b) for a, b in zip(c0, c1))]
    # the basins of the core: root keys, sizes, peaks, and whether the root is a footprint maximum
    loc = np.stack(np.unravel_index(roots, S.shape), 1).astype(np.int64)
    sv = seed.ravel()[roots] if seed.shape == S.shape else np.zeros(roots.size, np.int64)
    gpos = loc + wlo
    keys = np.where(sv != 0, -sv, np.ravel_multi_index(tuple(gpos.T), tuple(shape)) + 1) if roots.size else \
        np.zeros(0, np.int64)
    peaks = np.where(sv != 0, np.inf, S.ravel()[roots].astype(np.float64))
    marked = np.zeros(roots.size, np.int8)
    if ball.size and roots.size:
        own = (sv == 0) & np.all((gpos >= lo) & (gpos < hi), axis=1)
        marked[:] = -1
        if own.any():
            marked[own] = _ws.roots_are_ball_max(S, fg, np.ascontiguousarray(loc[own]), ball, wlo, shape)
    if keys.size:  # seeded basins: every seed voxel is a root of the same key
        keys, first, inv = np.unique(keys, return_index=True, return_inverse=True)
        counts = np.bincount(inv, weights=counts, minlength=keys.size).astype(np.int64)
        peaks, marked = peaks[first], marked[first]
    zarr.open_array(basins_path, mode="r+")[tuple(slice(a, b) for a, b in zip(lo, hi))] = Kc
    return {"ea": ea, "eb": eb, "es": es, "keys": keys, "counts": counts, "peaks": peaks, "marked": marked,
            "halo": int(h.max())}


def _reduce_edges(a, b, s):
    if a.size == 0:
        return a, b, s
    o = np.lexsort((b, a))
    a, b, s = a[o], b[o], s[o]
    start = np.r_[0, np.flatnonzero((np.diff(a) != 0) | (np.diff(b) != 0)) + 1]
    return a[start], b[start], np.maximum.reduceat(s, start)


# --------------------------------------------------------------------------------------------
# stage 5: merge (client)
# --------------------------------------------------------------------------------------------


def _combine(parts: list, markers: str, h: float, min_size: int, seeded: bool):
    keys = np.concatenate([p["keys"] for p in parts])
    counts = np.concatenate([p["counts"] for p in parts])
    peaks = np.concatenate([p["peaks"] for p in parts])
    marked = np.concatenate([p["marked"] for p in parts])
    ukeys, inv = np.unique(keys, return_inverse=True)
    n = ukeys.size
    size = np.bincount(inv, weights=counts, minlength=n).astype(np.int64)
    peak = np.full(n, -np.inf)
    ok = ~np.isnan(peaks)
    np.maximum.at(peak, inv[ok], peaks[ok])
    mk = np.zeros(n, np.int8)
    np.maximum.at(mk, inv, marked)
    is_seed = ukeys < 0
    peak[is_seed] = np.inf
    ea = np.concatenate([p["ea"] for p in parts])
    eb = np.concatenate([p["eb"] for p in parts])
    es = np.concatenate([p["es"] for p in parts]).astype(np.float64)
    ea, eb, es = _reduce_edges(ea, eb, es)
    ia = np.searchsorted(ukeys, ea)
    ib = np.searchsorted(ukeys, eb)
    o = np.lexsort((ib, ia, -es))
    if seeded:
        start_marked = is_seed
        dynamics = False
    elif markers == "local_max":
        start_marked = mk > 0
        dynamics = False
    else:
        start_marked = np.zeros(n, bool)
        dynamics = True
    rep = _ws.merge_basins(n, ia[o], ib[o], es[o], peak, start_marked, dynamics, float(h))
    reps, rinv = np.unique(rep, return_inverse=True)
    rsize = np.bincount(rinv, weights=size, minlength=reps.size).astype(np.int64)
    if seeded:
        lab = np.where(ukeys[reps] < 0, -ukeys[reps], 0)
        drop = (lab == 0) | (rsize < min_size)
        removed = int(((lab != 0) & (rsize < min_size)).sum())
        lab = np.where(drop, 0, lab)
    else:
        keep = rsize >= min_size
        removed = int((~keep).sum())
        lab = np.zeros(reps.size, np.int64)
        # particles numbered in the raster order of their highest root
        lab[keep] = np.arange(1, int(keep.sum()) + 1)
    values = lab[rinv]
    unlabelled = int(size[values == 0].sum())
    n_particles = int(np.unique(lab[lab != 0]).size)
    return ukeys, values, n_particles, n, removed, unlabelled


def _relabel_block(b, ukeys, values, dtype):
    out = np.zeros(b.shape, dtype)
    nz = b != 0
    out[nz] = values[np.searchsorted(ukeys, b[nz])]
    return out


# --------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------


def _blocks(shape, chunks):
    edges = [np.r_[0, np.cumsum(c)] for c in chunks]
    for idx in np.ndindex(*[len(c) for c in chunks]):
        lo = tuple(int(e[i]) for e, i in zip(edges, idx))
        hi = tuple(int(e[i + 1]) for e, i in zip(edges, idx))
        yield idx, lo, hi


def _from_tasks(name: str, fn, shape, chunks, dtype, *args) -> da.Array:
    dsk = {(name,) + idx: (fn, *args[:1], lo, hi, *args[1:]) for idx, lo, hi in _blocks(shape, chunks)}
    return da.Array(dsk, name, chunks=chunks, dtype=dtype)


def _norm_chunks(chunks, shape):
    if chunks is None:
        chunks = 192
    if isinstance(chunks, (int, np.integer)):
        chunks = (int(chunks),) * len(shape)
    return da.core.normalize_chunks(chunks, shape)


def segment(
    grey,
    *,
    threshold: float | None = None,
    invert: bool = False,
    spacing=None,
    closing: int = 1,
    opening: int = 1,
    fill_holes: bool = True,
    smoothing: float | None = None,
    markers: str = "dynamics",
    h: float | None = None,
    min_distance: float | None = None,
    min_size: int = 20,
    seeds=None,
    seed_erosion: int = 2,
    out=None,
    overwrite: bool = False,
    chunks=None,
    work_dir=None,
    keep_work: bool = False,
    client=None,
    progress: bool = False,
) -> Segmentation:
    """Segment a grey volume into labelled particles, out of core.

    Parameters
    ----------
    grey : array-like or path
        Grey volume, shape (Z, Y, X) or (Y, X): anything :func:`grapes_dask.io.resolve_volume`
        opens (numpy, dask, Zarr, TIFF, HDF5...).
    threshold : float, optional
        Grey level separating particles (``grey > threshold``) from the background; default
        Otsu's threshold (:func:`otsu_threshold`).
    invert : bool
        Particles are darker than the background (``grey < threshold``).
    spacing : float, str or sequence of float or str, optional
        Voxel size per axis, optionally with its unit (``"0.325um"``); default from the volume's
        metadata, else 1. It is written to the labels' attributes with its unit. Distances are
        measured in voxels of the finest axis (``spacing / min(spacing)``), so the labels do not
        depend on the voxel size's scale, only on its anisotropy.
    closing, opening : int
        Radii (voxels) of the balls of the binary closing (fills small holes and cracks) and
        opening (removes specks and thin bridges), applied in that order; 0 skips one.
    fill_holes : bool
        Fill background cavities enclosed by foreground (pores, unresolved cracks).
    smoothing : float, optional
        Standard deviation of the Gaussian smoothing of the distance map: voxels of the finest
        axis, or a length with its unit (``"0.3um"``); default 1 voxel, 0: none.
    markers : {"dynamics", "local_max"}
        Which regional maxima of the smoothed distance map start a particle: those whose
        dynamics (height above the saddle to a higher maximum) is at least `h`, or those that
        are the highest point within `min_distance`. Ignored with `seeds`.
    h : float, optional
        Dynamics threshold: voxels of the finest axis (or a length with its unit); default 0.5.
    min_distance : float, optional
        Footprint radius of ``markers="local_max"``: voxels of the finest axis (or a length with
        its unit); default 3.
    min_size : int
        Particles with fewer voxels are removed (set to 0).
    seeds : array-like or path, optional
        Reference labels of the same shape (e.g. the pristine state's segmentation, after
        registration): each particle keeps its reference id; a reference particle that is gone
        stays absent, and foreground that no seed reaches stays 0.
    seed_erosion : int
        Seeds are the reference labels eroded by this many voxels (label by label) and kept
        where the new volume is foreground, so that the boundaries between touching particles
        come from the new volume.
    out : path, optional
        Zarr array to write (atomically: a temporary name renamed when complete). Without it the
        labels are returned as a numpy array.
    overwrite : bool
        Replace an existing `out`.
    chunks : int or tuple of int, optional
        Processing block shape, voxels (default 192 per axis).
    work_dir : path, optional
        Folder for the intermediate Zarr arrays (default: beside `out`, else a temporary folder);
        removed at the end unless `keep_work`.
    keep_work : bool
        Keep the intermediate arrays of `work_dir` (mask ``fg.zarr``, smoothed distance map
        ``S.zarr``, basin keys ``basins.zarr``) for inspection.
    client : distributed.Client, optional
        Cluster to run on (default: the current client if there is one, else the local
        threaded scheduler).
    progress : bool
        Report each stage's progress on standard error.

    Returns
    -------
    Segmentation
        The labels and what was done (threshold, counts, parameters, timings).

    Raises
    ------
    GrapesInputError
        Before the heavy stages: no foreground or no background at the threshold, seeds of
        another shape or not integer, bad parameters.
    """
    from .io import provenance, resolve_volume, settle_spacing, write_zarr
    from .units import relative_spacing, to_voxels
    from .table import _compute

    vol = resolve_volume(grey)
    arr = vol.array
    if arr.ndim not in (2, 3):
        raise GrapesInputError("the grey volume must be 2D or 3D, got shape {shape}", shape=arr.shape)
    flat2d = arr.ndim == 2
    if markers not in ("dynamics", "local_max"):
        raise GrapesInputError("{markers} must be 'dynamics' or 'local_max'", markers=markers)
    for name, v in (("closing", closing), ("opening", opening), ("seed_erosion", seed_erosion),
                    ("min_size", min_size)):
        if not isinstance(v, (int, np.integer)) or v < 0:
            raise GrapesInputError(f"{{{name}}} must be a whole number >= 0", **{name: v})
    phys, _, sp_unit = settle_spacing({"grey": vol}, spacing)
    lengths = {name: to_voxels(v, name=name, spacing=phys, unit=sp_unit, default=d, allow_zero=name != "min_distance")
               for name, v, d in (("smoothing", smoothing, 1.0), ("h", h, 0.5), ("min_distance", min_distance, 3.0))}
    smoothing, h, min_distance = (lengths[k].voxels for k in ("smoothing", "h", "min_distance"))
    # distances in voxels of the finest axis: the same labels whatever the voxel size's scale
    sp = relative_spacing(phys)
    if flat2d:
        arr = arr[None]
        sp = (1.0,) + sp
    shape = arr.shape
    sigma_vox = tuple(0.0 if (flat2d and i == 0) else smoothing / s for i, s in enumerate(sp))
    seeds_arr = None
    if seeds is not None:
        sv = check_seeds(vol, seeds)
        seeds_arr = sv.array[None] if flat2d else sv.array
    ch = _norm_chunks(chunks, vol.array.shape)
    if flat2d:
        ch = ((1,),) + ch
    if client is None:
        from .plan import _default_client

        client = _default_client()
    timings: dict = {}

    def run(*objs, desc):
        return _compute(*objs, client=client, progress=progress, desc=desc)

    # 1. threshold (and the early checks that need only the histogram)
    t0 = time.perf_counter()
    counts = None
    if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2:
        parts, lo_level = _grey_histogram(arr)
        (counts,) = run(parts, desc="segment: histogram")
        if threshold is None:
            threshold = _otsu_from_hist(counts, lo_level)
        levels = np.arange(counts.size) + lo_level
        n_fg = int(counts[(levels < threshold) if invert else (levels > threshold)].sum())
        if n_fg == 0:
            raise GrapesInputError(
                f"no voxel of {vol.name} is {'below' if invert else 'above'} the {{threshold}}: nothing to "
                "segment; lower the threshold (or check invert)", threshold=threshold)
        if n_fg == counts.sum():
            raise GrapesInputError(
                f"every voxel of {vol.name} is {'below' if invert else 'above'} the {{threshold}}: there is no "
                "background to measure distances from; raise the threshold (or check invert)", threshold=threshold)
    elif threshold is None:
        threshold = otsu_threshold(vol.array, compute=lambda *o: run(*o, desc="segment: threshold sample"))
    threshold = float(threshold)
    timings["threshold"] = time.perf_counter() - t0

    own_work = work_dir is None
    if work_dir is None:
        work = Path(str(out) + ".work") if out is not None else Path(tempfile.mkdtemp(prefix="grapes-segment-"))
    else:
        work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        # 2. mask
        t0 = time.perf_counter()
        a = arr.rechunk(ch)
        fg = _mask(a, threshold, invert, closing, opening).rechunk(ch).astype(np.uint8)
        fg_path = work / "fg.zarr"
        stores = [da.to_zarr(fg, str(work / "fg0.zarr" if fill_holes else fg_path), overwrite=True, compute=False)]
        if seeds_arr is not None:
            sd = _seed_array(seeds_arr.rechunk(ch), seed_erosion)
            stores.append(da.to_zarr(sd, str(work / "seeds.zarr"), overwrite=True, compute=False))
        run(*stores, desc="segment: mask")
        if fill_holes:
            _fill_holes(work, work / "fg0.zarr", shape, ch, run)
        fgd = da.from_zarr(str(fg_path))
        n_fg, n_all = fgd.sum(dtype=np.int64), fgd.size
        (n_fg,) = run(n_fg, desc="segment: count")
        if int(n_fg) == 0:
            raise GrapesInputError(f"no foreground is left in {vol.name} after the threshold and morphology: "
                                   "lower the {threshold} or the {opening} radius", threshold=threshold,
                                   opening=opening)
        if int(n_fg) == n_all:
            raise GrapesInputError(f"everything in {vol.name} is foreground after the threshold and morphology: "
                                   "there is no background; raise the {threshold}", threshold=threshold)
        timings["mask"] = time.perf_counter() - t0

        # 3. smoothed distance map
        t0 = time.perf_counter()
        halo0 = tuple(32 if not (flat2d and i == 0) else 0 for i in range(3))
        name = "grapes-seg-distance-" + dask.base.tokenize(str(fg_path), shape, ch, sp, sigma_vox)
        S = _from_tasks(name, _distance_task, shape, ch, np.float32, str(fg_path), shape, sp, sigma_vox, halo0)
        S_path = work / "S.zarr"
        run(da.to_zarr(S, str(S_path), overwrite=True, compute=False), desc="segment: distance map")
        timings["distance"] = time.perf_counter() - t0

        # 4. basins
        t0 = time.perf_counter()
        import zarr

        basins_path = work / "basins.zarr"
        zarr.create_array(str(basins_path), shape=shape, chunks=tuple(c[0] for c in ch), dtype="int64",
                          fill_value=0, overwrite=True)
        ball = (_ws.ball_offsets(min_distance, sp) if (markers == "local_max" and seeds_arr is None)
                else np.zeros((0, 3), np.int64))
        if flat2d and ball.size:
            ball = ball[ball[:, 0] == 0]
        paths = {"S": str(S_path), "fg": str(fg_path), "seeds": str(work / "seeds.zarr") if seeds_arr is not None
                 else None}
        smax = run(da.from_zarr(str(S_path)).max(), desc="segment: peak")[0]
        # ascent paths end at a particle's centre, about one inscribed radius away (the window grows if not)
        halo_b = tuple(0 if (flat2d and i == 0) else int(math.ceil(float(smax) / s)) + 2
                       for i, s in enumerate(sp))
        tasks = [dask.delayed(_basin_task, pure=True)(paths, lo, hi, shape, halo_b, ball, str(basins_path))
                 for _, lo, hi in _blocks(shape, ch)]
        parts = list(run(*tasks, desc="segment: basins"))
        timings["basins"] = time.perf_counter() - t0

        # 5. merge
        t0 = time.perf_counter()
        ukeys, values, n_particles, n_basins, removed, unlabelled = _combine(
            parts, markers, h, min_size, seeds_arr is not None)
        timings["merge"] = time.perf_counter() - t0
        if n_particles == 0:
            if seeds_arr is not None:
                raise GrapesInputError(
                    f"no seed of {{seeds}} lies in the foreground of {vol.name} (after an erosion of "
                    f"{seed_erosion} voxels): are they the reference labels, registered onto this volume? Check "
                    "them, or lower {seed_erosion}", seeds=sv.name, seed_erosion=seed_erosion)
            raise GrapesInputError(f"every particle of {vol.name} has fewer than {{min_size}} voxels: lower it",
                                   min_size=min_size)

        # 6. labels
        t0 = time.perf_counter()
        out_dtype = np.dtype(seeds_arr.dtype) if seeds_arr is not None else np.dtype(np.uint32)
        if seeds_arr is None and n_particles > np.iinfo(np.uint32).max:
            out_dtype = np.dtype(np.uint64)
        lut_k, lut_v = dask.delayed(ukeys), dask.delayed(values.astype(out_dtype))
        basins = da.from_zarr(str(basins_path))
        labels = basins.map_blocks(_relabel_block, lut_k, lut_v, out_dtype, dtype=out_dtype)
        if flat2d:
            labels = labels[0]
        params = {
            "threshold": threshold, "invert": invert, "spacing": list(phys), "unit": sp_unit, "closing": closing,
            "opening": opening, "fill_holes": fill_holes, "smoothing": smoothing,
            "markers": "seeds" if seeds_arr is not None else markers, "h": h, "min_distance": min_distance,
            "min_size": min_size, "seed_erosion": seed_erosion if seeds_arr is not None else None,
            "chunks": [int(c[0]) for c in ch], "basin_halo_max": max(p["halo"] for p in parts),
        }
        path = None
        if out is not None:
            attrs = {"spacing": list(phys), "unit": sp_unit,
                     "grapes_dask": provenance(step="segment", source=vol.name, n_particles=n_particles,
                                               n_basins=n_basins, **params)}
            path = write_zarr(labels, out, attrs=attrs, overwrite=overwrite, progress=progress)
            result_labels = da.from_zarr(str(path))
        else:
            (result_labels,) = run(labels, desc="segment: labels")
        timings["labels"] = time.perf_counter() - t0
        if path is not None:  # the seconds per stage join the provenance once the labels are written
            import zarr

            z = zarr.open_array(str(path), mode="r+")
            meta = dict(z.attrs["grapes_dask"])
            meta["seconds"] = {k: round(v, 3) for k, v in timings.items()}
            z.attrs["grapes_dask"] = meta
    finally:
        if not keep_work and own_work:
            shutil.rmtree(work, ignore_errors=True)
    return Segmentation(labels=result_labels, path=path, threshold=threshold, n_particles=n_particles,
                        n_basins=n_basins, n_removed=removed, unlabelled_voxels=unlabelled, params=params,
                        timings=timings)


def check_seeds(grey, seeds):
    """The seeds of :func:`segment`, opened and checked against the grey volume (no voxel read).

    Parameters
    ----------
    grey, seeds : array-like, path or Volume
        The grey volume and the reference labels.

    Returns
    -------
    grapes_dask.io.Volume
        The seeds.

    Raises
    ------
    GrapesInputError
        Seeds of another shape, or not integer labels.
    """
    from .io import resolve_volume

    vol = resolve_volume(grey)
    sv = resolve_volume(seeds)
    if sv.array.shape != vol.array.shape:
        raise GrapesInputError(
            f"the {{seeds}} have shape {sv.array.shape} but the grey volume {vol.name} has shape "
            f"{vol.array.shape}: give the reference labels registered onto this volume (apply_transform)",
            seeds=sv.name)
    if sv.array.dtype.kind not in "ui":
        raise GrapesInputError("the {seeds} must be integer labels, got dtype " + str(sv.array.dtype),
                               seeds=sv.name)
    return sv


def _erode_labels_block(b, r):
    """Each label eroded by `r` voxels (a voxel stays if every voxel of its ball has its label)."""
    from scipy import ndimage as ndi

    if r == 0:
        return b
    ball = _ball(r) if b.shape[0] > 1 else _ball(r)[r:r + 1]
    lo = ndi.minimum_filter(b, footprint=ball, mode="nearest")
    hi = ndi.maximum_filter(b, footprint=ball, mode="nearest")
    return np.where(lo == hi, b, 0)


def _seed_array(seeds: da.Array, erosion: int) -> da.Array:
    if erosion == 0:
        return seeds
    depth = {0: erosion if seeds.shape[0] > 1 else 0, 1: erosion, 2: erosion}
    return seeds.map_overlap(_erode_labels_block, depth=depth, boundary="nearest", dtype=seeds.dtype, r=erosion)
