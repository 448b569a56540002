"""Analyses after the paper: noise-aware change per particle, per-layer changes, trajectories, trends.

These work on the tables of an operando :class:`grapes_dask.track.Tracking` (its long table
``particles``, the per-state particle tables ``tables`` with their radial profiles, the noise
``params["noise"]``), with pandas, numpy and scipy only; kept particles only (``excluded``
False). Grey levels throughout; radial layers are one voxel thick (layer 1 = the surface).

- :func:`classify`: each particle and state ``darker`` / ``brighter`` / ``unchanged`` from its
  change against the reference and the change's measurement uncertainty (paper eq. 1-2), with
  the share of each class per state and its uncertainty, beside the paper's plain share of
  decreases (fig. 9), which an unchanged population fills to about 50% by noise alone.
- :func:`layer_changes`: per state and radial layer, the mean change of the particles'
  per-layer grey level (core against shell), with its sampling and measurement errors.
- :func:`trajectories`: every kept particle's change through the states, a sample of them,
  and the population band (mean, quantiles) per state.
- :func:`trend`: ordinary least-squares slope of the per-particle change against a continuous
  covariate (position along an axis, volume, sphericity), with its t confidence interval;
  :func:`linear_fit` is the fit itself on two arrays.

The definitions, with their formulas, are in ``docs/statistics.md`` ("After the paper").
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ._errors import GrapesInputError

__all__ = [
    "CLASSES",
    "Classification",
    "classify",
    "wilson_interval",
    "LayerChanges",
    "layer_changes",
    "Trajectories",
    "trajectories",
    "LineFit",
    "linear_fit",
    "Trend",
    "trend",
]

CLASSES = ("darker", "unchanged", "brighter")
_PROFILE = "radial_layers_graylevel"
_COUNT = "radial_layers_count"
_WILSON_CONFIDENCE = 0.95


# --------------------------------------------------------------------------------------------
# access to a Tracking (used through its attributes only)
# --------------------------------------------------------------------------------------------


def _check_tracking(tracking, needs=("particles", "states", "reference", "params")):
    for attr in needs:
        if not hasattr(tracking, attr):
            raise GrapesInputError(f"tracking has no {attr!r}: give the result of grapes_dask.track.track()")
    p = tracking.particles
    missing = [c for c in ("label", "state", "roi_mean", "roi_voxels", "excluded") if c not in p.columns]
    if missing:
        raise GrapesInputError(f"tracking.particles lacks the columns {missing}: give the result of "
                               "grapes_dask.track.track()")
    return tracking


def _states(tracking) -> list[str]:
    return [str(s) for s in tracking.states]


def _check_state(tracking, state, what: str = "state") -> str:
    names = _states(tracking)
    if state is None or str(state) not in names:
        raise GrapesInputError(f"{what}={state!r} is not among the states {names}: use one of them")
    return str(state)


def _reference(tracking, reference) -> str:
    return _check_state(tracking, tracking.reference if reference is None else reference, "reference")


def _targets(tracking, states, reference: str) -> list[str]:
    """The states compared with `reference`: given (one name or several), or every other state."""
    if states is None:
        return [s for s in _states(tracking) if s != reference]
    if isinstance(states, str):
        states = [states]
    return [_check_state(tracking, s) for s in states]


def _wide(tracking, column: str) -> pd.DataFrame:
    """label x state table of `column`, kept particles only, rows sorted by label."""
    p = tracking.particles
    p = p[~p["excluded"].to_numpy(dtype=bool)]
    w = p.pivot(index="label", columns="state", values=column)
    w.columns = [str(c) for c in w.columns]
    return w.reindex(columns=_states(tracking)).sort_index()


def _sigma(tracking, state: str) -> float:
    noise = tracking.params.get("noise", {}) if isinstance(tracking.params, dict) else {}
    try:
        sigma = float(noise[state]["sigma"])
    except (KeyError, TypeError, ValueError):
        raise GrapesInputError(f"tracking.params['noise'] has no sigma for state {state!r}: give the result of "
                               "grapes_dask.track.track(), which records the noise of every state") from None
    if not (math.isfinite(sigma) and sigma >= 0):
        raise GrapesInputError(f"the noise sigma of state {state!r} is {sigma!r}: track it again with "
                               "noise_sigma, a number >= 0 (grey levels)")
    return sigma


def _change_and_sem(tracking, state: str, reference: str):
    """(labels, delta, sem_delta) of the kept particles with a finite change: eq. 1 and 2."""
    from .stats import change_sem, particle_sem

    mean, vox = _wide(tracking, "roi_mean"), _wide(tracking, "roi_voxels")
    a, b = mean[reference].to_numpy(float), mean[state].to_numpy(float)
    sem_a = particle_sem(np.nan_to_num(vox[reference].to_numpy(float)), _sigma(tracking, reference))
    sem_b = particle_sem(np.nan_to_num(vox[state].to_numpy(float)), _sigma(tracking, state))
    delta = b - a
    sem = change_sem(sem_a, sem_b)
    ok = np.isfinite(delta) & np.isfinite(sem)
    return mean.index.to_numpy()[ok].astype(np.uint64), delta[ok], sem[ok]


def _whole(value, lo: int) -> bool:
    """True when `value` is a whole number >= lo (not a bool, not text)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.number)):
        return False
    return math.isfinite(float(value)) and float(value) == int(value) and int(value) >= lo


