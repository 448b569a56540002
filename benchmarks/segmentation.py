"""Segmentation into particles against ground truth: PoreSpy snow2, the paper's method, grapes_dask.

    python benchmarks/segmentation.py                        # 256^3, every method (a few minutes)
    python benchmarks/segmentation.py --size 512 --methods paper-r4 snow2 grapes-dask
    python benchmarks/segmentation.py --size 800 --methods paper-r4 grapes-dask   # ~12 GiB in memory
    python benchmarks/segmentation.py --list                  # the methods and their settings

Steps:

1. a phantom with ground truth (:func:`grapes_dask.synthetic.make_phantom`, chunk by chunk into
   Zarr under ``--work``, kept for the next run with the same settings): NMC-like grey levels
   (particles 150, pore 40, bright phase-contrast rim +30, uint8), internal voids of damage
   0.3, Gaussian blur sigma 1 voxel then Gaussian noise sigma 15 grey levels (Otsu still
   separates the phases: about 2 % of voxels land on the wrong side), mean equivalent radius
   18 voxels (the paper's ~25,000-voxel particles), spheres and ellipsoids packed to a solid
   fraction near 0.5 with flat contact faces. The truth is the phantom's label volume.
2. each method in its own subprocess (``_measure.run_measured``: wall time from process start to
   exit, peak RSS of the process tree sampled every 50 ms); the subprocess reads the grey
   volume, segments it and writes its labels (``.npy``, or Zarr for grapes_dask), and reports the
   time of the segmentation itself (without reading and writing) on its last output line;
3. scoring out of core with :func:`grapes_dask.evaluate.match_labels` (IoU >= 0.85, one-to-one;
   splits and merges at a 10 % share): over all truth particles, and over the interior ones
   (``exclude_border=True``: particles cut by the volume's faces left out).

Methods:

- ``paper-*``: the paper's workflow in memory with scipy/scikit-image: Otsu threshold, binary
  closing (ball of radius 1), hole filling, binary opening (ball 1), removal of islands below
  ``min_size`` voxels, exact Euclidean distance map (``scipy.ndimage.distance_transform_edt``),
  Gaussian smoothing (sigma 1), markers, ``skimage.segmentation.watershed(-smoothed, markers,
  mask=foreground)``. Marker strategies: ``peak_local_max`` with ``min_distance`` half the mean
  radius (``paper-r2``), a quarter (``paper-r4``), a quarter with a ball footprint
  (``paper-r4-ball``); regional maxima of height ``h`` (``skimage.morphology.h_maxima``, slow:
  about a minute at 256^3) on the smoothed map (``paper-hmax*``), and on its logarithm
  (``paper-hrel``: a maximum survives when its saddle is below 0.9 of its height,
  scale-free).
- ``snow2*``: PoreSpy's ``snow2`` on the same cleaned foreground (Otsu + morphology as above),
  serial (``parallel_kw=None``), ``boundary_width=0``; its regions are the segmentation. Its
  wall time includes the pore-network extraction that ``snow2`` always does; the subprocess
  also reports the time of ``snow_partitioning`` alone (the same regions; run again). Default
  ``r_max=4, sigma=0.4`` and tuned variants. PoreSpy is not a dependency of grapes_dask (it
  pins ``edt<3.1``): ``pip install porespy`` in a separate environment, or
  ``pip install --no-deps porespy`` beside grapes_dask; without it these methods are skipped.
- ``grapes-dask``: grapes_dask's own out-of-core ``segment`` (module ``grapes_dask.segmentation``
  or ``grapes_dask.segment``) with its defaults, to Zarr, when the grapes_dask on the path has
  it (skipped otherwise); ``grapes-dask-r4``: with ``markers="local_max"`` and a
  ``min_distance`` of a quarter of the mean radius.

Prints one markdown table (and one JSON line per method, ``{"benchmark": "segmentation", ...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import _measure  # noqa: E402

#: Phantom settings (see the module docstring); --option overrides.
PHANTOM = dict(mean_radius=18.0, blur_sigma=1.0, noise_sigma=15.0, damage=0.3)

#: name -> (kind, parameters). ``r`` in a parameter string is the mean radius.
METHODS = {
    "paper-r2": ("paper", {"markers": "peaks", "min_distance": "r/2"}),
    "paper-r4": ("paper", {"markers": "peaks", "min_distance": "r/4"}),
    "paper-r4-ball": ("paper", {"markers": "peaks", "min_distance": "r/4", "footprint": "ball"}),
    "paper-hmax0.5": ("paper", {"markers": "hmax", "h": 0.5}),
    "paper-hmax1": ("paper", {"markers": "hmax", "h": 1.0}),
    "paper-hrel0.9": ("paper", {"markers": "hrel", "ratio": 0.9}),
    "snow2": ("snow2", {"r_max": 4, "sigma": 0.4}),
    "snow2-r3": ("snow2", {"r_max": 3, "sigma": 0.4}),
    "snow2-r5-s0": ("snow2", {"r_max": 5, "sigma": 0.0}),
    "grapes-dask": ("grapes-dask", {}),
    "grapes-dask-r4": ("grapes-dask", {"markers": "local_max", "min_distance": "r/4"}),
}
DEFAULT_METHODS = ["paper-r2", "paper-r4", "paper-r4-ball", "paper-hmax0.5", "paper-hrel0.9", "snow2", "snow2-r3",
                   "grapes-dask"]


# --------------------------------------------------------------------------------------------
# the methods (run in a subprocess: ``segmentation.py _run KIND PARAMS GREY OUT``)
# --------------------------------------------------------------------------------------------


def clean_foreground(grey, min_size: int):
    """Otsu threshold, closing and opening with a ball of radius 1, holes filled, islands removed."""
    import numpy as np
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.morphology import ball

    threshold = float(threshold_otsu(grey))
    fg = grey > threshold
    fg = ndi.binary_closing(fg, structure=ball(1), border_value=0)
    fg = ndi.binary_fill_holes(fg)
    fg = ndi.binary_opening(fg, structure=ball(1))
    lab, n = ndi.label(fg)
    if n:
        sizes = np.bincount(lab.ravel())
        small = sizes < min_size
        small[0] = False
        if small.any():
            fg[small[lab]] = False
    return fg, threshold


def _markers(smoothed, fg, params, mean_radius):
    import numpy as np
    from scipy import ndimage as ndi

    kind = params["markers"]
    if kind == "peaks":
        from skimage.feature import peak_local_max
        from skimage.morphology import ball

        md = max(1, int(round(mean_radius / {"r/2": 2, "r/4": 4}[params["min_distance"]])))
        footprint = ball(md) if params.get("footprint") == "ball" else None
        peaks = peak_local_max(smoothed, min_distance=md, footprint=footprint, labels=fg.astype(np.uint8),
                               exclude_border=False)
        markers = np.zeros(fg.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
        return markers
    from skimage.morphology import h_maxima

    if kind == "hmax":  # quantised to 1/64 voxel (h_maxima on floats is no faster and less robust)
        q = np.round(smoothed * 64).astype(np.uint16)
        h = int(round(params["h"] * 64))
    else:  # "hrel": h-maxima of log(distance): a saddle below `ratio` of the peak separates
        q = np.zeros(fg.shape, np.uint16)
        q[fg] = np.round(1000 * np.log(np.maximum(smoothed[fg], 0.5) / 0.5)).astype(np.uint16)
        h = int(round(-1000 * np.log(params["ratio"])))
    maxima = h_maxima(q, h).astype(bool) & fg
    markers, _ = ndi.label(maxima, structure=np.ones((3,) * fg.ndim))
    return markers.astype(np.int32)


def run_paper(grey, params, mean_radius, min_size):
    import numpy as np
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    times = {}
    t0 = time.perf_counter()
    fg, threshold = clean_foreground(grey, min_size)
    times["foreground"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    dist = ndi.distance_transform_edt(fg)
    smoothed = ndi.gaussian_filter(dist, params.get("smoothing", 1.0))
    del dist
    times["distance"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    markers = _markers(smoothed, fg, params, mean_radius)
    times["markers"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    labels = watershed(-smoothed, markers, mask=fg)
    times["watershed"] = time.perf_counter() - t1
    times["segment"] = time.perf_counter() - t0
    return labels, {"threshold": threshold, "n_markers": int(markers.max()), "times": times}


def run_snow2(grey, params, mean_radius, min_size):
    import logging

    import numpy as np

    logging.getLogger("porespy").setLevel(logging.ERROR)
    import porespy as ps

    ps.settings.tqdm["disable"] = True
    t0 = time.perf_counter()
    fg, threshold = clean_foreground(grey, min_size)
    t_fg = time.perf_counter() - t0
    t1 = time.perf_counter()
    net = ps.networks.snow2(fg.astype(np.uint8), boundary_width=0, parallel_kw=None, r_max=params["r_max"],
                            sigma=params["sigma"])
    t_snow2 = time.perf_counter() - t1
    labels = np.asarray(net.regions)
    t1 = time.perf_counter()
    ps.filters.snow_partitioning(fg, r_max=params["r_max"], sigma=params["sigma"])
    t_part = time.perf_counter() - t1
    times = {"foreground": t_fg, "snow2": t_snow2, "snow_partitioning": t_part, "segment": t_fg + t_snow2}
    return labels, {"threshold": threshold, "times": times}


def _run(kind, params, grey_path, out_path, mean_radius, min_size) -> dict:
    import numpy as np

    if kind == "snow2":
        try:
            import porespy  # noqa: F401
        except ImportError:
            return {"skipped": "porespy is not installed (pip install porespy, in another environment: "
                               "it pins edt<3.1)"}
    if kind == "grapes-dask":
        segment = _grapes_dask_segment()
        if isinstance(segment, str):
            return {"skipped": segment}
        kwargs = {k: (mean_radius / {"r/2": 2, "r/4": 4}[v] if v in ("r/2", "r/4") else v) for k, v in params.items()}
        t0 = time.perf_counter()
        result = segment(str(grey_path), out=str(out_path), **kwargs)
        seconds = time.perf_counter() - t0
        info = {"times": {"segment": seconds}, "labels": str(out_path)}
        for key in ("threshold", "n_particles", "n_basins", "timings"):
            if hasattr(result, key):
                info[key] = getattr(result, key)
        return json.loads(json.dumps(info, default=str))
    t0 = time.perf_counter()
    grey = np.asarray(_open(grey_path))
    t_read = time.perf_counter() - t0
    run = run_paper if kind == "paper" else run_snow2
    labels, info = run(grey, params, mean_radius, min_size)
    np.save(out_path, labels)
    info["times"]["read"] = t_read
    info["labels"] = str(out_path)
    return info


def _grapes_dask_segment():
    """grapes_dask's out-of-core ``segment`` function, or why it is not there."""
    import importlib

    errors = []
    for module in ("grapes_dask.segmentation", "grapes_dask.segment"):
        try:
            func = getattr(importlib.import_module(module), "segment")
        except (ImportError, AttributeError) as exc:
            errors.append(f"{module}: {exc}")
            continue
        if callable(func):
            return func
    return "grapes_dask has no segment() here (" + "; ".join(errors) + ")"


