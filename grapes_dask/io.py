"""Volume input/output: open any supported source as a chunked dask array, convert to Zarr.

Stages of :func:`convert` (each bounded in memory by a few blocks, never by the volume):

1. resolve the source (numpy / dask / Zarr v2 or v3 / OME-Zarr / TIFF / TIFF slices / HDF5 / npy)
   and validate it (exists, 2D or 3D, supported dtype), before any voxel is read;
2. build a lazy dask array whose tasks open the file themselves (no open handle is pickled);
3. create the destination Zarr v3 array under a temporary name, with compression and provenance
   attributes (source, spacing, package version, date);
4. stream blocks of whole destination chunks from source to destination;
5. rename the temporary array to its final name.

Every input is resolved once, by :func:`resolve_volume`, into a :class:`Volume`: its lazy dask
array, its voxel size and where that was read, a picklable reader the analysis tasks read
blocks from, its absolute path and an identity key (the same array given as grey and labels is
refused). :func:`open_volume` and :func:`read_spacing` are thin wrappers over it, and
:func:`settle_spacing` decides the voxel size of an analysis of several volumes.

This module is the public layer: :class:`Volume`, :func:`resolve_volume`, :func:`open_volume`,
:func:`read_spacing`, :func:`volume_info`, :func:`settle_spacing`, :func:`check_spacing`,
:func:`atomic_output`, :func:`write_zarr`, :func:`convert` and :func:`provenance`. The
per-format readers (the lazy file-backed sources, :func:`direct_reader` and the resolution of
each format, its metadata and voxel size) are in :mod:`grapes_dask.formats`; the names other
modules and tests import from here (:data:`SUPPORTED_DTYPES`, :func:`direct_reader`, ...) are
imported from there and stay importable from ``grapes_dask.io``.

Supported sources for :func:`open_volume` (a path may name its dataset after ``::``, as in
``scan.h5::/entry/data`` or ``store.zarr::labels``; relative paths are made absolute at once):

=======================  =====================================================================
numpy ``ndarray``        wrapped with :func:`dask.array.from_array`
dask ``Array``           used as is (rechunked if ``chunks`` is given)
Zarr array, group, path  Zarr v2 and v3; an OME-Zarr multiscale image opens level 0 by default
``.tif`` / ``.tiff``     one multi-page file, read lazily through tifffile's Zarr store
folder / glob of TIFFs   2D slices sorted by name, stacked along axis 0
``.h5`` ``.hdf5`` ``.nxs``  HDF5 / NeXus dataset (``dataset=`` path); opened inside each task
``.npy``                 memory-mapped inside each task
=======================  =====================================================================
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import numbers
import os
import shutil
import threading
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import dask
import dask.array as da
import numpy as np

from ._errors import GrapesDataError, GrapesInputError
from .formats import (
    SUPPORTED_DTYPES,
    _check_array_like,
    _DirectZarrReader,
    _LazySource,
    _Resolved,
    _SqueezedZarr,
    _TiffSequenceSource,
    _ZarrReader,
    direct_reader,
)
from .formats import _resolve as _resolve_source
from .units import parse_spacing, unit_factor

__all__ = [
    "Volume",
    "resolve_volume",
    "settle_spacing",
    "check_spacing",
    "open_volume",
    "read_spacing",
    "volume_info",
    "check_chunks",
    "convert",
    "write_zarr",
    "atomic_output",
    "VolumeInfo",
    "SUPPORTED_DTYPES",
]

_DEFAULT_CHUNK = {2: 1024, 3: 128}
_MiB = 1 << 20


# --------------------------------------------------------------------------------------------
# atomic outputs
# --------------------------------------------------------------------------------------------


def _check_can_write(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not overwrite:
        raise GrapesInputError(
            f"output {str(dest)!r} already exists: choose another path or pass {{overwrite}}", overwrite=True
        )
    if not dest.parent.exists():
        raise GrapesInputError(
            f"the folder of output {str(dest)!r} does not exist: create {str(dest.parent)!r} first"
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output(dest: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a file or folder under a temporary name and rename it to `dest` when complete.

    Parameters
    ----------
    dest : path
        Final path of the output (file or folder, e.g. a ``.zarr`` store).
    overwrite : bool
        Replace an existing `dest`. Otherwise an existing `dest` raises
        :class:`GrapesInputError` before anything is written.

    Yields
    ------
    pathlib.Path
        Temporary path in the same folder as `dest` to write to. If the block raises, the
        temporary output is removed and `dest` is left untouched.
    """
    dest = Path(dest)
    _check_can_write(dest, overwrite)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if not tmp.exists():
        raise RuntimeError(f"nothing was written to the temporary output {tmp}")
    if dest.exists() or dest.is_symlink():
        if not overwrite:  # appeared while we were writing
            _remove(tmp)
            _check_can_write(dest, overwrite)
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        _remove(old)
    else:
        os.replace(tmp, dest)


