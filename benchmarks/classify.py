"""Noise-aware classification of particle changes: false positives without damage, recall with damage.

:func:`grapes_dask.change.classify` calls a particle darker when its change against the
reference is below ``-k`` times its measurement error (paper eq. 2). This script measures, on
synthetic operando series whose damage is known per particle:

1. **False positives.** States 0 and 1 of each series are the same particles with no damage;
   only the image noise differs. The share of particles called darker (and brighter) at
   k = 2, 3, 4, 5, against the normal tail ``norm.sf(k)`` (0.135% at k = 3), with Wilson 95%
   intervals over all seeds pooled; beside it the paper's plain share of decreases (fig. 9),
   about 50% by noise alone. Once with the noise given as rendered (sigma 6 grey levels), once
   estimated from the background by ``track`` (as a user would).
2. **Recall.** States 2 and 3 carry damage levels 0.35 and 0.8 times each particle's
   susceptibility (uniform 0-1), so true damage spreads over 0-0.8. The share of particles
   called darker at k = 3, by bin of true damage, pooled over both states and all seeds; and the
   precision (the share of the particles called darker whose true damage is >= 0.02).

Usage::

    python benchmarks/classify.py                     # 224^3, 6 seeds: a few minutes on 2 cores
    python benchmarks/classify.py --size 128 --seeds 2   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import pandas as pd

LEVELS = [0.0, 0.0, 0.35, 0.8]
NAMES = ["pristine", "pristine again", "charged 0.35", "charged 0.8"]
KS = (2.0, 3.0, 4.0, 5.0)
BINS = [0.0, 0.02, 0.1, 0.2, 0.3, 0.5, 0.81]


def one_series(size: int, seed: int, radius: float, n_out: int, noise_sigma):
    """(tracking, truth with state names) of one seed."""
    from grapes_dask.synthetic import phantom_numpy
    from grapes_dask.track import track

    grey, labels, truth = phantom_numpy((size,) * 3, n_states=len(LEVELS), seed=seed, mean_radius=radius,
                                        damage=LEVELS)
    states = {name: (grey[i], labels[i]) for i, name in enumerate(NAMES)}
    tr = track(states, noise_sigma=noise_sigma, exclude_outer_layers=n_out, drop_smallest=0.25)
    truth["state"] = truth["state"].map(dict(enumerate(NAMES)))
    return tr, truth


def false_positives(trs) -> pd.DataFrame:
    from grapes_dask.change import classify, wilson_interval
    from scipy.stats import norm

    rows = []
    for k in KS:
        n = dark = bright = plain = 0
        for tr in trs:
            f = classify(tr, k=k, states="pristine again").fractions.loc["pristine again"]
            n += int(f["n"])
            dark += int(f["n_darker"])
            bright += int(f["n_brighter"])
            plain += int(f["n_plain_darker"])
        lo, hi = wilson_interval(dark, n)
        rows.append({"k": k, "particles": n, "darker": dark, "darker %": 100 * dark / n,
                     "Wilson 95% %": f"{100 * float(lo):.3f}-{100 * float(hi):.3f}", "brighter": bright,
                     "brighter %": 100 * bright / n, "expected % per side": 100 * norm.sf(k),
                     "plain share of decreases %": 100 * plain / n})
    return pd.DataFrame(rows)


def recall(trs, truths, k: float = 3.0) -> tuple[pd.DataFrame, float, int]:
    from grapes_dask.change import classify, wilson_interval

    parts = []
    for tr, truth in zip(trs, truths):
        c = classify(tr, k=k, states=["charged 0.35", "charged 0.8"]).particles
        t = truth.set_index(["state", "label"])["damage"]
        keys = list(zip(c["state"].astype(str), c["label"].astype(np.int64)))
        parts.append(pd.DataFrame({"damage": t.reindex(keys).to_numpy(), "darker": (c["class"] == "darker").to_numpy(),
                                   "brighter": (c["class"] == "brighter").to_numpy()}))
    d = pd.concat(parts, ignore_index=True)
    d["bin"] = pd.cut(d["damage"], BINS, right=False)
    g = d.groupby("bin", observed=True)
    out = pd.DataFrame({"particles": g.size(), "called darker": g["darker"].sum(), "brighter": g["brighter"].sum()})
    out["recall %"] = 100 * out["called darker"] / out["particles"]
    lo, hi = wilson_interval(out["called darker"].to_numpy(), out["particles"].to_numpy())
    out["Wilson 95% %"] = [f"{100 * a:.1f}-{100 * b:.1f}" for a, b in zip(lo, hi)]
    out.index = [f"[{iv.left:g}, {iv.right:g})" for iv in out.index]
    out.index.name = "true damage"
    called = d[d["darker"]]
    precision = float((called["damage"] >= 0.02).mean()) if len(called) else float("nan")
    return out, precision, len(called)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--radius", type=float, default=7.0)
    ap.add_argument("--exclude-outer-layers", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    import dask

    dask.config.set(scheduler="threads")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.size}^3, mean "
          f"radius {args.radius}, exclude_outer_layers {args.exclude_outer_layers}, drop_smallest 0.25, "
          f"{args.seeds} seeds; grey uint8, noise rendered with sigma 6")
    t0 = time.perf_counter()
    res = {}
    for label, sigma in (("noise given (6.0)", 6.0), ("noise estimated from the background", None)):
        trs, truths = [], []
        for seed in range(args.seeds):
            tr, truth = one_series(args.size, 100 + seed, args.radius, args.exclude_outer_layers, sigma)
            trs.append(tr)
            truths.append(truth)
        sig = [round(tr.params["noise"]["pristine"]["sigma"], 3) for tr in trs]
        print(f"\n== {label}: sigma of the pristine state per seed {sig}; "
              f"{sum(int(tr.counts().set_index('reason').loc['kept', 'n']) for tr in trs)} kept particles "
              f"({time.perf_counter() - t0:.0f} s so far)")
        fp = false_positives(trs)
        print("1. no damage (pristine again against pristine): particles called darker / brighter")
        print(fp.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        rec, precision, n_called = recall(trs, truths)
        print("2. damaged states (0.35 and 0.8 pooled), k = 3: share called darker by true damage")
        print(rec.to_string(float_format=lambda v: f"{v:.1f}"))
        print(f"   precision: {100 * precision:.2f}% of the {n_called} particles called darker have true damage "
              ">= 0.02")
        res[label] = {"false_positives": fp.to_dict(orient="records"), "recall": rec.reset_index().to_dict(
            orient="records"), "precision": precision, "sigma": sig}
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