def _level(value) -> bool:
    """True when `value` is a number strictly between 0 and 1."""
    return isinstance(value, (numbers.Real, np.number)) and not isinstance(value, bool) and 0 < float(value) < 1


def _z(delta: np.ndarray, sem: np.ndarray) -> np.ndarray:
    """delta / sem; where sem is 0, +-inf by the sign of delta (0 where delta is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = delta / sem
    return np.where(sem > 0, z, np.sign(delta) * np.where(delta != 0, np.inf, 0.0))


# --------------------------------------------------------------------------------------------
# 1. classification
# --------------------------------------------------------------------------------------------


def wilson_interval(k, n, confidence: float = _WILSON_CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion ``k / n``.

    Parameters
    ----------
    k, n : array-like of int
        Successes and trials (NaN interval where ``n == 0``).
    confidence : float
        Two-sided confidence level (0.95: ``z = 1.96``).

    Returns
    -------
    low, high : numpy.ndarray of float
        ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``p = k/n``. Unlike
        ``p -+ z sqrt(p(1-p)/n)``, it does not collapse to a point at ``k = 0`` or ``k = n``.
    """
    from scipy.stats import norm

    if not _level(confidence):
        raise GrapesInputError(f"confidence={confidence!r}: give a level between 0 and 1 (0.95)")
    k = np.asarray(k, float)
    n = np.asarray(n, float)
    z = float(norm.isf((1 - confidence) / 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = np.where(n > 0, np.where(k == 0, 0.0, np.clip(centre - half, 0.0, 1.0)), np.nan)
    high = np.where(n > 0, np.where(k == n, 1.0, np.clip(centre + half, 0.0, 1.0)), np.nan)
    return low, high


@dataclass(frozen=True, eq=False)
class Classification:
    """Noise-aware change of every kept particle against a reference (:func:`classify`).

    Attributes
    ----------
    k : float
        Threshold in standard errors: ``darker`` where ``z < -k``, ``brighter`` where
        ``z > k``, ``unchanged`` otherwise (``|z| = k`` is unchanged).
    reference : str
        The state the changes are against.
    states : list of str
        The states classified (every state but the reference by default).
    particles : pandas.DataFrame
        One row per (kept particle, state), by state then label: ``label`` (uint64), ``state``,
        ``delta`` (``roi_mean`` in the state minus in the reference, grey levels),
        ``sem_delta`` (eq. 2: ``sqrt(sigma_ref^2 / n_ref + sigma_state^2 / n_state)`` with
        ``n`` the ROI voxels and ``sigma`` each state's noise, grey levels), ``z``
        (``delta / sem_delta``) and ``class`` (ordered Categorical of :data:`CLASSES`).
    fractions : pandas.DataFrame
        Indexed by state: ``n`` (particles), ``n_darker``, ``n_unchanged``, ``n_brighter``; for
        each class C its share ``C``, binomial standard error ``C_se`` (``sqrt(p (1 - p) / n)``)
        and Wilson 95% interval ``C_lo``, ``C_hi``; and the paper's plain share of decreases
        (fig. 9: ``delta < 0``, whatever its size) ``plain_darker``, ``plain_darker_se``,
        ``n_plain_darker``.
    null_rate : float
        Expected share per side for a particle that did not change, if its ``z`` is standard
        normal: ``norm.sf(k)`` (0.00135 at k = 3). The expected ``darker`` (and ``brighter``)
        share of an unchanged population.
    """

    k: float
    reference: str
    states: list
    particles: pd.DataFrame
    fractions: pd.DataFrame
    null_rate: float


def _check_k(k) -> float:
    kk = float(k) if isinstance(k, (numbers.Real, np.number)) and not isinstance(k, bool) else math.nan
    if not (math.isfinite(kk) and kk > 0):
        raise GrapesInputError(f"k={k!r}: give the threshold in standard errors, a number > 0 (3.0: the paper's "
                               "3 SE)")
    return kk


def classify(tracking, k: float = 3.0, reference: str | None = None, states=None) -> Classification:
    """Each kept particle darker, brighter or unchanged, from its change and that change's noise.

    For particle ``i`` in state ``s`` against the reference ``r``::

        delta_i = roi_mean_i(s) - roi_mean_i(r)                                  grey levels
        sem_i   = sqrt(sigma_r^2 / n_i(r) + sigma_s^2 / n_i(s))                  eq. 1, 2
        z_i     = delta_i / sem_i

    with ``n`` the ROI voxels and ``sigma`` the noise of each state recorded by the tracking.
    ``darker`` when ``z_i < -k``, ``brighter`` when ``z_i > k``, ``unchanged`` otherwise. Where
    ``sem_i = 0`` (noise 0), any non-zero change is classified by its sign.

    Parameters
    ----------
    tracking : Tracking
        The result of :func:`grapes_dask.track.track`.
    k : float
        Threshold in standard errors (> 0). At k = 3 a particle that did not change is
        called darker with probability ``norm.sf(3) = 0.13%``.
    reference : str, optional
        The state changes are against (default: the tracking's reference). Another state
        compares with it instead: ``reference="4.4 V"`` and ``states="2.5 V"`` asks which
        particles brightened on discharge.
    states : str or list of str, optional
        States to classify (default: every state but `reference`).

    Returns
    -------
    Classification
        The long table (one row per kept particle and state) and the shares per state with
        their binomial standard errors and Wilson 95% intervals, beside the paper's plain
        share of decreases.

    Raises
    ------
    GrapesInputError
        `k` not a number > 0; a state or reference not among the tracking's states; no noise
        recorded for a state.
    """
    from scipy.stats import norm

    _check_tracking(tracking)
    k = _check_k(k)
    ref = _reference(tracking, reference)
    targets = _targets(tracking, states, ref)
    parts, rows = [], []
    for s in targets:
        labels, delta, sem = _change_and_sem(tracking, s, ref)
        z = _z(delta, sem)
        cls = np.where(z < -k, "darker", np.where(z > k, "brighter", "unchanged"))
        parts.append(pd.DataFrame({"label": labels, "state": s, "delta": delta, "sem_delta": sem, "z": z,
                                   "class": cls}))
        n = len(labels)
        row = {"state": s, "n": n}
        for c in CLASSES:
            row[f"n_{c}"] = int((cls == c).sum())
        for c in CLASSES:
            p = row[f"n_{c}"] / n if n else math.nan
            lo, hi = wilson_interval(row[f"n_{c}"], n)
            row.update({c: p, f"{c}_se": math.sqrt(p * (1 - p) / n) if n else math.nan,
                        f"{c}_lo": float(lo), f"{c}_hi": float(hi)})
        m = int((delta < 0).sum())
        pm = m / n if n else math.nan
        row.update({"n_plain_darker": m, "plain_darker": pm,
                    "plain_darker_se": math.sqrt(pm * (1 - pm) / n) if n else math.nan})
        rows.append(row)
    cols = ["label", "state", "delta", "sem_delta", "z", "class"]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)
    table["label"] = table["label"].astype(np.uint64)
    table["state"] = pd.Categorical(table["state"].astype(str), categories=targets, ordered=True)
    table["class"] = pd.Categorical(table["class"].astype(str), categories=list(CLASSES), ordered=True)
    fractions = pd.DataFrame(rows).set_index("state")
    for c in ["n"] + [f"n_{c}" for c in CLASSES] + ["n_plain_darker"]:
        fractions[c] = fractions[c].astype(np.int64)
    return Classification(k=k, reference=ref, states=targets, particles=table[cols], fractions=fractions,
                          null_rate=float(norm.sf(k)))


# --------------------------------------------------------------------------------------------
# 2. per-layer changes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LayerChanges:
    """Mean change of the particles' per-layer grey level, per state and layer (:func:`layer_changes`).

    Attributes
    ----------
    reference : str
        The state the changes are against.
    states : list of str
        The states compared with it.
    align : {"surface", "relative"}
        ``"surface"``: layer k is the k-th one-voxel layer from the surface (1 = surface), as
        the particle table; ``"relative"``: depth bins 1..bins of each particle's ROI layers,
        from its surface (bin 1, the shell) to its core (bin `bins`).
    bins : int or None
        Number of depth bins (``"relative"`` only).
    exclude_outer_layers : int
        Layers 1..N left out (N = 0: none).
    table : pandas.DataFrame
        One row per (state, layer): ``state``, ``layer`` (layer number, or bin 1..bins),
        ``depth_lo``, ``depth_hi`` (``"relative"``: the bin's share of the ROI depth, 0 at its
        outer edge, 1 at the core), ``n`` (particles with that layer in both states),
        ``reference_mean`` and ``state_mean`` (their mean grey level in the layer),
        ``delta_mean`` (mean of the per-particle changes), ``delta_sd`` (ddof 1), ``ses``
        (``delta_sd / sqrt(n)``, eq. 4), ``sem`` (``sqrt(mean(sem_i^2))``, eq. 3 of the
        per-particle measurement errors) and ``se_tot`` (``sqrt(ses^2 + sem^2)``, eq. 5).
        Grey levels. Statistics of fewer than 2 particles are NaN (the mean of none too).
    particles : pandas.DataFrame
        One row per (particle, state, layer) with a value: ``label``, ``state``, ``layer``,
        ``delta`` and its measurement error ``sem`` (grey levels), ``count_reference`` and
        ``count_state`` (voxels averaged).
    """

    reference: str
    states: list
    align: str
    bins: int | None
    exclude_outer_layers: int
    table: pd.DataFrame
    particles: pd.DataFrame


def _profiles(tracking, state: str, labels: np.ndarray):
    """(grey, count) matrices of the kept particles `labels` in `state`, NaN / 0 padded."""
    from .stats import profile_matrix

    tables = getattr(tracking, "tables", None)
    if not isinstance(tables, dict) or state not in tables:
        raise GrapesInputError(f"tracking has no particle table of state {state!r} (tracking.tables): give the "
                               "result of grapes_dask.track.track()")
    t = tables[state]
    missing = [c for c in ("label", _PROFILE, _COUNT) if c not in t.columns]
    if missing:
        raise GrapesInputError(f"the particle table of state {state!r} lacks {missing}: per-layer changes need the "
                               "radial profiles of grapes_dask.table.analyze (tables read with "
                               "grapes_dask.read_table keep them)")
    t = t.assign(label=t["label"].to_numpy().astype(np.uint64)).drop_duplicates("label").set_index("label")
    present = np.isin(labels, t.index.to_numpy())
    if not present.all():
        raise GrapesInputError(f"the particle table of state {state!r} lacks the kept particles "
                               f"{labels[~present][:5].tolist()}: give the tables the tracking was made from")
    t = t.loc[labels].reset_index()
    g = profile_matrix(t, _PROFILE)
    c = np.nan_to_num(profile_matrix(t, _COUNT), nan=0.0)
    return g, c


def _pad(m: np.ndarray, k: int, fill) -> np.ndarray:
    if m.shape[1] >= k:
        return m[:, :k]
    out = np.full((m.shape[0], k), fill, dtype=float)
    out[:, : m.shape[1]] = m
    return out


def _column_stats(d: np.ndarray, sem: np.ndarray, g_ref: np.ndarray, g_st: np.ndarray) -> dict:
    """Per column of `d` (NaN = no value): n, means, sd, ses, sem (eq. 3), se_tot (eq. 5)."""
    ok = np.isfinite(d)
    n = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, d, 0.0).sum(axis=0) / n
        dev = np.where(ok, d - mean, 0.0)
        sd = np.where(n > 1, np.sqrt((dev * dev).sum(axis=0) / (n - 1)), np.nan)
        ses = sd / np.sqrt(n)
        sem_pop = np.where(n > 1, np.sqrt(np.where(ok, sem * sem, 0.0).sum(axis=0) / n), np.nan)
        out = {
            "n": n.astype(np.int64),
            "reference_mean": np.where(n > 0, np.where(ok, g_ref, 0.0).sum(axis=0) / n, np.nan),
            "state_mean": np.where(n > 0, np.where(ok, g_st, 0.0).sum(axis=0) / n, np.nan),
            "delta_mean": np.where(n > 0, mean, np.nan),
            "delta_sd": sd,
            "ses": ses,
            "sem": sem_pop,
            "se_tot": np.sqrt(ses * ses + sem_pop * sem_pop),
        }
    return out