# --------------------------------------------------------------------------------------------
# public readers
# --------------------------------------------------------------------------------------------


def _is_whole(c) -> bool:
    return isinstance(c, numbers.Real) and not isinstance(c, bool) and float(c).is_integer()


def _normalize_chunks(chunks, shape: tuple, default=None) -> tuple:
    """Per-axis chunk sizes (ints) clipped to the shape; an int applies to every axis.

    ``None`` or ``-1`` for an axis means the whole axis. A tuple of the wrong length or a
    fractional, zero or negative size is an error (never truncated or rounded silently).
    """
    if chunks is None:
        chunks = default if default is not None else _DEFAULT_CHUNK[len(shape)]
    given = chunks
    if np.isscalar(chunks):
        chunks = (chunks,) * len(shape)
    try:
        chunks = tuple(chunks)
    except TypeError:
        chunks = ()
    ok = len(chunks) == len(shape) and all(c is None or (_is_whole(c) and (c > 0 or c == -1)) for c in chunks)
    if not ok:
        raise GrapesInputError(
            f"{{chunks}} does not fit a volume of shape {shape}: give one positive size or one per axis", chunks=given
        )
    return tuple(n if c is None or c == -1 else min(int(c), n) for c, n in zip(chunks, shape))


def _as_dask(r: _Resolved, chunks) -> da.Array:
    out = _as_dask_raw(r, chunks)
    if not out.dtype.isnative:  # big-endian HDF5/npy/Zarr: same values, native byte order
        out = out.astype(out.dtype.newbyteorder("="))
    return out


def _as_dask_raw(r: _Resolved, chunks) -> da.Array:
    arr = r.array
    if isinstance(arr, da.Array):
        return arr if chunks is None else arr.rechunk(_normalize_chunks(chunks, arr.shape))
    import zarr

    if isinstance(arr, zarr.Array):
        c = _normalize_chunks(chunks, arr.shape, default=r.native_chunks)
        # as dask.array.from_zarr (same name), read through a reader that names damaged chunks
        name = "from-zarr-" + dask.base.tokenize(arr, None, {}, c)
        return da.from_array(_ZarrReader(arr, r.name), chunks=c, name=name, asarray=False, fancy=False, lock=False,
                             meta=np.empty((0,) * arr.ndim, dtype=arr.dtype))
    c = _normalize_chunks(chunks, arr.shape, default=r.native_chunks if isinstance(arr, _SqueezedZarr) else None)
    if isinstance(arr, np.ndarray):
        return da.from_array(arr, chunks=c)
    name = "open-" + dask.base.tokenize(arr.token(), c)
    return da.from_array(arr, chunks=c, name=name, asarray=False, fancy=False, lock=False,
                         meta=np.empty((0,) * arr.ndim, dtype=arr.dtype))


def _make_reader(r: _Resolved):
    """What tasks read blocks of `r` from directly: a picklable ``reader[slices] -> numpy``.

    The numpy array itself, a Zarr array (the faster :class:`_DirectZarrReader` of a local Zarr v3
    array, else a :class:`_ZarrReader` through zarr-python; both name the chunk and file of a
    damaged chunk) or a :class:`_LazySource` that opens its file inside the task; None for a dask
    array (its blocks come from its own graph). Reading a region directly avoids building it from
    dask chunks (getitem + concatenate), which cost several times the decompression itself.
    """
    import zarr

    arr = r.array
    if isinstance(arr, np.ndarray):
        return arr
    if isinstance(arr, zarr.Array):
        return direct_reader(arr, r.name) or _ZarrReader(arr, r.name)
    if isinstance(arr, _LazySource):
        return arr
    return None


