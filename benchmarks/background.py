"""sigma_bg from empty space, and the beam-drift check, on a phantom with air and textured pores.

Stages:

1. **Phantom.** A ``size^3`` uint8 phantom (:func:`grapes_dask.synthetic.make_phantom`, Zarr,
   ``chunks^3``) with an empty slab of ``air`` voxels above the sample along z (grey level 30,
   noise only) and a textured pore phase (``pore_texture``: a smooth random field on the pores
   between particles), noise sigma 8.
2. **sigma_bg.** The true noise (8, and sqrt(64 + 1/12) after rounding to uint8), numpy's std of
   the air slab read whole, the pores' std, and :func:`grapes_dask.stats.estimate_noise` read
   from the Zarr stores: ``mode="background"`` (the estimate before empty space: label-0 voxels
   3 voxels from the particles) and the default (empty space first), with their wall times.
3. **Beam drift.** A three-state series (damage 0, 0.3, 0.6) rendered twice with the same seed:
   offset-free, and with ``offset`` grey levels added to the last state (a beam drift). Each is
   tracked (:func:`grapes_dask.track.track`, ``exclude_outer_layers=5``); the drifted series
   again with ``correct_drift=True`` on its tables. Reported: the background table of the
   drifted series (peak, shift, ratio to the mean change, flag), and the last state's mean
   change without drift, with it, and corrected.

Usage::

    python benchmarks/background.py                 # 256^3, as in benchmarks/README.md
    python benchmarks/background.py --size 128      # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def ratio_masked(v, mask, lag: int) -> float:
    """sigma / haar_sigma (numpy) of the voxels of `mask` (all if None) at least 3 voxels from a
    labelled voxel, with pairs `lag` apart inside the mask along each axis."""
    from scipy import ndimage as ndi

    v = v.astype(np.float64)
    if mask is None:
        mask = np.ones(v.shape, bool)
    else:
        mask = mask & (ndi.distance_transform_edt(mask) >= 3)
    s2, cnt = 0.0, 0
    for ax in range(v.ndim):
        hi = [slice(None)] * v.ndim
        lo = [slice(None)] * v.ndim
        hi[ax], lo[ax] = slice(lag, None), slice(None, -lag)
        m = mask[tuple(hi)] & mask[tuple(lo)]
        d = (v[tuple(hi)] - v[tuple(lo)])[m]
        s2 += float(d @ d)
        cnt += d.size
    return float(v[mask].std(ddof=1) / np.sqrt(s2 / (2 * cnt)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--air", type=int, default=32, help="air slab thickness, voxels")
    ap.add_argument("--noise", type=float, default=8.0)
    ap.add_argument("--texture", type=float, default=24.0, help="pore_texture of the phantom, grey levels")
    ap.add_argument("--offset", type=float, default=-3.0, help="beam offset of the last state, grey levels")
    ap.add_argument("--chunks", type=int, default=128)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=None, help="folder for the phantoms (default: a temporary one)")
    a = ap.parse_args(argv)

    import dask

    from grapes_dask.io import open_volume
    from grapes_dask.stats import GrapesBackgroundWarning, estimate_noise
    from grapes_dask.synthetic import make_phantom
    from grapes_dask.track import track

    dask.config.set(scheduler="threads", num_workers=os.cpu_count())
    shape = (a.size,) * 3
    common = dict(shape=shape, n_states=3, seed=a.seed, chunks=a.chunks, noise_sigma=a.noise,
                  air_thickness=a.air, air_level=30.0, pore_texture=a.texture, damage=[0.0, 0.3, 0.6])
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "size": a.size,
           "air": a.air, "noise": a.noise, "texture": a.texture, "offset": a.offset}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(a.out or tmp)
        t0 = time.perf_counter()
        clean = make_phantom(base / "clean", overwrite=True, **common)
        drift = make_phantom(base / "drift", overwrite=True, beam_offsets=[0.0, 0.0, a.offset], **common)
        res["phantoms_s"] = time.perf_counter() - t0

        # 2. sigma_bg of the reference state
        g, lab = clean.open(0)
        gn, ln = np.asarray(g), np.asarray(lab)
        air = gn[a.size - a.air:].astype(np.float64)
        pores = gn[: a.size - a.air][ln[: a.size - a.air] == 0].astype(np.float64)
        res["true_sigma"] = a.noise
        res["true_sigma_rounded"] = float(np.sqrt(a.noise ** 2 + 1 / 12))
        res["numpy_air_std"] = float(air.std(ddof=1))
        res["numpy_pore_std"] = float(pores.std(ddof=1))
        below = a.size - a.air
        res["pore_ratio"] = {lag: ratio_masked(gn[:below], ln[:below] == 0, lag) for lag in (1, 2, 3)}
        res["air_ratio"] = {lag: ratio_masked(gn[a.size - a.air:], None, lag) for lag in (1, 2, 3)}
        del gn, ln, air, pores
        t0 = time.perf_counter()
        old = estimate_noise(g, lab, mode="background")
        res["background_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        new = estimate_noise(g, lab)
        res["empty_space_s"] = time.perf_counter() - t0
        res["background"] = {"sigma": old.sigma, "n_voxels": old.n_voxels}
        res["empty_space"] = {"sigma": new.sigma, "source": new.source, "box": new.region, "n_voxels": new.n_voxels,
                              "peak": new.peak, "spread": new.spread,
                              "candidates": [{k: c.get(k) for k in ("face", "box", "sigma", "ratio", "flat", "why")}
                                             for c in new.candidates]}
        # without the air slab: the fallback
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always", GrapesBackgroundWarning)
            cut = estimate_noise(g[: a.size - a.air], lab[: a.size - a.air])
        res["no_air"] = {"sigma": cut.sigma, "source": cut.source, "warned": any(
            issubclass(x.category, GrapesBackgroundWarning) for x in w)}

        # 3. beam drift
        def states(ph):
            return {f"s{i}": tuple(str(p) for p in (ph.grey[i], ph.labels[i])) for i in range(3)}

        kw = dict(exclude_outer_layers=5)
        t0 = time.perf_counter()
        tr_clean = track(states(clean), **kw)
        res["track_clean_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always", GrapesBackgroundWarning)
            tr_drift = track(states(drift), **kw)
        res["track_drift_s"] = time.perf_counter() - t0
        res["drift_warning"] = [str(x.message) for x in w if issubclass(x.category, GrapesBackgroundWarning)]
        t0 = time.perf_counter()
        st = {s: (gg, ll, tr_drift.tables[s]) for s, (gg, ll) in states(drift).items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GrapesBackgroundWarning)
            tr_cor = track(st, correct_drift=True, **kw)
        res["track_corrected_s"] = time.perf_counter() - t0
        res["background_table_clean"] = tr_clean.background().to_dict(orient="records")
        res["background_table_drift"] = tr_drift.background().to_dict(orient="records")
        res["delta_mean"] = {name: tr.summary()["delta_mean"].to_dict()
                             for name, tr in (("clean", tr_clean), ("drift", tr_drift), ("corrected", tr_cor))}
        res["delta_se_tot"] = tr_clean.summary()["delta_se_tot"].to_dict()
        res["noise_sources"] = {s: (r["source"], r["sigma"]) for s, r in tr_drift.params["noise"].items()}
    print(json.dumps(res, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    return res


if __name__ == "__main__":
    main()
