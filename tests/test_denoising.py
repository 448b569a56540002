"""Tests of ``grapes_dask.denoising``: chunked filters against the in-memory filters on the whole array.

References are written here with scipy.ndimage and scikit-image on the whole numpy array (never
with grapes_dask's own code). Chunkings are deliberately uneven (no axis a multiple of its chunk,
chunks of different sizes along one axis), shapes and Gaussian/median windows anisotropic.
NLM volumes stay small (it costs about 30 us per voxel).
"""

from __future__ import annotations

import json
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage.restoration import denoise_nl_means

import grapes_dask
from grapes_dask import GrapesInputError
from grapes_dask.denoising import H_FACTOR, denoise, estimate_noise_sigma
from grapes_dask.synthetic import phantom_numpy

SHAPE = (26, 31, 23)  # anisotropic, no side a multiple of a chunk
UNEVEN = ((5, 13, 8), (11, 20), (9, 14))  # chunks of different sizes along each axis


def _random(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return (rng.random(shape) * 200).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, shape, dtype=dtype)


def _round_clip(x, dtype):
    info = np.iinfo(dtype)
    return np.clip(np.round(x), info.min, info.max).astype(dtype)


def _nlm_ref(g, h, patch_size=5, patch_distance=6):
    """scikit-image's fast NLM on the whole array, grey levels in float64, integer grey rounded."""
    r = denoise_nl_means(np.asarray(g, np.float64), patch_size=patch_size, patch_distance=patch_distance, h=h,
                         fast_mode=True, preserve_range=True)
    return _round_clip(r, g.dtype) if g.dtype.kind in "ui" else r.astype(g.dtype)


def _lazy_failing(shape, dtype=np.uint8, chunks=8):
    """A dask array whose compute raises: errors raised with it prove that nothing was computed."""
    def boom(block):
        raise RuntimeError("computed")

    return da.zeros(shape, dtype=dtype, chunks=chunks).map_blocks(boom, dtype=dtype)


# --------------------------------------------------------------------------------------------
# gaussian and median: bitwise equal to scipy on the whole array, edges included
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", "float64"])
@pytest.mark.parametrize("sigma", [1.0, (0.6, 1.7, 1.1)])
def test_gaussian_equals_scipy(dtype, sigma):
    g = _random(SHAPE, dtype)
    got = denoise(da.from_array(g, chunks=UNEVEN), "gaussian", sigma=sigma).compute()
    if np.dtype(dtype).kind == "u":
        ref = _round_clip(ndi.gaussian_filter(g.astype(np.float32), sigma, mode="reflect"), g.dtype)
    else:
        ref = ndi.gaussian_filter(g, sigma, mode="reflect")
    assert got.dtype == g.dtype
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32"])
@pytest.mark.parametrize("size", [3, (3, 5, 2)])
def test_median_equals_scipy(dtype, size):
    g = _random(SHAPE, dtype, seed=1)
    got = denoise(da.from_array(g, chunks=UNEVEN), "median", size=size).compute()
    assert got.dtype == g.dtype
    np.testing.assert_array_equal(got, ndi.median_filter(g, size=size, mode="reflect"))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["gaussian", "median"]),
    chunks=st.tuples(*[st.lists(st.integers(1, 12), min_size=1, max_size=4) for _ in range(3)]),
    radius=st.integers(1, 3),
    seed=st.integers(0, 5),
)
def test_any_chunking_gaussian_median(method, chunks, radius, seed):
    """Any chunking gives scipy's result, or (chunks smaller than the reach) an error up front."""
    shape = tuple(sum(c) for c in chunks)
    g = _random(shape, np.uint8, seed)
    x = da.from_array(g, chunks=chunks)
    kw = {"sigma": radius / 4.0} if method == "gaussian" else {"size": 2 * radius + 1}
    reach = radius
    if any(len(c) > 1 and max(c) < reach for c in chunks):
        with pytest.raises(GrapesInputError, match="chunks"):
            denoise(x, method, **kw)
        return
    got = denoise(x, method, **kw).compute()
    if method == "gaussian":
        ref = _round_clip(ndi.gaussian_filter(g.astype(np.float32), kw["sigma"]), np.uint8)
    else:
        ref = ndi.median_filter(g, size=kw["size"])
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("shape, chunks", [((3, 30, 25), ((3,), (12, 18), (25,))), ((1, 9, 2), ((1,), (9,), (2,)))])
def test_thinner_than_the_reach(shape, chunks):
    """An axis shorter than the filter's reach (a few slices): dask-image asks dask for its full
    overlap there and dask refuses; an axis in one chunk needs none, and scipy pads it itself."""
    g = _random(shape, np.uint8, seed=4)
    x = da.from_array(g, chunks=chunks)
    ref = _round_clip(ndi.gaussian_filter(g.astype(np.float32), 1.2), np.uint8)
    np.testing.assert_array_equal(denoise(x, "gaussian", sigma=1.2).compute(), ref)
    np.testing.assert_array_equal(denoise(x, "median", size=7).compute(), ndi.median_filter(g, size=7))