@dataclass(frozen=True, eq=False)
class Volume:
    """One input resolved once: its lazy array, voxel size, a reader for tasks, its name.

    Made by :func:`resolve_volume`; accepted wherever a path or an array is (``analyze``,
    :func:`open_volume`, :func:`convert`), so that an input is opened, checked and its metadata
    read only once.

    Attributes
    ----------
    name : str
        The input as the user gave it, for messages and provenance: a path (``scan.h5::/data``
        for a dataset in a file, ``store.zarr/array`` in a group) or ``numpy array (Z, Y, X)``.
    kind : str
        ``"numpy"``, ``"dask"``, ``"zarr"``, ``"ome-zarr"``, ``"tiff"``, ``"tiff-sequence"``,
        ``"hdf5"`` or ``"npy"``.
    path : str or None
        Absolute path of the file, the folder (or glob) of slices, or the Zarr array; None for
        in-memory arrays.
    dataset : str or None
        Dataset path inside an HDF5 file (absolute, ``/entry/data``) or array path inside a Zarr
        group.
    array : dask.array.Array
        Shape ``(Z, Y, X)`` or ``(Y, X)``, native byte order; file-backed tasks open the file
        themselves.
    spacing : tuple of float or None
        Voxel size per axis (z, y, x) from the metadata, in `unit`; None when it records none.
    spacing_source : str or None
        Where `spacing` was read, in words (``"OME-TIFF PhysicalSize"``, ``"ImageJ metadata"``,
        ``"TIFF resolution tags (cm)"``, ``"Zarr attribute 'spacing'"``, ``"OME-Zarr scale"``,
        ``"HDF5 attribute 'element_size_um'"``...); None without `spacing`.
    unit : str or None
        Unit of `spacing` (TIFF sizes are converted to ``"micrometer"``).
    reader : object or None
        Picklable; ``reader[slices]`` returns that region as a numpy array (in the file's byte
        order), read inside the task without the dask graph of `array`. None for dask inputs.
    key : tuple
        Identity of the data: absolute real path and dataset for files, the memory of a numpy
        array, the name of a dask array. Two volumes with one key are the same array.
    level : int or None
        Resolution level asked for (OME-Zarr, pyramidal TIFF).
    native_chunks : tuple of int or None
        Chunk shape of the storage, voxels.
    attrs : dict
        Zarr attributes (provenance of a converted store).
    """

    name: str
    kind: str
    path: str | None
    dataset: str | None
    array: da.Array
    spacing: tuple | None
    spacing_source: str | None
    unit: str | None
    reader: Any
    key: tuple
    level: int | None = None
    native_chunks: tuple | None = None
    attrs: dict = field(default_factory=dict)
    _resolved: Any = field(default=None, repr=False)

    @property
    def shape(self) -> tuple:
        """Shape in voxels, ``(Z, Y, X)`` or ``(Y, X)``."""
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        """Element type in native byte order."""
        return self.array.dtype

    @property
    def ndim(self) -> int:
        """2 or 3."""
        return self.array.ndim

    def rechunk(self, chunks) -> Volume:
        """The same volume with its dask array in chunks of `chunks` voxels (int or per axis)."""
        if chunks is None:
            return self
        if self._resolved is None:
            return replace(self, array=self.array.rechunk(_normalize_chunks(chunks, self.shape)))
        return replace(self, array=_as_dask(self._resolved, chunks))


def _resolve(source, dataset: str | None = None, level: int | None = None) -> _Resolved:
    """What a :class:`Volume` already resolved (when no other dataset or level is asked for),
    else `source` resolved by :func:`grapes_dask.formats._resolve`."""
    if isinstance(source, Volume) and source._resolved is not None and dataset is None and level is None:
        return source._resolved
    return _resolve_source(source, dataset, level)


