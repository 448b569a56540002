"""Population statistics of particle tables, with the paper's uncertainties.

The paper (Wade et al., sections 3.2) separates two kinds of uncertainty of a population mean
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._errors import GrapesInputError

__all__ = [
    "PopulationStats",
    "ZTestResult",
    "particle_sem",
    "change_sem",
    "population_stats",
    "change_stats",
    "z_test",
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
        return {prefix + k: getattr(self, k) for k in ("n", "mean", "sd", "ses", "sem", "se_tot")}


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
    if not (np.isfinite(noise_sigma) and noise_sigma >= 0):
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
    if not (np.isfinite(sigma) and sigma > 0):
        raise GrapesInputError(f"sigma={sigma!r}: give the significance level in standard deviations (> 0)")
    for name, n in (("n1", n1), ("n2", n2)):
        if not (np.isfinite(n) and n >= 1):
            raise GrapesInputError(f"{name}={n!r}: a sample needs at least one particle")
    for name, v in (("mean1", mean1), ("sd1", sd1), ("mean2", mean2), ("sd2", sd2)):
        if not np.isfinite(v):
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