def _relative_bins(g, c, depth_layers: np.ndarray, n_out: int, bins: int):
    """Per particle and depth bin: count-weighted grey level and voxel count; (N, bins) each.

    Layer j (1-based) of a particle with K reference layers sits at ROI depth
    ``(j - N - 0.5) / (K - N)`` (N = `n_out`), in bin ``floor(depth * bins) + 1``.
    """
    npart, kmax = g.shape
    j = np.arange(1, kmax + 1)[None, :]
    m = (depth_layers - n_out).astype(float)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        depth = (j - n_out - 0.5) / m
    b = np.floor(depth * bins).astype(float)
    use = (j > n_out) & (j <= depth_layers[:, None]) & (m > 0) & (c > 0) & np.isfinite(g)
    b = np.where(use, b, -1).astype(np.int64)
    sums = np.zeros((npart, bins))
    counts = np.zeros((npart, bins))
    rows = np.broadcast_to(np.arange(npart)[:, None], b.shape)
    sel = b >= 0
    np.add.at(sums, (rows[sel], b[sel]), (c * np.where(np.isfinite(g), g, 0.0))[sel])
    np.add.at(counts, (rows[sel], b[sel]), c[sel])
    with np.errstate(invalid="ignore", divide="ignore"):
        grey = np.where(counts > 0, sums / counts, np.nan)
    return grey, counts


