"""Operando tracking: the same particles followed through states of charge (paper 2.4 and 3).

:func:`track` takes states in order, each a grey and a label volume (the same id is the same
particle in every state) or a particle table already computed by
:func:`grapes_dask.table.analyze`, and returns a :class:`Tracking`: one long table of
``(label, state)`` rows with the region-of-interest mean grey level, its change against the
reference state and their uncertainties (paper eq. 1-2), the cleaning decision per particle,
and the population statistics of the kept particles (eq. 3-6) by state, by position quantile,
as a share of darker particles, as z-tests, and the intra-particle change map of one particle.

Stages:

1. check every input before any voxel is read (:func:`_prepare`): at least two states, the
   reference among them, one shape (volumes' shapes read lazily, tables' recorded shape or
   bounding boxes), one voxel size, tables computed with the same analysis parameters as each
   other and as this run (``exclude_outer_layers`` above all), label volumes present where a
   rule needs them, a noise level for every state;
2. analyse the states given as volumes with :func:`grapes_dask.table.analyze_tables` on the
   given cluster (one analysis per state, each out of core);
3. the noise ``sigma_bg`` of each state: given, or :func:`grapes_dask.stats.estimate_noise`;
4. cleaning (:func:`_clean`), in this order, every particle kept in the table with all the
   reasons that apply:

   - ``inconsistent``: the label is missing in some state;
   - ``neighbour``: within ``neighbour_gap`` background voxels of an inconsistent label in a
     state where that label exists (:func:`neighbour_pairs`, out of core, one task per chunk);
   - ``border``: touches the volume border in any state;
   - ``empty_roi``: no voxel deeper than ``exclude_outer_layers`` in some state where it exists;
   - ``smallest``: among the particles no rule above excludes, the ``floor(drop_smallest * n)``
     smallest by reference volume (ties by label id), in the order of
     :func:`grapes_dask.stats.quantile_labels` (with ``drop_smallest = 1/q``: its group 1);

   fewer than 2 particles kept warns (:class:`grapes_dask.GrapesInputWarning`; the command
   line stops), under :data:`FEW_KEPT` of them too (:class:`FewParticlesWarning`), naming the
   rule that applies to the most particles and its option;
5. the long table (:attr:`Tracking.particles`) and its statistics (:mod:`grapes_dask.stats`).

The neighbour rule, exactly: labels ``A`` (inconsistent) and ``B != A`` (non-zero) are
neighbours with gap ``g >= 0`` in a state when some voxel of ``A`` and some voxel of ``B`` have
centres at most ``g + 1`` voxels apart (Euclidean distance in voxel units, whatever the
spacing). ``g = 0`` is sharing a face (6-connectivity, 4 in 2D, as the engine's contacts
table); ``g = 1`` adds edge and corner neighbours and one background voxel in between along an
axis; in general a straight run of at most ``g`` voxels separates them along an axis. The voxels
in between need not be background.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from dataclasses import dataclass
from typing import Mapping

import dask
import numpy as np
import pandas as pd

from ._errors import Alt, GrapesInputError
from .units import format_spacing, relative_spacing, to_voxels

__all__ = ["track", "Tracking", "Fraction", "ChangeMap", "neighbour_pairs", "REASONS", "FewParticlesWarning",
           "InheritedVoxelSizeWarning", "FEW_KEPT"]

REASONS = ("inconsistent", "neighbour", "border", "empty_roi", "smallest")

# analysis parameters that change roi_mean / roi_voxels / touches_border: tables must agree on them
_COMPARED = ("layer_width", "start_at", "black_border", "fill_holes", "max_hole_size", "exclude_outer_layers")
_TABLE_COLUMNS = ("label", "roi_mean", "roi_voxels", "touches_border")
_SPACING_RTOL = 1e-6


# --------------------------------------------------------------------------------------------
# result objects
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fraction:
    """Share of kept particles darker in `state_b` than in `state_a` (paper fig. 9).

    Attributes
    ----------
    state_a, state_b : str
        The two states compared.
    n : int
        Kept particles.
    n_darker : int
        Kept particles whose ``roi_mean`` is lower in `state_b` than in `state_a`.
    fraction : float
        ``n_darker / n`` (NaN when ``n == 0``).
    se : float
        Its binomial standard error ``sqrt(fraction (1 - fraction) / n)``.
    """

    state_a: str
    state_b: str
    n: int
    n_darker: int
    fraction: float
    se: float


@dataclass(frozen=True)
class ChangeMap:
    """Intra-particle grey-level change of one particle between the reference and a state (fig. 10).

    Attributes
    ----------
    label : int
        The particle.
    state, reference : str
        The state and the reference it is compared with.
    delta : numpy.ndarray of float32, shape of the box
        Smoothed state minus smoothed reference, grey levels, after re-registration of the
        state crop onto the reference crop; NaN outside `mask`.
    mask : numpy.ndarray of bool, shape of the box
        The particle in the reference without its outer N layers (layers as the engine:
        ``max(1, round(d / layer_width))`` with ``d`` the distance to the surface), and only
        where the shifted state crop has data.
    shift : tuple of float
        Translation applied to the state crop, voxels per axis (``scipy.ndimage.shift``).
    origin : tuple of int
        Index in the volume of the box's first voxel.
    spacing : tuple of float
        Voxel size per axis.
    """

    label: int
    state: str
    reference: str
    delta: np.ndarray
    mask: np.ndarray
    shift: tuple
    origin: tuple
    spacing: tuple


# --------------------------------------------------------------------------------------------
# 1. inputs
# --------------------------------------------------------------------------------------------


@dataclass
class _State:
    name: str
    grey: object = None  # grapes_dask.io.Volume or None
    labels: object = None  # grapes_dask.io.Volume or None
    table: pd.DataFrame | None = None
    contacts: pd.DataFrame | None = None
    params: dict | None = None
    shape: tuple | None = None
    spacing: tuple | None = None
    spacing_source: str | None = None
    spacing_unit: str | None = None
    analyse: bool = False  # volumes to analyse here

    @property
    def label_set(self):
        return None if self.table is None else self.table["label"].to_numpy().astype(np.uint64)


def _is_table(obj) -> bool:
    from .table import ParticleTables

    return isinstance(obj, (pd.DataFrame, ParticleTables, str, os.PathLike))


def _load_table(name: str, obj):
    """(table, contacts, params) of a table input."""
    from .output import read_table
    from .table import ParticleTables

    contacts = None
    if isinstance(obj, ParticleTables):
        table, contacts = obj.particles, obj.contacts
    elif isinstance(obj, (str, os.PathLike)):
        try:
            table = read_table(obj)
        except GrapesInputError as exc:
            raise GrapesInputError(f"state {name!r}: " + exc.template, **exc.options) from exc
    else:
        table = obj
    params = table.attrs.get("grapes_dask")
    if not isinstance(params, dict) or "exclude_outer_layers" not in params:
        raise GrapesInputError(
            f"the table of state {name!r} has no analysis parameters (attrs['grapes_dask']): give {{made}}, or the "
            "state's volumes", made=Alt("a table made by grapes_dask.table.analyze (or read with "
                                        "grapes_dask.output.read_table)", "a table written by grapes-dask analyze"),
        )
    missing = [c for c in _TABLE_COLUMNS if c not in table.columns]
    if "volume" not in table.columns and "area" not in table.columns:
        missing.append("volume")
    if missing:
        raise GrapesInputError(
            f"the table of state {name!r} lacks the columns {missing}: give the full table of {{made}}, or the "
            "state's volumes", made=Alt("grapes_dask.table.analyze", "grapes-dask analyze"),
        )
    table = table.copy()
    table["label"] = table["label"].astype(np.uint64)
    table = table.sort_values("label", kind="stable").reset_index(drop=True)
    table.attrs["grapes_dask"] = dict(params)
    return table, contacts, dict(params)


def _resolve(name: str, role: str, source):
    from .io import resolve_volume

    if source is None:
        return None
    try:
        return resolve_volume(source)
    except GrapesInputError as exc:
        raise GrapesInputError(f"state {name!r}, {role}: " + exc.template, **exc.options) from exc


def _parse_state(name: str, spec, *, spacing, options: dict) -> _State:
    from .table import check_inputs

    st = _State(str(name))
    if _is_table(spec):
        st.table, st.contacts, st.params = _load_table(st.name, spec)
    elif isinstance(spec, (tuple, list)) and len(spec) == 2:
        try:
            chk = check_inputs(spec[0], spec[1], spacing=spacing, **options)
        except GrapesInputError as exc:
            raise GrapesInputError(f"state {name!r}: " + exc.template, **exc.options) from exc
        st.grey, st.labels, st.shape = chk.grey, chk.labels, tuple(chk.shape)
        st.spacing, st.spacing_source, st.analyse = tuple(chk.spacing), chk.spacing_source, True
        st.spacing_unit = chk.spacing_unit
    elif isinstance(spec, (tuple, list)) and len(spec) == 3 and _is_table(spec[2]):
        st.table, st.contacts, st.params = _load_table(st.name, spec[2])
        st.grey = _resolve(st.name, "grey", spec[0])
        st.labels = _resolve(st.name, "labels", spec[1])
        if st.labels is not None and not (np.issubdtype(st.labels.dtype, np.integer) or st.labels.dtype == bool):
            raise GrapesInputError(
                f"state {name!r}: labels {st.labels.name!r} have dtype {st.labels.dtype}: give the integer label "
                "volume the table was computed from"
            )
        shapes = {v.name: v.shape for v in (st.grey, st.labels) if v is not None}
        if len(set(shapes.values())) > 1:
            raise GrapesInputError(
                f"state {name!r}: grey and labels have different shapes {shapes}: give the volumes the table was "
                "computed from"
            )
        if shapes:
            st.shape = next(iter(shapes.values()))
    else:
        raise GrapesInputError(
            f"state {name!r} is a {type(spec).__name__}: give (grey, labels) volumes (paths or arrays), a table "
            "computed by grapes_dask.table.analyze (DataFrame, ParticleTables or a table file), or "
            "(grey, labels, table); either volume may be None in the last form"
        )
    if st.table is not None:
        rec = st.params.get("shape")
        if rec is not None:
            rec = tuple(int(n) for n in rec)
            if st.shape is not None and st.shape != rec:
                raise GrapesInputError(
                    f"state {name!r}: the table was computed on a volume of shape {rec} but the volumes given with "
                    f"it have shape {st.shape}: give the volumes the table was computed from"
                )
            st.shape = rec
        st.spacing = tuple(float(s) for s in st.params.get("spacing", ())) or None
        st.spacing_source = "table: " + str(st.params.get("spacing_source", "recorded"))
        st.spacing_unit = st.params.get("spacing_unit")
    return st


def _bbox_high(table: pd.DataFrame) -> np.ndarray | None:
    """Per axis the largest bbox max of the table (a lower bound of the volume's shape)."""
    nd = sum(1 for c in table.columns if str(c).startswith("centroid-"))
    cols = [f"bbox-{a + nd}" for a in range(nd)]
    if nd == 0 or len(table) == 0 or any(c not in table.columns for c in cols):
        return None
    return table[cols].to_numpy().max(axis=0)


def _check_shapes(states: list[_State]) -> tuple | None:
    known = [(s.name, s.shape) for s in states if s.shape is not None]
    if known:
        first = known[0]
        for other in known[1:]:
            if other[1] != first[1]:
                raise GrapesInputError(
                    f"states {first[0]!r} and {other[0]!r} have different shapes, {first[1]} and {other[1]}: track "
                    "compares the same particles voxel by voxel, so give every state on one grid (register and crop "
                    "them to one shape first)"
                )
    shape = known[0][1] if known else None
    for s in states:
        if s.table is None or shape is None:
            continue
        high = _bbox_high(s.table)
        if high is not None and (len(high) != len(shape) or np.any(high > np.asarray(shape))):
            raise GrapesInputError(
                f"the table of state {s.name!r} has particles up to {tuple(int(h) for h in high)} (bounding boxes), "
                f"outside the shape {shape} of the other states: give tables and volumes of one grid"
            )
    return shape


def _same_spacing(a, b) -> bool:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= _SPACING_RTOL * np.maximum(abs(a), abs(b))))


