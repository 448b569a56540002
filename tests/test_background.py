"""sigma_bg from empty space and the beam stability across states (grapes_dask.stats,
grapes_dask.track), against independent numpy computations on small volumes.

- find_empty_space / estimate_noise: the label-free slab at a face is found where numpy finds
  it, its sigma is numpy's std (ddof=1) of that box, its Haar estimate numpy's, whatever the
  (uneven) chunking; a textured label-free slab is rejected; without empty space the estimate
  falls back on the background with a warning recorded;
- the phantom's air slab and textured pores: the new estimate is the true noise, the old one
  is inflated;
- track: an offset injected in one state is flagged, and correct_drift recovers the changes of
  the offset-free series.
"""

from __future__ import annotations

import json
import math
import warnings

import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scipy import ndimage as ndi

from grapes_dask._errors import GrapesInputError
from grapes_dask.stats import GrapesBackgroundWarning, estimate_noise, find_empty_space

SHAPE = (34, 26, 22)
TOP = 20  # last z of a labelled voxel; air above it from z = 21


def scene(seed=0, air=True, texture=12.0, noise=4.0, integer=False):
    """Labels in z 8..20 touching the y and x faces; textured pores (smooth field, std
    `texture`) below z = 21 wherever unlabelled; air (level 20, white noise) from z = 21."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(SHAPE, np.uint16)
    smooth = ndi.gaussian_filter(rng.random((TOP - 8 + 1,) + SHAPE[1:]), 1.5)
    blobs, _ = ndi.label(smooth > np.quantile(smooth, 0.6))
    lab[8:TOP + 1] = blobs
    lab[TOP, 0, 0] = lab[8, -1, -1] = lab[12, 0, 5] = lab[12, -1, 5] = lab[14, 5, 0] = lab[14, 5, -1] = 1
    field = ndi.gaussian_filter(rng.normal(0.0, 1.0, SHAPE), 2.0)
    field *= texture / field.std()
    grey = 40.0 + field + rng.normal(0.0, noise, SHAPE)
    grey[lab > 0] = 150.0 + rng.normal(0.0, noise, int((lab > 0).sum()))
    if air:
        grey[TOP + 1:] = 20.0 + rng.normal(0.0, noise, grey[TOP + 1:].shape)
    if integer:
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return grey, lab


def numpy_box(lab, margin=3):
    """The high-z label-free slab, computed with numpy: above the last labelled plane plus margin."""
    zs = np.flatnonzero(lab.any(axis=(1, 2)))
    start = zs[-1] + max(math.ceil(margin), 1)
    return ((int(start), lab.shape[0]), (0, lab.shape[1]), (0, lab.shape[2]))


def numpy_haar(v, lag=2):
    s2, cnt = 0.0, 0
    for ax in range(v.ndim):
        n = v.shape[ax]
        if n <= lag:
            continue
        v64 = v.astype(np.float64)
        d = np.take(v64, np.arange(lag, n), axis=ax) - np.take(v64, np.arange(n - lag), axis=ax)
        s2 += float((d * d).sum())
        cnt += d.size
    return math.sqrt(s2 / (2 * cnt))


def numpy_interp_median(v):
    """Median of integer grey levels, each level k spread uniformly over [k - 0.5, k + 0.5)."""
    vals, counts = np.unique(v, return_counts=True)
    cum = np.cumsum(counts)
    half = v.size / 2
    k = int(np.searchsorted(cum, half, side="left"))
    before = cum[k - 1] if k else 0
    return vals[k] - 0.5 + (half - before) / counts[k]


def _chunks(draw, n):
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=4)))
    b = [0, *cuts, n]
    return tuple(y - x for x, y in zip(b[:-1], b[1:]))


# --------------------------------------------------------------------------------------------
# the finder
# --------------------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=st.integers(0, 100), integer=st.booleans())
def test_air_slab_found_and_measured_as_numpy(data, seed, integer):
    grey, lab = scene(seed, integer=integer)
    gc = tuple(_chunks(data.draw, n) for n in SHAPE)
    lc = tuple(_chunks(data.draw, n) for n in SHAPE)
    r = estimate_noise(da.from_array(grey, chunks=gc), da.from_array(lab, chunks=lc))
    box = numpy_box(lab)
    ref = grey[tuple(slice(a, b) for a, b in box)].astype(np.float64)
    assert r.source == "empty_space" and r.region == box and r.warning is None and r.margin == 3.0
    assert r.n_voxels == ref.size
    assert r.sigma == pytest.approx(ref.std(ddof=1), rel=1e-10)
    assert r.mean == pytest.approx(ref.mean(), rel=1e-12)
    chosen = [c for c in r.candidates if c["box"] == box]
    assert len(chosen) == 1 and chosen[0]["flat"]
    assert chosen[0]["haar_sigma"] == pytest.approx(numpy_haar(ref), rel=1e-10)
    # the peak: the median (interpolated in its bin) and the spread of a Gaussian (IQR / 1.349)
    if integer:
        assert r.peak == pytest.approx(numpy_interp_median(ref), abs=1e-9)
    else:
        assert abs(r.peak - np.median(ref)) <= r.sigma / 50
    q1, q3 = np.quantile(ref, [0.25, 0.75])
    assert r.spread == pytest.approx((q3 - q1) / 1.349, abs=r.sigma / 25 + (1.0 if integer else 0.0))
    # the same as one chunk
    r1 = estimate_noise(grey, lab)
    assert r1.region == r.region and r1.n_voxels == r.n_voxels
    assert r1.sigma == pytest.approx(r.sigma, rel=1e-12) and r1.peak == pytest.approx(r.peak, rel=1e-12)
    json.dumps(r.as_dict())  # JSON friendly


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=st.integers(0, 10_000), thick=st.integers(4, 12), noise=st.floats(0.5, 50.0),
       texture=st.floats(1.0, 3.0))
def test_flat_field_rule_white_noise_kept_texture_rejected(data, seed, thick, noise, texture):
    """White noise in a label-free slab passes the flat-field test; a smooth texture of at least
    the noise's standard deviation fails it, whatever the levels and the chunking."""
    rng = np.random.default_rng(seed)
    shape = (10 + 5 + thick, 20, 24)
    lab = np.zeros(shape, np.uint8)
    lab[10:15] = 1
    grey = rng.normal(100.0, noise, shape)
    tex = ndi.gaussian_filter(rng.normal(0.0, 1.0, (10,) + shape[1:]), 2.0)
    grey[:10] += texture * noise * tex / tex.std()
    chunks = tuple(_chunks(data.draw, n) for n in shape)
    box, cands = find_empty_space(da.from_array(grey, chunks=chunks), lab, margin=0)
    top = next(c for c in cands if c["face"] == "z+")
    low = next(c for c in cands if c["face"] == "z-")
    assert top["box"] == ((15, shape[0]), (0, 20), (0, 24)) and top["flat"], top
    assert low["box"] == ((0, 10), (0, 20), (0, 24)) and not low["flat"] and "structure" in low["why"]
    assert box == top["box"]


