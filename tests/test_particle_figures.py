"""Tests of ``grapes_dask.particle_figures``: fig. 5, fig. 8b, fig. 11f and their report sections.

References are independent of the package: radial layers from scipy's
``distance_transform_edt`` of each particle's mask in the whole volume (zero-padded for
``black_border``), with sampling ``spacing / min(spacing)``, ``np.round`` (half to even) and
``np.bincount``; the plane of fig. 5 from numpy indexing.
"""

from __future__ import annotations

import re
import warnings

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

import grapes_dask as gd
from grapes_dask import GrapesInputError
from grapes_dask import particle_figures as pf
from grapes_dask.synthetic import make_particles, make_truth, phantom_numpy

SHAPE = (26, 30, 34)


# --------------------------------------------------------------------------------------------
# fixtures and the reference
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom():
    """Sparse uint64 ids up to 2**49, several particles cut by the border."""
    grey, lab, truth = phantom_numpy(SHAPE, seed=4, chunks=16, mean_radius=6, ids="sparse", max_id=2**49,
                                     label_dtype="uint64")
    ids = np.unique(lab)[1:]
    assert len(ids) > 8 and ids.max() > 2**32
    return grey, lab, truth


@pytest.fixture(scope="module")
def crack_mask(phantom):
    """Random 0/1 cracks, denser towards particle cores, and some marks outside particles."""
    _, lab, _ = phantom
    rng = np.random.default_rng(7)
    inside = lab != 0
    depth = ndi.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1, 1:-1]
    p = np.clip(0.05 + 0.12 * depth, 0, 0.8)
    cracks = (rng.random(lab.shape) < p) & inside
    outside = (rng.random(lab.shape) < 0.3) & ~inside
    return cracks, outside


def reference_layers(lab, label, spacing=(1.0, 1.0, 1.0), layer_width=1.0, black_border=True):
    """(mask, layer map) of one particle from scipy's EDT of its mask in the whole volume."""
    mask = lab == label
    rel = np.asarray(spacing, float) / min(spacing)
    if black_border:
        d = ndi.distance_transform_edt(np.pad(mask, 1), sampling=rel)[1:-1, 1:-1, 1:-1]
    else:
        d = ndi.distance_transform_edt(mask, sampling=rel)
    k = np.maximum(1, np.round(d / layer_width)).astype(np.int64)
    return mask, np.where(mask, k, 0)


def reference_void(lab, cracks, spacing=(1.0, 1.0, 1.0), layer_width=1.0):
    """Long table label, layer, n_voxels, void_voxels from scipy + bincount."""
    rows = []
    for label in np.unique(lab)[1:]:
        mask, k = reference_layers(lab, label, spacing, layer_width)
        n = np.bincount(k[mask])
        v = np.bincount(k[mask], weights=cracks[mask].astype(np.int64)).astype(np.int64)
        for layer in range(1, len(n)):
            if n[layer]:
                rows.append((np.uint64(label), layer, int(n[layer]), int(v[layer])))
    return pd.DataFrame(rows, columns=["label", "layer", "n_voxels", "void_voxels"])


def legend_counts(fig) -> dict:
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    out = {}
    for t in texts:
        m = re.search(r"([\d,]+) voxels$", t)
        if m:
            out["roi" if t.startswith("ROI") else "shell"] = int(m.group(1).replace(",", ""))
    title = fig.axes[0].get_legend().get_title().get_text()
    out["N"] = int(re.match(r"N = (\d+)", title).group(1))
    return out


