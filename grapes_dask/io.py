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
import glob as _glob
import json
import numbers
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import dask
import dask.array as da
import numpy as np

from ._errors import GrapesInputError

__all__ = [
    "Volume",
    "resolve_volume",
    "settle_spacing",
    "check_spacing",
    "open_volume",
    "read_spacing",
    "volume_info",
    "convert",
    "write_zarr",
    "atomic_output",
    "VolumeInfo",
    "SUPPORTED_DTYPES",
]

#: dtypes accepted for grey and label volumes.
SUPPORTED_DTYPES = tuple(
    np.dtype(t)
    for t in (
        "bool", "uint8", "uint16", "uint32", "uint64",
        "int8", "int16", "int32", "int64", "float32", "float64",
    )
)

_TIFF_SUFFIXES = {".tif", ".tiff"}
_HDF5_SUFFIXES = {".h5", ".hdf5", ".hdf", ".he5", ".nxs", ".nx5", ".nx"}
_GLOB_CHARS = re.compile(r"[*?\[]")
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
# lazy file-backed sources (picklable; each process/thread opens its own handle)
# --------------------------------------------------------------------------------------------

_handles = threading.local()


def _cached_handle(key: tuple, opener):
    cache = getattr(_handles, "cache", None)
    if cache is None:
        cache = _handles.cache = {}
    h = cache.get(key)
    if h is None:
        if len(cache) > 16:  # keep a handful of open files per thread
            for old in list(cache.values()):
                with contextlib.suppress(Exception):
                    old[1]()
            cache.clear()
        h = cache[key] = opener()
    return h[0]


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return (path, st.st_mtime_ns, st.st_size)


class _LazySource:
    """Array-like opened inside the task that reads it; holds only paths and metadata."""

    kind = "file"

    def __init__(self, path: str, shape: tuple, dtype: np.dtype):
        # absolute, so that a worker started in another working folder finds the file
        self.path = os.path.abspath(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)

    def token(self) -> tuple:
        return (type(self).__name__, _file_key(self.path), self.shape, str(self.dtype))

    def __getitem__(self, key):  # pragma: no cover - abstract
        raise NotImplementedError


class _TiffSource(_LazySource):
    kind = "tiff"

    def __init__(self, path, shape, dtype, series: int = 0, level: int = 0, squeeze_axes=()):
        super().__init__(path, shape, dtype)
        self.series = series
        self.level = level
        self.squeeze_axes = tuple(squeeze_axes)

    def token(self):
        return super().token() + (self.series, self.level)

    def _open(self):
        import tifffile
        import zarr

        def opener():
            store = tifffile.imread(self.path, aszarr=True, series=self.series, level=self.level)
            return zarr.open(store, mode="r"), store.close

        return _cached_handle(("tiff",) + self.token(), opener)

    def __getitem__(self, key):
        arr = self._open()
        if self.squeeze_axes:  # re-insert the singleton axes dropped from `shape`
            full = list(key if isinstance(key, tuple) else (key,))
            for ax in self.squeeze_axes:
                full.insert(ax, 0)
            return np.asarray(arr[tuple(full)])
        return np.asarray(arr[key])


class _TiffSequenceSource(_LazySource):
    kind = "tiff-sequence"

    def __init__(self, files: Sequence[str], shape, dtype):
        super().__init__(files[0], shape, dtype)
        self.files = [os.path.abspath(f) for f in files]

    def token(self):
        return (type(self).__name__, tuple(_file_key(f) for f in self.files), self.shape)

    def __getitem__(self, key):
        import tifffile

        zkey, rest = key[0], tuple(key[1:])
        idx = range(*zkey.indices(self.shape[0]))
        out = np.empty((len(idx),) + tuple(len(range(*s.indices(n))) for s, n in zip(rest, self.shape[1:])),
                       dtype=self.dtype)
        for i, z in enumerate(idx):
            page = tifffile.imread(self.files[z])
            if page.shape != self.shape[1:] or page.dtype != self.dtype:
                raise GrapesInputError(
                    f"slice {self.files[z]!r} has shape {page.shape} and dtype {page.dtype}, but the stack was "
                    f"opened with slices of {self.shape[1:]} and {self.dtype} (was the file replaced since?): "
                    "all slices of a stack must match"
                )
            out[i] = page[rest]
        return out


class _Hdf5Source(_LazySource):
    kind = "hdf5"

    def __init__(self, path, dataset: str, shape, dtype):
        super().__init__(path, shape, dtype)
        self.dataset = dataset

    def token(self):
        return super().token() + (self.dataset,)

    def __getitem__(self, key):
        import h5py

        # Opened and closed for every read (about a millisecond): a handle cached for the life
        # of the thread would keep the file open, and HDF5 then refuses to rewrite or append to
        # it anywhere in this process ("file is already open for read-only").
        with h5py.File(self.path, "r") as f:
            return np.asarray(f[self.dataset][key])


class _NpySource(_LazySource):
    kind = "npy"

    def __getitem__(self, key):
        mm = _cached_handle(("npy",) + self.token(), lambda: (np.load(self.path, mmap_mode="r"), lambda: None))
        return np.array(mm[key])