def _check_spacing(states: list[_State], given) -> tuple:
    known = [s for s in states if s.spacing is not None]
    if given is not None:
        from .io import check_spacing

        nd = len(known[0].spacing) if known else (len(states[0].shape) if states[0].shape else 3)
        given = check_spacing(given, nd)
        for s in known:
            if s.table is not None and not _same_spacing(s.spacing, given):
                raise GrapesInputError(
                    f"the table of state {s.name!r} was computed with spacing {s.spacing} but {{spacing}} was given: "
                    "recompute the table with this spacing, or leave spacing out", spacing=tuple(given),
                )
        return tuple(float(x) for x in given)
    if not known:
        return None
    # a state whose files record no voxel size takes the others' (said in a warning and the params)
    recorded = [s for s in known if not str(s.spacing_source or "").startswith("default")]
    if recorded and len(recorded) < len(known):
        first = recorded[0]
        for s in known:
            if s not in recorded:
                warnings.warn(
                    f"state {s.name!r} records no voxel size in its files: it takes that of state {first.name!r}, "
                    f"{format_spacing(first.spacing, first.spacing_unit)} ({first.spacing_source})",
                    InheritedVoxelSizeWarning, stacklevel=3)
                s.spacing, s.spacing_unit = first.spacing, first.spacing_unit
                s.spacing_source = f"inherited from state {first.name!r} (its files record none)"
        known = recorded
    first = known[0]
    for s in known[1:]:
        if not _same_spacing(first.spacing, s.spacing):
            raise GrapesInputError(
                f"states {first.name!r} and {s.name!r} have different voxel sizes, {first.spacing} "
                f"({first.spacing_source}) and {s.spacing} ({s.spacing_source}): give the right one with {{spacing}} "
                "(and recompute tables made with another)", spacing=first.spacing,
            )
    return first.spacing


def _expected_params(options: dict, exclude_outer_layers: int) -> dict:
    """The compared parameters a volume analysed here records."""
    from .table import analyze

    sig = inspect.signature(analyze).parameters
    out = {k: options.get(k, sig[k].default) for k in _COMPARED if k in sig}
    out["layer_width"] = 1.0 if out["layer_width"] is None else float(out["layer_width"])
    out["exclude_outer_layers"] = int(exclude_outer_layers)
    out["black_border"] = bool(out["black_border"])
    out["fill_holes"] = bool(out["fill_holes"])
    return out


def _check_params(states: list[_State], options: dict, exclude_outer_layers: int) -> None:
    expected = _expected_params(options, exclude_outer_layers)
    tables = [s for s in states if s.table is not None]
    for s in tables:
        if s.params.get("exclude_outer_layers") != int(exclude_outer_layers):
            theirs = s.params.get("exclude_outer_layers")
            raise GrapesInputError(
                f"the table of state {s.name!r} was computed with exclude_outer_layers={theirs} but track uses "
                "{exclude_outer_layers}: its roi_mean would average other voxels. Pass {theirs}, or recompute the "
                "table", exclude_outer_layers=int(exclude_outer_layers),
                theirs=Alt(f"the table's value to track (exclude_outer_layers={theirs})",
                           f"the table's value (--exclude-outer-layers {theirs})"),
            )
    # against the analyses made here (every key) or the options given (given keys only)
    volumes_here = any(s.analyse for s in states)
    keys = [k for k in _COMPARED if volumes_here or k in options]
    for s in tables:
        for k in keys:
            if k in s.params and s.params[k] != expected[k]:
                raise GrapesInputError(
                    f"the table of state {s.name!r} was computed with {k}={s.params[k]!r}, but the states analysed "
                    f"here use {{{k}}}: {{fix}}",
                    **{k: Alt(f"{k}={expected[k]!r}", f"{k}={expected[k]!r}")},
                    fix=Alt("give track the table's value, or recompute the table with the same parameters as the "
                            "other states", "give grapes-dask operando the table's value (--layer-width, --start-at), "
                            "or recompute the table with the same parameters as the other states"),
                )
    for a, b in zip(tables, tables[1:]):
        for k in _COMPARED:
            if k in a.params and k in b.params and a.params[k] != b.params[k]:
                raise GrapesInputError(
                    f"the tables of states {a.name!r} and {b.name!r} were computed with different {k} "
                    f"({a.params[k]!r} and {b.params[k]!r}): recompute one of them with the other's {k}, so that "
                    "roi_mean means the same in every state"
                )


def _check_options(options: dict) -> None:
    from .table import analyze

    sig = inspect.signature(analyze).parameters
    reserved = {"grey", "labels", "spacing", "exclude_outer_layers", "client", "progress"}
    for k in options:
        if k not in sig or k in reserved:
            allowed = sorted(set(sig) - reserved)
            raise GrapesInputError(f"{k!r} is not an analysis option track passes on: use one of {allowed}")


def _need_labels(states: list[_State], gap) -> None:
    """Stop before any compute when the neighbour rule needs a label volume that is not given."""
    if gap is None:
        return
    lacking = [s for s in states if s.labels is None]
    if not lacking:
        return
    if all(s.table is not None for s in states):  # every label set known: the inconsistent labels too
        sets = [s.label_set for s in states]
        union = np.unique(np.concatenate(sets))
        common = sets[0]
        for x in sets[1:]:
            common = np.intersect1d(common, x)
        incons = np.setdiff1d(union, common)
        lacking = [s for s in lacking if np.isin(incons, s.label_set).any()]
    for s in lacking:
        if gap == 0 and s.contacts is not None:
            continue  # the contacts table answers for gap 0
        raise GrapesInputError(
            f"state {s.name!r} is given as a table without its label volume, but the neighbour rule "
            f"({{gap}}) needs it to find the particles near inconsistent labels: give the state as "
            "{form}, or pass {neighbour_gap} to skip the rule",
            gap=Alt(f"neighbour_gap={gap}", f"--neighbour-gap {gap}"),
            form=Alt("(grey, labels, table), or as its ParticleTables (with the contacts) with neighbour_gap=0",
                     f"{s.name}=GREY,LABELS,TABLE"),
            neighbour_gap=Alt("neighbour_gap=None", "--neighbour-gap none"),
        )


def _region_problem(region, shape: tuple) -> str | None:
    """What is wrong with a background box (one ``(start, stop)`` or slice per axis), or None."""
    try:
        items = list(region)
    except TypeError:
        return "it is not one range per axis"
    if len(items) != len(shape):
        return f"it has {len(items)} axes, the volume {len(shape)}"
    n = 1
    for ax, (item, size) in enumerate(zip(items, shape)):
        if isinstance(item, slice):
            if item.step not in (None, 1):
                return f"axis {ax} has a step"
            start, stop = item.start, item.stop
        else:
            try:
                start, stop = item
            except (TypeError, ValueError):
                return f"axis {ax} is not a (start, stop) pair"
        start = 0 if start is None else start
        stop = size if stop is None else stop
        if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in (start, stop)):
            return f"axis {ax} has bounds that are not integers"
        if start < 0 or stop > size:
            return f"axis {ax} spans {start}..{stop}, outside the volume (0..{size})"
        if stop <= start:
            return f"axis {ax} spans {start}..{stop}, which is empty"
        n *= int(stop) - int(start)
    if n < 2:
        return "the box holds one voxel (a standard deviation needs at least 2)"
    return None


def _check_noise_region(name: str, region, shape: tuple) -> None:
    """The background box of a state to estimate the noise in, checked before any compute."""
    why = _region_problem(region, shape)
    if why is None:
        return
    try:
        cli = ",".join(f"{a}:{b}" for a, b in region)
    except (TypeError, ValueError):
        cli = str(region)
    raise GrapesInputError(
        f"{{noise_region}} does not fit state {name!r} of shape {tuple(shape)}: {why}; give {{form}}, "
        "0 <= start < stop <= the size of the axis",
        noise_region=Alt(f"noise_region={region!r}", f"--noise-region {cli}"),
        form=Alt("one (start, stop) pair of voxel indices per axis", "one start:stop range of voxel indices per "
                 "axis (Z0:Z1,Y0:Y1,X0:X1)"),
    )


