"""The plan for 100+ nodes: the task graphs of a 10^5-chunk volume, built but never run.

    python benchmarks/graph_plan.py                         # 5888^3 in chunks of 128^3 = 46^3 = 97,336 chunks
    python benchmarks/graph_plan.py --particle-counts 1e5,1e6,1e7   # + client-side work per particle
    python benchmarks/graph_plan.py --size 1024 --no-scheduler --block-counts ''   # a quick look
    python benchmarks/graph_plan.py --region-sizes 128      # one chunk per block: 97,336 blocks (hours)

What it does, for a volume of ``--size``^3 voxels (uint8 grey, uint32 labels, chunks of
``--chunks``^3) that is never written:

- the inputs are real Zarr v3 stores holding only their metadata (no chunk files): they open
  and plan as real inputs, and no task ever reads them;
- the **pass-1 statistics are synthetic**: a jittered lattice of spheres at the paper's packing
  (mean radius 18, a lattice step of 36.9 voxels: about 4 x 10^6 particles at 5888^3), turned
  into the combined pass-1 partial the engine would hold (label, count, moments, boxes, grey
  sums, areas, border flags, lattice-neighbour contacts), and the per-block label lists from
  the boxes; nothing of it is measured as pipeline time;
- ``grapes_dask.table._run`` runs as in an analysis, with a stand-in client (``--nodes`` x
  ``--threads-per-node`` threads, ``--memory-per-node`` each) for the memory budget and the
  block cut, and its ``_compute`` intercepted: instead of computing pass 1, the graph is
  measured and the synthetic statistics returned. Everything after is the real client-side
  code: ``finalize_stats``, the label checks, the contacts, ``plan_pass2`` and the pass-2 graph;
- each graph (pass 1: blocks + reduction; pass 2: regions + reduction) is counted, timed and
  serialised the way ``distributed.Client.compute`` does (``collections_to_expr``,
  ``FinalizeCompute``, ``optimize``, ``distributed.protocol.serialize``);
- scheduler memory, measured: each graph is submitted to a fresh ``dask scheduler`` process
  that has no worker (so nothing runs) and the scheduler's RSS is read before and after all
  its tasks arrived; the per-task figure extrapolates to other volumes (said as such);
- block-count scaling (``--block-counts``, blocks per axis): the client-side graph costs with
  one 32^3 chunk per block, 512 to 13,824 blocks, extrapolated to one block per chunk of the
  volume (a power law through the last two points; said so in the output): building the graph
  with ``dask.delayed`` grows faster than linearly with the number of tasks;
- ``--particle-counts``: the client-side plan step again (no scheduler) with 10^5 ... 10^7
  particles in the same volume (smaller spheres on a denser lattice), each in a fresh process,
  with the client's peak RSS: how the per-particle work on the client grows.

Prints one JSON line (``{"benchmark": "graph_plan", ...}``) and summary lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _measure  # noqa: E402

#: Lattice step of the paper's packing: the 800^3 phantom holds 10,232 particles of mean radius 18.
PAPER_STEP = 800 / 10_232 ** (1 / 3)
PAPER_RADIUS = 18.0
_FAN_IN = 8


# --------------------------------------------------------------------------------------------
# inputs that exist only as metadata
# --------------------------------------------------------------------------------------------


def make_stores(folder, size: int, chunks: int) -> tuple[Path, Path]:
    """Zarr v3 stores of shape ``size``^3 (grey uint8, labels uint32) with no chunk written."""
    import zarr

    from grapes_dask.io import _default_compressor

    paths = []
    for name, dtype in (("grey.zarr", np.uint8), ("labels.zarr", np.uint32)):
        p = Path(folder) / name
        zarr.create_array(store=str(p), shape=(size,) * 3, chunks=(chunks,) * 3, dtype=dtype,
                          compressors=_default_compressor(np.dtype(dtype)), fill_value=0, zarr_format=3,
                          attributes={"spacing": [1.0, 1.0, 1.0], "unit": "voxel"})
        paths.append(p)
    return paths[0], paths[1]


# --------------------------------------------------------------------------------------------
# synthetic pass-1 statistics
# --------------------------------------------------------------------------------------------


def lattice(size: int, n_particles: int | None = None, seed: int = 0) -> dict:
    """Spheres on a jittered cubic lattice filling ``size``^3.

    Parameters
    ----------
    size : int
    n_particles : int, optional
        About this many (a cube number); default the paper's packing (step 36.9, radius 18).
        The radius scales with the step, so the packing stays the paper's.

    Returns
    -------
    dict of arrays, sorted by label: ``label`` (uint64), ``centre`` (n, 3), ``radius``,
    ``bbox_min``, ``bbox_max`` (int64, max exclusive), ``count`` (int64), ``lattice`` (n, 3)
    positions, and ``m`` (lattice points per axis), ``step``, ``mean_radius``.
    """
    rng = np.random.default_rng(seed)
    step = PAPER_STEP if n_particles is None else size / max(1.0, n_particles ** (1 / 3))
    m = max(1, int(round(size / step)))
    step = size / m
    r0 = PAPER_RADIUS * step / PAPER_STEP
    idx = np.stack(np.meshgrid(*[np.arange(m)] * 3, indexing="ij"), axis=-1).reshape(-1, 3).astype(np.int32)
    n = len(idx)
    centre = (idx + 0.5) * step + rng.uniform(-0.15, 0.15, (n, 3)) * step
    radius = np.clip(r0 * np.exp(0.2 * rng.standard_normal(n)), 0.5 * r0, min(2 * r0, 0.6 * step))
    lo = np.clip(np.floor(centre - radius[:, None] + 0.5), 0, size - 1).astype(np.int64)
    hi = np.clip(np.floor(centre + radius[:, None] + 0.5) + 1, 1, size).astype(np.int64)
    hi = np.maximum(hi, lo + 1)
    inside = np.prod((hi - lo) / np.maximum(1.0, 2 * radius[:, None]), axis=1).clip(0, 1)
    count = np.maximum(1, np.round(4 / 3 * np.pi * radius**3 * 0.9 * inside)).astype(np.int64)
    label = (rng.permutation(n) + 1).astype(np.uint64)
    order = np.argsort(label, kind="stable")
    return {"label": label[order], "centre": centre[order], "radius": radius[order], "bbox_min": lo[order],
            "bbox_max": hi[order], "count": count[order], "lattice": idx[order], "m": m, "step": step,
            "mean_radius": r0, "size": size, "inverse": np.argsort(order)}


def synthetic_partial(p: dict, spacing=(1.0, 1.0, 1.0), seed: int = 0):
    """The combined pass-1 partial (:class:`grapes_dask.kernels.reduce.StatsPartial`) of `p`,
    with the column layout of ``chunk_stats`` / ``combine_stats`` and plausible values."""
    import pandas as pd

    from grapes_dask.kernels.reduce import StatsPartial
    from grapes_dask.kernels.surface import FIXED_BITS, fixed_point_lut

    rng = np.random.default_rng(seed + 1)
    n, size = len(p["label"]), p["size"]
    c, r, cnt = p["centre"], p["radius"], p["count"]
    cols = {"label": p["label"], "count": cnt}
    for a in range(3):
        cols[f"sum_{a}"] = np.round(cnt * c[:, a]).astype(np.int64)
    for a, b in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)):
        cols[f"sum_{a}{b}"] = np.round(cnt * (c[:, a] * c[:, b] + (r * r / 5 if a == b else 0.0))).astype(np.int64)
    for a in range(3):
        cols[f"bbox_min_{a}"] = p["bbox_min"][:, a]
    for a in range(3):
        cols[f"bbox_max_{a}"] = p["bbox_max"][:, a]
    mean = 150 + 5 * rng.standard_normal(n)
    cols["grey_sum_hi"] = np.zeros(n, np.int64)
    cols["grey_sum_lo"] = np.round(cnt * mean).astype(np.uint64)
    cols["grey_sq_hi"] = np.zeros(n, np.uint64)
    cols["grey_sq_lo"] = np.round(cnt * (mean**2 + 100.0)).astype(np.uint64)
    cols["grey_min"] = np.full(n, 100, np.int64)
    cols["grey_max"] = np.full(n, 200, np.int64)
    _, unit = fixed_point_lut(tuple(spacing))
    fixed = 4 * np.pi * r * r * 0.95 / float(unit) * 2.0**FIXED_BITS
    hi = np.floor(fixed / 2.0**64)
    cols["area_hi"] = hi.astype(np.uint64)
    cols["area_lo"] = np.minimum(fixed - hi * 2.0**64, 2.0**64 - 4096).astype(np.uint64)
    cols["touches_border"] = np.any((p["bbox_min"] == 0) | (p["bbox_max"] == size), axis=1)
    labels = pd.DataFrame(cols)
    # contacts: each particle and its lattice neighbours along +z, +y, +x
    m = p["m"]
    flat = np.empty(m**3, np.int64)  # lattice position -> row
    li = p["lattice"].astype(np.int64)
    flat[(li[:, 0] * m + li[:, 1]) * m + li[:, 2]] = np.arange(n)
    a_parts, b_parts = [], []
    for ax in range(3):
        ok = li[:, ax] < m - 1
        nb = li[ok].copy()
        nb[:, ax] += 1
        a_parts.append(np.flatnonzero(ok))
        b_parts.append(flat[(nb[:, 0] * m + nb[:, 1]) * m + nb[:, 2]])
    ia, ib = np.concatenate(a_parts), np.concatenate(b_parts)
    la, lb = p["label"][ia], p["label"][ib]
    la, lb = np.minimum(la, lb), np.maximum(la, lb)
    order = np.lexsort((lb, la))
    pairs = pd.DataFrame({"label_a": la[order], "label_b": lb[order],
                          "n_faces": rng.integers(20, 200, len(order)).astype(np.int64)})
    return StatsPartial(labels, pairs, tuple(float(s) for s in spacing))


def block_labels(bbox_min, bbox_max, labels, edges) -> list:
    """Per block (in ``np.ndindex`` order of `edges`), the sorted labels whose box meets it: what
    pass 1 reports (a superset: a box may meet a block its particle has no voxel in)."""
    nb = [len(e) - 1 for e in edges]
    first = np.stack([np.searchsorted(e, bbox_min[:, a], side="right") - 1 for a, e in enumerate(edges)], axis=1)
    last = np.stack([np.searchsorted(e, bbox_max[:, a] - 1, side="right") - 1 for a, e in enumerate(edges)], axis=1)
    span = int((last - first).max()) + 1 if len(labels) else 1
    keys, vals = [], []
    for dz in range(span):
        for dy in range(span):
            for dx in range(span):
                d = np.array([dz, dy, dx])
                ok = np.all(first + d <= last, axis=1)
                b = first[ok] + d
                keys.append((b[:, 0] * nb[1] + b[:, 1]) * nb[2] + b[:, 2])
                vals.append(labels[ok])
    keys, vals = np.concatenate(keys), np.concatenate(vals)
    order = np.lexsort((vals, keys))
    keys, vals = keys[order], vals[order]
    bounds = np.searchsorted(keys, np.arange(int(np.prod(nb)) + 1))
    return [vals[bounds[i]:bounds[i + 1]] for i in range(int(np.prod(nb)))]


# --------------------------------------------------------------------------------------------
# the run with pass 1 intercepted
# --------------------------------------------------------------------------------------------


class StandInClient:
    """Answers ``scheduler_info()`` as a cluster of `nodes` workers would (for the memory budget
    and the block cut); never computes anything."""

    def __init__(self, nodes: int, threads: int, memory: int):
        self._workers = {f"tcp://10.0.{i // 250}.{i % 250}:9000": {"nthreads": threads, "memory_limit": memory}
                         for i in range(nodes)}

    def scheduler_info(self, *args, **kwargs):
        return {"workers": self._workers}


def _expr(objs):
    """What ``distributed.Client.compute(list(objs))`` sends: its expression and keys."""
    from collections.abc import Iterator

    import dask
    from dask._expr import FinalizeCompute
    from dask.base import collections_to_expr

    objs = [dask.delayed(a) if isinstance(a, (list, set, tuple, dict, Iterator)) else a for a in objs]
    expr = FinalizeCompute(collections_to_expr([o for o in objs if dask.is_dask_collection(o)], True)).optimize()
    return expr


def graph_stats(objs) -> dict:
    """Tasks (total and by function), build-side costs of the graph as ``Client.compute`` makes it:
    expression + optimisation time, serialisation time and bytes (distributed's ``serialize``),
    and ``pickle.dumps`` of the low-level graph for comparison."""
    from distributed.protocol import serialize, to_serialize
    from distributed.utils import nbytes

    t0 = time.perf_counter()
    expr = _expr(objs)
    graph = expr.__dask_graph__()
    t_expr = time.perf_counter() - t0
    by_fn = {}
    for key in graph:
        name = key[0] if isinstance(key, tuple) else key
        fn = re.split(r"-[0-9a-f]{8}", str(name), maxsplit=1)[0]
        by_fn[fn] = by_fn.get(fn, 0) + 1
    t0 = time.perf_counter()
    header, frames = serialize(to_serialize(expr), on_error="raise")
    t_ser = time.perf_counter() - t0
    ser = sum(map(nbytes, [header] + list(frames))) if isinstance(header, (bytes, bytearray)) else \
        sum(nbytes(f) for f in frames) + len(pickle.dumps(header))
    t0 = time.perf_counter()
    raw = len(pickle.dumps(dict(graph), protocol=5))
    t_pickle = time.perf_counter() - t0
    return {"tasks": len(graph), "tasks_by_function": dict(sorted(by_fn.items(), key=lambda kv: -kv[1])),
            "expr_seconds": t_expr, "serialised_bytes": int(ser), "serialise_seconds": t_ser,
            "pickle_bytes": raw, "pickle_seconds": t_pickle}


@contextlib.contextmanager
def intercepted(stats_for_edges):
    """Patch ``grapes_dask.table`` for a run that builds but never runs its graphs.

    `stats_for_edges(edges) -> (combined partial, per-block label lists)`. Yields a dict that
    fills with the pass-1 objects, the edges, the pass-2 tasks and timestamps.
    """
    from grapes_dask import table

    rec = {"marks": {}}
    orig = {k: getattr(table, k) for k in ("_compute", "pass1_blocks", "plan_pass2", "_pass1")}
    orig_fin = table.kernels.finalize_stats

    def pass1_blocks(*a, **kw):
        t0 = time.perf_counter()
        edges = orig["pass1_blocks"](*a, **kw)
        rec["marks"]["pass1_blocks"] = time.perf_counter() - t0
        rec["edges"] = edges
        return edges

    def _pass1(*a, **kw):
        t0 = time.perf_counter()
        out = orig["_pass1"](*a, **kw)
        rec["marks"]["pass1_graph"] = time.perf_counter() - t0
        return out

    def _compute(*objs, client=None, progress=False, desc=""):
        if "pass1_objs" in rec:
            raise RuntimeError("graph_plan: only pass 1 is computed during _run")
        rec["pass1_objs"] = objs
        t0 = time.perf_counter()
        combined, lists = stats_for_edges(rec["edges"])
        rec["marks"]["synthesis"] = time.perf_counter() - t0
        rec["t_pass1_done"] = time.perf_counter()
        return ((combined, [{"labels": x} for x in lists]),)  # pass 1's one result: (partial, infos)

    def finalize_stats(*a, **kw):
        t0 = time.perf_counter()
        out = orig_fin(*a, **kw)
        rec["marks"]["finalize_stats"] = time.perf_counter() - t0
        return out

    def plan_pass2(*a, **kw):
        t0 = time.perf_counter()
        out = orig["plan_pass2"](*a, **kw)
        rec["t_plan_pass2_done"] = time.perf_counter()
        rec["marks"]["plan_pass2"] = rec["t_plan_pass2_done"] - t0
        rec["pass2_tasks"] = out[1]
        return out

    table._compute, table.pass1_blocks, table.plan_pass2, table._pass1 = _compute, pass1_blocks, plan_pass2, _pass1
    table.kernels.finalize_stats = finalize_stats
    try:
        yield rec
    finally:
        for k, v in orig.items():
            setattr(table, k, v)
        table.kernels.finalize_stats = orig_fin


def plan(size: int, chunks: int, region_size: int, *, n_particles=None, nodes=100, threads_per_node=32,
         memory_per_node=256 * 2**30, seed=0, folder=None) -> dict:
    """Build the graphs of one volume (see the module docstring); the measurements and the
    pass-1 and pass-2 objects (``result["objs"]``, not JSON)."""
    from grapes_dask import table

    os.environ.setdefault("GRAPES_DASK_PRECOMPILE", "0")
    tmp = tempfile.TemporaryDirectory(prefix="graph-plan-", dir=folder)
    try:
        grey, labels = make_stores(tmp.name, size, chunks)
        t0 = time.perf_counter()
        p = lattice(size, n_particles, seed)
        combined = synthetic_partial(p, seed=seed)
        t_synth = time.perf_counter() - t0

        def stats_for_edges(edges):
            return combined, block_labels(p["bbox_min"], p["bbox_max"], p["label"], edges)

        client = StandInClient(nodes, threads_per_node, memory_per_node)
        with intercepted(stats_for_edges) as rec:
            t0 = time.perf_counter()
            inp, stats, contacts, combined_layers, params, timings = table._run(
                grey, labels, client=client, region_size=region_size)
            t_end = time.perf_counter()
        nblocks = int(np.prod([len(e) - 1 for e in rec["edges"]]))
        m = rec["marks"]
        res = {
            "shape": [size] * 3, "chunks": [chunks] * 3, "n_chunks": math.ceil(size / chunks) ** 3,
            "region_size": region_size, "pass1_blocks": nblocks, "pass2_regions": len(rec["pass2_tasks"]),
            "particles": int(len(stats)), "mean_radius": float(p["mean_radius"]), "lattice_step": float(p["step"]),
            "contacts": int(len(contacts)), "synthetic_statistics": True,
            "stand_in_cluster": {"nodes": nodes, "threads_per_node": threads_per_node,
                                 "memory_per_node": memory_per_node, "budget_per_task": params["memory_limit"],
                                 "budget_source": params["memory_limit_source"]},
            "seconds": {
                "pass1_blocks": m["pass1_blocks"], "pass1_graph": m["pass1_graph"],
                "finalize_stats": m["finalize_stats"], "plan_pass2": m["plan_pass2"],
                "pass2_graph": t_end - rec["t_plan_pass2_done"],
                "plan_stage": t_end - rec["t_pass1_done"],
                "synthesis_not_pipeline": t_synth + m["synthesis"],
                "run_total_without_synthesis": (t_end - t0) - m["synthesis"],
            },
            "timings_reported_by_run": {k: v for k, v in timings.items()},
        }
        res["seconds"]["client_plan_step"] = res["seconds"]["plan_stage"] + m["pass1_blocks"]
        res["objs"] = {"pass1": rec["pass1_objs"], "pass2": (combined_layers,)}
        return res
    finally:
        tmp.cleanup()


# --------------------------------------------------------------------------------------------
# scheduler memory, measured on a scheduler without workers
# --------------------------------------------------------------------------------------------


def _probe():  # a module-level function the scheduler must import, as the engine's tasks
    return None


def scheduler_memory(objs, *, timeout: float = 600.0) -> dict:
    """Submit `objs` (as ``Client.compute`` would) to a fresh ``dask scheduler`` process with no
    worker: nothing runs, every task stays on the scheduler. RSS of that process before (after a
    first tiny graph that imports the engine's modules there) and once all tasks arrived."""
    import psutil
    from distributed import Client

    with tempfile.TemporaryDirectory(prefix="graph-plan-sched-") as tmp:
        sfile = os.path.join(tmp, "scheduler.json")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        proc = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                 "--port", "0", "--no-dashboard", "--scheduler-file", sfile],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            for _ in range(600):
                if os.path.exists(sfile) and os.path.getsize(sfile) > 0:
                    break
                time.sleep(0.1)
            ps = psutil.Process(proc.pid)
            with Client(scheduler_file=sfile, timeout="30s") as client:
                import dask

                from grapes_dask import kernels, table

                warm = [dask.delayed(table._pass1_task)(None, None, None, None, (0,), (1,), (1,), (1.0,)),
                        dask.delayed(kernels.combine_layers)([]), dask.delayed(kernels.combine_stats)([])]
                fut = client.compute(warm)
                _wait_tasks(client, len(warm), timeout)
                client.cancel(fut)
                del fut
                _wait_tasks(client, 0, timeout, at_most=True)
                time.sleep(1.0)
                before = ps.memory_info().rss
                expected = len(_expr(objs).__dask_graph__())
                t0 = time.perf_counter()
                futs = client.compute(list(objs))
                t_submit = time.perf_counter() - t0
                n = _wait_tasks(client, expected, timeout)
                t_arrived = time.perf_counter() - t0
                time.sleep(1.0)
                after = max(ps.memory_info().rss for _ in range(5) if time.sleep(0.2) is None)
                client.cancel(futs)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"tasks_on_scheduler": n, "rss_before": before, "rss_after": after, "delta": after - before,
            "bytes_per_task": (after - before) / max(1, n), "submit_seconds": t_submit,
            "all_arrived_seconds": t_arrived}


