"""Figures of the analyses after the paper (:mod:`grapes_dask.change`), and their report sections.

As in :mod:`grapes_dask.plotting`, every function returns a :class:`matplotlib.figure.Figure`
built with the object-oriented API (no pyplot); single-panel functions take ``ax=None`` (a new
figure) or an Axes to draw on; titles say what the error bars are. Inputs are the result objects
of :mod:`grapes_dask.change`, used by their fields only:

- :func:`plot_classification`: shares of darker / brighter particles per state, with their
  Wilson 95% intervals, beside the paper's plain share of decreases (a :class:`Classification`);
- :func:`plot_layer_changes`: per-layer mean change per state, +-n SE (a :class:`LayerChanges`);
- :func:`plot_trajectories`: a sample of particles' changes through the states over the
  population band; :func:`plot_change_distributions`: the distribution of the changes per
  state (a :class:`Trajectories`);
- :func:`plot_trend`: change against a covariate, the fitted line and its confidence band
  (a :class:`Trend`).

:func:`change_sections` computes all of them for a tracking and returns the sections of the
operando report (:func:`grapes_dask.report.tracking_report`).
"""

from __future__ import annotations

import numpy as np

from ._errors import GrapesInputError
from .units import describe_column

__all__ = [
    "plot_classification",
    "plot_layer_changes",
    "plot_trajectories",
    "plot_change_distributions",
    "plot_trend",
    "change_sections",
]

_DARKER = "#c0392b"  # red: darker, as fig. 9 and the change maps
_BRIGHTER = "#2471a3"
_PLAIN = "0.55"


def _figure(ax=None, figsize=(6.0, 4.0)):
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _need(obj, fields, name: str, fix: str) -> None:
    missing = [f for f in fields if not hasattr(obj, f)]
    if missing:
        raise GrapesInputError(f"{name} has no {missing}: give {fix}")


def _ticks(ax, x, states) -> None:
    ax.set_xticks(x, states, rotation=30 if max((len(s) for s in states), default=0) > 8 else 0)


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------


