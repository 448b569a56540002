"""Faults named: damaged input chunks and workers that die, as a user meets them.

A damaged chunk (garbage bytes, a truncated or empty file, a folder, the wrong size after
decoding) stops the run with a GrapesDataError that names the array as given, the chunk index
and the file, through the API (threaded scheduler and a distributed cluster) and the command
line. A task that kills its worker is rerun by the nanny; one that kills it every time ends in
one GrapesWorkerError naming the task and the settings to change.
"""

import os
import pickle
import shutil
import subprocess
import sys

import dask
import h5py
import numpy as np
import pytest
import zarr

import grapes_dask
from grapes_dask import GrapesDataError, GrapesInputError, GrapesWorkerError
from grapes_dask._errors import Alt
from grapes_dask.io import write_zarr
from grapes_dask.synthetic import phantom_numpy

SHAPE, CHUNK = (32, 32, 32), 16
BAD = (1, 0, 1)  # the chunk damaged in these tests


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """grey.zarr and labels.zarr of a small phantom, 2x2x2 chunks of 16^3, as `synth` writes them."""
    root = tmp_path_factory.mktemp("pristine")
    grey, labels, _ = phantom_numpy(SHAPE, seed=3, mean_radius=6)
    write_zarr(dask.array.from_array(grey, chunks=CHUNK), root / "grey.zarr", chunks=CHUNK)
    write_zarr(dask.array.from_array(labels, chunks=CHUNK), root / "labels.zarr", chunks=CHUNK)
    assert len(np.unique(labels)) > 3
    return root


@pytest.fixture
def store(pristine, tmp_path):
    """A fresh copy of the pristine stores, to damage."""
    out = tmp_path / "OUT"
    shutil.copytree(pristine, out)
    return out


def chunk_file(array_dir, idx=BAD):
    return os.path.join(str(array_dir), "c", *map(str, idx))


