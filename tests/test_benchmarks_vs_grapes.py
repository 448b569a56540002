"""The particle-by-particle comparison of benchmarks/vs_grapes.py, on hand-made tables (no GRAPES needed)."""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_grapes.py"


@pytest.fixture(scope="module")
def vs():
    spec = importlib.util.spec_from_file_location("vs_grapes", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ours(rows):
    return pd.DataFrame(rows, columns=["label", "voxel_count", "intensity_mean", "radial_layers_graylevel",
                                       "radial_layers_count", "radial_layers_graylevelnormed"])


def _grapes(rows):
    df = pd.DataFrame(rows, columns=["label", "volume", "intensity_mean", "radial_layers_graylevel",
                                     "radial_layers_graylevelnormed"])
    df["radial_layers_graylevel"] = [np.asarray(p, np.float32) for p in df["radial_layers_graylevel"]]
    df["radial_layers_graylevelnormed"] = [np.asarray(p, np.float32) for p in df["radial_layers_graylevelnormed"]]
    return df


def test_equal_tables_within_float32_rounding(vs):
    # 1/3 and 2/3 are not float32 numbers: GRAPES holds them rounded, we hold float64.
    prof = [100 + 1 / 3, 120 + 2 / 3, 130.0]
    ours = _ours([(5, 30, 117.5, prof, [20, 8, 2], [0.0, 0.7, 1.0]),
                  (7, 1, 90.0, [90.0], [1], [np.nan])])
    grapes = _grapes([(7, 1.0, 90.0, [90.0], [0.0]),  # another order: matched by label
                      (5, 30.0, 117.5, prof, [0.0, 0.7, 1.0])])
    c = vs.compare_tables(ours, grapes)
    assert c["common"] == 2 and c["only_ours"] == [] and c["only_grapes"] == []
    assert c["volume_equal"] == 2 and c["mean_equal"] == 2
    assert c["profile_equal"] == 2 and c["layers_compared"] == 4 and c["layers_equal"] == 4
    assert 0 < c["profile_max_rel"] <= 2.0**-24  # the float32 rounding, and nothing more
    assert c["normed_undefined"] == 1 and c["normed_defined"] == 1 and c["normed_other"] == 0
    assert c["normed_max_abs"] < 1e-7
    assert vs.comparison_ok(c)
    assert "| volume (voxel count) | 2 | 2 |" in vs.comparison_markdown(c)


def test_differences_are_found(vs):
    ours = _ours([(1, 10, 50.0, [40.0, 60.0], [5, 5], [0.0, 1.0]),
                  (2, 12, 51.0, [40.0, 62.0], [6, 6], [0.0, 1.0]),
                  (3, 9, 52.0, [40.0, 62.0, 70.0], [4, 3, 2], [0.0, 0.7, 1.0]),
                  (4, 3, 52.0, [40.0], [3], [np.nan])])
    grapes = _grapes([(1, 10.0, 50.0, [40.0, 60.0], [0.0, 1.0]),
                      (2, 13.0, 51.0 + 1e-9, [40.0, 62.001], [0.0, 1.0]),  # volume, mean and layer 2 differ
                      (3, 9.0, 52.0, [40.0, 62.0], [0.0, 1.0]),  # one layer fewer
                      (9, 3.0, 52.0, [40.0], [0.0])])
    c = vs.compare_tables(ours, grapes)
    assert c["common"] == 3 and c["only_ours"] == [4] and c["only_grapes"] == [9]
    assert c["volume_equal"] == 2 and c["volume_max_abs"] == 1.0
    assert c["mean_equal"] == 2 and c["mean_close"] == 2
    assert c["mean_max_abs"] == pytest.approx(1e-9, rel=1e-3)
    assert c["profile_equal"] == 1 and c["profile_length_differs"] == 1
    assert c["layers_compared"] == 4 and c["layers_equal"] == 3
    assert c["profile_max_abs"] == pytest.approx(0.001, rel=1e-3)
    assert c["profile_mismatch_labels"] == [2, 3]
    assert c["normed_other"] == 1  # label 3: different lengths
    assert not vs.comparison_ok(c)


def test_empty_layer_nan_here_zero_in_grapes(vs):
    ours = _ours([(1, 10, 50.0, [40.0, np.nan, 60.0], [5, 0, 5], [0.0, np.nan, 1.0])])
    c = vs.compare_tables(ours, _grapes([(1, 10.0, 50.0, [40.0, 0.0, 60.0], [0.0, -2.0, 1.0])]))
    assert c["empty_layers"] == 1 and c["profile_equal"] == 1 and c["layers_equal"] == 3
    # a NaN layer that has voxels is a difference, not the empty-layer convention
    ours = _ours([(1, 10, 50.0, [40.0, np.nan, 60.0], [5, 2, 5], [0.0, np.nan, 1.0])])
    c = vs.compare_tables(ours, _grapes([(1, 10.0, 50.0, [40.0, 0.0, 60.0], [0.0, -2.0, 1.0])]))
    assert c["empty_layers"] == 0 and c["profile_equal"] == 0 and c["layers_equal"] == 2
    assert not vs.comparison_ok(c)
