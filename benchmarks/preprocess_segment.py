"""Out-of-core segmentation benchmark: ``grapes-dask segment`` on a phantom with ground truth.

For each size: a blurred, noisy phantom (Zarr, 128^3 chunks) is made once under
``benchmarks/_data/seg_<N>``; then, each in its own process so that the memory figures are
separate:

- ``grapes-dask segment grey.zarr seg.zarr`` (the embedded local cluster, default options):
  wall time and peak RSS of the whole process tree;
- one ``edt.edt`` of the true foreground of the same volume, in memory (the reference unit of
  the engine benchmarks): time ratio segment / edt;
- the score against the truth labels (:func:`grapes_dask.evaluate.match_labels`, out of core):
  fraction of particles matched with IoU >= 0.85, mean IoU, splits and merges.

Usage::

    python benchmarks/preprocess_segment.py --size 512 --size 800 [--mean-radius 18]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import GiB, load, run_measured  # noqa: E402

DATA = Path(__file__).resolve().parent / "_data"
PHANTOM = dict(blur_sigma=1.0, noise_sigma=8.0)


def make(size: int, mean_radius: float, seed: int) -> Path:
    from grapes_dask.synthetic import make_phantom

    d = DATA / f"seg_{size}"
    if not (d / "grey.zarr").exists():
        t0 = time.perf_counter()
        make_phantom(d, shape=(size,) * 3, seed=seed, chunks=128, mean_radius=mean_radius, overwrite=True,
                     **PHANTOM)
        print(f"phantom {size}^3 written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return d


_EDT = """
import sys, time, numpy as np, zarr, edt
lab = zarr.open_array(sys.argv[1])[...] != 0
t0 = time.perf_counter(); edt.edt(lab, parallel=0); print(time.perf_counter() - t0)
"""

_SCORE = """
import json, sys
from grapes_dask.evaluate import match_labels
m = match_labels(sys.argv[1], sys.argv[2], iou=0.85)
print(json.dumps({"n_truth": m.n_truth, "n_pred": m.n_pred, "matched": m.matched_fraction,
                  "mean_iou": m.mean_iou, "split": m.n_split, "merged": m.n_merged}))
"""


def run(size: int, mean_radius: float, seed: int, extra: list[str]) -> dict:
    d = make(size, mean_radius, seed)
    out = d / "seg.zarr"
    cmd = [sys.executable, "-m", "grapes_dask.cli", "segment", str(d / "grey.zarr"), str(out), "--overwrite",
           "--quiet", *extra]
    seg = run_measured(cmd)
    if seg["returncode"]:
        raise SystemExit(seg["stderr"])
    import zarr

    stages = zarr.open_array(str(out)).attrs["grapes_dask"].get("seconds", {})
    e = run_measured([sys.executable, "-c", _EDT, str(d / "labels.zarr")])
    edt_s = float(e["stdout"].strip().splitlines()[-1])
    sc = run_measured([sys.executable, "-c", _SCORE, str(d / "labels.zarr"), str(out)])
    score = json.loads(sc["stdout"].strip().splitlines()[-1]) if sc["returncode"] == 0 else {"error": sc["stderr"][-500:]}
    return {"size": size, "segment_s": seg["seconds"], "segment_peak_gib": seg["peak_rss"] / GiB,
            "edt_s": edt_s, "ratio": seg["seconds"] / edt_s, "edt_peak_gib": e["peak_rss"] / GiB,
            "score": score, "score_s": sc["seconds"], "score_peak_gib": sc["peak_rss"] / GiB,
            "stages": stages, "line": seg["stdout"].strip(), "load": (seg["load_before"], seg["load_after"])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, action="append", default=None)
    ap.add_argument("--mean-radius", type=float, default=18.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="Also write the results here.")
    ap.add_argument("extra", nargs="*", help="Options passed on to grapes-dask segment (after --).")
    a = ap.parse_args(argv)
    sizes = a.size or [512]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"load {load():.2f}")
    rows = [run(n, a.mean_radius, a.seed, a.extra) for n in sizes]
    print("| volume | segment (s) | peak RSS (GiB) | edt.edt (s) | segment / edt | particles (truth) | "
          "matched IoU>=0.85 | mean IoU | split / merged |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["score"]
        if "error" in s:
            sc = "score failed"
            cols = f"{sc} | | | |"
        else:
            cols = (f"{s['n_pred']} ({s['n_truth']}) | {100 * s['matched']:.1f}% | {s['mean_iou']:.3f} | "
                    f"{s['split']} / {s['merged']} |")
        print(f"| {r['size']}^3 | {r['segment_s']:.1f} | {r['segment_peak_gib']:.2f} | {r['edt_s']:.2f} | "
              f"{r['ratio']:.1f} | {cols}")
    for r in rows:
        print(f"{r['size']}^3 seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items()))
        print(r["line"], f"(load {r['load'][0]:.1f} -> {r['load'][1]:.1f})")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