def _noise_inputs(states: list[_State], noise_sigma, noise_region) -> dict:
    """Per state: a given sigma (float) or None (estimate). Checked before any compute."""
    names = [s.name for s in states]
    if isinstance(noise_sigma, Mapping):
        extra = [k for k in noise_sigma if k not in names]
        if extra:
            raise GrapesInputError(f"{{noise_sigma}} names states {extra} that are not among the states {names}: "
                                   "use the state names", noise_sigma=dict(noise_sigma))
        given = {n: noise_sigma.get(n) for n in names}
    else:
        given = {n: noise_sigma for n in names}
    missing = [n for n in names if given[n] is None]
    for n, v in given.items():
        if v is None:
            continue
        try:
            ok = math.isfinite(float(v)) and float(v) >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise GrapesInputError(f"noise_sigma of state {n!r} is {v!r}: give the image noise standard deviation "
                                   "in grey levels (a number >= 0), or leave it out to estimate it")
    by_state = {s.name: s for s in states}
    for n in missing:
        s = by_state[n]
        region = noise_region.get(n) if isinstance(noise_region, Mapping) else noise_region
        if s.grey is None or (s.labels is None and region is None):
            what = "grey volume" if s.grey is None else "label volume (or a background box, noise_region)"
            raise GrapesInputError(
                f"the noise of state {n!r} is to be estimated but its {what} is not given: give {{noise_sigma}}, "
                "or the state as {form}",
                noise_sigma=Alt(f"noise_sigma (one number, or one per state: {{{n!r}: ...}})",
                                "--noise-sigma SIGMA (grey levels)"),
                form=Alt("(grey, labels, table)", f"{n}=GREY,LABELS,TABLE"),
            )
        if region is not None and s.shape is not None:
            _check_noise_region(n, region, s.shape)
    if missing:
        from . import stats

        if not hasattr(stats, "estimate_noise"):
            raise GrapesInputError("this installation has no grapes_dask.stats.estimate_noise: give {noise_sigma}",
                                   noise_sigma=1.0)
    return {n: (None if given[n] is None else float(given[n])) for n in names}


# --------------------------------------------------------------------------------------------
# the neighbour search (out of core)
# --------------------------------------------------------------------------------------------


def _offsets(gap: int, ndim: int) -> np.ndarray:
    """Integer offsets ``o != 0`` with ``|o| <= gap + 1`` (Euclidean), shape (K, ndim)."""
    r = int(gap) + 1
    rng = np.arange(-r, r + 1)
    grid = np.stack(np.meshgrid(*([rng] * ndim), indexing="ij"), axis=-1).reshape(-1, ndim)
    d2 = (grid * grid).sum(axis=1)
    return grid[(d2 > 0) & (d2 <= r * r)]


_EMPTY_PAIRS = np.zeros((0, 2), np.uint64)


def _unique_rows(pairs: np.ndarray) -> np.ndarray:
    if len(pairs) == 0:
        return _EMPTY_PAIRS
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    p = pairs[order]
    keep = np.ones(len(p), bool)
    keep[1:] = (p[1:] != p[:-1]).any(axis=1)
    return p[keep]


def _near_block(src, sl, core, offsets, targets) -> np.ndarray:
    """Pairs (target label, other label) seen from the target voxels of the core of one block.

    `src[sl]` is the block with a halo of ``max |offset|`` voxels (cut at the volume's edge);
    `core` are the core's slices inside it. Runs in a task; small array out.
    """
    from .table import _get

    lab = _get(src, sl)
    if lab.dtype != np.uint64:
        lab = lab.astype(np.uint64)
    hit = np.isin(lab[core], targets)
    if not hit.any():
        return _EMPTY_PAIRS
    coords = np.stack(np.nonzero(hit), axis=1) + np.array([s.start for s in core])
    a = lab[tuple(coords.T)]
    shape = np.array(lab.shape)
    # only surface voxels (a 6-neighbour of another label, in the volume) can be nearest: along a
    # monotone lattice path from a voxel of A to one of B the distance to B never grows, and the
    # last voxel of A on it is such a surface voxel; the halo holds every core voxel's 6-neighbours
    surface = np.zeros(len(coords), bool)
    for ax in range(lab.ndim):
        for step in (-1, 1):
            c = coords.copy()
            c[:, ax] += step
            ok = (c[:, ax] >= 0) & (c[:, ax] < shape[ax])
            surface[ok] |= lab[tuple(c[ok].T)] != a[ok]
    coords, a = coords[surface], a[surface]
    out = []
    for o in offsets:
        c = coords + o
        ok = np.all((c >= 0) & (c < shape), axis=1)
        b = lab[tuple(c[ok].T)]
        av = a[ok]
        m = (b != 0) & (b != av)
        if m.any():
            out.append(_unique_rows(np.stack([av[m], b[m]], axis=1)))
    return _unique_rows(np.concatenate(out)) if out else _EMPTY_PAIRS


def _combine_pairs(parts) -> np.ndarray:
    parts = [p for p in parts if len(p)]
    return _unique_rows(np.concatenate(parts)) if parts else _EMPTY_PAIRS


def _neighbour_graph(vol, targets, gap: int, chunks=None):
    """One delayed array of unique (target, other) pairs; one task per chunk of `vol`, tree-combined."""
    from .table import _reader, _tree_reduce

    targets = np.unique(np.asarray(targets, dtype=np.uint64))
    if len(targets) == 0:
        return dask.delayed(_EMPTY_PAIRS)
    if chunks is not None:
        vol = vol.rechunk(chunks)
    arr = vol.array
    offsets = _offsets(gap, arr.ndim)
    r = int(gap) + 1
    reader = _reader(vol)
    edges = [np.concatenate([[0], np.cumsum(c)]) for c in arr.chunks]
    parts = []
    for idx in np.ndindex(*[len(c) for c in arr.chunks]):
        lo = [int(e[i]) for e, i in zip(edges, idx)]
        hi = [int(e[i + 1]) for e, i in zip(edges, idx)]
        ext = tuple(slice(max(0, a - r), min(n, b + r)) for a, b, n in zip(lo, hi, arr.shape))
        core = tuple(slice(a - e.start, b - e.start) for a, b, e in zip(lo, hi, ext))
        src, sl = (reader, ext) if reader is not None else (arr[ext], None)
        parts.append(dask.delayed(_near_block, pure=True)(src, sl, core, offsets, targets))
    return _tree_reduce(parts, _combine_pairs)


def _pairs_frame(pairs: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"label": pairs[:, 0].astype(np.uint64), "neighbour": pairs[:, 1].astype(np.uint64)})


def neighbour_pairs(labels, targets, gap: int = 1, *, chunks=None, client=None, progress: bool = False
                    ) -> pd.DataFrame:
    """Labels near given labels, out of core: one task per chunk with a halo of ``gap + 1``.

    Parameters
    ----------
    labels : path, array or grapes_dask.io.Volume
        Label volume (0 = background), 2D or 3D.
    targets : array-like of int
        The labels whose neighbours are wanted (e.g. the inconsistent labels).
    gap : int
        ``0``: sharing a face (6-connectivity, 4 in 2D); ``g > 0``: some voxel of the other
        label within Euclidean distance ``g + 1`` (voxel units) of some voxel of the target, i.e.
        at most ``g`` voxels in between along an axis.
    chunks : int or tuple, optional
        Block shape of the search (default: the volume's chunks); memory per task is one block
        plus its halo.
    client : distributed.Client, optional
        Cluster to run on (default: the current dask scheduler).
    progress : bool
        Progress bar.

    Returns
    -------
    pandas.DataFrame
        ``label`` (a target, uint64), ``neighbour`` (uint64, another non-zero label, possibly
        also a target), one row per pair, sorted.
    """
    from .io import resolve_volume
    from .table import _compute

    if int(gap) != gap or gap < 0:
        raise GrapesInputError("{gap}: give a whole number of voxels >= 0", gap=gap)
    vol = resolve_volume(labels)
    (pairs,) = _compute(_neighbour_graph(vol, targets, int(gap), chunks), client=client, progress=progress,
                        desc="neighbour search")
    return _pairs_frame(pairs)


# --------------------------------------------------------------------------------------------
# 4. cleaning
# --------------------------------------------------------------------------------------------


def _clean(labels: np.ndarray, present: np.ndarray, touches: np.ndarray, empty: np.ndarray, neighbour: np.ndarray,
           ref_volume: np.ndarray, drop_smallest: float) -> tuple[np.ndarray, np.ndarray]:
    """The reasons per label, as an (N, 5) bool array in the order of :data:`REASONS`, and `excluded`."""
    n = len(labels)
    flags = np.zeros((n, len(REASONS)), bool)
    flags[:, 0] = ~present.all(axis=1)
    flags[:, 1] = neighbour
    flags[:, 2] = (touches & present).any(axis=1)
    flags[:, 3] = (empty & present).any(axis=1)
    cand = np.flatnonzero(~flags[:, :4].any(axis=1))
    k = int(math.floor(drop_smallest * len(cand) + 1e-9))
    if k > 0:
        # the order of stats.quantile_labels: with drop_smallest = 1/q these are its group 1
        from .stats import rank_order

        order = rank_order(ref_volume[cand], labels[cand])
        flags[cand[order[:k]], 4] = True
    return flags, flags.any(axis=1)


class InheritedVoxelSizeWarning(UserWarning):
    """A state whose files record no voxel size takes that of the states that record one."""


class FewParticlesWarning(UserWarning):
    """Cleaning kept particles, but few of them (under :data:`FEW_KEPT` of all): the statistics
    stand on a small sample. The message names the rule that removed most particles and its
    option. (Fewer than 2 kept is a :class:`grapes_dask.GrapesInputWarning`: no statistic at all.)"""


#: Below this share of all the particles kept, :func:`track` warns (:class:`FewParticlesWarning`).
FEW_KEPT = 0.1


