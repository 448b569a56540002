"""Inputs resolved once and trusted at the edges (issue "Trust at the edges").

One :class:`grapes_dask.io.Volume` per input (lazy array, voxel size and where it came from,
reader, identity); datasets named in the path (``scan.h5::/data``); absolute paths for workers
in other folders; TIFF resolution tags read as voxel sizes only when they plausibly are;
grey and labels voxel sizes that must agree; stray files in a folder of slices named; convert
refusing an output that is not named ``.zarr``. Expected values come from numpy, tifffile, h5py
and zarr directly.
"""

from __future__ import annotations

import os
import pickle
import struct

import h5py
import numpy as np
import pytest
import tifffile
import zarr

from grapes_dask import GrapesInputError
from grapes_dask import io as gio
from grapes_dask.io import Volume, convert, open_volume, read_spacing, resolve_volume
from grapes_dask.table import _normalize_inputs, analyze_tables

PARAMS = dict(chunks=None, layer_width=None, start_at="edge", black_border=True, normalise="radial_max",
              exclude_outer_layers=0, exclude_labels=None, memory_limit=2 << 30, region_size=400)


def normalize(grey, labels, spacing=None):
    return _normalize_inputs(grey, labels, spacing=spacing, **PARAMS)


def small_pair(shape=(6, 7, 8)):
    lab = np.zeros(shape, np.uint16)
    lab[1:4, 2:5, 2:6] = 5
    lab[4:6, 0:2, 0:3] = 2
    grey = np.arange(lab.size, dtype=np.uint16).reshape(shape)
    return grey, lab


def write_h5(path, grey, lab, root_attrs=None, labels_attrs=None):
    with h5py.File(path, "w") as f:
        f.create_dataset("/scan/grey", data=grey)
        ds = f.create_dataset("/scan/labels", data=lab)
        for k, v in (root_attrs or {}).items():
            f.attrs[k] = v
        for k, v in (labels_attrs or {}).items():
            ds.attrs[k] = v


# --------------------------------------------------------------------------------------------
# 1. one resolved object per input
# --------------------------------------------------------------------------------------------


def test_resolve_volume_carries_everything(tmp_path):
    grey, _ = small_pair()
    tifffile.imwrite(tmp_path / "g.ome.tif", grey, ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 2.0})
    v = resolve_volume(str(tmp_path / "g.ome.tif"), chunks=3)
    assert isinstance(v, Volume)
    assert (v.kind, v.path, v.dataset) == ("tiff", str(tmp_path / "g.ome.tif"), None)
    assert v.spacing == pytest.approx((2.0, 0.5, 0.5)) and v.unit == "micrometer"
    assert v.spacing_source == "OME-TIFF PhysicalSize"
    assert v.array.chunksize == (3, 3, 3) and v.shape == grey.shape and v.dtype == grey.dtype
    np.testing.assert_array_equal(v.array.compute(), grey)
    reader = pickle.loads(pickle.dumps(v.reader))  # tasks read from it on any worker
    np.testing.assert_array_equal(reader[1:3, 2:5, 0:4], grey[1:3, 2:5, 0:4])
    # the thin wrappers agree with it; a Volume is accepted wherever a path is
    assert read_spacing(str(tmp_path / "g.ome.tif")) == v.spacing
    assert open_volume(v) is v.array
    assert resolve_volume(v) is v
    assert resolve_volume(v, chunks=2).array.chunksize == (2, 2, 2)
    np.testing.assert_array_equal(open_volume(v, chunks=4).compute(), grey)
    # numpy: the array itself is the reader; no path
    n = resolve_volume(grey)
    assert n.reader is grey and n.path is None and n.spacing is None and n.spacing_source is None