# --------------------------------------------------------------------------------------------
# fig. 8b: the ROI shell
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing,n_outer", [((1.0, 1.0, 1.0), 2), ((2.0, 1.0, 1.0), 1), ((1.0, 1.0, 1.0), 0)])
def test_roi_count_equals_table_and_scipy(phantom, spacing, n_outer):
    grey, lab, _ = phantom
    table = gd.analyze(grey, lab, spacing=spacing, exclude_outer_layers=n_outer, chunks=(9, 11, 13))
    inner = table[~table["touches_border"]].sort_values("voxel_count")
    border = table[table["touches_border"]]
    picks = [int(inner["label"].iloc[-1]), int(inner["label"].iloc[len(inner) // 2]), int(border["label"].iloc[0])]
    for label in picks:
        fig = pf.plot_roi_shell((grey, lab, table), label, exclude_outer_layers=n_outer)
        got = legend_counts(fig)
        mask, k = reference_layers(lab, label, spacing)
        expected = int(np.count_nonzero(k > n_outer))
        row = table.set_index("label").loc[np.uint64(label)]
        assert got["N"] == n_outer
        assert got["roi"] == expected == int(row["roi_voxels"]), (label, got, expected, row["roi_voxels"])
        assert got["roi"] + got.get("shell", 0) == int(mask.sum())


def test_roi_shell_planes_and_particle_input(phantom):
    grey, lab, _ = phantom
    table = gd.analyze(grey, lab, exclude_outer_layers=2)
    row = table[~table["touches_border"]].sort_values("voxel_count").iloc[-1]
    label = int(row["label"])
    mask, k = reference_layers(lab, label)
    for axis in (0, 1, 2):
        fig = pf.plot_roi_shell((grey, lab, table), label, exclude_outer_layers=2, axis=axis)
        ax = fig.axes[0]
        index = int(round(row[f"centroid-{axis}"]))
        assert f"{'zyx'[axis]} = {index}" in ax.get_title()
        # the overlay's plane: blue where layer > 2, orange on the outer layers, transparent outside
        lo = [int(row[f"bbox-{a}"]) - 1 for a in range(3)]
        lo = [max(0, v) for v in lo]
        hi = [min(n, int(row[f"bbox-{a + 3}"]) + 1) for a, n in enumerate(lab.shape)]
        sl = [slice(a, b) for a, b in zip(lo, hi)]
        sl[axis] = index
        kk, gg = k[tuple(sl)], grey[tuple(sl)]
        rgba = np.asarray(ax.images[1].get_array())
        assert rgba.shape == kk.shape + (4,)
        np.testing.assert_array_equal(rgba[..., 3] > 0, kk > 0)
        np.testing.assert_allclose(rgba[kk > 2, :3], np.broadcast_to(pf._ROI_COLOUR, ((kk > 2).sum(), 3)))
        np.testing.assert_allclose(rgba[(kk > 0) & (kk <= 2), :3],
                                   np.broadcast_to(pf._SHELL_COLOUR, (((kk > 0) & (kk <= 2)).sum(), 3)))
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), gg)
    # a Particle object gives the same layers and counts
    p = gd.particle(grey, lab, table, label)
    got = legend_counts(pf.plot_roi_shell(p, exclude_outer_layers=2))
    assert got["roi"] == int(np.count_nonzero(k > 2)) == int(row["roi_voxels"])
    with pytest.raises(GrapesInputError, match="particle given is label"):
        pf.plot_roi_shell(p, label + 1)
    with pytest.raises(GrapesInputError, match="index"):
        pf.plot_roi_shell((grey, lab, table), label, index=int(row["bbox-3"]) + 5)
    with pytest.raises(GrapesInputError, match="exclude_outer_layers"):
        pf.plot_roi_shell((grey, lab, table), label, exclude_outer_layers=-1)


def test_roi_layers_relative_spacing_and_width(phantom):
    """Physical, anisotropic spacing: layers in voxels of the smallest edge (scipy, sampling s / min s)."""
    grey, lab, _ = phantom
    table = gd.analyze(grey, lab)
    label = int(table[~table["touches_border"]].sort_values("voxel_count")["label"].iloc[-1])
    for spacing, width in [((0.65, 0.325, 0.325), 1.0), ((1.0, 1.0, 1.0), 1.5), ((0.5, 1.5, 0.5), 0.8)]:
        p = pf.particle_layers((grey, lab, table), label, spacing=spacing, layer_width=width)
        mask, k = reference_layers(lab, label, spacing, width)
        np.testing.assert_array_equal(p.layers, k[p.slices])
        fig = pf.plot_roi_shell((grey, lab, table), label, exclude_outer_layers=1, spacing=spacing,
                                layer_width=width)
        assert legend_counts(fig)["roi"] == int(np.count_nonzero(k > 1))
    ax = pf.plot_roi_shell((grey, lab, table), label, spacing=(0.65, 0.325, 0.325), unit="um", axis=1).axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("x (µm)", "z (µm)")
    assert "voxel 0.65 × 0.325 × 0.325 µm" in ax.get_title()
    lo = int(table.set_index("label").loc[np.uint64(label), "bbox-2"]) - 1  # the crop's first x, volume index
    assert ax.images[0].get_extent()[0] == pytest.approx((lo - 0.5) * 0.325)
    # black_border=False: the volume's outside is not a boundary (scipy without padding)
    cut = table[table["touches_border"]].sort_values("voxel_count")
    label = int(cut["label"].iloc[-1])
    t2 = gd.analyze(grey, lab, black_border=False, exclude_outer_layers=1)
    fig = pf.plot_roi_shell((grey, lab, t2), label, exclude_outer_layers=1)
    _, k = reference_layers(lab, label, black_border=False)
    _, k_black = reference_layers(lab, label, black_border=True)
    assert np.count_nonzero(k > 1) != np.count_nonzero(k_black > 1)  # the test can tell them apart
    assert legend_counts(fig)["roi"] == int(np.count_nonzero(k > 1)) == int(
        t2.set_index("label").loc[np.uint64(label), "roi_voxels"])


def test_roi_shell_warns_when_the_table_has_other_layers(phantom, tmp_path):
    grey, lab, _ = phantom
    table = gd.analyze(grey, lab, exclude_outer_layers=1, layer_width=2.0)
    label = int(table[~table["touches_border"]].sort_values("voxel_count")["label"].iloc[-1])
    with pytest.warns(gd.GrapesInputWarning, match="roi_voxels"):
        pf.plot_roi_shell((grey, lab, table), label, exclude_outer_layers=1)
    gd.write_table(table, tmp_path / "t.parquet")
    with pytest.warns(gd.GrapesInputWarning, match="roi_voxels"):  # a table file too
        pf.plot_roi_shell((grey, lab, tmp_path / "t.parquet"), label, exclude_outer_layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = pf.plot_roi_shell((grey, lab, table), label, exclude_outer_layers=1, layer_width=2.0)
    assert legend_counts(fig)["roi"] == int(table.set_index("label").loc[np.uint64(label), "roi_voxels"])


# --------------------------------------------------------------------------------------------
# fig. 5: labels over grey
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis,index", [(0, None), (1, 3), (2, 33)])
def test_labels_over_grey_draws_the_plane(phantom, axis, index):
    grey, lab, _ = phantom
    fig = pf.plot_labels_over_grey(grey, lab, axis=axis, index=index, alpha=0.4)
    ax = fig.axes[0]
    i = SHAPE[axis] // 2 if index is None else index
    key = [slice(None)] * 3
    key[axis] = i
    g, lp = grey[tuple(key)], lab[tuple(key)]
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), g)
    rgba = np.asarray(ax.images[1].get_array())
    assert rgba.shape == lp.shape + (4,)
    np.testing.assert_array_equal(rgba[..., 3] == 0, lp == 0)  # background transparent, particles not
    edge = pf._boundaries(lp)
    np.testing.assert_allclose(rgba[(lp != 0) & ~edge, 3], 0.4)
    np.testing.assert_allclose(rgba[edge, :3], 1.0)  # white outlines
    # one colour per label, the label's own (two labels of the plane differ)
    ids = [v for v in np.unique(lp[~edge]) if v]
    cols = pf.label_colours(ids)
    for v, c in zip(ids, cols):
        np.testing.assert_allclose(rgba[(lp == v) & ~edge, :3], np.broadcast_to(c, (((lp == v) & ~edge).sum(), 3)))
    assert len({tuple(np.round(c, 6)) for c in cols}) == len(ids)
    assert f"{'zyx'[axis]} = {i}" in ax.get_title()
    assert ax.get_xlabel().endswith("(voxels)")
    # without outlines no pixel is opaque
    rgba2 = np.asarray(pf.plot_labels_over_grey(grey, lab, axis=axis, index=index, outlines=False)
                       .axes[0].images[1].get_array())
    assert rgba2[..., 3].max() == pytest.approx(0.45)