class _SqueezedZarr(_LazySource):
    """A Zarr array read without its leading singleton axes (OME-NGFF t and c of size 1)."""

    kind = "zarr"

    def __init__(self, array, name: str, n_lead: int):
        super().__init__(name, array.shape[n_lead:], array.dtype)
        self.array = array
        self.n_lead = n_lead

    def token(self) -> tuple:
        return (type(self).__name__, self.path, str(self.array.store), self.shape, str(self.dtype))

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        return np.asarray(self.array[(0,) * self.n_lead + key])


class _DirectZarrReader:
    """Reads regions of a local Zarr v3 array by decoding its chunk files in the calling thread.

    zarr-python 3 funnels every read through one event loop: two threads reading at once took
    twice as long as one after the other (measured, 385^3 uint16 blocks), while decoding the
    chunk files here with numcodecs' Blosc (which releases the GIL) runs them in parallel, about
    3x faster with two threads. Only the layouts we write are handled (regular grid, default
    chunk keys, ``bytes`` + optional ``blosc`` or ``zstd`` codec, no sharding); :func:`direct_reader`
    returns None for anything else, and the caller reads through zarr.
    """

    def __init__(self, root: str, shape, chunks, dtype, fill, sep: str, codec: str | None):
        self.root, self.shape, self.chunks = root, tuple(shape), tuple(chunks)
        self.dtype, self.fill, self.sep, self.codec = np.dtype(dtype), fill, sep, codec
        self.ndim = len(self.shape)

    def _chunk(self, idx):
        path = os.path.join(self.root, "c", *map(str, idx)) if self.sep == "/" else os.path.join(
            self.root, "c" + self.sep + self.sep.join(map(str, idx)))
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        if self.codec == "blosc":
            from numcodecs import Blosc

            raw = Blosc().decode(raw)
        elif self.codec == "zstd":
            from numcodecs import Zstd

            raw = Zstd().decode(raw)
        return np.frombuffer(raw, self.dtype).reshape(self.chunks)

    def __getitem__(self, key):
        """``reader[slices]``: contiguous slices (or ``...``) only, as the engine's tasks use."""
        key = key if isinstance(key, tuple) else (key,)
        if key == (Ellipsis,):
            key = ()
        key = key + (slice(None),) * (self.ndim - len(key))
        if any(not isinstance(k, slice) or k.indices(n)[2] != 1 for k, n in zip(key, self.shape)):
            raise IndexError(f"direct Zarr reads take contiguous slices, got {key}")
        lo = [k.indices(n)[0] for k, n in zip(key, self.shape)]
        hi = [max(k.indices(n)[0], k.indices(n)[1]) for k, n in zip(key, self.shape)]
        out = np.empty([b - a for a, b in zip(lo, hi)], self.dtype.newbyteorder("="))
        ranges = [range(a // c, (b - 1) // c + 1) if b > a else range(0) for a, b, c in zip(lo, hi, self.chunks)]
        for idx in np.ndindex(*[len(r) for r in ranges]):
            cidx = [r[i] for r, i in zip(ranges, idx)]
            src = tuple(slice(max(a, i * c) - i * c, min(b, (i + 1) * c) - i * c)
                        for a, b, c, i in zip(lo, hi, self.chunks, cidx))
            dst = tuple(slice(max(a, i * c) - a, min(b, (i + 1) * c) - a)
                        for a, b, c, i in zip(lo, hi, self.chunks, cidx))
            ch = self._chunk(cidx)
            out[dst] = self.fill if ch is None else ch[src]
        return out


def direct_reader(array):
    """A :class:`_DirectZarrReader` for a local Zarr v3 array of a simple layout, else None."""
    try:
        from zarr.storage import LocalStore

        m = array.metadata
        if m.zarr_format != 3 or not isinstance(array.store, LocalStore):
            return None
        names = [type(c).__name__ for c in m.codecs]
        codecs = {("BytesCodec",): None, ("BytesCodec", "BloscCodec"): "blosc", ("BytesCodec", "ZstdCodec"): "zstd"}
        if tuple(names) not in codecs:
            return None
        if type(m.chunk_key_encoding).__name__ != "DefaultChunkKeyEncoding":
            return None
        grid = m.chunk_grid
        if type(grid).__name__ != "RegularChunkGrid":
            return None
        endian = getattr(m.codecs[0], "endian", None)
        order = "<" if str(getattr(endian, "value", endian)) in ("little", "None") else ">"
        dtype = np.dtype(array.dtype).newbyteorder(order) if np.dtype(array.dtype).itemsize > 1 else np.dtype(array.dtype)
        root = os.path.abspath(os.path.join(str(array.store.root), array.path) if array.path else str(array.store.root))
        fill = np.asarray(m.fill_value, dtype=array.dtype)[()]
        return _DirectZarrReader(root, array.shape, grid.chunk_shape, dtype, fill,
                                 m.chunk_key_encoding.separator, codecs[tuple(names)])
    except Exception:  # any layout we do not know: let zarr read it
        return None


# --------------------------------------------------------------------------------------------
# source resolution
# --------------------------------------------------------------------------------------------


@dataclass
class _Resolved:
    kind: str
    name: str  # what the user passed, for messages and provenance
    array: Any  # numpy, dask, zarr array or _LazySource
    native_chunks: tuple | None = None
    spacing: tuple | None = None
    unit: str | None = None
    attrs: dict = field(default_factory=dict)
    dataset: str | None = None
    path: str | None = None  # absolute path of the file, folder or Zarr array; None in memory
    spacing_source: str | None = None  # where `spacing` was read, in words
    key: tuple = ()  # identity of the data: the same array given twice has the same key


def _check_array_like(shape, dtype, name: str) -> None:
    if len(shape) not in (2, 3):
        raise GrapesInputError(
            f"{name} has {len(shape)} dimensions (shape {tuple(shape)}): grapes_dask reads 2D images "
            "and 3D volumes; select one channel/time point first (e.g. array[0])"
        )
    dt = np.dtype(dtype)
    if dt.newbyteorder("=") not in SUPPORTED_DTYPES:  # any byte order (converted on reading)
        raise GrapesInputError(
            f"{name} has unsupported dtype {dt}: use an integer or float32/float64 volume "
            "(convert RGB or complex data to a single grey channel first)"
        )
    if 0 in tuple(shape):
        raise GrapesInputError(f"{name} is empty (shape {tuple(shape)}): pass a volume with voxels")


def _is_zarr_dir(p: Path) -> bool:
    return p.is_dir() and any((p / m).exists() for m in ("zarr.json", ".zarray", ".zgroup", ".zattrs"))


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def _split_dataset(text: str, dataset: str | None) -> tuple[str, str | None]:
    """``"scan.h5::/entry/data"`` -> ``("scan.h5", "/entry/data")``; a path that exists as written
    (or holds no ``::``) is left whole."""
    if "::" not in text or os.path.exists(text):
        return text, dataset
    path, inner = text.rsplit("::", 1)
    if not inner.strip("/"):
        raise GrapesInputError(
            f"{text!r} names no dataset after '::': write the dataset's path after it, e.g. 'scan.h5::/entry/data'"
        )
    if dataset is not None and str(dataset).strip("/") != inner.strip("/"):
        raise GrapesInputError(
            f"{text!r} names dataset {inner!r} but {{dataset}} names another: name it once, in the path or "
            "as the option", dataset=dataset,
        )
    return path, inner


def _numpy_key(a: np.ndarray) -> tuple:
    # the same memory seen the same way: the same object, or a view of it with the same layout
    return ("numpy", a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)


def _zarr_location(node) -> str | None:
    """Absolute path of a Zarr array or group in a local store, else None."""
    try:
        from zarr.storage import LocalStore
    except ImportError:  # pragma: no cover - zarr 2
        return None
    if not isinstance(node.store, LocalStore):
        return None
    root = os.path.abspath(str(node.store.root))
    return os.path.join(root, node.path) if node.path else root


def _zarr_key(node) -> tuple:
    loc = _zarr_location(node)
    return ("zarr", os.path.realpath(loc)) if loc else ("zarr-store", str(node.store), node.path)


def _absolute_zarr(node):
    """The same Zarr array or group, reopened on an absolute store path if its local store was
    opened with a relative one (a task on a worker in another working folder would miss it)."""
    try:
        import zarr
        from zarr.storage import LocalStore
    except ImportError:  # pragma: no cover - zarr 2
        return node
    st = node.store
    if isinstance(st, LocalStore) and not os.path.isabs(str(st.root)):
        return zarr.open(store=LocalStore(os.path.abspath(str(st.root)), read_only=True), path=node.path, mode="r")
    return node


def _refuse_dataset(name: str, dataset) -> None:
    if dataset is not None:
        raise GrapesInputError(
            f"{name} is an array, not a file or group: it holds no datasets, so drop {{dataset}}", dataset=dataset
        )


def _refuse_slices_dataset(text: str, dataset) -> None:
    if dataset is not None:
        raise GrapesInputError(
            f"{text!r} is a stack of TIFF slices, which holds one volume: drop {{dataset}}", dataset=dataset
        )


def _resolve(source, dataset: str | None = None, level: int | None = None) -> _Resolved:
    import zarr

    if isinstance(source, Volume) and source._resolved is not None and dataset is None and level is None:
        return source._resolved
    if isinstance(source, da.Array):
        name = f"dask array {source.shape}"
        _refuse_dataset(name, dataset)
        return _Resolved("dask", name, source, native_chunks=source.chunksize, key=("dask", source.name))
    if isinstance(source, np.ndarray):
        name = f"numpy array {source.shape}"
        _refuse_dataset(name, dataset)
        return _Resolved("numpy", name, source, key=_numpy_key(source))
    if isinstance(source, zarr.Array):
        source = _absolute_zarr(source)
        name = f"zarr array {source.store}" + (f"/{source.path}" if source.path else "")
        _refuse_dataset(name, dataset)
        attrs = dict(source.attrs)
        spacing, unit, how = _spacing_from_attrs(attrs, source.ndim)
        return _Resolved("zarr", name, source, native_chunks=source.chunks, attrs=attrs, spacing=spacing,
                         unit=unit, spacing_source=how, path=_zarr_location(source), key=_zarr_key(source))
    if isinstance(source, zarr.Group):
        source = _absolute_zarr(source)
        return _resolve_zarr_group(source, str(source.store), dataset, level)
    if not isinstance(source, (str, os.PathLike)):
        raise GrapesInputError(
            f"cannot read a volume from {type(source).__name__}: pass a path (TIFF, HDF5, Zarr, .npy), "
            "a numpy array or a dask array"
        )
    text, dataset = _split_dataset(os.fspath(source), dataset)
    if _GLOB_CHARS.search(text) and not Path(text).exists():
        files = sorted(_glob.glob(text), key=_natural_key)
        if not files:
            raise GrapesInputError(f"no file matches the pattern {text!r}: check the folder and pattern")
        _refuse_slices_dataset(text, dataset)
        return _resolve_tiff_sequence(files, text, os.path.abspath(text))
    p = Path(os.path.abspath(text))  # absolute: tasks may run on workers in another working folder
    if not p.exists():
        raise GrapesInputError(f"input {text!r} does not exist: check the path")
    if p.is_dir():
        if _is_zarr_dir(p):
            return _resolve_zarr_path(p, text, dataset, level)
        files = sorted((str(f) for f in p.iterdir() if f.suffix.lower() in _TIFF_SUFFIXES), key=_natural_key)
        if not files:
            raise GrapesInputError(
                f"folder {text!r} is neither a Zarr store nor a folder of TIFF slices: "
                "pass a .zarr store, a TIFF/HDF5/.npy file, or a folder of 2D .tif slices"
            )
        _refuse_slices_dataset(text, dataset)
        return _resolve_tiff_sequence(files, text, str(p))
    suffix = p.suffix.lower()
    if suffix in _HDF5_SUFFIXES:
        return _resolve_hdf5(p, text, dataset)
    if dataset is not None:
        raise GrapesInputError(
            f"{text!r} is a {suffix or 'suffix-less'} file, which holds one volume: drop {{dataset}} "
            "(datasets are named in HDF5 files and Zarr groups)", dataset=dataset,
        )
    if suffix in _TIFF_SUFFIXES:
        return _resolve_tiff(p, text, level)
    if suffix == ".npy":
        return _resolve_npy(p, text)
    if suffix == ".zarr":
        return _resolve_zarr_path(p, text, dataset, level)
    raise GrapesInputError(
        f"unsupported file type {suffix or '(no suffix)'!r} for {text!r}: supported are .tif/.tiff, "
        ".h5/.hdf5/.nxs (with a dataset), .npy, .zarr stores and folders or globs of TIFF slices"
    )


def _resolve_zarr_path(p: Path, name: str, dataset, level) -> _Resolved:
    import zarr

    try:
        node = zarr.open(str(p), mode="r")
    except Exception as exc:  # corrupt or unknown store
        raise GrapesInputError(f"cannot open {name!r} as Zarr ({exc}): check that it is a Zarr v2/v3 store") from exc
    if isinstance(node, zarr.Group):
        return _resolve_zarr_group(node, name, dataset, level)
    if dataset:
        raise GrapesInputError(f"{name!r} is a Zarr array, not a group: drop {{dataset}}", dataset=dataset)
    attrs = dict(node.attrs)
    spacing, unit, how = _spacing_from_attrs(attrs, node.ndim)
    return _Resolved("zarr", name, node, native_chunks=tuple(node.chunks), spacing=spacing, unit=unit, attrs=attrs,
                     spacing_source=how, path=str(p), key=_zarr_key(node))


def _ome_multiscales(attrs: dict):
    ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    return ms[0] if ms else None


def _resolve_zarr_group(group, name: str, dataset, level) -> _Resolved:
    import zarr

    attrs = dict(group.attrs)
    ms = _ome_multiscales(attrs)
    spacing = unit = how = None
    if dataset is None and ms is not None:
        datasets = ms.get("datasets", [])
        lvl = 0 if level is None else int(level)
        if not 0 <= lvl < len(datasets):
            raise GrapesInputError(
                f"OME-Zarr {name!r} has {len(datasets)} resolution levels: choose level 0..{len(datasets) - 1}"
            )
        dataset = datasets[lvl]["path"]
        spacing, unit = _ome_scale(ms, datasets[lvl])
        how = "OME-Zarr scale" + (f" of level {lvl}" if lvl else "") if spacing is not None else None
    if dataset is None:
        members = dict(group.arrays())
        arrays = sorted(members)
        if len(arrays) != 1:
            ex = max(arrays, key=lambda k: members[k].size) if arrays else None
            raise GrapesInputError(
                f"Zarr group {name!r} holds {len(arrays)} arrays {arrays}: choose one with {{dataset}}"
                + (f" or in the path, {name + '::' + ex!r}" if arrays else ""),
                dataset=ex,
            )
        dataset = arrays[0]
    try:
        node = group[dataset.strip("/")]
    except KeyError:
        arrays = sorted(k for k, _ in group.arrays())
        raise GrapesInputError(
            f"Zarr group {name!r} has no array {dataset!r}: available arrays are {arrays}"
        ) from None
    if not isinstance(node, zarr.Array):
        return _resolve_zarr_group(node, f"{name}/{dataset.strip('/')}", None, level)
    a_attrs = dict(node.attrs)
    if spacing is None:
        spacing, unit, how = _spacing_from_attrs(a_attrs, node.ndim)
    merged = {**attrs, **a_attrs}
    arr, chunks = node, tuple(node.chunks)
    n_lead = node.ndim - 3
    full = f"{name}/{dataset.strip('/')}"
    if n_lead > 0 and all(n == 1 for n in node.shape[:n_lead]):
        # OME-NGFF images are (t, c, z, y, x); a single time point and channel is a volume
        arr, chunks = _SqueezedZarr(node, full, n_lead), chunks[n_lead:]
    return _Resolved("ome-zarr" if ms else "zarr", full, arr, native_chunks=chunks,
                     spacing=spacing, unit=unit, attrs=merged, dataset=dataset, spacing_source=how,
                     path=_zarr_location(node), key=_zarr_key(node))


def _ome_scale(ms: dict, ds: dict):
    axes = ms.get("axes") or []
    scale = None
    for t in ds.get("coordinateTransformations", []) + ms.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            s = np.asarray(t["scale"], dtype=float)
            scale = s if scale is None else scale * s
    if scale is None:
        return None, None
    if axes and isinstance(axes[0], dict):
        keep = [i for i, a in enumerate(axes) if a.get("type", "space") == "space"]
        units = {axes[i].get("unit") for i in keep}
        unit = units.pop() if len(units) == 1 else None
    else:
        keep, unit = list(range(len(scale)))[-3:], None
    return tuple(float(scale[i]) for i in keep), unit


def _spacing_from_attrs(attrs: dict, ndim: int):
    sp = attrs.get("spacing")
    if sp is not None and len(sp) == ndim:
        return tuple(float(s) for s in sp), attrs.get("unit"), "Zarr attribute 'spacing'"
    return None, None, None


def _resolve_tiff(p: Path, name: str, level) -> _Resolved:
    import tifffile

    try:
        tf = tifffile.TiffFile(str(p))
    except Exception as exc:
        raise GrapesInputError(f"cannot read {name!r} as TIFF ({exc}): check that the file is a complete TIFF") from exc
    with tf:
        series = tf.series[0]
        lvl = 0 if level is None else int(level)
        if lvl >= len(series.levels):
            raise GrapesInputError(f"TIFF {name!r} has {len(series.levels)} levels: choose 0..{len(series.levels) - 1}")
        s = series.levels[lvl]
        shape, axes, dtype = tuple(s.shape), s.axes, s.dtype
        if "S" in axes and shape[axes.index("S")] > 1:
            raise GrapesInputError(
                f"TIFF {name!r} has {shape[axes.index('S')]} samples per pixel (RGB): convert it to one grey channel first"
            )
        # drop singleton axes (time, channel, ...) only down to 3D: a TIFF that records a
        # (1, Y, X) or (Z, 1, X) volume is still a 3D volume
        squeeze = tuple(i for i, n in enumerate(shape) if n == 1 and len(shape) > 3)
        squeeze = squeeze[: max(0, len(shape) - 3)]
        kept = tuple(n for i, n in enumerate(shape) if i not in squeeze)
        _check_array_like(kept, dtype, f"TIFF {name!r}")
        spacing, unit, how = _tiff_spacing(tf, len(kept))
        page = tf.pages.first
        native = (1,) * (len(kept) - 2) + tuple(page.shape[-2:]) if len(kept) >= 2 else None
    src = _TiffSource(str(p), kept, dtype, series=0, level=lvl, squeeze_axes=squeeze)
    return _Resolved("tiff", name, src, native_chunks=native, spacing=spacing, unit=unit, spacing_source=how,
                     path=str(p), key=("tiff", os.path.realpath(p), lvl))


_UNIT_TO_UM = {
    "um": 1.0, "µm": 1.0, "μm": 1.0, "\\u00b5m": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0,
    "micrometre": 1.0, "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3, "mm": 1e3, "millimeter": 1e3,
    "millimetre": 1e3, "cm": 1e4, "centimeter": 1e4, "centimetre": 1e4, "m": 1e6, "meter": 1e6, "metre": 1e6,
    "in": 25400.0, "inch": 25400.0, "å": 1e-4, "angstrom": 1e-4,
}

#: Print resolutions (dots per inch) that image software writes into TIFF resolution tags. A
#: centimetre tag equal to one of these (e.g. 28.3465 px/cm, 72 dpi) is a print resolution too.
_PRINT_DPI = (72, 96, 150, 200, 300, 600, 1200)


def _unit_factor(unit) -> float | None:
    """Micrometres per `unit`, or None for an unknown or missing unit."""
    return None if unit is None else _UNIT_TO_UM.get(str(unit).strip().lower())


def _is_print_resolution(px_per_cm: float) -> bool:
    return any(abs(px_per_cm * 2.54 - d) <= 1e-4 * d for d in _PRINT_DPI)


def _tiff_spacing(tf, ndim: int):
    """Voxel size (z, y, x), its unit and where it was read, or ``(None, None, None)``.

    The rule (micro-CT voxels are micrometres, never inches):

    1. OME-TIFF ``PhysicalSizeX/Y(/Z)`` in any known unit: taken, in micrometres.
    2. ImageJ metadata with a length ``unit`` (not ``inch``, not ``pixel``): the resolution tags in
       that unit and ImageJ's ``spacing`` for z, in micrometres. ImageJ labels the dots per inch
       of an image it did not calibrate ``inch``: a print resolution, not taken.
    3. Plain resolution tags: taken only with ``ResolutionUnit`` centimetre, and not when the value
       is a common print resolution (72, 96, 150, 200, 300, 600, 1200 dpi) in pixels per cm.
       ``ResolutionUnit`` inch (or absent, whose TIFF default is inch) is what image software
       writes (72 dpi would read as 352.8 um voxels); ``ResolutionUnit`` none is an aspect ratio.

    Tags and ImageJ metadata without ``spacing`` hold no z size: z is then taken equal to y,
    which the returned source says.
    """
    def with_z(yx, z, how):
        if ndim == 2:
            return yx, how
        if z is None:
            return (yx[0],) + yx, how + ", z taken equal to y"
        return (z,) + yx, how

    if tf.is_ome and tf.ome_metadata:
        m = {k: float(v) for k, v in re.findall(r'PhysicalSize([XYZ])="([0-9.eE+-]+)"', tf.ome_metadata)}
        u = dict(re.findall(r'PhysicalSize([XYZ])Unit="([^"]+)"', tf.ome_metadata))
        f = {ax: _unit_factor(u.get(ax, "µm")) for ax in "XYZ"}
        if "X" in m and "Y" in m and f["X"] and f["Y"]:
            yx = (m["Y"] * f["Y"], m["X"] * f["X"])
            z = m["Z"] * f["Z"] if "Z" in m and f["Z"] else None
            sp, how = with_z(yx, z, "OME-TIFF PhysicalSize")
            return sp, "micrometer", how
    page = tf.pages.first
    tags = page.tags
    xr, yr = tags.get("XResolution"), tags.get("YResolution")
    if xr is None or yr is None:
        return None, None, None
    xres = xr.value[0] / xr.value[1] if xr.value[1] else 0
    yres = yr.value[0] / yr.value[1] if yr.value[1] else 0
    if not xres or not yres:
        return None, None, None
    ij = tf.imagej_metadata or {}
    unit = str(ij.get("unit", "")).strip()
    if ij and unit:
        if unit.lower() in ("inch", "in", "pixel", "pixels"):
            return None, None, None
        factor = _unit_factor(unit)
        if factor is None:  # a unit we do not know: the values in that unit
            if xres == 1 and yres == 1:
                return None, None, None
            factor, unit_out = 1.0, unit
        else:
            unit_out = "micrometer"
        z = ij.get("spacing")
        sp, how = with_z((factor / yres, factor / xres), float(z) * factor if z else None, "ImageJ metadata")
        return sp, unit_out, how
    runit = tags.get("ResolutionUnit")
    runit = int(runit.value) if runit is not None else 2  # the TIFF default is inch
    if runit != 3 or (xres == 1 and yres == 1) or (_is_print_resolution(xres) and _is_print_resolution(yres)):
        return None, None, None
    sp, how = with_z((1e4 / yres, 1e4 / xres), None, "TIFF resolution tags (cm)")
    return sp, "micrometer", how


def _slice_header(path: str):
    """``(shape, dtype, None)`` of a TIFF file from its header (no pixel is read), or
    ``(None, None, reason)`` when it cannot be read as TIFF."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages.first
            n = len(tf.pages)
            shape = tuple(page.shape) if n == 1 else (n,) + tuple(page.shape)
            dtype = np.dtype(page.dtype)
    except Exception as exc:
        return None, None, f"not a readable TIFF: {exc}"
    if len(shape) > 2:  # singleton axes (a 1-page stack, one sample per pixel) do not count
        shape = tuple(k for k in shape if k != 1) or shape
    return shape, dtype, None


def _odd_slices_message(name: str, files: list[str], headers: list, shape, dtype) -> str:
    odd = [(f, h) for f, h in zip(files, headers) if (h[0], h[1]) != (shape, dtype)]
    shown = [
        f"{os.path.basename(f)!r} ({h[2]})" if h[0] is None else f"{os.path.basename(f)!r} ({h[0]}, {h[1]})"
        for f, h in odd[:10]
    ] + ([f"and {len(odd) - 10} more"] if len(odd) > 10 else [])
    good = [os.path.basename(f) for f, h in zip(files, headers) if (h[0], h[1]) == (shape, dtype)]
    hint, them = "", "it" if len(odd) == 1 else "them"
    stem = os.path.commonprefix(good).rstrip("0123456789")
    suffixes = {os.path.splitext(g)[1] for g in good}
    if stem and len(suffixes) == 1:
        pattern = stem + "*" + suffixes.pop()
        import fnmatch

        if not any(fnmatch.fnmatch(os.path.basename(f), pattern) for f, _ in odd):
            hint = f" (e.g. {os.path.join(os.path.dirname(files[0]), pattern)!r})"
    return (
        f"{len(good)} of the {len(files)} TIFF files of {name!r} are slices of shape {shape} and dtype {dtype}, "
        f"but {len(odd)} {'is' if len(odd) == 1 else 'are'} not: {', '.join(shown)}; every file of a stack must "
        f"be one slice of the same shape and dtype: remove {them} or use a glob that excludes {them}{hint}"
    )


def _resolve_tiff_sequence(files: list[str], name: str, path: str) -> _Resolved:
    import tifffile

    files = [os.path.abspath(f) for f in files]
    # every header (shape and dtype, no pixel data: about 0.5 ms a file), so that a stray file is
    # named now rather than found by the one task that reads it
    headers = [_slice_header(f) for f in files]
    counts: dict = {}
    for h in headers:
        if h[0] is not None:
            counts[(h[0], h[1])] = counts.get((h[0], h[1]), 0) + 1
    if not counts:
        raise GrapesInputError(
            f"no file of {name!r} can be read as TIFF (first: {os.path.basename(files[0])!r}, {headers[0][2]}): "
            "pass a folder or glob of 2D TIFF slices"
        )
    shape, dtype = max(counts, key=counts.get)  # the most common; on a tie, the first file's
    if len(shape) != 2:
        raise GrapesInputError(
            f"the slices of {name!r} are not 2D (they have shape {shape}): a folder or glob must hold one "
            "2D image per file"
        )
    if counts[(shape, dtype)] != len(files):
        raise GrapesInputError(_odd_slices_message(name, files, headers, shape, dtype))
    full = (len(files),) + shape
    _check_array_like(full, dtype, f"TIFF stack {name!r}")
    try:
        with tifffile.TiffFile(files[0]) as tf:
            spacing, unit, how = _tiff_spacing(tf, 2)
    except Exception as exc:  # pragma: no cover - its header was just read
        raise GrapesInputError(f"cannot read the first slice {files[0]!r} as TIFF ({exc})") from exc
    if spacing is not None:
        spacing = (spacing[0],) + tuple(spacing)  # slices hold no z size: z taken equal to y
        how = f"{how} of the first slice, z taken equal to y"
    src = _TiffSequenceSource(files, full, dtype)
    return _Resolved("tiff-sequence", name, src, native_chunks=(1,) + shape, spacing=spacing, unit=unit,
                     spacing_source=how, path=path, key=("tiff-sequence", tuple(os.path.realpath(f) for f in files)))


def _h5_candidates(f) -> list[str]:
    import h5py

    out = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.ndim in (2, 3) and obj.size > 1:
            out.append("/" + name)

    f.visititems(visit)
    return out


def _nexus_default(f) -> str | None:
    """Follow NeXus ``default`` / ``signal`` attributes to the plottable dataset, if any."""
    node, path = f, ""
    for _ in range(4):
        d = node.attrs.get("default")
        if d is None:
            break
        d = d.decode() if isinstance(d, bytes) else str(d)
        path = f"{path}/{d}"
        if path not in f:
            return None
        node = f[path]
    sig = node.attrs.get("signal") if hasattr(node, "attrs") else None
    if sig is not None:
        sig = sig.decode() if isinstance(sig, bytes) else str(sig)
        full = f"{path}/{sig}"
        return full if full in f else None
    return None


def _hdf5_spacing(ds):
    """Voxel size from a ``spacing`` or ``element_size_um`` attribute of the dataset or, failing
    that, of the nearest group above it that has one (some files keep it on the file or the
    NeXus group). Returns ``(spacing, unit, source)``."""
    node = ds
    while True:
        for k in ("spacing", "element_size_um"):
            v = node.attrs.get(k)
            if v is None or np.size(v) != ds.ndim:
                continue
            try:
                sp = tuple(float(s) for s in np.ravel(v))
            except (TypeError, ValueError):
                continue
            if not all(np.isfinite(s) and s > 0 for s in sp):
                continue
            if k == "element_size_um":
                unit = "micrometer"
            else:
                unit = node.attrs.get("unit")
                unit = unit.decode() if isinstance(unit, bytes) else (None if unit is None else str(unit))
            where = "" if node is ds else f" of {'the file' if node.name == '/' else 'group ' + node.name}"
            return sp, unit, f"HDF5 attribute {k!r}{where}"
        if node.name == "/":
            return None, None, None
        node = node.parent


def _resolve_hdf5(p: Path, name: str, dataset) -> _Resolved:
    import h5py

    try:
        f = h5py.File(str(p), "r")
    except Exception as exc:
        raise GrapesInputError(f"cannot open {name!r} as HDF5 ({exc}): check that the file is complete") from exc
    with f:
        if dataset is None:
            dataset = _nexus_default(f)
        if dataset is None:
            cands = _h5_candidates(f)
            if len(cands) != 1:
                # the example is the largest (a scan rather than its dark or flat fields)
                ex = max(cands, key=lambda c: f[c].size) if cands else None
                raise GrapesInputError(
                    f"HDF5 file {name!r} holds {len(cands)} 2D/3D datasets {cands[:20]}: choose one with {{dataset}}"
                    + (f" or in the path, {name + '::' + ex!r}" if cands else ""),
                    dataset=ex,
                )
            dataset = cands[0]
        if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
            raise GrapesInputError(
                f"HDF5 file {name!r} has no dataset {dataset!r}: available 2D/3D datasets are {_h5_candidates(f)[:20]}"
            )
        ds = f[dataset]
        _check_array_like(ds.shape, ds.dtype, f"dataset {dataset!r} of {name!r}")
        dataset = ds.name  # absolute, e.g. "/exchange/data"
        spacing, unit, how = _hdf5_spacing(ds)
        native = ds.chunks
        src = _Hdf5Source(str(p), dataset, ds.shape, ds.dtype)
    return _Resolved("hdf5", f"{name}::{dataset}", src, native_chunks=native, spacing=spacing, unit=unit,
                     dataset=dataset, spacing_source=how, path=str(p),
                     key=("hdf5", os.path.realpath(p), dataset))


def _resolve_npy(p: Path, name: str) -> _Resolved:
    try:
        mm = np.load(str(p), mmap_mode="r")
    except Exception as exc:
        raise GrapesInputError(f"cannot read {name!r} as .npy ({exc}): save it with numpy.save") from exc
    _check_array_like(mm.shape, mm.dtype, f".npy file {name!r}")
    return _Resolved("npy", name, _NpySource(str(p), mm.shape, mm.dtype), path=str(p), key=("npy", os.path.realpath(p)))


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
        return da.from_zarr(arr, chunks=c)
    c = _normalize_chunks(chunks, arr.shape, default=r.native_chunks if isinstance(arr, _SqueezedZarr) else None)
    if isinstance(arr, np.ndarray):
        return da.from_array(arr, chunks=c)
    name = "open-" + dask.base.tokenize(arr.token(), c)
    return da.from_array(arr, chunks=c, name=name, asarray=False, fancy=False, lock=False,
                         meta=np.empty((0,) * arr.ndim, dtype=arr.dtype))


def _make_reader(r: _Resolved):
    """What tasks read blocks of `r` from directly: a picklable ``reader[slices] -> numpy``.

    The numpy array itself, a Zarr array (or the faster :class:`_DirectZarrReader` of a local
    Zarr v3 array) or a :class:`_LazySource` that opens its file inside the task; None for a dask
    array (its blocks come from its own graph). Reading a region directly avoids building it from
    dask chunks (getitem + concatenate), which cost several times the decompression itself.
    """
    import zarr

    arr = r.array
    if isinstance(arr, np.ndarray):
        return arr
    if isinstance(arr, zarr.Array):
        return direct_reader(arr) or arr
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
            f"({'z y x' if ndim == 3 else 'y x'}) or one for every axis", spacing=spacing,
        )
    return values


def _same_size(a: Volume, b: Volume) -> bool:
    fa, fb = _unit_factor(a.unit), _unit_factor(b.unit)
    x = np.asarray(a.spacing, float) * (fa if fa and fb else 1.0)
    y = np.asarray(b.spacing, float) * (fb if fa and fb else 1.0)
    return x.shape == y.shape and bool(np.all(np.abs(x - y) <= 1e-6 * np.maximum(np.abs(x), np.abs(y))))


def settle_spacing(volumes: dict, spacing=None) -> tuple[tuple[float, ...], str, str | None]:
    """The voxel size of an analysis of several volumes, and where it came from.

    Parameters
    ----------
    volumes : dict of str to Volume
        Role (``"labels"``, ``"grey"``) to volume, all of one shape, in order of precedence.
    spacing : float or sequence of float, optional
        The voxel size the user gave: it settles the question (checked by :func:`check_spacing`).

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
    if spacing is not None:
        return check_spacing(spacing, ndim), "given", None
    known = [(role, v) for role, v in vols if v.spacing is not None and len(v.spacing) == ndim]
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
    :func:`_tiff_spacing`), OME-Zarr ``scale`` transformations, the ``spacing`` attribute written
    by :func:`convert`, or HDF5 ``spacing``/``element_size_um`` attributes (of the dataset or a
    group above it). TIFF values are in micrometres. `level` selects the resolution level of an
    OME-Zarr image (default 0). :attr:`Volume.spacing_source` says which one was used.
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
        spacing, unit, how = check_spacing(spacing, len(shape)), unit or r.unit, "given"
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
