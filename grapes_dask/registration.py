"""Registration between states of charge: estimate a translation or rigid motion, apply it out of core.

Operando scans of one electrode move between states of charge (the cell is taken out and put
back, the sample holder creeps). Before particles can be followed from state to state, each
later state is registered onto a reference state (usually the pristine one) and resampled onto
its voxel grid. This module does both without ever holding a whole volume in memory:

:func:`register`
    Estimates the motion in two stages. **Coarse**: both volumes are block-mean downsampled
    (streamed chunk by chunk through dask; by default the factor that makes the view at most
    about 128 voxels per side) and registered as a whole. **Fine**: a crop of the fixed volume at
    full resolution (central, 128 voxels per side by default, or the region given) and the region
    of the moving volume the coarse estimate maps it to are read, and the estimate is refined on
    them, so the result is sub-voxel. ``method="translation"`` uses scikit-image's
    :func:`~skimage.registration.phase_cross_correlation` with upsampling at both stages;
    ``method="rigid"`` uses SimpleITK (the paper's choice): an ``Euler3DTransform`` (rotation about
    the centre and translation) with a Mattes mutual-information or correlation metric,
    initialised with the phase-correlation translation.
:func:`apply_transform`
    Resamples a volume through a :class:`Transform` block by block: each output block reads only
    the region of the input its voxels map into (plus the interpolation support) and
    interpolates it with :func:`scipy.ndimage.map_coordinates`. The result is a lazy dask array
    or a Zarr store whose attributes carry the transform.
:class:`Transform`
    The estimate: a matrix and offset in voxel coordinates, the shapes it was estimated for, the
    voxel size, quality figures; JSON in and out.

Conventions
-----------
Coordinates are voxel index coordinates ``(z, y, x)``: voxel ``i`` is centred at ``i``. A
:class:`Transform` maps a point ``x`` of the FIXED volume (the reference state) to the point
``y = matrix @ x + offset`` of the MOVING volume (the state to align) that shows the same
material, so ``moving(T(x)) ~ fixed(x)``. This is the convention of
:func:`scipy.ndimage.affine_transform` (``output[x] = input[matrix @ x + offset]``) and of ITK's
registration (fixed physical space to moving physical space): resampling the moving volume
through `T` puts it on the fixed volume's grid. For a pure translation ``offset`` is the shift
``d`` such that ``moving(x + d) = fixed(x)``: a sample that drifted by ``+d`` between the states
has ``offset = +d``. Physical coordinates are ``spacing * x`` (the centre of voxel 0 at the
origin); a rigid motion is a rotation in physical space, so its voxel matrix is
``diag(1/spacing) @ R @ diag(spacing)``.

Why not dask-image's ``affine_transform``
-----------------------------------------
:func:`dask_image.ndinterp.affine_transform` (2026.5.0) gives results equal to scipy's for
orders 0 and 1 on uneven chunkings, but (1) the name of its output does not depend on
``order``, ``cval`` or ``mode``: two calls that differ only in these share dask keys, and
computed together (or cached by a distributed cluster) one silently takes the other's values;
(2) for ``order > 1`` its output is float64, neither rounded nor clipped to the input's integer
dtype; (3) each output block is gathered from dask chunks (getitem and concatenate) rather
than read as one region. :func:`apply_transform` therefore builds its own graph (one task per
output block, reading its input region directly from the file where the input is a file), and
computes every voxel's coordinates from its global index, so that orders 0 and 1 are bitwise
identical whatever the chunking.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import Alt, GrapesInputError

__all__ = ["Transform", "register", "apply_transform"]

_METHODS = ("translation", "rigid")
_METRICS = ("mattes", "correlation")
_FORMAT = "grapes_dask.transform/1"
_DEFAULT_CROP = 128
# side of the coarse view: at 512^3, a 256^3 view (factor 2) cost 1.05-1.16 GiB peak (the Fourier
# transforms of phase correlation) and 2-3x the time of a 128^3 one (factor 4, 0.28-0.45 GiB) for
# the same final estimate, which the full-resolution fine stage sets
_DEFAULT_VIEW = 128
# voxels SimpleITK's metric samples per iteration (random, fixed seed): the coarse stage, and
# twice as many at the fine one; a rigid motion has 6 parameters, so this is plenty
_SAMPLES = 50_000
# magnitude of the largest pole of the B-spline prefilter of each order: the prefilter's
# influence decays as pole**distance, which sets the margin read around a block for order > 1
_SPLINE_POLE = {2: 3.0 - math.sqrt(8.0), 3: 2.0 - math.sqrt(3.0), 4: 0.361341225900220177, 5: 0.430575347099973791}


# --------------------------------------------------------------------------------------------
# the transform
# --------------------------------------------------------------------------------------------


def _floats(v) -> tuple:
    return tuple(float(x) for x in v)


@dataclass(frozen=True)
class Transform:
    """An estimated motion from the fixed volume's voxel grid to the moving volume's.

    ``T(x) = matrix @ x + offset`` maps voxel index coordinates ``x = (z, y, x)`` of the fixed
    volume to those of the moving volume (see the module's conventions): resampling the moving
    volume through it (:func:`apply_transform`) puts it on the fixed grid.

    Attributes
    ----------
    method : {"translation", "rigid"}
        How it was estimated.
    matrix : tuple of tuple of float
        ``ndim x ndim`` (3 x 3 for volumes), voxel coordinates; the identity for a translation.
    offset : tuple of float
        ``ndim`` values, voxels ``(z, y, x)``; for a translation the shift (see :attr:`shift`).
    fixed_shape, moving_shape : tuple of int
        Shapes of the volumes it was estimated for, voxels. :func:`apply_transform` takes a
        volume of `moving_shape` and returns one of `fixed_shape`.
    spacing : tuple of float
        Voxel size ``(z, y, x)`` of the fixed volume, in `unit` (1 per axis when unknown).
    unit : str or None
        Unit of `spacing`.
    ncc : float or None
        Normalised cross-correlation (Pearson, -1..1) of the fixed crop and the moving volume
        resampled through the transform onto it, over the voxels that map inside the moving
        volume: how well the volumes agree after alignment (noise keeps it below 1).
    ncc_identity : float or None
        The same figure without the transform (moving read at the fixed coordinates): the
        agreement before alignment, for comparison.
    error : float or None
        Translation: scikit-image's translation-invariant normalised RMS error of the fine
        stage's cross-correlation (0 a perfect match, 1 none). Rigid: SimpleITK's final metric value
        (negative mutual information or negative correlation, lower is better).
    parameters : dict
        JSON-able record of how it was estimated: inputs, downsample factor, crop, coarse
        estimate, metric, package version and date.

    Notes
    -----
    Build one with :func:`register`, :meth:`from_dict` or :meth:`load`; ``Transform.translation``
    makes a known shift (tests, manual corrections).
    """

    method: str
    matrix: tuple
    offset: tuple
    fixed_shape: tuple
    moving_shape: tuple
    spacing: tuple
    unit: str | None = None
    ncc: float | None = None
    ncc_identity: float | None = None
    error: float | None = None
    parameters: dict = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self):
        def bad(what):
            raise GrapesInputError(f"transform: {what}; make one with register() or Transform.load()")

        if self.method not in _METHODS:
            bad(f"unknown method {self.method!r} (expected one of {list(_METHODS)})")
        try:
            m = np.asarray(self.matrix, dtype=float)
            o = np.asarray(self.offset, dtype=float)
            fs = tuple(int(v) for v in self.fixed_shape)
            ms = tuple(int(v) for v in self.moving_shape)
            sp = _floats(self.spacing)
        except (TypeError, ValueError):
            bad("matrix, offset, shapes and spacing must be numbers")
        n = len(fs)
        if n not in (2, 3) or len(ms) != n or m.shape != (n, n) or o.shape != (n,) or len(sp) != n:
            bad(f"inconsistent sizes: matrix {m.shape}, offset {o.shape}, fixed_shape {fs}, moving_shape {ms}, "
                f"spacing {sp}")
        if not (np.all(np.isfinite(m)) and np.all(np.isfinite(o))) or abs(np.linalg.det(m)) < 1e-12:
            bad("the matrix must be finite and invertible and the offset finite")
        if min(fs + ms) < 1 or not all(s > 0 and math.isfinite(s) for s in sp):
            bad("shapes must be positive and the spacing positive and finite")
        object.__setattr__(self, "matrix", tuple(_floats(r) for r in m))
        object.__setattr__(self, "offset", _floats(o))
        object.__setattr__(self, "fixed_shape", fs)
        object.__setattr__(self, "moving_shape", ms)
        object.__setattr__(self, "spacing", sp)
        for k in ("ncc", "ncc_identity", "error"):
            v = getattr(self, k)
            object.__setattr__(self, k, None if v is None else float(v))
        object.__setattr__(self, "parameters", json.loads(json.dumps(dict(self.parameters or {}), default=str)))

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def translation(cls, shift, shape, *, moving_shape=None, spacing=None, unit=None) -> Transform:
        """A translation by `shift` voxels ``(z, y, x)``: ``T(x) = x + shift``.

        Parameters
        ----------
        shift : sequence of float
            ``moving(x + shift) = fixed(x)``, voxels.
        shape : tuple of int
            Fixed volume shape; `moving_shape` defaults to it.
        spacing : float or sequence of float, optional
            Voxel size (default 1 per axis).
        """
        shape = tuple(int(s) for s in shape)
        n = len(shape)
        sp = (1.0,) * n if spacing is None else _spacing_tuple(spacing, n)
        return cls("translation", tuple(map(tuple, np.eye(n))), _floats(shift), shape,
                   tuple(moving_shape or shape), sp, unit)

    # ---- derived quantities ----------------------------------------------------------------

    @property
    def ndim(self) -> int:
        """2 or 3."""
        return len(self.fixed_shape)

    @property
    def centre(self) -> np.ndarray:
        """Centre of the fixed volume, voxels ``(z, y, x)``: ``(shape - 1) / 2``."""
        return (np.asarray(self.fixed_shape, float) - 1.0) / 2.0

    def __call__(self, points) -> np.ndarray:
        """Map fixed voxel coordinates to moving ones.

        Parameters
        ----------
        points : array_like, shape (..., ndim)
            Points ``(z, y, x)`` of the fixed volume, voxels.

        Returns
        -------
        numpy.ndarray
            Same shape: the corresponding points of the moving volume, voxels.
        """
        p = np.asarray(points, dtype=float)
        return p @ np.asarray(self.matrix).T + np.asarray(self.offset)

    def displacement(self, points) -> np.ndarray:
        """``T(p) - p`` at fixed points `p` (shape ``(..., ndim)``), voxels."""
        p = np.asarray(points, dtype=float)
        return self(p) - p

    @property
    def shift(self) -> tuple:
        """Displacement at the centre of the fixed volume, voxels ``(z, y, x)``.

        For a translation, the translation itself (``offset``): ``moving(x + shift) =
        fixed(x)``. For a rigid motion, the translation of the volume's centre (the rotation
        adds a displacement that grows with the distance from it).
        """
        return _floats(self.displacement(self.centre))

    @property
    def shift_physical(self) -> tuple:
        """:attr:`shift` times the voxel size, in :attr:`unit`."""
        return _floats(np.asarray(self.shift) * np.asarray(self.spacing))

    def rotation_matrix(self) -> np.ndarray:
        """The linear part in physical coordinates, ``diag(spacing) @ matrix @ diag(1/spacing)``
        (a rotation matrix for a rigid motion)."""
        s = np.asarray(self.spacing)
        return (np.asarray(self.matrix) * s[:, None]) / s[None, :]

    @property
    def rotation_deg(self) -> float:
        """Angle of the rotation in physical space, degrees (0 for a translation)."""
        r = self.rotation_matrix()
        if self.ndim == 2:
            return float(abs(np.degrees(np.arctan2(r[1, 0], r[0, 0]))))
        c = (np.trace(r) - 1.0) / 2.0
        return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))

    def homogeneous(self) -> np.ndarray:
        """``(ndim + 1) x (ndim + 1)`` homogeneous matrix of the map, voxel coordinates."""
        n = self.ndim
        h = np.eye(n + 1)
        h[:n, :n] = self.matrix
        h[:n, n] = self.offset
        return h

    def inverse(self) -> Transform:
        """The map from the moving grid to the fixed one (shapes swapped): resampling the fixed
        volume through it puts it on the moving grid."""
        mi = np.linalg.inv(np.asarray(self.matrix))
        sp = np.asarray(self.spacing) * 1.0
        return Transform(self.method, tuple(map(tuple, mi)), _floats(-mi @ np.asarray(self.offset)),
                         self.moving_shape, self.fixed_shape, tuple(sp), self.unit, self.ncc, self.ncc_identity,
                         self.error, dict(self.parameters, inverted=True))

    # ---- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-able dict (lists for tuples), with a ``format`` key; :meth:`from_dict` reads it."""
        return {
            "format": _FORMAT,
            "method": self.method,
            "matrix": [list(r) for r in self.matrix],
            "offset": list(self.offset),
            "fixed_shape": list(self.fixed_shape),
            "moving_shape": list(self.moving_shape),
            "spacing": list(self.spacing),
            "unit": self.unit,
            "ncc": self.ncc,
            "ncc_identity": self.ncc_identity,
            "error": self.error,
            "shift": list(self.shift),
            "rotation_deg": self.rotation_deg,
            "parameters": self.parameters,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Transform:
        """A :class:`Transform` from :meth:`to_dict`'s dict (derived keys such as ``shift`` are
        recomputed, not read)."""
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise GrapesInputError(
                f"transform: not a grapes_dask transform (expected a dict with format {_FORMAT!r}, got "
                f"{type(d).__name__}{' with format ' + repr(d.get('format')) if isinstance(d, dict) else ''}); "
                "write one with Transform.save()"
            )
        missing = [k for k in ("method", "matrix", "offset", "fixed_shape", "moving_shape", "spacing") if k not in d]
        if missing:
            raise GrapesInputError(f"transform: missing {missing}; write it with Transform.save()")
        return cls(d["method"], d["matrix"], d["offset"], d["fixed_shape"], d["moving_shape"], d["spacing"],
                   d.get("unit"), d.get("ncc"), d.get("ncc_identity"), d.get("error"), d.get("parameters") or {})

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON to `path` (replaced if it exists); returns the path."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Transform:
        """Read a transform from a JSON file of :meth:`save`, or from the attributes of a Zarr
        store written by :func:`apply_transform` (its ``transform`` attribute)."""
        p = Path(path)
        if not p.exists():
            raise GrapesInputError(
                f"transform file {str(p)!r} does not exist: give the JSON written by Transform.save()"
            )
        if p.is_dir():
            import zarr

            try:
                attrs = dict(zarr.open(str(p), mode="r").attrs)
            except Exception as exc:  # noqa: BLE001 - any unreadable store is the user's input
                raise GrapesInputError(f"{str(p)!r} is a folder but not a readable Zarr store ({exc})") from exc
            if "transform" not in attrs:
                raise GrapesInputError(f"{str(p)!r} carries no 'transform' attribute: it was not written by "
                                       "apply_transform; give the transform's JSON file")
            return cls.from_dict(attrs["transform"])
        try:
            d = json.loads(p.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GrapesInputError(f"transform file {str(p)!r} is not JSON ({exc}): give the file written by "
                                   "Transform.save()") from exc
        return cls.from_dict(d)


def _as_transform(t) -> Transform:
    if isinstance(t, Transform):
        return t
    if isinstance(t, dict):
        return Transform.from_dict(t)
    if isinstance(t, (str, os.PathLike)):
        return Transform.load(t)
    raise GrapesInputError(
        f"transform: expected a Transform, its dict or a JSON path, got {type(t).__name__}; "
        "estimate one with register()"
    )


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def _spacing_tuple(spacing, n) -> tuple:
    from .io import check_spacing

    return check_spacing(spacing, n)


def _per_axis_ints(value, n, name, *, minimum=1) -> tuple:
    ok = True
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        vals = (int(value),) * n
    else:
        try:
            vals = tuple(value)
        except TypeError:
            vals, ok = (), False
        ok = ok and len(vals) == n and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in vals)
        vals = tuple(int(v) for v in vals) if ok else ()
    if not ok or min(vals) < minimum:
        raise GrapesInputError(f"{{{name}}} must be one integer >= {minimum} or one per axis ({n})", **{name: value})
    return vals


def _downsample_factors(shape, downsample, max_view: int) -> tuple:
    """Block-mean factor per axis: as given, or the smallest whole factor that brings the view to
    about `max_view` voxels per side (never below 8 voxels along an axis)."""
    n = len(shape)
    if downsample is not None:
        f = tuple(min(k, s) for k, s in zip(_per_axis_ints(downsample, n, "downsample"), shape))
        small = [i for i, (k, s) in enumerate(zip(f, shape)) if s // k < 8 and k > 1]
        if small:
            raise GrapesInputError(
                f"{{downsample}} {f} leaves fewer than 8 voxels along axis {small[0]} of a volume of shape "
                f"{tuple(shape)}: use a smaller factor", downsample=downsample,
            )
        return f
    target = float(max_view) ** n
    k = 1
    while True:
        f = tuple(max(1, min(k, s // 8)) for s in shape)
        if np.prod([s // c for s, c in zip(shape, f)], dtype=float) <= target or all(
                c < k for c in f):
            return f
        k += 1


def _crop_region(crop, shape, valid_lo, valid_hi) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of the fine-stage region of the fixed volume, inside [valid_lo, valid_hi)."""
    n = len(shape)
    shape_a = np.asarray(shape)
    vlo, vhi = np.maximum(valid_lo, 0), np.minimum(valid_hi, shape_a)
    explicit = crop is not None and not isinstance(crop, numbers.Integral) and len(crop) == n and all(
        isinstance(c, slice) or (isinstance(c, (tuple, list)) and len(c) == 2) for c in crop)
    if explicit:
        lo, hi = [], []
        for c, s in zip(crop, shape):
            a, b = (c.start, c.stop) if isinstance(c, slice) else c
            a = 0 if a is None else int(a)
            b = s if b is None else int(b)
            lo.append(a + s if a < 0 else a)
            hi.append(b + s if b < 0 else b)
        lo, hi = np.asarray(lo), np.asarray(hi)
        if np.any(lo < 0) or np.any(hi > shape_a) or np.any(hi - lo < 8):
            raise GrapesInputError(
                f"{{crop}} must lie inside the fixed volume {tuple(shape)} and span at least 8 voxels per axis",
                crop=crop,
            )
        lo, hi = np.maximum(lo, vlo), np.minimum(hi, vhi)
    else:
        size = np.asarray(_per_axis_ints(_DEFAULT_CROP if crop is None else crop, n, "crop", minimum=8))
        size = np.minimum(size, vhi - vlo)
        mid = (vlo + vhi) // 2
        lo = np.clip(mid - size // 2, vlo, np.maximum(vlo, vhi - size))
        hi = lo + size
    if np.any(hi - lo < 8):
        raise GrapesInputError(
            f"the fine-stage region {list(zip(lo.tolist(), hi.tolist()))} of the fixed volume hardly overlaps the "
            "moving volume after the coarse estimate: the volumes overlap too little, or give a {crop} where both "
            "show the sample", crop=crop,
        )
    return lo, hi


def _check_texture(a: np.ndarray, what: str, fix: str, **options) -> None:
    finite = np.isfinite(a)
    if not finite.all():
        raise GrapesInputError(f"{what} holds NaN or infinite values: replace them (e.g. by the pore level) first")
    if a.size == 0 or float(a.max()) == float(a.min()):
        v = float(a.flat[0]) if a.size else float("nan")
        raise GrapesInputError(f"{what} is constant (every value {v:g}): there is no texture to register; {fix}",
                               **options)


# --------------------------------------------------------------------------------------------
# estimation helpers
# --------------------------------------------------------------------------------------------


def _block_mean(arr, f: tuple):
    """Lazy block mean of `arr` by factors `f` (per axis), float32; trailing remainders dropped."""
    import dask.array as da

    arr = arr[tuple(slice(0, s - s % k) for s, k in zip(arr.shape, f))]
    if all(k == 1 for k in f):
        return arr.astype(np.float32)
    chunks = tuple(max(k, (c // k) * k) for c, k in zip(arr.chunksize, f))
    arr = arr.rechunk(chunks)
    return da.coarsen(np.mean, arr, dict(enumerate(f)), trim_excess=True).astype(np.float32)


def _taper(a: np.ndarray) -> np.ndarray:
    """Mean removed, times a separable Tukey window (alpha 0.5): damps the edges, whose
    wrap-around in the Fourier transform would otherwise pull the correlation peak to zero."""
    from scipy.signal.windows import tukey

    out = a.astype(np.float32) - np.float32(a.mean(dtype=np.float64))
    for ax, n in enumerate(a.shape):
        w = tukey(n, 0.5).astype(np.float32)
        out *= w.reshape([-1 if i == ax else 1 for i in range(a.ndim)])
    return out


def _phase_offset(fixed: np.ndarray, moving: np.ndarray, upsample: int) -> tuple[np.ndarray, float]:
    """Offset ``d`` (voxels) with ``moving(x + d) ~ fixed(x)`` for two arrays of one shape."""
    from skimage.registration import phase_cross_correlation

    # plain cross-correlation of the tapered volumes: on micro-CT textures it locates sub-voxel
    # shifts about twice as well as the phase-normalised one (whose whitening weights the
    # aliased high frequencies as much as the structure)
    shift, error, _ = phase_cross_correlation(_taper(fixed), _taper(moving), upsample_factor=int(upsample),
                                              normalization=None)
    # scikit-image returns the shift that registers `moving` onto `fixed`: fixed(x) = moving(x - shift)
    return -np.asarray(shift, dtype=float), float(error)


def _read(vol, lo, hi) -> np.ndarray:
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return np.asarray(vol.array[sl].compute(scheduler="threads"))


def _resample_region(region: np.ndarray, region_lo, matrix, offset, out_lo, out_shape) -> np.ndarray:
    """`region` (starting at voxel `region_lo` of its volume) resampled through (matrix, offset)
    onto the box of `out_shape` voxels at `out_lo`, linear, NaN where a point maps outside."""
    import scipy.ndimage as ndi

    m = np.asarray(matrix, float)
    o = np.asarray(offset, float) + m @ np.asarray(out_lo, float) - np.asarray(region_lo, float)
    return ndi.affine_transform(region.astype(np.float32), m, o, output_shape=tuple(int(s) for s in out_shape),
                                order=1, mode="constant", cval=np.nan)


def _ncc(a: np.ndarray, b: np.ndarray) -> float | None:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 16:
        return None
    x = a[ok].astype(np.float64)
    y = b[ok].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    d = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / d) if d > 0 else None


def _mapped_box(matrix, offset, lo, hi, shape, margin: int):
    """Bounding box (lo, hi) in the moving volume of the fixed box [lo, hi) mapped through the
    transform, grown by `margin` voxels and clipped to `shape`; None if it misses the volume."""
    m, o = np.asarray(matrix, float), np.asarray(offset, float)
    corners = np.array(np.meshgrid(*[[a, b - 1] for a, b in zip(lo, hi)], indexing="ij")).reshape(len(lo), -1)
    mapped = m @ corners + o[:, None]
    blo = np.floor(mapped.min(axis=1)).astype(np.int64) - margin
    bhi = np.floor(mapped.max(axis=1)).astype(np.int64) + margin + 2
    blo, bhi = np.maximum(blo, 0), np.minimum(bhi, np.asarray(shape))
    if np.any(bhi - blo < 2):
        return None
    return blo, bhi


def _quality(fv, mv, fixed_crop, lo, hi, matrix, offset, margin=2):
    """NCC of the fixed crop with the moving volume resampled through (matrix, offset) onto it."""
    box = _mapped_box(matrix, offset, lo, hi, mv.shape, margin)
    if box is None:
        return None
    region = _read(mv, *box)
    return _ncc(fixed_crop, _resample_region(region, box[0], matrix, offset, lo, hi - lo))


# ---- SimpleITK ------------------------------------------------------------------------------


def _sitk_image(a: np.ndarray, spacing, origin_vox):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.float32))
    sp = np.asarray(spacing, float)
    img.SetSpacing([float(v) for v in sp[::-1]])
    img.SetOrigin([float(v) for v in (np.asarray(origin_vox, float) * sp)[::-1]])
    return img


def _euler(ndim: int):
    import SimpleITK as sitk

    return sitk.Euler3DTransform() if ndim == 3 else sitk.Euler2DTransform()


def _to_sitk(matrix, offset, spacing, centre_vox):
    """Euler transform (physical, x-y-z order) equal to the voxel map (matrix, offset), with its
    centre of rotation at voxel `centre_vox`."""
    s = np.asarray(spacing, float)
    n = len(s)
    a = (np.asarray(matrix, float) * s[:, None]) / s[None, :]  # physical, z-y-x
    u, _, vt = np.linalg.svd(a)  # nearest rotation (a rigid map's matrix already is one)
    a = u @ vt
    b = np.asarray(offset, float) * s
    c = np.asarray(centre_vox, float) * s
    t = a @ c + b - c  # T(p) = a (p - c) + c + t
    tx = _euler(n)
    tx.SetCenter([float(v) for v in c[::-1]])
    tx.SetMatrix([float(v) for v in a[::-1, ::-1].ravel()])
    tx.SetTranslation([float(v) for v in t[::-1]])
    return tx


def _from_sitk(tx, spacing) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, offset) in voxel z-y-x coordinates of a SimpleITK matrix-offset transform."""
    s = np.asarray(spacing, float)
    n = len(s)
    r = np.asarray(tx.GetMatrix(), float).reshape(n, n)
    c = np.asarray(tx.GetCenter(), float)
    t = np.asarray(tx.GetTranslation(), float)
    a = r[::-1, ::-1]
    b = (c + t - r @ c)[::-1]
    return (a / s[:, None]) * s[None, :], b / s


def _sitk_register(fixed_img, moving_img, init, *, metric: str, shrink, sigmas, sampling: float, iterations: int,
                   seed: int = 1):
    """Run one SimpleITK rigid registration; returns (Euler transform, final metric value, iterations)."""
    import SimpleITK as sitk

    r = sitk.ImageRegistrationMethod()
    if metric == "mattes":
        r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    else:
        r.SetMetricAsCorrelation()
    if sampling < 1.0:
        r.SetMetricSamplingStrategy(r.RANDOM)
        r.SetMetricSamplingPercentage(float(sampling), int(seed))
    r.SetInterpolator(sitk.sitkLinear)
    r.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=int(iterations),
                                               relaxationFactor=0.5, gradientMagnitudeTolerance=1e-10)
    r.SetOptimizerScalesFromPhysicalShift()
    r.SetShrinkFactorsPerLevel(list(shrink))
    r.SetSmoothingSigmasPerLevel(list(sigmas))
    r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    r.SetInitialTransform(init, inPlace=False)
    out = r.Execute(fixed_img, moving_img)
    out = out.Downcast()
    if out.GetName() == "CompositeTransform":
        out = out.GetNthTransform(out.GetNumberOfTransforms() - 1).Downcast()
    return out, float(r.GetMetricValue()), int(r.GetOptimizerIteration())


# --------------------------------------------------------------------------------------------
# register
# --------------------------------------------------------------------------------------------


def register(
    fixed,
    moving,
    *,
    method: str = "translation",
    spacing=None,
    downsample=None,
    crop=None,
    metric: str = "correlation",
    upsample: int = 20,
    max_view: int = _DEFAULT_VIEW,
    fixed_dataset: str | None = None,
    moving_dataset: str | None = None,
    iterations: int = 200,
    progress: bool = False,
) -> Transform:
    """Estimate the motion between two states: a translation or a rigid motion, sub-voxel.

    Parameters
    ----------
    fixed : path, array or Volume
        Reference state (e.g. the pristine scan), anything :func:`grapes_dask.io.resolve_volume`
        takes (numpy, dask, Zarr, TIFF, HDF5, ...). Never read whole: the coarse stage streams
        it chunk by chunk into a downsampled view, the fine stage reads one crop.
    moving : path, array or Volume
        The state to align onto `fixed`; same dimensionality, any shape.
    method : {"translation", "rigid"}
        ``"translation"``: phase correlation (scikit-image, upsampled DFT) at both stages.
        ``"rigid"``: rotation and translation by SimpleITK (``Euler3DTransform``, centre of
        rotation at the centre of the region registered), initialised with the phase-correlation
        translation.
    spacing : float or sequence of float, optional
        Voxel size ``(z, y, x)``; default: from the inputs' metadata (they must agree), else 1.
        Only the rigid method depends on it (a rotation is rigid in physical space).
    downsample : int or sequence of int, optional
        Block-mean factor of the coarse view per axis. Default: the smallest integer that makes
        the view at most `max_view` voxels per side on average (1 for volumes up to that size).
    crop : int, sequence of int, or sequence of (start, stop) or slices, optional
        Region of the fixed volume for the fine stage at full resolution: a size (per axis or
        one for all, centred in the part of the fixed volume that overlaps the moving one after
        the coarse estimate; default 128 voxels per side) or an explicit box. It should show
        the sample (particles), not only empty space.
    metric : {"correlation", "mattes"}
        Rigid only: SimpleITK's normalised correlation (default: the states are one modality, and
        it was the more accurate on phantoms, 2D included) or Mattes mutual information (32
        bins; for states whose grey levels changed non-linearly).
    upsample : int
        Translation: upsampling factor of the phase correlation; the shift is resolved to
        ``1 / upsample`` voxel at the fine stage (the coarse stage uses half of it, on the view).
    max_view : int
        Side (voxels) of the largest coarse view the default `downsample` allows.
    fixed_dataset, moving_dataset : str, optional
        Dataset inside an HDF5 file or array inside a Zarr group.
    iterations : int
        Rigid only: iteration limit of SimpleITK's optimiser at each stage.
    progress : bool
        Show a progress bar while the coarse views are computed.

    Returns
    -------
    Transform
        Maps fixed voxel coordinates ``(z, y, x)`` to moving ones; ``.shift`` (voxels at the
        fixed volume's centre), ``.rotation_deg``, ``.ncc`` (agreement after alignment on the
        crop) and ``.ncc_identity`` (before).

    Raises
    ------
    GrapesInputError
        Unknown method or metric, volumes of different dimensionality, a constant (empty)
        volume or crop, a crop or factor that does not fit; all before the fine stage is read.

    Notes
    -----
    Memory: the two coarse views (float32, at most about ``max_view**3`` voxels each) and their
    Fourier transforms (complex64), plus the crops; never the volumes. Phase correlation is
    periodic: shifts larger than half the coarse view cannot be told from their wrapped
    counterparts, and the rigid method expects rotations of a few degrees (large rotations
    need a manual initial estimate, which this function does not take).
    """
    from .io import _progress_ctx, resolve_volume, settle_spacing

    if method not in _METHODS:
        raise GrapesInputError(f"unknown {{method}}: use one of {list(_METHODS)}", method=method)
    if metric not in _METRICS:
        raise GrapesInputError(f"unknown {{metric}}: use one of {list(_METRICS)}", metric=metric)
    if not (isinstance(upsample, numbers.Integral) and upsample >= 1):
        raise GrapesInputError("{upsample} must be a positive integer", upsample=upsample)
    if not (isinstance(iterations, numbers.Integral) and iterations >= 1):
        raise GrapesInputError("{iterations} must be a positive integer", iterations=iterations)
    if not (isinstance(max_view, numbers.Integral) and max_view >= 16):
        raise GrapesInputError("{max_view} must be an integer >= 16", max_view=max_view)
    fv = resolve_volume(fixed, dataset=fixed_dataset)
    mv = resolve_volume(moving, dataset=moving_dataset)
    if fv.ndim != mv.ndim:
        raise GrapesInputError(
            f"fixed {fv.name!r} is {fv.ndim}D (shape {fv.shape}) but moving {mv.name!r} is {mv.ndim}D "
            f"(shape {mv.shape}): register two volumes of the same dimensionality"
        )
    n = fv.ndim
    spacing, spacing_source, unit = settle_spacing({"fixed": fv, "moving": mv}, spacing)
    common = tuple(min(a, b) for a, b in zip(fv.shape, mv.shape))
    f = _downsample_factors(common, downsample, max_view)

    # ---- coarse stage: block-mean views of the common box --------------------------------
    import dask

    box = tuple(slice(0, s) for s in common)
    with _progress_ctx(progress, "downsampling"):
        fview, mview = dask.compute(_block_mean(fv.array[box], f), _block_mean(mv.array[box], f),
                                    scheduler="threads")
    fix_hint = "check that the right volume was given" + (f", or use a smaller downsample than {f}"
                                                           if max(f) > 1 else "")
    for view, vol, role in ((fview, fv, "fixed"), (mview, mv, "moving")):
        _check_texture(view, f"{role} volume {vol.name!r}", fix_hint)
    fa = np.asarray(f, float)
    d0, err0 = _phase_offset(fview, mview, max(1, int(upsample) // 2))
    coarse_offset = d0 * fa
    params: dict[str, Any] = {
        "fixed": fv.name, "moving": mv.name, "downsample": list(f), "view_shape": list(fview.shape),
        "coarse_offset": coarse_offset.tolist(), "coarse_error": err0, "spacing_source": spacing_source,
    }
    matrix = np.eye(n)
    offset = coarse_offset.copy()

    if method == "rigid":
        # coarse rigid on the views: a view voxel k covers voxels k*f .. k*f + f - 1 (centre k*f + (f-1)/2)
        origin = (fa - 1.0) / 2.0
        fimg = _sitk_image(fview, np.asarray(spacing) * fa, origin / fa)
        mimg = _sitk_image(mview, np.asarray(spacing) * fa, origin / fa)
        centre_v = origin + (np.asarray(fview.shape) - 1.0) / 2.0 * fa
        init = _to_sitk(matrix, offset, spacing, centre_v)
        small = min(fview.shape) >= 64
        tx, _, it0 = _sitk_register(fimg, mimg, init, metric=metric, shrink=[2, 1] if small else [1],
                                    sigmas=[1, 0] if small else [0], sampling=min(1.0, _SAMPLES / fview.size),
                                    iterations=iterations)
        matrix, offset = _from_sitk(tx, spacing)
        params["coarse_matrix"] = matrix.tolist()
        params["coarse_offset"] = offset.tolist()
        params["coarse_iterations"] = it0
    del fview, mview

    # ---- fine stage: a full-resolution crop -----------------------------------------------
    margin = int(max(f)) + 2
    error = None
    if method == "translation":
        iters = 0
        for iters in range(1, 4):
            k = np.rint(offset).astype(np.int64)
            lo, hi = _crop_region(crop, fv.shape, -k, np.asarray(mv.shape) - k)
            fcrop = _read(fv, lo, hi)
            _check_texture(fcrop, f"the fine-stage crop {list(zip(lo.tolist(), hi.tolist()))} of fixed {fv.name!r}",
                           "give a {crop} that shows particles", crop=crop)
            mcrop = _read(mv, lo + k, hi + k)
            _check_texture(mcrop, f"the fine-stage crop of moving {mv.name!r}", "give another {crop}", crop=crop)
            resid, error = _phase_offset(fcrop, mcrop, upsample)
            offset = k + resid
            if np.all(np.abs(resid) <= 1.0):
                break
        params["fine_iterations"] = iters
    else:
        c_guess = np.rint(offset).astype(np.int64)
        lo, hi = _crop_region(crop, fv.shape, -c_guess, np.asarray(mv.shape) - c_guess)
        fcrop = _read(fv, lo, hi)
        _check_texture(fcrop, f"the fine-stage crop {list(zip(lo.tolist(), hi.tolist()))} of fixed {fv.name!r}",
                       "give a {crop} that shows particles", crop=crop)
        mbox = _mapped_box(matrix, offset, lo, hi, mv.shape, margin + 4)
        if mbox is None:
            raise GrapesInputError(
                f"the coarse estimate maps the fine-stage crop of fixed {fv.name!r} outside moving {mv.name!r}: "
                "the volumes hardly overlap; check the inputs or give a {crop}", crop=crop,
            )
        mregion = _read(mv, *mbox)
        _check_texture(mregion, f"the fine-stage region of moving {mv.name!r}", "give another {crop}", crop=crop)
        centre = (lo + hi - 1) / 2.0
        init = _to_sitk(matrix, offset, spacing, centre)
        tx, error, it1 = _sitk_register(_sitk_image(fcrop, spacing, lo), _sitk_image(mregion, spacing, mbox[0]), init,
                                        metric=metric, shrink=[1], sigmas=[0],
                                        sampling=min(1.0, 2 * _SAMPLES / fcrop.size), iterations=iterations)
        matrix, offset = _from_sitk(tx, spacing)
        params["fine_iterations"] = it1
        params["metric"] = metric
    params["crop"] = [[int(a), int(b)] for a, b in zip(lo, hi)]
    if method == "translation":
        params["upsample"] = int(upsample)

    ncc = _quality(fv, mv, fcrop, lo, hi, matrix, offset)
    ncc0 = _quality(fv, mv, fcrop, lo, hi, np.eye(n), np.zeros(n))
    from . import __version__

    params["grapes_dask_version"] = __version__
    params["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return Transform(method, tuple(map(tuple, matrix)), _floats(offset), fv.shape, mv.shape, tuple(spacing), unit,
                     ncc, ncc0, error, params)


# --------------------------------------------------------------------------------------------
# apply_transform
# --------------------------------------------------------------------------------------------


def _round_to(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float `values` to `dtype`: integers rounded half away from zero (as scipy) and clipped."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        v = np.clip(values, info.min, info.max)
        v = np.where(v >= 0, np.floor(v + 0.5), -np.floor(0.5 - v))
        return v.astype(dtype)
    if dtype.kind == "b":
        return values >= 0.5
    return values.astype(dtype)


def _resample_block(src, src_lo, out_lo, out_shape, matrix, offset, order, fill, dtype, slab_voxels=1 << 20):
    """Resample one output block from `src`, the region of the input starting at voxel `src_lo`.

    Every output voxel's input coordinate is computed from its global index by one fixed
    sequence of float operations, then the integer `src_lo` is subtracted (exactly), so a voxel
    gets the same value whatever block it falls in.
    """
    import scipy.ndimage as ndi

    dtype = np.dtype(dtype)
    out = np.empty(out_shape, dtype=dtype)
    if src is None:
        out[...] = fill
        return out
    src = np.asarray(src)
    if not src.dtype.isnative:
        src = src.astype(src.dtype.newbyteorder("="))
    n = len(out_shape)
    m = np.asarray(matrix, float)
    o = np.asarray(offset, float)
    plane = int(np.prod(out_shape[1:], dtype=np.int64))
    step = max(1, slab_voxels // max(1, plane))
    grids = [np.arange(out_lo[a], out_lo[a] + out_shape[a], dtype=np.float64) for a in range(1, n)]
    for z0 in range(0, out_shape[0], step):
        z1 = min(out_shape[0], z0 + step)
        axes = [np.arange(out_lo[0] + z0, out_lo[0] + z1, dtype=np.float64)] + grids
        axes = [ax.reshape([-1 if i == a else 1 for i in range(n)]) for a, ax in enumerate(axes)]
        coords = np.empty((n, z1 - z0) + tuple(out_shape[1:]), dtype=np.float64)
        for i in range(n):
            c = m[i, 0] * axes[0]
            for j in range(1, n):
                c = c + m[i, j] * axes[j]
            c = c + o[i]
            coords[i] = c - float(src_lo[i])
        if order <= 1 and dtype.kind != "b":
            # no overshoot: scipy's own cast (integers rounded half away from zero) is the result
            ndi.map_coordinates(src, coords, output=out[z0:z1], order=order, mode="constant", cval=float(fill),
                                prefilter=False)
            continue
        vals = ndi.map_coordinates(src, coords, output=np.float64, order=order, mode="constant", cval=float(fill),
                                   prefilter=order > 1)
        out[z0:z1] = _round_to(vals, dtype) if dtype.kind in "iub" else vals.astype(dtype)
    return out


def _pad(order: int) -> int:
    """Margin (voxels) around a block for the spline prefilter of `order` (0 for orders 0, 1)."""
    if order <= 1:
        return 0
    return int(math.ceil(math.log(1e-10) / math.log(_SPLINE_POLE[order])))


def _check_fill(fill, dtype: np.dtype):
    if isinstance(fill, bool) or not isinstance(fill, numbers.Real) or not math.isfinite(float(fill)):
        if dtype.kind == "f" and isinstance(fill, numbers.Real) and math.isnan(float(fill)):
            return float(fill)
        raise GrapesInputError("{fill} must be a finite number", fill=fill)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if not (info.min <= fill <= info.max) or float(fill) != int(fill):
            raise GrapesInputError(
                f"{{fill}} does not fit the volume's dtype {dtype} ({info.min}..{info.max}, whole numbers)", fill=fill
            )
    return float(fill)


def apply_transform(
    volume,
    transform,
    *,
    out: str | os.PathLike | None = None,
    order: int = 1,
    chunks=None,
    overwrite: bool = False,
    fill: float = 0,
    dataset: str | None = None,
    progress: bool = False,
    scheduler=None,
):
    """Resample the moving volume onto the fixed grid through `transform`, block by block.

    ``output[x] = volume[T(x)]`` for every voxel ``x`` of the fixed grid (``T = transform``),
    interpolated with splines of `order` as :func:`scipy.ndimage.map_coordinates` with
    ``mode="constant"``: points that map outside the volume get `fill`.

    Parameters
    ----------
    volume : path, array or Volume
        The moving volume (or its labels, with ``order=0``), shape ``transform.moving_shape``;
        anything :func:`grapes_dask.io.resolve_volume` takes.
    transform : Transform, dict or path
        From :func:`register`, :meth:`Transform.to_dict` or a JSON file of :meth:`Transform.save`
        (or a Zarr store written by this function).
    out : path, optional
        Zarr store to write (name ending in ``.zarr``); written under a temporary name and
        renamed when complete. Default: return a lazy dask array.
    order : int
        Spline order 0-5: 0 nearest (labels), 1 linear (default). Orders 0 and 1 equal
        :func:`scipy.ndimage.map_coordinates` on the whole volume bitwise, whatever the
        chunking. Orders 2-5 prefilter each block's input region grown by a margin (18
        voxels for order 3): equal to the in-memory result within about 1e-7 relative.
    chunks : int, tuple of int or dask chunks, optional
        Output chunks, voxels. Default: the input's chunks when the shapes agree (uneven dask
        chunkings included), else the input's chunk size; with `out`, also the Zarr chunks.
    overwrite : bool
        Replace an existing `out`.
    fill : float
        Value of output voxels that map outside the volume (must fit an integer dtype).
    dataset : str, optional
        Dataset inside an HDF5 file or array inside a Zarr group.
    progress : bool
        Show a progress bar while writing `out`.
    scheduler : optional
        Dask scheduler for writing `out` (default: the current one).

    Returns
    -------
    dask.array.Array or pathlib.Path
        Shape ``transform.fixed_shape``, the input's dtype (integers rounded half away from
        zero and clipped to the dtype's range). With `out`: the store's path; its attributes
        hold ``transform`` (:meth:`Transform.to_dict`), ``spacing``, ``unit`` and a
        ``grapes_dask`` provenance record (command, source, order, fill, version, date).

    Raises
    ------
    GrapesInputError
        A volume whose shape is not the transform's moving shape (a transform estimated for
        another volume) or of another dimensionality, a bad order, fill or output name; all
        before any voxel is read.

    Notes
    -----
    Each output block reads the box of the input its corners map to, grown by the
    interpolation support (and the prefilter margin for order > 1), directly from the file
    when the input is a file. Memory per task: that box plus float64 coordinates for at most
    2**20 voxels at a time. A rotation of a few degrees makes the box of a 128**3 block a few
    voxels larger than the block.
    """
    import dask
    import dask.array as da

    from .io import provenance, resolve_volume, write_zarr

    t = _as_transform(transform)
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or not 0 <= order <= 5:
        raise GrapesInputError("{order} must be an integer 0-5 (0 nearest, 1 linear, 3 cubic)", order=order)
    order = int(order)
    vol = resolve_volume(volume, dataset=dataset)
    if vol.ndim != t.ndim or vol.shape != t.moving_shape:
        raise GrapesInputError(
            f"{vol.name!r} has shape {vol.shape}, but the transform was estimated for a moving volume of shape "
            f"{t.moving_shape} (onto a fixed volume of shape {t.fixed_shape}): apply it to the volume it was "
            "estimated for, or estimate one for this volume with {estimate}",
            estimate=Alt("register(fixed, this volume)", "grapes-dask register FIXED THIS_VOLUME"),
        )
    dtype = np.dtype(vol.dtype)
    fill = _check_fill(fill, dtype)
    if out is not None:
        out = Path(out)
        if not out.name.lower().endswith(".zarr"):
            raise GrapesInputError(f"output {str(out)!r} does not end in .zarr: apply_transform writes a Zarr store "
                                   "(a folder); name it *.zarr")
        if out.exists() and not overwrite:
            raise GrapesInputError(
                f"output {str(out)!r} already exists: choose another path or pass {{overwrite}}", overwrite=True
            )
        if not out.parent.exists():
            raise GrapesInputError(f"the folder of output {str(out)!r} does not exist: create it first")
    shape = t.fixed_shape
    if chunks is None:
        chunks = vol.array.chunks if vol.shape == shape else tuple(min(c, s) for c, s in
                                                                    zip(vol.array.chunksize, shape))
    try:
        out_chunks = da.core.normalize_chunks(chunks, shape)
    except (ValueError, TypeError) as exc:
        raise GrapesInputError(f"{{chunks}} does not fit the output shape {shape} ({exc})", chunks=chunks) from exc

    m = np.asarray(t.matrix)
    o = np.asarray(t.offset)
    pad = _pad(order)
    support = order // 2 + 2 + pad
    direct = vol.reader is not None and not isinstance(vol.reader, np.ndarray)
    token = dask.base.tokenize(vol.array.name, t.matrix, t.offset, shape, out_chunks, order, fill, str(dtype))
    name = f"apply-transform-{token}"
    starts = [np.concatenate([[0], np.cumsum(c)[:-1]]).astype(int) for c in out_chunks]
    block = dask.delayed(_resample_block, pure=True)
    blocks = np.empty(tuple(len(c) for c in out_chunks), dtype=object)
    for idx in np.ndindex(*blocks.shape):
        lo = np.array([starts[a][i] for a, i in enumerate(idx)])
        bshape = tuple(int(out_chunks[a][i]) for a, i in enumerate(idx))
        corners = np.array(np.meshgrid(*[[a, a + s - 1] for a, s in zip(lo, bshape)], indexing="ij"))
        corners = corners.reshape(t.ndim, -1)
        mapped = m @ corners + o[:, None]
        cmin, cmax = mapped.min(axis=1), mapped.max(axis=1)
        if np.any(cmax < -2) or np.any(cmin > np.asarray(vol.shape) + 1):
            src, slo = None, np.zeros(t.ndim, int)  # the whole block maps outside the volume
        else:
            slo = np.clip(np.floor(cmin).astype(np.int64) - support, 0, np.asarray(vol.shape) - 1)
            shi = np.clip(np.floor(cmax).astype(np.int64) + support + 1, slo + 1, np.asarray(vol.shape))
            sl = tuple(slice(int(a), int(b)) for a, b in zip(slo, shi))
            src = dask.delayed(_read_direct, pure=True)(vol.reader, sl, dask_key_name=(name + "-read",) + idx) \
                if direct else vol.array[sl]
        blocks[idx] = da.from_delayed(
            block(src, tuple(int(v) for v in slo), tuple(int(v) for v in lo), bshape, t.matrix, t.offset, order, fill,
                  dtype.str, dask_key_name=(name,) + idx),
            bshape, dtype=dtype,
        )
    result = da.block(blocks.tolist())
    if out is None:
        return result
    attrs = {
        "spacing": list(t.spacing),
        "unit": t.unit,
        "transform": t.to_dict(),
        "grapes_dask": provenance(command="apply_transform", source=vol.name, source_kind=vol.kind,
                                  dataset=vol.dataset, method=t.method, order=order, fill=fill,
                                  shift=list(t.shift), rotation_deg=t.rotation_deg),
    }
    attrs = {k: v for k, v in attrs.items() if v is not None}
    zchunks = tuple(int(max(c)) for c in out_chunks)
    return write_zarr(result, out, chunks=zchunks, attrs=attrs, overwrite=overwrite, progress=progress,
                      scheduler=scheduler)


def _read_direct(reader, sl) -> np.ndarray:
    a = np.asarray(reader[sl])
    return a.astype(a.dtype.newbyteorder("=")) if not a.dtype.isnative else a
