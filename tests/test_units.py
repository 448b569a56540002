"""Physical voxel sizes: layers stay one voxel thick, physical columns scale exactly.

The same arrays are written as an ImageJ TIFF, an HDF5 file and a Zarr array that record a
0.325 um voxel, and analysed from the files; every layer count, profile and ROI must equal the
run of the same numpy arrays at spacing 1, and volume, surface area and axis lengths must be
those of the unit run times 0.325^3, 0.325^2 and 0.325. Lengths with units (``"0.65um"``) are
converted with the file's unit. The reference for the unit run is the engine's own exactness
suite (tests/test_table.py checks it against scipy and scikit-image); here the question is only
what a physical voxel size changes.
"""

from __future__ import annotations

import contextlib

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from click.testing import CliRunner
from scipy import ndimage as ndi

from grapes_dask import analyze, analyze_tables
from grapes_dask._errors import GrapesInputError
from grapes_dask.cli import cli
from grapes_dask.io import resolve_volume
from grapes_dask.table import PROFILE_COLUMNS
from grapes_dask.units import (column_units, format_spacing, parse_spacing, relative_spacing, tidy_number,
                               to_voxels)

S = 0.325


def sphere_pair(shape=(40, 44, 40)):
    """A ball of radius 14 voxels (label 60000), a smaller one cut by the border (label 3)."""
    z, y, x = np.indices(shape)
    lab = np.zeros(shape, np.uint16)  # ImageJ TIFF holds 8, 16-bit or float
    lab[(z - 20) ** 2 + (y - 21) ** 2 + (x - 20) ** 2 <= 14 ** 2] = 60000
    lab[(z - 3) ** 2 + (y - 40) ** 2 + (x - 35) ** 2 <= 6 ** 2] = 3
    rng = np.random.default_rng(5)
    grey = (120 + 30 * (lab > 0) + rng.integers(-25, 26, shape)).astype(np.uint8)
    return grey, lab


def write_files(tmp_path, grey, lab, spacing=(S, S, S)):
    """The arrays as an ImageJ TIFF pair, one HDF5 file and a Zarr pair, each recording `spacing` in um."""
    out = {}
    for name, arr in (("grey", grey), ("labels", lab)):
        p = tmp_path / f"{name}.tif"
        tifffile.imwrite(p, arr, imagej=True, resolution=(1 / spacing[2], 1 / spacing[1]),
                         metadata={"unit": "um", "spacing": spacing[0], "axes": "ZYX"})
        out.setdefault("tiff", []).append(str(p))
    h5 = tmp_path / "scan.h5"
    with h5py.File(h5, "w") as f:
        for name, arr in (("grey", grey), ("labels", lab)):
            ds = f.create_dataset(name, data=arr, chunks=(16, 16, 16))
            ds.attrs["spacing"] = np.asarray(spacing)
            ds.attrs["units"] = "um"
    out["hdf5"] = [f"{h5}::/grey", f"{h5}::/labels"]
    for name, arr in (("grey", grey), ("labels", lab)):
        p = tmp_path / f"{name}.zarr"
        z = zarr.create_array(p, shape=arr.shape, dtype=arr.dtype, chunks=(13, 17, 40))
        z[...] = arr
        z.attrs.update({"spacing": list(spacing), "unit": "micrometer"})
        out.setdefault("zarr", []).append(str(p))
    return out


def assert_same_layers(got, unit_run):
    """Layers table, profiles and ROI equal to the bit; physical columns scaled by S."""
    pd.testing.assert_frame_equal(got.layers, unit_run.layers)
    a, b = got.particles, unit_run.particles
    for c in PROFILE_COLUMNS + ("label", "voxel_count", "roi_voxels", "roi_mean", "roi_std", "intensity_mean",
                                "centroid-0", "centroid-1", "centroid-2", "bbox-0", "bbox-5", "touches_border"):
        for x, y in zip(a[c], b[c]):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=c)
    np.testing.assert_allclose(a["volume"], b["volume"] * S ** 3, rtol=1e-13)
    np.testing.assert_allclose(a["surface_area"], b["surface_area"] * S ** 2, rtol=1e-12)
    np.testing.assert_allclose(a["equivalent_diameter_volume"], b["equivalent_diameter_volume"] * S, rtol=1e-12)
    np.testing.assert_allclose(a["axis_major_length"], b["axis_major_length"] * S, rtol=1e-12)
    np.testing.assert_allclose(a["sphericity"], b["sphericity"], rtol=1e-12)


