"""Denoising of grey-level volumes, block by block with the filter's overlap, out of core.

Three filters, each the in-memory filter of scipy or scikit-image applied to blocks grown by the
filter's reach (:func:`dask.array.Array.map_overlap`, with no padding at the volume's edge, so
that each filter pads the true edge itself as it does on the whole array):

=============  =================================================================================
``gaussian``   :func:`dask_image.ndfilters.gaussian_filter` (scipy.ndimage.gaussian_filter per
               block, overlap ``ceil(4 sigma)``), in float32 (float64 for 32-bit integer and
               float64 grey), then rounded and clipped back to the grey dtype.
``median``     :func:`dask_image.ndfilters.median_filter` (overlap ``size // 2``), on the grey
               itself (an order statistic: no arithmetic, no conversion).
``nlm``        scikit-image's fast non-local means (:func:`skimage.restoration.denoise_nl_means`
               with ``fast_mode=True``) per block, overlap ``patch_distance + patch_size // 2``,
               with one cut-off `h` for the whole volume (from one noise estimate of the whole
               volume, :func:`estimate_noise_sigma`), then rounded and clipped to the grey dtype.
=============  =================================================================================

What is exact where (the tests check each against the in-memory filter on the whole array):

- gaussian and median: the chunked result is bitwise equal to the in-memory scipy result
  everywhere, volume edges included (``mode="reflect"``), for any chunking.
- nlm: scikit-image's fast algorithm sums squared patch differences in integral images that
  start at the block's corner, not the volume's. For integer grey levels these sums are
  integers, exact in float64 while a block's sum stays below 2**53 (always for 8-bit grey; for
  16-bit grey when ``voxels of a padded block x (grey range in it)**2 < 2**53``, e.g. a range
  below about 46,000 for 128**3 chunks), so every weight is computed to the same bits and
  added in the same order: the result is bitwise equal to ``denoise_nl_means`` on the whole
  array with the same `h`, everywhere, volume edges included, for any chunking. For non-integer
  float grey the sums round differently per block: differences are at the level of float64
  rounding of those sums (see ``docs/preprocess_denoise.md``).

The noise's variance is not subtracted from patch distances (scikit-image's ``sigma=0``): that
keeps the sums integers, hence the exactness. The default cut-off ``h = 0.8 x noise
sigma`` is a compromise measured on the package's phantoms (uint8, contrast 110, blur 1): the
best factor falls from 1.0 or more at noise sigma 4-6 to 0.8 at 12 and 0.7 at 20, and 0.8 stays
within about 10% of the best RMSE over that range (``docs/preprocess_denoise.md``).
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import scipy.ndimage as ndi

from ._errors import GrapesInputError
from .io import _check_can_write, _check_zarr_name, provenance, resolve_volume, settle_spacing, write_zarr

__all__ = ["denoise", "estimate_noise_sigma", "METHODS", "H_FACTOR"]

METHODS = ("nlm", "gaussian", "median")

#: default NLM cut-off, in units of the estimated (or given) noise standard deviation
H_FACTOR = 0.8

_TRUNCATE = 4.0  # Gaussian kernel radius in sigmas (scipy's default)
_MAD_TO_SIGMA = 0.6744897501960817  # median of |N(0, 1)|
_SUM_LIMIT = 2.0**53  # integers below this are exact in float64


# --------------------------------------------------------------------------------------------
# noise estimate
# --------------------------------------------------------------------------------------------


def _sample_boxes(shape: tuple, box: int, per_axis: int) -> list[tuple]:
    """Slices of the sample boxes: `per_axis` evenly spread boxes of side `box` per axis.

    Depends on the shape only (never on the chunking), so that the estimate, hence `h`, is the
    same for every chunking of one volume.
    """
    starts = []
    sides = []
    for n in shape:
        b = min(box, n)
        if b >= 2:
            b -= b % 2
        k = max(1, min(per_axis, n // b))
        s = sorted({min(max(int(round((i + 0.5) * n / k - b / 2)), 0), n - b) for i in range(k)})
        starts.append(s)
        sides.append(b)
    out = [()]
    for s, b in zip(starts, sides):
        out = [o + (slice(a, a + b),) for o in out for a in s]
    return out


def _haar_finest(x: np.ndarray) -> np.ndarray:
    """Finest diagonal Haar wavelet coefficients of `x` (orthonormal: white noise of standard
    deviation s gives coefficients of standard deviation s), one per 2x2(x2) cube; cubes whose
    voxels are all equal (masked, saturated or constant regions) are left out."""
    x = np.asarray(x, dtype=np.float64)
    axes = [a for a in range(x.ndim) if x.shape[a] >= 2]
    x = x[tuple(slice(0, n - n % 2) for n in x.shape)]
    d = x
    lo = x
    hi = x
    for a in axes:
        sl0 = tuple(slice(0, None, 2) if i == a else slice(None) for i in range(x.ndim))
        sl1 = tuple(slice(1, None, 2) if i == a else slice(None) for i in range(x.ndim))
        d = d[sl0] - d[sl1]
        lo = np.minimum(lo[sl0], lo[sl1])
        hi = np.maximum(hi[sl0], hi[sl1])
    d = d.ravel() / math.sqrt(2.0) ** len(axes)
    return d[(hi > lo).ravel()]


def estimate_noise_sigma(grey, *, box: int = 48, boxes_per_axis: int = 3, chunks=None, scheduler=None) -> float:
    """Standard deviation of additive noise, in grey levels, from a fixed sample of the volume.

    The median absolute value of the finest diagonal Haar wavelet coefficients (one per 2x2x2
    cube of voxels; ``(sum of the cube's voxels with signs (-1)**(z+y+x)) / 2**1.5``) divided by
    0.6745 (Donoho's robust estimator, as scikit-image's ``estimate_sigma`` with a Haar
    wavelet). Cubes whose 8 voxels are all equal (a masked or saturated region) are left out.

    The sample is ``boxes_per_axis**ndim`` boxes of side `box`, evenly spread over the volume;
    it depends only on the volume's shape, never on its chunking, so the estimate is the same
    for every chunking. At most ``boxes_per_axis**3 * box**3`` voxels are read (3.0 M by
    default), plus the rest of the storage chunks they touch.

    Parameters
    ----------
    grey : path, numpy.ndarray, dask.array.Array or Volume, shape (Z, Y, X) or (Y, X)
        Anything :func:`grapes_dask.io.resolve_volume` accepts.
    box : int
        Side of a sample box, voxels (made even; clipped to the volume).
    boxes_per_axis : int
        Number of boxes along each axis.
    chunks : int or tuple of int, optional
        Chunk shape to read with (default: the storage's).
    scheduler : optional
        Dask scheduler or distributed Client for the sample's compute.

    Returns
    -------
    float
        Noise standard deviation, grey levels. 0 when the sample holds no noise (a flat or
        quantised noise-free image).

    Raises
    ------
    GrapesInputError
        An input :func:`grapes_dask.io.resolve_volume` refuses; `box` or `boxes_per_axis`
        below 1.
    """
    vol = resolve_volume(grey, chunks=chunks)
    if not (_is_int(box) and box >= 2):
        raise GrapesInputError("{box}: give the side of a sample box in voxels, at least 2", box=box)
    if not (_is_int(boxes_per_axis) and boxes_per_axis >= 1):
        raise GrapesInputError("{boxes_per_axis}: give a whole number of boxes, at least 1",
                               boxes_per_axis=boxes_per_axis)
    boxes = _sample_boxes(vol.shape, int(box), int(boxes_per_axis))
    blocks = dask.compute(*[vol.array[sl] for sl in boxes], scheduler=scheduler)
    coeffs = np.concatenate([_haar_finest(b) for b in blocks])
    if coeffs.size == 0:
        return 0.0
    return float(np.median(np.abs(coeffs)) / _MAD_TO_SIGMA)


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    """A whole number (``5`` or ``5.0``), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v) and float(v).is_integer()


def _per_axis(value, ndim: int, name: str, *, integer: bool, what: str) -> tuple:
    """`value` as one positive number per axis (an int or float applies to every axis)."""
    vals: tuple = ()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        vals = (value,) * ndim
    elif not isinstance(value, (str, bytes)):
        try:
            vals = tuple(value)
        except TypeError:
            vals = ()
    ok = len(vals) == ndim and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v) and v > 0
        and (not integer or float(v).is_integer()) for v in vals)
    if not ok:
        axes = "z y x" if ndim == 3 else "y x"
        raise GrapesInputError(
            f"{{{name}}} is not a valid {what}: give one positive {'whole number' if integer else 'number'} "
            f"of voxels, or {ndim} ({axes})", **{name: value})
    return tuple(int(v) for v in vals) if integer else tuple(float(v) for v in vals)


