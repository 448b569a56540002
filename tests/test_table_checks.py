"""Plausibility checks on pass-1 statistics: inputs that are probably not what the user meant.

Each case used to give a table of wrong numbers with exit status 0.
"""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from grapes_dask import GrapesInputError, analyze, synthetic
from grapes_dask._errors import GrapesInputWarning


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    ph = synthetic.make_phantom(tmp_path_factory.mktemp("ph"), shape=(64, 64, 64), seed=5, mean_radius=6.0, chunks=32)
    grey, labels = ph.open(state=0)
    return np.asarray(grey), np.asarray(labels), ph


def test_real_labels_pass(phantom):
    grey, labels, _ = phantom
    t = analyze(grey, labels)
    assert len(t) == len(np.unique(labels)) - 1


def test_swapped_grey_and_labels_are_refused(phantom):
    grey, labels, _ = phantom
    with pytest.raises(GrapesInputError, match="Were the grey and label volumes swapped") as e:
        analyze(labels, grey)
    assert "check_labels=False" in str(e.value)
    # asked for, it runs
    t = analyze(labels, grey, check_labels=False)
    assert len(t) == len(np.unique(grey[grey > 0]))


@pytest.mark.parametrize("value", [1, 255])
def test_binary_mask_as_labels_is_refused(phantom, value):
    grey, labels, _ = phantom
    mask = (labels > 0).astype(np.uint8) * value
    with pytest.raises(GrapesInputError, match=f"single id \\({value}\\).*binary mask"):
        analyze(grey, mask)
    assert len(analyze(grey, mask, check_labels=False)) == 1


def test_one_particle_filling_the_view_is_not_a_mask():
    z, y, x = np.mgrid[:40, :40, :40]
    ball = (((z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2) < 19**2).astype(np.uint8)
    assert len(analyze(np.full(ball.shape, 100, np.uint8), ball)) == 1


def test_no_particle_warns_and_gives_the_typed_empty_table(phantom):
    grey, labels, _ = phantom
    with pytest.warns(GrapesInputWarning, match="contain no particle"):
        t = analyze(grey, np.zeros_like(labels))
    assert len(t) == 0 and "radial_layers" in t.columns


def test_2d_checks():
    ph_labels = np.zeros((80, 80), np.uint16)
    y, x = np.mgrid[:80, :80]
    k = 1
    for cy in range(8, 80, 16):
        for cx in range(8, 80, 16):
            ph_labels[(y - cy) ** 2 + (x - cx) ** 2 < 36] = k
            k += 1
    grey = np.random.default_rng(0).integers(0, 200, ph_labels.shape).astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(analyze(grey, ph_labels)) == k - 1
    with pytest.raises(GrapesInputError, match="binary mask"):
        analyze(grey, (ph_labels > 0).astype(np.uint8))
    with pytest.raises(GrapesInputError, match="swapped"):
        analyze(ph_labels, grey)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "grapes_dask", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)


def test_cli_stops_on_each_case(phantom, tmp_path):
    _, _, ph = phantom
    g, lab = ph.grey[0], ph.labels[0]
    r = _cli("analyze", lab, g, "--out", tmp_path / "a.parquet", "--quiet")
    assert r.returncode == 2 and "swapped" in r.stderr and "--no-check-labels" in r.stderr, r.stderr
    grey, labels, _ = phantom
    np.save(tmp_path / "mask.npy", (labels > 0).astype(np.uint8) * 255)
    np.save(tmp_path / "zero.npy", np.zeros_like(labels))
    r = _cli("analyze", g, tmp_path / "mask.npy", "--out", tmp_path / "b.parquet", "--quiet")
    assert r.returncode == 2 and "binary mask" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _cli("analyze", g, tmp_path / "zero.npy", "--out", tmp_path / "c.parquet", "--quiet")
    assert r.returncode == 2 and "no particle" in r.stderr, r.stderr
    assert not any((tmp_path / n).exists() for n in ("a.parquet", "b.parquet", "c.parquet"))
    r = _cli("analyze", g, tmp_path / "mask.npy", "--out", tmp_path / "b.parquet", "--quiet", "--no-check-labels")
    assert r.returncode == 0, r.stderr
