"""Scientific validation of operando tracking on synthetic series with known damage.

Stages:

1. **Series.** A four-state phantom (pristine, 4.0 V, 4.4 V, 2.5 V) with rising then partly
   healed damage, falling along x (``damage_gradient``), rendered twice with the same seed: with
   the default noise (uint8, sigma 6) and without noise. The particles, their voids and cracks
   are the same in both; only the noise differs.
2. **Agreement with the noise-free twin.** Both series are tracked with
   :func:`grapes_dask.track.track`; per particle, the measured delta (state minus pristine, ROI
   mean) is compared with the noise-free delta of the same particle (Spearman rank correlation),
   and the population delta with the noise-free one, in units of the measured SE_tot.
3. **Order of the injected damage.** The population deltas must fall in the order of the
   damage levels by state, and, by x-position quartile, in the order of the damage gradient.
4. **Bias.** The same comparisons with the rim kept (``exclude_outer_layers=0``) and per radial
   layer, to show where the measurement is diluted: the phase-contrast rim and the
   partial-volume layers near the surface carry little of the darkening.
5. **No-damage control.** ``n_seeds`` two-state series without damage (only noise differs):
   the z-tests at 2 sigma (two-sided) should reject in about 4.6% of the seeds when the test is
   valid; the observed rate and its 95% Clopper-Pearson interval are reported for eq. 6 as the
   paper applies it (unpaired) and for the paired test of the per-particle changes.

Usage::

    python benchmarks/validate_operando.py               # 192^3 series, 40 control seeds
    python benchmarks/validate_operando.py --size 128 --seeds 10   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import pandas as pd

LEVELS = {"pristine": 0.0, "4.0 V": 0.35, "4.4 V": 0.8, "2.5 V": 0.5}


def series(size: int, seed: int, levels: dict, noise: bool, mean_radius: float, gradient: float):
    from grapes_dask.synthetic import phantom_numpy

    opts = {} if noise else {"noise_sigma": 0.0}
    grey, labels, truth = phantom_numpy((size,) * 3, n_states=len(levels), seed=seed, mean_radius=mean_radius,
                                        damage=list(levels.values()), damage_gradient=gradient, damage_axis=2,
                                        **opts)
    return {name: (grey[s], labels[s]) for s, name in enumerate(levels)}, truth


def run_track(states, **kw):
    from grapes_dask.track import track

    return track(states, reference=next(iter(states)), **kw)


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    keep = np.isfinite(a) & np.isfinite(b)
    return float(spearmanr(a[keep], b[keep]).statistic)


def agreement(noisy, clean, levels) -> pd.DataFrame:
    """Per state: Spearman of per-particle deltas, population deltas and their distance in SE_tot."""
    p_n = noisy.particles[~noisy.particles["excluded"]]
    p_c = clean.particles.set_index(["label", "state"])
    s_n, s_c = noisy.summary(), clean.summary()
    rows = []
    for name in list(levels)[1:]:
        a = p_n[p_n["state"] == name]
        b = p_c.loc[[(lab, name) for lab in a["label"]], "delta"].to_numpy()
        d_n, d_c = s_n.loc[name, "delta_mean"], float(np.mean(b))
        rows.append(dict(state=name, level=levels[name], n=len(a), spearman=spearman(a["delta"].to_numpy(), b),
                         delta_noisy=d_n, delta_clean=d_c, se_tot=s_n.loc[name, "delta_se_tot"],
                         distance_in_se_tot=(d_n - d_c) / s_n.loc[name, "delta_se_tot"]))
    # all non-reference states pooled: the per-particle deltas of every (particle, state)
    a = p_n[p_n["state"] != list(levels)[0]]
    b = p_c.loc[list(zip(a["label"], a["state"])), "delta"].to_numpy()
    rows.append(dict(state="pooled", level=np.nan, n=len(a), spearman=spearman(a["delta"].to_numpy(), b),
                     delta_noisy=np.nan, delta_clean=np.nan, se_tot=np.nan, distance_in_se_tot=np.nan))
    return pd.DataFrame(rows)


def layer_deltas(tr, state: str, ref: str, max_layer: int = 12) -> pd.Series:
    """Mean over kept particles of the per-layer grey change (state minus reference), per layer."""
    kept = tr.particles.loc[~tr.particles["excluded"], "label"].unique()
    out = []
    for name in (ref, state):
        t = tr.tables[name]
        t = t[t["label"].isin(kept)].set_index("label").sort_index()
        m = np.full((len(t), max_layer), np.nan)
        for i, prof in enumerate(t["radial_layers_graylevel"]):
            k = min(max_layer, len(prof))
            m[i, :k] = prof[:k]
        out.append(m)
    d = out[1] - out[0]
    n = np.isfinite(d).sum(axis=0)
    with np.errstate(invalid="ignore"):
        mean = np.where(n >= 10, np.nansum(d, axis=0) / np.maximum(n, 1), np.nan)
    return pd.DataFrame({"delta": mean, "n": n}, index=pd.RangeIndex(1, max_layer + 1, name="layer"))


def control(n_seeds: int, size: int, mean_radius: float, sigma: float = 2.0) -> dict:
    """Rejection rates of several z statistics at `sigma` (two-sided) over no-damage series."""
    from scipy.stats import binomtest, norm

    from grapes_dask.stats import z_test

    stats = {"eq6_unpaired": [], "paired_ses": [], "paired_se_tot": [], "paired_ses_roi200": [],
             "paired_inverse_variance": []}
    for seed in range(n_seeds):
        states, _ = series(size, 1000 + seed, {"pristine": 0.0, "again": 0.0}, True, mean_radius, 0.0)
        tr = run_track(states, noise_sigma=6.0)
        s = tr.summary()
        a, b = s.loc["pristine"], s.loc["again"]
        r = z_test(b["mean"], b["sd"], b["n"], a["mean"], a["sd"], a["n"], alternative="two-sided", sigma=sigma)
        stats["eq6_unpaired"].append(r.z)
        stats["paired_ses"].append(b["delta_mean"] / b["delta_ses"])
        stats["paired_se_tot"].append(b["delta_mean"] / b["delta_se_tot"])
        p = tr.particles
        k = p[(p["state"] == "again") & ~p["excluded"]]
        big = k[k["roi_voxels"] >= 200]["delta"].to_numpy()
        stats["paired_ses_roi200"].append(big.mean() / (big.std(ddof=1) / np.sqrt(len(big))))
        w = 1.0 / k["delta_sem"].to_numpy() ** 2  # inverse measurement variance (eq. 2)
        stats["paired_inverse_variance"].append(float(np.sum(w * k["delta"].to_numpy()) / np.sqrt(np.sum(w))))
    crit = float(norm.isf(norm.sf(sigma)))  # = sigma
    out = {}
    for name, zs in stats.items():
        zs = np.asarray(zs, float)
        k = int(np.sum(np.abs(zs) > crit))
        ci = binomtest(k, n_seeds).proportion_ci(0.95, method="exact")
        out[name] = dict(rejections=k, seeds=n_seeds, rate=round(k / n_seeds, 4),
                         ci95=(round(ci.low, 4), round(ci.high, 4)), z_sd=round(float(np.std(zs, ddof=1)), 3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--radius", type=float, default=9.0)
    ap.add_argument("--gradient", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--seeds", type=int, default=40, help="no-damage control seeds")
    ap.add_argument("--control-size", type=int, default=128)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    import dask

    dask.config.set(scheduler="threads")
    t0 = time.perf_counter()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"series {args.size}^3, mean radius {args.radius}, gradient {args.gradient}, seed {args.seed}")
    noisy_states, truth = series(args.size, args.seed, LEVELS, True, args.radius, args.gradient)
    clean_states, _ = series(args.size, args.seed, LEVELS, False, args.radius, args.gradient)
    noisy = run_track(noisy_states)  # noise estimated from the background
    clean = run_track(clean_states, noise_sigma=0.0)
    sigmas = {k: v["sigma"] for k, v in noisy.params["noise"].items()}
    noisy0 = run_track(noisy_states, exclude_outer_layers=0, noise_sigma=sigmas)
    print("noise estimated from the background (rendered with sigma 6): "
          + ", ".join(f"{k} {v:.3f}" for k, v in sigmas.items()))
    print(noisy.counts().to_string(index=False))
    res = {"agreement": agreement(noisy, clean, LEVELS)}
    print("\n2. per-particle and population deltas against the noise-free twin (exclude_outer_layers=5)")
    print(res["agreement"].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    s = noisy.summary()
    order_states = list(s.loc[list(LEVELS)[1:], "delta_mean"].sort_values(ascending=False).index)
    order_levels = sorted(list(LEVELS)[1:], key=lambda k: LEVELS[k])
    print(f"\n3. states by population delta (least darkening first): {order_states}; by level: {order_levels}")
    q = noisy.by_quantile("centroid-2", 4, "4.4 V")
    print("   4.4 V delta by x-position quartile (damage falls with x):")
    print(q[["group", "lo", "hi", "n", "delta_mean", "delta_se_tot"]].to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    t44 = truth[truth["state"] == list(LEVELS).index("4.4 V")].set_index("label")
    kept = noisy.particles[(noisy.particles["state"] == "4.4 V") & ~noisy.particles["excluded"]]
    q["true_damage"] = [t44.loc[kept.loc[(kept["centroid-2"] >= lo) & (kept["centroid-2"] <= hi), "label"],
                                "damage"].mean() for lo, hi in zip(q["lo"], q["hi"])]
    print("   true mean damage per quartile: " + ", ".join(f"{v:.3f}" for v in q["true_damage"]))
    from scipy.stats import spearmanr

    print(f"   Spearman(quartile delta, true damage) = {spearmanr(q['delta_mean'], -q['true_damage']).statistic:.2f}")
    d = kept.set_index("label")["delta"]
    print(f"   per-particle Spearman(delta, -true damage) at 4.4 V: {spearman(d.to_numpy(), -t44.loc[d.index, 'damage'].to_numpy()):.3f}"
          f" (n {len(d)})")
    res["by_quantile"] = q
    print("\n4. bias: rim kept (exclude_outer_layers=0) against rim removed (5)")
    s0 = noisy0.summary()
    bias = pd.DataFrame({"delta_N5": s["delta_mean"], "delta_N0": s0["delta_mean"],
                         "mean_N5": s["mean"], "mean_N0": s0["mean"]})
    print(bias.to_string(float_format=lambda v: f"{v:.2f}"))
    ld = layer_deltas(noisy, "4.4 V", "pristine")
    print("   4.4 V per-layer delta (mean over kept particles, layer 1 = surface; layers with >= 10 particles):")
    print("   " + ", ".join(f"{k}: {v:.2f} (n {n})" for k, (v, n) in ld.iterrows() if np.isfinite(v)))
    res["bias"], res["layers"] = bias, ld
    t1 = time.perf_counter()
    print(f"\n5. no-damage control: {args.seeds} seeds, {args.control_size}^3, z-test at 2 sigma two-sided")
    ctrl = control(args.seeds, args.control_size, args.radius)
    for k, v in ctrl.items():
        print(f"   {k}: {v}")
    res["control"] = ctrl
    print(f"\nseries {t1 - t0:.0f} s, control {time.perf_counter() - t1:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in res.items()}, f, indent=1,
                      default=str)


if __name__ == "__main__":
    main()
