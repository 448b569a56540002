"""Compile the pass-2 kernels in a helper process while pass 1 runs (first run on a cold cache).

Numba compiles a kernel the first time it is called with new argument types and keeps the
machine code in its on-disk cache (``cache=True``); later processes load it from there. On a
fresh install the first analysis therefore compiles every kernel it calls, one after the other:
Numba compiles under one process-wide lock, so threads cannot share the work. A second process
can: when the kernels of pass 2 have never been compiled into this cache, :func:`start` launches
``python -m grapes_dask._precompile SPEC``, which runs a tiny region through the same pass-2 task
the analysis will run (same label and grey dtypes, spacing and route), so that Numba compiles
those kernels into the shared cache while this process compiles and runs pass 1. :func:`wait`,
called before pass 2 is computed, waits for it; the tasks then load the kernels from the cache.

Nothing changes in the results: the helper only fills the cache, and a kernel it did not
compile (another packing of the distance lines, a failure of the helper) is compiled by the
task itself as before. The helper is only started where a core is idle (load average);
``GRAPES_DASK_PRECOMPILE=0`` turns it off, ``=always`` starts it whatever the load.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading

import numpy as np

ENV = "GRAPES_DASK_PRECOMPILE"
_TIMEOUT = 600.0  # seconds a run waits for the helper before compiling by itself

_lock = threading.Lock()
_helper: subprocess.Popen | None = None


# --------------------------------------------------------------------------------------------
# what pass 2 will run
# --------------------------------------------------------------------------------------------


def pass2_spec(label_dtype, grey_dtype, ndim, spacing, *, layer_width, center, edge_roi, exclude, fill_holes,
               black_border, grey_views=False, whole=False) -> dict:
    """The parameters that decide which pass-2 kernels a run calls, as a JSON-able dict.

    `grey_views`: the tasks' grey blocks are views into a larger array (an in-memory or dask
    source) rather than fresh contiguous arrays (files), which Numba compiles separately.
    `whole`: the volume is likely one region without a halo (no side longer than the region
    size), so that the cores are contiguous arrays rather than views.
    """
    native = lambda dt: np.dtype(dt).newbyteorder("=").str  # noqa: E731 - the tasks read in native order
    return dict(label_dtype=native(label_dtype), grey_dtype=native(grey_dtype), ndim=int(ndim),
                spacing=[float(s) for s in spacing], layer_width=float(layer_width), center=bool(center),
                edge_roi=bool(edge_roi), exclude=bool(exclude), fill_holes=bool(fill_holes),
                black_border=bool(black_border), grey_views=bool(grey_views), whole=bool(whole))


def warm_pass2(spec: dict) -> None:
    """Run one tiny region through the pass-2 task `spec` describes (compiles or loads its kernels).

    The region (8 voxels per side, a core of 4 or the whole region, one particle) has the run's
    label and grey dtypes; its largest distance is small, so the distance lines use the narrow
    packing that particles of radius below 127 voxels use.
    """
    from . import table

    nd = spec["ndim"]
    n, lo, hi = (8, 0, 8) if spec["whole"] else (8, 2, 6)
    lab = np.zeros((n,) * nd, dtype=np.dtype(spec["label_dtype"]))
    lab[(slice(1, 7),) * nd] = 1
    grey = np.zeros((n,) * nd, dtype=np.dtype(spec["grey_dtype"]))
    core = (slice(lo, hi),) * nd
    spacing = tuple(spec["spacing"])
    border = (bool(spec["black_border"]),) * (2 * nd)
    exclude = np.array([5] if spec["exclude"] else [], np.uint64)
    keys = np.array([1], np.uint64)
    centre_table = (keys, np.full((1, nd), 3.5)) if spec["center"] else None
    if spec["fill_holes"]:
        box = (slice(0, n - 1),) * nd  # a view that is not contiguous, as a box of a larger array is
        grey_src, grey_sl = (grey, box) if spec["grey_views"] else (np.ascontiguousarray(grey[box]), None)
        table._fill_holes_task(lab, box, grey_src, grey_sl, border, spacing, spec["layer_width"], exclude, keys,
                               spec["center"], (0,) * nd, centre_table, None, spec["edge_roi"])
        return
    grey_src, grey_sl = (grey, core) if spec["grey_views"] else (np.ascontiguousarray(grey[core]), None)
    table._pass2_task(lab, None, grey_src, grey_sl, core, border, spacing, spec["layer_width"], exclude, spec["center"],
                      (lo,) * nd, centre_table, keys, 3.0, spec["edge_roi"])


# --------------------------------------------------------------------------------------------
# is the cache cold?
# --------------------------------------------------------------------------------------------


def _route_kernels(spec: dict) -> list:
    """The dispatchers whose compilation dominates pass 2 of `spec` (the ones checked in the cache)."""
    from .kernels import distance, layers

    g = np.dtype(spec["grey_dtype"])
    iso = len(set(spec["spacing"])) == 1
    edge = not spec["center"] or spec["edge_roi"]
    out = []
    if spec["center"]:
        out.append(layers._layer_pass)
    if edge:
        fused = (spec["ndim"] == 3 and iso and g.kind in "uib" and g.itemsize <= 2 and not spec["fill_holes"])
        if fused:
            out.append(layers._fused_iso_kernel)
        else:
            out += [distance._sq_edt3_iso if iso else distance._sq_edt3, layers._layer_pass]
    return out


def _never_compiled(dispatcher) -> bool:
    """True when `dispatcher` has no compiled version here and none in Numba's cache.

    Reads the cache index through Numba's internals; on any surprise, says False (no helper).
    """
    if dispatcher.overloads:
        return False
    try:
        return not dispatcher._cache._cache_file._load_index()
    except Exception:  # pragma: no cover - another Numba version
        return False


def _enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off") and not getattr(
        sys, "frozen", False)


def _local(client) -> bool:
    """Whether the tasks run on this machine (and so read the same Numba cache)."""
    if client is None:
        from .plan import _default_client

        client = _default_client()
        if client is None:
            return True
    try:
        workers = client.scheduler_info()["workers"]
    except Exception:
        return False
    return bool(workers) and all(str(a).startswith(("inproc://", "tcp://127.0.0.1:", "tcp://localhost:"))
                                 for a in workers)


# --------------------------------------------------------------------------------------------
# the helper process
# --------------------------------------------------------------------------------------------


def _idle_core() -> bool:
    """Whether a core is free for the helper (1-minute load average below cores - 1.25).

    The helper only gains where a core is idle. Measured on 2 cores (64^3, empty cache): 7.4 s
    against 9.8 s without it at load 0.8, but 12.2-12.7 s against 10.0-10.5 s at load 1.3-2,
    where the two compiling processes shared what one had.
    """
    from .cluster import cores

    try:
        return os.getloadavg()[0] < cores() - 1.25
    except OSError:  # pragma: no cover - no load average on this platform
        return (os.cpu_count() or 1) > 1


def start(spec: dict, client=None) -> bool:
    """Launch the helper for `spec` when its kernels were never compiled here; True if launched."""
    global _helper
    always = os.environ.get(ENV, "").strip().lower() == "always"
    if not _enabled() or not _local(client) or not (always or _idle_core()):
        return False
    try:
        if not any(_never_compiled(d) for d in _route_kernels(spec)):
            return False
    except Exception:  # pragma: no cover - an unknown route: the tasks compile as before
        return False
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([package_parent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    with _lock:
        if _helper is not None and _helper.poll() is None:
            return False  # one helper at a time
        try:
            _helper = subprocess.Popen([sys.executable, "-m", "grapes_dask._precompile", json.dumps(spec)],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, env=env)
        except OSError:
            _helper = None
            return False
    return True


def wait(timeout: float = _TIMEOUT) -> None:
    """Wait for a running helper (no-op without one); after `timeout` s the run goes on without it."""
    global _helper
    with _lock:
        helper = _helper
    if helper is None:
        return
    try:
        helper.wait(timeout)
    except subprocess.TimeoutExpired:
        return
    with _lock:
        if _helper is helper:
            _helper = None


@atexit.register
def _stop() -> None:
    helper = _helper
    if helper is not None and helper.poll() is None:
        helper.terminate()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warm_pass2(json.loads(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
