"""Tests of ``grapes_dask.plotting``: every figure draws exactly its inputs.

Inputs are hand-made tables and small objects with the fields of the tracking contract (no
tracking, no analysis run). What each figure draws is read back from its artists (Line2D data,
error-bar segments, pie wedge angles, image arrays, StepPatch values) and compared with numbers
computed here by hand (numpy loops), never with the plotting code itself.
"""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.patches import StepPatch, Wedge

from grapes_dask import GrapesInputError
from grapes_dask import plotting as P
from grapes_dask import track
from grapes_dask.output import Particle

PNG = b"\x89PNG\r\n\x1a\n"
STATES = ["pristine", "4.0 V", "4.4 V", "2.5 V"]


# --------------------------------------------------------------------------------------------
# hand-made inputs with the contract's fields
# --------------------------------------------------------------------------------------------


def ChangeMap(label, state, reference, delta, mask):
    """A grapes_dask.track.ChangeMap with no shift, at the origin, unit spacing."""
    nd = np.ndim(delta)
    return track.ChangeMap(label, state, reference, delta, mask, (0.0,) * nd, (0,) * nd, (1.0,) * nd)


def summary_frame():
    sd = np.array([11.08, 11.27, 11.5, 11.3])
    n = np.array([3650, 3650, 3650, 3650])
    ses = sd / np.sqrt(n)
    sem = np.array([0.05, 0.06, 0.05, 0.07])
    d_ses = np.array([0.0, 0.03, 0.05, 0.04])
    d_sem = np.array([0.0, 0.08, 0.07, 0.09])
    return pd.DataFrame({
        "n": n, "mean": [174.41, 173.00, 170.20, 172.50], "sd": sd, "sem": sem, "ses": ses,
        "se_tot": np.sqrt(ses ** 2 + sem ** 2), "delta_mean": [0.0, -1.41, -4.21, -1.91],
        "delta_sd": [0.0, 2.0, 3.0, 2.5], "delta_sem": d_sem, "delta_ses": d_ses,
        "delta_se_tot": np.sqrt(d_ses ** 2 + d_sem ** 2),
    }, index=pd.Index(STATES, name="state"))


def by_quantile_frame():
    rows = []
    for s, base in zip(STATES[1:], (-1.4, -4.2, -1.9)):
        for g in (1, 2, 3, 4):
            rows.append({"group": g, "lo": 10.0 * g, "hi": 10.0 * g + 9.5, "state": s, "n": 50 + g,
                         "delta_mean": base * (0.5 + 0.25 * g), "delta_sd": 2.0, "delta_sem": 0.1 * g,
                         "delta_ses": 0.2, "delta_se_tot": 0.3 + 0.01 * g, "mean": 170.0, "se_tot": 0.6})
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=3)  # any row order
    frame["state"] = pd.Categorical(frame["state"], categories=STATES, ordered=True)
    return frame


