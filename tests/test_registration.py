"""Registration between states (``grapes_dask.registration``), checked against known motions and scipy.

Known motions are made independently: phantom states drifted by the generator (particles
rendered at shifted positions), or scipy.ndimage.shift / affine_transform of a phantom by a
known sub-voxel vector or rotation. Resampling is compared with scipy.ndimage in memory.
"""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grapes_dask import GrapesInputError
from grapes_dask.io import write_zarr
from grapes_dask.registration import Transform, apply_transform, register
from grapes_dask.synthetic import phantom_numpy

SHAPE = (96, 96, 96)


@pytest.fixture(scope="module")
def grey():
    g, _, _ = phantom_numpy(SHAPE, seed=2, mean_radius=8.0)
    return g


def rot_z(deg: float) -> np.ndarray:
    """Rotation about the z axis (axis 0) in (z, y, x) coordinates."""
    t = np.deg2rad(deg)
    return np.array([[1.0, 0.0, 0.0], [0.0, np.cos(t), -np.sin(t)], [0.0, np.sin(t), np.cos(t)]])


# --------------------------------------------------------------------------------------------
# estimation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [(1.3, -2.7, 0.45), (-0.35, 4.6, -3.15)])
@pytest.mark.parametrize("two_stage", [False, True])
def test_translation_subvoxel_shift(grey, shift, two_stage, record_property):
    d = np.array(shift)
    # moving(x) = grey(x - d), so moving(x + d) = grey(x): the transform's offset is +d
    moving = ndi.shift(grey.astype(np.float32), d, order=3, mode="nearest")
    kw = dict(downsample=2, crop=64) if two_stage else {}
    t = register(grey, moving, **kw)
    err = np.abs(np.asarray(t.offset) - d).max()
    record_property("max_error_voxels", float(err))
    assert err < 0.5, (t.offset, d)
    assert t.method == "translation" and np.array_equal(np.asarray(t.matrix), np.eye(3))
    assert np.allclose(t.shift, t.offset)
    assert t.ncc > t.ncc_identity and t.ncc > 0.9
    assert t.parameters["downsample"] == ([2, 2, 2] if two_stage else [1, 1, 1])
    # the two-stage estimate: coarse on the 48^3 view, then a 64^3 crop at full resolution
    if two_stage:
        assert [b - a for a, b in t.parameters["crop"]] == [64, 64, 64]


def test_translation_of_drifted_phantom_states(record_property):
    drift = [1.25, -2.75, 0.5]
    g, _, truth = phantom_numpy(SHAPE, n_states=2, seed=3, mean_radius=8.0, supersample=4,
                                drift=[[0.0, 0.0, 0.0], drift], noise_sigma=8.0)
    rows = truth[truth.state == 1]
    assert np.allclose(rows[["drift_z", "drift_y", "drift_x"]].iloc[0], drift)
    # state 1 shows particle centres moved by +drift: moving(x + drift) = fixed(x)
    t = register(g[0], g[1], downsample=2, crop=64)
    err = np.abs(np.asarray(t.shift) - drift).max()
    record_property("max_error_voxels", float(err))
    assert err < 0.5, t.shift


def test_translation_from_zarr_stores(grey, tmp_path):
    d = np.array([0.6, -1.4, 2.2])
    write_zarr(da.from_array(grey, chunks=32), tmp_path / "s0.zarr", attrs={"spacing": [0.5, 0.5, 0.5]})
    moving = np.clip(np.rint(ndi.shift(grey.astype(np.float32), d, order=3, mode="nearest")), 0, 255).astype(np.uint8)
    write_zarr(da.from_array(moving, chunks=(40, 32, 50)), tmp_path / "s1.zarr", attrs={"spacing": [0.5, 0.5, 0.5]})
    t = register(tmp_path / "s0.zarr", tmp_path / "s1.zarr", downsample=2, crop=(48, 64, 56))
    assert np.abs(np.asarray(t.shift) - d).max() < 0.5
    assert t.spacing == (0.5, 0.5, 0.5)
    assert np.allclose(t.shift_physical, np.asarray(t.shift) * 0.5)
    assert t.parameters["fixed"].endswith("s0.zarr")