def _open(path):
    import zarr

    return zarr.open_array(str(path), mode="r")[...]


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def make_data(work: Path, size: int, seed: int, opts: dict) -> Path:
    """The phantom under `work` (reused when its parameters match)."""
    from grapes_dask.synthetic import make_phantom

    tag = f"seg_{size}_s{seed}_" + "_".join(f"{k}{v}" for k, v in sorted(opts.items()))
    out = work / tag
    if (out / "phantom.json").exists():
        return out
    t0 = time.perf_counter()
    make_phantom(out, shape=(size,) * 3, seed=seed, chunks=128, label_dtype="uint32", overwrite=True, **opts)
    print(f"phantom {size}^3 made in {time.perf_counter() - t0:.1f} s: {out}", flush=True)
    return out


def score(truth, pred):
    from grapes_dask.evaluate import match_labels

    every = match_labels(truth, pred, iou=0.85, chunks=128)
    inner = match_labels(truth, pred, iou=0.85, chunks=128, exclude_border=True)
    return every, inner


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="phantom side, voxels (256, 512, 800)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--methods", nargs="+", default=None, help=f"among {', '.join(METHODS)}")
    ap.add_argument("--work", type=Path, default=HERE / "_data", help="folder for the phantom and the outputs")
    ap.add_argument("--mean-radius", type=float, default=PHANTOM["mean_radius"])
    ap.add_argument("--blur", type=float, default=PHANTOM["blur_sigma"])
    ap.add_argument("--noise", type=float, default=PHANTOM["noise_sigma"])
    ap.add_argument("--damage", type=float, default=PHANTOM["damage"])
    ap.add_argument("--min-size", type=int, default=64, help="islands below this many voxels are removed")
    ap.add_argument("--keep", action="store_true", help="keep the predicted label volumes")
    ap.add_argument("--grapes-dask-root", type=Path, default=ROOT,
                    help="source tree whose grapes_dask the grapes-dask methods run (default: this one)")
    ap.add_argument("--list", action="store_true", help="list the methods and exit")
    args = ap.parse_args(argv)
    if args.list:
        for name, (kind, params) in METHODS.items():
            print(f"{name:16s} {kind:12s} {params}")
        return
    methods = args.methods or DEFAULT_METHODS
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}: choose among {list(METHODS)}")
    opts = dict(mean_radius=args.mean_radius, blur_sigma=args.blur, noise_sigma=args.noise, damage=args.damage)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(work, args.size, args.seed, opts)
    truth = data / "labels.zarr"
    grey = data / "grey.zarr"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    rows = []
    print(f"phantom {args.size}^3, seed {args.seed}, {opts}; load {_measure.load()}", flush=True)
    for name in methods:
        kind, params = METHODS[name]
        out = data / (f"pred_{name}.zarr" if kind == "grapes-dask" else f"pred_{name}.npy")
        cmd = [sys.executable, str(Path(__file__).resolve()), "_run", kind, json.dumps(params), str(grey), str(out),
               str(args.mean_radius), str(args.min_size)]
        run_env = env
        if kind == "grapes-dask" and args.grapes_dask_root.resolve() != ROOT:
            run_env = dict(env, PYTHONPATH=os.pathsep.join([str(args.grapes_dask_root), env["PYTHONPATH"]]))
        res = _measure.run_measured(cmd, env=run_env)
        if res["returncode"] != 0:
            print(f"{name}: failed\n{res['stderr'][-3000:]}", flush=True)
            rows.append({"method": name, "error": res["stderr"].strip().splitlines()[-1:]})
            continue
        info = json.loads(res["stdout"].strip().splitlines()[-1])
        if "skipped" in info:
            print(f"{name}: skipped: {info['skipped']}", flush=True)
            rows.append({"method": name, "skipped": info["skipped"]})
            continue
        t0 = time.perf_counter()
        every, inner = score(truth, info["labels"])
        t_score = time.perf_counter() - t0
        row = {"benchmark": "segmentation", "method": name, "size": args.size, "params": params, "phantom": opts,
               "n_truth": every.n_truth, "n_interior": inner.n_truth, "n_pred": every.n_pred,
               "matched": every.matched_fraction, "matched_interior": inner.matched_fraction,
               "mean_iou": every.mean_iou, "n_split": every.n_split, "n_merged": every.n_merged,
               "wall_s": res["seconds"], "segment_s": info["times"]["segment"], "times": info["times"],
               "peak_rss_gib": res["peak_rss"] / _measure.GiB, "score_s": t_score,
               "load": [res["load_before"], res["load_after"]], "n_markers": info.get("n_markers")}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            _remove(Path(info["labels"]))
    print()
    print(f"Phantom {args.size}^3 (seed {args.seed}): mean radius {opts['mean_radius']}, blur sigma "
          f"{opts['blur_sigma']}, noise sigma {opts['noise_sigma']}, damage {opts['damage']}.")
    print()
    print("| method | truth (interior) | pred | matched IoU>=0.85 all | interior | mean IoU | split | merged "
          "| segment s | wall s | peak RSS GiB | load |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        if "matched" not in r:
            why = "skipped" if "skipped" in r else "failed"
            print(f"| {r['method']} | {why} (see above) |||||||||||")
            continue
        print(f"| {r['method']} | {r['n_truth']} ({r['n_interior']}) | {r['n_pred']} | {r['matched']:.3f} "
              f"| {r['matched_interior']:.3f} | {r['mean_iou']:.3f} | {r['n_split']} | {r['n_merged']} "
              f"| {r['segment_s']:.1f} | {r['wall_s']:.1f} | {r['peak_rss_gib']:.2f} | {r['load'][0]}-{r['load'][1]} |")


def _remove(path: Path):
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        kind, params, grey, out, mean_radius, min_size = sys.argv[2:8]
        print(json.dumps(_run(kind, json.loads(params), grey, Path(out), float(mean_radius), int(min_size))))
    else:
        main()
