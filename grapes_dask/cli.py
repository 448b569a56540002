"""The ``grapes-dask`` command.

User errors (missing file, unknown dataset, unsupported dtype, existing output, bad option)
print one line ``error: ...`` naming the input and the fix, and exit with status 2; ``--verbose``
shows the traceback as well. Other failures exit with status 1.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import re
import sys
from pathlib import Path
import time
import traceback
import warnings

import click
import numpy as np

from ._errors import GrapesInputError, GrapesInputWarning
from .units import _UNIT_TO_UM, format_spacing, parse_spacing

# GrapesInputWarning: input analysed by the API with a warning (no particle at all) stops the command
_USER_ERRORS = (GrapesInputError, GrapesInputWarning, FileNotFoundError, FileExistsError, PermissionError,
                IsADirectoryError)


def _fail(ctx, exc: BaseException) -> None:
    if ctx.find_root().obj.get("verbose"):
        traceback.print_exc()
    click.echo(f"error: {_message(exc)}", err=True)
    ctx.exit(2)


class _Command(click.Command):
    """A subcommand: ``--spacing`` takes one value per axis or one for all (joined before parsing)."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, _join_spacing(list(args)))


class _Group(click.Group):
    """Click group that turns user errors into one clear message and a non-zero exit."""

    command_class = _Command

    def invoke(self, ctx):
        ctx.ensure_object(dict)
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except _USER_ERRORS as exc:
            _fail(ctx, exc)
        except KeyboardInterrupt:
            click.echo("interrupted: no output was left half-written", err=True)
            ctx.exit(130)


_NUMBER = re.compile(r"^[+]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?(" + "|".join(
    re.escape(u) for u in sorted(_UNIT_TO_UM, key=len, reverse=True)) + r")?$", re.IGNORECASE)


def _join_spacing(args: list) -> list:
    """``--spacing 1 0.8 0.8`` -> ``--spacing=1,0.8,0.8`` (one to three numbers after the flag)."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--spacing":
            vals = []
            j = i + 1
            while j < len(args) and len(vals) < 3 and _NUMBER.match(args[j]):
                vals.append(args[j])
                j += 1
            if vals:
                out.append("--spacing=" + ",".join(vals))
                i = j
                continue
        out.append(a)
        i += 1
    return out


def _message(exc: BaseException) -> str:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, FileExistsError)) and exc.filename:
        what = {
            FileNotFoundError: "does not exist: check the path",
            PermissionError: "cannot be accessed: check its permissions",
            IsADirectoryError: "is a folder where a file was expected",
            FileExistsError: "already exists: choose another path or pass --overwrite",
        }[type(exc)]
        return f"{exc.filename!r} {what}"
    if isinstance(exc, GrapesInputError):
        return exc.render("cli")
    if isinstance(getattr(exc, "error", None), GrapesInputError):  # a warning that carries its error's wordings
        return exc.error.render("cli")
    return str(exc)


def _set_verbose(ctx, param, value):
    if value:
        ctx.find_root().ensure_object(dict)["verbose"] = True
    return value


def _verbose_option(f):
    return click.option("-v", "--verbose", is_flag=True, expose_value=False, is_eager=True, callback=_set_verbose,
                        help="Show tracebacks of errors.")(f)


def _parse_spacing(ctx, param, value):
    if value is None:
        return None
    words = str(value).replace(",", " ").split()
    try:
        nums, unit = parse_spacing(tuple(words))
        vals = tuple(float(v) for v in nums)
    except (ValueError, GrapesInputError):
        vals, unit = (), None
    if not 1 <= len(vals) <= 3 or not all(v > 0 and v < float("inf") for v in vals):
        raise click.BadParameter(f"{value!r}: give one positive voxel size for every axis, or one per axis (Z Y X), "
                                 "optionally with its unit (0.325um)")
    if unit is not None:  # kept with the values: settle_spacing records it
        return f"{vals[0]!r}{unit}" if len(vals) == 1 else tuple(f"{v!r}{unit}" for v in vals)
    return vals[0] if len(vals) == 1 else vals


def _parse_length(ctx, param, value):
    """A length option: a plain number of voxels as a float, a length with its unit as given."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return str(value).strip()


_WORKERS_HELP = ("Local cluster: 1 (default) runs one worker inside this process with a thread per core "
                 "(the kernels release the GIL); N > 1 starts N worker processes sharing the cores.")


def _spacing_option(f):
    return click.option(
        "--spacing", default=None, metavar="[Z] Y X", callback=_parse_spacing,
        help="Voxel size: one value per axis (Z Y X, or Y X for 2D images) or one for all axes, optionally "
             "with its unit (0.325um); overrides the files' metadata (a bare number keeps their unit).",
    )(f)


# click parameter -> keyword of grapes_dask.cluster.cluster_client
_HPC_KEYWORDS = {"scheduler_file": "scheduler_file", "cluster": "cluster", "cluster_config": "cluster_config",
                 "jobs": "jobs", "job_cores": "cores", "job_memory": "memory", "job_processes": "processes",
                 "walltime": "walltime", "queue": "queue", "account": "account", "local_directory": "local_directory",
                 "job_extra": "job_extra_directives", "job_name": "job_name", "worker_python": "python",
                 "worker_timeout": "worker_timeout"}


def _hpc_options(f):
    """Options of scheduler files and batch-job clusters, handed to the command as one dict ``hpc``
    (keywords of :func:`grapes_dask.cluster.cluster_client`, only those given)."""
    options = [
        click.option("--scheduler-file", default=None, metavar="PATH",
                     help="JSON file of a running dask scheduler (dask scheduler --scheduler-file, dask-mpi "
                          "--scheduler-file, a job script); the same as giving it to --scheduler."),
        click.option("--cluster", default=None, metavar="slurm|pbs",
                     help="Start the workers as SLURM or PBS batch jobs (dask-jobqueue; the scheduler runs here), "
                          "cancelled at the end; default: a local cluster."),
        click.option("--cluster-config", default=None, metavar="FILE.yaml",
                     help="Job settings for --cluster (dask-jobqueue's names: cores, memory, processes, walltime, "
                          "queue, account, local-directory, job-extra-directives, interface, ...); the options "
                          "below override it, and it overrides ~/.config/dask/jobqueue.yaml."),
        click.option("--jobs", type=int, default=None, metavar="N",
                     help="--cluster: batch jobs to submit (default 1)."),
        click.option("--job-cores", type=int, default=None, metavar="N", help="--cluster: cores per job."),
        click.option("--job-memory", default=None, metavar="SIZE", help="--cluster: memory per job, e.g. 64GiB."),
        click.option("--job-processes", type=int, default=None, metavar="N",
                     help="--cluster: dask worker processes per job, sharing its cores and memory."),
        click.option("--walltime", default=None, metavar="HH:MM:SS", help="--cluster: time limit of a job."),
        click.option("--queue", default=None, metavar="NAME", help="--cluster: queue (SLURM partition)."),
        click.option("--account", default=None, metavar="NAME", help="--cluster: account charged for the jobs."),
        click.option("--local-directory", default=None, metavar="PATH",
                     help="--cluster: the workers' scratch folder on the compute nodes (e.g. /tmp or $TMPDIR)."),
        click.option("--job-extra", multiple=True, metavar="DIRECTIVE",
                     help="--cluster: one more #SBATCH / #PBS line of the job script, without that prefix "
                          "(repeat for more)."),
        click.option("--job-name", default=None, metavar="NAME", help="--cluster: name of the jobs in the queue."),
        click.option("--worker-python", default=None, metavar="PATH",
                     help="--cluster: Python of the workers (default: this one)."),
        click.option("--worker-timeout", type=float, default=None, metavar="SECONDS",
                     help="Seconds to wait for the first worker of --cluster, --scheduler or --scheduler-file "
                          "(default 600)."),
    ]

    @functools.wraps(f)
    def command(*args, **kwargs):
        given = {_HPC_KEYWORDS[k]: kwargs.pop(k) for k in _HPC_KEYWORDS}
        hpc = {k: (list(v) if isinstance(v, tuple) else v) for k, v in given.items() if v not in (None, ())}
        return f(*args, hpc=hpc, **kwargs)

    for option in reversed(options):
        command = option(command)
    return command