def test_textured_slab_not_chosen():
    grey, lab = scene(3)
    box, cands = find_empty_space(da.from_array(grey, chunks=(9, 13, 7)), lab)
    assert box == numpy_box(lab)
    low = [c for c in cands if c["face"] == "z-"]
    # the textured pores below the particles: label-free, thick enough, but not flat
    assert len(low) == 1 and low[0]["box"] == ((0, 6), (0, 26), (0, 22))
    assert not low[0]["flat"] and "structure" in low[0]["why"]
    v = grey[:6].astype(np.float64)
    assert low[0]["ratio"] == pytest.approx(v.std(ddof=1) / numpy_haar(v), rel=1e-10) and low[0]["ratio"] > 1.5


def test_no_empty_space_falls_back_with_a_warning():
    grey, lab = scene(4, air=False)  # the only label-free slabs are textured pores
    with pytest.warns(GrapesBackgroundWarning, match="no empty space found"):
        r = estimate_noise(da.from_array(grey, chunks=11), da.from_array(lab, chunks=(5, 26, 22)))
    ref = estimate_noise(grey, lab, mode="background")
    d = ndi.distance_transform_edt(lab == 0)
    v = grey[(lab == 0) & (d >= 3)]
    assert r.source == "background" and r.region is None and r.peak is None
    assert r.sigma == pytest.approx(v.std(ddof=1), rel=1e-10) == ref.sigma
    assert "no empty space found" in r.warning and "structure" in r.warning
    assert r.as_dict()["noise_warning"] == r.warning and ref.warning is None
    assert any(not c["flat"] for c in r.candidates)
    with pytest.raises(GrapesInputError, match="no empty space found"):
        estimate_noise(grey, lab, mode="empty_space")
    # a user box still wins
    r2 = estimate_noise(grey, lab, region=((0, 5), (0, 26), (0, 22)))
    assert r2.source == "region" and r2.warning is None