@pytest.fixture(scope="module")
def arrays():
    return sphere_pair()


@pytest.fixture(scope="module")
def unit_run(arrays):
    grey, lab = arrays
    return analyze_tables(grey, lab, spacing=1.0, exclude_outer_layers=5, chunks=(16, 16, 16))


@pytest.mark.parametrize("fmt", ["tiff", "hdf5", "zarr"])
def test_file_voxel_size_keeps_voxel_layers(tmp_path, arrays, unit_run, fmt):
    grey, lab = arrays
    paths = write_files(tmp_path, grey, lab)[fmt]
    assert resolve_volume(paths[1]).spacing == (S, S, S)  # printed as given, not 0.32499999999999996
    res = analyze_tables(*paths, exclude_outer_layers=5, chunks=(16, 16, 16))
    params = res.particles.attrs["grapes_dask"]
    assert params["spacing"] == [S, S, S]
    assert params["spacing_unit"] in ("micrometer", "um")
    assert params["layer_width"] == 1.0 and params["layer_width_physical"] == S
    assert params["layer_width_unit"] == "µm"
    assert params["column_units"]["volume"] == "µm^3" and params["column_units"]["surface_area"] == "µm^2"
    assert params["column_units"]["centroid-0"] == "voxel index"
    assert_same_layers(res, unit_run)
    big = res.particles.set_index("label").loc[60000]
    # the ball of radius 14 voxels: 14 layers, the inner ones kept by the ROI (issue: 0 before)
    assert len(big["radial_layers"]) == 14 and big["roi_voxels"] > 0
    # independent count: voxels farther than 5.5 voxels from the surface (scipy EDT in voxels)
    mask = lab == 60000
    d = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1][mask]
    assert big["roi_voxels"] == int((np.maximum(1, np.rint(d)) > 5).sum())


def test_physical_layer_width_converts_with_the_unit(tmp_path, arrays):
    grey, lab = arrays
    g, lb = write_files(tmp_path, grey, lab)["zarr"]
    res = analyze_tables(g, lb, layer_width="0.65um", exclude_outer_layers=2, chunks=(16, 16, 16))
    ref = analyze_tables(grey, lab, spacing=1.0, layer_width=2.0, exclude_outer_layers=2, chunks=(16, 16, 16))
    pd.testing.assert_frame_equal(res.layers, ref.layers)
    p = res.particles.attrs["grapes_dask"]
    assert p["layer_width"] == pytest.approx(2.0, rel=1e-15) and p["layer_width_physical"] == pytest.approx(0.65)
    # nanometres, and a width in voxels given as text
    res_nm = analyze_tables(g, lb, layer_width="650 nm", exclude_outer_layers=2, chunks=(16, 16, 16))
    pd.testing.assert_frame_equal(res_nm.layers, ref.layers)
    res_vox = analyze_tables(g, lb, layer_width="2vox", exclude_outer_layers=2, chunks=(16, 16, 16))
    pd.testing.assert_frame_equal(res_vox.layers, ref.layers)


def test_anisotropic_physical_equals_relative(arrays):
    """(0.65, 0.325, 0.325) um gives the layers of (2, 1, 1): distances in voxels of the finest axis."""
    grey, lab = arrays
    a = analyze_tables(grey, lab, spacing=("0.65um", "0.325um", "0.325um"), exclude_outer_layers=3, chunks=15)
    b = analyze_tables(grey, lab, spacing=(2.0, 1.0, 1.0), exclude_outer_layers=3, chunks=15)
    pd.testing.assert_frame_equal(a.layers, b.layers)
    assert a.particles.attrs["grapes_dask"]["spacing_unit"] == "um"
    np.testing.assert_allclose(a.particles["volume"], b.particles["volume"] * S ** 3, rtol=1e-13)
    # and the reference: scipy's EDT with sampling (2, 1, 1), layer rint(d)
    mask = lab == 60000
    d = ndi.distance_transform_edt(np.pad(mask, 1), sampling=(2.0, 1.0, 1.0))[1:-1, 1:-1, 1:-1][mask]
    k = np.maximum(1, np.rint(d)).astype(int)
    row = a.particles.set_index("label").loc[60000]
    np.testing.assert_array_equal(row["radial_layers_count"], np.bincount(k)[1:])


