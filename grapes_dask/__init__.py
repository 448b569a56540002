"""grapes_dask: exact, out-of-core GREAT2 radial grey-level analysis of micro-CT particles on Dask.

Public API (see the README):

- :func:`resolve_volume` (a :class:`Volume`: lazy array, voxel size and its source, reader),
  :func:`open_volume`, :func:`convert`, :func:`volume_info`, :func:`read_spacing` (``grapes_dask.io``;
  ``grapes_dask.io.check_chunks`` lists damaged chunks)
- errors: :class:`GrapesInputError` (bad input, named with its fix), :class:`GrapesDataError`
  (a damaged chunk or file, named), :class:`GrapesWorkerError` (a task that killed its worker)
- :func:`analyze`, :func:`analyze_tables`, :func:`particle_table`, :func:`check_inputs`
  (``grapes_dask.table``)
- :func:`write_table`, :func:`read_table`, :func:`prop_to_image`, :func:`particle` (``grapes_dask.output``)
- :func:`population_stats`, :func:`change_stats`, :func:`z_test`, :func:`quantile_groups`,
  :func:`estimate_noise` (``grapes_dask.stats``: the paper's eq. 1-6)
- :func:`grapes_dask.track.track` (operando tracking and cleaning, a :class:`Tracking`),
  ``grapes_dask.plotting`` (the paper's figures), ``grapes_dask.particle_figures`` (fig. 5, 8b, 11f),
  ``grapes_dask.report`` (HTML reports)
- after the paper: ``grapes_dask.change`` (noise-aware change per particle, per-layer changes,
  trajectories, trends against a covariate) and ``grapes_dask.change_plots`` (their figures)
- ``grapes_dask.units`` (voxel sizes and the unit of every length parameter)
- pre-processing (paper section 2.2): :func:`register`, :func:`apply_transform`, :class:`Transform`
  (``grapes_dask.registration``), :func:`denoise`, :func:`estimate_noise_sigma` (``grapes_dask.denoising``),
  :func:`segment` (``grapes_dask.segmentation``: threshold, morphology,
  watershed, seeds), :func:`prepare_series` (``grapes_dask.preprocess``: the chain for a series),
  ``grapes_dask.evaluate`` (scoring a segmentation against ground truth, out of core)
- :func:`grapes_dask.synthetic.make_phantom` and friends
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("grapes-dask")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

from ._errors import GrapesDataError, GrapesInputError, GrapesInputWarning, GrapesWorkerError  # noqa: E402

# The heavy modules (numba kernels, dask, zarr) load on first use, so that the command starts
# at once and a Ctrl-C while they load is handled like any other.
_LAZY = {
    "convert": "io", "open_volume": "io", "read_spacing": "io", "volume_info": "io", "Volume": "io",
    "resolve_volume": "io",
    "ParticleTables": "table", "analyze": "table", "analyze_tables": "table", "particle_table": "table",
    "check_inputs": "table", "CheckedInputs": "table", "normalise_profiles": "table",
    "population_stats": "stats", "change_stats": "stats", "z_test": "stats", "quantile_groups": "stats",
    "estimate_noise": "stats", "Tracking": "track",
    "Particle": "output", "particle": "output", "prop_to_image": "output", "read_table": "output",
    "write_table": "output",
    "register": "registration", "apply_transform": "registration", "Transform": "registration",
    "segment": "segmentation", "Segmentation": "segmentation", "prepare_series": "preprocess",
    "denoise": "denoising", "estimate_noise_sigma": "denoising",
}


_SUBMODULES = {"change", "change_plots", "cli", "cluster", "demo", "denoising", "evaluate", "formats", "io",
               "kernels", "output", "particle_figures", "plan", "plotting", "preprocess", "registration", "report",
               "segmentation", "stats", "synthetic", "table", "track", "units"}


def __getattr__(name):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


__all__ = [
    "CheckedInputs",
    "GrapesInputError",
    "GrapesDataError",
    "GrapesWorkerError",
    "GrapesInputWarning",
    "Volume",
    "check_inputs",
    "resolve_volume",
    "Particle",
    "ParticleTables",
    "__version__",
    "analyze",
    "analyze_tables",
    "convert",
    "open_volume",
    "particle",
    "particle_table",
    "prop_to_image",
    "read_spacing",
    "read_table",
    "volume_info",
    "normalise_profiles",
    "population_stats",
    "change_stats",
    "z_test",
    "quantile_groups",
    "estimate_noise",
    "Tracking",
    "write_table",
    "register",
    "apply_transform",
    "Transform",
    "segment",
    "Segmentation",
    "prepare_series",
    "denoise",
    "estimate_noise_sigma",
]
