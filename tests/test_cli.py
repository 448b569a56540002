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


def test_demo_tracks_the_series_and_writes_the_report(tmp_path):
    r = run("demo", "--out", tmp_path / "d", "--size", "64", "--workers", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    res = tmp_path / "d" / "results"
    for name in ("particles.parquet", "summary.csv", "z_tests.csv", "report.html", "figures/fig7b_state_deltas.png"):
        assert (res / name).stat().st_size > 0, name
    assert len(list((res / "tables").glob("*.parquet"))) == 4
    assert "dashboard" not in r.stdout + r.stderr  # --quiet: no link
    from grapes_dask.demo import STATES
    from grapes_dask.output import read_table

    long = read_table(res / "particles.parquet")
    assert list(long["state"].astype(str).unique()) == list(STATES)
    assert long.groupby("label").size().eq(len(STATES)).all()  # one row per (particle, state)
    # the segmentation error made on purpose: one label missing at 4.4 V, flagged with its reason
    lost = long[long["reason"].str.contains("inconsistent")]["label"].unique()
    assert len(lost) == 1
    assert np.isnan(long[(long["label"] == lost[0]) & (long["state"] == "4.4 V")]["roi_mean"]).all()
    assert "inconsistent" in r.stdout and "z-test" in r.stdout and "report.html" in r.stdout
    # a second run without --overwrite refuses and keeps the first outputs
    r = run("demo", "--out", tmp_path / "d", "--size", "64", "--workers", "1", "--quiet")
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert (res / "report.html").exists()


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
    assert "particles" in r.stdout and "kvoxels/s" in r.stdout
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
    assert r.returncode == 2 and "supported are .parquet, .csv, .xlsx" in r.stderr


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


# --------------------------------------------------------------------------------------------
# the command in its own words: options, errors, progress, interruption
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory):
    from grapes_dask import synthetic

    d = tmp_path_factory.mktemp("ph")
    return synthetic.make_phantom(d, shape=(40, 44, 36), seed=2, mean_radius=6.0, chunks=16)


def test_verbose_works_after_the_subcommand(tmp_path):
    for args in (["info", "missing.zarr", "--verbose"], ["info", "-v", "missing.zarr"]):
        r = run(*args, cwd=tmp_path)
        assert r.returncode == 2
        assert "Traceback" in r.stderr and "error: input 'missing.zarr' does not exist" in r.stderr


