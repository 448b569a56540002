"""The demo: an operando series of a cracking electrode, tracked on a local cluster, with a report.

Stages, each announced on standard output:

1. generate a synthetic operando series (:func:`grapes_dask.synthetic.make_phantom`): the same
   particles in four states of charge (pristine, 4.0 V, 4.4 V charged, 2.5 V discharged) with a
   known damage per state that falls along x (away from the current collector), written to
   Zarr; one segmentation error is made on purpose in the 4.4 V labels (a particle given to its
   neighbour), as real seeded segmentations make them;
2. track the particles (:func:`grapes_dask.track.track`) on an embedded local Dask cluster:
   one particle table per state, noise estimated from the background, the paper's cleaning
   rules, each excluded particle kept with its reason;
3. print the statistics (:func:`grapes_dask.report.statistics_lines`, as ``grapes-dask
   operando`` does): population means and changes against pristine with their total standard
   errors (paper eq. 1-5) and the error of the mean change, z-tests (eq. 6) against pristine and
   between consecutive states, cleaning counts, noise, and the injected damage beside them;
4. write the tables, the summary, the figures and a self-contained ``report.html``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ._errors import GrapesInputError
from .units import format_spacing

__all__ = ["run_demo", "MIN_SIZE", "STATES"]

MIN_SIZE = 64
#: The demo's states of charge and the damage level injected in each (0-1).
STATES = {"pristine": 0.0, "4.0 V": 0.35, "4.4 V": 0.8, "2.5 V": 0.5}
#: Voxel edge of the demo phantom, micrometres (a typical synchrotron micro-CT voxel).
VOXEL_UM = 0.325
_ERROR_STATE = 2  # the 4.4 V labels get the segmentation error


def summary(n_particles: int, shape, seconds: float) -> str:
    """``483 particles, 7.1 Mvoxels in 1.7 s (4.1 Mvoxels/s)`` (pixels for 2D images)."""
    n = int(np.prod(shape))
    unit = "voxels" if len(shape) == 3 else "pixels"
    scale, prefix = (1e6, "M") if n >= 1e5 else (1e3, "k")
    return (f"{n_particles} particles, {n / scale:.1f} {prefix}{unit} in {seconds:.1f} s "
            f"({n / max(seconds, 1e-9) / scale:.1f} {prefix}{unit}/s)")


def _merge_pair(truth, shape) -> tuple[int, int] | None:
    """An interior particle and its nearest neighbour (by centre distance) in state 0, if any."""
    t = truth[(truth["state"] == 0) & ~truth["cut"]].sort_values("label")
    if len(t) < 2:
        return None
    c = t[["z", "y", "x"]].to_numpy(float)
    mid = np.asarray(shape, float) / 2
    a = int(np.argmin(np.linalg.norm(c - mid, axis=1)))
    d = np.linalg.norm(c - c[a], axis=1)
    d[a] = np.inf
    b = int(np.argmin(d))
    labs = t["label"].to_numpy()
    return int(labs[a]), int(labs[b])


def _give_to_neighbour(store: Path, lost: int, taker: int) -> None:
    """Rewrite a label store with every voxel of `lost` given to `taker` (atomically)."""
    from .io import open_volume, read_spacing, write_zarr

    lab = open_volume(store)
    dtype = lab.dtype
    merged = lab.map_blocks(lambda b: np.where(b == lost, np.asarray(taker, dtype), b), dtype=dtype)
    attrs = {"spacing": list(read_spacing(store) or (1.0, 1.0, 1.0)),
             "segmentation_error": f"label {lost} given to label {taker} (demo)"}
    tmp = store.with_name(store.name.replace(".zarr", "_merged.zarr"))
    write_zarr(merged, tmp, attrs=attrs, overwrite=True)
    shutil.rmtree(store)
    tmp.rename(store)


def run_demo(out_dir, *, size: int = 160, workers: int | None = None, seed: int = 0, overwrite: bool = False,
             quiet: bool = False, echo: Callable[[str], None] = print):
    """Run the demo and write its outputs to `out_dir`.

    Parameters
    ----------
    out_dir : path
        Folder for the phantom (``phantom/``) and the results (``results/``: the long
        ``particles.parquet`` (one row per particle and state), ``tables/`` (one particle table
        per state), ``summary.csv``, ``z_tests.csv``, ``cleaning.csv``, ``by_quantile.csv``,
        ``figures/`` and ``report.html``; see :func:`grapes_dask.report.write_tracking`).
    size : int
        Side of the cubic phantom, voxels (at least :data:`MIN_SIZE`).
    workers : int, optional
        Local cluster workers (see :func:`grapes_dask.cluster.cluster_client`).
    seed : int
        Phantom seed.
    overwrite : bool
        Replace the outputs of an earlier demo.
    quiet : bool
        No progress and no dashboard link.
    echo : callable
        Where the story goes, one line per call.

    Returns
    -------
    grapes_dask.track.Tracking
        The tracked series.
    """
    from . import synthetic
    from .cluster import cluster_client, dashboard_link
    from .io import _check_can_write, atomic_output
    from .report import write_tracking
    from .track import track

    if int(size) < MIN_SIZE:
        raise GrapesInputError(f"{{size}}: give at least {MIN_SIZE} voxels so that particles fit", size=size)
    size = int(size)
    out = Path(out_dir)
    results = out / "results"
    out.mkdir(parents=True, exist_ok=True)
    _check_can_write(results, overwrite)
    t0 = time.perf_counter()
    names = list(STATES)
    air = max(4, size // 10)
    echo(f"1/4 phantom: {size}^3 voxels of {format_spacing((VOXEL_UM,) * 3, 'um')} ({air} voxels of air above the "
         "sample), "
         f"{len(names)} states of charge ({', '.join(names)}), damage {', '.join(f'{v:g}' for v in STATES.values())}, "
         f"less far from the current collector (x) -> {out / 'phantom'}")
    (out / "phantom").mkdir(exist_ok=True)
    # a beamline-like voxel size and empty space above the sample, where sigma_bg is measured
    ph = synthetic.make_phantom(out / "phantom", shape=(size,) * 3, n_states=len(names), seed=seed,
                                spacing=(VOXEL_UM,) * 3, unit="micrometer", air_thickness=air,
                                mean_radius=9.0, damage=list(STATES.values()), damage_gradient=0.6,
                                damage_axis=2, chunks=80, overwrite=overwrite, progress=not quiet)
    pair = _merge_pair(ph.truth, (size,) * 3)
    if pair is not None:
        lost, taker = pair
        _give_to_neighbour(Path(ph.labels[_ERROR_STATE]), lost, taker)
        echo(f"    segmentation error made on purpose: at {names[_ERROR_STATE]}, particle {lost} is merged into "
             f"particle {taker}")
    states = {name: (ph.grey[s], ph.labels[s]) for s, name in enumerate(names)}
    with cluster_client(workers=workers, dashboard=not quiet) as client:
        threads = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
        link = "" if quiet else f"; dashboard: {dashboard_link(client)}"
        echo(f"2/4 tracking on a local cluster ({threads} threads){link}")
        t1 = time.perf_counter()
        tr = track(states, reference="pristine", exclude_outer_layers=5, drop_smallest=0.25, neighbour_gap=1,
                   client=client, progress=not quiet)
        n = tr.particles["label"].nunique()
        echo(f"    {len(names)} states: {summary(n, (size,) * 3, (time.perf_counter() - t1) / len(names))} "
             "per state")
    from .report import statistics_lines

    truth = ph.truth.groupby("state")["damage"].mean()
    extra = {name: f"(mean injected damage {truth[k]:.2f})" for k, name in enumerate(names)}
    lines = statistics_lines(tr, n_se=3.0, sigma=5.0, extra=extra, noise_note=" (rendered with 6)")
    echo(f"3/4 {lines[0]}")
    for line in lines[1:]:
        echo(f"    {line}")
    # after the paper: each particle's change against its own noise (eq. 2), k = 3
    fr = tr.classify(k=3.0).fractions
    for state, row in fr.iterrows():
        echo(f"    {state}: {100 * row['darker']:.1f} % of the kept particles darker beyond 3 sigma of their noise "
             f"(+- {100 * row['darker_se']:.1f}; 0.13 % expected without damage), {100 * row['plain_darker']:.1f} % "
             "with any decrease")
    echo("4/4 report")
    with atomic_output(results, overwrite=overwrite) as tmp:
        tmp.mkdir()
        write_tracking(tr, tmp, title="grapes_dask demo: a synthetic operando series")
    echo(f"    {results / 'report.html'} (open it in a browser)")
    echo(f"done in {time.perf_counter() - t0:.1f} s")
    return tr