def test_physical_width_needs_a_unit(arrays):
    grey, lab = arrays
    with pytest.raises(GrapesInputError, match=r"layer_width='0.5um' is a physical length.*no known unit"):
        analyze(grey, lab, spacing=0.325, layer_width="0.5um")
    with pytest.raises(GrapesInputError, match=r"unknown unit 'parsec'"):
        analyze(grey, lab, layer_width="2 parsec")
    for bad in (0, -1, "abc", float("nan")):
        with pytest.raises(GrapesInputError, match="layer_width"):
            analyze(grey, lab, layer_width=bad)


def test_given_number_takes_the_files_unit(tmp_path, arrays):
    grey, lab = arrays
    g, lb = write_files(tmp_path, grey, lab)["zarr"]
    res = analyze_tables(g, lb, spacing=0.5, chunks=20)
    p = res.particles.attrs["grapes_dask"]
    assert p["spacing"] == [0.5] * 3 and p["spacing_unit"] == "micrometer"
    assert "given" in p["spacing_source"] and "micrometer" in p["spacing_source"]


# --- the helpers, by hand -----------------------------------------------------------------------


@pytest.mark.parametrize("value, spacing, unit, voxels", [
    (None, (S,) * 3, "micrometer", 1.0),
    (3, (S,) * 3, "micrometer", 3.0),
    ("3", (S,) * 3, None, 3.0),
    ("3 voxels", (S,) * 3, None, 3.0),
    ("2.5px", (1.0,) * 3, None, 2.5),
    ("0.65um", (S,) * 3, "micrometer", 2.0),
    ("0.65 µm", (0.65, S, S), "um", 2.0),  # finest axis: 0.325
    ("650nm", (S,) * 3, "micrometer", 2.0),
    ("0.001mm", (0.5,) * 3, "micrometer", 2.0),
    ("1um", (325.0,) * 3, "nm", 1000 / 325),
])
def test_to_voxels(value, spacing, unit, voxels):
    got = to_voxels(value, name="w", spacing=spacing, unit=unit, default=1.0)
    assert got.voxels == pytest.approx(voxels, rel=1e-14)
    assert got.physical == pytest.approx(voxels * min(spacing), rel=1e-14)


def test_parse_and_format_spacing():
    assert parse_spacing("0.325um") == (0.325, "um")
    assert parse_spacing(("0.65um", "325nm", "0.325 um")) == ((0.65, 0.325, 0.325), "um")
    assert parse_spacing((1, 2, 3)) == ((1, 2, 3), None)
    with pytest.raises(GrapesInputError, match="is not a voxel size"):
        parse_spacing("0.3 furlong")
    assert format_spacing((0.32499999999999996,) * 3, "micrometer") == "0.325 µm"
    assert format_spacing((0.65, 0.325, 0.325), "um") == "(0.65, 0.325, 0.325) µm"
    assert format_spacing((1.0, 1.0)) == "1"
    assert tidy_number(0.32499999999999996) == 0.325 and tidy_number(1 / 3) == pytest.approx(1 / 3, rel=1e-11)
    assert relative_spacing((S, S, S)) == (1.0, 1.0, 1.0)
    assert relative_spacing((0.65, 0.325, 0.5)) == (2.0, 1.0, 0.5 / 0.325)
    units = column_units(3, "micrometer")
    assert units["volume"] == "µm^3" and units["axis_major_length"] == "µm" and units["roi_voxels"] == "voxels"
    assert column_units(2, None)["area"] == "spacing unit^2"