def _wait_tasks(client, n, timeout, at_most=False) -> int:
    t0 = time.perf_counter()
    while True:
        have = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
        if (have <= n) if at_most else (have >= n):
            return have
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"the scheduler holds {have} tasks after {timeout} s, expected {n}")
        time.sleep(0.2)


# --------------------------------------------------------------------------------------------
# children, the run, the report
# --------------------------------------------------------------------------------------------


def child(size, chunks, region_size, n_particles, scheduler: bool, nodes, threads_per_node, memory_per_node) -> dict:
    res = plan(size, chunks, region_size, n_particles=n_particles, nodes=nodes, threads_per_node=threads_per_node,
               memory_per_node=memory_per_node)
    objs = res.pop("objs")
    res["graphs"] = {k: graph_stats(v) for k, v in objs.items()}
    res["client_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if scheduler:
        res["scheduler"] = {k: scheduler_memory(v) for k, v in objs.items()}
    return res


def reduction_tasks(n: int, fan_in: int = _FAN_IN) -> int:
    """Tasks of the engine's tree reduction of `n` items (``grapes_dask.table._tree_reduce``)."""
    total = 0
    while n > 1:
        n = -(-n // fan_in)
        total += n
    return total


def _run_child(args) -> dict:
    r = _measure.run_measured([sys.executable, str(Path(__file__).resolve()), "--child", *args])
    if r["returncode"] != 0:
        raise RuntimeError(f"graph_plan child {args} failed ({r['returncode']}):\n{r['stderr'][-3000:]}")
    out = json.loads(r["stdout"].strip().splitlines()[-1])
    out["tree_peak_rss"] = r["peak_rss"]
    out["wall"] = r["seconds"]
    out["load"] = [r["load_before"], r["load_after"]]
    return out


#: Core-seconds per voxel of the whole analysis on the paper-scale phantom: 16.1 s on 2 threads
#: for 800^3 (benchmarks/README.md, speed round 2, embedded cluster).
CORE_SECONDS_PER_VOXEL = 16.1 * 2 / 800**3
#: Compressed bytes per voxel (grey uint8 + labels) of the phantom, read once per pass; pass 2
#: reads labels with a halo (~1.3x the core at blocks of 400, paper particles).
READ_BYTES_PER_VOXEL = 462 * 2**20 / 800**3 * 2.3


def block_scaling(per_axis=(8, 16, 24), chunk=32, n_particles=1000, target_blocks=None, log=print) -> dict:
    """Client-side graph costs against the number of pass-1 blocks (one chunk per block, a fixed
    1,000 particles, no scheduler), each in a fresh process; a power law through the last two
    points extrapolates them to `target_blocks` (an extrapolation, said so in the output)."""
    rows = []
    for nb in per_axis:
        r = _run_child(["--size", str(nb * chunk), "--chunks", str(chunk), "--region-sizes", str(chunk),
                        "--particles", str(n_particles), "--no-scheduler", "--nodes", "2", "--threads-per-node", "1"])
        row = {"blocks": r["pass1_blocks"], "pass1_tasks": r["graphs"]["pass1"]["tasks"],
               "pass2_tasks": r["graphs"]["pass2"]["tasks"], "pass1_graph": r["seconds"]["pass1_graph"],
               "pass1_compute_prep": r["graphs"]["pass1"]["expr_seconds"],
               "pass1_serialise": r["graphs"]["pass1"]["serialise_seconds"],
               "plan_pass2": r["seconds"]["plan_pass2"], "pass2_graph": r["seconds"]["pass2_graph"],
               "pass2_compute_prep": r["graphs"]["pass2"]["expr_seconds"], "load": r["load"]}
        row["client_total"] = sum(row[k] for k in ("pass1_graph", "pass1_compute_prep", "pass1_serialise", "plan_pass2",
                                                   "pass2_graph", "pass2_compute_prep"))
        rows.append(row)
        log(f"  {row['blocks']} blocks: pass-1 graph {row['pass1_graph']:.2f} s, its Client.compute preparation "
            f"{row['pass1_compute_prep']:.2f} s, plan_pass2 {row['plan_pass2']:.2f} s, pass-2 graph "
            f"{row['pass2_graph']:.2f} s (load {row['load'][1]})")
    out = {"rows": rows, "chunk": chunk, "particles": n_particles}
    if target_blocks and len(rows) >= 2:
        a, b = rows[-2], rows[-1]
        ext = {"blocks": target_blocks, "extrapolated": True}
        parts = ("pass1_graph", "pass1_compute_prep", "pass1_serialise", "plan_pass2", "pass2_graph",
                 "pass2_compute_prep")
        for k in parts:
            if a[k] > 0 and b[k] > 0:
                e = math.log(b[k] / a[k]) / math.log(b["blocks"] / a["blocks"])
                ext[k] = b[k] * (target_blocks / b["blocks"]) ** e
                ext[k + "_exponent"] = e
        ext["client_total"] = sum(ext.get(k, 0.0) for k in parts)
        out["extrapolated"] = ext
    return out


def run(size=5888, chunks=128, region_sizes=(400,), particle_counts=(), *, scheduler=True, nodes=100,
        threads_per_node=32, memory_per_node=256 * 2**30, fs_gbps=10.0, block_counts=(8, 16, 24), log=print) -> dict:
    res = {"benchmark": "graph_plan", "synthetic_statistics": True, "size": size, "chunks": chunks,
           "n_chunks": math.ceil(size / chunks) ** 3, "load_start": _measure.load(), "volumes": [], "per_particle": []}
    common = ["--size", str(size), "--chunks", str(chunks), "--nodes", str(nodes), "--threads-per-node",
              str(threads_per_node), "--memory-per-node", str(memory_per_node)]
    for rs in region_sizes:
        log(f"planning {size}^3, chunks {chunks}^3, region size {rs} ...")
        r = _run_child(common + ["--region-sizes", str(rs)] + ([] if scheduler else ["--no-scheduler"]))
        res["volumes"].append(r)
        log(_volume_line(r))
    if block_counts:
        log(f"client-side graph costs against the block count (one chunk of {32}^3 per block, 1,000 particles):")
        res["block_scaling"] = block_scaling(block_counts, target_blocks=res["n_chunks"], log=log)
        ext = res["block_scaling"].get("extrapolated")
        if ext:
            log(f"  extrapolated to {ext['blocks']} blocks (one per chunk of the {size}^3 volume; a power law "
                f"through the last two points, not measured): pass-1 graph {ext.get('pass1_graph', 0):.0f} s, its "
                f"Client.compute preparation {ext.get('pass1_compute_prep', 0):.0f} s (exponent "
                f"{ext.get('pass1_compute_prep_exponent', 0):.2f}), pass-2 graph {ext.get('pass2_graph', 0):.0f} s, "
                f"client total {ext.get('client_total', 0):.0f} s")
    for n in particle_counts:
        log(f"client-side plan with {n:.0e} particles ...")
        rs = region_sizes[0] if region_sizes else 400
        r = _run_child(common + ["--region-sizes", str(rs), "--particles", str(int(n)), "--no-scheduler"])
        res["per_particle"].append({k: r[k] for k in ("particles", "mean_radius", "pass1_blocks", "pass2_regions",
                                                      "seconds", "client_peak_rss", "contacts", "load")}
                                   | {"pass2_serialised_bytes": r["graphs"]["pass2"]["serialised_bytes"],
                                      "pass2_serialise_seconds": r["graphs"]["pass2"]["serialise_seconds"]})
        log(_particle_line(res["per_particle"][-1]))
    # where the time would go on the stand-in cluster (an estimate from measured per-voxel figures)
    threads = nodes * threads_per_node
    vox = size**3
    est = {"threads": threads, "compute_seconds": CORE_SECONDS_PER_VOXEL * vox / threads,
           "read_bytes": READ_BYTES_PER_VOXEL * vox, "fs_gbps": fs_gbps}
    est["read_seconds"] = est["read_bytes"] / (fs_gbps * 1e9)
    est["run_seconds"] = max(est["compute_seconds"], est["read_seconds"])
    for v in res["volumes"]:
        v["plan_share_of_estimated_run"] = v["seconds"]["client_plan_step"] / (
            est["run_seconds"] + v["seconds"]["client_plan_step"])
    res["estimate"] = est
    res["load_end"] = _measure.load()
    return res


def _volume_line(r) -> str:
    g1, g2, s = r["graphs"]["pass1"], r["graphs"]["pass2"], r["seconds"]
    out = (f"  {r['n_chunks']} chunks, region size {r['region_size']}: {r['particles']} particles (synthetic), "
           f"pass 1 {r['pass1_blocks']} blocks = {g1['tasks']} tasks ({g1['serialised_bytes'] / 2**20:.1f} MiB "
           f"serialised), pass 2 {r['pass2_regions']} regions = {g2['tasks']} tasks "
           f"({g2['serialised_bytes'] / 2**20:.1f} MiB); client: blocks cut {s['pass1_blocks']:.2f} s, pass-1 graph "
           f"{s['pass1_graph']:.2f} s, finalize_stats {s['finalize_stats']:.2f} s, plan_pass2 {s['plan_pass2']:.2f} s, "
           f"pass-2 graph {s['pass2_graph']:.2f} s, plan stage {s['plan_stage']:.2f} s; client peak RSS "
           f"{r['client_peak_rss'] / 2**30:.2f} GiB")
    if "scheduler" in r:
        out += "; scheduler " + ", ".join(
            f"{k} +{v['delta'] / 2**20:.0f} MiB for {v['tasks_on_scheduler']} tasks "
            f"({v['bytes_per_task'] / 1024:.1f} KiB/task, submitted in {v['all_arrived_seconds']:.1f} s)"
            for k, v in r["scheduler"].items())
    return out


def _particle_line(r) -> str:
    s = r["seconds"]
    return (f"  {r['particles']} particles (radius {r['mean_radius']:.1f}): finalize_stats {s['finalize_stats']:.2f} s, "
            f"plan_pass2 {s['plan_pass2']:.2f} s, pass-2 graph {s['pass2_graph']:.2f} s, plan stage "
            f"{s['plan_stage']:.2f} s; pass-2 graph {r['pass2_serialised_bytes'] / 2**20:.1f} MiB; client peak RSS "
            f"{r['client_peak_rss'] / 2**30:.2f} GiB")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=5888, help="side of the cubic volume, voxels (default 5888)")
    ap.add_argument("--chunks", type=int, default=128)
    ap.add_argument("--region-sizes", default="400",
                    help="pass-1 block sides to plan (400: the default of analyze; 128: one chunk per block, "
                         "whose graph building grows about quadratically: hours at 97,336 blocks)")
    ap.add_argument("--block-counts", default="8,16,24",
                    help="blocks per axis of the block-count scaling (one 32^3 chunk per block; '' to skip)")
    ap.add_argument("--particle-counts", default="",
                    help="comma-separated particle counts for the client-side scaling (e.g. 1e5,1e6,1e7)")
    ap.add_argument("--no-scheduler", action="store_true", help="skip the scheduler memory measurement")
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--threads-per-node", type=int, default=32)
    ap.add_argument("--memory-per-node", type=int, default=256 * 2**30, help="bytes (default 256 GiB)")
    ap.add_argument("--fs-gbps", type=float, default=10.0, help="aggregate read bandwidth assumed, GB/s")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--particles", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    sizes = [int(x) for x in a.region_sizes.split(",") if x]
    if a.child:
        print(json.dumps(child(a.size, a.chunks, sizes[0], a.particles, not a.no_scheduler, a.nodes,
                               a.threads_per_node, a.memory_per_node)))
        return 0
    counts = [int(float(x)) for x in a.particle_counts.split(",") if x]
    res = run(a.size, a.chunks, sizes, counts, scheduler=not a.no_scheduler, nodes=a.nodes,
              threads_per_node=a.threads_per_node, memory_per_node=a.memory_per_node, fs_gbps=a.fs_gbps,
              block_counts=[int(x) for x in a.block_counts.split(",") if x])
    print(json.dumps(res))
    est = res["estimate"]
    print(f"estimate on {est['threads']} threads: compute {est['compute_seconds']:.1f} s, reads "
          f"{est['read_bytes'] / 1e9:.0f} GB at {est['fs_gbps']} GB/s = {est['read_seconds']:.1f} s; plan step share "
          + ", ".join(f"{v['plan_share_of_estimated_run']:.0%} (region size {v['region_size']})" for v in res["volumes"])
          + f"; statistics synthetic; load {res['load_start']}-{res['load_end']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