@pytest.mark.parametrize("args, expect", [
    (["--exclude-labels", "3,x"], "--exclude-labels '3,x': give label ids separated by commas"),
    (["--exclude-labels", "0"], "--exclude-labels"),
    (["--workers", "0"], "--workers 0: give at least one worker"),
    (["--max-hole-size", "10"], "--max-hole-size 10 has no effect without --fill-holes"),
    (["--fill-holes", "--max-hole-size", "0"], "--max-hole-size 0: give a whole number"),
    (["--layer-width", "0"], "--layer-width 0"),
    (["--region-size", "0"], "--region-size 0"),
    (["--exclude-outer-layers", "-1"], "--exclude-outer-layers -1"),
    (["--spacing", "1", "2"], "--spacing"),
    (["--scheduler", "nosuch.json"], "scheduler file 'nosuch.json' does not exist"),
    (["--memory-limit", "lots"], "--memory-limit lots: give a size such as 8GiB"),
    (["--dataset", "/grey"], "--grey-dataset and --labels-dataset"),
    (["--scheduler", "tcp://127.0.0.1:9", "--memory-limit", "4GiB"], "--memory-limit 4GiB sets the memory"),
])
def test_analyze_errors_speak_in_flags(tmp_path, small_phantom, args, expect):
    r = run("analyze", small_phantom.grey[0], small_phantom.labels[0], "--out", tmp_path / "t.parquet", "--quiet",
            *args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith("error:")
    for python_word in ("exclude_labels=", "layer_width=", "region_size=", "memory_limit", "overwrite=True",
                        "astype(", "max_hole_size="):
        assert python_word not in r.stderr, r.stderr
    assert not (tmp_path / "t.parquet").exists()


def test_missing_scheduler_file_fails_at_once(tmp_path, small_phantom):
    import time

    t0 = time.perf_counter()
    r = run("analyze", small_phantom.grey[0], small_phantom.labels[0], "--out", tmp_path / "t.parquet",
            "--scheduler", tmp_path / "sched.json")
    assert r.returncode == 2 and "does not exist" in r.stderr and "sched.json" in r.stderr
    assert time.perf_counter() - t0 < 30  # dask alone waits for the file to appear
    assert "dashboard" not in r.stderr  # the link comes only after the inputs are checked


def test_unreachable_scheduler_is_a_user_error(tmp_path, small_phantom):
    r = run("analyze", small_phantom.grey[0], small_phantom.labels[0], "--out", tmp_path / "t.parquet", "--quiet",
            "--scheduler", "tcp://127.0.0.1:9")
    assert r.returncode == 2, r.stderr
    assert "cannot reach the dask scheduler 'tcp://127.0.0.1:9'" in r.stderr and "leave out --scheduler" in r.stderr


def test_input_errors_come_before_the_dashboard_link(tmp_path, small_phantom):
    r = run("analyze", tmp_path / "missing.zarr", small_phantom.labels[0], "--out", tmp_path / "t.parquet")
    assert r.returncode == 2 and "missing.zarr" in r.stderr
    assert "dashboard" not in r.stderr and "Traceback" not in r.stderr


def test_small_demo_size_is_refused(tmp_path):
    r = run("demo", "--out", tmp_path / "d", "--size", "20", "--quiet")
    assert r.returncode == 2 and "--size 20: give at least 64 voxels" in r.stderr


def test_spelling_and_spacing_forms(tmp_path, small_phantom):
    g, lab = small_phantom.grey[0], small_phantom.labels[0]
    r = run("analyze", g, lab, "--out", tmp_path / "a.parquet", "--quiet", "--start-at", "centre",
            "--normalize", "surface", "--spacing", "0.5")
    assert r.returncode == 0, r.stderr
    params = pd_read(tmp_path / "a.parquet").attrs["grapes_dask"]
    assert params["start_at"] == "center" and params["normalise"] == "surface"
    assert params["spacing"] == [0.5, 0.5, 0.5]
    r = run("analyze", g, lab, "--spacing", "1", "0.8", "0.8", "--out", tmp_path / "b.parquet", "--quiet")
    assert r.returncode == 0, r.stderr
    assert pd_read(tmp_path / "b.parquet").attrs["grapes_dask"]["spacing"] == [1.0, 0.8, 0.8]


def test_2d_image_spacing_two_values_and_pixel_summary(tmp_path):
    from grapes_dask import synthetic

    ph = synthetic.make_phantom(tmp_path / "ph2", shape=(120, 130), seed=1, mean_radius=8.0, chunks=64)
    r = run("analyze", ph.grey[0], ph.labels[0], "--out", tmp_path / "t.csv", "--quiet", "--spacing", "0.5", "0.25")
    assert r.returncode == 0, r.stderr
    assert "kpixels" in r.stdout and "Mvoxels" not in r.stdout and "0.0 M" not in r.stdout
    import pandas as pd

    t = pd.read_csv(tmp_path / "t.csv")
    assert {"area", "perimeter", "equivalent_diameter_area", "circularity"} <= set(t.columns)
    assert "volume" not in t.columns and "surface_area" not in t.columns
    np.testing.assert_allclose(t["area"], t["voxel_count"] * 0.125)


def test_every_analyze_option_reaches_the_engine(tmp_path, small_phantom, monkeypatch):
    """Each option of `analyze` arrives at analyze_tables (and the cluster) with its value."""
    import contextlib

    from click.testing import CliRunner

    import grapes_dask.cluster
    import grapes_dask.table
    from grapes_dask.cli import cli

    seen = {}

    def fake_analyze_tables(grey, labels, **kw):
        seen["engine"] = kw
        raise KeyboardInterrupt  # stop before any compute

    @contextlib.contextmanager
    def fake_cluster(scheduler=None, **kw):
        seen["cluster"] = dict(scheduler=scheduler, **kw)
        yield None

    monkeypatch.setattr(grapes_dask.table, "analyze_tables", fake_analyze_tables)
    monkeypatch.setattr(grapes_dask.cluster, "cluster_client", fake_cluster)
    args = ["analyze", str(small_phantom.grey[0]), str(small_phantom.labels[0]), "--out", str(tmp_path / "t.parquet"),
            "--spacing", "2", "1", "1", "--chunks", "8", "--workers", "3", "--memory-limit", "3GiB",
            "--layer-width", "1.5", "--start-at", "center", "--normalise", "surface", "--exclude-outer-layers", "2",
            "--exclude-labels", "4,9", "--no-black-border", "--fill-holes", "--max-hole-size", "12",
            "--region-size", "24", "--no-check-labels", "--quiet"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 130, r.output
    kw = seen["engine"]
    assert kw["spacing"] == (2.0, 1.0, 1.0) and kw["chunks"] == 8 and kw["layer_width"] == 1.5
    assert kw["start_at"] == "center" and kw["normalise"] == "surface" and kw["exclude_outer_layers"] == 2
    assert kw["exclude_labels"] == [4, 9] and kw["black_border"] is False
    assert kw["fill_holes"] is True and kw["max_hole_size"] == 12 and kw["region_size"] == 24
    assert kw["check_labels"] is False and kw["progress"] is False
    # --quiet shows no dashboard link, so the local cluster serves none
    assert seen["cluster"] == {"scheduler": None, "workers": 3, "memory_limit": "3GiB", "dashboard": False}
    # the defaults
    r = CliRunner().invoke(cli, args[:5])
    kw = seen["engine"]
    assert kw["spacing"] is None and kw["chunks"] is None and kw["layer_width"] is None
    assert kw["start_at"] == "edge" and kw["normalise"] == "radial_max" and kw["exclude_outer_layers"] == 0
    assert kw["exclude_labels"] is None and kw["black_border"] is True and kw["fill_holes"] is False
    assert kw["max_hole_size"] is None and kw["region_size"] == 400 and kw["check_labels"] is True
    assert kw["progress"] is True
    assert seen["cluster"] == {"scheduler": None, "workers": None, "memory_limit": "auto", "dashboard": True}


def test_progress_goes_to_stderr_as_plain_lines(tmp_path, small_phantom):
    r = run("analyze", small_phantom.grey[0], small_phantom.labels[0], "--out", tmp_path / "t.parquet")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("wrote ")  # only the closing line
    assert "\r" not in r.stderr and "pass 1 (statistics):" in r.stderr and "pass 2 (radial layers):" in r.stderr
    assert "done in" in r.stderr and "dask dashboard: http://127.0.0.1:" in r.stderr
    assert "inputs: 40x44x36 voxels" in r.stderr


def test_ctrl_c_exits_130_without_tracebacks(tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C, while the tasks run."""
    import signal
    import time

    from grapes_dask import synthetic

    ph = synthetic.make_phantom(tmp_path / "ph", shape=(160, 160, 160), seed=3, mean_radius=8.0, chunks=40)
    for workers in ("1", "2"):
        err_path = tmp_path / f"err{workers}.txt"
        with open(err_path, "w") as err:
            p = subprocess.Popen(EXE + ["analyze", str(ph.grey[0]), str(ph.labels[0]), "--out",
                                        str(tmp_path / f"t{workers}.parquet"), "--workers", workers, "--region-size", "40"],
                                 stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"},
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            deadline = time.time() + 120
            while "pass 1 (statistics)" not in err_path.read_text() and time.time() < deadline and p.poll() is None:
                time.sleep(0.05)
            assert p.poll() is None, "finished before it could be interrupted"
            os.killpg(p.pid, signal.SIGINT)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                raise AssertionError("hung after Ctrl-C")
        text = err_path.read_text()
        assert p.returncode == 130, text
        assert text.rstrip().endswith("interrupted: no output was left half-written"), text
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
        assert not (tmp_path / f"t{workers}.parquet").exists()


def test_each_input_names_its_own_dataset_and_keeps_the_voxel_size(tmp_path, small_phantom):
    grey, labels = (np.asarray(a) for a in small_phantom.open(state=0))
    p = tmp_path / "v.h5"
    with h5py.File(p, "w") as f:
        f["grey"] = grey
        f["labels"] = labels
        f["grey"].attrs["element_size_um"] = [0.7, 0.7, 0.7]
        f["labels"].attrs["element_size_um"] = [0.7, 0.7, 0.7]
    # before: --dataset applied to both and the grey volume was analysed as its own labels
    r = run("analyze", p, p, "--out", tmp_path / "a.parquet", "--grey-dataset", "/grey", "--labels-dataset",
            "/labels")
    assert r.returncode == 0, r.stderr
    assert "voxel size 0.7 µm (labels: HDF5 attribute" in r.stderr
    t = pd_read(tmp_path / "a.parquet")
    assert len(t) == len(np.unique(labels)) - 1
    assert t.attrs["grapes_dask"]["spacing"] == [0.7, 0.7, 0.7]
    assert "HDF5" in t.attrs["grapes_dask"]["spacing_source"]
    r = run("analyze", f"{p}::/grey", f"{p}::/labels", "--out", tmp_path / "b.parquet", "--quiet")
    assert r.returncode == 0, r.stderr
    assert pd_read(tmp_path / "b.parquet").equals(t)
    r = run("analyze", f"{p}::/grey", p, "--labels-dataset", "/grey", "--out", tmp_path / "c.parquet", "--quiet")
    assert r.returncode == 2 and "same array" in r.stderr, r.stderr
    r = run("analyze", p, f"{p}::/labels", "--out", tmp_path / "c.parquet", "--quiet")
    assert r.returncode == 2 and "choose one with --grey-dataset" in r.stderr, r.stderr


def test_voxel_sizes_that_disagree_stop_unless_spacing_settles_it(tmp_path, small_phantom):
    grey, labels = (np.asarray(a) for a in small_phantom.open(state=0))
    tifffile.imwrite(tmp_path / "g.tif", grey, imagej=True, resolution=(2.0, 2.0),
                     metadata={"spacing": 0.5, "unit": "um", "axes": "ZYX"})
    tifffile.imwrite(tmp_path / "l.tif", labels, resolution=(72, 72))  # a print resolution: no voxel size
    r = run("analyze", tmp_path / "g.tif", tmp_path / "l.tif", "--out", tmp_path / "a.parquet")
    assert r.returncode == 0, r.stderr
    assert "voxel size 0.5 µm (grey: ImageJ" in r.stderr  # not 352.8 um from the 72 dpi tag
    tifffile.imwrite(tmp_path / "l2.tif", labels, imagej=True, resolution=(1.0, 1.0),
                     metadata={"spacing": 1.0, "unit": "um", "axes": "ZYX"})
    r = run("analyze", tmp_path / "g.tif", tmp_path / "l2.tif", "--out", tmp_path / "b.parquet", "--quiet")
    assert r.returncode == 2 and "--spacing" in r.stderr and "0.5" in r.stderr and "1.0" in r.stderr, r.stderr
    assert "spacing=" not in r.stderr
    r = run("analyze", tmp_path / "g.tif", tmp_path / "l2.tif", "--out", tmp_path / "b.parquet", "--quiet",
            "--spacing", "0.5")
    assert r.returncode == 0, r.stderr


def test_convert_refuses_an_output_that_is_not_zarr(tmp_path, tiff):
    r = run("convert", tiff, tmp_path / "g.h5", "--quiet")
    assert r.returncode == 2 and "g.zarr" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "g.h5").exists()


def test_readme_and_help_list_the_same_options():
    """The README's command-line synopsis and each command's --help name the same options."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Command line", 1)[1].split("```", 2)[1]
    synopsis, cmd, shared = {}, None, set()
    for line in block.splitlines():
        m = re.match(r"grapes-dask (\w+)", line.strip())
        if line.startswith("CLUSTER OPTIONS"):
            cmd = None
        cmd = m.group(1) if m else cmd
        opts = set(re.findall(r"--[a-z][a-z-]+", line))
        if cmd:
            synopsis.setdefault(cmd, set()).update(opts)
        elif m is None and line.strip():
            shared |= opts  # the CLUSTER OPTIONS paragraph
    for cmd in ("register", "denoise", "segment"):
        assert "CLUSTER OPTIONS" in block.split(f"grapes-dask {cmd} ", 1)[1].split("grapes-dask", 1)[0]
        synopsis[cmd] |= shared
    assert set(synopsis) == {"demo", "analyze", "operando", "report", "register", "denoise", "segment", "convert",
                             "synth", "info"}
    for cmd, opts in synopsis.items():
        r = run(cmd, "--help")
        assert r.returncode == 0
        shown = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", r.stdout)) - {"--help", "--verbose", "--normalize"}
        assert opts == shown, (cmd, "README only:", opts - shown, "--help only:", shown - opts)
    r = run("analyze", "--help")
    assert "default: cores" not in r.stdout and "thread per core" in r.stdout
    assert "centre" in r.stdout and "--normalize" in r.stdout
