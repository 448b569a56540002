"""grapes_dask.segmentation against independent references (scipy, scikit-image, plain Python loops),
and the same labels for every chunking."""

from __future__ import annotations

import itertools

import dask.array as da
import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi

from grapes_dask import GrapesInputError
from grapes_dask.segmentation import segment
from grapes_dask.synthetic import phantom_numpy


@pytest.fixture(scope="module")
def noisy():
    """A blurred, noisy phantom with ground truth (about 140 particles)."""
    grey, lab, _ = phantom_numpy((96, 96, 96), seed=3, mean_radius=9, blur_sigma=1.0, noise_sigma=8)
    return grey, lab


@pytest.fixture(scope="module")
def two_states():
    grey, lab, truth = phantom_numpy((80, 80, 80), n_states=2, seed=5, mean_radius=8, blur_sigma=1.0,
                                     noise_sigma=8, damage=0.6)
    return grey, lab, truth


def _matched_fraction(truth, pred, thr=0.85):
    """Fraction of truth particles whose best-overlapping predicted particle has IoU >= thr (loops)."""
    good = 0
    ids = [i for i in np.unique(truth) if i]
    for i in ids:
        m = truth == i
        cand = np.unique(pred[m])
        best = 0.0
        for c in cand[cand > 0]:
            p = pred == c
            best = max(best, (m & p).sum() / (m | p).sum())
        good += best >= thr
    return good / len(ids)


def _ball(r):
    g = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return (g ** 2).sum(0) <= r * r


def _work(seg_kwargs, grey, tmp_path, name):
    wd = tmp_path / name
    res = segment(grey, work_dir=wd, keep_work=True, **seg_kwargs)
    return res, wd


# -------------------------------------------------------------------------------------------
# stage by stage, against scipy
# -------------------------------------------------------------------------------------------


def test_mask_and_distance_equal_scipy(noisy, tmp_path):
    grey, _ = noisy
    res, wd = _work(dict(chunks=(40, 33, 57), threshold=100.0), da.from_array(grey, chunks=(40, 33, 57)),
                    tmp_path, "w")
    # threshold, closing(1), opening(1) with the volume edge extended, cavities filled
    d = 4
    p = np.pad(grey > 100, d, mode="edge")
    p = ndi.binary_closing(p, _ball(1))
    p = ndi.binary_opening(p, _ball(1))[d:-d, d:-d, d:-d]
    ref_fg = ndi.binary_fill_holes(p)
    fg = zarr.open_array(str(wd / "fg.zarr"))[...] != 0
    np.testing.assert_array_equal(fg, ref_fg)
    # smoothed distance map: scipy's EDT (no background outside the volume), Gaussian sd 1 voxel
    ref_S = ndi.gaussian_filter(ndi.distance_transform_edt(ref_fg), 1.0, mode="nearest").astype(np.float32)
    ref_S[~ref_fg] = 0
    S = zarr.open_array(str(wd / "S.zarr"))[...]
    np.testing.assert_array_equal(S, ref_S)


def test_distance_anisotropic_equals_scipy(noisy, tmp_path):
    grey, _ = noisy
    sp = (2.0, 1.0, 0.75)
    res, wd = _work(dict(chunks=(23, 50, 41), threshold=100.0, spacing=sp, smoothing=1.5, closing=0, opening=0,
                         fill_holes=False), grey, tmp_path, "a")
    fg = grey > 100
    # distances in voxels of the finest axis (0.75), smoothing 1.5 such voxels
    fine = [s / min(sp) for s in sp]
    ref = ndi.gaussian_filter(ndi.distance_transform_edt(fg, sampling=fine), [1.5 / s for s in fine],
                              mode="nearest").astype(np.float32)
    ref[~fg] = 0
    S = zarr.open_array(str(wd / "S.zarr"))[...]
    np.testing.assert_allclose(S, ref, rtol=2e-7, atol=0)


