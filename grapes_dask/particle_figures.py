"""The paper's particle figures: labels over grey (fig. 5), the ROI shell (fig. 8b) and the void
fraction per radial layer from a crack segmentation (fig. 11f).

- :func:`plot_labels_over_grey` (fig. 5): one plane of the grey volume with the label
  segmentation over it, one colour per particle, optional outlines. Only that plane of each
  volume is read.
- :func:`plot_roi_shell` (fig. 8b): one particle's central slice, its outer layers
  ``1..N`` (left out of the ROI) and its ROI (layers ``> N``) in two colours over the grey
  levels; the legend gives N and the ROI's voxel count in the whole particle.
- :func:`void_fraction_profiles` (fig. 11f): per particle and radial layer, the fraction of
  voxels that a binary crack segmentation marks as void, computed out of core by the
  particle-table engine (the mean of a 0/1 image over a layer *is* that fraction);
  :func:`void_fraction_population` averages it over particles with standard errors and
  :func:`plot_void_fraction` draws it as the paper's "volume fraction of NMC".
- :func:`particle_figure_sections`: fig. 5 and fig. 8b as report sections
  (:class:`grapes_dask.report.Section`) for :func:`grapes_dask.report.tables_report` and
  :func:`grapes_dask.report.tracking_report`.
- :func:`phantom_crack_mask`: the crack and void segmentation of a synthetic phantom
  (:mod:`grapes_dask.synthetic`), for tests and examples.

Radial layers here are counted in voxels: with ``s`` the voxel size per axis, the distance
``d`` of a particle voxel to the nearest voxel outside the particle is measured in units of
the smallest voxel edge (the EDT with sampling ``s / min(s)``; voxels outside the volume
count as outside when ``black_border``), and the layer is
``k = max(1, round_half_even(d / layer_width))`` with `layer_width` in those units (default 1:
layers one voxel thick). At unit spacing (or any spacing whose smallest edge is 1) this is
exactly the layer of :func:`grapes_dask.analyze` with its default layer width.

Every plotting function returns a :class:`matplotlib.figure.Figure` built without pyplot, as
:mod:`grapes_dask.plotting` does.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ._errors import GrapesInputError, GrapesInputWarning

__all__ = [
    "plot_labels_over_grey",
    "label_colours",
    "particle_layers",
    "plot_roi_shell",
    "void_fraction_profiles",
    "void_fraction_population",
    "VoidFractions",
    "plot_void_fraction",
    "particle_figure_sections",
    "phantom_crack_mask",
]

_AXES3 = ("z", "y", "x")
_AXES2 = ("y", "x")
# unit names as metadata records them -> as an axis label shows them
_UNIT_SYMBOL = {
    "micrometer": "µm", "micrometre": "µm", "micron": "µm", "microns": "µm", "um": "µm", "µm": "µm",
    "μm": "µm", "nanometer": "nm", "nanometre": "nm", "nm": "nm", "millimeter": "mm", "millimetre": "mm",
    "mm": "mm", "centimeter": "cm", "centimetre": "cm", "cm": "cm", "meter": "m", "metre": "m", "m": "m",
    "angstrom": "Å", "å": "Å",
}
_SHELL_COLOUR = (0.95, 0.55, 0.1)  # excluded outer layers: orange
_ROI_COLOUR = (0.15, 0.45, 0.95)  # ROI: blue


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    """A voxel size as the user wrote it: 0.325, not 0.32499999999999996 (6 significant digits)."""
    return f"{float(v):.6g}"


_VOXEL_UNITS = {"voxel", "voxels", "pixel", "pixels", "px", "vx"}


def _unit_symbol(unit) -> str | None:
    if unit is None or str(unit).strip() == "":
        return None
    u = str(unit).strip()
    return _UNIT_SYMBOL.get(u.lower(), u)


def _is_voxel_unit(unit) -> bool:
    """A 'unit' that says the spacing is in voxels (synthetic phantoms record 'voxel')."""
    return unit is not None and str(unit).strip().lower() in _VOXEL_UNITS


def _relative(spacing) -> tuple:
    """Spacing in units of its smallest edge (1 on the finest axis)."""
    s = np.asarray(spacing, dtype=float)
    return tuple(float(x) for x in s / s.min())


def _check_layer_width(layer_width) -> float:
    try:
        w = float(layer_width)
    except (TypeError, ValueError):
        w = float("nan")
    if isinstance(layer_width, bool) or not (math.isfinite(w) and w > 0):
        raise GrapesInputError("{layer_width}: give a positive layer width in voxels (of the smallest voxel edge; "
                               "1 = layers one voxel thick)", layer_width=layer_width)
    return w


def _check_n_outer(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer, float)) or int(n) != n or n < 0:
        raise GrapesInputError("{exclude_outer_layers}: give a whole number of layers >= 0 (the paper: 5)",
                               exclude_outer_layers=n)
    return int(n)


@dataclass(frozen=True)
class _Geometry:
    """Voxel size per axis and how to label lengths."""

    spacing: tuple
    unit: str | None  # symbol, or None
    physical: bool  # spacing known (given or from metadata), not the default 1

    def axis_label(self, name: str) -> str:
        if not self.physical:
            return f"{name} (voxels)"
        return f"{name} ({self.unit})" if self.unit else f"{name} (spacing units)"

    def voxel_text(self) -> str:
        if not self.physical:
            return ""
        sizes = sorted(set(self.spacing))
        size = _fmt(sizes[0]) if len(sizes) == 1 else " × ".join(_fmt(s) for s in self.spacing)
        return f"voxel {size}" + (f" {self.unit}" if self.unit else " (spacing units)")


def _geometry(volumes: dict, spacing=None, unit=None) -> _Geometry:
    from .io import settle_spacing

    sp, source, meta_unit = settle_spacing(volumes, spacing)
    unit = unit if unit is not None else (meta_unit if spacing is None else None)
    physical = not source.startswith("default") and not _is_voxel_unit(unit)
    return _Geometry(tuple(float(s) for s in sp), None if _is_voxel_unit(unit) else _unit_symbol(unit), physical)


def _label_axes(ax, geo: _Geometry, rows: str, cols: str) -> None:
    ax.set_xlabel(geo.axis_label(cols))
    ax.set_ylabel(geo.axis_label(rows))
    if not geo.physical:  # voxel indices: whole numbers
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _extent(shape2: tuple, steps: tuple, offset=(0, 0)) -> list:
    """imshow extent with pixel centres at (offset + i) * step: [left, right, bottom, top]."""
    (nr, nc), (sr, sc), (o_r, o_c) = shape2, steps, offset
    return [(o_c - 0.5) * sc, (o_c + nc - 0.5) * sc, (o_r + nr - 0.5) * sr, (o_r - 0.5) * sr]


def _plane_steps(geo: _Geometry, ndim: int, axis) -> tuple:
    if ndim == 2 or axis is None:
        return geo.spacing[-2], geo.spacing[-1]
    rest = [s for i, s in enumerate(geo.spacing) if i != axis]
    return rest[0], rest[1]


def _plane_names(ndim: int, axis) -> tuple:
    if ndim == 2 or axis is None:
        return _AXES2
    rest = [a for i, a in enumerate(_AXES3) if i != axis]
    return rest[0], rest[1]


# --------------------------------------------------------------------------------------------
# fig. 5: labels over grey
# --------------------------------------------------------------------------------------------


def label_colours(ids) -> np.ndarray:
    """A fixed, distinct-looking colour for each label id (the same id gets the same colour everywhere).

    Parameters
    ----------
    ids : array-like of int, shape (n,)
        Label ids (any unsigned or non-negative integers, up to 2**64 - 1).

    Returns
    -------
    numpy.ndarray, float64, shape (n, 3)
        RGB in 0..1: hue from a 64-bit hash of the id (splitmix64), saturation 0.55-0.95,
        value 0.75-1.0, so that neighbouring ids look different.
    """
    from matplotlib.colors import hsv_to_rgb

    h = np.asarray(ids).astype(np.uint64).ravel()
    with np.errstate(over="ignore"):
        h = h + np.uint64(0x9E3779B97F4A7C15)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = h ^ (h >> np.uint64(31))
    hue = (h >> np.uint64(40)).astype(np.float64) / 2.0**24
    sat = 0.55 + 0.4 * ((h >> np.uint64(20)) & np.uint64(0xFFFFF)).astype(np.float64) / 2.0**20
    val = 0.75 + 0.25 * (h & np.uint64(0xFFFFF)).astype(np.float64) / 2.0**20
    return hsv_to_rgb(np.stack([hue, sat, val], axis=-1))


def _boundaries(lab: np.ndarray) -> np.ndarray:
    """Particle pixels with a 4-neighbour of another label (background included)."""
    edge = np.zeros(lab.shape, dtype=bool)
    for a in range(lab.ndim):
        n = lab.shape[a]
        if n < 2:
            continue
        lo = [slice(None)] * lab.ndim
        hi = [slice(None)] * lab.ndim
        lo[a], hi[a] = slice(0, n - 1), slice(1, n)
        diff = lab[tuple(lo)] != lab[tuple(hi)]
        edge[tuple(lo)] |= diff
        edge[tuple(hi)] |= diff
    return edge & (lab != 0)


def _overlay(lab: np.ndarray, alpha: float, outlines: bool, outline_colour) -> np.ndarray:
    """RGBA image: each particle in its colour at `alpha`, background transparent, outlines opaque."""
    from matplotlib.colors import to_rgb

    flat = lab.astype(np.uint64, copy=False).ravel()
    ids, inverse = np.unique(flat, return_inverse=True)
    cols = label_colours(ids)
    rgba = np.zeros(flat.shape + (4,))
    rgba[:, :3] = cols[inverse]
    rgba[:, 3] = np.where(flat != 0, alpha, 0.0)
    rgba = rgba.reshape(lab.shape + (4,))
    if outlines:
        edge = _boundaries(lab)
        rgba[edge, :3] = to_rgb(outline_colour)
        rgba[edge, 3] = 1.0
    return rgba


def plot_labels_over_grey(grey, labels, axis: int = 0, index: int | None = None, *, alpha: float = 0.45,
                          outlines: bool = True, outline_colour="white", spacing=None, unit: str | None = None,
                          grey_range=None, ax=None, title: str | None = None):
    """A plane of the grey volume with the label segmentation over it (paper fig. 5).

    Only that plane of each volume is read (of a Zarr store, only the chunks it crosses), so the
    volumes may be far larger than memory.

    Parameters
    ----------
    grey, labels : path, array or grapes_dask.io.Volume
        Grey-level and label volumes of one shape, ``(Z, Y, X)`` or ``(Y, X)``; anything
        :func:`grapes_dask.io.open_volume` accepts. Label 0 is background.
    axis : {0, 1, 2}
        Axis the plane is normal to (0: a z plane, showing y and x); ignored in 2D.
    index : int, optional
        Plane index along `axis`, voxels (default: the central plane).
    alpha : float
        Opacity of the label colours, 0..1 (background is transparent).
    outlines : bool
        Draw each particle's boundary pixels (those with a 4-neighbour of another label) opaque in
        `outline_colour`, so that touching particles of similar colours stay apart.
    outline_colour : matplotlib colour
    spacing : float or sequence of float, optional
        Voxel size per axis (z, y, x); default from the volumes' metadata (labels first). With a
        voxel size the axes are in its unit (e.g. "x (µm)"), else in voxels.
    unit : str, optional
        Unit of `spacing` (``"um"``, ``"micrometer"``, ``"nm"``...); default the metadata's.
    grey_range : (float, float), optional
        Grey levels shown black and white; default the 0.5 and 99.5 percentiles of the plane.
    ax : matplotlib Axes, optional
        Draw on it instead of a new figure.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        ``ax.images[0]`` is the grey plane (its data exactly the volume's plane, shape
        ``(rows, columns)``), ``ax.images[1]`` the RGBA overlay (same shape, 4 channels); the
        image extent is in the spacing's unit, pixel centres at ``index * spacing``.

    Raises
    ------
    GrapesInputError
        Volumes of different shapes, metadata voxel sizes that disagree, a bad `axis`, `index`
        or `alpha`.
    """
    from .io import resolve_volume
    from .plotting import _figure, _take_slice

    if not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        raise GrapesInputError("{alpha}: give an opacity between 0 and 1", alpha=alpha)
    gv, lv = resolve_volume(grey), resolve_volume(labels)
    if gv.shape != lv.shape:
        raise GrapesInputError(f"grey {gv.name!r} has shape {gv.shape} but labels {lv.name!r} have shape {lv.shape}: "
                               "give the grey volume and the label volume of one scan (same shape)")
    if lv.dtype.kind not in "uib":
        raise GrapesInputError(f"labels {lv.name!r} have dtype {lv.dtype}: give an integer label volume "
                               "(0 = background, one id per particle)")
    geo = _geometry({"labels": lv, "grey": gv}, spacing, unit)
    g_plane, ax_used, idx = _take_slice(gv.array, axis, index, "grey")
    l_plane, _, _ = _take_slice(lv.array, axis, index, "labels")
    ndim = lv.ndim
    rows, cols = _plane_names(ndim, ax_used)
    steps = _plane_steps(geo, ndim, ax_used)
    extent = _extent(g_plane.shape, steps)
    fig, ax = _figure(ax, figsize=(6.0, 5.2))
    finite = g_plane[np.isfinite(g_plane)] if g_plane.dtype.kind == "f" else g_plane
    if grey_range is None:
        lo, hi = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
    else:
        lo, hi = grey_range
    if not hi > lo:
        hi = lo + 1
    im = ax.imshow(g_plane, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest", extent=extent)
    ax.imshow(_overlay(l_plane, float(alpha), outlines, outline_colour), interpolation="nearest", extent=extent)
    fig.colorbar(im, ax=ax, label="grey level", shrink=0.8)
    _label_axes(ax, geo, rows, cols)
    n = int(np.count_nonzero(np.unique(l_plane)))
    where = f"{_AXES3[ax_used]} = {idx}" if idx is not None else "2D image"
    vox = geo.voxel_text()
    ax.set_title(title or f"labels over grey levels, {where}: {n} particles" + (f"\n{vox}" if vox else ""),
                 fontsize="medium")
    return fig


# --------------------------------------------------------------------------------------------
# fig. 8b: the ROI shell of one particle
# --------------------------------------------------------------------------------------------


def _table_params(table) -> dict:
    if table is None or isinstance(table, (str, bytes)) or not hasattr(table, "attrs"):
        return {}
    return dict(table.attrs.get("grapes_dask") or {})


def particle_layers(particle_or_sources, label=None, *, layer_width: float = 1.0, spacing=None, unit=None,
                    black_border: bool | None = None, pad: int = 1):
    """One particle's crop with its edge layers counted in voxels (the ROI's layers).

    Parameters
    ----------
    particle_or_sources : Particle, or (grey, labels, table)
        A particle from :func:`grapes_dask.particle`, or the sources to read it from: the grey
        volume (or None), the label volume and the particle table (DataFrame or path, with
        ``label`` and ``bbox-*``), as :func:`grapes_dask.particle` takes them. Only the blocks
        around the particle are read.
    label : int, optional
        The particle's id (required with sources; checked against a Particle's).
    layer_width : float
        Layer width in voxels of the smallest voxel edge (1: one voxel).
    spacing : float or sequence of float, optional
        Voxel size per axis; default the table's (``attrs["grapes_dask"]["spacing"]``), else the
        volumes' metadata, else 1. Only its ratios shape the layers (sampling ``spacing /
        min(spacing)``).
    unit : str, optional
        Unit of the spacing for axis labels (``"um"``, ``"micrometer"``...); default the table's
        (``spacing_unit``) or the metadata's.
    black_border : bool, optional
        Voxels outside the volume count as outside the particle; default the table's, else True.
        A Particle object carries no volume shape, so with one only True is possible.
    pad : int
        Voxels around the bounding box read with sources.

    Returns
    -------
    Particle
        As :func:`grapes_dask.particle` returns it, with ``distance`` the EDT in voxels of the
        smallest edge (float64, the crop's shape, 0 outside the mask), ``layers`` =
        ``max(1, round_half_even(distance / layer_width))`` on the mask (int64, 0 outside),
        ``spacing`` the relative spacing used and ``layer_width`` in voxels.
    """
    return _particle_layers(particle_or_sources, label, layer_width=layer_width, spacing=spacing, unit=unit,
                            black_border=black_border, pad=pad)[0]


def _particle_layers(particle_or_sources, label=None, *, layer_width: float = 1.0, spacing=None, unit=None,
                     black_border: bool | None = None, pad: int = 1):
    """(Particle with layers in voxels, _Geometry for the axes): see :func:`particle_layers`.

    Returns
    -------
    Particle
        See :func:`particle_layers`.
    geometry : _Geometry
        Physical voxel size and unit, for axis labels.
    """
    import dataclasses

    from .io import resolve_volume
    from .kernels.distance import edt_core
    from .output import Particle, particle

    width = _check_layer_width(layer_width)
    if isinstance(particle_or_sources, Particle) or (hasattr(particle_or_sources, "mask")
                                                    and hasattr(particle_or_sources, "row")):
        p = particle_or_sources
        if label is not None and int(label) != int(p.label):
            raise GrapesInputError(f"{{label}}={label} but the particle given is label {p.label}: leave label out "
                                   "or give the sources (grey, labels, table)", label=None)
        if black_border is False:
            raise GrapesInputError(
                "{black_border}=False needs the volume's shape, which a Particle does not carry: give the sources "
                "(grey, labels, table) instead of the Particle", black_border=None)
        sp = tuple(float(s) for s in (p.spacing or (1.0,) * p.mask.ndim)) if spacing is None else spacing
        from .io import check_spacing

        sp = check_spacing(sp, p.mask.ndim)
        physical = spacing is not None or (p.spacing and any(s != 1.0 for s in p.spacing))
        geo = _Geometry(sp, _unit_symbol(unit), bool(physical))
        rel = _relative(sp)
        # the box is tight: beyond every crop side lies a voxel outside the particle, or the
        # volume's outside (outside too with black_border), so every side is a boundary
        dist = edt_core(np.ascontiguousarray(p.mask, dtype=np.uint8), spacing=rel, border=True)
        with np.errstate(invalid="ignore"):
            layers = np.maximum(1, np.rint(dist / width)).astype(np.int64)
        out = dataclasses.replace(p, distance=np.where(p.mask, dist, 0.0), layers=np.where(p.mask, layers, 0),
                                  spacing=rel, layer_width=width, start_at="edge")
        return out, geo
    if not (isinstance(particle_or_sources, (tuple, list)) and len(particle_or_sources) == 3):
        raise GrapesInputError(
            "particle_or_sources: give a Particle (grapes_dask.particle(...)) or the sources (grey, labels, table), "
            f"not {type(particle_or_sources).__name__}")
    if label is None:
        raise GrapesInputError("{label}: give the id of the particle to show", label=None)
    grey, labels, table = particle_or_sources
    if isinstance(table, (str, bytes)) or hasattr(table, "__fspath__"):
        from .output import read_table

        table = read_table(table)
    params = _table_params(table)
    lv = resolve_volume(labels)
    vols = {"labels": lv}
    if grey is not None:
        vols["grey"] = resolve_volume(grey)
    if spacing is None and params.get("spacing") is not None:
        spacing_used = params["spacing"]
        from .io import check_spacing

        unit = unit if unit is not None else params.get("spacing_unit")
        physical = not str(params.get("spacing_source", "")).startswith("default") and not _is_voxel_unit(unit)
        geo = _Geometry(check_spacing(spacing_used, lv.ndim), None if _is_voxel_unit(unit) else _unit_symbol(unit),
                        physical)
    else:
        geo = _geometry(vols, spacing, unit)
    bb = params.get("black_border", True) if black_border is None else bool(black_border)
    p = particle(vols.get("grey"), lv, table, label, pad=pad, spacing=_relative(geo.spacing), layer_width=width,
                 start_at="edge", black_border=bb)
    return p, geo


def plot_roi_shell(particle_or_sources, label=None, exclude_outer_layers: int = 5, axis: int = 0,
                   index: int | None = None, *, layer_width: float = 1.0, spacing=None, unit=None,
                   black_border: bool | None = None, pad: int = 1, alpha: float = 0.5, ax=None,
                   title: str | None = None):
    """One particle's central slice: the excluded outer layers and the ROI over the grey levels (fig. 8b).

    The ROI of a particle (``roi_*`` columns of :func:`grapes_dask.analyze`) is its voxels in
    edge layers ``> exclude_outer_layers``; the outer layers ``1..N`` (the phase-contrast rim
    and the partial-volume voxels) are left out. Drawn: the grey levels of the particle's crop,
    the outer layers in orange and the ROI in blue (at `alpha`), the particle's outline; the
    legend gives N and the voxel counts of the whole particle (all planes).

    Parameters
    ----------
    particle_or_sources : Particle, or (grey, labels, table)
        See :func:`particle_layers`; with sources only the particle's box is read.
    label : int, optional
        The particle's id (required with sources).
    exclude_outer_layers : int
        N, the outer layers left out of the ROI (the paper: 5), >= 0.
    axis : {0, 1, 2}
        Axis the slice is normal to (ignored in 2D).
    index : int, optional
        Plane along `axis` as a **volume** index (voxels); default the plane through the
        particle's centroid (the table's ``centroid-*``), else the crop's central plane.
    layer_width : float
        Layer width in voxels of the smallest voxel edge (1: one voxel).
    spacing, unit, black_border, pad
        See :func:`particle_layers`.
    alpha : float
        Opacity of the two colours, 0..1.
    ax : matplotlib Axes, optional
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        ``ax.images[0]`` the grey (or mask) plane, ``ax.images[1]`` the RGBA layer overlay; axes
        in volume coordinates, in the spacing's unit when known. The legend's ROI count equals
        the table's ``roi_voxels`` when the table was made with the same layers.

    Raises
    ------
    GrapesInputError
        Bad `exclude_outer_layers`, `layer_width`, `axis` or `index`, a label not in the table,
        or any error of :func:`grapes_dask.particle`.

    Warns
    -----
    GrapesInputWarning
        When the table's ``exclude_outer_layers`` is N but its ``roi_voxels`` differs from the
        count drawn (the table was made with other layers: another layer width or spacing).
    """
    from .plotting import _figure

    n_outer = _check_n_outer(exclude_outer_layers)
    if not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        raise GrapesInputError("{alpha}: give an opacity between 0 and 1", alpha=alpha)
    if isinstance(particle_or_sources, (tuple, list)) and len(particle_or_sources) == 3:
        tab = particle_or_sources[2]
        if isinstance(tab, (str, bytes)) or hasattr(tab, "__fspath__"):  # read once: its rows and parameters
            from .output import read_table

            particle_or_sources = (particle_or_sources[0], particle_or_sources[1], read_table(tab))
    p, geo = _particle_layers(particle_or_sources, label, layer_width=layer_width, spacing=spacing, unit=unit,
                              black_border=black_border, pad=pad)
    nd = p.mask.ndim
    mask, layers = p.mask, p.layers
    n_roi = int(np.count_nonzero(layers > n_outer))
    n_shell = int(np.count_nonzero(mask)) - n_roi
    row = p.row
    params_n = None
    if row is not None and "roi_voxels" in getattr(row, "index", ()):
        params_n = row.get("roi_voxels")
    if nd == 3:
        if axis not in (0, 1, 2):
            raise GrapesInputError("{axis}: choose 0 (z), 1 (y) or 2 (x)", axis=axis)
        lo, n = p.origin[axis], mask.shape[axis]
        if index is None:
            c = row.get(f"centroid-{axis}") if row is not None and hasattr(row, "get") else None
            index = int(round(float(c))) if c is not None and np.isfinite(float(c)) else lo + n // 2
            index = min(max(index, lo), lo + n - 1)
        index = int(index)
        if not lo <= index < lo + n:
            raise GrapesInputError(f"{{index}}={index}: the particle's crop spans {lo}..{lo + n - 1} along axis "
                                   f"{axis} (volume indices); give a plane in it", index=None)
        key = [slice(None)] * 3
        key[axis] = index - lo
        key = tuple(key)
        offset = [o for i, o in enumerate(p.origin) if i != axis]
        ax_used = axis
    else:
        key, offset, ax_used = (slice(None), slice(None)), list(p.origin), None
    m2, l2 = mask[key], layers[key]
    g2 = None if p.grey is None else np.asarray(p.grey)[key]
    rows, cols = _plane_names(nd, ax_used)
    extent = _extent(m2.shape, _plane_steps(geo, nd, ax_used), offset)
    fig, ax = _figure(ax, figsize=(5.8, 5.0))
    if g2 is not None:
        im = ax.imshow(g2, cmap="gray", interpolation="nearest", extent=extent)
        fig.colorbar(im, ax=ax, label="grey level", shrink=0.8)
    else:
        ax.imshow(m2.astype(float), cmap="gray", vmin=0, vmax=2, interpolation="nearest", extent=extent)
    rgba = np.zeros(m2.shape + (4,))
    shell2, roi2 = m2 & (l2 <= n_outer), l2 > n_outer
    rgba[shell2, :3], rgba[roi2, :3] = _SHELL_COLOUR, _ROI_COLOUR
    rgba[shell2 | roi2, 3] = float(alpha)
    ax.imshow(rgba, interpolation="nearest", extent=extent)
    if m2.any() and not m2.all():
        ys = (np.arange(m2.shape[0]) + offset[0]) * _plane_steps(geo, nd, ax_used)[0]
        xs = (np.arange(m2.shape[1]) + offset[1]) * _plane_steps(geo, nd, ax_used)[1]
        ax.contour(xs, ys, m2.astype(float), levels=[0.5], colors="white", linewidths=0.8)
    from matplotlib.patches import Patch

    thick = "voxel" if layer_width == 1 else f"{_fmt(layer_width)} voxels"
    handles = [
        Patch(facecolor=(*_SHELL_COLOUR, alpha), edgecolor="none",
              label=f"outer layers 1-{n_outer} excluded: {n_shell:,} voxels" if n_outer else "no layer excluded"),
        Patch(facecolor=(*_ROI_COLOUR, alpha), edgecolor="none",
              label=f"ROI, layers > {n_outer}: {n_roi:,} voxels"),
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize="small", frameon=False,
              title=f"N = {n_outer} (layers 1 {thick} thick; counts over the whole particle)",
              title_fontsize="small")
    _label_axes(ax, geo, rows, cols)
    where = f", {_AXES3[ax_used]} = {index}" if ax_used is not None else ""
    vox = geo.voxel_text()
    ax.set_title(title or f"particle {p.label}{where}: ROI without the outer {n_outer} layers"
                 + (f"\n{vox}" if vox else ""), fontsize="medium")
    if params_n is not None and params_n == params_n and isinstance(particle_or_sources, (tuple, list)):
        tab_params = _table_params(particle_or_sources[2])
        if tab_params.get("exclude_outer_layers") == n_outer and int(params_n) != n_roi:
            warnings.warn(
                f"particle {p.label}: the table's roi_voxels is {int(params_n)} but the ROI drawn has {n_roi} voxels "
                f"(layers {_fmt(layer_width)} voxel(s) thick, spacing ratios {p.spacing}): the table was made with "
                "other layers (layer width or spacing); give layer_width to match it", GrapesInputWarning,
                stacklevel=2)
    return fig


# --------------------------------------------------------------------------------------------
# fig. 11f: void fraction per radial layer
# --------------------------------------------------------------------------------------------


def _binary_block(block, name: str):
    """A crack-mask block as uint8 0/1; any other value stops the run naming the input and the fix."""
    if block.dtype == bool:
        return block.astype(np.uint8)
    if block.size:
        bad = (block != 0) & (block != 1)
        if bad.any():
            vals = np.unique(block[bad])[:5]
            raise GrapesInputError(
                f"cracks {name!r} is not binary: it holds {', '.join(repr(v.item()) for v in vals)} besides 0 and 1. "
                "Give a crack segmentation with 1 (or True) on crack and void voxels and 0 elsewhere, e.g. "
                "(cracks > threshold) of a probability map, or (cracks == crack_class) of a multi-class segmentation")
    return block.astype(np.uint8)


@dataclass
class VoidFractions:
    """Void (crack) fraction per particle and radial layer (:func:`void_fraction_profiles`).

    Attributes
    ----------
    layers : pandas.DataFrame
        One row per particle and non-empty layer: ``label`` (uint64), ``layer`` (1..K from the
        surface), ``n_voxels`` (particle voxels in the layer), ``void_voxels`` (those the crack
        mask marks), ``void_fraction`` (= void_voxels / n_voxels, 0..1) and ``nmc_fraction``
        (= 1 - void_fraction, the paper's "volume fraction of NMC").
    particles : pandas.DataFrame
        One row per particle: ``label``, ``n_voxels``, ``void_voxels``, ``void_fraction`` (whole
        particle), ``touches_border``, ``centroid-*`` and ``bbox-*`` (voxel indices), and the
        list columns ``radial_layers``, ``radial_layers_count`` and ``radial_void_fraction``
        (NaN for an empty layer).
    population : pandas.DataFrame
        :func:`void_fraction_population` of `layers` over every particle.
    parameters : dict
        ``spacing`` (physical, per axis), ``spacing_unit``, ``relative_spacing`` (the one the
        layers use), ``layer_width`` (voxels), ``start_at``, ``black_border``, the inputs, and
        the engine's parameters under ``analysis``.
    """

    layers: pd.DataFrame
    particles: pd.DataFrame
    population: pd.DataFrame
    parameters: dict = field(default_factory=dict)


def void_fraction_profiles(cracks, labels, *, spacing=None, layer_width: float = 1.0, start_at: str = "edge",
                           black_border: bool = True, client=None, progress: bool = False,
                           **analyze_options) -> VoidFractions:
    """Fraction of crack (void) voxels per particle and radial layer, out of core (paper fig. 11f).

    The mean of a 0/1 image over the voxels of one radial layer of one particle is the fraction
    of those voxels that are 1; so the crack mask, as uint8, is analysed as a grey volume by
    the particle-table engine (:func:`grapes_dask.analyze_tables`: chunked, exact, on any Dask
    scheduler), and ``void_voxels = rint(mean * count)`` per layer. The values are checked
    while the blocks are read (no extra pass).

    Crack voxels **outside every particle** (label 0, e.g. pore space that a crack
    segmentation also marks) are ignored: the fractions are of particle voxels. A particle's
    voids must therefore be inside its label (segmented as particle, with the cracks marked in
    `cracks`); cavities labelled 0 and enclosed by one particle count as its voxels only with
    ``fill_holes=True`` (then, where the mask marks them, as void).

    Parameters
    ----------
    cracks : path, array or grapes_dask.io.Volume
        Binary crack segmentation of the shape of `labels`: bool, or integers/floats that are
        0 or 1 (1 = crack or void). Anything :func:`grapes_dask.io.open_volume` accepts.
    labels : path, array or grapes_dask.io.Volume
        Label volume, 0 background, one integer id per particle.
    spacing : float or sequence of float, optional
        Voxel size per axis (z, y, x); default from the metadata (labels first), else 1. Only
        its ratios matter: distances are in units of the smallest voxel edge.
    layer_width : float
        Layer width in voxels of the smallest voxel edge (1: layers one voxel thick).
    start_at : {"edge", "center"}
        Layer 1 at the surface (``k = max(1, round_half_even(d / layer_width))``, d the EDT) or
        at the centroid (``k = 1 + round_half_even(c / layer_width)``), as :func:`grapes_dask.analyze`.
    black_border : bool
        Voxels outside the volume count as outside every particle.
    client : distributed.Client, optional
        Where to compute (default: the current scheduler).
    progress : bool
        Progress on standard error.
    **analyze_options
        Other options of :func:`grapes_dask.analyze` (``chunks``, ``memory_limit``,
        ``region_size``, ``exclude_labels``, ``fill_holes``, ``max_hole_size``,
        ``check_labels``, ``partials``).

    Returns
    -------
    VoidFractions
        ``layers`` (long table), ``particles`` (one row per particle), ``population`` (mean over
        particles per layer with standard errors) and ``parameters``.

    Raises
    ------
    GrapesInputError
        `cracks` and `labels` of different shapes, `cracks` not binary (named with its values),
        `cracks` of a non-numeric dtype, bad options (as :func:`grapes_dask.analyze`).
    """
    import dask.array as da

    from .io import resolve_volume
    from .table import analyze_tables

    for bad in ("grey", "exclude_outer_layers", "normalise"):
        if bad in analyze_options:
            raise GrapesInputError(f"{{{bad}}} is not an option of void_fraction_profiles: leave it out", **{bad: None})
    width = _check_layer_width(layer_width)
    chunks = analyze_options.get("chunks")
    cv, lv = resolve_volume(cracks, chunks=chunks), resolve_volume(labels, chunks=chunks)
    if cv.shape != lv.shape:
        raise GrapesInputError(
            f"cracks {cv.name!r} has shape {cv.shape} but labels {lv.name!r} have shape {lv.shape}: give the crack "
            "segmentation of the same scan as the labels (same shape; crop or pad one of them)")
    if cv.dtype != bool and cv.dtype.kind not in "uif":
        raise GrapesInputError(f"cracks {cv.name!r} has dtype {cv.dtype}: give a binary mask (bool, or 0/1 integers)")
    geo = _geometry({"labels": lv, "cracks": cv}, spacing, None)
    rel = _relative(geo.spacing)
    arr = cv.array
    binary = arr.map_blocks(_binary_block, cv.name, dtype=np.uint8, meta=np.zeros((0,) * arr.ndim, np.uint8))
    assert isinstance(binary, da.Array)
    res = analyze_tables(binary, lv, spacing=rel, layer_width=width, start_at=start_at, black_border=black_border,
                         exclude_outer_layers=0, client=client, progress=progress, **analyze_options)
    lay = res.layers
    n = lay["count"].to_numpy(np.int64)
    void = np.rint(lay["mean"].to_numpy(np.float64) * n).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(n > 0, void / np.maximum(n, 1), np.nan)
    layers = pd.DataFrame({
        "label": lay["label"].to_numpy().astype(np.uint64),
        "layer": lay["layer"].to_numpy(np.int64),
        "n_voxels": n,
        "void_voxels": void,
        "void_fraction": frac,
        "nmc_fraction": 1.0 - frac,
    })
    layers = layers[layers["n_voxels"] > 0].sort_values(["label", "layer"]).reset_index(drop=True)

    t = res.particles
    keep = ["label", "voxel_count"] + [c for c in t.columns if c.startswith(("centroid-", "bbox-"))]
    keep += ["touches_border"] if "touches_border" in t.columns else []
    parts = t[keep].rename(columns={"voxel_count": "n_voxels"}).copy()
    parts["label"] = parts["label"].to_numpy().astype(np.uint64)
    per = layers.groupby("label", sort=True)["void_voxels"].sum()
    parts["void_voxels"] = per.reindex(parts["label"].to_numpy()).fillna(0).to_numpy(np.int64)
    parts["void_fraction"] = parts["void_voxels"] / parts["n_voxels"].where(parts["n_voxels"] > 0)
    parts["radial_layers"] = t["radial_layers"].to_numpy()
    parts["radial_layers_count"] = t["radial_layers_count"].to_numpy()
    parts["radial_void_fraction"] = t["radial_layers_graylevel"].to_numpy()
    cols = ["label", "n_voxels", "void_voxels", "void_fraction"] + [c for c in parts.columns if c not in
                                                                   ("label", "n_voxels", "void_voxels",
                                                                    "void_fraction")]
    parts = parts[cols].reset_index(drop=True)
    params = {
        "spacing": list(geo.spacing), "spacing_unit": geo.unit, "relative_spacing": list(rel), "layer_width": width,
        "layer_width_unit": "voxels of the smallest voxel edge", "start_at": start_at,
        "black_border": bool(black_border), "cracks": cv.name, "labels": lv.name,
        "cracks_outside_particles": "ignored", "analysis": dict(res.parameters),
    }
    layers.attrs["grapes_dask"] = params
    parts.attrs["grapes_dask"] = params
    return VoidFractions(layers=layers, particles=parts, population=void_fraction_population(layers),
                         parameters=params)


def void_fraction_population(layers, labels=None, max_layer: int | None = None) -> pd.DataFrame:
    """Mean void (and NMC) fraction per radial layer over particles, with standard errors.

    Parameters
    ----------
    layers : pandas.DataFrame or VoidFractions
        The long table of :func:`void_fraction_profiles` (``label``, ``layer``, ``n_voxels``,
        ``void_voxels``, ``void_fraction``).
    labels : sequence of int, optional
        Particles to average (e.g. those not touching the border); default all.
    max_layer : int, optional
        Deepest layer reported (default: the deepest of any particle).

    Returns
    -------
    pandas.DataFrame
        One row per layer 1..K: ``n_particles`` (particles having that layer), ``void_fraction_mean``
        (mean over those particles of their fraction, each particle weighing one),
        ``void_fraction_sd`` (ddof 1), ``void_fraction_se`` (sd / sqrt(n), NaN for n < 2),
        ``nmc_fraction_mean`` (1 - void_fraction_mean), ``nmc_fraction_se`` (= void_fraction_se),
        ``n_voxels`` and ``void_voxels`` (summed over the particles) and ``void_fraction_pooled``
        (their ratio: every voxel weighing one). Fractions are dimensionless, 0..1.
    """
    if isinstance(layers, VoidFractions):
        layers = layers.layers
    need = ["label", "layer", "n_voxels", "void_voxels", "void_fraction"]
    if not hasattr(layers, "columns") or any(c not in layers.columns for c in need):
        raise GrapesInputError(f"layers: give the long table of void_fraction_profiles (columns {need})")
    lay = layers
    if labels is not None:
        keys = np.asarray(list(labels)).astype(np.uint64)
        lay = lay[np.isin(lay["label"].to_numpy().astype(np.uint64), keys)]
    if max_layer is not None:
        lay = lay[lay["layer"] <= int(max_layer)]
    k = int(lay["layer"].max()) if len(lay) else 0
    k = max(k, int(max_layer or 0))
    g = lay.groupby("layer")
    idx = pd.Index(np.arange(1, k + 1, dtype=np.int64), name="layer")
    n = g["void_fraction"].count().reindex(idx, fill_value=0).to_numpy(np.int64)
    mean = g["void_fraction"].mean().reindex(idx).to_numpy(float)
    sd = g["void_fraction"].std(ddof=1).reindex(idx).to_numpy(float)
    se = np.where(n >= 2, sd / np.sqrt(np.maximum(n, 1)), np.nan)
    nv = g["n_voxels"].sum().reindex(idx, fill_value=0).to_numpy(np.int64)
    vv = g["void_voxels"].sum().reindex(idx, fill_value=0).to_numpy(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.where(nv > 0, vv / np.maximum(nv, 1), np.nan)
    return pd.DataFrame({
        "layer": idx.to_numpy(), "n_particles": n, "void_fraction_mean": mean, "void_fraction_sd": sd,
        "void_fraction_se": se, "nmc_fraction_mean": 1.0 - mean, "nmc_fraction_se": se, "n_voxels": nv,
        "void_voxels": vv, "void_fraction_pooled": pooled,
    })


def plot_void_fraction(profile, what: str = "nmc", *, particles=None, max_particles: int = 10, n_se: float = 2.0,
                       min_particles: int = 2, ax=None, title: str | None = None):
    """Volume fraction of NMC (or of voids) per radial layer (paper fig. 11f).

    Parameters
    ----------
    profile : VoidFractions or pandas.DataFrame
        The result of :func:`void_fraction_profiles`, or its long ``layers`` table.
    what : {"nmc", "void"}
        ``"nmc"``: 1 - void fraction, as the paper plots it; ``"void"``: the crack fraction.
    particles : sequence of int, optional
        The particles averaged (default: all), e.g. those not touching the border.
    max_particles : int
        When there are at most this many particles, each is also drawn as a line of its own
        (the paper's fig. 11f shows three particles).
    n_se : float
        The population mean is drawn with error bars of +- n_se standard errors (over particles,
        :func:`void_fraction_population`) when at least `min_particles` particles have the layer.
    min_particles : int
        Layers with fewer particles get no population point.
    ax : matplotlib Axes, optional
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        x = radial layer (1 = surface), y = fraction (0..1): one thin line per particle drawn,
        and the population mean with error bars.
    """
    from .plotting import _figure, _no_data

    if what not in ("nmc", "void"):
        raise GrapesInputError("{what}: choose 'nmc' (1 - void fraction, as the paper) or 'void'", what=what)
    lay = profile.layers if isinstance(profile, VoidFractions) else profile
    need = ["label", "layer", "n_voxels", "void_voxels", "void_fraction"]
    if not hasattr(lay, "columns") or any(c not in lay.columns for c in need):
        raise GrapesInputError(f"profile: give the result of void_fraction_profiles or its layers table "
                               f"(columns {need})")
    ids = np.unique(lay["label"].to_numpy().astype(np.uint64))
    if particles is not None:
        chosen = np.asarray(list(particles)).astype(np.uint64)
        missing = np.setdiff1d(chosen, ids)
        if missing.size:
            raise GrapesInputError(f"{{particles}}: labels {missing[:5].tolist()} are not in the profile",
                                   particles=None)
        lay = lay[np.isin(lay["label"].to_numpy().astype(np.uint64), chosen)]
        ids = np.unique(chosen)
    drawn = ids if ids.size <= max_particles else np.zeros(0, np.uint64)
    col = "nmc_fraction" if what == "nmc" else "void_fraction"
    fig, ax = _figure(ax)
    if len(lay) == 0:
        _no_data(ax, "no particle")
    by = {int(k): rows for k, rows in lay.groupby("label")}
    for key in drawn:
        rows = by[int(key)].sort_values("layer")
        y = rows["void_fraction"].to_numpy(float)
        ax.plot(rows["layer"], 1.0 - y if what == "nmc" else y, lw=1.0, marker=".", ms=4, alpha=0.8,
                label=f"particle {int(key)}")
    pop = void_fraction_population(lay)
    ok = pop["n_particles"].to_numpy() >= max(int(min_particles), 1)
    if ok.any() and len(by) >= 2:
        ax.errorbar(pop["layer"].to_numpy(float)[ok], pop[f"{col}_mean"].to_numpy(float)[ok],
                    yerr=n_se * np.nan_to_num(pop[f"{col}_se"].to_numpy(float)[ok]),
                    color="black", marker="o", ms=4, capsize=2, lw=1.6,
                    label=f"mean of {len(by)} particles ±{n_se:g} SE")
    lo, hi = ax.get_ylim()  # fractions lie in 0..1: error bars beyond are cut at the frame
    ax.set_ylim(max(lo, -0.02), min(hi, 1.02))
    ax.set_xlabel("radial layer (1 = particle surface)")
    ax.set_ylabel("volume fraction of NMC (1)" if what == "nmc" else "void (crack) fraction (1)")
    ax.set_title(title or ("volume fraction of NMC per radial layer, from the crack segmentation" if what == "nmc"
                           else "crack (void) fraction per radial layer"), fontsize="medium")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return fig


# --------------------------------------------------------------------------------------------
# report sections
# --------------------------------------------------------------------------------------------


def particle_figure_sections(grey, labels, table=None, *, figs=None, name: str | None = None,
                             particles=None, n_particles: int = 1, exclude_outer_layers: int | None = None,
                             axis: int = 0, layer_width: float = 1.0, spacing=None, unit=None):
    """Fig. 5 and fig. 8b as report sections, for :func:`grapes_dask.report.tables_report` or
    :func:`grapes_dask.report.tracking_report`.

    Parameters
    ----------
    grey, labels : path, array or grapes_dask.io.Volume
        The scan's grey and label volumes (only the central plane and the chosen particles' boxes
        are read). Without labels (None) there is nothing to draw: no section; without grey
        (None) fig. 5 is a note and fig. 8b shows the particle's mask.
    table : pandas.DataFrame or path, optional
        Its particle table (:func:`grapes_dask.analyze`); without it no fig. 8b.
    figs : report._Collector, optional
        The report's figure collector: the figures are added to it (written as PNG by the
        report) and figures that cannot be drawn become notes there. Default: a private one.
    name : str, optional
        The scan's name (e.g. the state), in titles and figure names.
    particles : sequence of int, optional
        Particles of fig. 8b; default the `n_particles` largest (``voxel_count``) not touching
        the border with a non-empty ROI.
    n_particles : int
        Particles of fig. 8b when `particles` is not given.
    exclude_outer_layers : int, optional
        N of fig. 8b; default the table's when > 0, else 5 (the paper).
    axis : {0, 1, 2}
        Slice direction of both figures.
    layer_width, spacing, unit
        As :func:`plot_roi_shell`.

    Returns
    -------
    list of grapes_dask.report.Section
        "Labels over grey (fig. 5)" and, with a table, "ROI of single particles (fig. 8b)".
        Figure names: ``fig5_labels_over_grey[_NAME]``, ``fig8b_roi_shell_LABEL[_NAME]``.
    """
    from .output import read_table
    from .report import Captioned, Section, _Collector, file_name

    figs = _Collector() if figs is None else figs
    if labels is None:  # e.g. a state given as a table only: nothing to draw
        return []
    suffix = f"_{file_name(name)}" if name else ""
    of = f" of {name}" if name else ""
    if grey is None:
        figs.notes.append(f"Figure 5{of} not drawn: no grey volume")
        fig5 = figs.notes[-1]
    else:
        fig5 = figs.item(f"fig5_labels_over_grey{suffix}", f"Figure 5{of}", plot_labels_over_grey, grey, labels,
                         axis, spacing=spacing, unit=unit,
                         caption=f"Fig. 5{of}: the label segmentation over the grey levels, central plane along "
                                 f"{_AXES3[axis]}; one colour per particle, boundaries in white.")
    sections = [Section(f"Labels over grey (fig. 5){of}", (fig5,))]
    if table is None:
        return sections
    if isinstance(table, (str, bytes)) or hasattr(table, "__fspath__"):
        table = read_table(table)
    params = _table_params(table)
    if exclude_outer_layers is None:
        own = params.get("exclude_outer_layers")
        exclude_outer_layers = int(own) if own else 5
    n_outer = _check_n_outer(exclude_outer_layers)
    items = []
    if particles is None:
        cand = table
        if "touches_border" in cand.columns:
            cand = cand[~cand["touches_border"].astype(bool)]
        if "roi_voxels" in cand.columns and params.get("exclude_outer_layers") == n_outer:
            cand = cand[cand["roi_voxels"] > 0]
        size = "voxel_count" if "voxel_count" in cand.columns else ("volume" if "volume" in cand.columns else None)
        if size is not None:
            cand = cand.sort_values([size, "label"], ascending=[False, True])
        particles = [int(x) for x in cand["label"].head(int(n_particles))]
        if not particles:
            items.append(f"no particle away from the border{of}: no ROI figure")
    for lab in particles:
        items.append(figs.item(
            f"fig8b_roi_shell_{int(lab)}{suffix}", f"Figure 8b (particle {int(lab)}){of}", plot_roi_shell,
            (grey, labels, table), int(lab), exclude_outer_layers=n_outer, axis=axis, layer_width=layer_width,
            spacing=spacing, unit=unit,
            caption=f"Fig. 8b{of}: particle {int(lab)}, central slice; its outer {n_outer} layers (orange) are left "
                    "out of the ROI (blue), whose voxels give roi_mean."))
    sections.append(Section(f"ROI of single particles (fig. 8b){of}", tuple(items)))
    assert all(isinstance(i, (str, Captioned)) for i in items)
    return sections


# --------------------------------------------------------------------------------------------
# a phantom's crack segmentation
# --------------------------------------------------------------------------------------------


def phantom_crack_mask(shape, truth, *, state: int = 0, seed: int = 0, chunks=128, threshold: float = 0.5,
                       **grey_options):
    """The crack and void segmentation of a synthetic phantom, lazily (no volume in memory).

    The phantoms of :mod:`grapes_dask.synthetic` draw voids and cracks on a sub-voxel grid and
    average them down, so a voxel holds a void fraction ``phi`` (0..1). This renders the same
    phantom without rim, noise or blur, with particle level 1 and void level 0, so that its
    grey is ``1 - phi`` inside particles, and marks the particle voxels with ``phi >= threshold``.

    Parameters
    ----------
    shape : tuple of int
        Volume shape, voxels.
    truth : pandas.DataFrame
        The phantom's truth table (:func:`grapes_dask.synthetic.phantom_numpy`, ``make_phantom``).
    state : int
        State of charge to render.
    seed : int
        The phantom's seed (the same as for its grey and labels).
    chunks : int or tuple of int
        Chunk shape of the result, voxels.
    threshold : float
        Smallest sub-voxel void fraction of a crack voxel, in (0, 1].
    **grey_options
        The phantom's void and crack options (``supersample``, ``core_extent``,
        ``void_fraction``, ``n_cracks``, ``crack_width``), as given to it; level, rim, noise and
        blur options are ignored.

    Returns
    -------
    dask.array.Array of bool
        Shape `shape`: True on particle voxels at least `threshold` void, False elsewhere
        (background included).
    """
    from .synthetic import phantom_arrays

    if not (isinstance(threshold, (int, float)) and 0.0 < float(threshold) <= 1.0):
        raise GrapesInputError("{threshold}: give a sub-voxel void fraction in (0, 1]", threshold=threshold)
    opts = {k: v for k, v in grey_options.items()
            if k in ("supersample", "core_extent", "void_fraction", "n_cracks", "crack_width")}
    g, lab = phantom_arrays(shape, truth, state=state, chunks=chunks, seed=seed, grey_dtype="float32",
                            particle_level=1.0, pore_level=0.0, void_level=0.0, rim_contrast=0.0, noise_sigma=0.0,
                            blur_sigma=0.0, **opts)
    return (lab != 0) & ((1.0 - g) >= float(threshold) - 1e-6)