def damage(path, how):
    """Damage one chunk file: garbage bytes, its first half, zero bytes, or a folder in its place."""
    raw = open(path, "rb").read()
    if how == "folder":
        os.remove(path)
        os.mkdir(path)
        return
    data = {"garbage": np.random.default_rng(0).bytes(100), "truncated": raw[: len(raw) // 2], "empty": b""}[how]
    with open(path, "wb") as f:
        f.write(data)


def assert_names_chunk(err, name, path, idx=BAD):
    msg = str(err)
    assert isinstance(err, GrapesDataError) and isinstance(err, GrapesInputError)
    assert err.array == name and err.chunk == idx and err.path == os.path.abspath(path)
    assert repr(name) in msg and str(idx) in msg and os.path.abspath(path) in msg
    cli = err.render("cli")
    assert "grapes-dask convert SOURCE" in cli and f"grapes-dask info --check {name}" in cli
    assert "grapes_dask.io.convert(SOURCE" in msg


# ------------------------------------------------------------------------------------------
# damaged chunks through the API
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["labels", "grey"])
@pytest.mark.parametrize("how", ["garbage", "truncated", "empty", "folder"])
def test_damaged_chunk_named_by_analyze(store, which, how, monkeypatch):
    monkeypatch.chdir(store.parent)  # names as a user types them: relative paths
    grey, labels = "OUT/grey.zarr", "OUT/labels.zarr"
    name = {"grey": grey, "labels": labels}[which]
    path = chunk_file(store / f"{which}.zarr")
    damage(path, how)
    with dask.config.set(scheduler="threads"), pytest.raises(GrapesDataError) as info:
        grapes_dask.analyze(grey, labels)
    assert_names_chunk(info.value, name, path)
    expected = {"garbage": "(100 bytes) does not decode as blosc", "truncated": "does not decode as blosc",
                "empty": "is empty (0 bytes)", "folder": "cannot be read"}[how]
    assert expected in str(info.value)
    assert ("is unreadable" in str(info.value)) == (how == "folder")


def test_wrong_size_after_decoding(store):
    """A chunk file that decodes, but to another chunk's size (a file from another array)."""
    from numcodecs import Blosc

    path = chunk_file(store / "labels.zarr")
    with open(path, "wb") as f:
        f.write(Blosc().encode(np.zeros((8, 16, 16), np.uint16).tobytes()))
    with pytest.raises(GrapesDataError) as info:
        grapes_dask.analyze(str(store / "grey.zarr"), str(store / "labels.zarr"))
    assert_names_chunk(info.value, str(store / "labels.zarr"), path)
    assert "decodes to 4096 bytes, not the 8192 of a (16, 16, 16) chunk of uint16" in str(info.value)


def test_missing_chunk_is_the_fill_value_not_an_error(store):
    """Zarr's own rule: a chunk without a file holds the fill value (not damage)."""
    os.remove(chunk_file(store / "grey.zarr"))
    z = zarr.open(str(store / "grey.zarr"), mode="r")
    vol = grapes_dask.resolve_volume(str(store / "grey.zarr"))
    np.testing.assert_array_equal(vol.reader[:, :, :], z[...])
    assert (vol.reader[16:32, 0:16, 16:32] == z.metadata.fill_value).all()


def test_same_error_from_a_distributed_cluster(store):
    """Raised in a task on a worker, pickled, re-raised by the client: same type, fields, words."""
    from distributed import Client, LocalCluster

    damage(chunk_file(store / "labels.zarr"), "garbage")
    args = (str(store / "grey.zarr"), str(store / "labels.zarr"))
    with dask.config.set(scheduler="threads"), pytest.raises(GrapesDataError) as local:
        grapes_dask.analyze(*args)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client, pytest.raises(GrapesDataError) as remote:
        grapes_dask.analyze(*args, client=client)
    a, b = local.value, remote.value
    assert type(a) is type(b)
    assert (str(a), a.render("cli"), a.array, a.chunk, a.path) == (str(b), b.render("cli"), b.array, b.chunk, b.path)


def test_errors_pickle_whole():
    """Custom fields and the CLI wording survive pickling (a worker process sends them so)."""
    errs = [
        GrapesInputError("give {exclude_labels} or {fix}", exclude_labels=[3], fix=Alt("api words", "cli words")),
        GrapesDataError("chunk (1, 0, 1) of 'a.zarr' is damaged; {check}", array="a.zarr", chunk=(1, 0, 1),
                        path="/x/a.zarr/c/1/0/1", detail="is empty (0 bytes)",
                        check=Alt("check_chunks('a.zarr')", "grapes-dask info --check a.zarr")),
        GrapesWorkerError("pass 2 region died; use {region_size}", task="_pass2_task-abc", region_size=None),
    ]
    for e in errs:
        f = pickle.loads(pickle.dumps(e))
        assert type(f) is type(e) and str(f) == str(e) and f.render("cli") == e.render("cli")
        assert f.__dict__ == e.__dict__
    assert "--region-size" in errs[2].render("cli") and "--exclude-labels 3" in errs[0].render("cli")


# ------------------------------------------------------------------------------------------
# other layouts: through zarr-python (v2, sharded), HDF5, TIFF slices
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vol16():
    return np.arange(np.prod(SHAPE), dtype=np.uint16).reshape(SHAPE)


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
def test_zarr_v2_damaged_chunk(tmp_path, vol16, how):
    z = zarr.create_array(str(tmp_path / "v2.zarr"), shape=SHAPE, chunks=(CHUNK,) * 3, dtype=vol16.dtype,
                          zarr_format=2)
    z[:] = vol16
    path = tmp_path / "v2.zarr" / "1.0.1"
    damage(path, how)
    vol = grapes_dask.resolve_volume(str(tmp_path / "v2.zarr"))
    assert type(vol.reader).__name__ == "_ZarrReader"  # not the direct reader
    np.testing.assert_array_equal(vol.reader[0:16, 0:32, 0:16], vol16[0:16, 0:32, 0:16])  # good chunks read
    with pytest.raises(GrapesDataError) as info:
        vol.reader[8:32, 0:16, 8:32]
    assert_names_chunk(info.value, str(tmp_path / "v2.zarr"), path)
    with pytest.raises(GrapesDataError) as info:  # the dask array of open_volume names it too
        vol.array[16:32].compute(scheduler="sync")
    assert info.value.chunk == BAD


@pytest.mark.parametrize("how", ["garbage", "empty"])
def test_sharded_zarr_damaged_shard(tmp_path, vol16, how):
    """Chunks of 8^3 in shards of 16^3: the chunk index is the chunk's, the file the shard's.
    An empty shard file is damage too (zarr alone reads it as the fill value)."""
    z = zarr.create_array(str(tmp_path / "s.zarr"), shape=SHAPE, chunks=(8,) * 3, shards=(16,) * 3,
                          dtype=vol16.dtype)
    z[:] = vol16
    path = chunk_file(tmp_path / "s.zarr")
    damage(path, how)
    vol = grapes_dask.resolve_volume(str(tmp_path / "s.zarr"))
    with pytest.raises(GrapesDataError) as info:
        vol.reader[:, :, :]
    err = info.value
    assert err.path == path and str(tmp_path / "s.zarr") in str(err)
    if how == "empty":
        assert err.chunk == BAD and "shard (1, 0, 1)" in str(err) and "is empty (0 bytes)" in str(err)
    else:  # the first 8^3 chunk of shard (1, 0, 1)
        assert err.chunk == (2, 0, 2) and "shard (1, 0, 1)" in str(err)


def test_hdf5_damaged_chunk(tmp_path, vol16):
    p = tmp_path / "scan.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("data", data=vol16, chunks=(CHUNK,) * 3, compression="gzip")
    with h5py.File(p, "r") as f:  # where chunk (1, 0, 1) is stored
        info = f["data"].id.get_chunk_info_by_coord((16, 0, 16))
    vol = grapes_dask.resolve_volume(str(p))
    with open(p, "r+b") as f:
        f.seek(info.byte_offset)
        f.write(np.random.default_rng(1).bytes(info.size))
    np.testing.assert_array_equal(vol.reader[0:16], vol16[0:16])
    with pytest.raises(GrapesDataError) as err:
        vol.reader[16:32, 0:32, 0:32]
    e = err.value
    assert e.array == f"{p}::/data" and e.chunk == BAD and e.path == str(p)
    assert str(p) in str(e) and "(1, 0, 1)" in str(e) and "export it again" in str(e)


def test_tiff_slice_damaged_after_opening(tmp_path, vol16):
    import tifffile

    for z in range(4):
        tifffile.imwrite(tmp_path / f"s{z:02d}.tif", vol16[z])
    vol = grapes_dask.resolve_volume(str(tmp_path / "s*.tif"))
    with open(tmp_path / "s02.tif", "wb") as f:
        f.write(b"garbage" * 10)
    with pytest.raises(GrapesDataError) as err:
        vol.reader[0:4, 0:8, 0:8]
    e = err.value
    assert e.path == str(tmp_path / "s02.tif") and "slice 2 of" in str(e) and str(tmp_path / "s*.tif") in str(e)


# ------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------


def run(*args, cwd=None, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "grapes_dask", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@pytest.mark.parametrize("which", ["labels", "grey"])
def test_cli_names_the_damaged_chunk(store, which):
    path = chunk_file(store / f"{which}.zarr")
    damage(path, "garbage")
    r = run("analyze", "OUT/grey.zarr", "OUT/labels.zarr", "--out", "t.parquet", "--quiet", cwd=store.parent)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert f"chunk {BAD} of 'OUT/{which}.zarr' is damaged" in line and path in line
    assert f"grapes-dask convert SOURCE OUT/{which}.zarr --overwrite" in line
    assert not (store.parent / "t.parquet").exists()


def test_cli_info_check_lists_every_damaged_chunk(store):
    damage(chunk_file(store / "labels.zarr"), "garbage")
    damage(chunk_file(store / "labels.zarr", (0, 0, 0)), "empty")
    r = run("info", "--check", "--quiet", store / "labels.zarr")
    assert r.returncode == 2
    assert "checked 8 chunks" in r.stdout and "2 damaged" in r.stdout
    assert f"chunk (0, 0, 0): {chunk_file(store / 'labels.zarr', (0, 0, 0))} is empty (0 bytes)" in r.stdout
    assert f"chunk {BAD}: {chunk_file(store / 'labels.zarr')} (100 bytes) does not decode" in r.stdout
    assert "2 of the 8 chunks" in r.stderr
    r = run("info", "--check", "--quiet", store / "grey.zarr")
    assert r.returncode == 0 and "checked 8 chunks" in r.stdout and "all readable" in r.stdout


def test_check_chunks_api(store):
    from grapes_dask.io import check_chunks

    damage(chunk_file(store / "grey.zarr"), "truncated")
    n, damaged = check_chunks(str(store / "grey.zarr"), threads=2)
    assert n == 8 and [(e.chunk, e.path) for e in damaged] == [(BAD, chunk_file(store / "grey.zarr"))]


# ------------------------------------------------------------------------------------------
# workers that die
# ------------------------------------------------------------------------------------------


def _exit_in_workers(monkeypatch, marker=None):
    """Replace pass 2's task by one that kills the worker process running it: always, or (with
    `marker`) only the first time any worker runs one. The client process itself never exits.
    Defined here, so the task is pickled by value and reaches the worker processes."""
    from grapes_dask import table

    parent, real = os.getpid(), table._pass2_task

    def _pass2_task(*args):
        if os.getpid() != parent:
            if marker is None:
                os._exit(1)
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
                os._exit(1)  # the first one only
            except FileExistsError:
                pass
        return real(*args)

    monkeypatch.setattr(table, "_pass2_task", _pass2_task)


@pytest.fixture
def process_cluster():
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="2GiB",
                          dashboard_address=None) as cluster, Client(cluster) as client:
            yield client


def test_damaged_chunk_from_a_worker_process(store, process_cluster):
    """Pickled across processes (the worker's exception travels to the client)."""
    path = chunk_file(store / "grey.zarr")
    damage(path, "truncated")
    with pytest.raises(GrapesDataError) as info:
        grapes_dask.analyze(str(store / "grey.zarr"), str(store / "labels.zarr"), client=process_cluster)
    assert_names_chunk(info.value, str(store / "grey.zarr"), path)


@pytest.mark.parametrize("resumable", [False, True], ids=["plain", "partials"])
def test_task_that_always_kills_its_worker_is_named(pristine, monkeypatch, process_cluster, tmp_path, resumable):
    _exit_in_workers(monkeypatch)
    with pytest.raises(GrapesWorkerError) as info:
        grapes_dask.analyze(str(pristine / "grey.zarr"), str(pristine / "labels.zarr"), client=process_cluster,
                            region_size=16, partials=tmp_path / "p" if resumable else None)
    err = info.value
    msg, cli = str(err), err.render("cli")
    assert msg.startswith("pass 2 region z ") and "(labels read with its halo: z " in msg
    assert "killed its dask worker 2 times" in msg and "(workers: 2.00 GiB for 1 thread)" in msg
    assert err.task.startswith("_pass2_task-") and err.task in msg and "running out of memory" in msg
    assert "region_size" in msg and "memory_limit" in msg and "--region-size" in cli and "--memory-limit" in cli
    assert "region_size" not in cli
    # the region named is one of the plan's: 16-voxel blocks of the 32^3 volume
    core = msg.split("pass 2 region ")[1].split(" (")[0]
    spans = [tuple(map(int, part.split()[1].split(":"))) for part in core.split(", ")]
    assert len(spans) == 3 and all(a % 16 == 0 and b - a == 16 and b <= 32 for a, b in spans)


def test_worker_killed_once_reruns_to_the_same_table(pristine, monkeypatch, tmp_path, process_cluster):
    args = (str(pristine / "grey.zarr"), str(pristine / "labels.zarr"))
    with dask.config.set(scheduler="threads"):
        expected = grapes_dask.analyze(*args, region_size=16)
    marker = tmp_path / "died"
    _exit_in_workers(monkeypatch, marker=str(marker))
    got = grapes_dask.analyze(*args, client=process_cluster, region_size=16)
    assert marker.exists()  # a worker did die
    import pandas.testing as pdt

    pdt.assert_frame_equal(got, expected)


def test_cli_worker_error_is_one_line(pristine, monkeypatch, tmp_path):
    """`--workers 2` (worker processes with nannies): the message in CLI words, status 2."""
    from click.testing import CliRunner

    from grapes_dask.cli import cli

    _exit_in_workers(monkeypatch)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        r = CliRunner().invoke(cli, ["analyze", str(pristine / "grey.zarr"), str(pristine / "labels.zarr"),
                                     "--out", str(tmp_path / "t.parquet"), "--workers", "2", "--quiet",
                                     "--region-size", "16"])
    assert r.exit_code == 2, r.output
    (line,) = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert line.startswith("error: pass 2 region z ") and "killed its dask worker once" in line
    assert "--region-size" in line and "Traceback" not in r.output


def test_embedded_cluster_nanny_restarts_a_worker_out_of_memory(tmp_path):
    """Worker processes of the embedded cluster (no pausing, see cluster.py) are still restarted
    by their nanny when a task passes their memory limit, and the task reruns."""
    from grapes_dask.cluster import cluster_client

    marker = str(tmp_path / "first")

    def hog(marker):
        import time

        if not os.path.exists(marker):  # the first run: grow past the limit, 50 MiB at a time
            open(marker, "w").close()
            held = []
            for _ in range(40):
                held.append(np.ones(50 * 2**20, np.uint8))
                time.sleep(0.05)
            return "not killed"
        return os.getpid()

    with cluster_client(workers=2, memory_limit="600MiB", dashboard=False) as client:
        before = set(client.run(os.getpid).values())
        pid = client.compute(dask.delayed(hog)(marker)).result(timeout=60)
        client.wait_for_workers(2, timeout=30)
        after = set(client.run(os.getpid).values())
    assert os.path.exists(marker) and pid != "not killed"  # ran twice: killed the first time
    assert len(after) == 2 and len(after & before) == 1  # one worker replaced by its nanny


def test_memory_limit_below_the_process_footprint_does_not_hang(pristine, tmp_path):
    """The in-process worker counts the whole process (Python, Numba, the client): with
    dask's pause at 80% of a small limit, this run used to wait forever."""
    r = run("analyze", pristine / "grey.zarr", pristine / "labels.zarr", "--out", tmp_path / "t.parquet",
            "--memory-limit", "300MiB", "--quiet", timeout=90)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t.parquet").exists()