def test_translation_2d(grey):
    img = grey[40]
    d = np.array([2.3, -1.6])
    t = register(img, ndi.shift(img.astype(np.float32), d, order=3, mode="nearest"))
    assert t.ndim == 2 and np.abs(np.asarray(t.shift) - d).max() < 0.5


def test_rigid_small_rotation(grey, record_property):
    centre = (np.asarray(SHAPE) - 1) / 2
    rot = rot_z(3.0)
    tr = np.array([0.4, -1.3, 2.2])
    offset = centre - rot @ centre + tr  # T(x) = R (x - c) + c + tr maps fixed to moving
    # moving(y) = fixed(T^-1(y)), T^-1(y) = R^T y - R^T offset
    moving = ndi.affine_transform(grey.astype(np.float32), rot.T, -rot.T @ offset, order=3, mode="nearest")
    t = register(grey, moving, method="rigid", downsample=2, crop=64)
    angle_err = abs(t.rotation_deg - 3.0)
    shift_err = np.abs(np.asarray(t.shift) - tr).max()
    record_property("angle_error_deg", angle_err)
    record_property("shift_error_voxels", float(shift_err))
    assert angle_err < 0.5 and shift_err < 0.5, (t.rotation_deg, t.shift)
    assert np.abs(np.asarray(t.matrix) - rot).max() < 0.01  # the axis too: about z
    assert t.ncc > t.ncc_identity


# --------------------------------------------------------------------------------------------
# resampling
# --------------------------------------------------------------------------------------------


def _rigid_transform(shape, deg=(2.0, -1.0, 3.0), tr=(0.4, -1.3, 2.2)):
    from scipy.spatial.transform import Rotation

    rot = Rotation.from_rotvec(np.deg2rad(deg)).as_matrix()
    c = (np.asarray(shape) - 1) / 2
    return Transform("rigid", rot, c - rot @ c + np.asarray(tr), shape, shape, (1.0, 1.0, 1.0))


UNEVEN = ((5, 20, 23), (30, 26), (1, 13, 26))  # of a (48, 56, 40) volume


@pytest.mark.parametrize("kind", ["rigid", "translation"])
@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("dtype", ["uint8", "float32", "uint16"])
def test_apply_equals_scipy_on_uneven_chunks(grey, kind, order, dtype):
    vol = grey[:48, :56, :40].astype(dtype)
    if dtype == "uint16":
        vol = vol * np.uint16(257)
    t = (_rigid_transform(vol.shape) if kind == "rigid" else Transform.translation((0.5, -1.25, 2.3), vol.shape))
    ref = ndi.affine_transform(vol, np.asarray(t.matrix), np.asarray(t.offset), order=order, mode="constant", cval=0)
    out = apply_transform(da.from_array(vol, chunks=UNEVEN), t, order=order)
    assert out.chunks == UNEVEN
    got = out.compute(scheduler="threads")
    assert got.dtype == vol.dtype
    np.testing.assert_array_equal(got, ref)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_apply_is_bitwise_chunk_invariant(grey, data):
    vol = grey[:32, :36, :28].astype(np.float64) / 7.0
    t = _rigid_transform(vol.shape, tr=(data.draw(st.floats(-3, 3)), 0.37, data.draw(st.floats(-3, 3))))
    order = data.draw(st.sampled_from([0, 1]))

    def split(n):
        cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=3)))
        return tuple(np.diff([0, *cuts, n]).tolist())

    chunks = tuple(split(n) for n in vol.shape)
    whole = apply_transform(vol, t, order=order, chunks=vol.shape).compute()
    parts = apply_transform(da.from_array(vol, chunks=chunks), t, order=order).compute()
    np.testing.assert_array_equal(parts, whole)
    ref = ndi.affine_transform(vol, np.asarray(t.matrix), np.asarray(t.offset), order=order)
    np.testing.assert_allclose(parts, ref, rtol=1e-12, atol=1e-9)


