"""Pass-2 plan: from pass-1 bounding boxes to regions (a core of whole chunks plus a halo).

The EDT of a voxel never exceeds its particle's inscribed radius, and that radius is bounded
by the particle's bounding box: along an axis ``a`` whose box ``[lo, hi)`` has voxels of other
labels (or, with ``black_border``, the outside of the volume) just beyond both ends, every voxel
is within ``s_a (hi - lo + 1) / 2`` of one of them. A region therefore needs a halo, on each
axis ``b``, of ``ceil(r / s_b)`` voxels where ``r`` is the largest bound among the labels met by
its core. The halo is per region: a single large particle widens only the regions it meets.

Pure numpy; no dask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._errors import GrapesInputError

__all__ = ["inscribed_bound", "Region", "block_edges", "plan_regions", "check_region_memory", "region_bytes"]


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


@dataclass(frozen=True)
class Region:
    """One pass-2 task: a core of whole chunks and the halo around it.

    Attributes
    ----------
    index : tuple of int
        Position of the region in the grid of regions.
    core : tuple of slice
        Global voxel slices of the core (the voxels this region accounts for).
    outer : tuple of slice
        Global voxel slices of the core plus halo, clipped to the volume.
    border : tuple of bool, length 2 * ndim
        For each side (low, high per axis), whether it lies on the volume border.
    """

    index: tuple
    core: tuple
    outer: tuple
    border: tuple

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


def region_bytes(outer_shape, core_shape, label_itemsize, grey_itemsize, isotropic=False) -> int:
    """Peak working memory of one pass-2 task in bytes (distance kernel buffers included).

    ``isotropic`` selects the integer route of the distance kernel, else the float64 one.
    """
    o = np.asarray(outer_shape, np.int64)
    c = np.asarray(core_shape, np.int64)
    if len(o) == 2:
        o, c = np.r_[1, o], np.r_[1, c]
    n_outer = int(np.prod(o))
    n_core = int(np.prod(c))
    pass1 = int(o[0] * o[1] * c[2]) * 12  # float64 + int32 offsets
    pass2 = int(o[0] * c[1] * c[2]) * 16
    separable = pass1 + pass2
    # integer route (isotropic): packed int32 lines for the last pass, a 16-plane tile of the first
    integer = int(o[0] * c[1] * c[2]) * 4 + int(16 * c[2] * o[1]) * (4 + label_itemsize) + n_core * 4
    # + the core grey, the float64 distances and layer map of the unfused route
    return n_outer * label_itemsize + (integer if isotropic else separable) + n_core * (12 + grey_itemsize)


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


def _block_halo(labs, labels, bounds, sp, volume_shape):
    if labs is None or len(labs) == 0:
        return np.zeros(len(sp), np.int64)
    r = float(bounds[np.searchsorted(labels, labs)].max())
    if np.isinf(r):
        return np.asarray(volume_shape, np.int64)
    return np.ceil(r / sp - 1e-9).astype(np.int64)


def plan_regions(edges, block_labels, labels, bounds, spacing, volume_shape, *, halo=True):
    """Regions of pass 2 (one per block) with their label-aware halos.

    Parameters
    ----------
    edges : list of ndarray of int
        Block edges per axis (:func:`block_edges`); each block is one region's core.
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

    Returns
    -------
    list of Region
    """
    sp = np.asarray(spacing, float)
    regions = []
    for idx in np.ndindex(*[len(e) - 1 for e in edges]):
        core = tuple(slice(int(e[i]), int(e[i + 1])) for e, i in zip(edges, idx))
        h = _block_halo(block_labels.get(idx), labels, bounds, sp, volume_shape) if halo else np.zeros(len(sp), np.int64)
        outer = tuple(slice(max(0, s.start - int(hh)), min(n, s.stop + int(hh))) for s, hh, n in zip(core, h, volume_shape))
        border = tuple(x for o, n in zip(outer, volume_shape) for x in (o.start == 0, o.stop == n))
        regions.append(Region(tuple(idx), core, outer, border))
    return regions


def check_region_memory(regions, budget, label_itemsize, grey_itemsize, block_labels, labels, bounds, isotropic=False):
    """Raise :class:`GrapesInputError` naming the labels whose halo makes a region exceed `budget`."""
    for reg in regions:
        need = region_bytes(reg.outer_shape, reg.core_shape, label_itemsize, grey_itemsize, isotropic)
        if need <= budget:
            continue
        labs = block_labels.get(reg.index)
        labs = np.zeros(0, np.uint64) if labs is None else labs
        b = bounds[np.searchsorted(labels, labs)]
        worst = labs[np.argsort(-b)][:5]
        raise GrapesInputError(
            f"the region {reg.core} needs about {need / 2**30:.1f} GiB (budget {budget / 2**30:.1f} GiB) "
            f"because of the large particle(s) {[int(x) for x in worst]} (inscribed-radius bound "
            f"{float(b.max()):.4g}): if such a label is not a particle (binder, pore phase), skip it with "
            f"exclude_labels=[{int(worst[0])}] (--exclude-labels), or raise memory_limit"
        )