def test_outer_part_of_a_slab_when_pores_lie_between_particles_and_air():
    grey, lab = scene(8)
    rng = np.random.default_rng(8)
    field = ndi.gaussian_filter(rng.normal(0.0, 1.0, (6,) + SHAPE[1:]), 2.0)
    grey[TOP + 1:TOP + 7] = 40.0 + 12.0 * field / field.std() + rng.normal(0.0, 4.0, field.shape)  # pores z 21-26
    r = estimate_noise(da.from_array(grey, chunks=(10, 9, 22)), lab)
    faces = [(c["box"][0], c.get("flat")) for c in r.candidates if c["face"] == "z+"]
    # the whole slab z 23-33 (11 thick) holds pores; its outer half (5 thick) is air
    assert faces[:2] == [((23, 34), False), ((29, 34), True)]
    v = grey[29:].astype(np.float64)
    assert r.source == "empty_space" and r.region == ((29, 34), (0, 26), (0, 22))
    assert r.sigma == pytest.approx(v.std(ddof=1), rel=1e-10) and r.n_voxels == v.size


def test_noise_correlated_over_a_voxel_is_flat_at_lag_2():
    """Reconstructed noise is correlated over about a voxel: such air passes at lag 2 (the
    default) and fails at lag 1, where sigma / haar_sigma = 1 / sqrt(1 - rho(1))."""
    grey, lab = scene(9)
    rng = np.random.default_rng(9)
    air = ndi.gaussian_filter(rng.normal(0.0, 1.0, (13,) + SHAPE[1:]), 0.7)[:, :, :]
    grey[TOP + 1:] = 20.0 + 4.0 * air / air.std()
    box, cands = find_empty_space(grey, lab)
    assert box == numpy_box(lab)
    top = next(c for c in cands if c["face"] == "z+")
    v = grey[tuple(slice(a, b) for a, b in box)]
    assert top["ratio"] == pytest.approx(v.std(ddof=1) / numpy_haar(v, 2), rel=1e-10) and top["ratio"] < 1.15
    box1, cands1 = find_empty_space(grey, lab, lag=1)
    top1 = next(c for c in cands1 if c["face"] == "z+")
    assert box1 is None and top1["ratio"] == pytest.approx(v.std(ddof=1) / numpy_haar(v, 1), rel=1e-10)
    assert top1["ratio"] > 1.3


def test_two_dimensional_phantom_air_found():
    from grapes_dask.synthetic import phantom_numpy

    g, lab, truth = phantom_numpy((120, 100), seed=1, air_thickness=20, pore_texture=15.0, noise_sigma=6.0)
    assert truth.attrs["air_box"] == [[100, 120], [0, 100]] and not lab[100:].any()
    r = estimate_noise(da.from_array(g, chunks=(33, 41)), da.from_array(lab, chunks=50))
    assert r.source == "empty_space" and r.region[1] == (0, 100) and r.region[0][0] >= 100
    v = g[tuple(slice(a, b) for a, b in r.region)].astype(np.float64)
    assert r.sigma == pytest.approx(v.std(ddof=1), rel=1e-10) and r.sigma == pytest.approx(6.0, rel=0.05)


