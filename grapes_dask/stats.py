"""Population statistics of particle tables, with the paper's uncertainties.

The paper (Jones et al., Small Methods 2025, section 3.2) separates two kinds of uncertainty of a population mean
of per-particle values (for example the mean grey level of each particle's region of interest,
``roi_mean``):

1. measurement, per particle: ``SEM_p = sigma_bg / sqrt(n_voxels)`` (eq. 1), with ``sigma_bg``
   the image noise (:func:`estimate_noise`) and ``n_voxels`` the voxels averaged
   (``roi_voxels``); for the change of one particle between two states
   ``SEM_dP = sqrt(SEM_a**2 + SEM_b**2)`` (eq. 2);
2. measurement, population: ``SEM = sqrt(mean(SEM_i**2))`` (eq. 3);
3. sampling: ``SES = s / sqrt(n)`` with ``s`` the sample standard deviation (ddof=1) (eq. 4);
4. total: ``SE_tot = sqrt(SES**2 + SEM**2)`` (eq. 5).

:func:`z_test` is the two-sample z-test of eq. 6, with its critical value given in sigmas.

Per-layer statistics of the radial profiles: :func:`radial_profile_stats` (one population) and
:func:`quantile_groups` (groups of particles by quantiles of any column, e.g. volume quartiles,
as the paper's fig. 6 and GRAPES' ``radial_layers_quartiles``/``deciles``), both built on
:func:`profile_matrix`. Every grouping by quantiles in the package (:func:`quantile_groups`,
``Tracking.by_quantile``, the ``smallest`` cleaning rule, the reports) uses one rule,
:func:`quantile_labels`: by rank, ties by label, group sizes within one of each other.
:func:`estimate_noise` measures ``sigma_bg`` out of core.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ._errors import GrapesInputError
from .columns import GROUP_PROFILES, POPULATION_FIELDS

__all__ = [
    "PopulationStats",
    "ZTestResult",
    "particle_sem",
    "change_sem",
    "population_stats",
    "change_stats",
    "z_test",
    "profile_matrix",
    "radial_profile_stats",
    "rank_order",
    "quantile_labels",
    "QuantileGroups",
    "quantile_groups",
    "NoiseEstimate",
    "GrapesBackgroundWarning",
    "estimate_noise",
    "find_empty_space",
]


@dataclass(frozen=True)
class PopulationStats:
    """Mean of per-particle values with its uncertainties (paper eq. 3-5).

    Attributes
    ----------
    n : int
        Particles with a finite value (and a finite SEM when SEMs were given).
    mean : float
        Population mean of the values (NaN when ``n == 0``).
    sd : float
        Sample standard deviation of the values, ddof=1 (NaN when ``n < 2``).
    ses : float
        Sampling standard error ``sd / sqrt(n)`` (eq. 4).
    sem : float
        Measurement standard error ``sqrt(mean(SEM_i**2))`` (eq. 3); 0 when no SEMs were given.
    se_tot : float
        Total standard error ``sqrt(ses**2 + sem**2)`` (eq. 5).
    """

    n: int
    mean: float
    sd: float
    ses: float
    sem: float
    se_tot: float

    def as_dict(self, prefix: str = "") -> dict:
        """The fields as a dict, names prefixed (``prefix + "mean"`` ...)."""
        return {prefix + k: getattr(self, k) for k in POPULATION_FIELDS}


@dataclass(frozen=True)
class ZTestResult:
    """Result of :func:`z_test`.

    Attributes
    ----------
    z : float
        The z statistic ``(mean1 - mean2) / sqrt(sd1**2/n1 + sd2**2/n2)`` (eq. 6).
    p : float
        p-value of `z` under the null hypothesis of equal population means, for `alternative`.
    critical : float
        Critical value of z at the `sigma` significance level: ``-sigma`` for ``"less"``,
        ``+sigma`` for ``"greater"``, ``sigma`` (compare ``abs(z)``) for ``"two-sided"``.
    reject : bool
        True when the null hypothesis is rejected at that level (``p < alpha``).
    alpha : float
        The significance level as a probability (``norm.sf(sigma)`` one-sided,
        ``2 norm.sf(sigma)`` two-sided).
    alternative : str
        ``"less"``, ``"greater"`` or ``"two-sided"``.
    sigma : float
        The significance level in standard deviations of the normal distribution.
    """

    z: float
    p: float
    critical: float
    reject: bool
    alpha: float
    alternative: str
    sigma: float


def _as_float_array(values, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise GrapesInputError(f"{name}: give numbers (an array or a table column)") from None
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    return arr


def _real(value) -> float:
    """`value` as a float, NaN when it is not a real number (so that checks reject it)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.number)):
        return math.nan
    return float(value)


def particle_sem(n_voxels, noise_sigma: float) -> np.ndarray:
    """Measurement standard error of each particle's mean grey level (paper eq. 1).

    Parameters
    ----------
    n_voxels : array-like of int, shape (N,)
        Voxels averaged per particle (``roi_voxels`` of the particle table).
    noise_sigma : float
        Standard deviation of the image noise ``sigma_bg``, grey levels.

    Returns
    -------
    numpy.ndarray, shape (N,)
        ``noise_sigma / sqrt(n_voxels)``, grey levels; NaN where ``n_voxels`` is 0.
    """
    n = _as_float_array(n_voxels, "n_voxels")
    if not (np.isfinite(_real(noise_sigma)) and noise_sigma >= 0):
        raise GrapesInputError(f"noise_sigma={noise_sigma!r}: give the noise standard deviation (>= 0, grey levels)")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, float(noise_sigma) / np.sqrt(n), np.nan)


def change_sem(sem_a, sem_b) -> np.ndarray:
    """Measurement standard error of each particle's change between two states (paper eq. 2).

    Parameters
    ----------
    sem_a, sem_b : array-like, shape (N,)
        Per-particle SEMs in the two states, grey levels.

    Returns
    -------
    numpy.ndarray, shape (N,)
        ``sqrt(sem_a**2 + sem_b**2)``.
    """
    a = _as_float_array(sem_a, "sem_a")
    b = _as_float_array(sem_b, "sem_b")
    if a.shape != b.shape:
        raise GrapesInputError(f"sem_a has {a.size} values and sem_b {b.size}: give one per particle in both")
    return np.hypot(a, b)


def population_stats(values, sem=None) -> PopulationStats:
    """Population mean of per-particle values with SES, SEM and SE_tot (paper eq. 3-5).

    Parameters
    ----------
    values : array-like, shape (N,)
        One value per particle (e.g. ``roi_mean``, or a per-particle change). NaN values are
        left out (with their SEM).
    sem : array-like, shape (N,), optional
        Per-particle measurement standard errors (:func:`particle_sem`, :func:`change_sem`).
        Without them ``sem = 0`` and ``se_tot = ses``.

    Returns
    -------
    PopulationStats
    """
    v = _as_float_array(values, "values")
    if sem is None:
        s = np.zeros_like(v)
    else:
        s = _as_float_array(sem, "sem")
        if s.shape != v.shape:
            raise GrapesInputError(f"values has {v.size} entries and sem {s.size}: give one SEM per value")
    keep = np.isfinite(v) & np.isfinite(s)
    v, s = v[keep], s[keep]
    n = int(v.size)
    mean = float(v.mean()) if n else math.nan
    sd = float(v.std(ddof=1)) if n > 1 else math.nan
    ses = sd / math.sqrt(n) if n > 1 else math.nan
    sem_pop = float(math.sqrt(np.mean(s * s))) if n else math.nan
    se_tot = math.sqrt(ses * ses + sem_pop * sem_pop) if n > 1 else math.nan
    return PopulationStats(n=n, mean=mean, sd=sd, ses=ses, sem=sem_pop, se_tot=se_tot)


