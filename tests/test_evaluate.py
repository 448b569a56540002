"""Scoring a segmentation (grapes_dask.evaluate) against brute-force references.

The references below loop over labels with boolean masks on small arrays (numpy and pandas
only): for each truth label and each predicted label, the intersection and the union of their
masks. They share no code with the module under test.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grapes_dask import GrapesInputError
from grapes_dask.evaluate import KeptIds, LabelMatch, block_pairs, kept_ids, match_labels, overlap_table, same_partition

# --------------------------------------------------------------------------------------------
# brute-force references
# --------------------------------------------------------------------------------------------


def ref_ious(truth, pred):
    """{(t, p): (iou, overlap, |t|, |p|)} for every pair of particles that overlap (loops over labels)."""
    out = {}
    tl = [int(v) for v in np.unique(truth) if v != 0]
    pl = [int(v) for v in np.unique(pred) if v != 0]
    for t in tl:
        mt = truth == t
        for p in pl:
            mp = pred == p
            inter = int(np.count_nonzero(mt & mp))
            if inter:
                union = int(np.count_nonzero(mt | mp))
                out[(t, p)] = (inter / union, inter, int(mt.sum()), int(mp.sum()))
    return out


def ref_border(truth):
    """Labels on the faces of the volume (loop over axes)."""
    faces = []
    for ax in range(truth.ndim):
        faces += [np.take(truth, 0, axis=ax).ravel(), np.take(truth, -1, axis=ax).ravel()]
    return {int(v) for v in np.concatenate(faces) if v != 0}


def ref_match(truth, pred, thr, share=0.1, exclude_border=False):
    """Brute-force scores: best pred per truth, greedy one-to-one matching, splits, merges."""
    pairs = ref_ious(truth, pred)
    tl = sorted(int(v) for v in np.unique(truth) if v != 0)
    if exclude_border:
        out = ref_border(truth)
        tl = [t for t in tl if t not in out]
        pairs = {k: v for k, v in pairs.items() if k[0] not in out}
    pl = sorted(int(v) for v in np.unique(pred) if v != 0)
    rows = []
    for t in tl:
        cands = [(iou, inter, -p, p, sp) for (tt, p), (iou, inter, st_, sp) in pairs.items() if tt == t]
        size = int(np.count_nonzero(truth == t))
        if cands:
            iou, inter, _, p, sp = max(cands)
            rows.append((t, p, iou, inter, size, sp))
        else:
            rows.append((t, 0, 0.0, 0, size, 0))
    # greedy: all pairs by decreasing iou, larger overlap, smaller t, smaller p
    order = sorted(((-iou, -inter, t, p) for (t, p), (iou, inter, _, _) in pairs.items() if iou >= thr))
    used_t, used_p, match = set(), set(), {}
    for negiou, _, t, p in order:
        if t not in used_t and p not in used_p:
            used_t.add(t)
            used_p.add(p)
            match[t] = (p, -negiou)
    split = sum(1 for t in tl
                if sum(1 for (tt, p), (_, inter, st_, _) in pairs.items() if tt == t and inter >= share * st_) >= 2)
    merged = sum(1 for p in pl
                 if sum(1 for (t, pp), (_, inter, st_, _) in pairs.items() if pp == p and inter >= share * st_) >= 2)
    table = pd.DataFrame(rows, columns=["truth_label", "pred_label", "iou", "overlap", "truth_voxels", "pred_voxels"])
    table["match_label"] = [match.get(t, (0, 0.0))[0] for t in tl]
    table["match_iou"] = [match.get(t, (0, 0.0))[1] for t in tl]
    table["matched"] = [t in match for t in tl]
    return dict(n_truth=len(tl), n_pred=len(pl), n_matched=len(match), n_split=split, n_merged=merged,
                mean_iou=float(np.mean([m[1] for m in match.values()])) if match else float("nan"), table=table)


def ref_same_partition(a, b):
    if not np.array_equal(a == 0, b == 0):
        return False
    fwd, back = {}, {}
    for x, y in zip(a.ravel().tolist(), b.ravel().tolist()):
        if fwd.setdefault(x, y) != y or back.setdefault(y, x) != x:
            return False
    return True


def check_against_reference(m: LabelMatch, truth, pred, thr, share=0.1, exclude_border=False):
    ref = ref_match(truth, pred, thr, share, exclude_border)
    assert m.n_border == (len(ref_border(truth)) if exclude_border else 0)
    for k in ("n_truth", "n_pred", "n_matched", "n_split", "n_merged"):
        assert getattr(m, k) == ref[k], k
    if ref["n_matched"]:
        assert m.mean_iou == pytest.approx(ref["mean_iou"], rel=1e-12)
        assert m.matched_fraction == ref["n_matched"] / ref["n_truth"]
    else:
        assert np.isnan(m.mean_iou)
    got = m.table
    exp = ref["table"]
    assert list(got.columns) == list(exp.columns)
    for c in exp.columns:
        if c in ("iou", "match_iou"):
            np.testing.assert_array_equal(got[c].to_numpy(), exp[c].to_numpy(dtype=float), err_msg=c)
        else:
            np.testing.assert_array_equal(got[c].to_numpy().astype(object), exp[c].to_numpy().astype(object),
                                          err_msg=c)


# --------------------------------------------------------------------------------------------
# hand-made cases
# --------------------------------------------------------------------------------------------


def blobs():
    """Three boxes in a 2D image; a prediction that splits one, merges two others, shifts one."""
    truth = np.zeros((20, 30), np.uint16)
    truth[2:8, 2:10] = 1
    truth[2:8, 10:18] = 2
    truth[10:18, 2:12] = 3
    truth[10:18, 15:28] = 4
    pred = np.zeros_like(truth, dtype=np.int32)
    pred[2:8, 2:18] = 9          # 1 and 2 merged
    pred[10:18, 2:7] = 5         # 3 split in two halves
    pred[10:18, 7:12] = 6
    pred[10:18, 16:28] = 7       # 4 slightly shrunk: IoU 12/13
    return truth, pred


def test_hand_made_case():
    truth, pred = blobs()
    m = match_labels(truth, pred, iou=0.85)
    assert (m.n_truth, m.n_pred, m.n_matched, m.n_split, m.n_merged) == (4, 4, 1, 1, 1)
    assert m.mean_iou == 12 / 13
    assert m.matched_fraction == 0.25
    row = m.table.set_index("truth_label").loc[4]
    assert (row.pred_label, row.overlap, row.truth_voxels, row.pred_voxels) == (7, 96, 104, 96)
    check_against_reference(m, truth, pred, 0.85)
    # at 0.5 the merged pair (IoU 0.5 each, a tie) gives one match, by the smaller truth label
    m5 = match_labels(truth, pred, iou=0.5)
    check_against_reference(m5, truth, pred, 0.5)
    assert m5.table.set_index("truth_label").loc[1, "match_label"] == 9
    assert not m5.table.set_index("truth_label").loc[2, "matched"]


def test_ties_in_iou_go_to_the_larger_overlap():
    truth = np.array([[1] * 12 + [0] * 3])
    pred = np.array([[1] * 4 + [2] * 5 + [0] * 3 + [2] * 3])  # IoU 4/12 and 5/15
    m = match_labels(truth, pred, iou=0.3)
    row = m.table.iloc[0]
    assert (row.pred_label, row.overlap, row.iou, row.match_label) == (2, 5, 1 / 3, 2)
    check_against_reference(m, truth, pred, 0.3)


def test_identical_and_permuted_labels():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 6, (9, 10, 11)).astype(np.uint8)
    perm = np.array([0, 40, 2**40, 7, 3, 11], dtype=np.uint64)
    pred = perm[truth]
    m = match_labels(truth, pred, chunks=(4, 3, 5))
    assert m.n_matched == m.n_truth == m.n_pred == 5 and m.mean_iou == 1.0
    np.testing.assert_array_equal(m.table["pred_label"], perm[1:])
    assert same_partition(truth, pred, chunks=(4, 3, 5))
    assert same_partition(pred, truth)


def test_split_or_merge_is_not_the_same_partition():
    truth, _ = blobs()
    split = truth.astype(np.int64)
    split[10:18, 2:5] = 99
    assert not same_partition(truth, split) and not same_partition(split, truth)
    merged = truth.copy()
    merged[merged == 2] = 1
    assert not same_partition(truth, merged) and not same_partition(merged, truth)
    grown = truth.copy()
    grown[0, 0] = 1  # a background voxel becomes particle
    assert not same_partition(truth, grown) and not same_partition(grown, truth)


def test_no_particles_gives_typed_empty_results():
    z = np.zeros((5, 6, 7), np.uint16)
    m = match_labels(z, z)
    assert (m.n_truth, m.n_pred, m.n_matched, m.n_split, m.n_merged) == (0, 0, 0, 0, 0)
    assert np.isnan(m.matched_fraction) and np.isnan(m.mean_iou)
    assert len(m.table) == 0
    assert dict(m.table.dtypes.astype(str)) == {
        "truth_label": "uint64", "pred_label": "uint64", "iou": "float64", "overlap": "int64",
        "truth_voxels": "int64", "pred_voxels": "int64", "match_label": "uint64", "match_iou": "float64",
        "matched": "bool"}
    assert same_partition(z, z)
    k = kept_ids(z, z)
    assert isinstance(k, KeptIds) and k.n_reference == 0 and np.isnan(k.fraction) and len(k.table) == 0
    assert str(k.table["label"].dtype) == "uint64"
    # truth particles, no prediction: nothing matched, every best label 0
    t = z.copy()
    t[1:3, 1:3, 1:3] = 4
    m = match_labels(t, z)
    assert (m.n_truth, m.n_pred, m.n_matched) == (1, 0, 0) and m.matched_fraction == 0.0
    assert m.table["pred_label"].tolist() == [0] and m.table["iou"].tolist() == [0.0]
    assert not same_partition(t, z)


def test_kept_ids_against_reference():
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 8, (12, 13, 14)).astype(np.uint32)
    pred = ref.astype(np.uint64).copy()
    pred[pred == 3] = 0                 # particle 3 gone
    pred[pred == 5] = 2**40 + 5         # particle 5 relabelled: not kept
    pred[(ref == 6) & (rng.random(ref.shape) < 0.5)] = 1  # particle 6 half taken by 1
    k = kept_ids(ref, pred, chunks=(5, 7, 4))
    ious = ref_ious(ref, pred)
    exp = []
    for t in range(1, 8):
        cands = [(iou, inter, -p, p) for (tt, p), (iou, inter, _, _) in ious.items() if tt == t]
        best = max(cands)[3] if cands else 0
        exp.append(best == t)
    assert k.n_reference == 7
    assert k.table["kept"].tolist() == exp
    assert k.fraction == sum(exp) / 7
    # requiring an IoU drops the damaged particles 1 and 6
    k9 = kept_ids(ref, pred, min_iou=0.9)
    assert k9.table.set_index("label").loc[[1, 6], "kept"].tolist() == [False, False]
    assert k9.n_kept == sum(exp) - 2


def test_block_pairs_counts():
    rng = np.random.default_rng(2)
    t = rng.integers(0, 4, (6, 7, 8)).astype(np.int16)
    p = rng.integers(0, 3, (6, 7, 8)).astype(np.uint64) * np.uint64(2**39)
    a, b, n = block_pairs(t, p)
    exp = pd.DataFrame({"t": t.ravel().astype(np.uint64), "p": p.ravel()}).value_counts().sort_index()
    np.testing.assert_array_equal(a, exp.index.get_level_values(0).to_numpy(np.uint64))
    np.testing.assert_array_equal(b, exp.index.get_level_values(1).to_numpy(np.uint64))
    np.testing.assert_array_equal(n, exp.to_numpy())
    assert a.dtype == np.uint64 and b.dtype == np.uint64 and n.dtype == np.int64


def test_inputs_dask_and_zarr(tmp_path):
    import zarr

    truth, pred = blobs()
    z = zarr.create_array(tmp_path / "pred.zarr", shape=pred.shape, chunks=(7, 9), dtype=pred.dtype)
    z[...] = pred
    m_np = match_labels(truth, pred)
    m_z = match_labels(da.from_array(truth, chunks=(5, 4)), str(tmp_path / "pred.zarr"))
    pd.testing.assert_frame_equal(m_np.table, m_z.table)
    pd.testing.assert_frame_equal(overlap_table(truth, pred), m_np.pairs)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def test_bad_inputs_raise_before_compute():
    truth, pred = blobs()
    calls = []

    def boom(x):
        calls.append(1)
        return x

    lazy = da.from_array(truth, chunks=5).map_blocks(boom, meta=np.empty((0, 0), truth.dtype))
    with pytest.raises(GrapesInputError, match="shape"):
        match_labels(lazy, pred[:, :-1])
    with pytest.raises(GrapesInputError, match="shape"):
        same_partition(lazy, pred[:-1])
    with pytest.raises(GrapesInputError, match="shape"):
        kept_ids(lazy, pred[None])
    with pytest.raises(GrapesInputError, match="integers"):
        match_labels(lazy, pred.astype(np.float32))
    with pytest.raises(GrapesInputError, match="iou"):
        match_labels(lazy, pred, iou=0)
    with pytest.raises(GrapesInputError, match="iou"):
        match_labels(lazy, pred, iou=float("nan"))
    with pytest.raises(GrapesInputError, match="min_share"):
        match_labels(lazy, pred, min_share=1.5)
    with pytest.raises(GrapesInputError, match="min_iou"):
        kept_ids(lazy, pred, min_iou=-0.1)
    assert calls == []


def test_negative_labels_are_refused():
    truth, pred = blobs()
    bad = pred.copy()
    bad[0, 0] = -3
    with pytest.raises(GrapesInputError, match="negative"):
        match_labels(truth, bad)


# --------------------------------------------------------------------------------------------
# hypothesis: random label arrays, sparse ids, uneven chunks
# --------------------------------------------------------------------------------------------

SPARSE = np.array([0, 1, 2, 3, 2**33 + 1, 2**40, 2**40 - 7, 977], dtype=np.uint64)


@st.composite
def label_pair(draw):
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=2, max_size=3)))
    size = int(np.prod(shape))
    k = draw(st.integers(1, len(SPARSE)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # blocky labels, so that matches, splits and merges all happen
    base = rng.integers(0, k, size=shape)
    coarse = np.kron(rng.integers(0, k, size=[(s + 1) // 2 for s in shape]), np.ones((2,) * len(shape), int))
    coarse = coarse[tuple(slice(0, s) for s in shape)]
    truth = np.where(rng.random(shape) < 0.8, coarse, base)
    mode = draw(st.sampled_from(["noise", "permute", "shift"]))
    if mode == "permute":
        pred = rng.permutation(k)[truth]
    elif mode == "shift":
        pred = np.roll(truth, 1, axis=len(shape) - 1)
    else:
        pred = np.where(rng.random(shape) < 0.3, rng.integers(0, k, size=shape), truth)
    chunks = tuple(draw(st.integers(1, s)) for s in shape)
    tdt = draw(st.sampled_from([np.uint64, None]))
    t = SPARSE[truth] if tdt is not None else truth.astype(np.int32)
    p = SPARSE[::-1][pred] if draw(st.booleans()) else pred.astype(np.uint8)
    return t, p, chunks


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label_pair(), st.sampled_from([0.3, 0.5, 0.85, 1.0]), st.sampled_from([0.1, 0.4]), st.booleans())
def test_match_labels_matches_brute_force(pair, thr, share, exclude_border):
    t, p, chunks = pair
    with dask.config.set(scheduler="sync"):
        m = match_labels(t, p, iou=thr, min_share=share, exclude_border=exclude_border, chunks=chunks)
    check_against_reference(m, t, p, thr, share, exclude_border)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label_pair())
def test_same_partition_matches_brute_force(pair):
    t, p, chunks = pair
    with dask.config.set(scheduler="sync"):
        got = same_partition(t, p, chunks=chunks)
    assert got == ref_same_partition(t, p)
    assert got == same_partition(p, t, chunks=chunks)


@settings(max_examples=30, deadline=None)
@given(label_pair())
def test_chunking_does_not_change_the_result(pair):
    t, p, chunks = pair
    a = match_labels(t, p, chunks=chunks, scheduler="threads")
    b = match_labels(t, p, chunks=t.shape, scheduler="sync")
    pd.testing.assert_frame_equal(a.table, b.table)
    pd.testing.assert_frame_equal(a.pairs, b.pairs)
    assert a.summary() == pytest.approx(b.summary(), nan_ok=True)


def test_phantom_labels_against_themselves_shifted():
    from grapes_dask.synthetic import phantom_numpy

    _, labels, _ = phantom_numpy((40, 48, 56), mean_radius=7, seed=5, ids="sparse", max_id=2**40, chunks=32)
    shifted = np.roll(labels, 1, axis=0)
    m = match_labels(labels, shifted, chunks=(17, 23, 29))
    check_against_reference(m, labels, shifted, 0.85)
    m = match_labels(labels, shifted, chunks=(17, 23, 29), exclude_border=True)
    check_against_reference(m, labels, shifted, 0.85, exclude_border=True)
    assert 0 < m.n_border < m.n_border + m.n_truth
    assert same_partition(labels, labels.astype(np.uint64) * np.uint64(3), chunks=(17, 23, 29))
