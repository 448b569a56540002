"""Benchmark of the synthetic phantom generator (grapes_dask.synthetic.make_phantom).

Generates a phantom straight into Zarr and reports wall time, number of particles, throughput
(Gvox/s, counting one grey and one label volume as one voxel each) and the peak resident
memory of the process tree (sampled every 50 ms with psutil).

Usage::

    python benchmarks/synth.py                      # paper scale: 800^3, mean radius 18
    python benchmarks/synth.py --size 256 --states 3
    python benchmarks/synth.py --size 800 --label-dtype uint32 --blur 1.0

The numba kernels are compiled (or loaded from their cache) by a small warm-up phantom first,
which is not counted.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import threading
import time

import numpy as np
import psutil


class PeakRSS:
    """Peak resident set size of this process and its children, sampled in a thread."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=800, help="volume side, voxels (cube)")
    ap.add_argument("--mean-radius", type=float, default=18.0)
    ap.add_argument("--states", type=int, default=1)
    ap.add_argument("--chunks", type=int, default=128)
    ap.add_argument("--label-dtype", default="uint16")
    ap.add_argument("--grey-dtype", default="uint8")
    ap.add_argument("--blur", type=float, default=0.0, help="blur sigma, voxels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="folder for the output (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the output")
    args = ap.parse_args(argv)

    import dask

    from grapes_dask import synthetic

    work = tempfile.mkdtemp(prefix="synth-bench-", dir=args.dir)
    try:
        t = time.perf_counter()
        synthetic.make_phantom(os.path.join(work, "warmup"), shape=(64, 64, 64), chunks=32,
                               mean_radius=8, n_states=2, blur_sigma=args.blur)
        warm = time.perf_counter() - t
        shape = (args.size,) * 3
        out = os.path.join(work, "phantom")
        proc = psutil.Process()
        cpu0 = sum(proc.cpu_times()[:4])
        load0 = os.getloadavg()[0]
        with PeakRSS() as mem:
            t = time.perf_counter()
            t_place = time.perf_counter()
            particles = synthetic.make_particles(shape, mean_radius=args.mean_radius, seed=args.seed)
            t_place = time.perf_counter() - t_place
            ph = synthetic.make_phantom(out, shape=shape, n_states=args.states, seed=args.seed,
                                        chunks=args.chunks, label_dtype=args.label_dtype,
                                        grey_dtype=args.grey_dtype, particles=particles,
                                        blur_sigma=args.blur)
            wall = time.perf_counter() - t
        cpu = sum(proc.cpu_times()[:4]) - cpu0
        nvox = float(np.prod(shape)) * args.states
        disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
        print(f"machine:        {machine()}")
        print(f"dask:           {dask.__version__}, scheduler threads ({os.cpu_count()} workers)")
        print(f"warm-up:        {warm:.1f} s (numba compile or cache load, not counted)")
        print(f"shape:          {shape} x {args.states} state(s), chunks {args.chunks}, "
              f"grey {args.grey_dtype}, labels {args.label_dtype}, blur {args.blur}")
        print(f"particles:      {len(particles)} (mean radius {args.mean_radius}, nominal packing "
              f"{particles.attrs['packing_fraction']:.3f}), placed in {t_place:.1f} s")
        print(f"wall time:      {wall:.1f} s  ({nvox / wall / 1e9:.4f} Gvox/s, grey + labels)")
        print(f"CPU time:       {cpu:.1f} s  (user + system; {cpu / wall:.2f} cores busy on average)")
        print(f"load average:   {load0:.2f} before, {os.getloadavg()[0]:.2f} after (other processes "
              "on the machine slow the wall time)")
        print(f"peak RSS:       {mem.peak / 2**20:.0f} MiB (process tree)")
        print(f"on disk:        {disk / 2**20:.0f} MiB")
        if args.keep:
            print(f"output:         {out}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
