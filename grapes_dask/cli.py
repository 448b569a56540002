"""The ``grapes-dask`` command.

User errors (missing file, unknown dataset, unsupported dtype, existing output, bad option)
print one line ``error: ...`` naming the input and the fix, and exit with status 2; ``--verbose``
shows the traceback as well. Other failures exit with status 1.
"""

from __future__ import annotations

import sys
import time
import traceback

import click
import numpy as np

from ._errors import GrapesInputError

_USER_ERRORS = (GrapesInputError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError)


class _Group(click.Group):
    """Click group that turns user errors into one clear message and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except _USER_ERRORS as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                traceback.print_exc()
            click.echo(f"error: {_message(exc)}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: no output was left half-written", err=True)
            ctx.exit(130)


def _message(exc: BaseException) -> str:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, FileExistsError)) and exc.filename:
        what = {
            FileNotFoundError: "does not exist: check the path",
            PermissionError: "cannot be accessed: check its permissions",
            IsADirectoryError: "is a folder where a file was expected",
            FileExistsError: "already exists: choose another path or pass --overwrite",
        }[type(exc)]
        return f"{exc.filename!r} {what}"
    return str(exc)


def _spacing_option(f):
    return click.option(
        "--spacing", nargs=3, type=float, default=None, metavar="Z Y X",
        help="Voxel size per axis (overrides the file's metadata).",
    )(f)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks of errors.")
@click.version_option(package_name="grapes-dask")
@click.pass_context
def cli(ctx, verbose):
    """Exact, out-of-core per-particle grey-level analysis (GREAT2) of micro-CT volumes."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose


@cli.command()
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
@click.argument("path")
@click.option("--dataset", default=None, help="Dataset path inside an HDF5/NeXus file or array in a Zarr group.")
@click.option("--level", type=int, default=None, help="Resolution level of an OME-Zarr or pyramidal TIFF (default 0).")
def info(path, dataset, level):
    """Show shape, dtype, chunks, spacing, size on disk and provenance of a volume."""
    from . import io

    click.echo(io.volume_info(path, dataset=dataset, level=level).to_text())


@cli.command()
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


def _check_table_out(path, overwrite: bool) -> None:
    """Fail before any compute if the table cannot be written where asked."""
    from pathlib import Path

    from .io import _check_can_write

    suffix = Path(path).suffix.lower()
    if suffix not in (".parquet", ".csv", ".xlsx"):
        raise GrapesInputError(f"output table {str(path)!r}: use a .parquet, .csv or .xlsx file name")
    _check_can_write(Path(path), overwrite)


def _summary(n_particles: int, n_voxels: int, seconds: float) -> str:
    return (f"{n_particles} particles, {n_voxels / 1e6:.1f} Mvoxels in {seconds:.1f} s "
            f"({n_voxels / max(seconds, 1e-9) / 1e6:.1f} Mvoxels/s)")


@cli.command()
@click.argument("grey", metavar="GREY")
@click.argument("labels", metavar="LABELS")
@click.option("--out", "out", required=True, help="Output table: .parquet, .csv or .xlsx.")
@_spacing_option
@click.option("--chunks", type=int, default=None, help="Chunk side for pass 1 (default: the stored chunks).")
@click.option("--dataset", default=None, help="Dataset path inside HDF5 inputs (both volumes).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Address (or scheduler file) of a running dask scheduler; default: a local cluster.")
@click.option("--workers", type=int, default=None, help="Worker processes of the local cluster (default: cores).")
@click.option("--layer-width", type=float, default=None, help="Radial layer width in spacing units (default 1).")
@click.option("--start-at", type=click.Choice(["edge", "center"]), default="edge", show_default=True,
              help="Layer 1 at the particle surface (edge) or at its centroid (center).")
@click.option("--normalise", type=click.Choice(["radial_max", "surface"]), default="radial_max", show_default=True,
              help="Normalisation of radial_layers_graylevelnormed.")
@click.option("--exclude-outer-layers", type=int, default=0, show_default=True,
              help="ROI columns use the layers deeper than this.")
@click.option("--exclude-labels", default=None, metavar="ID[,ID...]",
              help="Labels to leave out of the layer analysis (e.g. a binder phase).")
