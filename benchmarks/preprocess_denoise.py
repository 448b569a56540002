"""Denoising out of core: ``grapes_dask.denoise`` (module ``grapes_dask.denoising``) from a Zarr grey volume to a Zarr output.

    grapes-dask synth benchmarks/_data/dn512 --size 512 512 512     # the input (noise sigma 6, uint8)
    python benchmarks/preprocess_denoise.py --data benchmarks/_data/dn512
    python benchmarks/preprocess_denoise.py --data DIR --methods gaussian median --repeat 2
    python benchmarks/preprocess_denoise.py --data DIR --methods nlm --crop 256   # NLM on a 256^3 corner

Each run is a fresh subprocess (``--child``) that calls ``denoise(DIR/grey.zarr, method,
out=OUT.zarr)`` with its default scheduler (threads on all cores; a pool of processes for NLM,
whose scikit-image kernel holds the GIL). The RSS of the child's whole process tree is sampled
every 50 ms (``benchmarks/_measure.py``); the wall time runs from process start to exit
(imports included, about 1 s); the child also reports the CPU time of itself and its worker
processes, less disturbed than the wall time on a shared machine. ``--crop N`` denoises the
corner ``[:N, :N, :N]`` of the volume (a lazy slice of the Zarr input: still read and written
chunk by chunk).

For NLM on a crop, the time is also extrapolated to the full volume per unit of work: the work of
a block is proportional to the voxels scikit-image filters, the block grown by the overlap
``patch_distance + patch_size // 2`` on each side that has a neighbour, then padded by
``patch_distance + patch_size // 2 + 1`` on every side. The ratio of that sum over the blocks
of the full volume to the crop's scales the measured time (blocks of 128^3: edge blocks carry
less overlap, so a 256^3 crop, all corner blocks, does 0.93 of the work per voxel of 512^3).

Prints one JSON line per run (``{"benchmark": "preprocess_denoise", ...}``) and a summary table;
the outputs are removed after each run (``--keep`` keeps the last one).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _measure  # noqa: E402

DEFAULTS = {"gaussian": {"sigma": 1.0}, "median": {"size": 3}, "nlm": {}}


def _child(src: str, method: str, out: str, crop: int | None, chunks: int | None, params: dict) -> dict:
    import numpy as np

    from grapes_dask.denoising import denoise
    from grapes_dask.io import resolve_volume

    t0 = time.perf_counter()
    vol = resolve_volume(src, chunks=chunks)
    grey = vol.array if crop is None else vol.array[:crop, :crop, :crop]
    path = denoise(grey, method, out=out, chunks=chunks, overwrite=True, **params)
    import zarr

    z = zarr.open_array(str(path), mode="r")
    import resource

    # CPU of this process and of its finished worker processes (NLM writes with dask's processes
    # scheduler, whose pool is shut down, hence waited for, when the compute ends)
    cpu = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                resource.getrusage(resource.RUSAGE_CHILDREN)))
    rec = dict(z.attrs)["grapes_dask"]
    return {"seconds_in_process": time.perf_counter() - t0, "cpu_seconds": round(cpu, 1), "shape": list(z.shape),
            "chunks": list(z.chunks), "dtype": str(np.dtype(z.dtype)), "parameters": rec["parameters"]}


def block_work(shape, chunk: int, reach: int) -> int:
    """Voxels scikit-image's fast NLM processes over all blocks of `shape` in cubes of `chunk`:
    each block grown by `reach` on every side with a neighbour, then padded by ``reach + 1``."""
    total = 1
    for n in shape:
        sides = 0
        starts = list(range(0, n, chunk))
        for i, s in enumerate(starts):
            c = min(chunk, n - s)
            lo = reach if i > 0 else 0
            hi = reach if i < len(starts) - 1 else 0
            sides += c + lo + hi + 2 * (reach + 1)
        total *= sides
    return total


def run_one(data: Path, method: str, *, workdir: Path, crop=None, chunks=None, params=None, keep=False) -> dict:
    params = dict(DEFAULTS[method] if params is None else params)
    out = workdir / f"denoised_{method}.zarr"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(data / "grey.zarr"), method, str(out),
           json.dumps({"crop": crop, "chunks": chunks, "params": params})]
    r = _measure.run_measured(cmd)
    if r["returncode"] != 0:
        raise RuntimeError(f"{method} failed:\n{r['stderr'][-3000:]}")
    child = json.loads(r["stdout"].strip().splitlines()[-1])
    res = {"benchmark": "preprocess_denoise", "method": method, "seconds": round(r["seconds"], 2),
           "peak_rss_gib": round(r["peak_rss"] / _measure.GiB, 3), "load_before": r["load_before"],
           "load_after": r["load_after"], "out_bytes": _measure.du(out), **child}
    vox = 1
    for n in child["shape"]:
        vox *= n
    res["us_per_voxel"] = round(r["seconds"] / vox * 1e6, 4)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return res


def extrapolate_nlm(res: dict, full_shape) -> dict:
    """Scale a crop's NLM time to `full_shape` by the ratio of block work (see module notes)."""
    p = res["parameters"]
    reach = p["patch_distance"] + p["patch_size"] // 2
    chunk = res["chunks"][0]
    ratio = block_work(full_shape, chunk, reach) / block_work(res["shape"], chunk, reach)
    vox_ratio = 1
    for a, b in zip(full_shape, res["shape"]):
        vox_ratio *= a / b
    return {"full_shape": list(full_shape), "work_ratio": round(ratio, 3), "voxel_ratio": round(vox_ratio, 3),
            "seconds_extrapolated": round(res["seconds"] * ratio, 1),
            "seconds_extrapolated_per_voxel": round(res["seconds"] * vox_ratio, 1)}