def test_apply_order3_is_close_rounded_and_clipped():
    # a sharp 0/255 step: cubic interpolation overshoots beyond the uint8 range
    vol = np.zeros((72, 40, 40), np.uint8)
    vol[:, :, 20:] = 255
    vol[30:40] = 0
    t = _rigid_transform(vol.shape, deg=(0.0, 0.0, 4.0))
    ref = ndi.affine_transform(vol.astype(np.float64), np.asarray(t.matrix), np.asarray(t.offset), order=3)
    assert ref.min() < -1 and ref.max() > 256  # the overshoot is there
    got = apply_transform(da.from_array(vol, chunks=(17, 24, 24)), t, order=3).compute()
    assert got.dtype == np.uint8
    expected = np.clip(np.floor(ref + 0.5), 0, 255)
    assert np.abs(got.astype(float) - expected).max() <= 1  # a tie may round either way
    assert (got != expected).mean() < 1e-3
    f = apply_transform(da.from_array(vol.astype(np.float32), chunks=(17, 24, 24)), t, order=3).compute()
    np.testing.assert_allclose(f, ref.astype(np.float32), rtol=1e-5, atol=1e-3)


def test_apply_fill_and_labels(grey):
    _, labels, _ = phantom_numpy((40, 40, 40), seed=5, mean_radius=6.0)
    t = Transform.translation((15.0, 0.0, -3.0), labels.shape)
    got = apply_transform(labels, t, order=0, fill=0, chunks=16).compute()
    np.testing.assert_array_equal(got, ndi.shift(labels, (-15, 0, 3), order=0, cval=0))
    assert got.dtype == labels.dtype
    g = apply_transform(grey[:40, :40, :40], t, fill=7).compute()
    assert (g[25:] == 7).all()


def test_zarr_output_carries_transform(grey, tmp_path):
    vol = grey[:48, :56, :40]
    t = register(vol, ndi.shift(vol.astype(np.float32), (0.5, 1.0, -0.75), order=3, mode="nearest"))
    src = tmp_path / "moving.zarr"
    write_zarr(da.from_array(ndi.shift(vol, (0.5, 1.0, -0.75), order=1, mode="nearest"), chunks=(16, 20, 40)), src)
    out = apply_transform(src, t, out=tmp_path / "aligned.zarr", chunks=(24, 24, 24))
    z = zarr.open_array(str(out), mode="r")
    assert z.shape == t.fixed_shape and z.chunks == (24, 24, 24) and z.dtype == np.uint8
    attrs = dict(z.attrs)
    assert attrs["transform"]["method"] == "translation"
    assert attrs["grapes_dask"]["command"] == "apply_transform" and attrs["grapes_dask"]["order"] == 1
    assert "version" in attrs["grapes_dask"] and "created" in attrs["grapes_dask"]
    assert Transform.from_dict(json.loads(json.dumps(attrs["transform"]))) == t
    assert Transform.load(out) == t
    assert Transform.load(t.save(tmp_path / "t.json")) == t
    assert Transform.load(tmp_path / "t.json").parameters == t.parameters
    lazy = apply_transform(src, tmp_path / "t.json", chunks=(24, 24, 24)).compute()
    np.testing.assert_array_equal(z[...], lazy)


def test_transform_algebra():
    t = _rigid_transform((30, 40, 50))
    p = np.random.default_rng(0).uniform(0, 30, size=(20, 3))
    np.testing.assert_allclose(t.inverse()(t(p)), p, atol=1e-9)
    assert abs(t.rotation_deg - np.degrees(np.linalg.norm(np.deg2rad([2.0, -1.0, 3.0])))) < 1e-9
    np.testing.assert_allclose(t.shift, (0.4, -1.3, 2.2), atol=1e-12)
    assert t.inverse().fixed_shape == t.moving_shape
    tt = Transform.translation((1, 2, 3), (10, 10, 10))
    assert tt.shift == (1.0, 2.0, 3.0) and tt.rotation_deg == 0.0
    np.testing.assert_allclose(tt.homogeneous()[:3, 3], (1, 2, 3))
    # anisotropic voxels: a physical rotation is not a rotation of voxel indices
    s = (2.0, 1.0, 1.0)
    rot = rot_z(90.0)[[1, 0, 2]][:, [1, 0, 2]]  # about x: mixes z and y
    m = rot / np.asarray(s)[:, None] * np.asarray(s)[None, :]
    ta = Transform("rigid", m, (0, 0, 0), (8, 8, 8), (8, 8, 8), s)
    assert abs(ta.rotation_deg - 90.0) < 1e-9


