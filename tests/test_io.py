"""Independent tests of the I/O layer (``grapes_dask.io``).

Every check compares against data the test wrote itself with the reference libraries
(numpy, tifffile, h5py, zarr), never against grapes_dask's own readers.
"""

from __future__ import annotations

import datetime as dt
import os
import pickle
import re
import subprocess
import sys
import textwrap
import time

import cloudpickle
import dask.array as da
import h5py
import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import grapes_dask
from grapes_dask import GrapesInputError
from grapes_dask.io import atomic_output, convert, open_volume, read_spacing, volume_info

SHAPE = {3: (37, 41, 29), 2: (41, 29)}
# deliberately uneven: no axis is a multiple of its chunk. Cases alternate between the two,
# one for open_volume and the other for convert.
UNEVEN_CHUNKS = {3: [16, (5, 7, 11)], 2: [16, (7, 11)]}
SOURCE_CHUNKS = (10, 12, 16)  # chunks of the Zarr/HDF5 inputs: uneven too, and unlike both


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def make_data(shape, dtype, seed=0) -> np.ndarray:
    """Random data over the dtype's full range, with the extremes and (for floats) special values."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind == "f":
        a = (rng.standard_normal(shape) * 1e3).astype(dtype)
        flat = a.reshape(-1)
        fi = np.finfo(dtype)
        special = [np.nan, np.inf, -np.inf, -0.0, fi.max, fi.min, fi.smallest_subnormal]
        flat[: len(special)] = special[: flat.size]
        return a
    info = np.iinfo(dtype)
    a = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    a.reshape(-1)[:2] = [info.min, info.max][: a.size]
    return a


def assert_bit_exact(got, want: np.ndarray) -> None:
    got = np.asarray(got)
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    if want.dtype.kind == "f":  # NaN payloads and -0.0 included
        view = f"u{want.dtype.itemsize}"
        np.testing.assert_array_equal(got.view(view), want.view(view))
    else:
        np.testing.assert_array_equal(got, want)


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


# --------------------------------------------------------------------------------------------
# writers: one per input kind; each returns (source, open kwargs, spacing the metadata records,
# text the provenance 'source' must contain)
# --------------------------------------------------------------------------------------------


def w_numpy(a, d):
    return a, {}, None, "numpy"


def w_dask(a, d):
    return da.from_array(a, chunks=(9, 13, 6)[: a.ndim]), {}, None, "dask"


def w_zarr2_array(a, d):  # a zarr.Array object of format 2
    z = zarr.create_array(store=str(d / "v2.zarr"), shape=a.shape, dtype=a.dtype,
                          chunks=SOURCE_CHUNKS[-a.ndim:], zarr_format=2)
    z[...] = a
    return z, {}, None, "v2.zarr"


def w_zarr3_path(a, d):  # a path to a Zarr v3 array, with the spacing attribute convert writes
    sp = (2.0, 0.5, 0.25)[-a.ndim:]
    z = zarr.create_array(store=str(d / "v3.zarr"), shape=a.shape, dtype=a.dtype,
                          chunks=SOURCE_CHUNKS[-a.ndim:], zarr_format=3, attributes={"spacing": list(sp)})
    z[...] = a
    return str(d / "v3.zarr"), {}, sp, "v3.zarr"


def w_zarr_group(a, d):  # a group holding several arrays: dataset= picks one
    g = zarr.open_group(str(d / "group.zarr"), mode="w", zarr_format=3)
    g.create_array("raw", shape=a.shape, dtype=a.dtype, chunks=SOURCE_CHUNKS[-a.ndim:])[...] = a
    g.create_array("labels", shape=a.shape, dtype="uint32", chunks=SOURCE_CHUNKS[-a.ndim:])
    return str(d / "group.zarr"), {"dataset": "raw"}, None, "group.zarr/raw"


OME_SCALE = {0: (1.5, 0.5, 0.25), 1: (3.0, 1.0, 0.5)}


def write_ome_zarr(a, path, zarr_format=2):
    """OME-Zarr multiscale image: level 1 is level 0 subsampled by 2 (v0.4 attrs on a v2 group)."""
    g = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    levels = [a, a[(slice(None, None, 2),) * a.ndim]]
    for i, lv in enumerate(levels):
        g.create_array(str(i), shape=lv.shape, dtype=lv.dtype, chunks=(8,) * a.ndim)[...] = lv
    names = "zyx"[-a.ndim:]
    ms = [{
        "version": "0.4", "name": "image",
        "axes": [{"name": n, "type": "space", "unit": "micrometer"} for n in names],
        "datasets": [
            {"path": str(i), "coordinateTransformations": [
                {"type": "scale", "scale": list(OME_SCALE[i][-a.ndim:])}]}
            for i in range(2)
        ],
    }]
    if zarr_format == 2:
        g.attrs["multiscales"] = ms
    else:  # OME-Zarr 0.5 keeps the metadata under "ome"
        ms[0].pop("version")
        g.attrs["ome"] = {"version": "0.5", "multiscales": ms}
    return levels


def w_ome_zarr(a, d):
    write_ome_zarr(a, d / "ome.zarr")
    return str(d / "ome.zarr"), {}, OME_SCALE[0][-a.ndim:], "ome.zarr"


def w_tiff(a, d):  # plain multi-page TIFF, no spacing metadata
    tifffile.imwrite(d / "plain.tif", a)
    return str(d / "plain.tif"), {}, None, "plain.tif"


def w_imagej(a, d):  # ImageJ hyperstack TZCYX with T = C = 1
    sp = (2.0, 0.5, 0.25)[-a.ndim:]
    data = a[None, :, None] if a.ndim == 3 else a[None, None, None]
    tifffile.imwrite(d / "hyper.tif", data, imagej=True, resolution=(1 / sp[-1], 1 / sp[-2]),
                     metadata={"axes": "TZCYX", "spacing": sp[0] if a.ndim == 3 else 1.0, "unit": "um"})
    return str(d / "hyper.tif"), {}, sp, "hyper.tif"


def w_ome_tiff(a, d):
    sp = (1.5, 0.5, 0.25)[-a.ndim:]
    md = {"axes": "ZYX"[-a.ndim:], "PhysicalSizeY": sp[-2], "PhysicalSizeX": sp[-1]}
    if a.ndim == 3:
        md["PhysicalSizeZ"] = sp[0]
    tifffile.imwrite(d / "img.ome.tif", a, ome=True, metadata=md)
    return str(d / "img.ome.tif"), {}, sp, "img.ome.tif"


def w_slices_folder(a, d):  # unpadded names: slice_10 must come after slice_9
    folder = d / "slices"
    folder.mkdir()
    for i, page in enumerate(a):
        tifffile.imwrite(folder / f"slice_{i}.tif", page)
    (folder / "notes.txt").write_text("not a slice")
    return str(folder), {}, None, "slices"


def w_slices_glob(a, d):
    for i, page in enumerate(a):
        tifffile.imwrite(d / f"img_{i:03d}.tif", page)
    tifffile.imwrite(d / "other.tif", a[0])  # in the folder but not matched by the pattern
    return str(d / "img_*.tif"), {}, None, "img_*.tif"


def w_hdf5(a, d):  # several datasets: dataset= is required
    with h5py.File(d / "scan.h5", "w") as f:
        ds = f.create_dataset("exchange/data", data=a, chunks=SOURCE_CHUNKS[-a.ndim:])
        ds.attrs["spacing"] = (2.0, 0.5, 0.25)[-a.ndim:]
        f.create_dataset("exchange/dark", data=np.zeros_like(a))
    return str(d / "scan.h5"), {"dataset": "/exchange/data"}, (2.0, 0.5, 0.25)[-a.ndim:], "scan.h5"


def w_nexus(a, d):  # NXentry/NXdata with default/signal; another 2D/3D dataset beside it
    with h5py.File(d / "scan.nxs", "w") as f:
        f.attrs["default"] = "entry"
        e = f.create_group("entry")
        e.attrs["NX_class"] = "NXentry"
        e.attrs["default"] = "data"
        g = e.create_group("data")
        g.attrs["NX_class"] = "NXdata"
        g.attrs["signal"] = "volume"
        g.create_dataset("volume", data=a)
        e.create_dataset("instrument/dark", data=np.zeros_like(a))
    return str(d / "scan.nxs"), {}, None, "scan.nxs"


def w_npy(a, d):
    np.save(d / "vol.npy", a)
    return str(d / "vol.npy"), {}, None, "vol.npy"


WRITERS = {
    "numpy": w_numpy, "dask": w_dask, "zarr2-array": w_zarr2_array, "zarr3-path": w_zarr3_path,
    "zarr-group": w_zarr_group, "ome-zarr": w_ome_zarr, "tiff": w_tiff, "imagej-hyperstack": w_imagej,
    "ome-tiff": w_ome_tiff, "tiff-folder": w_slices_folder, "tiff-glob": w_slices_glob,
    "hdf5": w_hdf5, "nexus": w_nexus, "npy": w_npy,
}
CORE_DTYPES = ["uint8", "uint16", "uint32", "float32"]
EXTRA_DTYPES = ["bool", "int16", "float64"]
# what the formats themselves cannot hold (the writer refuses), not what grapes_dask cannot read
UNSUPPORTED_BY_FORMAT = {"imagej-hyperstack": {"uint32", "bool", "float64"}}
STACK_ONLY = {"tiff-folder", "tiff-glob"}  # a folder/glob of 2D slices is a 3D stack by definition
# each reader (numpy, dask, zarr, TIFF file, TIFF slices, HDF5, npy) gets the extra dtypes once;
# the other kinds go through one of these same readers, so they keep to the core dtypes
EXTRA_DTYPE_KINDS = {"numpy", "dask", "zarr3-path", "tiff", "tiff-folder", "hdf5", "npy"}


def _cases():
    for kind in WRITERS:
        for ndim in (3, 2):
            if ndim == 2 and kind in STACK_ONLY:
                continue
            for i, dtype in enumerate(CORE_DTYPES + EXTRA_DTYPES):
                if dtype in UNSUPPORTED_BY_FORMAT.get(kind, ()):
                    continue
                if dtype in EXTRA_DTYPES and kind not in EXTRA_DTYPE_KINDS:
                    continue
                yield pytest.param(kind, ndim, dtype, UNEVEN_CHUNKS[ndim][(i + 1) % 2],
                                   UNEVEN_CHUNKS[ndim][i % 2], id=f"{kind}-{ndim}d-{dtype}")


# --------------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, ndim, dtype, ochunks, zchunks", list(_cases()))
def test_round_trip_bit_exact(tmp_path, kind, ndim, dtype, ochunks, zchunks):
    a = make_data(SHAPE[ndim], dtype, seed=ndim)
    src, kw, spacing, name = WRITERS[kind](a, tmp_path)

    # open_volume: lazy, uneven chunks, exact values
    v = open_volume(src, chunks=ochunks, **kw)
    assert isinstance(v, da.Array)
    assert v.chunks[0][0] == (ochunks if isinstance(ochunks, int) else ochunks[0])
    assert_bit_exact(v.compute(), a)

    # convert -> Zarr v3 read back with zarr itself
    dest = tmp_path / "out.zarr"
    assert convert(src, dest, chunks=zchunks, **kw) == dest
    z = zarr.open(str(dest), mode="r")
    assert isinstance(z, zarr.Array) and z.metadata.zarr_format == 3
    want_chunks = (zchunks,) * ndim if isinstance(zchunks, int) else zchunks
    assert z.chunks == tuple(min(c, n) for c, n in zip(want_chunks, a.shape))
    assert_bit_exact(z[...], a)

    # provenance
    attrs = z.attrs.asdict()
    prov = attrs["grapes_dask"]
    assert name in prov["source"]
    assert prov["version"] == grapes_dask.__version__
    created = dt.datetime.fromisoformat(prov["created"])
    assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 600
    if spacing is None:
        assert "spacing" not in attrs
    else:
        assert attrs["spacing"] == pytest.approx(list(spacing), rel=1e-12)
        assert read_spacing(dest) == pytest.approx(spacing, rel=1e-12)
    # nothing but the output (and the inputs) in the folder: no temporary leftovers
    assert not [f for f in listing(tmp_path) if f.startswith(".")]


@pytest.mark.parametrize("ndim", [3, 2])
def test_ome_zarr_levels(tmp_path, ndim):
    a = make_data(SHAPE[ndim], "uint16")
    levels = write_ome_zarr(a, tmp_path / "ome.zarr")
    src = str(tmp_path / "ome.zarr")
    assert_bit_exact(open_volume(src).compute(), levels[0])
    assert_bit_exact(open_volume(src, level=0).compute(), levels[0])
    assert_bit_exact(open_volume(src, level=1).compute(), levels[1])
    assert read_spacing(src) == OME_SCALE[0][-ndim:]
    # convert one resolution level, with that level's voxel size
    convert(src, tmp_path / "l1.zarr", level=1, chunks=16)
    z = zarr.open(str(tmp_path / "l1.zarr"), mode="r")
    assert_bit_exact(z[...], levels[1])
    assert z.attrs["spacing"] == list(OME_SCALE[1][-ndim:])
    assert read_spacing(src, level=1) == OME_SCALE[1][-ndim:]
    with pytest.raises(GrapesInputError, match=r"ome\.zarr.* has 2 resolution levels: choose level 0\.\.1"):
        open_volume(src, level=2)


def test_ome_zarr_v05(tmp_path):
    a = make_data(SHAPE[3], "float32")
    levels = write_ome_zarr(a, tmp_path / "ome.zarr", zarr_format=3)
    assert_bit_exact(open_volume(str(tmp_path / "ome.zarr"), level=1).compute(), levels[1])
    assert read_spacing(str(tmp_path / "ome.zarr")) == OME_SCALE[0]


def test_ome_zarr_tczyx_with_single_time_point_and_channel(tmp_path):
    """The usual OME-NGFF layout (t, c, z, y, x) with t = c = 1 reads as a 3D volume."""
    a = make_data(SHAPE[3], "uint16")
    g = zarr.open_group(str(tmp_path / "img.zarr"), mode="w")
    arr = g.create_array("0", shape=(1, 1) + a.shape, chunks=(1, 1, 8, 8, 8), dtype=a.dtype)
    arr[...] = a[None, None]
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    g.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 0.5, 0.3, 0.3]}]}]}]
    src = str(tmp_path / "img.zarr")
    v = open_volume(src)
    assert v.shape == a.shape and v.chunksize == (8, 8, 8)
    assert_bit_exact(v.compute(), a)
    assert read_spacing(src) == (0.5, 0.3, 0.3)
    convert(src, tmp_path / "out.zarr", chunks=16)
    assert_bit_exact(zarr.open(str(tmp_path / "out.zarr"), mode="r")[...], a)
    assert pickle.loads(pickle.dumps(v.__dask_graph__()))  # no open handle in the graph


def test_zarr_objects_and_paths_agree(tmp_path):
    """Zarr v2 by path, Zarr v3 array and group objects (the matrix covers the other pairings)."""
    a = make_data(SHAPE[3], "int16")
    w_zarr2_array(a, tmp_path)
    assert_bit_exact(open_volume(str(tmp_path / "v2.zarr"), chunks=16).compute(), a)
    w_zarr3_path(a, tmp_path)
    assert_bit_exact(open_volume(zarr.open_array(str(tmp_path / "v3.zarr"), mode="r")).compute(), a)
    w_zarr_group(a, tmp_path)
    g = zarr.open_group(str(tmp_path / "group.zarr"), mode="r")
    assert_bit_exact(open_volume(g, dataset="raw").compute(), a)
    # a Zarr array keeps its own chunks by default
    assert open_volume(str(tmp_path / "v3.zarr")).chunksize == SOURCE_CHUNKS


@pytest.mark.parametrize("shape", [(1, 41, 29), (37, 1, 29), (37, 41, 1)])
def test_tiff_volume_with_a_singleton_axis_stays_3d(tmp_path, shape):
    """A one-slice (or one-row) volume is still a volume: the TIFF round trip keeps its shape."""
    a = make_data(shape, "uint16")
    tifffile.imwrite(tmp_path / "a.tif", a, photometric="minisblack")
    assert_bit_exact(open_volume(str(tmp_path / "a.tif")).compute(), a)
    convert(str(tmp_path / "a.tif"), tmp_path / "a.zarr", chunks=16)
    assert_bit_exact(zarr.open(str(tmp_path / "a.zarr"), mode="r")[...], a)


def test_tiff_singleton_extra_axes_are_dropped(tmp_path):
    """Singleton time/channel axes beyond 3D are dropped (not an error)."""
    a = make_data((5, 6, 7), "uint16")
    tifffile.imwrite(tmp_path / "a.tif", a[None], photometric="minisblack")  # shaped (1, 5, 6, 7)
    assert_bit_exact(open_volume(str(tmp_path / "a.tif")).compute(), a)
    tifffile.imwrite(tmp_path / "b.tif", a[:, None], photometric="minisblack")  # (5, 1, 6, 7)
    assert_bit_exact(open_volume(str(tmp_path / "b.tif")).compute(), a)


def test_big_endian_sources_read_as_native_values(tmp_path):
    """HDF5 and .npy written on big-endian systems hold '>u2' etc.: same values, native dtype."""
    a = make_data(SHAPE[3], "uint16")
    f = make_data(SHAPE[2], "float32")
    np.save(tmp_path / "be.npy", a.astype(">u2"))
    with h5py.File(tmp_path / "be.h5", "w") as h:
        h.create_dataset("v", data=f.astype(">f4"))
    v = open_volume(str(tmp_path / "be.npy"))
    assert v.dtype == np.dtype("uint16")
    assert_bit_exact(v.compute(), a)
    convert(str(tmp_path / "be.h5"), tmp_path / "be.zarr", chunks=16)
    assert_bit_exact(zarr.open(str(tmp_path / "be.zarr"), mode="r")[...], f)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_convert_random_shapes_and_chunks(tmp_path_factory, data):
    ndim = data.draw(st.sampled_from([2, 3]), label="ndim")
    shape = tuple(data.draw(st.integers(1, 40), label=f"n{i}") for i in range(ndim))
    # at most ~5 chunks per axis keeps every example fast; up to 3 past the edge is clipped
    chunks = tuple(data.draw(st.integers(max(1, n // 5), n + 3), label=f"c{i}") for i, n in enumerate(shape))
    dtype = data.draw(st.sampled_from(CORE_DTYPES + EXTRA_DTYPES), label="dtype")
    budget = data.draw(st.sampled_from([1, 4096, 256 << 20]), label="memory_budget")
    a = make_data(shape, dtype, seed=sum(shape))
    dest = tmp_path_factory.mktemp("hyp") / "out.zarr"
    convert(a, dest, chunks=chunks, memory_budget=budget)
    z = zarr.open(str(dest), mode="r")
    assert z.chunks == tuple(min(c, n) for c, n in zip(chunks, shape))
    assert_bit_exact(z[...], a)


def test_volume_info_reports_without_reading(tmp_path):
    a = make_data(SHAPE[3], "uint16")
    convert(a, tmp_path / "a.zarr", chunks=16, spacing=(2, 1, 1), unit="micrometer")
    info = volume_info(str(tmp_path / "a.zarr"))
    assert (info.shape, info.dtype, info.chunks) == (a.shape, "uint16", (16, 16, 16))
    assert info.spacing == (2.0, 1.0, 1.0) and info.unit == "micrometer"
    assert info.nbytes == a.nbytes and info.nbytes_on_disk > 0
    assert "provenance:" in info.to_text()


# --------------------------------------------------------------------------------------------
# voxel size
# --------------------------------------------------------------------------------------------


def test_spacing_imagej(tmp_path):
    a = make_data((4, 6, 5), "uint16")
    # anisotropic on purpose so that a y/x swap shows
    tifffile.imwrite(tmp_path / "ij.tif", a, imagej=True, resolution=(1 / 0.25, 1 / 0.5),
                     metadata={"axes": "ZYX", "spacing": 2.0, "unit": "um"})
    assert read_spacing(str(tmp_path / "ij.tif")) == pytest.approx((2.0, 0.5, 0.25))
    tifffile.imwrite(tmp_path / "ij_nm.tif", a, imagej=True, resolution=(1 / 250, 1 / 500),
                     metadata={"axes": "ZYX", "spacing": 2000.0, "unit": "nm"})
    assert read_spacing(str(tmp_path / "ij_nm.tif")) == pytest.approx((2.0, 0.5, 0.25))
    tifffile.imwrite(tmp_path / "ij2d.tif", a[0], imagej=True, resolution=(1 / 0.25, 1 / 0.5),
                     metadata={"axes": "YX", "unit": "micron"})
    assert read_spacing(str(tmp_path / "ij2d.tif")) == pytest.approx((0.5, 0.25))


def test_spacing_ome_tiff_physical_size_with_units(tmp_path):
    a = make_data((4, 6, 5), "uint16")
    tifffile.imwrite(tmp_path / "a.ome.tif", a, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 1500.0,
        "PhysicalSizeZUnit": "nm"})
    assert read_spacing(str(tmp_path / "a.ome.tif")) == pytest.approx((1.5, 0.5, 0.25))
    convert(str(tmp_path / "a.ome.tif"), tmp_path / "a.zarr")
    z = zarr.open(str(tmp_path / "a.zarr"), mode="r")
    assert z.attrs["spacing"] == pytest.approx([1.5, 0.5, 0.25])
    assert z.attrs["unit"] == "micrometer"


def test_spacing_plain_resolution_tags(tmp_path):
    a = make_data((4, 6, 5), "uint8")
    # 2 pixels per cm along x, 4 along y -> 5000 um and 2500 um
    tifffile.imwrite(tmp_path / "cm.tif", a[0], resolution=(2.0, 4.0), resolutionunit="CENTIMETER")
    assert read_spacing(str(tmp_path / "cm.tif")) == pytest.approx((2500.0, 5000.0))
    # inch tags are print resolutions (72 dpi from any image program), never voxel sizes
    tifffile.imwrite(tmp_path / "inch.tif", a[0], resolution=(2.0, 4.0), resolutionunit="INCH")
    assert read_spacing(str(tmp_path / "inch.tif")) is None
    tifffile.imwrite(tmp_path / "cm3.tif", a, resolution=(2.0, 4.0), resolutionunit="CENTIMETER",
                     photometric="minisblack")
    # TIFF tags hold no z size; y and x must be right (z is assumed equal to y)
    assert read_spacing(str(tmp_path / "cm3.tif"))[1:] == pytest.approx((2500.0, 5000.0))
    tifffile.imwrite(tmp_path / "none.tif", a, photometric="minisblack")
    assert read_spacing(str(tmp_path / "none.tif")) is None
    assert read_spacing(a) is None


def test_spacing_override_and_round_trip(tmp_path):
    a = make_data((4, 6, 5), "uint16")
    tifffile.imwrite(tmp_path / "ij.tif", a, imagej=True, resolution=(4.0, 2.0),
                     metadata={"axes": "ZYX", "spacing": 2.0, "unit": "um"})
    convert(str(tmp_path / "ij.tif"), tmp_path / "meta.zarr")
    convert(str(tmp_path / "ij.tif"), tmp_path / "over.zarr", spacing=(3, 0.75, 0.125))
    assert zarr.open(str(tmp_path / "meta.zarr"), mode="r").attrs["spacing"] == [2.0, 0.5, 0.25]
    assert zarr.open(str(tmp_path / "over.zarr"), mode="r").attrs["spacing"] == [3.0, 0.75, 0.125]
    # and the written spacing is what the converted store reports
    assert read_spacing(str(tmp_path / "over.zarr")) == (3.0, 0.75, 0.125)
    convert(a, tmp_path / "np.zarr", spacing=[1, 2, 3], unit="nm")
    assert volume_info(str(tmp_path / "np.zarr")).unit == "nm"


# --------------------------------------------------------------------------------------------
# distributed workers: graphs pickle without open handles and without the voxels
# --------------------------------------------------------------------------------------------


FILE_WRITERS = ["npy", "hdf5", "tiff", "tiff-folder"]


def test_file_graphs_pickle_small(tmp_path):
    a = make_data((64, 64, 64), "uint16")  # 512 KiB of voxels
    for kind in FILE_WRITERS:
        d = tmp_path / kind
        d.mkdir()
        src, kw, _, _ = WRITERS[kind](a, d)
        v = open_volume(src, chunks=32, **kw)
        assert_bit_exact(v.compute(), a)  # the computing threads now hold cached handles
        for dumps in (pickle.dumps, cloudpickle.dumps):
            blob = dumps(v)
            # far below the 512 KiB of voxels: no array data, no memmap, no file handle
            assert len(blob) < 20_000, (kind, len(blob))
            assert_bit_exact(pickle.loads(blob).compute(), a)
        graph = dict(v.__dask_graph__())
        assert len(cloudpickle.dumps(graph)) < 20_000


def test_file_sources_on_process_workers(tmp_path):
    """Compute and convert with one worker *process*: every task reopens its file there."""
    distributed = pytest.importorskip("distributed")
    a = make_data(SHAPE[3], "uint16")
    sources = {}
    for kind in FILE_WRITERS:
        d = tmp_path / kind
        d.mkdir()
        sources[kind] = WRITERS[kind](a, d)[:2]
    with distributed.Client(processes=True, n_workers=1, threads_per_worker=2,
                            dashboard_address=None) as client:
        for kind, (src, kw) in sources.items():
            v = open_volume(src, chunks=16, **kw)
            assert_bit_exact(client.compute(v).result(), a)
            convert(src, tmp_path / f"{kind}.zarr", chunks=(5, 7, 11), **kw)  # uses the client
            assert_bit_exact(zarr.open(str(tmp_path / f"{kind}.zarr"), mode="r")[...], a)


def test_hdf5_source_left_writable_after_reading(tmp_path):
    """Reading must not keep the HDF5 file open: HDF5 refuses to rewrite a file open for reading."""
    p = tmp_path / "a.h5"
    a = make_data((8, 9, 10), "uint16")
    with h5py.File(p, "w") as f:
        f["v"] = a
    assert_bit_exact(open_volume(str(p)).compute(), a)
    convert(str(p), tmp_path / "a.zarr")
    with h5py.File(p, "a") as f:  # e.g. appending results beside the data
        f["w"] = a
    with h5py.File(p, "w") as f:  # or regenerating the file
        f["v"] = a + 1
    assert_bit_exact(open_volume(str(p)).compute(), a + 1)


# --------------------------------------------------------------------------------------------
# bad input: GrapesInputError naming the input and the fix
# --------------------------------------------------------------------------------------------


def test_error_missing_file(tmp_path):
    p = str(tmp_path / "missing.tif")
    with pytest.raises(GrapesInputError, match=rf"{re.escape(p)}.*does not exist: check the path"):
        open_volume(p)
    with pytest.raises(GrapesInputError, match=r"missing\.h5.*does not exist"):
        convert(str(tmp_path / "missing.h5"), tmp_path / "o.zarr")
    with pytest.raises(GrapesInputError, match=r"no file matches the pattern .*nothing_\*\.tif"):
        open_volume(str(tmp_path / "nothing_*.tif"))
    assert listing(tmp_path) == []


def test_error_hdf5_datasets(tmp_path):
    p = tmp_path / "m.h5"
    with h5py.File(p, "w") as f:
        f["x"] = np.zeros((3, 4, 5), np.uint8)
        f["grp/y"] = np.zeros((4, 5), np.uint8)
    with pytest.raises(GrapesInputError, match=r"m\.h5.* holds 2 2D/3D datasets .*/grp/y.*choose one with dataset="):
        open_volume(str(p))
    with pytest.raises(GrapesInputError, match=r"m\.h5.* has no dataset 'nope': available .*'/x'"):
        open_volume(str(p), dataset="nope")
    with pytest.raises(GrapesInputError, match=r"has no dataset 'grp'"):  # a group, not a dataset
        open_volume(str(p), dataset="grp")
    with pytest.raises(GrapesInputError, match=r"has no dataset 'nope'"):
        convert(str(p), tmp_path / "o.zarr", dataset="nope")
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    g.create_array("a", shape=(3, 3), dtype="u1")
    g.create_array("b", shape=(3, 3), dtype="u1")
    with pytest.raises(GrapesInputError, match=r"g\.zarr.* holds 2 arrays \['a', 'b'\]: choose one with dataset="):
        open_volume(str(tmp_path / "g.zarr"))
    with pytest.raises(GrapesInputError, match=r"g\.zarr.* has no array 'c': available arrays are \['a', 'b'\]"):
        open_volume(str(tmp_path / "g.zarr"), dataset="c")


def test_error_unsupported_suffix(tmp_path):
    p = tmp_path / "scan.raw"
    p.write_bytes(b"\0" * 64)
    with pytest.raises(GrapesInputError, match=r"unsupported file type '\.raw' for .*scan\.raw.*supported are"):
        open_volume(str(p))
    with pytest.raises(GrapesInputError, match=r"cannot read a volume from list: pass a path"):
        open_volume([[1, 2], [3, 4]])
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    with pytest.raises(GrapesInputError, match=r"cannot read .*bad\.tif.* as TIFF"):
        open_volume(str(tmp_path / "bad.tif"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GrapesInputError, match=r"folder .*empty.* is neither a Zarr store nor a folder of TIFF"):
        open_volume(str(tmp_path / "empty"))


def test_error_unsupported_dtype(tmp_path):
    with pytest.raises(GrapesInputError, match=r"numpy array \(3, 4, 5\) has unsupported dtype complex64: use"):
        open_volume(np.zeros((3, 4, 5), np.complex64))
    np.save(tmp_path / "c.npy", np.zeros((3, 4), np.complex128))
    with pytest.raises(GrapesInputError, match=r"c\.npy.* has unsupported dtype complex128"):
        convert(str(tmp_path / "c.npy"), tmp_path / "o.zarr")
    with pytest.raises(GrapesInputError, match=r"unsupported dtype float16"):
        open_volume(np.zeros((3, 4), np.float16))
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((5, 10, 12, 3), np.uint8), photometric="rgb")
    with pytest.raises(GrapesInputError, match=r"rgb\.tif.* has 3 samples per pixel \(RGB\): convert it to one grey"):
        open_volume(str(tmp_path / "rgb.tif"))
    tifffile.imwrite(tmp_path / "rgb2d.tif", np.zeros((10, 12, 3), np.uint8), photometric="rgb")
    with pytest.raises(GrapesInputError, match=r"rgb2d\.tif.* samples per pixel"):
        convert(str(tmp_path / "rgb2d.tif"), tmp_path / "o.zarr")
    assert "o.zarr" not in listing(tmp_path)


def test_error_dimensionality(tmp_path):
    with pytest.raises(GrapesInputError, match=r"has 1 dimensions \(shape \(5,\)\): grapes_dask reads 2D images and 3D"):
        open_volume(np.zeros(5, np.uint8))
    with pytest.raises(GrapesInputError, match=r"has 4 dimensions \(shape \(2, 3, 4, 5\)\).*select one channel"):
        convert(da.zeros((2, 3, 4, 5), dtype=np.uint8), tmp_path / "o.zarr")
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["line"] = np.zeros(7)
        f["hyper"] = np.zeros((2, 3, 4, 5))
    with pytest.raises(GrapesInputError, match=r"dataset 'line' of .*d\.h5.* has 1 dimensions"):
        open_volume(str(tmp_path / "d.h5"), dataset="line")
    with pytest.raises(GrapesInputError, match=r"dataset 'hyper' of .*d\.h5.* has 4 dimensions"):
        open_volume(str(tmp_path / "d.h5"), dataset="hyper")
    tifffile.imwrite(tmp_path / "tzyx.tif", np.zeros((2, 3, 4, 5), np.uint8), imagej=True,
                     metadata={"axes": "TZYX"})
    with pytest.raises(GrapesInputError, match=r"tzyx\.tif.* has 4 dimensions"):
        open_volume(str(tmp_path / "tzyx.tif"))


def test_error_empty(tmp_path):
    with pytest.raises(GrapesInputError, match=r"numpy array \(0, 3, 4\) is empty.*pass a volume with voxels"):
        open_volume(np.zeros((0, 3, 4), np.uint8))
    with pytest.raises(GrapesInputError, match=r"dask array .* is empty"):
        convert(da.zeros((3, 0), dtype=np.uint8), tmp_path / "o.zarr")
    np.save(tmp_path / "e.npy", np.zeros((4, 0, 2), np.float32))
    with pytest.raises(GrapesInputError, match=r"e\.npy.* is empty"):
        open_volume(str(tmp_path / "e.npy"))
    assert "o.zarr" not in listing(tmp_path)


def test_error_output_exists_is_not_overwritten(tmp_path):
    a = make_data((6, 7, 8), "uint16")
    dest = tmp_path / "o.zarr"
    convert(a, dest, chunks=4)
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    with pytest.raises(GrapesInputError, match=rf"output {re.escape(repr(str(dest)))} already exists: .*overwrite=True"):
        convert(a + 1, dest, chunks=4)
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    assert listing(tmp_path) == ["o.zarr"]
    assert_bit_exact(zarr.open(str(dest), mode="r")[...], a)


def test_error_output_folder_missing(tmp_path):
    dest = tmp_path / "no" / "such" / "o.zarr"
    with pytest.raises(GrapesInputError, match=r"the folder of output .*o\.zarr.* does not exist: create .*such"):
        convert(np.zeros((3, 3), np.uint8), dest)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("chunks", [(16, 16), (16, 16, 16, 16), 0, (16, -3, 16), (0, 4, 4), 2.5, (4, 4.5, 4)])
def test_error_chunks_do_not_fit(tmp_path, chunks):
    a = np.zeros((10, 12, 14), np.uint8)
    with pytest.raises(GrapesInputError, match=r"chunks=.* does not fit a volume of shape \(10, 12, 14\)"):
        convert(a, tmp_path / "o.zarr", chunks=chunks)
    with pytest.raises(GrapesInputError, match=r"chunks=.* does not fit"):
        open_volume(a, chunks=chunks)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("spacing", [(1, 1), (1, 1, 1, 1), (1, -1, 1), (1, 0, 1), (1, float("nan"), 1),
                                     (1, float("inf"), 1), -0.5, "abc", ("a", 1, 1)])
def test_error_bad_spacing(tmp_path, spacing):
    with pytest.raises(GrapesInputError, match=r"spacing=.* does not fit a 3D volume: give 3 positive voxel sizes"):
        convert(np.zeros((3, 4, 5), np.uint8), tmp_path / "o.zarr", spacing=spacing)
    assert listing(tmp_path) == []


def test_one_spacing_for_every_axis(tmp_path):
    convert(np.zeros((3, 4, 5), np.uint8), tmp_path / "o.zarr", spacing=0.5)
    assert read_spacing(str(tmp_path / "o.zarr")) == (0.5, 0.5, 0.5)


def test_error_mismatched_slice(tmp_path):
    folder = tmp_path / "sl"
    folder.mkdir()
    for i in range(6):
        tifffile.imwrite(folder / f"s{i}.tif", np.zeros((8, 9) if i != 4 else (8, 10), np.uint8))
    with pytest.raises(GrapesInputError, match=r"5 of the 6 TIFF files .* are slices of shape \(8, 9\).*'s4\.tif' \(\(8, 10\), uint8\)"):
        open_volume(str(folder), chunks=2)
    # a slice replaced after the stack was opened is caught by the task that reads it
    tifffile.imwrite(folder / "s4.tif", np.zeros((8, 9), np.uint8))
    v = open_volume(str(folder), chunks=2)
    tifffile.imwrite(folder / "s0.tif", np.zeros((8, 10), np.uint8))
    with pytest.raises(GrapesInputError, match=r"slice .*s0\.tif.* has shape \(8, 10\).*all slices of a stack must match"):
        v.compute()


# --------------------------------------------------------------------------------------------
# atomic outputs
# --------------------------------------------------------------------------------------------


def test_atomic_output_failure_leaves_nothing(tmp_path):
    dest = tmp_path / "out.zarr"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(dest) as tmp:
            assert tmp.parent == tmp_path and tmp != dest
            tmp.mkdir()
            (tmp / "part").write_bytes(b"x" * 100)
            raise RuntimeError("boom")
    assert listing(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(tmp_path / "t.csv") as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert listing(tmp_path) == []


def test_atomic_output_success_and_overwrite(tmp_path):
    dest = tmp_path / "t.csv"
    with atomic_output(dest) as tmp:
        tmp.write_text("one")
        assert not dest.exists()  # invisible until complete
    assert dest.read_text() == "one"
    with pytest.raises(GrapesInputError, match=r"t\.csv.* already exists"):
        with atomic_output(dest) as tmp:
            pytest.fail("must not be entered")
    # a failed overwrite keeps the old output
    with pytest.raises(RuntimeError):
        with atomic_output(dest, overwrite=True) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert dest.read_text() == "one"
    with atomic_output(dest, overwrite=True) as tmp:
        tmp.write_text("two")
    assert dest.read_text() == "two"
    # a folder replaces a file, and a folder replaces a folder
    with atomic_output(dest, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("3")
    assert (dest / "x").read_text() == "3"
    assert listing(tmp_path) == ["t.csv"]


def test_convert_overwrite_replaces(tmp_path):
    a = make_data((6, 7, 8), "uint16")
    dest = tmp_path / "o.zarr"
    convert(a, dest, chunks=4)
    convert(a[:3, :, ::-1].astype(np.float32), dest, chunks=2, overwrite=True)
    z = zarr.open(str(dest), mode="r")
    assert_bit_exact(z[...], a[:3, :, ::-1].astype(np.float32))
    assert z.chunks == (2, 2, 2)
    assert listing(tmp_path) == ["o.zarr"]


def _failing_source(a, bad_z0, slow_s=0.0):
    """A dask array whose block at z=bad_z0 fails to read and whose later blocks are slow."""
    def read(x, block_info=None):
        z0 = block_info[0]["array-location"][0][0]
        if z0 == bad_z0:
            raise OSError("read error halfway through the volume")
        if z0 > bad_z0:
            time.sleep(slow_s)  # still in flight when the failure is reported
        return x
    return da.from_array(a, chunks=(8,) + a.shape[1:]).map_blocks(read, dtype=a.dtype)


@pytest.mark.parametrize("overwrite", [False, True])
def test_interrupted_convert_leaves_no_destination(tmp_path, overwrite):
    a = make_data((64, 16, 16), "uint16")
    dest = tmp_path / "o.zarr"
    if overwrite:
        convert(a, dest, chunks=8)
    with pytest.raises(OSError, match="read error halfway"):
        convert(_failing_source(a + 1, 16, slow_s=0.3), dest, chunks=8, overwrite=overwrite)
    time.sleep(0.6)  # let any straggling task finish: it must not recreate the temporary store
    assert listing(tmp_path) == (["o.zarr"] if overwrite else [])
    if overwrite:  # the previous output is intact
        assert_bit_exact(zarr.open(str(dest), mode="r")[...], a)


def test_interrupted_convert_from_files(tmp_path):
    """A stack whose 5th slice turns out to be different fails mid-conversion: no output."""
    folder = tmp_path / "sl"
    folder.mkdir()
    for i in range(12):
        tifffile.imwrite(folder / f"s{i:02d}.tif", np.full((8, 9) if i != 5 else (8, 10), i, np.uint8))
    with pytest.raises(GrapesInputError, match=r"s05\.tif"):
        convert(str(folder), tmp_path / "o.zarr", chunks=2)
    time.sleep(0.2)
    assert listing(tmp_path) == ["sl"]


# --------------------------------------------------------------------------------------------
# a TIFF larger than the memory budget, converted in bounded memory
# --------------------------------------------------------------------------------------------

BIG_SHAPE = (770, 1000, 980)  # uint16: 1.51 GB; no axis a multiple of the 128-voxel chunks


def _big_page(z: int) -> np.ndarray:
    """Page z of the big TIFF, recomputable: 12-bit noise, like a CT slice, plus the index."""
    rng = np.random.default_rng(z)
    return rng.integers(0, 4096, BIG_SHAPE[1:], dtype=np.uint16) + np.uint16(z)


@pytest.mark.slow
def test_big_tiff_converts_in_bounded_memory(tmp_path):
    import shutil

    nbytes = int(np.prod(BIG_SHAPE)) * 2
    if shutil.disk_usage(tmp_path).free < 3.5 * nbytes:  # the TIFF and the (hardly compressible) Zarr
        pytest.skip(f"needs {3.5 * nbytes / 1e9:.1f} GB free in {tmp_path}")
    src, dest = tmp_path / "big.tif", tmp_path / "big.zarr"
    try:
        with tifffile.TiffWriter(src, bigtiff=True) as tw:  # page by page: never the whole volume
            for z in range(BIG_SHAPE[0]):
                tw.write(_big_page(z), contiguous=True)
        assert src.stat().st_size >= nbytes
        budget = 32 << 20
        code = textwrap.dedent(f"""
            import resource, sys
            from grapes_dask.io import convert
            convert({str(src)!r}, {str(dest)!r}, chunks=128, memory_budget={budget})
            if sys.platform.startswith("linux"):
                # this process's own high-water mark: ru_maxrss also holds the parent's peak,
                # which Linux carries over when the child is started with vfork and exec
                hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
                print(int(hwm.split()[1]) * 1024)
            else:  # bytes on macOS
                print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        """)
        import psutil

        proc = psutil.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
        polled = 0
        while proc.poll() is None:  # also watch the process tree in case workers are spawned
            try:
                tree = [proc] + proc.children(recursive=True)
                polled = max(polled, sum(q.memory_info().rss for q in tree))
            except psutil.Error:
                pass
            time.sleep(0.05)
        out, err = proc.communicate()
        assert proc.returncode == 0, err
        peak = max(int(out.split()[-1]), polled)
        # Measured on the 2-core development machine (kernel high-water mark of the subprocess;
        # python + dask + zarr + tifffile alone take ~85 MB): peak RSS 355-375 MB for this
        # 1509 MB TIFF (~25 %), and 366 MB for a TIFF of half the size: the peak follows the
        # read block (128 x 128 x 980 voxels = 31 MB, two threads), not the file. With the
        # default budget of 256 MiB the same conversion peaks at ~730 MB.
        assert peak < 0.4 * nbytes, f"peak RSS {peak / 1e6:.0f} MB for a {nbytes / 1e6:.0f} MB TIFF"

        z = zarr.open(str(dest), mode="r")
        assert z.shape == BIG_SHAPE and z.dtype == np.uint16 and z.chunks == (128, 128, 128)
        rng = np.random.default_rng(1)
        for _ in range(4):  # a few random blocks, against the TIFF pages read back by tifffile
            z0 = int(rng.integers(0, BIG_SHAPE[0] - 5))
            y0, x0 = (int(rng.integers(0, n - 100)) for n in BIG_SHAPE[1:])
            want = tifffile.imread(src, key=range(z0, z0 + 5))[:, y0:y0 + 100, x0:x0 + 100]
            np.testing.assert_array_equal(z[z0:z0 + 5, y0:y0 + 100, x0:x0 + 100], want)
            np.testing.assert_array_equal(want[0], _big_page(z0)[y0:y0 + 100, x0:x0 + 100])
        # the last chunk row/column, where the edges are uneven
        np.testing.assert_array_equal(z[-1, -70:, -50:], _big_page(BIG_SHAPE[0] - 1)[-70:, -50:])
    finally:
        for p in (src, dest):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()


@pytest.mark.parametrize("dtype, compressor", [
    (">u2", "default"), ("<i4", None), ("u1", "blosc-lz4"), ("f4", "zstd"), ("u8", "default"),
])
def test_direct_reader_equals_zarr(tmp_path, dtype, compressor):
    """The engine's direct chunk-file reader returns what zarr returns (partly written chunks,
    missing chunks = fill value, edge chunks, big-endian, arrays inside groups)."""
    from zarr.codecs import BloscCodec, ZstdCodec

    from grapes_dask.io import direct_reader

    kw = {} if compressor == "default" else {"compressors": {
        None: None, "blosc-lz4": BloscCodec(cname="lz4"), "zstd": ZstdCodec()}[compressor]}
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    a = g.create_array("sub/vol", shape=(30, 31, 17), chunks=(8, 8, 8), dtype=dtype, fill_value=7, **kw)
    a[5:20, 3:9, 2:16] = np.arange(15 * 6 * 14).reshape(15, 6, 14).astype(dtype)
    r = direct_reader(zarr.open(str(tmp_path / "g.zarr"), mode="r")["sub/vol"])
    assert r is not None
    for sl in [(slice(None),) * 3, (slice(3, 29), slice(0, 31), slice(16, 17)), (slice(8, 8), slice(0, 4), slice(0, 4))]:
        got = r[sl]
        assert got.dtype.isnative
        assert_bit_exact(got, a[sl].astype(got.dtype))
    with pytest.raises(IndexError):
        r[::2]


def test_direct_reader_declines_other_layouts(tmp_path):
    from grapes_dask.io import direct_reader

    v2 = zarr.create_array(store=str(tmp_path / "v2.zarr"), shape=(10, 10), chunks=(4, 4), dtype="u1", zarr_format=2)
    assert direct_reader(v2) is None
    sharded = zarr.create_array(store=str(tmp_path / "sh.zarr"), shape=(16, 16), chunks=(4, 4), shards=(8, 8),
                                dtype="u1")
    assert direct_reader(sharded) is None