def _toboggan_reference(S, fg):
    """Steepest ascent with plain loops: each foreground voxel's root (flat index) or -1."""
    shape = S.shape
    flat = np.arange(S.size).reshape(shape)
    parent = {}
    for z, y, x in zip(*np.nonzero(fg)):
        best = (S[z, y, x], flat[z, y, x])
        arg = (z, y, x)
        for dz, dy, dx in itertools.product((-1, 0, 1), repeat=3):
            q = (z + dz, y + dy, x + dx)
            if q == (z, y, x) or min(q) < 0 or any(a >= n for a, n in zip(q, shape)) or not fg[q]:
                continue
            key = (S[q], flat[q])
            if key > best:
                best, arg = key, q
        parent[(z, y, x)] = arg
    roots = np.full(shape, -1, np.int64)
    for v in parent:
        u = v
        while parent[u] != u:
            u = parent[u]
        roots[v] = flat[u]
    return roots


def test_basins_equal_plain_steepest_ascent(tmp_path):
    grey, _, _ = phantom_numpy((24, 28, 26), seed=11, mean_radius=5, blur_sigma=0.8, noise_sigma=6)
    res, wd = _work(dict(chunks=(10, 13, 9), closing=0, opening=0, fill_holes=False), grey, tmp_path, "b")
    S = zarr.open_array(str(wd / "S.zarr"))[...]
    fg = zarr.open_array(str(wd / "fg.zarr"))[...] != 0
    keys = zarr.open_array(str(wd / "basins.zarr"))[...]
    ref = _toboggan_reference(S, fg)
    np.testing.assert_array_equal(keys[fg] - 1, ref[fg])
    assert (keys[~fg] == 0).all()


# -------------------------------------------------------------------------------------------
# the same labels for every chunking
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(markers="local_max", min_distance=4.0),
    dict(spacing=(2.0, 1.0, 1.0), h=1.0),
    dict(threshold=110.0, closing=2, opening=0, smoothing=0.0),
])
def test_chunked_equals_single_block(noisy, kwargs):
    grey, _ = noisy
    whole = segment(grey, chunks=96, **kwargs).labels
    for chunks in [(40, 33, 57), (17, 96, 50)]:
        got = segment(da.from_array(grey, chunks=(32, 32, 32)), chunks=chunks, **kwargs).labels
        np.testing.assert_array_equal(got, whole)


def test_chunked_equals_single_block_2d(noisy):
    img = noisy[0][48]
    whole = segment(img, chunks=96)
    got = segment(img, chunks=(37, 50))
    np.testing.assert_array_equal(got.labels, whole.labels)
    assert got.labels.shape == img.shape and whole.n_particles > 5


def test_sparse_particles_and_border_cut(tmp_path):
    """Two balls, one cut by the volume's face, far apart: two particles whatever the chunks."""
    z, y, x = np.mgrid[:40, :40, :60]
    grey = np.full((40, 40, 60), 20, np.uint8)
    grey[(z - 20) ** 2 + (y - 20) ** 2 + (x - 12) ** 2 <= 64] = 200
    grey[(z - 3) ** 2 + (y - 20) ** 2 + (x - 45) ** 2 <= 81] = 200
    a = segment(grey, chunks=(13, 17, 11))
    b = segment(grey, chunks=64)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.n_particles == 2
    assert set(np.unique(a.labels)) == {0, 1, 2}


# -------------------------------------------------------------------------------------------
# quality against ground truth and against the paper's in-memory method
# -------------------------------------------------------------------------------------------


def test_matches_ground_truth(noisy):
    grey, lab = noisy
    res = segment(grey, chunks=(48, 40, 56))
    frac = _matched_fraction(lab, np.asarray(res.labels))
    assert frac >= 0.85, frac


def test_agrees_with_scikit_image_watershed(noisy):
    """Same markers as scikit-image's flooding watershed gives: most particles identical."""
    from skimage.segmentation import watershed

    grey, _ = noisy
    res = segment(grey, chunks=48, markers="local_max", min_distance=4.0, min_size=0)
    fg = np.asarray(res.labels) > 0
    S = ndi.gaussian_filter(ndi.distance_transform_edt(fg), 1.0, mode="nearest")
    # one marker per particle: its highest voxel of S
    lab = np.asarray(res.labels)
    mk = np.zeros_like(lab)
    for i in np.unique(lab[lab > 0]):
        idx = np.flatnonzero(lab.ravel() == i)
        mk.ravel()[idx[np.argmax(S.ravel()[idx])]] = i
    ws = watershed(-S, mk, mask=fg, connectivity=3)
    assert _matched_fraction(ws, lab, thr=0.9) >= 0.9