def change_stats(values_a, values_b, sem_a=None, sem_b=None) -> PopulationStats:
    """Population mean of the per-particle change ``b - a`` with its uncertainties.

    The change is taken per particle first (the paper's ``Delta I_prist``), its SEM per
    particle by eq. 2, then the population statistics by eq. 3-5. Pairing removes the spread of
    the particles' own levels from the sampling error.

    Parameters
    ----------
    values_a, values_b : array-like, shape (N,)
        The same particles' values in state a (e.g. the reference) and state b, same order.
    sem_a, sem_b : array-like, shape (N,), optional
        Their per-particle SEMs (both or neither).

    Returns
    -------
    PopulationStats
        Of ``values_b - values_a``.
    """
    a = _as_float_array(values_a, "values_a")
    b = _as_float_array(values_b, "values_b")
    if a.shape != b.shape:
        raise GrapesInputError(
            f"values_a has {a.size} values and values_b {b.size}: give the same particles, in the same order"
        )
    if (sem_a is None) != (sem_b is None):
        raise GrapesInputError("give both sem_a and sem_b, or neither")
    sem = None if sem_a is None else change_sem(sem_a, sem_b)
    if sem is not None and sem.shape != a.shape:
        raise GrapesInputError(f"{sem.size} SEMs for {a.size} particles: give one SEM per particle")
    return population_stats(b - a, sem)


_ALTERNATIVES = ("less", "greater", "two-sided")


def z_test(mean1: float, sd1: float, n1: int, mean2: float, sd2: float, n2: int, *,
           alternative: str = "less", sigma: float = 5.0) -> ZTestResult:
    """Two-sample z-test of population means (paper eq. 6).

    ``z = (mean1 - mean2) / sqrt(sd1**2 / n1 + sd2**2 / n2)``. With the paper's numbers
    (173.00, 11.27, 3650 at 4.0 V against 174.41, 11.08, 3650 pristine) ``z = -5.39``, below
    the 5-sigma critical value -5.0: a significant decrease.

    Parameters
    ----------
    mean1, sd1, n1 : float, float, int
        Mean, standard deviation and size of sample 1 (e.g. the state of charge).
    mean2, sd2, n2 : float, float, int
        The same for sample 2 (e.g. pristine).
    alternative : {"less", "greater", "two-sided"}
        Alternative hypothesis: population mean 1 less than mean 2 (the paper's, a darkening),
        greater, or different.
    sigma : float
        Significance level in standard deviations of the normal distribution (5: the paper's
        ``p < 2.87e-7`` one-sided; 2: ``p < 0.0228``; 3: ``p < 0.00135``).

    Returns
    -------
    ZTestResult
        ``z``, ``p``, ``critical``, ``reject`` and the level.
    """
    from scipy.stats import norm

    if alternative not in _ALTERNATIVES:
        raise GrapesInputError(f"alternative={alternative!r}: choose one of {list(_ALTERNATIVES)}")
    if not (np.isfinite(_real(sigma)) and sigma > 0):
        raise GrapesInputError(f"sigma={sigma!r}: give the significance level in standard deviations (> 0)")
    for name, n in (("n1", n1), ("n2", n2)):
        if not (np.isfinite(_real(n)) and n >= 1):
            raise GrapesInputError(f"{name}={n!r}: a sample needs at least one particle")
    for name, v in (("mean1", mean1), ("sd1", sd1), ("mean2", mean2), ("sd2", sd2)):
        if not np.isfinite(_real(v)):
            raise GrapesInputError(f"{name}={v!r}: give a finite number")
    if sd1 < 0 or sd2 < 0:
        raise GrapesInputError(f"sd1={sd1!r}, sd2={sd2!r}: standard deviations are >= 0")
    se = math.sqrt(sd1 * sd1 / n1 + sd2 * sd2 / n2)
    diff = float(mean1) - float(mean2)
    if se == 0:
        z = math.copysign(math.inf, diff) if diff else 0.0
    else:
        z = diff / se
    one = float(norm.sf(sigma))
    if alternative == "less":
        p, critical, alpha = float(norm.cdf(z)), -float(sigma), one
    elif alternative == "greater":
        p, critical, alpha = float(norm.sf(z)), float(sigma), one
    else:
        p, critical, alpha = float(min(1.0, 2 * norm.sf(abs(z)))), float(sigma), 2 * one
    return ZTestResult(z=float(z), p=p, critical=critical, reject=bool(p < alpha), alpha=alpha,
                       alternative=alternative, sigma=float(sigma))


# --------------------------------------------------------------------------------------------
# radial profiles: one population, groups by quantiles
# --------------------------------------------------------------------------------------------


def _check_table(table, name: str = "table") -> pd.DataFrame:
    if not isinstance(table, pd.DataFrame):
        raise GrapesInputError(f"{name} is a {type(table).__name__}: give a pandas DataFrame (a particle table "
                               "from grapes_dask.analyze or grapes_dask.read_table)")
    return table


def _check_column(table: pd.DataFrame, column, what: str = "column") -> None:
    if column not in table.columns:
        raise GrapesInputError(f"{what}={column!r} is not a column of the table: choose one of "
                               f"{[str(c) for c in table.columns]}")


def _check_max_layer(max_layer) -> int | None:
    if max_layer is None:
        return None
    if isinstance(max_layer, bool) or not isinstance(max_layer, (int, np.integer)) or max_layer < 1:
        raise GrapesInputError(f"max_layer={max_layer!r}: give a number of layers (an integer >= 1), or None "
                               "for the deepest layer of any particle")
    return int(max_layer)


def _profile_rows(table: pd.DataFrame, column: str) -> list:
    out = []
    for i, cell in enumerate(table[column].to_numpy(dtype=object)):
        if cell is None or (np.ndim(cell) == 0 and not isinstance(cell, str) and pd.isna(cell)):
            out.append(np.empty(0))  # a particle without a profile (e.g. no voxel)
            continue
        try:
            p = np.asarray(cell, dtype=float)
        except (TypeError, ValueError):
            raise GrapesInputError(
                f"column {column!r}, row {i}: {str(cell)[:40]!r} is not a list of numbers: give a particle table "
                "with profile lists (read a written table with grapes_dask.read_table)") from None
        if p.ndim != 1:
            raise GrapesInputError(f"column {column!r}, row {i}: a profile is one list of numbers per particle, "
                                   f"got shape {p.shape}: choose a radial profile column")
        out.append(p)
    return out


def profile_matrix(table, column: str, max_layer: int | None = None) -> np.ndarray:
    """A radial profile list column as a matrix, one row per particle, NaN-padded.

    Parameters
    ----------
    table : pandas.DataFrame, N rows
        Particle table with the list column `column` (one array per particle, layer 1 first).
        A missing cell (None, NaN) is an empty profile.
    column : str
        Profile column (e.g. ``"radial_layers_graylevel"``).
    max_layer : int, optional
        Number of layers K kept (deeper layers are cut). Default: the deepest layer of any
        particle.

    Returns
    -------
    numpy.ndarray, float64, shape (N, K)
        Row i holds particle i's profile; layers it does not reach are NaN (as are its own NaN
        layers, e.g. empty layers).
    """
    table = _check_table(table)
    _check_column(table, column)
    k = _check_max_layer(max_layer)
    rows = _profile_rows(table, column)
    if k is None:
        k = max((len(p) for p in rows), default=0)
    mat = np.full((len(rows), k), np.nan)
    for i, p in enumerate(rows):
        m = min(k, len(p))
        mat[i, :m] = p[:m]
    return mat