def resolve_volume(source, *, dataset: str | None = None, level: int | None = None, chunks=None) -> Volume:
    """Open and check one input once: lazy array, voxel size and its source, reader, identity.

    Parameters
    ----------
    source : str, path, numpy.ndarray, dask.array.Array, zarr.Array, zarr.Group or Volume
        As for :func:`open_volume`. A path may name its dataset after ``::``:
        ``scan.h5::/entry/data``, ``store.zarr::labels``. Relative paths are made absolute
        now, so tasks on workers with another working folder find the files. A :class:`Volume`
        is returned as is (rechunked if `chunks` is given).
    dataset : str, optional
        Dataset path inside an HDF5 file or array name inside a Zarr group (or give it in the
        path after ``::``).
    level : int, optional
        Resolution level of an OME-Zarr image or a pyramidal TIFF (default 0).
    chunks : int or tuple of int, optional
        Chunk shape of the dask array, voxels (default as :func:`open_volume`).

    Returns
    -------
    Volume

    Raises
    ------
    GrapesInputError
        Missing file, unsupported format/dtype/dimensionality, unknown or ambiguous dataset,
        a folder of slices with files of another shape or dtype (named).
    """
    if isinstance(source, Volume):
        if dataset is not None and str(dataset).strip("/") != str(source.dataset or "").strip("/"):
            raise GrapesInputError(
                f"{source.name!r} is already opened with dataset {source.dataset!r}: resolve the file again with "
                "{dataset}", dataset=dataset,
            )
        if level is not None and level != (source.level or 0):
            raise GrapesInputError(
                f"{source.name!r} is already opened at level {source.level or 0}: resolve it again with {{level}}",
                level=level,
            )
        return source.rechunk(chunks)
    r = _resolve(source, dataset, level)
    _check_array_like(r.array.shape, r.array.dtype, r.name)
    return Volume(
        name=r.name, kind=r.kind, path=r.path, dataset=r.dataset, array=_as_dask(r, chunks), spacing=r.spacing,
        spacing_source=r.spacing_source if r.spacing is not None else None, unit=r.unit, reader=_make_reader(r),
        key=r.key, level=level, native_chunks=r.native_chunks, attrs=r.attrs, _resolved=r,
    )


def _split_unit(spacing):
    """``(values, unit)`` of a voxel size given with a unit; as given, and None, when it has none or
    is not a voxel size at all (:func:`check_spacing` then says what is wrong)."""
    try:
        return parse_spacing(spacing)
    except GrapesInputError:
        return spacing, None


def check_spacing(spacing, ndim: int) -> tuple[float, ...]:
    """A given voxel size as one positive float per axis.

    Parameters
    ----------
    spacing : float or sequence of float
        One number for every axis, or one per axis (z, y, x).
    ndim : int
        Dimensionality of the volume, 2 or 3.

    Returns
    -------
    tuple of float
        Length `ndim`.

    Raises
    ------
    GrapesInputError
        Wrong length, not numbers, zero, negative or not finite.
    """
    values: tuple = ()
    spacing, _ = _split_unit(spacing)  # "0.325um" -> 0.325 (the unit is read by settle_spacing)
    if isinstance(spacing, numbers.Real) and not isinstance(spacing, bool):
        values = (float(spacing),) * ndim
    elif not isinstance(spacing, (str, bytes)):
        try:
            values = tuple(float(s) for s in np.ravel(np.asarray(spacing, dtype=object)))
        except (TypeError, ValueError):
            values = ()
    if len(values) != ndim or not all(np.isfinite(s) and s > 0 for s in values):
        raise GrapesInputError(
            f"{{spacing}} does not fit a {ndim}D volume: give {ndim} positive voxel sizes "
            f"({'z y x' if ndim == 3 else 'y x'}) or one for every axis, optionally with a unit (0.325um)",
            spacing=spacing,
        )
    return values


def _same_size(a: Volume, b: Volume) -> bool:
    fa, fb = unit_factor(a.unit), unit_factor(b.unit)
    x = np.asarray(a.spacing, float) * (fa if fa and fb else 1.0)
    y = np.asarray(b.spacing, float) * (fb if fa and fb else 1.0)
    return x.shape == y.shape and bool(np.all(np.abs(x - y) <= 1e-6 * np.maximum(np.abs(x), np.abs(y))))