def _check_hpc(hpc: dict, scheduler, workers, memory_limit) -> None:
    """The cluster options checked together before the inputs are read and anything starts."""
    from .cluster import check_cluster_options

    if hpc:
        check_cluster_options(scheduler, workers=workers, memory_limit=memory_limit or "auto", **hpc)


def _profile_option(f):
    return click.option(
        "--profile", default=None, metavar="REPORT.html",
        help="Save dask's performance report of the run (task stream, worker profiles, bandwidth) to this "
             "HTML file.")(f)


def _check_profile(profile, overwrite, *outputs) -> None:
    if profile is None:
        return
    from .io import _check_can_write

    path = Path(profile)
    if path.is_dir():
        raise GrapesInputError(f"--profile {profile}: this is a folder; give the HTML file to write, e.g. "
                               f"{path / 'profile.html'}")
    if any(o is not None and Path(o).resolve() == path.resolve() for o in outputs):
        raise GrapesInputError(f"--profile {profile} is also the output: give the performance report another name")
    _check_can_write(path, overwrite)


@contextlib.contextmanager
def _profiled(profile, overwrite):
    """Dask's performance report of the computations in the block, written to `profile` when it ends
    (under a temporary name, renamed when complete)."""
    if profile is None:
        yield
        return
    from distributed import performance_report

    from .io import atomic_output

    with atomic_output(profile, overwrite=overwrite) as tmp:
        with performance_report(filename=str(tmp)):
            yield


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@_verbose_option
@click.version_option(package_name="grapes-dask")
def cli():
    """Exact, out-of-core per-particle grey-level analysis (GREAT2) of micro-CT volumes.

    Every command takes -v/--verbose (before or after its name) to show tracebacks.
    """


@cli.command()
@_verbose_option
@click.argument("input_path", metavar="INPUT")
@click.argument("output", metavar="OUTPUT.zarr")
@click.option("--dataset", default=None, help="Dataset path inside an HDF5/NeXus file or array in a Zarr group.")
@click.option("--level", type=int, default=None, help="Resolution level of an OME-Zarr or pyramidal TIFF (default 0).")
@click.option("--chunks", default=128, show_default=True, type=int, help="Chunk side of the Zarr output, voxels.")
@_spacing_option
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def convert(input_path, output, dataset, level, chunks, spacing, overwrite, quiet):
    """Convert a TIFF / HDF5 / NeXus / npy / Zarr volume to a compressed, chunked Zarr v3 array."""
    from . import io

    t0 = time.perf_counter()
    dest = io.convert(input_path, output, chunks=chunks, dataset=dataset, level=level, spacing=spacing,
                      overwrite=overwrite, progress=not quiet)
    info = io.volume_info(dest)
    click.echo(
        f"wrote {dest}: shape {info.shape}, {info.dtype}, chunks {info.chunks}, "
        f"{info.nbytes_on_disk / 2**20:.1f} MiB on disk, in {time.perf_counter() - t0:.1f} s"
    )


@cli.command()
@_verbose_option
@click.argument("path")
@click.option("--dataset", default=None, help="Dataset path inside an HDF5/NeXus file or array in a Zarr group.")
@click.option("--level", type=int, default=None, help="Resolution level of an OME-Zarr or pyramidal TIFF (default 0).")
@click.option("--check", is_flag=True, help="Read every chunk and list the damaged ones (exit status 2 if any).")
@click.option("--quiet", is_flag=True, help="With --check, no progress.")
def info(path, dataset, level, check, quiet):
    """Show shape, dtype, chunks, spacing, size on disk and provenance of a volume."""
    from . import io

    click.echo(io.volume_info(path, dataset=dataset, level=level).to_text())
    if check:
        _check_chunks(path, dataset, level, quiet)


def _check_chunks(path, dataset, level, quiet) -> None:
    """``info --check``: every chunk read; the damaged ones listed, then an error if any."""
    from . import io
    from ._errors import GrapesDataError

    t0 = time.perf_counter()
    n, damaged = io.check_chunks(path, dataset=dataset, level=level, progress=not quiet)
    if not damaged:
        click.echo(f"checked {n} chunks in {time.perf_counter() - t0:.1f} s: all readable")
        return
    click.echo(f"checked {n} chunks in {time.perf_counter() - t0:.1f} s: {len(damaged)} damaged")
    for err in damaged:
        where = "" if err.chunk is None else f"chunk {err.chunk}: "
        click.echo(f"  {where}{err.path or ''} {err.detail or err}".rstrip())
    first = damaged[0]
    are = "is" if len(damaged) == 1 else "are"
    raise GrapesDataError(
        f"{len(damaged)} of the {n} chunks of {first.array!r} {are} damaged (listed above): restore those files (or "
        "the whole input) from a copy, or write it again from its source", array=first.array)


@cli.command()
@_verbose_option
@click.argument("output_dir")
@click.option("--size", nargs=3, type=int, default=(128, 128, 128), show_default=True, metavar="Z Y X",
              help="Volume shape in voxels.")