def test_gaussian_and_median_2d():
    g = _random((37, 29), np.uint16, seed=3)
    x = da.from_array(g, chunks=((10, 27), (13, 16)))
    ref = _round_clip(ndi.gaussian_filter(g.astype(np.float32), (1.5, 0.8)), np.uint16)
    np.testing.assert_array_equal(denoise(x, "gaussian", sigma=(1.5, 0.8)).compute(), ref)
    np.testing.assert_array_equal(denoise(x, "median", size=(5, 3)).compute(), ndi.median_filter(g, size=(5, 3)))


# --------------------------------------------------------------------------------------------
# nlm
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noisy_small():
    g, _, _ = phantom_numpy((26, 30, 22), seed=2, noise_sigma=8, blur_sigma=1.0, mean_radius=7)
    return g


@pytest.mark.parametrize("chunks", [((9, 17), (19, 11), (22,)), ((12, 14), (30,), (10, 12))])
def test_nlm_uint8_bitwise_equal_whole_array(noisy_small, chunks):
    """Integer grey: the integral images hold exact integers, so every block computes the very
    weights of the whole-array run and adds them in the same order: equal everywhere, edges too."""
    g = noisy_small
    h = 7.0
    got = denoise(da.from_array(g, chunks=chunks), "nlm", h=h).compute()
    np.testing.assert_array_equal(got, _nlm_ref(g, h))


def test_nlm_uint16_and_2d_bitwise():
    g16, _, _ = phantom_numpy((24, 27, 22), seed=4, grey_dtype="uint16", mean_radius=6)
    got = denoise(da.from_array(g16, chunks=((10, 14), (27,), (9, 13))), "nlm", h=1500.0, patch_distance=4,
                  patch_size=3).compute()
    np.testing.assert_array_equal(got, _nlm_ref(g16, 1500.0, patch_size=3, patch_distance=4))
    g2 = g16[11]
    got2 = denoise(da.from_array(g2, chunks=((9, 18), (12, 10))), "nlm", h=1500.0).compute()
    np.testing.assert_array_equal(got2, _nlm_ref(g2, 1500.0))


def test_nlm_float_within_rounding(noisy_small):
    """Non-integer float grey: the integral images round differently in a block than in the whole
    array (they start at another corner), so weights differ by float64 rounding of sums of
    squared differences; measured below 2e-7 grey levels here on a 0-255 scale."""
    g = noisy_small.astype(np.float64) + np.random.default_rng(0).random(noisy_small.shape)
    got = denoise(da.from_array(g, chunks=((9, 17), (19, 11), (22,))), "nlm", h=7.0).compute()
    ref = _nlm_ref(g, 7.0)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_noise_estimate_same_for_every_chunking(noisy_small):
    g = noisy_small
    a = estimate_noise_sigma(da.from_array(g, chunks=((9, 17), (19, 11), (22,))))
    b = estimate_noise_sigma(da.from_array(g, chunks=7))
    assert a == b
    assert 7.0 < a < 9.0  # noise_sigma=8 after the blur, quantised to uint8