def settle_spacing(volumes: dict, spacing=None) -> tuple[tuple[float, ...], str, str | None]:
    """The voxel size of an analysis of several volumes, and where it came from.

    Parameters
    ----------
    volumes : dict of str to Volume
        Role (``"labels"``, ``"grey"``) to volume, all of one shape, in order of precedence.
    spacing : float, str or sequence of float or str, optional
        The voxel size the user gave: it settles the question (checked by :func:`check_spacing`).
        Values may carry a length unit (``"0.325um"``); bare numbers take the unit the files
        record, if any.

    Returns
    -------
    spacing : tuple of float
        One per axis (z, y, x).
    source : str
        ``"given"``, ``"<role>: <where it was read>"`` (e.g. ``"labels: OME-TIFF PhysicalSize"``),
        or ``"default: no voxel size in the metadata of either input (1 per axis)"``.
    unit : str or None
        Unit of the metadata's voxel size, when known.

    Raises
    ------
    GrapesInputError
        A given `spacing` that does not fit, or volumes whose metadata record voxel sizes that
        differ by more than 1e-6 relative (in micrometres when both units are known), naming
        each value and its source; ``spacing=`` is the fix.
    """
    vols = list(volumes.items())
    ndim = vols[0][1].ndim
    known = [(role, v) for role, v in vols if v.spacing is not None and len(v.spacing) == ndim]
    if spacing is not None:
        values, unit = _split_unit(spacing)
        if unit is None:  # a bare number takes the unit the files record, if any
            unit = next((v.unit for _, v in known if v.unit), None)
            return check_spacing(values, ndim), "given" + (f" (unit {unit} from the metadata)" if unit else ""), unit
        return check_spacing(values, ndim), "given", unit
    if not known:
        which = "either input" if len(vols) == 2 else ("the input" if len(vols) == 1 else "any input")
        return (1.0,) * ndim, f"default: no voxel size in the metadata of {which} (1 per axis)", None
    role, first = known[0]
    for other_role, other in known[1:]:
        if not _same_size(first, other):
            def say(r, v):
                return f"{r} {v.name!r}: {tuple(v.spacing)}{' ' + v.unit if v.unit else ''} ({v.spacing_source})"

            raise GrapesInputError(
                f"the voxel sizes of the inputs disagree, {say(role, first)}; {say(other_role, other)}: "
                "check which is right and give it with {spacing}", spacing=tuple(first.spacing),
            )
    return tuple(float(s) for s in first.spacing), f"{role}: {first.spacing_source}", first.unit


def open_volume(source, *, dataset: str | None = None, chunks=None, level: int | None = None) -> da.Array:
    """Open a 2D image or 3D volume lazily as a chunked dask array.

    Parameters
    ----------
    source : str, path, numpy.ndarray, dask.array.Array, zarr.Array, zarr.Group or Volume
        A path to a ``.tif``/``.tiff`` file, a folder or glob of 2D TIFF slices, an HDF5/NeXus
        file (``.h5``, ``.hdf5``, ``.nxs``), a ``.npy`` file or a Zarr (v2/v3, OME-Zarr) store;
        a path may name its dataset after ``::`` (``scan.h5::/entry/data``); or an in-memory
        array, or a :class:`Volume`.
    dataset : str, optional
        Dataset path inside an HDF5 file or array name inside a Zarr group. Needed when the file
        holds more than one 2D/3D dataset (NeXus files follow their ``default``/``signal``).
    chunks : int or tuple of int, optional
        Chunk shape in voxels (one int for every axis). Default: the Zarr store's own chunks,
        otherwise 128 per axis for 3D and 1024 for 2D.
    level : int, optional
        Resolution level of an OME-Zarr multiscale image or a pyramidal TIFF (default 0, the full
        resolution).

    Returns
    -------
    dask.array.Array
        Shape ``(Z, Y, X)`` or ``(Y, X)``, the file's dtype in native byte order. File-backed
        tasks open the file themselves (by its absolute path), so the array can be sent to
        distributed workers.

    Raises
    ------
    GrapesInputError
        Missing file, unsupported format/dtype/dimensionality, unknown or ambiguous dataset.
    """
    return resolve_volume(source, dataset=dataset, chunks=chunks, level=level).array


def read_spacing(source, *, dataset: str | None = None, level: int | None = None) -> tuple[float, ...] | None:
    """Voxel size of a source, per axis (z, y, x), from its metadata, or None if it has none.

    Read from OME-TIFF ``PhysicalSize*``, ImageJ TIFF (``spacing`` and resolution), TIFF
    resolution tags in centimetres (inch tags are print resolutions and are ignored: see
    :func:`grapes_dask.formats._tiff_spacing`), OME-Zarr ``scale`` transformations, the
    ``spacing`` attribute written by :func:`convert`, or HDF5 ``spacing``/``element_size_um``
    attributes (of the dataset or a group above it). TIFF values are in micrometres. `level`
    selects the resolution level of an OME-Zarr image (default 0). :attr:`Volume.spacing_source`
    says which one was used.
    """
    return resolve_volume(source, dataset=dataset, level=level).spacing