def test_labels_over_grey_reads_only_its_plane(phantom):
    grey, lab, _ = phantom
    index = 11

    def planes(vol):
        def plane(i):
            if i != index:
                raise AssertionError(f"plane {i} was read")
            return vol[i]

        return da.stack([da.from_delayed(dask.delayed(plane)(i), shape=vol.shape[1:], dtype=vol.dtype)
                         for i in range(vol.shape[0])])

    fig = pf.plot_labels_over_grey(planes(grey), planes(lab), axis=0, index=index)
    np.testing.assert_array_equal(np.asarray(fig.axes[0].images[0].get_array()), grey[index])
    with pytest.raises(AssertionError, match="was read"):  # the trap works
        pf.plot_labels_over_grey(planes(grey), planes(lab), axis=0, index=index + 1)


def test_labels_over_grey_physical_axes(phantom, tmp_path):
    grey, lab, _ = phantom
    fig = pf.plot_labels_over_grey(grey, lab, spacing=(0.65, 0.32499999999999996, 0.325), unit="micrometer")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "x (µm)" and ax.get_ylabel() == "y (µm)"
    assert "0.65 × 0.325 × 0.325 µm" in ax.get_title() and "0.3249999" not in ax.get_title()
    left, right, bottom, top = ax.images[0].get_extent()
    assert (left, right) == pytest.approx((-0.5 * 0.325, (SHAPE[2] - 0.5) * 0.325))
    assert (top, bottom) == pytest.approx((-0.5 * 0.325, (SHAPE[1] - 0.5) * 0.325))
    # from the metadata of a Zarr store (the labels'), with its unit
    from grapes_dask.io import write_zarr

    write_zarr(da.from_array(lab, chunks=13), tmp_path / "lab.zarr",
               attrs={"spacing": [0.325, 0.325, 0.325], "unit": "micrometer"})
    fig = pf.plot_labels_over_grey(grey, tmp_path / "lab.zarr", axis=1)
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("x (µm)", "z (µm)")
    assert "voxel 0.325 µm" in ax.get_title()
    # a spacing without a unit: spacing units
    assert pf.plot_labels_over_grey(grey, lab, spacing=2.0).axes[0].get_xlabel() == "x (spacing units)"