def test_normalize_inputs_resolves_each_input_once(tmp_path, monkeypatch):
    grey, lab = small_pair()
    np.save(tmp_path / "g.npy", grey)
    z = zarr.create_array(store=str(tmp_path / "l.zarr"), shape=lab.shape, dtype=lab.dtype, chunks=(3, 4, 4),
                          attributes={"spacing": [2.0, 1.0, 1.0]})
    z[...] = lab
    calls = []
    real = gio._resolve
    monkeypatch.setattr(gio, "_resolve", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    inp = normalize(str(tmp_path / "g.npy"), str(tmp_path / "l.zarr"))
    assert sorted(map(str, calls)) == sorted([str(tmp_path / "g.npy"), str(tmp_path / "l.zarr")])
    assert inp.spacing == (2.0, 1.0, 1.0)
    assert inp.volumes["labels"].path == str(tmp_path / "l.zarr")
    assert inp.readers["grey"] is inp.volumes["grey"].reader


# --------------------------------------------------------------------------------------------
# 2. each input names its own dataset; the same array twice is refused
# --------------------------------------------------------------------------------------------


def test_dataset_named_in_the_path_keeps_the_file_voxel_size(tmp_path):
    grey, lab = small_pair()
    p = tmp_path / "scan.h5"
    write_h5(p, grey, lab, root_attrs={"element_size_um": [2.0, 0.5, 0.5]})
    g = open_volume(f"{p}::/scan/grey")
    np.testing.assert_array_equal(g.compute(), grey)
    v = resolve_volume(f"{p}::scan/labels")
    assert v.dataset == "/scan/labels" and v.name == f"{p}::/scan/labels"
    assert v.spacing == (2.0, 0.5, 0.5)
    assert v.spacing_source == "HDF5 attribute 'element_size_um' of the file"
    # the path form and already-resolved volumes (what the CLI's --grey-dataset passes) analyse alike
    res = analyze_tables(f"{p}::/scan/grey", f"{p}::/scan/labels")
    assert res.parameters["spacing"] == [2.0, 0.5, 0.5]
    res2 = analyze_tables(resolve_volume(p, dataset="/scan/grey"), resolve_volume(p, dataset="/scan/labels"))
    assert res2.parameters["spacing"] == [2.0, 0.5, 0.5]
    assert res2.particles.attrs["grapes_dask"]["spacing_source"] == (
        "labels: HDF5 attribute 'element_size_um' of the file")
    assert res2.particles["volume"].tolist() == res.particles["volume"].tolist()
    assert res.particles.attrs["grapes_dask"]["labels"] == f"{p}::/scan/labels"
    with pytest.raises(GrapesInputError, match=r"names dataset '/scan/grey' but dataset='/other' names another"):
        open_volume(f"{p}::/scan/grey", dataset="/other")
    with pytest.raises(GrapesInputError, match=r"has no dataset '/nope'"):
        open_volume(f"{p}::/nope")


def test_zarr_group_array_named_in_the_path(tmp_path):
    grey, lab = small_pair()
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    g.create_array("grey", shape=grey.shape, dtype=grey.dtype)[...] = grey
    g.create_array("labels", shape=lab.shape, dtype=lab.dtype, attributes={"spacing": [3, 1, 1]})[...] = lab
    v = resolve_volume(f"{tmp_path / 's.zarr'}::labels")
    np.testing.assert_array_equal(v.array.compute(), lab)
    assert v.spacing == (3.0, 1.0, 1.0) and v.spacing_source == "Zarr attribute 'spacing'"
    inp = normalize(f"{tmp_path / 's.zarr'}::grey", f"{tmp_path / 's.zarr'}::labels")
    assert inp.spacing == (3.0, 1.0, 1.0)


def test_the_same_array_as_grey_and_labels_is_refused(tmp_path):
    grey, lab = small_pair()
    p = tmp_path / "scan.h5"
    write_h5(p, grey, lab)
    z = zarr.create_array(store=str(tmp_path / "l.zarr"), shape=lab.shape, dtype=lab.dtype)
    z[...] = lab
    same = [
        (lab, lab),
        (lab, lab[...]),  # a view of the same memory
        (f"{p}::/scan/labels", f"{p}::scan/labels"),
        (resolve_volume(p, dataset="/scan/labels"), f"{p}::/scan/labels"),
        (z, str(tmp_path / "l.zarr")),
        (str(tmp_path / "l.zarr"), str(tmp_path / "." / "l.zarr")),
    ]
    for g, lb in same:
        with pytest.raises(GrapesInputError, match=r"grey and labels are the same array .*pass the grey-level volume"):
            normalize(g, lb)
    normalize(lab.astype(np.uint16), lab)  # a copy is another array
    normalize(f"{p}::/scan/grey", f"{p}::/scan/labels")


def test_dataset_given_to_a_single_volume_source_is_refused(tmp_path):
    grey, _ = small_pair()
    np.save(tmp_path / "g.npy", grey)
    with pytest.raises(GrapesInputError, match=r"holds one volume: drop dataset='x'") as e:
        open_volume(str(tmp_path / "g.npy"), dataset="x")
    assert "drop --dataset x" in e.value.render("cli")
    with pytest.raises(GrapesInputError, match=r"numpy array .* drop dataset='x'"):
        open_volume(grey, dataset="x")
    (tmp_path / "sl").mkdir()
    tifffile.imwrite(tmp_path / "sl" / "s0.tif", grey[0])
    with pytest.raises(GrapesInputError, match=r"stack of TIFF slices, which holds one volume: drop dataset='x'"):
        open_volume(f"{tmp_path / 'sl'}::x")


# --------------------------------------------------------------------------------------------
# 3. absolute paths: a worker in another working folder finds the files
# --------------------------------------------------------------------------------------------


def test_relative_paths_still_read_after_a_change_of_folder(tmp_path, monkeypatch):
    a = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6)
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    tifffile.imwrite(work / "a.tif", a, photometric="minisblack")
    with h5py.File(work / "a.h5", "w") as f:
        f["v"] = a
    np.save(work / "a.npy", a)
    (work / "slices").mkdir()
    for i, page in enumerate(a):
        tifffile.imwrite(work / "slices" / f"s{i}.tif", page)
    zarr.create_array(store=str(work / "a.zarr"), shape=a.shape, dtype=a.dtype, chunks=(2, 2, 2))[...] = a
    monkeypatch.chdir(work)
    sources = ["a.tif", "a.h5", "a.h5::/v", "a.npy", "slices", "slices/s*.tif", "a.zarr",
               zarr.open_array("a.zarr", mode="r")]
    vols = [resolve_volume(s, chunks=2) for s in sources]
    monkeypatch.chdir(elsewhere)
    for s, v in zip(sources, vols):
        np.testing.assert_array_equal(v.array.compute(), a, err_msg=str(s))
        rd = pickle.loads(pickle.dumps(v.reader))
        np.testing.assert_array_equal(np.asarray(rd[1:3, 0:5, 2:6]), a[1:3, 0:5, 2:6], err_msg=str(s))
        assert v.path is None or os.path.isabs(v.path)