@dataclass
class VolumeInfo:
    """What :func:`volume_info` reports about a source (no voxel is read)."""

    name: str
    kind: str
    shape: tuple
    dtype: str
    chunks: tuple | None
    spacing: tuple | None
    unit: str | None
    nbytes: int
    nbytes_on_disk: int | None
    dataset: str | None = None
    attrs: dict = field(default_factory=dict)
    spacing_source: str | None = None

    def to_text(self) -> str:
        """Human-readable multi-line summary (as printed by ``grapes-dask info``)."""
        def size(n):
            if n is None:
                return "-"
            for u in ("B", "KiB", "MiB", "GiB", "TiB"):
                if n < 1024 or u == "TiB":
                    return f"{n:.1f} {u}" if u != "B" else f"{n} B"
                n /= 1024

        lines = [
            f"path:      {self.name}",
            f"format:    {self.kind}" + (f" (dataset {self.dataset})" if self.dataset else ""),
            f"shape:     {self.shape}",
            f"dtype:     {self.dtype}",
            f"chunks:    {self.chunks}",
            f"spacing:   {self.spacing if self.spacing else 'not recorded (1 per axis assumed)'}"
            + (f" {self.unit}" if self.spacing and self.unit else "")
            + (f" (from {self.spacing_source})" if self.spacing and self.spacing_source else ""),
            f"size:      {size(self.nbytes)} uncompressed, {size(self.nbytes_on_disk)} on disk",
        ]
        prov = self.attrs.get("grapes_dask")
        if prov:
            lines.append("provenance:")
            lines += [f"  {k}: {v}" for k, v in prov.items()]
        return "\n".join(lines)


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def volume_info(source, *, dataset: str | None = None, level: int | None = None) -> VolumeInfo:
    """Describe a source without reading its voxels.

    Returns
    -------
    VolumeInfo
        shape, dtype, native chunks, spacing and unit (if recorded), uncompressed size in bytes,
        size on disk in bytes (files only) and the provenance attributes of a converted Zarr.
        `level` selects a resolution level as for :func:`open_volume`.
    """
    r = _resolve(source, dataset, level)
    shape, dtype = tuple(r.array.shape), np.dtype(r.array.dtype)
    on_disk = None
    if isinstance(r.array, _TiffSequenceSource):
        on_disk = sum(os.path.getsize(f) for f in r.array.files)
    elif isinstance(source, (str, os.PathLike)) and r.path and Path(r.path).exists():
        on_disk = _du(Path(r.path))
    return VolumeInfo(
        name=r.name, kind=r.kind, shape=shape, dtype=str(dtype), chunks=r.native_chunks,
        spacing=r.spacing, unit=r.unit, nbytes=int(np.prod(shape)) * dtype.itemsize,
        nbytes_on_disk=on_disk, dataset=r.dataset, attrs=r.attrs, spacing_source=r.spacing_source,
    )