def plot_classification(classification, ax=None, title: str | None = None):
    """Share of particles darker and brighter beyond k SE per state, beside the plain share of decreases.

    Parameters
    ----------
    classification : Classification
        The result of :func:`grapes_dask.change.classify` (``fractions``, ``k``,
        ``null_rate``, ``reference``).
    ax : matplotlib Axes, optional
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        Per state three bars (percent of the particles): darker (``z < -k``), brighter
        (``z > k``) with their Wilson 95% intervals, and the paper's plain share of decreases
        (fig. 9) with +-1 binomial SE; a dotted line at the share of an unchanged population
        expected per side (``norm.sf(k)``), a dashed one at 50% (the plain share of an unchanged
        population).
    """
    _need(classification, ("fractions", "k", "null_rate", "reference"), "classification",
          "the result of grapes_dask.change.classify()")
    f = classification.fractions
    cols = ["darker", "darker_lo", "darker_hi", "brighter", "brighter_lo", "brighter_hi", "plain_darker",
            "plain_darker_se", "n"]
    missing = [c for c in cols if c not in f.columns]
    if missing:
        raise GrapesInputError(f"classification.fractions has no {missing}: give the result of "
                               "grapes_dask.change.classify()")
    fig, ax = _figure(ax)
    states = [str(s) for s in f.index]
    x = np.arange(len(states), dtype=float)
    w = 0.26
    k = float(classification.k)
    for dx, key, color, label in ((-w, "darker", _DARKER, f"darker (z < -{k:g})"),
                                  (0.0, "brighter", _BRIGHTER, f"brighter (z > {k:g})")):
        v = 100 * f[key].to_numpy(float)
        err = 100 * np.abs(np.vstack([f[key] - f[f"{key}_lo"], f[f"{key}_hi"] - f[key]]).astype(float))
        ax.bar(x + dx, v, w, color=color, label=label, yerr=err, capsize=3)
    v = 100 * f["plain_darker"].to_numpy(float)
    ax.bar(x + w, v, w, color=_PLAIN, hatch="//", edgecolor="white",
           yerr=100 * f["plain_darker_se"].to_numpy(float), capsize=3, label="plain share of decreases (fig. 9)")
    ax.axhline(100 * float(classification.null_rate), color="0.2", ls=":", lw=1,
               label=f"unchanged population, per side ({100 * classification.null_rate:.2g} %)")
    ax.axhline(50.0, color="0.5", ls="--", lw=0.8)
    _ticks(ax, x, states)
    ax.set_xlabel(f"state (against {classification.reference})")
    ax.set_ylabel("share of the kept particles (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize="small", loc="upper left")
    ax.set_title(title or f"particles beyond ±{k:g} SE (Wilson 95%) and all decreases (±1 SE)")
    if not len(states):
        _no_data(ax)
    return fig


# --------------------------------------------------------------------------------------------
# per-layer changes
# --------------------------------------------------------------------------------------------


def plot_layer_changes(layer_changes, n_se: float = 2.0, error: str = "ses", min_particles: int = 10, ax=None,
                       title: str | None = None):
    """Mean change per radial layer (or depth bin), one line per state, +-`n_se` SE.

    Parameters
    ----------
    layer_changes : LayerChanges
        The result of :func:`grapes_dask.change.layer_changes`.
    n_se : float
        Error bars are +- n_se times `error` (2: an approximate 95% interval, as fig. 6).
    error : {"ses", "se_tot", "sem"}
        The standard error drawn: the sampling error of the layer's mean change (default; it
        contains the particles' noise), the paper's total (eq. 5, conservative) or the
        measurement term (eq. 3).
    min_particles : int
        Layers with fewer particles are not drawn.
    ax : matplotlib Axes, optional
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        x: layer number (1 = surface) or depth bin (1 = shell, last = core); y: mean change,
        grey levels, with a line at 0.
    """
    _need(layer_changes, ("table", "align", "reference"), "layer_changes",
          "the result of grapes_dask.change.layer_changes()")
    if error not in ("ses", "se_tot", "sem"):
        raise GrapesInputError(f"error={error!r}: choose 'ses', 'se_tot' or 'sem'")
    t = layer_changes.table
    fig, ax = _figure(ax)
    states = list(t["state"].cat.categories) if hasattr(t["state"], "cat") else list(dict.fromkeys(t["state"]))
    drawn = 0
    for i, s in enumerate(states):
        rows = t[(t["state"] == s) & (t["n"] >= int(min_particles))]
        if not len(rows):
            continue
        dx = (i - (len(states) - 1) / 2) * 0.06
        ax.errorbar(rows["layer"].to_numpy(float) + dx, rows["delta_mean"].to_numpy(float),
                    yerr=n_se * rows[error].to_numpy(float), marker="o", ms=4, capsize=3, label=str(s))
        drawn += 1
    ax.axhline(0.0, color="0.6", lw=0.8, zorder=0)
    if layer_changes.align == "relative":
        nb = int(layer_changes.bins)
        ticks = np.arange(1, nb + 1)
        names = [f"{100 * (b - 1) / nb:.0f}-{100 * b / nb:.0f}%" for b in ticks]
        if nb == 2:
            names = ["shell\n0-50%", "core\n50-100%"]
        ax.set_xticks(ticks, names)
        ax.set_xlabel("depth bin (share of the particle's ROI depth, 0 = outer edge)")
    else:
        ax.set_xlabel("radial layer (1 = surface; one voxel per layer)")
    ax.set_ylabel(f"mean layer change vs {layer_changes.reference} (grey levels)")
    if drawn:
        ax.legend(title="state", fontsize="small")
    else:
        _no_data(ax, f"no layer with {int(min_particles)} particles or more")
    ax.set_title(title or f"mean change per layer, error bars ±{n_se:g} {error}")
    return fig


# --------------------------------------------------------------------------------------------
# trajectories and distributions
# --------------------------------------------------------------------------------------------


def _band_levels(band, pairs):
    out = []
    for lo, hi in pairs:
        a, b = f"q{100 * lo:g}", f"q{100 * hi:g}"
        if a in band.columns and b in band.columns:
            out.append((a, b, lo, hi))
    return out


def plot_trajectories(trajectories, ax=None, title: str | None = None, max_lines: int = 50):
    """A sample of particles' changes through the states over the population band.

    Parameters
    ----------
    trajectories : Trajectories
        The result of :func:`grapes_dask.change.trajectories`.
    ax : matplotlib Axes, optional
    title : str, optional
    max_lines : int
        At most this many sampled particles are drawn.

    Returns
    -------
    matplotlib.figure.Figure
        x: states in order; thin lines: the sampled particles; shaded: the 5-95% and 25-75%
        quantile bands of all kept particles (those of the band present); thick line: the
        population mean. Grey levels.
    """
    _need(trajectories, ("particles", "band", "states", "sample", "reference"), "trajectories",
          "the result of grapes_dask.change.trajectories()")
    fig, ax = _figure(ax)
    states = [str(s) for s in trajectories.states]
    band = trajectories.band.reindex(states)
    x = np.arange(len(states), dtype=float)
    for a, b, lo, hi in _band_levels(band, [(0.05, 0.95), (0.25, 0.75)]):
        ax.fill_between(x, band[a].to_numpy(float), band[b].to_numpy(float), color=_DARKER,
                        alpha=0.12 if hi - lo > 0.6 else 0.22, lw=0, label=f"{100 * lo:g}-{100 * hi:g}% of particles")
    p = trajectories.particles
    sample = np.asarray(trajectories.sample)[: int(max_lines)]
    if len(sample):
        wide = p[p["label"].isin(sample)].pivot(index="label", columns="state", values="delta")
        wide.columns = [str(c) for c in wide.columns]
        wide = wide.reindex(columns=states)
        for i, (_, row) in enumerate(wide.iterrows()):
            ax.plot(x, row.to_numpy(float), color="0.35", lw=0.6, alpha=0.6,
                    label=f"{len(wide)} sampled particles" if i == 0 else None)
    ax.plot(x, band["mean"].to_numpy(float), color=_DARKER, lw=2.2, marker="o", label="population mean")
    ax.axhline(0.0, color="0.6", lw=0.8, zorder=0)
    _ticks(ax, x, states)
    ax.set_xlabel("state")
    ax.set_ylabel(f"change vs {trajectories.reference} (grey levels)")
    ax.legend(fontsize="small")
    ax.set_title(title or "particle trajectories: a sample over the population band")
    return fig


def plot_change_distributions(trajectories, ax=None, title: str | None = None):
    """Distribution of the per-particle changes in every state but the reference (violins).

    Parameters
    ----------
    trajectories : Trajectories
        The result of :func:`grapes_dask.change.trajectories`.
    ax : matplotlib Axes, optional
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        One violin per state (kernel density of the changes, grey levels) with its median and
        its 5% and 95% quantiles marked.
    """
    _need(trajectories, ("particles", "band", "states", "reference"), "trajectories",
          "the result of grapes_dask.change.trajectories()")
    fig, ax = _figure(ax)
    states = [str(s) for s in trajectories.states if str(s) != str(trajectories.reference)]
    p = trajectories.particles
    data = [p.loc[p["state"].astype(str) == s, "delta"].to_numpy(float) for s in states]
    x = np.arange(1, len(states) + 1, dtype=float)
    ok = [i for i, d in enumerate(data) if np.isfinite(d).sum() > 1 and np.ptp(d[np.isfinite(d)]) > 0]
    if ok:
        parts = ax.violinplot([data[i][np.isfinite(data[i])] for i in ok], positions=x[ok], showextrema=False,
                              widths=0.8)
        for body in parts["bodies"]:
            body.set_facecolor(_DARKER)
            body.set_alpha(0.35)
    for i, d in enumerate(data):
        d = d[np.isfinite(d)]
        if len(d):
            q5, q50, q95 = np.quantile(d, [0.05, 0.5, 0.95])
            ax.vlines(x[i], q5, q95, color="0.2", lw=1.2)
            ax.plot([x[i]], [q50], "o", color="white", mec="0.2", ms=5)
    ax.axhline(0.0, color="0.6", lw=0.8, zorder=0)
    _ticks(ax, x, states)
    ax.set_xlabel("state")
    ax.set_ylabel(f"change vs {trajectories.reference} (grey levels)")
    if not states:
        _no_data(ax, "only the reference state")
    ax.set_title(title or "distribution of the per-particle changes (median, 5-95%)")
    return fig


# --------------------------------------------------------------------------------------------
# trend
# --------------------------------------------------------------------------------------------


def plot_trend(trend, state: str | None = None, ax=None, title: str | None = None, max_points: int = 5000,
               seed: int = 0):
    """Per-particle change against a covariate, the least-squares line and its confidence band.

    Parameters
    ----------
    trend : Trend
        The result of :func:`grapes_dask.change.trend`.
    state : str, optional
        The state drawn (default: the last one fitted).
    ax : matplotlib Axes, optional
    title : str, optional
    max_points : int
        At most this many points are drawn (a random subset; the line is fitted on all).
    seed : int
        Seed of that subset.

    Returns
    -------
    matplotlib.figure.Figure
        Points (covariate, change), the fitted line and the band of the fitted mean at the
        fit's confidence level; the slope with its interval in the legend.
    """
    _need(trend, ("fit", "data", "covariate", "reference"), "trend", "the result of grapes_dask.change.trend()")
    f = trend.fit(state)
    state = trend.states[-1] if state is None else str(state)
    d = trend.data[trend.data["state"].astype(str) == state]
    x, y = d["x"].to_numpy(float), d["delta"].to_numpy(float)
    fig, ax = _figure(ax)
    if len(x) > max_points:
        idx = np.random.default_rng(seed).choice(len(x), size=int(max_points), replace=False)
        x_s, y_s = x[idx], y[idx]
    else:
        x_s, y_s = x, y
    ax.scatter(x_s, y_s, s=6, color="0.4", alpha=0.5, lw=0, label=f"particles (n = {f.n})")
    grid = np.linspace(np.nanmin(x), np.nanmax(x), 100)
    lo, hi = f.band(grid)
    ax.fill_between(grid, lo, hi, color=_DARKER, alpha=0.25, lw=0,
                    label=f"{100 * f.confidence:g}% band of the fitted mean")
    ax.plot(grid, f.predict(grid), color=_DARKER, lw=2,
            label=f"slope {f.slope:.3g} [{f.ci_low:.3g}, {f.ci_high:.3g}] per "
                  f"{'voxel' if trend.covariate.startswith('centroid') else 'unit'}")
    ax.axhline(0.0, color="0.6", lw=0.8, zorder=0)
    ax.set_xlabel(f"{describe_column(trend.covariate)[0]}, reference state")
    ax.set_ylabel(f"change, {state} vs {trend.reference} (grey levels)")
    ax.legend(fontsize="small")
    ax.set_title(title or f"change against {trend.covariate} at {state}: least squares, "
                          f"{100 * f.confidence:g}% interval")
    return fig


# --------------------------------------------------------------------------------------------
# report sections
# --------------------------------------------------------------------------------------------


def change_sections(tracking, figs, *, k: float = 3.0, covariate: str | None = None, n_sample: int = 30,
                    seed: int = 0, n_se: float = 2.0, bins: int = 2) -> list:
    """The report sections of the analyses after the paper, for :func:`grapes_dask.report.tracking_report`.

    Parameters
    ----------
    tracking : Tracking
        The result of :func:`grapes_dask.track.track`.
    figs : report collector
        The report's figure collector (``grapes_dask.report._Collector``: ``item(name, what,
        fn, *args, caption=..., **kw)`` and ``notes``); the figures are added to it, as
        ``after_classification``, ``after_layers``, ``after_trajectories``,
        ``after_distributions`` and ``after_trend``.
    k : float
        Threshold of the classification, standard errors.
    covariate : str, optional
        Covariate of the trend (default: ``centroid-2``, x, in 3D; ``centroid-1`` in 2D).
    n_sample : int
        Particles drawn in the trajectories figure.
    seed : int
        Seed of that sample.
    n_se : float
        Error bars of the per-layer changes, +- n_se SES.
    bins : int
        Depth bins of the shell-against-core table (2: shell and core).

    Returns
    -------
    list of grapes_dask.report.Section
        "Noise-aware change per particle", "Change per radial layer", "Trajectories",
        "Change against <covariate>"; an analysis that cannot be computed gives a paragraph
        saying why (and a note in `figs`), never an exception.
    """
    from . import change as C
    from .report import Section

    cols = [str(c) for c in tracking.particles.columns]
    cov = covariate or ("centroid-2" if "centroid-2" in cols else "centroid-1")
    reference = str(tracking.reference)
    sections = []

    def failed(what, err):
        figs.notes.append(f"{what} not computed: {err}")
        return f"not computed: {err}"

    try:
        c = C.classify(tracking, k=k)
    except GrapesInputError as err:
        items = (failed("classification", err),)
    else:
        keep = ["n", "n_darker", "darker", "darker_lo", "darker_hi", "n_brighter", "brighter", "brighter_lo",
                "brighter_hi", "n_plain_darker", "plain_darker", "plain_darker_se"]
        items = (
            f"Each kept particle's change against {reference}, delta, over its measurement error (eq. 2, from its ROI "
            f"voxels and each state's noise): darker where z = delta / SEM < -{k:g}, brighter where z > {k:g}, "
            f"unchanged otherwise. Shares with their Wilson 95% intervals (lo, hi); beside them the paper's plain "
            f"share of decreases (fig. 9: delta < 0, whatever its size), which noise alone fills to about 50%. A "
            f"particle that did not change is called darker with probability {100 * c.null_rate:.2g}%.",
            c.fractions[keep],
            figs.item("after_classification", "Noise-aware classification", plot_classification, c,
                      caption=f"Shares of darker and brighter particles at k = {k:g} (Wilson 95% intervals) and the "
                              "plain share of decreases (±1 SE); dotted: the expected share of an unchanged "
                              "population per side."),
        )
    sections.append(Section("Noise-aware change per particle", items))

    try:
        lc = C.layer_changes(tracking)
        rel = C.layer_changes(tracking, align="relative", bins=bins,
                              exclude_outer_layers=int(tracking.params.get("exclude_outer_layers", 0) or 0))
    except GrapesInputError as err:
        items = (failed("per-layer changes", err),)
    else:
        items = (
            f"Mean change against {reference} of the kept particles' mean grey level in each radial layer (one voxel "
            "thick, 1 = surface), grey levels; n particles reach the layer. Error bars ±"
            f"{n_se:g} SES (the sampling error of the layer's mean change, which contains the particles' noise).",
            lc.table[["state", "layer", "n", "reference_mean", "delta_mean", "ses", "se_tot"]],
            figs.item("after_layers", "Per-layer changes", plot_layer_changes, lc, n_se=n_se,
                      caption=f"Mean change per radial layer, ±{n_se:g} SES; layers with fewer than 10 particles "
                              "are not drawn."),
            f"Shell against core: each particle's ROI layers (deeper than the tracking's exclude_outer_layers) "
            f"pooled into {bins} bins of relative depth, 1 = outermost.",
            rel.table[["state", "layer", "depth_lo", "depth_hi", "n", "delta_mean", "ses", "se_tot"]],
        )
    sections.append(Section("Change per radial layer", items))

    try:
        tj = C.trajectories(tracking, n=n_sample, seed=seed)
    except GrapesInputError as err:
        items = (failed("trajectories", err),)
    else:
        items = (
            f"Per state, the distribution of the kept particles' changes against {reference}: mean, sd, SES and "
            "quantiles (grey levels).",
            tj.band,
            figs.item("after_trajectories", "Trajectories", plot_trajectories, tj,
                      caption=f"{len(tj.sample)} particles drawn at random (seed {seed}) over the 5-95% and 25-75% "
                              "bands of all kept particles; thick line: the mean."),
            figs.item("after_distributions", "Change distributions", plot_change_distributions, tj,
                      caption="Distribution of the per-particle changes per state (median, 5-95%)."),
        )
    sections.append(Section("Trajectories", items))

    try:
        tr_ = C.trend(tracking, cov)
    except GrapesInputError as err:
        items = (failed(f"trend against {cov}", err),)
    else:
        table = tr_.table[["n", "slope", "slope_se", "ci_low", "ci_high", "intercept", "r", "p"]]
        means = tr_.data.groupby("state", observed=True)["delta"].mean()
        focus = str(means.idxmin())  # the state that darkened most
        items = (
            f"Ordinary least-squares slope of the per-particle change against {cov} (reference state), per state, "
            f"with its 95% t interval: grey levels per unit of {cov}. Beside the quantile bars of fig. 8.",
            table,
            figs.item("after_trend", f"Trend against {cov}", plot_trend, tr_, state=focus,
                      caption=f"Change against {cov} in {focus} (the state that darkened most): the fitted line "
                              "and the 95% band of the fitted mean."),
        )
    sections.append(Section(f"Change against {cov}", items))
    return sections
