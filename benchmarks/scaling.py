"""Strong scaling, 1 -> 2 threads, of the analysis on the embedded cluster, against ``edt``'s own.

    python benchmarks/scaling.py                       # the 800^3 phantom, benchmarks/_data/phantom_800
    python benchmarks/scaling.py --data DIR --repeat 3 # another volume (DIR/grey.zarr, DIR/labels.zarr)
    python benchmarks/scaling.py --processes           # also 2 worker processes x 1 thread
    python benchmarks/scaling.py --pin                 # the 1-thread runs confined to one CPU

The same analysis (``grapes_dask.analyze_tables(grey, labels, client=...)``) on the embedded
cluster's shape, ``distributed.LocalCluster(processes=False)`` with one worker inside the
client's process, as ``grapes_dask.cluster.cluster_client`` makes it:

- ``1x1``: one worker thread (``threads_per_worker=1``; otherwise the arguments of
  ``cluster_client``); with ``--pin`` the child process is confined to one CPU
  (``os.sched_setaffinity``), so that ``cluster_client()`` itself starts one thread and the
  scheduler and client share that CPU too;
- ``1x2``: ``cluster_client()`` as ``grapes-dask analyze`` starts it on this 2-core machine
  (one worker, a thread per core);
- ``2x1`` (``--processes``): ``cluster_client(workers=2)``, two worker processes of one thread
  (``grapes-dask analyze --workers 2``).

Each run is a fresh subprocess (RSS of its process tree sampled every 50 ms) that starts the
cluster, loads the kernels with a first analysis of a 96^3 crop (not timed), then times one
analysis of the whole volume. The configurations alternate, ``--repeat`` times each. Speedup =
t(1x1) / t(1x2), from the best times and from each repeat's pair.

Reference: ``edt.edt(labels, parallel=1)`` and ``parallel=2`` on the same labels, in memory,
alternating in one process, ``--repeat`` times each: the speedup two threads of a plain
parallel EDT reach on this machine (two vCPUs may share one physical core).

Prints one JSON line (``{"benchmark": "scaling", ...}``) and a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _measure  # noqa: E402

TARGET = 1.7
CONFIGS = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}  # name -> (workers, threads per worker)


# --------------------------------------------------------------------------------------------
# children
# --------------------------------------------------------------------------------------------


def _cluster(config: str, pin: bool):
    """The client's context manager for `config` (see the module docstring)."""
    import contextlib
    import logging

    from grapes_dask.cluster import cluster_client, cores

    workers, threads = CONFIGS[config]
    if config == "1x1" and pin:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    if workers == 1 and threads == cores():
        return cluster_client(dashboard=False)
    if workers > 1 and cores() // workers == threads:
        return cluster_client(workers=workers, dashboard=False)
    if workers != 1:
        raise SystemExit(f"{config}: {workers} workers x {threads} threads needs {workers * threads} cores, "
                         f"this process has {cores()}")

    @contextlib.contextmanager
    def one_worker():
        from distributed import Client, LocalCluster

        # the arguments of cluster_client for one worker, with `threads` threads instead of cores()
        cluster = LocalCluster(n_workers=1, threads_per_worker=threads, processes=False, memory_limit="auto",
                               silence_logs=logging.CRITICAL, dashboard_address="127.0.0.1:0",
                               scheduler_kwargs={"dashboard": False})
        with cluster, Client(cluster) as client:
            yield client

    return one_worker()


def child_table(data: Path, config: str, pin: bool, region_size: int, crop: int = 96) -> dict:
    import numpy as np

    import grapes_dask
    from grapes_dask.io import open_volume

    grey, labels = data / "grey.zarr", data / "labels.zarr"
    with _cluster(config, pin) as client:
        info = client.scheduler_info()["workers"].values()
        nthreads = [int(w["nthreads"]) for w in info]
        c = tuple(slice(0, crop) for _ in range(3))
        grapes_dask.analyze_tables(open_volume(grey)[c], open_volume(labels)[c], client=client,
                                   region_size=region_size)  # kernels loaded, cluster warm
        t0 = time.perf_counter()
        res = grapes_dask.analyze_tables(grey, labels, client=client, region_size=region_size)
        wall = time.perf_counter() - t0
    shape = open_volume(labels).shape
    return {"seconds": wall, "stages": res.timings, "particles": len(res.particles), "voxels": int(np.prod(shape)),
            "worker_threads": nthreads, "cpus": sorted(os.sched_getaffinity(0))}


def child_edt(data: Path, repeat: int) -> dict:
    import edt

    from grapes_dask.io import open_volume

    lab = open_volume(data / "labels.zarr").compute()
    times = {1: [], 2: []}
    for _ in range(repeat):
        for p in (1, 2):
            t0 = time.perf_counter()
            edt.edt(lab, parallel=p)
            times[p].append(time.perf_counter() - t0)
    return {"parallel_1": times[1], "parallel_2": times[2], "voxels": int(lab.size)}


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def _child(args: list[str]) -> dict:
    r = _measure.run_measured([sys.executable, str(Path(__file__).resolve()), *args])
    if r["returncode"] != 0:
        raise RuntimeError(f"scaling child {args} failed ({r['returncode']}):\n{r['stderr'][-3000:]}")
    out = json.loads(r["stdout"].strip().splitlines()[-1])
    out["peak_rss_gib"] = r["peak_rss"] / 2**30
    out["load"] = [r["load_before"], r["load_after"]]
    return out