def summary(rows) -> str:
    lines = [f"{'method':<9} {'shape':>15} {'seconds':>9} {'us/voxel':>9} {'peak RSS':>9}  load  extrapolated"]
    for r in rows:
        ext = r.get("extrapolated")
        e = f"{ext['seconds_extrapolated']:.0f} s at {'x'.join(map(str, ext['full_shape']))}" if ext else ""
        lines.append(f"{r['method']:<9} {'x'.join(map(str, r['shape'])):>15} {r['seconds']:>9.1f} "
                     f"{r['us_per_voxel']:>9.3f} {r['peak_rss_gib']:>7.2f} GiB  {r['load_before']:<4}  {e}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("benchmarks/_data/dn512"),
                    help="folder with grey.zarr (grapes-dask synth DIR --size 512 512 512)")
    ap.add_argument("--methods", nargs="+", default=["gaussian", "median", "nlm"], choices=list(DEFAULTS))
    ap.add_argument("--crop", type=int, default=None, help="denoise the corner [:N, :N, :N] only")
    ap.add_argument("--nlm-crop", type=int, default=None,
                    help="crop for nlm only (others run on the whole volume); the time is also extrapolated")
    ap.add_argument("--chunks", type=int, default=None, help="block side (default: the Zarr chunks)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None, help="folder of the outputs (default: --data)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        src, method, out, opts = a.child
        o = json.loads(opts)
        print(json.dumps(_child(src, method, out, o["crop"], o["chunks"], o["params"])))
        return 0
    if not (a.data / "grey.zarr").exists():
        print(f"preprocess_denoise: {a.data / 'grey.zarr'} does not exist: make it with "
              f"grapes-dask synth {a.data} --size 512 512 512", file=sys.stderr)
        return 2
    import zarr

    full = tuple(zarr.open_array(str(a.data / "grey.zarr"), mode="r").shape)
    rows = []
    for method in a.methods:
        crop = a.nlm_crop if (method == "nlm" and a.nlm_crop) else a.crop
        for _ in range(a.repeat):
            r = run_one(a.data, method, workdir=a.workdir or a.data, crop=crop, chunks=a.chunks, keep=a.keep)
            if method == "nlm" and tuple(r["shape"]) != full:
                r["extrapolated"] = extrapolate_nlm(r, full)
            print(json.dumps(r), flush=True)
            rows.append(r)
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