def test_uneven_slab_rejected():
    grey, lab = scene(5)
    grey[TOP + 1:, :13] += 30.0  # half the air slab brighter: not one flat field
    box, cands = find_empty_space(grey, lab)
    top = [c for c in cands if c["face"] == "z+"][0]
    assert box is None and not top["flat"] and "uneven mean" in top["why"]


def test_smaller_sigma_wins_and_labels_free_volume():
    rng = np.random.default_rng(6)
    grey = rng.normal(10.0, 2.0, (30, 20, 20))
    grey[15:] = rng.normal(50.0, 1.0, (15, 20, 20))  # two flat slabs, the quieter one is chosen
    lab = np.zeros(grey.shape, np.uint8)
    lab[12:15] = 1
    box, cands = find_empty_space(grey, lab)
    assert box == ((17, 30), (0, 20), (0, 20))  # 3 voxels above the last labelled plane, z = 14
    first = {}
    for c in cands:
        if c.get("flat"):
            first.setdefault(c["face"], c["box"])
    assert first == {"z-": ((0, 10), (0, 20), (0, 20)), "z+": ((17, 30), (0, 20), (0, 20))}
    # no label at all: the whole volume is one candidate
    flat = rng.normal(0.0, 1.0, (12, 12, 12))
    box, cands = find_empty_space(flat, np.zeros(flat.shape, np.uint8))
    assert box == ((0, 12),) * 3 and cands[0]["face"] == "all"


def test_finder_errors():
    grey, lab = scene(0)
    with pytest.raises(GrapesInputError, match="same shape"):
        find_empty_space(grey, lab[:5])
    with pytest.raises(GrapesInputError, match="max_ratio"):
        find_empty_space(grey, lab, max_ratio=0.5)
    with pytest.raises(GrapesInputError, match="min_thickness"):
        find_empty_space(grey, lab, min_thickness=0)
    with pytest.raises(GrapesInputError, match="mode="):
        estimate_noise(grey, lab, mode="air")


# --------------------------------------------------------------------------------------------
# the phantom: air and textured pores
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_series():
    from grapes_dask.synthetic import phantom_numpy

    kw = dict(n_states=3, seed=3, noise_sigma=6.0, air_thickness=10, air_level=30.0, pore_texture=15.0,
              mean_radius=7.0, grey_dtype="float32", chunks=(20, 24, 48))
    clean = phantom_numpy((48, 48, 48), **kw)
    drift = phantom_numpy((48, 48, 48), beam_offsets=[0.0, 0.0, -4.0], **kw)
    return clean, drift


def test_phantom_air_and_texture(phantom_series):
    (g, lab, truth), _ = phantom_series
    assert truth.attrs["noise_sigma"] == 6.0 and truth.attrs["air_box"] == [[38, 48], [0, 48], [0, 48]]
    assert not lab[:, 38:].any() and lab[:, :38].any()
    r = estimate_noise(da.from_array(g[0], chunks=16), da.from_array(lab[0], chunks=16))
    old = estimate_noise(g[0], lab[0], mode="background")
    assert r.source == "empty_space" and r.region[0][0] >= 38 and r.region[1:] == ((0, 48), (0, 48))
    assert r.sigma == pytest.approx(6.0, rel=0.03) and r.peak == pytest.approx(30.0, abs=0.2)
    assert old.sigma > 1.5 * 6.0  # the textured pores inflate the old estimate