def profile_table(rng, n, depth=8, dark=0.0):
    """n particles with profiles of random depth <= `depth`."""
    profiles = []
    for _ in range(n):
        k = int(rng.integers(depth // 2, depth + 1))
        profiles.append(list(150.0 - dark * np.linspace(0, 1, k) + rng.normal(0, 2, k)))
    return pd.DataFrame({
        "label": np.arange(1, n + 1, dtype=np.uint64),
        "radial_layers_graylevel": profiles,
        "equivalent_diameter_volume": rng.normal(20, 4, n),
        "roi_mean": rng.normal(150 - dark, 5, n),
        "volume": rng.uniform(100, 1000, n),
    })


def ball(shape, radius):
    grids = np.indices(shape, dtype=float)
    c = [(s - 1) / 2 for s in shape]
    return np.sqrt(sum((g - ci) ** 2 for g, ci in zip(grids, c))) <= radius


def errorbars(ax):
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def bar_halfwidths(container):
    """Half length of every vertical error bar, read from the drawn segments."""
    segs = container.lines[2][0].get_segments()
    return np.array([(s[1][1] - s[0][1]) / 2 for s in segs]), np.array([(s[1][1] + s[0][1]) / 2 for s in segs])


def png_ok(fig, tmp_path, name="fig.png"):
    path = tmp_path / name
    fig.savefig(path)
    assert path.read_bytes()[:8] == PNG


def assert_own_figure(fig):
    assert isinstance(fig, Figure)
    assert fig.canvas.manager is None  # not a pyplot figure: never shown, nothing global


# --------------------------------------------------------------------------------------------
# fig. 6
# --------------------------------------------------------------------------------------------


def test_radial_profiles_mean_and_bars(tmp_path):
    rng = np.random.default_rng(0)
    tables = {"pristine": profile_table(rng, 40), "charged": profile_table(rng, 30, dark=20)}
    fig = P.plot_radial_profiles(tables, column="radial_layers_graylevel", n_se=2.0, min_particles=10)
    assert_own_figure(fig)
    ax = fig.axes[0]
    conts = errorbars(ax)
    assert len(conts) == 2
    for cont, tab in zip(conts, tables.values()):
        # hand: per layer, the values of the particles that reach it
        k = max(len(p) for p in tab["radial_layers_graylevel"])
        layers, means, halfs = [], [], []
        for j in range(k):
            vals = [p[j] for p in tab["radial_layers_graylevel"] if len(p) > j]
            if len(vals) >= 10:
                layers.append(j + 1)
                means.append(sum(vals) / len(vals))
                m = sum(vals) / len(vals)
                sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
                halfs.append(2 * sd / math.sqrt(len(vals)))
        x, y = cont.lines[0].get_data()
        np.testing.assert_allclose(x, layers)
        np.testing.assert_allclose(y, means, rtol=1e-12)
        half, centre = bar_halfwidths(cont)
        np.testing.assert_allclose(half, halfs, rtol=1e-9)
        np.testing.assert_allclose(centre, means, rtol=1e-12)
    assert "2 SE" in ax.get_title()
    assert ax.get_xlabel() and ax.get_ylabel() == "mean grey level (grey levels)"
    png_ok(fig, tmp_path)


def test_radial_profiles_on_given_axes_and_errors():
    rng = np.random.default_rng(1)
    fig = Figure()
    ax = fig.add_subplot()
    assert P.plot_radial_profiles({"a": profile_table(rng, 12)}, column="radial_layers_graylevel", ax=ax) is fig
    with pytest.raises(GrapesInputError, match="tables is empty"):
        P.plot_radial_profiles({})
    with pytest.raises(GrapesInputError, match="radial_layers_graylevelnormed"):
        P.plot_radial_profiles({"a": profile_table(rng, 12)})  # default column missing


def profiles_frame(sep="-"):
    rows = []
    for g in (1, 2, 3):
        for layer in range(1, 7):
            rows.append({"group": g, "layer": layer, "lo": 100.0 * g, "hi": 100.0 * g + 99,
                         f"radial_layers_graylevel{sep}mean": 150.0 - g * layer,
                         f"radial_layers_graylevel{sep}se": 0.1 * layer,
                         f"radial_layers_graylevel{sep}n": 30 if layer < 6 else 5})
    return pd.DataFrame(rows).iloc[::-1]


@pytest.mark.parametrize("sep", ["-", "_"])
def test_group_profiles(sep, tmp_path):
    frame = profiles_frame(sep)
    fig = P.plot_group_profiles(frame, n_se=3.0, min_particles=10)
    ax = fig.axes[0]
    conts = errorbars(ax)
    assert len(conts) == 3
    for g, cont in zip((1, 2, 3), conts):
        x, y = cont.lines[0].get_data()
        np.testing.assert_array_equal(x, [1, 2, 3, 4, 5])  # layer 6 has 5 particles < 10
        np.testing.assert_allclose(y, [150.0 - g * k for k in range(1, 6)])
        half, _ = bar_halfwidths(cont)
        np.testing.assert_allclose(half, [3 * 0.1 * k for k in range(1, 6)])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Q1 [100, 199]", "Q2 [200, 299]", "Q3 [300, 399]"]
    assert "3 SE" in ax.get_title()
    png_ok(fig, tmp_path)


def test_group_profiles_bad_input():
    with pytest.raises(GrapesInputError, match="column"):
        P.plot_group_profiles(profiles_frame(), column="radial_layers_std")
    with pytest.raises(GrapesInputError, match="empty"):
        P.plot_group_profiles(profiles_frame().iloc[:0])
    with pytest.raises(GrapesInputError, match="group"):
        P.plot_group_profiles(profiles_frame().drop(columns="group"))


# --------------------------------------------------------------------------------------------
# fig. 7, 8
# --------------------------------------------------------------------------------------------


def test_state_means_and_deltas(tmp_path):
    s = summary_frame()
    for fn, value, err in ((P.plot_state_means, "mean", "se_tot"),
                           (P.plot_state_deltas, "delta_mean", "delta_se_tot")):
        fig = fn(s, n_se=3.0)
        assert_own_figure(fig)
        ax = fig.axes[0]
        conts = errorbars(ax)
        assert len(conts) == (2 if value == "delta_mean" else 1)
        cont = conts[0]
        x, y = cont.lines[0].get_data()
        np.testing.assert_array_equal(x, [0, 1, 2, 3])
        np.testing.assert_allclose(y, s[value].to_numpy())
        half, _ = bar_halfwidths(cont)
        np.testing.assert_allclose(half, 3 * s[err].to_numpy())
        assert [t.get_text() for t in ax.get_xticklabels()] == STATES
        assert "3 SE_tot" in ax.get_title()
        assert "grey levels" in ax.get_ylabel()
        png_ok(fig, tmp_path, f"{value}.png")
        if value == "delta_mean":  # the error of the mean change beside the SE_tot bar
            half, mid = bar_halfwidths(conts[1])
            np.testing.assert_allclose(half, 3 * s["delta_ses"].to_numpy())
            np.testing.assert_allclose(mid, s["delta_mean"].to_numpy())
            x1 = np.array([seg[0][0] for seg in conts[1].lines[2][0].get_segments()])
            np.testing.assert_allclose(x1, np.arange(4) + 0.12)
            assert any("error of the mean" in t.get_text() for t in ax.get_legend().get_texts())
    # the paper's figure alone, and z values written beside the points
    fig = P.plot_state_deltas(s, mean_error=None)
    assert len(errorbars(fig.axes[0])) == 1
    zt = pd.DataFrame({"against": ["reference", "reference", "previous"], "state_a": ["pristine", "pristine", "4.0 V"],
                       "state_b": ["4.0 V", "4.4 V", "4.4 V"], "z": [-5.39, -1.5, -9.0], "reject": [True, False, True]})
    fig = P.plot_state_deltas(s, reference="pristine", z_tests=zt)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "z = -5.4*" in texts and "z = -1.5" in texts and "z = -9.0*" not in texts
    fig = P.plot_state_deltas(s, reference="pristine")
    ax = fig.axes[0]
    assert any(np.allclose(line.get_ydata(), 0.0) and line.get_xdata()[0] == 0 and line.get_xdata()[1] == 1
               for line in ax.get_lines())  # the horizontal line at 0 (axes coordinates in x)
    assert any("by definition" in t.get_text() for t in ax.texts)
    assert "vs pristine" in ax.get_ylabel()


def test_state_means_bad_and_no_kept():
    with pytest.raises(GrapesInputError, match="se_tot"):
        P.plot_state_means(summary_frame().drop(columns="se_tot"))
    with pytest.raises(GrapesInputError, match="empty"):
        P.plot_state_means(summary_frame().iloc[:0])
    with pytest.raises(GrapesInputError, match="DataFrame"):
        P.plot_state_means({"mean": [1.0]})
    nan = summary_frame()
    nan[["mean", "se_tot"]] = np.nan  # nothing kept: a labelled, empty figure
    fig = P.plot_state_means(nan)
    assert any("no kept particle" in t.get_text() for t in fig.axes[0].texts)


def test_quantile_deltas(tmp_path):
    frame = by_quantile_frame()
    fig = P.plot_quantile_deltas(frame, n_se=1.0)
    ax = fig.axes[0]
    conts = errorbars(ax)
    assert len(conts) == 3
    assert [t.get_text() for t in ax.get_legend().get_texts()] == STATES[1:]
    for state, cont in zip(STATES[1:], conts):
        rows = [r for r in frame.itertuples() if r.state == state]
        rows.sort(key=lambda r: r.group)
        x, y = cont.lines[0].get_data()
        np.testing.assert_allclose(y, [r.delta_mean for r in rows])
        assert np.all(np.abs(x - np.array([r.group for r in rows])) <= 0.15)
        half, _ = bar_halfwidths(cont)
        np.testing.assert_allclose(half, [r.delta_se_tot for r in rows])
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks[0].startswith("Q1") and "10-19.5" in ticks[0]
    assert "±1 delta_se_tot" in ax.get_title() and "voxels" in ax.get_xlabel()
    png_ok(fig, tmp_path)
    fig = P.plot_quantile_deltas(frame[frame["state"] == "4.4 V"], n_se=2.0, error="delta_sem")
    (cont,) = errorbars(fig.axes[0])
    half, _ = bar_halfwidths(cont)
    np.testing.assert_allclose(half, [2 * 0.1 * g for g in (1, 2, 3, 4)])
    with pytest.raises(GrapesInputError, match="empty"):
        P.plot_quantile_deltas(frame.iloc[:0])


# --------------------------------------------------------------------------------------------
# fig. 9
# --------------------------------------------------------------------------------------------


def test_fraction_pies(tmp_path):
    fr = [track.Fraction("pristine", "4.4 V", 300, 240, 0.8, math.sqrt(0.8 * 0.2 / 300)),
          track.Fraction("2.5 V", "4.4 V", 200, 130, 0.65, math.sqrt(0.65 * 0.35 / 200)),
          track.Fraction("4.4 V", "2.5 V", 0, 0, float("nan"), float("nan"))]
    fig = P.plot_fractions(fr)
    assert_own_figure(fig)
    axes = [a for a in fig.axes if a.get_visible()]
    assert len(axes) == 3
    for ax, f in zip(axes[:2], fr[:2]):
        wedges = [p for p in ax.patches if isinstance(p, Wedge)]
        assert len(wedges) == 2
        span = [(w.theta2 - w.theta1) % 360 for w in wedges]
        np.testing.assert_allclose(span, [360 * f.fraction, 360 * (1 - f.fraction)], atol=1e-9)
        texts = " ".join(t.get_text() for t in ax.texts)
        assert f"{100 * f.fraction:.1f} ±{100 * f.se:.1f} %" in texts
        assert str(f.n) in ax.get_title()
    assert not [p for p in axes[2].patches if isinstance(p, Wedge)]
    assert any("no particle" in t.get_text() for t in axes[2].texts)
    assert "1 SE" in fig.get_suptitle()
    png_ok(fig, tmp_path)
    with pytest.raises(GrapesInputError, match="empty"):
        P.plot_fractions([])
    with pytest.raises(GrapesInputError, match="fraction"):
        P.plot_fractions([object()])


# --------------------------------------------------------------------------------------------
# fig. 10
# --------------------------------------------------------------------------------------------


def change_maps(shape=(9, 12, 10)):
    rng = np.random.default_rng(5)
    mask = ball(shape, 4.0)
    maps = []
    for state, amp in (("4.0 V", 5.0), ("4.4 V", 37.5), ("2.5 V", 10.0)):
        d = rng.normal(0.0, 1.0, shape).astype(np.float32)
        d[mask] -= amp * mask[mask]
        d[~mask] = np.nan
        maps.append(ChangeMap(7, state, "pristine", d, mask))
    return maps


def test_change_maps_central_slice(tmp_path):
    maps = change_maps()
    fig = P.plot_change_maps(maps)
    assert_own_figure(fig)
    images = [im for ax in fig.axes for im in ax.images]
    assert len(images) == 3
    want_vmax = max(float(np.nanmax(np.abs(m.delta[4]))) for m in maps)  # central plane 9 // 2
    for im, m in zip(images, maps):
        arr = im.get_array()
        np.testing.assert_array_equal(np.ma.filled(arr.astype(float), np.nan), m.delta[4].astype(float))
        assert np.array_equal(np.ma.getmaskarray(arr), np.isnan(m.delta[4]))
        lo, hi = im.get_clim()
        assert lo == -hi and hi == pytest.approx(want_vmax)
        cmap = im.get_cmap()
        assert cmap(0.0)[0] > cmap(0.0)[2] and cmap(1.0)[2] > cmap(1.0)[0]  # low red, high blue
        assert cmap.get_bad()[:3] == pytest.approx((0.85, 0.85, 0.85))
    assert any(ax.get_ylabel() == "grey-level change (grey levels)" for ax in fig.axes)  # the colorbar
    assert "particle 7" in fig.get_suptitle()
    png_ok(fig, tmp_path)


def test_change_maps_axis_index_vmax_2d():
    maps = change_maps()
    fig = P.plot_change_maps(maps[1], axis=2, index=3, vmax=50.0)
    (im,) = [im for ax in fig.axes for im in ax.images]
    np.testing.assert_array_equal(np.ma.filled(im.get_array().astype(float), np.nan),
                                  maps[1].delta[:, :, 3].astype(float))
    assert im.get_clim() == (-50.0, 50.0)
    assert fig.axes[0].get_xlabel() == "y (voxels)" and fig.axes[0].get_ylabel() == "z (voxels)"
    flat = ChangeMap(3, "b", "a", np.full((5, 6), np.nan, np.float32), np.zeros((5, 6), bool))
    fig = P.plot_change_maps([flat])  # 2D and all NaN: drawn, labelled, limits +-1
    (im,) = [im for ax in fig.axes for im in ax.images]
    assert im.get_clim() == (-1.0, 1.0)
    assert any("nothing" in t.get_text() for t in fig.axes[0].texts)
    with pytest.raises(GrapesInputError, match="index"):
        P.plot_change_maps(maps, index=99)
    with pytest.raises(GrapesInputError, match="empty"):
        P.plot_change_maps([])


# --------------------------------------------------------------------------------------------
# fig. 12
# --------------------------------------------------------------------------------------------


def test_normal_models_paper_numbers(tmp_path):
    s = summary_frame().iloc[:2]  # the paper's pristine and 4.0 V
    fig = P.plot_normal_models(s, n_sigma=5)
    ax = fig.axes[0]
    sigma = math.sqrt(11.27 ** 2 / 3650 + 11.08 ** 2 / 3650)
    vlines = sorted(line.get_xdata()[0] for line in ax.get_lines() if line.get_xdata()[0] == line.get_xdata()[1]
                    and len(line.get_xdata()) == 2)
    np.testing.assert_allclose(vlines, [174.41 + k * sigma for k in range(-5, 6)])
    curves = [line for line in ax.get_lines() if len(line.get_xdata()) > 2]
    assert len(curves) == 2
    for line, (mean, sd) in zip(curves, ((174.41, 11.08), (173.00, 11.27))):
        x, y = line.get_data()
        ses = sd / math.sqrt(3650)
        assert x[np.argmax(y)] == pytest.approx(mean, abs=1e-9)
        assert y.max() == pytest.approx(1 / (ses * math.sqrt(2 * math.pi)), rel=1e-9)
        i = len(x) // 3
        assert y[i] == pytest.approx(math.exp(-0.5 * ((x[i] - mean) / ses) ** 2) / (ses * math.sqrt(2 * math.pi)))
    assert any(t.get_text() == "z = -5.39" for t in ax.texts)
    assert any("z = -5.39" in t.get_text() for t in ax.get_legend().get_texts())
    assert sum(t.get_text().endswith("σ") for t in ax.texts) == 10
    png_ok(fig, tmp_path)


def test_normal_models_options_and_errors():
    s = summary_frame()
    fig = P.plot_normal_models(s, spread="sd", n_sigma=2, sigma_state="4.4 V")
    ax = fig.axes[0]
    curves = [line for line in ax.get_lines() if len(line.get_xdata()) > 2]
    assert len(curves) == 4
    assert max(curves[0].get_ydata()) == pytest.approx(1 / (11.08 * math.sqrt(2 * math.pi)), rel=1e-9)
    sigma = math.sqrt(11.5 ** 2 / 3650 + 11.08 ** 2 / 3650)
    vlines = sorted(line.get_xdata()[0] for line in ax.get_lines() if len(line.get_xdata()) == 2)
    np.testing.assert_allclose(vlines, [174.41 + k * sigma for k in range(-2, 3)])
    z44 = (170.20 - 174.41) / sigma
    assert any(f"z = {z44:.2f}" in t.get_text() for t in ax.get_legend().get_texts())
    with pytest.raises(GrapesInputError, match="reference"):
        P.plot_normal_models(s, reference="nope")
    with pytest.raises(GrapesInputError, match="states"):
        P.plot_normal_models(s, states=["nope"])
    with pytest.raises(GrapesInputError, match="empty"):
        P.plot_normal_models(s.iloc[:0])
    one = P.plot_normal_models(s.iloc[:1])  # the reference alone: lines at its own SES
    vl = sorted(line.get_xdata()[0] for line in one.axes[0].get_lines() if len(line.get_xdata()) == 2)
    np.testing.assert_allclose(np.diff(vl), s["ses"].iloc[0])


# --------------------------------------------------------------------------------------------
# property slice, particle, distributions
# --------------------------------------------------------------------------------------------


def label_volume():
    lab = np.zeros((6, 30, 40), np.uint32)
    lab[:, 3:10, 4:15] = 3
    lab[:, 15:25, 8:20] = 5
    lab[:, 5:26, 25:36] = 9
    lab[:, 27:29, 2:6] = 12  # not in the table: background
    lab[4, 0:2, 0:3] = 5
    return lab


TABLE = pd.DataFrame({"label": np.array([9, 3, 5, 11], np.uint64), "roi_mean": [160.0, 140.0, 150.0, 1.0],
                      "sphericity": [0.9, 0.8, 0.7, 0.6]})


def hand_paint(plane, table, column):
    out = np.full(plane.shape, np.nan)
    for lab, v in zip(table["label"], table[column]):
        out[plane == lab] = v
    return out


def test_property_slice(tmp_path):
    lab = label_volume()
    fig = P.plot_property_slice(lab[2], TABLE, "roi_mean")
    assert_own_figure(fig)
    (im,) = fig.axes[0].images
    want = hand_paint(lab[2], TABLE, "roi_mean")
    np.testing.assert_array_equal(np.ma.filled(im.get_array().astype(float), np.nan), want)
    assert np.ma.getmaskarray(im.get_array()).sum() == np.isnan(want).sum()
    assert im.get_clim() == (140.0, 160.0)
    assert fig.axes[1].get_ylabel() == "roi_mean (grey levels)"  # the colorbar
    png_ok(fig, tmp_path)
    # 3D dask volume: the chosen plane only
    dlab = da.from_array(lab, chunks=(2, 16, 16))
    fig = P.plot_property_slice(dlab, TABLE, "sphericity", axis=0, index=4)
    (im,) = fig.axes[0].images
    np.testing.assert_array_equal(np.ma.filled(im.get_array().astype(float), np.nan),
                                  hand_paint(lab[4], TABLE, "sphericity"))
    assert fig.axes[1].get_ylabel() == "sphericity (1)"
    assert "z = 4" in fig.axes[0].get_title()
    fig = P.plot_property_slice(lab, TABLE.assign(other=1.5), "other", axis=1)  # central y plane, no unit
    (im,) = fig.axes[0].images
    np.testing.assert_array_equal(np.ma.filled(im.get_array().astype(float), np.nan),
                                  hand_paint(lab[:, 15, :], TABLE.assign(other=1.5), "other"))
    assert fig.axes[1].get_ylabel() == "other"
    with pytest.raises(GrapesInputError, match="volume"):
        P.plot_property_slice(lab, TABLE, "volume")
    with pytest.raises(GrapesInputError, match="4D"):
        P.plot_property_slice(lab[None], TABLE, "roi_mean")
    empty = P.plot_property_slice(np.zeros((4, 4), np.uint8), TABLE, "roi_mean")
    assert any("no particle" in t.get_text() for t in empty.axes[0].texts)


def fake_particle(with_column=True, grey=True):
    shape = (11, 13, 12)
    mask = ball(shape, 4.5)
    from scipy import ndimage as ndi

    dist = ndi.distance_transform_edt(mask)
    layers = np.where(mask, np.maximum(1, np.rint(dist)), 0).astype(np.int64)
    g = (100 + 10 * layers + np.arange(np.prod(shape)).reshape(shape) % 3).astype(np.uint8)
    row = pd.Series({"label": 42, "radial_layers_graylevel": [101.0, 112.0, 121.5, 130.0, 140.0]})
    if not with_column:
        row = row.drop("radial_layers_graylevel")
    return Particle(42, (3, 4, 5), mask, g if grey else None, mask.astype(np.int32) * 42, dist, layers, row,
                    spacing=(1.0, 1.0, 1.0))


def test_particle_panels(tmp_path):
    p = fake_particle()
    fig = P.plot_particle(p)
    assert_own_figure(fig)
    a0, a1, a2 = fig.axes[:3]
    np.testing.assert_array_equal(a0.images[0].get_array(), p.grey[5])
    lay = np.ma.filled(a1.images[0].get_array().astype(float), np.nan)
    np.testing.assert_array_equal(lay, np.where(p.layers[5] > 0, p.layers[5], np.nan))
    (line,) = a2.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(line.get_ydata(), p.row["radial_layers_graylevel"])
    assert "42" in fig.get_suptitle() and "surface" in a2.get_xlabel()
    png_ok(fig, tmp_path)
    # without the profile column: per-layer mean of the crop, by hand
    q = fake_particle(with_column=False)
    fig = P.plot_particle(q, axis=1, index=6)
    (line,) = fig.axes[2].get_lines()
    k = int(q.layers.max())
    want = []
    for j in range(1, k + 1):
        vals = [float(v) for v, lj in zip(q.grey.ravel(), q.layers.ravel()) if lj == j]
        want.append(sum(vals) / len(vals))
    np.testing.assert_allclose(line.get_ydata(), want)
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), q.grey[:, 6, :])
    # no grey: the mask
    fig = P.plot_particle(fake_particle(grey=False))
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), fake_particle().mask[5])
    with pytest.raises(GrapesInputError, match="particle"):
        P.plot_particle(object())


