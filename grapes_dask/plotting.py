"""Figures (matplotlib). Every function returns a ``matplotlib.figure.Figure``."""

from __future__ import annotations

import numpy as np

__all__ = ["radial_profile_stats", "plot_radial_profiles"]


def radial_profile_stats(table, column: str = "radial_layers_graylevelnormed", max_layer: int | None = None):
    """Population mean and standard error of a radial profile column, per layer.

    Parameters
    ----------
    table : pandas.DataFrame
        Particle table with the list column `column`.
    column : str
        Profile column (one array per particle, layer 1 first).
    max_layer : int, optional
        Number of layers to report (default: the deepest layer of any particle).

    Returns
    -------
    layers, mean, se, n : ndarray, shape (K,)
        Layer numbers 1..K, mean over particles having a finite value in that layer, its
        standard error (sample std / sqrt(n)), and n.
    """
    profiles = [np.asarray(p, float) for p in table[column]]
    k = max_layer or max((len(p) for p in profiles), default=0)
    mat = np.full((len(profiles), k), np.nan)
    for i, p in enumerate(profiles):
        mat[i, : min(k, len(p))] = p[:k]
    n = np.isfinite(mat).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nanmean(np.where(n > 0, mat, 0.0), axis=0) if len(mat) else np.zeros(k)
        mean = np.where(n > 0, mean, np.nan)
        sd = np.array([np.nanstd(mat[:, j], ddof=1) if n[j] > 1 else np.nan for j in range(k)])
        se = sd / np.sqrt(n)
    return np.arange(1, k + 1), mean, se, n


def plot_radial_profiles(tables: dict, column: str = "radial_layers_graylevelnormed", n_se: float = 2.0,
                         min_particles: int = 10, ax=None, title: str | None = None):
    """Mean radial profile of each table with +-`n_se` standard-error bars (paper fig. 6).

    Parameters
    ----------
    tables : dict of str -> pandas.DataFrame
        Label of each curve (e.g. the state of charge) and its particle table.
    column : str
        Profile column.
    n_se : float
        Error bars are +- n_se standard errors.
    min_particles : int
        Layers with fewer particles are not drawn.
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 4), layout="constrained")
    for name, tab in tables.items():
        layers, mean, se, n = radial_profile_stats(tab, column)
        keep = n >= min_particles
        ax.errorbar(layers[keep], mean[keep], yerr=n_se * se[keep], marker="o", ms=3, capsize=2,
                    label=f"{name} ({len(tab)} particles)")
    ax.set_xlabel("radial layer (1 = particle surface)")
    ax.set_ylabel({"radial_layers_graylevelnormed": "normalised mean grey level",
                   "radial_layers_graylevel": "mean grey level"}.get(column, column))
    ax.set_title(title or f"radial profiles, error bars +-{n_se:g} SE")
    ax.legend()
    return fig
