"""grapes_dask: exact, out-of-core GREAT2 radial grey-level analysis of micro-CT particles on Dask.

Public API (see the README):

- :func:`open_volume`, :func:`convert`, :func:`volume_info`, :func:`read_spacing` (``grapes_dask.io``)
- :func:`analyze`, :func:`analyze_tables`, :func:`particle_table` (``grapes_dask.table``)
- :func:`write_table`, :func:`read_table`, :func:`prop_to_image`, :func:`particle` (``grapes_dask.output``)
- :func:`grapes_dask.synthetic.make_phantom` and friends
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("grapes-dask")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

from ._errors import GrapesInputError  # noqa: E402
from .io import convert, open_volume, read_spacing, volume_info  # noqa: E402
from .table import ParticleTables, analyze, analyze_tables, particle_table  # noqa: E402
from .output import Particle, particle, prop_to_image, read_table, write_table  # noqa: E402

__all__ = [
    "GrapesInputError",
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
    "write_table",
]