def _rule_fix(rule: str, n_out: int, drop_smallest: float, gap) -> str:
    """What to change when `rule` removed most particles (a GrapesInputError template)."""
    if rule == "inconsistent":
        return ("the labels are missing in some state: the same id must be the same particle in every state (seed "
                "the later states' segmentation with the reference labels, and check the registration)")
    if rule == "neighbour":
        return (f"lower {{neighbour_gap}} (now {gap}; 0: sharing a face) or skip the rule with {{no_gap}}, after "
                "fixing the inconsistent labels they are neighbours of")
    if rule == "border":
        return ("the particles touch the volume border in some state: give volumes that hold whole particles (crop "
                "less tightly), and check that the label volumes' background is 0")
    if rule == "empty_roi":
        return (f"their ROI (the voxels deeper than {n_out} layers) is empty: lower {{exclude_outer_layers}} (now "
                f"{n_out}), or check the label volumes (particles smaller than the segmentation should give)")
    return f"lower {{drop_smallest}} (now {drop_smallest:g})"


def _check_kept(flags: np.ndarray, excluded: np.ndarray, n_out: int, drop_smallest: float, gap) -> None:
    """Warn when cleaning keeps fewer than 2 particles (GrapesInputWarning) or under FEW_KEPT of
    them (FewParticlesWarning), naming the rule that removed most and what to change."""
    import warnings

    from ._errors import GrapesInputWarning

    n = len(excluded)
    kept = int((~excluded).sum())
    if n == 0 or (kept >= 2 and kept >= FEW_KEPT * n):
        return
    # the rule that applies to most particles (a particle can have several reasons): relaxing a rule that
    # applies to fewer would not bring the others back
    by_rule = {r: int(flags[:, j].sum()) for j, r in enumerate(REASONS)}
    rule = max(REASONS, key=lambda r: by_rule[r])
    counts = ", ".join(f"{r} {k}" for r, k in by_rule.items() if k)
    if not any(by_rule.values()):  # no rule removed any: the states hold too few particles
        w = GrapesInputWarning(f"the states hold {n} particle(s), all kept: too few for any statistic (2 at "
                               "least; the summary, the z-tests and the quantiles would be empty or NaN); give "
                               "volumes with more particles")
        warnings.warn(w, stacklevel=3)
        return
    fix = _rule_fix(rule, n_out, drop_smallest, gap)
    options = dict(neighbour_gap=None, no_gap=Alt("neighbour_gap=None", "--neighbour-gap none"),
                   exclude_outer_layers=None, drop_smallest=None)
    if kept < 2:
        text = (f"cleaning kept {kept} of {n} particles, too few for any statistic (2 at least; the summary, the "
                f"z-tests and the quantiles would be empty or NaN): rule {rule!r} removed {by_rule[rule]} "
                f"(particles with each reason, a particle can have several: {counts}); {fix}")
        cls = GrapesInputWarning
    else:
        text = (f"cleaning kept only {kept} of {n} particles ({100 * kept / n:.1f}%): rule {rule!r} removed "
                f"{by_rule[rule]} (particles with each reason, a particle can have several: {counts}); {fix}")
        cls = FewParticlesWarning
    err = GrapesInputError(text, **options)
    w = cls(err.render("api"))
    w.error = err  # the command line prints err.render("cli")
    warnings.warn(w, stacklevel=3)


# --------------------------------------------------------------------------------------------
# the result
# --------------------------------------------------------------------------------------------