def test_labels_over_grey_errors(phantom):
    grey, lab, _ = phantom
    with pytest.raises(GrapesInputError, match="shape"):
        pf.plot_labels_over_grey(grey[:-1], lab)
    with pytest.raises(GrapesInputError, match="index"):
        pf.plot_labels_over_grey(grey, lab, index=SHAPE[0])
    with pytest.raises(GrapesInputError, match="alpha"):
        pf.plot_labels_over_grey(grey, lab, alpha=2)
    with pytest.raises(GrapesInputError, match="integer label"):
        pf.plot_labels_over_grey(grey, lab.astype(np.float32))


def test_labels_over_grey_2d(phantom):
    grey, lab, _ = phantom
    fig = pf.plot_labels_over_grey(grey[5], lab[5], spacing=(0.5, 0.5), unit="nm")
    np.testing.assert_array_equal(np.asarray(fig.axes[0].images[0].get_array()), grey[5])
    assert fig.axes[0].get_xlabel() == "x (nm)"


# --------------------------------------------------------------------------------------------
# fig. 11f: void fraction per radial layer
# --------------------------------------------------------------------------------------------


def _check_against_reference(vf, ref):
    got = vf.layers
    assert list(got.columns[:5]) == ["label", "layer", "n_voxels", "void_voxels", "void_fraction"]
    ref = ref.sort_values(["label", "layer"]).reset_index(drop=True)
    assert len(got) == len(ref)
    np.testing.assert_array_equal(got["label"].to_numpy(np.uint64), ref["label"].to_numpy(np.uint64))
    for c in ("layer", "n_voxels", "void_voxels"):
        np.testing.assert_array_equal(got[c].to_numpy(np.int64), ref[c].to_numpy(np.int64), err_msg=c)
    np.testing.assert_allclose(got["void_fraction"], ref["void_voxels"] / ref["n_voxels"], rtol=0, atol=1e-15)
    np.testing.assert_allclose(got["nmc_fraction"], 1 - ref["void_voxels"] / ref["n_voxels"], rtol=0, atol=1e-15)