# --------------------------------------------------------------------------------------------
# errors, before any compute
# --------------------------------------------------------------------------------------------


def _poisoned(shape, chunks=16):
    """A dask array that fails if any block of it is computed."""

    def boom(block):
        raise AssertionError("computed")

    return da.zeros(shape, chunks=chunks, dtype=np.uint8).map_blocks(boom, dtype=np.uint8)


def test_apply_refuses_a_transform_of_another_volume():
    t = Transform.translation((1, 0, 0), (40, 40, 40))
    with pytest.raises(GrapesInputError, match=r"shape \(40, 40, 41\).*moving volume of shape \(40, 40, 40\)"):
        apply_transform(_poisoned((40, 40, 41)), t)
    with pytest.raises(GrapesInputError, match="estimated for"):
        apply_transform(_poisoned((40, 40)), t)
    t2 = Transform.translation((1, 0, 0), (40, 40, 40), moving_shape=(40, 40, 44))
    out = apply_transform(_poisoned((40, 40, 44)), t2)  # builds, does not compute
    assert out.shape == (40, 40, 40)


def test_apply_bad_parameters(tmp_path, grey):
    t = Transform.translation((1, 0, 0), (8, 8, 8))
    vol = _poisoned((8, 8, 8), chunks=8)
    with pytest.raises(GrapesInputError, match="order"):
        apply_transform(vol, t, order=7)
    with pytest.raises(GrapesInputError, match="fill"):
        apply_transform(vol, t, fill=300)
    with pytest.raises(GrapesInputError, match="fill"):
        apply_transform(vol, t, fill=0.5)
    with pytest.raises(GrapesInputError, match=r"\.zarr"):
        apply_transform(vol, t, out=tmp_path / "x.tif")
    (tmp_path / "y.zarr").mkdir()
    with pytest.raises(GrapesInputError, match="overwrite=True"):
        apply_transform(vol, t, out=tmp_path / "y.zarr")
    with pytest.raises(GrapesInputError, match="transform"):
        apply_transform(vol, {"method": "translation"})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GrapesInputError, match="not JSON"):
        apply_transform(vol, tmp_path / "bad.json")
    with pytest.raises(GrapesInputError, match="does not exist"):
        Transform.load(tmp_path / "missing.json")
    with pytest.raises(GrapesInputError, match="unknown method"):
        Transform("affine", np.eye(3), (0, 0, 0), (8, 8, 8), (8, 8, 8), (1, 1, 1))
    with pytest.raises(GrapesInputError, match="inconsistent sizes"):
        Transform("rigid", np.eye(2), (0, 0, 0), (8, 8, 8), (8, 8, 8), (1, 1, 1))


def test_register_errors(grey):
    vol = _poisoned((32, 32, 32))
    with pytest.raises(GrapesInputError, match=r"method='affine'"):
        register(vol, vol, method="affine")
    with pytest.raises(GrapesInputError, match="metric"):
        register(vol, vol, method="rigid", metric="mse")
    with pytest.raises(GrapesInputError, match="same dimensionality"):
        register(vol, _poisoned((32, 32)))
    with pytest.raises(GrapesInputError, match="downsample"):
        register(vol, vol, downsample=(2, 2))
    with pytest.raises(GrapesInputError, match="downsample"):
        register(vol, vol, downsample=8)
    empty = np.zeros((32, 32, 32), np.uint8)
    with pytest.raises(GrapesInputError, match=r"fixed volume .* is constant .*no texture"):
        register(empty, grey[:32, :32, :32])
    with pytest.raises(GrapesInputError, match=r"moving volume .* is constant"):
        register(grey[:32, :32, :32], np.full((32, 32, 32), 90, np.uint8), method="rigid")
    # a crop of empty space in an otherwise textured volume
    half = grey[:48, :48, :48].copy()
    half[:, :, :24] = 0
    with pytest.raises(GrapesInputError, match=r"fine-stage crop .* is constant .* give a crop="):
        register(half, half, crop=((0, 48), (0, 48), (0, 20)))