@click.option("--no-black-border", is_flag=True, help="Do not treat the outside of the volume as background.")
@click.option("--fill-holes", is_flag=True, help="Count each particle's enclosed cavities as part of it in the layers.")
@click.option("--max-hole-size", type=int, default=None, help="With --fill-holes, fill cavities of at most this many voxels.")
@click.option("--region-size", type=int, default=400, show_default=True,
              help="Side of the blocks of chunks each task works on, voxels (memory vs halo cost).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def analyze(grey, labels, out, spacing, chunks, dataset, scheduler, workers, layer_width, start_at, normalise,
            exclude_outer_layers, exclude_labels, no_black_border, fill_holes, max_hole_size, region_size, overwrite,
            quiet):
    """Particle table (GREAT2 radial profiles and properties) of a grey and a label volume."""
    from pathlib import Path

    from . import io
    from .cluster import cluster_client
    from .output import write_table
    from .table import analyze_tables

    _check_table_out(out, overwrite)
    excl = None
    if exclude_labels:
        try:
            excl = [int(x) for x in exclude_labels.replace(" ", "").split(",") if x]
        except ValueError:
            raise GrapesInputError(f"--exclude-labels {exclude_labels!r}: give label ids separated by commas") from None
    g = io.open_volume(grey, dataset=dataset) if dataset else grey
    lab = io.open_volume(labels, dataset=dataset) if dataset else labels
    t0 = time.perf_counter()
    with cluster_client(scheduler, workers=workers) as client:
        click.echo(f"dask dashboard: {client.dashboard_link}", err=True)
        res = analyze_tables(g, lab, spacing=spacing, chunks=chunks, layer_width=layer_width, start_at=start_at,
                             normalise=normalise, exclude_outer_layers=exclude_outer_layers, exclude_labels=excl,
                             black_border=not no_black_border, fill_holes=fill_holes, max_hole_size=max_hole_size,
                             region_size=region_size, client=client,
                             progress=not quiet)
    dt = time.perf_counter() - t0
    write_table(res.particles, out, overwrite=overwrite)
    n_vox = int(np.prod(io.open_volume(lab).shape)) if not hasattr(lab, "shape") else int(np.prod(lab.shape))
    click.echo(f"wrote {Path(out)}: {_summary(len(res.particles), n_vox, dt)}")


@cli.command()
@click.option("--out", "out_dir", default="grapes-demo", show_default=True, help="Folder for the demo outputs.")
@click.option("--size", type=int, default=192, show_default=True, help="Side of the phantom volume, voxels.")
@click.option("--workers", type=int, default=None, help="Worker processes of the local cluster (default: cores).")
@click.option("--seed", type=int, default=0, show_default=True, help="Phantom seed.")
@click.option("--overwrite", is_flag=True, help="Replace the outputs of an earlier demo in OUT.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out_dir, size, workers, seed, overwrite, quiet):
    """Phantom of a pristine and a charged (cracked) electrode, analysed on a local cluster.

    Writes the phantom (Zarr), one particle table per state (parquet) and a figure of the mean
    normalised radial grey-level profiles (the paper's fig. 6) to OUT.
    """
    from pathlib import Path

    from . import synthetic
    from .cluster import cluster_client
    from .output import write_table
    from .plotting import plot_radial_profiles
    from .table import analyze_tables

    if size < 48:
        raise GrapesInputError(f"--size {size}: give at least 48 voxels so that particles fit")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    states = {"pristine": 0, "charged 4.4 V": 1}
    tables_out = [out / f"particles_s{s}.parquet" for s in states.values()]
    fig_path = out / "radial_profiles.png"
    for p in tables_out:
        _check_table_out(p, overwrite)
    if fig_path.exists() and not overwrite:
        raise GrapesInputError(f"output {str(fig_path)!r} already exists: pass --overwrite or choose another --out")
    t0 = time.perf_counter()
    click.echo(f"1/3 phantom: {size}^3 voxels, 2 states (pristine, charged) -> {out / 'phantom'}")
    (out / "phantom").mkdir(exist_ok=True)
    ph = synthetic.make_phantom(out / "phantom", shape=(size, size, size), n_states=2, seed=seed,
                                mean_radius=12.0, damage=(0.0, 0.8), chunks=96, overwrite=overwrite,
                                progress=not quiet)
    tables = {}
    with cluster_client(workers=workers) as client:
        threads = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
        click.echo(f"2/3 analysis on a local cluster ({threads} threads); dashboard: {client.dashboard_link}")
        for (name, s), path in zip(states.items(), tables_out):
            t1 = time.perf_counter()
            res = analyze_tables(ph.grey[s], ph.labels[s], exclude_outer_layers=2, client=client, progress=not quiet)
            write_table(res.particles, path, overwrite=overwrite)
            tables[name] = res.particles
            click.echo(f"    {name}: {_summary(len(res.particles), size ** 3, time.perf_counter() - t1)} -> {path}")
    click.echo("3/3 figure")
    big = {k: t[(~t["touches_border"]) & (t["volume"] >= t["volume"].quantile(0.5))] for k, t in tables.items()}
    fig = plot_radial_profiles(big, column="radial_layers_graylevel",
                               title="largest half of particles, not touching the border")
    from .io import atomic_output

    with atomic_output(fig_path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    click.echo(f"    {fig_path}")
    t = tables["charged 4.4 V"]
    cols = ["label", "voxel_count", "sphericity", "intensity_mean", "roi_mean"]
    click.echo("\nfirst particles of the charged state:")
    click.echo(t[cols].head(5).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    p0, p1 = (tables[k]["roi_mean"].mean() for k in states)
    click.echo(f"\nmean ROI grey level: pristine {p0:.2f}, charged {p1:.2f} (cracks darken the cores)")
    click.echo(f"done in {time.perf_counter() - t0:.1f} s")


def main(argv=None):
    """Entry point of the ``grapes-dask`` console script."""
    return cli.main(args=argv, prog_name="grapes-dask")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
