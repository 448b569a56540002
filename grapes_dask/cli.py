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
@click.option("--chunks", default=128, show_default=True, type=int, help="Chunk side of the Zarr output, voxels.")
@_spacing_option
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def convert(input_path, output, dataset, chunks, spacing, overwrite, quiet):
    """Convert a TIFF / HDF5 / NeXus / npy / Zarr volume to a compressed, chunked Zarr v3 array."""
    from . import io

    t0 = time.perf_counter()
    dest = io.convert(input_path, output, chunks=chunks, dataset=dataset, spacing=spacing,
                      overwrite=overwrite, progress=not quiet)
    info = io.volume_info(dest)
    click.echo(
        f"wrote {dest}: shape {info.shape}, {info.dtype}, chunks {info.chunks}, "
        f"{info.nbytes_on_disk / 2**20:.1f} MiB on disk, in {time.perf_counter() - t0:.1f} s"
    )


@cli.command()
@click.argument("path")
@click.option("--dataset", default=None, help="Dataset path inside an HDF5/NeXus file or array in a Zarr group.")
def info(path, dataset):
    """Show shape, dtype, chunks, spacing, size on disk and provenance of a volume."""
    from . import io

    click.echo(io.volume_info(path, dataset=dataset).to_text())


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


def main(argv=None):
    """Entry point of the ``grapes-dask`` console script."""
    return cli.main(args=argv, prog_name="grapes-dask")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
