"""What the user's command costs beyond the engine: first-run compilation and the CLI's overhead.

    python benchmarks/startup.py                       # both parts, 800^3 phantom, 2 repeats
    python benchmarks/startup.py --only compile        # first run on an empty Numba cache only
    python benchmarks/startup.py --only cli --size 400 --repeats 3

Every measurement runs in a fresh subprocess.

1. ``compile``: a small phantom (``--small``, 64^3) analysed with ``analyze_tables`` (threaded
   scheduler) in a process whose ``NUMBA_CACHE_DIR`` is a new empty folder: the first call
   (everything compiled), a second call in the same process, then a new process on the now filled
   cache (kernels loaded, not compiled). Once with the pass-2 precompile helper (the default) and
   once without (``GRAPES_DASK_PRECOMPILE=0``). ``--attribute`` lists the compile time of every
   kernel (Numba's compile events; exclusive of the kernels it calls).
2. ``cli``: on the phantom (``--size``, read from Zarr): ``analyze_tables`` on the threaded
   scheduler and on the embedded cluster of ``grapes-dask analyze`` (in-process, no dashboard),
   each warm (kernels loaded by a first run on a 96^3 crop; the timed call is the second), and the
   whole command ``python -m grapes_dask analyze GREY LABELS --out T.parquet --quiet``, process
   start to exit, on a warm cache; plus ``import grapes_dask.cli`` and ``--help``, and the
   command's stages (``--trace``: timestamps since process start of imports, input checks,
   cluster start, engine, writing, exit).

Prints markdown tables with the machine and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _child(args: list[str], **env) -> dict:
    r = subprocess.run([PY, __file__, "--child", *args], capture_output=True, text=True, env=_env(**env))
    if r.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _wall(cmd: list[str], **env) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(**env))
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{r.stderr}")
    return dt


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _range(xs) -> str:
    xs = sorted(xs)
    return f"{xs[0]:.2f}" if len(xs) == 1 or round(xs[0], 2) == round(xs[-1], 2) else f"{xs[0]:.2f}-{xs[-1]:.2f}"


# --------------------------------------------------------------------------------------------
# children
# --------------------------------------------------------------------------------------------


def _compile_listener():
    """Record Numba's compile events: (kernel, seconds exclusive of nested compiles)."""
    import threading

    from numba.core import event as ev

    records, stacks = [], {}

    class Listener(ev.Listener):
        def on_start(self, e):
            stacks.setdefault(threading.get_ident(), []).append([time.perf_counter(), 0.0])

        def on_end(self, e):
            st = stacks[threading.get_ident()]
            t, child = st.pop()
            dt = time.perf_counter() - t
            if st:
                st[-1][1] += dt
            disp = (e.data or {}).get("dispatcher")
            name = getattr(getattr(disp, "py_func", None), "__qualname__", str(disp))
            records.append((name, dt - child, not st))

    ev.register("numba:compile", Listener())
    return records


def child_first(data: str, attribute: bool) -> dict:
    t0 = time.perf_counter()
    records = _compile_listener()
    import dask

    from grapes_dask import analyze_tables

    import resource

    t1, c1 = time.perf_counter(), time.process_time()
    with dask.config.set(scheduler="threads"):
        analyze_tables(f"{data}/grey.zarr", f"{data}/labels.zarr")
        t2, c2 = time.perf_counter(), time.process_time()
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # the helper, if one ran (waited for)
        analyze_tables(f"{data}/grey.zarr", f"{data}/labels.zarr")
        t3 = time.perf_counter()
    per = {}
    for name, dt, _ in records:
        per[name] = per.get(name, 0.0) + dt
    out = {"import": t1 - t0, "first": t2 - t1, "second": t3 - t2, "compile": sum(per.values()),
           "versions": len(records), "cpu": c2 - c1, "helper_cpu": ru.ru_utime + ru.ru_stime}
    if attribute:
        out["per_kernel"] = dict(sorted(per.items(), key=lambda kv: -kv[1]))
    return out


def child_engine(data: str, where: str) -> dict:
    import dask

    import grapes_dask
    from grapes_dask.io import open_volume

    grey, labels = f"{data}/grey.zarr", f"{data}/labels.zarr"
    crop = (slice(0, 96),) * 3

    def run(client):
        grapes_dask.analyze_tables(open_volume(grey)[crop], open_volume(labels)[crop], client=client)  # warm up
        t0 = time.perf_counter()
        res = grapes_dask.analyze_tables(grey, labels, client=client)
        return {"seconds": time.perf_counter() - t0, "particles": len(res.particles), "stages": res.timings}

    if where == "threaded":
        with dask.config.set(scheduler="threads"):
            return run(None)
    from grapes_dask.cluster import cluster_client

    with cluster_client(dashboard=False) as client:
        return run(client)