def test_cli_prints_the_voxel_size_as_given(tmp_path, arrays):
    grey, lab = arrays
    g, lb = write_files(tmp_path, grey, lab)["tiff"]
    out = tmp_path / "t.parquet"
    r = CliRunner().invoke(cli, ["analyze", g, lb, "--out", str(out), "--layer-width", "0.65um"])
    assert r.exit_code == 0, r.output
    assert "voxel size 0.325 µm (labels: ImageJ metadata)" in r.output
    assert "layers 0.65 µm (2 voxels) thick" in r.output
    r = CliRunner().invoke(cli, ["analyze", g, lb, "--out", str(tmp_path / "u.parquet"), "--spacing", "325nm"])
    assert r.exit_code == 0, r.output
    assert "voxel size 325 nm (given)" in r.output
    r = CliRunner().invoke(cli, ["analyze", g, lb, "--out", str(tmp_path / "v.parquet"), "--spacing", "0.325",
                                 "--layer-width", "2 furlongs", "--quiet"])
    assert r.exit_code == 2 and "unknown unit 'furlongs'" in r.output and "Traceback" not in r.output


# --- a real case: an operando series whose files carry 0.325 um ------------------------------------


@contextlib.contextmanager
def _threads(scheduler=None, **kw):
    """Stands in for the local cluster: the analyses run on dask's threads (the cluster is
    tested in test_cli.py and test_cluster.py)."""
    yield None


def test_operando_on_physical_files_equals_unit_spacing(tmp_path, monkeypatch):
    """Three states written as an ImageJ TIFF pair, an HDF5 file and a folder of TIFF slices, all at
    0.325 um: `grapes-dask operando` with its defaults keeps the particles and gives the statistics
    of the same arrays at unit spacing (the Zarr phantom), and says the voxel size it used."""
    import grapes_dask.cluster
    from grapes_dask import synthetic

    monkeypatch.setattr(grapes_dask.cluster, "cluster_client", _threads)
    ph = synthetic.make_phantom(tmp_path / "ph", shape=(64, 64, 64), n_states=3, seed=3, mean_radius=9.0,
                                chunks=32, air_thickness=8)
    grey = [np.asarray(zarr.open_array(p, mode="r")) for p in ph.grey]
    labs = [np.asarray(zarr.open_array(p, mode="r")).astype(np.uint16) for p in ph.labels]
    ij = dict(imagej=True, resolution=(1 / S, 1 / S), metadata={"unit": "um", "spacing": S, "axes": "ZYX"})
    tifffile.imwrite(tmp_path / "s0_grey.tif", grey[0], **ij)
    tifffile.imwrite(tmp_path / "s0_labels.tif", labs[0], **ij)
    with h5py.File(tmp_path / "s1.h5", "w") as f:
        for name, arr in (("grey", grey[1]), ("labels", labs[1])):
            f.create_dataset(name, data=arr).attrs.update({"spacing": [S, S, S], "units": "um"})
    for name, arr in (("grey", grey[2]), ("labels", labs[2])):
        d = tmp_path / f"s2_{name}"
        d.mkdir()
        for z, plane in enumerate(arr):
            tifffile.imwrite(d / f"slice_{z:03d}.tif", plane, imagej=True, resolution=(1 / S, 1 / S),
                             metadata={"unit": "um", "spacing": S})
    h5 = tmp_path / "s1.h5"
    physical = [f"a={tmp_path / 's0_grey.tif'},{tmp_path / 's0_labels.tif'}", f"b={h5}::/grey,{h5}::/labels",
                f"c={tmp_path / 's2_grey'},{tmp_path / 's2_labels'}"]
    unit = [f"{n}={g},{lb}" for n, g, lb in zip("abc", ph.grey, ph.labels)]
    outs = {}
    for key, specs in (("physical", physical), ("unit", unit)):
        args = ["operando", "--out", str(tmp_path / key)]
        for spec in specs:
            args += ["--state", spec]
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, r.output + str(r.exception)
        outs[key] = r
    assert "voxel size 0.325 µm; layers 1 voxel (0.325 µm) thick" in outs["physical"].stderr
    a = pd.read_parquet(tmp_path / "physical" / "particles.parquet")
    b = pd.read_parquet(tmp_path / "unit" / "particles.parquet")
    kept_a = set(a.loc[~a["excluded"], "label"])
    assert len(kept_a) >= 5 and kept_a == set(b.loc[~b["excluded"], "label"])
    np.testing.assert_array_equal(a["reason"].to_numpy(), b["reason"].to_numpy())
    np.testing.assert_array_equal(a["roi_mean"].to_numpy(), b["roi_mean"].to_numpy())
    np.testing.assert_allclose(a["volume"].to_numpy(), b["volume"].to_numpy() * S ** 3, rtol=1e-12)
    sa = pd.read_csv(tmp_path / "physical" / "summary.csv")
    sb = pd.read_csv(tmp_path / "unit" / "summary.csv")
    # sigma_bg sums its moments over the files' own chunks: equal within float rounding
    pd.testing.assert_frame_equal(sa, sb, check_exact=False, rtol=1e-12, atol=0)
    za = pd.read_csv(tmp_path / "physical" / "z_tests.csv")
    zb = pd.read_csv(tmp_path / "unit" / "z_tests.csv")
    pd.testing.assert_frame_equal(za, zb, check_exact=False, rtol=1e-12, atol=0)
    # the statistics printed are the same lines
    stats = [ln for ln in outs["physical"].stdout.splitlines() if "mean ROI grey" in ln]
    assert stats and stats == [ln for ln in outs["unit"].stdout.splitlines() if "mean ROI grey" in ln]