def _column_moments(mat: np.ndarray):
    """n, mean, sample std (ddof=1) and standard error per column over the finite values."""
    ok = np.isfinite(mat)
    n = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, mat, 0.0).sum(axis=0) / n
        dev = np.where(ok, mat - mean, 0.0)
        sd = np.sqrt((dev * dev).sum(axis=0) / (n - 1))
        sd = np.where(n > 1, sd, np.nan)
        mean = np.where(n > 0, mean, np.nan)
        se = sd / np.sqrt(n)
    return n.astype(np.int64), mean, sd, se


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
        Layer numbers 1..K, mean over the particles having a finite value in that layer, its
        standard error (sample standard deviation, ddof=1, over sqrt(n); NaN when n < 2), and n.
        A layer no particle has is NaN with n = 0.
    """
    mat = profile_matrix(table, column, max_layer)
    n, mean, _sd, se = _column_moments(mat)
    return np.arange(1, mat.shape[1] + 1), mean, se, n


# --------------------------------------------------------------------------------------------
# quantile groups: one rule for every grouping of particles by a column's values
# --------------------------------------------------------------------------------------------


def rank_order(values, ties=None) -> np.ndarray:
    """Indices of the finite `values` sorted by value, ties by `ties` then by position.

    The one order behind :func:`quantile_labels` and the ``smallest`` cleaning rule of
    :func:`grapes_dask.track.track`.

    Parameters
    ----------
    values : array-like of float, shape (N,)
        One value per particle (e.g. its volume, its x centroid). NaN and infinite values are
        left out.
    ties : array-like, shape (N,), optional
        Tie-breaker, e.g. the label ids: equal values are ordered by it (then by position).
        Default: by position.

    Returns
    -------
    numpy.ndarray of int64, shape (M,)
        Positions of the M finite values, smallest first.
    """
    v = _as_float_array(values, "values")
    pos = np.arange(v.size)
    if ties is None:
        t = pos
    else:
        t = np.asarray(ties).reshape(-1)
        if t.shape != v.shape:
            raise GrapesInputError(f"ties has {t.size} entries and values {v.size}: give one tie-breaker (e.g. the "
                                   "label id) per value")
    fin = np.flatnonzero(np.isfinite(v))
    order = np.lexsort((pos[fin], t[fin], v[fin]))
    return fin[order].astype(np.int64)


def quantile_labels(values, q: int, ties=None) -> np.ndarray:
    """The quantile group (1..q) of every value, by rank: the one rule of the package.

    The finite values are sorted (:func:`rank_order`: by value, ties by `ties`, then by
    position); with ``n`` of them, group ``g`` holds the ranks
    ``floor((g - 1) n / q) <= r < floor(g n / q)`` (rank 0 = the smallest), i.e. rank ``r`` is
    in group ``ceil((r + 1) q / n)``. Groups differ in size by at most one (group ``g`` has
    ``floor(g n / q) - floor((g - 1) n / q)`` values); group 1 holds exactly the
    ``floor(n / q)`` smallest values, the particles that the cleaning rule ``smallest`` with
    ``drop_smallest = 1/q`` removes. Tied values can be split
    between two groups (by `ties`); the quantiles' values, as :func:`numpy.quantile` gives them,
    do not decide membership. Used by :func:`quantile_groups`,
    :meth:`grapes_dask.track.Tracking.by_quantile` and the reports.

    Parameters
    ----------
    values : array-like of float, shape (N,)
        One value per particle. NaN and infinite values go to no group (0).
    q : int
        Number of groups (>= 1): 4 for quartiles, 10 for deciles.
    ties : array-like, shape (N,), optional
        Tie-breaker, e.g. the label ids (default: position).

    Returns
    -------
    numpy.ndarray of int64, shape (N,)
        1..q (1 = smallest values), 0 where the value is not finite. With fewer than `q` finite
        values some groups are empty.
    """
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or q < 1:
        raise GrapesInputError(f"q={q!r}: give the number of groups, an integer >= 1 (4 for quartiles, "
                               "10 for deciles)")
    v = _as_float_array(values, "values")
    order = rank_order(v, ties)
    n = order.size
    out = np.zeros(v.size, np.int64)
    if n:
        r = np.arange(n, dtype=np.int64)
        out[order] = ((r + 1) * int(q) + n - 1) // n
    return out



@dataclass(frozen=True, eq=False)
class QuantileGroups:
    """Particles grouped by quantiles of a column, with per-group statistics (:func:`quantile_groups`).

    Attributes
    ----------
    column : str
        The column the groups are quantiles of.
    q : int
        Number of groups (4: quartiles, 10: deciles).
    edges : numpy.ndarray, float64, shape (q + 1,)
        The quantiles ``0, 1/q, ..., 1`` of the finite values of `column` (linear
        interpolation, as :func:`numpy.quantile`), for description only: membership is by rank
        (:func:`quantile_labels`), so a value equal to an edge can be on either side of it.
    groups : pandas.Series, Int64
        Group of every row of the table (same index), 1..q with 1 the smallest values
        (:func:`quantile_labels`, ties by ``label`` when the table has one, else by row);
        ``<NA>`` where `column` is not finite.
    profiles : pandas.DataFrame
        Long table, one row per (group, layer), sorted by group then layer (layers 1..K for
        every group): ``group``, ``layer``, then for each profile column P ``P-mean``, ``P-std``
        (ddof=1), ``P-se`` (``P-std / sqrt(P-n)``) and ``P-n`` (particles of the group with a
        finite value in that layer). Statistics of fewer than 2 values are NaN (the mean of none).
    scalars : pandas.DataFrame
        Indexed by ``group`` (1..q): ``n`` (particles), ``lo``, ``hi`` (the group's smallest and
        largest value of `column`), then
        for each scalar column C ``C-n`` (finite values), ``C-mean``, ``C-std`` (ddof=1),
        ``C-se`` and ``C-median``.
    """

    column: str
    q: int
    edges: np.ndarray
    groups: pd.Series
    profiles: pd.DataFrame
    scalars: pd.DataFrame


def _default_scalar_columns(table: pd.DataFrame) -> list:
    out = []
    for c in table.columns:
        dt = table[c].dtype
        if c == "label" or pd.api.types.is_bool_dtype(dt) or not pd.api.types.is_numeric_dtype(dt):
            continue
        out.append(c)
    return out


def quantile_groups(table, column: str, q: int = 4, *, profiles=GROUP_PROFILES, columns=None,
                    max_layer: int | None = None) -> QuantileGroups:
    """Group particles by quantiles of a column; per group the radial profiles and scalar statistics.

    What GRAPES' ``radial_layers_quartiles``/``radial_layers_deciles`` and
    ``compute_quartile_statistics`` meant to give, for any number of groups (paper fig. 6: the
    profiles of the largest volume quartile).

    Parameters
    ----------
    table : pandas.DataFrame
        Particle table (:func:`grapes_dask.analyze`), one row per particle.
    column : str
        Numeric column whose quantiles define the groups (e.g. ``"volume"``, ``"centroid-2"``).
    q : int
        Number of groups (>= 1): 4 for quartiles, 10 for deciles.
    profiles : sequence of str
        Radial profile list columns summarised per (group, layer). ``()`` for none.
    columns : sequence of str, optional
        Scalar columns summarised per group. Default: every numeric column of the table except
        ``label`` and boolean columns (pass them explicitly: a boolean's mean is a fraction).
    max_layer : int, optional
        Number of layers K of the profile statistics (default: the deepest layer of any grouped
        particle).

    Returns
    -------
    QuantileGroups
        ``edges``, ``groups``, ``profiles`` (long, per group and layer), ``scalars`` (per group).

    Notes
    -----
    Membership is by rank (:func:`quantile_labels`): the finite values sorted, ties by the
    ``label`` column (by row when there is none), and group ``g`` holds the ranks
    ``floor((g - 1) n / q) .. floor(g n / q) - 1`` of the ``n`` finite values. Groups differ in
    size by at most one whether or not ``n`` is a multiple of `q` and whether or not values
    repeat; tied values may be split between two neighbouring groups. This is the rule of
    :meth:`grapes_dask.track.Tracking.by_quantile` and of the cleaning rule ``smallest``, not
    that of ``pandas.qcut`` (which puts a value equal to an edge in the lower group, so that its
    groups differ in size even for distinct values whenever ``n`` is not a multiple of `q`,
    and refuses repeated edges). Rows whose value is NaN or infinite go to no group; fewer
    finite values than groups is an error.

    Raises
    ------
    GrapesInputError
        A column that is missing or not numeric, a q that is not an integer >= 1, fewer finite
        values than groups.
    """
    table = _check_table(table)
    _check_column(table, column)
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or q < 1:
        raise GrapesInputError(f"q={q!r}: give the number of groups, an integer >= 1 (4 for quartiles, "
                               "10 for deciles)")
    q = int(q)
    max_layer = _check_max_layer(max_layer)
    if isinstance(profiles, str):
        profiles = (profiles,)
    profiles = tuple(profiles)
    for p in profiles:
        _check_column(table, p, "profiles")
    if columns is None:
        columns = _default_scalar_columns(table)
    else:
        columns = [columns] if isinstance(columns, str) else list(columns)
        for c in columns:
            _check_column(table, c, "columns")
            dt = table[c].dtype
            if not (pd.api.types.is_numeric_dtype(dt) or pd.api.types.is_bool_dtype(dt)):
                raise GrapesInputError(f"columns: {c!r} holds {dt} values, not numbers: leave it out of {{columns}}",
                                       columns=None)
    if not pd.api.types.is_numeric_dtype(table[column].dtype) or pd.api.types.is_bool_dtype(table[column].dtype):
        raise GrapesInputError(f"column={column!r} holds {table[column].dtype} values: choose a numeric column")

    values = table[column].to_numpy(dtype=float)
    finite = np.isfinite(values)
    x = values[finite]
    if x.size < q:
        raise GrapesInputError(
            f"column {column!r} has {x.size} finite value(s) in {len(values)} rows, fewer than q={q} groups: lower "
            f"{{q}} to at most {max(x.size, 1)}", q=None)
    edges = np.quantile(x, np.linspace(0.0, 1.0, q + 1))
    ties = table["label"].to_numpy() if "label" in table.columns and column != "label" else None
    group = quantile_labels(values, q, ties=ties)
    counts = np.bincount(group[finite], minlength=q + 1)[1:]
    groups = pd.Series(pd.arrays.IntegerArray(group, ~finite), index=table.index, name="group")

    # profiles, per (group, layer)
    grouped = table.iloc[np.flatnonzero(finite)]
    mats = {p: profile_matrix(grouped, p) for p in profiles}
    k = max_layer if max_layer is not None else max((m.shape[1] for m in mats.values()), default=0)
    g_in = group[finite]
    parts = {"group": np.repeat(np.arange(1, q + 1, dtype=np.int64), k),
             "layer": np.tile(np.arange(1, k + 1, dtype=np.int64), q)}
    for p, m in mats.items():
        full = np.full((m.shape[0], k), np.nan)
        full[:, :min(k, m.shape[1])] = m[:, :k]
        cols = {s: [] for s in ("mean", "std", "se", "n")}
        for gi in range(1, q + 1):
            n, mean, sd, se = _column_moments(full[g_in == gi])
            for s, v in (("mean", mean), ("std", sd), ("se", se), ("n", n)):
                cols[s].append(v)
        for s in ("mean", "std", "se", "n"):
            parts[f"{p}-{s}"] = (np.concatenate(cols[s]) if cols[s] else np.empty(0)).astype(
                np.int64 if s == "n" else np.float64)
    prof = pd.DataFrame(parts)

    # scalars, per group
    lo = np.array([x[g_in == gi].min() for gi in range(1, q + 1)], np.float64)
    hi = np.array([x[g_in == gi].max() for gi in range(1, q + 1)], np.float64)
    sc = {"n": counts.astype(np.int64), "lo": lo, "hi": hi}
    for c in columns:
        v = table[c].to_numpy(dtype=float)[finite]
        stats = {s: np.empty(q) for s in ("mean", "std", "se", "median")}
        ns = np.zeros(q, np.int64)
        for gi in range(1, q + 1):
            col = v[g_in == gi][:, None]
            n, mean, sd, se = _column_moments(col)
            ns[gi - 1] = n[0]
            stats["mean"][gi - 1], stats["std"][gi - 1], stats["se"][gi - 1] = mean[0], sd[0], se[0]
            fin = col[np.isfinite(col)]
            stats["median"][gi - 1] = float(np.median(fin)) if fin.size else np.nan
        sc[f"{c}-n"] = ns
        for s in ("mean", "std", "se", "median"):
            sc[f"{c}-{s}"] = stats[s]
    scalars = pd.DataFrame(sc, index=pd.Index(np.arange(1, q + 1, dtype=np.int64), name="group"))
    return QuantileGroups(column=str(column), q=q, edges=edges, groups=groups, profiles=prof, scalars=scalars)


# --------------------------------------------------------------------------------------------
# image noise sigma_bg, out of core
# --------------------------------------------------------------------------------------------


class GrapesBackgroundWarning(UserWarning):
    """``sigma_bg`` or the beam stability check fell back on a weaker estimate, or found a drift.

    Issued when no empty space was found (``sigma_bg`` then comes from the background voxels
    between the particles, whose texture inflates it), and by :func:`grapes_dask.track.track`
    when the background peak of a state drifts by an amount that is large against the changes
    being measured. Not an error: the result is computed and records the warning.
    """


@dataclass(frozen=True)
class NoiseEstimate:
    """Standard deviation of the image noise, ``sigma_bg`` of the paper (:func:`estimate_noise`).

    Attributes
    ----------
    sigma : float
        Sample standard deviation (ddof=1) of the grey levels used, grey levels.
    mean : float
        Their mean, grey levels.
    n_voxels : int
        Voxels used (finite grey levels).
    source : str
        ``"empty_space"`` (a label-free slab at a face of the volume that passed the flat-field
        test, :func:`find_empty_space`), ``"region"`` (a box given by the user) or
        ``"background"`` (label-0 voxels at least `margin` voxels from every particle).
    region : tuple of (int, int) or None
        The box, ``(start, stop)`` voxel indices per axis (z, y, x), for ``source="region"``
        and ``source="empty_space"``.
    margin : float or None
        The distance to the particles, voxels, for ``source="background"`` and
        ``source="empty_space"``.
    peak : float or None
        Centre of the box's grey-level histogram peak, grey levels: the median, interpolated
        within its histogram bin (for a symmetric noise peak, also its mode). None for
        ``source="background"``.
    spread : float or None
        Robust spread of the peak, grey levels: interquartile range / 1.349 (the standard
        deviation of a Gaussian peak). None for ``source="background"``.
    warning : str or None
        Why the estimate is weaker than asked (e.g. no empty space found, fallback on the
        background between particles); None otherwise.
    candidates : tuple of dict
        The empty-space candidates examined (one per face with a label-free slab): ``face``,
        ``box``, ``n_voxels``, ``sigma``, ``haar_sigma``, ``ratio``, ``tile_mean_dev``,
        ``tile_sigma_dev``, ``flat`` (passed the test) and ``why`` (the test that failed).
    """

    sigma: float
    mean: float
    n_voxels: int
    source: str
    region: tuple | None
    margin: float | None
    peak: float | None = None
    spread: float | None = None
    warning: str | None = None
    candidates: tuple = ()

    @property
    def peak_se(self) -> float | None:
        """Standard error of `peak` for independent Gaussian noise, ``1.2533 * spread / sqrt(n)``
        (grey levels); None without a peak. Correlated noise makes the true error larger."""
        if self.peak is None or self.spread is None or not self.n_voxels:
            return None
        return float(math.sqrt(math.pi / 2.0) * self.spread / math.sqrt(self.n_voxels))

    def as_dict(self, prefix: str = "noise_") -> dict:
        """The fields as a JSON-friendly dict (for a table's metadata), names prefixed."""
        region = None if self.region is None else [list(r) for r in self.region]
        return {prefix + "sigma": self.sigma, prefix + "mean": self.mean, prefix + "n_voxels": self.n_voxels,
                prefix + "source": self.source, prefix + "region": region, prefix + "margin": self.margin,
                prefix + "peak": self.peak, prefix + "spread": self.spread, prefix + "warning": self.warning,
                prefix + "candidates": [_jsonable_candidate(c) for c in self.candidates]}


def _jsonable_candidate(c: dict) -> dict:
    out = {}
    for k, v in c.items():
        if k == "box":
            out[k] = [list(map(int, r)) for r in v]
        elif isinstance(v, (bool, np.bool_)):
            out[k] = bool(v)
        elif isinstance(v, (int, np.integer)):
            out[k] = int(v)
        elif isinstance(v, (float, np.floating)):
            out[k] = float(v)
        else:
            out[k] = v
    return out


def _parse_region(region, shape: tuple) -> tuple:
    """``((start, stop), ...)`` from slices or pairs, checked against `shape`."""
    how = ("give one slice or (start, stop) pair of voxel indices per axis, inside the volume, e.g. "
           "((0, 20), (0, 200), (0, 200))")
    try:
        items = list(region)
    except TypeError:
        raise GrapesInputError(f"region={region!r}: {how}") from None
    if len(items) != len(shape):
        raise GrapesInputError(f"region={region!r} has {len(items)} axes, the volume {len(shape)} (shape {shape}): "
                               f"{how}")
    box = []
    for ax, (item, size) in enumerate(zip(items, shape)):
        if isinstance(item, slice):
            if item.step not in (None, 1):
                raise GrapesInputError(f"region: axis {ax} has step {item.step}: {how} (no step)")
            start, stop = item.start, item.stop
        else:
            try:
                start, stop = item
            except (TypeError, ValueError):
                raise GrapesInputError(f"region: axis {ax} is {item!r}: {how}") from None
        start = 0 if start is None else start
        stop = size if stop is None else stop
        for v in (start, stop):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise GrapesInputError(f"region: axis {ax} has {v!r}: {how} (integers)")
        start, stop = int(start), int(stop)
        if start < 0 or stop > size:
            raise GrapesInputError(f"region: axis {ax} spans {start}..{stop}, outside the volume (0..{size}, shape "
                                   f"{shape}): {how}")
        if stop <= start:
            raise GrapesInputError(f"region: axis {ax} spans {start}..{stop}, which is empty: {how}")
        box.append((start, stop))
    return tuple(box)


def _far_mask(block: np.ndarray, margin2: float) -> np.ndarray:
    """Background voxels (label 0) whose squared Euclidean distance to every particle voxel of
    the block is at least `margin2` (voxels^2). Exact for the core of a block read with a halo
    of ``ceil(margin) - 1``: a nearer particle voxel lies inside the halo."""
    import edt

    bg = np.asarray(block) == 0
    if margin2 <= 0 or bg.all():
        return bg
    return bg & (edt.edtsq(bg, black_border=False, parallel=1) >= margin2)


def _block_moments(grey: np.ndarray, far: np.ndarray | None = None) -> np.ndarray:
    """Count, mean and sum of squared deviations (float64) of a block's finite grey levels
    (where `far`), shaped ``(1,) * ndim + (3,)``."""
    v = np.asarray(grey)
    v = (v[far] if far is not None else v.ravel()).astype(np.float64)
    if v.dtype.kind == "f" and np.asarray(grey).dtype.kind == "f":
        v = v[np.isfinite(v)]
    n = v.size
    mean = float(v.mean()) if n else 0.0
    d = v - mean
    m2 = float(d @ d) if n else 0.0
    return np.array([n, mean, m2], np.float64).reshape((1,) * np.ndim(grey) + (3,))


def _combine_moments(m: np.ndarray) -> tuple:
    """Exact combination of per-block (count, mean, M2) (Chan et al.): count, mean, M2."""
    m = np.asarray(m, np.float64).reshape(-1, 3)
    m = m[m[:, 0] > 0]
    n = float(m[:, 0].sum())
    if n == 0:
        return 0, math.nan, math.nan
    mean = float((m[:, 0] * m[:, 1]).sum() / n)
    dev = m[:, 1] - mean
    m2 = float(m[:, 2].sum() + (m[:, 0] * dev * dev).sum())
    return int(n), mean, m2


def _spread_blocks(chunks: tuple, max_voxels: int) -> tuple:
    """Per axis, the indices of an evenly spread subset of blocks holding at most `max_voxels`
    voxels (at least one block)."""
    sizes = [np.asarray(c, np.int64) for c in chunks]
    count = [len(c) for c in sizes]

    def pick(nb, m):
        return np.unique(np.floor((np.arange(m) + 0.5) * nb / m).astype(np.int64))

    def voxels():
        return math.prod(int(s[pick(len(s), m)].sum()) for s, m in zip(sizes, count))

    while voxels() > max_voxels and max(count) > 1:
        ax = int(np.argmax(count))
        count[ax] -= 1
    return tuple(pick(len(s), m) for s, m in zip(sizes, count))


# -- empty space: label-free slabs at the faces, tested for a flat field ------------------------

_FACE_NAMES = ("z", "y", "x")


def _axis_names(nd: int) -> tuple:
    return _FACE_NAMES[-nd:]


def _label_extent(lab, client=None) -> list:
    """Per axis, ``(lo, hi)``: the smallest and largest index of a labelled voxel along it, or
    None when the volume holds no label. One dask reduction per axis (any along the others)."""
    from .table import _compute

    nz = lab != 0
    nd = lab.ndim
    projs = [nz.any(axis=tuple(b for b in range(nd) if b != a)) for a in range(nd)]
    out = []
    for p in _compute(*projs, client=client):
        idx = np.flatnonzero(np.asarray(p))
        if idx.size == 0:
            return None
        out.append((int(idx[0]), int(idx[-1])))
    return out


def _face_slabs(shape: tuple, extent, margin: float, min_thickness: int = 1, outer: int = 3) -> list:
    """Label-free slabs at the faces, at least `margin` voxels from the labelled planes:
    ``(face, box)`` with face ``"z-"`` (low side of axis z), ``"z+"`` (high side), ...;
    ``("all", whole volume)`` when no voxel is labelled. Each slab is followed by up to
    `outer` outer parts of it, halving its thickness each time (the part against the volume's
    face, at least `min_thickness` thick): unlabelled pores or a separator between the
    particles and the air spoil the whole slab but not its outer part."""
    nd = len(shape)
    full = [(0, int(n)) for n in shape]
    if extent is None:
        return [("all", tuple(full))]
    low_shrink = max(int(math.ceil(margin)) - 1, 0)  # index lo - margin is at distance margin from plane lo
    high_gap = max(int(math.ceil(margin)), 1)
    out = []
    for a, name in enumerate(_axis_names(nd)):
        lo, hi = extent[a]
        n = int(shape[a])
        for side, t in (("-", lo - low_shrink), ("+", n - (hi + high_gap))):
            k = 0
            while t > 0 and k <= outer and (k == 0 or t >= min_thickness):
                box = list(full)
                box[a] = (0, t) if side == "-" else (n - t, n)
                out.append((name + side, tuple(box)))
                t, k = t // 2, k + 1
    return out


def _tile_boxes(box: tuple, tiles: int) -> list:
    """The box cut into ``min(tiles, extent)`` nearly equal parts per axis (a grid of sub-boxes)."""
    import itertools

    cuts = []
    for a, b in box:
        k = max(1, min(int(tiles), b - a))
        edges = np.linspace(a, b, k + 1).round().astype(np.int64)
        cuts.append([(int(x), int(y)) for x, y in zip(edges[:-1], edges[1:]) if y > x])
    return [tuple(t) for t in itertools.product(*cuts)]


def _moments_graph(g, box: tuple):
    """Lazy per-chunk (count, mean, M2) of the box of `g`."""
    import dask.array as da

    sub = g[tuple(slice(a, b) for a, b in box)]
    nd = sub.ndim
    out_chunks = tuple((1,) * len(c) for c in sub.chunks) + ((3,),)
    return da.map_blocks(_block_moments, sub, new_axis=nd, chunks=out_chunks, dtype=np.float64)


def _haar_graph(g, box: tuple, lag: int = 2) -> list:
    """Lazy ``(sum of d**2, number of d)`` of the differences between voxels `lag` apart in the
    box along each axis of extent > `lag` (pairs of finite grey levels; exact whatever the
    chunking: the shifted views are aligned by dask)."""
    import dask.array as da

    out = []
    for ax, (a, b) in enumerate(box):
        if b - a <= lag:
            continue
        lo = [slice(s, e) for s, e in box]
        hi = list(lo)
        lo[ax], hi[ax] = slice(a, b - lag), slice(a + lag, b)
        d = g[tuple(hi)].astype(np.float64) - g[tuple(lo)].astype(np.float64)
        fin = da.isfinite(d)
        out.append((da.where(fin, d * d, 0.0).sum(), fin.sum()))
    return out


def _test_flat(n_t, mean_t, m2_t, haar, max_ratio: float) -> dict:
    """The flat-field test of one candidate from its tiles' moments and its Haar sums."""
    m = np.column_stack([n_t, mean_t, m2_t])
    n, mean, m2 = _combine_moments(m)
    res = {"n_voxels": int(n), "mean": mean, "sigma": math.nan, "haar_sigma": math.nan, "ratio": math.nan,
           "tile_mean_dev": math.nan, "tile_sigma_dev": math.nan, "flat": False, "why": ""}
    if n < 2:
        res["why"] = "fewer than 2 finite grey levels"
        return res
    sigma = math.sqrt(m2 / (n - 1))
    s2 = sum(float(x) for x, _ in haar)
    cnt = sum(float(c) for _, c in haar)
    hs = math.sqrt(s2 / (2.0 * cnt)) if cnt > 0 else math.nan
    res.update(sigma=sigma, haar_sigma=hs, m2=m2)
    if not np.isfinite(hs):
        res["why"] = "no pair of voxels lag apart"
        return res
    ratio = (1.0 if sigma == 0 else math.inf) if hs == 0 else sigma / hs
    ok_t = n_t >= 2
    nt = n_t[ok_t]
    tm = mean_t[ok_t]
    ts = np.sqrt(m2_t[ok_t] / np.maximum(nt - 1, 1))
    scale = hs if hs > 0 else 1.0
    mean_dev = float(np.max(np.abs(tm - mean)) / scale) if nt.size else 0.0
    mean_tol = 0.5 + 4.0 / math.sqrt(max(float(nt.min()), 1.0)) if nt.size else math.inf
    sig_dev = float(np.max(np.abs(ts / sigma - 1.0))) if nt.size and sigma > 0 else 0.0
    sig_tol = 0.2 + 3.0 / math.sqrt(2.0 * max(float(nt.min()) - 1.0, 1.0)) if nt.size else math.inf
    res.update(ratio=ratio, tile_mean_dev=mean_dev, tile_sigma_dev=sig_dev)
    why = []
    if ratio > max_ratio:
        why.append(f"structure: sigma / haar_sigma = {ratio:.3g} > {max_ratio:g}")
    if mean_dev > mean_tol:
        why.append(f"uneven mean: a sub-box's mean is {mean_dev:.3g} haar_sigma from the slab's (> {mean_tol:.3g})")
    if sig_dev > sig_tol:
        why.append(f"uneven noise: a sub-box's sigma differs by {sig_dev:.0%} from the slab's (> {sig_tol:.0%})")
    res["flat"] = not why
    res["why"] = "; ".join(why)
    return res


def _check_finder_options(margin, min_thickness, min_voxels, max_ratio, tiles, lag=2) -> None:
    if isinstance(margin, bool) or not isinstance(margin, (int, float, np.integer, np.floating)) \
            or not (np.isfinite(margin) and margin >= 0):
        raise GrapesInputError(f"margin={margin!r}: give a distance from the particles in voxels (>= 0)")
    for name, v, lo in (("min_thickness", min_thickness, 1), ("min_voxels", min_voxels, 2), ("tiles", tiles, 1),
                        ("lag", lag, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise GrapesInputError(f"{name}={v!r}: give a whole number >= {lo}")
    if isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float, np.integer, np.floating)) \
            or not (np.isfinite(max_ratio) and max_ratio >= 1):
        raise GrapesInputError(f"max_ratio={max_ratio!r}: give a ratio >= 1 (sigma over the difference estimate "
                               "haar_sigma that a flat field may reach; default 1.2)")


def _find_empty(g, lab, *, margin, min_thickness, min_voxels, max_ratio, tiles, client, lag=2):
    """(chosen candidate dict or None, candidates list). `g`, `lab` dask arrays of one shape."""
    from .table import _compute

    extent = _label_extent(lab, client=client)
    slabs = _face_slabs(g.shape, extent, float(margin), int(min_thickness))
    cands, graphs = [], []
    for face, box in slabs:
        n_box = math.prod(b - a for a, b in box)
        thick = min(b - a for a, b in box) if face == "all" else \
            (box[_axis_names(g.ndim).index(face[0])][1] - box[_axis_names(g.ndim).index(face[0])][0])
        c = {"face": face, "box": box, "n_voxels": int(n_box)}
        if thick < min_thickness or n_box < min_voxels:
            c.update(flat=False, why=f"too small: {thick} voxels thick (min_thickness={min_thickness}), "
                                     f"{n_box} voxels (min_voxels={min_voxels})")
            cands.append(c)
            continue
        tb = _tile_boxes(box, tiles)
        graphs.append((c, len(tb), [_moments_graph(g, t) for t in tb], _haar_graph(g, box, int(lag))))
        cands.append(c)
    if graphs:
        flat_objs = []
        for _, _, mom, haar in graphs:
            flat_objs += mom
            for s2, cnt in haar:
                flat_objs += [s2, cnt]
        res = list(_compute(*flat_objs, client=client))
        for c, nt, mom, haar in graphs:
            ms = [np.asarray(res.pop(0), np.float64).reshape(-1, 3) for _ in mom]
            per_tile = np.array([_combine_moments(m) for m in ms], np.float64).reshape(-1, 3)
            per_tile = np.nan_to_num(per_tile, nan=0.0)
            hs = [(res.pop(0), res.pop(0)) for _ in haar]
            c.update(_test_flat(per_tile[:, 0], per_tile[:, 1], per_tile[:, 2], hs, float(max_ratio)))
    flat = []
    for c in cands:  # per face, the thickest flat slab (its outer parts follow it)
        if c.get("flat") and all(f["face"] != c["face"] for f in flat):
            flat.append(c)
    if not flat:
        return None, cands
    best = min(flat, key=lambda c: (c["sigma"], -c["n_voxels"], c["face"]))
    return best, cands


def find_empty_space(grey, labels, *, margin=3, min_thickness: int = 4, min_voxels: int = 1000,
                     max_ratio: float = 1.2, tiles: int = 3, lag: int = 2, client=None):
    """Empty space (air above or around the sample) for ``sigma_bg``, out of core.

    Candidates are the label-free slabs at the faces of the volume: along each axis, the voxels
    below the first labelled plane and above the last one, less `margin` voxels next to the
    labels (the rims and blur), each spanning the whole volume along the other axes (a volume
    without any label is one candidate, the whole volume), and the outer half, quarter and
    eighth of each slab (the part against the face, while at least `min_thickness` thick):
    unlabelled pores between the particles and the air spoil a slab, not its outer part. A
    candidate at least `min_thickness` voxels thick and of at least `min_voxels` voxels is
    *flat* when it passes all three tests:

    1. no structure: its sample standard deviation ``sigma`` (ddof=1) is at most `max_ratio`
       times ``haar_sigma = sqrt(mean(d**2) / 2)``, ``d`` the differences between voxels `lag`
       apart along every axis. For noise uncorrelated at `lag` voxels both estimate the noise
       (``sigma / haar_sigma = 1 / sqrt(1 - rho(lag))``, ``rho`` the autocorrelation); a
       texture correlated over more than `lag` voxels (pores, binder, a separator) inflates
       ``sigma`` far more than ``haar_sigma``. A lag of 2 rather than 1 lets through the
       noise of reconstructions, correlated over about a voxel (Gaussian-blurred white noise
       of sigma 0.8 voxel: ratio 1.13 at lag 2, 1.76 at lag 1);
    2. one mean: cut into ``tiles`` parts per axis, every sub-box's mean lies within
       ``(0.5 + 4 / sqrt(n_min)) * haar_sigma`` of the slab's (``n_min``: the smallest sub-box);
    3. one noise: every sub-box's standard deviation lies within
       ``0.2 + 3 / sqrt(2 (n_min - 1))`` (relative) of the slab's.

    Per face, the thickest flat candidate is kept; of those, the one of smallest ``sigma`` is
    chosen (any structure only adds variance), ties by more voxels. Stages: one reduction of
    the labels per axis (any labelled voxel per plane), then per candidate and per chunk the
    moments of each sub-box and the sums of the squared neighbour differences, all in one
    compute; nothing larger than a chunk is held.

    Parameters
    ----------
    grey, labels : path, numpy.ndarray, dask.array.Array or Volume, shape (Z, Y, X) or (Y, X)
        Grey-level and label volumes (label 0: background).
    margin : float
        Distance kept from the labelled planes, voxels.
    min_thickness : int
        Smallest slab thickness examined, voxels.
    min_voxels : int
        Smallest slab examined, voxels.
    max_ratio : float
        Largest ``sigma / haar_sigma`` of a flat field (>= 1). Noise correlated over more than
        `lag` voxels by the reconstruction raises the ratio of real air above 1; raise it (or
        `lag`) for such data.
    tiles : int
        Sub-boxes per axis of tests 2 and 3.
    lag : int
        Distance of the voxel pairs of ``haar_sigma``, voxels.
    client : distributed.Client, optional

    Returns
    -------
    box : tuple of (int, int) or None
        The chosen slab, ``(start, stop)`` voxel indices per axis, or None when no candidate
        is flat.
    candidates : list of dict
        Every candidate: ``face`` (``"z-"``: low side of z, ``"z+"``: high side, ...;
        ``"all"``), ``box``, ``n_voxels``, and when examined ``mean``, ``sigma``,
        ``haar_sigma`` (at `lag`), ``ratio``, ``tile_mean_dev`` (in haar_sigma), ``tile_sigma_dev``
        (relative), ``flat`` and ``why`` (the failed tests).
    """
    from .io import open_volume

    _check_finder_options(margin, min_thickness, min_voxels, max_ratio, tiles, lag)
    g, lab = open_volume(grey), open_volume(labels)
    if lab.shape != g.shape:
        raise GrapesInputError(f"grey has shape {g.shape} and labels {lab.shape}: give the labels of this grey "
                               "volume (same shape)")
    best, cands = _find_empty(g, lab, margin=margin, min_thickness=int(min_thickness),
                              min_voxels=int(min_voxels), max_ratio=float(max_ratio), tiles=int(tiles), client=client,
                              lag=int(lag))
    for c in cands:
        c.pop("m2", None)
    return (None if best is None else best["box"]), cands


# -- the peak of a box's histogram ---------------------------------------------------------------


def _block_hist(block: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of a block's finite grey levels in the bins of `edges`, plus underflow (first)
    and overflow (last), shaped ``(1,) * ndim + (len(edges) + 1,)``."""
    v = np.asarray(block).ravel()
    if v.dtype.kind == "f":
        v = v[np.isfinite(v)]
    v = v.astype(np.float64)
    idx = np.searchsorted(edges, v, side="right")  # 0: below edges[0]; len(edges): at or above the last edge
    counts = np.bincount(idx, minlength=len(edges) + 1).astype(np.int64)
    return counts.reshape((1,) * np.ndim(block) + (len(edges) + 1,))


def _hist_edges(mean: float, sigma: float, integer: bool) -> np.ndarray:
    """Bins for the peak: +-8 sigma around the mean, 1/50 sigma wide (float grey) or whole grey
    levels centred on integers (integer grey; wider when sigma is large, at most 4096 bins)."""
    half = 8.0 * max(sigma, 1e-12)
    if integer:
        w = max(1, int(math.ceil(2 * half / 4096)))
        lo = math.floor(mean - half) - 0.5
        nb = int(math.ceil(2 * half / w)) + 2
        return lo + w * np.arange(nb + 1, dtype=np.float64)
    w = max(sigma, 1e-12) / 50.0
    return (mean - half) + w * np.arange(int(round(2 * half / w)) + 1, dtype=np.float64)


def _hist_quantile(edges: np.ndarray, counts: np.ndarray, q: float) -> float:
    """Quantile `q` of a histogram (counts with under/overflow at both ends), linear within the
    bin that holds it; NaN if it falls in the under/overflow."""
    n = float(counts.sum())
    if n == 0:
        return math.nan
    target = q * n
    cum = np.cumsum(counts)
    k = int(np.searchsorted(cum, target, side="left"))  # first cum >= target
    if k == 0 or k == len(counts) - 1:
        return math.nan
    before = float(cum[k - 1])
    inside = float(counts[k])
    frac = (target - before) / inside if inside > 0 else 0.5
    return float(edges[k - 1] + frac * (edges[k] - edges[k - 1]))


def _peak_graph(g, box: tuple, mean: float, sigma: float):
    import dask.array as da

    sub = g[tuple(slice(a, b) for a, b in box)]
    edges = _hist_edges(mean, sigma, np.issubdtype(sub.dtype, np.integer) or sub.dtype == bool)
    out_chunks = tuple((1,) * len(c) for c in sub.chunks) + ((len(edges) + 1,),)
    h = da.map_blocks(_block_hist, sub, edges, new_axis=sub.ndim, chunks=out_chunks, dtype=np.int64)
    return edges, h.sum(axis=tuple(range(sub.ndim)))


def _peak_from(edges, counts, mean, sigma) -> tuple:
    if sigma == 0 or not np.isfinite(sigma):
        return float(mean), 0.0 if sigma == 0 else math.nan
    counts = np.asarray(counts, np.int64)
    med = _hist_quantile(edges, counts, 0.5)
    iqr = _hist_quantile(edges, counts, 0.75) - _hist_quantile(edges, counts, 0.25)
    return med, float(iqr / 1.3489795003921634)


def estimate_noise(grey, labels=None, *, region=None, margin=3, max_voxels: int | None = None, client=None,
                   mode: str = "auto", min_thickness: int = 4, min_voxels: int = 1000,
                   max_ratio: float = 1.2, lag: int = 2) -> NoiseEstimate:
    """Standard deviation of the image noise ``sigma_bg`` (paper eq. 1), out of core.

    The sample standard deviation (ddof=1) of grey levels where the image should be flat,
    ``sigma_bg`` being "the standard deviation of the image background": empty space.

    - ``region`` given: every voxel of that box, e.g. empty space above the sample
      (``source="region"``; `labels` is not needed);
    - else, with ``mode="auto"`` (default) or ``"empty_space"``: the empty space found by
      :func:`find_empty_space` (a label-free slab at a face of the volume that passes its
      flat-field test; ``source="empty_space"``, `region` records the slab);
    - else (``mode="background"``, or ``"auto"`` when no empty space is found, with a
      :class:`GrapesBackgroundWarning` recorded in ``warning``): the background voxels (label 0)
      at least `margin` voxels (Euclidean, in voxel indices) from every particle voxel, away
      from the particles' rims and blur (``source="background"``). The volume's outside counts
      as background. Pores, binder and carbon between particles have a texture that inflates
      this estimate above the noise.

    For a box (region or empty space), ``peak`` and ``spread`` describe its histogram peak (the
    beam-stability check of :func:`grapes_dask.track.track` compares them across states).

    Stages, per chunk with dask (no task holds more than a chunk and its halo):

    1. empty space: one reduction of the labels per axis, then per candidate slab the
       per-chunk moments of its sub-boxes and the sums of squared neighbour differences;
    2. background: the far-background mask from the labels read with a halo of
       ``ceil(margin) - 1`` voxels (:func:`dask.array.map_overlap`; the outside of the volume
       is background) and an exact squared distance transform of each block (``edt``); a
       particle voxel nearer than `margin` to a chunk's voxel lies within the halo, so the
       mask is exact;
    3. per chunk, the count, mean and sum of squared deviations of the selected finite grey
       levels in float64, combined exactly (Chan et al.'s parallel formula);
    4. for a box, per chunk a histogram (+-8 sigma around the mean; 1/50 sigma bins for float
       grey, whole grey levels for integer grey), summed, and its median and quartiles.

    Parameters
    ----------
    grey : path, numpy.ndarray, dask.array.Array or Volume, shape (Z, Y, X) or (Y, X)
        Grey-level volume (anything :func:`grapes_dask.open_volume` opens).
    labels : same kinds, same shape, optional
        Label volume, 0 for background. Needed without `region`.
    region : tuple, optional
        The box, one ``slice`` or ``(start, stop)`` pair of voxel indices per axis (z, y, x);
        ``None`` for a bound means the volume's edge. No negative indices, no steps.
    margin : float
        Distance from every particle voxel, voxels (background mode), and from the labelled
        planes (empty space). 0 takes every background voxel; a background voxel next to a
        particle is at distance 1.
    max_voxels : int, optional
        At most this many voxels are examined (of the box, or of the volume in background
        mode): beyond it, an evenly spread subset of whole chunks is used (at least one
        chunk). The empty-space search reads its slabs whole. Default: all.
    client : distributed.Client, optional
        Compute on this cluster (default: the current dask scheduler).
    mode : {"auto", "empty_space", "background"}
        Without `region`: empty space, else the background with a warning (``"auto"``); empty
        space or an error (``"empty_space"``); the background between particles
        (``"background"``, the estimate of earlier versions).
    min_thickness, min_voxels, max_ratio, lag
        Of :func:`find_empty_space` (voxels, voxels, ratio, voxels).

    Returns
    -------
    NoiseEstimate
        ``sigma`` and ``mean`` in grey levels, ``n_voxels``, ``source``, ``region``, ``margin``,
        ``peak`` and ``spread`` (grey levels, for a box), ``warning``, ``candidates``.

    Raises
    ------
    GrapesInputError
        Before any compute: grey and labels of different shapes, no labels and no region, a
        region outside the volume or empty, a negative margin, an unknown mode. After it: no
        background voxel (or fewer than 2) far enough from the particles (lower `margin` or
        give `region`), a region of fewer than 2 finite grey levels, or no empty space with
        ``mode="empty_space"``.
    """
    import warnings

    import dask.array as da

    from .io import open_volume
    from .table import _compute

    if mode not in ("auto", "empty_space", "background"):
        raise GrapesInputError(f"mode={mode!r}: choose 'auto' (empty space, else the background between particles, "
                               "with a warning), 'empty_space' or 'background'")
    g = open_volume(grey)
    lab = None if labels is None else open_volume(labels)
    if lab is not None and lab.shape != g.shape:
        raise GrapesInputError(f"grey has shape {g.shape} and labels {lab.shape}: give the labels of this grey "
                               "volume (same shape)")
    if max_voxels is not None and (isinstance(max_voxels, bool) or not isinstance(max_voxels, (int, np.integer))
                                   or max_voxels < 2):
        raise GrapesInputError(f"max_voxels={max_voxels!r}: give a number of voxels >= 2, or None for all")
    nd = g.ndim
    warning, cands = None, []
    if region is not None:
        box = _parse_region(region, g.shape)
        if math.prod(b - a for a, b in box) < 2:
            raise GrapesInputError(f"region={box}: the box holds one voxel; give a larger box (a standard deviation "
                                   "needs at least 2)")
        return _box_estimate(g, box, "region", None, max_voxels, client)
    if lab is None:
        raise GrapesInputError("give {labels} (background voxels are label 0), or a {region} of empty space "
                               "(e.g. above the sample)", labels=None, region=None)
    if isinstance(margin, bool) or not isinstance(margin, (int, float, np.integer, np.floating)) \
            or not (np.isfinite(margin) and margin >= 0):
        raise GrapesInputError(f"margin={margin!r}: give a distance from the particles in voxels (>= 0)")
    if mode != "background":
        _check_finder_options(margin, min_thickness, min_voxels, max_ratio, 3, lag)
        lab_g = lab if lab.chunks == g.chunks else lab.rechunk(g.chunks)
        best, cands = _find_empty(g, lab_g, margin=margin, min_thickness=int(min_thickness),
                                  min_voxels=int(min_voxels), max_ratio=float(max_ratio), tiles=3, client=client,
                                  lag=int(lag))
        for c in cands:
            m2 = c.pop("m2", None)
            if best is c:
                best_m2 = m2
        if best is not None:
            n, mean = best["n_voxels"], best["mean"]
            sigma = math.sqrt(best_m2 / (n - 1))
            edges, h = _peak_graph(g, best["box"], mean, sigma)
            (counts,) = _compute(h, client=client)
            peak, spread = _peak_from(edges, counts, mean, sigma)
            return NoiseEstimate(sigma=sigma, mean=mean, n_voxels=int(n), source="empty_space", region=best["box"],
                                 margin=float(margin), peak=peak, spread=spread, candidates=tuple(cands))
        looked = "; ".join(f"{c['face']} {c['box']}: {c.get('why', '')}" for c in cands) or \
            "no label-free slab at any face"
        if mode == "empty_space":
            raise GrapesInputError(f"no empty space found ({looked}): give a {{region}} of empty space, or use "
                                   "mode='auto' or 'background'", region=None)
        warning = (f"no empty space found ({looked}): sigma_bg is estimated from the background between the "
                   "particles, whose texture (pores, binder, carbon) can inflate it above the noise; give a box of "
                   "empty space (noise_region / --noise-region) or the noise (noise_sigma / --noise-sigma)")
        warnings.warn(GrapesBackgroundWarning(warning), stacklevel=2)
    # a particle voxel nearer than `margin` is less than `margin` away along every axis
    depth = max(int(math.ceil(margin)) - 1, 0)
    if depth == 0:
        far = lab.map_blocks(_far_mask, float(margin) ** 2, dtype=bool)
    else:
        far = lab.map_overlap(_far_mask, depth=depth, boundary=0, dtype=bool, margin2=float(margin) ** 2)
    if g.chunks != far.chunks:
        g = g.rechunk(far.chunks)
    out_chunks = tuple((1,) * len(c) for c in g.chunks) + ((3,),)
    moments = da.map_blocks(_block_moments, g, far, new_axis=nd, chunks=out_chunks, dtype=np.float64)
    if max_voxels is not None and g.size > max_voxels:
        for ax, idx in enumerate(_spread_blocks(g.chunks, int(max_voxels))):
            moments = moments[(slice(None),) * ax + (idx,)]
    (m,) = _compute(moments, client=client)
    n, mean, m2 = _combine_moments(m)
    if n < 2:
        raise GrapesInputError(
            f"{n} background voxel(s) (label 0) at least margin={float(margin):g} voxels from every particle"
            f"{' in the chunks examined' if max_voxels is not None else ''}: lower {{margin}} (0 takes every "
            "background voxel), or give a {region} of empty space", margin=None, region=None)
    return NoiseEstimate(sigma=math.sqrt(m2 / (n - 1)), mean=mean, n_voxels=n, source="background", region=None,
                         margin=float(margin), warning=warning, candidates=tuple(cands))


def _box_estimate(g, box: tuple, source: str, margin, max_voxels, client) -> NoiseEstimate:
    """Moments and histogram peak of every voxel of a box (an evenly spread subset of its
    chunks beyond `max_voxels`): two computes, per chunk."""
    import dask.array as da

    from .table import _compute

    sub = g[tuple(slice(a, b) for a, b in box)]
    nd = sub.ndim
    out_chunks = tuple((1,) * len(c) for c in sub.chunks) + ((3,),)
    moments = da.map_blocks(_block_moments, sub, new_axis=nd, chunks=out_chunks, dtype=np.float64)
    pick = None
    if max_voxels is not None and sub.size > max_voxels:
        pick = _spread_blocks(sub.chunks, int(max_voxels))
        for ax, idx in enumerate(pick):
            moments = moments[(slice(None),) * ax + (idx,)]
    (m,) = _compute(moments, client=client)
    n, mean, m2 = _combine_moments(m)
    if n < 2:
        raise GrapesInputError(f"region={box} holds {n} finite grey level(s): give a box of empty space with "
                               "finite grey levels")
    sigma = math.sqrt(m2 / (n - 1))
    edges = _hist_edges(mean, sigma, np.issubdtype(sub.dtype, np.integer) or sub.dtype == bool)
    hc = tuple((1,) * len(c) for c in sub.chunks) + ((len(edges) + 1,),)
    h = da.map_blocks(_block_hist, sub, edges, new_axis=nd, chunks=hc, dtype=np.int64)
    if pick is not None:
        for ax, idx in enumerate(pick):
            h = h[(slice(None),) * ax + (idx,)]
    (counts,) = _compute(h.sum(axis=tuple(range(nd))), client=client)
    peak, spread = _peak_from(edges, counts, mean, sigma)
    return NoiseEstimate(sigma=sigma, mean=mean, n_voxels=int(n), source=source, region=box, margin=margin,
                         peak=peak, spread=spread)
