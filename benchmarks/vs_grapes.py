"""GRAPES' ``GRAPES()`` and ``grapes-dask analyze`` side by side on the same phantom.

    python benchmarks/vs_grapes.py --grapes ~/src/GRAPES             # 800^3 phantom (made once)
    python benchmarks/vs_grapes.py --grapes ~/src/GRAPES --size 200  # quick check
    python benchmarks/vs_grapes.py --grapes ~/src/GRAPES --data DIR  # DIR/grey.zarr, DIR/labels.zarr

``--grapes`` is a checkout of github MPJ-Imaging/GRAPES (its ``GRAPES.py`` is imported from
there, in the GRAPES subprocess only; nothing of it is part of this project). GRAPES needs,
besides this project's dependencies, ``joblib`` and ``SimpleITK`` (imported, unused by
``GRAPES()``): ``pip install joblib SimpleITK``.

Each run is its own subprocess, timed from start to exit, with the peak resident memory of its
whole process tree (GRAPES' joblib workers, the CLI's dask worker) sampled every 50 ms, and
the tree's CPU time (which other jobs on the machine disturb less than the wall time):

- GRAPES: both volumes read from Zarr into memory (as ``GRAPES()`` needs them), one
  ``GRAPES(labels, grey)`` with its defaults (the call timed on its own), and its table (without
  the crops and distance maps it stores per particle) written with ``DataFrame.to_pickle``;
- grapes-dask: ``grapes-dask analyze GREY LABELS --out T.parquet --quiet``, the installed
  command (its Numba cache warmed first on a 64^3 phantom, not counted; ``--no-warmup`` skips it).

Then every particle, matched by label: voxel count, mean grey level, and the radial profile
(each layer's mean grey level). GRAPES stores profiles in float32; a layer is equal when our
float64 mean rounded to float32 is GRAPES' value. Where the two differ on purpose
(docs/design.md, docs/guide.md section 7) the comparison says so: a layer without voxels is
NaN here and 0 in GRAPES; ``radial_max`` normalisation is NaN here and zeros in GRAPES when no
layer is brighter than the surface. With the defaults used here (voxel size 1, layers from the
edge, black border) GRAPES' layers are the same as ours, so with integer grey levels every
volume, mean and profile must be equal (the script exits with status 1 otherwise). If the
stores carry another voxel size, grapes-dask is given ``--spacing 1``: GRAPES' defaults count
in voxels. With float grey levels GRAPES sums each layer in float32, so its profiles then carry
float32 summation errors beyond the final rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- measuring


def _tree_sample(proc, cpu: dict) -> int:
    """Resident memory of `proc` and its descendants, bytes; records each one's CPU time in `cpu`."""
    import psutil

    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            with p.oneshot():
                total += p.memory_info().rss
                t = p.cpu_times()
            cpu[(p.pid, p.create_time())] = t.user + t.system
        except psutil.Error:
            pass
    return total


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd` as a subprocess: wall time start to exit, peak RSS and CPU time of its process tree.

    The CPU time (user + system, summed over the processes of the tree as last seen by the
    50 ms sampler; a process's last 50 ms may be missed) depends little on other jobs' load.
    """
    import psutil

    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ps = psutil.Process(proc.pid)
    peak = 0
    cpu: dict = {}
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, _tree_sample(ps, cpu))
            except psutil.Error:
                pass
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    if proc.returncode != 0:
        sys.stderr.write(err[-5000:])
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return {"wall_s": wall, "peak_rss_bytes": peak, "cpu_s": sum(cpu.values()), "stdout": out, "stderr": err,
            "load_before": load, "load_after": os.getloadavg()[0]}


# --------------------------------------------------------------------------- GRAPES child

# Columns of GRAPES' table kept on disk; it also stores per particle the mask, the grey crop
# and the distance map ('image', 'image_intensity', 'radial_layers_dt'), not needed here.
GRAPES_KEEP = ["label", "volume", "intensity_mean", "intensity_min", "intensity_max",
               "radial_layers", "radial_layers_graylevel", "radial_layers_graylevelnormed"]


def grapes_child(grapes: str, grey: str, labels: str, out: str) -> dict:
    """In the GRAPES subprocess: read both volumes, call ``GRAPES()``, write its table."""
    import numpy as np
    import zarr

    t0 = time.perf_counter()
    g = np.asarray(zarr.open_array(grey, mode="r")[...])
    lab = np.asarray(zarr.open_array(labels, mode="r")[...])
    t_read = time.perf_counter() - t0
    sys.path.insert(0, grapes)
    t0 = time.perf_counter()
    from GRAPES import GRAPES  # noqa: N811 (GRAPES' own name)

    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    df = GRAPES(lab, g)
    t_call = time.perf_counter() - t0
    t0 = time.perf_counter()
    df[[c for c in GRAPES_KEEP if c in df.columns]].to_pickle(out)
    t_write = time.perf_counter() - t0
    return {"read_s": t_read, "import_s": t_import, "call_s": t_call, "write_s": t_write,
            "particles": len(df), "shape": list(g.shape), "grey_dtype": str(g.dtype),
            "labels_dtype": str(lab.dtype)}


# --------------------------------------------------------------------------- comparison


def _as_float_list(v) -> "np.ndarray":
    import numpy as np

    if v is None:
        return np.zeros(0)
    return np.asarray(v, dtype=np.float64).ravel()


def compare_tables(ours, grapes) -> dict:
    """Compare grapes-dask's particle table with GRAPES' one, particle by particle.

    Parameters
    ----------
    ours : pandas.DataFrame
        grapes-dask table: ``label``, ``voxel_count``, ``intensity_mean``,
        ``radial_layers_graylevel`` (one float64 array per particle: the mean grey of layers
        1..K), optionally ``radial_layers_count`` (voxels per layer) and
        ``radial_layers_graylevelnormed``.
    grapes : pandas.DataFrame
        GRAPES table: ``label``, ``volume`` (voxel count), ``intensity_mean`` and
        ``radial_layers_graylevel`` (one float32 array per particle), optionally
        ``radial_layers_graylevelnormed``.

    Returns
    -------
    dict
        Counts and largest differences: ``common`` particles (matched by label),
        ``only_ours`` / ``only_grapes`` (sorted label lists); ``volume_equal``;
        ``mean_equal`` (bitwise float64), ``mean_close`` (relative difference <= 1e-12),
        ``mean_max_abs`` / ``mean_max_rel``; ``profile_equal`` (particles with as many layers
        and every layer equal: our mean rounded to float32 is GRAPES' value),
        ``profile_length_differs``, ``layers_compared``, ``layers_equal``,
        ``empty_layers`` (layers without voxels: NaN here, 0 in GRAPES, counted as equal),
        ``profile_max_abs`` / ``profile_max_rel`` (our float64 against GRAPES' float32),
        ``profile_mismatch_labels`` (up to 20); for the normalised profiles
        ``normed_undefined`` (NaN here and all zeros in GRAPES: ``radial_max`` undefined),
        ``normed_defined`` (both finite) and ``normed_max_abs`` among those, ``normed_other``
        (any other pattern).
    """
    import numpy as np

    o = ours.set_index(ours["label"].astype(np.int64))
    g = grapes.set_index(grapes["label"].astype(np.int64))
    lo, lg = set(o.index), set(g.index)
    common = np.array(sorted(lo & lg), dtype=np.int64)
    res = {"ours": len(o), "grapes": len(g), "common": int(common.size),
           "only_ours": sorted(int(x) for x in lo - lg),
           "only_grapes": sorted(int(x) for x in lg - lo)}
    o, g = o.loc[common], g.loc[common]

    vo = o["voxel_count"].to_numpy(np.float64)
    vg = g["volume"].to_numpy(np.float64)
    res["volume_equal"] = int(np.sum(vo == vg))
    res["volume_max_abs"] = float(np.max(np.abs(vo - vg), initial=0.0))

    mo = o["intensity_mean"].to_numpy(np.float64)
    mg = g["intensity_mean"].to_numpy(np.float64)
    dm = np.abs(mo - mg)
    rel = dm / np.maximum(np.abs(mg), np.finfo(np.float64).tiny)
    res["mean_equal"] = int(np.sum(mo == mg))
    res["mean_close"] = int(np.sum(rel <= 1e-12))
    res["mean_max_abs"] = float(np.max(dm, initial=0.0))
    res["mean_max_rel"] = float(np.max(rel, initial=0.0))

    counts = o["radial_layers_count"] if "radial_layers_count" in o.columns else None
    n_equal = n_len = n_layers = n_layers_eq = n_empty = 0
    max_abs = max_rel = 0.0
    mismatch = []
    for i, lab in enumerate(common):
        po = _as_float_list(o["radial_layers_graylevel"].iat[i])
        pg = _as_float_list(g["radial_layers_graylevel"].iat[i])
        if po.size != pg.size:
            n_len += 1
            mismatch.append(int(lab))
            continue
        co = _as_float_list(counts.iat[i]) if counts is not None else np.where(np.isnan(po), 0, 1)
        empty = (co == 0) & np.isnan(po) & (pg == 0)
        full = ~empty
        eq = empty.copy()
        eq[full] = po[full].astype(np.float32).astype(np.float64) == pg[full]
        d = np.abs(po[full] - pg[full])
        r = d / np.maximum(np.abs(pg[full]), np.finfo(np.float64).tiny)
        if d.size:
            max_abs = max(max_abs, float(np.nanmax(d)) if np.isfinite(d).any() else np.inf)
            max_rel = max(max_rel, float(np.nanmax(r)) if np.isfinite(r).any() else np.inf)
            if np.isnan(d).any():
                max_abs = max_rel = np.inf
        n_layers += po.size
        n_layers_eq += int(eq.sum())
        n_empty += int(empty.sum())
        if eq.all():
            n_equal += 1
        else:
            mismatch.append(int(lab))
    res.update(profile_equal=n_equal, profile_length_differs=n_len, layers_compared=n_layers,
               layers_equal=n_layers_eq, empty_layers=n_empty, profile_max_abs=max_abs,
               profile_max_rel=max_rel, profile_mismatch_labels=mismatch[:20])

    if "radial_layers_graylevelnormed" in o.columns and "radial_layers_graylevelnormed" in g.columns:
        und = dfd = other = 0
        nmax = 0.0
        for i in range(common.size):
            no = _as_float_list(o["radial_layers_graylevelnormed"].iat[i])
            ng = _as_float_list(g["radial_layers_graylevelnormed"].iat[i])
            if no.size == ng.size and np.isnan(no).all() and (ng == 0).all():
                und += 1
            elif no.size == ng.size and np.isfinite(no).all() and np.isfinite(ng).all():
                dfd += 1
                if no.size:
                    nmax = max(nmax, float(np.max(np.abs(no - ng))))
            else:
                other += 1
        res.update(normed_undefined=und, normed_defined=dfd, normed_other=other, normed_max_abs=nmax)
    return res


def comparison_ok(c: dict) -> bool:
    """True when every particle is in both tables and every volume, mean and profile is equal."""
    n = c["common"]
    return (not c["only_ours"] and not c["only_grapes"] and c["volume_equal"] == n
            and c["mean_close"] == n and c["profile_equal"] == n)


def comparison_markdown(c: dict) -> str:
    """The comparison as a markdown table."""
    def g(x):
        return f"{x:.3g}"

    n = c["common"]
    rows = [
        "| quantity | particles compared | equal | max abs diff | max rel diff |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| volume (voxel count) | {n:,} | {c['volume_equal']:,} | {g(c['volume_max_abs'])} | - |",
        f"| mean grey level (float64) | {n:,} | {c['mean_equal']:,} bitwise, {c['mean_close']:,} within 1e-12 "
        f"| {g(c['mean_max_abs'])} | {g(c['mean_max_rel'])} |",
        f"| radial profile (each layer's mean grey; equal = ours rounded to float32 is GRAPES') | {n:,} "
        f"| {c['profile_equal']:,} particles; {c['layers_equal']:,} of {c['layers_compared']:,} layers "
        f"| {g(c['profile_max_abs'])} | {g(c['profile_max_rel'])} |",
    ]
    if "normed_undefined" in c:
        rows.append(
            f"| normalised profile (radial_max) | {n:,} | {c['normed_defined']:,} defined in both "
            f"(max abs diff {g(c['normed_max_abs'])}); {c['normed_undefined']:,} undefined: NaN here, "
            f"zeros in GRAPES (documented); {c['normed_other']:,} other | {g(c['normed_max_abs'])} | - |")
    notes = [f"particles: {c['ours']:,} in grapes-dask's table, {c['grapes']:,} in GRAPES'; "
             f"only in grapes-dask: {c['only_ours'][:20] or 'none'}; only in GRAPES: {c['only_grapes'][:20] or 'none'}",
             f"profiles with a different number of layers: {c['profile_length_differs']}; "
             f"empty layers (NaN here, 0 in GRAPES, counted as equal): {c['empty_layers']}"]
    if c["profile_mismatch_labels"]:
        notes.append(f"first labels whose profiles differ: {c['profile_mismatch_labels']}")
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {x}" for x in notes)


# --------------------------------------------------------------------------- data and machine


def ensure_phantom(data: Path, size: int) -> None:
    if (data / "labels.zarr").exists() and (data / "grey.zarr").exists():
        return
    from grapes_dask import synthetic

    data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ph = synthetic.make_phantom(data, shape=(size, size, size), seed=0, chunks=128, progress=size >= 400)
    print(f"phantom {size}^3 with {len(ph.truth)} particles written to {data} in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)


def machine() -> dict:
    import numpy as np
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib import metadata

    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for dist in ("grapes-dask", "dask", "numba", "edt", "scikit-image", "scipy", "pandas", "joblib",
                 "SimpleITK", "zarr"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "missing"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"cpu": cpu, "cores": cores, "ram_gib": psutil.virtual_memory().total / 2**30,
            "versions": versions}


def analyze_command() -> list[str]:
    exe = shutil.which("grapes-dask")
    return [exe] if exe else [sys.executable, "-m", "grapes_dask"]


def _remove_outputs(t: Path) -> None:
    for p in (t, t.with_suffix(".layers.parquet"), t.with_suffix(".contacts.parquet")):
        if p.exists():
            p.unlink()


def voxel_units(grey: Path, labels: Path) -> list[str]:
    """``["--spacing", "1"]`` when a store carries a voxel size other than 1, else ``[]``.

    GRAPES' defaults (``anisotropy=(1, 1, 1)``, ``pixel_size=None``) count layers in voxels;
    with another voxel size grapes-dask's layers would be in its units, so it is told 1 too.
    """
    from grapes_dask.io import read_spacing

    for src in (grey, labels):
        sp = read_spacing(src)
        if sp is not None and any(float(x) != 1.0 for x in sp):
            return ["--spacing", "1"]
    return []


def run_analyze(grey: Path, labels: Path, out: Path, extra: list[str] = ()) -> dict:
    _remove_outputs(out)
    cmd = analyze_command() + ["analyze", str(grey), str(labels), "--out", str(out), "--quiet", *extra]
    r = run_measured(cmd)
    m = re.search(r"in ([0-9.]+) s", r["stdout"])
    r["engine_s"] = float(m.group(1)) if m else None  # the time its closing line reports
    r["command"] = cmd
    return r


def run_grapes(grapes: Path, grey: Path, labels: Path, out: Path) -> dict:
    if out.exists():
        out.unlink()
    env = dict(os.environ, MPLBACKEND="Agg")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-grapes", str(grapes),
           str(grey), str(labels), str(out)]
    r = run_measured(cmd, env=env)
    r.update(json.loads(r["stdout"].strip().splitlines()[-1]))
    return r


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grapes", type=Path, help="checkout of github MPJ-Imaging/GRAPES (folder holding GRAPES.py)")
    ap.add_argument("--size", type=int, default=800, help="phantom side, voxels (made once into the cache)")
    ap.add_argument("--data", type=Path, default=None, help="folder with grey.zarr and labels.zarr (overrides --size)")
    ap.add_argument("--cache", type=Path, default=HERE / "_data", help="where phantoms and tables go")
    ap.add_argument("--repeat", type=int, default=1, help="run both K times (each reported)")
    ap.add_argument("--skip-grapes", action="store_true",
                    help="run only grapes-dask; compare with a GRAPES table of an earlier run if there is one")
    ap.add_argument("--no-warmup", action="store_true", help="do not warm the Numba cache first")
    ap.add_argument("--json", type=Path, default=None, help="also write all figures to this JSON file")
    ap.add_argument("--child-grapes", nargs=4, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_grapes:
        print(json.dumps(grapes_child(*a.child_grapes)))
        return 0

    import pandas as pd

    if not a.skip_grapes:
        if a.grapes is None or not (a.grapes / "GRAPES.py").is_file():
            ap.error("--grapes PATH must be a checkout of github MPJ-Imaging/GRAPES (with GRAPES.py); "
                     "or give --skip-grapes")
    data = (a.data or a.cache / f"phantom_{a.size}").resolve()
    if a.data is None:
        ensure_phantom(data, a.size)
    grey, labels = data / "grey.zarr", data / "labels.zarr"
    if not (grey.exists() and labels.exists()):
        ap.error(f"--data {data} must hold grey.zarr and labels.zarr")
    work = a.cache.resolve() / f"vs_grapes_{data.name}"
    work.mkdir(parents=True, exist_ok=True)

    if not a.no_warmup:
        wdata = a.cache.resolve() / "phantom_64"
        ensure_phantom(wdata, 64)
        t0 = time.perf_counter()
        run_analyze(wdata / "grey.zarr", wdata / "labels.zarr", work / "warmup.parquet")
        print(f"warm-up: grapes-dask analyze on 64^3 in {time.perf_counter() - t0:.1f} s (not counted)", flush=True)

    units = voxel_units(grey, labels)
    if units:
        print("the stores carry a voxel size other than 1: grapes-dask is run with --spacing 1, "
              "as GRAPES' defaults count layers in voxels", flush=True)
    mach = machine()
    import zarr

    shape = tuple(zarr.open_array(labels, mode="r").shape)
    print(f"data: {data} ({'x'.join(map(str, shape))})", flush=True)
    runs = []
    gtab = work / "grapes.pkl"
    for k in range(a.repeat):
        run = {}
        if not a.skip_grapes:
            gt = work / f"grapes_{k}.pkl"
            r = run_grapes(a.grapes.resolve(), grey, labels, gt)
            shutil.copyfile(gt, gtab)
            run["grapes"] = {x: v for x, v in r.items() if x not in ("stdout", "stderr")}
            print(f"[{k + 1}] GRAPES: {r['wall_s']:.1f} s (GRAPES() {r['call_s']:.1f} s, CPU {r['cpu_s']:.1f} s), "
                  f"peak {gib(r['peak_rss_bytes'])}, load {r['load_before']:.2f} -> {r['load_after']:.2f}", flush=True)
        out = work / f"grapes_dask_{k}.parquet"
        r = run_analyze(grey, labels, out, units)
        run["grapes_dask"] = {x: v for x, v in r.items() if x not in ("stderr",)}
        print(f"[{k + 1}] grapes-dask analyze: {r['wall_s']:.1f} s (its own figure {r['engine_s']} s, "
              f"CPU {r['cpu_s']:.1f} s), "
              f"peak {gib(r['peak_rss_bytes'])}, load {r['load_before']:.2f} -> {r['load_after']:.2f}", flush=True)
        gfile = work / f"grapes_{k}.pkl" if not a.skip_grapes else gtab
        if gfile.exists():
            c = compare_tables(pd.read_parquet(out), pd.read_pickle(gfile))
            run["comparison"] = c
            run["comparison_ok"] = comparison_ok(c)
        runs.append(run)

    # ----- report
    v = mach["versions"]
    print()
    print(f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['ram_gib']:.0f} GiB RAM; "
          + ", ".join(f"{m} {x}" for m, x in v.items()) + f"; load average now "
          + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"Data: {data}, {'x'.join(map(str, shape))} voxels; grapes-dask run as: "
          + " ".join(runs[0]["grapes_dask"]["command"]))
    print()
    print("| run | wall, process start to exit | GRAPES() call / cluster + analysis (closing line) "
          "| CPU time, process tree | peak RSS, process tree | load avg (1 min) before -> after |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k, run in enumerate(runs, 1):
        d = run["grapes_dask"]
        if "grapes" in run:
            gr = run["grapes"]
            print(f"| {k}: GRAPES `GRAPES(labels, grey)` | {gr['wall_s']:.1f} s | {gr['call_s']:.1f} s "
                  f"| {gr['cpu_s']:.1f} s | {gib(gr['peak_rss_bytes'])} "
                  f"| {gr['load_before']:.2f} -> {gr['load_after']:.2f} |")
        eng = f"{d['engine_s']:.1f} s" if d["engine_s"] is not None else "-"
        print(f"| {k}: `grapes-dask analyze` | {d['wall_s']:.1f} s | {eng} | {d['cpu_s']:.1f} s "
              f"| {gib(d['peak_rss_bytes'])} | {d['load_before']:.2f} -> {d['load_after']:.2f} |")
        if "grapes" in run:
            gr = run["grapes"]
            call = f"{gr['call_s'] / d['engine_s']:.1f}x" if d["engine_s"] else "-"
            print(f"| {k}: GRAPES / grapes-dask | **{gr['wall_s'] / d['wall_s']:.1f}x** faster | {call} "
                  f"| {gr['cpu_s'] / d['cpu_s']:.1f}x less CPU "
                  f"| **{gr['peak_rss_bytes'] / d['peak_rss_bytes']:.1f}x** less memory | |")
    print()
    for k, run in enumerate(runs, 1):
        if "grapes" in run:
            gr = run["grapes"]
            print(f"- run {k}, GRAPES process: reading both volumes {gr['read_s']:.1f} s, importing GRAPES "
                  f"{gr['import_s']:.1f} s, GRAPES() {gr['call_s']:.1f} s, writing its table {gr['write_s']:.1f} s, "
                  f"{gr['particles']:,} particles")
    print("- grapes-dask's closing-line time covers starting its local cluster and the analysis (reading "
          "included), not writing the tables; GRAPES() gets the volumes already in memory.")
    for k, run in enumerate(runs, 1):
        if "comparison" in run:
            print()
            print(f"Comparison, run {k}: {'ALL EQUAL' if run['comparison_ok'] else 'DIFFERENCES FOUND'}")
            print()
            print(comparison_markdown(run["comparison"]))
    if a.json:
        a.json.write_text(json.dumps({"machine": mach, "data": str(data), "shape": shape, "runs": runs},
                                     indent=1, default=str))
    ok = all(run.get("comparison_ok", True) for run in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