# --------------------------------------------------------------------------------------------
# 4. TIFF resolution tags: voxel sizes only when they plausibly are
# --------------------------------------------------------------------------------------------


def _drop_resolution_unit(path):
    """Rename the ResolutionUnit tag to a private one, as if the writer had left it out."""
    with tifffile.TiffFile(path) as tf:
        offset = tf.pages.first.tags["ResolutionUnit"].offset
        order = tf.byteorder
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(order + "H", 65000))
    with tifffile.TiffFile(path) as tf:
        assert "ResolutionUnit" not in tf.pages.first.tags


@pytest.mark.parametrize("dpi", [72, 96, 150, 300, 2.0])
def test_inch_resolution_tags_are_print_resolutions(tmp_path, dpi):
    a = np.zeros((3, 6, 5), np.uint8)
    p = tmp_path / "a.tif"
    tifffile.imwrite(p, a, resolution=(dpi, dpi), photometric="minisblack")  # as image software writes
    assert read_spacing(str(p)) is None
    tifffile.imwrite(p, a, resolution=(dpi, dpi), resolutionunit="INCH", photometric="minisblack")
    assert read_spacing(str(p)) is None
    _drop_resolution_unit(p)  # no ResolutionUnit: the TIFF default is inch
    assert read_spacing(str(p)) is None
    tifffile.imwrite(p, a, resolution=(dpi, dpi), resolutionunit="NONE", photometric="minisblack")
    assert read_spacing(str(p)) is None


def test_centimetre_resolution_tags_are_voxel_sizes(tmp_path):
    a = np.zeros((3, 6, 5), np.uint8)
    p = tmp_path / "cm.tif"
    tifffile.imwrite(p, a, resolution=(2000.0, 4000.0), resolutionunit="CENTIMETER", photometric="minisblack")
    v = resolve_volume(str(p))
    assert v.spacing == pytest.approx((2.5, 2.5, 5.0))
    assert v.spacing_source == "TIFF resolution tags (cm), z taken equal to y"
    # 72 dpi written in pixels per centimetre is still a print resolution
    tifffile.imwrite(p, a, resolution=(72 / 2.54, 72 / 2.54), resolutionunit="CENTIMETER", photometric="minisblack")
    assert read_spacing(str(p)) is None