def layer_changes(tracking, states=None, *, reference: str | None = None, align: str = "surface", bins: int = 2,
                  exclude_outer_layers: int = 0, max_layer: int | None = None) -> LayerChanges:
    """Per state and radial layer, the kept particles' mean change of their layer grey level.

    For particle ``i``, layer ``j`` and state ``s`` against the reference ``r``, with ``g`` the
    mean grey level of the layer (``radial_layers_graylevel``) and ``c`` its voxels
    (``radial_layers_count``) in the state's particle table::

        d_ij   = g_ij(s) - g_ij(r)                                   grey levels
        sem_ij = sqrt(sigma_r^2 / c_ij(r) + sigma_s^2 / c_ij(s))     eq. 1, 2 per layer

    A particle counts in layer ``j`` when that layer holds voxels in both states. Per layer,
    over its ``n_j`` particles: the mean change, ``SES_j = sd(d_.j) / sqrt(n_j)`` (eq. 4: the
    sampling error, which already contains the noise of each particle's layer mean),
    ``SEM_j = sqrt(mean(sem_.j^2))`` (eq. 3) and ``SE_tot_j = sqrt(SES_j^2 + SEM_j^2)`` (eq. 5,
    conservative, as the paper's).

    Parameters
    ----------
    tracking : Tracking
        The result of :func:`grapes_dask.track.track` (its ``tables`` hold the profiles).
    states : str or list of str, optional
        States to compare with the reference (default: every other state).
    reference : str, optional
        Default: the tracking's reference.
    align : {"surface", "relative"}
        How layers of particles of different sizes are put together. ``"surface"``: by layer
        number from the surface (layer k = k voxels deep, as the paper's fig. 6; deep layers are
        reached only by the larger particles, so ``n`` falls with k). ``"relative"``: each
        particle's layers ``N+1..K`` (``K`` its number of layers in the reference, N =
        `exclude_outer_layers`) are placed at ROI depth ``t = (j - N - 0.5) / (K - N)`` (0 at
        the outer edge, 1 at the centre) and pooled into `bins` equal depth bins, the grey level
        of a bin being the voxel-weighted mean of its layers (the same layers in both states);
        ``bins=2`` is shell against core.
    bins : int
        Depth bins of ``align="relative"`` (>= 1).
    exclude_outer_layers : int
        Leave out layers 1..N (the phase-contrast rim; 0 keeps all).
    max_layer : int, optional
        ``align="surface"``: report layers up to this one (default: the deepest).

    Returns
    -------
    LayerChanges

    Raises
    ------
    GrapesInputError
        An unknown state, `align` or bad number; tables without radial profiles.
    """
    _check_tracking(tracking, needs=("particles", "states", "reference", "params", "tables"))
    if align not in ("surface", "relative"):
        raise GrapesInputError(f"align={align!r}: choose 'surface' (layer number from the surface) or 'relative' "
                               "(depth bins from shell to core)")
    if not _whole(exclude_outer_layers, 0):
        raise GrapesInputError("{exclude_outer_layers}: give a whole number of layers >= 0",
                               exclude_outer_layers=exclude_outer_layers)
    n_out = int(exclude_outer_layers)
    if align == "relative" and not _whole(bins, 1):
        raise GrapesInputError("{bins}: give a whole number of depth bins >= 1 (2: shell and core)", bins=bins)
    if max_layer is not None and not _whole(max_layer, 1):
        raise GrapesInputError("{max_layer}: give a layer number >= 1, or None for the deepest", max_layer=max_layer)
    ref = _reference(tracking, reference)
    targets = _targets(tracking, states, ref)
    labels = _wide(tracking, "roi_mean").index.to_numpy().astype(np.uint64)
    g_r, c_r = _profiles(tracking, ref, labels)
    sig_r = _sigma(tracking, ref)
    if align == "relative":
        # K: the deepest layer holding voxels in the reference (0 for none)
        k_ref = ((c_r > 0) * np.arange(1, c_r.shape[1] + 1)).max(axis=1, initial=0)
    rows, parts = [], []
    for s in targets:
        g_s, c_s = _profiles(tracking, s, labels)
        sig_s = _sigma(tracking, s)
        kk = max(g_r.shape[1], g_s.shape[1])
        gr, cr, gs, cs = _pad(g_r, kk, np.nan), _pad(c_r, kk, 0.0), _pad(g_s, kk, np.nan), _pad(c_s, kk, 0.0)
        if align == "surface":
            ok = (cr > 0) & (cs > 0) & np.isfinite(gr) & np.isfinite(gs)
            layer_no = np.arange(1, kk + 1)
            keep = layer_no > n_out
            if max_layer is not None:
                keep &= layer_no <= int(max_layer)
            gr, cr, gs, cs, ok, layer_no = gr[:, keep], cr[:, keep], gs[:, keep], cs[:, keep], ok[:, keep], \
                layer_no[keep]
            lo = hi = np.full(len(layer_no), np.nan)
        else:
            both = (cr > 0) & (cs > 0)  # the same layers in both states
            gr, cr = _relative_bins(gr, np.where(both, cr, 0.0), k_ref, n_out, int(bins))
            gs, cs = _relative_bins(gs, np.where(both, cs, 0.0), k_ref, n_out, int(bins))
            ok = (cr > 0) & (cs > 0) & np.isfinite(gr) & np.isfinite(gs)
            layer_no = np.arange(1, int(bins) + 1)
            lo, hi = (layer_no - 1) / int(bins), layer_no / int(bins)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(ok, gs - gr, np.nan)
            sem = np.where(ok, np.sqrt(sig_r ** 2 / cr + sig_s ** 2 / cs), np.nan)
        st = _column_stats(d, sem, np.where(ok, gr, np.nan), np.where(ok, gs, np.nan))
        rows.append(pd.DataFrame({"state": s, "layer": layer_no.astype(np.int64), "depth_lo": lo, "depth_hi": hi,
                                  **st}))
        i, j = np.nonzero(ok)
        parts.append(pd.DataFrame({"label": labels[i], "state": s, "layer": layer_no[j].astype(np.int64),
                                   "delta": d[i, j], "sem": sem[i, j], "count_reference": cr[i, j].astype(np.int64),
                                   "count_state": cs[i, j].astype(np.int64)}))
    cols = ["state", "layer", "depth_lo", "depth_hi", "n", "reference_mean", "state_mean", "delta_mean", "delta_sd",
            "ses", "sem", "se_tot"]
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=cols)
    per = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["label", "state", "layer", "delta", "sem", "count_reference", "count_state"])
    for frame in (table, per):
        frame["state"] = pd.Categorical(frame["state"].astype(str), categories=targets, ordered=True)
    per["label"] = per["label"].astype(np.uint64)
    return LayerChanges(reference=ref, states=targets, align=align, bins=int(bins) if align == "relative" else None,
                        exclude_outer_layers=n_out, table=table[cols], particles=per)


