"""Figures of particle tables and operando tracking (the paper's figures 6-12).

Every function returns a :class:`matplotlib.figure.Figure` built with the object-oriented API
(no pyplot: nothing is shown, no global figure state, safe in servers and threads); save it
with ``fig.savefig("name.png")``. Single-panel functions take ``ax=None`` (draw on a new
figure) or an existing Axes to draw on. Titles say what the error bars are.

Inputs are plain tables and small result objects, used by their fields only:

- particle tables (:func:`grapes_dask.analyze`): :func:`plot_radial_profiles` (fig. 6),
  :func:`plot_distributions`, :func:`plot_property_slice`;
- the long per-group profile table (columns ``group``, ``layer``, ``P-mean``, ``P-se``,
  ``P-n``): :func:`plot_group_profiles` (fig. 6 by quantile group);
- a tracking's ``summary()``: :func:`plot_state_means` (fig. 7a), :func:`plot_state_deltas`
  (fig. 7b), :func:`plot_normal_models` (fig. 12); its ``by_quantile()``:
  :func:`plot_quantile_deltas` (fig. 8); its ``fraction()`` objects: :func:`plot_fractions`
  (fig. 9); its ``change_map()`` objects: :func:`plot_change_maps` (fig. 10);
- one particle's crops (:func:`grapes_dask.particle`): :func:`plot_particle`.
"""

from __future__ import annotations

import math

import numpy as np

from ._errors import GrapesInputError
from .stats import radial_profile_stats
from .units import describe_column

__all__ = [
    "radial_profile_stats",
    "plot_radial_profiles",
    "plot_group_profiles",
    "plot_state_means",
    "plot_state_deltas",
    "plot_quantile_deltas",
    "plot_fractions",
    "plot_change_maps",
    "plot_normal_models",
    "plot_property_slice",
    "plot_particle",
    "plot_distributions",
]

# axis labels of the usual columns (units in brackets)
_LABELS = {
    "radial_layers_graylevelnormed": "normalised mean grey level (1)",
    "radial_layers_graylevel": "mean grey level (grey levels)",
    "radial_layers_std": "grey-level standard deviation (grey levels)",
    "roi_mean": "mean ROI grey level (grey levels)",
    "roi_std": "ROI grey-level standard deviation (grey levels)",
    "intensity_mean": "mean grey level (grey levels)",
    "volume": "volume (spacing units^3)",
    "voxel_count": "volume (voxels)",
    "equivalent_diameter_volume": "equivalent diameter (spacing units)",
    "sphericity": "sphericity (1)",
    "delta": "grey-level change (grey levels)",
}
_AXES3 = ("z", "y", "x")
_AXES2 = ("y", "x")
_DIVERGING = "RdBu"  # negative (darker) red, positive blue, as the paper's fig. 10
_BACKGROUND = "0.85"  # NaN (outside the particle) in light grey


def _label(column: str) -> str:
    return _LABELS.get(column, column)


def _label_with_unit(column: str, tables) -> str:
    """The axis label of a column, in the unit the tables' metadata records for it (``volume
    (µm^3)``) when they all agree on a physical one, else :func:`_label`'s."""
    units = {((getattr(t, "attrs", {}) or {}).get("grapes_dask", {}) or {}).get("column_units", {}).get(column)
             for t in tables}
    unit = units.pop() if len(units) == 1 else None
    if unit is None or "spacing unit" in unit or unit in ("voxels", "voxel index", "grey level", "dimensionless"):
        return _label(column)
    return f"{_label(column).split(' (')[0]} ({unit})"


def _figure(ax=None, figsize=(6.0, 4.0)):
    """(figure, axes): the axes' figure, or a new figure with one axes."""
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _panels(n: int, ncols: int | None = None, size=(3.6, 3.4), **kw):
    from matplotlib.figure import Figure

    ncols = ncols or n
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(size[0] * ncols + 0.8, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw).ravel()
    for extra in axes[n:]:
        extra.set_visible(False)
    return fig, list(axes[:n])