def test_noise_estimate_ignores_flat_regions():
    """A masked (constant) region, as outside a reconstruction's field of view, is left out."""
    rng = np.random.default_rng(5)
    g = np.clip(np.round(100 + 5 * rng.standard_normal((40, 40, 40))), 0, 255).astype(np.uint8)
    g[:, :, :20] = 0
    assert 4.5 < estimate_noise_sigma(g) < 5.5
    assert estimate_noise_sigma(np.full((20, 20, 20), 7, np.uint8)) == 0.0


def test_nlm_default_h_from_one_estimate(noisy_small):
    """Without h, every block uses h = H_FACTOR x the one estimate of the whole volume."""
    g = noisy_small
    sig = estimate_noise_sigma(g)
    got = denoise(da.from_array(g, chunks=((12, 14), (30,), (10, 12))), "nlm", patch_distance=4).compute()
    np.testing.assert_array_equal(got, _nlm_ref(g, H_FACTOR * sig, patch_distance=4))
    # given noise_sigma: the same h rule, no estimate
    got2 = denoise(g, "nlm", noise_sigma=sig, patch_distance=4).compute()
    np.testing.assert_array_equal(got2, got)


# --------------------------------------------------------------------------------------------
# noise is reduced
# --------------------------------------------------------------------------------------------


def test_noise_reduced_on_phantom():
    shape, kw = (32, 36, 30), dict(seed=3, blur_sigma=1.0, mean_radius=7)
    noisy, _, _ = phantom_numpy(shape, noise_sigma=12, **kw)
    clean, _, _ = phantom_numpy(shape, noise_sigma=0, **kw)

    def rmse(a):
        return float(np.sqrt(np.mean((a.astype(np.float64) - clean) ** 2)))

    x = da.from_array(noisy, chunks=((17, 15), (36,), (14, 16)))
    before = rmse(noisy)
    after = {m: rmse(denoise(x, m, **kw2).compute())
             for m, kw2 in [("gaussian", {"sigma": 0.7}), ("median", {"size": 3}), ("nlm", {})]}
    assert 11.5 < before < 12.5
    assert after["gaussian"] < 0.5 * before
    assert after["median"] < 0.5 * before
    assert after["nlm"] < 0.35 * before  # about 3.5 of 12
    assert after["nlm"] < min(after["gaussian"], after["median"])  # edge-preserving beats both


# --------------------------------------------------------------------------------------------
# Zarr output
# --------------------------------------------------------------------------------------------


def _zarr_input(tmp_path, g, chunks, spacing=None):
    z = zarr.create_array(store=str(tmp_path / "grey.zarr"), shape=g.shape, chunks=chunks, dtype=g.dtype,
                          zarr_format=3, attributes={"spacing": spacing, "unit": "micrometer"} if spacing else {})
    z[...] = g
    return tmp_path / "grey.zarr"


def test_zarr_output_nlm_attrs(tmp_path, noisy_small):
    g = noisy_small
    src = _zarr_input(tmp_path, g, (16, 20, 13), spacing=[0.5, 0.4, 0.4])
    out = denoise(str(src), "nlm", patch_distance=3, out=tmp_path / "dn.zarr")
    assert out == tmp_path / "dn.zarr"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dn.zarr", "grey.zarr"]  # no temporary left
    z = zarr.open_array(str(out), mode="r")
    assert z.dtype == np.uint8 and z.shape == g.shape and z.chunks == (16, 20, 13)
    sig = estimate_noise_sigma(g)
    np.testing.assert_array_equal(z[...], _nlm_ref(g, H_FACTOR * sig, patch_distance=3))
    attrs = json.loads(json.dumps(dict(z.attrs)))
    assert attrs["spacing"] == [0.5, 0.4, 0.4] and attrs["unit"] == "micrometer"
    rec = attrs["grapes_dask"]
    assert rec["command"] == "denoise" and rec["method"] == "nlm" and rec["source"] == str(src)
    p = rec["parameters"]
    assert p["noise_sigma"] == pytest.approx(sig) and p["noise_sigma_source"] == "estimated"
    assert p["h"] == pytest.approx(H_FACTOR * sig) and p["patch_size"] == 5 and p["patch_distance"] == 3
    assert rec["version"] == grapes_dask.__version__ and rec["created"][:2] == "20"


