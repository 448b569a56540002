"""Scoring a segmentation against a reference, out of core.

Every function here reduces two label volumes of one shape to their **overlap table**: the
number of voxels of every pair ``(truth label, predicted label)`` that occurs together,
background 0 included on either side. Each block of chunks gives its own table (run-length
compression of the block's flattened voxels, then a sort of the runs by pair and a sum per
pair), and the tables are combined by pair in a tree (fan-in 8), so that one task handles one
block whatever the number of particles, and only the tables (a few rows per particle) are
ever held in memory, never a volume. The counts are integers: the result is the same for any
chunking and any scheduler.

From the overlap table:

- :func:`match_labels`: for each reference particle, the predicted particle of largest
  intersection over union (IoU), one-to-one matches at an IoU threshold, splits and merges
  (a :class:`LabelMatch`);
- :func:`same_partition`: whether two label volumes cut the voxels into the same particles,
  up to the ids;
- :func:`kept_ids`: the fraction of reference particles whose best match carries the same id
  (a :class:`KeptIds`), for segmentations seeded with reference labels.

Label 0 is background in both volumes and is never a particle. Labels are integers (any
integer dtype, or bool for a single particle); negative values are refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import dask
import numpy as np
import pandas as pd

from ._errors import GrapesInputError

__all__ = ["match_labels", "same_partition", "kept_ids", "overlap_table", "overlap_graph", "block_pairs", "LabelMatch",
           "KeptIds"]

_FAN_IN = 8
_U64 = np.uint64

_TABLE_COLUMNS = {
    "truth_label": "uint64", "pred_label": "uint64", "iou": "float64", "overlap": "int64",
    "truth_voxels": "int64", "pred_voxels": "int64", "match_label": "uint64", "match_iou": "float64",
    "matched": "bool",
}


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LabelMatch:
    """A segmentation scored against a reference (truth) segmentation (:func:`match_labels`).

    Attributes
    ----------
    threshold : float
        IoU threshold of a match (the `iou` argument).
    min_share : float
        Share of a truth particle's voxels that a predicted label must hold to count in a split
        or a merge (the `min_share` argument).
    exclude_border : bool
        Whether truth particles touching the volume's faces were left out (the argument).
    n_border : int
        Truth particles left out for touching the volume's faces (0 without `exclude_border`).
    n_truth : int
        Truth particles scored (distinct non-zero truth labels, less the `n_border` left out).
    n_pred : int
        Predicted particles (distinct non-zero predicted labels, all of them).
    n_matched : int
        One-to-one matches with IoU >= `threshold` (see :func:`match_labels` for the rule).
    matched_fraction : float
        ``n_matched / n_truth``; NaN when there is no truth particle.
    mean_iou : float
        Mean IoU of the matched pairs; NaN when nothing is matched.
    n_split : int
        Truth particles of which at least two predicted labels each hold ``>= min_share`` of
        the voxels (over-segmentation).
    n_merged : int
        Predicted labels that hold ``>= min_share`` of the voxels of each of at least two truth
        particles (under-segmentation).
    table : pandas.DataFrame
        One row per truth particle, sorted by ``truth_label``: ``truth_label`` (uint64),
        ``pred_label`` (uint64; the predicted label of largest IoU with it, 0 if no predicted
        particle meets it), ``iou`` (float64, 0 without overlap), ``overlap`` (voxels of the
        pair), ``truth_voxels``, ``pred_voxels`` (voxels of the two particles, int64; 0 for
        ``pred_label`` 0), ``match_label`` (uint64, its one-to-one match, 0 if none),
        ``match_iou`` (float64, 0 if none), ``matched`` (bool). With a threshold above 0.5,
        ``match_label`` is ``pred_label`` whenever ``matched``.
    pairs : pandas.DataFrame
        The overlap table: ``truth_label, pred_label`` (uint64, 0 for background) and ``voxels``
        (int64), one row per pair that occurs, sorted by truth then predicted label.
    """

    threshold: float
    min_share: float
    exclude_border: bool
    n_border: int
    n_truth: int
    n_pred: int
    n_matched: int
    matched_fraction: float
    mean_iou: float
    n_split: int
    n_merged: int
    table: pd.DataFrame = field(repr=False)
    pairs: pd.DataFrame = field(repr=False)

    def summary(self) -> dict:
        """The scalar fields as a dict (for a row of a results table)."""
        return {k: getattr(self, k) for k in ("threshold", "n_border", "n_truth", "n_pred", "n_matched", "matched_fraction",
                                              "mean_iou", "n_split", "n_merged")}


@dataclass(frozen=True, eq=False)
class KeptIds:
    """How many reference particles keep their id in a segmentation (:func:`kept_ids`).

    Attributes
    ----------
    min_iou : float
        Smallest IoU for a particle to count as kept (the `min_iou` argument).
    n_reference : int
        Reference particles (distinct non-zero labels).
    n_kept : int
        Reference particles whose best match (largest IoU) in the prediction carries the same
        id, with IoU >= `min_iou`.
    fraction : float
        ``n_kept / n_reference``; NaN when there is no reference particle.
    mean_iou : float
        Mean IoU of the kept particles; NaN when none is kept.
    table : pandas.DataFrame
        One row per reference particle: ``label`` (uint64), ``best_label`` (uint64, 0 when no
        predicted particle meets it), ``iou`` (float64), ``kept`` (bool).
    """

    min_iou: float
    n_reference: int
    n_kept: int
    fraction: float
    mean_iou: float
    table: pd.DataFrame = field(repr=False)


# --------------------------------------------------------------------------------------------
# per-block overlap tables (numpy)
# --------------------------------------------------------------------------------------------


def _empty_pairs():
    return np.empty(0, _U64), np.empty(0, _U64), np.empty(0, np.int64)


def _reduce_pairs(t, p, n):
    """Sum the counts `n` of equal pairs ``(t, p)``; result sorted by t then p."""
    if len(t) == 0:
        return _empty_pairs()
    order = np.lexsort((p, t))
    t, p, n = t[order], p[order], n[order]
    new = np.empty(len(t), dtype=bool)
    new[0] = True
    np.not_equal(t[1:], t[:-1], out=new[1:])
    new[1:] |= p[1:] != p[:-1]
    idx = np.flatnonzero(new)
    return t[idx], p[idx], np.add.reduceat(n, idx)


def _as_labels(values: np.ndarray, name: str) -> np.ndarray:
    """Run values (any integer or bool dtype) as uint64; negative labels are an error."""
    if values.dtype.kind == "i" and len(values) and values.min() < 0:
        raise GrapesInputError(
            f"{name} holds negative labels (smallest {int(values.min())}): labels are 0 (background) or "
            "positive particle ids; relabel the volume first"
        )
    return values.astype(_U64, copy=False)


def block_pairs(t: np.ndarray, p: np.ndarray, names=("truth", "pred")):
    """Overlap table of one block: the voxel count of every ``(t, p)`` label pair in it.

    Parameters
    ----------
    t, p : numpy.ndarray
        Two label blocks of one shape (any integer or bool dtype).
    names : (str, str)
        The two inputs' names, for the error on negative labels.

    Returns
    -------
    t_labels, p_labels : numpy.ndarray of uint64, shape (k,)
        The pairs, sorted by `t_labels` then `p_labels` (background 0 included).
    voxels : numpy.ndarray of int64, shape (k,)
    """
    t = np.ascontiguousarray(t).reshape(-1)
    p = np.ascontiguousarray(p).reshape(-1)
    n = t.size
    if n == 0:
        return _empty_pairs()
    # runs of equal pairs along the flattened block (particles span many voxels along x)
    change = np.empty(n, dtype=bool)
    change[0] = True
    np.not_equal(t[1:], t[:-1], out=change[1:])
    change[1:] |= p[1:] != p[:-1]
    starts = np.flatnonzero(change)
    lengths = np.diff(np.append(starts, n)).astype(np.int64, copy=False)
    rt = _as_labels(t[starts], names[0])
    rp = _as_labels(p[starts], names[1])
    return _reduce_pairs(rt, rp, lengths)


def _border_labels(t: np.ndarray, faces) -> np.ndarray:
    """Distinct non-zero labels of block `t` on the given faces ``(axis, 0 | -1)``, uint64."""
    if not faces:
        return np.empty(0, _U64)
    vals = [np.unique(np.take(t, [side], axis=axis)) for axis, side in faces]
    u = np.unique(np.concatenate(vals)).astype(_U64)
    return u[u != 0]


def _block_task(t, p, faces, names):
    """Overlap table of a block and the truth labels on the volume faces it holds."""
    return (*block_pairs(t, p, names), _border_labels(t, faces))


def _combine(parts):
    """Block results ``(t, p, voxels, border labels)`` combined by pair (and border labels united)."""
    border = np.unique(np.concatenate([x[3] for x in parts])) if parts else np.empty(0, _U64)
    parts = [x for x in parts if len(x[0])]
    if not parts:
        return (*_empty_pairs(), border.astype(_U64))
    if len(parts) == 1:
        return (*parts[0][:3], border.astype(_U64))
    return (*_reduce_pairs(*(np.concatenate([x[i] for x in parts]) for i in range(3))), border.astype(_U64))


# --------------------------------------------------------------------------------------------
# graph
# --------------------------------------------------------------------------------------------


def _resolve_pair(a, b, chunks, names):
    """The two inputs as dask arrays of one shape and one chunking (checked, nothing computed)."""
    from .io import resolve_volume

    vols = []
    for src, name in zip((a, b), names):
        try:
            vols.append(resolve_volume(src, chunks=chunks))
        except GrapesInputError as err:
            raise GrapesInputError(f"{name}: {err}") from err
    va, vb = vols
    for v, name in zip(vols, names):
        if v.array.dtype.kind not in "uib":
            raise GrapesInputError(
                f"{name} ({v.name}) has dtype {v.array.dtype}: labels must be integers (0 = background); "
                "pass the label volume, not the grey one, or round and cast it first"
            )
    if va.shape != vb.shape:
        raise GrapesInputError(
            f"{names[0]} ({va.name}) has shape {va.shape} but {names[1]} ({vb.name}) has shape {vb.shape}: "
            "compare two label volumes of the same scan (crop or pad one to the other first)"
        )
    xa, xb = va.array, vb.array
    if xa.chunks != xb.chunks:
        xb = xb.rechunk(xa.chunks)
    return xa, xb


def overlap_graph(a, b, *, chunks=None, names=("truth", "pred")):
    """Lazy overlap table of two label volumes: one task per block, combined by pair in a tree.

    Parameters
    ----------
    a, b : array-like or path
        Label volumes of one shape: numpy or dask arrays, or anything
        :func:`grapes_dask.io.resolve_volume` opens (Zarr, TIFF, HDF5 ...).
    chunks : int or tuple of int, optional
        Block shape, voxels (default: the chunks of `a`; `b` is rechunked to them if they
        differ).
    names : (str, str)
        The inputs' names in error messages.

    Returns
    -------
    dask.delayed.Delayed
        Computes to ``(t_labels, p_labels, voxels, border)``: the overlap table of the whole
        volume as :func:`block_pairs`, and the sorted distinct non-zero labels of `a` on the
        volume's faces (uint64).

    Raises
    ------
    GrapesInputError
        Before any compute: shapes differ, a non-integer dtype, an input that cannot be opened.
    """
    xa, xb = _resolve_pair(a, b, chunks, names)
    da_blocks = xa.to_delayed()
    db_blocks = xb.to_delayed()
    tasks = []
    for idx in np.ndindex(*da_blocks.shape):
        faces = tuple((ax, side) for ax, i in enumerate(idx) for side, edge in ((0, 0), (-1, len(xa.chunks[ax]) - 1))
                      if i == edge)
        tasks.append(dask.delayed(_block_task, pure=True)(da_blocks[idx], db_blocks[idx], faces, names))
    if len(tasks) == 1:
        tasks = [dask.delayed(_combine, pure=True)(tasks)]
    while len(tasks) > 1:
        nxt = []
        for i in range(0, len(tasks), _FAN_IN):
            group = tasks[i:i + _FAN_IN]
            digest = hashlib.sha256(repr([t.key for t in group]).encode()).hexdigest()[:32]
            nxt.append(dask.delayed(_combine, pure=True)(group, dask_key_name=f"overlap-combine-{digest}"))
        tasks = nxt
    return tasks[0]


def overlap_table(a, b, *, chunks=None, scheduler=None) -> pd.DataFrame:
    """Voxel count of every pair ``(label in a, label in b)`` that occurs, out of core.

    Parameters
    ----------
    a, b : array-like or path
        Label volumes of one shape (see :func:`overlap_graph`).
    chunks : int or tuple of int, optional
        Block shape, voxels (default: the chunks of `a`).
    scheduler : str, optional
        Dask scheduler for the compute (default: the current one).

    Returns
    -------
    pandas.DataFrame
        Columns ``truth_label, pred_label`` (uint64; 0 is background) and ``voxels`` (int64),
        one row per pair that occurs, sorted by `a`'s label then `b`'s.
    """
    t, p, n, _ = dask.compute(overlap_graph(a, b, chunks=chunks), scheduler=scheduler)[0]
    return pd.DataFrame({"truth_label": t, "pred_label": p, "voxels": n})


# --------------------------------------------------------------------------------------------
# scores from the overlap table
# --------------------------------------------------------------------------------------------


def _sizes(labels, voxels):
    """(sorted distinct labels, total voxels of each) of a label column and its counts."""
    if len(labels) == 0:
        return np.empty(0, _U64), np.empty(0, np.int64)
    order = np.argsort(labels, kind="stable")
    lab = labels[order]
    first = np.ones(len(lab), dtype=bool)
    first[1:] = lab[1:] != lab[:-1]
    idx = np.flatnonzero(first)
    return lab[idx], np.add.reduceat(voxels[order], idx)


def _check_fraction(name, value, lo_open=True):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise GrapesInputError(f"{{{name}}} is not a number: give a value in (0, 1]", **{name: value}) from None
    ok = (0.0 < v <= 1.0) if lo_open else (0.0 <= v <= 1.0)  # False for NaN
    if not ok:
        interval = "(0, 1]" if lo_open else "[0, 1]"
        raise GrapesInputError(f"{{{name}}} is outside {interval}: give a fraction, e.g. 0.85", **{name: value})
    return v


def _pair_iou(t, p, n):
    """Pairs of two particles (no background) with their IoU and both sizes."""
    tu, tsz = _sizes(t, n)
    pu, psz = _sizes(p, n)
    keep = (t != 0) & (p != 0)
    t2, p2, n2 = t[keep], p[keep], n[keep]
    ts = tsz[np.searchsorted(tu, t2)]
    ps = psz[np.searchsorted(pu, p2)]
    iou = n2 / (ts + ps - n2).astype(np.float64)
    return (tu, tsz, pu, psz), (t2, p2, n2, ts, ps, iou)


def _one_to_one(t2, p2, n2, iou, threshold):
    """Indices of the one-to-one matched pairs with IoU >= threshold.

    Greedy by decreasing IoU (ties: larger overlap, then smaller truth label, then smaller
    predicted label), each label used at most once. Above 0.5 every candidate is unique: a
    pair with IoU > 0.5 shares more than half of each particle, which no other pair of either
    can; the greedy rule then takes them all.
    """
    cand = np.flatnonzero(iou >= threshold)
    if threshold > 0.5 or len(cand) == 0:
        return cand
    order = cand[np.lexsort((p2[cand], t2[cand], -n2[cand], -iou[cand]))]
    used_t, used_p, out = set(), set(), []
    for i in order:
        a, b = int(t2[i]), int(p2[i])
        if a in used_t or b in used_p:
            continue
        used_t.add(a)
        used_p.add(b)
        out.append(i)
    return np.sort(np.asarray(out, dtype=np.int64))


def _best_per_truth(t2, p2, n2, iou):
    """Index of the best pair of each truth label: largest IoU, then overlap, then smaller pred label."""
    if len(t2) == 0:
        return np.empty(0, dtype=np.int64)
    order = np.lexsort((p2, -n2, -iou, t2))
    ts = t2[order]
    first = np.ones(len(ts), dtype=bool)
    first[1:] = ts[1:] != ts[:-1]
    return order[first]


def _score(t, p, n, threshold, min_share, border=None) -> LabelMatch:
    (tu, tsz, pu, psz), (t2, p2, n2, ts, ps, iou) = _pair_iou(t, p, n)
    truth_ids, truth_sz = tu[tu != 0], tsz[tu != 0]
    n_border = 0
    if border is not None:  # leave out the truth particles on the volume faces (sizes stay whole)
        keep = ~np.isin(truth_ids, border)
        n_border = int(len(truth_ids) - keep.sum())
        truth_ids, truth_sz = truth_ids[keep], truth_sz[keep]
        keep = ~np.isin(t2, border)
        t2, p2, n2, ts, ps, iou = (x[keep] for x in (t2, p2, n2, ts, ps, iou))
    n_truth = len(truth_ids)
    n_pred = int(np.count_nonzero(pu))
    best = _best_per_truth(t2, p2, n2, iou)
    matches = _one_to_one(t2, p2, n2, iou, threshold)

    k = n_truth
    table = {
        "truth_label": truth_ids.astype(_U64), "pred_label": np.zeros(k, _U64), "iou": np.zeros(k),
        "overlap": np.zeros(k, np.int64), "truth_voxels": truth_sz.astype(np.int64),
        "pred_voxels": np.zeros(k, np.int64), "match_label": np.zeros(k, _U64), "match_iou": np.zeros(k),
        "matched": np.zeros(k, bool),
    }
    row = np.searchsorted(truth_ids, t2[best])
    table["pred_label"][row] = p2[best]
    table["iou"][row] = iou[best]
    table["overlap"][row] = n2[best]
    table["pred_voxels"][row] = ps[best]
    row = np.searchsorted(truth_ids, t2[matches])
    table["match_label"][row] = p2[matches]
    table["match_iou"][row] = iou[matches]
    table["matched"][row] = True
    df = pd.DataFrame(table).astype(_TABLE_COLUMNS)

    # splits: truth particles of which >= 2 predicted labels each hold >= min_share of the voxels;
    # merges: predicted labels holding >= min_share of each of >= 2 truth particles
    big = n2 >= min_share * ts
    ut, ct = np.unique(t2[big], return_counts=True)
    up, cp = np.unique(p2[big], return_counts=True)
    n_matched = len(matches)
    return LabelMatch(
        threshold=threshold, min_share=min_share, exclude_border=border is not None, n_border=n_border,
        n_truth=n_truth, n_pred=n_pred, n_matched=n_matched,
        matched_fraction=(n_matched / n_truth) if n_truth else float("nan"),
        mean_iou=float(iou[matches].mean()) if n_matched else float("nan"),
        n_split=int(np.count_nonzero(ct >= 2)), n_merged=int(np.count_nonzero(cp >= 2)),
        table=df,
        pairs=pd.DataFrame({"truth_label": t.astype(_U64), "pred_label": p.astype(_U64),
                            "voxels": n.astype(np.int64)}),
    )


def match_labels(truth, pred, *, iou: float = 0.85, min_share: float = 0.1, exclude_border: bool = False,
                 chunks=None, scheduler=None) -> LabelMatch:
    """Score a segmentation against a reference one: per-particle IoU, matches, splits, merges.

    Out of core: each block of chunks gives the voxel count of every (truth, pred) label pair
    in it, and these are summed by pair in a tree; from the totals, the size of each particle
    and the intersection over union ``IoU = |T & P| / |T | P|`` of each overlapping pair.

    Matching rule: one-to-one, greedy by decreasing IoU (ties: larger overlap, then smaller
    truth label, then smaller predicted label), keeping pairs with ``IoU >= iou``. For a
    threshold above 0.5 (the default 0.85) the matching is unique whatever the rule: two
    particles with IoU > 0.5 share more than half of each other's voxels, so neither can
    have a second such partner.

    Parameters
    ----------
    truth, pred : array-like or path
        Label volumes of one shape, shape ``(Z, Y, X)`` or ``(Y, X)``: numpy or dask arrays, or
        anything :func:`grapes_dask.io.resolve_volume` opens (a Zarr store, TIFF, HDF5
        ``file.h5::/dataset`` ...). Integer (or bool) dtype; 0 is background in both.
    iou : float
        IoU threshold of a match, in (0, 1].
    min_share : float
        A predicted label "covers" a truth particle when it holds at least this share of the
        truth particle's voxels, in (0, 1]: a truth particle covered by two labels or more is a
        split, a predicted label covering two truth particles or more is a merge.
    exclude_border : bool
        Leave out the truth particles that touch a face of the volume (cut by the field of
        view: every method sees only part of them, and their distance map is distorted). The
        predicted particles are all kept (as candidates and in ``n_pred``), and the sizes are
        those of the whole volume. ``n_border`` says how many were left out.
    chunks : int or tuple of int, optional
        Block shape, voxels (default: the chunks of `truth`, 128^3 for numpy arrays; `pred` is
        rechunked to them if its chunks differ). Only memory and speed depend on it.
    scheduler : str, optional
        Dask scheduler (default: the current one, e.g. a distributed Client).

    Returns
    -------
    LabelMatch
        Counts, matched fraction, mean IoU, splits, merges and the per-truth table. With no
        truth particle the table is empty (typed) and the fractions are NaN.

    Raises
    ------
    GrapesInputError
        Shapes differ, a non-integer dtype, an input that cannot be opened, a threshold outside
        (0, 1] (all before any compute); negative labels (when the block holding them is read).

    Examples
    --------
    >>> m = match_labels("truth.zarr", "segmented.zarr")          # doctest: +SKIP
    >>> m.matched_fraction, m.mean_iou, m.n_split, m.n_merged     # doctest: +SKIP
    """
    threshold = _check_fraction("iou", iou)
    share = _check_fraction("min_share", min_share)
    graph = overlap_graph(truth, pred, chunks=chunks, names=("truth", "pred"))
    t, p, n, border = dask.compute(graph, scheduler=scheduler)[0]
    return _score(t, p, n, threshold, share, border if exclude_border else None)


def same_partition(a, b, *, chunks=None, scheduler=None) -> bool:
    """Whether two label volumes cut the voxels into the same particles, up to the ids.

    True when background (0) is the same voxels in both and every label of `a` is exactly the
    voxels of one label of `b` (and so the other way round): `b` is `a` relabelled one-to-one.
    Out of core, as :func:`match_labels`.

    Parameters
    ----------
    a, b : array-like or path
        Label volumes of one shape (numpy, dask, or anything
        :func:`grapes_dask.io.resolve_volume` opens); integer dtype, 0 is background.
    chunks : int or tuple of int, optional
        Block shape, voxels (default: the chunks of `a`).
    scheduler : str, optional
        Dask scheduler (default: the current one).

    Returns
    -------
    bool

    Raises
    ------
    GrapesInputError
        Shapes differ or a non-integer dtype (before any compute).
    """
    t, p, _, _ = dask.compute(overlap_graph(a, b, chunks=chunks, names=("a", "b")), scheduler=scheduler)[0]
    both_bg = (t == 0) & (p == 0)
    t, p = t[~both_bg], p[~both_bg]
    if np.any((t == 0) != (p == 0)):  # a particle voxel against background
        return False
    # pairs are distinct: one-to-one when neither side repeats a label
    return len(np.unique(t)) == len(t) and len(np.unique(p)) == len(p)


def kept_ids(reference, pred, *, min_iou: float = 0.0, chunks=None, scheduler=None) -> KeptIds:
    """Fraction of reference particles whose best match in `pred` carries the same id.

    The best match of a reference particle is the predicted label of largest IoU with it (ties
    as :func:`match_labels`). For a segmentation seeded with the reference labels, a particle
    keeps its id when its best match is its own label; a particle absent from `pred` is not
    kept.

    Parameters
    ----------
    reference, pred : array-like or path
        Label volumes of one shape (numpy, dask, or anything
        :func:`grapes_dask.io.resolve_volume` opens); integer dtype, 0 is background.
    min_iou : float
        Also require the best match's IoU to reach this value, in [0, 1] (0: any overlap).
    chunks : int or tuple of int, optional
        Block shape, voxels (default: the chunks of `reference`).
    scheduler : str, optional
        Dask scheduler (default: the current one).

    Returns
    -------
    KeptIds

    Raises
    ------
    GrapesInputError
        Shapes differ, a non-integer dtype, `min_iou` outside [0, 1] (before any compute).
    """
    thr = _check_fraction("min_iou", min_iou, lo_open=False)
    graph = overlap_graph(reference, pred, chunks=chunks, names=("reference", "pred"))
    t, p, n, _ = dask.compute(graph, scheduler=scheduler)[0]
    m = _score(t, p, n, 1.0, 1.0)
    tab = m.table
    kept = (tab["pred_label"].to_numpy() == tab["truth_label"].to_numpy()) & (tab["iou"].to_numpy() >= thr)
    kept &= tab["pred_label"].to_numpy() != 0
    table = pd.DataFrame({"label": tab["truth_label"], "best_label": tab["pred_label"], "iou": tab["iou"],
                          "kept": kept}).astype({"label": "uint64", "best_label": "uint64", "iou": "float64",
                                                 "kept": "bool"})
    n_ref = len(table)
    n_kept = int(kept.sum())
    return KeptIds(min_iou=thr, n_reference=n_ref, n_kept=n_kept,
                   fraction=(n_kept / n_ref) if n_ref else float("nan"),
                   mean_iou=float(tab["iou"].to_numpy()[kept].mean()) if n_kept else float("nan"), table=table)