_TRACE = r"""
import atexit, contextlib, functools, json, os, sys, time
T0 = float(os.environ["STARTUP_T0"])
marks = [("interpreter up", time.time() - T0)]
def mark(what): marks.append((what, time.time() - T0))
import grapes_dask.cli as cli
mark("import grapes_dask.cli")
import grapes_dask.cluster as cluster, grapes_dask.output as output, grapes_dask.table as table
mark("import table, output, cluster")
def wrap(mod, name):
    f = getattr(mod, name)
    @functools.wraps(f)
    def g(*a, **k):
        mark(name + " start")
        try:
            return f(*a, **k)
        finally:
            mark(name + " end")
    setattr(mod, name, g)
for m, n in ((table, "check_inputs"), (table, "analyze_tables"), (output, "write_table")):
    wrap(m, n)
cc = cluster.cluster_client
@contextlib.contextmanager
def traced(*a, **k):
    mark("cluster start")
    with cc(*a, **k) as c:
        mark("cluster up")
        yield c
    mark("cluster closed")
cluster.cluster_client = traced
atexit.register(lambda: print(json.dumps(marks + [("exit handlers", time.time() - T0)]), file=sys.stderr))
cli.main(sys.argv[1:])
"""


def trace_cli(args: list[str]) -> dict:
    """The command's stages: seconds since the process started, and its end."""
    t0 = time.time()
    r = subprocess.run([PY, "-c", _TRACE, *args], capture_output=True, text=True, env=_env(STARTUP_T0=t0))
    end = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    marks = json.loads(r.stderr.strip().splitlines()[-1])
    return {"marks": marks, "process end": end}


# --------------------------------------------------------------------------------------------
# parts
# --------------------------------------------------------------------------------------------