def test_zarr_output_gaussian_chunks_spacing_overwrite(tmp_path):
    g = _random(SHAPE, np.uint16, seed=7)
    src = _zarr_input(tmp_path, g, (10, 12, 16))
    dest = tmp_path / "g.zarr"
    denoise(src, "gaussian", sigma=(1.0, 0.5, 0.5), out=dest, chunks=(13, 16, 23), spacing=(2.0, 1.0, 1.0))
    z = zarr.open_array(str(dest), mode="r")
    assert z.chunks == (13, 16, 23)
    ref = _round_clip(ndi.gaussian_filter(g.astype(np.float32), (1.0, 0.5, 0.5)), np.uint16)
    np.testing.assert_array_equal(z[...], ref)
    assert z.attrs["spacing"] == [2.0, 1.0, 1.0]
    assert z.attrs["grapes_dask"]["parameters"]["sigma"] == [1.0, 0.5, 0.5]
    with pytest.raises(GrapesInputError, match="overwrite"):
        denoise(src, "median", out=dest)
    denoise(src, "median", out=dest, overwrite=True)
    np.testing.assert_array_equal(zarr.open_array(str(dest), mode="r")[...], ndi.median_filter(g, size=3))


# --------------------------------------------------------------------------------------------
# errors, before any compute
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, match", [
    (lambda x: denoise(x, "wiener"), "unknown denoising method"),
    (lambda x: denoise(x, "gaussian", sigma=0), "sigma"),
    (lambda x: denoise(x, "gaussian", sigma=-1.0), "sigma"),
    (lambda x: denoise(x, "gaussian", sigma=(1.0, 1.0)), "sigma"),
    (lambda x: denoise(x, "gaussian", sigma=float("nan")), "sigma"),
    (lambda x: denoise(x, "median", size=0), "size"),
    (lambda x: denoise(x, "median", size=2.5), "size"),
    (lambda x: denoise(x, "nlm", patch_size=4, h=5.0), "patch_size"),
    (lambda x: denoise(x, "nlm", patch_size=0, h=5.0), "patch_size"),
    (lambda x: denoise(x, "nlm", patch_distance=0, h=5.0), "patch_distance"),
    (lambda x: denoise(x, "nlm", h=0.0), "h"),
    (lambda x: denoise(x, "nlm", noise_sigma=-2.0), "noise_sigma"),
    (lambda x: denoise(x, "nlm", sigma=1.0), "does not apply"),
    (lambda x: denoise(x, "median", h=3.0), "does not apply"),
    (lambda x: denoise(x, "gaussian", size=3), "does not apply"),
    # reach 6 + 5 // 2 = 8 voxels, chunks of 8 can give it, 7 cannot
    (lambda x: denoise(x.rechunk(7), "nlm", h=5.0), "patch_distance"),
    (lambda x: denoise(x.rechunk(7), "gaussian", sigma=2.0), "chunks"),
    (lambda x: denoise(x, "nlm", h=5.0, out="/nonexistent_folder/x.zarr"), "does not exist"),
    (lambda x: denoise(x, "nlm", h=5.0, out="result.tif"), ".zarr"),
])
def test_errors_before_compute(call, match):
    x = _lazy_failing((24, 24, 24))
    with pytest.raises(GrapesInputError, match=match):
        call(x)


