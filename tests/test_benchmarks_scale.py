"""The scale benchmarks (benchmarks/out_of_core.py, scaling.py, graph_plan.py) at tiny sizes."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", _BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(_BENCH))
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ooc():
    return _load("out_of_core")


@pytest.fixture(scope="module")
def scaling():
    return _load("scaling")


@pytest.fixture(scope="module")
def gp():
    return _load("graph_plan")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from grapes_dask import synthetic

    out = tmp_path_factory.mktemp("scale") / "ph"
    synthetic.make_phantom(out, shape=(48, 48, 48), chunks=24, mean_radius=8, seed=3)
    return out


# --------------------------------------------------------------------------------------------
# out_of_core.py
# --------------------------------------------------------------------------------------------


def test_out_of_core_refuses_without_disk_space_and_writes_nothing(ooc, tmp_path):
    folder = tmp_path / "ooc"
    need = ooc.estimate_bytes(64)["total"]
    with pytest.raises(ooc.NotEnoughDisk) as exc:
        ooc.run(64, folder=folder, free_limit=need - 1, warmup_size=0, reference_size=0, log=lambda *a: None)
    msg = str(exc.value)
    assert f"needs about {ooc.fmt_bytes(need)}" in msg and f"only {ooc.fmt_bytes(need - 1)} are free" in msg
    assert ooc.fmt_bytes(need).endswith("KiB")  # 64^3: about 370 kB of stores, 60 kB of tables
    assert not folder.exists()
    assert ooc.check_disk(folder, need, free=need) == need  # exactly enough passes


def test_out_of_core_estimate_covers_the_documented_figure(ooc):
    # 2048^3 at the README's 0.95 bytes/voxel with the 1.5 margin: about 12.2 GB of stores
    est = ooc.estimate_bytes(2048, bytes_per_voxel=0.5)
    assert est["stores"] == int(1.5 * 462 * 2**20 / 800**3 * 2048**3)
    assert 160_000 < est["expected_particles"] < 180_000
    # a measured figure above the documented one wins
    assert ooc.estimate_bytes(2048, bytes_per_voxel=2.0)["stores"] == int(1.5 * 2.0 * 2048**3)


def test_out_of_core_small_run(ooc, tmp_path):
    folder = tmp_path / "ooc"
    res = ooc.run(40, folder=folder, warmup_size=0, reference_size=0, log=lambda *a: None)
    json.dumps(res)
    an = res["analyze"]
    assert an["voxels"] == 40**3 and an["particles"] >= 1
    assert res["generate"]["particles"] >= an["particles"]
    assert 0 < res["peak_rss_gib"]["analyze"] < 4 and res["rss_pass"] is True
    assert res["stores_bytes"] > 0 and res["output_bytes"] > 0
    assert "--quiet" in an["command"] and " analyze " in an["command"]
    assert not folder.exists()  # volume and tables removed without --keep
    assert "PASS" in ooc.summary(res)


# --------------------------------------------------------------------------------------------
# scaling.py
# --------------------------------------------------------------------------------------------


def test_scaling_runs_one_and_two_threads(scaling, phantom):
    res = scaling.run(phantom, repeat=1, log=lambda *a: None)
    json.dumps(res)
    assert [r["worker_threads"] for r in res["runs"]["1x1"]] == [[1]]
    assert [r["worker_threads"] for r in res["runs"]["1x2"]] == [[2]]
    t1, t2 = res["seconds"]["1x1"][0], res["seconds"]["1x2"][0]
    assert res["speedup"]["best"] == pytest.approx(t1 / t2)
    e = res["edt"]
    assert res["edt"]["speedup"]["best"] == pytest.approx(min(e["parallel_1"]) / min(e["parallel_2"]))
    assert res["particles"] > 0 and res["voxels"] == 48**3


# --------------------------------------------------------------------------------------------
# graph_plan.py
# --------------------------------------------------------------------------------------------


def test_block_labels_match_a_brute_force_overlap(gp):
    rng = np.random.default_rng(0)
    lo = rng.integers(0, 60, (200, 3))
    hi = lo + rng.integers(1, 30, (200, 3))
    hi = np.minimum(hi, 64)
    labels = np.arange(1, 201, dtype=np.uint64)
    edges = [np.array([0, 16, 40, 64])] * 3
    got = gp.block_labels(lo, hi, labels, edges)
    for i, idx in enumerate(np.ndindex(3, 3, 3)):
        blo = np.array([edges[a][idx[a]] for a in range(3)])
        bhi = np.array([edges[a][idx[a] + 1] for a in range(3)])
        want = [int(lab) for lab, a, b in zip(labels, lo, hi) if np.all(a < bhi) and np.all(b > blo)]
        assert got[i].tolist() == want


def test_graph_plan_task_counts_follow_the_block_formula(gp):
    res = gp.plan(64, 16, 16, nodes=2, threads_per_node=2, memory_per_node=8 * 2**30)
    objs = res.pop("objs")
    blocks = (64 // 16) ** 3
    assert res["pass1_blocks"] == blocks and res["synthetic_statistics"] is True
    g1, g2 = gp.graph_stats(objs["pass1"]), gp.graph_stats(objs["pass2"])
    # a tree of fan-in 8 over 64 items: 8 + 1 combine tasks
    assert g1["tasks_by_function"]["_pass1_task"] == blocks
    # one result: the blocks' (partial, info) pairs combined in a tree
    assert g1["tasks_by_function"]["_combine_pass1"] == 9 == gp.reduction_tasks(blocks)
    assert g1["tasks"] == blocks + 9
    n2 = res["pass2_regions"]
    assert g2["tasks_by_function"]["_pass2_task"] == n2 >= blocks
    assert g2["tasks_by_function"]["combine_layers"] == gp.reduction_tasks(n2)
    assert g1["serialised_bytes"] > 0 and res["seconds"]["plan_stage"] > 0
    # the statistics reached the real client-side code: one row per synthetic particle
    assert res["particles"] == gp.lattice(64)["label"].size
    sched = gp.scheduler_memory(objs["pass2"])
    assert sched["tasks_on_scheduler"] == g2["tasks"]
