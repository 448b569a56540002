"""Particle-table engine on the paper-scale phantom, against one in-memory ``edt.edt``.

Each measurement runs in its own subprocess; a sampler polls the resident memory of that
process and all its children (dask workers included) every 50 ms and reports the peak.

    python benchmarks/engine.py                # 800^3, ~10,000 particles, 2 workers
    python benchmarks/engine.py --size 400     # quicker look
    python benchmarks/engine.py --data DIR     # another volume (DIR/grey.zarr, DIR/labels.zarr)
    python benchmarks/engine.py --only edt,table-default,table-aniso   # anisotropic vs isotropic

Measurements (same run, same data read from Zarr):

- ``edt``: labels loaded into memory, one ``edt.edt(labels, parallel=cores)`` (timed call only);
- ``table-default``: ``grapes_dask.analyze_tables`` on the default (threaded) scheduler;
- ``table-client``: the same on the embedded ``distributed.LocalCluster`` of ``grapes-dask
  analyze`` (in the client's process, a thread per core) passed as ``client=``, warm (cluster
  started and kernels loaded by a first run on a small crop; the timed run is the second);
- ``table-aniso``: as ``table-default`` with ``spacing=--aniso`` (default ``1,0.8,0.8``), to set
  against ``table-default`` (unit spacing) on the same volume;

each table run then writes the particle table and the long ``layers`` and ``contacts`` tables
to Parquet as ``grapes-dask analyze`` does (``write`` seconds, not in the table time),

and, for the table runs, where the time goes: wall time of each stage and the summed task
time per kind of task (read = Zarr reads and slicing, pass1, pass2, combine) against the
available worker time (wall x workers); the rest is scheduling and idle time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(args: list[str]) -> dict:
    """Run ``python benchmarks/engine.py --child ...``; return its JSON result plus peak RSS."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, _tree_rss(ps))
            except psutil.Error:
                pass
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed with {proc.returncode}")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_gib"] = peak / 2**30
    return res


def _kind(key) -> str:
    name = key[0] if isinstance(key, tuple) else key
    name = str(name)
    for prefix, kind in (("_pass1_task", "pass1"), ("_pass2_task", "pass2"), ("combine_", "combine"),
                         ("_first", "combine"), ("_second", "combine")):
        if name.startswith(prefix):
            return kind
    return "read"  # open-/from-zarr/getitem/concatenate/finalize: reading and assembling blocks


def _write(res, out_dir: Path) -> float:
    """Write the tables as ``grapes-dask analyze`` does; seconds."""
    import tempfile

    from grapes_dask.output import companion_path, write_table

    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        out = Path(tmp) / "table.parquet"
        t0 = time.perf_counter()
        extra = {}
        for name in ("layers", "contacts"):
            t = getattr(res, name).copy()
            t.attrs = dict(res.particles.attrs)
            extra[name] = t
        write_table(res.particles, out, extra=extra)
        assert companion_path(out, "layers").exists()
        return time.perf_counter() - t0


def child(kind: str, data: Path, workers: int, region_size: int, aniso=(1.0, 0.8, 0.8)) -> dict:
    import numpy as np

    import grapes_dask
    from grapes_dask.io import open_volume

    grey, labels = data / "grey.zarr", data / "labels.zarr"
    if kind == "edt":
        import edt

        lab = open_volume(labels).compute()
        t0 = time.perf_counter()
        edt.edt(lab, parallel=workers)
        return {"seconds": time.perf_counter() - t0, "voxels": int(lab.size)}
    if kind in ("table-default", "table-aniso"):
        from dask.diagnostics import Profiler

        opts = {"spacing": aniso} if kind == "table-aniso" else {}
        with Profiler() as prof:
            t0 = time.perf_counter()
            res = grapes_dask.analyze_tables(grey, labels, region_size=region_size, **opts)
            wall = time.perf_counter() - t0
        tasks = {}
        for r in prof.results:
            tasks[_kind(r.key)] = tasks.get(_kind(r.key), 0.0) + (r.end_time - r.start_time)
        n_workers = len({r.worker_id for r in prof.results})
    else:
        from grapes_dask.cluster import cluster_client

        with cluster_client() as client:  # the embedded cluster of `grapes-dask analyze`
            g = open_volume(grey)[:96, :96, :96]
            lab = open_volume(labels)[:96, :96, :96]
            grapes_dask.analyze_tables(g, lab, client=client, region_size=region_size)  # warm up
            from distributed import get_task_stream

            with get_task_stream(client) as ts:
                t0 = time.perf_counter()
                res = grapes_dask.analyze_tables(grey, labels, client=client, region_size=region_size)
                wall = time.perf_counter() - t0
            tasks = {}
            for t in ts.data:
                dur = sum(s["stop"] - s["start"] for s in t["startstops"] if s["action"] == "compute")
                tasks[_kind(t["key"])] = tasks.get(_kind(t["key"]), 0.0) + dur
            n_workers = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
    shape = open_volume(labels).shape
    write = _write(res, data.parent if os.access(data.parent, os.W_OK) else Path("/tmp"))
    return {"seconds": wall, "particles": len(res.particles), "voxels": int(np.prod(shape)),
            "stages": res.timings, "write": write, "task_seconds": tasks, "workers": n_workers}


def ensure_phantom(data: Path, size: int) -> None:
    if (data / "labels.zarr").exists():
        return
    from grapes_dask import synthetic

    data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ph = synthetic.make_phantom(data, shape=(size, size, size), seed=0, chunks=128, progress=True)
    print(f"phantom {size}^3 with {len(ph.truth)} particles in {time.perf_counter() - t0:.1f} s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=800)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--region-size", type=int, default=400)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--only", default="edt,table-default,table-client")
    ap.add_argument("--aniso", default="1,0.8,0.8", help="spacing of the table-aniso run")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    data = a.data or HERE / "_data" / f"phantom_{a.size}"
    if a.child:
        aniso = tuple(float(x) for x in a.aniso.split(","))
        print(json.dumps(child(a.child, data, a.workers, a.region_size, aniso)))
        return
    ensure_phantom(data, a.size)
    print(f"machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB; python {platform.python_version()}")
    results = {}
    for kind in a.only.split(","):
        r = run_measured(["--child", kind, "--size", str(a.size), "--workers", str(a.workers),
                          "--region-size", str(a.region_size), "--data", str(data), "--aniso", a.aniso])
        results[kind] = r
        print(kind, json.dumps(r), flush=True)
    print(f"load average at the end: {os.getloadavg()}")
    e = results["edt"]["seconds"] if "edt" in results else None
    for kind in ("table-default", "table-client", "table-aniso"):
        if kind in results:
            r = results[kind]
            st = r["stages"]
            fixed = st.get("plan", 0) + st.get("finish", 0) + r["write"]
            ratio = f" = {r['seconds'] / e:.2f} x edt ({e:.1f} s)" if e else ""
            print(f"{kind}: {r['seconds']:.1f} s{ratio}, {r['particles']} particles, "
                  f"{r['particles'] / r['seconds']:.0f} particles/s, peak RSS {r['peak_rss_gib']:.2f} GiB; "
                  + ", ".join(f"{k} {v:.2f}" for k, v in st.items())
                  + f", write {r['write']:.2f} s; plan+finish+write {fixed:.2f} s = "
                  f"{100 * fixed / (r['seconds'] + r['write']):.0f}% of table+write")
    if "table-aniso" in results and "table-default" in results:
        print(f"anisotropic / isotropic: {results['table-aniso']['seconds'] / results['table-default']['seconds']:.2f}")
    if e:
        print(f"edt process peak RSS {results['edt']['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
