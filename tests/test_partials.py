"""Resumable runs (grapes_dask._partials): partial results kept per task, reused only for the
same inputs and parameters, the same table to the bit; the command killed and run again."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grapes_dask import _partials, analyze_tables
from grapes_dask._errors import GrapesInputError
from grapes_dask.io import write_zarr
from grapes_dask.kernels.reduce import StatsPartial
from grapes_dask.output import read_table
from grapes_dask.synthetic import phantom_numpy


def _frames_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Every column equal to the bit (list cells element-wise, NaN equal to NaN)."""
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b)
    for c in a.columns:
        if a[c].dtype == object:
            for x, y in zip(a[c], b[c]):
                assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True), c
        else:
            assert a[c].dtype == b[c].dtype, c
            np.testing.assert_array_equal(a[c].to_numpy(), b[c].to_numpy(), err_msg=c)


def _tables_equal(r1, r2) -> None:
    for name in ("particles", "layers", "contacts"):
        _frames_equal(getattr(r1, name), getattr(r2, name))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A 64^3 phantom in Zarr, uneven chunks of 20, anisotropic voxels."""
    d = tmp_path_factory.mktemp("resume")
    grey, lab, _ = phantom_numpy((64, 64, 64), seed=3, mean_radius=6)
    write_zarr(da.from_array(grey, chunks=20), d / "g.zarr")
    write_zarr(da.from_array(lab, chunks=20), d / "l.zarr")
    return d


KW = dict(region_size=24, spacing=(1.0, 0.8, 0.8), exclude_outer_layers=1)


@pytest.fixture(scope="module")
def reference(stores):
    with dask.config.set(scheduler="threads"):
        return analyze_tables(stores / "g.zarr", stores / "l.zarr", **KW)


def test_resumed_run_equals_uninterrupted(stores, reference, tmp_path, caplog):
    part = tmp_path / "p"
    with dask.config.set(scheduler="threads"):
        first = analyze_tables(stores / "g.zarr", stores / "l.zarr", partials=part, **KW)
    _tables_equal(first, reference)
    files = sorted(part.glob("*.npz"))
    n1 = sum(f.name.startswith("pass1-") for f in files)
    n2 = sum(f.name.startswith("pass2-") for f in files)
    assert n1 == 27 and n2 >= 27  # 64 / 24 -> 3 blocks per axis
    # an interruption: a third of the tasks never finished
    lost = files[::3]
    for f in lost:
        f.unlink()
    with caplog.at_level(logging.INFO, logger="grapes_dask"), dask.config.set(scheduler="threads"):
        again = analyze_tables(stores / "g.zarr", stores / "l.zarr", partials=part, **KW)
    _tables_equal(again, reference)
    done1 = n1 - sum(f.name.startswith("pass1-") for f in lost)
    done2 = n2 - sum(f.name.startswith("pass2-") for f in lost)
    assert f"resuming pass 1: {done1} of {n1} blocks" in caplog.text
    assert f"resuming pass 2: {done2} of {n2} regions" in caplog.text
    assert len(list(part.glob("*.npz"))) == n1 + n2  # the lost ones written again


def test_changed_parameter_discards_the_partials(stores, tmp_path, caplog):
    part = tmp_path / "p"
    with dask.config.set(scheduler="threads"):
        analyze_tables(stores / "g.zarr", stores / "l.zarr", partials=part, **KW)
        fresh = analyze_tables(stores / "g.zarr", stores / "l.zarr", layer_width=2.0, **KW)
        with caplog.at_level(logging.INFO, logger="grapes_dask"):
            other = analyze_tables(stores / "g.zarr", stores / "l.zarr", partials=part, layer_width=2.0, **KW)
    assert re.search(r"discarded \d+ partial results .* layer_width 1\.0 -> 2\.0", caplog.text)
    assert "resuming" not in caplog.text
    _tables_equal(other, fresh)
    # a parameter acting after the partials (the normalisation) keeps them
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="grapes_dask"), dask.config.set(scheduler="threads"):
        analyze_tables(stores / "g.zarr", stores / "l.zarr", partials=part, layer_width=2.0, normalise="surface", **KW)
    assert "resuming pass 2" in caplog.text and "discarded" not in caplog.text


def test_changed_input_discards_the_partials(tmp_path, caplog):
    grey, lab, _ = phantom_numpy((40, 40, 40), seed=5, mean_radius=5)
    write_zarr(da.from_array(grey, chunks=20), tmp_path / "g.zarr")
    write_zarr(da.from_array(lab, chunks=20), tmp_path / "l.zarr")
    part = tmp_path / "p"
    with dask.config.set(scheduler="threads"):
        analyze_tables(tmp_path / "g.zarr", tmp_path / "l.zarr", partials=part, region_size=20)
        # one label chunk rewritten: a particle's voxels moved to another label id
        lab2 = lab.copy()
        ids = np.unique(lab2[lab2 > 0])
        lab2[lab2 == ids[0]] = ids[-1] + 7
        write_zarr(da.from_array(lab2, chunks=20), tmp_path / "l.zarr", overwrite=True)
        fresh = analyze_tables(tmp_path / "g.zarr", tmp_path / "l.zarr", region_size=20)
        with caplog.at_level(logging.INFO, logger="grapes_dask"):
            again = analyze_tables(tmp_path / "g.zarr", tmp_path / "l.zarr", partials=part, region_size=20)
    assert "the labels input changed" in caplog.text
    _tables_equal(again, fresh)
    assert int(ids[-1] + 7) in set(again.particles["label"].tolist())


def test_in_memory_inputs_are_fingerprinted_by_content(tmp_path, caplog):
    grey, lab, _ = phantom_numpy((32, 32, 32), seed=2, mean_radius=4)
    part = tmp_path / "p"
    with dask.config.set(scheduler="threads"):
        analyze_tables(grey, lab, partials=part, region_size=16)
        grey2 = grey.copy()
        grey2[lab > 0] += 1
        fresh = analyze_tables(grey2, lab, region_size=16)
        with caplog.at_level(logging.INFO, logger="grapes_dask"):
            again = analyze_tables(grey2, lab, partials=part, region_size=16)
    assert "the grey input changed" in caplog.text
    _tables_equal(again, fresh)


def test_damaged_partial_is_computed_again(stores, reference, tmp_path, caplog):
    part = tmp_path / "p"
    with dask.config.set(scheduler="threads"):
        analyze_tables(stores / "g.zarr", stores / "l.zarr", partials=part, **KW)
    victim = sorted(part.glob("pass2-*.npz"))[0]
    victim.write_bytes(victim.read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger="grapes_dask"), dask.config.set(scheduler="threads"):
        again = analyze_tables(stores / "g.zarr", stores / "l.zarr", partials=part, **KW)
    assert victim.name in caplog.text and "computing it again" in caplog.text
    _tables_equal(again, reference)
    _partials.load(str(victim))  # replaced by a complete file


def test_folder_of_other_files_is_refused(stores, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(GrapesInputError, match="not a grapes_dask partials folder"):
        analyze_tables(stores / "g.zarr", stores / "l.zarr", partials=tmp_path / "mine", **KW)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_leftover_temporary_files_are_removed(stores, tmp_path):
    part = tmp_path / "p"
    with dask.config.set(scheduler="threads"):
        analyze_tables(stores / "g.zarr", stores / "l.zarr", partials=part, **KW)
    (part / "pass2-0000.npz.tmp-dead").write_bytes(b"half")
    with dask.config.set(scheduler="threads"):
        analyze_tables(stores / "g.zarr", stores / "l.zarr", partials=part, **KW)
    assert not list(part.glob("*.tmp-*"))


_dtypes = st.sampled_from([np.uint8, np.int16, np.uint32, np.int64, np.uint64, np.float32, np.float64, np.bool_])


@settings(max_examples=40, deadline=None)
@given(_dtypes, st.integers(0, 6), st.integers(0, 2**32 - 1))
def test_files_round_trip_exactly(dtype, n, seed):
    rng = np.random.default_rng(seed)
    a = (rng.random(n) * 1000 - 500).astype(dtype)
    if np.dtype(dtype).kind == "f" and n:
        a[0] = np.nan
    frame = pd.DataFrame({"label": np.arange(n, dtype=np.uint64), "v": a})
    obj = (StatsPartial(frame, frame.iloc[:0], (1.0, 0.8, 0.8)),
           {"labels": a, "min_label": int(n), "nan_in_particles": bool(n % 2), "none": None})
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "x.npz")
        _partials.save(p, obj)
        back = _partials.load(p)
    assert isinstance(back[0], StatsPartial) and back[0].spacing == (1.0, 0.8, 0.8)
    _frames_equal(back[0].labels, frame)
    assert list(back[0].pairs.columns) == ["label", "v"] and len(back[0].pairs) == 0
    assert back[1]["labels"].dtype == a.dtype and np.array_equal(back[1]["labels"], a, equal_nan=True)
    assert back[1]["min_label"] == n and back[1]["nan_in_particles"] is bool(n % 2) and back[1]["none"] is None


def test_object_arrays_are_not_stored(tmp_path):
    with pytest.raises(TypeError):
        _partials.save(str(tmp_path / "x.npz"), {"cells": np.array([np.zeros(2), None], dtype=object)})
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# the command, killed and run again
# --------------------------------------------------------------------------------------------


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "grapes_dask", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """96^3, chunks of 16, regions of 16: 216 pass-1 and 216+ pass-2 tasks (a window to kill in)."""
    d = tmp_path_factory.mktemp("kill")
    grey, lab, _ = phantom_numpy((96, 96, 96), seed=11, mean_radius=5)
    write_zarr(da.from_array(grey, chunks=16), d / "g.zarr")
    write_zarr(da.from_array(lab, chunks=16), d / "l.zarr")
    ref = _cli("analyze", d / "g.zarr", d / "l.zarr", "--out", d / "ref.parquet", "--region-size", 16, "--quiet")
    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err
    return d


def _run_until_pass2_files(d: Path, out: Path, sig) -> tuple[subprocess.Popen, int]:
    part = Path(str(out) + ".partials")
    proc = _cli("analyze", d / "g.zarr", d / "l.zarr", "--out", out, "--region-size", 16, "--quiet")
    t0 = time.time()
    while time.time() - t0 < 600:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be interrupted: {proc.stderr.read()}")
        n = len(list(part.glob("pass2-*.npz"))) if part.is_dir() else 0
        if n >= 3:
            os.killpg(proc.pid, sig)
            break
        time.sleep(0.002)
    proc.communicate(timeout=120)
    return proc, n


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_command_interrupted_then_run_again_gives_the_same_table(big, tmp_path, sig):
    out = tmp_path / "t.parquet"
    part = Path(str(out) + ".partials")
    proc, _ = _run_until_pass2_files(big, out, sig)
    if sig == signal.SIGINT:
        assert proc.returncode == 130
    assert not out.exists() and not list(tmp_path.glob("t.*.parquet"))  # nothing half-written
    assert (part / "manifest.json").is_file()
    again = _cli("analyze", big / "g.zarr", big / "l.zarr", "--out", out, "--region-size", 16, "--quiet")
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    m = re.search(r"note: resuming pass 2: (\d+) of (\d+) regions done", err)
    assert m and int(m.group(1)) >= 1, err
    assert "note: resuming pass 1: " in err
    _frames_equal(read_table(out), read_table(big / "ref.parquet"))
    for name in ("layers", "contacts"):
        _frames_equal(read_table(tmp_path / f"t.{name}.parquet"), read_table(big / f"ref.{name}.parquet"))
    assert not part.exists()  # removed once the table is written


def test_command_keeps_partials_when_asked(big, tmp_path):
    out = tmp_path / "t.parquet"
    proc = _cli("analyze", big / "g.zarr", big / "l.zarr", "--out", out, "--region-size", 16, "--quiet",
                "--keep-partials", "--partials", tmp_path / "scratch")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert (tmp_path / "scratch" / "manifest.json").is_file()
    assert len(list((tmp_path / "scratch").glob("pass1-*.npz"))) == 216
    assert not Path(str(out) + ".partials").exists()