def test_drift_flagged_and_corrected(phantom_series):
    from grapes_dask.track import track

    (gc, lc, _), (gd, ld, _) = phantom_series
    assert (lc == ld).all()
    kw = dict(exclude_outer_layers=2, drop_smallest=0.0, chunks=24)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GrapesBackgroundWarning)  # no drift: no warning
        clean = track({f"s{i}": (gc[i], lc[i]) for i in range(3)}, **kw)
    with pytest.warns(GrapesBackgroundWarning, match="drifts"):
        raw = track({f"s{i}": (gd[i], ld[i]) for i in range(3)}, **kw)
    with pytest.warns(GrapesBackgroundWarning, match="subtracted"):
        cor = track({f"s{i}": (gd[i], ld[i]) for i in range(3)}, correct_drift=True, **kw)
    bc, br = clean.background(), raw.background()
    assert not bc["flag"].any()
    assert list(br["flag"]) == [False, False, True] and raw.params["background"]["flagged"] == ["s2"]
    assert br["shift"].iloc[2] == pytest.approx(-4.0, abs=0.15) and (br["labelled"] == 0).all()
    # the peak of each state against numpy's median of the box
    box = tuple(tuple(r) for r in raw.params["background"]["box"])
    for i in range(3):
        v = gd[i][tuple(slice(a, b) for a, b in box)]
        assert abs(br["peak"].iloc[i] - np.median(v)) <= br["sigma"].iloc[i] / 50
    # the correction recovers the offset-free changes; nothing is lost
    sc, sr, so = clean.summary(), raw.summary(), cor.summary()
    assert abs(sr.loc["s2", "delta_mean"] - sc.loc["s2", "delta_mean"]) > 3.5
    assert so.loc["s2", "delta_mean"] == pytest.approx(sc.loc["s2", "delta_mean"], abs=0.2)
    p = cor.particles
    assert np.allclose(p["roi_mean"], p["roi_mean_uncorrected"] - p["background_shift"], equal_nan=True)
    assert np.allclose(p["roi_mean_uncorrected"], raw.particles["roi_mean"], equal_nan=True)
    assert cor.params["background"]["correct_drift"] and cor.background()["corrected"].all()
    assert "roi_mean_uncorrected" not in raw.particles.columns


def test_correct_drift_needs_grey_and_empty_space():
    from grapes_dask.track import track

    grey, lab = scene(1, air=False)
    with pytest.raises(GrapesInputError, match="needs an empty region"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GrapesBackgroundWarning)
            track({"a": (grey, lab), "b": (grey, lab)}, exclude_outer_layers=1, correct_drift=True)
    with pytest.raises(GrapesInputError, match="correct_drift"):
        track({"a": (grey, lab), "b": (grey, lab)}, noise_sigma=1.0, correct_drift="yes")


# --------------------------------------------------------------------------------------------
# the phantom's options
# --------------------------------------------------------------------------------------------


def test_phantom_air_texture_offsets_exact_and_chunk_free():
    from grapes_dask.synthetic import phantom_numpy

    kw = dict(n_states=2, seed=4, noise_sigma=0.0, grey_dtype="float32", mean_radius=6.0, air_thickness=7,
              air_level=12.5, pore_texture=10.0, beam_offsets=[0.0, 2.5], rim_contrast=0.0, n_cracks=0,
              void_fraction=0.0, pore_level=40.0, particle_level=150.0)
    g, lab, truth = phantom_numpy((30, 28, 26), chunks=(30, 28, 26), **kw)
    g2, lab2, _ = phantom_numpy((30, 28, 26), chunks=(7, 11, 26), **kw)
    assert (g == g2).all() and (lab == lab2).all()  # whatever the chunking
    assert not lab[:, 23:].any() and lab[:, 22].any()  # particles cut by the air plane
    assert (g[0, 23:] == np.float32(12.5)).all() and (g[1, 23:] == np.float32(15.0)).all()
    assert truth.attrs["air_box"] == [[23, 30], [0, 28], [0, 26]] and truth.attrs["beam_offsets"] == [0.0, 2.5]
    pores = (lab[0] == 0)
    pores[23:] = False
    v = g[0][pores]
    assert v.std() > 2.0 and abs(v.mean() - 40.0) < 5.0  # a texture around the pore level
    assert np.allclose(g[1] - g[0], 2.5, atol=1e-4)  # no damage, no noise: the offset only
    # no texture: the pores are flat at pore_level
    flat, flab, _ = phantom_numpy((30, 28, 26), **{**kw, "pore_texture": 0.0, "n_states": 1, "beam_offsets": None})
    fp = (flab == 0)
    fp[23:] = False
    assert (flat[fp] == np.float32(40.0)).all()