# --------------------------------------------------------------------------------------------
# 3. trajectories
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Trajectories:
    """Every kept particle's change through the states, a sample, and the band (:func:`trajectories`).

    Attributes
    ----------
    reference : str
        The state the changes are against (its change is 0).
    states : list of str
        All states, in order.
    particles : pandas.DataFrame
        One row per (kept particle, state), by state then label: ``label``, ``state``,
        ``delta`` (grey levels; 0 in the reference), ``sem_delta`` (eq. 2; 0 in the
        reference), ``sampled`` (bool: the particle is in `sample`).
    sample : numpy.ndarray of uint64
        The sampled labels, sorted.
    band : pandas.DataFrame
        Indexed by state: ``n``, ``mean``, ``sd`` (ddof 1), ``ses`` (``sd / sqrt(n)``) and the
        quantiles of the changes, one column ``q<percent>`` each (``q5``, ``q25``, ``q50``,
        ``q75``, ``q95`` by default; linear interpolation, as :func:`numpy.quantile`). Grey
        levels.
    quantiles : tuple of float
        The quantile levels of `band`.
    """

    reference: str
    states: list
    particles: pd.DataFrame
    sample: np.ndarray
    band: pd.DataFrame
    quantiles: tuple


def _qname(q: float) -> str:
    return f"q{100 * q:g}"