@pytest.mark.parametrize("spacing,width,chunks", [
    ((1.0, 1.0, 1.0), 1.0, (7, 9, 11)),
    ((0.65, 0.325, 0.325), 1.0, (10, 30, 6)),
    ((2.0, 1.0, 1.0), 1.5, 16),
])
def test_void_fraction_against_scipy(phantom, crack_mask, spacing, width, chunks):
    _, lab, _ = phantom
    cracks, outside = crack_mask
    vf = pf.void_fraction_profiles((cracks | outside).astype(np.uint8), lab, spacing=spacing, layer_width=width,
                                   chunks=chunks)
    ref = reference_void(lab, cracks, spacing, width)  # the marks outside particles do not count
    _check_against_reference(vf, ref)
    # per particle
    parts = vf.particles.set_index("label")
    tot = ref.groupby("label")[["n_voxels", "void_voxels"]].sum()
    np.testing.assert_array_equal(parts.loc[tot.index.to_numpy(np.uint64), "n_voxels"], tot["n_voxels"])
    np.testing.assert_array_equal(parts.loc[tot.index.to_numpy(np.uint64), "void_voxels"], tot["void_voxels"])
    assert parts["touches_border"].any() and (~parts["touches_border"]).any()
    one = ref[ref["label"] == ref["label"].iloc[0]]
    prof = np.asarray(parts.loc[np.uint64(one["label"].iloc[0]), "radial_void_fraction"], float)
    np.testing.assert_allclose(prof[one["layer"].to_numpy() - 1], one["void_voxels"] / one["n_voxels"], atol=1e-12)
    # population: mean over particles of each one's fraction, SE = sd (ddof 1) / sqrt(n)
    ref["f"] = ref["void_voxels"] / ref["n_voxels"]
    pop = vf.population.set_index("layer")
    for layer, rows in ref.groupby("layer"):
        f = rows["f"].to_numpy()
        assert pop.loc[layer, "n_particles"] == len(f)
        assert pop.loc[layer, "void_fraction_mean"] == pytest.approx(f.mean(), abs=1e-12)
        assert pop.loc[layer, "nmc_fraction_mean"] == pytest.approx(1 - f.mean(), abs=1e-12)
        if len(f) > 1:
            assert pop.loc[layer, "void_fraction_se"] == pytest.approx(f.std(ddof=1) / np.sqrt(len(f)), abs=1e-12)
        assert pop.loc[layer, "void_fraction_pooled"] == pytest.approx(rows["void_voxels"].sum()
                                                                        / rows["n_voxels"].sum(), abs=1e-12)
    assert vf.parameters["relative_spacing"] == pytest.approx(np.asarray(spacing) / min(spacing))


def test_void_fraction_inputs(phantom, crack_mask):
    _, lab, _ = phantom
    cracks, outside = crack_mask
    base = pf.void_fraction_profiles(cracks, lab, chunks=13)  # bool
    for variant in (cracks.astype(np.int32), cracks.astype(np.float32), da.from_array(cracks, chunks=(5, 30, 17)),
                    cracks | outside):
        got = pf.void_fraction_profiles(variant, lab, chunks=13)
        pd.testing.assert_frame_equal(got.layers, base.layers)
    # a subset of particles for the population
    inner = base.particles.loc[~base.particles["touches_border"], "label"]
    sub = pf.void_fraction_population(base, labels=inner)
    assert sub["n_particles"].iloc[0] == len(inner) < base.population["n_particles"].iloc[0]
    with pytest.raises(GrapesInputError, match="shape"):
        pf.void_fraction_profiles(cracks[:, :-1], lab)
    bad = cracks.astype(np.uint8)
    bad[3, 4, 5] = 2
    with pytest.raises(GrapesInputError, match=r"not binary.*\b2\b"):
        pf.void_fraction_profiles(bad, lab, chunks=13)
    with pytest.raises(GrapesInputError, match="layer_width"):
        pf.void_fraction_profiles(cracks, lab, layer_width=0)
    with pytest.raises(GrapesInputError, match="exclude_outer_layers"):
        pf.void_fraction_profiles(cracks, lab, exclude_outer_layers=2)