def _speedups(t1: list, t2: list) -> dict:
    pairs = [a / b for a, b in zip(t1, t2)]
    return {"best": min(t1) / min(t2), "median": statistics.median(t1) / statistics.median(t2),
            "pairs": pairs, "range": [min(pairs), max(pairs)]}


def run(data: Path, *, repeat: int = 2, processes: bool = False, pin: bool = False, region_size: int = 400,
        log=print) -> dict:
    """The whole benchmark; returns the result dict (the JSON line)."""
    data = Path(data)
    if not (data / "labels.zarr").exists():
        raise FileNotFoundError(f"no volume at {data} (grey.zarr, labels.zarr): give --data DIR, or make the "
                                "800^3 phantom with benchmarks/engine.py")
    configs = ["1x1", "1x2"] + (["2x1"] if processes else [])
    runs = {c: [] for c in configs}
    res = {"benchmark": "scaling", "data": str(data), "repeat": repeat, "pin": pin, "region_size": region_size,
           "cpu_count": os.cpu_count(), "cpus": sorted(os.sched_getaffinity(0)), "load_start": _measure.load()}
    for i in range(repeat):
        for c in configs:
            r = _child(["--child", "table", "--config", c, "--data", str(data), "--region-size", str(region_size)]
                       + (["--pin"] if pin else []))
            runs[c].append(r)
            log(f"repeat {i + 1} {c}: {r['seconds']:.2f} s (threads {r['worker_threads']}, cpus {r['cpus']}, "
                f"load {r['load'][0]}-{r['load'][1]}, peak RSS {r['peak_rss_gib']:.2f} GiB)")
    e = _child(["--child", "edt", "--data", str(data), "--repeat", str(repeat)])
    log(f"edt parallel=1: {e['parallel_1']}, parallel=2: {e['parallel_2']} (load {e['load'][0]}-{e['load'][1]})")
    times = {c: [r["seconds"] for r in runs[c]] for c in configs}
    res["runs"] = runs
    res["seconds"] = times
    res["particles"] = runs["1x2"][0]["particles"]
    res["voxels"] = runs["1x2"][0]["voxels"]
    res["speedup"] = _speedups(times["1x1"], times["1x2"])
    if processes:
        res["speedup_2x1"] = _speedups(times["1x1"], times["2x1"])
    # per stage, from the best runs
    best = {c: min(runs[c], key=lambda r: r["seconds"]) for c in configs}
    res["stage_speedup"] = {k: best["1x1"]["stages"][k] / best["1x2"]["stages"][k]
                            for k in best["1x2"]["stages"] if best["1x2"]["stages"][k] > 0}
    res["edt"] = {**e, "speedup": _speedups(e["parallel_1"], e["parallel_2"])}
    res["relative_to_edt"] = res["speedup"]["best"] / res["edt"]["speedup"]["best"]
    res["target"] = TARGET
    res["target_met"] = res["speedup"]["best"] >= TARGET
    res["load_end"] = _measure.load()
    return res


def summary(res: dict) -> str:
    s, e = res["speedup"], res["edt"]["speedup"]
    t = res["seconds"]
    out = (f"strong scaling on {res['voxels'] / 1e6:.0f} Mvoxels ({res['particles']} particles): "
           f"1 thread {min(t['1x1']):.2f} s, 2 threads {min(t['1x2']):.2f} s (best of {res['repeat']}): "
           f"speedup {s['best']:.2f} (median {s['median']:.2f}, pairs {s['range'][0]:.2f}-{s['range'][1]:.2f}); "
           f"target {TARGET}: {'MET' if res['target_met'] else 'NOT MET'}")
    if "speedup_2x1" in res:
        out += f"; 2 processes x 1 thread {min(t['2x1']):.2f} s = {res['speedup_2x1']['best']:.2f}"
    out += (f"; edt parallel 1 -> 2 on the same labels: {e['best']:.2f} (pairs {e['range'][0]:.2f}-{e['range'][1]:.2f}); "
            f"analysis / edt speedup {res['relative_to_edt']:.2f}; pinned 1-thread runs: {res['pin']}; "
            f"load {res['load_start']}-{res['load_end']}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HERE / "_data" / "phantom_800",
                    help="volume folder with grey.zarr and labels.zarr (default benchmarks/_data/phantom_800)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--processes", action="store_true", help="also 2 worker processes x 1 thread")
    ap.add_argument("--pin", action="store_true", help="confine the 1-thread runs to one CPU")
    ap.add_argument("--region-size", type=int, default=400)
    ap.add_argument("--child", choices=["table", "edt"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", choices=list(CONFIGS), default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child == "table":
        print(json.dumps(child_table(a.data, a.config, a.pin, a.region_size)))
        return 0
    if a.child == "edt":
        print(json.dumps(child_edt(a.data, a.repeat)))
        return 0
    try:
        res = run(a.data, repeat=a.repeat, processes=a.processes, pin=a.pin, region_size=a.region_size)
    except FileNotFoundError as exc:
        print(f"scaling: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    print(summary(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