def trajectories(tracking, n: int = 20, seed: int = 0, *, reference: str | None = None,
                 quantiles=(0.05, 0.25, 0.5, 0.75, 0.95)) -> Trajectories:
    """Per kept particle and state the change against the reference; a sample; the population band.

    Parameters
    ----------
    tracking : Tracking
        The result of :func:`grapes_dask.track.track`.
    n : int
        Particles in the sample (all of them when fewer are kept), drawn without replacement
        from the kept labels sorted in ascending order with ``numpy.random.default_rng(seed)``.
    seed : int
        Seed of the sample.
    reference : str, optional
        Default: the tracking's reference.
    quantiles : sequence of float
        Quantile levels (0-1) of the band.

    Returns
    -------
    Trajectories
        The long table, the sample, and per state the mean, sd, SES and quantiles of the
        changes (the distribution of changes per state).
    """
    _check_tracking(tracking)
    if not _whole(n, 0):
        raise GrapesInputError("{n}: give the number of particles to sample, a whole number >= 0", n=n)
    try:
        qs = tuple(float(q) for q in quantiles)
    except (TypeError, ValueError):
        qs = (math.nan,)
    if not qs or not all(0 <= q <= 1 for q in qs):
        raise GrapesInputError(f"quantiles={quantiles!r}: give levels between 0 and 1, e.g. (0.05, 0.5, 0.95)")
    ref = _reference(tracking, reference)
    names = _states(tracking)
    labels = _wide(tracking, "roi_mean").index.to_numpy().astype(np.uint64)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(labels, size=min(int(n), len(labels)), replace=False)) if len(labels) else labels
    parts, rows = [], []
    for s in names:
        if s == ref:
            lab = _change_and_sem(tracking, s, ref)[0]
            delta, sem = np.zeros(len(lab)), np.zeros(len(lab))
        else:
            lab, delta, sem = _change_and_sem(tracking, s, ref)
        parts.append(pd.DataFrame({"label": lab, "state": s, "delta": delta, "sem_delta": sem,
                                   "sampled": np.isin(lab, sample)}))
        m = len(delta)
        row = {"state": s, "n": m, "mean": float(delta.mean()) if m else math.nan,
               "sd": float(delta.std(ddof=1)) if m > 1 else math.nan}
        row["ses"] = row["sd"] / math.sqrt(m) if m > 1 else math.nan
        qv = np.quantile(delta, qs) if m else np.full(len(qs), np.nan)
        row.update({_qname(q): float(v) for q, v in zip(qs, qv)})
        rows.append(row)
    table = pd.concat(parts, ignore_index=True)
    table["label"] = table["label"].astype(np.uint64)
    table["state"] = pd.Categorical(table["state"], categories=names, ordered=True)
    band = pd.DataFrame(rows).set_index("state")
    band["n"] = band["n"].astype(np.int64)
    return Trajectories(reference=ref, states=names, particles=table, sample=sample.astype(np.uint64), band=band,
                        quantiles=qs)