def test_imagej_and_ome_metadata_decide_over_the_tags(tmp_path):
    a = np.zeros((3, 6, 5), np.uint8)
    tifffile.imwrite(tmp_path / "ij.tif", a, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "ZYX", "unit": "um", "spacing": 1.5})
    v = resolve_volume(str(tmp_path / "ij.tif"))
    assert v.spacing == pytest.approx((1.5, 0.5, 0.5)) and v.spacing_source == "ImageJ metadata"
    # ImageJ calls the dots per inch of an uncalibrated image "inch"
    tifffile.imwrite(tmp_path / "ij_inch.tif", a, imagej=True, resolution=(72.0, 72.0),
                     metadata={"axes": "ZYX", "unit": "inch"})
    assert read_spacing(str(tmp_path / "ij_inch.tif")) is None
    tifffile.imwrite(tmp_path / "o.ome.tif", a, ome=True, resolution=(72, 72),
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25, "PhysicalSizeZ": 1.0})
    assert read_spacing(str(tmp_path / "o.ome.tif")) == pytest.approx((1.0, 0.25, 0.25))


# --------------------------------------------------------------------------------------------
# 5. grey and labels voxel sizes must agree; the spacing used and its source are recorded
# --------------------------------------------------------------------------------------------


def _zarr(path, a, spacing=None, unit=None):
    attrs = {} if spacing is None else {"spacing": list(spacing), **({"unit": unit} if unit else {})}
    z = zarr.create_array(store=str(path), shape=a.shape, dtype=a.dtype, chunks=(3, 4, 4), attributes=attrs)
    z[...] = a
    return str(path)


def test_disagreeing_voxel_sizes_are_an_error(tmp_path):
    grey, lab = small_pair()
    tifffile.imwrite(tmp_path / "g.ome.tif", grey, ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 0.5})
    lz = _zarr(tmp_path / "l.zarr", lab, (1.0, 1.0, 1.0), "micrometer")
    g = str(tmp_path / "g.ome.tif")
    with pytest.raises(GrapesInputError) as e:
        normalize(g, lz)
    msg = str(e.value)
    assert "disagree" in msg
    assert "(1.0, 1.0, 1.0) micrometer (Zarr attribute 'spacing')" in msg
    assert "(0.5, 0.5, 0.5) micrometer (OME-TIFF PhysicalSize)" in msg
    assert "l.zarr" in msg and "g.ome.tif" in msg
    assert msg.endswith("give it with spacing=(1.0, 1.0, 1.0)")
    assert e.value.render("cli").endswith("give it with --spacing 1.0 1.0 1.0")
    # a given spacing settles it
    inp = normalize(g, lz, spacing=(0.5, 0.5, 0.5))
    assert inp.params["spacing"] == [0.5, 0.5, 0.5] and inp.params["spacing_source"].startswith("given")
    # the same size in other units agrees (within 1e-6)
    nm = _zarr(tmp_path / "nm.zarr", lab, (500.0, 500.0, 500.0000001), "nm")
    inp = normalize(g, nm)
    assert inp.params["spacing"] == [500.0, 500.0, 500.0000001]
    assert inp.params["spacing_source"] == "labels: Zarr attribute 'spacing'"
    assert inp.params["spacing_unit"] == "nm"


def test_spacing_source_recorded_in_the_table_metadata(tmp_path):
    grey, lab = small_pair()
    gz = _zarr(tmp_path / "g.zarr", grey, (2.0, 1.0, 1.0))
    lz = _zarr(tmp_path / "l.zarr", lab)
    assert normalize(gz, lz).params["spacing_source"] == "grey: Zarr attribute 'spacing'"
    assert normalize(grey, lab).params["spacing_source"] == (
        "default: no voxel size in the metadata of either input (1 per axis)")
    res = analyze_tables(gz, lz)
    meta = res.particles.attrs["grapes_dask"]
    assert meta["spacing"] == [2.0, 1.0, 1.0]
    assert meta["spacing_source"] == "grey: Zarr attribute 'spacing'"


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1, 1, 1, 1), "abc", (1, "a", 1), 0.0, -2.0, float("nan")])
def test_given_spacing_must_fit_the_volume(spacing):
    grey, lab = small_pair()
    with pytest.raises(GrapesInputError, match=r"spacing=.* does not fit a 3D volume: give 3 positive voxel sizes"):
        normalize(grey, lab, spacing=spacing)