def _need_columns(frame, columns, name: str, fix: str) -> None:
    if not hasattr(frame, "columns"):
        raise GrapesInputError(f"{name}: give a pandas DataFrame ({fix}), not {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise GrapesInputError(f"{name} has no column(s) {missing} (it has {list(frame.columns)}): give {fix}")


def _need_rows(frame, name: str, fix: str) -> None:
    if len(frame) == 0:
        raise GrapesInputError(f"{name} is empty: nothing to plot; give {fix}")


def _float(values) -> np.ndarray:
    return np.asarray(values, dtype=float)


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


def _take_slice(array, axis: int, index: int | None, name: str):
    """2D numpy slice of a 2D/3D array (numpy, dask, zarr: only that plane is read)."""
    ndim = len(array.shape)
    if ndim == 2:
        return np.asarray(array), None, None
    if ndim != 3:
        raise GrapesInputError(f"{name}: give a 2D (Y, X) or 3D (Z, Y, X) array, not {ndim}D")
    if axis not in (0, 1, 2):
        raise GrapesInputError(f"{{axis}}={axis!r}: choose 0 (z), 1 (y) or 2 (x)", axis=None)
    n = array.shape[axis]
    index = n // 2 if index is None else int(index)
    if not 0 <= index < n:
        raise GrapesInputError(f"{{index}}={index}: {name} has {n} planes along axis {axis}; give 0..{n - 1}",
                               index=None)
    key = [slice(None)] * 3
    key[axis] = index
    plane = array[tuple(key)]
    if hasattr(plane, "compute"):
        plane = plane.compute()
    return np.asarray(plane), axis, index


def _plane_axes(ndim: int, axis) -> tuple[str, str]:
    """Names of the (row, column) axes of a displayed plane."""
    if ndim == 2 or axis is None:
        return _AXES2
    rest = [a for i, a in enumerate(_AXES3) if i != axis]
    return rest[0], rest[1]


# --------------------------------------------------------------------------------------------
# radial profiles (fig. 6)
# --------------------------------------------------------------------------------------------


def plot_radial_profiles(tables: dict, column: str = "radial_layers_graylevelnormed", n_se: float = 2.0,
                         min_particles: int = 10, ax=None, title: str | None = None):
    """Mean radial profile of each table with +-`n_se` standard-error bars (paper fig. 6).

    Parameters
    ----------
    tables : dict of str -> pandas.DataFrame
        Label of each curve (e.g. the state of charge) and its particle table.
    column : str
        Profile column (one array per particle, layer 1 first).
    n_se : float
        Error bars are +- n_se standard errors of the mean over particles (sample standard
        deviation / sqrt(n), per layer; see :func:`radial_profile_stats`).
    min_particles : int
        Layers with fewer particles are not drawn.
    ax : matplotlib Axes, optional
        Draw on it instead of a new figure.
    title : str, optional
        Default: says what the error bars are.

    Returns
    -------
    matplotlib.figure.Figure
        One error-bar line per table, x = radial layer, y = mean of `column`.

    Raises
    ------
    GrapesInputError
        No table, or a table without `column`.
    """
    if not tables:
        raise GrapesInputError("tables is empty: give a dict of name -> particle table")
    for name, tab in tables.items():
        _need_columns(tab, [column], f"table {name!r}", f"a particle table with the profile column {column!r}")
    fig, ax = _figure(ax)
    for name, tab in tables.items():
        layers, mean, se, n = radial_profile_stats(tab, column)
        keep = n >= min_particles
        ax.errorbar(layers[keep], mean[keep], yerr=n_se * se[keep], marker="o", ms=3, capsize=2,
                    label=f"{name} ({len(tab)} particles)")
    ax.set_xlabel("radial layer (1 = particle surface)")
    ax.set_ylabel(_label(column))
    ax.set_title(title or f"radial profiles, error bars ±{n_se:g} SE (standard error of the mean)")
    ax.legend(fontsize="small")
    return fig


def _stat_column(frame, prefix: str, stat: str) -> str:
    for sep in ("-", "_"):
        if f"{prefix}{sep}{stat}" in frame.columns:
            return f"{prefix}{sep}{stat}"
    raise GrapesInputError(
        f"profiles has no column {prefix}-{stat} (it has {list(frame.columns)}): give {{column}} as the "
        f"profile whose -mean, -se and -n columns it holds", column=None)


def plot_group_profiles(profiles, column: str = "radial_layers_graylevel", n_se: float = 2.0,
                        min_particles: int = 10, ax=None, title: str | None = None, label: str = "Q"):
    """Mean radial profile of each quantile group with +-`n_se` standard-error bars (fig. 6).

    Parameters
    ----------
    profiles : pandas.DataFrame
        Long table, one row per (group, layer): ``group``, ``layer`` and, for the profile
        `column` ``P``, ``P-mean``, ``P-se`` and ``P-n`` (``P_mean`` ... also accepted), e.g.
        the per-layer statistics of :func:`grapes_dask.stats.quantile_groups`. Optional ``lo``
        and ``hi`` (the group's value range) go into the legend.
    column : str
        The profile ``P``.
    n_se : float
        Error bars are +- n_se times ``P-se``.
    min_particles : int
        Layers with ``P-n`` below it are not drawn.
    ax : matplotlib Axes, optional
    title : str, optional
    label : str
        Legend prefix of a group (``"Q"``: Q1, Q2 ...; 1 = lowest values).

    Returns
    -------
    matplotlib.figure.Figure
        One error-bar line per group.
    """
    _need_columns(profiles, ["group", "layer"], "profiles", "the long per-layer table of quantile groups")
    _need_rows(profiles, "profiles", "a table with one row per (group, layer)")
    cm, cs, cn = (_stat_column(profiles, column, s) for s in ("mean", "se", "n"))
    fig, ax = _figure(ax)
    for group, rows in profiles.sort_values(["group", "layer"]).groupby("group", sort=True):
        keep = _float(rows[cn]) >= min_particles
        text = f"{label}{group}"
        if "lo" in rows.columns and "hi" in rows.columns:
            text += f" [{rows['lo'].iloc[0]:.4g}, {rows['hi'].iloc[0]:.4g}]"
        ax.errorbar(_float(rows["layer"])[keep], _float(rows[cm])[keep], yerr=n_se * _float(rows[cs])[keep],
                    marker="o", ms=3, capsize=2, label=text)
    ax.set_xlabel("radial layer (1 = particle surface)")
    ax.set_ylabel(_label(column))
    ax.set_title(title or f"radial profiles by group, error bars ±{n_se:g} SE")
    ax.legend(fontsize="small")
    return fig


# --------------------------------------------------------------------------------------------
# operando: state means and deltas (fig. 7), by position quantile (fig. 8)
# --------------------------------------------------------------------------------------------

_SUMMARY_FIX = "the frame of Tracking.summary() (indexed by state)"


def _state_errorbar(summary, value: str, error: str, n_se: float, ax, ylabel: str, title: str,
                    reference=None, note=None):
    _need_columns(summary, [value, error], "summary", _SUMMARY_FIX)
    _need_rows(summary, "summary", _SUMMARY_FIX)
    fig, ax = _figure(ax)
    states = [str(s) for s in summary.index]
    x = np.arange(len(states), dtype=float)
    y = _float(summary[value])
    ax.errorbar(x, y, yerr=n_se * _float(summary[error]), marker="o", ms=5, capsize=4, lw=1.2)
    ax.set_xticks(x, states, rotation=30 if max(len(s) for s in states) > 8 else 0)
    ax.set_xlabel(summary.index.name or "state")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if reference is not None and str(reference) in states:
        i = states.index(str(reference))
        ax.annotate(note or "reference", (x[i], y[i] if np.isfinite(y[i]) else 0.0), textcoords="offset points",
                    xytext=(6, -14), fontsize="small", color="0.3")
    if not np.isfinite(y).any():
        _no_data(ax, "no kept particle")
    ax.margins(x=0.1)
    return fig, ax


def plot_state_means(summary, n_se: float = 3.0, ax=None, title: str | None = None):
    """Population mean of the particles' ROI grey level per state, +-`n_se` SE_tot (fig. 7a).

    Parameters
    ----------
    summary : pandas.DataFrame
        Indexed by state (in order), with ``mean`` and ``se_tot`` (grey levels), as
        ``Tracking.summary()``.
    n_se : float
        Error bars are +- n_se total standard errors (eq. 5).
    ax : matplotlib Axes, optional
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        One error-bar point per state, in the index order.
    """
    fig, _ = _state_errorbar(summary, "mean", "se_tot", n_se, ax, _label("roi_mean"),
                             title or f"population mean per state, error bars ±{n_se:g} SE_tot")
    return fig


def plot_state_deltas(summary, n_se: float = 3.0, reference=None, ax=None, title: str | None = None,
                      mean_error: str | None = "delta_ses", z_tests=None):
    """Population mean of the particles' change against the reference, +-`n_se` SE_tot (fig. 7b),
    with the error of the mean beside it.

    The paper's bars, +-3 SE_tot (eq. 5), contain eq. 3's SEM: the root mean square of the
    particles' measurement errors, the error of *one* particle's change, which does not shrink
    with the number of particles. They can cross zero while the z-test of the same states
    rejects "no change" at 5 sigma, because the test divides the spread by sqrt(n). The second,
    narrower bar (`mean_error`, default the sampling error ``delta_ses = sd / sqrt(n)`` of the
    per-particle changes, which already contains the image noise) is the error of the
    population mean change; the z of each state against the reference is written beside it
    when `z_tests` is given.

    Parameters
    ----------
    summary : pandas.DataFrame
        Indexed by state, with ``delta_mean`` and ``delta_se_tot`` (grey levels), and
        `mean_error` when it is not None, as ``Tracking.summary()``.
    n_se : float
        Both bars are +- n_se times their standard error.
    reference : str, optional
        The reference state, marked as 0 by definition.
    ax : matplotlib Axes, optional
    title : str, optional
    mean_error : str or None
        Column of the error of the mean change drawn beside the SE_tot bar (``"delta_ses"``);
        None draws the SE_tot bars alone, as the paper.
    z_tests : pandas.DataFrame, optional
        ``Tracking.z_tests()``: the rows with ``against == "reference"`` (or all rows whose
        ``state_a`` is `reference`) label each state with its z and whether it rejects.

    Returns
    -------
    matplotlib.figure.Figure
        One error-bar point per state (SE_tot, the first line), the error of the mean offset to
        its right (the second line, when drawn), and a line at 0.
    """
    against = f" vs {reference}" if reference is not None else ""
    default = f"population mean change per state, error bars ±{n_se:g} SE_tot"
    if mean_error is not None:
        default += f" (blue) and ±{n_se:g} {mean_error} (red)"
    fig, ax = _state_errorbar(summary, "delta_mean", "delta_se_tot", n_se, ax,
                              f"mean ROI grey-level change{against} (grey levels)", title or default,
                              reference=reference, note="* 0 by definition")
    ax.axhline(0.0, color="0.6", lw=0.8, zorder=0)
    states = [str(x) for x in summary.index]
    x = np.arange(len(states), dtype=float)
    y = _float(summary["delta_mean"])
    if mean_error is not None:
        _need_columns(summary, [mean_error], "summary", _SUMMARY_FIX)
        ax.errorbar(x + 0.12, y, yerr=n_se * _float(summary[mean_error]), fmt="none", capsize=3, lw=2.2,
                    color="#c0392b", label=f"±{n_se:g} {mean_error}: error of the mean change")
        ax.lines[0].set_label(f"±{n_se:g} SE_tot (eq. 5): error of one particle's change")
        ax.legend(fontsize="x-small", loc="best")
    if z_tests is not None and len(z_tests):
        zt = z_tests
        if "against" in zt.columns:
            zt = zt[zt["against"] == "reference"]
        elif reference is not None:
            zt = zt[zt["state_a"].astype(str) == str(reference)]
        for _, r in zt.iterrows():
            b = str(r["state_b"])
            if b not in states or not np.isfinite(float(r["z"])):
                continue
            k = states.index(b)
            mark = "*" if bool(r["reject"]) else ""
            ax.annotate(f"z = {float(r['z']):.1f}{mark}", (x[k] + 0.14, y[k] if np.isfinite(y[k]) else 0.0),
                        textcoords="offset points", xytext=(4, 4), fontsize="x-small", color="#c0392b")
        level = f" at {float(zt['sigma'].iloc[0]):g} sigma" if "sigma" in zt.columns and len(zt) else ""
        ax.text(0.99, 0.99, f"z: eq. 6 against the reference, * = significant{level}", transform=ax.transAxes,
                ha="right", va="top", fontsize="x-small", color="#c0392b")
    return fig


def plot_quantile_deltas(by_quantile, n_se: float = 1.0, error: str = "delta_se_tot", column: str = "centroid-2",
                         ax=None, title: str | None = None, spacing=None, unit=None):
    """Mean change per position-quantile group, one line per state, +-`n_se` SE (fig. 8).

    Parameters
    ----------
    by_quantile : pandas.DataFrame
        One row per (group, state): ``group`` (1 = lowest values), ``state``, ``delta_mean``,
        the error column `error`, optional ``lo``/``hi`` (shown under the group's tick), as
        ``Tracking.by_quantile()``.
    n_se : float
        Error bars are +- n_se times `error` (the paper's fig. 8: 1).
    error : str
        ``"delta_se_tot"`` (eq. 5, default), ``"delta_ses"`` or ``"delta_sem"``.
    column : str
        The column the groups were made of, for the axis label (voxel indices for centroids).
    ax : matplotlib Axes, optional
    title : str, optional
    spacing : sequence of float, optional
        Voxel size (z, y, x); with a known `unit`, a centroid column's group ranges are shown as
        positions in that unit ("x position (µm)").
    unit : str, optional
        The voxel size's unit (``Tracking.params["spacing_unit"]``).

    Returns
    -------
    matplotlib.figure.Figure
        One error-bar line per state (x = group, slightly offset per state so bars do not
        overlap; the offsets are within +-0.15 of the group number).
    """
    _need_columns(by_quantile, ["group", "state", "delta_mean", error], "by_quantile",
                  "the frame of Tracking.by_quantile()")
    _need_rows(by_quantile, "by_quantile", "the frame of Tracking.by_quantile() with at least one group")
    fig, ax = _figure(ax)
    frame = by_quantile.sort_values("group")
    states = list(dict.fromkeys(frame["state"]))
    if hasattr(frame["state"], "cat"):  # categorical: keep the state order
        states = [s for s in frame["state"].cat.categories if s in set(states)]
    groups = np.unique(_float(frame["group"]))
    width = 0.3 / max(1, len(states))
    for k, state in enumerate(states):
        rows = frame[frame["state"] == state]
        dx = (k - (len(states) - 1) / 2) * width
        ax.errorbar(_float(rows["group"]) + dx, _float(rows["delta_mean"]), yerr=n_se * _float(rows[error]),
                    marker="o", ms=4, capsize=3, label=str(state))
    name, factor = describe_column(column, spacing=spacing, unit=unit)
    ticks = [f"Q{g:g}" for g in groups]
    if "lo" in frame.columns and "hi" in frame.columns:
        first = frame.drop_duplicates("group").set_index("group")
        ticks = [f"Q{g:g}\n{first.loc[g, 'lo'] * factor:.4g}-{first.loc[g, 'hi'] * factor:.4g}" for g in groups]
    ax.set_xticks(groups, ticks, fontsize="small")
    ax.axhline(0.0, color="0.6", lw=0.8, zorder=0)
    ax.set_xlabel(f"quartile of {name}, Q1 = lowest" if len(groups) == 4 else f"quantile group of {name}, 1 = lowest")
    ax.set_ylabel("mean ROI grey-level change (grey levels)")
    short = name.split(" (")[0]
    ax.set_title(title or f"mean change by {short}, error bars ±{n_se:g} {error}")
    ax.legend(title="state", fontsize="small")
    return fig


# --------------------------------------------------------------------------------------------
# condition pies (fig. 9)
# --------------------------------------------------------------------------------------------


def plot_fractions(fractions, title: str | None = None, ncols: int | None = None):
    """One pie per condition: the share of particles darker in one state than another (fig. 9).

    Parameters
    ----------
    fractions : sequence of Fraction-like
        Objects with ``state_a``, ``state_b``, ``n``, ``n_darker``, ``fraction`` (of the `n`
        particles, those whose mean grey level is lower in ``state_b`` than in ``state_a``)
        and ``se`` (its standard error ``sqrt(f (1 - f) / n)``), as ``Tracking.fraction()``.
    title : str, optional
    ncols : int, optional
        Pies per row (default: all in one row, at most 4).

    Returns
    -------
    matplotlib.figure.Figure
        One axes per fraction; its first wedge spans ``360 * fraction`` degrees.
    """
    fractions = list(fractions)
    if not fractions:
        raise GrapesInputError("fractions is empty: give one or more Tracking.fraction(state_a, state_b) results")
    for f in fractions:
        for field in ("state_a", "state_b", "n", "fraction", "se"):
            if not hasattr(f, field):
                raise GrapesInputError(f"fractions: {f!r} has no {field!r}; give Tracking.fraction() results")
    fig, axes = _panels(len(fractions), ncols or min(4, len(fractions)), size=(3.4, 3.4))
    for ax, f in zip(axes, fractions):
        frac = float(f.fraction)
        ax.set_title(f"darker at {f.state_b} than at {f.state_a}?\n(n = {int(f.n)} particles)", fontsize="medium")
        if not (int(f.n) > 0 and np.isfinite(frac)):
            ax.set_axis_off()
            _no_data(ax, "no particle")
            continue
        se = float(f.se)
        ax.pie([frac, 1.0 - frac], colors=["#c0392b", "#bdc3c7"], startangle=90, counterclock=False,
               labels=[f"darker at {f.state_b}\n{100 * frac:.1f} ±{100 * se:.1f} %",
                       f"not darker\n{100 * (1 - frac):.1f} %"],
               wedgeprops={"edgecolor": "white"}, textprops={"fontsize": "small"})
        ax.set_aspect("equal")
    fig.suptitle(title or "share of particles darker at the first-named state (± 1 SE = sqrt(f(1-f)/n))",
                 fontsize="medium")
    return fig


# --------------------------------------------------------------------------------------------
# change maps (fig. 10)
# --------------------------------------------------------------------------------------------


def plot_change_maps(maps, axis: int = 0, index: int | None = None, vmax: float | None = None,
                     title: str | None = None, ncols: int | None = None):
    """Slices of intra-particle grey-level change maps on a diverging colormap centred on 0 (fig. 10).

    Parameters
    ----------
    maps : ChangeMap-like or sequence of them
        Objects with ``delta`` (2D or 3D float array, grey levels, NaN outside the particle's
        analysed region), ``label``, ``state`` and ``reference``, as ``Tracking.change_map()``;
        e.g. one particle at several states.
    axis : int
        Slicing axis of 3D maps (0 = z, 1 = y, 2 = x).
    index : int, optional
        Plane index in each map's box (default: its central plane, through the particle's
        centre, the box being the particle's bounding box plus a margin).
    vmax : float, optional
        Colour limits are ``-vmax .. +vmax`` for every panel (default: the largest absolute
        finite change shown).
    title : str, optional
    ncols : int, optional
        Panels per row (default: all in one row, at most 4).

    Returns
    -------
    matplotlib.figure.Figure
        One image per map (NaN drawn as a light-grey background; darkening red, brightening
        blue) and one shared colorbar in grey levels.
    """
    if hasattr(maps, "delta"):
        maps = [maps]
    maps = list(maps)
    if not maps:
        raise GrapesInputError("maps is empty: give one or more Tracking.change_map(label, state) results")
    planes = []
    for m in maps:
        if not hasattr(m, "delta"):
            raise GrapesInputError(f"maps: {type(m).__name__} has no 'delta'; give Tracking.change_map() results")
        plane, ax_used, idx = _take_slice(np.asarray(m.delta, dtype=float), axis, index, "the change map")
        planes.append((plane, ax_used, idx))
    finite = np.concatenate([np.abs(p[np.isfinite(p)]).ravel() for p, _, _ in planes])
    if vmax is None:
        vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    import matplotlib

    cmap = matplotlib.colormaps[_DIVERGING].with_extremes(bad=_BACKGROUND)
    fig, axes = _panels(len(maps), ncols or min(4, len(maps)), size=(3.2, 3.2))
    labels = {getattr(m, "label", None) for m in maps}
    im = None
    for ax, m, (plane, ax_used, idx) in zip(axes, maps, planes):
        im = ax.imshow(plane, cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest", origin="upper")
        rows, cols = _plane_axes(np.ndim(m.delta), ax_used)
        ax.set_xlabel(f"{cols} (voxels)")
        ax.set_ylabel(f"{rows} (voxels)")
        head = f"{getattr(m, 'state', '?')} - {getattr(m, 'reference', 'reference')}"
        if len(labels) > 1:
            head = f"particle {getattr(m, 'label', '?')}: {head}"
        if idx is not None:
            head += f"\n{_AXES3[ax_used]} = {idx} of {np.shape(m.delta)[ax_used]}"
        ax.set_title(head, fontsize="medium")
        if not np.isfinite(plane).any():
            _no_data(ax, "nothing in this plane")
    fig.colorbar(im, ax=axes, label="grey-level change (grey levels)", shrink=0.85)
    one = f"particle {next(iter(labels))}: " if len(labels) == 1 else ""
    fig.suptitle(title or f"{one}grey-level change (red darker, blue brighter; grey: outside the analysed region)",
                 fontsize="medium")
    return fig


# --------------------------------------------------------------------------------------------
# modelled normal distributions (fig. 12)
# --------------------------------------------------------------------------------------------


def plot_normal_models(summary, reference=None, states=None, spread: str = "ses", n_sigma: int = 5,
                       sigma_state=None, ax=None, title: str | None = None):
    """Modelled normal distributions of the population means, with sigma lines (fig. 12).

    Each state is drawn as the normal density ``N(mean, s)`` with ``s`` the column `spread`
    of the summary: by default the sampling standard error ``ses = sd / sqrt(n)`` (eq. 4), the
    uncertainty of the population mean the z-test (eq. 6) uses, so that the distance between
    two curves reads directly in sigmas; ``spread="sd"`` draws the distribution of the
    particles' values instead. Vertical lines mark the reference mean and ``+-k sigma`` from it,
    k = 1..`n_sigma`, with ``sigma = sqrt(sd_s**2 / n_s + sd_ref**2 / n_ref)`` (the denominator
    of eq. 6) for the state `sigma_state`; each state is annotated with its z (eq. 6, against
    the reference).

    Parameters
    ----------
    summary : pandas.DataFrame
        Indexed by state, with ``mean``, ``sd``, ``n`` and the `spread` column (grey levels),
        as ``Tracking.summary()``.
    reference : str, optional
        Reference state (default: the first row).
    states : sequence of str, optional
        States to draw (default: all; the reference is always drawn).
    spread : {"ses", "se_tot", "sd", "sem"}
        Width of each modelled distribution.
    n_sigma : int
        Number of sigma lines on each side of the reference mean.
    sigma_state : str, optional
        State whose eq. 6 denominator defines sigma (default: the first drawn state after the
        reference).
    ax : matplotlib Axes, optional
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        One density line per state, ``2 n_sigma + 1`` vertical lines.
    """
    from .stats import z_test

    _need_columns(summary, ["mean", "sd", "n", spread], "summary", _SUMMARY_FIX)
    _need_rows(summary, "summary", _SUMMARY_FIX)
    index = [str(s) for s in summary.index]
    frame = summary.copy()
    frame.index = index
    reference = index[0] if reference is None else str(reference)
    if reference not in index:
        raise GrapesInputError(f"{{reference}}={reference!r} is not a state of the summary ({index})", reference=None)
    drawn = index if states is None else [str(s) for s in states]
    unknown = [s for s in drawn if s not in index]
    if unknown:
        raise GrapesInputError(f"{{states}}: {unknown} not in the summary ({index})", states=None)
    drawn = [reference] + [s for s in drawn if s != reference]
    others = drawn[1:]
    ref = frame.loc[reference]
    sigma_state = (others[0] if others else None) if sigma_state is None else str(sigma_state)
    if sigma_state is not None and sigma_state not in index:
        raise GrapesInputError(f"{{sigma_state}}={sigma_state!r} is not a state of the summary", sigma_state=None)

    def _ok(row):
        return all(np.isfinite(float(row[c])) for c in ("mean", "sd", "n", spread)) and float(row["n"]) >= 1

    fig, ax = _figure(ax, figsize=(7.0, 4.2))
    usable = [s for s in drawn if _ok(frame.loc[s])]
    if reference not in usable:
        _no_data(ax, f"no usable statistics for the reference {reference!r}")
        ax.set_xlabel(_label("roi_mean"))
        ax.set_title(title or "modelled normal distributions")
        return fig
    sigma = None
    if sigma_state is not None and sigma_state in usable:
        s = frame.loc[sigma_state]
        sigma = math.sqrt(float(s["sd"]) ** 2 / float(s["n"]) + float(ref["sd"]) ** 2 / float(ref["n"]))
    if not sigma:  # one state, or a degenerate pair: the reference's own width
        sigma = float(ref[spread]) or 1.0
    lo = min(float(frame.loc[s, "mean"]) - 4 * float(frame.loc[s, spread]) for s in usable)
    hi = max(float(frame.loc[s, "mean"]) + 4 * float(frame.loc[s, spread]) for s in usable)
    m0 = float(ref["mean"])
    lo, hi = min(lo, m0 - (n_sigma + 0.5) * sigma), max(hi, m0 + (n_sigma + 0.5) * sigma)
    peak = 0.0
    for s in usable:
        row = frame.loc[s]
        mu, w = float(row["mean"]), float(row[spread])
        if w > 0:  # the whole axis, and finely around the curve's own mean (narrow curves keep their peak)
            x = np.union1d(np.linspace(lo, hi, 600), mu + w * np.linspace(-5, 5, 201))
            y = np.exp(-0.5 * ((x - mu) / w) ** 2) / (w * math.sqrt(2 * math.pi))
        else:  # no spread: a spike at the mean
            x = np.linspace(lo, hi, 600)
            y = np.where(np.abs(x - mu) == np.abs(x - mu).min(), 1.0, 0.0)
        text = f"{s}: N({mu:.2f}, {w:.3g})"
        if s != reference:
            z = z_test(mu, float(row["sd"]), int(row["n"]), m0, float(ref["sd"]), int(ref["n"]),
                       alternative="two-sided").z
            text += f", z = {z:.2f}"
        (line,) = ax.plot(x, y, lw=1.5, label=text)
        peak = max(peak, float(np.nanmax(y)))
        if s != reference and len(usable) == 2:  # more curves: z is in the legend only (labels would overlap)
            ax.annotate(f"z = {z:.2f}", (mu, float(np.nanmax(y))), textcoords="offset points", xytext=(0, 4),
                        ha="center", fontsize="small", color=line.get_color())
    for k in range(-int(n_sigma), int(n_sigma) + 1):
        ax.axvline(m0 + k * sigma, color="0.2" if k == 0 else "0.55", lw=1.0 if k == 0 else 0.7,
                   ls="-" if k == 0 else "--", zorder=0)
        if k:
            ax.text(m0 + k * sigma, 0.99, f"{k:+d}σ", transform=ax.get_xaxis_transform(), ha="center", va="top",
                    fontsize="x-small", color="0.4")
    ax.set_ylim(0, peak * 1.25 if peak > 0 else 1)
    ax.set_xlabel(_label("roi_mean"))
    ax.set_ylabel("probability density (1 / grey level)")
    sig_txt = f"sigma = {sigma:.3g} (eq. 6, {sigma_state} vs {reference})" if sigma_state in usable else \
        f"sigma = {spread} of {reference}"
    ax.set_title(title or f"modelled normal distributions N(mean, {spread});\nlines: {reference} mean ±kσ, "
                          f"{sig_txt}", fontsize="medium")
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(2, len(usable)),
              frameon=False)
    return fig


# --------------------------------------------------------------------------------------------
# slices, particles, distributions
# --------------------------------------------------------------------------------------------


def _paint(plane: np.ndarray, table, column: str) -> np.ndarray:
    ids = np.asarray(table["label"]).astype(np.uint64)
    values = _float(table[column])
    order = np.argsort(ids, kind="stable")
    ids, values = ids[order], values[order]
    flat = np.asarray(plane).astype(np.uint64, copy=False).ravel()
    out = np.full(flat.shape, np.nan)
    if ids.size:
        pos = np.clip(np.searchsorted(ids, flat), 0, ids.size - 1)
        hit = (ids[pos] == flat) & (flat != 0)
        out[hit] = values[pos[hit]]
    return out.reshape(np.shape(plane))


def plot_property_slice(labels, table, column: str, axis: int = 0, index: int | None = None, cmap: str = "viridis",
                        ax=None, title: str | None = None):
    """A per-particle value painted on a slice of the label image (background NaN).

    Parameters
    ----------
    labels : array-like
        2D label slice ``(Y, X)``, or a 3D label volume ``(Z, Y, X)`` (numpy, dask or zarr:
        only the plane `index` along `axis` is read). 0 is background.
    table : pandas.DataFrame
        Particle table with ``label`` (unique ids) and the scalar `column`.
    column : str
        Column to paint (e.g. ``"roi_mean"``, ``"sphericity"``).
    axis, index : int
        Plane of a 3D volume (default: the central plane along axis 0).
    cmap : str
        Matplotlib colormap; background and labels not in the table are drawn light grey.
    ax : matplotlib Axes, optional
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        The painted plane (float, NaN on background) and a colorbar labelled with `column`.
    """
    _need_columns(table, ["label", column], "table", f"a particle table with 'label' and {column!r}")
    if table[column].dtype == object:
        raise GrapesInputError(f"{{column}}={column!r} is a list column: choose a scalar column", column=None)
    plane, ax_used, idx = _take_slice(labels, axis, index, "labels")
    painted = _paint(plane, table, column)
    import matplotlib

    fig, ax = _figure(ax, figsize=(5.6, 4.6))
    im = ax.imshow(painted, cmap=matplotlib.colormaps[cmap].with_extremes(bad=_BACKGROUND), interpolation="nearest")
    unit = _LABELS.get(column, "").rpartition("(")[2].rstrip(")")
    fig.colorbar(im, ax=ax, label=f"{column} ({unit})" if unit else column)
    rows, cols = _plane_axes(np.ndim(labels), ax_used)
    ax.set_xlabel(f"{cols} (voxels)")
    ax.set_ylabel(f"{rows} (voxels)")
    where = f" ({_AXES3[ax_used]} = {idx})" if idx is not None else ""
    ax.set_title(title or f"{column} per particle{where}")
    if not np.isfinite(painted).any():
        _no_data(ax, "no particle of the table in this plane")
    return fig


def plot_particle(particle, axis: int = 0, index: int | None = None, column: str = "radial_layers_graylevel",
                  title: str | None = None):
    """One particle: a slice of its grey crop, of its radial layer map, and its profile.

    Parameters
    ----------
    particle : Particle-like
        As :func:`grapes_dask.particle` returns: ``label``, ``mask``, ``grey`` (or None),
        ``layers`` (0 outside), ``row`` (the particle's table row), ``start_at``.
    axis, index : int
        Plane of a 3D crop (default: the central plane along axis 0).
    column : str
        Profile column of ``row`` (one value per layer, layer 1 first). When the row has no
        such column, the mean grey level per layer of the crop is drawn instead.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        Three panels: grey level (particle outline in white), radial layer, profile.
    """
    for field in ("mask", "layers", "label"):
        if not hasattr(particle, field):
            raise GrapesInputError(f"particle has no {field!r}: give the result of grapes_dask.particle()")
    mask, ax_used, idx = _take_slice(np.asarray(particle.mask), axis, index, "the particle crop")
    layers, _, _ = _take_slice(np.asarray(particle.layers), axis, index, "the particle crop")
    grey_vol = getattr(particle, "grey", None)
    fig, (a0, a1, a2) = _panels(3, 3, size=(3.4, 3.2))
    rows, cols = _plane_axes(np.ndim(particle.mask), ax_used)
    if grey_vol is not None:
        grey, _, _ = _take_slice(np.asarray(grey_vol), axis, index, "the particle crop")
        im = a0.imshow(grey, cmap="gray", interpolation="nearest")
        fig.colorbar(im, ax=a0, label="grey level", shrink=0.8)
        if mask.any() and not mask.all():
            a0.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=0.8)
        a0.set_title("grey level, particle outlined", fontsize="medium")
    else:
        a0.imshow(mask, cmap="gray", interpolation="nearest")
        a0.set_title("mask (no grey volume given)", fontsize="medium")
    import matplotlib

    lay = np.where(layers > 0, layers.astype(float), np.nan)
    kmax = int(np.nanmax(lay)) if np.isfinite(lay).any() else 1
    im = a1.imshow(lay, cmap=matplotlib.colormaps["viridis"].resampled(max(kmax, 1)).with_extremes(bad=_BACKGROUND),
                   vmin=0.5, vmax=kmax + 0.5, interpolation="nearest")
    fig.colorbar(im, ax=a1, label="radial layer", shrink=0.8)
    a1.set_title("radial layers", fontsize="medium")
    for a in (a0, a1):
        a.set_xlabel(f"{cols} (voxels)")
        a.set_ylabel(f"{rows} (voxels)")
    row = getattr(particle, "row", None)
    profile, source = None, column
    if row is not None and column in getattr(row, "index", ()):
        value = row[column]
        if value is not None and np.ndim(value) == 1:
            profile = _float(value)
    if profile is None and grey_vol is not None:
        full_layers, grey_full = np.asarray(particle.layers), np.asarray(grey_vol, dtype=float)
        k = int(full_layers.max()) if full_layers.size else 0
        profile = np.array([grey_full[full_layers == j].mean() if (full_layers == j).any() else np.nan
                            for j in range(1, k + 1)])
        source = "mean grey level per layer of the crop"
    start = getattr(particle, "start_at", "edge")
    if profile is not None and profile.size:
        a2.plot(np.arange(1, profile.size + 1), profile, marker="o", ms=3)
        a2.set_ylabel(_label(column) if source == column else "mean grey level (grey levels)")
    else:
        _no_data(a2, "no profile")
    a2.set_xlabel(f"radial layer (1 = particle {'surface' if start == 'edge' else 'centre'})")
    a2.set_title("radial profile" + ("" if source == column else " (from the crop)"), fontsize="medium")
    where = f", {_AXES3[ax_used]} = {idx} of the crop" if idx is not None else ""
    fig.suptitle(title or f"particle {particle.label}{where}", fontsize="medium")
    return fig