def part_compile(a) -> None:
    small = Path(tempfile.mkdtemp(prefix="startup_small_"))
    subprocess.run([PY, "-m", "grapes_dask", "synth", str(small), "--size", *[str(a.small)] * 3, "--quiet",
                    "--overwrite"], check=True, capture_output=True, env=_env())
    rows = {}
    try:
        for r in range(a.repeats):
            for mode, env in (("pass-2 helper (GRAPES_DASK_PRECOMPILE=always)", {"GRAPES_DASK_PRECOMPILE": "always"}),
                              ("no helper (GRAPES_DASK_PRECOMPILE=0)", {"GRAPES_DASK_PRECOMPILE": "0"})):
                cache = tempfile.mkdtemp(prefix="startup_numba_")
                try:
                    first = _child(["first", str(small)] + (["--attribute"] if a.attribute else []),
                                   NUMBA_CACHE_DIR=cache, **env)
                    warm = _child(["first", str(small)], NUMBA_CACHE_DIR=cache, **env)
                finally:
                    shutil.rmtree(cache, ignore_errors=True)
                rows.setdefault(mode, []).append((first, warm, _load()))
                print(f"  {mode}, repeat {r + 1}: first {first['first']:.2f} s (CPU {first['cpu']:.2f} s, helper "
                      f"{first['helper_cpu']:.2f} s; compile events {first['compile']:.2f} s, {first['versions']} "
                      f"versions), second {first['second']:.3f} s; "
                      f"new process on the filled cache: first {warm['first']:.2f} s; load {_load()}", flush=True)
                if a.attribute and "per_kernel" in first:
                    for name, dt in list(first["per_kernel"].items())[:25]:
                        print(f"      {dt:6.3f} s  {name}")
    finally:
        shutil.rmtree(small, ignore_errors=True)
    print(f"\n### First run on an empty Numba cache ({a.small}^3 phantom, `analyze_tables`, threaded scheduler)\n")
    print("| | empty cache: first call | its CPU time, this process + helper | compiled in this process (events) "
          "| same process: second call | new process, filled cache: first call | import |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, rs in rows.items():
        print(f"| {mode} | {_range([f['first'] for f, _, _ in rs])} s | {_range([f['cpu'] for f, _, _ in rs])} + "
              f"{_range([f['helper_cpu'] for f, _, _ in rs])} s | {_range([f['compile'] for f, _, _ in rs])} s "
              f"| {_range([f['second'] for f, _, _ in rs])} s | {_range([w['first'] for _, w, _ in rs])} s "
              f"| {_range([f['import'] for f, _, _ in rs])} s |")
    print(f"\nload average after: {_load()}")


def part_cli(a) -> None:
    data = a.data or HERE / "_data" / f"phantom_{a.size}"
    if not (data / "labels.zarr").exists():
        from grapes_dask import synthetic

        data.mkdir(parents=True, exist_ok=True)
        synthetic.make_phantom(data, shape=(a.size,) * 3, seed=0, chunks=128, progress=True)
    out = Path(tempfile.mkdtemp(prefix="startup_cli_"))
    cmd = [PY, "-m", "grapes_dask", "analyze", str(data / "grey.zarr"), str(data / "labels.zarr"), "--out",
           str(out / "t.parquet"), "--quiet", "--overwrite"]
    res = {k: [] for k in ("threaded", "cluster", "cli", "import", "help")}
    traces = []
    try:
        for r in range(a.repeats):
            res["threaded"].append(_child(["engine", str(data), "threaded"]))
            res["cluster"].append(_child(["engine", str(data), "cluster"]))
            res["cli"].append(_wall(cmd))
            res["import"].append(_wall([PY, "-c", "import grapes_dask.cli"]))
            res["help"].append(_wall([PY, "-m", "grapes_dask", "--help"]))
            if a.trace:
                traces.append(trace_cli(cmd[3:]))
            print(f"  repeat {r + 1}: threaded {res['threaded'][-1]['seconds']:.2f} s, cluster "
                  f"{res['cluster'][-1]['seconds']:.2f} s, command {res['cli'][-1]:.2f} s; load {_load()}", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    n = res["cluster"][0]["particles"]
    print(f"\n### The command against the engine ({data.name}, {n} particles, Zarr)\n")
    print("| run | " + " | ".join(f"repeat {i + 1}" for i in range(a.repeats)) + " | range |")
    print("| --- |" + " ---: |" * (a.repeats + 1))
    rows = [("`analyze_tables`, threaded scheduler, warm", [x["seconds"] for x in res["threaded"]]),
            ("`analyze_tables`, embedded cluster (in-process, no dashboard), warm",
             [x["seconds"] for x in res["cluster"]]),
            ("`grapes-dask analyze ... --quiet`, process start to exit", res["cli"]),
            ("command minus embedded-cluster engine", [c - e["seconds"] for c, e in zip(res["cli"], res["cluster"])]),
            ("`python -c 'import grapes_dask.cli'`", res["import"]),
            ("`grapes-dask --help`", res["help"])]
    for name, xs in rows:
        print(f"| {name} | " + " | ".join(f"{x:.2f} s" for x in xs) + f" | {_range(xs)} s |")
    for i, t in enumerate(traces):
        print(f"\nstages of the command, repeat {i + 1} (seconds since the process started):\n")
        prev = 0.0
        for what, at in t["marks"] + [["process end", t["process end"]]]:
            print(f"    {at:7.2f}  (+{at - prev:5.2f})  {what}")
            prev = at
    print(f"\nload average after: {_load()}")


def machine() -> str:
    import numba
    import numpy
    import dask

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {mem:.0f} GiB; Python {platform.python_version()}, "
            f"numpy {numpy.__version__}, numba {numba.__version__}, dask {dask.__version__}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="compile,cli", help="compile, cli or both (comma-separated)")
    ap.add_argument("--small", type=int, default=64, help="side of the phantom of the compile part")
    ap.add_argument("--size", type=int, default=800, help="side of the phantom of the cli part")
    ap.add_argument("--data", type=Path, default=None, help="folder with grey.zarr and labels.zarr (cli part)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--attribute", action="store_true", help="compile time per kernel (compile part)")
    ap.add_argument("--trace", action="store_true", help="stages of the command (cli part)")
    ap.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        if kind == "first":
            print(json.dumps(child_first(rest[0], a.attribute)))
        elif kind == "engine":
            print(json.dumps(child_engine(rest[0], rest[1])))
        return
    print(f"machine: {machine()}; load average before: {_load()}", flush=True)
    parts = a.only.split(",")
    if "compile" in parts:
        part_compile(a)
    if "cli" in parts:
        part_cli(a)


if __name__ == "__main__":
    main()