def test_chunks_of_the_reach_accepted():
    x = _lazy_failing((24, 24, 24))
    denoise(x, "nlm", h=5.0)  # chunks 8 = reach 8: accepted, still lazy
    denoise(x, "gaussian", sigma=2.0)


def test_error_names_the_fix_on_the_command_line():
    x = _lazy_failing((24, 24, 24))
    with pytest.raises(GrapesInputError) as e:
        denoise(x.rechunk(7), "nlm", h=5.0)
    cli = e.value.render("cli")
    assert "--chunks 8,8,8" in cli and "--patch-distance" in cli


@pytest.mark.parametrize("shape", [(10,), (2, 8, 8, 8)])
def test_1d_4d_refused(shape):
    with pytest.raises(GrapesInputError, match="dimensions"):
        denoise(np.zeros(shape, np.uint8), "gaussian")


def test_bool_and_int64_refused():
    with pytest.raises(GrapesInputError, match="boolean"):
        denoise(np.zeros((8, 8, 8), bool), "median")
    with pytest.raises(GrapesInputError, match="64-bit"):
        denoise(np.zeros((8, 8, 8), np.int64), "median")


def test_noise_free_volume_needs_h():
    g = np.full((20, 20, 20), 100, np.uint8)
    with pytest.raises(GrapesInputError, match="could not be estimated"):
        denoise(g, "nlm")
    # with h given, it runs (a constant stays constant)
    np.testing.assert_array_equal(denoise(g, "nlm", h=3.0, patch_distance=3).compute(), g)


def test_existing_output_refused_before_compute(tmp_path):
    (tmp_path / "o.zarr").mkdir()
    with pytest.raises(GrapesInputError, match="already exists"):
        denoise(_lazy_failing((16, 16, 16)), "nlm", h=5.0, out=tmp_path / "o.zarr")


def test_lazy_result_is_lazy():
    x = _lazy_failing((16, 16, 16))
    for m, kw in [("gaussian", {}), ("median", {}), ("nlm", {"h": 4.0})]:
        r = denoise(x, m, **kw)
        assert isinstance(r, da.Array) and r.shape == x.shape and r.dtype == x.dtype
        with pytest.raises(RuntimeError, match="computed"):
            r.compute(scheduler="sync")


def test_path_inputs_resolved(tmp_path):
    """A path to a Zarr store in a group (``store.zarr::name``) goes through resolve_volume."""
    g = _random((12, 14, 10), np.uint8, seed=9)
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    root.create_array("grey", shape=g.shape, chunks=(6, 7, 10), dtype=g.dtype)[...] = g
    got = denoise(f"{tmp_path / 's.zarr'}::grey", "median", size=(1, 3, 3)).compute()
    np.testing.assert_array_equal(got, ndi.median_filter(g, size=(1, 3, 3)))
    assert Path(tmp_path / "s.zarr").exists()
    with dask.config.set(scheduler="sync"):
        np.testing.assert_array_equal(denoise(g, "gaussian", sigma=0.8).compute(),
                                      _round_clip(ndi.gaussian_filter(g.astype(np.float32), 0.8), np.uint8))


def test_package_level_call():
    """``grapes_dask.denoise(...)`` is the function; the module is ``grapes_dask.denoising``."""
    import grapes_dask.denoising as module

    g = _random((9, 10, 11), np.uint8, seed=11)
    np.testing.assert_array_equal(grapes_dask.denoise(g, "median").compute(), ndi.median_filter(g, size=3))
    assert module.denoise is denoise and grapes_dask.estimate_noise_sigma is estimate_noise_sigma


def test_nlm_writes_with_processes_unless_a_scheduler_is_chosen():
    """scikit-image's NLM holds the GIL: threads would filter one block at a time."""
    from grapes_dask.denoising import _nlm_scheduler

    assert _nlm_scheduler() == "processes"
    with dask.config.set(scheduler="threads"):
        assert _nlm_scheduler() is None