def test_plot_void_fraction(phantom, crack_mask):
    _, lab, _ = phantom
    vf = pf.void_fraction_profiles(crack_mask[0], lab)
    few = vf.particles["label"].to_numpy()[:3]
    fig = pf.plot_void_fraction(vf, particles=few)
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if str(ln.get_label()).startswith("particle")]
    assert len(lines) == 3
    rows = vf.layers[vf.layers["label"] == few[0]]
    np.testing.assert_allclose(lines[0].get_ydata(), 1 - rows["void_fraction"].to_numpy())
    assert ax.get_ylabel() == "volume fraction of NMC (1)"
    fig = pf.plot_void_fraction(vf, what="void")  # many particles: the mean only
    ax = fig.axes[0]
    assert not [ln for ln in ax.get_lines() if str(ln.get_label()).startswith("particle")]
    mean_line = ax.containers[0].lines[0]
    pop = vf.population[vf.population["n_particles"] >= 2]
    np.testing.assert_allclose(mean_line.get_ydata(), pop["void_fraction_mean"])
    with pytest.raises(GrapesInputError, match="what"):
        pf.plot_void_fraction(vf, what="air")


def test_phantom_crack_mask():
    shape = (32, 32, 32)
    particles = make_particles(shape, seed=3, mean_radius=8)
    truth = make_truth(particles, shape, n_states=2, damage=[0.0, 0.9], seed=3)
    grey, lab = (a.compute() for a in gd.synthetic.phantom_arrays(shape, truth, state=1, chunks=16, seed=3))
    pristine = pf.phantom_crack_mask(shape, truth, state=0, seed=3, chunks=16).compute()
    charged = pf.phantom_crack_mask(shape, truth, state=1, seed=3, chunks=16, threshold=0.25).compute()
    assert pristine.dtype == bool and not pristine.any()
    assert charged.any() and not (charged & (lab == 0)).any()
    # the cracks are where the phantom's grey is dark (voids at the pore level inside particles)
    assert grey[charged].mean() < grey[(lab != 0) & ~charged].mean() - 20
    vf = pf.void_fraction_profiles(charged, lab)
    pop = vf.population
    assert pop["void_fraction_mean"].iloc[0] < pop["void_fraction_mean"].iloc[3]  # damage at the cores


# --------------------------------------------------------------------------------------------
# report sections
# --------------------------------------------------------------------------------------------


def test_particle_figure_sections(phantom, tmp_path):
    from grapes_dask.report import Captioned, Section, _Collector, write_report

    grey, lab, _ = phantom
    table = gd.analyze(grey, lab, exclude_outer_layers=2)
    figs = _Collector()
    secs = pf.particle_figure_sections(grey, lab, table, figs=figs, name="4.4 V", n_particles=2)
    assert [type(s) for s in secs] == [Section, Section]
    assert secs[0].title == "Labels over grey (fig. 5) of 4.4 V"
    inner = table[~table["touches_border"]].sort_values(["voxel_count", "label"], ascending=[False, True])
    expect = [f"fig8b_roi_shell_{int(x)}_4.4_V" for x in inner["label"].head(2)]
    assert list(figs.figures) == ["fig5_labels_over_grey_4.4_V"] + expect
    assert all(isinstance(i, Captioned) for s in secs for i in s.items)
    assert legend_counts(figs.figures[expect[0]])["roi"] == int(inner["roi_voxels"].iloc[0])
    assert not figs.notes
    # no table: fig. 5 only; a bad particle becomes a note, not an error
    assert len(pf.particle_figure_sections(grey, lab)) == 1
    figs = _Collector()
    secs = pf.particle_figure_sections(grey, lab, table, figs=figs, particles=[12345])
    assert figs.notes and "12345" in figs.notes[0] and isinstance(secs[1].items[0], str)
    write_report(tmp_path / "r.html", title="t", sections=secs)
    assert "Labels over grey" in (tmp_path / "r.html").read_text()