def test_phantom_option_errors():
    from grapes_dask.synthetic import phantom_numpy

    with pytest.raises(GrapesInputError, match="air_thickness"):
        phantom_numpy((20, 20, 20), air_thickness=20)
    with pytest.raises(GrapesInputError, match="air_thickness"):
        phantom_numpy((20, 20, 20), air_thickness=2.5)
    with pytest.raises(GrapesInputError, match="beam_offsets"):
        phantom_numpy((20, 20, 20), n_states=2, beam_offsets=[1.0])
    with pytest.raises(GrapesInputError, match="pore_texture_scale"):
        phantom_numpy((20, 20, 20), pore_texture=3.0, pore_texture_scale=0.5)


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------


def test_operando_background_csv_and_correction(tmp_path, monkeypatch):
    import contextlib

    import pandas as pd
    from click.testing import CliRunner

    import grapes_dask.cluster
    from grapes_dask import synthetic
    from grapes_dask.cli import cli

    @contextlib.contextmanager
    def threads(scheduler=None, **kw):
        yield None

    monkeypatch.setattr(grapes_dask.cluster, "cluster_client", threads)
    ph = synthetic.make_phantom(tmp_path / "ph", shape=(56, 48, 48), n_states=2, seed=2, mean_radius=7.0, chunks=24,
                                air_thickness=10, pore_texture=12.0, beam_offsets=[0.0, -5.0])
    args = ["operando", "--state", f"a={ph.grey[0]},{ph.labels[0]}", "--state", f"b={ph.grey[1]},{ph.labels[1]}",
            "--exclude-outer-layers", "2", "--quiet"]
    r = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "raw")])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "noise sigma_bg measured in empty_space 48:56,0:48,0:48: a, b" in r.stderr
    assert "drift flagged in b" in r.stderr and "(--correct-drift) to subtract it" in r.stderr
    assert r.stderr.count("warning: the grey-level peak of the empty region") == 1
    bg = pd.read_csv(tmp_path / "raw" / "background.csv")
    assert list(bg["flag"]) == [False, True] and bg["shift"].iloc[1] == pytest.approx(-5.0, abs=0.3)
    assert "Noise and beam stability" in (tmp_path / "raw" / "report.html").read_text(encoding="utf-8")
    r = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "cor"), "--correct-drift"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "(corrected)" in r.stderr
    from grapes_dask.output import read_table

    p = read_table(tmp_path / "cor" / "particles.parquet")
    assert {"roi_mean_uncorrected", "delta_uncorrected", "background_shift"} <= set(p.columns)
    b = p[p["state"].astype(str) == "b"]
    assert np.allclose(b["background_shift"], bg["shift"].iloc[1])


def test_particle_moving_into_the_empty_region_is_reported():
    from grapes_dask.track import track

    grey, lab = scene(10)
    lab2, grey2 = lab.copy(), grey.copy()
    lab2[28:31, 10:14, 10:14] = 999  # a particle in the air of the second state only
    grey2[lab2 == 999] = 150.0
    with pytest.warns(GrapesBackgroundWarning, match=r"holds labelled voxels in b \(48\)"):
        tr = track({"a": (grey, lab), "b": (grey2, lab2)}, exclude_outer_layers=1, drop_smallest=0.0,
                   noise_sigma=4.0, neighbour_gap=None)
    bg = tr.background()
    box = tuple(tuple(r) for r in tr.params["background"]["box"])
    assert box == numpy_box(lab) and tr.params["background"]["source"] == "empty_space"
    assert list(bg["labelled"]) == [0, int((lab2[tuple(slice(a, b) for a, b in box)] != 0).sum())] == [0, 48]
    with pytest.raises(GrapesInputError, match="tolerance"):
        tr.background(tolerance=-1.0)
