"""Resumable runs: per-task partial results kept on disk beside the output.

A run given a partials folder (``grapes-dask analyze`` uses ``OUT.partials/``) works as follows:

1. :func:`open_store` fingerprints the inputs (every file of a store, with its size and
   modification time; in-memory arrays by their content) and the parameters that shape the
   partial results, and compares with ``manifest.json`` in the folder. A folder made for other
   inputs or parameters is emptied (what differs is said); leftovers of interrupted writes are
   removed.
2. Each pass-1 block and pass-2 region becomes a :func:`persisted` task named by a digest of
   everything it computes from (its slices, borders, labels, ...). The task loads its file when
   it exists, otherwise computes and writes it under a temporary name renamed when complete, so
   a killed run never leaves a half-written partial under a final name.
3. A rerun of the same command skips every task whose file exists and gives the same table,
   bit for bit: partials are exact integer (or exactly merged float) sums, combined in the same
   order as in an uninterrupted run.
4. The caller removes the folder once the table is written (:func:`remove_store`).

Files are ``.npz`` archives read with ``allow_pickle=False``: the structure (tuples, dicts,
tables) is JSON beside the arrays, so a partials folder holds no executable data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from ._errors import GrapesInputError

FORMAT = 2  # 2: layers measured in voxels of the finest axis (partials of format 1 are discarded)
MANIFEST = "manifest.json"
log = logging.getLogger("grapes_dask")

# parameters that change the content of a partial result (others, e.g. the normalisation or the
# memory budget, act after the partials or only on how the volume is cut, which the task names say)
PARTIAL_PARAMS = ("spacing", "layer_width", "start_at", "black_border", "exclude_outer_layers", "exclude_labels",
                  "fill_holes", "max_hole_size")


# --------------------------------------------------------------------------------------------
# 1. fingerprints
# --------------------------------------------------------------------------------------------


def _files_digest(path: str) -> str:
    """Digest of the names, sizes and modification times of `path` (a file, or every file under
    a folder, e.g. a Zarr store: rewriting any chunk changes it)."""
    h = hashlib.sha256()
    p = Path(path)
    if p.is_file():
        st = p.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()
    entries = []
    for root, dirs, files in os.walk(p):
        dirs.sort()
        for f in files:
            fp = os.path.join(root, f)
            try:
                st = os.stat(fp)
            except OSError:
                continue
            entries.append(f"{os.path.relpath(fp, p)}:{st.st_size}:{st.st_mtime_ns}")
    for e in sorted(entries):
        h.update(e.encode() + b"\n")
    return h.hexdigest()


def volume_fingerprint(vol) -> dict:
    """What identifies the voxels of a resolved input (:class:`grapes_dask.io.Volume`).

    Files: absolute path, dataset, and a digest of the sizes and modification times of every
    file (every chunk of a Zarr store, every slice of a TIFF folder). In-memory numpy arrays: a
    hash of their bytes; dask arrays: their graph name (a token of how they are made).
    """
    import dask.base

    out = {"kind": vol.kind, "shape": [int(n) for n in vol.array.shape], "dtype": str(vol.array.dtype),
           "dataset": vol.dataset}
    if vol.path is not None:
        import glob

        paths = sorted(glob.glob(vol.path)) if any(c in vol.path for c in "*?[") else [vol.path]
        out["path"] = vol.path
        out["files"] = hashlib.sha256("".join(_files_digest(p) for p in paths).encode()).hexdigest()
    elif isinstance(vol.reader, np.ndarray):
        out["data"] = dask.base.tokenize(vol.reader)
    else:
        out["data"] = vol.array.name
    return out


def shaping_params(params: dict) -> dict:
    """The parameters of `params` that shape partial results (:data:`PARTIAL_PARAMS`)."""
    return {k: params.get(k) for k in PARTIAL_PARAMS}


def fingerprint(volumes: dict, params: dict) -> dict:
    """The manifest of a run: format, package version, inputs and partial-shaping parameters."""
    from . import __version__

    return {"format": FORMAT, "version": __version__,
            "inputs": {k: volume_fingerprint(v) for k, v in sorted(volumes.items())},
            "params": shaping_params(params)}


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    for which in sorted(set(old.get("inputs", {})) | set(new.get("inputs", {}))):
        if old.get("inputs", {}).get(which) != new["inputs"].get(which):
            out.append(f"the {which} input changed")
    for k in PARTIAL_PARAMS:
        a, b = old.get("params", {}).get(k), new["params"].get(k)
        if a != b:
            out.append(f"{k} {a} -> {b}")
    for k in ("format", "version"):
        if old.get(k) != new.get(k):
            out.append(f"grapes_dask {k} {old.get(k)} -> {new.get(k)}")
    return out or ["the manifest differs"]


# --------------------------------------------------------------------------------------------
# 2. the folder
# --------------------------------------------------------------------------------------------


def open_store(directory, manifest: dict) -> tuple[str, str | None]:
    """Make `directory` the partials folder of a run described by `manifest`.

    Parameters
    ----------
    directory : path
        Folder of the partial results; created if missing.
    manifest : dict
        :func:`fingerprint` of the run.

    Returns
    -------
    directory : str
        Absolute path (tasks on other machines find it on a shared file system).
    note : str or None
        What was done with partials found there (reused, or discarded and why), for the user.

    Raises
    ------
    GrapesInputError
        `directory` exists and is not a folder of partials (no manifest, other files in it): it
        is left alone rather than emptied.
    """
    manifest = json.loads(json.dumps(manifest, sort_keys=True))  # compared as read back
    d = Path(directory).absolute()
    if d.exists() and not d.is_dir():
        raise GrapesInputError(f"partials folder {str(d)!r} is a file: remove it or choose another folder")
    note = None
    mf = d / MANIFEST
    if d.is_dir() and any(d.iterdir()):
        if not mf.is_file():
            raise GrapesInputError(
                f"partials folder {str(d)!r} exists and holds other files: it is not a grapes_dask partials "
                "folder; remove it or choose another folder"
            )
        try:
            old = json.loads(mf.read_text())
        except (OSError, ValueError):
            old = {}
        n = len(list(d.glob("*.npz")))
        if old == manifest:
            note = f"resuming: {n} finished tasks found in {d}" if n else None
            manifest = None  # unchanged: not rewritten
        else:
            for f in d.iterdir():
                if f.is_file():
                    f.unlink()
            note = (f"discarded {n} partial results in {d}, made for another run: "
                    + "; ".join(_differences(old, manifest)))
    d.mkdir(parents=True, exist_ok=True)
    for f in d.glob("*.tmp-*"):  # writes a killed run left unfinished
        f.unlink(missing_ok=True)
    if manifest is not None:
        tmp = d / f"{MANIFEST}.tmp-{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, mf)
        if note:  # discarded: said here (resumed tasks are counted per pass by the engine)
            log.info(note)
    return str(d), note


def remove_store(directory) -> None:
    """Remove a partials folder (after the table is written)."""
    d = Path(directory)
    if (d / MANIFEST).is_file():
        shutil.rmtree(d, ignore_errors=True)


def manifest_digest(manifest: dict) -> str:
    """Short digest of a run's manifest (part of every task's file name and key)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:32]