def test_particle_figure_sections_without_volumes(phantom):
    from grapes_dask.report import _Collector

    grey, lab, _ = phantom
    table = gd.analyze(grey, lab, exclude_outer_layers=1)
    figs = _Collector()
    assert pf.particle_figure_sections(grey, None, table, figs=figs) == [] and not figs.figures
    secs = pf.particle_figure_sections(None, lab, table, figs=figs, name="s")
    assert secs[0].items == ("Figure 5 of s not drawn: no grey volume",)
    largest = int(table[~table["touches_border"]].sort_values("voxel_count")["label"].iloc[-1])
    assert list(figs.figures) == [f"fig8b_roi_shell_{largest}_s"]


def test_two_dimensional_roi_and_void_fraction():
    grey, lab, _ = phantom_numpy((40, 44), seed=3, chunks=16, mean_radius=6, ids="sparse")
    table = gd.analyze(grey, lab, exclude_outer_layers=1, chunks=(13, 17))
    label = int(table[~table["touches_border"]].sort_values("voxel_count")["label"].iloc[-1])
    mask = lab == label
    d = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    k = np.where(mask, np.maximum(1, np.round(d)), 0)
    fig = pf.plot_roi_shell((grey, lab, table), label, exclude_outer_layers=1)
    assert legend_counts(fig)["roi"] == int(np.count_nonzero(k > 1)) == int(
        table.set_index("label").loc[np.uint64(label), "roi_voxels"])
    rgba = np.asarray(fig.axes[0].images[1].get_array())
    r0, c0 = int(table.set_index("label").loc[np.uint64(label), "bbox-0"]) - 1, int(
        table.set_index("label").loc[np.uint64(label), "bbox-1"]) - 1
    np.testing.assert_array_equal(rgba[..., 3] > 0, k[r0:r0 + rgba.shape[0], c0:c0 + rgba.shape[1]] > 0)
    rng = np.random.default_rng(1)
    cracks = rng.random(lab.shape) < 0.3
    vf = pf.void_fraction_profiles(cracks, lab, chunks=(13, 17))
    rows = []
    for lb in np.unique(lab)[1:]:
        m = lab == lb
        dd = ndi.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        kk = np.maximum(1, np.round(dd[m])).astype(int)
        n, v = np.bincount(kk), np.bincount(kk, weights=cracks[m]).astype(np.int64)
        rows += [(np.uint64(lb), j, int(n[j]), int(v[j])) for j in range(1, len(n)) if n[j]]
    _check_against_reference(vf, pd.DataFrame(rows, columns=["label", "layer", "n_voxels", "void_voxels"]))


def test_void_fraction_from_the_centre(phantom, crack_mask):
    _, lab, _ = phantom
    cracks = crack_mask[0]
    spacing = (2.0, 1.0, 1.0)
    vf = pf.void_fraction_profiles(cracks, lab, spacing=spacing, start_at="center", chunks=11)
    coords = np.indices(lab.shape).reshape(3, -1).T.astype(float)
    flat, cr = lab.ravel(), cracks.ravel()
    rows = []
    for lb in np.unique(flat)[1:]:
        m = flat == lb
        c = coords[m]
        dist = np.sqrt((((c - c.mean(axis=0)) * np.asarray(spacing)) ** 2).sum(axis=1))
        kk = 1 + np.round(dist).astype(int)
        n, v = np.bincount(kk), np.bincount(kk, weights=cr[m]).astype(np.int64)
        rows += [(np.uint64(lb), j, int(n[j]), int(v[j])) for j in range(1, len(n)) if n[j]]
    _check_against_reference(vf, pd.DataFrame(rows, columns=["label", "layer", "n_voxels", "void_voxels"]))


def test_voxel_unit_metadata_is_not_a_length(phantom, tmp_path):
    from grapes_dask.io import write_zarr

    grey, lab, _ = phantom
    write_zarr(da.from_array(lab, chunks=13), tmp_path / "lab.zarr", attrs={"spacing": [1, 1, 1], "unit": "voxel"})
    ax = pf.plot_labels_over_grey(grey, tmp_path / "lab.zarr").axes[0]
    assert ax.get_xlabel() == "x (voxels)" and "voxel 1" not in ax.get_title()