# -------------------------------------------------------------------------------------------
# seeds
# -------------------------------------------------------------------------------------------


def test_seeds_keep_ids_and_a_gone_particle_stays_absent(two_states):
    grey, lab, _ = two_states
    ref = segment(grey[0], chunks=40)
    ref_lab = np.asarray(ref.labels)
    g1 = grey[1].copy()
    # one particle dissolves in the later state
    gone = int(np.bincount(ref_lab.ravel())[1:].argmax()) + 1
    g1[ndi.binary_dilation(ref_lab == gone, iterations=2)] = int(np.median(grey[1][lab[1] == 0]))
    res = segment(g1, seeds=ref_lab, chunks=(30, 41, 27))
    new = np.asarray(res.labels)
    ids = [i for i in np.unique(ref_lab) if i and i != gone]
    kept = 0
    for i in ids:
        v = new[ref_lab == i]
        v = v[v > 0]
        kept += v.size > 0 and np.bincount(v).argmax() == i
    assert kept / len(ids) >= 0.95
    assert gone not in np.unique(new)
    assert set(np.unique(new)) <= set(np.unique(ref_lab))
    same = segment(g1, seeds=da.from_array(ref_lab, chunks=50), chunks=80)
    np.testing.assert_array_equal(same.labels, new)


# -------------------------------------------------------------------------------------------
# output and bad input
# -------------------------------------------------------------------------------------------


def test_writes_zarr_with_provenance(noisy, tmp_path):
    grey, _ = noisy
    out = tmp_path / "labels.zarr"
    res = segment(grey, out=out, chunks=48)
    z = zarr.open_array(str(out))
    np.testing.assert_array_equal(z[...], np.asarray(res.labels))
    meta = z.attrs["grapes_dask"]
    assert meta["step"] == "segment" and meta["n_particles"] == res.n_particles
    assert meta["threshold"] == res.threshold
    assert not (tmp_path / "labels.zarr.work").exists()
    with pytest.raises(GrapesInputError, match="exists"):
        segment(grey, out=out, chunks=48)


@pytest.mark.parametrize("threshold, match", [(250.0, "no voxel"), (0.0, "every voxel")])
def test_threshold_without_foreground_or_background(noisy, threshold, match):
    grey, _ = noisy
    with pytest.raises(GrapesInputError, match=match):
        segment(grey, threshold=threshold)


def test_constant_volume():
    with pytest.raises(GrapesInputError, match="single grey level"):
        segment(np.full((20, 20, 20), 7, np.uint8))


def test_float_everything_foreground_after_morphology():
    g = np.zeros((20, 20, 20), np.float32)
    g[0, 0, 0] = -1.0  # one dark voxel, closed by the closing
    with pytest.raises(GrapesInputError, match="everything .* is foreground"):
        segment(g, threshold=-0.5)


def test_seeds_that_seed_nothing(noisy):
    grey, _ = noisy
    noise = np.random.default_rng(0).integers(1, 200, grey.shape).astype(np.uint16)  # grey levels, not labels
    with pytest.raises(GrapesInputError, match="no seed"):
        segment(grey, seeds=noise, chunks=48)
    with pytest.raises(GrapesInputError, match="fewer than"):
        segment(grey, min_size=10**7, chunks=48)


def test_bad_seeds(noisy):
    grey, _ = noisy
    with pytest.raises(GrapesInputError, match="shape"):
        segment(grey, seeds=np.zeros((96, 96, 95), np.uint16))
    with pytest.raises(GrapesInputError, match="integer"):
        segment(grey, seeds=np.zeros(grey.shape, np.float32))


@pytest.mark.parametrize("kw", [dict(markers="peaks"), dict(closing=-1), dict(smoothing=-1.0), dict(min_distance=0)])
def test_bad_parameters(noisy, kw):
    with pytest.raises(GrapesInputError):
        segment(noisy[0], **kw)
