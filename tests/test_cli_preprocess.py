"""``grapes-dask register``, ``segment`` and ``operando --segment``, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi

from grapes_dask.synthetic import make_phantom, phantom_numpy

EXE = [sys.executable, "-m", "grapes_dask"]


def run(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(EXE + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def grey_zarr(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_pre")
    grey, lab, _ = phantom_numpy((64, 64, 64), seed=2, mean_radius=7, blur_sigma=1.0, noise_sigma=6)
    zarr.create_array(str(d / "grey.zarr"), data=grey, chunks=(32, 32, 32))
    return d, grey, lab


def test_segment_command(grey_zarr):
    d, grey, lab = grey_zarr
    out = d / "seg.zarr"
    r = run("segment", d / "grey.zarr", out, "--chunks", "40", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out}: ") and " particles (threshold " in r.stdout
    z = zarr.open_array(str(out))
    meta = z.attrs["grapes_dask"]
    assert f"{meta['n_particles']} particles" in r.stdout
    assert set(meta["seconds"]) == {"threshold", "mask", "distance", "basins", "merge", "labels"}
    assert z.shape == grey.shape and z.dtype == np.uint32
    assert not r.stderr.strip()  # --quiet: no progress, no link
    # seeded by its own labels: every particle keeps its id
    out2 = d / "seg2.zarr"
    r = run("segment", d / "grey.zarr", out2, "--seeds", out, "--quiet")
    assert r.returncode == 0, r.stderr
    a, b = z[...], zarr.open_array(str(out2))[...]
    ids = np.unique(a[a > 0])
    same = sum(np.bincount(b[a == i]).argmax() == i for i in ids)
    assert same == ids.size


def test_segment_errors_are_one_line(grey_zarr):
    d, grey, _ = grey_zarr
    r = run("segment", d / "grey.zarr", d / "x.zarr", "--threshold", "255", "--quiet")
    assert r.returncode == 2 and r.stderr.startswith("error: no voxel") and "Traceback" not in r.stderr
    assert "--threshold 255" in r.stderr
    zarr.save_array(str(d / "small.zarr"), np.zeros((10, 10, 10), np.uint16))
    r = run("segment", d / "grey.zarr", d / "x.zarr", "--seeds", d / "small.zarr", "--quiet")
    assert r.returncode == 2 and "shape" in r.stderr and "Traceback" not in r.stderr
    assert not (d / "x.zarr").exists()


def test_register_command_recovers_a_shift(grey_zarr, tmp_path):
    d, grey, _ = grey_zarr
    moving = ndi.shift(grey.astype(np.float32), (1.5, -2.25, 0.75), order=1, mode="nearest")
    zarr.create_array(str(tmp_path / "m.zarr"), data=moving, chunks=(32, 32, 32))
    out, tj = tmp_path / "r.zarr", tmp_path / "t.json"
    r = run("register", d / "grey.zarr", tmp_path / "m.zarr", out, "--save-transform", tj, "--quiet")
    assert r.returncode == 0, r.stderr
    shift = json.loads(tj.read_text())
    got = np.array([float(v) for v in r.stdout.split("shift at the centre (")[1].split(")")[0].split(",")])
    np.testing.assert_allclose(got, [1.5, -2.25, 0.75], atol=0.5)
    assert shift["method"] == "translation"
    reg = zarr.open_array(str(out))[...]
    inner = (slice(8, -8),) * 3
    assert np.abs(reg[inner] - grey[inner]).mean() < np.abs(moving[inner] - grey[inner]).mean() / 2
    # the same transform applied again, from the file
    r = run("register", d / "grey.zarr", tmp_path / "m.zarr", tmp_path / "r2.zarr", "--transform", tj, "--quiet")
    assert r.returncode == 0 and "loaded from" in r.stdout
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "r2.zarr"))[...], reg)


def test_operando_segment_chain(tmp_path):
    ph = make_phantom(tmp_path / "ph", shape=(64, 64, 64), n_states=2, seed=4, mean_radius=7, drift=1.5,
                      blur_sigma=1.0, noise_sigma=6, chunks=32)
    grey = [p for p in ph.paths() if p.name.startswith("grey")]
    out = tmp_path / "out"
    r = run("operando", "--segment", "--state", f"a={grey[0]}", "--state", f"b={grey[1]}", "--out", out,
            "--drop-smallest", "0", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "tracked" in r.stdout and (out / "report.html").exists()
    prep = tmp_path / "out.prep"
    la = zarr.open_array(str(prep / "a" / "labels.zarr"))[...]
    lb = zarr.open_array(str(prep / "b" / "labels.zarr"))[...]
    assert (prep / "b" / "transform.json").exists() and (prep / "b" / "grey.zarr").exists()
    ids = np.unique(la[la > 0])
    kept = sum(lb[la == i].size and np.bincount(lb[la == i]).argmax() == i for i in ids)
    assert kept / ids.size >= 0.95
    # the recovered drift is the phantom's
    t = json.loads((prep / "b" / "transform.json").read_text())
    drift = np.asarray(ph.truth.attrs["drift"][1])
    assert np.abs(np.asarray(t["offset"]) - drift).max() < 0.5
    # options that only make sense with --segment are refused without it
    r = run("operando", "--state", f"a={grey[0]}", "--state", f"b={grey[1]}", "--out", tmp_path / "o2",
            "--denoise", "nlm")
    assert r.returncode == 2 and "--segment" in r.stderr


def test_denoise_command(grey_zarr):
    d, grey, _ = grey_zarr
    out = d / "g.zarr"
    r = run("denoise", d / "grey.zarr", out, "--method", "gaussian", "--sigma", "1.5", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out}: gaussian")
    ref = np.clip(np.rint(ndi.gaussian_filter(grey.astype(np.float32), 1.5)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(zarr.open_array(str(out))[...], ref)
    r = run("denoise", d / "grey.zarr", d / "m.zarr", "--method", "median", "--h", "3", "--quiet")
    assert r.returncode == 2 and "--h 3.0 is not an option of --method median" in r.stderr
