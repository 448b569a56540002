"""Lengths and voxel sizes: what every length parameter of the package means.

A volume's voxel size (``spacing``, one value per axis z, y, x) comes with a unit when its file
records one (micrometres for TIFF and OME metadata, the ``unit`` attribute of HDF5 and Zarr).
Measurements that are physical by nature (``volume``, ``surface_area``, axis lengths,
``equivalent_diameter_volume``) are computed in that unit. Everything that *counts* voxels stays
in voxels whatever the voxel size, as the paper does ("the outer five pixels"):

- a radial layer is one voxel thick by default, one voxel of the finest axis
  (``min(spacing)``), so that a particle of radius 14 voxels has about 14 layers whether its
  file says 1 or 0.325 um;
- every other length parameter (neighbour gap, margins, smoothing, marker distances, closing
  and opening radii) is a number of voxels of the finest axis.

A length may be given in a physical unit instead, as a string with the unit: ``"0.5um"``,
``"0.5 µm"``, ``"500nm"``; a plain number or a string ending in ``vox``/``voxel(s)``/``px`` is in
voxels. :func:`to_voxels` converts one, and needs the voxel size's unit to do it.

Distances inside the engine are measured in units of the finest voxel edge
(:func:`relative_spacing`): isotropic spacing becomes exactly ``(1, 1, 1)``, so a volume at
0.325 um gives the same distances, layers and profiles to the bit as the same arrays at spacing 1.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass

import numpy as np

from ._errors import GrapesInputError

__all__ = ["Length", "relative_spacing", "to_voxels", "format_spacing", "unit_symbol", "column_units",
           "tidy_number", "parse_spacing", "unit_factor"]

#: Micrometres per length unit, by the names and symbols files use (lower case).
_UNIT_TO_UM = {
    "um": 1.0, "µm": 1.0, "μm": 1.0, "\\u00b5m": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0,
    "micrometre": 1.0, "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3, "mm": 1e3, "millimeter": 1e3,
    "millimetre": 1e3, "cm": 1e4, "centimeter": 1e4, "centimetre": 1e4, "m": 1e6, "meter": 1e6, "metre": 1e6,
    "in": 25400.0, "inch": 25400.0, "å": 1e-4, "angstrom": 1e-4,
}


_VOXEL_WORDS = ("vox", "voxel", "voxels", "px", "pixel", "pixels")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def unit_factor(unit) -> float | None:
    """Micrometres per `unit` (``"nm"`` -> 1e-3), or None for an unknown or missing unit."""
    return None if unit is None else _UNIT_TO_UM.get(str(unit).strip().lower())


def tidy_number(x: float, digits: int = 12) -> float:
    """`x` rounded to `digits` significant digits, so that 0.32499999999999996 reads 0.325.

    Parameters
    ----------
    x : float
    digits : int
        Significant decimal digits kept.

    Returns
    -------
    float
    """
    x = float(x)
    if not math.isfinite(x) or x == 0:
        return x
    return float(f"{x:.{int(digits)}g}")


def relative_spacing(spacing) -> tuple[float, ...]:
    """The voxel size in units of its finest edge: ``spacing / min(spacing)``.

    Parameters
    ----------
    spacing : sequence of float, length ndim
        Voxel size per axis (z, y, x), any unit.

    Returns
    -------
    tuple of float
        The finest axes are exactly 1.0; an isotropic voxel size gives ``(1.0,) * ndim``.
    """
    sp = tuple(float(s) for s in spacing)
    m = min(sp)
    return tuple(1.0 if s == m else s / m for s in sp)


def unit_symbol(unit) -> str | None:
    """A short symbol for a length unit (``"micrometer"`` -> ``"µm"``); None when missing or a
    voxel (``"voxel"``, ``"pixel"``: no physical length)."""
    if unit is None or str(unit).strip().lower() in _VOXEL_WORDS:
        return None  # "voxel" (phantoms, unitless volumes): no physical length
    f = unit_factor(unit)
    symbols = {1.0: "µm", 1e-3: "nm", 1e3: "mm", 1e4: "cm", 1e6: "m", 1e-4: "Å", 25400.0: "in"}
    if f is None:
        u = str(unit).strip()
        return u or None
    return symbols.get(f, str(unit))


def format_spacing(spacing, unit=None) -> str:
    """The voxel size as a reader expects it: ``"0.325 µm"`` or ``"(0.65, 0.325, 0.325) µm"``.

    Parameters
    ----------
    spacing : sequence of float
        Per axis (z, y, x).
    unit : str, optional
        The unit of `spacing`; omitted from the text when unknown.

    Returns
    -------
    str
        One value when all axes agree, else the tuple; each value with at most 12 significant
        digits (the float noise of unit conversions is not shown).
    """
    vals = [tidy_number(s) for s in spacing]
    text = f"{vals[0]:g}" if len(set(vals)) == 1 else "(" + ", ".join(f"{v:g}" for v in vals) + ")"
    sym = unit_symbol(unit)
    return f"{text} {sym}" if sym else text


@dataclass(frozen=True)
class Length:
    """A length parameter, resolved against a volume's voxel size.

    Attributes
    ----------
    voxels : float
        The length in voxels of the finest axis (``min(spacing)``).
    value : float
        The number as given.
    unit : str
        ``"voxel"`` when given as a plain number, else the unit given (e.g. ``"um"``).
    physical : float or None
        The length in the voxel size's unit, when that unit is known (or the spacing is given
        without a unit: then in spacing units).
    physical_unit : str or None
        The voxel size's unit, None when the files record none.
    """

    voxels: float
    value: float
    unit: str
    physical: float | None
    physical_unit: str | None

    def describe(self) -> str:
        """``"3 voxels"``, ``"3 voxels (0.975 µm)"`` or ``"0.5 µm (1.538 voxels)"``."""
        v = f"{tidy_number(self.voxels, 6):g} voxel" + ("" if self.voxels == 1 else "s")
        sym = unit_symbol(self.physical_unit)
        if self.unit == "voxel":
            return v if self.physical is None or sym is None else f"{v} ({tidy_number(self.physical, 6):g} {sym})"
        return f"{tidy_number(self.value, 6):g} {unit_symbol(self.unit)} ({v})"

    def as_dict(self, prefix: str) -> dict:
        """JSON-friendly fields for a table's metadata: ``<prefix>`` (voxels),
        ``<prefix>_physical`` and ``<prefix>_unit``."""
        return {prefix: self.voxels, prefix + "_physical": self.physical,
                prefix + "_unit": unit_symbol(self.physical_unit)}


def to_voxels(value, *, name: str, spacing, unit=None, default: float | None = None, allow_zero: bool = False
              ) -> Length:
    """Resolve a length parameter to voxels of the finest axis.

    Parameters
    ----------
    value : float, int, str or None
        A number of voxels (``3``, ``"3"``, ``"3vox"``, ``"3 voxels"``, ``"3px"``), or a length with
        a unit (``"0.5um"``, ``"0.5 µm"``, ``"500nm"``, ``"0.0005 mm"``). None takes `default`.
    name : str
        The parameter's name, for error messages (e.g. ``"layer_width"`` or ``"--layer-width"``).
    spacing : sequence of float
        The volume's voxel size per axis (z, y, x).
    unit : str, optional
        The unit of `spacing` (from the files' metadata); needed for a length with a unit.
    default : float, optional
        Voxels taken when `value` is None.
    allow_zero : bool
        Accept 0 (e.g. "no smoothing"); otherwise the length must be positive.

    Returns
    -------
    Length
        ``voxels`` and the length as given, with its physical equivalent when known.

    Raises
    ------
    GrapesInputError
        Not a number, an unknown unit, a negative (or zero) length, or a physical length for a
        volume whose voxel size has no known unit.
    """
    fine = float(min(float(s) for s in spacing))
    factor_sp = unit_factor(unit)
    how = ("give a number of voxels (e.g. 2) or a length with its unit (e.g. '0.5um', '500nm')")
    if value is None:
        if default is None:
            raise GrapesInputError(f"{{{name}}} is required: {how}", **{name: None})
        voxels, given, given_unit = float(default), float(default), "voxel"
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        voxels, given, given_unit = float(value), float(value), "voxel"
    elif isinstance(value, str):
        m = re.fullmatch(rf"\s*({_NUMBER})\s*([^\d\s].*?)?\s*", value)
        if m is None:
            raise GrapesInputError(f"{{{name}}} is not a length: {how}", **{name: value})
        given = float(m.group(1))
        word = (m.group(2) or "").strip()
        if word == "" or word.lower() in _VOXEL_WORDS:
            voxels, given_unit = given, "voxel"
        else:
            f = _UNIT_TO_UM.get(word.lower())
            if f is None:
                raise GrapesInputError(
                    f"{{{name}}}: unknown unit {word!r}; use voxels, nm, um (or µm), mm, or a plain number "
                    "of voxels", **{name: value})
            if factor_sp is None:
                raise GrapesInputError(
                    f"{{{name}}} is a physical length, but the volume's voxel size has no known unit "
                    f"(spacing {format_spacing(spacing)}): give it in voxels, or the voxel size with its unit "
                    "({spacing})", **{name: value, "spacing": f"{tidy_number(fine):g}um"})
            voxels, given_unit = given * f / (factor_sp * fine), word
    else:
        raise GrapesInputError(f"{{{name}}} is not a length: {how}", **{name: value})
    if not np.isfinite(voxels) or voxels < 0 or (voxels == 0 and not allow_zero):
        raise GrapesInputError(f"{{{name}}}: give a {'non-negative' if allow_zero else 'positive'} length; {how}",
                               **{name: value})
    physical = voxels * fine
    if given_unit != "voxel" and factor_sp is not None:
        physical = given * _UNIT_TO_UM[given_unit.lower()] / factor_sp
    return Length(voxels=float(voxels), value=float(given), unit=given_unit, physical=float(physical),
                  physical_unit=None if unit is None else str(unit))


def parse_spacing(spacing):
    """Split a voxel size given with units (``"0.325um"``, ``("0.65 um", "0.325 um", "0.325 um")``).

    Parameters
    ----------
    spacing : float, str or sequence of float or str
        Numbers, or strings of a number and a length unit. Numbers without a unit are returned
        as given.

    Returns
    -------
    spacing : float or tuple
        The numbers (in the first unit given, when the axes were given in different units).
    unit : str or None
        The unit given, None when no value carried one.

    Raises
    ------
    GrapesInputError
        A string that is not a number with a known length unit.
    """
    if spacing is None:
        return None, None
    items = [spacing] if isinstance(spacing, (str, numbers.Real)) else list(np.ravel(np.asarray(spacing, object)))
    if not any(isinstance(v, str) for v in items):
        return spacing, None
    vals, units = [], []
    for v in items:
        if not isinstance(v, str):
            vals.append(v)
            units.append(None)
            continue
        m = re.fullmatch(rf"\s*({_NUMBER})\s*([^\d\s].*?)?\s*", v)
        word = (m.group(2) or "").strip() if m else ""
        if m is None or (word and _UNIT_TO_UM.get(word.lower()) is None):
            raise GrapesInputError(
                f"spacing {v!r} is not a voxel size: give a number, or a number with a length unit "
                "(e.g. 0.325um, 325nm)")
        vals.append(float(m.group(1)))
        units.append(word or None)
    known = [u for u in units if u]
    if not known:  # numbers written as text
        return (vals[0] if isinstance(spacing, (str, numbers.Real)) else tuple(vals)), None
    unit = known[0]
    f0 = _UNIT_TO_UM[unit.lower()]
    vals = [v * _UNIT_TO_UM[u.lower()] / f0 if u else v for v, u in zip(vals, units)]
    out = vals[0] if isinstance(spacing, (str, numbers.Real)) else tuple(vals)
    return out, unit


def column_units(ndim: int, unit=None) -> dict:
    """The unit of each physical or counted column of the particle table.

    Parameters
    ----------
    ndim : int
        2 or 3.
    unit : str, optional
        The voxel size's unit; without one, physical columns are "spacing units".

    Returns
    -------
    dict of str to str
        Column -> unit, e.g. ``{"volume": "µm^3", "centroid-0": "voxel", ...}``.
    """
    u = unit_symbol(unit) or "spacing unit"
    out = {"voxel_count": "voxels", "radial_layers": "layer (1 = surface; layer_width voxels thick)",
           "radial_layers_count": "voxels", "roi_voxels": "voxels",
           "intensity_mean": "grey level", "intensity_std": "grey level", "intensity_min": "grey level",
           "intensity_max": "grey level", "roi_mean": "grey level", "roi_std": "grey level",
           "radial_layers_graylevel": "grey level", "radial_layers_std": "grey level",
           "radial_layers_graylevelnormed": "dimensionless"}
    for a in range(ndim):
        out[f"centroid-{a}"] = "voxel index"
        out[f"bbox-{a}"] = out[f"bbox-{a + ndim}"] = "voxel index"
    if ndim == 3:
        out.update(volume=f"{u}^3", surface_area=f"{u}^2", equivalent_diameter_volume=u, sphericity="dimensionless")
    else:
        out.update(area=f"{u}^2", perimeter=u, equivalent_diameter_area=u, circularity="dimensionless")
    out.update({"axis_major_length": u, "axis_minor_length": u})
    for i in range(ndim):
        out[f"inertia_tensor_eigvals-{i}"] = f"{u}^2"
    return out


_POSITION_NAMES = {3: ("z", "y", "x"), 2: ("y", "x")}


def describe_column(column: str, ndim: int | None = None, spacing=None, unit=None) -> tuple[str, float]:
    """A reader's name for a table column, with its unit, and the factor to that unit.

    Parameters
    ----------
    column : str
        E.g. ``"centroid-2"``, ``"volume"``.
    ndim : int, optional
        2 or 3 (the axis names of centroids); default the length of `spacing`, else 3.
    spacing : sequence of float, optional
        Voxel size per axis (z, y, x); with a known `unit`, centroids are shown as positions
        in that unit.
    unit : str, optional
        The voxel size's unit.

    Returns
    -------
    label : str
        ``"x position (µm)"``, ``"x position (voxels)"``, ``"volume (µm^3)"``, or the column name.
    factor : float
        Multiply the column's values by it to show them in the label's unit (the voxel size for
        a centroid shown in µm, else 1).
    """
    sym = unit_symbol(unit)
    if ndim is None:
        ndim = len(spacing) if spacing is not None else 3
    if column.startswith("centroid-") and column[9:].isdigit():
        a = int(column[9:])
        name = _POSITION_NAMES.get(ndim, ())[a] if a < ndim else column
        if sym and spacing is not None and a < len(spacing):
            return f"{name} position ({sym})", float(spacing[a])
        return f"{name} position (voxels)", 1.0
    u = column_units(ndim, unit).get(column)
    if u is None or u in ("dimensionless",):
        return column.replace("_", " "), 1.0
    return f"{column.replace('_', ' ')} ({u})", 1.0