def check_chunks(source, *, dataset: str | None = None, level: int | None = None, threads: int | None = None,
                 progress: bool = False) -> tuple[int, list[GrapesDataError]]:
    """Read every chunk of a stored volume and list the damaged ones.

    An analysis stops at the first damaged chunk a task meets (the volume is never read ahead);
    this reads them all, in threads, so that every file to restore is known at once.

    Parameters
    ----------
    source : str, path, zarr.Array, zarr.Group or Volume
        As for :func:`open_volume`. In-memory arrays have nothing stored to check.
    dataset, level
        As for :func:`open_volume`.
    threads : int, optional
        Chunks read at once (default: one per core). Each holds one decoded chunk.
    progress : bool
        Report the chunks read on standard error.

    Returns
    -------
    n_chunks : int
        Chunks read (the native chunk grid: Zarr chunks, HDF5 chunks, TIFF pages or slices).
    damaged : list of GrapesDataError
        One per damaged, empty or unreadable chunk (or file), in chunk order; each has
        ``.chunk`` (grid index), ``.path`` (file), ``.detail`` (what is wrong) and the full
        message as ``str(err)``. Empty when every chunk reads.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ._progress import Reporter
    from .cluster import cores

    vol = resolve_volume(source, dataset=dataset, level=level)
    rd = vol.reader
    if rd is None or isinstance(rd, np.ndarray):
        return 0, []
    grid = getattr(rd, "chunks", None)
    if not (isinstance(grid, tuple) and len(grid) == vol.array.ndim
            and all(isinstance(c, (int, np.integer)) and c > 0 for c in grid)):
        native = vol.native_chunks
        grid = tuple(native) if native is not None and len(native) == vol.array.ndim else vol.array.chunksize
    grid = tuple(int(c) for c in grid)
    shape = vol.array.shape
    indices = list(np.ndindex(*[-(-n // c) for n, c in zip(shape, grid)]))

    def read(idx):
        try:
            if isinstance(rd, _DirectZarrReader):
                rd._chunk(idx)
            else:
                rd[tuple(slice(i * c, min(n, (i + 1) * c)) for i, c, n in zip(idx, grid, shape))]
        except GrapesDataError as exc:
            return exc
        return None

    bar = Reporter("checking chunks", unit="chunk") if progress else None
    found = {}
    with ThreadPoolExecutor(max(1, int(threads or cores()))) as pool:
        for k, err in enumerate(pool.map(read, indices)):
            if err is not None:  # one error per chunk (file formats may name a chunk twice)
                found.setdefault((err.chunk, err.path), err)
            if bar is not None:
                bar.update_to(k + 1, len(indices))
    if bar is not None:
        bar.close()
    return len(indices), list(found.values())


# --------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------


def _default_compressor(dtype: np.dtype):
    from zarr.codecs import BloscCodec

    # lz4hc: labels compress about as well as with zstd and decompress 3-5x faster, which is
    # what an analysis that reads every chunk twice cares about
    shuffle = "bitshuffle" if dtype.itemsize == 1 else "shuffle"
    return BloscCodec(cname="lz4hc", clevel=5, shuffle=shuffle)


def provenance(**extra) -> dict:
    """Provenance record stored with every output: package version, UTC date and `extra`."""
    from . import __version__

    rec = {"version": __version__, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    rec.update({k: v for k, v in extra.items() if v is not None})
    return json.loads(json.dumps(rec, default=str))


def _progress_ctx(progress: bool, desc: str):
    if not progress:
        return contextlib.nullcontext()
    from ._progress import dask_callback

    return dask_callback(desc, unit="task")


def write_zarr(
    array: da.Array,
    dest: str | os.PathLike,
    *,
    chunks=None,
    attrs: dict | None = None,
    overwrite: bool = False,
    progress: bool = False,
    scheduler=None,
) -> Path:
    """Store a dask array as a compressed Zarr v3 array, atomically.

    Parameters
    ----------
    array : dask.array.Array
        Data to write. Each dask block should cover whole destination chunks (otherwise it is
        rechunked so that it does); memory is then a few blocks per worker.
    dest : path
        Destination store (conventionally ``*.zarr``). Written under a temporary name in the
        same folder and renamed when every chunk is written.
    chunks : int or tuple of int, optional
        Zarr chunk shape (default: the array's chunk size).
    attrs : dict, optional
        JSON-serialisable attributes (spacing, provenance, ...).
    overwrite : bool
        Replace an existing `dest`.
    progress : bool
        Show a progress bar.
    scheduler : optional
        Dask scheduler for the write (default: the current one).

    Returns
    -------
    pathlib.Path
        `dest`.
    """
    import zarr

    zchunks = _normalize_chunks(chunks, array.shape, default=array.chunksize)
    # every dask block must cover whole zarr chunks so that no two tasks write one chunk
    aligned = all(
        all(b % c == 0 for b in bc[:-1]) for bc, c in zip(array.chunks, zchunks)
    )
    if not aligned:
        array = array.rechunk(zchunks)
    dest = Path(dest)
    with atomic_output(dest, overwrite=overwrite) as tmp:
        z = zarr.create_array(
            store=str(tmp), shape=array.shape, chunks=zchunks, dtype=array.dtype,
            compressors=_default_compressor(np.dtype(array.dtype)), fill_value=0,
            attributes=attrs or {}, zarr_format=3,
        )
        target = _AbortableTarget(z, str(tmp / "zarr.json"))
        try:
            with _progress_ctx(progress, f"writing {dest.name}"):
                da.store(array, target, lock=False, compute=True, scheduler=scheduler)
        except BaseException:
            # dask reports the first failed task while others may still be running; stop them
            # from writing before atomic_output removes the temporary store, or they recreate it
            target.abort()
            raise
    return dest


class _AbortableTarget:
    """``da.store`` target that refuses writes once the output has been abandoned.

    In this process, :meth:`abort` blocks new writes and waits for the ones in progress. A copy
    sent to another process (processes scheduler, distributed worker) cannot see that flag, so
    it writes only while `marker` (the temporary store's metadata file) still exists.
    """

    def __init__(self, array, marker: str):
        self.array, self.marker = array, marker
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self._cond = threading.Condition()
        self._active = 0
        self._aborted = False

    def __reduce__(self):
        return (type(self), (self.array, self.marker))

    def __setitem__(self, key, value):
        with self._cond:
            if self._aborted or not os.path.exists(self.marker):
                raise RuntimeError(f"write to {os.path.dirname(self.marker)!r} skipped: the output was abandoned")
            self._active += 1
        try:
            self.array[key] = value
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def abort(self, timeout: float = 300.0) -> None:
        with self._cond:
            self._aborted = True
            self._cond.wait_for(lambda: self._active == 0, timeout)


def _read_blocks(shape: tuple, zchunks: tuple, itemsize: int, budget: int) -> tuple:
    """Read-block shape: whole zarr chunks along the first axes, the full last axis, within budget.

    Rows spanning the whole last axis keep TIFF pages and strips from being decoded once per
    chunk column; the row height grows in whole chunks while a block stays under `budget`.
    """
    blk = list(zchunks)
    blk[-1] = shape[-1]
    if len(shape) >= 2:
        row = int(np.prod(blk[:-2])) * blk[-1] * itemsize  # bytes per unit of axis -2
        k = max(1, budget // max(1, row * zchunks[-2]))
        blk[-2] = min(shape[-2], zchunks[-2] * k)
    return tuple(blk)


def _check_zarr_name(dest: Path) -> None:
    """:func:`convert` writes a Zarr store (a folder): refuse a name that says otherwise."""
    if not dest.name.lower().endswith(".zarr"):
        better = dest.with_name((dest.name[: -len(dest.suffix)] if dest.suffix else dest.name) + ".zarr")
        raise GrapesInputError(
            f"output {str(dest)!r} does not end in .zarr, but convert writes a Zarr store (a folder): "
            f"name it {str(better)!r} (or .ome.zarr)"
        )


def convert(
    source,
    dest: str | os.PathLike,
    *,
    chunks=128,
    dataset: str | None = None,
    level: int | None = None,
    spacing: Sequence[float] | None = None,
    unit: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    memory_budget: int = 256 * _MiB,
    scheduler=None,
) -> Path:
    """Convert a volume to a compressed Zarr v3 array out of core.

    Parameters
    ----------
    source : path or array
        Anything :func:`open_volume` accepts.
    dest : path
        Destination Zarr store; its name must end in ``.zarr`` (e.g. ``grey.zarr`` or
        ``grey.ome.zarr``). Written under a temporary name and renamed when complete.
    chunks : int or tuple of int
        Chunk shape of the Zarr array in voxels (default 128 per axis).
    dataset : str, optional
        HDF5 dataset path or Zarr array name, as for :func:`open_volume`.
    level : int, optional
        Resolution level of an OME-Zarr image or pyramidal TIFF, as for :func:`open_volume`
        (default 0); the level's own voxel size is recorded.
    spacing : float or sequence of float, optional
        Voxel size per axis (z, y, x), or one for every axis; overrides what the source's
        metadata says.
    unit : str, optional
        Unit of `spacing` (default: the source's, or ``"micrometer"`` for TIFF metadata).
    overwrite : bool
        Replace an existing `dest`.
    progress : bool
        Show a progress bar.
    memory_budget : int
        Target size in bytes of one read block (whole destination chunks along the first axes,
        the full last axis). Peak memory is about ``workers x 2 x memory_budget``.
    scheduler : optional
        Dask scheduler (default: the threaded scheduler).

    Returns
    -------
    pathlib.Path
        `dest`. Its attributes hold ``spacing``, ``unit`` and a ``grapes_dask`` provenance record
        (source, dataset, source kind, where the spacing came from, package version, date).
    """
    dest = Path(dest)
    _check_zarr_name(dest)
    r = _resolve(source, dataset, level)
    shape, dtype = tuple(r.array.shape), np.dtype(r.array.dtype)
    _check_array_like(shape, dtype, r.name)
    _check_can_write(dest, overwrite)
    zchunks = _normalize_chunks(chunks, shape)
    if spacing is not None:
        spacing, given_unit = _split_unit(spacing)
        spacing, unit, how = check_spacing(spacing, len(shape)), unit or given_unit or r.unit, "given"
    else:
        spacing, unit, how = r.spacing, unit or r.unit, r.spacing_source
    blocks = _read_blocks(shape, zchunks, dtype.itemsize, memory_budget)
    arr = _as_dask(r, blocks)
    attrs = {
        "spacing": list(spacing) if spacing else None,
        "unit": unit,
        "grapes_dask": provenance(
            command="convert", source=r.name, source_kind=r.kind, dataset=r.dataset, level=level,
            spacing_source=how if spacing else None,
        ),
    }
    attrs = {k: v for k, v in attrs.items() if v is not None}
    return write_zarr(arr, dest, chunks=zchunks, attrs=attrs, overwrite=overwrite, progress=progress,
                      scheduler=scheduler)