def task_name(kind: str, *parts) -> str:
    """File name of a task's partial: `kind` and a digest of `parts` (numbers, slices, tuples,
    arrays), which must hold everything the task's result depends on besides the manifest."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, np.ndarray):
            h.update(f"a{x.dtype.str}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, slice):
            h.update(f"s{x.start},{x.stop},{x.step}".encode())
        elif isinstance(x, (tuple, list)):
            h.update(b"(")
            for y in x:
                feed(y)
            h.update(b")")
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    for p in parts:
        feed(p)
    return f"{kind}-{h.hexdigest()[:32]}.npz"


def done(directory: str, names) -> int:
    """How many of the task files `names` exist in `directory`."""
    return sum(os.path.isfile(os.path.join(directory, n)) for n in names)


# --------------------------------------------------------------------------------------------
# 3. the files: nested tuples / dicts / tables / arrays as JSON plus arrays
# --------------------------------------------------------------------------------------------


def _encode(obj, arrays: list):
    from .kernels.reduce import StatsPartial

    def arr(a):
        arrays.append(np.asarray(a))
        return len(arrays) - 1

    if isinstance(obj, StatsPartial):
        return {"t": "stats", "v": [_encode(x, arrays) for x in obj]}
    if isinstance(obj, pd.DataFrame):
        return {"t": "frame", "columns": [str(c) for c in obj.columns], "v": [arr(obj[c].to_numpy()) for c in obj.columns]}
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError("object arrays are not stored in partials")
        return {"t": "array", "v": arr(obj)}
    if isinstance(obj, tuple):
        return {"t": "tuple", "v": [_encode(x, arrays) for x in obj]}
    if isinstance(obj, list):
        return {"t": "list", "v": [_encode(x, arrays) for x in obj]}
    if isinstance(obj, dict):
        return {"t": "dict", "k": [str(k) for k in obj], "v": [_encode(x, arrays) for x in obj.values()]}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return {"t": "scalar", "v": arr(np.asarray(obj))}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"t": "py", "v": obj}
    raise TypeError(f"cannot store a {type(obj).__name__} in a partial result")


def _decode(node, arrays):
    from .kernels.reduce import StatsPartial

    t, v = node["t"], node["v"]
    if t == "stats":
        return StatsPartial(*[_decode(x, arrays) for x in v])
    if t == "frame":
        return pd.DataFrame({c: arrays[i] for c, i in zip(node["columns"], v)})
    if t == "array":
        return arrays[v]
    if t == "scalar":
        return arrays[v][()]
    if t == "tuple":
        return tuple(_decode(x, arrays) for x in v)
    if t == "list":
        return [_decode(x, arrays) for x in v]
    if t == "dict":
        return {k: _decode(x, arrays) for k, x in zip(node["k"], v)}
    return v


def save(path: str, obj) -> None:
    """Write `obj` to `path` (``.npz``) under a temporary name, renamed when complete."""
    arrays: list = []
    tree = _encode(obj, arrays)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, __tree__=np.frombuffer(json.dumps(tree).encode(), np.uint8),
                     **{f"a{i}": a for i, a in enumerate(arrays)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: str):
    """Read what :func:`save` wrote (no pickled objects are read)."""
    with np.load(path, allow_pickle=False) as z:
        tree = json.loads(z["__tree__"].tobytes().decode())
        arrays = [z[f"a{i}"] for i in range(len(z.files) - 1)]
    return _decode(tree, arrays)


def persisted(directory: str | None, name: str, fn, *args):
    """Task wrapper: ``fn(*args)``, or its result saved by an earlier run under ``directory/name``.

    A file that cannot be read (damaged outside our atomic writes) is computed again and
    replaced.
    """
    if directory is None:
        return fn(*args)
    path = os.path.join(directory, name)
    if os.path.isfile(path):
        try:
            return load(path)
        except Exception as exc:  # damaged: recompute below
            log.warning("partial result %s cannot be read (%s): computing it again", path, exc)
    out = fn(*args)
    save(path, out)
    return out
