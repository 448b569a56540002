"""Registration out of core: time and peak memory of ``register`` + ``apply_transform`` (Zarr in, Zarr out).

    python benchmarks/preprocess_register.py                       # 512^3, translation and rigid
    python benchmarks/preprocess_register.py --size 800 --method translation
    python benchmarks/preprocess_register.py --skip-generate --repeat 2

Steps (each measured one in a fresh subprocess, the RSS of its whole process tree sampled every
50 ms by ``benchmarks/_measure.py``):

1. the phantom (not measured): ``grapes-dask synth DATA --size S S S`` writes ``DATA/grey.zarr``
   (uint8, chunks 128^3), unless it is there already;
2. the moving states (not measured), made independently of the code under test with
   dask-image's ``affine_transform`` (order 1, which equals scipy's): ``DATA/moved_translation.zarr``
   is the phantom shifted by ``--shift`` (so that ``moving(x + shift) = fixed(x)``) and
   ``DATA/moved_rigid.zarr`` the phantom rotated by ``--angle`` degrees about z around the volume
   centre, plus the shift;
3. ``register(grey.zarr, moved_*.zarr, method=...)``: wall time, peak RSS, the estimate's error
   against the known motion (voxels at the centre; degrees);
4. ``apply_transform(moved_*.zarr, transform, out=aligned.zarr)``: wall time, peak RSS; then (not
   measured) the normalised cross-correlation of a central 128^3 box of the aligned volume with
   the phantom, before and after.

Prints one line per step and a JSON line ``{"benchmark": "preprocess_register", ...}``. The load
average is printed with every figure: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _measure  # noqa: E402

GiB = _measure.GiB


def _rot_z(deg):
    import numpy as np

    t = np.deg2rad(deg)
    return np.array([[1.0, 0.0, 0.0], [0.0, np.cos(t), -np.sin(t)], [0.0, np.sin(t), np.cos(t)]])


def truth(shape, method, shift, angle):
    """(matrix, offset) of the known fixed -> moving map."""
    import numpy as np

    c = (np.asarray(shape, float) - 1) / 2
    r = _rot_z(angle) if method == "rigid" else np.eye(3)
    return r, c - r @ c + np.asarray(shift, float)


# ---- subprocess steps -------------------------------------------------------------------------


def step_make_moving(data: Path, method: str, shift, angle) -> dict:
    import dask
    import numpy as np
    from dask_image.ndinterp import affine_transform

    from grapes_dask.io import open_volume, write_zarr

    fixed = open_volume(data / "grey.zarr")
    r, o = truth(fixed.shape, method, shift, angle)
    # moving(y) = fixed(T^-1(y)) with T^-1(y) = r^T y - r^T o
    inv_m, inv_o = r.T, -r.T @ o
    moved = affine_transform(fixed.astype(np.float32), inv_m, inv_o, output_shape=fixed.shape, order=1,
                             output_chunks=fixed.chunksize, mode="nearest")
    moved = da_round(moved)
    with dask.config.set(scheduler="threads"):
        write_zarr(moved, data / f"moved_{method}.zarr", attrs={"truth_matrix": r.tolist(), "truth_offset": o.tolist()},
                   overwrite=True)
    return {}


def da_round(a):
    import numpy as np

    return a.map_blocks(lambda b: np.clip(np.rint(b), 0, 255).astype(np.uint8), dtype=np.uint8)


def step_register(data: Path, method: str, max_view: int) -> dict:
    from grapes_dask.registration import register

    t0 = time.perf_counter()
    t = register(data / "grey.zarr", data / f"moved_{method}.zarr", method=method, max_view=max_view)
    sec = time.perf_counter() - t0
    t.save(data / f"transform_{method}.json")
    return {"seconds_inner": sec, "transform": t.to_dict()}


def step_apply(data: Path, method: str) -> dict:
    from grapes_dask.registration import apply_transform

    t0 = time.perf_counter()
    apply_transform(data / f"moved_{method}.zarr", data / f"transform_{method}.json",
                    out=data / f"aligned_{method}.zarr", overwrite=True)
    return {"seconds_inner": time.perf_counter() - t0}


def step_check(data: Path, method: str) -> dict:
    import numpy as np

    from grapes_dask.io import open_volume

    fixed = open_volume(data / "grey.zarr")
    n = fixed.shape
    box = tuple(slice(s // 2 - 64, s // 2 + 64) for s in n)

    def ncc(a, b):
        a = a.astype(float) - a.mean()
        b = b.astype(float) - b.mean()
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    f = fixed[box].compute()
    return {"ncc_before": ncc(f, open_volume(data / f"moved_{method}.zarr")[box].compute()),
            "ncc_after": ncc(f, open_volume(data / f"aligned_{method}.zarr")[box].compute())}


STEPS = {"make_moving": step_make_moving, "register": step_register, "apply": step_apply, "check": step_check}


def run_step(name: str, args, method: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_step", name, "--data", str(args.data),
           "--method", method, "--angle", str(args.angle), "--max-view", str(args.max_view),
           "--shift", *[str(s) for s in args.shift]]
    res = _measure.run_measured(cmd, env=os.environ.copy())
    if res["returncode"] != 0:
        sys.stderr.write(res["stderr"])
        raise SystemExit(f"step {name} ({method}) failed")
    out = json.loads(res["stdout"].strip().splitlines()[-1])
    out.update(seconds=round(res["seconds"], 2), peak_rss_gib=round(res["peak_rss"] / GiB, 3),
               load=(res["load_before"], res["load_after"]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / "_data" / "reg512")
    ap.add_argument("--method", choices=["translation", "rigid", "both"], default="both")
    ap.add_argument("--shift", type=float, nargs=3, default=[3.3, -5.7, 2.45], metavar=("Z", "Y", "X"))
    ap.add_argument("--angle", type=float, default=1.5, help="rigid: rotation about z, degrees")
    ap.add_argument("--max-view", type=int, default=128, help="register's max_view (its default: 128)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--_step", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._step:
        fn = STEPS[args._step]
        kw = {"make_moving": dict(shift=args.shift, angle=args.angle), "register": dict(max_view=args.max_view)}
        print(json.dumps(fn(args.data, args.method, **kw.get(args._step, {})), default=str))
        return

    import numpy as np

    data = args.data
    if not (data / "grey.zarr").exists():
        if args.skip_generate:
            raise SystemExit(f"{data / 'grey.zarr'} does not exist: run without --skip-generate")
        data.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "grapes_dask", "synth", str(data), "--size", *[str(args.size)] * 3,
                        "--quiet", "--overwrite"], check=True)
        print(f"phantom {args.size}^3 generated in {time.perf_counter() - t0:.1f} s")
    methods = ["translation", "rigid"] if args.method == "both" else [args.method]
    results = {}
    for method in methods:
        if not (data / f"moved_{method}.zarr").exists() or not args.skip_generate:
            run_step("make_moving", args, method)
        runs = []
        for k in range(args.repeat):
            reg = run_step("register", args, method)
            app = run_step("apply", args, method)
            chk = run_step("check", args, method)
            t = reg["transform"]
            m_true, o_true = truth(t["fixed_shape"], method, args.shift, args.angle)
            c = (np.asarray(t["fixed_shape"], float) - 1) / 2
            shift_true = m_true @ c + o_true - c
            err = float(np.abs(np.asarray(t["shift"]) - shift_true).max())
            row = {
                "register_s": reg["seconds"], "register_peak_gib": reg["peak_rss_gib"], "register_load": reg["load"],
                "apply_s": app["seconds"], "apply_peak_gib": app["peak_rss_gib"], "apply_load": app["load"],
                "shift_error_voxels": round(err, 3), "rotation_deg": round(t["rotation_deg"], 3),
                "angle_error_deg": round(abs(t["rotation_deg"] - (args.angle if method == "rigid" else 0.0)), 3),
                "downsample": t["parameters"]["downsample"], "ncc_crop": t["ncc"],
                "ncc_before": round(chk["ncc_before"], 4), "ncc_after": round(chk["ncc_after"], 4),
            }
            runs.append(row)
            print(f"{method} run {k + 1}: register {row['register_s']} s, peak {row['register_peak_gib']} GiB "
                  f"(load {row['register_load']}); apply {row['apply_s']} s, peak {row['apply_peak_gib']} GiB "
                  f"(load {row['apply_load']}); shift error {row['shift_error_voxels']} voxel, rotation "
                  f"{row['rotation_deg']} deg; NCC of a central 128^3 box {row['ncc_before']} -> {row['ncc_after']}")
        results[method] = runs
    print(json.dumps({"benchmark": "preprocess_register", "size": args.size, "shift": args.shift,
                      "angle": args.angle, "max_view": args.max_view, "results": results}))


if __name__ == "__main__":
    main()