def test_distributions(tmp_path):
    rng = np.random.default_rng(2)
    tables = {"pristine": profile_table(rng, 60), "charged": profile_table(rng, 45, dark=10)}
    tables["charged"].loc[3, "roi_mean"] = np.nan
    fig = P.plot_distributions(tables, columns=["equivalent_diameter_volume", "roi_mean", "not_a_column"], bins=12)
    assert_own_figure(fig)
    axes = [a for a in fig.axes if a.get_visible()]
    assert len(axes) == 2
    for ax, col in zip(axes, ["equivalent_diameter_volume", "roi_mean"]):
        steps = [p for p in ax.patches if isinstance(p, StepPatch)]
        assert len(steps) == 2
        every = [v for t in tables.values() for v in t[col] if np.isfinite(v)]
        lo, hi = min(every), max(every)
        for step, t in zip(steps, tables.values()):
            values, edges, _ = step.get_data()
            assert edges[0] == pytest.approx(lo) and edges[-1] == pytest.approx(hi) and len(edges) == 13
            want = np.zeros(12)
            for v in t[col]:
                if np.isfinite(v):
                    i = min(int((v - lo) / (hi - lo) * 12), 11)
                    want[i] += 1
            np.testing.assert_array_equal(values, want)
        assert ax.get_ylabel() == "particles per bin"
    assert "spacing units" in axes[0].get_xlabel() and "grey levels" in axes[1].get_xlabel()
    png_ok(fig, tmp_path)
    fig = P.plot_distributions(tables["pristine"], columns="roi_mean", density=True)
    (step,) = [p for p in fig.axes[0].patches if isinstance(p, StepPatch)]
    values, edges, _ = step.get_data()
    assert float(np.sum(values * np.diff(edges))) == pytest.approx(1.0)
    with pytest.raises(GrapesInputError, match="no table has"):
        P.plot_distributions(tables, columns=["nope"])
    with pytest.raises(GrapesInputError, match="empty"):
        P.plot_distributions({})
