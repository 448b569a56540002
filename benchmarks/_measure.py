"""Helpers shared by the scale benchmarks (out_of_core.py, scaling.py, graph_plan.py).

- :func:`tree_rss`: resident memory of a process and all its descendants (psutil);
- :func:`run_measured`: run a command, sample its process tree's RSS every 50 ms (and,
  optionally, the size of a folder every second), return wall time, peak RSS and output;
- :func:`du`: bytes of the files under a path;
- :func:`load`: the 1-minute load average.

The sampler is the one of ``benchmarks/engine.py`` (``run_measured`` / ``_tree_rss``).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import psutil

GiB = 2**30


def tree_rss(proc: psutil.Process) -> int:
    """RSS of `proc` plus all its descendants, bytes (processes that vanish are skipped)."""
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def du(path) -> int:
    """Bytes of the regular files under `path` (a file or a folder); 0 if it does not exist."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, _, files in os.walk(p):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def load() -> float:
    return round(os.getloadavg()[0], 2)


def run_measured(cmd: list[str], *, env=None, watch=None, interval: float = 0.05) -> dict:
    """Run `cmd`; sample the RSS of its process tree every `interval` s.

    Parameters
    ----------
    cmd : list of str
    env : dict, optional
    watch : path, optional
        A folder whose size (:func:`du`) is sampled about once a second (e.g. the partial
        results of ``grapes-dask analyze``); its peak is returned.

    Returns
    -------
    dict
        ``returncode, seconds`` (process start to exit), ``peak_rss`` (bytes),
        ``watch_peak`` (bytes), ``stdout, stderr`` (text), ``load_before, load_after``.
    """
    load0 = load()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ps = psutil.Process(proc.pid)
    state = {"peak": 0, "watch": 0}
    stop = threading.Event()

    def sample():
        last_watch = 0.0
        while not stop.is_set():
            state["peak"] = max(state["peak"], tree_rss(ps))
            now = time.perf_counter()
            if watch is not None and now - last_watch >= 1.0:
                state["watch"] = max(state["watch"], du(watch))
                last_watch = now
            stop.wait(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    return {"returncode": proc.returncode, "seconds": seconds, "peak_rss": state["peak"],
            "watch_peak": state["watch"], "stdout": out, "stderr": err, "load_before": load0,
            "load_after": load()}
