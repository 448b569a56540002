"""Figures (matplotlib). Every function returns a ``matplotlib.figure.Figure``."""

from __future__ import annotations

from .stats import radial_profile_stats

__all__ = ["radial_profile_stats", "plot_radial_profiles"]


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
