"""Pass-2 plan: from pass-1 bounding boxes to regions (a core plus a halo) that fit the memory budget.

The EDT of a voxel never exceeds its particle's inscribed radius, and that radius is bounded
by the particle's bounding box: along an axis ``a`` whose box ``[lo, hi)`` has voxels of other
labels (or, with ``black_border``, the outside of the volume) just beyond both ends, every voxel
is within ``s_a (hi - lo + 1) / 2`` of one of them. A region therefore needs a halo, on each
axis ``b``, of ``ceil(r / s_b)`` voxels where ``r`` is the largest bound among the labels met by
its core. The halo is per region: a single large particle widens only the regions it meets.

Budget (:func:`memory_budget`): the bytes one pass-2 task may use, from the worker's memory
limit divided by its threads (tasks in flight at once), times :data:`SAFETY_FRACTION`.

Splitting (:func:`plan_regions`, :func:`plan_fill_groups`): the regions start as the pass-1
blocks of whole chunks (:func:`block_edges`). A region whose estimated peak
(:func:`region_bytes`) is over the budget has its core cut in two across its longest axis (at a
chunk edge near the middle when there is one, else anywhere: pass-2 tasks read arbitrary
slices), and each half is planned again with the labels its core can meet (those whose box
crosses it) and their own, often smaller, halo. Only the regions over the budget are split, so
one large particle makes small regions only around itself. A region is refused when its core
cannot be cut further, i.e. every side is at most ``max(MIN_CORE, halo)`` voxels: then the
labels with the largest bound are named, with ``exclude_labels`` and ``memory_limit`` as fixes.
With ``fill_holes``, groups of owned labels are split the same way down to a single particle,
which is refused only if its own box (plus one voxel) does not fit.

The plan never makes a task per label: every region or group covers a part of space, and their
number depends on the volume, the budget and the largest particles, not on the label count.

Numpy, and dask's helpers for sizes and the scheduler's threads; no graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ._errors import GrapesInputError

__all__ = [
    "inscribed_bound", "Region", "FillGroup", "TaskMemory", "block_edges", "split_blocks", "plan_regions",
    "plan_fill_groups", "region_bytes", "pass1_bytes", "memory_budget", "SAFETY_FRACTION",
    "MIN_CORE", "pass1_blocks", "plan_pass2",
]

#: Share of a thread's memory a pass-2 task is planned to use. Dask's worker starts spilling at
#: 60-70% of its limit and pauses at 80%; with every thread at its peak together, half the
#: limit leaves room for the interpreter and its libraries (~0.3 GiB), the results held between
#: tasks, the chunks being decoded and the error of the estimate (region_bytes is measured to
#: bound the real peak within about 30%).
SAFETY_FRACTION = 0.5
#: Smallest core side (voxels) the planner cuts a region to for memory (the kernels' tile).
MIN_CORE = 16
_GiB = 1 << 30


# --------------------------------------------------------------------------------------------
# the budget
# --------------------------------------------------------------------------------------------


def _machine_memory() -> int:
    """Memory of this machine (or of its cgroup / rlimit when smaller), bytes."""
    try:
        from distributed.system import MEMORY_LIMIT

        return int(MEMORY_LIMIT)
    except Exception:  # distributed missing or unusual platform
        import psutil

        return int(psutil.virtual_memory().total)


def _local_threads() -> int:
    """Tasks the local (threaded) dask scheduler runs at once."""
    import dask
    from dask.system import CPU_COUNT

    sched = dask.config.get("scheduler", None) or dask.config.get("get", None)
    if sched in ("sync", "synchronous", "single-threaded"):
        return 1
    return max(1, int(dask.config.get("num_workers", None) or CPU_COUNT))


def _default_client():
    import sys

    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import default_client

        return default_client()
    except (ValueError, ImportError):
        return None


def memory_budget(memory_limit=None, client=None):
    """Bytes one pass-2 task may use, and the number of tasks run at once.

    Parameters
    ----------
    memory_limit : int, str or None
        Bytes (``int``) or a size string (``"4GiB"``, :func:`dask.utils.parse_bytes`) per task;
        ``None``: derived from the workers. With a distributed client (given, or the default
        one), the smallest ``memory_limit / nthreads`` over its workers; without one, or for
        workers without a limit, this machine's memory divided by its cores (the threaded
        scheduler runs one task per core). Both are multiplied by :data:`SAFETY_FRACTION`.
    client : distributed.Client, optional

    Returns
    -------
    budget : int
        Bytes per pass-2 task.
    threads : int
        Tasks in flight at once (threads of the cluster, or of the local scheduler).
    source : str
        How the budget was found, for the table's parameters.
    """
    from dask.utils import format_bytes, parse_bytes

    client = client if client is not None else _default_client()
    threads = None
    if client is not None:
        try:
            workers = client.scheduler_info(n_workers=-1)["workers"]
        except TypeError:  # older distributed: no n_workers keyword
            workers = client.scheduler_info()["workers"]
        except Exception:
            workers = {}
        workers = list(workers.values())
        threads = sum(int(w.get("nthreads", 1) or 1) for w in workers) or None
    else:
        workers = []
    if threads is None:
        threads = _local_threads()
    if memory_limit is not None:
        if isinstance(memory_limit, str):
            try:
                b = parse_bytes(memory_limit)
            except (ValueError, TypeError):
                b = None
        elif isinstance(memory_limit, (int, np.integer, float)) and not isinstance(memory_limit, bool):
            b = int(memory_limit) if np.isfinite(memory_limit) else None
        else:
            b = None
        if b is None or b <= 0:
            raise GrapesInputError(
                "{memory_limit}: give the bytes one task may use, as a number or a size such as '4GiB' (or "
                "leave it out to follow the workers' memory limit)", memory_limit=memory_limit)
        return int(b), threads, "memory_limit"
    shares = []
    for w in workers:
        lim, n = w.get("memory_limit") or 0, max(1, int(w.get("nthreads", 1) or 1))
        if lim:
            shares.append((int(lim) // n, f"worker memory limit {format_bytes(int(lim))} / {n} thread(s)"))
    if shares:
        share, how = min(shares)
    else:
        n = _local_threads() if client is None else max(1, threads)
        share = _machine_memory() // n
        how = f"machine memory {format_bytes(_machine_memory())} / {n} thread(s)"
    return int(share * SAFETY_FRACTION), threads, f"{how} x {SAFETY_FRACTION}"


# --------------------------------------------------------------------------------------------
# distance bounds
# --------------------------------------------------------------------------------------------


def inscribed_bound(bbox_min, bbox_max, spacing, volume_shape, black_border=True):
    """Upper bound of each label's largest EDT value (inscribed radius), length units.

    Parameters
    ----------
    bbox_min, bbox_max : ndarray of int, shape (n_labels, ndim)
        Bounding boxes, min inclusive and max exclusive (voxel indices).
    spacing : sequence of float, length ndim
        Voxel size per axis.
    volume_shape : sequence of int
        Shape of the volume (voxels).
    black_border : bool
        Whether the outside of the volume counts as not-in-label.

    Returns
    -------
    ndarray of float64, shape (n_labels,)
        ``inf`` for a label with no boundary reachable along any axis (it spans the volume and
        the border is not black).
    """
    lo = np.asarray(bbox_min, np.int64)
    hi = np.asarray(bbox_max, np.int64)
    sp = np.asarray(spacing, float)
    ext = (hi - lo).astype(float)
    if black_border:
        per_axis = sp * (ext + 1) / 2
    else:
        at_lo = lo == 0
        at_hi = hi == np.asarray(volume_shape)
        per_axis = np.where(at_lo & at_hi, np.inf, np.where(at_lo | at_hi, sp * ext, sp * (ext + 1) / 2))
    return per_axis.min(axis=1) if len(lo) else np.zeros(0)


# --------------------------------------------------------------------------------------------
# memory model
# --------------------------------------------------------------------------------------------

_ROUTES = ("fused", "fused_aniso", "integer", "float", "center")
_OVERHEAD = 16 << 20  # interpreter-side slack of one task: frames, numba's scratch, malloc arenas


def _layers_cap(max_bound, layer_width):
    if not np.isfinite(max_bound):
        return 0
    return int(np.floor(max(0.0, max_bound) / layer_width)) + 3


def region_bytes(outer_shape, core_shape, label_itemsize, grey_itemsize, isotropic=False, *, route=None,
                 fill=False, n_labels=0, max_bound=0.0, layer_width=1.0, spacing=1.0, excluded=False,
                 read_bytes=0) -> int:
    """Peak working memory of one pass-2 task in bytes (an upper estimate).

    Parameters
    ----------
    outer_shape, core_shape : sequence of int
        Region read (core plus halo) and core, voxels (2D shapes are one plane of 3D).
    label_itemsize, grey_itemsize : int
        Bytes per voxel of the label and grey arrays as read.
    isotropic : bool
        Route when `route` is not given: ``"integer"`` if True, else ``"float"``.
    route : {"fused", "fused_aniso", "integer", "float", "center"}, optional
        The pass-2 task's route (:meth:`TaskMemory.route`): fused EDT and layer sums (isotropic,
        grey of at most 16 bits), the same fused in float64 with offsets (anisotropic, grey of at
        most 16 bits), integer EDT then layer sums (isotropic), float64 EDT with offsets then
        layer sums (anisotropic), distance to the centroid (``start_at="center"``, no halo).
    fill : bool
        A ``fill_holes`` task: the whole box is read (grey too), cavities are labelled and
        filled in a copy, and the distance is taken on the whole box (core = outer).
    n_labels : int
        Labels the core can meet (the accumulators and the partial table grow with it).
    max_bound : float
        Their largest inscribed-radius bound (length units): layers per label, packing of the
        fused route's lines.
    layer_width, spacing : float
        Layer width and the (isotropic) voxel size, for the same.
    excluded : bool
        Some labels are excluded (the task writes a copy of the labels without them).
    read_bytes : int
        Transient bytes of reading the blocks (e.g. a decoded chunk and its compressed bytes).

    Returns
    -------
    int
        Bytes. Measured against the real task's peak resident memory (tests/test_plan.py, and
        256^3-400^3 cores of the 512^3 phantom): above it by 3-45% for every route (the fixed
        16 MiB weighs most on small regions), up to 2.2x with excluded labels (worst case).
        fused_aniso, 160^3 core of a 224^3 phantom at spacing (1, 0.8, 0.8): 61 MiB for a peak
        of 45 MiB (the float route there: 193 MiB); 256^3 core of the 800^3 phantom, inputs
        already read: a peak of 87 MiB, the estimate's work term 86 MiB plus the fixed 16 MiB (the
        float route's peak there: 608 MiB; the isotropic fused route's: 49 MiB).

    Notes
    -----
    Per voxel, with ``L``/``G`` the label/grey item sizes, ``n_o``/``n_c`` the outer/core voxels
    and ``Z, Y`` the outer sides: the labels ``L n_o`` (plus ``(11 + L) n_o`` while excluded labels are
    zeroed, :func:`numpy.isin`'s worst case), the grey ``G n_c``, plus

    - fused: the packed last-pass lines ``2 or 4 x Z cy cx`` and one 16-plane tile of the first
      pass ``16 cx Y (4 + L)``;
    - fused_aniso: the last pass's lines, int16 y and x offsets (int32 for sides of 16,000 voxels
      or more) ``4 or 8 x Z cy cx``, and the same tile of the first pass (int32 offsets);
    - integer: ``max(4 Z cy cx + 4 n_c, 25 n_c)`` (int32 lines and result, then its float64 root
      and temporaries);
    - float: ``12 Z Y cx + 16 Z cy cx + 8 n_c`` (float64 squared distances with int32 offsets of
      the first two passes, float64 result);
    - center: ``41 n_c`` (label indices, squared distance, temporaries, float64; measured);
    - fill: a copy of the labels, the grey of the box, and ``max(8 n + 11 n/2, route)`` for the
      cavity labelling (int32 components, masks, gathers over label/background contacts, at most
      half the box) then the distance of the route on the whole box;

    and per (label, layer) row ``n_labels x (max_bound / layer_width + 3)``: 24 bytes of
    accumulators (fused) or about 160 bytes of partial table (other routes).
    """
    if route is None:
        route = "integer" if isotropic else "float"
    if route not in _ROUTES:
        raise ValueError(f"route must be one of {_ROUTES}, got {route!r}")
    o = np.asarray(outer_shape, np.int64)
    c = np.asarray(core_shape, np.int64)
    if len(o) == 2:
        o, c = np.r_[1, o], np.r_[1, c]
    if fill:
        c = o
    L, G = int(label_itemsize), int(grey_itemsize)
    n_o = int(np.prod(o))
    n_c = int(np.prod(c))
    Z, Y, X = (int(v) for v in o)
    cz, cy, cx = (int(v) for v in c)
    scratch = 3 * 8 * (max(Z, Y, X) + 3) + 16 * 8 * (cx + cy + cz)
    tile = 16 * cx * Y * (4 + L) + cx * cy * L
    if route == "fused":
        packed = 2 if np.isfinite(max_bound) and (np.ceil(max_bound / float(spacing)) + 1) ** 2 < (1 << 14) - 1 else 4
        work = packed * Z * cy * cx + tile
        rows = 24
    elif route == "fused_aniso":
        lines = 4 if max(Z, Y, X) < 16000 else 8
        work = lines * Z * cy * cx + tile + 2 * 16 * 8 * cy
        rows = 24
    elif route == "integer":
        work = max(4 * Z * cy * cx + 4 * n_c + tile, 25 * n_c)
        rows = 160
    elif route == "float":
        work = 12 * Z * Y * cx + 16 * Z * cy * cx + 8 * n_c + 16 * 8 * (Y + Z) * 3
        rows = 160
    else:  # center
        work = 41 * n_c
        rows = 160
    work += scratch + rows * int(n_labels) * max(_layers_cap(max_bound, layer_width), 1)
    labels = L * n_o
    if excluded:  # numpy.isin's lookup route: masks, the labels in range and their int64 offsets
        labels += (11 + L) * n_o
    if fill:
        # np.array(read) copies the labels once; cavity labelling before the distance
        labels += L * n_o
        work = max(work, 8 * n_o + (11 * n_o) // 2)
        return labels + G * n_o + work + int(read_bytes) + _OVERHEAD
    return labels + G * n_c + work + int(read_bytes) + _OVERHEAD


def pass1_bytes(block_shape, label_itemsize, grey_itemsize, float_grey=False, read_bytes=0) -> int:
    """Peak working memory of one pass-1 task in bytes (block plus the high-side voxel).

    The block's labels and grey, the NaN check's mask and gather for float grey, 2 bytes per
    voxel for the per-label partial tables (measured: about 750 bytes per label met, so this
    holds for labels of a few hundred voxels or more on average; the phantoms' have ~25,000),
    and the kernel's table from label id to dense index when the ids span few values (int32
    over at most ``max(2**22, voxels / 8)`` ids: half a byte per voxel; the 16 MiB of a small
    block's 2**22 ids are within the fixed slack).
    Measured on 256^3 and 400^3 blocks of the 512^3 phantom: about 1.6-1.7x the peak RSS.
    """
    n = int(np.prod(np.asarray(block_shape, np.int64) + 1))
    L, G = int(label_itemsize), int(grey_itemsize)
    extra = (2 + G) * n if float_grey else 0
    ranks = 4 * (n // 8)
    return (L + G + 2) * n + extra + ranks + int(read_bytes) + _OVERHEAD


@dataclass(frozen=True)
class TaskMemory:
    """The memory model of one run's pass-2 tasks (what :func:`region_bytes` needs besides shapes).

    Attributes
    ----------
    label_itemsize, grey_itemsize : int
    ndim : int
    spacing : tuple of float
    grey_kind : str
        numpy dtype kind of the grey (``"u"``, ``"i"``, ``"b"``, ``"f"``).
    center : bool
        ``start_at="center"``.
    layer_width : float
    excluded : bool
        Some labels are excluded.
    read_bytes : int
        Transient bytes of reading a block (decoded chunks).
    """

    label_itemsize: int
    grey_itemsize: int
    ndim: int
    spacing: tuple
    grey_kind: str = "u"
    center: bool = False
    layer_width: float = 1.0
    excluded: bool = False
    read_bytes: int = 0

    @property
    def isotropic(self) -> bool:
        return len(set(self.spacing)) == 1

    def route(self, max_bound: float = 0.0, fill: bool = False) -> str:
        """The route :func:`grapes_dask.table._pass2_task` takes for a region with this bound."""
        if self.center:
            return "center"
        fused = (not fill and self.ndim == 3 and self.grey_kind in "uib" and self.grey_itemsize <= 2
                 and np.isfinite(max_bound))
        if not self.isotropic:
            return "fused_aniso" if fused else "float"
        return "fused" if fused else "integer"

    def region(self, outer_shape, core_shape, n_labels=0, max_bound=0.0) -> int:
        return region_bytes(outer_shape, core_shape, self.label_itemsize, self.grey_itemsize,
                            route=self.route(max_bound), n_labels=n_labels, max_bound=max_bound,
                            layer_width=self.layer_width, spacing=self.spacing[0], excluded=self.excluded,
                            read_bytes=self.read_bytes)

    def fill(self, box_shape, n_labels=0, max_bound=0.0) -> int:
        return region_bytes(box_shape, box_shape, self.label_itemsize, self.grey_itemsize,
                            route=self.route(max_bound, fill=True), fill=True, n_labels=n_labels,
                            max_bound=max_bound, layer_width=self.layer_width, spacing=self.spacing[0],
                            excluded=self.excluded, read_bytes=self.read_bytes)


# --------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Region:
    """One pass-2 task: a core and the halo around it.

    Attributes
    ----------
    index : tuple of int
        Position in the grid of pass-1 blocks of the block this region's core lies in.
    core : tuple of slice
        Global voxel slices of the core (the voxels this region accounts for).
    outer : tuple of slice
        Global voxel slices of the core plus halo, clipped to the volume.
    border : tuple of bool, length 2 * ndim
        For each side (low, high per axis), whether it lies on the volume border.
    labels : ndarray of uint64, optional
        Sorted labels the core can meet (a superset of those it holds), without the excluded
        ones; None when not planned (then the block's pass-1 list applies).
    bound : float
        Largest inscribed-radius bound of `labels` (length units).
    nbytes : int
        Estimated peak memory of the task (:func:`region_bytes`), 0 when not estimated.
    """

    index: tuple
    core: tuple
    outer: tuple
    border: tuple
    labels: np.ndarray | None = None
    bound: float = 0.0
    nbytes: int = 0

    @property
    def core_in_outer(self) -> tuple:
        """The core as slices into the outer box."""
        return tuple(slice(c.start - o.start, c.stop - o.start) for c, o in zip(self.core, self.outer))

    @property
    def outer_shape(self) -> tuple:
        return tuple(s.stop - s.start for s in self.outer)

    @property
    def core_shape(self) -> tuple:
        return tuple(s.stop - s.start for s in self.core)


def block_edges(chunks, target: int) -> list:
    """Edges of blocks of whole chunks, about `target` voxels per side and balanced.

    Parameters
    ----------
    chunks : tuple of tuple of int
        Dask chunks of the volume, per axis.
    target : int
        Wanted block side in voxels.

    Returns
    -------
    list of ndarray of int64
        Per axis, the block edges ``0 = e0 < e1 < ... < en = size``, all on chunk edges; the
        axis is cut into ``round(size / target)`` (at least 1) blocks of nearly equal size, so
        no thin leftover block pays a full halo.
    """
    out = []
    for c in chunks:
        edges = np.concatenate([[0], np.cumsum(c)]).astype(np.int64)
        size = int(edges[-1])
        n = max(1, int(round(size / max(1, target))))
        want = np.arange(1, n) * size / n
        inner = np.unique(edges[np.abs(edges[None, :] - want[:, None]).argmin(axis=1)]) if n > 1 else []
        inner = [int(e) for e in inner if 0 < e < size]
        out.append(np.array([0, *inner, size], np.int64))
    return out


def split_blocks(chunks, edges, *, min_blocks=1, fits=None) -> list:
    """Refine block `edges` (on chunk edges) until there are `min_blocks` blocks and all fit.

    Parameters
    ----------
    chunks : tuple of tuple of int
        Dask chunks per axis.
    edges : list of ndarray
        Starting edges (:func:`block_edges`).
    min_blocks : int
        Wanted number of blocks at least (e.g. the threads, so that every thread has work);
        reached as far as the chunks allow.
    fits : callable, optional
        ``fits(block_shape) -> bool`` for the largest block; blocks are split until it holds
        or the largest block is a single chunk along every axis.

    Returns
    -------
    list of ndarray of int64
        Edges. One cut at a time: the largest block (in voxels along its axis) among those that
        span more than one chunk is cut at the chunk edge nearest its middle.
    """
    cur = [np.asarray(e, np.int64) for e in edges]
    cedges = [np.concatenate([[0], np.cumsum(c)]).astype(np.int64) for c in chunks]
    while True:
        largest = tuple(int(np.diff(e).max()) for e in cur)
        need_more = int(np.prod([len(e) - 1 for e in cur])) < min_blocks
        too_big = fits is not None and not fits(largest)
        if not (need_more or too_big):
            return cur
        best = None
        for a, e in enumerate(cur):
            w = np.diff(e)
            for i in np.argsort(-w, kind="stable"):
                if too_big and w[i] < largest[a]:
                    break  # cutting a smaller block does not help the largest one
                inner = cedges[a][(cedges[a] > e[i]) & (cedges[a] < e[i + 1])]
                if len(inner):
                    if best is None or w[i] > best[0]:
                        best = (int(w[i]), a, int(i), inner)
                    break
        if best is None:
            return cur
        _, a, i, inner = best
        mid = (cur[a][i] + cur[a][i + 1]) / 2
        cur[a] = np.insert(cur[a], i + 1, int(inner[np.abs(inner - mid).argmin()]))


def _halo(bound, sp, volume_shape):
    if bound <= 0:
        return np.zeros(len(sp), np.int64)
    if np.isinf(bound):
        return np.asarray(volume_shape, np.int64)
    return np.ceil(bound / sp - 1e-9).astype(np.int64)


def _block_halo(labs, labels, bounds, sp, volume_shape):
    if labs is None or len(labs) == 0:
        return np.zeros(len(sp), np.int64)
    return _halo(float(bounds[np.searchsorted(labels, labs)].max()), sp, volume_shape)


def _cut(lo, hi, chunk_edges):
    """A cut inside ``(lo, hi)``: the chunk edge nearest the middle if within its middle half."""
    mid = (lo + hi) // 2
    if chunk_edges is not None:
        e = chunk_edges[(chunk_edges > lo) & (chunk_edges < hi)]
        if len(e):
            best = int(e[np.abs(e - mid).argmin()])
            if abs(best - mid) <= (hi - lo) // 4:
                return best
    return mid


def _region(idx, lo, hi, halo, volume_shape, labs=None, bound=0.0, nbytes=0):
    core = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    outer = tuple(slice(max(0, int(a) - int(h)), min(int(n), int(b) + int(h)))
                  for a, b, h, n in zip(lo, hi, halo, volume_shape))
    border = tuple(x for o, n in zip(outer, volume_shape) for x in (o.start == 0, o.stop == n))
    return Region(tuple(idx), core, outer, border, labs, float(bound), int(nbytes))


def plan_regions(edges, block_labels, labels, bounds, spacing, volume_shape, *, halo=True, bbox_min=None,
                 bbox_max=None, budget=None, memory=None, chunks=None, exclude=None):
    """Regions of pass 2 with their label-aware halos, split until each fits the budget.

    Parameters
    ----------
    edges : list of ndarray of int
        Block edges per axis (:func:`block_edges`); each block is where regions start.
    block_labels : dict
        Block grid index -> sorted uint64 array of the labels with voxels in that block.
    labels : ndarray of uint64, sorted
        All labels of the table.
    bounds : ndarray of float
        :func:`inscribed_bound` of `labels` (length units); labels to skip carry 0.
    spacing : sequence of float
        Voxel size per axis.
    volume_shape : tuple of int
    halo : bool
        False for ``start_at="center"`` (no distance transform, no halo).
    bbox_min, bbox_max : ndarray of int, shape (n_labels, ndim), optional
        Boxes of `labels`: needed to split a block (the labels a part of it can meet).
    budget : int, optional
        Bytes one task may use; None: one region per block, unchecked.
    memory : TaskMemory, optional
        The memory model (needed with `budget`).
    chunks : tuple of tuple of int, optional
        Chunks per axis: cuts prefer chunk edges.
    exclude : ndarray of uint64, optional
        Excluded labels, left out of the regions' label lists.

    Returns
    -------
    list of Region
        In block order; the regions of one block tile it.

    Raises
    ------
    GrapesInputError
        A region that cannot be cut further is over the budget: names the labels of largest
        bound (fix: ``exclude_labels`` or ``memory_limit``).
    """
    sp = np.asarray(spacing, float)
    nd = len(sp)
    labels = np.asarray(labels, np.uint64)
    exclude = np.zeros(0, np.uint64) if exclude is None else np.asarray(exclude, np.uint64)
    chunk_edges = None if chunks is None else [np.cumsum(c).astype(np.int64) for c in chunks]
    regions = []
    for idx in np.ndindex(*[len(e) - 1 for e in edges]):
        lo = np.array([int(e[i]) for e, i in zip(edges, idx)], np.int64)
        hi = np.array([int(e[i + 1]) for e, i in zip(edges, idx)], np.int64)
        labs = block_labels.get(idx)
        labs = np.zeros(0, np.uint64) if labs is None else np.asarray(labs, np.uint64)
        if len(exclude):
            labs = np.setdiff1d(labs, exclude)
        if budget is None:
            h = _block_halo(labs, labels, bounds, sp, volume_shape) if halo else np.zeros(nd, np.int64)
            b = float(bounds[np.searchsorted(labels, labs)].max()) if len(labs) else 0.0
            regions.append(_region(idx, lo, hi, h, volume_shape, labs, b))
            continue
        pos = np.searchsorted(labels, labs)
        stack = [(lo, hi, pos)]
        while stack:
            lo, hi, pos = stack.pop()
            b = float(bounds[pos].max()) if len(pos) else 0.0
            h = _halo(b, sp, volume_shape) if halo else np.zeros(nd, np.int64)
            reg = _region(idx, lo, hi, h, volume_shape, labels[pos], b)
            need = memory.region(reg.outer_shape, reg.core_shape, len(pos), b)
            if need <= budget:
                regions.append(Region(reg.index, reg.core, reg.outer, reg.border, reg.labels, b, need))
                continue
            side = hi - lo
            room = side - np.maximum(MIN_CORE, h)
            a = int(np.argmax(np.where(room > 0, side, -1)))
            if room[a] <= 0:
                _refuse(reg, need, budget, labels[pos], bounds[pos], h, memory.region(reg.core_shape, reg.core_shape),
                        exclude)
            cut = _cut(int(lo[a]), int(hi[a]), None if chunk_edges is None else chunk_edges[a])
            # the high half is pushed first, so that the low half is planned (and listed) first
            for plo, phi in ((np.r_[lo[:a], cut, lo[a + 1:]], hi), (lo, np.r_[hi[:a], cut, hi[a + 1:]])):
                meets = np.all((bbox_max[pos] > plo) & (bbox_min[pos] < phi), axis=1)
                stack.append((plo, phi, pos[meets]))
    return regions


def _refuse(reg, need, budget, labs, b, h, bare, exclude=()):
    """The error for a region that cannot be cut further; `bare`: its core's need without labels."""
    from dask.utils import format_bytes

    core = "x".join(map(str, reg.core_shape))
    if len(labs) == 0 or not np.any(b > 0) or bare > budget:
        raise GrapesInputError(
            f"a memory budget of {format_bytes(budget)} per task is too small even for a region of {core} voxels "
            f"(about {format_bytes(need)}): raise {{memory_limit}}", memory_limit=None)
    order = np.argsort(-b, kind="stable")
    order = order[b[order] >= b[order[0]] / 2]  # those that make most of the halo
    worst = [int(x) for x in labs[order][:5]]
    raise GrapesInputError(
        f"particle(s) {worst} near voxel {tuple(s.start for s in reg.core)} are too large for the memory budget: "
        f"their inscribed-radius bound {float(b[order[0]]):.4g} asks for a halo of {int(np.max(h))} voxels, and "
        f"even the smallest region around them (a core of {core} voxels plus that halo) needs about "
        f"{format_bytes(need)}, over the budget of {format_bytes(budget)} per task. If such a label is not a "
        "particle (binder, pore phase), skip it with {exclude_labels}; else raise {memory_limit}",
        exclude_labels=[*(int(x) for x in exclude), worst[0]], memory_limit=None)


# --------------------------------------------------------------------------------------------
# fill_holes: ownership groups
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FillGroup:
    """One ``fill_holes`` pass-2 task: the labels it owns and the box that holds them whole.

    Attributes
    ----------
    owned : ndarray of int64
        Positions (into the table's sorted labels) of the owned labels.
    box : tuple of slice
        Union of their boxes padded by one voxel, clipped to the volume.
    nbytes : int
        Estimated peak memory (:func:`region_bytes` with ``fill=True``).
    """

    owned: np.ndarray
    box: tuple
    nbytes: int = 0

    @property
    def shape(self) -> tuple:
        return tuple(s.stop - s.start for s in self.box)


def plan_fill_groups(edges, bbox_min, bbox_max, keep, volume_shape, *, budget=None, memory=None, bounds=None,
                     labels=None):
    """Ownership groups of ``fill_holes``: each particle whole in one task, each task in budget.

    A label is owned by the block holding the low corner of its box. A group over the budget
    has its domain (the space where its labels' low corners lie) cut in two across its longest
    axis, each half owning the labels whose low corner lies there; labels sharing one low
    corner are halved by position. A single label over the budget is refused by name.

    Parameters
    ----------
    edges : list of ndarray of int
        Block edges per axis (the starting domains).
    bbox_min, bbox_max : ndarray of int, shape (n_labels, ndim)
    keep : ndarray of bool
        Labels to analyse (not excluded).
    volume_shape : tuple of int
    budget : int, optional
    memory : TaskMemory, optional
    bounds : ndarray of float, optional
        Inscribed-radius bounds (layers per label in the estimate).
    labels : ndarray of uint64, optional
        Label ids, for the error message.

    Returns
    -------
    list of FillGroup
    """
    bbox_min = np.asarray(bbox_min, np.int64)
    bbox_max = np.asarray(bbox_max, np.int64)
    shape = np.asarray(volume_shape, np.int64)
    nd = len(shape)
    bounds = np.zeros(len(bbox_min)) if bounds is None else np.asarray(bounds, float)
    owner = np.stack([np.searchsorted(e, bbox_min[:, a], side="right") - 1 for a, e in enumerate(edges)], axis=1) \
        if len(bbox_min) else np.zeros((0, nd), np.int64)
    groups = []
    for idx in np.ndindex(*[len(e) - 1 for e in edges]):
        sel = np.flatnonzero(keep & np.all(owner == np.asarray(idx), axis=1))
        if not len(sel):
            continue
        dlo = np.array([int(e[i]) for e, i in zip(edges, idx)], np.int64)
        dhi = np.array([int(e[i + 1]) for e, i in zip(edges, idx)], np.int64)
        stack = [(dlo, dhi, sel)]
        while stack:
            dlo, dhi, sel = stack.pop()
            if not len(sel):
                continue
            lo = np.maximum(bbox_min[sel].min(axis=0) - 1, 0)
            hi = np.minimum(bbox_max[sel].max(axis=0) + 1, shape)
            box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            b = float(bounds[sel].max())
            need = 0 if budget is None else memory.fill(hi - lo, len(sel), b)
            if budget is None or need <= budget:
                groups.append(FillGroup(sel, box, need))
                continue
            if len(sel) == 1:
                _refuse_fill(labels, sel[0], box, need, budget, np.flatnonzero(~keep))
            # cut the domain of the low corners across its longest side, else halve the list
            clo = bbox_min[sel].min(axis=0)
            chi = bbox_min[sel].max(axis=0) + 1
            span = chi - clo
            a = int(np.argmax(span))
            if span[a] > 1:
                cut = int(clo[a] + span[a] // 2)
                low = bbox_min[sel, a] < cut
                stack.append((np.r_[dlo[:a], cut, dlo[a + 1:]], dhi, sel[~low]))
                stack.append((dlo, np.r_[dhi[:a], cut, dhi[a + 1:]], sel[low]))
            else:
                half = len(sel) // 2
                stack.append((dlo, dhi, sel[half:]))
                stack.append((dlo, dhi, sel[:half]))
    return groups


def _refuse_fill(labels, i, box, need, budget, skipped=()):
    from dask.utils import format_bytes

    lab = int(labels[i]) if labels is not None else int(i)
    before = [int(labels[j]) if labels is not None else int(j) for j in skipped]
    raise GrapesInputError(
        f"with fill_holes, particle {lab} is too large for the memory budget: its own box "
        f"[{', '.join(f'{x.start}:{x.stop}' for x in box)}] (plus one voxel) needs about {format_bytes(need)}, over the budget of {format_bytes(budget)} per task. If "
        "this label is not a particle (binder, pore phase), skip it with {exclude_labels}; else raise "
        "{memory_limit}", exclude_labels=[*before, lab], memory_limit=None)


# --------------------------------------------------------------------------------------------
# the whole plan (what grapes_dask.table runs)
# --------------------------------------------------------------------------------------------


def pass1_blocks(chunks, region_size, *, budget, threads=1, label_itemsize, grey_itemsize, float_grey=False,
                 read_bytes=0, name="labels"):
    """Edges of the pass-1 blocks (whole chunks), which are also where pass-2 regions start.

    About `region_size` voxels per side (:func:`block_edges`), then cut further
    (:func:`split_blocks`) until there are at least `threads` blocks (every thread has work) and
    the largest fits `budget` in pass 1 (:func:`pass1_bytes`).

    Raises
    ------
    GrapesInputError
        A single chunk does not fit the budget (fix: smaller chunks or a larger memory_limit).
    """
    def need(shape):
        return pass1_bytes(shape, label_itemsize, grey_itemsize, float_grey, read_bytes)

    edges = split_blocks(chunks, block_edges(chunks, region_size), min_blocks=threads,
                         fits=lambda shape: need(shape) <= budget)
    largest = tuple(int(np.diff(e).max()) for e in edges)
    if need(largest) > budget:
        from dask.utils import format_bytes

        chunk = tuple(int(max(c)) for c in chunks)
        raise GrapesInputError(
            f"one chunk of {name} ({chunk}) needs about {format_bytes(need(largest))} in pass 1, over the budget "
            f"of {format_bytes(budget)} per task: read it in smaller chunks with {{chunks}}, or raise {{memory_limit}}",
            chunks=max(1, max(chunk) // 2), memory_limit=None)
    return edges


def plan_pass2(edges, block_labels, labels, bbox_min, bbox_max, volume_shape, *, spacing, budget, memory,
               black_border=True, exclude=None, fill_holes=False, chunks=None):
    """Pass-2 tasks of a run: halo regions, or ``fill_holes`` ownership groups, each within budget.

    Parameters
    ----------
    edges : list of ndarray
        Pass-1 block edges (:func:`pass1_blocks`).
    block_labels : dict
        Block index -> sorted uint64 labels with voxels in it (pass 1), or a superset.
    labels : ndarray of uint64, sorted
    bbox_min, bbox_max : ndarray of int, shape (n_labels, ndim)
    volume_shape : tuple of int
    spacing : sequence of float
    budget : int
        Bytes per task.
    memory : TaskMemory
    black_border : bool
    exclude : ndarray of uint64, optional
    fill_holes : bool
    chunks : tuple of tuple of int, optional
        Chunks per axis (cuts prefer chunk edges).

    Returns
    -------
    bounds : ndarray of float
        Inscribed-radius bounds of `labels` (0 for excluded labels).
    tasks : list of Region or list of FillGroup
    """
    labels = np.asarray(labels, np.uint64)
    exclude = np.zeros(0, np.uint64) if exclude is None else np.asarray(exclude, np.uint64)
    excluded = np.isin(labels, exclude)
    bounds = inscribed_bound(bbox_min, bbox_max, spacing, volume_shape, black_border)
    bounds[excluded] = 0.0
    reach = bounds
    if memory.center:
        # from the centroid, layers reach at most a box's diagonal; every task holds the centroids
        ext = (np.asarray(bbox_max) - np.asarray(bbox_min)) * np.asarray(spacing, float)
        reach = np.sqrt((ext ** 2).sum(axis=1)) if len(labels) else np.zeros(0)
        reach[excluded] = 0.0
        memory = replace(memory, read_bytes=memory.read_bytes + 32 * len(labels))
    if fill_holes:
        return bounds, plan_fill_groups(edges, bbox_min, bbox_max, ~excluded, volume_shape, budget=budget,
                                        memory=memory, bounds=reach, labels=labels)
    return bounds, plan_regions(edges, block_labels, labels, reach, spacing, volume_shape, halo=not memory.center,
                                bbox_min=bbox_min, bbox_max=bbox_max, budget=budget, memory=memory, chunks=chunks,
                                exclude=exclude)
