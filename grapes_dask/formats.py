"""Per-format readers: lazy file-backed sources and the resolution of a source to one of them.

Everything here reads; nothing writes. :mod:`grapes_dask.io` builds its public layer
(:class:`~grapes_dask.io.Volume`, :func:`~grapes_dask.io.resolve_volume`,
:func:`~grapes_dask.io.open_volume`, :func:`~grapes_dask.io.convert`, ...) on top of it.

Lazy file-backed sources (picklable: they hold paths and metadata, and every process or thread
opens its own handle inside the task that reads):

============================  ================================================================
:class:`_LazySource`          base: absolute path, shape, dtype, ``token()`` identity
:class:`_TiffSource`          one multi-page TIFF, through tifffile's Zarr store
:class:`_TiffSequenceSource`  a stack of 2D TIFF slices, one file per z
:class:`_Hdf5Source`          an HDF5 dataset, opened and closed for every read
:class:`_NpySource`           a memory-mapped ``.npy`` file
:class:`_SqueezedZarr`        a Zarr array without its leading singleton axes (OME-NGFF t, c)
:func:`direct_reader`         a :class:`_DirectZarrReader` that decodes the chunk files of a
                              local Zarr v3 array in the calling thread (the layouts we write)
============================  ================================================================

Resolution (:func:`_resolve`): a path (with an optional ``::dataset``), a glob, a numpy, dask
or Zarr array or a Zarr group becomes a :class:`_Resolved` record (kind, name, array or lazy
source, native chunks, voxel size and where it was read, attributes, absolute path, identity
key), checked to be 2D or 3D of a :data:`SUPPORTED_DTYPES` dtype before any voxel is read. One
resolver per format: :func:`_resolve_zarr_path` and :func:`_resolve_zarr_group` (OME-Zarr
multiscales, :func:`_ome_scale`), :func:`_resolve_tiff` (voxel size by :func:`_tiff_spacing`),
:func:`_resolve_tiff_sequence` (every slice header read, stray files named),
:func:`_resolve_hdf5` (NeXus ``default``/``signal``, :func:`_hdf5_spacing`) and
:func:`_resolve_npy`. Length units are converted to micrometres by
:func:`grapes_dask.units.unit_factor`.

Errors are :class:`~grapes_dask.GrapesInputError`. This module does not import
:mod:`grapes_dask.io`: an already resolved :class:`~grapes_dask.io.Volume` is handled there.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import dask.array as da
import numpy as np

from ._errors import Alt, GrapesDataError, GrapesInputError
from .units import tidy_number, unit_factor

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

    def __init__(self, path: str, shape: tuple, dtype: np.dtype, name: str | None = None):
        # absolute, so that a worker started in another working folder finds the file
        self.path = os.path.abspath(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.name = name or path  # the input as the user gave it, for messages

    def token(self) -> tuple:
        return (type(self).__name__, _file_key(self.path), self.shape, str(self.dtype))

    def __getitem__(self, key):  # pragma: no cover - abstract
        raise NotImplementedError


class _TiffSource(_LazySource):
    kind = "tiff"

    def __init__(self, path, shape, dtype, series: int = 0, level: int = 0, squeeze_axes=(), name=None):
        super().__init__(path, shape, dtype, name)
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
        full = key if isinstance(key, tuple) else (key,)
        if self.squeeze_axes:  # re-insert the singleton axes dropped from `shape`
            full = list(full)
            for ax in self.squeeze_axes:
                full.insert(ax, 0)
            full = tuple(full)
        return _read_named(arr, full, self.name, lambda idx: self.path, what="TIFF file")


class _TiffSequenceSource(_LazySource):
    kind = "tiff-sequence"

    def __init__(self, files: Sequence[str], shape, dtype, name=None):
        super().__init__(files[0], shape, dtype, name)
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
            try:
                page = tifffile.imread(self.files[z])
            except MemoryError:
                raise
            except Exception as exc:  # a slice truncated or overwritten since the stack was opened
                raise chunk_error(self.name, (z, 0, 0), self.files[z], f"cannot be read as TIFF ({exc})",
                                  what="slice", kind="unreadable" if isinstance(exc, OSError) else "damaged") from exc
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

    def __init__(self, path, dataset: str, shape, dtype, name=None):
        super().__init__(path, shape, dtype, name)
        self.dataset = dataset

    def token(self):
        return super().token() + (self.dataset,)

    def __getitem__(self, key):
        import h5py

        # Opened and closed for every read (about a millisecond): a handle cached for the life
        # of the thread would keep the file open, and HDF5 then refuses to rewrite or append to
        # it anywhere in this process ("file is already open for read-only").
        try:
            f = h5py.File(self.path, "r")
        except OSError as exc:  # truncated or overwritten since it was opened
            raise GrapesDataError(
                f"{self.name!r} cannot be opened any more ({exc}): the HDF5 file {self.path} was damaged or replaced "
                "since the analysis started; restore it from a copy", array=self.name, path=self.path) from exc
        with f:
            ds = f[self.dataset]
            return _read_named(ds, key if isinstance(key, tuple) else (key,), self.name, lambda idx: self.path,
                               what="HDF5 file", chunks=ds.chunks)


class _NpySource(_LazySource):
    kind = "npy"

    def __getitem__(self, key):
        mm = _cached_handle(("npy",) + self.token(), lambda: (np.load(self.path, mmap_mode="r"), lambda: None))
        return np.array(mm[key])


class _SqueezedZarr(_LazySource):
    """A Zarr array read without its leading singleton axes (OME-NGFF t and c of size 1)."""

    kind = "zarr"

    def __init__(self, array, name: str, n_lead: int):
        super().__init__(name, array.shape[n_lead:], array.dtype, name)
        self.array = array
        self.n_lead = n_lead

    def token(self) -> tuple:
        return (type(self).__name__, self.path, str(self.array.store), self.shape, str(self.dtype))

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        return _read_zarr(self.array, (0,) * self.n_lead + key, self.name)


class _DirectZarrReader:
    """Reads regions of a local Zarr v3 array by decoding its chunk files in the calling thread.

    zarr-python 3 funnels every read through one event loop: two threads reading at once took
    twice as long as one after the other (measured, 385^3 uint16 blocks), while decoding the
    chunk files here with numcodecs' Blosc (which releases the GIL) runs them in parallel, about
    3x faster with two threads. Only the layouts we write are handled (regular grid, default
    chunk keys, ``bytes`` + optional ``blosc`` or ``zstd`` codec, no sharding); :func:`direct_reader`
    returns None for anything else, and the caller reads through zarr.
    """

    def __init__(self, root: str, shape, chunks, dtype, fill, sep: str, codec: str | None, name: str | None = None):
        self.root, self.shape, self.chunks = root, tuple(shape), tuple(chunks)
        self.dtype, self.fill, self.sep, self.codec = np.dtype(dtype), fill, sep, codec
        self.ndim = len(self.shape)
        self.name = name or root  # the input as the user gave it, for messages

    def chunk_path(self, idx) -> str:
        """Absolute path of the file of chunk `idx` (a tuple of chunk-grid indices)."""
        if self.sep == "/":
            return os.path.join(self.root, "c", *map(str, idx))
        return os.path.join(self.root, "c" + self.sep + self.sep.join(map(str, idx)))

    def _chunk(self, idx):
        """Chunk `idx` decoded (shape `chunks`), or None when its file does not exist (fill value).

        Raises :class:`~grapes_dask.GrapesDataError` naming the array, the chunk and its file
        when the file cannot be read, does not decode, or decodes to another size.
        """
        path = self.chunk_path(idx)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:  # a folder, no permission, an I/O error of the disk
            raise chunk_error(self.name, idx, path, f"cannot be read ({exc.strerror or exc})",
                              kind="unreadable") from exc
        stored = len(raw)
        if not stored:
            raise chunk_error(self.name, idx, path, "is empty (0 bytes)")
        try:
            if self.codec == "blosc":
                from numcodecs import Blosc

                raw = Blosc().decode(raw)
            elif self.codec == "zstd":
                from numcodecs import Zstd

                raw = Zstd().decode(raw)
        except MemoryError:
            raise
        except Exception as exc:  # numcodecs raises RuntimeError (blosc), ValueError or its own (zstd)
            raise chunk_error(self.name, idx, path, f"({stored} bytes) does not decode as {self.codec}: {exc}") from exc
        expected = int(np.prod(self.chunks)) * self.dtype.itemsize
        if len(raw) != expected:
            how = f"decodes to {len(raw)} bytes" if self.codec else f"holds {len(raw)} bytes"
            raise chunk_error(self.name, idx, path,
                              f"{how}, not the {expected} of a {self.chunks} chunk of {self.dtype.newbyteorder('=')}")
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


def direct_reader(array, name: str | None = None):
    """A :class:`_DirectZarrReader` for a local Zarr v3 array of a simple layout, else None.

    `name` is the array as the user gave it (a path), for the messages of damaged chunks.
    """
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
                                 m.chunk_key_encoding.separator, codecs[tuple(names)], name=name)
    except Exception:  # any layout we do not know: let zarr read it
        return None


class _ZarrReader:
    """A Zarr array read through zarr-python, naming the chunk and file of any damaged chunk.

    For the layouts :class:`_DirectZarrReader` does not decode itself (Zarr v2, sharding, other
    codecs, remote stores). Picklable as the Zarr array is; ``chunks`` is the array's.
    """

    def __init__(self, array, name: str):
        self.array, self.name = array, name
        self.shape, self.dtype, self.ndim = tuple(array.shape), np.dtype(array.dtype), array.ndim
        self.chunks = tuple(array.chunks)

    def __getitem__(self, key):
        return _read_zarr(self.array, key if isinstance(key, tuple) else (key,), self.name)


# --------------------------------------------------------------------------------------------
# damaged data: the chunk and the file named
# --------------------------------------------------------------------------------------------


def _shell(text: str) -> str:
    import shlex

    return shlex.quote(str(text))


def chunk_error(name: str, idx, path: str | None, problem: str, *, what: str = "chunk", kind: str = "damaged",
                zarr: bool = True) -> GrapesDataError:
    """The error for one damaged or unreadable chunk (or slice, or shard) of an input.

    Parameters
    ----------
    name : str
        The input as the user gave it.
    idx : tuple of int
        Index of the chunk in the chunk grid (or ``(z, 0, 0)`` for slice ``z`` of a TIFF stack).
    path : str or None
        Absolute path of the file that holds it.
    problem : str
        What is wrong with the file, continuing "its file PATH ...".
    what : str
        ``"chunk"``, ``"shard"`` or ``"slice"``.
    kind : str
        ``"damaged"`` (the bytes are wrong) or ``"unreadable"`` (the file cannot be opened).
    zarr : bool
        Whether the input is a Zarr store (the fix then writes the store again).

    Returns
    -------
    GrapesDataError
    """
    idx = tuple(int(i) for i in idx)
    label = f"slice {idx[0]}" if what == "slice" else f"{what} {idx}"
    holder = f"its file {path}" if path else "its data"
    if kind == "unreadable":
        first = "Check that file (a readable file, on a working disk) or restore it"
    else:
        first = f"Restore that file (or the whole {'store' if zarr else 'file'}) from a copy"
    if zarr:
        again = "write the store again from its source ({fix})"
        fix = Alt(f"grapes_dask.io.convert(SOURCE, {name!r}, overwrite=True)",
                  f"grapes-dask convert SOURCE {_shell(name)} --overwrite")
    else:
        again, fix = "export it again from its source", None
    check = Alt(f"grapes_dask.io.check_chunks({name!r})", f"grapes-dask info --check {_shell(name)}")
    options = {"check": check} if fix is None else {"fix": fix, "check": check}
    return GrapesDataError(
        f"{label} of {name!r} is {kind}: {holder} {problem}. {first}, or {again}; {{check}} lists every "
        "damaged chunk", array=name, chunk=idx, path=path, detail=problem, **options)


def _region(key: tuple, shape: tuple):
    """``[(lo, hi), ...]`` of a key of ints and contiguous slices (missing axes whole), else None."""
    if key == (Ellipsis,):
        key = ()
    if len(key) > len(shape):
        return None
    out = []
    for k, n in zip(key + (slice(None),) * (len(shape) - len(key)), shape):
        if isinstance(k, (int, np.integer)):
            k = int(k) + n if k < 0 else int(k)
            out.append((k, k + 1))
        elif isinstance(k, slice) and k.indices(n)[2] == 1:
            a, b, _ = k.indices(n)
            out.append((a, max(a, b)))
        else:
            return None
    return out


def _chunks_in(region, chunks):
    """Chunk-grid indices of the chunks that `region` meets, in C order."""
    ranges = [range(a // c, (b - 1) // c + 1) if b > a else range(0) for (a, b), c in zip(region, chunks)]
    for idx in np.ndindex(*[len(r) for r in ranges]):
        yield tuple(r[i] for r, i in zip(ranges, idx))


def _locate(read, region, chunks):
    """The first chunk of `region` whose own read fails, as ``(index, exception)``, or None."""
    for idx in _chunks_in(region, chunks):
        sl = tuple(slice(max(a, i * c), min(b, (i + 1) * c)) for (a, b), c, i in zip(region, chunks, idx))
        try:
            read(sl)
        except MemoryError:
            raise
        except Exception as exc:
            return idx, exc
    return None


def _read_named(arr, key: tuple, name: str, path_of, what: str, chunks=None):
    """``arr[key]`` of a TIFF or HDF5 file; a failure names the chunk (when the file has a chunk
    grid) and the file."""
    try:
        return np.asarray(arr[key])
    except MemoryError:
        raise
    except Exception as exc:
        chunks = chunks or getattr(arr, "chunks", None)
        region = _region(key, arr.shape)
        ok_chunks = isinstance(chunks, tuple) and all(isinstance(c, (int, np.integer)) for c in chunks)
        found = _locate(lambda sl: arr[sl], region, chunks) if region and ok_chunks else None
        if found is not None:
            idx, err = found
            raise chunk_error(name, idx, path_of(idx), f"holds data that cannot be decoded ({err})",
                              zarr=False) from exc
        span = ", ".join(f"{a}:{b}" for a, b in region) if region else str(key)
        raise GrapesDataError(
            f"reading voxels [{span}] of {name!r} failed ({exc}): the {what} {path_of(None)} is probably damaged; "
            "restore it from a copy or export it again from its source", array=name, path=path_of(None),
        ) from exc


def _zarr_file(array, obj) -> str | None:
    """Absolute path of the stored object (chunk, or shard of a sharded array) at grid index
    `obj`; None for a store that is not a local folder."""
    root = _zarr_location(array)
    if root is None:
        return None
    try:
        return os.path.join(root, *array.metadata.encode_chunk_key(tuple(obj)).split("/"))
    except Exception:  # pragma: no cover - metadata without chunk keys
        return None


def _read_zarr(array, key: tuple, name: str):
    """``array[key]`` through zarr-python; a damaged chunk stops the read with its index and file.

    zarr reads an empty (0-byte) shard file as a missing shard, that is as the fill value: in a
    local store the stored files of the region are checked for that first (one ``stat`` each).
    """
    region = _region(key, array.shape)
    shards = getattr(array, "shards", None)
    grid = tuple(shards or array.chunks)
    if region is not None and _zarr_location(array) is not None:
        for obj in _chunks_in(region, grid):
            path = _zarr_file(array, obj)
            with contextlib.suppress(OSError):
                if path is not None and os.path.getsize(path) == 0 and os.path.isfile(path):
                    raise chunk_error(name, obj, path, "is empty (0 bytes)", what="shard" if shards else "chunk")
    try:
        return np.asarray(array[key])
    except MemoryError:
        raise
    except Exception as exc:
        found = _locate(lambda sl: array[sl], region, tuple(array.chunks)) if region is not None else None
        if found is None:
            raise  # no chunk fails on its own: not a damaged chunk, the error as it is
        idx, err = found
        obj = tuple(i * c // g for i, c, g in zip(idx, array.chunks, grid))
        path = _zarr_file(array, obj)
        facts = [f"shard {obj}"] if shards else []
        with contextlib.suppress(OSError, TypeError):
            facts.append(f"{os.path.getsize(path)} bytes")
        facts = f"({', '.join(facts)}) " if facts else ""
        if isinstance(err, OSError):
            raise chunk_error(name, idx, path, f"{facts}cannot be read ({err})", kind="unreadable") from exc
        raise chunk_error(name, idx, path, f"{facts}does not decode ({type(err).__name__}: {err})") from exc


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


def _choose_one(what: str, kind: str, name: str, sizes: dict) -> GrapesInputError:
    """The error for a container holding zero or several arrays: lists them and, as the example,
    names the largest (a scan rather than its dark or flat fields)."""
    names = list(sizes)
    ex = max(names, key=sizes.get) if names else None
    return GrapesInputError(
        f"{what} holds {len(names)} {kind} {names[:20]}: choose one with {{dataset}}"
        + (f" or in the path, {name + '::' + ex!r}" if names else ""),
        dataset=ex,
    )


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
            raise _choose_one(f"Zarr group {name!r}", "arrays", name, {k: members[k].size for k in arrays})
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
    src = _TiffSource(str(p), kept, dtype, series=0, level=lvl, squeeze_axes=squeeze, name=name)
    return _Resolved("tiff", name, src, native_chunks=native, spacing=spacing, unit=unit, spacing_source=how,
                     path=str(p), key=("tiff", os.path.realpath(p), lvl))


#: Print resolutions (dots per inch) that image software writes into TIFF resolution tags. A
#: centimetre tag equal to one of these (e.g. 28.3465 px/cm, 72 dpi) is a print resolution too.
_PRINT_DPI = (72, 96, 150, 200, 300, 600, 1200)


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
        f = {ax: unit_factor(u.get(ax, "µm")) for ax in "XYZ"}
        if "X" in m and "Y" in m and f["X"] and f["Y"]:
            yx = (tidy_number(m["Y"] * f["Y"]), tidy_number(m["X"] * f["X"]))
            z = tidy_number(m["Z"] * f["Z"]) if "Z" in m and f["Z"] else None
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
    # the voxel edge is den / num of the rational tag: 13 / 40 gives 0.325, where 1 / (40 / 13)
    # gives 0.32499999999999996; 7 significant digits are more than any calibration holds
    xsize, ysize = (tidy_number(v[1] / v[0], 7) for v in (xr.value, yr.value))
    ij = tf.imagej_metadata or {}
    unit = str(ij.get("unit", "")).strip()
    if ij and unit:
        if unit.lower() in ("inch", "in", "pixel", "pixels"):
            return None, None, None
        factor = unit_factor(unit)
        if factor is None:  # a unit we do not know: the values in that unit
            if xres == 1 and yres == 1:
                return None, None, None
            factor, unit_out = 1.0, unit
        else:
            unit_out = "micrometer"
        z = ij.get("spacing")
        sp, how = with_z((tidy_number(factor * ysize), tidy_number(factor * xsize)), tidy_number(float(z) * factor) if z else None,
                         "ImageJ metadata")
        return sp, unit_out, how
    runit = tags.get("ResolutionUnit")
    runit = int(runit.value) if runit is not None else 2  # the TIFF default is inch
    if runit != 3 or (xres == 1 and yres == 1) or (_is_print_resolution(xres) and _is_print_resolution(yres)):
        return None, None, None
    sp, how = with_z((tidy_number(1e4 * ysize), tidy_number(1e4 * xsize)), None, "TIFF resolution tags (cm)")
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
    src = _TiffSequenceSource(files, full, dtype, name=name)
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
                unit = node.attrs.get("unit", node.attrs.get("units"))
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
                raise _choose_one(f"HDF5 file {name!r}", "2D/3D datasets", name, {c: f[c].size for c in cands})
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
        src = _Hdf5Source(str(p), dataset, ds.shape, ds.dtype, name=f"{name}::{dataset}")
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