@click.option("--mean-radius", type=float, default=None, help="Mean equivalent particle radius, voxels.")
@click.option("--states", type=int, default=1, show_default=True, help="Number of operando states.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same volumes).")
@click.option("--chunks", type=int, default=128, show_default=True, help="Chunk side of the Zarr outputs.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs in OUTPUT_DIR.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def synth(output_dir, size, mean_radius, states, seed, chunks, overwrite, quiet):
    """Generate a synthetic electrode phantom (grey + labels Zarr per state, ground truth)."""
    from pathlib import Path

    if states < 1:
        raise GrapesInputError(f"--states {states}: give at least 1 state")
    from . import synthetic

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    kw = {} if mean_radius is None else {"mean_radius": mean_radius}
    t0 = time.perf_counter()
    ph = synthetic.make_phantom(output_dir, shape=tuple(size), n_states=states, seed=seed, chunks=chunks,
                                overwrite=overwrite, progress=not quiet, **kw)
    n = ph.truth["label"].nunique()
    click.echo(f"wrote {n} particles, {states} state(s), shape {tuple(size)} to {output_dir} "
               f"in {time.perf_counter() - t0:.1f} s")
    for p in ph.paths():
        click.echo(f"  {p}")


@cli.command()
@_verbose_option
@click.argument("grey", metavar="GREY")
@click.argument("labels", metavar="LABELS")
@click.option("--out", "out", required=True, help="Output table: .parquet, .csv or .xlsx.")
@_spacing_option
@click.option("--chunks", type=int, default=None, help="Chunk side for pass 1 (default: the stored chunks).")
@click.option("--grey-dataset", default=None, metavar="PATH",
              help="Dataset of GREY inside an HDF5 file or Zarr group (or write GREY as FILE::PATH).")
@click.option("--labels-dataset", default=None, metavar="PATH",
              help="Dataset of LABELS inside an HDF5 file or Zarr group (or write LABELS as FILE::PATH).")
@click.option("--dataset", default=None, hidden=True)
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Address of a running dask scheduler (tcp://host:8786; a scheduler file is taken too, "
                   "but give it with --scheduler-file); default: a local cluster.")
@_hpc_options
@click.option("--workers", type=int, default=None, help=_WORKERS_HELP)
@click.option("--memory-limit", default=None, metavar="SIZE",
              help="Memory of the local cluster's workers, e.g. 8GiB (default: the machine's memory); "
                   "the regions of pass 2 are planned to fit it.")
@click.option("--layer-width", default=None, metavar="W", callback=_parse_length,
              help="Radial layer width: voxels (default 1 voxel of the finest axis), or a length with its unit "
                   "(0.5um).")
@click.option("--start-at", type=click.Choice(["edge", "center", "centre"]), default="edge", show_default=True,
              help="Layer 1 at the particle surface (edge) or at its centroid (center or centre).")
@click.option("--normalise", "--normalize", "normalise", type=click.Choice(["radial_max", "surface", "roi_mean"]),
              default="radial_max", show_default=True,
              help="Normalisation of radial_layers_graylevelnormed: radial_max (GRAPES; NaN when the surface "
                   "layer is the brightest), surface (divided by the surface layer) or roi_mean (divided by the "
                   "particle's ROI mean: 1 = as bright as the interior).")
@click.option("--exclude-outer-layers", type=int, default=0, show_default=True,
              help="ROI columns use the voxels deeper than this many layers from the surface (whatever "
                   "--start-at says).")
@click.option("--exclude-labels", default=None, metavar="ID[,ID...]",
              help="Labels to leave out of the layer analysis (e.g. a binder phase).")
@click.option("--no-black-border", is_flag=True, help="Do not treat the outside of the volume as background.")
@click.option("--fill-holes", is_flag=True, help="Count each particle's enclosed cavities as part of it in the layers.")
@click.option("--max-hole-size", type=int, default=None,
              help="With --fill-holes, fill only cavities of at most this many voxels.")
@click.option("--region-size", type=int, default=400, show_default=True,
              help="Target side of the blocks of chunks each task works on, voxels (the planner splits "
                   "blocks further where memory requires).")
@click.option("--no-check-labels", is_flag=True,
              help="Analyse label volumes that look like grey levels or a binary mask anyway.")
@click.option("--no-long-tables", is_flag=True,
              help="Write only the particle table, not the layers and contacts tables (beside OUT, or as "
                   "sheets of an .xlsx OUT).")
@_profile_option
@click.option("--overwrite", is_flag=True, help="Replace OUT (and its layers and contacts tables) if they exist.")
@click.option("--partials", "partials_dir", default=None, metavar="DIR",
              help="Folder of the per-region partial results that make an interrupted run resumable "
                   "(default: OUT.partials beside OUT; on a shared file system for remote workers).")
@click.option("--keep-partials", is_flag=True,
              help="Keep the partial results after the table is written (default: removed).")
@click.option("--quiet", is_flag=True, help="No progress, no dashboard link: only the closing line.")
def analyze(grey, labels, out, spacing, chunks, grey_dataset, labels_dataset, dataset, scheduler, workers,
            memory_limit, layer_width, start_at, normalise, exclude_outer_layers, exclude_labels, no_black_border,
            fill_holes, max_hole_size, region_size, no_check_labels, no_long_tables, overwrite, partials_dir,
            keep_partials, quiet, hpc, profile):
    """Particle table (GREAT2 radial profiles and properties) of a grey and a label volume.

    Beside OUT (e.g. t.parquet) go the long tables in the same format: t.layers.parquet (label,
    layer, count, mean, std: one row per particle and radial layer) and t.contacts.parquet
    (label_a, label_b, n_faces: particles sharing faces); in an .xlsx OUT they are the sheets
    layers and contacts.

    Interrupted (Ctrl-C, a killed job), the same command run again resumes: each finished block
    and region left its partial result in OUT.partials (see --partials), which is removed once
    the table is written.
    """
    from pathlib import Path

    from .cluster import check_scheduler
    from .demo import summary
    from .output import check_table_path, companion_path, write_table
    from .table import analyze_tables, check_inputs

    if dataset is not None:
        raise GrapesInputError(
            f"--dataset {dataset}: name each input's own dataset with --grey-dataset and --labels-dataset "
            "(or write an input as FILE.h5::/path/to/dataset)"
        )
    _check_memory_limit(memory_limit, scheduler)
    if scheduler and workers is not None:
        raise GrapesInputError(f"--workers {workers} sizes the local cluster: leave it out with --scheduler")
    _check_hpc(hpc, scheduler, workers, memory_limit)
    long_tables = () if no_long_tables else ("layers", "contacts")
    check_table_path(out, overwrite, extra=long_tables)
    _check_profile(profile, overwrite, out, *(companion_path(out, n) for n in long_tables))
    excl = _parse_ids(exclude_labels)
    params = dict(spacing=spacing, chunks=chunks, layer_width=layer_width,
                  start_at="center" if start_at == "centre" else start_at, normalise=normalise,
                  exclude_outer_layers=exclude_outer_layers, exclude_labels=excl, black_border=not no_black_border,
                  fill_holes=fill_holes, max_hole_size=max_hole_size, region_size=region_size,
                  check_labels=not no_check_labels)
    checked = check_inputs(grey, labels, grey_dataset=grey_dataset, labels_dataset=labels_dataset, **params)
    if scheduler:
        check_scheduler(scheduler)
    if not quiet:
        click.echo(f"inputs: {checked.describe()}", err=True)
    partials = Path(partials_dir) if partials_dir else Path(str(out) + ".partials")
    t0 = time.perf_counter()
    with _cluster(scheduler, workers, memory_limit, quiet, hpc) as client, _profiled(profile, overwrite), _notes():
        res = analyze_tables(checked.grey, checked.labels, client=client, progress=not quiet, partials=partials,
                             **params)
    dt = time.perf_counter() - t0
    extra = {}
    for name in long_tables:  # each long table carries the analysis' parameters too
        t = getattr(res, name).copy()
        t.attrs = {"grapes_dask": {**res.particles.attrs.get("grapes_dask", {}), "table": name}}
        extra[name] = t
    write_table(res.particles, out, overwrite=overwrite, extra=extra)
    if not keep_partials:
        from ._partials import remove_store

        remove_store(partials)
    also = ""
    if long_tables:
        suffix = Path(out).suffix.lower()
        also = (" (sheets " if suffix == ".xlsx" else " (+ ") + ", ".join(
            n if suffix == ".xlsx" else companion_path(out, n).name for n in long_tables) + ")"
    click.echo(f"wrote {Path(out)}{also}: {summary(len(res.particles), checked.shape, dt)}")
    if profile and not quiet:
        click.echo(f"performance report: {Path(profile)}", err=True)


def _remove_partials_tree(folder: Path) -> None:
    """Remove the per-state partials folders under `folder`, then `folder` if left empty."""
    from ._partials import remove_store

    if folder.is_dir():
        for sub in folder.iterdir():
            if sub.is_dir():
                remove_store(sub)
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def _notes():
    """Messages of the ``grapes_dask`` logger (resumed or discarded partial results) on standard
    error as ``note: ...`` lines, while the block runs."""
    import logging

    class _Echo(logging.Handler):
        def emit(self, record):
            click.echo(f"note: {record.getMessage()}", err=True)

    logger, handler = logging.getLogger("grapes_dask"), _Echo(logging.INFO)
    old_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@contextlib.contextmanager
def _cluster(scheduler, workers, memory_limit, quiet, hpc=None):
    """The client of `scheduler`, of batch jobs (`hpc`: keywords of cluster_client) or of a local
    cluster; its dashboard link on standard error; a GrapesInputWarning (no particle) raised as an error."""
    from .cluster import cluster_client, dashboard_link

    extra = dict(hpc or {})
    if extra.get("cluster") and not quiet:
        extra["echo"] = lambda line: click.echo(line, err=True)
    # --quiet shows no link, so a local cluster serves no dashboard (starting it costs about 1 s)
    with cluster_client(scheduler, workers=workers, memory_limit=memory_limit or "auto", dashboard=not quiet,
                        **extra) as client:
        if not quiet:
            link = dashboard_link(client)
            if link:
                click.echo(f"dask dashboard: {link}", err=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", GrapesInputWarning)
            yield client


def _check_memory_limit(memory_limit, scheduler) -> None:
    if scheduler and memory_limit:
        raise GrapesInputError(
            f"--memory-limit {memory_limit} sets the memory of the local cluster; the workers of --scheduler "
            "have theirs (dask worker --memory-limit): leave out one of the two"
        )
    if memory_limit is not None:
        from dask.utils import parse_bytes

        try:
            if parse_bytes(memory_limit) <= 0:
                raise ValueError(memory_limit)
        except (ValueError, TypeError):
            raise GrapesInputError(f"--memory-limit {memory_limit}: give a size such as 8GiB or 16000MB") from None


def _parse_ids(text):
    if not text:
        return None
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise GrapesInputError(f"--exclude-labels {text!r}: give label ids separated by commas, e.g. 12,40") from None
    if not ids:
        raise GrapesInputError(f"--exclude-labels {text!r}: give label ids separated by commas, e.g. 12,40")
    return ids


_TABLE_SUFFIXES = (".parquet", ".csv")


def _is_table_path(text: str) -> bool:
    return text.lower().rstrip("/").endswith(_TABLE_SUFFIXES)


def _parse_state(text: str):
    """``NAME=GREY,LABELS`` -> (name, (grey, labels)); ``NAME=TABLE`` -> (name, table path);
    ``NAME=GREY,LABELS,TABLE`` -> (name, (grey, labels, table path))."""
    forms = ("write NAME=GREY,LABELS (two volumes), NAME=TABLE (a table made by grapes-dask analyze) or "
             "NAME=GREY,LABELS,TABLE (the table and the volumes it was made from), e.g. "
             "--state pristine=grey_s0.zarr,labels_s0.zarr")
    name, sep, rest = text.partition("=")
    parts = [p.strip() for p in rest.split(",")] if sep else []
    if not sep or not name.strip() or not rest.strip() or len(parts) > 3 or not all(parts):
        raise GrapesInputError(f"--state {text!r}: {forms}")
    name = name.strip()
    if len(parts) == 1 and not _is_table_path(parts[0]):
        raise GrapesInputError(
            f"--state {text!r}: {parts[0]!r} is not a table (.parquet or .csv made by grapes-dask analyze); for "
            f"volumes give both, {name}=GREY,LABELS"
        )
    if len(parts) == 2 and _is_table_path(parts[1]):
        raise GrapesInputError(
            f"--state {text!r}: {parts[1]!r} is a table where the label volume was expected: give "
            f"{name}=GREY,LABELS, {name}=TABLE or {name}=GREY,LABELS,TABLE"
        )
    if len(parts) == 3 and not _is_table_path(parts[2]):
        raise GrapesInputError(
            f"--state {text!r}: {parts[2]!r} is not a table (.parquet or .csv made by grapes-dask analyze): give "
            f"{name}=GREY,LABELS,TABLE, the table last"
        )
    return name, (parts[0] if len(parts) == 1 else tuple(parts))


def _parse_raw_state(text: str):
    """``NAME=GREY`` (operando --segment) -> (name, grey)."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest.strip() or "," in rest:
        raise GrapesInputError(f"--state {text!r}: with --segment give each state as NAME=GREY (one raw grey "
                               "volume), e.g. --state pristine=scan_s0.zarr")
    if _is_table_path(rest.strip()):
        raise GrapesInputError(f"--state {text!r}: {rest.strip()!r} is a table; --segment needs grey volumes")
    return name.strip(), rest.strip()


def _check_prepare(states: dict, reference, prep: Path, overwrite: bool) -> None:
    """Checks of operando --segment that read no voxel: the inputs open and agree, outputs are free."""
    from .io import _check_can_write, resolve_volume

    if reference is not None and reference not in states:
        raise GrapesInputError(f"--reference {reference}: not one of the states {list(states)}")
    shapes = {n: resolve_volume(v).array.shape for n, v in states.items()}
    first = next(iter(shapes.values()))
    for n, sh in shapes.items():
        if sh != first:
            raise GrapesInputError(f"--state {n}: shape {sh} differs from {first}: crop the states to the same "
                                   "region of interest first")
    from .report import file_name

    for n in states:
        labels = prep / file_name(n) / "labels.zarr"
        if labels.exists() and not overwrite:
            raise GrapesInputError(f"{labels} already exists (an earlier --segment run): pass --overwrite, or give "
                                   "another --prep-dir")


def _parse_region(text):
    """``z0:z1,y0:y1,x0:x1`` -> tuple of (start, stop)."""
    if text is None:
        return None
    try:
        out = []
        for part in text.split(","):
            a, b = part.split(":")
            out.append((int(a), int(b)))
        return tuple(out)
    except ValueError:
        raise GrapesInputError(
            f"--noise-region {text!r}: give one start:stop range of voxel indices per axis, e.g. 0:20,0:300,0:300"
        ) from None


def _parse_gap(text):
    if str(text).strip().lower() == "none":
        return None
    try:
        gap = int(text)
    except ValueError:
        gap = -1
    if gap < 0:
        raise GrapesInputError(f"--neighbour-gap {text}: give a whole number of voxels >= 0, or none")
    return gap


@cli.command()
@_verbose_option
@click.option("--state", "state_specs", multiple=True, required=True, metavar="NAME=GREY,LABELS",
              help="One state, in order (repeat, at least twice): its grey and label volumes; or NAME=TABLE, "
                   "a table already made by 'grapes-dask analyze' with the same exclude-outer-layers value (then "
                   "give --noise-sigma and --neighbour-gap none); or NAME=GREY,LABELS,TABLE, such a table with "
                   "the volumes it was made from (not analysed again).")
@click.option("--reference", default=None, metavar="NAME", help="Reference state (default: the first).")
@click.option("--segment", "segment_states", is_flag=True,
              help="The states are raw grey volumes (--state NAME=GREY): register each onto the reference, "
                   "segment the reference and seed the others with its labels, then track.")
@click.option("--register", "register_method", type=click.Choice(["translation", "rigid", "none"]),
              default="translation", show_default=True, help="With --segment: motion model of the registration.")
@click.option("--denoise", "denoise_method", type=click.Choice(["nlm", "gaussian", "median", "none"]), default="none",
              show_default=True, help="With --segment: filter applied before the segmentation only.")
@click.option("--prep-dir", default=None, metavar="DIR",
              help="With --segment: folder of the registered, denoised and label volumes (default: DIR.prep "
                   "beside --out; kept).")
@click.option("--out", "out_dir", required=True, metavar="DIR",
              help="Output folder: tables, summary, figures and report.html.")
@click.option("--exclude-outer-layers", type=int, default=5, show_default=True,
              help="Each particle's ROI leaves out this many surface layers (the phase-contrast rim).")
@click.option("--noise-sigma", type=float, default=None,
              help="Image noise sigma_bg, grey levels (default: estimated from the background of each state).")
@click.option("--noise-region", default=None, metavar="Z0:Z1,Y0:Y1,X0:X1",
              help="Box of empty space to estimate the noise in (default: empty space found at a face of each "
                   "state's volume, else the background far from particles, with a warning).")
@click.option("--correct-drift", is_flag=True,
              help="Subtract from each state's ROI means the shift of its empty region's grey-level peak against "
                   "the reference's (a beam drift); the uncorrected values are kept beside them.")
@click.option("--drop-smallest", type=float, default=0.25, show_default=True,
              help="Exclude this fraction of the particles, smallest by reference volume.")
@click.option("--neighbour-gap", default="1", show_default=True, metavar="N|none",
              help="Exclude particles within N voxels of an inconsistent label (0: sharing a face; "
                   "none: no neighbour rule).")
@_spacing_option
@click.option("--layer-width", default=None, metavar="W", callback=_parse_length,
              help="Radial layer width for the states given as volumes: voxels (default 1 voxel of the finest "
                   "axis), or a length with its unit (0.5um).")
@click.option("--start-at", type=click.Choice(["edge", "center", "centre"]), default="edge", show_default=True,
              help="Layer 1 at the particle surface (edge) or at its centroid (center or centre).")
@click.option("--chunks", type=int, default=None, help="Chunk side for pass 1 (default: the stored chunks).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Address of a running dask scheduler (tcp://host:8786; a scheduler file is taken too, but "
                   "give it with --scheduler-file); default: a local cluster.")
@_hpc_options
@click.option("--workers", type=int, default=None, help=_WORKERS_HELP)
@click.option("--memory-limit", default=None, metavar="SIZE",
              help="Memory of the local cluster's workers, e.g. 8GiB (default: the machine's memory).")
@_profile_option
@click.option("--overwrite", is_flag=True, help="Replace DIR if it exists.")
@click.option("--partials", "partials_dir", default=None, metavar="DIR",
              help="Folder of the partial results that make interrupted analyses resumable, one subfolder per "
                   "state (default: DIR.partials beside DIR).")
@click.option("--keep-partials", is_flag=True, help="Keep the partial results after the output is written.")
@click.option("--quiet", is_flag=True, help="No progress, no dashboard link.")
def operando(state_specs, reference, segment_states, register_method, denoise_method, prep_dir, out_dir,
             exclude_outer_layers, noise_sigma, noise_region, correct_drift, drop_smallest, neighbour_gap, spacing,
             layer_width, start_at, chunks, scheduler, workers, memory_limit, overwrite, partials_dir, keep_partials,
             quiet, hpc, profile):
    """Track the same particles through states of charge: cleaning, statistics, figures, report.

    Writes to DIR: particles.parquet (one row per particle and state, with the cleaning
    reason), state tables (tables/NAME.parquet), summary.csv, z_tests.csv (each state against
    the reference and against the previous state), cleaning.csv (counts by reason),
    by_quantile.csv (changes by x-position quartile), background.csv (the empty region's
    grey-level peak per state: beam stability), the figures (png) and a self-contained
    report.html; prints the statistics (per state mean and change +- 3 SE_tot, z-tests,
    cleaning counts, noise). A run whose cleaning keeps fewer than 2 particles stops with an
    error naming the rule that removed them and the option to change, and writes nothing.
    """
    from .cluster import check_scheduler
    from .io import _check_can_write, atomic_output
    from .report import file_name, statistics_lines, write_tracking
    from .track import FewParticlesWarning, InheritedVoxelSizeWarning, check_states, track

    if not segment_states and (register_method != "translation" or denoise_method != "none" or prep_dir):
        raise GrapesInputError("--register, --denoise and --prep-dir set up --segment: add --segment (the states "
                               "then are raw grey volumes, NAME=GREY)")
    states = {}
    for spec in state_specs:
        name, value = _parse_raw_state(spec) if segment_states else _parse_state(spec)
        if name in states:
            raise GrapesInputError(f"--state {spec!r}: the state {name!r} is given twice; give each state once")
        states[name] = value
    if len(states) < 2:
        raise GrapesInputError(
            f"{len(states)} --state given: tracking needs at least two, the reference and one more (for a single "
            "state, use grapes-dask analyze and grapes-dask report)"
        )
    names = [file_name(n) for n in states]
    if len(set(names)) < len(names):
        clash = sorted({a for a, b in zip(states, names) if names.count(b) > 1})
        raise GrapesInputError(f"the states {clash} have the same file name once written as tables/NAME.parquet: "
                               "give names that differ in letters or digits")
    if scheduler and workers is not None:
        raise GrapesInputError(f"--workers {workers} sizes the local cluster: leave it out with --scheduler")
    _check_memory_limit(memory_limit, scheduler)
    _check_hpc(hpc, scheduler, workers, memory_limit)
    if noise_sigma is not None and not (np.isfinite(noise_sigma) and noise_sigma >= 0):
        raise GrapesInputError(f"--noise-sigma {noise_sigma}: give the image noise standard deviation in grey levels "
                               "(a number >= 0), or leave it out to estimate it from each state's background")
    if noise_sigma is not None and noise_region is not None:
        raise GrapesInputError(f"--noise-region {noise_region} is where the noise is estimated, but --noise-sigma "
                               f"{noise_sigma} gives it: leave out one of the two")
    region = _parse_region(noise_region)
    neighbour_gap = _parse_gap(neighbour_gap)
    _check_can_write(Path(out_dir), overwrite)
    if profile is not None and Path(profile).resolve().is_relative_to(Path(out_dir).resolve()):
        raise GrapesInputError(f"--profile {profile} is inside --out {out_dir}, which is written as a whole: put "
                               "the performance report beside it")
    _check_profile(profile, overwrite, out_dir)
    kw = dict(reference=reference, spacing=spacing, exclude_outer_layers=exclude_outer_layers,
              noise_sigma=noise_sigma, noise_region=region, drop_smallest=drop_smallest,
              neighbour_gap=neighbour_gap, correct_drift=correct_drift)
    analysis = dict(start_at="center" if start_at == "centre" else start_at)
    if layer_width is not None:
        analysis["layer_width"] = layer_width
    if chunks is not None:
        analysis["chunks"] = chunks
    kw.update(analysis)
    if segment_states:
        prep = Path(prep_dir) if prep_dir else Path(str(out_dir).rstrip("/\\") + ".prep")
        _check_prepare(states, reference, prep, overwrite)
    else:
        check_states(states, **kw)
    if scheduler:
        check_scheduler(scheduler)
    partials = Path(partials_dir) if partials_dir else Path(str(out_dir).rstrip("/\\") + ".partials")
    t0 = time.perf_counter()
    with _cluster(scheduler, workers, memory_limit, quiet, hpc) as client, _profiled(profile, overwrite), _notes(), \
            _background_warnings():
        if segment_states:
            from .preprocess import prepare_series

            series = prepare_series(states, prep, reference=reference,
                                    register=None if register_method == "none" else register_method,
                                    denoise=None if denoise_method == "none" else denoise_method, spacing=spacing,
                                    overwrite=overwrite, client=client, progress=not quiet,
                                    echo=None if quiet else functools.partial(click.echo, err=True))
            if not quiet:
                click.echo(series.summary(), err=True)
            states = series.states
            check_states(states, **kw)
        # fewer than 2 particles kept is a GrapesInputWarning, an error here (_cluster); few kept: a warning line
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FewParticlesWarning)
            warnings.simplefilter("always", InheritedVoxelSizeWarning)
            tr = track(states, client=client, progress=not quiet, partials=partials, **kw)
    from .stats import GrapesBackgroundWarning

    said = set()
    for w in caught:
        if issubclass(w.category, (FewParticlesWarning, InheritedVoxelSizeWarning, GrapesBackgroundWarning)):
            text = _message(w.message)
            if text not in said:  # each text once
                said.add(text)
                click.echo(f"warning: {text}", err=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    with atomic_output(out_dir, overwrite=overwrite) as tmp:
        tmp.mkdir()
        write_tracking(tr, tmp)
    if not keep_partials:
        _remove_partials_tree(partials)
    if not quiet:
        click.echo(f"voxel size {format_spacing(tr.params['spacing'], tr.params.get('spacing_unit'))}; layers "
                   f"{_layer_text(tr)} thick", err=True)
    for line in statistics_lines(tr):
        click.echo(line)
    _echo_background(tr)
    counts = tr.counts()
    kept = int(counts.loc[counts["reason"] == "kept", "n"].sum())
    click.echo(f"tracked {tr.particles['label'].nunique()} particles through {len(tr.states)} states "
               f"({kept} kept) in {time.perf_counter() - t0:.1f} s")
    click.echo(f"report: {Path(out_dir) / 'report.html'}")
    if profile and not quiet:
        click.echo(f"performance report: {Path(profile)}", err=True)


def _layer_text(tr) -> str:
    """The radial layer width of a tracking's tables, in voxels and in the unit."""
    from .units import to_voxels

    a = tr.params.get("analysis", {})
    return to_voxels(a.get("layer_width"), name="layer_width", spacing=tr.params["spacing"],
                     unit=tr.params.get("spacing_unit"), default=1.0).describe()


@contextlib.contextmanager
def _background_warnings():
    """GrapesBackgroundWarning (sigma_bg from the background between particles, a beam drift)
    as ``warning: ...`` lines on standard error, each text once, while the block runs."""
    import warnings

    from .stats import GrapesBackgroundWarning

    seen = set()
    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        old = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not issubclass(category, GrapesBackgroundWarning):
                return old(message, category, filename, lineno, file, line)
            if str(message) not in seen:
                seen.add(str(message))
                click.echo(f"warning: {message}", err=True)

        warnings.simplefilter("always", GrapesBackgroundWarning)
        warnings.showwarning = show
        yield


def _echo_background(tr) -> None:
    """Which noise source each state used, and the beam check, on standard error (standard
    output keeps the two closing lines; the warnings come from :func:`_background_warnings`)."""
    # the values are in the statistics on standard output; here where they were measured, once per place
    places: dict = {}
    for name, rec in tr.params.get("noise", {}).items():
        box = rec.get("region")
        where = "" if box is None else " " + ",".join(f"{a}:{b}" for a, b in box)
        places.setdefault(f"{rec['source']}{where}", []).append(str(name))
    for where, names in places.items():
        click.echo(f"noise sigma_bg measured in {where}: {', '.join(names)}", err=True)
    bg = tr.params.get("background") or {}
    if bg.get("box") is None:
        click.echo(f"beam stability not checked: {bg.get('note') or 'no empty region'}", err=True)
        return
    flagged = bg.get("flagged") or []
    click.echo(f"beam stability (background.csv): empty region {bg['box']}, "
               + (f"drift flagged in {', '.join(flagged)}" if flagged else "no drift flagged")
               + (" (corrected)" if bg.get("correct_drift") else ""), err=True)


@cli.command()
@_verbose_option
@click.argument("tables", nargs=-1, required=True, metavar="TABLE...")
@click.option("--out", "out_dir", required=True, metavar="DIR", help="Output folder: figures and report.html.")
@click.option("--name", "names", multiple=True, metavar="NAME",
              help="Name of each table in the report, in order (default: the file names).")
@click.option("--overwrite", is_flag=True, help="Replace DIR if it exists.")
def report(tables, out_dir, names, overwrite):
    """Report (figures, distributions, radial profiles by volume quartile) of particle tables."""
    from .io import _check_can_write, atomic_output
    from .output import read_table
    from .report import tables_report

    if names and len(names) != len(tables):
        raise GrapesInputError(f"{len(names)} --name for {len(tables)} tables: give one name per table, or none")
    _check_can_write(Path(out_dir), overwrite)
    frames = {}
    for i, path in enumerate(tables):
        name = names[i] if names else re.sub(r"\.(parquet|csv|xlsx)$", "", Path(path).name, flags=re.I)
        if name in frames:
            raise GrapesInputError(f"two tables are named {name!r}: name them with --name")
        frames[name] = read_table(path)
    with atomic_output(out_dir, overwrite=overwrite) as tmp:
        tmp.mkdir()
        tables_report(frames, tmp)
    click.echo(f"report: {Path(out_dir) / 'report.html'}")


def _cluster_options(f):
    """--scheduler, --workers, --memory-limit and the batch-job options of a pre-processing command."""
    f = _hpc_options(f)
    f = click.option("--memory-limit", default=None, metavar="SIZE",
                     help="Memory of the local cluster's workers, e.g. 8GiB (default: the machine's memory).")(f)
    f = click.option("--workers", type=int, default=None, help=_WORKERS_HELP)(f)
    f = click.option("--scheduler", default=None, metavar="ADDRESS",
                     help="Address of a running dask scheduler (tcp://host:8786); default: a local cluster.")(f)
    return f


def _check_cluster_args(scheduler, workers, memory_limit, hpc) -> None:
    from .cluster import check_scheduler

    _check_memory_limit(memory_limit, scheduler)
    if scheduler and workers is not None:
        raise GrapesInputError(f"--workers {workers} sizes the local cluster: leave it out with --scheduler")
    _check_hpc(hpc, scheduler, workers, memory_limit)
    if scheduler:
        check_scheduler(scheduler)


@cli.command()
@_verbose_option
@click.argument("fixed", metavar="FIXED")
@click.argument("moving", metavar="MOVING")
@click.argument("out", metavar="OUT.zarr")
@click.option("--method", type=click.Choice(["translation", "rigid"]), default="translation", show_default=True,
              help="Motion model: a sub-voxel translation (phase correlation) or a rigid motion (SimpleITK).")
@click.option("--transform", "transform_path", default=None, metavar="T.json",
              help="Apply this saved transform instead of estimating one (e.g. the grey's, to its labels).")
@click.option("--save-transform", default=None, metavar="T.json",
              help="Also write the transform here (it is always in OUT's attributes).")
@click.option("--downsample", type=int, default=None,
              help="Block-mean factor of the coarse view (default: the view is at most 128 voxels per side).")
@click.option("--crop", type=int, default=None,
              help="Side of the full-resolution crop of the fine stage, voxels (default 128).")
@click.option("--order", type=int, default=1, show_default=True,
              help="Interpolation order of the resampling (0 nearest: for labels; 1 linear; 3 cubic).")
@_spacing_option
@click.option("--chunks", type=int, default=None, help="Chunk side of OUT (default: MOVING's chunks).")
@_cluster_options
@click.option("--overwrite", is_flag=True, help="Replace OUT (and --save-transform) if they exist.")
@click.option("--quiet", is_flag=True, help="No progress, no dashboard link: only the closing lines.")
def register(fixed, moving, out, method, transform_path, save_transform, downsample, crop, order, spacing, chunks,
             scheduler, workers, memory_limit, hpc, overwrite, quiet):
    """Register MOVING onto FIXED (two states of charge) and write MOVING resampled on FIXED's grid.

    The motion is estimated on a block-mean view and refined on a full-resolution crop; the
    resampling runs block by block. The transform maps FIXED's voxel coordinates to MOVING's.
    """
    from .io import _check_can_write
    from .registration import Transform, apply_transform, register as estimate

    _check_can_write(Path(out), overwrite)
    if save_transform is not None:
        _check_can_write(Path(save_transform), overwrite)
    _check_cluster_args(scheduler, workers, memory_limit, hpc)
    t0 = time.perf_counter()
    tr = Transform.load(transform_path) if transform_path is not None else None
    with _cluster(scheduler, workers, memory_limit, quiet, hpc), _notes():
        if tr is None:
            tr = estimate(fixed, moving, method=method, spacing=spacing, downsample=downsample, crop=crop,
                          progress=not quiet)
        t1 = time.perf_counter()
        if save_transform is not None:
            tr.save(save_transform)
        apply_transform(moving, tr, out=out, order=order, chunks=chunks, overwrite=overwrite, progress=not quiet)
    shift = ", ".join(f"{v:+.3f}" for v in tr.shift)
    how = f"loaded from {transform_path}" if transform_path else f"estimated in {t1 - t0:.1f} s"
    ncc = "" if tr.ncc is None else f"; agreement (NCC) {tr.ncc:.3f}" + (
        "" if tr.ncc_identity is None else f", {tr.ncc_identity:.3f} before")
    click.echo(f"{tr.method} transform {how}: shift at the centre ({shift}) voxels{ncc}")
    click.echo(f"wrote {Path(out)} in {time.perf_counter() - t0:.1f} s")


@cli.command()
@_verbose_option
@click.argument("grey", metavar="GREY")
@click.argument("out", metavar="OUT.zarr")
@click.option("--method", type=click.Choice(["nlm", "gaussian", "median"]), default="nlm", show_default=True,
              help="Fast non-local means (the paper's choice), a Gaussian blur or a median filter.")
@click.option("--sigma", type=float, default=None, help="gaussian: standard deviation, voxels (default 1).")
@click.option("--size", type=int, default=None, help="median: window side, voxels (default 3).")
@click.option("--patch-size", type=int, default=5, show_default=True, help="nlm: side of the compared patches, voxels.")
@click.option("--patch-distance", type=int, default=6, show_default=True,
              help="nlm: search radius around each voxel, voxels.")
@click.option("--h", "h", type=float, default=None,
              help="nlm: filter strength, grey levels (default 0.8 x the noise sigma).")
@click.option("--noise-sigma", type=float, default=None,
              help="nlm: noise standard deviation, grey levels (default: estimated once on the whole volume).")
@_spacing_option
@click.option("--chunks", type=int, default=None, help="Side of the blocks and of OUT's chunks (default: GREY's chunks).")
@_cluster_options
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress, no dashboard link: only the closing line.")
def denoise(grey, out, method, sigma, size, patch_size, patch_distance, h, noise_sigma, spacing, chunks, scheduler,
            workers, memory_limit, hpc, overwrite, quiet):
    """Denoise a grey volume block by block (equal to the filter on the whole volume), to Zarr.

    NLM holds Python's lock while it filters, so for it the local cluster starts one worker
    process per core unless --workers says otherwise.
    """
    import os

    from .denoising import denoise as run_denoise
    from .io import _check_can_write

    _check_can_write(Path(out), overwrite)
    _check_cluster_args(scheduler, workers, memory_limit, hpc)
    if method == "nlm" and workers is None and not scheduler and not hpc:
        workers = max(1, os.cpu_count() or 1)
    kw = {"gaussian": dict(sigma=sigma), "median": dict(size=size),
          "nlm": dict(patch_size=patch_size, patch_distance=patch_distance, h=h, noise_sigma=noise_sigma)}[method]
    for name, v in (("--sigma", sigma), ("--size", size), ("--h", h), ("--noise-sigma", noise_sigma)):
        if v is not None and name.lstrip("-").replace("-", "_") not in kw:
            raise GrapesInputError(f"{name} {v} is not an option of --method {method}: leave it out")
    kw = {k: v for k, v in kw.items() if v is not None}
    t0 = time.perf_counter()
    with _cluster(scheduler, workers, memory_limit, quiet, hpc), _notes():
        path = run_denoise(grey, method, out=out, chunks=chunks, spacing=spacing, overwrite=overwrite,
                           progress=not quiet, **kw)
    import zarr

    attrs = dict(zarr.open_array(str(path)).attrs)
    meta = attrs.get("grapes_dask", attrs)
    extra = ""
    if method == "nlm":
        ns, hh = _find_key(meta, "noise_sigma"), _find_key(meta, "h")
        extra = f" (noise sigma {ns:.3g}, h {hh:.3g} grey levels)" if ns is not None and hh is not None else ""
    click.echo(f"wrote {Path(out)}: {method}{extra} in {time.perf_counter() - t0:.1f} s")


def _find_key(d, key):
    """The value of `key` in a nested dict of attributes (None if absent)."""
    if isinstance(d, dict):
        if key in d and not isinstance(d[key], dict):
            return d[key]
        for v in d.values():
            r = _find_key(v, key)
            if r is not None:
                return r
    return None


@cli.command()
@_verbose_option
@click.argument("grey", metavar="GREY")
@click.argument("out", metavar="OUT.zarr")
@click.option("--threshold", type=float, default=None,
              help="Grey level above which a voxel is particle (default: Otsu's threshold of the histogram).")
@click.option("--invert", is_flag=True, help="Particles are darker than the background (below the threshold).")
@_spacing_option
@click.option("--closing", type=int, default=1, show_default=True,
              help="Radius (voxels) of the binary closing that fills small holes and cracks (0: none).")
@click.option("--opening", type=int, default=1, show_default=True,
              help="Radius (voxels) of the binary opening that removes specks and thin bridges (0: none).")
@click.option("--no-fill-holes", is_flag=True, help="Leave cavities enclosed by a particle unfilled.")
@click.option("--smoothing", default=None, metavar="S", callback=_parse_length,
              help="Standard deviation of the Gaussian smoothing of the distance map: voxels of the finest axis, "
                   "or a length with its unit (0.3um) (default: 1 voxel; 0: none).")
@click.option("--markers", type=click.Choice(["dynamics", "local_max"]), default="dynamics", show_default=True,
              help="Maxima of the smoothed distance map that start a particle: those rising at least --h above "
                   "the pass to a higher one (dynamics), or the highest point within --min-distance (local_max).")
@click.option("--h", "h", default=None, metavar="H", callback=_parse_length,
              help="Dynamics threshold: voxels of the finest axis, or a length with its unit (default: 0.5 voxel).")
@click.option("--min-distance", default=None, metavar="D", callback=_parse_length,
              help="Footprint radius of --markers local_max: voxels of the finest axis, or a length with its unit "
                   "(default: 3 voxels).")
@click.option("--min-size", type=int, default=20, show_default=True, help="Particles of fewer voxels are removed.")
@click.option("--seeds", default=None, metavar="LABELS",
              help="Reference labels (e.g. the pristine state, registered onto GREY): each particle keeps its id.")
@click.option("--seed-erosion", type=int, default=2, show_default=True,
              help="With --seeds: erode each reference particle by this many voxels before it seeds.")
@click.option("--dataset", default=None, help="Dataset path of GREY inside an HDF5 file or Zarr group.")
@click.option("--chunks", type=int, default=192, show_default=True, help="Side of the processing blocks, voxels.")
@_cluster_options
@click.option("--keep-work", is_flag=True, help="Keep the intermediate arrays (OUT.work: mask, distance map, basins).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress, no dashboard link: only the closing line.")
def segment(grey, out, threshold, invert, spacing, closing, opening, no_fill_holes, smoothing, markers, h,
            min_distance, min_size, seeds, seed_erosion, dataset, chunks, scheduler, workers, memory_limit, hpc,
            keep_work, overwrite, quiet):
    """Label the particles of a grey volume (threshold, morphology, watershed), out of core.

    The paper's segmentation: threshold, closing and opening, cavities filled, an exact distance
    map smoothed, and a watershed from its maxima. With --seeds the later states of an operando
    series keep the reference ids. The labels go to OUT.zarr (uint32, or the seeds' dtype) with
    the parameters and threshold in its attributes.
    """
    from .io import _check_can_write, resolve_volume
    from .segmentation import check_seeds, segment as run_segment

    _check_can_write(Path(out), overwrite)
    _check_cluster_args(scheduler, workers, memory_limit, hpc)
    vol = resolve_volume(grey if dataset is None else f"{grey}::{dataset}")
    if seeds is not None:
        seeds = check_seeds(vol, seeds)
    t0 = time.perf_counter()
    with _cluster(scheduler, workers, memory_limit, quiet, hpc) as client, _notes():
        res = run_segment(vol, threshold=threshold, invert=invert, spacing=spacing, closing=closing, opening=opening,
                          fill_holes=not no_fill_holes, smoothing=smoothing, markers=markers, h=h,
                          min_distance=min_distance, min_size=min_size, seeds=seeds, seed_erosion=seed_erosion,
                          out=out, overwrite=overwrite, chunks=chunks, keep_work=keep_work, client=client,
                          progress=not quiet)
    dt = time.perf_counter() - t0
    extra = f", {res.n_removed} under --min-size removed" if res.n_removed else ""
    if seeds is not None:
        extra += f", {res.unlabelled_voxels} foreground voxels reached by no seed left 0"
    click.echo(f"wrote {Path(out)}: {res.n_particles} particles (threshold {res.threshold:g}, "
               f"{res.n_basins} basins{extra}), shape {tuple(vol.array.shape)}, in {dt:.1f} s")


@cli.command()
@_verbose_option
@click.option("--out", "out_dir", default="grapes-demo", show_default=True, help="Folder for the demo outputs.")
@click.option("--size", type=int, default=160, show_default=True, help="Side of the phantom volume, voxels (>= 64).")
@click.option("--workers", type=int, default=None, help=_WORKERS_HELP)
@click.option("--seed", type=int, default=0, show_default=True, help="Phantom seed.")
@click.option("--overwrite", is_flag=True, help="Replace the outputs of an earlier demo in OUT.")
@click.option("--quiet", is_flag=True, help="No progress, no dashboard link.")
def demo(out_dir, size, workers, seed, overwrite, quiet):
    """A synthetic operando series (four states of charge) tracked on a local cluster, with a report.

    Writes the phantom (Zarr) to OUT/phantom and the results (tables, summary, z-tests,
    figures and a self-contained report.html) to OUT/results.
    """
    from .demo import run_demo

    run_demo(out_dir, size=size, workers=workers, seed=seed, overwrite=overwrite, quiet=quiet, echo=click.echo)


def main(argv=None):
    """Entry point of the ``grapes-dask`` console script."""
    # Registered first, so it runs last at exit, after every other exit handler: objects still alive
    # are left to the operating system instead of being walked by the interpreter's final garbage
    # collections (0.5-1 s with numba, pandas and distributed loaded). The outputs are closed by then.
    atexit.register(gc.freeze)
    return cli.main(args=argv, prog_name="grapes-dask")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