class Tracking:
    """Particles followed through states, cleaned, with their statistics (made by :func:`track`).

    Attributes
    ----------
    states : list of str
        State names in order.
    reference : str
        The reference state (``delta`` is against it).
    particles : pandas.DataFrame
        Long table, one row per (label, state), sorted by state order then label: ``label``
        (uint64), ``state`` (ordered Categorical), ``roi_mean`` (grey levels, NaN where the label
        is missing or its ROI empty), ``roi_voxels`` (int64, 0 where missing), ``roi_sem`` (eq. 1),
        ``delta`` (``roi_mean`` minus the reference's; 0 in the reference), ``delta_sem`` (eq. 2;
        0 in the reference), ``volume`` (reference volume, spacing units^3; the area in 2D), ``centroid-*``
        (reference centroid, voxel indices; NaN where missing in the reference), ``excluded``
        (bool) and ``reason`` (``""`` or the reasons joined by ``";"``, in the order
        ``inconsistent;neighbour;border;empty_roi;smallest``), identical in every row of a label.
        With ``correct_drift``: ``roi_mean`` and ``delta`` are corrected and
        ``roi_mean_uncorrected``, ``delta_uncorrected`` and ``background_shift`` (the state's
        shift subtracted, grey levels) follow.
    tables : dict of str to pandas.DataFrame
        Each state's particle table (as :func:`grapes_dask.table.analyze` gives it).
    params : dict
        ``noise`` (per state ``sigma`` and ``source``, with ``n_voxels``, ``region``,
        ``margin``, ``peak``, ``spread`` and ``warning`` when estimated), ``background`` (the
        beam check: ``box``, ``source``, ``note``, per state ``states``, ``shift``,
        ``correct_drift``, ``flagged``; see :meth:`background`), ``exclude_outer_layers``,
        ``drop_smallest``, ``neighbour_gap``, ``neighbour_method`` (per state), ``spacing``,
        ``shape``, ``analysis`` (the reference table's parameters), ``states``, ``reference``,
        ``inputs`` (per state), ``version`` and ``created``.
    """

    def __init__(self, particles, tables, params, states, reference, volumes):
        self.particles = particles
        self.tables = tables
        self.params = params
        self.states = list(states)
        self.reference = reference
        self._volumes = volumes  # state -> (grey Volume or None, labels Volume or None)

    def __repr__(self):
        c = self.counts().set_index("reason")["n"]
        return (f"Tracking({len(self.states)} states {self.states}, reference {self.reference!r}, "
                f"{int(c['kept'])} of {self.particles['label'].nunique()} particles kept)")

    # -- helpers ------------------------------------------------------------------------------

    def _check_state(self, state, what="state"):
        if state not in self.states:
            raise GrapesInputError(f"{what}={state!r} is not among the states {self.states}: use one of them")

    def _wide(self, column: str, kept: bool = True) -> pd.DataFrame:
        """label x state table of `column` (kept particles only by default)."""
        p = self.particles
        if kept:
            p = p[~p["excluded"].to_numpy()]
        w = p.pivot(index="label", columns="state", values=column)
        w.columns = [str(c) for c in w.columns]
        return w.reindex(columns=self.states)

    def _delta_stats(self, labels, state) -> dict:
        from .stats import change_stats

        mean, sem = self._wide("roi_mean"), self._wide("roi_sem")
        if labels is not None:
            mean, sem = mean.loc[labels], sem.loc[labels]
        if state == self.reference:
            n = int(np.isfinite(mean[state].to_numpy()).sum())
            return {"n": n, "delta_mean": 0.0, "delta_sd": 0.0, "delta_sem": 0.0, "delta_ses": 0.0,
                    "delta_se_tot": 0.0}
        st = change_stats(mean[self.reference].to_numpy(), mean[state].to_numpy(), sem[self.reference].to_numpy(),
                          sem[state].to_numpy())
        return {"n": st.n, **{"delta_" + k: getattr(st, k) for k in ("mean", "sd", "sem", "ses", "se_tot")}}

    # -- statistics ---------------------------------------------------------------------------

    def summary(self) -> pd.DataFrame:
        """Population statistics of the kept particles per state (paper eq. 1-5, fig. 7).

        Returns
        -------
        pandas.DataFrame
            Indexed by state (name ``"state"``, in order): ``n``, ``mean``, ``sd`` (ddof 1),
            ``sem`` (eq. 3 of the per-particle eq. 1), ``ses`` (eq. 4), ``se_tot`` (eq. 5) of
            ``roi_mean``; ``delta_mean``, ``delta_sd``, ``delta_sem`` (eq. 3 of eq. 2),
            ``delta_ses``, ``delta_se_tot`` of the per-particle change against the reference
            (all 0 in the reference row). Grey levels.
        """
        from .stats import population_stats

        mean, sem = self._wide("roi_mean"), self._wide("roi_sem")
        rows = []
        for s in self.states:
            p = population_stats(mean[s].to_numpy(), sem[s].to_numpy())
            d = self._delta_stats(None, s)
            rows.append({"state": s, "n": p.n, "mean": p.mean, "sd": p.sd, "sem": p.sem, "ses": p.ses,
                         "se_tot": p.se_tot, **{k: v for k, v in d.items() if k != "n"}})
        out = pd.DataFrame(rows).set_index("state")
        out["n"] = out["n"].astype(np.int64)
        return out

    def by_quantile(self, column: str = "centroid-2", q: int = 4, state=None) -> pd.DataFrame:
        """Change statistics of the kept particles in `q` groups of a column's values (fig. 8).

        Parameters
        ----------
        column : str
            A column of :attr:`particles` or of the reference particle table (e.g.
            ``"centroid-2"``, the x position; ``"volume"``); its value in the reference state.
        q : int
            Number of groups (4 = quartiles), by :func:`grapes_dask.stats.quantile_labels`: the
            kept particles sorted by the value (ties by label), group ``g`` the ranks
            ``floor((g-1) n / q) .. floor(g n / q) - 1``; sizes differ by at most one. The
            same rule as :func:`grapes_dask.stats.quantile_groups` and the ``smallest``
            cleaning rule. A particle whose value is not finite is in no group.
        state : str or list of str, optional
            The states to report (default: every state but the reference).

        Returns
        -------
        pandas.DataFrame
            One row per (group, state): ``group`` (1..q, 1 = lowest values), ``lo``, ``hi``
            (the group's smallest and largest value), ``state``, ``n``, ``delta_mean``,
            ``delta_sd``, ``delta_sem``, ``delta_ses``, ``delta_se_tot`` (change against the
            reference, eq. 2-5), ``mean``, ``se_tot`` (of ``roi_mean`` in that state).
        """
        from .stats import population_stats, quantile_labels

        if int(q) != q or q < 1:
            raise GrapesInputError("{q}: give a whole number of groups >= 1 (4 = quartiles)", q=q)
        q = int(q)
        states = [s for s in self.states if s != self.reference] if state is None else (
            [state] if isinstance(state, str) else list(state))
        for s in states:
            self._check_state(s)
        ref = self.particles[(self.particles["state"] == self.reference).to_numpy()
                             & ~self.particles["excluded"].to_numpy()]
        labels = ref["label"].to_numpy()
        if column in ref.columns:
            values = ref[column].to_numpy(dtype=float)
        elif column in self.tables[self.reference].columns:
            t = self.tables[self.reference].set_index("label")[column]
            try:
                values = t.reindex(labels).to_numpy(dtype=float)
            except (TypeError, ValueError):
                raise GrapesInputError(f"column={column!r} does not hold numbers: choose a numeric column") from None
        else:
            raise GrapesInputError(f"column={column!r} is neither in the tracking table nor in the reference "
                                   "particle table: choose e.g. 'centroid-2' (x) or 'volume'")
        member = quantile_labels(values, q, ties=labels)
        groups = [np.flatnonzero(member == g) for g in range(1, q + 1)]
        mean, sem = self._wide("roi_mean"), self._wide("roi_sem")
        rows = []
        for g, idx in enumerate(groups, start=1):
            sel = pd.Index(labels[idx])
            lo = float(values[idx].min()) if len(idx) else math.nan
            hi = float(values[idx].max()) if len(idx) else math.nan
            for s in states:
                d = self._delta_stats(sel, s) if len(idx) else {"n": 0, **{k: math.nan for k in (
                    "delta_mean", "delta_sd", "delta_sem", "delta_ses", "delta_se_tot")}}
                p = population_stats(mean.loc[sel, s].to_numpy(), sem.loc[sel, s].to_numpy())
                rows.append({"group": g, "lo": lo, "hi": hi, "state": s, **d, "mean": p.mean, "se_tot": p.se_tot})
        cols = ["group", "lo", "hi", "state", "n", "delta_mean", "delta_sd", "delta_sem", "delta_ses",
                "delta_se_tot", "mean", "se_tot"]
        out = pd.DataFrame(rows, columns=cols)
        out["group"] = out["group"].astype(np.int64)
        out["n"] = out["n"].astype(np.int64)
        return out

    def fraction(self, state_a: str, state_b: str) -> Fraction:
        """Share of kept particles with a lower ``roi_mean`` in `state_b` than in `state_a` (fig. 9).

        Returns
        -------
        Fraction
            ``n``, ``n_darker``, ``fraction`` and its standard error ``sqrt(f (1 - f) / n)``.
        """
        self._check_state(state_a, "state_a")
        self._check_state(state_b, "state_b")
        mean = self._wide("roi_mean")
        a, b = mean[state_a].to_numpy(), mean[state_b].to_numpy()
        ok = np.isfinite(a) & np.isfinite(b)
        n = int(ok.sum())
        k = int((b[ok] < a[ok]).sum())
        f = k / n if n else math.nan
        se = math.sqrt(f * (1 - f) / n) if n else math.nan
        return Fraction(state_a, state_b, n, k, f, se)

    def z_tests(self, alternative: str = "less", sigma: float = 5.0, against: str = "both") -> pd.DataFrame:
        """z-tests (eq. 6) of the kept particles' mean ``roi_mean``: each state against the
        reference, and between consecutive states.

        Sample 1 is ``state_b`` (the state tested), sample 2 ``state_a`` (the reference, or the
        previous state): with ``alternative="less"`` a rejection means that the population
        darkened from ``state_a`` to ``state_b``. The paper's test is 4.0 V against pristine
        (``against="reference"``).

        Parameters
        ----------
        alternative : {"less", "greater", "two-sided"}
            Alternative hypothesis, see :func:`grapes_dask.stats.z_test`.
        sigma : float
            Significance level in standard deviations of the normal distribution (5: the paper's).
        against : {"both", "reference", "previous"}
            ``"reference"``: every other state against the reference state; ``"previous"``:
            every state against the one before it (in the states' order); ``"both"``: the
            reference rows, then the consecutive ones (the pair of the reference and the state
            after it appears in both, once per kind).

        Returns
        -------
        pandas.DataFrame
            One row per test: ``against`` (``"reference"`` or ``"previous"``), ``state_a``,
            ``state_b``, ``n_a``, ``n_b`` (kept particles with a finite value), ``mean_a``,
            ``mean_b`` (grey levels), ``z``, ``p``, ``critical``, ``reject`` (nullable boolean),
            ``sigma`` and ``testable``. With fewer than 2 particles in a state the test is not
            testable: ``testable`` False, ``z``, ``p`` and ``critical`` NaN and ``reject``
            ``<NA>`` (an empty cell in a csv), never a ``False`` that would read as "no change".
        """
        from .stats import population_stats, z_test

        choices = ("both", "reference", "previous")
        if against not in choices:
            raise GrapesInputError(f"against={against!r}: choose one of {list(choices)}")
        z_test(0.0, 1.0, 1, 0.0, 1.0, 1, alternative=alternative, sigma=sigma)  # checks the options
        pairs = []
        if against in ("both", "reference"):
            pairs += [("reference", self.reference, s) for s in self.states if s != self.reference]
        if against in ("both", "previous"):
            pairs += [("previous", a, b) for a, b in zip(self.states, self.states[1:])]
        mean = self._wide("roi_mean")
        stats = {s: population_stats(mean[s].to_numpy()) for s in self.states}
        rows = []
        for kind, a, b in pairs:
            pa, pb = stats[a], stats[b]
            row = {"against": kind, "state_a": a, "state_b": b, "n_a": pa.n, "n_b": pb.n, "mean_a": pa.mean,
                   "mean_b": pb.mean}
            if pa.n < 2 or pb.n < 2:
                rows.append({**row, "z": math.nan, "p": math.nan, "critical": math.nan, "reject": pd.NA,
                             "sigma": float(sigma), "testable": False})
                continue
            r = z_test(pb.mean, pb.sd, pb.n, pa.mean, pa.sd, pa.n, alternative=alternative, sigma=sigma)
            rows.append({**row, "z": r.z, "p": r.p, "critical": r.critical, "reject": r.reject, "sigma": r.sigma,
                         "testable": True})
        from .columns import Z_TEST_COLUMNS

        out = pd.DataFrame(rows, columns=list(Z_TEST_COLUMNS))
        out["n_a"] = out["n_a"].astype(np.int64)
        out["n_b"] = out["n_b"].astype(np.int64)
        out["reject"] = out["reject"].astype("boolean")
        out["testable"] = out["testable"].astype(bool)
        return out

    def counts(self) -> pd.DataFrame:
        """Cleaning counts.

        Returns
        -------
        pandas.DataFrame
            ``reason`` (each of ``inconsistent, neighbour, border, empty_roi, smallest``, then
            ``kept``), ``n`` (particles with that reason among theirs; a particle may count
            under several) and ``n_first`` (particles whose first reason it is: these and
            ``kept`` add up to the number of particles).
        """
        per = self.particles.drop_duplicates("label")
        reasons = per["reason"].to_numpy()
        rows = []
        for r in REASONS:
            has = np.array([r in x.split(";") for x in reasons], bool)
            first = np.array([x.split(";")[0] == r for x in reasons], bool)
            rows.append({"reason": r, "n": int(has.sum()), "n_first": int(first.sum())})
        kept = int((~per["excluded"].to_numpy()).sum())
        rows.append({"reason": "kept", "n": kept, "n_first": kept})
        return pd.DataFrame(rows, columns=["reason", "n", "n_first"])

    # -- change map ---------------------------------------------------------------------------

    def background(self, tolerance: float = 0.1, n_se: float = 3.0) -> pd.DataFrame:
        """Beam stability: the empty region's grey-level peak per state (paper 3.3).

        The paper checked "stable histogram peaks in empty regions above the sample across
        scans". One box, the reference's empty region (``params["background"]["box"]``), is
        read in every state with a grey volume.

        Parameters
        ----------
        tolerance : float
            A state is flagged when its shift exceeds this fraction of the mean change being
            measured (and is real: see `n_se`).
        n_se : float
            ... and exceeds `n_se` standard errors of the difference of the two peaks.

        Returns
        -------
        pandas.DataFrame
            One row per state, in order: ``state``, ``peak`` (median of the box's grey levels,
            interpolated in its histogram bin), ``spread`` (interquartile range / 1.349),
            ``mean``, ``sigma`` (ddof 1), ``n_voxels``, ``labelled`` (labelled voxels in the box
            in that state, should be 0; -1 without its label volume), ``shift`` (peak minus the
            reference's), ``shift_se``
            (``sqrt(se_a**2 + se_b**2)``, ``se = 1.2533 spread / sqrt(n)``), ``delta_mean``
            (mean per-particle change of the kept particles against the reference, uncorrected),
            ``ratio`` (``|shift| / |delta_mean|``), ``flag`` (``|shift| > n_se * shift_se`` and
            ``|shift| > tolerance * |delta_mean|``), ``corrected`` (the shift was subtracted from
            ``roi_mean``). Grey levels. Without an empty region the values are NaN and
            ``params["background"]["note"]`` says why.
        """
        for name, v in (("tolerance", tolerance), ("n_se", n_se)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not (np.isfinite(v) and v >= 0):
                raise GrapesInputError(f"{name}={v!r}: give a number >= 0")
        bg = self.params.get("background") or {}
        per = bg.get("states") or {}
        col = "roi_mean_uncorrected" if "roi_mean_uncorrected" in self.particles.columns else "roi_mean"
        raw = self._wide(col)
        ref = per.get(self.reference) or {}
        rows = []
        for s in self.states:
            r = per.get(s) or {}
            peak = r.get("peak")
            shift = math.nan if peak is None or ref.get("peak") is None else float(peak - ref["peak"])
            se_a, se_b = ref.get("peak_se"), r.get("peak_se")
            shift_se = math.nan if se_a is None or se_b is None else math.hypot(se_a, se_b)
            d = (raw[s] - raw[self.reference]).to_numpy(dtype=float)
            d = d[np.isfinite(d)]
            delta = float(d.mean()) if d.size else math.nan
            if s == self.reference:
                ratio, flag = 0.0, False
            else:
                ratio = abs(shift) / abs(delta) if delta else math.inf
                flag = bool(np.isfinite(shift) and abs(shift) > n_se * (0.0 if np.isnan(shift_se) else shift_se)
                            and (not np.isfinite(delta) or abs(shift) > tolerance * abs(delta)))
            rows.append({"state": s, "peak": math.nan if peak is None else peak,
                         "spread": math.nan if r.get("spread") is None else r["spread"],
                         "mean": math.nan if r.get("mean") is None else r["mean"],
                         "sigma": math.nan if r.get("sigma") is None else r["sigma"],
                         "n_voxels": int(r.get("n_voxels") or 0),
                         "labelled": -1 if r.get("labelled") is None else int(r["labelled"]),
                         "shift": shift, "shift_se": shift_se, "delta_mean": delta, "ratio": ratio, "flag": flag,
                         "corrected": bool(bg.get("correct_drift")) and np.isfinite(shift)})
        return pd.DataFrame(rows)

    def change_map(self, label: int, state: str, *, margin: int = 4, sigma: float = 1.0,
                   exclude_outer_layers: int | None = None, upsample: int = 10) -> ChangeMap:
        """Intra-particle grey-level change of one particle against the reference (fig. 10).

        Reads only the particle's reference bounding box plus `margin` voxels (cut at the
        volume's edge) from the reference and `state` grey volumes and the reference labels;
        re-registers the state crop onto the reference crop by a sub-voxel translation
        (``skimage.registration.phase_cross_correlation`` with `upsample`, applied with
        ``scipy.ndimage.shift``, cubic, edges repeated), smooths both with a Gaussian of
        `sigma` voxels, subtracts, and masks all but the particle's inner voxels.

        Parameters
        ----------
        label : int
            The particle (a label of the reference state).
        state : str
            The state to compare with the reference.
        margin : int
            Voxels around the bounding box (0: the bounding box alone; distances to the surface
            are those in the whole volume whatever the margin).
        sigma : float
            Gaussian smoothing, voxels (0: none).
        exclude_outer_layers : int, optional
            Layers masked from the surface (default: the tracking's ``exclude_outer_layers``);
            layers as the engine, ``max(1, round(d / layer_width))`` with ``d`` the Euclidean
            distance (spacing units) to the nearest voxel outside the particle, the volume's
            outside counting as outside.
        upsample : int
            Registration precision, 1/`upsample` voxel.

        Returns
        -------
        ChangeMap
        """
        from scipy import ndimage
        from skimage.registration import phase_cross_correlation

        self._check_state(state)
        ref_table = self.tables[self.reference]
        row = ref_table.index[ref_table["label"].to_numpy() == np.uint64(label)]
        if len(row) == 0:
            raise GrapesInputError(f"label={label!r} is not a particle of the reference state "
                                   f"{self.reference!r}: choose a label of .particles present there")
        g_ref, l_ref = self._volumes[self.reference]
        g_state = self._volumes[state][0]
        for who, v in ((f"the grey volume of the reference {self.reference!r}", g_ref),
                       (f"the label volume of the reference {self.reference!r}", l_ref),
                       (f"the grey volume of state {state!r}", g_state)):
            if v is None:
                raise GrapesInputError(f"change_map needs {who}, which was not given: give the states as "
                                       "(grey, labels) or (grey, labels, table)")
        if int(margin) != margin or margin < 0:
            raise GrapesInputError("{margin}: give a whole number of voxels >= 0", margin=margin)
        if not (np.isfinite(sigma) and sigma >= 0):
            raise GrapesInputError("{sigma}: give the Gaussian's standard deviation in voxels (>= 0)", sigma=sigma)
        n_out = self.params["exclude_outer_layers"] if exclude_outer_layers is None else exclude_outer_layers
        if int(n_out) != n_out or n_out < 0:
            raise GrapesInputError("{exclude_outer_layers}: give a whole number >= 0",
                                   exclude_outer_layers=exclude_outer_layers)
        r = ref_table.loc[row[0]]
        shape = tuple(g_ref.shape)
        nd = len(shape)
        lo = [max(0, int(r[f"bbox-{a}"]) - int(margin)) for a in range(nd)]
        hi = [min(shape[a], int(r[f"bbox-{a + nd}"]) + int(margin)) for a in range(nd)]
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        ref_crop, st_crop, lab_crop = dask.compute(g_ref.array[box], g_state.array[box], l_ref.array[box])
        ref_crop = np.asarray(ref_crop, np.float64)
        st_crop = np.asarray(st_crop, np.float64)
        inside = np.asarray(lab_crop).astype(np.uint64) == np.uint64(label)

        shift, _, _ = phase_cross_correlation(ref_crop, st_crop, upsample_factor=int(upsample), normalization=None)
        shift = tuple(float(s) for s in shift)
        moved = ndimage.shift(st_crop, shift, order=3, mode="nearest")
        valid = ndimage.shift(np.ones(st_crop.shape), shift, order=1, mode="constant", cval=0.0) > 0.999
        if sigma > 0:
            moved = ndimage.gaussian_filter(moved, sigma)
            ref_s = ndimage.gaussian_filter(ref_crop, sigma)
        else:
            ref_s = ref_crop
        spacing = tuple(float(s) for s in self.params["spacing"])
        # the layers of the tables (the reference table's parameters): `layer_width` voxels of the finest axis
        width = to_voxels(self.params["analysis"].get("layer_width"), name="layer_width", spacing=spacing,
                          unit=self.params.get("spacing_unit"), default=1.0).voxels
        # the box holds the particle's whole bounding box, so every voxel beyond it (in the volume or out of it)
        # is outside the particle: one voxel of "outside" on every side makes the EDT of the crop that of the
        # whole volume (a voxel's nearest outside voxel beyond the box is on that one-voxel shell); without it
        # a crop edge that cuts through the particle's face (margin=0) would count as particle
        d = ndimage.distance_transform_edt(np.pad(inside, 1), sampling=relative_spacing(spacing))[(slice(1, -1),) * nd]
        layer = np.maximum(1, np.round(d / width))
        mask = inside & (layer > n_out) & valid
        delta = np.where(mask, moved - ref_s, np.nan).astype(np.float32)
        return ChangeMap(int(label), state, self.reference, delta, mask, shift, tuple(lo), spacing)

    # -- after the paper (grapes_dask.change) ---------------------------------------------

    def classify(self, k: float = 3.0, reference: str | None = None, states=None):
        """Each kept particle darker / brighter / unchanged at ``|z| > k`` (eq. 2), with the shares.

        See :func:`grapes_dask.change.classify`; returns a :class:`grapes_dask.change.Classification`.
        """
        from .change import classify

        return classify(self, k=k, reference=reference, states=states)

    def layer_changes(self, states=None, *, reference: str | None = None, align: str = "surface", bins: int = 2,
                      exclude_outer_layers: int = 0, max_layer: int | None = None):
        """Mean change per radial layer and state, with SES, SEM and SE_tot per layer.

        See :func:`grapes_dask.change.layer_changes`; returns a :class:`grapes_dask.change.LayerChanges`.
        """
        from .change import layer_changes

        return layer_changes(self, states, reference=reference, align=align, bins=bins,
                             exclude_outer_layers=exclude_outer_layers, max_layer=max_layer)

    def trajectories(self, n: int = 20, seed: int = 0, *, reference: str | None = None,
                     quantiles=(0.05, 0.25, 0.5, 0.75, 0.95)):
        """Every kept particle's change through the states, a sample of them and the band per state.

        See :func:`grapes_dask.change.trajectories`; returns a :class:`grapes_dask.change.Trajectories`.
        """
        from .change import trajectories

        return trajectories(self, n=n, seed=seed, reference=reference, quantiles=quantiles)

    def trend(self, covariate: str = "centroid-2", state=None, *, reference: str | None = None,
              confidence: float = 0.95):
        """Least-squares slope of the per-particle change against a covariate, with its t interval.

        See :func:`grapes_dask.change.trend`; returns a :class:`grapes_dask.change.Trend`.
        """
        from .change import trend

        return trend(self, covariate=covariate, state=state, reference=reference, confidence=confidence)


# --------------------------------------------------------------------------------------------
# 3. noise and the background (beam stability) of every state
# --------------------------------------------------------------------------------------------


def _estimate_noises(parsed: list, sigmas: dict, noise_region, client) -> tuple:
    """Per state the noise record for ``params["noise"]`` and the estimate object (or None)."""
    noise, ests = {}, {}
    for st in parsed:
        if sigmas[st.name] is not None:
            noise[st.name] = {"sigma": sigmas[st.name], "source": "given"}
            ests[st.name] = None
            continue
        from . import stats

        region = noise_region.get(st.name) if isinstance(noise_region, Mapping) else noise_region
        est = stats.estimate_noise(st.grey, st.labels, region=region, client=client)
        rec = {"sigma": float(est.sigma), "source": str(est.source),
               **{k: getattr(est, k) for k in ("n_voxels", "region", "margin") if hasattr(est, k)}}
        for k in ("peak", "spread", "warning"):
            if getattr(est, k, None) is not None:
                rec[k] = getattr(est, k)
        noise[st.name] = rec
        ests[st.name] = est
    return noise, ests


def _background_levels(parsed: list, reference: str, ests: dict, noise_region, client, check: bool) -> dict:
    """The empty region's histogram peak in every state, in one box: the reference's.

    The box: the reference's noise box (``source`` ``"empty_space"`` or ``"region"``), else the
    reference's `noise_region`, else empty space found in the reference
    (:func:`grapes_dask.stats.find_empty_space`'s rule); none when the reference has no grey and
    label volumes or no empty space. Every state with a grey volume is then read in that box
    (per chunk: moments and a histogram), and the labelled voxels of each state with labels in
    that box counted (a particle moving into it would bias its peak).
    """
    from .io import open_volume
    from .stats import _box_estimate, _find_empty, _parse_region
    from .table import _compute

    out = {"box": None, "source": None, "note": None, "states": {}}
    if not check:
        out["note"] = "not checked (check_background=False)"
        return out
    ref = next(s for s in parsed if s.name == reference)
    est = ests.get(reference)
    region = noise_region.get(reference) if isinstance(noise_region, Mapping) else noise_region
    box = None
    if est is not None and getattr(est, "source", None) in ("empty_space", "region") \
            and getattr(est, "region", None) is not None:
        box, out["source"] = tuple(tuple(int(v) for v in r) for r in est.region), str(est.source)
    elif region is not None and ref.shape is not None:
        box, out["source"] = _parse_region(region, tuple(ref.shape)), "region"
    elif est is not None and getattr(est, "source", None) == "background":
        out["note"] = "no empty space in the reference state (its noise comes from the background between particles)"
    elif ref.grey is None or ref.labels is None:
        out["note"] = "the reference state has no grey and label volumes to find empty space in"
    else:
        g, lab = open_volume(ref.grey), open_volume(ref.labels)
        lab = lab if lab.chunks == g.chunks else lab.rechunk(g.chunks)
        best, _ = _find_empty(g, lab, margin=3, min_thickness=4, min_voxels=1000, max_ratio=1.2, tiles=3,
                              client=client)
        if best is None:
            out["note"] = "no empty space found in the reference state"
        else:
            box, out["source"] = best["box"], "empty_space"
    if box is None:
        return out
    out["box"] = [list(r) for r in box]
    sl = tuple(slice(a, b) for a, b in box)
    labelled = {}
    for st in parsed:
        if st.labels is not None:
            labelled[st.name] = (open_volume(st.labels)[sl] != 0).sum()
    counts = dict(zip(labelled, _compute(*labelled.values(), client=client))) if labelled else {}
    for st in parsed:
        rec = {"peak": None, "spread": None, "mean": None, "sigma": None, "n_voxels": 0, "peak_se": None,
               "labelled": None if st.name not in counts else int(counts[st.name])}
        if st.grey is not None:
            e = ests.get(st.name)
            if not (e is not None and getattr(e, "region", None) is not None and getattr(e, "peak", None) is not None
                    and tuple(tuple(r) for r in e.region) == tuple(box)):
                e = _box_estimate(open_volume(st.grey), tuple(box), "region", None, None, client)
            rec.update(peak=float(e.peak), spread=float(e.spread), mean=float(e.mean), sigma=float(e.sigma),
                       n_voxels=int(e.n_voxels), peak_se=e.peak_se)
        out["states"][st.name] = rec
    return out


def _shifts(background: dict, names: list, reference: str) -> dict:
    """Per state, its background peak minus the reference's (NaN where unknown)."""
    states = background.get("states") or {}
    ref = (states.get(reference) or {}).get("peak")
    out = {}
    for n in names:
        p = (states.get(n) or {}).get("peak")
        out[n] = float(p - ref) if p is not None and ref is not None else math.nan
    return out


# --------------------------------------------------------------------------------------------
# track
# --------------------------------------------------------------------------------------------


def _prepare(states, reference, spacing, exclude_outer_layers, noise_sigma, noise_region, drop_smallest,
             neighbour_gap, options):
    """Stage 1: every check that needs no voxel."""
    if not isinstance(states, Mapping):
        raise GrapesInputError(f"states is a {type(states).__name__}: give a dict of state name -> (grey, labels) "
                               "or table, in state order")
    if len(states) < 2:
        raise GrapesInputError(f"states has {len(states)} state(s): tracking needs at least 2, the reference and "
                               "one more (for one state, use grapes_dask.table.analyze)")
    names = [str(k) for k in states]
    if len(set(names)) != len(names):
        raise GrapesInputError(f"state names {names} repeat once written as text: give distinct names")
    if reference is None:
        reference = names[0]
    if str(reference) not in names:
        raise GrapesInputError(f"{{reference}} is not among the states {names}: give one of them (default: the "
                               "first)", reference=reference)
    reference = str(reference)
    if int(exclude_outer_layers) != exclude_outer_layers or exclude_outer_layers < 0:
        raise GrapesInputError("{exclude_outer_layers}: give a whole number >= 0",
                               exclude_outer_layers=exclude_outer_layers)
    try:
        ok = 0 <= float(drop_smallest) < 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise GrapesInputError("{drop_smallest}: give the fraction of smallest particles to leave out, 0 <= f < 1 "
                               "(0.25 = the smallest quartile, 0 keeps all)", drop_smallest=drop_smallest)
    if neighbour_gap is not None and (isinstance(neighbour_gap, bool) or int(neighbour_gap) != neighbour_gap
                                      or neighbour_gap < 0):
        raise GrapesInputError("{neighbour_gap}: give a whole number of voxels >= 0 (0: sharing a face), or None to "
                               "skip the neighbour rule", neighbour_gap=neighbour_gap)
    _check_options(options)
    parsed = [_parse_state(n, spec, spacing=spacing, options=options) for n, spec in zip(names, states.values())]
    shape = _check_shapes(parsed)
    spacing = _check_spacing(parsed, spacing)
    _check_params(parsed, options, int(exclude_outer_layers))
    _need_labels(parsed, None if neighbour_gap is None else int(neighbour_gap))
    sigmas = _noise_inputs(parsed, noise_sigma, noise_region)
    return parsed, reference, shape, spacing, sigmas


def check_states(states, reference=None, *, spacing=None, exclude_outer_layers: int = 5, noise_sigma=None,
                 noise_region=None, drop_smallest: float = 0.25, neighbour_gap: int | None = 1,
                 correct_drift: bool = False, check_background: bool = True, **analyze_options) -> None:
    """Run every check of :func:`track` that needs no voxel, and return (the CLI's first step).

    Parameters are those of :func:`track`. Raises :class:`GrapesInputError` on the first bad
    input, before any cluster is started or any voxel is read.
    """
    parsed, _, _, _, _ = _prepare(states, reference, spacing, exclude_outer_layers, noise_sigma, noise_region,
                                  drop_smallest, neighbour_gap, analyze_options)
    _check_drift_options(parsed, correct_drift, check_background)


def _check_drift_options(parsed: list, correct_drift, check_background) -> None:
    """correct_drift needs every state's grey volume (its background peak)."""
    for name, v in (("correct_drift", correct_drift), ("check_background", check_background)):
        if not isinstance(v, (bool, np.bool_)):
            raise GrapesInputError(f"{name}={v!r}: give True or False")
    if correct_drift and not check_background:
        raise GrapesInputError("correct_drift=True shifts each state by its background peak, which "
                               "check_background=False leaves unmeasured: drop one of the two")
    if correct_drift:
        lacking = [s.name for s in parsed if s.grey is None]
        if lacking:
            raise GrapesInputError(
                f"{{correct_drift}} shifts each state by the grey-level peak of its empty space, but the states "
                f"{lacking} have no grey volume: give them as {{form}}, or leave out {{correct_drift}}",
                correct_drift=Alt("correct_drift=True", "--correct-drift"),
                form=Alt("(grey, labels) or (grey, labels, table)", "NAME=GREY,LABELS[,TABLE]"))


def track(states, reference=None, *, spacing=None, exclude_outer_layers: int = 5, noise_sigma=None,
          noise_region=None, drop_smallest: float = 0.25, neighbour_gap: int | None = 1, client=None,
          progress: bool = False, correct_drift: bool = False, check_background: bool = True,
          **analyze_options) -> Tracking:
    """Follow the same particles through states: ROI grey levels, changes, cleaning, statistics.

    Parameters
    ----------
    states : dict of str to inputs
        State name -> ``(grey, labels)`` (paths, numpy or dask arrays, anything
        :func:`grapes_dask.table.analyze` takes), or a table already computed by ``analyze``
        (a DataFrame with ``attrs["grapes_dask"]``, a :class:`grapes_dask.table.ParticleTables`,
        or the path of a table file :func:`grapes_dask.output.read_table` reads), or
        ``(grey, labels, table)`` (either volume may be None). The dict's order is the order of
        the states. The same label id is the same particle in every state, on one voxel grid.
    reference : str, optional
        The state changes are measured against (default: the first).
    spacing : float or sequence of float, optional
        Voxel size per axis (default: from the volumes' metadata or the tables).
    exclude_outer_layers : int
        The ROI is the particle without its outer layers 1..N (paper fig. 8b: 5); tables
        given must have been computed with the same N.
    noise_sigma : float or dict of str to float, optional
        Image noise ``sigma_bg`` (grey levels), one for all states or one per state; missing
        states are estimated with :func:`grapes_dask.stats.estimate_noise` (empty space at a
        face of the volume, else the background between particles with a warning).
    noise_region : optional
        The box of empty space passed to ``estimate_noise`` as ``region`` (one for all states,
        or a dict per state), voxel indices; default: empty space found in each state.
    drop_smallest : float
        Fraction (0 <= f < 1) of the particles left by the other rules to exclude as the
        smallest by reference volume (``floor(f n)`` of them, ties by label); 0 keeps all.
    neighbour_gap : int or None
        Particles within this many voxels of an inconsistent label are excluded (see the module
        notes for the exact definition; 0: sharing a face). None skips the rule.
    client : distributed.Client, optional
        Cluster for the analyses, the neighbour search and the noise estimates.
    progress : bool
        Progress bars.
    correct_drift : bool
        Subtract from each state's ``roi_mean`` its background peak's shift against the
        reference's (:meth:`Tracking.background`), a beam drift; the uncorrected values stay in
        ``roi_mean_uncorrected`` and ``delta_uncorrected``, the shift in ``background_shift``,
        and ``params["background"]["correct_drift"]`` records it. Needs every state's grey
        volume and an empty region (found, or the reference's `noise_region`).
    check_background : bool
        Measure the empty region's histogram peak in every state with a grey volume
        (:meth:`Tracking.background`) and warn (:class:`grapes_dask.stats.GrapesBackgroundWarning`)
        when a state drifts by an amount large against the change being measured. One pass over
        the reference's labels (to find the empty space, unless its noise estimate did) and one
        over the box in each state.
    **analyze_options
        Other options of :func:`grapes_dask.table.analyze` for the states given as volumes
        (``layer_width``, ``start_at``, ``black_border``, ``chunks``, ``memory_limit``...).
        ``partials`` (a folder) makes the analyses resumable: each state keeps its partial
        results in its own subfolder, named like its table (:func:`grapes_dask.report.file_name`).

    Returns
    -------
    Tracking

    Raises
    ------
    GrapesInputError
        Before any compute: fewer than 2 states; a reference not among them; states of
        different shapes or voxel sizes; tables from different analysis parameters, or whose
        ``exclude_outer_layers`` is not this one; a label or grey volume a rule needs but not
        given; a bad option.

    Warns
    -----
    grapes_dask.GrapesInputWarning
        Cleaning kept fewer than 2 particles: no statistic can be computed (the Tracking is
        returned so that the reasons can be read; ``grapes-dask operando`` stops with an error).
        The message names the rule that applies to most particles and the option
        to change (``empty_roi``: lower `exclude_outer_layers`; ``smallest``: lower
        `drop_smallest`; ``neighbour``: lower or skip `neighbour_gap`; ``border`` and
        ``inconsistent``: the inputs).
    FewParticlesWarning
        Cleaning kept at least 2 particles but under :data:`FEW_KEPT` (10%) of them; the same
        message.
    """
    from .io import provenance
    from .stats import change_sem, particle_sem
    from .table import _compute, analyze_tables

    parsed, reference, shape, spacing, sigmas = _prepare(
        states, reference, spacing, exclude_outer_layers, noise_sigma, noise_region, drop_smallest, neighbour_gap,
        analyze_options)
    _check_drift_options(parsed, correct_drift, check_background)
    gap = None if neighbour_gap is None else int(neighbour_gap)

    # 3 (before the analyses: a drift correction without empty space fails early).
    # noise, and the empty region's peak in every state
    noise, ests = _estimate_noises(parsed, sigmas, noise_region, client)
    background = _background_levels(parsed, reference, ests, noise_region, client, bool(check_background))
    background["correct_drift"] = bool(correct_drift)
    if correct_drift and background["box"] is None:
        raise GrapesInputError(
            f"{{correct_drift}} needs an empty region, but {background['note']}: give the reference's {{noise_region}} "
            "(a box of empty space), or leave out {correct_drift}",
            correct_drift=Alt("correct_drift=True", "--correct-drift"),
            noise_region=Alt("noise_region", "--noise-region Z0:Z1,Y0:Y1,X0:X1"))

    # 2. analyses
    partials = analyze_options.pop("partials", None)
    for st in parsed:
        if not st.analyse:
            continue
        if partials is not None:
            from pathlib import Path

            from .report import file_name

            analyze_options["partials"] = Path(partials) / file_name(st.name)
        res = analyze_tables(st.grey, st.labels, spacing=spacing, exclude_outer_layers=int(exclude_outer_layers),
                             client=client, progress=progress, **analyze_options)
        table = res.particles.copy()
        params = {**res.parameters, "shape": list(st.shape)}
        table.attrs["grapes_dask"] = params
        st.table, st.contacts, st.params = table, res.contacts, params
    if shape is None:
        shape = next((tuple(s.params["shape"]) for s in parsed if "shape" in s.params), None)
    if spacing is None:
        spacing = tuple(float(x) for x in parsed[0].params["spacing"])

    # 4. cleaning
    names = [s.name for s in parsed]
    all_labels = np.unique(np.concatenate([s.label_set for s in parsed]))
    n = len(all_labels)
    present = np.zeros((n, len(parsed)), bool)
    touches = np.zeros_like(present)
    empty = np.zeros_like(present)
    roi_mean = np.full((n, len(parsed)), np.nan)
    roi_voxels = np.zeros((n, len(parsed)), np.int64)
    for j, st in enumerate(parsed):
        t = st.table
        pos = np.searchsorted(all_labels, t["label"].to_numpy().astype(np.uint64))
        present[pos, j] = True
        touches[pos, j] = t["touches_border"].to_numpy().astype(bool)
        rv = t["roi_voxels"].to_numpy().astype(np.int64)
        roi_voxels[pos, j] = rv
        empty[pos, j] = rv == 0
        roi_mean[pos, j] = np.where(rv > 0, t["roi_mean"].to_numpy(dtype=float), np.nan)
    incons = all_labels[~present.all(axis=1)]
    neighbour = np.zeros(n, bool)
    method = {}
    if gap is not None and len(incons):
        graphs, found = [], []
        for st in parsed:
            here = incons[np.isin(incons, st.label_set)]
            if len(here) == 0:
                method[st.name] = "none needed"
                continue
            if gap == 0 and st.contacts is not None:
                c = st.contacts
                a, b = c["label_a"].to_numpy().astype(np.uint64), c["label_b"].to_numpy().astype(np.uint64)
                found.append(np.concatenate([b[np.isin(a, here)], a[np.isin(b, here)]]))
                method[st.name] = "contacts table"
            else:
                graphs.append(_neighbour_graph(st.labels, here, gap, analyze_options.get("chunks")))
                method[st.name] = "chunk search"
        if graphs:
            for pairs in _compute(*graphs, client=client, progress=progress, desc="neighbour search"):
                found.append(pairs[:, 1])
        if found:
            neighbour = np.isin(all_labels, np.concatenate(found).astype(np.uint64))
    ref_j = names.index(reference)
    ref_t = parsed[ref_j].table.set_index("label")
    size = "volume" if "volume" in ref_t.columns else "area"  # 2D tables have an area
    ref_volume = ref_t[size].reindex(all_labels).to_numpy(dtype=float)
    flags, excluded = _clean(all_labels, present, touches, empty, neighbour, np.nan_to_num(ref_volume, nan=-1.0),
                             float(drop_smallest))
    reason = np.array([";".join(r for r, f in zip(REASONS, row) if f) for row in flags], dtype=object)
    _check_kept(flags, excluded, int(exclude_outer_layers), float(drop_smallest), gap)

    # 5. the long table
    shifts = _shifts(background, names, reference)
    background["shift"] = shifts
    raw_mean = roi_mean
    if correct_drift:
        roi_mean = roi_mean - np.array([shifts[nm] for nm in names])[None, :]
    roi_sem = np.column_stack([particle_sem(roi_voxels[:, j], noise[nm]["sigma"]) for j, nm in enumerate(names)])
    delta = roi_mean - roi_mean[:, [ref_j]]
    delta_sem = np.column_stack([change_sem(roi_sem[:, ref_j], roi_sem[:, j]) for j in range(len(names))])
    delta_sem[:, ref_j] = np.where(np.isfinite(roi_mean[:, ref_j]), 0.0, np.nan)
    nd = len(shape) if shape is not None else sum(1 for c in ref_t.columns if str(c).startswith("centroid-"))
    cents = {f"centroid-{a}": ref_t[f"centroid-{a}"].reindex(all_labels).to_numpy(dtype=float) for a in range(nd)}
    S = len(names)
    long = pd.DataFrame({
        "label": np.tile(all_labels, S).astype(np.uint64),
        "state": pd.Categorical(np.repeat(names, n), categories=names, ordered=True),
        "roi_mean": roi_mean.T.ravel(),
        "roi_voxels": roi_voxels.T.ravel(),
        "roi_sem": roi_sem.T.ravel(),
        "delta": delta.T.ravel(),
        "delta_sem": delta_sem.T.ravel(),
        "volume": np.tile(ref_volume, S),
        **{k: np.tile(v, S) for k, v in cents.items()},
        "excluded": np.tile(excluded, S),
        "reason": np.tile(reason, S).astype(str).astype(object),
    })
    if correct_drift:  # nothing lost: the uncorrected values and the shift beside the corrected ones
        long["roi_mean_uncorrected"] = raw_mean.T.ravel()
        long["delta_uncorrected"] = (raw_mean - raw_mean[:, [ref_j]]).T.ravel()
        long["background_shift"] = np.repeat([shifts[nm] for nm in names], n)
    params = {
        "states": names, "reference": reference, "noise": noise, "background": background,
        "exclude_outer_layers": int(exclude_outer_layers), "drop_smallest": float(drop_smallest),
        "neighbour_gap": gap, "neighbour_method": method, "spacing": list(spacing),
        "spacing_unit": next((s.spacing_unit for s in parsed if s.spacing_unit), None),
        "spacing_sources": {s.name: s.spacing_source for s in parsed},
        "shape": None if shape is None else list(shape),
        "analysis": {k: v for k, v in parsed[ref_j].params.items() if k not in ("version", "created")},
        "inputs": {s.name: {"grey": None if s.grey is None else s.grey.name,
                            "labels": None if s.labels is None else s.labels.name,
                            "table": "analysed here" if s.analyse else "given"} for s in parsed},
        **provenance(command="track"),
    }
    long.attrs["grapes_dask"] = params
    tables = {s.name: s.table for s in parsed}
    volumes = {s.name: (s.grey, s.labels) for s in parsed}
    tr = Tracking(long, tables, params, names, reference, volumes)
    _warn_drift(tr)
    return tr


def _warn_drift(tr: Tracking) -> None:
    """A GrapesBackgroundWarning naming the states whose background drifts (recorded in
    ``params["background"]["flagged"]``)."""
    import warnings

    from .stats import GrapesBackgroundWarning

    bg = tr.background()
    flagged = bg[bg["flag"]]
    tr.params["background"]["flagged"] = [str(s) for s in flagged["state"]]
    intruded = bg[bg["labelled"] > 0]
    if len(intruded):
        warnings.warn(GrapesBackgroundWarning(
            f"the empty region {tr.params['background']['box']} of the reference holds labelled voxels in "
            + ", ".join(f"{r.state} ({r.labelled})" for r in intruded.itertuples())
            + ": particles moved into it, and its peak there mixes them in; give a box that stays empty "
              "(noise_region / --noise-region)"), stacklevel=3)
    if len(flagged):
        what = ", ".join(f"{r.state}: {r.shift:+.3g} grey levels against a mean change of {r.delta_mean:+.3g}"
                         for r in flagged.itertuples())
        done = ("subtracted (correct_drift)" if tr.params["background"].get("correct_drift") else
                "not corrected: pass correct_drift=True (--correct-drift) to subtract it")
        warnings.warn(GrapesBackgroundWarning(
            f"the grey-level peak of the empty region {tr.params['background']['box']} drifts between states "
            f"({what}): a beam drift that large biases the changes measured; {done}"), stacklevel=3)
