"""The embedded cluster and its dashboard, and scheduler addresses (grapes_dask.cluster)."""

import json
import time
import urllib.request

import pytest

from grapes_dask import GrapesInputError
from grapes_dask.cluster import check_scheduler, cluster_client, dashboard_link


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read().decode("utf-8", "replace")


@pytest.mark.parametrize("workers", [None, 2])
def test_dashboard_link_serves_the_status_page(workers):
    with cluster_client(workers=workers) as client:
        link = dashboard_link(client)
        assert link.startswith("http://127.0.0.1:") and link.endswith("/status")
        status, page = _get(link)
        assert status == 200
        assert "bokeh" in page.lower() and "needs bokeh" not in page.lower()
        # the task stream and progress plots are served too
        base = link.rsplit("/", 1)[0]
        for path in ("/individual-task-stream", "/individual-progress"):
            assert _get(base + path)[0] == 200
        n_threads = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
        assert n_threads >= 1
        assert len(client.scheduler_info()["workers"]) == (workers or 1)


def test_scheduler_file_checked_at_once(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(GrapesInputError, match="scheduler file .*missing.json' does not exist"):
        check_scheduler(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(GrapesInputError, match="cannot be read as JSON"):
        check_scheduler(str(bad))
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"type": "Scheduler"}))
    with pytest.raises(GrapesInputError, match="holds no 'address'"):
        check_scheduler(str(empty))
    with pytest.raises(GrapesInputError, match="does not exist"):
        with cluster_client(str(tmp_path / "missing.json")):
            pass
    assert time.perf_counter() - t0 < 5
    check_scheduler("tcp://127.0.0.1:8786")  # an address is reached later, with a timeout
    check_scheduler("localhost:8786")


def test_workers_must_be_positive():
    with pytest.raises(GrapesInputError, match="workers=0: give at least one worker"):
        with cluster_client(workers=0):
            pass


def test_relative_paths_on_a_worker_in_another_folder(tmp_path):
    """A real ``dask scheduler`` and ``dask worker`` started in other folders, inputs given as
    relative paths (TIFF, folder of slices, HDF5 with its dataset, .npy): same table as locally."""
    import os
    import subprocess
    import sys

    import h5py
    import numpy as np
    import pandas as pd
    import tifffile

    from grapes_dask import analyze, synthetic

    ph = synthetic.make_phantom(tmp_path / "ph", shape=(36, 40, 44), seed=4, mean_radius=6.0, chunks=16)
    grey, labels = (np.asarray(a) for a in ph.open(state=0))
    data = tmp_path / "data"
    (data / "slices").mkdir(parents=True)
    tifffile.imwrite(data / "grey.tif", grey)
    tifffile.imwrite(data / "labels.tif", labels)
    for i, sl in enumerate(labels):
        tifffile.imwrite(data / "slices" / f"l_{i:03d}.tif", sl)
    with h5py.File(data / "scan.h5", "w") as f:
        f["grey"] = grey
        f["labels"] = labels
    np.save(data / "labels.npy", labels)
    expected = analyze(grey, labels)

    for d in ("sched", "worker"):
        (tmp_path / d).mkdir()
    sched_file = tmp_path / "sched" / "scheduler.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    bindir = os.path.dirname(sys.executable)
    dask_cmd = [os.path.join(bindir, "dask")] if os.path.exists(os.path.join(bindir, "dask")) else \
        [sys.executable, "-m", "distributed.cli.dask_spec"]
    procs = [subprocess.Popen(dask_cmd + ["scheduler", "--scheduler-file", str(sched_file), "--port", "0",
                                          "--host", "127.0.0.1", "--no-dashboard"],
                              cwd=tmp_path / "sched", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        procs.append(subprocess.Popen(dask_cmd + ["worker", "--scheduler-file", str(sched_file), "--nthreads", "2",
                                                  "--no-dashboard", "--host", "127.0.0.1"],
                                      cwd=tmp_path / "worker", env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        cases = {
            "tiff": ["grey.tif", "labels.tif"],
            "slices": ["grey.tif", "slices"],
            "hdf5": ["scan.h5::/grey", "scan.h5::/labels"],
            "npy": ["grey.tif", "labels.npy"],
        }
        for name, (g, lab) in cases.items():
            out = f"{name}.parquet"
            r = subprocess.run([sys.executable, "-m", "grapes_dask", "analyze", g, lab, "--out", out, "--quiet",
                                "--scheduler", os.path.relpath(sched_file, data)],
                               cwd=data, env=env, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, (name, r.stderr)
            got = pd.read_parquet(data / out)
            np.testing.assert_array_equal(got["label"], expected["label"])
            np.testing.assert_array_equal(got["voxel_count"], expected["voxel_count"])
            np.testing.assert_allclose(got["roi_mean"], expected["roi_mean"], rtol=1e-12)
            for a, b in zip(got["radial_layers_count"], expected["radial_layers_count"]):
                np.testing.assert_array_equal(a, b)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
