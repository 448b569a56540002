"""A physical voxel size gives the layers of unit spacing: the table and an operando run, measured.

1. **Table.** A phantom (default 384^3, mean radius 14 voxels) is written to Zarr twice: once
   with its voxel size in voxels (spacing 1) and once with ``spacing 0.325, unit micrometer``
   in the Zarr attributes (the same chunks, copied). ``grapes-dask analyze`` (embedded cluster,
   ``--exclude-outer-layers 5``) runs on each in its own process, timed with its peak RSS;
   then every column is compared: the layers table, the profiles and the ROI must be equal to
   the bit, volume, surface area and lengths scaled by 0.325^3, 0.325^2 and 0.325.
2. **Operando.** A three-state series (default 160^3, air above the sample) is written as an
   ImageJ TIFF pair, an HDF5 file and a folder of TIFF slices, all at 0.325 um, and tracked by
   ``grapes-dask operando`` with its defaults; so are the Zarr states at spacing 1. The kept
   particles, ``summary.csv`` and ``z_tests.csv`` are compared (the noise moments are summed over
   the files' own chunks, so sigma_bg may differ in its last bit: the largest relative
   difference is printed).

Usage::

    python benchmarks/physical_units.py [--size 384] [--series-size 160] [--work DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import GiB, run_measured  # noqa: E402

S = 0.325
PY = sys.executable


def table_case(work: Path, size: int) -> dict:
    import zarr

    from grapes_dask import synthetic

    ph = synthetic.make_phantom(work / "ph", shape=(size,) * 3, seed=11, mean_radius=14.0, chunks=128)
    um = work / "ph_um"
    um.mkdir()
    for name in ("grey", "labels"):
        shutil.copytree(getattr(ph, name)[0], um / f"{name}.zarr")
        z = zarr.open_array(str(um / f"{name}.zarr"), mode="r+")
        z.attrs.update({"spacing": [S, S, S], "unit": "micrometer"})
    out = {}
    for key, folder in (("unit", Path(ph.grey[0]).parent), ("physical", um)):
        t = work / f"{key}.parquet"
        r = run_measured([PY, "-m", "grapes_dask", "analyze", str(folder / "grey.zarr"), str(folder / "labels.zarr"),
                          "--out", str(t), "--exclude-outer-layers", "5", "--quiet"])
        assert r["returncode"] == 0, r["stderr"]
        out[key] = (t, r["seconds"], r["peak_rss"], r["stderr"])
    a, b = pd.read_parquet(out["physical"][0]), pd.read_parquet(out["unit"][0])
    la = pd.read_parquet(str(out["physical"][0]).replace(".parquet", ".layers.parquet"))
    lb = pd.read_parquet(str(out["unit"][0]).replace(".parquet", ".layers.parquet"))
    same_layers = la.equals(lb)
    exact = ["radial_layers", "radial_layers_count", "radial_layers_graylevel", "radial_layers_std",
             "radial_layers_graylevelnormed", "roi_voxels", "roi_mean", "roi_std", "voxel_count", "centroid-0"]
    unequal = [c for c in exact if not all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
                                           for x, y in zip(a[c], b[c]))]
    scaled = {c: float(np.max(np.abs(a[c] / (b[c] * S ** p) - 1))) for c, p in
              (("volume", 3), ("surface_area", 2), ("equivalent_diameter_volume", 1), ("axis_major_length", 1))}
    big = a.loc[a["voxel_count"].idxmax()]
    return {"size": size, "particles": len(a), "same_layers_table": same_layers, "unequal_columns": unequal,
            "max_rel_scaling_error": scaled, "unit_wall_s": out["unit"][1], "unit_peak_gib": out["unit"][2] / GiB,
            "physical_wall_s": out["physical"][1], "physical_peak_gib": out["physical"][2] / GiB,
            "largest_layers": len(big["radial_layers"]), "largest_roi_voxels": int(big["roi_voxels"])}


def operando_case(work: Path, size: int) -> dict:
    import h5py
    import tifffile
    import zarr

    from grapes_dask import synthetic

    ph = synthetic.make_phantom(work / "series", shape=(size,) * 3, n_states=3, seed=5, mean_radius=9.0,
                                chunks=80, air_thickness=max(4, size // 10))
    grey = [np.asarray(zarr.open_array(p, mode="r")) for p in ph.grey]
    labs = [np.asarray(zarr.open_array(p, mode="r")).astype(np.uint16) for p in ph.labels]
    ij = dict(imagej=True, resolution=(1 / S, 1 / S), metadata={"unit": "um", "spacing": S, "axes": "ZYX"})
    f = work / "files"
    f.mkdir()
    tifffile.imwrite(f / "s0_grey.tif", grey[0], **ij)
    tifffile.imwrite(f / "s0_labels.tif", labs[0], **ij)
    with h5py.File(f / "s1.h5", "w") as h:
        for name, arr in (("grey", grey[1]), ("labels", labs[1])):
            h.create_dataset(name, data=arr, chunks=(32, 32, 32)).attrs.update({"spacing": [S] * 3, "units": "um"})
    for name, arr in (("grey", grey[2]), ("labels", labs[2])):
        d = f / f"s2_{name}"
        d.mkdir()
        for z, plane in enumerate(arr):
            tifffile.imwrite(d / f"{z:04d}.tif", plane, imagej=True, resolution=(1 / S, 1 / S),
                             metadata={"unit": "um", "spacing": S})
    specs = {"physical": [f"pristine={f / 's0_grey.tif'},{f / 's0_labels.tif'}",
                          f"charged={f / 's1.h5'}::/grey,{f / 's1.h5'}::/labels",
                          f"discharged={f / 's2_grey'},{f / 's2_labels'}"],
             "unit": [f"{n}={g},{lb}" for n, g, lb in zip(("pristine", "charged", "discharged"), ph.grey, ph.labels)]}
    res = {}
    for key, states in specs.items():
        cmd = [PY, "-m", "grapes_dask", "operando", "--out", str(work / f"op_{key}")]
        for s in states:
            cmd += ["--state", s]
        r = run_measured(cmd)
        assert r["returncode"] == 0, r["stderr"]
        res[key] = (r["seconds"], r["peak_rss"], r["stderr"])
    pa = pd.read_parquet(work / "op_physical" / "particles.parquet")
    pb = pd.read_parquet(work / "op_unit" / "particles.parquet")
    sa, sb = (pd.read_csv(work / f"op_{k}" / "summary.csv") for k in ("physical", "unit"))
    za, zb = (pd.read_csv(work / f"op_{k}" / "z_tests.csv") for k in ("physical", "unit"))
    return {"size": size, "particles": int(pa["label"].nunique()),
            "kept_physical": int(pa.loc[~pa["excluded"], "label"].nunique()),
            "kept_unit": int(pb.loc[~pb["excluded"], "label"].nunique()),
            "same_kept": set(pa.loc[~pa["excluded"], "label"]) == set(pb.loc[~pb["excluded"], "label"]),
            "summary_columns_bitwise_equal": [c for c in sa.columns if sa[c].equals(sb[c])],
            "summary_max_rel_difference": float(max(
                np.nanmax(np.abs(sa[c].to_numpy(float) - sb[c].to_numpy(float))
                          / np.maximum(np.abs(sb[c].to_numpy(float)), 1e-300), initial=0.0)
                for c in sa.columns if sa[c].dtype.kind == "f")),
            "same_z_tests": za.equals(zb),
            "physical_wall_s": res["physical"][0], "unit_wall_s": res["unit"][0],
            "physical_peak_gib": res["physical"][1] / GiB, "unit_peak_gib": res["unit"][1] / GiB,
            "summary": sa[["state", "n", "mean", "delta_mean", "delta_se_tot"]].to_string(index=False)
            if {"state", "n", "mean", "delta_mean", "delta_se_tot"} <= set(sa.columns) else sa.to_string(index=False)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--series-size", type=int, default=160)
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gd-units-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        tab = table_case(work / "table", args.size)
        for k, v in tab.items():
            print(f"table {k}: {v}")
        op = operando_case(work / "operando", args.series_size)
        for k, v in op.items():
            print(f"operando {k}: {v}")
        print(f"whole script {time.perf_counter() - t0:.0f} s")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