def plot_distributions(tables, columns=("equivalent_diameter_volume", "roi_mean"), bins: int = 30,
                       density: bool = False, title: str | None = None):
    """Histograms of particle properties, one panel per column, one step line per table.

    Parameters
    ----------
    tables : dict of str -> pandas.DataFrame, or a DataFrame
        Tables to compare (e.g. one per state); a single DataFrame is named "particles".
    columns : sequence of str
        Scalar columns, e.g. sizes (``equivalent_diameter_volume``, ``volume``) and grey levels
        (``roi_mean``, ``intensity_mean``). Columns that no table has are skipped.
    bins : int
        Bins per panel, shared by the tables (over the range of all their finite values).
    density : bool
        Normalise each histogram to unit area (tables of different sizes) instead of counts.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        One axes per drawn column; each table's histogram is a ``StepPatch``.
    """
    if hasattr(tables, "columns"):
        tables = {"particles": tables}
    if not tables:
        raise GrapesInputError("tables is empty: give a dict of name -> particle table")
    if isinstance(columns, str):
        columns = [columns]
    drawn = [c for c in columns if any(c in t.columns for t in tables.values())]
    if not drawn:
        raise GrapesInputError(f"{{columns}}={list(columns)}: no table has any of them; choose scalar columns "
                               f"of the tables", columns=None)
    fig, axes = _panels(len(drawn), min(3, len(drawn)), size=(4.0, 3.2))
    for ax, column in zip(axes, drawn):
        values = {name: _float(t[column])[np.isfinite(_float(t[column]))] for name, t in tables.items()
                  if column in t.columns}
        every = np.concatenate(list(values.values()))
        if every.size == 0:
            _no_data(ax)
        else:
            edges = np.histogram_bin_edges(every, bins=bins)
            for name, v in values.items():
                counts, _ = np.histogram(v, bins=edges, density=density and v.size > 0)
                ax.stairs(counts, edges, label=f"{name} (n = {v.size})", lw=1.4)
            ax.legend(fontsize="x-small")
        ax.set_xlabel(_label_with_unit(column, tables.values()))
        ax.set_ylabel("density (1 / unit of x)" if density else "particles per bin")
    fig.suptitle(title or "distributions", fontsize="medium")
    return fig
