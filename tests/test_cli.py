"""The ``grapes-dask`` command, run through subprocess as a user would."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tifffile
import zarr

EXE = [sys.executable, "-m", "grapes_dask"]


def run(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(EXE + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def volume():
    return np.random.default_rng(7).integers(0, 60000, size=(19, 23, 31), dtype=np.uint16)


@pytest.fixture
def tiff(tmp_path, volume):
    p = tmp_path / "vol.tif"
    tifffile.imwrite(p, volume, imagej=True, resolution=(1 / 0.25, 1 / 0.25),
                     metadata={"spacing": 0.5, "unit": "um", "axes": "ZYX"})
    return p


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("convert", "info", "synth", "analyze", "demo"):
        assert cmd in r.stdout


def test_convert_then_info(tmp_path, tiff, volume):
    out = tmp_path / "vol.zarr"
    r = run("convert", tiff, out, "--chunks", "8", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "(19, 23, 31)" in r.stdout
    z = zarr.open(str(out), mode="r")
    assert z.chunks == (8, 8, 8)
    np.testing.assert_array_equal(z[...], volume)
    assert z.attrs["spacing"] == [0.5, 0.25, 0.25]
    r = run("info", out)
    assert r.returncode == 0, r.stderr
    assert "(19, 23, 31)" in r.stdout and "uint16" in r.stdout
    assert "(0.5, 0.25, 0.25) micrometer" in r.stdout
    assert "source: " in r.stdout and "vol.tif" in r.stdout


def test_convert_spacing_override(tmp_path, tiff):
    out = tmp_path / "o.zarr"
    r = run("convert", tiff, out, "--spacing", "2", "1", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    assert zarr.open(str(out), mode="r").attrs["spacing"] == [2.0, 1.0, 1.0]


def test_convert_hdf5_dataset(tmp_path, volume):
    p = tmp_path / "scan.h5"
    with h5py.File(p, "w") as f:
        f["entry/data/data"] = volume
        f["entry/dark"] = volume[:2]
    r = run("convert", p, tmp_path / "a.zarr", "--quiet")
    assert r.returncode == 2
    assert "--dataset" in r.stderr and "/entry/data/data" in r.stderr
    assert "Traceback" not in r.stderr
    r = run("convert", p, tmp_path / "b.zarr", "--dataset", "/entry/data/data", "--quiet")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(zarr.open(str(tmp_path / "b.zarr"), mode="r")[...], volume)
    r = run("convert", p, tmp_path / "c.zarr", "--dataset", "/entry/nothing", "--quiet")
    assert r.returncode == 2 and "no dataset '/entry/nothing'" in r.stderr


@pytest.mark.parametrize(
    "make, args, expect",
    [
        (None, ["convert", "missing.tif", "o.zarr"], "'missing.tif' does not exist"),
        (None, ["info", "missing.zarr"], "'missing.zarr' does not exist"),
        ("txt", ["convert", "notes.txt", "o.zarr"], "unsupported file type '.txt'"),
        ("complex", ["convert", "c.npy", "o.zarr"], "unsupported dtype complex128"),
        ("4d", ["convert", "v4.npy", "o.zarr"], "has 4 dimensions"),
        ("exists", ["convert", "v.npy", "exists.zarr"], "already exists"),
        (None, ["synth", "ph", "--states", "0"], "--states 0"),
    ],
)
def test_user_errors_are_one_line_no_traceback(tmp_path, make, args, expect):
    if make == "txt":
        (tmp_path / "notes.txt").write_text("hello")
    elif make == "complex":
        np.save(tmp_path / "c.npy", np.zeros((4, 4, 4), complex))
    elif make == "4d":
        np.save(tmp_path / "v4.npy", np.zeros((2, 3, 4, 5), np.uint8))
    elif make == "exists":
        np.save(tmp_path / "v.npy", np.zeros((4, 4, 4), np.uint8))
        (tmp_path / "exists.zarr").mkdir()
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert expect in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:")
    if make == "exists":  # nothing was overwritten
        assert list((tmp_path / "exists.zarr").iterdir()) == []


def test_verbose_shows_traceback(tmp_path):
    r = run("--verbose", "info", "missing.zarr", cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" in r.stderr and "error: input 'missing.zarr' does not exist" in r.stderr


def test_demo_writes_tables_and_figure(tmp_path):
    r = run("demo", "--out", tmp_path / "d", "--size", "64", "--workers", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    for name in ("particles_s0.parquet", "particles_s1.parquet", "radial_profiles.png"):
        assert (tmp_path / "d" / name).stat().st_size > 0
    assert "particles" in r.stdout and "dashboard" in r.stdout
    import pandas as pd

    t0 = pd.read_parquet(tmp_path / "d" / "particles_s0.parquet")
    t1 = pd.read_parquet(tmp_path / "d" / "particles_s1.parquet")
    assert len(t0) == len(t1) > 0
    assert (t0["label"].to_numpy() == t1["label"].to_numpy()).all()
    # a second run without --overwrite refuses and keeps the first outputs
    r = run("demo", "--out", tmp_path / "d", "--size", "64", "--workers", "1", "--quiet")
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr


def pd_read(path):
    from grapes_dask.output import read_table

    return read_table(path)


def test_analyze_command(tmp_path):
    from grapes_dask import synthetic

    ph = synthetic.make_phantom(tmp_path / "ph", shape=(40, 44, 36), seed=2, mean_radius=6.0, chunks=16)
    out = tmp_path / "t.csv"
    r = run("analyze", ph.grey[0], ph.labels[0], "--out", out, "--workers", "1", "--quiet",
            "--exclude-outer-layers", "1", "--spacing", "1", "0.5", "0.5")
    assert r.returncode == 0, r.stderr
    r = run("analyze", ph.grey[0], ph.labels[0], "--out", tmp_path / "filled.parquet", "--workers", "1", "--quiet",
            "--fill-holes", "--max-hole-size", "100")
    assert r.returncode == 0, r.stderr
    assert pd_read(tmp_path / "filled.parquet").attrs["grapes_dask"]["fill_holes"] is True
    assert "particles" in r.stdout and "Mvoxels/s" in r.stdout
    import pandas as pd

    labels = zarr.open(str(ph.labels[0]), mode="r")[...]
    t = pd.read_csv(out)
    assert sorted(t["label"]) == sorted(int(v) for v in np.unique(labels) if v)
    r = run("analyze", ph.grey[0], ph.labels[0], "--out", out, "--workers", "1", "--quiet")
    assert r.returncode == 2 and "already exists" in r.stderr
    np.save(tmp_path / "small.npy", np.zeros((4, 4, 4), np.uint8))
    r = run("analyze", tmp_path / "small.npy", ph.labels[0], "--out", tmp_path / "x.parquet", "--quiet")
    assert r.returncode == 2 and "same shape" in r.stderr and "Traceback" not in r.stderr
    r = run("analyze", ph.grey[0], ph.labels[0], "--out", tmp_path / "x.txt", "--quiet")
    assert r.returncode == 2 and ".parquet, .csv or .xlsx" in r.stderr


def test_level_option_of_convert_and_info(tmp_path):
    src = tmp_path / "ome.zarr"
    g = zarr.open_group(str(src), mode="w")
    levels = [np.arange(8000, dtype=np.uint16).reshape(20, 20, 20), np.arange(1000, dtype=np.uint16).reshape(10, 10, 10)]
    for i, a in enumerate(levels):
        g.create_array(str(i), shape=a.shape, dtype=a.dtype)[...] = a
    g.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": n, "type": "space"} for n in "zyx"], "datasets": [
        {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [s, s, s]}]}
        for i, s in enumerate((1.0, 2.0))]}]
    r = run("info", src, "--level", "1")
    assert r.returncode == 0 and "(10, 10, 10)" in r.stdout and "(2.0, 2.0, 2.0)" in r.stdout
    r = run("convert", src, tmp_path / "l1.zarr", "--level", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(zarr.open(str(tmp_path / "l1.zarr"), mode="r")[...], levels[1])
    r = run("info", src, "--level", "5")
    assert r.returncode == 2 and "choose level 0..1" in r.stderr