def _positive(value, name: str, what: str) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value) and value > 0
    if not ok:
        raise GrapesInputError(f"{{{name}}}: give {what} as a positive number of grey levels", **{name: value})
    return float(value)


def _work_dtype(dtype: np.dtype) -> np.dtype:
    """Float type the Gaussian is computed in: float32 holds 8/16-bit and float32 grey exactly."""
    if dtype == np.float32 or (dtype.kind in "ui" and dtype.itemsize <= 2):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _clip_bounds(dtype: np.dtype) -> tuple[float, float]:
    info = np.iinfo(dtype)
    return float(info.min), float(info.max)


def _to_dtype(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float block -> `dtype`: integer grey rounded half to even and clipped to the dtype's range."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        lo, hi = _clip_bounds(dtype)
        return np.clip(np.rint(block), lo, hi).astype(dtype)
    return block.astype(dtype, copy=False)


def _nlm_block(block: np.ndarray, *, patch_size: int, patch_distance: int, h: float, out_dtype) -> np.ndarray:
    """Fast NLM of one block (grown by the overlap) in float64 grey levels, cast to `out_dtype`."""
    from skimage.restoration import denoise_nl_means

    out = denoise_nl_means(block.astype(np.float64), patch_size=patch_size, patch_distance=patch_distance,
                           h=h, fast_mode=True, sigma=0.0, preserve_range=True)
    return _to_dtype(np.asarray(out), out_dtype)


def _check_depth(chunks: tuple, depth: tuple, name: str, reach: str, fix: dict) -> dict:
    """Per-axis overlap for map_overlap; an axis in one chunk needs none. Refuse chunks smaller
    than the overlap: each block takes its overlap from its direct neighbours only."""
    out = {}
    axes = "zyx" if len(chunks) == 3 else "yx"
    for a, (c, d) in enumerate(zip(chunks, depth)):
        if len(c) == 1 or d == 0:
            out[a] = 0
            continue
        if max(c) < d:
            raise GrapesInputError(
                f"{name}: the filter reaches {d} voxels ({reach}) along axis {axes[a]}, more than the chunks of "
                f"{max(c)} voxels can take from their neighbours: read in larger chunks with {{chunks}} "
                f"(at least {d} voxels) or {' or '.join('{' + k + '}' for k in fix)}",
                chunks=tuple(max(d, max(cc)) if len(cc) > 1 else max(cc) for cc, d in zip(chunks, depth)),
                **fix,
            )
        out[a] = int(d)
    return out


def _nlm_scheduler():
    """The scheduler NLM writes with when none is given: the current one if the user chose one
    (a distributed Client, or ``dask.config.set(scheduler=...)``), else dask's processes
    scheduler, since scikit-image's NLM holds the GIL (threads would run one block at a time)."""
    from .plan import _default_client

    if dask.config.get("scheduler", None) is not None or _default_client() is not None:
        return None
    return "processes"


def _fits(shape: tuple, depth: tuple) -> bool:
    """Whether dask-image can filter: it asks for its full overlap along every axis, which dask
    refuses along an axis shorter than the overlap ("The overlapping depth ... is larger than
    your array"), even where that axis is one chunk and needs none."""
    return all(n >= d for n, d in zip(shape, depth))


def _thin_overlap(arr: da.Array, func, depth_map: dict, **kwargs) -> da.Array:
    """What dask-image does (the scipy filter per block grown by the overlap, no padding at the
    volume's edge), with no overlap along axes in one chunk: for volumes thinner than the
    filter's reach along some axis (e.g. a few slices)."""
    return arr.map_overlap(func, depth=depth_map, boundary="none", dtype=arr.dtype,
                           meta=np.empty((0,) * arr.ndim, dtype=arr.dtype), **kwargs)


# --------------------------------------------------------------------------------------------
# the public function
# --------------------------------------------------------------------------------------------


def denoise(
    grey,
    method: str = "nlm",
    *,
    sigma=None,
    size=None,
    patch_size: int = 5,
    patch_distance: int = 6,
    h: float | None = None,
    noise_sigma: float | None = None,
    spacing=None,
    out: str | os.PathLike | None = None,
    chunks=None,
    overwrite: bool = False,
    progress: bool = False,
    scheduler=None,
):
    """Denoise a grey-level volume block by block: Gaussian, median or fast non-local means.

    Each block is filtered with the overlap the filter reaches (none at the volume's edge, where
    the filter pads as it does on the whole array), so the result equals the in-memory filter
    on the whole volume (bitwise: see the module notes for non-integer float grey with NLM).
    Nothing holds more than a few blocks.

    Parameters
    ----------
    grey : path, numpy.ndarray, dask.array.Array, zarr.Array or Volume, shape (Z, Y, X) or (Y, X)
        Anything :func:`grapes_dask.io.resolve_volume` accepts (TIFF, HDF5, Zarr, ...).
        Integer or float grey levels.
    method : {"nlm", "gaussian", "median"}
        ``"nlm"``: scikit-image's fast non-local means (the paper's choice; edge preserving,
        about 30 us per voxel and core). ``"gaussian"``: Gaussian blur. ``"median"``: median
        filter (removes impulse noise, keeps edges better than the Gaussian).
    sigma : float or sequence of float, optional
        ``gaussian`` only: standard deviation of the kernel, voxels, one for every axis or one
        per axis (z, y, x) (default 1). For anisotropic voxels give ``physical / spacing`` per
        axis. The kernel is truncated at ``4 sigma`` (scipy's default).
    size : int or sequence of int, optional
        ``median`` only: side of the window, voxels, one or one per axis (default 3).
    patch_size : int
        ``nlm``: side of the compared patches, voxels (odd; default 5).
    patch_distance : int
        ``nlm``: largest shift between compared patches along each axis, voxels (default 6:
        a search window of 13 voxels per side).
    h : float, optional
        ``nlm``: cut-off of the patch distance, grey levels; higher smooths more. Default
        ``0.8 * noise_sigma``.
    noise_sigma : float, optional
        ``nlm``: standard deviation of the noise, grey levels. Default: estimated once for the
        whole volume by :func:`estimate_noise_sigma` (a fixed sample of boxes; computed when
        this function is called). Ignored when `h` is given (recorded only).
    spacing : float or sequence of float, optional
        Voxel size per axis, recorded in the output's attributes (default: the input's).
        Filter sizes are in voxels whatever the spacing.
    out : path, optional
        Zarr store to write (name ending in ``.zarr``), under a temporary name renamed when
        complete. Default: return the lazy result.
    chunks : int or tuple of int, optional
        Block shape of the computation and of the output's Zarr chunks, voxels (default: the
        input's storage chunks). Larger blocks cut the overlap's overhead (NLM recomputes
        ``patch_distance + patch_size // 2 + patch_distance + patch_size // 2 + 1`` voxels
        around every block side: 2.0x the work at 128**3, 1.45x at 256**3).
    overwrite : bool
        Replace an existing `out`.
    progress : bool
        Show a progress bar while writing `out`.
    scheduler : optional
        Dask scheduler or distributed Client (default: the current one; for ``nlm`` written to
        `out` with no distributed client and no configured scheduler, dask's ``"processes"``
        scheduler, because scikit-image's NLM holds the GIL: threads would filter one block at
        a time. Compute a lazy NLM result likewise, e.g. ``res.compute(scheduler="processes")``
        or on a distributed cluster of processes.)

    Returns
    -------
    dask.array.Array or pathlib.Path
        Without `out`: the lazy result, same shape and dtype as `grey` (integer grey rounded
        half to even and clipped to the dtype's range). With `out`: its path; the Zarr
        attributes hold ``spacing``, ``unit`` and a ``grapes_dask`` record (command
        ``"denoise"``, source, method, every parameter in force, the noise sigma and how it
        was found, `h`, package version, date).

    Raises
    ------
    GrapesInputError
        Before any voxel is filtered: an input :func:`grapes_dask.io.resolve_volume` refuses
        (1D, 4D, unsupported dtype), boolean or 64-bit integer grey, an unknown method, a
        parameter for another method, a non-positive `sigma`, `size`, `h` or `noise_sigma`, an
        even or non-positive `patch_size`, a non-positive `patch_distance`, chunks smaller than
        the filter's reach, an existing `out` without `overwrite`. Also when the noise cannot
        be estimated (a noise-free sample: give `h`).
    """
    vol = resolve_volume(grey, chunks=chunks)
    arr = vol.array
    name = vol.name
    ndim, dtype = arr.ndim, np.dtype(arr.dtype)
    if method not in METHODS:
        raise GrapesInputError(f"unknown denoising method {{method}}: choose one of {', '.join(METHODS)}",
                               method=method)
    if dtype == bool:
        raise GrapesInputError(f"grey {name!r} is boolean (a mask): denoise a grey-level volume")
    if dtype.kind in "ui" and dtype.itemsize > 4:
        raise GrapesInputError(
            f"grey {name!r} has dtype {dtype}: 64-bit integer grey is not supported; convert it to float64, "
            "or to a 32-bit type if the values fit")
    unused = {"sigma": sigma, "size": size, "h": h, "noise_sigma": noise_sigma}
    own = {"gaussian": {"sigma"}, "median": {"size"}, "nlm": {"h", "noise_sigma"}}[method]
    for k, v in unused.items():
        if v is not None and k not in own:
            raise GrapesInputError(f"{{{k}}} does not apply to method={method!r}: leave it out, or choose the "
                                   f"method it belongs to", **{k: v})
    if spacing is not None:  # a unit given with it wins, a bare number keeps the file's
        spacing, _, unit = settle_spacing({"grey": vol}, spacing)
    else:
        spacing, unit = vol.spacing, vol.unit
    if out is not None:
        out = Path(out)
        _check_zarr_name(out)
        _check_can_write(out, overwrite)

    params: dict = {}
    if method == "gaussian":
        s = _per_axis(1.0 if sigma is None else sigma, ndim, "sigma", integer=False, what="Gaussian sigma")
        depth = tuple(int(math.ceil(_TRUNCATE * v)) for v in s)
        depth_map = _check_depth(arr.chunks, depth, "sigma", "4 sigma", {"sigma": None})
        work = _work_dtype(dtype)
        if _fits(arr.shape, depth):
            from dask_image.ndfilters import gaussian_filter

            res = gaussian_filter(arr.astype(work), s, mode="reflect", truncate=_TRUNCATE)
        else:
            res = _thin_overlap(arr.astype(work), ndi.gaussian_filter, depth_map, sigma=s, mode="reflect",
                                truncate=_TRUNCATE)
        if work != dtype:
            res = res.map_blocks(_to_dtype, dtype, dtype=dtype)
        params = dict(sigma=list(s), truncate=_TRUNCATE, mode="reflect", work_dtype=work.name)
    elif method == "median":
        sz = _per_axis(3 if size is None else size, ndim, "size", integer=True, what="median window")
        depth = tuple(v // 2 for v in sz)
        depth_map = _check_depth(arr.chunks, depth, "size", "half the window", {"size": None})
        if _fits(arr.shape, depth):
            from dask_image.ndfilters import median_filter

            res = median_filter(arr, size=sz, mode="reflect")
        else:
            res = _thin_overlap(arr, ndi.median_filter, depth_map, size=sz, mode="reflect")
        params = dict(size=list(sz), mode="reflect")
    else:
        if not (_is_int(patch_size) and patch_size >= 1 and int(patch_size) % 2 == 1):
            raise GrapesInputError("{patch_size}: give an odd whole number of voxels (e.g. 5)", patch_size=patch_size)
        if not (_is_int(patch_distance) and patch_distance >= 1):
            raise GrapesInputError("{patch_distance}: give a whole number of voxels, at least 1 (e.g. 6)",
                                   patch_distance=patch_distance)
        ps, pd_ = int(patch_size), int(patch_distance)
        reach = pd_ + ps // 2
        depth_map = _check_depth(arr.chunks, (reach,) * ndim, "patch_distance",
                                 "patch_distance + patch_size // 2",
                                 {"patch_distance": None, "patch_size": None})
        if h is not None:
            h = _positive(h, "h", "the NLM cut-off h")
        if noise_sigma is not None:
            noise_sigma = _positive(noise_sigma, "noise_sigma", "the noise standard deviation noise_sigma")
        how = "given"
        if h is None and noise_sigma is None:
            noise_sigma, how = estimate_noise_sigma(vol, scheduler=scheduler), "estimated"
            if not noise_sigma > 0:
                raise GrapesInputError(
                    f"the noise of grey {name!r} could not be estimated (the sampled boxes hold no noise): give "
                    "the cut-off {h} (grey levels) or {noise_sigma}, or denoise with another method",
                    h=None, noise_sigma=None)
        h_factor = None
        if h is None:
            h_factor = H_FACTOR
            h = H_FACTOR * noise_sigma
        res = arr.map_overlap(_nlm_block, depth=depth_map, boundary="none", dtype=dtype,
                              meta=np.empty((0,) * ndim, dtype=dtype),
                              patch_size=ps, patch_distance=pd_, h=float(h), out_dtype=dtype)
        params = dict(patch_size=ps, patch_distance=pd_, h=float(h), h_factor=h_factor, noise_sigma=noise_sigma,
                      noise_sigma_source=how if noise_sigma is not None else None, fast_mode=True,
                      subtract_variance=False, overlap=reach)
    if out is None:
        return res
    zchunks = tuple(max(c) for c in arr.chunks) if chunks is not None else (vol.native_chunks or arr.chunksize)
    attrs = {
        "spacing": list(spacing) if spacing else None,
        "unit": unit,
        "grapes_dask": provenance(command="denoise", source=name, source_kind=vol.kind, dataset=vol.dataset,
                                  method=method, parameters={k: v for k, v in params.items() if v is not None},
                                  dtype=dtype.name),
    }
    attrs = {k: v for k, v in attrs.items() if v is not None}
    if method == "nlm" and scheduler is None:
        scheduler = _nlm_scheduler()
    return write_zarr(res, out, chunks=zchunks, attrs=attrs, overwrite=overwrite, progress=progress,
                      scheduler=scheduler)