def test_segment_does_not_depend_on_the_voxel_size_scale(tmp_path):
    """The same grey arrays segmented at 0.325 um and at spacing 1 give the same labels (distances in
    voxels of the finest axis), with lengths given in um converted; the unit is written with the labels."""
    from grapes_dask import segment, synthetic

    grey, _, _ = synthetic.phantom_numpy((48, 48, 48), seed=4, mean_radius=7.0, chunks=24)
    unit = segment(grey, spacing=1.0, chunks=24).labels
    phys = segment(grey, spacing="0.325um", chunks=(20, 24, 30), out=tmp_path / "l.zarr")
    np.testing.assert_array_equal(np.asarray(phys.labels), np.asarray(unit))
    z = zarr.open_array(str(tmp_path / "l.zarr"), mode="r")
    assert z.attrs["spacing"] == [S, S, S] and z.attrs["unit"] == "um"
    # a smoothing of 0.65 um is 2 voxels
    a = segment(grey, spacing="0.325um", smoothing="0.65um", chunks=24).labels
    b = segment(grey, spacing=1.0, smoothing=2.0, chunks=24).labels
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(np.unique(np.asarray(a))) > 5


def test_figures_say_the_unit(arrays):
    """Distributions and fig. 8 label lengths in the unit of the voxel size when it is known."""
    import matplotlib

    matplotlib.use("Agg")
    from grapes_dask import plotting

    grey, lab = arrays
    t = analyze(grey, lab, spacing="0.325um", chunks=20)
    fig = plotting.plot_distributions(t, columns=("volume", "equivalent_diameter_volume", "roi_mean"))
    assert [a.get_xlabel() for a in fig.axes] == ["volume (µm^3)", "equivalent diameter (µm)",
                                                 "mean ROI grey level (grey levels)"]
    byq = pd.DataFrame({"group": [1, 2], "state": ["b", "b"], "delta_mean": [-1.0, -2.0],
                        "delta_se_tot": [0.5, 0.5], "lo": [2.0, 10.0], "hi": [10.0, 40.0]})
    fig = plotting.plot_quantile_deltas(byq, column="centroid-2", spacing=(S, S, 0.5), unit="micrometer")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "quantile group of x position (µm), 1 = lowest"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Q1\n1-5", "Q2\n5-20"]  # voxel index x 0.5 um
    fig = plotting.plot_quantile_deltas(byq, column="centroid-2")
    assert fig.axes[0].get_xlabel() == "quantile group of x position (voxels), 1 = lowest"
