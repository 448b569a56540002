"""The radial-profile list columns built from the long layers table, against a per-particle loop.

``grapes_dask.table._profiles`` lays every profile end to end and cuts views; the reference here
builds each particle's arrays one by one from the definitions (layers 1..K, empty layers with
count 0 and NaN, and the three normalisations).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grapes_dask.table import PROFILE_COLUMNS, _profiles


def layers_table(rng, n, max_layer=7, gap=0.2, nan=0.1, absent=0.1):
    rows = []
    for label in range(1, n + 1):
        if rng.random() < absent:
            continue  # no layer at all (e.g. an excluded label)
        deepest = int(rng.integers(1, max_layer + 1))
        for layer in range(1, deepest + 1):
            if layer < deepest and rng.random() < gap:
                continue  # an empty layer inside the profile
            mean = np.nan if rng.random() < nan else float(rng.normal(150, 20))
            rows.append((label, layer, int(rng.integers(1, 50)), mean, float(rng.random())))
    df = pd.DataFrame(rows, columns=["label", "layer", "count", "mean", "std"])
    df["label"] = df["label"].astype(np.uint64)
    return df, np.arange(1, n + 1, dtype=np.uint64)


def reference(layers, labels, how, start_at, roi_mean):
    out = {c: [] for c in PROFILE_COLUMNS}
    for i, label in enumerate(labels):
        rows = layers[layers["label"] == label]
        k = int(rows["layer"].max()) if len(rows) else 0
        c, m, s = np.zeros(k, np.int64), np.full(k, np.nan), np.full(k, np.nan)
        for _, r in rows.iterrows():
            j = int(r["layer"]) - 1
            c[j], m[j], s[j] = r["count"], r["mean"], r["std"]
        if how == "roi_mean":
            with np.errstate(invalid="ignore", divide="ignore"):
                normed = m / roi_mean[i]
        elif how == "surface":
            surface = (m[0] if start_at == "edge" else m[-1]) if k else np.nan
            with np.errstate(invalid="ignore", divide="ignore"):
                normed = m / surface
        else:
            rel = m - (m[0] if k else np.nan)
            finite = rel[np.isfinite(rel)]
            top = finite.max() if len(finite) else np.nan
            normed = rel / top if top > 0 else np.full(k, np.nan)
        for col, v in zip(PROFILE_COLUMNS, (np.arange(1, k + 1), c, m, s, normed)):
            out[col].append(v)
    return out


@pytest.mark.parametrize("how,start_at", [("radial_max", "edge"), ("radial_max", "center"), ("surface", "edge"),
                                          ("surface", "center"), ("roi_mean", "edge")])
def test_profiles_equal_the_per_particle_definition(how, start_at):
    rng = np.random.default_rng(3)
    layers, labels = layers_table(rng, 120)
    roi = rng.normal(140, 10, len(labels))
    roi[::17] = np.nan
    got = _profiles(layers, labels, how, start_at, roi)
    exp = reference(layers, labels, how, start_at, roi)
    for col in PROFILE_COLUMNS:
        assert len(got[col]) == len(labels)
        for a, b in zip(got[col], exp[col]):
            assert a.dtype == (np.int64 if col in ("radial_layers", "radial_layers_count") else np.float64)
            np.testing.assert_array_equal(a, b)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 30), max_layer=st.integers(1, 9))
def test_profiles_random_tables(seed, n, max_layer):
    rng = np.random.default_rng(seed)
    layers, labels = layers_table(rng, n, max_layer=max_layer, gap=0.3, nan=0.3, absent=0.3)
    got = _profiles(layers, labels, "radial_max")
    exp = reference(layers, labels, "radial_max", "edge", None)
    for col in PROFILE_COLUMNS:
        for a, b in zip(got[col], exp[col]):
            np.testing.assert_array_equal(a, b)


def test_profiles_equal_length_cells_stay_one_array_each():
    """Every particle with the same number of layers must not turn the column into a 2D array."""
    layers = pd.DataFrame({"label": np.array([1, 1, 2, 2], np.uint64), "layer": [1, 2, 1, 2], "count": [3, 4, 5, 6],
                           "mean": [10.0, 20.0, 30.0, 15.0], "std": [1.0, 1.0, 1.0, 1.0]})
    got = _profiles(layers, np.array([1, 2], np.uint64), "radial_max")
    col = got["radial_layers_graylevelnormed"]
    assert col.shape == (2,) and col.dtype == object
    np.testing.assert_array_equal(col[0], [0.0, 1.0])
    np.testing.assert_array_equal(col[1], [np.nan, np.nan])  # the surface is the brightest: undefined