def test_one_spacing_for_every_axis():
    grey, lab = small_pair()
    assert normalize(grey, lab, spacing=0.5).spacing == (0.5, 0.5, 0.5)
    assert normalize(grey[0], lab[0], spacing=2).spacing == (2.0, 2.0)
    with pytest.raises(GrapesInputError, match=r"does not fit a 2D volume: give 2 positive voxel sizes \(y x\)"):
        normalize(grey[0], lab[0], spacing=(1, 1, 1))


# --------------------------------------------------------------------------------------------
# 6. a folder of slices with a stray file
# --------------------------------------------------------------------------------------------


def test_stray_file_among_slices_is_named(tmp_path):
    folder = tmp_path / "scan"
    folder.mkdir()
    a = np.arange(5 * 16 * 16, dtype=np.uint16).reshape(5, 16, 16)
    for i, page in enumerate(a):
        tifffile.imwrite(folder / f"slice_{i:04d}.tif", page)
    tifffile.imwrite(folder / "preview.tiff", np.zeros((4, 4), np.uint8))  # sorts first
    with pytest.raises(GrapesInputError) as e:
        open_volume(str(folder))  # at opening, before any task runs
    msg = str(e.value)
    assert "5 of the 6 TIFF files" in msg and "(16, 16) and dtype uint16" in msg
    assert "'preview.tiff' ((4, 4), uint8)" in msg
    assert "remove it or use a glob that excludes it" in msg
    pattern = str(folder / "slice_*.tif")
    assert repr(pattern) in msg
    np.testing.assert_array_equal(open_volume(pattern).compute(), a)  # the suggested glob works
    # an unreadable file is named too
    os.remove(folder / "preview.tiff")
    (folder / "notes.tif").write_bytes(b"not a tiff")
    with pytest.raises(GrapesInputError, match=r"'notes\.tif' \(not a readable TIFF"):
        open_volume(str(folder))


# --------------------------------------------------------------------------------------------
# 7. convert writes Zarr: an output named otherwise is refused
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, better", [("g.h5", "g.zarr"), ("g.tif", "g.zarr"), ("g", "g.zarr")])
def test_convert_refuses_an_output_not_named_zarr(tmp_path, name, better):
    a = np.zeros((3, 4, 5), np.uint8)
    with pytest.raises(GrapesInputError, match=rf"does not end in \.zarr.*name it .*{better}"):
        convert(a, tmp_path / name)
    assert os.listdir(tmp_path) == []
    convert(a, tmp_path / "g.ome.zarr")
    convert(a, tmp_path / "G.ZARR")


# --------------------------------------------------------------------------------------------
# messages in the reader's words: parameters as keywords for Python, options for the CLI
# --------------------------------------------------------------------------------------------


def test_messages_name_parameters_for_api_and_cli(tmp_path):
    a = np.zeros((3, 4, 5), np.uint8)
    convert(a, tmp_path / "o.zarr")
    with pytest.raises(GrapesInputError) as e:
        convert(a, tmp_path / "o.zarr")
    assert str(e.value).endswith("pass overwrite=True") and e.value.render("cli").endswith("pass --overwrite")
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f["dark"] = np.zeros((2, 4, 5), np.uint8)
        f["x"] = np.zeros((3, 4, 5), np.uint8)  # the largest: the example
    with pytest.raises(GrapesInputError) as e:
        open_volume(str(tmp_path / "m.h5"))
    assert "choose one with dataset='/x' or in the path" in str(e.value)
    assert "choose one with --dataset /x or in the path" in e.value.render("cli")
    assert f"{tmp_path / 'm.h5'}::/x" in str(e.value)
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    g.create_array("a", shape=(3, 3), dtype="u1")
    g.create_array("b", shape=(3, 4), dtype="u1")
    with pytest.raises(GrapesInputError) as e:
        open_volume(str(tmp_path / "g.zarr"))
    assert "choose one with --dataset b or in the path" in e.value.render("cli")
    with pytest.raises(GrapesInputError) as e:
        open_volume(np.zeros((3, 4, 5), np.uint8), chunks=(2, 2))
    assert e.value.render("cli").startswith("--chunks 2,2 does not fit")