# --------------------------------------------------------------------------------------------
# 4. trends against a covariate
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LineFit:
    """Ordinary least-squares line ``y = intercept + slope x`` with its t confidence interval.

    Attributes
    ----------
    n : int
        Points (finite x and y).
    slope, intercept : float
        ``slope = Sxy / Sxx``, ``intercept = mean(y) - slope mean(x)`` with ``Sxx = sum (x -
        mean x)^2``, ``Sxy = sum (x - mean x)(y - mean y)``. Units of y per unit of x, and of y.
    slope_se, intercept_se : float
        ``s / sqrt(Sxx)`` and ``s sqrt(1/n + mean(x)^2 / Sxx)``, with the residual standard
        deviation ``s = sqrt(sum residual^2 / (n - 2))``.
    ci_low, ci_high : float
        ``slope -+ t slope_se``, ``t`` the two-sided quantile of Student's t with ``n - 2``
        degrees of freedom at `confidence`.
    t_crit : float
        That ``t``.
    confidence : float
        The confidence level (0.95).
    r : float
        Pearson correlation of x and y, ``Sxy / sqrt(Sxx Syy)``.
    p : float
        Two-sided p-value of ``slope = 0`` (``t = slope / slope_se``, n - 2 degrees of freedom).
    residual_sd : float
        ``s``.
    x_mean, sxx : float
        ``mean(x)`` and ``Sxx`` (for :meth:`band`).
    """

    n: int
    slope: float
    intercept: float
    slope_se: float
    intercept_se: float
    ci_low: float
    ci_high: float
    t_crit: float
    confidence: float
    r: float
    p: float
    residual_sd: float
    x_mean: float
    sxx: float

    def predict(self, x) -> np.ndarray:
        """The fitted line at `x`."""
        return self.intercept + self.slope * np.asarray(x, float)

    def band(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Confidence band of the fitted mean at `x`: ``fit -+ t s sqrt(1/n + (x - mean x)^2 / Sxx)``."""
        x = np.asarray(x, float)
        half = self.t_crit * self.residual_sd * np.sqrt(1.0 / self.n + (x - self.x_mean) ** 2 / self.sxx)
        fit = self.predict(x)
        return fit - half, fit + half


def linear_fit(x, y, confidence: float = 0.95, *, what: str = "x") -> LineFit:
    """Ordinary least-squares slope of `y` on `x` with its t confidence interval.

    Parameters
    ----------
    x, y : array-like, shape (N,)
        Pairs; those with a non-finite value are left out.
    confidence : float
        Two-sided confidence level of the slope's interval and of :meth:`LineFit.band`.
    what : str
        Name of `x` for error messages.

    Returns
    -------
    LineFit

    Raises
    ------
    GrapesInputError
        Fewer than 3 finite pairs (no error can be estimated with 2), or `x` constant.
    """
    from scipy.stats import t as student_t

    x = np.asarray(x, float).ravel()
    y = np.asarray(y, float).ravel()
    if x.shape != y.shape:
        raise GrapesInputError(f"x has {x.size} values and y {y.size}: give one y per x")
    if not _level(confidence):
        raise GrapesInputError(f"confidence={confidence!r}: give a level between 0 and 1 (0.95)")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(x.size)
    if n < 3:
        raise GrapesInputError(f"{n} particle(s) with a finite {what} and change: a slope with an error needs at "
                               "least 3; track more particles, or choose a state or covariate where more are kept")
    xm, ym = float(x.mean()), float(y.mean())
    dx, dy = x - xm, y - ym
    sxx, sxy, syy = float(dx @ dx), float(dx @ dy), float(dy @ dy)
    if not sxx > 0:
        raise GrapesInputError(f"{what} takes one value ({xm:g}) on every particle: a slope needs a covariate that "
                               "varies; choose another")
    slope = sxy / sxx
    intercept = ym - slope * xm
    resid = dy - slope * dx
    s = math.sqrt(max(float(resid @ resid), 0.0) / (n - 2))
    slope_se = s / math.sqrt(sxx)
    intercept_se = s * math.sqrt(1.0 / n + xm * xm / sxx)
    t_crit = float(student_t.isf((1 - confidence) / 2, n - 2))
    r = sxy / math.sqrt(sxx * syy) if syy > 0 else math.nan
    if slope_se > 0:
        p = float(2 * student_t.sf(abs(slope / slope_se), n - 2))
    else:
        p = 0.0 if slope != 0 else 1.0
    return LineFit(n=n, slope=slope, intercept=intercept, slope_se=slope_se, intercept_se=intercept_se,
                   ci_low=slope - t_crit * slope_se, ci_high=slope + t_crit * slope_se, t_crit=t_crit,
                   confidence=float(confidence), r=r, p=p, residual_sd=s, x_mean=xm, sxx=sxx)


@dataclass(frozen=True, eq=False)
class Trend:
    """Per-particle change against a covariate, one least-squares line per state (:func:`trend`).

    Attributes
    ----------
    covariate : str
        The column (reference state's value).
    reference : str
        The state the changes are against.
    states : list of str
        The states fitted.
    fits : dict of str to LineFit
        One line per state.
    table : pandas.DataFrame
        Indexed by state: the fields of :class:`LineFit` (``n``, ``slope``, ``slope_se``,
        ``ci_low``, ``ci_high``, ``intercept``, ``intercept_se``, ``r``, ``p``, ...). Slopes in
        grey levels per unit of the covariate.
    data : pandas.DataFrame
        The points: ``label``, ``state``, ``x`` (covariate), ``delta`` (grey levels).
    """

    covariate: str
    reference: str
    states: list
    fits: dict
    table: pd.DataFrame
    data: pd.DataFrame

    def fit(self, state: str | None = None) -> LineFit:
        """The line of `state` (default: the only, or the last, state fitted)."""
        state = self.states[-1] if state is None else str(state)
        if state not in self.fits:
            raise GrapesInputError(f"state={state!r} was not fitted: choose one of {self.states}")
        return self.fits[state]


def _covariate(tracking, column: str, labels: np.ndarray) -> np.ndarray:
    """The reference state's `column` for `labels` (from the long table, else the reference table)."""
    p = tracking.particles
    ref = str(tracking.reference)
    cols = [str(c) for c in p.columns]
    tables = getattr(tracking, "tables", None) or {}
    ref_table = tables.get(ref)
    if column in p.columns and column not in ("label", "state", "excluded", "reason"):
        rows = p[p["state"].astype(str).to_numpy() == ref]
        series = rows.set_index(rows["label"].to_numpy().astype(np.uint64))[column]
    elif ref_table is not None and column in ref_table.columns and column != "label":
        series = ref_table.set_index(ref_table["label"].to_numpy().astype(np.uint64))[column]
        cols += [str(c) for c in ref_table.columns]
    else:
        extra = [] if ref_table is None else [str(c) for c in ref_table.columns]
        numeric = [c for c in dict.fromkeys(cols + extra) if c not in ("label", "state", "excluded", "reason")]
        raise GrapesInputError(f"covariate={column!r} is neither a column of tracking.particles nor of the reference "
                               f"particle table: choose e.g. 'centroid-2' (x position, voxels), 'volume' or "
                               f"'sphericity' (available: {numeric[:40]})")
    try:
        return series.reindex(labels).to_numpy(dtype=float)
    except (TypeError, ValueError):
        raise GrapesInputError(f"covariate={column!r} does not hold numbers: choose a numeric column") from None


def trend(tracking, covariate: str = "centroid-2", state=None, *, reference: str | None = None,
          confidence: float = 0.95) -> Trend:
    """Least-squares slope of the per-particle change against a continuous covariate, per state.

    The covariate is the reference state's value of a column of ``tracking.particles``
    (``volume``, ``centroid-0/1/2``: position along z, y, x in voxels, e.g. depth from the
    current collector) or of the reference particle table (``sphericity``,
    ``equivalent_diameter_volume``, ...). The change is ``delta`` of the kept particles
    (grey levels). Each point has the same weight (ordinary least squares): the slope's
    standard error comes from the scatter of the points about the line, which contains their
    measurement noise. Beside the quantile bars of the paper's fig. 8
    (:meth:`grapes_dask.track.Tracking.by_quantile`), one number with a confidence interval.

    Parameters
    ----------
    tracking : Tracking
        The result of :func:`grapes_dask.track.track`.
    covariate : str
        The column (see above).
    state : str or list of str, optional
        The states to fit (default: every state but the reference).
    reference : str, optional
        The state changes are against (default: the tracking's reference). The covariate is
        always read in the tracking's reference state.
    confidence : float
        Level of the slope's two-sided t interval.

    Returns
    -------
    Trend
        One :class:`LineFit` per state (``Trend.fit(state)``), their table, and the points.

    Raises
    ------
    GrapesInputError
        A covariate that is no column or not numeric, an unknown state, fewer than 3 particles,
        a covariate that does not vary.
    """
    _check_tracking(tracking)
    if not _level(confidence):
        raise GrapesInputError(f"confidence={confidence!r}: give a level between 0 and 1 (0.95)")
    ref = _reference(tracking, reference)
    targets = _targets(tracking, state, ref)
    fits, parts = {}, []
    for s in targets:
        labels, delta, _ = _change_and_sem(tracking, s, ref)
        x = _covariate(tracking, covariate, labels)
        fits[s] = linear_fit(x, delta, confidence, what=f"covariate {covariate!r} (state {s!r})")
        parts.append(pd.DataFrame({"label": labels, "state": s, "x": x, "delta": delta}))
    table = pd.DataFrame([{"state": s, **{k: getattr(f, k) for k in f.__dataclass_fields__}} for s, f in fits.items()]
                         ).set_index("state")
    data = pd.concat(parts, ignore_index=True)
    data["label"] = data["label"].astype(np.uint64)
    data["state"] = pd.Categorical(data["state"], categories=targets, ordered=True)
    return Trend(covariate=str(covariate), reference=ref, states=targets, fits=fits, table=table, data=data)
